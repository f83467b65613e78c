"""Qwen-Image: QwenImageTransformer2DModel (MMDiT) with AutoencoderKLQwenImage (a Wan-style video VAE).

Denoiser latents: the VAE's 16 channels normalized per channel, `(z - latents_mean) / latents_std`, packed
2x2 into 64-channel tokens (`pack_2x2`, like FLUX.1); the VAE works on 5-D (B, C, T=1, H, W) tensors. The
transformer takes `img_shapes` [(1, h/2, w/2)] per row for its 3-D RoPE and the timestep as t / 1000.
Reads "prompt_embeds" (B, S, 3584: Qwen2.5-VL-7B hidden states) and "prompt_embeds_mask" (B, S), the
names `QwenImagePipeline.encode_prompt` returns. The schedule follows the pipeline: sigmas
linspace(1, 1/n, n) with the resolution shift mu. Classifier-free guidance (guidance_scale > 1) is the
pipeline's "true CFG" with its per-token norm rescale (`guide`).
"""

from __future__ import annotations

import torch

from .base import PROMPT_EMBEDS, CondKey, PackedFlowFamily, pack_2x2, posterior_mode, unpack_2x2


class QwenImageFamily(PackedFlowFamily):
    name = "qwen-image"
    denoiser_classes = ("QwenImageTransformer2DModel",)
    description = "Qwen-Image (QwenImageTransformer2DModel + AutoencoderKLQwenImage)"
    encode_prompt_outputs = ("prompt_embeds", "prompt_embeds_mask")
    cond_keys = (
        PROMPT_EMBEDS,
        CondKey("prompt_embeds_mask", "negative_prompt_embeds_mask", ("S",), required=False, mask=True),
    )

    def extra_conditioning(self, cond, height, width, options):
        h, w = cond["latent_hw"]
        cond["img_shapes"] = [[(1, h // 2, w // 2)]] * cond["rows"]
        cond["guidance"] = self.distilled_guidance(cond, options, 1.0)

    def call(self, denoiser, x, t, cond):
        h, w = x.shape[-2:]
        mask = cond.get("prompt_embeds_mask")
        kwargs = {}
        if "txt_seq_lens" in self.accepts:  # older diffusers: text lengths instead of a mask
            S = cond["prompt_embeds"].shape[1]
            kwargs["txt_seq_lens"] = [S] * x.shape[0] if mask is None else mask.sum(1).tolist()
        out = denoiser(
            hidden_states=pack_2x2(x),
            timestep=t,
            guidance=cond["guidance"],
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=mask,
            img_shapes=cond["img_shapes"],
            return_dict=False,
            **kwargs,
        )[0]
        return unpack_2x2(out, h, w)

    def guide(self, uncond, cond, scale):
        """QwenImagePipeline's "true CFG": the guided prediction rescaled, per packed token, to the norm of
        the conditional one (norms over the token's 4C channels)."""
        h, w = cond.shape[-2:]
        c, u = pack_2x2(cond), pack_2x2(uncond)
        comb = u + scale * (c - u)
        comb = comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        return unpack_2x2(comb, h, w)

    # --- VAE: 5-D, per-channel mean / std ---
    @staticmethod
    def _stats(vae, like):
        n = int(vae.config.z_dim)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, n, 1, 1).to(like.device)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, n, 1, 1).to(like.device)
        return mean, std

    def encode_images(self, vae, images):
        z = posterior_mode(vae.encode(images.to(vae.dtype)[:, :, None])).float()[:, :, 0]
        mean, std = self._stats(vae, z)
        return (z - mean) / std

    def decode_latents(self, vae, latents):
        mean, std = self._stats(vae, latents)
        z = latents * std + mean
        return vae.decode(z.to(vae.dtype)[:, :, None], return_dict=False)[0][:, :, 0]
