"""FLUX.2 (dev, and Klein 4B / 9B): Flux2Transformer2DModel with AutoencoderKLFlux2, flow matching.

Denoiser latents: the VAE's 32 channels patchified 2x2 into 128 channels at half the VAE resolution, then
normalized by the VAE's batch-norm running statistics, `(z - bn.running_mean) / sqrt(bn.running_var + eps)`
(as `Flux2Pipeline` / `Flux2KleinPipeline` do); one token per cell (no further packing). Position ids are
4-D (t, h, w, l): image (0, row, col, 0), text (0, 0, 0, i). The timestep is fed as t / 1000. Reads
"prompt_embeds" (B, S, joint_attention_dim: stacked hidden layers of Mistral-3 / Qwen3). FLUX.2-dev embeds a
distilled guidance value (`distilled_guidance`); Klein does not (`guidance_embeds=False`). The schedule
follows the pipelines: sigmas linspace(1, 1/n, n) and the empirical mu(image tokens, steps).
"""

from __future__ import annotations

import torch

from .base import PROMPT_EMBEDS, DenoiserFamily, flow_sigmas, posterior_mode


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's fitted shift: linear in the token count, interpolated between 10 and 200 steps (saturating
    above 4300 tokens). Constants from the FLUX.2 pipelines."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


class Flux2Family(DenoiserFamily):
    name = "flux2"
    denoiser_classes = ("Flux2Transformer2DModel",)
    description = "FLUX.2 dev / Klein (Flux2Transformer2DModel + AutoencoderKLFlux2)"
    encode_prompt_outputs = ("prompt_embeds", None)
    cond_keys = (PROMPT_EMBEDS,)

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def pixels_per_latent(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def latent_multiple(self) -> int:
        return 1

    def set_timesteps(self, scheduler, n, latent_hw):
        mu = empirical_mu(latent_hw[0] * latent_hw[1], n)
        if scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(n, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=flow_sigmas(n), mu=mu)

    def model_timestep(self, t):
        return t / 1000.0

    def extra_conditioning(self, cond, height, width, options):
        ref = cond["prompt_embeds"]
        rows_n, (h, w), S = cond["rows"], cond["latent_hw"], ref.shape[1]
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        z = torch.zeros_like(r)
        img_ids = torch.stack([z, r, c, z], dim=-1).reshape(1, -1, 4).expand(rows_n, -1, -1)
        li = torch.arange(S)
        zt = torch.zeros_like(li)
        txt_ids = torch.stack([zt, zt, zt, li], dim=-1).reshape(1, S, 4).expand(rows_n, -1, -1)
        cond["img_ids"] = img_ids.to(ref.device)
        cond["txt_ids"] = txt_ids.to(ref.device)
        cond["guidance"] = self.distilled_guidance(cond, options, 4.0)

    def call(self, denoiser, x, t, cond):
        B, C, h, w = x.shape
        tokens = x.reshape(B, C, h * w).transpose(1, 2)
        out = denoiser(
            hidden_states=tokens,
            timestep=t,
            guidance=cond["guidance"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["txt_ids"],
            img_ids=cond["img_ids"],
            return_dict=False,
        )[0]
        return out[:, : h * w].transpose(1, 2).reshape(B, -1, h, w)

    # --- VAE: patchify 2x2 + batch-norm statistics ---
    @staticmethod
    def _bn(vae, like):
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        return mean, std.to(like.device)

    def encode_images(self, vae, images):
        z = posterior_mode(vae.encode(images.to(vae.dtype))).float()
        B, C, h, w = z.shape
        z = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, h // 2, w // 2)
        mean, std = self._bn(vae, z)
        return (z - mean) / std

    def decode_latents(self, vae, latents):
        mean, std = self._bn(vae, latents)
        z = latents * std + mean
        B, C4, h, w = z.shape
        z = z.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, h * 2, w * 2)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]
