"""Generators: nn.Modules mapping a batch dict to images (B, 3, H, W) nominally in [-1, 1], with grad to their
trainable parameters.

- `DiffusersGenerator`: a diffusers denoiser + scheduler + VAE, trained through its last K sampling steps
  (ReFL / DRaFT-K). Denoiser families (`uno_engine.generators.families`): SD-1.x/2.x, SDXL, SD3/SD3.5,
  FLUX.1, FLUX.2, Qwen-Image, SANA, PixArt. `DiffusersGenerator.from_pipeline(pipe)` and
  `encode_prompts(pipe, prompts)` work from a loaded diffusers pipeline.
- `JanusGenerator`: Janus's own image-token generation, straight-through Gumbel-softmax to the VQ decoder.
- `CallableGenerator`: any function batch -> images.
"""

from .base import Generator
from .callable import CallableGenerator
from .diffusers import DiffusersGenerator, GradStep
from .families import DenoiserFamily, register_family
from .janus import JanusGenerator
from .pipeline import encode_prompts, from_pipeline

__all__ = [
    "Generator",
    "DiffusersGenerator",
    "GradStep",
    "JanusGenerator",
    "CallableGenerator",
    "DenoiserFamily",
    "register_family",
    "encode_prompts",
    "from_pipeline",
]
