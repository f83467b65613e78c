"""Fused linear + cross-entropy: the loss of `logits = hidden @ weight.T + bias` without N x V logits.

Math, per token n with label y (V classes, label smoothing eps, z-loss coefficient zl, optional softcap s):
    z     = s * tanh(x / s)  or  x,      x = hidden[n] @ weight.T + bias
    lse   = log sum_j exp(z_j)
    loss  = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j) + zl lse^2          (0 for ignored tokens)
    dloss/dz_j = (1 + 2 zl lse) softmax(z)_j - (1 - eps) [j == y] - eps / V   (times 1 - tanh^2 with softcap)

Forward (`_lce_fwd_kernel`): grid (token blocks, vocabulary splits). Each program computes BLOCK_N x BLOCK_V
logit tiles with `tl.dot` over H in fp32 and keeps an online log-sum-exp (running max and sum), the target
logit and the logit sum for its share of V. The splits give the GPU enough programs when N is small; their
partial (max, sum) pairs are merged on the host with a few O(S*N) torch ops. Only 2N floats (row max and
log-sum) are saved.
Global traffic: hidden and weight tiles (read through L2 as in a GEMM) and O(S*N) floats; no N x V.

Backward: tokens are taken in chunks of C rows (C*V stays a small fraction of N*V; see `backward_chunk_rows`).
`_lce_dlogits_kernel` recomputes each logit tile of the chunk and writes dloss/dz (unscaled by the upstream
gradient) to a C x V scratch in the input dtype; dhidden[chunk] = (scratch @ weight) * g runs as one cuBLAS
GEMM with fp32 accumulation over V. `_lce_dweight_kernel` adds the chunk's dW = (g * scratch).T @ hidden and
dbias into fp32 buffers (each program owns one BLOCK_V x BLOCK_H tile: no atomics); it is skipped when
the head is frozen. So the frozen-head backward is one fused recompute kernel plus one GEMM per chunk.

Gradient in forward (`linear_cross_entropy_grad_in_forward`, the default when a gradient is needed): tokens
in chunks of C rows (`grad_in_forward_chunk_rows`). Per chunk: logits_c = hidden_c @ weight.T (+ bias) as one
cuBLAS GEMM in the input dtype (fp32 accumulation inside), then `_lce_grad_rows_kernel` (one program per row,
two passes
over V in fp32 registers) writes the per-token loss and overwrites logits_c in place with dloss_i/dz (the
"unit" gradient, upstream gradient 1; softcap chain rule included; 0 for ignored rows); then
dhidden_c = grad_c @ weight (cuBLAS) into an N x H buffer in the input dtype, and, for a trainable head,
dweight += grad_c.T @ hidden_c and dbias += colsum(grad_c) in fp32. The backward only scales the saved
gradients by the upstream gradient per token (`scale_rows_`, in place, fp32 arithmetic). Work: the 2 GEMMs
of eager (3 with a trainable head) plus 2 reads and 1 write of each logits chunk; memory: one C x V chunk
plus the N x H gradient, which becomes hidden.grad.

References followed (facts and algorithms, no code): Apple's Cut Cross-Entropy (blockwise LSE, recomputed
logit tiles in the backward), Liger-Kernel's fused linear cross-entropy (chunking over tokens, gradients in
the forward, the label-smoothing and z-loss gradients, fp32 accumulation of dW), flash-attention's
cross-entropy (split LSE).

Launchers take every setting as an argument (chunk rows included); nothing here reads the environment.
CPU tensors mean the Triton interpreter (TRITON_INTERPRET=1, the only way Triton runs on the CPU): smaller
tiles. Zero tokens (N = 0) launch nothing and return empty results.

Interpreter notes: tanh is written with exp (no libdevice); fp32 dots ask for
input_precision="ieee" so the GPU matches the exact interpreter; bf16 dots only run on a GPU.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): never overflows, needs no libdevice.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _lse_step(m, s, z_y, zsum, z, cols, col_mask, y, NEED_ZSUM: tl.constexpr):
    """One column block of the online log-sum-exp per row: z (BLOCK_N, BLOCK_V) fp32 logits (after softcap)
    with -inf already in masked columns. Returns the updated running max m, sum s of exp(z - m), target logit
    z_y and (NEED_ZSUM) sum of the logits."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    if NEED_ZSUM:
        zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    return m_new, s, z_y, zsum


