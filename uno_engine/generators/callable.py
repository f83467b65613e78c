"""CallableGenerator: wrap any function batch -> images as a generator."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .base import Generator, check_images, wants_latents


class CallableGenerator(Generator):
    """`fn(batch) -> images (B, 3, H, W)` nominally in [-1, 1], with grad to `module`'s trainable parameters.

    Args:
        fn: the function. It owns the sampling; it should return images with grad (decoded with grad).
        module: the nn.Module whose parameters `fn` uses (registered as a submodule so `.parameters()`,
            `.to()`, state dicts and `trainable_parameters()` see them). None: no trainable parameters
            known to the engine (the images may still carry grad to tensors held elsewhere).

    `forward(batch, view="latent")` raises ValueError: a function hands over pixels only.
    The output is checked for shape (B, 3, H, W) only (no value inspection, so no device sync) and is returned
    as is, not clamped: the bridge applies the engine's clamp policy.
    """

    def __init__(
        self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], module: nn.Module | None = None
    ):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableGenerator: fn must be callable, got {type(fn).__name__}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(
                f"CallableGenerator: module must be an nn.Module or None, got {type(module).__name__}"
            )
        self.fn = fn
        self.module = module

    def forward(self, batch: Mapping[str, torch.Tensor], *, view: str = "pixel") -> torch.Tensor:
        name = f"CallableGenerator(fn={getattr(self.fn, '__name__', self.fn)!r})"
        if wants_latents(view, "CallableGenerator"):
            raise ValueError(
                f"{name}.forward: view='latent' is not available: a function batch -> images hands over "
                "pixels only (use UNOConfig(view='pixel'))"
            )
        return check_images(self.fn(batch), name)
