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


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche) on int32 tensors holding uint32 bits:
    multiplies wrap mod 2^32 (two's complement), right shifts are made logical by masking."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _i32(0x85EBCA6B)
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _i32(0xC2B2AE35)
    return h ^ ((h >> 16) & 0xFFFF)


def hash_normal(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Standard-normal-like noise (V, n) float32 from counters 0..n-1 under per-row keys (V, 2) int64 in
    [0, 2^32): for counter i, six hashes h_j = fmix32(fmix32((6 i + j) ^ key0) ^ key1) give twelve 16-bit
    uniforms, and eps = sum_j (hi16(h_j) + lo16(h_j) + 1) / 2^16 - 6 (Irwin-Hall: mean 0, variance 1 - 2^-32,
    bounded by +-6). Every step is integer or exact in float32 (the sum has at most 20 significant bits), so
    the Triton twin (`kernels.bridge_jit._hash_normal`) gives the same numbers, bit for bit. Computed in int32
    (uint32 bits); n * 6 must stay below 2^31."""
    if 6 * n >= 1 << 31:
        raise ValueError(f"hash_normal: n = {n} counters exceed the 32-bit counter range (n * 6 < 2^31)")
    k = torch.where(keys >= 1 << 31, keys - (1 << 32), keys).to(torch.int32)
    out = torch.empty((keys.shape[0], n), dtype=torch.float32, device=keys.device)
    # chunks of about 2^18 counters: the int32 temporaries stay in cache on the CPU (the cost is then linear in
    # the number of views; one (V, n) pass was 1.5x slower per view at V = 16 on the CPU)
    cols = min(n, 1 << 18)
    rows = max(1, (1 << 18) // max(cols, 1)) if keys.device.type == "cpu" else keys.shape[0]
    cols = cols if keys.device.type == "cpu" else n
    for r0 in range(0, keys.shape[0], rows):
        k0, k1 = k[r0 : r0 + rows, 0:1], k[r0 : r0 + rows, 1:2]
        for c0 in range(0, n, max(cols, 1)):
            ctr = torch.arange(c0, min(c0 + cols, n), device=keys.device, dtype=torch.int32) * 6
            total = torch.zeros((k0.shape[0], ctr.shape[0]), dtype=torch.int32, device=keys.device)
            for j in range(6):
                h = _fmix32(_fmix32((ctr + j) ^ k0) ^ k1)
                total += ((h >> 16) & 0xFFFF) + (h & 0xFFFF) + 1
            out[r0 : r0 + rows, c0 : c0 + ctr.shape[0]] = total.to(torch.float32) * (1.0 / 65536.0) - 6.0
    return out
