"""Qwen2-VL / Qwen2.5-VL critic: `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`.

pixel_values come pre-patchified, (B*gh*gw, 3*tps*p*p) in the processor's order, with image_grid_thw (B, 3).
Without a template the sequence is <|vision_start|> image tokens <|vision_end|> caption, as the processor
writes it (with one: the chat template's, uno_engine.critics.reader); M-RoPE
position ids come from the model's own `get_rope_index` (computed once per (sequence length, grid) and
cached: they do not depend on the caption ids, and positions after right padding never influence real tokens).
Patch features are the vision blocks' output before the merger, reordered from the processor's merge-window
order (and, for Qwen2.5-VL, from window-attention order) into raster order.
No fused bridge patch embedding: the patch embedding is a Conv3d over the flattened patch rows (a linear map
of each row), a layout `ops.bridge(patch_embed=)` does not take; the critic always gets pixel_values.
"""

from __future__ import annotations

import torch

from uno_engine.critics.base import Critic, CriticInputs
from uno_engine.critics.registry import register_critic


@register_critic
class Qwen2VLCritic(Critic):
    hf_class_names = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "Qwen2-VL"

    def _build(self):
        m = self.hf_model
        self.visual = m.model.visual
        self.language_model = m.model.language_model
        self.lm_head = m.lm_head
        cfg = m.config
        vcfg = cfg.vision_config
        self.merge = vcfg.spatial_merge_size
        self.patch_size = vcfg.patch_size
        self.window_size = getattr(vcfg, "window_size", None) if "Qwen2_5" in type(m).__name__ else None
        self._vision_dim = self.visual.blocks[0].norm1.weight.shape[0]
        self.image_token_id = cfg.image_token_id
        self.vision_start_token_id = cfg.vision_start_token_id
        self.vision_end_token_id = cfg.vision_end_token_id
        self._rope_cache: dict = {}

    @property
    def vision_dim(self) -> int:
        return self._vision_dim

    def _attention_modules(self):
        return {"visual": self.visual, "language_model": self.language_model}

    def _checkpoint_layers(self):
        return list(self.visual.blocks) + list(self.language_model.layers)

    def fused_patch_embed_reasons(self) -> list[str]:
        return [
            "Qwen2-VL's patch embedding is a Conv3d over the processor's flattened patch rows "
            "(B*gh*gw, 3*T*p*p), and ops.bridge(patch_embed=) takes layout 'nchw' only"
        ]

    def default_prefix(self, n_image_tokens: int, *, latent: bool = False) -> list[int | None]:
        return [self.vision_start_token_id] + [None] * n_image_tokens + [self.vision_end_token_id]

    def _encode(self, inputs: CriticInputs):
        out, grid_thw, (B, t, gh, gw) = self._run_vision(inputs)
        image_embeds = out.pooler_output.reshape(B, -1, out.pooler_output.shape[-1])
        patch = self._raster_patches(out.last_hidden_state, grid_thw, B, t, gh, gw)
        return image_embeds, patch, (gh, gw)

    def _run_vision(self, inputs: CriticInputs):
        """Check the inputs and run the vision tower -> (its output, image_grid_thw, (B, t, gh, gw))."""
        pv, grid_thw = inputs.pixel_values, inputs.image_grid_thw
        if grid_thw is None or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(
                f"image_grid_thw must be a (B, 3) tensor for a {self.family} critic, got "
                f"{None if grid_thw is None else tuple(grid_thw.shape)}"
            )
        if pv.dim() != 2:
            raise ValueError(
                f"pixel_values must be pre-patchified (B*gh*gw, C*tps*p*p) for a {self.family} critic, "
                f"got {tuple(pv.shape)}"
            )
        B = grid_thw.shape[0]
        t, gh, gw = _host_grid(inputs)
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pv.to(dtype), grid_thw=grid_thw, return_dict=True)
        return out, grid_thw, (B, t, gh, gw)

    def _raster_patches(self, hidden: torch.Tensor, grid_thw, B: int, t: int, gh: int, gw: int):
        """The vision blocks' output (B*t*gh*gw, Dv), in the processor's merge-window order (Qwen2.5-VL: in
        window-attention order) -> (B, t*gh*gw, Dv) in raster order."""
        m, D = self.merge, hidden.shape[-1]
        if self.window_size is not None:  # Qwen2.5-VL: undo the window-attention permutation
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw, m, self.window_size, self.patch_size)
            reverse = torch.argsort(window_index.to(hidden.device))
            hidden = hidden.reshape(-1, m * m, D)[reverse].reshape(-1, D)
        return (
            hidden.reshape(B, t, gh // m, gw // m, m, m, D)
            .permute(0, 1, 2, 4, 3, 5, 6)
            .reshape(B, t * gh * gw, D)
        )

    def _position_ids(self, inputs: CriticInputs, prefix, batch: int, length: int, device):
        grid = _host_grid(inputs)
        key = (len(prefix), length, grid, str(device))
        pos = self._rope_cache.get(key)
        if pos is None:
            ids = [self.image_token_id if p is None else p for p in prefix]
            ids = torch.tensor(ids + [0] * (length - len(prefix)), dtype=torch.long).unsqueeze(0)
            mm_types = torch.tensor(
                [1 if p is None else 0 for p in prefix] + [0] * (length - len(prefix)), dtype=torch.int
            ).unsqueeze(0)
            pos, _ = self.hf_model.model.get_rope_index(
                ids, mm_token_type_ids=mm_types, image_grid_thw=torch.tensor([grid]), attention_mask=None
            )
            pos = pos.to(device)
            self._rope_cache[key] = pos
        return pos.expand(-1, batch, -1)


def _host_grid(inputs: CriticInputs) -> tuple[int, int, int]:
    """(t, gh, gw) of the images: from the host copy `prepare` made, else read from the device (a sync)."""
    if inputs.grid_thw is not None:
        return tuple(int(x) for x in inputs.grid_thw)
    return tuple(int(x) for x in inputs.image_grid_thw[0].tolist())
