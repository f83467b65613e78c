"""Image -> critic bridge: separable Pillow resampling + clamp + pad/crop + normalize + patch layout.

Math (per image b and channel c; u = clamp((x - lo) / (hi - lo), 0, 1) is the processor's uint8 value / 255):
    t = clip(u @ Wx^T)          (H, Wc)   horizontal pass (Pillow's first for most shapes)
    r = clip(Wy @ t)            (Hc, Wc)  vertical pass
    out = where(inside, r, fill) * scale_c + shift_c, stored in the spec's layout (NCHW or Qwen2-VL patches)
Wy (Hc, H) and Wx (Wc, W) are the banded Pillow weight matrices on the output canvas (zero rows = padding).
When Pillow runs the vertical pass first (`BridgeSpec.vertical_first`), t = clip(Wy @ u) is (Hc, W).

Kernels. Each resampling pass is one launch of a tap kernel: every output element is a short weighted sum of
K consecutive source elements along the pass's axis (K = the widest filter support, ~4 * scale + 1 taps for a
bicubic downscale), read as K gathered loads of the program's source band (L1/L2 hits after the first) and
accumulated with fp32 FMAs in a fixed order. So the result is exact fp32 (no tensor-core rounding) and
deterministic, and the work is O(K) per output instead of the O(band) of a dense banded matmul.

- `_resample_fwd_kernel`, launched twice: pass 1 reads the images once (any strides and float dtype; input
  normalization and clamp fused) and writes the fp32 intermediate t; pass 2 reads t once and writes the critic
  input once, with the second clip, padding fill, normalization and the output layout fused in. When a
  backward will need them, pass 1 and pass 2 write their clip masks (one uint8 per element of t and of the
  canvas), and pass 1 raises a per-plane flag (int32, atomic max) when any pixel lies outside input_range.
- `_resample_bwd_kernel`, launched twice: the transposed passes, as gathers over the transposed tap tables
  (for each source index: the first output index that reads it, and the weights), so there are no atomics and
  two runs are bit-identical. Pass 2^T reads grad_out once (in the output layout, summing Qwen2-VL's temporal
  copies) with the second-pass mask and writes the fp32 gradient of t; pass 1^T reads it once and writes
  grad_images once. It reads the images (for the input-clamp mask) only in planes whose flag is set, so for
  images inside input_range the backward never touches them.

- `_fused_fwd_kernel` / `_fused_bwd_kernel` (opt-in: UNO_BRIDGE_FORWARD=fused | fused_loads,
  UNO_BRIDGE_BACKWARD=fused): both passes of a direction in one launch. A program reads the band its tile
  needs once (forward: the source pixels of a canvas tile; backward: the grad_out rows and columns an image
  tile receives from), runs the first pass on it in registers and gathers the second pass from that with
  `tl.gather` (Triton's register gather, staged through shared memory where it crosses warps), so the
  intermediate never goes to memory. Tiles are powers of two sized from the exact band widths `tap_tables`
  measures (S{axis}{n}). Same taps, same order, same values as the two passes, and the same side outputs
  (tested bit for bit under the interpreter, both directions, every layout). Not yet measured on a GPU.

Memory traffic, 8x3x1024x1024 fp32 -> 384 (Janus): forward reads 100.7 MB and writes 14.2 MB plus the
intermediate t (37.7 MB written and read back; in L2 in part); backward the same in reverse. So the two-pass
design moves 1.66x the bytes the issue counts (input once, output once): at best 60% of copy bandwidth by
that count at Janus (58% at SigLIP), below the issue's 80% whatever the kernels do. Measured on an H200
(benchmarks/results/GPU_RUNS.md): the passes are bound by the latency of their gathers, not by DRAM
(0.168 ms GPU time forward, 27% of the two-pass floor). A fused variant with a dense band `tl.dot` (tf32x3)
for one pass measured slower (0.68 / 0.23 ms against 0.17 / 0.16 ms) and was dropped.

References: Pillow `Resample.c` (`precompute_coeffs`, two-pass order, 8-bit clip), transformers image
processors (crop/pad/patch order).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _resample_fwd_kernel(
    out_ptr,  # FINAL: the critic input ((B, 3, Hc, Wc) or (B*gh*gw, 3*T*p*p)); else t (P, R_out, C_out) fp32
    m_ptr,  # uint8 clip mask of this pass, (P, R_out, C_out) (written if STORE_MASK and CLIP)
    flag_ptr,  # int32 (P,): set to 1 if a pixel of the plane is outside input_range (FIRST and STORE_MASK)
    in_ptr,  # FIRST: images (B, 3, H, W), any strides, any float dtype; else t (P, R_in, C_in) fp32
    start_ptr,  # (n_out,) int32: first source index along AXIS of each output index along AXIS
    w_ptr,  # (n_out, K) fp32: tap weights (zero padded)
    consts_ptr,  # (3, 3) fp32: per channel [scale, shift, fill] (FINAL)
    stride_ib,
    stride_ic,
    stride_ir,
    stride_icol,  # input strides (batch, channel, row, col)
    R_in,
    C_in,  # input plane size
    R_out,
    C_out,  # output plane size (the canvas Hc, Wc when FINAL)
    K,  # taps
    reg_y0,
    reg_y1,
    reg_x0,
    reg_x1,  # canvas rectangle that shows the image (FINAL)
    lo,
    inv_range,  # u = (x - lo) * inv_range (FIRST)
    gw,
    patch,
    merge,  # qwen2_vl layout: grid width, patch size, merge size (FINAL and QWEN)
    AXIS: tl.constexpr,  # 0: resample rows (vertical pass), 1: resample columns (horizontal pass)
    FIRST: tl.constexpr,
    FINAL: tl.constexpr,
    CLIP: tl.constexpr,
    STORE_MASK: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)  # b * 3 + c
    b = plane // 3
    c = plane % 3
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R_out
    c_ok = cols < C_out
    base = in_ptr + b * stride_ib + c * stride_ic
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    bad = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    if AXIS == 1:
        start = tl.load(start_ptr + cols, mask=c_ok, other=0)
        row_off = rows.to(tl.int64)[:, None] * stride_ir
        for k in range(K):
            w = tl.load(w_ptr + cols * K + k, mask=c_ok, other=0.0)
            src = start + k
            ok = r_ok[:, None] & (c_ok & (src < C_in))[None, :]
            v = tl.load(base + row_off + src[None, :] * stride_icol, mask=ok, other=0.0).to(tl.float32)
            if FIRST:
                v = (v - lo) * inv_range
                if STORE_MASK:
                    bad = tl.maximum(bad, (ok & ((v < 0.0) | (v > 1.0))).to(tl.int32))
                v = tl.minimum(tl.maximum(v, 0.0), 1.0)
            acc += w[None, :] * v
    else:
        start = tl.load(start_ptr + rows, mask=r_ok, other=0)
        for k in range(K):
            w = tl.load(w_ptr + rows * K + k, mask=r_ok, other=0.0)
            src = start + k
            ok = (r_ok & (src < R_in))[:, None] & c_ok[None, :]
            v = tl.load(
                base + src.to(tl.int64)[:, None] * stride_ir + cols[None, :] * stride_icol, mask=ok, other=0.0
            ).to(tl.float32)
            if FIRST:
                v = (v - lo) * inv_range
                if STORE_MASK:
                    bad = tl.maximum(bad, (ok & ((v < 0.0) | (v > 1.0))).to(tl.int32))
                v = tl.minimum(tl.maximum(v, 0.0), 1.0)
            acc += w[:, None] * v
    if FIRST:
        if STORE_MASK:
            any_bad = tl.max(tl.max(bad, axis=1), axis=0)
            if any_bad > 0:
                tl.atomic_max(flag_ptr + plane, any_bad)

    ok2 = r_ok[:, None] & c_ok[None, :]
    off = plane * R_out * C_out + rows.to(tl.int64)[:, None] * C_out + cols[None, :]
    if CLIP:
        if STORE_MASK:
            tl.store(m_ptr + off, ((acc >= 0.0) & (acc <= 1.0)).to(tl.uint8), mask=ok2)
        acc = tl.minimum(tl.maximum(acc, 0.0), 1.0)
    if FINAL:
        _store_critic_input(
            out_ptr, acc, rows, cols, ok2, b, c, consts_ptr, R_out, C_out,
            reg_y0, reg_y1, reg_x0, reg_x1, gw, patch, merge, QWEN, TEMPORAL,
        )  # fmt: skip
    else:
        tl.store(out_ptr + off, acc, mask=ok2)


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
        bad = tl.maximum(bad, (ok & ((u < 0.0) | (u > 1.0))).to(tl.int32))
    return tl.minimum(tl.maximum(u, 0.0), 1.0), bad


@triton.jit
def _fused_fwd_kernel(
    out_ptr,  # the critic input ((B, 3, Hc, Wc) or (B*gh*gw, 3*T*p*p))
    m1_ptr,  # uint8 first-pass clip mask on t, (P, H, Wc) or (P, Hc, W) when VF (STORE_MASK and CLIP)
    m2_ptr,  # uint8 second-pass clip mask on the canvas, (P, Hc, Wc) (STORE_MASK and CLIP)
    flag_ptr,  # int32 (P,): set to 1 if a pixel the plane's bands read is outside input_range (STORE_MASK)
    in_ptr,  # images (B, 3, H, W), any strides, any float dtype
    ys_ptr,  # (Hc,) int32 first source row of each canvas row; wy_ptr (Hc, KY) fp32 weights
    wy_ptr,
    xs_ptr,  # (Wc,) int32 first source column of each canvas column; wx_ptr (Wc, KX) fp32 weights
    wx_ptr,
    consts_ptr,  # (3, 3) fp32: per channel [scale, shift, fill]
    stride_ib, stride_ic, stride_ir, stride_icol,
    H, W, Hc, Wc, KY, KX,
    TM, TN,  # canvas rows / columns per program (<= BM / BN; their source band fits KH x KW)
    reg_y0, reg_y1, reg_x0, reg_x1,
    lo, inv_range, gw, patch, merge,
    VF: tl.constexpr,  # Pillow runs the vertical pass first
    CLIP: tl.constexpr,
    STORE_MASK: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    GATHER1: tl.constexpr,  # first pass from the loaded source band (tl.gather) or by gathered loads
    BM: tl.constexpr, BN: tl.constexpr,  # canvas tile
    KH: tl.constexpr, KW: tl.constexpr,  # its source band: rows ys[i0] + [0, KH), columns xs[j0] + [0, KW)
):  # fmt: skip
    """Both resampling passes in one launch, no intermediate in memory. Each program reads the source band of a
    TM x TN canvas tile once (halo rows / columns of neighbouring tiles come from L2), runs the first pass on
    it in registers, clips, and gathers the second pass from that result with `tl.gather`. Same taps, same
    order, same fp32 FMAs as the two-pass kernels, so the same values. With STORE_MASK it writes the same
    side outputs: the canvas mask, the first-pass mask of the rows (VF: columns) between this tile's first
    start and the next tile's (so each element once; the host zeroes what no tile owns: never read), and the
    per-plane clamp flag."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)
    b = plane // 3
    c = plane % 3
    lm = tl.arange(0, BM)
    ln = tl.arange(0, BN)
    rows = pid_m * TM + lm  # canvas rows and columns of this tile
    cols = pid_n * TN + ln
    i_ok = (lm < TM) & (rows < Hc)
    j_ok = (ln < TN) & (cols < Wc)
    y0 = tl.load(ys_ptr + pid_m * TM)
    x0 = tl.load(xs_ptr + pid_n * TN)
    ys = tl.load(ys_ptr + rows, mask=i_ok, other=0)
    xs = tl.load(xs_ptr + cols, mask=j_ok, other=0)
    base = in_ptr + b * stride_ib + c * stride_ic
    sr = y0 + tl.arange(0, KH)  # source rows and columns of the band
    sc = x0 + tl.arange(0, KW)
    bad = 0
    if GATHER1:  # the band, up to the last start + K (what the taps read)
        ok = (sr < tl.minimum(H, tl.max(ys, axis=0) + KY))[:, None] & (
            sc < tl.minimum(W, tl.max(xs, axis=0) + KX)
        )[None, :]
        u, bad = _read_u(
            base + sr.to(tl.int64)[:, None] * stride_ir + sc[None, :] * stride_icol,
            ok,
            lo,
            inv_range,
            bad,
            STORE_MASK,
        )
    if VF:
        # pass 1 along y: t (BM canvas rows, KW source columns)
        t = tl.zeros((BM, KW), dtype=tl.float32)
        if not GATHER1:  # loop-carried: a block from the start
            bad = tl.zeros((BM, KW), dtype=tl.int32)
        for k in range(KY):
            w = tl.load(wy_ptr + rows * KY + k, mask=i_ok, other=0.0)
            if GATHER1:
                rel = tl.minimum(tl.maximum(ys - y0 + k, 0), KH - 1)  # masked lanes: 0
                v = tl.gather(u, tl.broadcast_to(rel[:, None], (BM, KW)), axis=0)
            else:
                src = ys + k
                ok = (i_ok & (src < H))[:, None] & (sc < W)[None, :]
                v, bad = _read_u(
                    base + src.to(tl.int64)[:, None] * stride_ir + sc[None, :] * stride_icol,
                    ok,
                    lo,
                    inv_range,
                    bad,
                    STORE_MASK,
                )
            t += w[:, None] * v
        if CLIP:
            if STORE_MASK:  # owned columns: [x0, next tile's x0) (the first tile from 0, the last to W)
                lo_c = tl.where(pid_n == 0, 0, x0)
                nxt = (pid_n + 1) * TN
                hi_c = tl.where(nxt < Wc, tl.load(xs_ptr + tl.minimum(nxt, Wc - 1)), W)
                own = i_ok[:, None] & ((sc >= lo_c) & (sc < hi_c) & (sc < W))[None, :]
                off1 = plane * Hc * W + rows.to(tl.int64)[:, None] * W + sc[None, :]
                tl.store(m1_ptr + off1, ((t >= 0.0) & (t <= 1.0)).to(tl.uint8), mask=own)
            t = tl.minimum(tl.maximum(t, 0.0), 1.0)
        # pass 2 along x from t
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(KX):
            w = tl.load(wx_ptr + cols * KX + k, mask=j_ok, other=0.0)
            rel = tl.minimum(tl.maximum(xs - x0 + k, 0), KW - 1)  # masked lanes: 0
            acc += w[None, :] * tl.gather(t, tl.broadcast_to(rel[None, :], (BM, BN)), axis=1)
    else:
        # pass 1 along x: t (KH source rows, BN canvas columns)
        t = tl.zeros((KH, BN), dtype=tl.float32)
        if not GATHER1:  # loop-carried: a block from the start
            bad = tl.zeros((KH, BN), dtype=tl.int32)
        for k in range(KX):
            w = tl.load(wx_ptr + cols * KX + k, mask=j_ok, other=0.0)
            if GATHER1:
                rel = tl.minimum(tl.maximum(xs - x0 + k, 0), KW - 1)  # masked lanes: 0
                v = tl.gather(u, tl.broadcast_to(rel[None, :], (KH, BN)), axis=1)
            else:
                src = xs + k
                ok = (sr < H)[:, None] & (j_ok & (src < W))[None, :]
                v, bad = _read_u(
                    base + sr.to(tl.int64)[:, None] * stride_ir + src[None, :] * stride_icol,
                    ok,
                    lo,
                    inv_range,
                    bad,
                    STORE_MASK,
                )
            t += w[None, :] * v
        if CLIP:
            if STORE_MASK:  # owned rows: [y0, next tile's y0) (the first tile from 0, the last to H)
                lo_r = tl.where(pid_m == 0, 0, y0)
                nxt = (pid_m + 1) * TM
                hi_r = tl.where(nxt < Hc, tl.load(ys_ptr + tl.minimum(nxt, Hc - 1)), H)
                own = ((sr >= lo_r) & (sr < hi_r) & (sr < H))[:, None] & j_ok[None, :]
                off1 = plane * H * Wc + sr.to(tl.int64)[:, None] * Wc + cols[None, :]
                tl.store(m1_ptr + off1, ((t >= 0.0) & (t <= 1.0)).to(tl.uint8), mask=own)
            t = tl.minimum(tl.maximum(t, 0.0), 1.0)
        # pass 2 along y from t
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(KY):
            w = tl.load(wy_ptr + rows * KY + k, mask=i_ok, other=0.0)
            rel = tl.minimum(tl.maximum(ys - y0 + k, 0), KH - 1)  # masked lanes: 0
            acc += w[:, None] * tl.gather(t, tl.broadcast_to(rel[:, None], (BM, BN)), axis=0)
    if STORE_MASK:
        any_bad = tl.max(tl.max(bad, axis=1), axis=0)
        if any_bad > 0:
            tl.atomic_max(flag_ptr + plane, any_bad)
    ok2 = i_ok[:, None] & j_ok[None, :]
    if CLIP:
        if STORE_MASK:
            off2 = plane * Hc * Wc + rows.to(tl.int64)[:, None] * Wc + cols[None, :]
            tl.store(m2_ptr + off2, ((acc >= 0.0) & (acc <= 1.0)).to(tl.uint8), mask=ok2)
        acc = tl.minimum(tl.maximum(acc, 0.0), 1.0)
    _store_critic_input(
        out_ptr, acc, rows, cols, ok2, b, c, consts_ptr, Hc, Wc,
        reg_y0, reg_y1, reg_x0, reg_x1, gw, patch, merge, QWEN, TEMPORAL,
    )  # fmt: skip


