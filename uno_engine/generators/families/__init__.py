"""Denoiser families: one small adapter per diffusers denoiser kind (see `base.DenoiserFamily`).

`family_for(denoiser, vae)` picks the first registered family whose `matches(denoiser)` is true (SDXL is
tried before plain SD: both are UNet2DConditionModel). `register_family(cls)` adds one (in front, so a
user's family wins over a built-in one for the same class).
"""

from __future__ import annotations

from torch import nn

from .base import CondKey, DenoiserFamily, vae_scale_factor
from .flux import FluxFamily
from .flux2 import Flux2Family
from .pixart import PixArtFamily
from .qwen_image import QwenImageFamily
from .sana import SanaFamily
from .sd import StableDiffusionFamily
from .sd3 import SD3Family
from .sdxl import SDXLFamily

FAMILIES: list[type[DenoiserFamily]] = [
    SDXLFamily,
    StableDiffusionFamily,
    SD3Family,
    FluxFamily,
    Flux2Family,
    QwenImageFamily,
    SanaFamily,
    PixArtFamily,
]


def register_family(family: type[DenoiserFamily]) -> type[DenoiserFamily]:
    """Add a family (usable as a class decorator); it is tried before the built-in ones."""
    if not (isinstance(family, type) and issubclass(family, DenoiserFamily)):
        raise TypeError(f"register_family: expected a DenoiserFamily subclass, got {family!r}")
    if family not in FAMILIES:
        FAMILIES.insert(0, family)
    return family


def supported() -> str:
    """One line per family: its name and what it covers."""
    return "; ".join(f"{f.name}: {f.description}" for f in FAMILIES)


def family_for(denoiser: nn.Module, vae: nn.Module) -> DenoiserFamily:
    for fam in FAMILIES:
        if fam.matches(denoiser):
            return fam(denoiser, vae)
    extra = ""
    add = getattr(getattr(denoiser, "config", None), "get", lambda *_: None)("addition_embed_type")
    if add is not None:
        extra = f" (its addition_embed_type={add!r} is not one a family handles)"
    raise TypeError(
        f"DiffusersGenerator: denoiser of class {type(denoiser).__name__} is not supported{extra}; supported "
        f"families: {supported()} (wrap anything else in CallableGenerator, or add a family: "
        "uno_engine.generators.families)"
    )


__all__ = [
    "FAMILIES",
    "CondKey",
    "DenoiserFamily",
    "FluxFamily",
    "Flux2Family",
    "PixArtFamily",
    "QwenImageFamily",
    "SD3Family",
    "SDXLFamily",
    "SanaFamily",
    "StableDiffusionFamily",
    "family_for",
    "register_family",
    "supported",
    "vae_scale_factor",
]
