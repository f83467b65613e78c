"""The bridge's two-pass kernels (the default): one launch of a tap kernel per resampling pass, forward and
backward, with an fp32 intermediate between the passes.

Forward (`_resample_fwd_kernel`, launched twice). Every output element is a short weighted sum of K
consecutive source elements along the pass's axis (`bridge_taps`: K ~ 4 * scale + 1 for a bicubic
downscale), read as K gathered loads of the program's source band (L1/L2 hits after the first) and
accumulated with fp32 FMAs in a fixed order: exact fp32 (no tensor-core rounding), deterministic, O(K) work
per output. Pass 1 reads the images once (any strides, any float dtype; input normalization and clamp fused)
and writes t (P, H, Wc) fp32 ((P, Hc, W) when Pillow runs the vertical pass first); pass 2 reads t once and
writes the critic input once, with the second clip, padding fill, normalization and output layout fused in.
With `store_mask` (a backward will follow, clamp policy "clamp"), pass 1 and pass 2 write their clip masks
(one uint8 per element of t and of the canvas) and pass 1 raises a per-plane flag (int32, atomic max) when a
pixel is not inside input_range (NaN included).

Backward (`_resample_bwd_kernel`, launched twice): the transposed passes, as gathers over the transposed tap
tables, so no atomics and bit-identical reruns. Pass 2^T reads grad_out once (in the output layout, summing
Qwen2-VL's temporal copies) with the second-pass mask and writes the fp32 gradient of t; pass 1^T reads it
once and writes grad_images once. The images are read (for the input-clamp mask) only in flagged planes.

Memory traffic per direction: the input once, the output once, plus t written and read back once (in L2 in
part), so 1 + (t bytes) / (input + output bytes) times the one-read-one-write minimum; for
8x3x1024x1024 fp32 -> 384 (Janus) that is 100.7 MB read, 14.2 MB written and 37.7 MB of t twice: 1.66x.
Tiles: short, wide (BLOCK_R x BLOCK_C = 4 x 256 on CUDA, `DEFAULT_BLOCKS`): many programs in flight hide the
latency of the dependent gathers (the passes are latency-bound, not DRAM-bound; benchmarks/results/GPU_RUNS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bridge_jit import (
    _clamp01,
    _grad_images_epilogue,
    _hash_normal,
    _load_grad_out,
    _outside01,
    _store_critic_input,
)

DEFAULT_BLOCKS = (4, 256, 4)  # (BLOCK_R, BLOCK_C, num_warps) on CUDA, both axes
INTERPRETER_BLOCKS = (32, 64, 4)  # on the CPU (the interpreter): fewer, larger programs run faster
_WARPS = (1, 2, 4, 8, 16, 32)


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
    VIEWS,  # views per image: output plane (v * 3 + c) reads image v // VIEWS (FIRST); 1 for the plain read
    tab_s,
    tab_w,  # elements between two views' start / weight tables (0: one table for every plane)
    aff_ptr,  # (V, 3) fp32 per view [alpha, beta, sigma] (FINAL and NOISE)
    key_ptr,  # (V, 2) int64 per view noise keys in [0, 2^32) (FINAL and NOISE)
    AXIS: tl.constexpr,  # 0: resample rows (vertical pass), 1: resample columns (horizontal pass)
    FIRST: tl.constexpr,
    FINAL: tl.constexpr,
    CLIP: tl.constexpr,
    STORE_MASK: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    NOISE: tl.constexpr,  # clip(alpha * r + beta + sigma * eps) in place of the last clip (FINAL)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)  # v * 3 + c: the output plane (v: the image, or the view)
    b = plane // 3
    c = plane % 3
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R_out
    c_ok = cols < C_out
    if FIRST:  # the image the view reads, once
        base = in_ptr + (b // VIEWS) * stride_ib + c * stride_ic
    else:
        base = in_ptr + b * stride_ib + c * stride_ic
    start_ptr += b * tab_s
    w_ptr += b * tab_w
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
                    bad = tl.maximum(bad, _outside01(v, ok))
                v = _clamp01(v)
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
                    bad = tl.maximum(bad, _outside01(v, ok))
                v = _clamp01(v)
            acc += w[:, None] * v
    if FIRST:
        if STORE_MASK:
            any_bad = tl.max(tl.max(bad, axis=1), axis=0)
            if any_bad > 0:
                tl.atomic_max(flag_ptr + plane, any_bad)

    ok2 = r_ok[:, None] & c_ok[None, :]
    off = plane * R_out * C_out + rows.to(tl.int64)[:, None] * C_out + cols[None, :]
    if FINAL:
        if NOISE:  # the view's noise / re-noising, drawn here from its counters (no noise tensor)
            k0 = tl.load(key_ptr + b * 2).to(tl.uint32)
            k1 = tl.load(key_ptr + b * 2 + 1).to(tl.uint32)
            eps = _hash_normal((c * R_out + rows[:, None]) * C_out + cols[None, :], k0, k1)
            acc = tl.load(aff_ptr + b * 3) * acc + tl.load(aff_ptr + b * 3 + 1) + tl.load(aff_ptr + b * 3 + 2) * eps
    if CLIP:
        if STORE_MASK:
            tl.store(m_ptr + off, ((acc >= 0.0) & (acc <= 1.0)).to(tl.uint8), mask=ok2)
        acc = _clamp01(acc)
    if FINAL:
        _store_critic_input(
            out_ptr, acc, rows, cols, ok2, b, c, consts_ptr, R_out, C_out,
            reg_y0, reg_y1, reg_x0, reg_x1, gw, patch, merge, QWEN, TEMPORAL,
        )  # fmt: skip
    else:
        tl.store(out_ptr + off, acc, mask=ok2)


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
    VIEWS,  # views per image: the LAST pass of image plane (b, c) sums its views b * VIEWS + k; 1: plain
    tab_s,
    tab_w,  # elements between two views' start / weight tables (0: one table for every plane)
    aff_ptr,  # (V, 3) fp32 per view [alpha, beta, sigma]: FIRST multiplies by alpha (NOISE)
    AXIS: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    USE_MASKS: tl.constexpr,
    CLIP: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    NOISE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)  # LAST: the image plane; else the view's (or image's) plane
    b = plane // 3
    c = plane % 3
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R_out
    c_ok = cols < C_out
    zero = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if LAST:
        n_views = VIEWS
    else:
        n_views = 1
    for kv in range(n_views):  # LAST: the views of the image, summed in order (a deterministic gather)
        if LAST:
            v = b * VIEWS + kv
        else:
            v = b
        src_plane = v * 3 + c
        if AXIS == 1:
            start = tl.load(start_ptr + v * tab_s + cols, mask=c_ok, other=0)
        else:
            start = tl.load(start_ptr + v * tab_s + rows, mask=r_ok, other=0)
        for k in range(K):
            if AXIS == 1:
                w = tl.load(w_ptr + v * tab_w + cols * K + k, mask=c_ok, other=0.0)[None, :]
                src = start + k
                sy = rows[:, None] + zero
                sx = src[None, :] + zero
                ok = r_ok[:, None] & (c_ok & (src < C_in))[None, :]
            else:
                w = tl.load(w_ptr + v * tab_w + rows * K + k, mask=r_ok, other=0.0)[:, None]
                src = start + k
                sy = src[:, None] + zero
                sx = cols[None, :] + zero
                ok = (r_ok & (src < R_in))[:, None] & c_ok[None, :]
            if FIRST:
                ok = ok & (sy >= reg_y0) & (sy < reg_y1) & (sx >= reg_x0) & (sx < reg_x1)  # padding: no grad
                g = _load_grad_out(
                    in_ptr, m_in_ptr, sy, sx, ok, b, c, plane, R_in, C_in, gw, patch, merge,
                    QWEN, TEMPORAL, USE_MASKS, CLIP,
                )  # fmt: skip
            else:
                g = tl.load(in_ptr + src_plane * R_in * C_in + sy.to(tl.int64) * C_in + sx, mask=ok, other=0.0)
            acc += w * g

    ok2 = r_ok[:, None] & c_ok[None, :]
    off = plane * R_out * C_out + rows.to(tl.int64)[:, None] * C_out + cols[None, :]
    if FIRST:
        acc = acc * tl.load(consts_ptr + c * 3)
        if NOISE:
            acc = acc * tl.load(aff_ptr + b * 3)
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


# ------------------------------------------------------------------------------------------ host side
def check_blocks(blocks) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """`blocks`: None (defaults) or ((BLOCK_R, BLOCK_C, num_warps) of the pass along rows, the same along
    columns); block sizes powers of two, num_warps one of 1..32. Raises ValueError naming `blocks`."""
    try:
        (r0, c0, w0), (r1, c1, w1) = blocks
        vals = tuple(int(v) for v in (r0, c0, w0, r1, c1, w1))
    except (TypeError, ValueError):
        raise ValueError(
            f"blocks must be ((R0, C0, W0), (R1, C1, W1)) integers (rows pass, columns pass), got {blocks!r}"
        ) from None
    for r, c, w in (vals[:3], vals[3:]):
        if r < 1 or c < 1 or r & (r - 1) or c & (c - 1):
            raise ValueError(f"blocks: BLOCK_R and BLOCK_C must be powers of two, got {blocks!r}")
        if w not in _WARPS:
            raise ValueError(f"blocks: num_warps must be one of {_WARPS}, got {blocks!r}")
    return vals[:3], vals[3:]


def block_settings(axis: int, device: torch.device, blocks=None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of a pass along `axis` (0: rows, 1: columns; columns are contiguous):
    `blocks[axis]` when given (checked by `check_blocks`), else `DEFAULT_BLOCKS` on CUDA and
    `INTERPRETER_BLOCKS` elsewhere. Unrolling the tap loop (constexpr K) measured slower on an H200."""
    if blocks is not None:
        return blocks[axis]
    return DEFAULT_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