@triton.jit
def _resample_bwd_kernel(
    out_ptr,  # LAST: grad_images (B, 3, H, W) contiguous, images dtype; else grad of t (P, R_out, C_out) fp32
    in_ptr,  # FIRST: grad_out in the output layout (contiguous); else grad of t (P, R_in, C_in) fp32
    m_in_ptr,  # FIRST: uint8 second-pass clip mask on the canvas (P, R_in, C_in) (USE_MASKS and CLIP)
    m_out_ptr,  # not LAST: uint8 first-pass clip mask (P, R_out, C_out) (USE_MASKS and CLIP)
    flag_ptr,  # LAST: int32 (P,) per-plane input-clamp flags (USE_MASKS)
    x_ptr,  # LAST: images (B, 3, H, W), any strides (read only in flagged planes)
    start_ptr,  # (n_out,) int32: first source (output-side) index that reads each index along AXIS
    w_ptr,  # (n_out, K) fp32: transposed tap weights (zero padded)
    consts_ptr,  # (3, 3) fp32: per channel [scale, shift, fill] (FIRST)
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,  # image strides (LAST)
    R_in,
    C_in,  # source plane size (the canvas when FIRST)
    R_out,
    C_out,  # result plane size (H, W when LAST)
    K,  # taps
    reg_y0,
    reg_y1,
    reg_x0,
    reg_x1,
    lo,
    inv_range,
    gw,
    patch,
    merge,
    AXIS: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    USE_MASKS: tl.constexpr,
    CLIP: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)
    b = plane // 3
    c = plane % 3
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R_out
    c_ok = cols < C_out
    zero = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if AXIS == 1:
        start = tl.load(start_ptr + cols, mask=c_ok, other=0)
    else:
        start = tl.load(start_ptr + rows, mask=r_ok, other=0)
    for k in range(K):
        if AXIS == 1:
            w = tl.load(w_ptr + cols * K + k, mask=c_ok, other=0.0)[None, :]
            src = start + k
            sy = rows[:, None] + zero
            sx = src[None, :] + zero
            ok = r_ok[:, None] & (c_ok & (src < C_in))[None, :]
        else:
            w = tl.load(w_ptr + rows * K + k, mask=r_ok, other=0.0)[:, None]
            src = start + k
            sy = src[:, None] + zero
            sx = cols[None, :] + zero
            ok = (r_ok & (src < R_in))[:, None] & c_ok[None, :]
        if FIRST:
            ok = ok & (sy >= reg_y0) & (sy < reg_y1) & (sx >= reg_x0) & (sx < reg_x1)  # padding has no grad
            g = _load_grad_out(
                in_ptr, m_in_ptr, sy, sx, ok, b, c, plane, R_in, C_in, gw, patch, merge,
                QWEN, TEMPORAL, USE_MASKS, CLIP,
            )  # fmt: skip
        else:
            g = tl.load(in_ptr + plane * R_in * C_in + sy.to(tl.int64) * C_in + sx, mask=ok, other=0.0)
        acc += w * g

    ok2 = r_ok[:, None] & c_ok[None, :]
    off = plane * R_out * C_out + rows.to(tl.int64)[:, None] * C_out + cols[None, :]
    if FIRST:
        acc = acc * tl.load(consts_ptr + c * 3)
    if LAST:
        acc = _grad_images_epilogue(
            acc, x_ptr, flag_ptr, plane, b, c, rows, cols, ok2,
            stride_xb, stride_xc, stride_xh, stride_xw, lo, inv_range, USE_MASKS,
        )  # fmt: skip
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=ok2)
    else:
        if USE_MASKS:
            if CLIP:
                m1 = tl.load(m_out_ptr + off, mask=ok2, other=0)
                acc = tl.where(m1 != 0, acc, 0.0)
        tl.store(out_ptr + off, acc, mask=ok2)


