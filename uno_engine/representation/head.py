"""`RepresentationHead`: the trainable projector of the representation view and the settings of its pass.

The head is attached to the generator (`generator.representation`, a submodule), so it is saved with the
generator's trainable parameters (its LoRA) and trained by the same optimizer; the critic stays frozen.

    hidden (B, C, h, w) of a UNet block, or (B, M, C) image tokens of a DiT block
      -> area-resampled to the critic's image-token grid (gh, gw)         (no parameters)
      -> LayerNorm(C) -> Linear(C, W) -> GELU -> Linear(W, H) -> LayerNorm(H) * gain
      -> tokens (B, gh * gw, H) in the critic LM's input space

The last LayerNorm's gain starts at the RMS of the critic's own image tokens (`target_rms`), so the LM reads
tokens of the scale it was trained on from the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RepresentationHead", "SOURCES"]

SOURCES = ("auto", "reference", "sample")


class RepresentationHead(nn.Module):
    """Args:
    in_dim: C, the channels (UNet) or width (DiT) of the hooked block's output.
    out_dim: H, the critic LM's hidden size. grid: (gh, gw), the critic's image-token grid.
    block: module path inside the denoiser whose output is read (e.g. "mid_block", "up_blocks.1",
        "transformer_blocks.4"); `output_index` picks the tensor when the block returns a tuple
        (UNet down blocks: 0; SD3 / FLUX joint blocks return (text, image): 1).
    prompt_dropout: probability, per row and pass, that the prompt conditioning is replaced by the batch's
        negative (unconditional) conditioning: the paper's masked prompts, against copying the caption.
    noise_range: (lo, hi) in [0, 1]: the pass draws the noise level u ~ U(lo, hi) per row (fraction of the
        training schedule; 1 = pure noise).
    source: "auto" (the batch's real image where it has one, else the generator's own no-grad sample,
        re-noised), "reference" (a real image is required), "sample" (always the generator's own sample).
    width: the projector's inner width (default max(C, H)). target_rms: the initial output scale.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        *,
        block: str,
        output_index: int = 0,
        prompt_dropout: float = 0.0,
        noise_range: tuple[float, float] = (0.0, 1.0),
        source: str = "auto",
        width: int | None = None,
        target_rms: float = 1.0,
    ):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RepresentationHead: `{name}` must be an int >= 1, got {v!r}")
        if not (
            isinstance(grid, (tuple, list))
            and len(grid) == 2
            and all(isinstance(g, int) and g > 0 for g in grid)
        ):
            raise ValueError(f"RepresentationHead: `grid` must be (gh, gw) positive ints, got {grid!r}")
        if not isinstance(block, str) or not block:
            raise ValueError(
                f"RepresentationHead: `block` must be a module path (e.g. 'mid_block'), got {block!r}"
            )
        if not isinstance(output_index, int) or output_index < 0:
            raise ValueError(f"RepresentationHead: `output_index` must be an int >= 0, got {output_index!r}")
        if not (isinstance(prompt_dropout, (int, float)) and 0.0 <= prompt_dropout <= 1.0):
            raise ValueError(
                f"RepresentationHead: `prompt_dropout` must be in [0, 1], got {prompt_dropout!r}"
            )
        lo, hi = (float(v) for v in noise_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                f"RepresentationHead: `noise_range` must be (lo, hi) with 0 <= lo <= hi <= 1, got {noise_range!r}"
            )
        if source not in SOURCES:
            raise ValueError(f"RepresentationHead: `source` must be one of {SOURCES}, got {source!r}")
        if not (isinstance(target_rms, (int, float)) and math.isfinite(target_rms) and target_rms > 0):
            raise ValueError(
                f"RepresentationHead: `target_rms` must be a finite number > 0, got {target_rms!r}"
            )
        self.in_dim, self.out_dim, self.grid = in_dim, out_dim, (int(grid[0]), int(grid[1]))
        self.block, self.output_index = block, output_index
        self.prompt_dropout, self.noise_range, self.source = float(prompt_dropout), (lo, hi), source
        width = max(in_dim, out_dim) if width is None else int(width)
        self.norm_in = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        with torch.no_grad():
            self.norm_out.weight.fill_(float(target_rms))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_grid(self, hidden: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """hidden (B, C, h, w) or (B, M, C) image tokens (M = h' w' with h' / w' = latent h / w) -> (B, C, gh, gw)."""
        if hidden.dim() == 3:
            B, M, C = hidden.shape
            lh, lw = latent_hw
            hh = round(math.sqrt(M * lh / lw))
            if hh < 1 or M % hh:
                raise ValueError(
                    f"RepresentationHead: the block {self.block!r} gave {M} tokens, not a grid of the latent's "
                    f"aspect {lh}x{lw}; pick a block whose output holds the image tokens only (output_index)"
                )
            hidden = hidden.transpose(1, 2).reshape(B, C, hh, M // hh)
        elif hidden.dim() != 4:
            raise ValueError(
                f"RepresentationHead: the block {self.block!r} output must be (B, C, h, w) or (B, M, C), got "
                f"{tuple(hidden.shape)}"
            )
        if hidden.shape[1] != self.in_dim:
            raise ValueError(
                f"RepresentationHead: the block {self.block!r} output has {hidden.shape[1]} channels, the head "
                f"was built for in_dim={self.in_dim}"
            )
        h, w = hidden.shape[-2:]
        gh, gw = self.grid
        if (h, w) == (gh, gw):
            return hidden
        if h % gh == 0 and w % gw == 0:  # exact area pooling
            return F.avg_pool2d(hidden, (h // gh, w // gw))
        return F.interpolate(hidden, size=(gh, gw), mode="bilinear", align_corners=False)

    def forward(self, hidden: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """hidden: the block's output (module docstring) -> tokens (B, gh * gw, H) fp32."""
        x = self.to_grid(hidden.float(), latent_hw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C) raster order
        x = self.fc2(F.gelu(self.fc1(self.norm_in(x))))
        return self.norm_out(x)

    def extra_repr(self) -> str:
        return (
            f"block={self.block!r}, output_index={self.output_index}, grid={self.grid}, "
            f"prompt_dropout={self.prompt_dropout}, noise_range={self.noise_range}, source={self.source!r}"
        )
