"""The base of a denoiser family: how one kind of diffusers denoiser is called, and what it needs.

A family adapts one denoiser class (or one configuration of it, e.g. SDXL's UNet) to the generator's single
view of a latent: a spatial tensor `x` of shape `(B, C, h, w)` in fp32, in the denoiser's own normalized
latent space ("denoiser latents"). Everything model-specific lives here:

- the conditioning it reads from the batch (`cond_keys`, diffusers' names: "prompt_embeds",
  "pooled_prompt_embeds", masks, ...) and what it derives from the output size (`extra_conditioning`:
  SDXL's time ids, FLUX's position ids, PixArt's resolution);
- how the timestep is fed (`model_timestep`: 0..1000 for UNets and SD3, t / 1000 for FLUX and Qwen-Image,
  times `timestep_scale` for SANA);
- token packing (`pack` / `unpack`: FLUX's and Qwen-Image's 2x2 patches as tokens);
- the timestep grid its pipeline uses (`set_timesteps`: resolution-dependent shift `mu` for FLUX / Qwen);
- the map between VAE latents and denoiser latents (`encode_images` / `decode_latents`: scaling and shift,
  FLUX.2's 2x2 patchify + batch-norm statistics, Qwen-Image's per-channel mean / std and 5-D video VAE).

Adding a family: subclass `DenoiserFamily` in a new file of this package, set `name` and
`denoiser_classes`, override what differs, and add the class to `FAMILIES` in `families/__init__.py`
(or call `register_family`). Shared pieces: the usual conditioning keys (`PROMPT_EMBEDS`,
`PROMPT_ATTENTION_MASK`, `pooled_embeds`), `DenoiserFamily.distilled_guidance`, and `PackedFlowFamily` (2x2
token packing with the FLUX-style flow grid).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CondKey:
    """One conditioning tensor read from the batch: `key` (and `negative` for classifier-free guidance),
    its shape after the batch dim (None = any size; "S" = the prompt's sequence length), whether it must
    be present, and whether it is a mask (kept as is; a missing negative mask defaults to all ones)."""

    key: str
    negative: str
    shape: tuple = ()
    required: bool = True
    mask: bool = False


# the conditioning most families share (diffusers' names)
PROMPT_EMBEDS = CondKey("prompt_embeds", "negative_prompt_embeds", ("S", "D"))
PROMPT_ATTENTION_MASK = CondKey(
    "prompt_attention_mask", "negative_prompt_attention_mask", ("S",), required=False, mask=True
)
# encode_prompt of the pipelines with one masked text encoder (T5 for PixArt, Gemma-2 for SANA)
MASKED_PROMPT_OUTPUTS = (
    "prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_embeds",
    "negative_prompt_attention_mask",
)


def pooled_embeds(dim: int) -> CondKey:
    """The pooled text embedding (B, dim) of SDXL, SD3 and FLUX.1."""
    return CondKey("pooled_prompt_embeds", "negative_pooled_prompt_embeds", (int(dim),))


def calculate_shift(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """FLUX / SD3 / Qwen-Image resolution-dependent shift `mu`: linear in the image token count, through
    (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_from_config(scheduler, image_seq_len: int) -> float:
    cfg = scheduler.config
    return calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )


def flow_sigmas(n: int) -> list[float]:
    """The FLUX / Qwen-Image pipelines' sigma grid before shifting: linspace(1, 1/n, n)."""
    return [1.0 - i * (1.0 - 1.0 / n) / max(n - 1, 1) for i in range(n)] if n > 1 else [1.0]


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per VAE latent cell along each side."""
    cfg = vae.config
    if "encoder_block_out_channels" in cfg:  # AutoencoderDC (SANA's DC-AE): one /2 per stage after the first
        return 2 ** (len(cfg.encoder_block_out_channels) - 1)
    if "temperal_downsample" in cfg:  # AutoencoderKLQwenImage (Wan-style video VAE): one /2 per stage
        return 2 ** len(cfg.temperal_downsample)
    return 2 ** (len(cfg.block_out_channels) - 1)  # AutoencoderKL, AutoencoderKLFlux2


def _mro_names(module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


class DenoiserFamily:
    """Defaults are those of a plain latent denoiser with scaling/shift VAE latents. See the module
    docstring for what a family decides."""

    name: str = "base"
    denoiser_classes: tuple[str, ...] = ()
    description: str = ""
    #: 2 for FLUX.1 / Qwen-Image: each 2x2 patch of latents becomes one token of 4C channels.
    packing: int = 1
    #: "prompt_attention_mask" or "prompt_embeds_mask" etc.: the batch keys this family reads.
    cond_keys: tuple[CondKey, ...] = ()
    #: names of what the family's pipeline `encode_prompt` returns, in order (None: dropped, e.g. text ids)
    encode_prompt_outputs: tuple[str | None, ...] = ("prompt_embeds",)

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return bool(_mro_names(denoiser) & set(cls.denoiser_classes))

    def __init__(self, denoiser: nn.Module, vae: nn.Module):
        self.config = denoiser.config
        self.vae_scale_factor = vae_scale_factor(vae)
        self.accepts = set(inspect.signature(denoiser.forward).parameters)

    # --- shapes ---------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """C of the spatial denoiser latent (B, C, h, w)."""
        return int(self.config.in_channels) // (self.packing**2)

    @property
    def pixels_per_latent(self) -> int:
        """Pixels per denoiser-latent cell along a side (the VAE's factor; x2 for FLUX.2's patchified
        latents)."""
        return self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        """h and w must be multiples of this (the DiT patch size, or the 2x2 token packing)."""
        return int(getattr(self.config, "patch_size", None) or 1) * self.packing

    @property
    def embed_dim(self) -> int:
        cfg = self.config
        for attr in ("caption_channels", "joint_attention_dim", "cross_attention_dim"):
            v = cfg.get(attr, None)
            if v:
                return int(v if isinstance(v, int) else v[0])
        raise ValueError(f"{type(self).__name__}: cannot read the text width from the denoiser config")

    def default_latent_size(self) -> int:
        sample = self.config.get("sample_size", None) or 128
        return int(sample if isinstance(sample, int) else sample[0])

    # --- schedule -------------------------------------------------------------------------------------
    def set_timesteps(self, scheduler, n: int, latent_hw: tuple[int, int]) -> None:
        """Set the scheduler's grid the way this family's pipeline does (default: plain set_timesteps)."""
        scheduler.set_timesteps(n)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Scheduler timesteps (0..num_train_timesteps) -> what the denoiser's `timestep` argument takes."""
        return t

    # --- conditioning ---------------------------------------------------------------------------------
    def extra_conditioning(self, cond: dict, height: int, width: int, options: dict) -> None:
        """Add size-derived inputs to `cond` (rows = cond["rows"]); default: nothing."""

    def distilled_guidance(self, cond: dict, options: dict, default: float) -> torch.Tensor | None:
        """The embedded guidance value per row, fp32 (rows,), of a guidance-distilled checkpoint (config
        `guidance_embeds`): `options["distilled_guidance"]`, else `default`. None for other checkpoints."""
        if not self.config.get("guidance_embeds", False):
            return None
        ref, g = cond["prompt_embeds"], options.get("distilled_guidance", default)
        return torch.full((cond["rows"],), float(g), device=ref.device, dtype=torch.float32)

    def call(self, denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One denoiser call: x (rows, C, h, w) in the denoiser's dtype, t (rows,) model timesteps ->
        prediction (rows, C', h, w) (C' may be 2C for a learned-sigma output)."""
        raise NotImplementedError

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance on fp32 predictions (B, C, h, w): uncond + scale * (cond - uncond)."""
        return uncond + scale * (cond - uncond)

    # --- VAE ------------------------------------------------------------------------------------------
    def vae_factors(self, vae: nn.Module) -> tuple[float, float]:
        scaling = float(vae.config.get("scaling_factor", 1.0) or 1.0)
        shift = vae.config.get("shift_factor", None)
        return scaling, float(shift) if shift is not None else 0.0

    def encode_images(self, vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> denoiser latents (posterior mode), fp32."""
        scaling, shift = self.vae_factors(vae)
        return (posterior_mode(vae.encode(images.to(vae.dtype))).float() - shift) * scaling

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> images (B, 3, H, W) in the VAE's dtype, with grad, not clamped."""
        scaling, shift = self.vae_factors(vae)
        z = latents / scaling + shift
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]


class PackedFlowFamily(DenoiserFamily):
    """FLUX.1 and Qwen-Image: 2x2 latent patches as tokens, the timestep fed as t / 1000, and their
    pipelines' grid: sigmas linspace(1, 1/n, n), shifted by mu(image tokens) when the scheduler uses dynamic
    shifting."""

    packing = 2

    @property
    def latent_multiple(self) -> int:
        return 2

    def set_timesteps(self, scheduler, n, latent_hw):
        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        kwargs = (
            {"mu": shift_from_config(scheduler, seq)} if scheduler.config.get("use_dynamic_shifting") else {}
        )
        scheduler.set_timesteps(sigmas=flow_sigmas(n), **kwargs)

    def model_timestep(self, t):
        return t / 1000.0


def posterior_mode(enc) -> torch.Tensor:
    """The deterministic latent of a diffusers VAE encode output (KL: posterior mode; DC-AE: the latent)."""
    if hasattr(enc, "latent_dist"):
        return enc.latent_dist.mode()
    if hasattr(enc, "latent"):
        return enc.latent
    z = enc[0]
    # a distribution (DiagonalGaussianDistribution) has .mode(); a plain tensor's .mode() is the statistical
    # mode along a dim, not a latent, so a tensor (a tuple-returning encode) is the latent itself
    return z if isinstance(z, torch.Tensor) else z.mode()


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX.1 / Qwen-Image tokens, channel order (C, 2, 2)."""
    B, C, h, w = x.shape
    x = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_2x2`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    B, _, D = tokens.shape
    x = tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)
