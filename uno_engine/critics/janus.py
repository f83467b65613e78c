"""Janus critic: the understanding path of `JanusForConditionalGeneration` (SigLIP vision model + aligner +
LM).

Only the understanding modules (vision_model, aligner, language_model, lm_head) are registered in the critic
and frozen; the generation modules (vqmodel, generation_embeddings, generation_aligner, generation_head) are
never touched, so the same model can be the generator. The language model is shared by both paths: the
critic's layer checkpointing acts only inside the critic's forward.
"""

from __future__ import annotations

from uno_engine.critics.base import Critic, CriticInputs
from uno_engine.critics.llava import find_layers


class JanusCritic(Critic):
    hf_class_names = ("JanusForConditionalGeneration",)
    family = "Janus"

    def _build(self):
        m = self.hf_model
        self.vision_model = m.model.vision_model
        self.aligner = m.model.aligner
        self.language_model = m.model.language_model
        self.lm_head = m.lm_head
        vcfg = m.config.vision_config
        self.patch_size, self.image_size = vcfg.patch_size, vcfg.image_size
        self._vision_dim = vcfg.hidden_size

    @property
    def vision_dim(self) -> int:
        return self._vision_dim

    def _attention_modules(self):
        return {"vision_model": self.vision_model, "language_model": self.language_model}

    def _checkpoint_layers(self):
        return list(find_layers(self.vision_model)) + list(find_layers(self.language_model))

    def _vision_tower(self):
        return self.vision_model

    def _encode(self, inputs: CriticInputs):
        dtype = self.aligner.fc1.weight.dtype
        with self._vision_pixels(inputs, dtype) as (pv, (gh, gw)):  # pixel_values, or the fused patch tokens
            feats = self.vision_model(pv, return_dict=True).last_hidden_state  # (B, N, Dv), no CLS
        image_embeds = self.aligner(feats)
        return image_embeds, feats, (gh, gw)