@triton.jit
def _dlogits(z, t, m, log_s, coef, y, cols, smoothing, V, HAS_SOFTCAP: tl.constexpr):
    """dloss/dlogit for an upstream gradient of 1: z (BLOCK_N, BLOCK_V) fp32 logits after softcap, t their
    tanh(logit / softcap) (HAS_SOFTCAP), m / log_s the row max and log sum exp(z - m), coef = 1 + 2 z_loss lse.
    The target column's p - (1 - eps) is formed in fp32, before any rounding to the input dtype."""
    # exp((z - m) - log_s), not exp(z - lse): lse ~ 1e4 would carry an fp32 rounding of ~1e-3 into p.
    u = tl.exp((z - m[:, None]) - log_s[:, None]) * coef[:, None] - smoothing / V
    u -= tl.where(cols[None, :] == y[:, None], 1.0 - smoothing, 0.0)
    if HAS_SOFTCAP:
        u = u * (1.0 - t * t)
    return u


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) tile of logits in fp32, and tanh(x / softcap) (or x itself without softcap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        h = tl.load(
            h_ptr + rows[:, None] * stride_hn + k[None, :] * stride_hh,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[None, :] * stride_wv + k[:, None] * stride_wh,
            mask=col_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
    return acc, t


@triton.jit
def _lce_fwd_kernel(
    part_ptr,  # (4, S, N) fp32 out: running max, sum exp(z - max), target logit, sum of logits
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) weight
    b_ptr,  # (V,) bias (unused without HAS_BIAS)
    labels_ptr,  # (N,) int64
    N,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    tiles_per_split,  # vocabulary tiles handled by one program
    softcap,  # float (unused without HAS_SOFTCAP)
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_ZSUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        # The launcher makes the first tile of every split hold a valid column, so m is finite after it.
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, _ = _logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            H,
            stride_hn,
            stride_hh,
            stride_wv,
            stride_wh,
            softcap,
            HAS_BIAS,
            HAS_SOFTCAP,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
            DOT_PRECISION,
        )
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m, s, tgt, zsum = _lse_step(m, s, tgt, zsum, z, cols, col_mask, y, NEED_ZSUM)

    out = part_ptr + split * N + rows
    plane = n_splits * N
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, tgt, mask=row_mask)
    tl.store(out + 3 * plane, zsum, mask=row_mask)


