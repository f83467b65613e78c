"""Fused bridge patch embedding: a vision tower fed with patch tokens the bridge already computed.

`ops.bridge(images, spec, patch_embed=(weight, bias))` returns conv2d(pixel_values, weight, bias, stride=p)
flattened to (B, N, D), without keeping the normalized image for the backward (a frozen conv still saves its
input, PyTorch issue 133566; with a frozen weight the input gradient needs only the weight). The critic
consumes those tokens by standing in for the tower's `patch_embedding` module for the duration of one forward
(`precomputed_patch_embedding`): the stand-in returns the tokens in the conv's output layout (B, D, gh, gw),
and transformers' own embedding code flattens them and adds the class token and the position embeddings as
it always does. The fused path is therefore the unfused one by construction; only the conv moves into the
bridge (the same conv2d, in images.dtype: bit-identical forward when images.dtype is the critic's dtype).

This is exact for a conv that is a linear map of each non-overlapping patch: an nn.Conv2d over 3 channels,
kernel == stride == (p, p), no padding, no dilation, one group (CLIP, SigLIP, Janus's SigLIP tower).
`find_patch_embedding` checks that and says why not otherwise. The stand-in mutates the HF model for one
forward (restored in `finally`): do not run the same model concurrently from another thread.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PatchSite = tuple[nn.Module, str, nn.Conv2d]  # (module owning the conv, its attribute name, the conv)


def conv_reasons(conv: nn.Module) -> list[str]:
    """Why `conv` is not a per-patch linear map the bridge can apply (empty when it is)."""
    if not isinstance(conv, nn.Conv2d):
        return [f"the patch embedding is a {type(conv).__name__}, not an nn.Conv2d"]
    reasons = []
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if conv.in_channels != 3:
        reasons.append(f"the patch embedding takes {conv.in_channels} channels, not 3 (RGB)")
    if k[0] != k[1]:
        reasons.append(f"the patch embedding kernel {k} is not square")
    if s != k:
        reasons.append(f"the patch embedding stride {s} differs from its kernel {k} (overlapping patches)")
    if conv.padding not in ((0, 0), "valid"):
        reasons.append(f"the patch embedding pads its input ({conv.padding})")
    if tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        reasons.append("the patch embedding is dilated or grouped")
    return reasons


def find_patch_embedding(tower: nn.Module) -> tuple[PatchSite | None, list[str]]:
    """The one conv patch embedding (a child module named `patch_embedding`) of a vision tower.

    Returns ((owner, name, conv), []) when the fused bridge can produce its output, else (None, reasons)."""
    sites = [
        (owner, name) for owner in tower.modules() for name in owner._modules if name == "patch_embedding"
    ]
    if len(sites) != 1:
        return None, [f"{type(tower).__name__} has {len(sites)} modules named `patch_embedding`, not one"]
    owner, name = sites[0]
    conv = owner._modules[name]
    reasons = conv_reasons(conv)
    return (None, reasons) if reasons else ((owner, name, conv), [])


class PrecomputedPatchEmbedding(nn.Module):
    """Stands in for a conv patch embedding: `forward(pixel_values)` ignores its input and returns the
    precomputed `tokens` (B, N, D) as the conv's output (B, D, gh, gw), in the conv weight's dtype (a view:
    transformers' `.flatten(2).transpose(1, 2)` gives the tokens back without a copy). `weight` / `bias` are
    the conv's (transformers reads `patch_embedding.weight.dtype`); `calls` counts the forwards."""

    def __init__(self, conv: nn.Conv2d, tokens: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.__dict__["conv"] = conv  # not registered: the stand-in owns no parameters
        self.tokens, self.grid, self.calls = tokens, grid, 0

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.tokens.to(self.weight.dtype).transpose(1, 2).unflatten(2, self.grid)


@contextlib.contextmanager
def precomputed_patch_embedding(site: PatchSite, tokens: torch.Tensor, grid: tuple[int, int]):
    """Within the block, the tower's conv patch embedding (`site` from `find_patch_embedding`) is a
    `PrecomputedPatchEmbedding` that returns `tokens` (B, gh * gw, D); the conv is put back on exit, on error
    too. Raises RuntimeError after the block when the tower did not call it exactly once (a transformers
    version whose embeddings bypass the module would otherwise silently ignore the tokens)."""
    owner, name, conv = site
    stand_in = PrecomputedPatchEmbedding(conv, tokens, grid)
    owner._modules[name] = stand_in
    try:
        yield stand_in
    finally:
        owner._modules[name] = conv
    if stand_in.calls != 1:
        raise RuntimeError(
            f"fused patch embedding: {type(owner).__name__}.{name} ran {stand_in.calls} times in one forward "
            "(expected once): this transformers version does not embed patches through that module; "
            "use fuse_patch_embed=False"
        )
