"""FLUX.1 (dev / schnell / Krea / Kontext text-to-image): FluxTransformer2DModel, flow matching.

Latents: the VAE's 16 channels (scaling and shift factors), packed as 2x2 patches into tokens of 64
channels (`pack_2x2`); image position ids (h/2 * w/2, 3) = (0, row, col), text ids (S, 3) = 0. The
timestep is fed as t / 1000 (sigma). Reads "prompt_embeds" (B, S, 4096: T5-XXL) and "pooled_prompt_embeds"
(B, 768: CLIP-L pooled). Guidance-distilled checkpoints (dev: `guidance_embeds=True`) also take the
embedded guidance value, `distilled_guidance` (the pipeline's `guidance_scale`, 3.5 by default); it is not
classifier-free guidance and costs no extra call. The schedule follows `FluxPipeline`: sigmas
linspace(1, 1/n, n) shifted by mu(image tokens) when the scheduler uses dynamic shifting.
"""

from __future__ import annotations

import torch

from .base import PROMPT_EMBEDS, PackedFlowFamily, pack_2x2, pooled_embeds, unpack_2x2


class FluxFamily(PackedFlowFamily):
    name = "flux"
    denoiser_classes = ("FluxTransformer2DModel",)
    description = "FLUX.1 (FluxTransformer2DModel)"
    encode_prompt_outputs = ("prompt_embeds", "pooled_prompt_embeds", None)

    def __init__(self, denoiser, vae):
        super().__init__(denoiser, vae)
        self.cond_keys = (PROMPT_EMBEDS, pooled_embeds(denoiser.config.pooled_projection_dim))

    def extra_conditioning(self, cond, height, width, options):
        ref = cond["prompt_embeds"]
        h, w = cond["latent_hw"]
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        cond["img_ids"] = img_ids.to(device=ref.device, dtype=ref.dtype)
        cond["txt_ids"] = torch.zeros(ref.shape[1], 3, device=ref.device, dtype=ref.dtype)
        cond["guidance"] = self.distilled_guidance(cond, options, 3.5)

    def call(self, denoiser, x, t, cond):
        h, w = x.shape[-2:]
        out = denoiser(
            hidden_states=pack_2x2(x),
            timestep=t,
            guidance=cond["guidance"],
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["txt_ids"],
            img_ids=cond["img_ids"],
            return_dict=False,
        )[0]
        return unpack_2x2(out, h, w)
