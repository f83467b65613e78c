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

References followed (facts and algorithms, no code): Apple's Cut Cross-Entropy (blockwise LSE, recomputed
logit tiles in the backward), Liger-Kernel's fused linear cross-entropy (chunking over tokens, the
label-smoothing and z-loss gradients, fp32 accumulation of dW), flash-attention's cross-entropy (split LSE).

Interpreter notes (TRITON_INTERPRET=1): tanh is written with exp (no libdevice); fp32 dots ask for
input_precision="ieee" so the GPU matches the exact interpreter; bf16 dots only run on a GPU.
"""

from __future__ import annotations

import os

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
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if NEED_ZSUM:
            zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)

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
    # exp((z - m) - log_s), not exp(z - lse): lse ~ 1e4 would carry an fp32 rounding of ~1e-3 into p.
    p = tl.exp((z - m[:, None]) - log_s[:, None])
    # The target column's p - (1 - eps) is formed here in fp32, before any rounding to the input dtype.
    u = p * (1.0 + z_coef * lse)[:, None] - smoothing / V
    u -= tl.where(cols[None, :] == y[:, None], 1.0 - smoothing, 0.0)
    if HAS_SOFTCAP:
        u = u * (1.0 - t * t)
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


# ------------------------------------------------------------------------------------------------ launchers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _settings(N: int, V: int, H: int, dtype: torch.dtype) -> dict:
    """Tile sizes, warps and stages for the logit-tile kernels (one helper; no autotuning)."""
    if _interpreting():
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
    if _interpreting() or device.type != "cuda":
        target = 3 * n_blocks  # a few splits, so the merge is exercised by the CPU tests
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(n_vtiles, triton.cdiv(target, n_blocks)))
    per_split = triton.cdiv(n_vtiles, splits)
    return triton.cdiv(n_vtiles, per_split), per_split


def backward_chunk_rows(N: int, V: int, elem_size: int, block_n: int) -> int:
    """Tokens per backward chunk: the C x V scratch stays under max(N*V*4/64, 64 MiB) bytes (1.6% of the fp32
    logits at the issue's GPU shape), in whole token blocks, at least one block."""
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
    cfg = _settings(N, V, H, hidden.dtype)
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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for an upstream gradient g of the per-token losses.

    Args:
        g: (N,) fp32, dL/dloss[n] (already 0 for ignored tokens and divided by the count for "mean").
        hidden, weight, labels, bias: as in the forward. lse: (2, N) fp32 from the forward.
    Returns:
        dhidden (N, H) in hidden.dtype, dweight (V, H) fp32, dbias (V,) fp32; None where not needed.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _settings(N, V, H, hidden.dtype)
    bn, bv, bk = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    prec = _dot_precision(hidden.dtype)
    chunk = backward_chunk_rows(N, V, hidden.element_size(), bn)
    if _CHUNK_ROWS_OVERRIDE:  # tests: force several chunks on small shapes
        chunk = _CHUNK_ROWS_OVERRIDE
    dz = torch.empty((min(chunk, N), V), device=hidden.device, dtype=hidden.dtype)
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


_CHUNK_ROWS_OVERRIDE: int | None = None
