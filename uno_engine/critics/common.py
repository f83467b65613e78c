"""Helpers shared by the critic family adapters (no adapter imports another adapter's module)."""

from __future__ import annotations

from torch import nn

__all__ = ["find_layers"]


def find_layers(module: nn.Module, names=("layers", "blocks")) -> nn.ModuleList:
    """The first non-empty ModuleList called `layers` / `blocks` under `module` (encoder or decoder layers),
    in `named_modules` order. Raises ValueError naming the module's class when there is none."""
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in names and len(m) > 0:
            return m
    raise ValueError(f"no encoder/decoder layer list found in {type(module).__name__}")
