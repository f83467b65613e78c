"""Generators: nn.Modules mapping a batch dict to images (B, 3, H, W) nominally in [-1, 1], with grad to their
trainable parameters.

- `DiffusersGenerator`: a diffusers denoiser (UNet2DConditionModel, SanaTransformer2DModel,
  PixArtTransformer2DModel) + scheduler + VAE, trained through its last K sampling steps (ReFL / DRaFT-K).
- `JanusGenerator`: Janus's own image-token generation, straight-through Gumbel-softmax to the VQ decoder.
- `CallableGenerator`: any function batch -> images.
"""

from .base import Generator
from .callable import CallableGenerator
from .diffusers import DiffusersGenerator
from .janus import JanusGenerator

__all__ = ["Generator", "DiffusersGenerator", "JanusGenerator", "CallableGenerator"]