@triton.jit
def _lce_dlogits_kernel(
    dz_ptr,  # (C, V) out, input dtype: dloss/dz before the upstream gradient (0 for ignored rows)
    h_ptr,  # (C, H) hidden rows of this chunk
    w_ptr,  # (V, H)
    b_ptr,  # (V,)
    labels_ptr,  # (C,) int64
    lse_ptr,  # (2, N) fp32 from the forward, offset to the chunk: row max m and log sum exp(z - m)
    n_rows,
    V,
    H,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dzn,
    stride_lse,
    softcap,
    ignore_index,
    smoothing,  # label smoothing eps
    z_coef,  # 2 * z_loss
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < V
    z, t = _logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        H,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        softcap,
        HAS_BIAS,
        HAS_SOFTCAP,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
        DOT_PRECISION,
    )
    m = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(lse_ptr + stride_lse + rows, mask=row_mask, other=0.0)
    lse = m + log_s
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    u = _dlogits(z, t, m, log_s, 1.0 + z_coef * lse, y, cols, smoothing, V, HAS_SOFTCAP)
    valid = row_mask & (y != ignore_index)
    u = tl.where(valid[:, None] & col_mask[None, :], u, 0.0)
    tl.store(
        dz_ptr + rows[:, None] * stride_dzn + cols[None, :],
        u.to(dz_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _lce_dweight_kernel(
    dw_ptr,  # (V, H) fp32 accumulator, contiguous (unused without NEED_DW)
    db_ptr,  # (V,) fp32 accumulator (unused without NEED_DB)
    dz_ptr,  # (C, V) from _lce_dlogits_kernel
    h_ptr,  # (C, H)
    g_ptr,  # (C,) fp32 upstream gradient per token
    n_rows,
    V,
    H,
    stride_dzn,
    stride_hn,
    stride_hh,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    v_mask = cols_v < V
    h_mask = cols_h < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        r = k0 + offs_k
        r_mask = r < n_rows
        g = tl.load(g_ptr + r, mask=r_mask, other=0.0)
        u = (
            tl.load(
                dz_ptr + r[None, :] * stride_dzn + cols_v[:, None],
                mask=r_mask[None, :] & v_mask[:, None],
                other=0.0,
            ).to(tl.float32)
            * g[None, :]
        )
        if NEED_DB:
            db += tl.sum(u, axis=1)
        if NEED_DW:
            h = tl.load(
                h_ptr + r[:, None] * stride_hn + cols_h[None, :] * stride_hh,
                mask=r_mask[:, None] & h_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(u, h, acc, input_precision=DOT_PRECISION)
    if NEED_DW:
        ptrs = dw_ptr + cols_v[:, None] * H + cols_h[None, :]
        mask = v_mask[:, None] & h_mask[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)
    if NEED_DB:
        if pid_h == 0:
            tl.store(db_ptr + cols_v, tl.load(db_ptr + cols_v, mask=v_mask, other=0.0) + db, mask=v_mask)


@triton.jit
def _lce_grad_rows_kernel(
    z_ptr,  # (C, V) in: logits in the input dtype; out (WRITE_GRAD): dloss/dz for upstream gradient 1
    loss_ptr,  # (C,) fp32 out: loss per token (0 where ignored)
    labels_ptr,  # (C,) int64
    n_rows,
    V,
    stride_zn,
    softcap,  # float (unused without HAS_SOFTCAP)
    ignore_index,
    smoothing,  # label smoothing eps
    z_loss,  # z-loss coefficient zl
    HAS_SOFTCAP: tl.constexpr,
    NEED_ZSUM: tl.constexpr,  # label smoothing needs sum_j z_j
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows per program: 1 on a GPU; more only to cut the interpreter's per-program cost
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    y = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (y != ignore_index)
    z_rows = z_ptr + rows[:, None] * stride_zn
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: online log-sum-exp per row, in fp32. Every block holds a valid column (v0 < V), so m is finite
    # after the first one and exp(m - m_new) never sees inf - inf (rows past n_rows read 0s, never stored).
    # The target logit is picked up here too, not loaded after the loop: every pass-1 load feeds a reduction
    # that all warps pass together, so none can still be pending when another warp overwrites the row in
    # pass 2 (a separate load of z[y] could race with that store).
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < V
        z = tl.load(z_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(
            tl.float32
        )
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m, s, z_y, zsum = _lse_step(m, s, z_y, zsum, z, cols, col_mask, y, NEED_ZSUM)
    log_s = tl.log(s)
    lse = m + log_s
    # (m - z_y) + log_s: exact to fp32 rounding even for logits around 1e4.
    loss = (1.0 - smoothing) * ((m - z_y) + log_s)
    if NEED_ZSUM:
        loss += smoothing * ((m - zsum / V) + log_s)
    loss += z_loss * lse * lse
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)

    if WRITE_GRAD:
        # Pass 2: dloss/dz in place. Each element is read once and written once by its program, and the
        # target column's p - (1 - eps) is formed in fp32 before the single rounding to the input dtype.
        coef = 1.0 + 2.0 * z_loss * lse
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = row_mask[:, None] & (cols < V)[None, :]
            z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = z
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            u = _dlogits(z, t, m, log_s, coef, y, cols, smoothing, V, HAS_SOFTCAP)
            u = tl.where(valid[:, None], u, 0.0)
            tl.store(z_rows + cols[None, :], u.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    x_ptr,  # (R, K) in/out, any float dtype, unit stride along K (one row of R * K when G_PER_ROW=False)
    g_ptr,  # (R,) fp32 factor per row, or (1,) one factor for all (G_PER_ROW=False)
    K,
    stride_xr,
    G_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid: (R, cdiv(K, BLOCK)) per row, or (cdiv(K, BLOCK),) for one factor over a flat K.
    if G_PER_ROW:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + row)
    else:
        row = 0
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr)
    mask = cols < K
    ptrs = x_ptr + row * stride_xr + cols
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


def _interpreting(device: torch.device) -> bool:
    """CPU tensors reach a Triton kernel only under the interpreter."""
    return device.type != "cuda"


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _settings(N: int, V: int, H: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes, warps and stages for the logit-tile kernels (one helper; no autotuning)."""
    if _interpreting(device):
        # Numpy runs each program in turn: few, mid-sized programs are fastest and still cover the masks.
        return dict(
            BLOCK_N=max(16, min(32, _np2(N))),
            BLOCK_V=max(16, min(128, _np2(V))),
            BLOCK_K=max(16, min(64, _np2(H))),
            num_warps=4,
            num_stages=1,
        )
    if dtype == torch.float32:
        return dict(
            BLOCK_N=max(16, min(64, _np2(N))),
            BLOCK_V=max(16, min(128, _np2(V))),
            BLOCK_K=max(16, min(32, _np2(H))),
            num_warps=8,
            num_stages=3,
        )
    return dict(
        BLOCK_N=max(16, min(128, _np2(N))),
        BLOCK_V=max(16, min(128, _np2(V))),
        BLOCK_K=max(16, min(64, _np2(H))),
        num_warps=8,
        num_stages=3,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products on the GPU as in the interpreter. Half inputs: their dots are native;
    # the fp32 dW dot may use TF32 (bf16/fp16 operands and the fp32 scale g fit its 10-bit mantissa well).
    return "ieee" if dtype == torch.float32 else "tf32"


def _n_splits(n_blocks: int, n_vtiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) of the vocabulary so that the forward grid has about 2 programs per SM."""
    if _interpreting(device):
        target = 3 * n_blocks  # a few splits, so the merge is exercised by the CPU tests
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(n_vtiles, triton.cdiv(target, n_blocks)))
    per_split = triton.cdiv(n_vtiles, splits)
    return triton.cdiv(n_vtiles, per_split), per_split


def backward_chunk_rows(N: int, V: int, elem_size: int, block_n: int) -> int:
    """Tokens per backward chunk: the C x V scratch stays under max(N*V*4/64, 64 MiB) bytes (1/64 of the fp32
    logits once N*V*4 > 4 GiB), in whole token blocks, at least one block."""
    budget = max(N * V * 4 // 64, 64 << 20)
    rows = max(block_n, budget // (V * elem_size) // block_n * block_n)
    return min(rows, triton.cdiv(N, block_n) * block_n)


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and log-sum-exp.

    Args:
        hidden: (N, H) fp32/fp16/bf16, any strides. weight: (V, H), same dtype and device. labels: (N,) int64.
        bias: (V,) or None. softcap: None or > 0.
    Returns:
        loss: (N,) fp32, 0 where labels == ignore_index.
        lse: (2, N) fp32, the log-sum-exp of the (softcapped) logits as row max m and log sum exp(z - m).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0:
        empty = hidden.new_empty((0,), dtype=torch.float32)
        return empty, hidden.new_empty((2, 0), dtype=torch.float32)
    cfg = _settings(N, V, H, hidden.dtype, hidden.device)
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    splits, per_split = _n_splits(n_blocks, triton.cdiv(V, cfg["BLOCK_V"]), hidden.device)
    part = torch.empty((4, splits, N), device=hidden.device, dtype=torch.float32)
    _lce_fwd_kernel[(n_blocks, splits)](
        part,
        hidden,
        weight,
        bias if bias is not None else hidden,
        labels,
        N,
        V,
        H,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        per_split,
        float(softcap or 1.0),
        ignore_index,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        NEED_ZSUM=label_smoothing > 0,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_K=cfg["BLOCK_K"],
        DOT_PRECISION=_dot_precision(hidden.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    m, s, tgt, zsum = part.unbind(0)
    m_max = m.amax(0)
    log_s = torch.log((s * torch.exp(m - m_max)).sum(0))
    lse = m_max + log_s
    # (m_max - z_y) + log_s keeps the loss exact to fp32 rounding even when the logits are around 1e4.
    loss = (1.0 - label_smoothing) * ((m_max - tgt.sum(0)) + log_s)
    if label_smoothing > 0:
        loss = loss + label_smoothing * ((m_max - zsum.sum(0) / V) + log_s)
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(labels != ignore_index, loss, 0.0)
    return loss, torch.stack([m_max, log_s])


def linear_cross_entropy_backward(
    g: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for an upstream gradient g of the per-token losses.

    Args:
        g: (N,) fp32, dL/dloss[n] (already 0 for ignored tokens and divided by the count for "mean").
        hidden, weight, labels, bias: as in the forward. lse: (2, N) fp32 from the forward.
        chunk_rows: tokens per chunk (None: `backward_chunk_rows`).
    Returns:
        dhidden (N, H) in hidden.dtype, dweight (V, H) fp32, dbias (V,) fp32; None where not needed.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _settings(N, V, H, hidden.dtype, hidden.device)
    bn, bv, bk = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    prec = _dot_precision(hidden.dtype)
    chunk = chunk_rows or backward_chunk_rows(max(N, 1), V, hidden.element_size(), bn)
    dz = torch.empty((max(min(chunk, N), 1), V), device=hidden.device, dtype=hidden.dtype)
    dh = torch.empty((N, H), device=hidden.device, dtype=hidden.dtype) if need_dhidden else None
    dw = torch.zeros((V, H), device=hidden.device, dtype=torch.float32) if need_dweight else None
    db = torch.zeros((V,), device=hidden.device, dtype=torch.float32) if need_dbias else None
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        n = c1 - c0
        h_c = hidden[c0:c1]
        dz_c = dz[:n]
        _lce_dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(V, bv))](
            dz_c,
            h_c,
            weight,
            bias if bias is not None else hidden,
            labels[c0:c1],
            lse[:, c0:c1],
            n,
            V,
            H,
            h_c.stride(0),
            h_c.stride(1),
            weight.stride(0),
            weight.stride(1),
            dz_c.stride(0),
            lse.stride(0),
            float(softcap or 1.0),
            ignore_index,
            float(label_smoothing),
            2.0 * float(z_loss),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            BLOCK_N=bn,
            BLOCK_V=bv,
            BLOCK_K=bk,
            DOT_PRECISION=prec,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        if need_dhidden:
            # One GEMM over V (fp32 accumulation inside), then the per-token upstream scale in fp32.
            dh[c0:c1] = torch.mm(dz_c, weight).float().mul_(g[c0:c1, None])
        if need_dweight or need_dbias:
            bh = max(16, min(64, _np2(H))) if need_dweight else 16
            grid = (triton.cdiv(V, bv), triton.cdiv(H, bh) if need_dweight else 1)
            _lce_dweight_kernel[grid](
                dw if dw is not None else g,
                db if db is not None else g,
                dz_c,
                h_c,
                g[c0:c1],
                n,
                V,
                H,
                dz_c.stride(0),
                h_c.stride(0),
                h_c.stride(1),
                NEED_DW=need_dweight,
                NEED_DB=need_dbias,
                BLOCK_V=bv,
                BLOCK_H=bh,
                BLOCK_K=max(16, min(32, _np2(n))),
                DOT_PRECISION=prec,
                num_warps=4,
                num_stages=cfg["num_stages"],
            )
    return dh, dw, db


# ------------------------------------------------------------------------------------ gradient in forward

# logits chunk budget with a frozen head
GRAD_IN_FORWARD_CHUNK_BYTES = 80_000_000


def grad_in_forward_chunk_rows(N: int, V: int, H: int, elem_size: int, need_dweight: bool) -> int:
    """Tokens per chunk C of the gradient-in-forward path.

    Frozen head: the largest power of two with C * V * elem_size <= 80 MB, clamped to [64, 2048]: 256 rows at
    V=152064 in bf16, a 77.9 MB chunk, 1.56% of the 4.98 GB fp32 logits at N=8192. Each chunk streams W
    twice (logits GEMM, dhidden GEMM), so small chunks are bound by W's reads; the GPU sweep
    (benchmarks/bench_linear_cross_entropy.py --chunk-rows) found 256 rows within a few percent of 512 at
    half the memory. With a trainable head the fp32 dW buffer (V x H) dominates memory and every chunk reads
    and writes it once, so the budget grows to V * H * 4 / 8 (fewer, longer dW GEMMs). Never more than N.
    """
    budget = GRAD_IN_FORWARD_CHUNK_BYTES
    if need_dweight:
        budget = max(budget, V * H * 4 // 8)
    rows = max(1, budget // max(V * elem_size, 1))
    rows = 1 << (rows.bit_length() - 1)  # power of two <= rows
    return min(max(rows, 64), 2048, max(N, 1))


def _grad_rows_settings(V: int, device: torch.device) -> dict:
    if _interpreting(device):
        # Numpy runs programs one by one: many rows per program; a few blocks per row even at test sizes, so
        # the online merge and the tail mask run.
        return dict(BLOCK_N=16, BLOCK_V=max(16, min(512, _np2(V))), num_warps=4)
    # One row per program, 16K columns per step over up to 32 warps (16 fp32 per thread and tensor): enough
    # bytes in flight per SM to stream the chunk at HBM speed when C >= the number of SMs.
    block = max(128, min(16384, _np2(V)))
    warps = 32 if block >= 16384 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return dict(BLOCK_N=1, BLOCK_V=block, num_warps=warps)


_ADDMM_OUT_DTYPE = {
    "usable": None
}  # torch.addmm(..., out_dtype=float32) on half CUDA operands; None: untried


def _accumulate_dweight(dw: torch.Tensor, grad_c: torch.Tensor, h_c: torch.Tensor) -> None:
    """dw (V, H) fp32 += grad_c.T @ h_c, accumulated in fp32 and added to dw in fp32 (no half-precision
    product)."""
    if grad_c.dtype == torch.float32:
        dw.addmm_(grad_c.t(), h_c)
        return
    if dw.is_cuda and _ADDMM_OUT_DTYPE["usable"] is not False and hasattr(torch.ops.aten.addmm, "dtype_out"):
        # cuBLAS: half operands, fp32 accumulator and fp32 C with beta = 1 (torch >= 2.8).
        try:
            torch.addmm(dw, grad_c.t(), h_c, out_dtype=torch.float32, out=dw)
            _ADDMM_OUT_DTYPE["usable"] = True
            return
        except (RuntimeError, TypeError) as e:
            if _ADDMM_OUT_DTYPE["usable"]:  # it worked before: a real error
                raise
            _ADDMM_OUT_DTYPE["usable"] = False
            warnings.warn(
                f"linear_cross_entropy: addmm with out_dtype=float32 is unavailable ({e}); dweight chunks "
                "are widened to fp32 before the GEMM instead (same result, more memory traffic)",
                stacklevel=2,
            )
    # CPU (interpreter tests) or an older torch: widen the chunk operands
    dw.addmm_(grad_c.t().float(), h_c.float())


def linear_cross_entropy_grad_in_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token loss and the gradients for an upstream gradient of 1 on every token, in one pass.

    Args:
        hidden: (N, H) fp32/fp16/bf16, any strides. weight: (V, H), same dtype and device. labels: (N,) int64
        in [0, V) or ignore_index. bias: (V,) or None. softcap: None or > 0.
        need_dhidden / need_dweight / need_dbias: which gradients to form (none: the loss only).
        chunk_rows: tokens per chunk (None: `grad_in_forward_chunk_rows`).
    Returns:
        loss: (N,) fp32, 0 where labels == ignore_index.
        dhidden: (N, H) in hidden.dtype, dloss[n]/dhidden[n] (0 rows where ignored), or None.
        dweight: (V, H) fp32, sum_n dloss[n]/dweight, or None. dbias: (V,) fp32, sum_n dloss[n]/dbias, or None.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    write_grad = need_dhidden or need_dweight or need_dbias
    chunk = (
        min(chunk_rows, max(N, 1))
        if chunk_rows
        else grad_in_forward_chunk_rows(N, V, H, hidden.element_size(), need_dweight)
    )
    logits = torch.empty((max(min(chunk, N), 1), V), device=dev, dtype=dtype)
    loss = torch.empty((N,), device=dev, dtype=torch.float32)
    dh = torch.empty((N, H), device=dev, dtype=dtype) if need_dhidden else None
    dw = torch.zeros((V, H), device=dev, dtype=torch.float32) if need_dweight else None
    db = torch.zeros((V,), device=dev, dtype=torch.float32) if need_dbias else None
    cfg = _grad_rows_settings(V, dev)
    weight_t = weight.t()
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        h_c = hidden[c0:c1]
        z = logits[: c1 - c0]
        if bias is not None:
            torch.addmm(bias, h_c, weight_t, out=z)
        else:
            torch.mm(h_c, weight_t, out=z)
        _lce_grad_rows_kernel[(triton.cdiv(c1 - c0, cfg["BLOCK_N"]),)](
            z,
            loss[c0:c1],
            labels[c0:c1],
            c1 - c0,
            V,
            z.stride(0),
            float(softcap or 1.0),
            ignore_index,
            float(label_smoothing),
            float(z_loss),
            HAS_SOFTCAP=softcap is not None,
            NEED_ZSUM=label_smoothing > 0,
            WRITE_GRAD=write_grad,
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_V=cfg["BLOCK_V"],
            num_warps=cfg["num_warps"],
        )
        if need_dhidden:
            torch.mm(z, weight, out=dh[c0:c1])
        if need_dweight:
            _accumulate_dweight(dw, z, h_c)
        if need_dbias:
            db += z.sum(dim=0, dtype=torch.float32)
    return loss, dh, dw, db


def scale_rows_(x: torch.Tensor, g: torch.Tensor) -> None:
    """x[r, :] *= g[r] in place, or x *= g[0] when g has one element; fp32 arithmetic, one rounding.

    Args:
        x: (R, K) float tensor with unit stride along K (contiguous for a single factor), or (K,).
        g: (R,) or (1,) fp32.
    """
    if x.numel() == 0:
        return
    block_max = 1024 if _interpreting(x.device) else 4096
    g = g.to(torch.float32).contiguous()
    if g.numel() == 1:
        assert x.is_contiguous(), "scale_rows_ with one factor needs a contiguous x"
        flat = x.view(-1)
        block = max(16, min(block_max, _np2(flat.numel())))
        grid = (triton.cdiv(flat.numel(), block),)
        _scale_kernel[grid](flat, g, flat.numel(), 0, G_PER_ROW=False, BLOCK=block, num_warps=8)
        return
    R, K = x.shape
    assert g.numel() == R and x.stride(1) == 1, (tuple(g.shape), tuple(x.shape), x.stride())
    block = max(16, min(block_max, _np2(K)))
    _scale_kernel[(R, triton.cdiv(K, block))](x, g, K, x.stride(0), G_PER_ROW=True, BLOCK=block, num_warps=8)