def _grid(R: int, C: int, P: int, br: int, bc: int) -> tuple[int, int, int]:
    return (triton.cdiv(C, bc), triton.cdiv(R, br), P)


def _view_args(views, tables, first: str, second: str):
    """(K, strides of the first pass's tables, of the second's, affine, keys, noise) kernel arguments: the
    plain read has one table for every plane (strides 0)."""
    if views is None:
        return 1, (0, 0), (0, 0), None, None, False
    K, affine, keys = views
    st = [(tables[s].stride(0), tables[w].stride(0)) for s, w in (first, second)]
    return K, st[0], st[1], affine, keys, affine is not None


def forward(
    out, m1, m2, flags, images, tables, consts, canvas, region, lo, inv, gw, patch, merge, temporal,
    *, clip, store_mask, qwen, vertical_first, blocks, views=None,
):  # fmt: skip
    """Both forward passes into the preallocated `out` (and the side outputs m1, m2, flags when store_mask;
    None otherwise). tables: `bridge_taps.tap_tables` as device tensors plus the int counts, or with `views`
    = (K, affine (V, 3) | None, keys (V, 2) | None) each view's tables (a leading view axis,
    `uno_engine.read.view_tap_tables`): the first pass reads image v // K for view v, once per view, and the
    second writes the view's critic input with its noise."""
    B, C, H, W = images.shape
    Hc, Wc = canvas
    dev = images.device
    if vertical_first:  # t = Wy u: (Hc, W)
        ax1, ax2, (R, Cc) = 0, 1, (Hc, W)
        n1, n2 = ("ys", "wy", "KY"), ("xs", "wx", "KX")
    else:  # t = u Wx^T: (H, Wc)
        ax1, ax2, (R, Cc) = 1, 0, (H, Wc)
        n1, n2 = ("xs", "wx", "KX"), ("ys", "wy", "KY")
    K, st1, st2, affine, keys, noise = _view_args(views, tables, n1[:2], n2[:2])
    P = B * K * C  # output planes
    t = torch.empty((P, R, Cc), device=dev, dtype=torch.float32)
    d = out  # placeholder pointer for arguments a specialization does not read
    br, bc, nw = block_settings(ax1, dev, blocks)
    _resample_fwd_kernel[_grid(R, Cc, P, br, bc)](
        t, d if m1 is None else m1, d if flags is None else flags, images, tables[n1[0]], tables[n1[1]], consts,
        *images.stride(), H, W, R, Cc, int(tables[n1[2]]), *region, lo, inv, gw, patch, merge, K, *st1, d, d,
        AXIS=ax1, FIRST=True, FINAL=False, CLIP=clip, STORE_MASK=store_mask, QWEN=qwen, TEMPORAL=temporal,
        NOISE=False, BLOCK_R=br, BLOCK_C=bc, num_warps=nw,
    )  # fmt: skip
    br, bc, nw = block_settings(ax2, dev, blocks)
    _resample_fwd_kernel[_grid(Hc, Wc, P, br, bc)](
        out, d if m2 is None else m2, d, t, tables[n2[0]], tables[n2[1]], consts,
        3 * R * Cc, R * Cc, Cc, 1, R, Cc, Hc, Wc, int(tables[n2[2]]), *region, lo, inv, gw, patch, merge,
        1, *st2, d if affine is None else affine, d if keys is None else keys,
        AXIS=ax2, FIRST=False, FINAL=True, CLIP=clip, STORE_MASK=store_mask, QWEN=qwen, TEMPORAL=temporal,
        NOISE=noise, BLOCK_R=br, BLOCK_C=bc, num_warps=nw,
    )  # fmt: skip


