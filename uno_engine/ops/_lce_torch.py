"""The torch path of `ops.linear_cross_entropy`: the Triton kernels' math in plain PyTorch, chunked over tokens
so that memory stays O(chunk * V) beyond the inputs and gradients. Runs anywhere (CPU, a GPU without Triton).

Math per token n (label y, V classes, smoothing eps, z-loss zl, optional softcap s), as in
`uno_engine.kernels.linear_cross_entropy`:
    z = s tanh(x / s) or x, x = hidden[n] @ weight.T + bias;  lse = m + log sum_j exp(z_j - m), m = max_j z_j
    loss = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j) + zl lse^2                (0 at ignored tokens)
    dloss/dz_j = (1 + 2 zl lse) softmax(z)_j - (1 - eps) [j == y] - eps / V        (x (1 - tanh^2) with s)

Three entry points, one per implementation:
- `forward` (loss and (m, log sum) per token) and `backward` (recomputes each block's logits; with lse
  known, each block's gradient is final): the "recompute" implementation; 1 GEMM forward, 2 backward (3 with
  a trainable head).
- `grad_in_forward`: the loss and its gradients for an upstream gradient of 1; the backward only scales the
  saved gradients. With a frozen head (dhidden only) it runs in blocks of C tokens x Vb classes with an online
  softmax, as flash attention does: per block z = h_c @ W_b.T, the running row max m and sum s are updated,
  and acc = acc * exp(m_old - m) + exp(z - m) @ W_b; at the end dhidden = (1 + 2 zl lse) acc / s
  - (1 - eps) W[y] - eps / V colsum(W). 2 GEMMs (as eager autograd), each weight block read while it is hot,
  and a block of C x Vb fp32 whatever V is. With a trainable head (dW needs each logit's final softmax) it
  takes chunks of tokens x all classes: per chunk the logits GEMM, the loss and the unit gradient dloss/dz in
  place, then dhidden_c = u @ weight and dW += u.T @ h_c (3 GEMMs).
The forward's loss pass uses the same blocks (no acc). Memory beyond the inputs and the N x H gradient: one
block, sized by a byte budget (`CHUNK_BYTES`, see `block_shape` / `chunk_rows`). The three take the arguments
of the Triton launchers (`uno_engine.kernels.linear_cross_entropy`; the forward also a chunk size), so
`_lce_ops` calls either alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_BYTES = 4 << 20
"""Byte budget of the torch path's one fp32 logits block (C x Vb, or C x V for the full-row chunks).