@triton.jit
def _fused_bwd_kernel(
    gx_ptr,  # grad_images (B, 3, H, W) contiguous, images dtype
    g_ptr,  # grad_out in the output layout (contiguous)
    m1_ptr,  # uint8 first-pass clip mask, (P, H, Wc) or (P, Hc, W) when VF (USE_MASKS and CLIP)
    m2_ptr,  # uint8 second-pass clip mask on the canvas (P, Hc, Wc) (USE_MASKS and CLIP)
    flag_ptr,  # int32 (P,) per-plane input-clamp flags (USE_MASKS)
    x_ptr,  # images (B, 3, H, W), any strides (read only in flagged planes)
    oys_ptr,  # (H,) int32 first canvas row that reads each image row; wyT_ptr (H, KTY) fp32 weights
    wyT_ptr,
    oxs_ptr,  # (W,) int32 first canvas column that reads each image column; wxT_ptr (W, KTX) fp32 weights
    wxT_ptr,
    consts_ptr,  # (3, 3) fp32: per channel [scale, shift, fill]
    stride_xb, stride_xc, stride_xh, stride_xw,
    H, W, Hc, Wc, KTY, KTX,
    reg_y0, reg_y1, reg_x0, reg_x1,
    lo, inv_range, gw, patch, merge,
    VF: tl.constexpr,
    USE_MASKS: tl.constexpr,
    CLIP: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,  # image tile
    KH: tl.constexpr, KW: tl.constexpr,  # its canvas band: rows oys[i0] + [0, KH), columns oxs[j0] + [0, KW)
):  # fmt: skip
    """Both transposed passes in one launch: each program loads the canvas band of grad_out its BM x BN image
    tile needs (the layout undone, masks and padding applied), runs the transposed second pass on it in
    registers, applies the first-pass mask, gathers the transposed first pass from that with `tl.gather`,
    and writes its grad_images tile once. Gathers only, no atomics: deterministic; same taps and order as
    the two transposed passes, so the same values."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)
    b = plane // 3
    c = plane % 3
    rows = pid_m * BM + tl.arange(0, BM)  # image rows and columns of this tile
    cols = pid_n * BN + tl.arange(0, BN)
    i_ok = rows < H
    j_ok = cols < W
    y0 = tl.load(oys_ptr + pid_m * BM)
    x0 = tl.load(oxs_ptr + pid_n * BN)
    oy = tl.load(oys_ptr + rows, mask=i_ok, other=0)
    ox = tl.load(oxs_ptr + cols, mask=j_ok, other=0)
    cr = y0 + tl.arange(0, KH)  # canvas rows and columns of the band
    cc = x0 + tl.arange(0, KW)
    sy = cr[:, None] + tl.zeros((KH, KW), dtype=tl.int32)
    sx = cc[None, :] + tl.zeros((KH, KW), dtype=tl.int32)
    ok = (sy < Hc) & (sx < Wc) & (sy >= reg_y0) & (sy < reg_y1) & (sx >= reg_x0) & (sx < reg_x1)
    g = _load_grad_out(
        g_ptr, m2_ptr, sy, sx, ok, b, c, plane, Hc, Wc, gw, patch, merge, QWEN, TEMPORAL, USE_MASKS, CLIP
    )
    scale = tl.load(consts_ptr + c * 3)
    if VF:
        # undo pass 2 (along x): gt (KH canvas rows, BN image columns)
        gt = tl.zeros((KH, BN), dtype=tl.float32)
        for k in range(KTX):
            w = tl.load(wxT_ptr + cols * KTX + k, mask=j_ok, other=0.0)
            rel = tl.minimum(tl.maximum(ox - x0 + k, 0), KW - 1)  # masked lanes: 0
            gt += w[None, :] * tl.gather(g, tl.broadcast_to(rel[None, :], (KH, BN)), axis=1)
        gt = gt * scale
        if USE_MASKS:
            if CLIP:
                ok1 = (cr < Hc)[:, None] & j_ok[None, :]
                m1 = tl.load(
                    m1_ptr + plane * Hc * W + cr.to(tl.int64)[:, None] * W + cols[None, :], mask=ok1, other=0
                )
                gt = tl.where(m1 != 0, gt, 0.0)
        # undo pass 1 (along y)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(KTY):
            w = tl.load(wyT_ptr + rows * KTY + k, mask=i_ok, other=0.0)
            rel = tl.minimum(tl.maximum(oy - y0 + k, 0), KH - 1)  # masked lanes: 0
            acc += w[:, None] * tl.gather(gt, tl.broadcast_to(rel[:, None], (BM, BN)), axis=0)
    else:
        # undo pass 2 (along y): gt (BM image rows, KW canvas columns)
        gt = tl.zeros((BM, KW), dtype=tl.float32)
        for k in range(KTY):
            w = tl.load(wyT_ptr + rows * KTY + k, mask=i_ok, other=0.0)
            rel = tl.minimum(tl.maximum(oy - y0 + k, 0), KH - 1)  # masked lanes: 0
            gt += w[:, None] * tl.gather(g, tl.broadcast_to(rel[:, None], (BM, KW)), axis=0)
        gt = gt * scale
        if USE_MASKS:
            if CLIP:
                ok1 = i_ok[:, None] & (cc < Wc)[None, :]
                m1 = tl.load(
                    m1_ptr + plane * H * Wc + rows.to(tl.int64)[:, None] * Wc + cc[None, :], mask=ok1, other=0
                )
                gt = tl.where(m1 != 0, gt, 0.0)
        # undo pass 1 (along x)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(KTX):
            w = tl.load(wxT_ptr + cols * KTX + k, mask=j_ok, other=0.0)
            rel = tl.minimum(tl.maximum(ox - x0 + k, 0), KW - 1)  # masked lanes: 0
            acc += w[None, :] * tl.gather(gt, tl.broadcast_to(rel[None, :], (BM, BN)), axis=1)
    ok2 = i_ok[:, None] & j_ok[None, :]
    acc = _grad_images_epilogue(
        acc, x_ptr, flag_ptr, plane, b, c, rows, cols, ok2,
        stride_xb, stride_xc, stride_xh, stride_xw, lo, inv_range, USE_MASKS,
    )  # fmt: skip
    off = plane * H * W + rows.to(tl.int64)[:, None] * W + cols[None, :]
    tl.store(gx_ptr + off, acc.to(gx_ptr.dtype.element_ty), mask=ok2)


# ------------------------------------------------------------------------------------------ host side
TABLES = ("ys", "wy", "xs", "wx", "oys", "wyT", "oxs", "wxT")  # the order of the device tables
SPAN_TILES = tuple(1 << e for e in range(8))  # tile lengths (1..128) whose source band `tap_tables` measures
COUNTS = ("KY", "KX", "KTY", "KTX", *(f"S{a}{n}" for a in ("Y", "X", "TY", "TX") for n in SPAN_TILES))


def _taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of a banded matrix (n_out, n_in) as (start (n_out,) int32, weights (n_out, K) float32, K): row o is
    sum_k weights[o, k] * src[start[o] + k]. The band is the first..last nonzero of each row, interior zeros
    included, so the taps equal the dense row exactly; starts are made non-decreasing. Empty rows (padding) get zero weights and the start of
    the nearest non-empty row."""
    nz = m != 0
    n_out, n_in = m.shape
    any_ = nz.any(1)
    first = np.where(any_, nz.argmax(1), 0)
    last = np.where(any_, n_in - nz[:, ::-1].argmax(1), 0)
    if (
        any_.any()
    ):  # empty rows borrow the nearest start, so a tile's band [min start, max start + K) stays tight
        idx_ne = np.flatnonzero(any_)
        near = idx_ne[np.clip(np.searchsorted(idx_ne, np.arange(n_out)), 0, len(idx_ne) - 1)]
        first = np.where(any_, first, first[near])
        last = np.where(any_, last, first)
        # monotone starts (a row whose leading weights are exactly zero starts no later than the next row):
        # the fused kernels' tile bands run from a tile's first start to its last; the extra taps weigh zero
        first = np.minimum.accumulate(first[::-1])[::-1]
    K = max(int((last - first).max()) if n_out else 0, 1)
    idx = np.minimum(first[:, None] + np.arange(K)[None, :], n_in - 1)
    w = np.where(np.arange(K)[None, :] < (last - first)[:, None], np.take_along_axis(m, idx, 1), 0.0)
    return first.astype(np.int32), np.ascontiguousarray(w, dtype=np.float32), K


