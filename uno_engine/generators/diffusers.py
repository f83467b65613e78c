"""DiffusersGenerator: a diffusers denoiser + scheduler + VAE trained by truncated backprop through sampling.

ReFL / DRaFT-K style (ImageReward `ReFL.py`, DRaFT, AlignProp's randomized truncation, VADER's
`backprop_mode`):

1. Draw a start step `s` from the late window of the `num_inference_steps` schedule (default: the last 25%).
2. From pure noise, sample steps `0 .. s-1` under `torch.no_grad()` (nothing is kept for backward).
   In *noised-reference* mode (the batch carries "reference_latents", or "reference_images" with
   `reference="images"`), skip that: the reference latents are noised straight to step `s`.
3. Take `k_grad_steps` steps `s .. s+K-1` with grad (optionally gradient-checkpointed).
4. Predict x0 from the last grad step (ReFL's pred-x0; with s+K = num_inference_steps it is DRaFT-K's final
   sample), decode it with the VAE with grad (the family's map back to VAE latents, e.g.
   `vae.decode(x0 / scaling_factor + shift_factor)`).

Only the K grad steps and the decode keep activations.

The early window (`grad_window=(0.0, 0.5), recover="one_step"`): the grad steps lie in the first half of the
trajectory, where layout, counts and bindings are decided, and the image is the one-step recovery of x0 from
the last grad step (step 4, as SRPO's Direct-Align and LeapAlign carry an early step to the image) instead of
the rest of the chain. Memory: the K grad steps' activations (one step's with gradient_checkpointing) and the
decode, the same wherever the window lies. `recover="chain"` instead runs the remaining steps s+K .. n-1 with
grad too (DRaFT's full chain from s): its activations grow with n - s (about n / 2 denoiser calls from an
early window; gradient_checkpointing keeps one call's activations plus every step's input latent).

The sampler is deterministic: DDIM (eta=0) for
schedulers with an `alphas_cumprod` table (DDIM, DDPM, PNDM, Euler, DPM-Solver, ...) and Euler for flow
matching (FlowMatchEulerDiscreteScheduler, or any scheduler configured for `flow_prediction`). The scheduler
supplies the timestep grid and the noise tables only; its `step()` is not called (it is stateful and not
written for autograd). Both families are one update, `x_next = alpha_next * x0_hat + sigma_next * eps_hat`,
with x_t = alpha_t * x0 + sigma_t * eps (DDPM: alpha = sqrt(abar), sigma = sqrt(1 - abar); flow:
alpha = 1 - sigma). The tables are read from the scheduler after the family set its grid the way the family's
pipeline does (FLUX / Qwen-Image / FLUX.2 resolution shift included), final value too (DDIM's
`final_alpha_cumprod`), so the whole chain (`sample_latents`) equals the pipeline's `output_type="latent"`
result for the same noise and steps (tests/test_pipeline.py: within 1e-4 relative for every family).

Everything model-specific (the batch keys it reads, timestep scaling, FLUX's 2x2 token packing and position
ids, SDXL's time ids, the VAE latent normalization) lives in the denoiser families,
`uno_engine.generators.families` (one small file each).

What is returned: the VAE decoder's raw output, (B, 3, H, W) in the VAE's dtype, nominally in [-1, 1]. It is
NOT clamped: decoders overshoot slightly, and the bridge applies the engine's documented clamp policy
(`UNOConfig.clamp`), so gradients at the range edges are decided in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from uno_engine.latent.types import GeneratedLatents
from uno_engine.representation.capture import block_output
from uno_engine.representation.types import GeneratedRepresentation

from .base import (
    VIEWS,
    Generator,
    check_images,
    check_shape,
    draw_generator,
    noise_levels,
    rand,
    randint,
    randn,
    require_key,
    wants_latents,
)
from .families import DenoiserFamily, family_for

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
RECOVER = ("one_step", "chain")


class DenoisingPair(NamedTuple):
    """One denoising-loss evaluation (`DiffusersGenerator.denoising_pair`): the model's prediction (B, C, h, w)
    fp32 with grad, its target (B, C, h, w) fp32, the noised input x_t (B, C, h, w), the timesteps t (B,) and the
    conditioning (for `predict` at the same point, e.g. by a frozen reference model)."""

    prediction: torch.Tensor
    target: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    cond: dict


class GradStep(NamedTuple):
    """One denoiser call of the last forward that ran with grad.

    x_t: (B, C, h, w) fp32 denoiser latents fed to the call (carries grad from earlier grad steps when
    K > 1; detach it to re-evaluate); t: the scheduler timestep (float); index: the step in the schedule;
    cond: the conditioning dict (`DiffusersGenerator.conditioning`); prediction: (B, C, h, w) fp32, the
    (guided) model output with grad."""

    x_t: torch.Tensor
    t: float
    index: int
    cond: dict
    prediction: torch.Tensor


def pipeline_denoiser(pipe) -> nn.Module:
    """A diffusers pipeline's denoiser: `pipe.transformer` (DiTs) or `pipe.unet`."""
    for attr in ("transformer", "unet"):
        den = getattr(pipe, attr, None)
        if den is not None:
            return den
    raise ValueError(f"{type(pipe).__name__} has no denoiser (neither pipe.transformer nor pipe.unet is set)")


