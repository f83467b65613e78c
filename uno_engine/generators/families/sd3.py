"""SD3 / SD3.5: SD3Transformer2DModel (MMDiT), flow matching, timesteps sigma * 1000 fed as is.

Reads "prompt_embeds" (B, S, joint_attention_dim: CLIP-L + CLIP-G padded to 4096, then T5-XXL) and
"pooled_prompt_embeds" (B, pooled_projection_dim = 2048: the two CLIPs' pooled outputs). The DiT patchifies
(patch_size 2) itself. The schedule follows `StableDiffusion3Pipeline`: plain `set_timesteps(n)`, or with the
resolution shift mu when the scheduler uses dynamic shifting.
"""

from __future__ import annotations

from .base import PROMPT_EMBEDS, DenoiserFamily, pooled_embeds, shift_from_config


class SD3Family(DenoiserFamily):
    name = "sd3"
    denoiser_classes = ("SD3Transformer2DModel",)
    description = "SD3 / SD3.5 (SD3Transformer2DModel)"
    encode_prompt_outputs = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    def __init__(self, denoiser, vae):
        super().__init__(denoiser, vae)
        self.cond_keys = (PROMPT_EMBEDS, pooled_embeds(denoiser.config.pooled_projection_dim))

    def set_timesteps(self, scheduler, n, latent_hw):
        if scheduler.config.get("use_dynamic_shifting", False):
            p = int(self.config.patch_size)
            seq = (latent_hw[0] // p) * (latent_hw[1] // p)
            scheduler.set_timesteps(n, mu=shift_from_config(scheduler, seq))
        else:
            scheduler.set_timesteps(n)

    def call(self, denoiser, x, t, cond):
        return denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