def tap_tables(wy: np.ndarray, wx: np.ndarray) -> dict:
    """The tap tables of both passes and of their transposes, from the canvas matrices wy (Hc, H), wx (Wc, W).

    Forward: ys/wy (Hc,), (Hc, KY) and xs/wx (Wc,), (Wc, KX). Backward: for each image row (column), the first
    canvas row (column) that reads it and the weights: oys/wyT (H,), (H, KTY) and oxs/wxT (W,), (W, KTX)."""
    wy = np.asarray(wy, dtype=np.float64)
    wx = np.asarray(wx, dtype=np.float64)
    out = {}
    for name, m in (("y", wy), ("x", wx)):
        s, w, k = _taps(m)
        out[name + "s"], out["w" + name], out["K" + name.upper()] = s, w, k
        out.update(_spans(s, k, name.upper()))
        s, w, k = _taps(np.ascontiguousarray(m.T))
        out["o" + name + "s"], out["w" + name + "T"], out["KT" + name.upper()] = s, w, k
        out.update(_spans(s, k, "T" + name.upper()))
    return out


def _spans(starts: np.ndarray, K: int, axis: str) -> dict:
    """S{axis}{n}: the widest source band of a tile of n consecutive indices (tiles at multiples of n) of a tap
    table with non-decreasing starts, for each n of SPAN_TILES: what the fused kernels' tiles read."""
    out = {}
    N = len(starts)
    s = starts.astype(np.int64)
    for n in SPAN_TILES:
        i0 = np.arange(0, N, n)
        out[f"S{axis}{n}"] = int((s[np.minimum(i0 + n, N) - 1] + K - s[i0]).max()) if N else K
    return out


