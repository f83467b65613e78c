"""LLaVA critic: `LlavaForConditionalGeneration` with a CLIP or SigLIP vision tower.

Image tokens are the projector output of `config.vision_feature_layer` (an int, or a list whose hidden states
are concatenated), with the CLS token dropped when `vision_feature_select_strategy == "default"` (exactly as
HF). Patch features are the same selected hidden states before the projector, always without a CLS token.
"""

from __future__ import annotations

import torch

from uno_engine.critics.base import Critic, CriticInputs
from uno_engine.critics.common import find_layers
from uno_engine.critics.registry import register_critic
from uno_engine.critics.trim import vision_hidden_states


@register_critic
class LlavaCritic(Critic):
    hf_class_names = ("LlavaForConditionalGeneration",)
    family = "LLaVA"

    def _build(self):
        m = self.hf_model
        self.vision_tower = m.model.vision_tower
        self.projector = m.model.multi_modal_projector
        self.language_model = m.model.language_model
        self.lm_head = m.lm_head
        cfg = m.config
        self.feature_layer = cfg.vision_feature_layer
        self.select_strategy = cfg.vision_feature_select_strategy
        vcfg = cfg.vision_config
        self.patch_size, self.image_size = vcfg.patch_size, vcfg.image_size
        n_layers = 1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        self._vision_dim = vcfg.hidden_size * n_layers

    @property
    def vision_dim(self) -> int:
        return self._vision_dim

    def _attention_modules(self):
        return {"vision_tower": self.vision_tower, "language_model": self.language_model}

    def _checkpoint_layers(self):
        return list(find_layers(self.vision_tower)) + list(find_layers(self.language_model))

    def _vision_tower(self):
        return self.vision_tower

    def _encode(self, inputs: CriticInputs):
        dtype = self.projector.linear_1.weight.dtype
        n = len(find_layers(self.vision_tower))
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        layers = [i % (n + 1) for i in layers]  # hidden_states holds the embeddings then each of the n layers
        with self._vision_pixels(inputs, dtype) as (pv, (gh, gw)):  # pixel_values, or the fused patch tokens
            if self.trim:  # the layers after the deepest one read never run
                selected = vision_hidden_states(self.vision_tower, pv, layers)
            else:
                out = self.vision_tower(pv, output_hidden_states=True, return_dict=True)
                selected = [out.hidden_states[i] for i in layers]
                del out
        if self.select_strategy == "default":
            lm_feats = [h[:, 1:] for h in selected]
        else:
            lm_feats = selected
        lm_feats = torch.cat(lm_feats, dim=-1) if len(lm_feats) > 1 else lm_feats[0]
        image_embeds = self.projector(lm_feats)
        n = gh * gw
        patch = [h[:, h.shape[1] - n :] for h in selected]  # drop a CLS token when the tower has one
        patch = torch.cat(patch, dim=-1) if len(patch) > 1 else patch[0]
        return image_embeds, patch, (gh, gw)
