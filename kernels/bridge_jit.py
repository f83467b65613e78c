"""Jit helpers shared by the bridge's two-pass kernels (`bridge_two_pass.py`) and fused kernels
(`bridge_fused.py`): one definition of each step both families run, so that both compute the same values.

- `_clamp01`: the [0, 1] clip of the processor's uint8 path. Written as selects, so a NaN stays NaN (Triton's
  `tl.minimum` / `tl.maximum` default to dropping NaN on the GPU: a NaN pixel would come out finite), as
  `torch.clamp` does.
- `_outside01`: where a value is not inside [0, 1] (NaN included): the input-clamp flag and masks.
- `_read_u`: image values -> u = clamp((x - lo) / (hi - lo), 0, 1) and the out-of-range flag.
- `_qwen_offset`: the offset of a canvas pixel in Qwen2-VL's flattened patch rows.
- `_store_critic_input`: the last forward pass's epilogue (padding fill, scale and shift, output layout).
- `_load_grad_out`: grad_out at canvas pixels (layout undone, temporal copies summed, second-pass mask).
- `_grad_images_epilogue`: the last backward pass's epilogue (input normalization factor, input-clamp mask).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _clamp01(v):
    """clip(v, 0, 1), NaN kept (selects: every comparison with NaN is false)."""
    return tl.where(v < 0.0, 0.0, tl.where(v > 1.0, 1.0, v))


@triton.jit
def _outside01(v, ok):
    """int32 1 where `ok` and v is not inside [0, 1] (below, above or NaN), else 0."""
    return (ok & ~((v >= 0.0) & (v <= 1.0))).to(tl.int32)


@triton.jit
def _qwen_offset(sy, sx, b, c, Hc, gw, patch, merge, TEMPORAL: tl.constexpr):
    """Offset of canvas pixel (sy, sx) of plane (b, c) in Qwen2-VL's flattened patches (temporal copy 0; copy
    tt is at + tt * patch * patch): rows in merge-window order, columns (channel, temporal, patch row, col)."""
    gy = sy // patch
    gx = sx // patch
    row = (gy // merge) * (gw // merge) + gx // merge
    row = row * (merge * merge) + (gy % merge) * merge + gx % merge
    row = b * ((Hc // patch) * gw) + row
    pp = patch * patch
    return row.to(tl.int64) * (3 * TEMPORAL * pp) + c * TEMPORAL * pp + (sy % patch) * patch + sx % patch


@triton.jit
def _load_grad_out(
    g_ptr, m2_ptr, sy, sx, ok, b, c, plane, Hc, Wc, gw, patch, merge,
    QWEN: tl.constexpr, TEMPORAL: tl.constexpr, USE_MASKS: tl.constexpr, CLIP: tl.constexpr,
):  # fmt: skip
    """grad_out at canvas pixels (sy, sx) of plane (b, c), fp32: read from the output layout (Qwen2-VL's
    temporal copies summed), zero where not `ok` (outside the canvas or in the padding) and, with the clip
    masks, where the second pass clipped."""
    if QWEN:
        gbase = _qwen_offset(sy, sx, b, c, Hc, gw, patch, merge, TEMPORAL)
        g = tl.zeros(sy.shape, dtype=tl.float32)
        for tt in tl.static_range(TEMPORAL):
            g += tl.load(g_ptr + gbase + tt * patch * patch, mask=ok, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + plane * Hc * Wc + sy.to(tl.int64) * Wc + sx, mask=ok, other=0.0).to(tl.float32)
    if USE_MASKS:
        if CLIP:
            m2 = tl.load(m2_ptr + plane * Hc * Wc + sy.to(tl.int64) * Wc + sx, mask=ok, other=0)
            g = tl.where(m2 != 0, g, 0.0)
    return g


@triton.jit
def _grad_images_epilogue(
    acc, x_ptr, flag_ptr, plane, b, c, rows, cols, ok2,
    stride_xb, stride_xc, stride_xh, stride_xw, lo, inv_range, USE_MASKS: tl.constexpr,
):  # fmt: skip
    """The last transposed pass's epilogue: the input normalization's factor, and zero gradient where the
    input clamp saturated (the images are read only in planes whose flag the forward set)."""
    acc = acc * inv_range
    if USE_MASKS:
        flag = tl.load(flag_ptr + plane)
        if flag != 0:  # some pixel of this plane was clamped: zero its gradient there
            xv = tl.load(
                x_ptr
                + b * stride_xb
                + c * stride_xc
                + rows.to(tl.int64)[:, None] * stride_xh
                + cols[None, :] * stride_xw,
                mask=ok2,
                other=0.0,
            ).to(tl.float32)
            u = (xv - lo) * inv_range
            acc = tl.where((u >= 0.0) & (u <= 1.0), acc, 0.0)
    return acc


@triton.jit
def _store_critic_input(
    out_ptr, acc, rows, cols, ok2, b, c, consts_ptr, Hc, Wc,
    reg_y0, reg_y1, reg_x0, reg_x1, gw, patch, merge,
    QWEN: tl.constexpr, TEMPORAL: tl.constexpr,
):  # fmt: skip
    """The last pass's epilogue: padding fill outside the image rectangle, per-channel scale and shift (rescale
    and normalize), and the store in the spec's layout (NCHW, or Qwen2-VL's patch rows with T temporal
    copies). acc: (rows, cols) of canvas plane (b, c), clipped."""
    scale = tl.load(consts_ptr + c * 3)
    shift = tl.load(consts_ptr + c * 3 + 1)
    fill = tl.load(consts_ptr + c * 3 + 2)
    ry = rows[:, None]
    rx = cols[None, :]
    inside = (ry >= reg_y0) & (ry < reg_y1) & (rx >= reg_x0) & (rx < reg_x1)
    val = (tl.where(inside, acc, fill) * scale + shift).to(out_ptr.dtype.element_ty)
    if QWEN:
        obase = _qwen_offset(ry, rx, b, c, Hc, gw, patch, merge, TEMPORAL)
        for tt in tl.static_range(TEMPORAL):
            tl.store(out_ptr + obase + tt * patch * patch, val, mask=ok2)
    else:
        off = (b * 3 + c) * Hc * Wc + ry.to(tl.int64) * Wc + rx
        tl.store(out_ptr + off, val, mask=ok2)


@triton.jit
def _read_u(ptr, ok, lo, inv_range, bad, STORE_MASK: tl.constexpr):
    """Image values at `ptr` (0 where not `ok`) -> (u = clamp((x - lo) / (hi - lo), 0, 1) in fp32, `bad` raised
    where an `ok` value lies outside input_range (STORE_MASK))."""
    u = (tl.load(ptr, mask=ok, other=0.0).to(tl.float32) - lo) * inv_range
    if STORE_MASK:
        bad = tl.maximum(bad, _outside01(u, ok))
    return _clamp01(u), bad


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping multiplies), as `bridge_math._fmix32`."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _hash_normal(n, k0, k1):
    """The views' noise at counters n (any int shape) under the view's keys k0, k1 (uint32): Irwin-Hall of
    twelve 16-bit uniforms from six counter hashes, exact in fp32, so equal bit for bit to
    `uno_engine.bridge_math.hash_normal` (which documents the construction)."""
    ctr = n.to(tl.uint32) * 6
    total = tl.zeros(n.shape, dtype=tl.uint32)
    for j in tl.static_range(6):
        h = _fmix32(_fmix32((ctr + j) ^ k0) ^ k1)
        total += (h >> 16) + (h & 0xFFFF) + 1
    return total.to(tl.float32) * (1.0 / 65536.0) - 6.0
