"""Fused multi-term regression: every term's loss sums AND every pred's gradient in one Triton launch.

Math, per term t with pred p, target y, broadcast mask m (default 1) and elementwise weight w (default 1):
    mse:        l = (p - y)^2                                   dl/dp = 2 (p - y)
    smooth_l1:  l = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta   (d = p - y; beta = 0 is L1)
                dl/dp = d / beta if |d| < beta else sign(d)
    cosine:     per row r over the last dim: l_r = 1 - <p_r, y_r> / (max(|p_r|, eps) max(|y_r|, eps));
                m and w are per row.
The kernel writes, per work item, the partial sums  num_t = sum(s w m l)  and  den_t = sum(m)  (the mask
broadcast to the loss's shape: elements, or rows for cosine), and the UNSCALED gradients
g_t = s w m dl/dp (and -s w m dl/dy, or the cosine target formula, when the target needs a gradient).
The host turns num/den into losses; autograd scales g_t by d total / d num_t in backward.

Launch: ONE launch for all terms that share (pred dtype, target dtype). Each term is a row of an int64
descriptor table (addresses, sizes, strides, kind, output row) plus (beta, scale) in a float32 table; a
persistent grid (SMs x 16 programs) walks the (term, row block) work items, so terms of different shapes
and kinds share the launch. Terms are viewed as (R, D) with a unit last-dim stride; masks and weights are
float32 with any (row, col) strides (0 for broadcast dims). The float term weight s is folded into num and g.

Memory traffic (the aim): read pred + target (+ mask/weight at their broadcast size), write grad: one
pass. Cosine reads each row twice (the second read hits L1/L2 for rows of a few KB).

Follows: the pointer-table multi-tensor launch of PyTorch's `multi_tensor_apply` (apex), and the
gradient-in-forward trick of Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_IDS = {"mse": 0, "smooth_l1": 1, "cosine": 2}

# descriptor columns (int64)
D_PRED, D_TGT, D_GRAD, D_TGRAD, D_MASK, D_WEIGHT = 0, 1, 2, 3, 4, 5
D_R, D_D, D_S_PR, D_S_TR, D_S_MR, D_S_MD, D_S_WR, D_S_WD, D_KIND, D_OUT_ROW = (
    6,
    7,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
)
N_DESC = 16


@triton.jit
def _term_block(
    part_ptr,
    desc_ptr,
    fpar_ptr,
    pred_witness_ptr,
    tgt_witness_ptr,
    mask_witness_ptr,
    t,
    pid_r,
    part_stride,
    eps,
    N_DESC: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [pid_r * BLOCK_R, +BLOCK_R) of the launch's term t: partial (num, den) and the gradients."""
    base = desc_ptr + t * N_DESC
    p_addr = tl.load(base + 0)
    y_addr = tl.load(base + 1)
    g_addr = tl.load(base + 2)
    gy_addr = tl.load(base + 3)
    m_addr = tl.load(base + 4)
    w_addr = tl.load(base + 5)
    R = tl.load(base + 6)
    D = tl.load(base + 7)
    s_pr = tl.load(base + 8)
    s_yr = tl.load(base + 9)
    s_mr = tl.load(base + 10)
    s_md = tl.load(base + 11)
    s_wr = tl.load(base + 12)
    s_wd = tl.load(base + 13)
    kind = tl.load(base + 14)
    out_row = tl.load(base + 15)
    beta = tl.load(fpar_ptr + t * 2)
    scale = tl.load(fpar_ptr + t * 2 + 1)  # the term's float weight, folded into num and the gradients

    p_ptr = p_addr.to(pred_witness_ptr.dtype)
    y_ptr = y_addr.to(tgt_witness_ptr.dtype)
    g_ptr = g_addr.to(pred_witness_ptr.dtype)
    gy_ptr = gy_addr.to(tgt_witness_ptr.dtype)
    m_ptr = m_addr.to(mask_witness_ptr.dtype)
    w_ptr = w_addr.to(mask_witness_ptr.dtype)
    if ALIGNED:
        # addresses come from memory, so Triton cannot see their alignment: say it (the launcher checked), so
        # loads and stores are 16-byte vectors and `cols < D` is constant over 8 lanes (checked in the PTX:
        # without these hints every bf16 element is its own 2-byte load). The hint must sit on the pointer
        # after the int -> pointer cast; on the int it is lost.
        p_ptr = tl.multiple_of(p_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        gy_ptr = tl.multiple_of(gy_ptr, 16)
        D = tl.multiple_of(D, 8)
        s_pr = tl.multiple_of(s_pr, 8)
        s_yr = tl.multiple_of(s_yr, 8)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    cols0 = tl.arange(0, BLOCK_D).to(tl.int64)
    num = tl.zeros((BLOCK_R,), tl.float32)
    den = tl.zeros((BLOCK_R,), tl.float32)

    if kind == 2:
        # ---- cosine: pass 1 reduces <p,y>, |p|^2, |y|^2 per row; pass 2 writes the gradients
        dot = tl.zeros((BLOCK_R,), tl.float32)
        pp = tl.zeros((BLOCK_R,), tl.float32)
        yy = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cols0
            ok = row_ok[:, None] & (cols < D)[None, :]
            p = tl.load(p_ptr + rows[:, None] * s_pr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * s_yr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dot += tl.sum(p * y, axis=1)
            pp += tl.sum(p * p, axis=1)
            yy += tl.sum(y * y, axis=1)
        np_ = tl.sqrt(pp)
        ny = tl.sqrt(yy)
        a = tl.maximum(np_, eps)
        b = tl.maximum(ny, eps)
        inv_ab = 1.0 / (a * b)
        cos = dot * inv_ab
        m = tl.where(row_ok, 1.0, 0.0)
        if m_addr != 0:
            m = tl.load(m_ptr + rows * s_mr, mask=row_ok, other=0.0)
        w = tl.full((BLOCK_R,), 1.0, tl.float32)
        if w_addr != 0:
            w = tl.load(w_ptr + rows * s_wr, mask=row_ok, other=0.0)
        wm = w * m * scale
        num += tl.where(row_ok, wm * (1.0 - cos), 0.0)
        den += m
        if WRITE_GRAD:
            # d(1 - cos)/dp = -(y / (a b) - [|p| > eps] cos p / a^2), and symmetrically for y
            cp = tl.where(np_ > eps, cos / (a * a), 0.0)
            cy = tl.where(ny > eps, cos / (b * b), 0.0)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + cols0
                ok = row_ok[:, None] & (cols < D)[None, :]
                p = tl.load(p_ptr + rows[:, None] * s_pr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + rows[:, None] * s_yr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                if g_addr != 0:
                    gp = -wm[:, None] * (y * inv_ab[:, None] - cp[:, None] * p)
                    tl.store(
                        g_ptr + rows[:, None] * D + cols[None, :], gp.to(g_ptr.dtype.element_ty), mask=ok
                    )
                if gy_addr != 0:
                    gy = -wm[:, None] * (p * inv_ab[:, None] - cy[:, None] * y)
                    tl.store(
                        gy_ptr + rows[:, None] * D + cols[None, :], gy.to(gy_ptr.dtype.element_ty), mask=ok
                    )
    else:
        # ---- mse / smooth_l1: one pass, elementwise
        is_mse = kind == 0
        inv_beta = 1.0 / tl.maximum(beta, 1e-30)  # beta = 0: |d| < 0 never holds, so this branch is unused
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        macc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cols0
            ok = row_ok[:, None] & (cols < D)[None, :]
            p = tl.load(p_ptr + rows[:, None] * s_pr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * s_yr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            m = tl.where(ok, 1.0, 0.0)
            if m_addr != 0:
                m = tl.load(m_ptr + rows[:, None] * s_mr + cols[None, :] * s_md, mask=ok, other=0.0)
            w = tl.where(ok, 1.0, 0.0)
            if w_addr != 0:
                w = tl.load(w_ptr + rows[:, None] * s_wr + cols[None, :] * s_wd, mask=ok, other=0.0)
            d = p - y
            ad = tl.abs(d)
            small = ad < beta
            l_sl1 = tl.where(small, 0.5 * d * d * inv_beta, ad - 0.5 * beta)
            sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            dl_sl1 = tl.where(small, d * inv_beta, sgn)
            l = tl.where(is_mse, d * d, l_sl1)
            dl = tl.where(is_mse, 2.0 * d, dl_sl1)
            wm = w * m * scale
            acc += wm * l
            macc += m
            if WRITE_GRAD:
                g = wm * dl
                if g_addr != 0:
                    tl.store(g_ptr + rows[:, None] * D + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
                if gy_addr != 0:
                    tl.store(
                        gy_ptr + rows[:, None] * D + cols[None, :], (-g).to(gy_ptr.dtype.element_ty), mask=ok
                    )
        num += tl.sum(acc, axis=1)
        den += tl.sum(macc, axis=1)

    out = part_ptr + (out_row * part_stride + pid_r) * 2
    tl.store(out, tl.sum(num, axis=0))
    tl.store(out + 1, tl.sum(den, axis=0))


@triton.jit
def _fused_regression_fwd_kernel(
    part_ptr,  # (T_all, part_stride, 2) float32 out: per row block (num, den), at the term's out_row
    desc_ptr,  # (T, N_DESC) int64: addresses, sizes, strides, kind, out_row (see D_* above)
    fpar_ptr,  # (T, 2) float32: smooth_l1 beta, term scale
    pred_witness_ptr,  # any pred of this launch: its pointer type is every pred's (and grad's) type
    tgt_witness_ptr,  # any target of this launch: its pointer type is every target's (and target grad's)
    mask_witness_ptr,  # a float32 tensor: the pointer type of masks and weights
    n_blocks,  # row blocks per term in this launch
    n_work,  # T * n_blocks work items
    part_stride,  # part's blocks dim (>= n_blocks)
    eps,  # cosine norm floor
    N_DESC: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # False under no_grad: losses only
    ALIGNED: tl.constexpr,  # every pred/target/grad address 16-byte aligned, every D and row stride % 8 == 0
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # persistent: a grid of about (SMs x resident programs) walks the (term, row block) items, so the last
    # wave is not a mostly idle one (measured on an H200: one program per item lost ~30% to the tail)
    for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
        t = (w // n_blocks).to(tl.int64)
        pid_r = (w % n_blocks).to(tl.int64)
        _term_block(
            part_ptr,
            desc_ptr,
            fpar_ptr,
            pred_witness_ptr,
            tgt_witness_ptr,
            mask_witness_ptr,
            t,
            pid_r,
            part_stride,
            eps,
            N_DESC,
            WRITE_GRAD,
            ALIGNED,
            BLOCK_R,
            BLOCK_D,
        )


@triton.jit
def _scale_kernel(
    out_ptr,  # (n,) out: x * scale, in x's dtype
    x_ptr,  # (n,) contiguous
    scale_ptr,  # float32 device scalar(s)
    scale_index,  # which one
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    s = tl.load(scale_ptr + scale_index)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * s).to(out_ptr.dtype.element_ty), mask=ok)


def scale(x, scales, index: int):
    """x * scales[index] in x's dtype (fp32 math): the backward's one read + write of a saved gradient.
    (A bf16 tensor times a 0-d fp32 CUDA tensor in eager PyTorch takes its slow casting path: ~3x slower.)"""
    out = x.new_empty(x.shape)
    n = x.numel()
    block = 4096
    _scale_kernel[(triton.cdiv(n, block),)](out, x, scales, index, n, BLOCK=block, num_warps=8)
    return out


def regression_settings(d_max: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of length up to d_max: BLOCK_D the largest of 128/64/32 that
    wastes at most ~12% of the last chunk's lanes; 512-element tiles on 2 warps. The best of a sweep on an
    H200 at D = 1152, bf16, kernel only: 4 x 128 / 2 warps / 16 programs per SM 0.196 ms; 16 x 128 / 4 warps
    0.221 ms; 32 x 128 / 8 warps 0.236 ms; 8 x 256 / 8 warps 0.375 ms."""
    d_max = max(int(d_max), 1)
    block_d = min(triton.next_power_of_2(d_max), 128)
    while block_d > 32:
        chunks = triton.cdiv(d_max, block_d)
        if d_max / (chunks * block_d) >= 0.88:
            break
        block_d //= 2
    block_r = max(1, min(64, 512 // block_d))
    return block_r, block_d, 2


def n_row_blocks(r_max: int, d_max: int) -> int:
    block_r, _, _ = regression_settings(d_max)
    return max(1, triton.cdiv(int(r_max), block_r))


def fused_regression_forward(
    part,
    desc,
    fpar,
    pred_witness,
    tgt_witness,
    mask_witness,
    *,
    n_blocks: int,
    n_terms: int,
    d_max: int,
    write_grad: bool,
    aligned: bool,
    n_programs: int,
    eps: float = 1e-8,
) -> None:
    """Launch the fused kernel over n_terms x n_blocks work items on n_programs persistent programs.

    part: (T_all, >= n_blocks, 2) float32, zeroed (each item writes its own (num, den) at the term's out_row);
    desc: (n_terms, N_DESC) int64 on the device; fpar: (n_terms, 2) float32 (beta, scale); aligned: see the
    kernel's ALIGNED; witnesses: tensors whose dtypes are the launch's pred / target / float32 mask dtypes.
    The caller allocates the gradient buffers whose addresses sit in `desc` and keeps every tensor alive."""
    block_r, block_d, num_warps = regression_settings(d_max)
    n_work = n_terms * n_blocks
    grid = (max(1, min(n_work, n_programs)),)
    _fused_regression_fwd_kernel[grid](
        part,
        desc,
        fpar,
        pred_witness,
        tgt_witness,
        mask_witness,
        n_blocks,
        n_work,
        part.shape[1],
        eps,
        N_DESC=N_DESC,
        WRITE_GRAD=write_grad,
        ALIGNED=aligned,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
