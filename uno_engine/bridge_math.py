"""Layout math of the bridge that the production torch path (`uno_engine.ops.bridge`) and the eager oracle
(`uno_engine.reference.bridge`) share: the padding fill and Qwen2-VL's patch layout and its inverse.

Reference: transformers `Qwen2VLImageProcessor._preprocess` (the patch reshape / transpose order).
"""

from __future__ import annotations

import torch


def fill_padding(r: torch.Tensor, region: tuple[int, int, int, int], fill: torch.Tensor) -> torch.Tensor:
    """r (B, 3, Hc, Wc) with the canvas outside `region` = (y0, y1, x0, x1) set to `fill` (1, 3, 1, 1), as
    r * inside + fill * (1 - inside), so the gradient of r is zero in the padding."""
    Hc, Wc = r.shape[-2:]
    y0, y1, x0, x1 = region
    if (y0, y1, x0, x1) == (0, Hc, 0, Wc):
        return r
    inside = torch.zeros(Hc, Wc, dtype=r.dtype, device=r.device)
    inside[y0:y1, x0:x1] = 1.0
    return r * inside + fill * (1.0 - inside)


def qwen2_vl_patchify(img: torch.Tensor, patch_size: int, merge_size: int, temporal: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*gh*gw, C*T*p*p) in Qwen2VLImageProcessor order: rows (gh/m, gw/m, m, m) per image,
    columns (C, T, p, p), the still image repeated T times."""
    B, C, H, W = img.shape
    p, m = patch_size, merge_size
    gh, gw = H // p, W // p
    x = img.reshape(B, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, mh, mw, C, ph, pw)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, p, p)
    return x.reshape(B * gh * gw, C * temporal * p * p)


def qwen2_vl_unpatchify_sum(
    g: torch.Tensor, B: int, H: int, W: int, patch_size: int, merge_size: int, temporal: int
) -> torch.Tensor:
    """The adjoint of `qwen2_vl_patchify`: (B*gh*gw, 3*T*p*p) -> (B, 3, H, W), summing the T temporal copies
    (the gradient of the repeated still image)."""
    p, m, T = patch_size, merge_size, temporal
    gh, gw = H // p, W // p
    g = g.reshape(B, gh // m, gw // m, m, m, 3, T, p, p).sum(6)  # (B, gh/m, gw/m, mh, mw, C, ph, pw)
    return g.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(B, 3, H, W)


# ------------------------------------------------------------------------------------- view noise
_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h in [0, 2^32), without leaving int64's range."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche) on int64 values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_normal(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Standard-normal-like noise (V, n) float32 from counters 0..n-1 under per-row keys (V, 2) int64 in
    [0, 2^32): for counter i, six hashes h_j = fmix32(fmix32((6 i + j) ^ key0) ^ key1) give twelve 16-bit
    uniforms, and eps = sum_j (hi16(h_j) + lo16(h_j) + 1) / 2^16 - 6 (Irwin-Hall: mean 0, variance 1 - 2^-32,
    bounded by +-6). Every step is integer or exact in float32 (the sum has at most 20 significant bits), so
    the Triton twin (`kernels.bridge_jit._hash_normal`) gives the same numbers, bit for bit."""
    ctr = torch.arange(n, device=keys.device, dtype=torch.int64) * 6
    k0, k1 = keys[:, 0:1], keys[:, 1:2]
    total = torch.zeros((keys.shape[0], n), dtype=torch.int64, device=keys.device)
    for j in range(6):
        h = _fmix32(_fmix32(((ctr + j) & _M32) ^ k0) ^ k1)
        total += (h >> 16) + (h & 0xFFFF) + 1
    return total.to(torch.float32) * (1.0 / 65536.0) - 6.0
