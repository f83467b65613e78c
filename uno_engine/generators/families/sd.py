"""SD-1.x / SD-2.x: UNet2DConditionModel without added conditioning (DDPM-family schedulers, eps or v)."""

from __future__ import annotations

from .base import PROMPT_ATTENTION_MASK, PROMPT_EMBEDS, DenoiserFamily


class StableDiffusionFamily(DenoiserFamily):
    name = "sd"
    denoiser_classes = ("UNet2DConditionModel",)
    description = "SD-1.x / SD-2.x (UNet2DConditionModel, no added conditioning)"
    encode_prompt_outputs = ("prompt_embeds", "negative_prompt_embeds")
    cond_keys = (PROMPT_EMBEDS, PROMPT_ATTENTION_MASK)

    @classmethod
    def matches(cls, denoiser) -> bool:
        return super().matches(denoiser) and denoiser.config.get("addition_embed_type", None) is None

    @property
    def latent_multiple(self) -> int:
        return 1  # the UNet pads odd sizes itself (upsample_size)

    @property
    def embed_dim(self) -> int:
        cad = self.config.cross_attention_dim
        return int(cad if isinstance(cad, int) else cad[0])

    def call(self, denoiser, x, t, cond):
        return denoiser(
            x,
            t,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond.get("prompt_attention_mask"),
            added_cond_kwargs=cond.get("added_cond_kwargs"),
            return_dict=False,
        )[0]