FORWARD_MODES = ("two_pass", "fused", "fused_loads")
BACKWARD_MODES = ("two_pass", "fused")


def backward_mode() -> str:
    """The backward kernels: UNO_BRIDGE_BACKWARD = "two_pass" (default: two `_resample_bwd_kernel` launches
    and an fp32 intermediate) or "fused" (`_fused_bwd_kernel`: one launch, no intermediate; the same values).
    Opt-in until measured on a GPU."""
    mode = os.environ.get("UNO_BRIDGE_BACKWARD", "two_pass")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"UNO_BRIDGE_BACKWARD must be one of {BACKWARD_MODES}, got {mode!r}")
    return mode


def forward_mode() -> str:
    """The forward kernels: UNO_BRIDGE_FORWARD = "two_pass" (default: two `_resample_fwd_kernel` launches and
    an fp32 intermediate), "fused" (`_fused_fwd_kernel`, first pass by `tl.gather` from the loaded source
    band) or "fused_loads" (the same, first pass by gathered loads). The fused forward writes the same outputs
    and side outputs (clip masks, clamp flags) for the same backward; it is opt-in until measured on a GPU."""
    mode = os.environ.get("UNO_BRIDGE_FORWARD", "two_pass")
    if mode not in FORWARD_MODES:
        raise ValueError(f"UNO_BRIDGE_FORWARD must be one of {FORWARD_MODES}, got {mode!r}")
    return mode