def backward(
    gx, grad_out, m1, m2, flags, images, tables, consts, canvas, region, lo, inv, gw, patch, merge, temporal,
    *, clip, use_masks, qwen, vertical_first, blocks, views=None,
):  # fmt: skip
    """Both transposed passes into the preallocated gx (B, 3, H, W) contiguous; grad_out contiguous. With
    `views` (as in `forward`; flags then per image plane, reduced over its views by the caller): pass 2^T
    per view plane, pass 1^T per image plane summing its K views in order (gathers, no atomics)."""
    B, C, H, W = images.shape
    Hc, Wc = canvas
    dev = images.device
    if vertical_first:  # undo pass 2 (along x) into g_t (Hc, W), then pass 1 (along y)
        ax2, ax1, (R, Cc) = 1, 0, (Hc, W)
        n2, n1 = ("oxs", "wxT", "KTX"), ("oys", "wyT", "KTY")
    else:
        ax2, ax1, (R, Cc) = 0, 1, (H, Wc)
        n2, n1 = ("oys", "wyT", "KTY"), ("oxs", "wxT", "KTX")
    K, st2, st1, affine, _, noise = _view_args(views, tables, n2[:2], n1[:2])
    g_t = torch.empty((B * K * C, R, Cc), device=dev, dtype=torch.float32)
    d = grad_out  # placeholder pointer for arguments a specialization does not read
    br, bc, nw = block_settings(ax2, dev, blocks)
    _resample_bwd_kernel[_grid(R, Cc, B * K * C, br, bc)](
        g_t, grad_out, d if m2 is None else m2, d if m1 is None else m1, d, d, tables[n2[0]], tables[n2[1]], consts,
        0, 0, 0, 0, Hc, Wc, R, Cc, int(tables[n2[2]]), *region, lo, inv, gw, patch, merge,
        1, *st2, d if affine is None else affine,
        AXIS=ax2, FIRST=True, LAST=False, USE_MASKS=use_masks, CLIP=clip, QWEN=qwen, TEMPORAL=temporal,
        NOISE=noise, BLOCK_R=br, BLOCK_C=bc, num_warps=nw,
    )  # fmt: skip
    br, bc, nw = block_settings(ax1, dev, blocks)
    _resample_bwd_kernel[_grid(H, W, B * C, br, bc)](
        gx, g_t, d, d, d if flags is None else flags, images, tables[n1[0]], tables[n1[1]], consts,
        *images.stride(), R, Cc, H, W, int(tables[n1[2]]), *region, lo, inv, gw, patch, merge,
        K, *st1, d,
        AXIS=ax1, FIRST=False, LAST=True, USE_MASKS=use_masks, CLIP=clip, QWEN=qwen, TEMPORAL=temporal,
        NOISE=False, BLOCK_R=br, BLOCK_C=bc, num_warps=nw,
    )  # fmt: skip
