"""PixArt-alpha / sigma: PixArtTransformer2DModel with AutoencoderKL, DDPM-family schedulers.

Reads "prompt_embeds" (B, S, caption_channels: T5 states) and "prompt_attention_mask" (B, S). A
learned-sigma output (2C channels) keeps its first half as the prediction (done by the generator). Models
with `use_additional_conditions` (PixArt-alpha 1024) also get resolution (H, W) and aspect ratio H / W.
"""

from __future__ import annotations

import torch

from .base import MASKED_PROMPT_OUTPUTS, PROMPT_ATTENTION_MASK, PROMPT_EMBEDS, DenoiserFamily


class PixArtFamily(DenoiserFamily):
    name = "pixart"
    denoiser_classes = ("PixArtTransformer2DModel",)
    description = "PixArt-alpha / sigma (PixArtTransformer2DModel)"
    encode_prompt_outputs = MASKED_PROMPT_OUTPUTS
    cond_keys = (PROMPT_EMBEDS, PROMPT_ATTENTION_MASK)

    def __init__(self, denoiser, vae):
        super().__init__(denoiser, vae)
        self.additional = bool(getattr(denoiser, "use_additional_conditions", False))

    def extra_conditioning(self, cond, height, width, options):
        added = {"resolution": None, "aspect_ratio": None}
        if self.additional:
            ref, rows = cond["prompt_embeds"], cond["rows"]
            added = {
                "resolution": torch.tensor([height, width], dtype=ref.dtype, device=ref.device).repeat(
                    rows, 1
                ),
                "aspect_ratio": torch.tensor([height / width], dtype=ref.dtype, device=ref.device).repeat(
                    rows, 1
                ),
            }
        cond["added_cond_kwargs"] = added

    def call(self, denoiser, x, t, cond):
        return denoiser(
            x,
            encoder_hidden_states=cond["prompt_embeds"],
            timestep=t,
            added_cond_kwargs=cond["added_cond_kwargs"],
            encoder_attention_mask=cond.get("prompt_attention_mask"),
            return_dict=False,
        )[0]
