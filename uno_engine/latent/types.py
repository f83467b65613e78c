"""What a generator hands the critic in the latent view (`UNOConfig(view="latent")`): `GeneratedLatents`.

This module holds data only and imports nothing of uno_engine, so generators can import it (imports go one
way: generators -> latent.types; latent.view -> critics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["GeneratedLatents"]


@dataclass
class GeneratedLatents:
    """The generator's output before any pixel decode, carrying the gradient of its grad steps.

    kind "tokens" (unified token models, Janus):
        token_probs: (B, N, V_img) straight-through token distribution from the generation head (forward:
            exactly one-hot of `tokens`; backward: the Gumbel-softmax relaxation), fp32.
        tokens: (B, N) int64 sampled token ids (detached). grid: (gh, gw) token grid, N = gh * gw.
    kind "latents" (diffusion models, read through a `LatentAdapter`):
        x0: (B, C, h, w) the last grad step's x0 prediction, in the denoiser's latent space (fp32).
        xt: (B, C, h, w) the last grad step's output, the noised latent at noise level `sigma_t`
            (x_t = alpha(sigma_t) x0 + sigma_t eps; at the end of the schedule: the final sample, at the
            scheduler's final noise level, 0 for flow matching).
        sigma_t: Python float in [0, 1]; timestep: the scheduler's timestep value of xt (for messages).
        grid: (h, w) latent size.
    decode: a zero-argument callable that decodes pixels (B, 3, H, W) with grad, or None. Nothing decodes
        unless it is called (`UNOOutput.decoded_images()`).
    """

    kind: str
    grid: tuple[int, int]
    token_probs: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    xt: torch.Tensor | None = None
    sigma_t: float | None = None
    timestep: float | None = None
    decode: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in ("tokens", "latents"):
            raise ValueError(f"GeneratedLatents.kind must be 'tokens' or 'latents', got {self.kind!r}")
        need = ("token_probs", "tokens") if self.kind == "tokens" else ("x0", "xt", "sigma_t")
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"GeneratedLatents(kind={self.kind!r}) needs {', '.join(missing)}")

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor carrying the generator's gradient: token_probs or x0."""
        return self.token_probs if self.kind == "tokens" else self.x0

    @property
    def batch_size(self) -> int:
        return int(self.tensor.shape[0])
