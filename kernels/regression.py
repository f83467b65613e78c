"""Fused multi-term regression: every term's loss sums AND every pred's gradient in one Triton launch.

Math, per term t with pred p, target y, broadcast mask m (default 1) and weight w (default 1):
    mse:        l = (p - y)^2                                   dl/dp = 2 (p - y)
    smooth_l1:  l = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta   (d = p - y; beta = 0 is L1)
                dl/dp = d / beta if |d| < beta else sign(d)
    cosine:     per row r over the last dim: l_r = 1 - <p_r, y_r> / (max(|p_r|, eps) max(|y_r|, eps));
                m and w are per row.
Each program writes ONE partial (num, den) = (s sum(w m l), sum(m)) of its term (the mask broadcast to the
loss's shape: elements, or rows for cosine), and the gradients g = s w m dl/dp, not yet divided by the mask
sum (and -g, or the cosine target formula, for a target that needs a gradient); s is the term's float weight. `_finish_kernel` turns
the partials into the per-term losses num / den and their total; `_scale_grads_kernel` (the backward)
multiplies each saved gradient by d total / d num = grad_output / den.

Launch: one launch for up to MAX_TERMS terms (more terms: one launch per MAX_TERMS). Each term is a slot of
plain kernel arguments (tensors, sizes, strides, floats) plus compile-time flags (kind, mask / weight
layout, which gradients, block sizes), so Triton specializes every term: alignment and divisibility of the
pointers, sizes and strides come from its argument specialization (16-byte vector loads, no hints needed),
and no descriptor table travels to the device. Each program serves one term (the slot dispatch runs once
per program) and walks that term's tiles with a grid stride, keeping its sums in registers; the grid is
either one program per `group` tiles (the default: the hardware scheduler balances terms of unequal cost)
or persistent (SMs x programs per SM, shared among the terms in proportion to their sizes).

Paths per term (chosen by the host, `term_settings`):
- mse / smooth_l1: (BLOCK_R, BLOCK_D) tiles of a (R, D) view with a unit column stride. The fast case
  (R % BLOCK_R == 0 and D % BLOCK_D == 0, BLOCK_D a power of two dividing D) has no bounds masks; a term
  with no mask and no weight tensor that is contiguous is viewed as (numel / D', D') with a convenient D'.
  Masks / weights: per row (a column stride of 0: one load per tile row) or (R, D) with a unit column stride.
- cosine: (BLOCK_R, next_pow2(D)) row blocks, each row read once and kept in registers for the gradient;
  rows wider than `cos_max_d` take two passes over D chunks (the second read mostly hits L2).
Index math: a tile's base offset in int64 (a scalar), the offsets inside a tile in int32.

Memory traffic (the aim): read pred + target (+ mask / weight at their broadcast size), write the gradient;
the backward reads and writes the gradient once more.

Follows: the multi-tensor launch of PyTorch's `multi_tensor_apply` (several tensors' arguments in one launch)
and the gradient-in-forward trick of Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

MAX_TERMS = 4  # term slots of one forward launch (and gradient slots of one backward launch)
# aux (mask / weight) layouts of a term, as the kernel takes them
AUX_NONE, AUX_ROW, AUX_2D = 0, 1, 2


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _load(ptr, ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.load(ptr, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, val, ok, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr, val.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _elementwise_term(
    out_ptr,  # this program's (num, den)
    q,  # this program's index among the NP programs of the term
    NP,
    P,
    Y,
    G,
    GY,
    M,
    W,  # pred, target, grad, target grad, mask, weight
    R,
    D,  # the (R, D) view
    SP,
    SY,
    SM,
    SW,  # row strides of pred, target, mask, weight (columns: unit stride, 0 for AUX_ROW)
    beta,
    scale,
    KIND: tl.constexpr,
    M_MODE: tl.constexpr,
    W_MODE: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GY: tl.constexpr,
    EVEN: tl.constexpr,  # R % BLOCK_R == 0 and D % BLOCK_D == 0: no bounds masks
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n_cb = tl.cdiv(D, BLOCK_D)
    n_items = tl.cdiv(R, BLOCK_R) * n_cb
    r_loc = tl.arange(0, BLOCK_R)
    c_loc = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)  # sum of w m l (s applied at the end)
    den2 = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)  # AUX_2D mask sums
    den1 = tl.zeros((BLOCK_R,), tl.float32)  # AUX_ROW mask sums x valid columns
    inv_beta = 1.0 / tl.maximum(beta, 1e-30)  # beta = 0: |d| < 0 never holds, this branch is unused
    for i in range(q, n_items, NP):
        rb = i // n_cb
        cb = i - rb * n_cb
        row0 = tl.cast(rb, tl.int64) * BLOCK_R
        col0 = cb * BLOCK_D
        row_ok = r_loc < R - row0
        col_ok = c_loc < D - col0
        ok = row_ok[:, None] & col_ok[None, :]
        p = _load(P + (row0 * SP + col0) + (r_loc[:, None] * SP + c_loc[None, :]), ok, EVEN)
        y = _load(Y + (row0 * SY + col0) + (r_loc[:, None] * SY + c_loc[None, :]), ok, EVEN)
        d = p - y
        if KIND == 0:
            l = d * d
            dl = 2.0 * d
        else:
            ad = tl.abs(d)
            small = ad < beta
            l = tl.where(small, 0.5 * d * d * inv_beta, ad - 0.5 * beta)
            dl = tl.where(small, d * inv_beta, tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)))
        # masked-off lanes load p = y = 0, so l = dl = 0 there
        if M_MODE == 1:
            m1 = _load(M + row0 * SM + r_loc * SM, row_ok, EVEN)
            den1 += m1 * tl.minimum(D - col0, BLOCK_D)
            l = l * m1[:, None]
            dl = dl * m1[:, None]
        elif M_MODE == 2:
            m2 = _load(M + (row0 * SM + col0) + (r_loc[:, None] * SM + c_loc[None, :]), ok, EVEN)
            den2 += m2
            l = l * m2
            dl = dl * m2
        if W_MODE == 1:
            w1 = _load(W + row0 * SW + r_loc * SW, row_ok, EVEN)
            l = l * w1[:, None]
            dl = dl * w1[:, None]
        elif W_MODE == 2:
            w2 = _load(W + (row0 * SW + col0) + (r_loc[:, None] * SW + c_loc[None, :]), ok, EVEN)
            l = l * w2
            dl = dl * w2
        acc += l
        g_offs = (row0 * D + col0) + (r_loc[:, None] * D + c_loc[None, :])  # the gradient is contiguous
        if HAS_G:
            _store(G + g_offs, dl * scale, ok, EVEN)
        if HAS_GY:
            _store(GY + g_offs, dl * (-scale), ok, EVEN)
    if M_MODE == 0:
        den = tl.where(q == 0, R * 1.0 * D, 0.0)  # R * 1.0: float math (R or D may be a constexpr 1)
    elif M_MODE == 1:
        den = tl.sum(den1, axis=0)
    else:
        den = tl.sum(tl.sum(den2, axis=1), axis=0)
    tl.store(out_ptr, tl.sum(tl.sum(acc, axis=1), axis=0) * scale)
    tl.store(out_ptr + 1, den)


@triton.jit
def _cosine_term(
    out_ptr,
    q,
    NP,
    P,
    Y,
    G,
    GY,
    M,
    W,
    R,
    D,
    SP,
    SY,
    SM,  # row stride of the (R,) mask / weight
    SW,
    scale,
    M_MODE: tl.constexpr,  # AUX_NONE or AUX_ROW
    W_MODE: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GY: tl.constexpr,
    ONE_PASS: tl.constexpr,  # D <= BLOCK_D: each row is read once and kept in registers
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EPS: tl.constexpr,
):
    n_items = tl.cdiv(R, BLOCK_R)
    r_loc = tl.arange(0, BLOCK_R)
    c_loc = tl.arange(0, BLOCK_D)
    num1 = tl.zeros((BLOCK_R,), tl.float32)
    den1 = tl.zeros((BLOCK_R,), tl.float32)
    for i in range(q, n_items, NP):
        row0 = tl.cast(i, tl.int64) * BLOCK_R
        row_ok = r_loc < R - row0
        p_row = P + row0 * SP + r_loc[:, None] * SP
        y_row = Y + row0 * SY + r_loc[:, None] * SY
        if ONE_PASS:
            ok = row_ok[:, None] & (c_loc < D)[None, :]
            p = tl.load(p_row + c_loc[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_row + c_loc[None, :], mask=ok, other=0.0).to(tl.float32)
            dot = tl.sum(p * y, axis=1)
            pp = tl.sum(p * p, axis=1)
            yy = tl.sum(y * y, axis=1)
        else:
            dot = tl.zeros((BLOCK_R,), tl.float32)
            pp = tl.zeros((BLOCK_R,), tl.float32)
            yy = tl.zeros((BLOCK_R,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                okc = row_ok[:, None] & (c_loc < D - d0)[None, :]
                pc = tl.load(p_row + d0 + c_loc[None, :], mask=okc, other=0.0).to(tl.float32)
                yc = tl.load(y_row + d0 + c_loc[None, :], mask=okc, other=0.0).to(tl.float32)
                dot += tl.sum(pc * yc, axis=1)
                pp += tl.sum(pc * pc, axis=1)
                yy += tl.sum(yc * yc, axis=1)
        na = tl.sqrt(pp)
        nb = tl.sqrt(yy)
        a = tl.maximum(na, EPS)
        b = tl.maximum(nb, EPS)
        inv_ab = 1.0 / (a * b)
        cos = dot * inv_ab
        if M_MODE == 1:
            m = tl.load(M + row0 * SM + r_loc * SM, mask=row_ok, other=0.0).to(tl.float32)
        else:
            m = tl.where(row_ok, 1.0, 0.0)
        wm = m
        if W_MODE == 1:
            wm = m * tl.load(W + row0 * SW + r_loc * SW, mask=row_ok, other=0.0).to(tl.float32)
        num1 += wm * (1.0 - cos)
        den1 += m
        # d(1 - cos)/dp = [|p| > eps] cos p / a^2 - y / (a b), and symmetrically for y
        f = wm * scale
        cp = tl.where(na > EPS, cos / (a * a), 0.0)
        cy = tl.where(nb > EPS, cos / (b * b), 0.0)
        g_row = row0 * D + r_loc[:, None] * D
        if ONE_PASS:
            if HAS_G:
                gp = f[:, None] * (cp[:, None] * p - inv_ab[:, None] * y)
                tl.store(G + g_row + c_loc[None, :], gp.to(G.dtype.element_ty), mask=ok)
            if HAS_GY:
                gy = f[:, None] * (cy[:, None] * y - inv_ab[:, None] * p)
                tl.store(GY + g_row + c_loc[None, :], gy.to(GY.dtype.element_ty), mask=ok)
        else:
            if HAS_G or HAS_GY:
                for d0 in range(0, D, BLOCK_D):
                    okc = row_ok[:, None] & (c_loc < D - d0)[None, :]
                    pc = tl.load(p_row + d0 + c_loc[None, :], mask=okc, other=0.0).to(tl.float32)
                    yc = tl.load(y_row + d0 + c_loc[None, :], mask=okc, other=0.0).to(tl.float32)
                    if HAS_G:
                        gp = f[:, None] * (cp[:, None] * pc - inv_ab[:, None] * yc)
                        tl.store(G + g_row + d0 + c_loc[None, :], gp.to(G.dtype.element_ty), mask=okc)
                    if HAS_GY:
                        gy = f[:, None] * (cy[:, None] * yc - inv_ab[:, None] * pc)
                        tl.store(GY + g_row + d0 + c_loc[None, :], gy.to(GY.dtype.element_ty), mask=okc)
    tl.store(out_ptr, tl.sum(num1, axis=0) * scale)
    tl.store(out_ptr + 1, tl.sum(den1, axis=0))


# fmt: off
# (the argument lists below keep one term slot per line, so that the slots read side by side)
@triton.jit
def _term_program(
    out_ptr, q, NP, P, Y, G, GY, M, W, R, D, SP, SY, SM, SW, beta, scale,
    KIND: tl.constexpr, M_MODE: tl.constexpr, W_MODE: tl.constexpr, HAS_G: tl.constexpr,
    HAS_GY: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    EPS: tl.constexpr,
):
    if KIND == 2:
        _cosine_term(
            out_ptr, q, NP, P, Y, G, GY, M, W, R, D, SP, SY, SM, SW, scale,
            M_MODE, W_MODE, HAS_G, HAS_GY, FAST, BLOCK_R, BLOCK_D, EPS,
        )
    else:
        _elementwise_term(
            out_ptr, q, NP, P, Y, G, GY, M, W, R, D, SP, SY, SM, SW, beta, scale,
            KIND, M_MODE, W_MODE, HAS_G, HAS_GY, FAST, BLOCK_R, BLOCK_D,
        )


@triton.jit
def _fused_regression_kernel(
    part_ptr,  # (n_programs, 2) float32 out: each program's (num, den), programs of term k after term k-1's
    # term slot k (k < NUM_TERMS): pred, target, grad, target grad, mask, weight (None where absent), R, D of
    # the (R, D) view, row strides of pred / target / mask / weight, smooth_l1 beta, the term's float weight,
    # its number of programs; then its flags (kind, mask / weight mode, grads, FAST, BLOCK_R, BLOCK_D)
    P0, Y0, G0, GY0, M0, W0, R0, D0, SP0, SY0, SM0, SW0, BETA0, SCALE0, NP0,
    P1, Y1, G1, GY1, M1, W1, R1, D1, SP1, SY1, SM1, SW1, BETA1, SCALE1, NP1,
    P2, Y2, G2, GY2, M2, W2, R2, D2, SP2, SY2, SM2, SW2, BETA2, SCALE2, NP2,
    P3, Y3, G3, GY3, M3, W3, R3, D3, SP3, SY3, SM3, SW3, BETA3, SCALE3, NP3,
    K0: tl.constexpr, MM0: tl.constexpr, WM0: tl.constexpr, HG0: tl.constexpr, HGY0: tl.constexpr,
    F0: tl.constexpr, BR0: tl.constexpr, BD0: tl.constexpr,
    K1: tl.constexpr, MM1: tl.constexpr, WM1: tl.constexpr, HG1: tl.constexpr, HGY1: tl.constexpr,
    F1: tl.constexpr, BR1: tl.constexpr, BD1: tl.constexpr,
    K2: tl.constexpr, MM2: tl.constexpr, WM2: tl.constexpr, HG2: tl.constexpr, HGY2: tl.constexpr,
    F2: tl.constexpr, BR2: tl.constexpr, BD2: tl.constexpr,
    K3: tl.constexpr, MM3: tl.constexpr, WM3: tl.constexpr, HG3: tl.constexpr, HGY3: tl.constexpr,
    F3: tl.constexpr, BR3: tl.constexpr, BD3: tl.constexpr,
    NUM_TERMS: tl.constexpr,
    EPS: tl.constexpr,  # cosine norm floor
):
    # each program serves one term: this dispatch runs once per program, not per tile
    pid = tl.program_id(0)
    out = part_ptr + pid * 2
    if pid < NP0:
        _term_program(
            out, pid, NP0, P0, Y0, G0, GY0, M0, W0, R0, D0, SP0, SY0, SM0, SW0, BETA0, SCALE0,
            K0, MM0, WM0, HG0, HGY0, F0, BR0, BD0, EPS,
        )
    if NUM_TERMS > 1:
        s1 = NP0
        if (pid >= s1) & (pid < s1 + NP1):
            _term_program(
                out, pid - s1, NP1, P1, Y1, G1, GY1, M1, W1, R1, D1, SP1, SY1, SM1, SW1, BETA1, SCALE1,
                K1, MM1, WM1, HG1, HGY1, F1, BR1, BD1, EPS,
            )
        if NUM_TERMS > 2:
            s2 = s1 + NP1
            if (pid >= s2) & (pid < s2 + NP2):
                _term_program(
                    out, pid - s2, NP2, P2, Y2, G2, GY2, M2, W2, R2, D2, SP2, SY2, SM2, SW2, BETA2, SCALE2,
                    K2, MM2, WM2, HG2, HGY2, F2, BR2, BD2, EPS,
                )
            if NUM_TERMS > 3:
                s3 = s2 + NP2
                if pid >= s3:
                    _term_program(
                        out, pid - s3, NP3, P3, Y3, G3, GY3, M3, W3, R3, D3, SP3, SY3, SM3, SW3, BETA3,
                        SCALE3, K3, MM3, WM3, HG3, HGY3, F3, BR3, BD3, EPS,
                    )
# fmt: on


@triton.jit
def _sum_parts(part_ptr, start, n, BLOCK: tl.constexpr):
    """(sum of num, sum of den) over programs [start, start + n), in a fixed order (deterministic)."""
    offs = tl.arange(0, BLOCK)
    num = tl.zeros((BLOCK,), tl.float32)
    den = tl.zeros((BLOCK,), tl.float32)
    for o in range(0, n, BLOCK):
        ok = offs < n - o
        base = part_ptr + (start + o) * 2 + offs * 2
        num += tl.load(base, mask=ok, other=0.0)
        den += tl.load(base + 1, mask=ok, other=0.0)
    return tl.sum(num, axis=0), tl.sum(den, axis=0)


@triton.jit
def _finish_term(stats_ptr, part_ptr, start, n, t, T_ALL, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    num, den = _sum_parts(part_ptr, start, n, BLOCK)
    loss = num
    if MEAN:
        loss = num / tl.where(den > 0, den, 1.0)  # an all-zero mask gives 0, not NaN
    tl.store(stats_ptr + t, loss)
    tl.store(stats_ptr + T_ALL + t, den)
    return loss


@triton.jit
def _finish_kernel(
    total_ptr,  # () float32 out: the sum of every term's loss (written by the last launch's finish)
    stats_ptr,  # (2 T_ALL,) float32 out: per-term loss (num / den, or num), then per-term den
    part_ptr,  # (n_programs, 2) float32: the forward launch's partials
    NP0,
    NP1,
    NP2,
    NP3,  # programs of each term slot of that launch
    T_OFF,  # index of the launch's first term
    T_ALL,  # all terms of the op
    NUM_TERMS: tl.constexpr,
    MEAN: tl.constexpr,  # loss = num / den (else num)
    LAST: tl.constexpr,  # the op's last launch: also write the total
    BLOCK: tl.constexpr,
):
    total = _finish_term(stats_ptr, part_ptr, 0, NP0, T_OFF, T_ALL, MEAN, BLOCK)
    if NUM_TERMS > 1:
        total += _finish_term(stats_ptr, part_ptr, NP0, NP1, T_OFF + 1, T_ALL, MEAN, BLOCK)
    if NUM_TERMS > 2:
        total += _finish_term(stats_ptr, part_ptr, NP0 + NP1, NP2, T_OFF + 2, T_ALL, MEAN, BLOCK)
    if NUM_TERMS > 3:
        total += _finish_term(stats_ptr, part_ptr, NP0 + NP1 + NP2, NP3, T_OFF + 3, T_ALL, MEAN, BLOCK)
    if LAST:
        offs = tl.arange(0, BLOCK)
        prev = tl.zeros((BLOCK,), tl.float32)
        for o in range(0, T_OFF, BLOCK):  # losses of earlier launches (stream order makes them visible)
            prev += tl.load(stats_ptr + o + offs, mask=offs < T_OFF - o, other=0.0)
        tl.store(total_ptr, total + tl.sum(prev, axis=0))


# fmt: off
@triton.jit
def _scale_block(
    out_ptr, src_ptr, n, t, blk, gtotal_ptr, gstats_ptr, stats_ptr, T_ALL,
    HAS_GTOTAL: tl.constexpr, HAS_GSTATS: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    mult = 0.0
    if HAS_GTOTAL:
        mult += tl.load(gtotal_ptr)
    if HAS_GSTATS:
        mult += tl.load(gstats_ptr + t)
    if MEAN:
        den = tl.load(stats_ptr + T_ALL + t)
        mult = mult / tl.where(den > 0, den, 1.0)
    offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * mult).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_grads_kernel(
    # gradient slot k (k < NUM): out, saved gradient (contiguous, numel n), its term index
    O0, S0, N0, T0,
    O1, S1, N1, T1,
    O2, S2, N2, T2,
    O3, S3, N3, T3,
    gtotal_ptr,  # () float32: d out / d total (None: unused)
    gstats_ptr,  # (2 T_ALL,) float32: d out / d stats (None: unused)
    stats_ptr,  # (2 T_ALL,) float32: the forward's stats (the den of each term)
    T_ALL,
    NUM: tl.constexpr,
    HAS_GTOTAL: tl.constexpr,
    HAS_GSTATS: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out_k = saved_k * (d total + d loss_t) / den_t: one read + write of each gradient, one launch."""
    pid = tl.program_id(0)
    b1 = tl.cdiv(N0, BLOCK)
    if pid < b1:
        _scale_block(O0, S0, N0, T0, pid, gtotal_ptr, gstats_ptr, stats_ptr, T_ALL,
                     HAS_GTOTAL, HAS_GSTATS, MEAN, BLOCK)
    if NUM > 1:
        b2 = b1 + tl.cdiv(N1, BLOCK)
        if (pid >= b1) & (pid < b2):
            _scale_block(O1, S1, N1, T1, pid - b1, gtotal_ptr, gstats_ptr, stats_ptr, T_ALL,
                         HAS_GTOTAL, HAS_GSTATS, MEAN, BLOCK)
        if NUM > 2:
            b3 = b2 + tl.cdiv(N2, BLOCK)
            if (pid >= b2) & (pid < b3):
                _scale_block(O2, S2, N2, T2, pid - b2, gtotal_ptr, gstats_ptr, stats_ptr, T_ALL,
                             HAS_GTOTAL, HAS_GSTATS, MEAN, BLOCK)
            if NUM > 3:
                if pid >= b3:
                    _scale_block(O3, S3, N3, T3, pid - b3, gtotal_ptr, gstats_ptr, stats_ptr, T_ALL,
                                 HAS_GTOTAL, HAS_GSTATS, MEAN, BLOCK)
