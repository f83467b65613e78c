"""SDXL: UNet2DConditionModel with addition_embed_type="text_time".

Besides the token states (B, S, 2048: CLIP-L and OpenCLIP-bigG concatenated) the UNet reads
`added_cond_kwargs = {"text_embeds": pooled (B, P), "time_ids": (B, 6)}`; the six time ids are
(original_h, original_w, crop_top, crop_left, target_h, target_w), here (H, W, 0, 0, H, W) from the output
size, as `StableDiffusionXLPipeline` builds them by default. A batch may carry its own "add_time_ids" (B, 6).
P = projection_class_embeddings_input_dim - 6 * addition_time_embed_dim (1280 for SDXL).
"""

from __future__ import annotations

import torch

from .base import CondKey, pooled_embeds
from .sd import StableDiffusionFamily


class SDXLFamily(StableDiffusionFamily):
    name = "sdxl"
    description = 'SDXL (UNet2DConditionModel, addition_embed_type="text_time")'
    encode_prompt_outputs = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    @classmethod
    def matches(cls, denoiser) -> bool:
        return (
            bool({c.__name__ for c in type(denoiser).__mro__} & set(cls.denoiser_classes))
            and denoiser.config.get("addition_embed_type", None) == "text_time"
        )

    def __init__(self, denoiser, vae):
        super().__init__(denoiser, vae)
        cfg = denoiser.config
        self.pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(
            cfg.addition_time_embed_dim
        )
        self.cond_keys = self.cond_keys + (
            pooled_embeds(self.pooled_dim),
            CondKey("add_time_ids", "negative_add_time_ids", (6,), required=False),
        )

    def extra_conditioning(self, cond, height, width, options):
        ref = cond["prompt_embeds"]
        time_ids = cond.get("add_time_ids")
        if time_ids is None:
            time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=ref.dtype, device=ref.device)
            time_ids = time_ids.expand(cond["rows"], 6)
        cond["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids}
