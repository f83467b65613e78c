"""DiffusersGenerator: a diffusers denoiser + scheduler + VAE trained by truncated backprop through sampling.

ReFL / DRaFT-K style (ImageReward `ReFL.py`, DRaFT, AlignProp's randomized truncation, VADER's
`backprop_mode`):

1. Draw a start step `s` from the late window of the `num_inference_steps` schedule (default: the last 25%).
2. From pure noise, sample steps `0 .. s-1` under `torch.no_grad()` (nothing is kept for backward).
   In *noised-reference* mode (the batch carries "reference_latents", or "reference_images" with
   `reference="images"`), skip that: the reference latents are noised straight to step `s`.
3. Take `k_grad_steps` steps `s .. s+K-1` with grad (optionally gradient-checkpointed).
4. Predict x0 from the last grad step (ReFL's pred-x0; with s+K = num_inference_steps it is DRaFT-K's final
   sample), decode it with the VAE with grad: `vae.decode(x0 / scaling_factor + shift_factor)`.

Only the K grad steps and the decode keep activations. The sampler is deterministic: DDIM (eta=0) for
schedulers with an `alphas_cumprod` table (DDIM, DDPM, PNDM, Euler, DPM-Solver, ...) and Euler for flow
matching (FlowMatchEulerDiscreteScheduler, or any scheduler configured for `flow_prediction`). The scheduler
supplies the timestep grid and the noise tables only; its `step()` is not called (it is stateful and not
written for autograd). Both families are one update, `x_next = alpha_next * x0_hat + sigma_next * eps_hat`,
with x_t = alpha_t * x0 + sigma_t * eps (DDPM: alpha = sqrt(abar), sigma = sqrt(1 - abar); flow:
alpha = 1 - sigma).

What is returned: the VAE decoder's raw output, (B, 3, H, W) in the VAE's dtype, nominally in [-1, 1]. It is
NOT clamped: decoders overshoot slightly, and the bridge applies the engine's documented clamp policy
(`UNOConfig.clamp`), so gradients at the range edges are decided in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Generator, check_images, check_shape, draw_generator, randint, randn, require_key

_SUPPORTED_DENOISERS = ("UNet2DConditionModel", "SanaTransformer2DModel", "PixArtTransformer2DModel")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _denoiser_kind(denoiser: nn.Module) -> str:
    for cls in type(denoiser).__mro__:
        if cls.__name__ == "UNet2DConditionModel":
            return "unet"
        if cls.__name__ == "SanaTransformer2DModel":
            return "sana"
        if cls.__name__ == "PixArtTransformer2DModel":
            return "pixart"
    raise TypeError(
        f"DiffusersGenerator: denoiser of class {type(denoiser).__name__} is not supported; supported: "
        f"{', '.join(_SUPPORTED_DENOISERS)} (wrap anything else in CallableGenerator)"
    )


def _is_flow_scheduler(scheduler) -> bool:
    cfg = getattr(scheduler, "config", {})
    return (
        "FlowMatch" in type(scheduler).__name__
        or cfg.get("prediction_type", None) == "flow_prediction"
        or bool(cfg.get("use_flow_sigmas", False))
    )


def _vae_scale_factor(vae: nn.Module) -> int:
    cfg = vae.config
    if "encoder_block_out_channels" in cfg:  # AutoencoderDC (Sana's DC-AE): one /2 per stage after the first
        return 2 ** (len(cfg.encoder_block_out_channels) - 1)
    return 2 ** (len(cfg.block_out_channels) - 1)  # AutoencoderKL and friends


class DiffusersGenerator(Generator):
    """Text-to-image with a diffusers denoiser, trained through its last K sampling steps and the VAE decoder.

    Args:
        denoiser: UNet2DConditionModel (SD-1.x/2.x), SanaTransformer2DModel (with AutoencoderDC, flow
            matching) or PixArtTransformer2DModel (AutoencoderKL; a learned-sigma output keeps its first half
            as the prediction). Its parameters with requires_grad=True are the trainable set (apply LoRA etc.
            before wrapping).
        scheduler: a diffusers scheduler; gives the timestep grid and the noise tables (module docstring).
        vae: AutoencoderKL or AutoencoderDC. Frozen here (requires_grad_(False)) unless train_vae=True; the
            gradient always flows through its decoder to the latents.
        num_inference_steps: length of the sampling schedule.
        grad_window: (lo, hi) fractions of the schedule; the first grad step `s` is drawn uniformly from
            the steps in [lo * n, hi * n - K] (clipped to the schedule). (0.75, 1.0) = the last 25%;
            (1.0, 1.0) = always the last K steps (DRaFT-K); (0.0, 1.0) = anywhere (AlignProp "uniform").
        k_grad_steps: K, the number of denoiser calls that run with grad (activations kept) per image.
        guidance_scale: classifier-free guidance; > 1 needs batch["negative_prompt_embeds"] and doubles every
            denoiser call's batch (the grad steps too).
        height, width: output size in pixels (default: the denoiser's sample_size times the VAE's scale
            factor); must be multiples of the VAE scale factor (times the DiT's patch size). Non-square is
            fine.
        prediction_type: override the scheduler's ("epsilon" | "v_prediction" | "sample" | "flow").
        reference: noised-reference mode source: "latents" (default: use batch["reference_latents"] when
            present), "images" (also encode batch["reference_images"] with the VAE, without grad, when there
            are no reference latents), or "off" (always sample from noise). reference_images are not used by
            default because the losses also read them (as the clean target) in plain text-to-image batches.
        gradient_checkpointing: recompute each grad step's activations in backward (peak memory of ~one step).
        train_vae: also train the VAE decoder (default False: frozen).
        generator: default random source (a torch.Generator); a batch's "seed" (int) or "generator" wins.

    forward(batch) reads:
        "prompt_embeds": (B, S, D) text-encoder states, D = the denoiser's caption/cross-attention width;
        "prompt_attention_mask": (B, S) optional (1 keep, 0 pad); "negative_prompt_embeds" (+ mask) for CFG;
        "reference_latents": (B, C, h, w) optional, already scaled like the denoiser's latents
            ((vae_latent - shift_factor) * scaling_factor);
        "reference_images": (B, 3, H, W) in [-1, 1], optional;
        "seed" / "generator": optional random source.
    and returns images (B, 3, H, W) in the VAE's dtype, nominally [-1, 1], not clamped.
    After a call, `last_step_index` holds the drawn start step s and `last_timestep` its timestep value.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler,
        vae: nn.Module,
        *,
        num_inference_steps: int = 20,
        grad_window: tuple[float, float] = (0.75, 1.0),
        k_grad_steps: int = 1,
        guidance_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        prediction_type: str | None = None,
        reference: str = "latents",
        gradient_checkpointing: bool = False,
        train_vae: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.kind = _denoiser_kind(denoiser)
        self.denoiser = denoiser
        self.vae = vae
        self.scheduler = scheduler
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"DiffusersGenerator: num_inference_steps must be an int >= 1, got {num_inference_steps!r}"
            )
        if not isinstance(k_grad_steps, int) or not 1 <= k_grad_steps <= num_inference_steps:
            raise ValueError(
                "DiffusersGenerator: k_grad_steps must be an int in "
                f"[1, num_inference_steps={num_inference_steps}], "
                f"got {k_grad_steps!r}"
            )
        lo, hi = (float(v) for v in grad_window)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                "DiffusersGenerator: grad_window must be (lo, hi) with 0 <= lo <= hi <= 1, "
                f"got {grad_window!r}"
            )
        if guidance_scale < 1.0:
            raise ValueError(
                f"DiffusersGenerator: guidance_scale must be >= 1 (1 = no CFG), got {guidance_scale!r}"
            )
        if reference not in ("latents", "images", "off"):
            raise ValueError(
                f"DiffusersGenerator: reference must be 'latents' | 'images' | 'off', got {reference!r}"
            )
        self.num_inference_steps = num_inference_steps
        self.k_grad_steps = k_grad_steps
        self.grad_window = (lo, hi)
        self.guidance_scale = float(guidance_scale)
        self.reference = reference
        self.gradient_checkpointing = gradient_checkpointing
        self.default_generator = generator

        # --- prediction type and the schedule: python floats, so forward never syncs ---
        self.is_flow = _is_flow_scheduler(scheduler)
        if prediction_type is None:
            prediction_type = "flow" if self.is_flow else scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "flow_prediction":
            prediction_type = "flow"
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"DiffusersGenerator: prediction_type must be one of {_PREDICTION_TYPES}, "
                f"got {prediction_type!r}"
            )
        if (prediction_type == "flow") != self.is_flow:
            raise ValueError(
                f"DiffusersGenerator: prediction_type={prediction_type!r} does not fit the scheduler "
                f"{type(scheduler).__name__} ({'flow matching' if self.is_flow else 'DDPM-family'})"
            )
        self.prediction_type = prediction_type
        scheduler.set_timesteps(num_inference_steps)
        timesteps = [float(t) for t in scheduler.timesteps.detach().cpu().tolist()]
        if len(timesteps) != num_inference_steps:
            raise ValueError(
                f"DiffusersGenerator: scheduler {type(scheduler).__name__} gives {len(timesteps)} "
                f"timesteps for num_inference_steps={num_inference_steps} (higher-order schedulers repeat "
                "steps); use DDIM / "
                "FlowMatchEulerDiscreteScheduler"
            )
        if self.is_flow:
            sig = [float(s) for s in scheduler.sigmas.detach().cpu().tolist()][:num_inference_steps]
            self._alphas = [1.0 - s for s in sig] + [1.0]
            self._sigmas = sig + [0.0]
        else:
            abar = scheduler.alphas_cumprod.detach().cpu().double()
            a = [float(abar[int(round(t))]) for t in timesteps]
            self._alphas = [math.sqrt(v) for v in a] + [1.0]
            self._sigmas = [math.sqrt(1.0 - v) for v in a] + [0.0]
        self._timesteps = timesteps
        n, k = num_inference_steps, k_grad_steps
        self._s_lo = min(int(math.floor(lo * n)), n - k)
        self._s_hi = max(self._s_lo, min(int(math.ceil(hi * n)), n) - k)

        # --- shapes ---
        dcfg = denoiser.config
        self.latent_channels = int(dcfg.in_channels)
        self.vae_scale_factor = _vae_scale_factor(vae)
        self.patch_size = int(getattr(dcfg, "patch_size", None) or 1)
        if self.kind == "unet":
            cad = dcfg.cross_attention_dim
            self.embed_dim = int(cad if isinstance(cad, int) else cad[0])
        else:
            self.embed_dim = int(dcfg.caption_channels or dcfg.cross_attention_dim)
        sample = dcfg.sample_size
        sample = sample if isinstance(sample, int) else sample[0]
        self.height = int(height if height is not None else sample * self.vae_scale_factor)
        self.width = int(width if width is not None else sample * self.vae_scale_factor)
        mult = self.vae_scale_factor * self.patch_size
        if self.height % mult or self.width % mult:
            raise ValueError(
                f"DiffusersGenerator: height={self.height}, width={self.width} must be multiples of {mult} "
                f"(VAE scale factor {self.vae_scale_factor} x patch size {self.patch_size})"
            )
        self.scaling_factor = float(vae.config.get("scaling_factor", 1.0) or 1.0)
        shift = vae.config.get("shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

        if not train_vae:
            vae.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------------
    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters()

    def _call_denoiser(self, x, t: float, cond: dict) -> torch.Tensor:
        """One denoiser call on latents x (B, C, h, w) fp32 at timestep value t -> prediction (B, C, h, w)
        fp32."""
        emb, mask = cond["embeds"], cond["mask"]
        dtype = self.denoiser.dtype
        xin = x.to(dtype)
        if self.guidance_scale > 1.0:
            xin = torch.cat([xin, xin])
        tt = torch.full((xin.shape[0],), t, device=x.device, dtype=torch.float32)
        if self.kind == "unet":
            out = self.denoiser(
                xin, tt, encoder_hidden_states=emb, encoder_attention_mask=mask, return_dict=False
            )[0]
        elif self.kind == "sana":
            tt = tt * float(self.denoiser.config.get("timestep_scale", 1.0) or 1.0)
            out = self.denoiser(
                xin, encoder_hidden_states=emb, timestep=tt, encoder_attention_mask=mask, return_dict=False
            )[0]
        else:  # pixart
            out = self.denoiser(
                xin,
                encoder_hidden_states=emb,
                timestep=tt,
                added_cond_kwargs=cond["added"],
                encoder_attention_mask=mask,
                return_dict=False,
            )[0]
        out = out.float()
        if out.shape[1] == 2 * self.latent_channels:  # learned sigma (PixArt): first half is the prediction
            out = out[:, : self.latent_channels]
        if self.guidance_scale > 1.0:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        return out

    def _x0_eps(self, x, out, alpha: float, sigma: float):
        """(x0_hat, eps_hat) from the model output under x = alpha * x0 + sigma * eps."""
        p = self.prediction_type
        if p == "epsilon":
            return (x - sigma * out) / alpha, out
        if p == "v_prediction":
            return alpha * x - sigma * out, sigma * x + alpha * out
        if p == "sample":
            return out, (x - alpha * out) / max(sigma, 1e-12)
        return x - sigma * out, x + alpha * out  # flow: v = eps - x0

    def _step(self, x, i: int, cond: dict):
        """Step i: x_i -> (x_{i+1}, x0_hat_i)."""
        out = self._call_denoiser(x, self._timesteps[i], cond)
        x0, eps = self._x0_eps(x, out, self._alphas[i], self._sigmas[i])
        return self._alphas[i + 1] * x0 + self._sigmas[i + 1] * eps, x0

    def _conditioning(self, batch: Mapping) -> dict:
        name = type(self).__name__
        emb = require_key(batch, "prompt_embeds", name)
        check_shape(emb, 'batch["prompt_embeds"]', name, (None, None, self.embed_dim))
        B, S = emb.shape[:2]
        mask = batch.get("prompt_attention_mask")
        if mask is not None:
            check_shape(mask, 'batch["prompt_attention_mask"]', name, (B, S))
        dtype = self.denoiser.dtype
        emb = emb.to(dtype)
        if self.guidance_scale > 1.0:
            neg = batch.get("negative_prompt_embeds")
            if neg is None:
                raise KeyError(
                    f'{name}: guidance_scale={self.guidance_scale} > 1 needs batch["negative_prompt_embeds"] '
                    "(the unconditional text states, same shape as prompt_embeds)"
                )
            check_shape(neg, 'batch["negative_prompt_embeds"]', name, (B, S, self.embed_dim))
            emb = torch.cat([neg.to(dtype), emb])
            if mask is not None:
                nmask = batch.get("negative_prompt_attention_mask")
                nmask = torch.ones_like(mask) if nmask is None else nmask
                check_shape(nmask, 'batch["negative_prompt_attention_mask"]', name, (B, S))
                mask = torch.cat([nmask, mask])
        added = None
        if self.kind == "pixart":
            added = {"resolution": None, "aspect_ratio": None}
            if getattr(self.denoiser, "use_additional_conditions", False):
                rows = emb.shape[0]
                added = {
                    "resolution": torch.tensor([self.height, self.width], dtype=dtype)
                    .repeat(rows, 1)
                    .to(emb.device),
                    "aspect_ratio": torch.tensor([self.height / self.width], dtype=dtype)
                    .repeat(rows, 1)
                    .to(emb.device),
                }
        return {"embeds": emb, "mask": mask, "added": added, "batch_size": B}

    def _reference_latents(self, batch: Mapping, B: int, g) -> torch.Tensor | None:
        name = type(self).__name__
        if self.reference == "off":
            return None
        ref = batch.get("reference_latents")
        if ref is not None:
            check_shape(ref, 'batch["reference_latents"]', name, (B, self.latent_channels, None, None))
            return ref.detach().float()
        if self.reference == "images" and batch.get("reference_images") is not None:
            imgs = batch["reference_images"]
            check_shape(imgs, 'batch["reference_images"]', name, (B, 3, None, None))
            return self.encode_images(imgs)
        return None

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VAE-encode images (B, 3, H, W) in [-1, 1] to denoiser latents (deterministic: the posterior
        mode)."""
        enc = self.vae.encode(images.to(self.vae.dtype))
        if hasattr(enc, "latent_dist"):
            z = enc.latent_dist.mode()
        elif hasattr(enc, "latent"):
            z = enc.latent
        else:
            z = enc[0]
            z = z.mode() if hasattr(z, "mode") else z
        return (z.float() - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> images (B, 3, H, W), with grad, not clamped."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond = self._conditioning(batch)
        B = cond["batch_size"]
        device = cond["embeds"].device
        g = draw_generator(batch, self.default_generator)
        s = randint(self._s_lo, self._s_hi, generator=g)
        self.last_step_index = s
        self.last_timestep = self._timesteps[s]

        ref = self._reference_latents(batch, B, g)
        if ref is not None:  # noised-reference mode: x_s = alpha_s * x0_ref + sigma_s * noise
            noise = randn(ref.shape, generator=g, device=device, dtype=torch.float32)
            x = self._alphas[s] * ref.to(device) + self._sigmas[s] * noise
        else:
            h, w = self.latent_size
            x = randn((B, self.latent_channels, h, w), generator=g, device=device, dtype=torch.float32)
            with torch.no_grad():
                for i in range(s):
                    x, _ = self._step(x, i, cond)
        x = x.detach()

        x0 = None
        with torch.enable_grad():
            for i in range(s, s + self.k_grad_steps):
                if self.gradient_checkpointing:
                    x, x0 = checkpoint(self._step, x, i, cond, use_reentrant=False)
                else:
                    x, x0 = self._step(x, i, cond)
            images = self.decode_latents(x0)
        return check_images(images, type(self).__name__)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, prediction_type={self.prediction_type}, steps={self.num_inference_steps}, "
            f"k_grad_steps={self.k_grad_steps}, grad_window={self.grad_window}, "
            f"guidance_scale={self.guidance_scale}, "
            f"size={self.height}x{self.width}"
        )