Why 4 MiB: the op's memory beyond its inputs and the N x H gradient is this block, so it must stay a small
fraction of the eager fp32 N x V logits it replaces: 1.6% at N=2048, V=32000 (the CPU memory bar is 2%); and
it must hold GEMM blocks large enough to run at the matmul rate: a square 1024 x 1024 block (the online
softmax path) streams each weight block once per 1024 tokens and rescales the accumulator once per 1024
classes, and fits a CPU's last-level cache. A row count would not do: C rows of V classes are C * V * 4 bytes,
which grows with the vocabulary (the former floor of H / 2 rows held 11% of the logits at N=2048, H=1024).
"""


def block_shape(N: int, V: int, chunk_bytes: int = CHUNK_BYTES, rows: int | None = None) -> tuple[int, int]:
    """(C tokens, Vb classes) of one online-softmax block: C * Vb * 4 <= chunk_bytes (at least 1 x 1).

    C = min(N, sqrt(chunk_bytes / 4)) (or `rows`, the caller's override), Vb = the rest of the budget: a square
    block balances the weight's traffic (read once per C tokens) against the accumulator's rescale (once per
    Vb classes); with few tokens the block widens to the budget."""
    floats = max(1, chunk_bytes // 4)
    c = rows or max(1, min(N, math.isqrt(floats)))
    return c, max(1, min(V, floats // c))


def chunk_rows(N: int, V: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per full-row chunk (C x V fp32 logits): the most whose logits fit chunk_bytes, at least 1, at
    most N. Used where every logit of a token is needed at once: grad_in_forward with a trainable head (dW needs
    each logit's final softmax before the row's log-sum-exp is known otherwise)."""
    return max(1, min(max(N, 1), chunk_bytes // (4 * max(V, 1))))


def _logits(h_c, weight, bias, softcap):
    """fp32 logits of one chunk (matmul in the input dtype, as eager), and tanh(x / softcap) (or None)."""
    z = F.linear(h_c, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _row_stats_(z, y, valid, label_smoothing, z_loss):
    """(per-token loss (0 where ignored), row max m, log sum exp(z - m)) of one chunk's logits; overwrites z
    with exp(z - m) (one pass, no C x V temporary; the softmax is then z / sum)."""
    m = z.amax(dim=1)
    tgt = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    z_mean = z.mean(dim=1) if label_smoothing > 0 else None
    log_s = z.sub_(m[:, None]).exp_().sum(dim=1).log()
    loss = (1.0 - label_smoothing) * ((m - tgt) + log_s)
    if label_smoothing > 0:
        loss = loss + label_smoothing * ((m - z_mean) + log_s)
    if z_loss > 0:
        loss = loss + z_loss * (m + log_s).square()
    return torch.where(valid, loss, 0.0), m, log_s


def _dlogits_(e, t, m, log_s, g, y, valid, label_smoothing, z_loss, V=None, v0=0):
    """dL/dz of one block in place in e = exp(z - m): g * ((1 + 2 zl lse) softmax - (1 - eps) onehot - eps / V),
    times 1 - t^2 with softcap; rows of ignored tokens are 0. softmax = e / exp(log_s) (rather than
    exp(z - lse), whose fp32 rounding would matter for logits ~1e4). g: (C, 1) fp32. The block holds classes
    [v0, v0 + e.shape[1]) of V (default: all of them)."""
    V = V or e.shape[1]
    u = e.mul_((1.0 + 2.0 * z_loss * (m + log_s))[:, None] * torch.exp(-log_s)[:, None] * g)
    if label_smoothing > 0:
        u.sub_((label_smoothing / V) * g)
    here = valid & (y >= v0) & (y < v0 + u.shape[1])  # the label falls in this block
    rows = torch.arange(u.shape[0], device=u.device)
    u[rows, torch.where(here, y - v0, 0)] -= torch.where(here, (1.0 - label_smoothing) * g[:, 0], 0.0)
    if t is not None:
        u.mul_(t.square_().neg_().add_(1.0))
    return u.masked_fill_(~valid[:, None], 0.0)


def forward(
    hidden,
    weight,
    labels,
    bias,
    *,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_rows=None,
    chunk_bytes=None,
):
    """(loss (N,) fp32, lse (2, N) fp32 = row max and log sum exp(z - max)), in online-softmax blocks."""
    N = hidden.shape[0]
    loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
    lse = torch.empty((2, N), device=hidden.device, dtype=torch.float32)
    rows, cols = block_shape(N, weight.shape[0], _budget(chunk_bytes, softcap), chunk_rows)
    for c0 in range(0, N, rows):
        c1 = min(N, c0 + rows)
        y = labels[c0:c1]
        loss[c0:c1], lse[0, c0:c1], lse[1, c0:c1] = _online_chunk(
            hidden[c0:c1], weight, bias, y, y != ignore_index, cols, label_smoothing, z_loss, softcap
        )
    return loss, lse


def backward(
    g,
    hidden,
    weight,
    labels,
    bias,
    lse,
    *,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    need_dhidden,
    need_dweight,
    need_dbias,
    chunk_rows=None,
    chunk_bytes=None,
):
    """(dhidden in hidden.dtype, dweight, dbias in fp32 (fp64 for fp64 inputs)) for the per-token upstream
    gradient g (N,) fp32; None where not needed. Recomputes the logits in the forward's blocks (`block_shape`):
    with lse known, each C x Vb block's gradient is final, so dhidden, dW and db accumulate block by block."""
    N, V = hidden.shape[0], weight.shape[0]
    dh, dw, db = _grad_buffers(hidden, weight, need_dhidden, need_dweight, need_dbias)
    rows, cols = block_shape(N, V, _budget(chunk_bytes, softcap), chunk_rows)
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    for c0 in range(0, N, rows):
        c1 = min(N, c0 + rows)
        h_c, y = hidden[c0:c1], labels[c0:c1]
        valid = y != ignore_index
        m, log_s = lse[0, c0:c1], lse[1, c0:c1]
        acc = None  # dhidden's rows themselves when they are fp32 / fp64, else an fp32 block
        if dh is not None:
            acc = dh[c0:c1] if dh.dtype == acc_dtype else dh.new_empty(dh[c0:c1].shape, dtype=acc_dtype)
            acc.zero_()
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            w_b = weight[v0:v1]
            z, t = _logits(h_c, w_b, None if bias is None else bias[v0:v1], softcap)
            e = z.sub_(m[:, None]).exp_()
            u = _dlogits_(e, t, m, log_s, g[c0:c1, None], y, valid, label_smoothing, z_loss, V, v0)
            if acc is not None:
                _addmm_(acc, u, w_b)
            if dw is not None:
                dw[v0:v1].addmm_(u.t().to(dw.dtype), h_c.to(dw.dtype))
            if db is not None:
                db[v0:v1] += u.sum(0).to(db.dtype)
            del z, t, e, u  # before the next block's logits: one block alive at a time
        if acc is not None and acc.dtype != dh.dtype:
            dh[c0:c1] = acc
    return dh, dw, db


def grad_in_forward(
    hidden,
    weight,
    labels,
    bias,
    *,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    need_dhidden,
    need_dweight,
    need_dbias,
    chunk_rows=None,
    chunk_bytes=None,
):
    """(loss (N,) fp32, dhidden, dweight, dbias) with the gradients for an upstream gradient of 1 on every
    non-ignored token's loss (dhidden in hidden.dtype; dweight, dbias in fp32 / fp64); None where not
    needed. chunk_rows: tokens per block (None: from the budget); chunk_bytes: the logits block's budget
    (None: `CHUNK_BYTES`)."""
    N = hidden.shape[0]
    loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
    dh, dw, db = _grad_buffers(hidden, weight, need_dhidden, need_dweight, need_dbias)
    budget = _budget(chunk_bytes, softcap)
    if not (need_dweight or need_dbias):  # frozen head: online softmax blocks, dhidden accumulated per block
        rows, cols = block_shape(N, weight.shape[0], budget, chunk_rows)
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        spread = weight.sum(0, dtype=acc_dtype) if label_smoothing > 0 and softcap is None else None
        for c0 in range(0, N, rows):
            c1 = min(N, c0 + rows)
            y = labels[c0:c1]
            acc = None  # dhidden's rows themselves when they are fp32 / fp64, else an fp32 block
            if dh is not None:
                acc = dh[c0:c1] if dh.dtype == acc_dtype else dh.new_empty(dh[c0:c1].shape, dtype=acc_dtype)
            loss[c0:c1] = _online_chunk(
                hidden[c0:c1],
                weight,
                bias,
                y,
                y != ignore_index,
                cols,
                label_smoothing,
                z_loss,
                softcap,
                acc=acc,
                spread=spread,
                budget=budget,
            )[0]
            if acc is not None and acc.dtype != dh.dtype:
                dh[c0:c1] = acc
        return loss, dh, dw, db
    for c0, c1 in _chunks(hidden, weight, chunk_rows, budget):
        h_c, y = hidden[c0:c1], labels[c0:c1]
        valid = y != ignore_index
        z, t = _logits(h_c, weight, bias, softcap)
        loss[c0:c1], m, log_s = _row_stats_(z, y, valid, label_smoothing, z_loss)
        one = torch.ones((1, 1), device=z.device, dtype=z.dtype)
        u = _dlogits_(z, t, m, log_s, one, y, valid, label_smoothing, z_loss)
        _accumulate(u, h_c, weight, dh, dw, db, c0, c1)
        del z, t, u  # before the next chunk's logits: one chunk alive at a time
    return loss, dh, dw, db


def _budget(chunk_bytes, softcap):
    """One logits block's bytes: chunk_bytes (None: `CHUNK_BYTES`, read at call time), halved with a softcap
    (z and tanh(z / softcap) are both live)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    return chunk_bytes // 2 if softcap is not None else chunk_bytes


def _online_chunk(
    h_c, weight, bias, y, valid, cols, label_smoothing, z_loss, softcap, *, acc=None, spread=None, budget=0
):
    """(per-token loss (0 where ignored), row max m, log sum exp(z - m)) of one token chunk, over class blocks
    of `cols` with an online softmax; with `acc` ((C, H), fp32 / fp64, overwritten) also the unit gradient
    dloss/dhidden of each token in acc (0 for ignored tokens).

    Per block b: z_b = h_c @ W_b.T (+ bias_b), m' = max(m, rowmax z_b), s = s exp(m - m') + sum exp(z_b - m'),
    acc = acc exp(m - m') + (exp(z_b - m') (1 - t_b^2)) @ W_b. At the end, with lse = m + log s:
    dhidden = (1 + 2 zl lse) acc / s - (1 - eps) (1 - t_y^2) W_y - eps / V sum_j (1 - t_j^2) W_j, the last sum
    being `spread` (colsum(W), without softcap) or accumulated per block (a third GEMM, softcap with smoothing)."""
    C, V = h_c.shape[0], weight.shape[0]
    dt = torch.promote_types(h_c.dtype, torch.float32)
    m = torch.full((C,), -math.inf, device=h_c.device, dtype=dt)
    s = torch.zeros((C,), device=h_c.device, dtype=dt)
    z_y = torch.zeros_like(s)
    t_y = torch.zeros_like(s) if softcap is not None else None
    z_sum = torch.zeros_like(s) if label_smoothing > 0 else None
    y0 = torch.where(valid, y, 0)
    if acc is not None:
        acc.zero_()
        if spread is None and label_smoothing > 0:
            spread = torch.zeros_like(acc)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w_b = weight[v0:v1]
        z, t = _logits(h_c, w_b, None if bias is None else bias[v0:v1], softcap)
        here = (y0 >= v0) & (y0 < v1)
        at = (y0 - v0).clamp(0, v1 - v0 - 1)[:, None]
        z_y = torch.where(here, z.gather(1, at).squeeze(1), z_y)
        if t is not None:
            t_y = torch.where(here, t.gather(1, at).squeeze(1), t_y)
        if z_sum is not None:
            z_sum += z.sum(1)
        m_new = torch.maximum(m, z.amax(1))
        r = torch.exp(m - m_new)  # 0 at the first block (m = -inf)
        e = z.sub_(m_new[:, None]).exp_()
        s = s * r + e.sum(1)
        m = m_new
        if acc is not None:
            if t is not None:
                dz = t.square_().neg_().add_(1.0)  # dsoftcap(x)/dx = 1 - tanh^2
                if spread is not None and spread.dim() == 2:
                    _addmm_(spread, dz, w_b)
                e.mul_(dz)
            _addmm_(acc.mul_(r[:, None]), e, w_b)
        del z, t, e
    log_s = s.log()
    loss = (1.0 - label_smoothing) * ((m - z_y) + log_s)
    if label_smoothing > 0:
        loss = loss + label_smoothing * ((m - z_sum / V) + log_s)
    if z_loss > 0:
        loss = loss + z_loss * (m + log_s).square()
    if acc is not None:
        acc.mul_(((1.0 + 2.0 * z_loss * (m + log_s)) * torch.exp(-log_s))[:, None])
        if label_smoothing > 0:
            acc.sub_(spread, alpha=label_smoothing / V)
        hot = 1.0 - label_smoothing if t_y is None else (1.0 - label_smoothing) * (1.0 - t_y.square())
        hot = torch.as_tensor(hot, device=acc.device, dtype=dt).expand(C)
        step = max(1, budget // (4 * acc.shape[1]))  # W_y gathered in row pieces within the budget
        for i0 in range(0, C, step):
            i1 = min(C, i0 + step)
            acc[i0:i1].addcmul_(weight[y0[i0:i1]].to(dt), hot[i0:i1, None], value=-1.0)
        acc.masked_fill_(~valid[:, None], 0.0)
    return torch.where(valid, loss, 0.0).float(), m.float(), log_s.float()


def _addmm_(acc, a, w_b):
    """acc += a @ w_b, the product in w_b's dtype (as eager's dhidden GEMM), accumulated in acc's dtype."""
    if w_b.dtype == acc.dtype:
        acc.addmm_(a.to(acc.dtype), w_b)
    else:
        acc += torch.mm(a.to(w_b.dtype), w_b).to(acc.dtype)


def _chunks(hidden, weight, rows, chunk_bytes):
    """(c0, c1) token ranges of full-row chunks: `rows` tokens, or (None) the most within chunk_bytes."""
    N = hidden.shape[0]
    step = rows or chunk_rows(N, weight.shape[0], chunk_bytes)
    return [(c0, min(N, c0 + step)) for c0 in range(0, N, step)]


def _grad_buffers(hidden, weight, need_dh, need_dw, need_db):
    """dhidden (N, H) in hidden.dtype (written chunk by chunk), zeroed dweight (V, H) and dbias (V,) in fp32
    (fp64 for fp64 inputs); None where not needed."""
    (N, H), V = hidden.shape, weight.shape[0]
    dh = torch.empty((N, H), device=hidden.device, dtype=hidden.dtype) if need_dh else None
    acc = torch.promote_types(hidden.dtype, torch.float32)
    dw = torch.zeros((V, H), device=hidden.device, dtype=acc) if need_dw else None
    db = torch.zeros((V,), device=hidden.device, dtype=acc) if need_db else None
    return dh, dw, db


def _accumulate(u, h_c, weight, dh, dw, db, c0, c1):
    """dhidden[c0:c1] = u @ weight (in weight's dtype, as eager); dW += u.T @ h_c and db += colsum(u) in the
    accumulator dtype."""
    if dh is not None:
        torch.mm(u.to(weight.dtype), weight, out=dh[c0:c1])
    if dw is not None:
        dw.addmm_(u.t().to(dw.dtype), h_c.to(dw.dtype))
    if db is not None:
        db += u.sum(0).to(db.dtype)