MAX_FUSED_BAND = 1 << 15  # band elements of one fused program (registers); larger -> the two passes run


def fused_settings(device: torch.device, backward: bool = False) -> tuple[int, int, int]:
    """(KH, KW, num_warps): the band a fused program reads (rows x columns, powers of two; the source band of
    the forward, the canvas band of grad_out in the backward), from which its tile follows.
    UNO_BRIDGE_FUSED_TILE / UNO_BRIDGE_FUSED_BWD_TILE = "KH,KW,W" override them. Not yet tuned on a GPU."""
    name = "UNO_BRIDGE_FUSED_BWD_TILE" if backward else "UNO_BRIDGE_FUSED_TILE"
    env = os.environ.get(name)
    if env:
        try:
            kh, kw, nw = (int(v) for v in env.split(","))
        except ValueError:
            raise ValueError(f"{name} must be 'KH,KW,W' (integers), got {env!r}") from None
        if kh < 1 or kw < 1 or kh & (kh - 1) or kw & (kw - 1):
            raise ValueError(f"{name}: KH and KW must be powers of two, got {env!r}")
        if nw not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"{name}: W (num_warps) must be 1, 2, 4, 8, 16 or 32, got {env!r}")
        return kh, kw, nw
    return (32, 64, 8) if backward else (64, 128, 4)


def fused_tiles(tables: dict, axis: str, n_out: int, band: int, min_tile: int) -> tuple[int, int]:
    """(tile, band) along one axis of a fused kernel: the longest power-of-two tile (at most 128, at most the
    axis rounded up) whose source band (`tap_tables`' S{axis}{n}, rounded up to a power of two) fits `band`,
    or `min_tile` where that is longer (its band then wider than `band`)."""
    cap = min(triton.next_power_of_2(max(n_out, 1)), SPAN_TILES[-1])
    fits = [n for n in SPAN_TILES if n <= cap and triton.next_power_of_2(tables[f"S{axis}{n}"]) <= band]
    n = max(fits[-1] if fits else 1, min(min_tile, cap))
    return n, triton.next_power_of_2(tables[f"S{axis}{n}"])


def _fused_plan(tables: dict, shape: tuple[int, int], device: torch.device, backward: bool = False):
    """((tm, kh), (tn, kw), num_warps) of a fused kernel over a (rows, cols) grid of tiles: canvas tiles in
    the forward, image tiles in the backward. None where its band would pass MAX_FUSED_BAND: the two
    passes run instead."""
    kh, kw, nw = fused_settings(device, backward)
    ay, ax = ("TY", "TX") if backward else ("Y", "X")
    ty = fused_tiles(tables, ay, shape[0], kh, 8)
    tx = fused_tiles(tables, ax, shape[1], kw, 16)
    if ty[1] * tx[1] > MAX_FUSED_BAND:
        return None
    return ty, tx, nw