def _is_flow_scheduler(scheduler) -> bool:
    cfg = getattr(scheduler, "config", {})
    return (
        "FlowMatch" in type(scheduler).__name__
        or cfg.get("prediction_type", None) == "flow_prediction"
        or bool(cfg.get("use_flow_sigmas", False))
    )


class DiffusersGenerator(Generator):
    """Text-to-image with a diffusers denoiser, trained through its last K sampling steps and the VAE decoder.

    Args:
        denoiser: a denoiser one of the families in `uno_engine.generators.families` handles: SD-1.x/2.x and
            SDXL (UNet2DConditionModel), SD3/SD3.5, FLUX.1, FLUX.2 (dev / Klein), Qwen-Image, SANA, PixArt.
            Its parameters with requires_grad=True are the trainable set (apply LoRA etc. before wrapping).
        scheduler: a diffusers scheduler; gives the timestep grid and the noise tables (module docstring).
            Its grid is set the way the family's pipeline sets it (FLUX / Qwen-Image: sigmas linspace(1, 1/n,
            n) and the resolution shift mu).
        vae: the family's VAE (AutoencoderKL, AutoencoderDC, AutoencoderKLFlux2, AutoencoderKLQwenImage).
            Frozen here (requires_grad_(False)) unless train_vae=True; the gradient always flows through its
            decoder to the latents.
        num_inference_steps: length of the sampling schedule.
        grad_window: (lo, hi) fractions of the schedule; the first grad step `s` is drawn uniformly from
            the steps in [lo * n, hi * n - K] (clipped to the schedule). (0.75, 1.0) = the last 25%;
            (1.0, 1.0) = always the last K steps (DRaFT-K); (0.0, 1.0) = anywhere (AlignProp "uniform").
        k_grad_steps: K, the number of denoiser calls that run with grad (activations kept) per image.
        recover: how the last grad step reaches the image: "one_step" (default: its x0 prediction,
            x0 = (x - sigma eps_hat) / alpha in the model's parameterization; memory: K denoiser calls) |
            "chain" (the remaining steps of the schedule, run with grad; memory: n - s denoiser calls). With
            an early grad_window such as (0.0, 0.5), "one_step" is the early window of the module docstring.
        guidance_scale: classifier-free guidance; > 1 needs the batch's negative conditioning
            ("negative_prompt_embeds", and "negative_pooled_prompt_embeds" where the family reads pooled
            embeds) and doubles every denoiser call's batch (the grad steps too).
        distilled_guidance: the embedded guidance value of guidance-distilled models (FLUX.1-dev: 3.5 by
            default, FLUX.2-dev: 4.0); ignored by models without a guidance embedding. Not CFG: no extra call.
        height, width: output size in pixels (default: the denoiser's sample_size times the VAE's scale
            factor; 1024 for DiTs without one). Must be multiples of (VAE factor x patch x packing); the
            error names both.
        prediction_type: override the scheduler's ("epsilon" | "v_prediction" | "sample" | "flow").
        reference: noised-reference mode source: "latents" (default: use batch["reference_latents"] when
            present), "images" (also encode batch["reference_images"] with the VAE, without grad, when there
            are no reference latents), or "off" (always sample from noise). reference_images are not used by
            default because the losses also read them (as the clean target) in plain text-to-image batches.
        gradient_checkpointing: recompute each grad step's activations in backward (peak memory of ~one step).
        train_vae: also train the VAE decoder (default False: frozen).
        generator: default random source (a torch.Generator); a batch's "seed" (int) or "generator" wins.

    forward(batch, decode=True) reads (diffusers' names; which ones: `self.family.cond_keys`):
        "prompt_embeds": (B, S, D) text-encoder states, D = `self.embed_dim`;
        "pooled_prompt_embeds": (B, P) for SDXL, SD3 and FLUX.1 (a missing one is a KeyError naming it);
        "prompt_attention_mask" (SD, SANA, PixArt) or "prompt_embeds_mask" (Qwen-Image): (B, S), optional;
        "negative_*" of each for CFG; "add_time_ids": (B, 6) optional for SDXL;
        "reference_latents": (B, C, h, w) optional, in denoiser-latent space (see below);
        "reference_images": (B, 3, H, W) in [-1, 1], optional;
        "seed" / "generator": optional random source.
    and returns images (B, 3, H, W) in the VAE's dtype, nominally [-1, 1], not clamped; with decode=False it
    returns the x0 prediction of the last grad step as denoiser latents (B, C, h, w) fp32, with grad, without
    running the VAE (`generate_latents`); `decode_latents(latents)` decodes such latents with grad. With
    view="latent" it returns `latents_for_critic(batch)` (the step's latent view, through a DDP / FSDP2
    wrapper's forward).

    Denoiser latents are always spatial (B, C, h, w) fp32 in the denoiser's normalized space: scaled/shifted
    VAE latents (SD, SDXL, SD3, FLUX.1, SANA, PixArt), per-channel normalized (Qwen-Image), or 2x2-patchified
    and batch-norm normalized (FLUX.2: C = 128 at 1/16 of the pixels); FLUX.1 / Qwen-Image's token packing
    happens inside the denoiser call. `latent_size`, `latent_channels` give (h, w) and C;
    `encode_images` / `decode_latents` map pixels to and from this space.

    Hooks for other objectives:
        denoising_loss(batch) -> 0-d fp32 tensor: the model's own training loss on real pairs (see there).
        denoising_pair(batch) -> DenoisingPair: its prediction and target per element (per-sample weighting,
            e.g. `uno_engine.reward.RewardObjective` on the generator's own samples as "reference_latents").
        last_grad_steps: after a forward, one `GradStep(x_t, t, index, cond, prediction)` per grad step
            (prediction with grad), e.g. for a KL penalty to a frozen model (DRaFT+).
        predict(x_t, t, cond, denoiser=None): one (guided) denoiser call at scheduler timestep t (float or
            (B,) tensor) with conditioning `cond` (from `conditioning(batch)` or a GradStep), optionally with
            another denoiser of the same family (a frozen copy), or under peft's `disable_adapter()`.
        conditioning(batch, cfg=None) -> dict: the checked, dtype-cast conditioning one call needs.
        sample_latents(batch, noise=None): the whole deterministic chain without grad -> final latents.
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
        recover: str = "one_step",
        guidance_scale: float = 1.0,
        distilled_guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        prediction_type: str | None = None,
        reference: str = "latents",
        gradient_checkpointing: bool = False,
        train_vae: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if vae is None:
            raise ValueError(
                "DiffusersGenerator: vae is None; a VAE is needed to decode the latents into images (a pipeline "
                "loaded without its VAE cannot be trained here)"
            )
        if scheduler is None:
            raise ValueError("DiffusersGenerator: scheduler is None; pass the pipeline's scheduler")
        self.family: DenoiserFamily = family_for(denoiser, vae)
        self.kind = self.family.name
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
                f"[1, num_inference_steps={num_inference_steps}], got {k_grad_steps!r}"
            )
        lo, hi = (float(v) for v in grad_window)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                f"DiffusersGenerator: grad_window must be (lo, hi) with 0 <= lo <= hi <= 1, got {grad_window!r}"
            )
        if recover not in RECOVER:
            raise ValueError(f"DiffusersGenerator: recover must be one of {RECOVER}, got {recover!r}")
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
        self.recover = recover
        self.representation: nn.Module | None = None  # view="representation": attach_representation(head)
        self.guidance_scale = float(guidance_scale)
        self.options = {} if distilled_guidance is None else {"distilled_guidance": float(distilled_guidance)}
        self.reference = reference
        self.gradient_checkpointing = gradient_checkpointing
        self.default_generator = generator
        self.last_grad_steps: list[GradStep] = []

        # --- shapes ---
        fam = self.family
        self.latent_channels = fam.latent_channels
        self.vae_scale_factor = fam.vae_scale_factor
        self.pixels_per_latent = fam.pixels_per_latent
        self.embed_dim = fam.embed_dim
        default_px = fam.default_latent_size() * fam.vae_scale_factor
        self.height = int(height if height is not None else default_px)
        self.width = int(width if width is not None else default_px)
        mult = fam.pixels_per_latent * fam.latent_multiple
        if self.height < mult or self.width < mult or self.height % mult or self.width % mult:
            raise ValueError(
                f"DiffusersGenerator: height={self.height}, width={self.width} must be positive multiples of "
                f"{mult} for {fam.name} (VAE factor {fam.vae_scale_factor} x patch x packing: "
                f"{fam.pixels_per_latent // fam.vae_scale_factor * fam.latent_multiple})"
            )

        # --- prediction type and the schedule: python floats, so forward never syncs ---
        self.is_flow = _is_flow_scheduler(scheduler)
        if prediction_type is None:
            prediction_type = "flow" if self.is_flow else scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "flow_prediction":
            prediction_type = "flow"
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"DiffusersGenerator: prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if (prediction_type == "flow") != self.is_flow:
            raise ValueError(
                f"DiffusersGenerator: prediction_type={prediction_type!r} does not fit the scheduler "
                f"{type(scheduler).__name__} ({'flow matching' if self.is_flow else 'DDPM-family'})"
            )
        self.prediction_type = prediction_type
        n, k = num_inference_steps, k_grad_steps
        fam.set_timesteps(scheduler, n, self.latent_size)
        timesteps = [float(t) for t in scheduler.timesteps.detach().cpu().tolist()]
        if len(timesteps) != n:
            raise ValueError(
                f"DiffusersGenerator: scheduler {type(scheduler).__name__} gives {len(timesteps)} timesteps for "
                f"num_inference_steps={n} (higher-order schedulers repeat steps); use DDIM / "
                "FlowMatchEulerDiscreteScheduler"
            )
        self.num_train_timesteps = int(scheduler.config.get("num_train_timesteps", 1000) or 1000)
        if self.is_flow:
            sig = [float(s) for s in scheduler.sigmas.detach().cpu().tolist()]
            sig = sig[: n + 1] if len(sig) > n else sig[:n] + [0.0]
            self._sigmas = sig
            self._alphas = [1.0 - s for s in sig]
            self._abar = None
        else:
            abar = scheduler.alphas_cumprod.detach().cpu().double()
            final = getattr(scheduler, "final_alpha_cumprod", None)
            final = 1.0 if final is None else float(final)
            a = [float(abar[int(round(t))]) for t in timesteps] + [final]
            self._alphas = [math.sqrt(v) for v in a]
            self._sigmas = [math.sqrt(1.0 - v) for v in a]
            self._abar = abar.float()
        self._timesteps = timesteps
        self._s_lo = min(int(math.floor(lo * n)), n - k)
        self._s_hi = max(self._s_lo, min(int(math.ceil(hi * n)), n) - k)

        if not train_vae:
            vae.requires_grad_(False)

    @classmethod
    def from_pipeline(cls, pipe, **options) -> DiffusersGenerator:
        """A generator over a loaded diffusers pipeline: its denoiser (`pipe.transformer` or `pipe.unet`), its
        VAE and a copy of its scheduler (the generator sets the grid on the copy; the pipeline's stays as
        it was); `options` go to the constructor. Errors: a pipeline without a VAE or a scheduler (ValueError
        naming it), an unsupported denoiser (TypeError listing the families). Text prompts:
        `uno_engine.generators.encode_prompts(pipe, prompts)`."""
        name = type(pipe).__name__
        vae = getattr(pipe, "vae", None)
        if vae is None:
            raise ValueError(
                f"from_pipeline: {name} has no VAE (pipe.vae is None); the generator decodes latents with it, "
                "so load the pipeline with its VAE"
            )
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"from_pipeline: {name} has no scheduler (pipe.scheduler is None)")
        scheduler = type(scheduler).from_config(scheduler.config)
        return cls(pipeline_denoiser(pipe), scheduler, vae, **options)

    # ------------------------------------------------------------------------------------------------------
    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.pixels_per_latent, self.width // self.pixels_per_latent

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters()

    def predict(self, x_t: torch.Tensor, t, cond: dict, denoiser: nn.Module | None = None) -> torch.Tensor:
        """The (guided, when `cond` was built with CFG) model output at x_t (B, C, h, w) and scheduler
        timestep t (a float, or a (B,) tensor) -> (B, C, h, w) fp32. `denoiser`: another module of the same
        family to call instead (a frozen reference copy); default `self.denoiser`."""
        return self._call_denoiser(x_t, t, cond, denoiser=denoiser)

    def _call_denoiser(self, x, t, cond: dict, denoiser: nn.Module | None = None) -> torch.Tensor:
        den = self.denoiser if denoiser is None else denoiser
        dtype = den.dtype
        xin = x.to(dtype)
        B = x.shape[0]
        if isinstance(t, torch.Tensor):
            tt = t.to(device=x.device, dtype=torch.float32).reshape(-1).expand(B)
        else:
            tt = torch.full((B,), float(t), device=x.device, dtype=torch.float32)
        if cond["cfg"]:
            xin, tt = torch.cat([xin, xin]), torch.cat([tt, tt])
        out = self.family.call(den, xin, self.family.model_timestep(tt), cond).float()
        if out.shape[1] == 2 * self.latent_channels:  # learned sigma (PixArt): first half is the prediction
            out = out[:, : self.latent_channels]
        if cond["cfg"]:
            uncond, text = out.chunk(2)
            out = self.family.guide(uncond, text, self.guidance_scale)
        return out

    def _x0_eps(self, x, out, alpha, sigma):
        """(x0_hat, eps_hat) from the model output under x = alpha * x0 + sigma * eps."""
        p = self.prediction_type
        if p == "epsilon":
            return (x - sigma * out) / alpha, out
        if p == "v_prediction":
            return alpha * x - sigma * out, sigma * x + alpha * out
        if p == "sample":
            return out, (x - alpha * out) / (
                sigma.clamp_min(1e-12) if torch.is_tensor(sigma) else max(sigma, 1e-12)
            )
        return x - sigma * out, x + alpha * out  # flow: v = eps - x0

    def _step(self, x, i: int, cond: dict):
        """Step i: x_i -> (x_{i+1}, x0_hat_i, model output)."""
        out = self._call_denoiser(x, self._timesteps[i], cond)
        x0, eps = self._x0_eps(x, out, self._alphas[i], self._sigmas[i])
        return self._alphas[i + 1] * x0 + self._sigmas[i + 1] * eps, x0, out

    def _grad_step(self, x, i: int, cond: dict):
        """`_step` with grad, gradient-checkpointed when asked for."""
        if self.gradient_checkpointing:
            return checkpoint(self._step, x, i, cond, use_reentrant=False)
        return self._step(x, i, cond)

    def conditioning(self, batch: Mapping, cfg: bool | None = None) -> dict:
        """The conditioning of one denoiser call, from the batch: each of `family.cond_keys` checked
        ((B, S, D) / (B, P) / (B, S)), cast to the denoiser's dtype (masks kept), with the negative rows in
        front when `cfg` (default: guidance_scale > 1); plus the family's size-derived inputs. Keys:
        diffusers' names, plus "rows" (B or 2B), "batch_size" (B), "cfg", "latent_hw"."""
        name = f"{type(self).__name__} ({self.family.name})"
        cfg = self.guidance_scale > 1.0 if cfg is None else bool(cfg)
        emb = require_key(batch, "prompt_embeds", name)
        if not isinstance(emb, torch.Tensor) or emb.dim() != 3:
            check_shape(emb, 'batch["prompt_embeds"]', name, (None, None, self.embed_dim))
        B, S = emb.shape[:2]
        dtype = self.denoiser.dtype
        cond: dict = {"rows": 2 * B if cfg else B, "batch_size": B, "cfg": cfg, "latent_hw": self.latent_size}
        for ck in self.family.cond_keys:
            want = (B,) + tuple(S if d == "S" else self.embed_dim if d == "D" else d for d in ck.shape)
            v = batch.get(ck.key)
            if v is None:
                if ck.required:
                    require_key(batch, ck.key, name)
                continue
            check_shape(v, f"batch[{ck.key!r}]", name, want)
            v = v if ck.mask else v.to(dtype)
            if cfg:
                neg = batch.get(ck.negative)
                if neg is None:
                    if not (ck.mask or not ck.required):
                        raise KeyError(
                            f"{name}: guidance_scale={self.guidance_scale} > 1 needs batch[{ck.negative!r}] (the "
                            f"unconditional counterpart of {ck.key!r}, same shape)"
                        )
                    neg = torch.ones_like(v) if ck.mask else v
                check_shape(neg, f"batch[{ck.negative!r}]", name, want)
                v = torch.cat([neg if ck.mask else neg.to(dtype), v])
            cond[ck.key] = v
        self.family.extra_conditioning(cond, self.height, self.width, self.options)
        return cond

    def _reference_latents(self, batch: Mapping, B: int) -> torch.Tensor | None:
        """Noised-reference mode's x0 per `reference`: "off" none, "latents" reference_latents only, "images"
        reference_latents or else the VAE-encoded reference_images."""
        if self.reference == "off" or (
            self.reference == "latents" and batch.get("reference_latents") is None
        ):
            return None
        return self._reference_source(batch, B, type(self).__name__)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VAE-encode images (B, 3, H, W) in [-1, 1] to denoiser latents (B, C, h, w) fp32, deterministic (the
        posterior mode), without grad."""
        return self.family.encode_images(self.vae, images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents (B, C, h, w) -> images (B, 3, H, W) in the VAE's dtype, with grad, not clamped."""
        return self.family.decode_latents(self.vae, latents)

    def _start(self, batch: Mapping, cond: dict, g, s: int, noise: torch.Tensor | None = None):
        B, device = cond["batch_size"], cond["prompt_embeds"].device
        ref = self._reference_latents(batch, B) if noise is None else None
        if ref is not None:  # noised-reference mode: x_s = alpha_s * x0_ref + sigma_s * noise
            eps = randn(ref.shape, generator=g, device=device, dtype=torch.float32)
            return self._alphas[s] * ref.to(device) + self._sigmas[s] * eps, s
        if noise is None:
            h, w = self.latent_size
            noise = randn((B, self.latent_channels, h, w), generator=g, device=device, dtype=torch.float32)
        check_shape(noise, "noise", type(self).__name__, (B, self.latent_channels, *self.latent_size))
        return noise.to(device=device, dtype=torch.float32), 0

    def generate_latents(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sample to the drawn step s without grad, run the K grad steps, and return the last grad step's x0
        prediction (recover="one_step"; "chain": the final sample after the remaining steps, with grad) as
        denoiser latents (B, C, h, w) fp32 with grad (no VAE). Fills `last_grad_steps` (the K window steps)."""
        cond = self.conditioning(batch)
        g = draw_generator(batch, self.default_generator)
        s = randint(self._s_lo, self._s_hi, generator=g)
        self.last_step_index, self.last_timestep = s, self._timesteps[s]
        x, start = self._start(batch, cond, g, s)
        if start < s:
            with torch.no_grad():
                for i in range(start, s):
                    x, _, _ = self._step(x, i, cond)
        x = x.detach()
        x0, steps = None, []
        with torch.enable_grad():
            for i in range(s, s + self.k_grad_steps):
                x_in = x
                x, x0, out = self._grad_step(x, i, cond)
                steps.append(GradStep(x_in, self._timesteps[i], i, cond, out))
            if self.recover == "chain":  # the rest of the schedule with grad: the image is the final sample
                for i in range(s + self.k_grad_steps, self.num_inference_steps):
                    x, _, _ = self._grad_step(x, i, cond)
                x0 = x
        self.last_grad_steps = steps
        return x0

    def forward(self, batch: Mapping[str, torch.Tensor], decode: bool = True, *, view: str = "pixel"):
        """Images (B, 3, H, W); decode=False: the x0 latents (B, C, h, w); view="latent": `latents_for_critic`;
        view="representation": `representation_for_critic`."""
        if view == "representation":
            return self.representation_for_critic(batch)
        if wants_latents(view, type(self).__name__, VIEWS):
            return self.latents_for_critic(batch)
        x0 = self.generate_latents(batch)
        if not decode:
            return x0
        with torch.enable_grad():
            images = self.decode_latents(x0)
        return check_images(images, type(self).__name__)

    @torch.no_grad()
    def sample_latents(self, batch: Mapping, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The whole deterministic chain (DDIM eta=0 / flow Euler), no grad: from `noise` (B, C, h, w) (default:
        drawn from the batch's seed) to the final latents x_n (B, C, h, w) fp32 in denoiser-latent space."""
        cond = self.conditioning(batch)
        g = draw_generator(batch, self.default_generator)
        x, _ = self._start({}, cond, g, 0, noise=noise)  # {}: never noised-reference mode here
        for i in range(self.num_inference_steps):
            x, _, _ = self._step(x, i, cond)
        return x

    def denoising_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's own training loss on real pairs, 0-d fp32 with grad to the trainable parameters:
        mean over all elements of (prediction - target)^2 at a random timestep per row (`denoising_pair`)."""
        pair = self.denoising_pair(batch)
        return (pair.prediction - pair.target).pow(2).mean()

    def denoising_pair(self, batch: Mapping[str, torch.Tensor]) -> DenoisingPair:
        """The model's prediction and its training target on real (or given) clean latents, per element.

        x0 = batch["reference_latents"] (B, C, h, w), or batch["reference_images"] (B, 3, H, W) in [-1, 1]
        VAE-encoded under no_grad; conditioning from the batch, without CFG. DDPM-family: t ~ U{0..T-1},
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps / v = alpha eps - sigma x0 / x0 as the
        prediction type says. Flow: sigma ~ U(0, 1), t = sigma T, x_t = (1 - sigma) x0 + sigma eps, target
        eps - x0. The draws come from the batch's seed + 1 (a stream apart from the sampling's), so two calls
        on the same batch see the same x_t and t. Returns a `DenoisingPair`: prediction (B, C, h, w) fp32 with
        grad, target (B, C, h, w) fp32, x_t (B, C, h, w), t (B,) scheduler timesteps, cond (for `predict`)."""
        name = f"{type(self).__name__}.denoising_loss"
        cond = self.conditioning(batch, cfg=False)
        B, device = cond["batch_size"], cond["prompt_embeds"].device
        x0 = self._reference_source(batch, B, name)
        if x0 is None:
            raise KeyError(
                f'{name}: needs batch["reference_latents"] (B, C, h, w) or batch["reference_images"] (B, 3, H, W) '
                f"in [-1, 1] (the real images of the pairs); batch has keys {sorted(batch)}"
            )
        g = draw_generator(batch, self.default_generator, salt=1)
        T = self.num_train_timesteps
        if self.is_flow:
            sigma = rand((B,), generator=g, device=device)
            t, alpha = sigma * T, 1.0 - sigma
        else:
            gcpu = g if (g is not None and g.device.type == "cpu") else None
            ti = torch.randint(0, T, (B,), generator=gcpu)
            abar = self._abar[ti].to(device)
            t, alpha, sigma = ti.float().to(device), abar.sqrt(), (1.0 - abar).sqrt()
        eps = randn(x0.shape, generator=g, device=device, dtype=torch.float32)
        a, s = alpha.view(B, 1, 1, 1), sigma.view(B, 1, 1, 1)
        x0 = x0.to(device)
        x_t = a * x0 + s * eps
        pred = self._call_denoiser(x_t, t, cond)
        target = {
            "epsilon": lambda: eps,
            "v_prediction": lambda: a * eps - s * x0,
            "sample": lambda: x0,
            "flow": lambda: eps - x0,
        }[self.prediction_type]()
        return DenoisingPair(pred, target, x_t, t, cond)

    def latents_for_critic(self, batch: Mapping[str, torch.Tensor]) -> GeneratedLatents:
        """The latent view (`UNOConfig(view="latent")`, uno_engine.latent): `generate_latents` plus the last grad
        step's output x_{i+1} = alpha_{i+1} x0_hat + sigma_{i+1} eps_hat (the noised latent at sigma_{i+1}; at
        the end of the schedule the final sample, at the scheduler's final noise level: 0 for flow matching),
        both with grad, and a lazy `decode()`. Nothing is decoded."""
        x0 = self.generate_latents(batch)
        last = self.last_grad_steps[-1]
        i = last.index
        x0_hat, eps = self._x0_eps(last.x_t, last.prediction, self._alphas[i], self._sigmas[i])
        xt = self._alphas[i + 1] * x0_hat + self._sigmas[i + 1] * eps
        t_next = self._timesteps[i + 1] if i + 1 < len(self._timesteps) else 0.0
        return GeneratedLatents(
            kind="latents",
            grid=self.latent_size,
            x0=x0,
            xt=xt,
            sigma_t=float(self._sigmas[i + 1]),
            timestep=t_next,
            decode=lambda: self.decode_latents(x0),
        )

    # ---------------------------------------------------------------------------- representation view
    def noise_at(self, x0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor):
        """Forward noising on the training schedule, the way `denoising_loss` noises: x0, eps (B, C, h, w) fp32,
        u (B,) in [0, 1], the noise level as a fraction of the schedule (0 clean, 1 pure noise). Flow:
        sigma = u, t = u T; DDPM-family: t = round(u (T - 1)), alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t).
        -> (x_t = alpha x0 + sigma eps, t (B,) the model's scheduler timestep, target of the prediction type)."""
        name = f"{type(self).__name__}.noise_at"
        B = x0.shape[0]
        check_shape(u, "u", name, (B,))
        check_shape(eps, "eps", name, tuple(x0.shape))
        u = u.to(device=x0.device, dtype=torch.float32)
        T = self.num_train_timesteps
        if self.is_flow:
            sigma, t = u, u * T
            alpha = 1.0 - sigma
        else:
            ti = (u * (T - 1)).round().long()
            abar = self._abar.to(x0.device)[ti]
            t, alpha, sigma = ti.float(), abar.sqrt(), (1.0 - abar).sqrt()
        a, s = alpha.view(B, 1, 1, 1), sigma.view(B, 1, 1, 1)
        x_t = a * x0 + s * eps
        target = {"epsilon": eps, "sample": x0, "flow": eps - x0}.get(self.prediction_type)
        if target is None:  # v_prediction
            target = a * eps - s * x0
        return x_t, t, target

    def attach_representation(self, head: nn.Module) -> DiffusersGenerator:
        """Attach a `uno_engine.representation.RepresentationHead` (a submodule: saved and trained with the
        generator's parameters). `uno_engine.representation.attach_representation(critic, generator, batch)`
        builds one sized to a critic and attaches it."""
        for attr in ("block", "output_index", "prompt_dropout", "noise_range", "source"):
            if not hasattr(head, attr):
                raise TypeError(
                    f"attach_representation: `head` must be a RepresentationHead (it has no {attr!r})"
                )
        self.representation = head
        return self

    @torch.no_grad()
    def representation_probe(self, batch: Mapping, block: str, output_index: int = 0):
        """-> (channels / width of the denoiser block `block`'s output, (H, W) of the images): one no-grad
        denoiser call at a zero latent with the batch's conditioning, what `attach_representation` sizes a
        head with."""
        cond = self.conditioning(batch, cfg=False)
        h, w = self.latent_size
        x = torch.zeros(cond["batch_size"], self.latent_channels, h, w, device=cond["prompt_embeds"].device)
        with block_output(self.denoiser, block, output_index) as box:
            self._call_denoiser(x, self.num_train_timesteps // 2, cond)
        if "hidden" not in box:
            raise ValueError(f"representation_probe: block {block!r} did not run in the denoiser's forward")
        hid = box["hidden"]
        return int(hid.shape[1] if hid.dim() == 4 else hid.shape[-1]), (self.height, self.width)

    def _masked_prompt_batch(self, batch: Mapping, drop: torch.Tensor) -> dict:
        """The batch with each conditioning key's rows where `drop` (B,) bool replaced by its negative."""
        out = dict(batch)
        name = f"{type(self).__name__}.representation_for_critic"
        for ck in self.family.cond_keys:
            pos = batch.get(ck.key)
            if pos is None:
                continue
            neg = batch.get(ck.negative)
            if neg is None:
                if not ck.mask:
                    raise KeyError(
                        f"{name}: RepresentationHead(prompt_dropout > 0) masks prompts with batch[{ck.negative!r}] "
                        f"(the unconditional counterpart of {ck.key!r}), which is missing"
                    )
                neg = torch.ones_like(pos)
            check_shape(neg, f"batch[{ck.negative!r}]", name, tuple(pos.shape))
            d = drop.to(pos.device).view(-1, *([1] * (pos.dim() - 1)))
            out[ck.key] = torch.where(d, neg.to(pos.device), pos)
        return out

    def representation_for_critic(self, batch: Mapping[str, torch.Tensor]) -> GeneratedRepresentation:
        """The representation view (`UNOConfig(view="representation")`, uno_engine.representation): ONE denoiser
        call with grad at a noised latent x_t, whose hidden states at the attached head's block are projected
        to the critic's image tokens; the generator's own loss comes from the same call.

        x0: the batch's real image (batch["reference_latents"], or batch["reference_images"] VAE-encoded under
        no_grad) where it has one and the head's source allows; else the generator's own sample
        (`sample_latents`, no grad). u ~ U(head.noise_range) per row, or batch["representation_noise_level"]
        (a float or (B,) tensor: e.g. 1.0 for pure noise, the copy-leak measure); eps from the batch's seed + 2;
        x_t, t, target = `noise_at(x0, u, eps)`. Rows are drawn with probability head.prompt_dropout to read
        the negative conditioning (masked prompts). No CFG in this call. `last_grad_steps` holds this call
        (a GradStep with t the (B,) timesteps and index -1: it is not a step of the sampling schedule).
        Returns `GeneratedRepresentation` (generator_loss: mean (prediction - target)^2, only from a real image)."""
        head = self.representation
        name = f"{type(self).__name__}.representation_for_critic"
        if head is None:
            raise ValueError(
                f"{name}: no RepresentationHead is attached; build one with uno_engine.representation."
                "attach_representation(critic, generator, batch, block=...)"
            )
        cond = self.conditioning(batch, cfg=False)
        B, device = cond["batch_size"], cond["prompt_embeds"].device
        g = draw_generator(batch, self.default_generator, salt=2)
        x0 = None
        if head.source != "sample":
            x0 = self._reference_source(batch, B, name)
            if x0 is None and head.source == "reference":
                raise KeyError(
                    f'{name}: RepresentationHead(source="reference") needs batch["reference_latents"] or '
                    f'batch["reference_images"]; batch has keys {sorted(batch)}'
                )
        from_reference = x0 is not None
        if x0 is None:
            x0 = self.sample_latents(batch)
        u = noise_levels(batch, head.noise_range, B, g, device, name)
        eps = randn(x0.shape, generator=g, device=device, dtype=torch.float32)
        x_t, t, target = self.noise_at(x0.to(device), u, eps)
        kept = torch.ones(B, dtype=torch.bool, device=device)
        if head.prompt_dropout > 0:
            kept = rand((B,), generator=g, device=device) >= head.prompt_dropout
            cond = self.conditioning(self._masked_prompt_batch(batch, ~kept), cfg=False)
        with torch.enable_grad(), block_output(self.denoiser, head.block, head.output_index) as box:
            pred = self._call_denoiser(x_t, t, cond)
            tokens = head(box["hidden"], self.latent_size)
        self.last_grad_steps = [GradStep(x_t, t, -1, cond, pred)]
        own = (pred - target).pow(2).mean() if from_reference else None
        return GeneratedRepresentation(
            tokens=tokens,
            grid=tuple(head.grid),
            noise_level=u,
            prompt_kept=kept,
            from_reference=from_reference,
            generator_loss=own,
        )

    def _reference_source(self, batch: Mapping, B: int, name: str) -> torch.Tensor | None:
        ref = batch.get("reference_latents")
        if ref is not None:
            check_shape(ref, 'batch["reference_latents"]', name, (B, self.latent_channels, *self.latent_size))
            return ref.detach().float()
        if batch.get("reference_images") is not None:
            imgs = batch["reference_images"]
            check_shape(imgs, 'batch["reference_images"]', name, (B, 3, self.height, self.width))
            return self.encode_images(imgs)
        return None

    def extra_repr(self) -> str:
        return (
            f"family={self.kind}, prediction_type={self.prediction_type}, steps={self.num_inference_steps}, "
            f"k_grad_steps={self.k_grad_steps}, grad_window={self.grad_window}, recover={self.recover}, "
            f"guidance_scale={self.guidance_scale}, size={self.height}x{self.width}"
        )
