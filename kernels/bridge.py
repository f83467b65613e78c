"""Image -> critic bridge: separable Pillow resampling + clamp + pad/crop + normalize + patch layout, fused.

Math (per image b and channel c; u = clamp((x - lo) / (hi - lo), 0, 1) is the processor's uint8 value / 255):
    t = clip(u @ Wx^T)          (H, Wc)   horizontal pass, Pillow's first
    r = clip(Wy @ t)            (Hc, Wc)  vertical pass
    out = where(inside, r, fill) * scale_c + shift_c, stored in the spec's layout (NCHW or Qwen2-VL patches)
Wy (Hc, H) and Wx (Wc, W) are the banded Pillow weight matrices on the output canvas (zero rows = padding).

Forward (`_bridge_fwd_kernel`): one program per output tile (BLOCK_OH x BLOCK_OW) of one plane. It walks the
input band of the tile in (BLOCK_K x BLOCK_K) chunks with `tl.dot` against the weight chunks (horizontal pass
into a (BLOCK_K x BLOCK_OW) strip, clip, vertical pass into the accumulator), so each input pixel is read by
the tiles whose band holds it (a halo of ~support x scale pixels, from L2) and each output element is written
once (T times for Qwen2-VL's temporal copies, which are distinct outputs). The clip masks of the vertical
pass are written as one uint8 per canvas pixel when a backward will need them.

The clip masks of both passes are written as one uint8 each (second pass: one per canvas pixel; first pass:
one per (input row, canvas col)) when a backward will need them: about 1/4 byte per fp32 input byte for a
2.7x downscale, so the backward needs no recompute of the first pass.

Backward (`_bridge_bwd_kernel`): a gather, no atomics, deterministic. One program per input tile
(BLOCK_I x BLOCK_I): it loops over the canvas-column chunks that touch the tile, gathers
g1 = Wy^T (m2 * g * scale) over the canvas rows that touch the tile, masks it with the first-pass clip mask,
and accumulates g1 @ Wx; then the input clamp mask (one read of the tile's own pixels). It writes
grad_images once. With clamp="straight_through" no mask is applied and the images are not read at all.

Vertical pass first (Pillow >= 13 for some shapes; it matters where a pass clips): both kernels run the
transposed problem (swapped image strides, weights and tables; TRANS maps tile coordinates back to the real
canvas for the output layout, the masks and the gradient store).

Precision: fp32 accumulation; fp32 `tl.dot` uses `input_precision` from the launcher ("ieee" in the
interpreter, "tf32x3" on GPUs: about fp32 accuracy on tensor cores). References: Pillow `Resample.c`
(`precompute_coeffs`, two-pass order, 8-bit clip), transformers image processors (crop/pad/patch order).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 32  # every tile and chunk edge (tl.dot needs >= 16)


@triton.jit
def _bridge_fwd_kernel(
    out_ptr,  # nchw: (B, 3, Hc, Wc) contiguous; qwen2_vl: (B*gh*gw, 3*T*p*p) contiguous
    mask_ptr,  # uint8 clip masks (written if STORE_MASK): [B*3*Hr*Wr second pass | B*3*H*Wc first pass]
    x_ptr,  # (B, 3, H, W) images, any strides
    wy_ptr,  # (Hc, H) fp32 contiguous
    wx_ptr,  # (Wc, W) fp32 contiguous
    ystart_ptr,  # (n_tiles_y,) int32: first input row of each output tile-row's band
    xstart_ptr,  # (n_tiles_x,) int32: first input col of each output tile-col's band
    consts_ptr,  # (3, 3) fp32: per channel [scale, shift, fill]
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    H,
    W,
    Hc,
    Wc,
    reg_y0,
    reg_y1,
    reg_x0,
    reg_x1,  # canvas rectangle that shows the image
    lo,
    inv_range,  # u = (x - lo) * inv_range
    n_ky,
    n_kx,  # chunks of the widest band (rows, cols)
    gw,
    patch,
    merge,  # qwen2_vl layout: grid width, patch size, merge size
    Hr,
    Wr,  # the real canvas (Hc, Wc swapped when TRANS)
    m1_base,  # offset of the first-pass masks in mask_ptr (B*3*Hr*Wr)
    CLIP_PASS: tl.constexpr,
    STORE_MASK: tl.constexpr,
    TRANS: tl.constexpr,  # vertical pass first: the kernel runs on the transposed problem
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)  # b * 3 + c
    b = plane // 3
    c = plane % 3
    oy = pid_y * BLOCK_O + tl.arange(0, BLOCK_O)
    ox = pid_x * BLOCK_O + tl.arange(0, BLOCK_O)
    oy_ok = oy < Hc
    ox_ok = ox < Wc
    ys = tl.load(ystart_ptr + pid_y)
    xs = tl.load(xstart_ptr + pid_x)
    x_base = x_ptr + b * stride_xb + c * stride_xc
    kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_O, BLOCK_O), dtype=tl.float32)
    for i in range(n_ky):
        iy = ys + i * BLOCK_K + kk
        iy_ok = iy < H
        t = tl.zeros((BLOCK_K, BLOCK_O), dtype=tl.float32)
        for j in range(n_kx):
            ix = xs + j * BLOCK_K + kk
            ix_ok = ix < W
            xv = tl.load(
                x_base + iy[:, None].to(tl.int64) * stride_xh + ix[None, :] * stride_xw,
                mask=iy_ok[:, None] & ix_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            u = tl.minimum(tl.maximum((xv - lo) * inv_range, 0.0), 1.0)
            wxt = tl.load(
                wx_ptr + ox[None, :] * W + ix[:, None], mask=ix_ok[:, None] & ox_ok[None, :], other=0.0
            )
            t = tl.dot(u, wxt, t, input_precision=PRECISION)
        if CLIP_PASS:
            if (
                STORE_MASK
            ):  # first-pass clip mask at [input row, canvas col] (rows of the band overlap between
                # vertically adjacent tiles: they write the same values)
                m1 = ((t >= 0.0) & (t <= 1.0)).to(tl.uint8)
                m1_off = m1_base + plane * H * Wc + iy[:, None] * Wc + ox[None, :]
                tl.store(mask_ptr + m1_off, m1, mask=iy_ok[:, None] & ox_ok[None, :])
            t = tl.minimum(tl.maximum(t, 0.0), 1.0)
        wyv = tl.load(wy_ptr + oy[:, None] * H + iy[None, :], mask=oy_ok[:, None] & iy_ok[None, :], other=0.0)
        acc = tl.dot(wyv, t, acc, input_precision=PRECISION)

    # real canvas coordinates of the tile's elements (the problem is transposed when TRANS)
    zero = tl.zeros((BLOCK_O, BLOCK_O), dtype=tl.int32)
    if TRANS:
        ry = ox[None, :] + zero
        rx = oy[:, None] + zero
    else:
        ry = oy[:, None] + zero
        rx = ox[None, :] + zero
    ok2 = (ry < Hr) & (rx < Wr)
    if CLIP_PASS:
        if STORE_MASK:
            ok = (acc >= 0.0) & (acc <= 1.0)
            tl.store(mask_ptr + plane * Hr * Wr + ry * Wr + rx, ok.to(tl.uint8), mask=ok2)
        acc = tl.minimum(tl.maximum(acc, 0.0), 1.0)
    scale = tl.load(consts_ptr + c * 3)
    shift = tl.load(consts_ptr + c * 3 + 1)
    fill = tl.load(consts_ptr + c * 3 + 2)
    inside = (ry >= reg_y0) & (ry < reg_y1) & (rx >= reg_x0) & (rx < reg_x1)
    val = tl.where(inside, acc, fill) * scale + shift
    val = val.to(out_ptr.dtype.element_ty)
    if QWEN:
        gy = ry // patch
        gx = rx // patch
        row = (gy // merge) * (gw // merge) + gx // merge
        row = row * (merge * merge) + (gy % merge) * merge + gx % merge
        row = b * ((Hr // patch) * gw) + row
        pp = patch * patch
        col = (ry % patch) * patch + rx % patch
        base = row.to(tl.int64) * (3 * TEMPORAL * pp) + c * TEMPORAL * pp + col
        for tt in tl.static_range(TEMPORAL):
            tl.store(out_ptr + base + tt * pp, val, mask=ok2)
    else:
        tl.store(out_ptr + plane * Hr * Wr + ry * Wr + rx, val, mask=ok2)


@triton.jit
def _bridge_bwd_kernel(
    gx_ptr,  # (B, 3, H, W) grad of the images, contiguous, images dtype
    g_ptr,  # grad of the output, same layout as the forward output, contiguous
    mask_ptr,  # uint8 clip masks from the forward (read if USE_MASKS and CLIP_PASS)
    x_ptr,  # (B, 3, H, W) images, any strides (read if USE_MASKS)
    wy_ptr,  # (Hc, H) fp32
    wx_ptr,  # (Wc, W) fp32
    oystart_ptr,  # (n_tiles_iy,) int32: first canvas row touching each input tile-row
    oxstart_ptr,  # (n_tiles_ix,) int32: first canvas col touching each input tile-col
    consts_ptr,  # (3, 3) fp32: per channel [scale, shift, fill]
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    H,
    W,
    Hc,
    Wc,
    reg_y0,
    reg_y1,
    reg_x0,
    reg_x1,
    lo,
    inv_range,
    n_oy,
    n_ox,  # chunk counts: canvas rows / cols touching an input tile
    gw,
    patch,
    merge,
    Hr,
    Wr,
    W_img,  # the real canvas and the real image width (swapped problem when TRANS)
    m1_base,  # offset of the first-pass masks in mask_ptr
    USE_MASKS: tl.constexpr,
    CLIP_PASS: tl.constexpr,
    TRANS: tl.constexpr,
    QWEN: tl.constexpr,
    TEMPORAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    plane = tl.program_id(2).to(tl.int64)
    b = plane // 3
    c = plane % 3
    iy = pid_y * BLOCK_I + tl.arange(0, BLOCK_I)
    ix = pid_x * BLOCK_I + tl.arange(0, BLOCK_I)
    iy_ok = iy < H
    ix_ok = ix < W
    oys = tl.load(oystart_ptr + pid_y)
    oxs = tl.load(oxstart_ptr + pid_x)
    x_base = x_ptr + b * stride_xb + c * stride_xc
    scale = tl.load(consts_ptr + c * 3)
    oo = tl.arange(0, BLOCK_O)
    gh = Hr // patch
    pp = patch * patch
    zero = tl.zeros((BLOCK_O, BLOCK_O), dtype=tl.int32)

    gacc = tl.zeros((BLOCK_I, BLOCK_I), dtype=tl.float32)
    for j in range(n_ox):
        ox = oxs + j * BLOCK_O + oo
        ox_ok = ox < Wc
        # g1[y, ox] = sum_oy Wy[oy, y] * m2 * g[oy, ox] * scale   (second pass, transposed)
        g1 = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
        for i in range(n_oy):
            oy = oys + i * BLOCK_O + oo
            oy_ok = oy < Hc
            if TRANS:
                ry = ox[None, :] + zero
                rx = oy[:, None] + zero
            else:
                ry = oy[:, None] + zero
                rx = ox[None, :] + zero
            ok2 = (ry < Hr) & (rx < Wr) & (ry >= reg_y0) & (ry < reg_y1) & (rx >= reg_x0) & (rx < reg_x1)
            if QWEN:
                gy = ry // patch
                gx = rx // patch
                row = (gy // merge) * (gw // merge) + gx // merge
                row = row * (merge * merge) + (gy % merge) * merge + gx % merge
                row = b * (gh * gw) + row
                col = (ry % patch) * patch + rx % patch
                base = row.to(tl.int64) * (3 * TEMPORAL * pp) + c * TEMPORAL * pp + col
                g = tl.zeros((BLOCK_O, BLOCK_O), dtype=tl.float32)
                for tt in tl.static_range(TEMPORAL):
                    g += tl.load(g_ptr + base + tt * pp, mask=ok2, other=0.0).to(tl.float32)
            else:
                g = tl.load(g_ptr + plane * Hr * Wr + ry * Wr + rx, mask=ok2, other=0.0).to(tl.float32)
            if USE_MASKS:
                if CLIP_PASS:
                    m2 = tl.load(mask_ptr + plane * Hr * Wr + ry * Wr + rx, mask=ok2, other=0)
                    g = tl.where(m2 != 0, g, 0.0)
            wyt = tl.load(
                wy_ptr + oy[None, :] * H + iy[:, None], mask=iy_ok[:, None] & oy_ok[None, :], other=0.0
            )
            g1 = tl.dot(wyt, g, g1, input_precision=PRECISION)
        g1 = g1 * scale
        if USE_MASKS:
            if CLIP_PASS:
                # Pillow's first clip, as the forward saw it
                m1 = tl.load(
                    mask_ptr + m1_base + plane * H * Wc + iy[:, None] * Wc + ox[None, :],
                    mask=iy_ok[:, None] & ox_ok[None, :],
                    other=0,
                )
                g1 = tl.where(m1 != 0, g1, 0.0)
        wxv = tl.load(wx_ptr + ox[:, None] * W + ix[None, :], mask=ox_ok[:, None] & ix_ok[None, :], other=0.0)
        gacc = tl.dot(g1, wxv, gacc, input_precision=PRECISION)

    gacc = gacc * inv_range
    ok = iy_ok[:, None] & ix_ok[None, :]
    if USE_MASKS:
        xv = tl.load(
            x_base + iy[:, None].to(tl.int64) * stride_xh + ix[None, :] * stride_xw, mask=ok, other=0.0
        ).to(tl.float32)
        u = (xv - lo) * inv_range
        gacc = tl.where((u >= 0.0) & (u <= 1.0), gacc, 0.0)
    zi = tl.zeros((BLOCK_I, BLOCK_I), dtype=tl.int32)
    if TRANS:
        g_off = plane * H * W + (ix[None, :] + zi).to(tl.int64) * W_img + iy[:, None]
    else:
        g_off = plane * H * W + (iy[:, None] + zi).to(tl.int64) * W_img + ix[None, :]
    tl.store(gx_ptr + g_off, gacc.to(gx_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------ host side
def _first_last(nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a boolean matrix: first and one-past-last True column (0, 0 for empty rows)."""
    any_ = nz.any(1)
    first = np.where(any_, nz.argmax(1), 0)
    last = np.where(any_, nz.shape[1] - nz[:, ::-1].argmax(1), 0)
    return first, last