def settings(axis: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of a pass along `axis` (0: rows, 1: columns); columns are the contiguous
    dimension. UNO_BRIDGE_BLOCKS="R,C,W" (both axes) or "R0,C0,W0/R1,C1,W1" overrides them (sweeps).

    GPU default from the H200 sweep (GPU time, 8x3x1024x1024 -> 384, fwd / bwd): 4x256x4 0.168 / 0.156 ms;
    2x128x2 0.213 / 0.170; 8x128x4 0.240 / 0.171; 16x128x4 0.289 / 0.278; 32x64x4 0.51 / 0.49. Short, wide
    tiles win: more programs in flight hide the latency of the dependent gathers. Unrolling the tap loop
    (constexpr K) measured slower (0.268 ms fwd at 4x256)."""
    env = os.environ.get("UNO_BRIDGE_BLOCKS")
    if env:
        parts = env.split("/")
        try:
            r, c, w = (int(v) for v in parts[axis if len(parts) > 1 else 0].split(","))
        except ValueError:
            raise ValueError(
                f"UNO_BRIDGE_BLOCKS must be 'R,C,W' or 'R0,C0,W0/R1,C1,W1' (integers), got {env!r}"
            ) from None
        return r, c, w
    if device.type != "cuda":  # the interpreter: fewer, larger programs run faster
        return 32, 64, 4
    return 4, 256, 4


def mask_layout(
    B: int, H: int, W: int, Hc: int, Wc: int, vertical_first: bool, clip: bool = True
) -> tuple[int, int, int, int]:
    """(numel of the uint8 buffer, start and end of the first-pass mask, offset of the int32 flags) of the
    forward's side outputs: the second-pass mask on the canvas [0, m1_at), the first-pass mask on t
    [m1_at, m1_end), zero padding to 16 bytes, the per-plane clamp flags [flags_at, numel). Without
    `clip` (no per-pass clip) there are no pass masks, only the flags."""
    P = B * 3
    n2 = P * Hc * Wc if clip else 0
    n1 = P * (Hc * W if vertical_first else H * Wc) if clip else 0
    flags_at = -(-(n2 + n1) // 16) * 16
    return flags_at + 4 * P, n2, n2 + n1, flags_at


def _grid(R: int, C: int, P: int, br: int, bc: int) -> tuple[int, int, int]:
    return (triton.cdiv(C, bc), triton.cdiv(R, br), P)


def bridge_forward(
    images: torch.Tensor,
    tables: dict,
    consts: torch.Tensor,
    canvas: tuple[int, int],
    region: tuple[int, int, int, int],
    input_range: tuple[float, float],
    *,
    clip_each_pass: bool,
    store_mask: bool,
    qwen: tuple[int, int, int] | None,
    out_dtype: torch.dtype,
    vertical_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the forward. images: (B, 3, H, W) any strides; tables: `tap_tables` as int32 / fp32 device tensors
    plus the int counts; consts: (3, 3) fp32; canvas: (Hc, Wc); qwen: (patch, merge, temporal) or
    None; vertical_first: Pillow's pass order. Returns (out, side): out (B, 3, Hc, Wc) or (B*gh*gw, 3*T*p*p)
    in out_dtype; side: the uint8 buffer of `mask_layout` the backward reads (store_mask), or None."""
    B, C, H, W = images.shape
    Hc, Wc = canvas
    P = B * C
    dev = images.device
    if qwen is None:
        out = torch.empty((B, C, Hc, Wc), device=dev, dtype=out_dtype)
        patch, merge, temporal, gw = 1, 1, 1, 1
    else:
        patch, merge, temporal = qwen
        gw = Wc // patch
        out = torch.empty((B * (Hc // patch) * gw, C * temporal * patch * patch), device=dev, dtype=out_dtype)
    lo, hi = input_range
    inv = 1.0 / (float(hi) - float(lo))
    mode = forward_mode()
    fused = _fused_plan(tables, (Hc, Wc), dev) if mode != "two_pass" else None
    side = m1 = m2 = flags = None
    if store_mask:
        numel, m1_at, m1_end, flags_at = mask_layout(B, H, W, Hc, Wc, vertical_first, clip_each_pass)
        side = torch.empty(numel, device=dev, dtype=torch.uint8)
        # padding and flags; the two passes write the masks whole, the fused kernel leaves the first-pass
        # mask of source rows (columns) outside every band unwritten: zeros there (their gradient is zero)
        side[m1_end if fused is None else m1_at :].zero_()
        flags = side[flags_at:].view(torch.int32)
        m2, m1 = side[:m1_at], side[m1_at:m1_end]
    if fused is not None:
        (tm, kh), (tn, kw), nw = fused
        _fused_fwd_kernel[(triton.cdiv(Wc, tn), triton.cdiv(Hc, tm), P)](
            out, m1 if m1 is not None else out, m2 if m2 is not None else out,
            flags if flags is not None else out, images,
            tables["ys"], tables["wy"], tables["xs"], tables["wx"], consts,
            *images.stride(), H, W, Hc, Wc, int(tables["KY"]), int(tables["KX"]), tm, tn,
            *region, float(lo), inv, gw, patch, merge,
            VF=vertical_first, CLIP=clip_each_pass, STORE_MASK=store_mask, QWEN=qwen is not None,
            TEMPORAL=temporal, GATHER1=mode == "fused", BM=tm, BN=tn, KH=kh, KW=kw, num_warps=nw,
        )  # fmt: skip
        return out, side
    if vertical_first:  # t = Wy u: (Hc, W)
        ax1, ax2, shape_t = 0, 1, (Hc, W)
        tab1 = (tables["ys"], tables["wy"], tables["KY"])
        tab2 = (tables["xs"], tables["wx"], tables["KX"])
    else:  # t = u Wx^T: (H, Wc)
        ax1, ax2, shape_t = 1, 0, (H, Wc)
        tab1 = (tables["xs"], tables["wx"], tables["KX"])
        tab2 = (tables["ys"], tables["wy"], tables["KY"])
    t = torch.empty((P, *shape_t), device=dev, dtype=torch.float32)
    dummy = out
    common = dict(CLIP=clip_each_pass, STORE_MASK=store_mask, QWEN=qwen is not None, TEMPORAL=temporal)

    br, bc, nw = settings(ax1, dev)
    _resample_fwd_kernel[_grid(*shape_t, P, br, bc)](
        t,
        m1 if m1 is not None else dummy,
        flags if flags is not None else dummy,
        images,
        tab1[0],
        tab1[1],
        consts,
        *images.stride(),
        H,
        W,
        *shape_t,
        int(tab1[2]),
        *region,
        float(lo),
        inv,
        gw,
        patch,
        merge,
        AXIS=ax1,
        FIRST=True,
        FINAL=False,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=nw,
        **common,
    )
    br, bc, nw = settings(ax2, dev)
    R, Cc = shape_t
    _resample_fwd_kernel[_grid(Hc, Wc, P, br, bc)](
        out,
        m2 if m2 is not None else dummy,
        dummy,
        t,
        tab2[0],
        tab2[1],
        consts,
        3 * R * Cc,
        R * Cc,
        Cc,
        1,
        R,
        Cc,
        Hc,
        Wc,
        int(tab2[2]),
        *region,
        float(lo),
        inv,
        gw,
        patch,
        merge,
        AXIS=ax2,
        FIRST=False,
        FINAL=True,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=nw,
        **common,
    )
    return out, side


def bridge_backward(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    side: torch.Tensor | None,
    tables: dict,
    consts: torch.Tensor,
    canvas: tuple[int, int],
    region: tuple[int, int, int, int],
    input_range: tuple[float, float],
    *,
    clip_each_pass: bool,
    use_masks: bool,
    qwen: tuple[int, int, int] | None,
    vertical_first: bool = False,
) -> torch.Tensor:
    """Run both backward passes: grad of the images (B, 3, H, W) in images.dtype, each element written once.
    use_masks=False is the straight-through policy (no masks; the images are not read)."""
    B, C, H, W = images.shape
    Hc, Wc = canvas
    P = B * C
    dev = images.device
    grad_out = grad_out.contiguous()
    gx = torch.empty((B, C, H, W), device=dev, dtype=images.dtype)
    if qwen is None:
        patch, merge, temporal, gw = 1, 1, 1, 1
    else:
        patch, merge, temporal = qwen
        gw = Wc // patch
    m1 = m2 = flags = None
    if use_masks:
        if side is None:
            raise ValueError(
                "bridge_backward: the forward's masks are needed (store_mask=True) for clamp='clamp'"
            )
        _, m1_at, m1_end, flags_at = mask_layout(B, H, W, Hc, Wc, vertical_first, clip_each_pass)
        m2, m1, flags = side[:m1_at], side[m1_at:m1_end], side[flags_at:].view(torch.int32)
    lo, hi = input_range
    inv = 1.0 / (float(hi) - float(lo))
    fused = _fused_plan(tables, (H, W), dev, backward=True) if backward_mode() == "fused" else None
    if fused is not None:
        (tm, kh), (tn, kw), nw = fused
        _fused_bwd_kernel[(triton.cdiv(W, tn), triton.cdiv(H, tm), P)](
            gx, grad_out, m1 if m1 is not None else gx, m2 if m2 is not None else gx,
            flags if flags is not None else gx, images,
            tables["oys"], tables["wyT"], tables["oxs"], tables["wxT"], consts,
            *images.stride(), H, W, Hc, Wc, int(tables["KTY"]), int(tables["KTX"]),
            *region, float(lo), inv, gw, patch, merge,
            VF=vertical_first, USE_MASKS=use_masks, CLIP=clip_each_pass, QWEN=qwen is not None,
            TEMPORAL=temporal, BM=tm, BN=tn, KH=kh, KW=kw, num_warps=nw,
        )  # fmt: skip
        return gx
    if vertical_first:  # undo pass 2 (along x) into g_t (Hc, W), then pass 1 (along y)
        ax2, ax1, shape_t = 1, 0, (Hc, W)
        tab2 = (tables["oxs"], tables["wxT"], tables["KTX"])
        tab1 = (tables["oys"], tables["wyT"], tables["KTY"])
    else:
        ax2, ax1, shape_t = 0, 1, (H, Wc)
        tab2 = (tables["oys"], tables["wyT"], tables["KTY"])
        tab1 = (tables["oxs"], tables["wxT"], tables["KTX"])
    g_t = torch.empty((P, *shape_t), device=dev, dtype=torch.float32)
    dummy = grad_out
    common = dict(USE_MASKS=use_masks, CLIP=clip_each_pass, QWEN=qwen is not None, TEMPORAL=temporal)
    geo = (*region, float(lo), inv, gw, patch, merge)

    br, bc, nw = settings(ax2, dev)
    _resample_bwd_kernel[_grid(*shape_t, P, br, bc)](
        g_t,
        grad_out,
        m2 if m2 is not None else dummy,
        m1 if m1 is not None else dummy,
        dummy,
        dummy,
        tab2[0],
        tab2[1],
        consts,
        0,
        0,
        0,
        0,
        Hc,
        Wc,
        *shape_t,
        int(tab2[2]),
        *geo,
        AXIS=ax2,
        FIRST=True,
        LAST=False,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=nw,
        **common,
    )
    br, bc, nw = settings(ax1, dev)
    _resample_bwd_kernel[_grid(H, W, P, br, bc)](
        gx,
        g_t,
        dummy,
        dummy,
        flags if flags is not None else dummy,
        images,
        tab1[0],
        tab1[1],
        consts,
        *images.stride(),
        *shape_t,
        H,
        W,
        int(tab1[2]),
        *geo,
        AXIS=ax1,
        FIRST=False,
        LAST=True,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=nw,
        **common,
    )
    return gx
