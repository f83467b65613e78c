"""Helpers shared by the critic family adapters (no adapter imports another adapter's module)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["find_layers", "packed_caption_mask"]


def find_layers(module: nn.Module, names=("layers", "blocks")) -> nn.ModuleList:
    """The first non-empty ModuleList called `layers` / `blocks` under `module` (encoder or decoder layers),
    in `named_modules` order. Raises ValueError naming the module's class when there is none."""
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in names and len(m) > 0:
            return m
    raise ValueError(f"no encoder/decoder layer list found in {type(module).__name__}")


def packed_caption_mask(P: int, blocks: int, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (B, 1, T, T) of [prefix (P), caption 1 (L), ..., caption `blocks` (L)],
    T = P + blocks L: the layout of hard-negative captions packed after one image prefix. keys (B, blocks L):
    1 real token / 0 padding. 0 where allowed, finfo(dtype).min where masked: prefix rows are causal; caption
    j's rows see the whole prefix and, causally, caption j's real tokens only. (B, T, T) memory: this is
    for short captions (T of a few hundred)."""
    B, device = keys.shape[0], keys.device
    T = P + keys.shape[1]
    L = keys.shape[1] // blocks
    block = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, blocks + 1).repeat_interleave(L)])
    block, idx = block.to(device), torch.arange(T, device=device)
    allowed = (idx[None, :] <= idx[:, None]) & ((block[None, :] == 0) | (block[None, :] == block[:, None]))
    real = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), keys > 0], dim=1)
    allowed = allowed[None] & real[:, None, :]  # (B, T, T): query row x key column
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