def band_tables(wy: np.ndarray, wx: np.ndarray, block: int = BLOCK) -> dict:
    """Band start tables and loop counts of both kernels, from the nonzero structure of the weights.

    wy: (Hc, H), wx: (Wc, W) numpy arrays. Returns int32 numpy arrays and python ints (see the kernels)."""

    def fwd(m):  # per output tile: first input index, chunks
        n_out = m.shape[0]
        nz = m != 0
        starts, counts = [], []
        for t0 in range(0, n_out, block):
            f, l = _first_last(nz[t0 : t0 + block].any(0, keepdims=True))
            starts.append(int(f[0]))
            counts.append(-(-int(l[0] - f[0]) // block))
        return np.array(starts, np.int32), max(counts + [0])

    def bwd(m):  # per input tile: first output index touching it, chunks
        n_in = m.shape[1]
        nz = (m != 0).T  # (in, out)
        starts, counts = [], []
        for t0 in range(0, n_in, block):
            f, l = _first_last(nz[t0 : t0 + block].any(0, keepdims=True))
            starts.append(int(f[0]))
            counts.append(-(-int(l[0] - f[0]) // block))
        return np.array(starts, np.int32), max(counts + [0])

    ystart, n_ky = fwd(wy)
    xstart, n_kx = fwd(wx)
    oystart, n_oy = bwd(wy)
    oxstart, n_ox = bwd(wx)
    return dict(
        ystart=ystart,
        xstart=xstart,
        n_ky=n_ky,
        n_kx=n_kx,
        oystart=oystart,
        oxstart=oxstart,
        n_oy=n_oy,
        n_ox=n_ox,
    )


def _precision(device: torch.device) -> str:
    return "tf32x3" if device.type == "cuda" else "ieee"


def mask_numel(B: int, H: int, W: int, Hc: int, Wc: int, vertical_first: bool) -> int:
    """Size of the forward's clip masks: the second pass on the canvas, the first pass on (input rows, canvas
    cols) of the problem the kernels run (transposed when vertical_first)."""
    first = W * Hc if vertical_first else H * Wc
    return B * 3 * (Hc * Wc + first)


def _oriented(images, wy, wx, trans):
    """The problem the kernels run: the transposed one (vertical pass first) when `trans`."""
    B, C, H, W = images.shape
    sb, sc, sh, sw = images.stride()
    if trans:
        return (W, H, sb, sc, sw, sh, wx, wy)
    return (H, W, sb, sc, sh, sw, wy, wx)


def bridge_forward(
    images: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    consts: torch.Tensor,
    tables: dict,
    region: tuple[int, int, int, int],
    input_range: tuple[float, float],
    *,
    clip_each_pass: bool,
    store_mask: bool,
    qwen: tuple[int, int, int] | None,
    out_dtype: torch.dtype,
    vertical_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward. images: (B, 3, H, W); wy: (Hc, H) fp32; wx: (Wc, W) fp32; consts: (3, 3) fp32;
    tables: `band_tables` of the oriented problem (band_tables(wx, wy) when vertical_first) as int32 tensors;
    qwen: (patch, merge, temporal) or None. vertical_first: run the vertical pass first (on the transposed
    problem). Returns (out, mask): out (B, 3, Hc, Wc) or (B*gh*gw, 3*T*p*p); mask: the flat uint8 clip masks
    (`mask_numel` of them) the backward reads, or None."""
    B, C, H, W = images.shape
    Hc, Wc = wy.shape[0], wx.shape[0]
    if qwen is None:
        out = torch.empty((B, C, Hc, Wc), device=images.device, dtype=out_dtype)
        patch, merge, temporal, gw = 1, 1, 1, 1
    else:
        patch, merge, temporal = qwen
        gw = Wc // patch
        out = torch.empty(
            (B * (Hc // patch) * gw, C * temporal * patch * patch), device=images.device, dtype=out_dtype
        )
    store_mask = store_mask and clip_each_pass
    lo, hi = input_range
    Hv, Wv, sb, sc, sh, sw, wy_v, wx_v = _oriented(images, wy, wx, vertical_first)
    Hcv, Wcv = wy_v.shape[0], wx_v.shape[0]
    mask = (
        torch.empty(mask_numel(B, H, W, Hc, Wc, vertical_first), device=images.device, dtype=torch.uint8)
        if store_mask
        else None
    )
    grid = (triton.cdiv(Wcv, BLOCK), triton.cdiv(Hcv, BLOCK), B * C)
    _bridge_fwd_kernel[grid](
        out,
        mask if mask is not None else out,
        images,
        wy_v,
        wx_v,
        tables["ystart"],
        tables["xstart"],
        consts,
        sb,
        sc,
        sh,
        sw,
        Hv,
        Wv,
        Hcv,
        Wcv,
        *region,
        float(lo),
        1.0 / (float(hi) - float(lo)),
        int(tables["n_ky"]),
        int(tables["n_kx"]),
        gw,
        patch,
        merge,
        Hc,
        Wc,
        B * C * Hc * Wc,
        CLIP_PASS=clip_each_pass,
        STORE_MASK=store_mask,
        TRANS=vertical_first,
        QWEN=qwen is not None,
        TEMPORAL=temporal,
        PRECISION=_precision(images.device),
        BLOCK_O=BLOCK,
        BLOCK_K=BLOCK,
        num_warps=4,
    )
    return out, mask


def bridge_backward(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor | None,
    wy: torch.Tensor,
    wx: torch.Tensor,
    consts: torch.Tensor,
    tables: dict,
    region: tuple[int, int, int, int],
    input_range: tuple[float, float],
    *,
    clip_each_pass: bool,
    use_masks: bool,
    qwen: tuple[int, int, int] | None,
    vertical_first: bool = False,
) -> torch.Tensor:
    """Launch the backward: grad of the images (B, 3, H, W) in images.dtype, one write per element.
    use_masks=False is the straight-through policy (images and mask are not read)."""
    B, C, H, W = images.shape
    Hc, Wc = wy.shape[0], wx.shape[0]
    grad_out = grad_out.contiguous()
    gx = torch.empty((B, C, H, W), device=images.device, dtype=images.dtype)
    if qwen is None:
        patch, merge, temporal, gw = 1, 1, 1, 1
    else:
        patch, merge, temporal = qwen
        gw = Wc // patch
    if use_masks and clip_each_pass and mask is None:
        raise ValueError("bridge_backward: the clip masks of the forward are needed (store_mask=True)")
    lo, hi = input_range
    Hv, Wv, sb, sc, sh, sw, wy_v, wx_v = _oriented(images, wy, wx, vertical_first)
    Hcv, Wcv = wy_v.shape[0], wx_v.shape[0]
    grid = (triton.cdiv(Wv, BLOCK), triton.cdiv(Hv, BLOCK), B * C)
    _bridge_bwd_kernel[grid](
        gx,
        grad_out,
        mask if mask is not None else grad_out,
        images,
        wy_v,
        wx_v,
        tables["oystart"],
        tables["oxstart"],
        consts,
        sb,
        sc,
        sh,
        sw,
        Hv,
        Wv,
        Hcv,
        Wcv,
        *region,
        float(lo),
        1.0 / (float(hi) - float(lo)),
        int(tables["n_oy"]),
        int(tables["n_ox"]),
        gw,
        patch,
        merge,
        Hc,
        Wc,
        W,
        B * C * Hc * Wc,
        USE_MASKS=use_masks,
        CLIP_PASS=clip_each_pass,
        TRANS=vertical_first,
        QWEN=qwen is not None,
        TEMPORAL=temporal,
        PRECISION=_precision(images.device),
        BLOCK_I=BLOCK,
        BLOCK_O=BLOCK,
        BLOCK_K=BLOCK,
        num_warps=4,
    )
    return gx
