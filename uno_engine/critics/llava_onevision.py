"""LLaVA-OneVision critic: `LlavaOnevisionForConditionalGeneration` (SigLIP tower + 2-layer projector +
Qwen2 LM), a single image per sample, one anyres tile.

For a single image HF always runs "anyres": the processor makes the base view (an exact resize to the tower's
size s x s) plus the tiles of the best resolution in `image_grid_pinpoints`, and the model lays out

    base tokens (gh * gw) | tile tokens, row by row, each row followed by `image_newline` (gh * (gw + 1))

(`pack_image_features`: tiles unpadded to the image's aspect ratio, and pooled when they exceed
`vision_aspect_ratio`'s budget). This adapter takes the one layout the bridge makes exactly: the model's and
the processor's `image_grid_pinpoints == [[s, s]]` and square images. Then the single tile is the base view
itself (the processor's aspect-preserving resize of a square image to s x s is the same resize, nothing is
unpadded, and one tile never exceeds the pooling budget), so the tower runs once and its projected tokens
are laid out twice, as above. Other pinpoints (real anyres tiling) raise a ValueError that names
`image_grid_pinpoints`; non-square images raise one that names the image size.

Patch features are the selected tower layer's hidden states of the base view (SigLIP: no CLS), as LLaVA's.
The fused bridge patch embedding works as for LLaVA (the tower is SigLIP's conv patch embedding).
"""

from __future__ import annotations

import torch

from uno_engine.critics.base import CriticInputs
from uno_engine.critics.llava import LlavaCritic
from uno_engine.critics.registry import register_critic

__all__ = ["LlavaOnevisionCritic"]


@register_critic
class LlavaOnevisionCritic(LlavaCritic):
    hf_class_names = ("LlavaOnevisionForConditionalGeneration",)
    family = "LLaVA-OneVision"

    def _build(self):
        super()._build()
        m = self.hf_model
        s = self.image_size
        pins = [tuple(int(v) for v in p) for p in (m.config.image_grid_pinpoints or [])]
        if pins != [(s, s)]:
            raise ValueError(
                f"LLaVA-OneVision critic: config.image_grid_pinpoints={[list(p) for p in pins]} tiles a "
                "single image (anyres) into views the bridge does not make; the critic takes one tile equal "
                f"to the base view: set model.config.image_grid_pinpoints = [[{s}, {s}]] (and the "
                "processor's)"
            )
        self.image_newline = m.model.image_newline  # (H,), appended to every row of the tile

    def prepare(self, images: torch.Tensor, *args, **kwargs) -> CriticInputs:
        """As `Critic.prepare`; the images must be square (see the module docstring)."""
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"LLaVA-OneVision critic: images must be square, got {tuple(images.shape[-2:])}: the anyres "
                "tile of a non-square image (aspect-preserving resize, zero padding, unpadded features) is "
                "not the base view the bridge makes"
            )
        return super().prepare(images, *args, **kwargs)

    def _encode(self, inputs: CriticInputs):
        base, patch, (gh, gw) = super()._encode(inputs)  # (B, gh*gw, H): the base view's tokens
        B, _, H = base.shape
        newline = self.image_newline.to(base.dtype).expand(B, gh, 1, H)
        tile = torch.cat([base.reshape(B, gh, gw, H), newline], dim=2).reshape(B, gh * (gw + 1), H)
        return torch.cat([base, tile], dim=1), patch, (gh, gw)