# fmt: on


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class RegressionConfig:
    """Launch settings of the fused regression kernels, passed by the op (`uno_engine.ops.regression.
    kernel_config`: an override, the environment's UNO_REGRESSION_CONFIG, or these defaults).

    Defaults from the H200 sweep (`bench_regression.py --configs`, 3 bf16 terms of 32x729x1152; results in
    benchmarks/results/bench_regression-nvidia_h200.*): tile 2048, cos_tile 2048, 4 warps, group 8 reached
    86% of the copy bandwidth, ahead of larger tiles, 8 warps, fewer groups and per_sm=-1."""

    tile: int = 2048  # elements of an mse / smooth_l1 tile (BLOCK_R x BLOCK_D)
    cos_tile: int = 2048  # lanes of a cosine tile (BLOCK_R x next_pow2(D))
    cos_max_d: int = 8192  # widest cosine row held in registers (one read); wider rows take two passes
    num_warps: int = 4
    # forward grid: per_sm > 0: SMs x per_sm programs striding over the tiles (persistent); -1: as many per
    # SM as fit (from the compiled kernel's registers, learned on the first call); 0: one program per `group`
    # tiles (the hardware scheduler balances the terms)
    per_sm: int = 0
    group: int = 8
    bwd_block: int = 4096  # elements per program of the backward scale

    def __post_init__(self):
        for f in ("tile", "cos_tile", "cos_max_d", "num_warps", "bwd_block"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"RegressionConfig.{f} must be a power of two >= 1, got {v}")
        if self.per_sm < -1 or self.group < 1:
            raise ValueError(f"RegressionConfig: per_sm must be >= -1 and group >= 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> RegressionConfig:
        """'tile=8192,num_warps=4,per_sm=0' (any subset of the fields; the rest keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, val = item.partition("=")
            if not sep or key.strip() not in names:
                raise ValueError(
                    f"bad regression config item {item!r}: expected NAME=INT, NAME in {sorted(names)}"
                )
            kw[key.strip()] = int(val)
        return cls(**kw)

    def label(self) -> str:
        """The fields that differ from the defaults ('default' if none)."""
        base = RegressionConfig()
        diff = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        ]
        return ",".join(diff) or "default"


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (n > 0)."""
    return min(n & -n, cap)


def term_settings(kind: int, R: int, D: int, config: RegressionConfig) -> tuple[int, int, bool]:
    """(BLOCK_R, BLOCK_D, FAST) of one term of the (R, D) view.

    mse / smooth_l1: BLOCK_D the largest power of two (<= 512) dividing D when D % 16 == 0 (then no column
    masks), else the largest of 128 / 64 / 32 / 16 that wastes at most ~12% of the last chunk's lanes;
    BLOCK_R = tile / BLOCK_D (not past R's power of two). FAST: no bounds masks at all.
    cosine: BLOCK_D = next_pow2(D) up to cos_max_d (FAST: one read of each row), else cos_max_d-wide chunks;
    BLOCK_R = cos_tile / BLOCK_D."""
    R, D = max(int(R), 1), max(int(D), 1)
    if kind == 2:
        block_d = triton.next_power_of_2(D)
        one_pass = block_d <= config.cos_max_d
        block_d = min(block_d, config.cos_max_d)
        block_r = max(1, min(config.cos_tile // block_d, triton.next_power_of_2(R)))
        return block_r, block_d, one_pass
    if D % 16 == 0:
        block_d = pow2_divisor(D, min(512, config.tile))
    else:
        block_d = min(triton.next_power_of_2(D), 128, config.tile)
        while block_d > 16 and D / (triton.cdiv(D, block_d) * block_d) < 0.88:
            block_d //= 2
    block_r = max(1, min(config.tile // block_d, triton.next_power_of_2(R)))
    return block_r, block_d, R % block_r == 0 and D % block_d == 0


def n_tiles(kind: int, R: int, D: int, block_r: int, block_d: int) -> int:
    """Work items of a term: tiles (mse / smooth_l1) or row blocks (cosine)."""
    if R <= 0 or D <= 0:
        return 0
    return triton.cdiv(R, block_r) * (1 if kind == 2 else triton.cdiv(D, block_d))


def split_programs(work: list[int], tiles: list[int], n_programs: int, group: int) -> list[int]:
    """Programs per term: n_programs > 0 shared in proportion to `work` (elements), at least 1 and at most
    the term's tiles each; n_programs = 0: one program per `group` tiles."""
    if n_programs <= 0:
        return [max(1, triton.cdiv(t, group)) for t in tiles]
    total = max(sum(work), 1)
    return [max(1, min(t, round(n_programs * w / total))) for w, t in zip(work, tiles, strict=True)]


def resident_programs(
    kernel, num_warps: int, regs_per_sm: int = 65536, threads_per_sm: int = 2048
) -> int | None:
    """Programs of a compiled kernel that fit on one SM at once (registers, threads, shared memory), or
    None when the launch returned no compiled kernel (the interpreter)."""
    n_regs = getattr(kernel, "n_regs", None)
    if not n_regs:
        return None
    warp_regs = triton.cdiv(n_regs * 32, 256) * 256  # registers are allocated per warp in 256s
    fit = min(regs_per_sm // (warp_regs * num_warps), threads_per_sm // (32 * num_warps), 32)
    shared = getattr(getattr(kernel, "metadata", None), "shared", 0) or 0
    if shared:
        fit = min(fit, (228 * 1024) // shared)
    return max(1, fit)


# ------------------------------------------------------------------------------------------------ launchers
_EMPTY_SLOT = (None,) * 6 + (1, 1, 0, 0, 0, 0, 0.0, 0.0, 1)  # an unused term slot's arguments
_EMPTY_FLAGS = (0, 0, 0, False, False, False, 1, 16)


def launch_forward(
    part, slots: list[tuple], flags: list[tuple], n_programs: int, num_warps: int, cosine_eps: float
):
    """One forward launch over up to MAX_TERMS terms.

    part: (n_programs, 2) float32 (every entry written); slots[k]: the term's 15 runtime arguments (see
    `_fused_regression_kernel`); flags[k]: its 8 compile-time flags (kind, mask mode, weight mode, grad,
    target grad, FAST, BLOCK_R, BLOCK_D); cosine_eps: the floor of the cosine kind's norms (the op passes
    `uno_engine.eager.COSINE_EPS`, the one definition). Returns what Triton returns (the compiled kernel on a
    GPU)."""
    n = len(slots)
    args = [part]
    for k in range(MAX_TERMS):
        args += slots[k] if k < n else _EMPTY_SLOT
    for k in range(MAX_TERMS):
        args += flags[k] if k < n else _EMPTY_FLAGS
    return _fused_regression_kernel[(n_programs,)](*args, n, cosine_eps, num_warps=num_warps)


def launch_finish(total, stats, part, nps: list[int], t_off: int, t_all: int, mean: bool, last: bool) -> None:
    """Per-term losses (and, on the last launch, the total) from one forward launch's partials."""
    n = len(nps)
    nps = list(nps) + [0] * (MAX_TERMS - n)
    _finish_kernel[(1,)](total, stats, part, *nps, t_off, t_all, n, mean, last, 1024, num_warps=4)


def launch_scale(outs, srcs, terms, g_total, g_stats, stats, t_all: int, mean: bool, block: int) -> None:
    """outs[k] = srcs[k] * (g_total + g_stats[terms[k]]) / den (up to MAX_TERMS gradients in one launch)."""
    n = len(outs)
    args, n_blocks = [], 0
    for k in range(MAX_TERMS):
        if k < n:
            numel = srcs[k].numel()
            args += [outs[k], srcs[k], numel, terms[k]]
            n_blocks += triton.cdiv(numel, block)
        else:
            args += [None, None, 0, 0]
    _scale_grads_kernel[(max(n_blocks, 1),)](
        *args,
        g_total,
        g_stats,
        stats,
        t_all,
        n,
        g_total is not None,
        g_stats is not None,
        mean,
        block,
        num_warps=8 if block >= 2048 else 4,
    )
