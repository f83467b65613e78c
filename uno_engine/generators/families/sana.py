"""SANA: SanaTransformer2DModel (linear-attention DiT) with AutoencoderDC (f32c32), flow matching.

Reads "prompt_embeds" (B, S, caption_channels: Gemma-2 states) and "prompt_attention_mask" (B, S). The
timestep is multiplied by the config's `timestep_scale` (SANA-Sprint uses it), as `SanaPipeline` does.
"""

from __future__ import annotations

from .base import MASKED_PROMPT_OUTPUTS, PROMPT_ATTENTION_MASK, PROMPT_EMBEDS, DenoiserFamily


class SanaFamily(DenoiserFamily):
    name = "sana"
    denoiser_classes = ("SanaTransformer2DModel",)
    description = "SANA (SanaTransformer2DModel + AutoencoderDC)"
    encode_prompt_outputs = MASKED_PROMPT_OUTPUTS
    cond_keys = (PROMPT_EMBEDS, PROMPT_ATTENTION_MASK)

    def model_timestep(self, t):
        return t * float(self.config.get("timestep_scale", 1.0) or 1.0)

    def call(self, denoiser, x, t, cond):
        return denoiser(
            x,
            encoder_hidden_states=cond["prompt_embeds"],
            timestep=t,
            encoder_attention_mask=cond.get("prompt_attention_mask"),
            return_dict=False,
        )[0]
