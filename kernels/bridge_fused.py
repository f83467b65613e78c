"""The bridge's fused kernels (opt-in: `kernel="fused"`): both resampling passes of a direction in one launch,
no intermediate in memory.

A program reads the band its tile needs once (forward: the source pixels of a canvas tile; backward: the
grad_out rows and columns an image tile receives from), runs the first pass on it in registers and gathers
the second pass from that result with `tl.gather` (Triton's register gather, staged through shared memory
where it crosses warps). Same taps, same order, same fp32 FMAs as the two-pass kernels, so the same values
and the same side outputs (clip masks, clamp flags), bit for bit (tested under the interpreter, both
directions, every layout). Tiles are powers of two sized from the exact band widths `bridge_taps.tap_tables`
measures (S{axis}{n}); a band past `MAX_FUSED_BAND` elements does not fit a program's registers, and the
two-pass kernels run instead.

Memory traffic per direction: the input once and the output once, plus the halo rows and columns of
neighbouring tiles' bands (from L2): the one-read-one-write minimum up to the halo. Not yet measured on a
GPU: "auto" picks the two-pass kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .bridge_jit import _clamp01, _grad_images_epilogue, _load_grad_out, _read_u, _store_critic_input
from .bridge_taps import SPAN_TILES

MAX_FUSED_BAND = 1 << 15  # band elements of one fused program (registers); larger -> the two passes run
DEFAULT_TILE = (64, 128, 4)  # forward: (KH, KW, num_warps), the source band a program reads
DEFAULT_BWD_TILE = (32, 64, 8)  # backward: the canvas band of grad_out a program reads
_WARPS = (1, 2, 4, 8, 16, 32)


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
            t = _clamp01(t)
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
            t = _clamp01(t)
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
        acc = _clamp01(acc)
    _store_critic_input(
        out_ptr, acc, rows, cols, ok2, b, c, consts_ptr, Hc, Wc,
        reg_y0, reg_y1, reg_x0, reg_x1, gw, patch, merge, QWEN, TEMPORAL,
    )  # fmt: skip


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
def check_tile(tile, name: str = "fused_tile") -> tuple[int, int, int]:
    """`tile`: (KH, KW, num_warps), band rows and columns powers of two. Raises ValueError naming `name`."""
    try:
        kh, kw, nw = (int(v) for v in tile)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (KH, KW, num_warps) integers, got {tile!r}") from None
    if kh < 1 or kw < 1 or kh & (kh - 1) or kw & (kw - 1):
        raise ValueError(f"{name}: KH and KW must be powers of two, got {tile!r}")
    if nw not in _WARPS:
        raise ValueError(f"{name}: num_warps must be one of {_WARPS}, got {tile!r}")
    return kh, kw, nw


def fused_tiles(tables: dict, axis: str, n_out: int, band: int, min_tile: int) -> tuple[int, int]:
    """(tile, band) along one axis of a fused kernel: the longest power-of-two tile (at most 128, at most the
    axis rounded up) whose source band (`tap_tables`' S{axis}{n}, rounded up to a power of two) fits `band`,
    or `min_tile` where that is longer (its band then wider than `band`)."""
    cap = min(triton.next_power_of_2(max(n_out, 1)), SPAN_TILES[-1])
    fits = [n for n in SPAN_TILES if n <= cap and triton.next_power_of_2(tables[f"S{axis}{n}"]) <= band]
    n = max(fits[-1] if fits else 1, min(min_tile, cap))
    return n, triton.next_power_of_2(tables[f"S{axis}{n}"])


def fused_plan(tables: dict, shape: tuple[int, int], tile=None, backward: bool = False):
    """((tm, kh), (tn, kw), num_warps) of a fused kernel over a (rows, cols) grid of tiles: canvas tiles in
    the forward, image tiles in the backward; `tile` = (KH, KW, num_warps) or None (DEFAULT_TILE /
    DEFAULT_BWD_TILE; not yet tuned on a GPU). None where the band would pass MAX_FUSED_BAND: the two passes
    run instead."""
    if tile is None:
        tile = DEFAULT_BWD_TILE if backward else DEFAULT_TILE
    kh, kw, nw = tile
    ay, ax = ("TY", "TX") if backward else ("Y", "X")
    ty = fused_tiles(tables, ay, shape[0], kh, 8)
    tx = fused_tiles(tables, ax, shape[1], kw, 16)
    if ty[1] * tx[1] > MAX_FUSED_BAND:
        return None
    return ty, tx, nw


def forward(
    plan, out, m1, m2, flags, images, tables, consts, canvas, region, lo, inv, gw, patch, merge, temporal,
    *, clip, store_mask, qwen, vertical_first, gather,
):  # fmt: skip
    """The fused forward into the preallocated `out` (and side outputs when store_mask), tiles from `plan`
    (`fused_plan`); gather: first pass by `tl.gather` from the loaded band (else by gathered loads)."""
    B, C, H, W = images.shape
    Hc, Wc = canvas
    (tm, kh), (tn, kw), nw = plan
    d = out  # placeholder pointer for arguments a specialization does not read
    _fused_fwd_kernel[(triton.cdiv(Wc, tn), triton.cdiv(Hc, tm), B * C)](
        out, d if m1 is None else m1, d if m2 is None else m2, d if flags is None else flags, images,
        tables["ys"], tables["wy"], tables["xs"], tables["wx"], consts,
        *images.stride(), H, W, Hc, Wc, int(tables["KY"]), int(tables["KX"]), tm, tn,
        *region, lo, inv, gw, patch, merge,
        VF=vertical_first, CLIP=clip, STORE_MASK=store_mask, QWEN=qwen, TEMPORAL=temporal, GATHER1=gather,
        BM=tm, BN=tn, KH=kh, KW=kw, num_warps=nw,
    )  # fmt: skip


def backward(
    plan, gx, grad_out, m1, m2, flags, images, tables, consts, canvas, region, lo, inv, gw, patch, merge,
    temporal, *, clip, use_masks, qwen, vertical_first,
):  # fmt: skip
    """The fused backward into the preallocated gx (B, 3, H, W) contiguous, tiles from `plan`."""
    B, C, H, W = images.shape
    Hc, Wc = canvas
    (tm, kh), (tn, kw), nw = plan
    d = gx  # placeholder pointer for arguments a specialization does not read
    _fused_bwd_kernel[(triton.cdiv(W, tn), triton.cdiv(H, tm), B * C)](
        gx, grad_out, d if m1 is None else m1, d if m2 is None else m2, d if flags is None else flags, images,
        tables["oys"], tables["wyT"], tables["oxs"], tables["wxT"], consts,
        *images.stride(), H, W, Hc, Wc, int(tables["KTY"]), int(tables["KTX"]),
        *region, lo, inv, gw, patch, merge,
        VF=vertical_first, USE_MASKS=use_masks, CLIP=clip, QWEN=qwen, TEMPORAL=temporal,
        BM=tm, BN=tn, KH=kh, KW=kw, num_warps=nw,
    )  # fmt: skip
