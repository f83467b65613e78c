"""The torch path of `ops.linear_cross_entropy`: the Triton kernels' math in plain PyTorch, chunked over tokens
so that memory stays O(chunk * V) beyond the inputs and gradients. Runs anywhere (CPU, a GPU without Triton).

Math per token n (label y, V classes, smoothing eps, z-loss zl, optional softcap s), as in
`uno_engine.kernels.linear_cross_entropy`:
    z = s tanh(x / s) or x, x = hidden[n] @ weight.T + bias;  lse = m + log sum_j exp(z_j - m), m = max_j z_j
    loss = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j) + zl lse^2                (0 at ignored tokens)
    dloss/dz_j = (1 + 2 zl lse) softmax(z)_j - (1 - eps) [j == y] - eps / V        (x (1 - tanh^2) with s)

Three entry points, one per implementation:
- `forward` (loss and (m, log sum) per token) and `backward` (recomputes each chunk's logits): the
  "recompute" implementation; 1 GEMM forward, 2 backward (3 with a trainable head).
- `grad_in_forward`: per chunk the logits GEMM, the loss and the unit gradient dloss/dz (upstream gradient
  1) in place, then dhidden_c = u @ weight (and dW += u.T @ h_c): 2 GEMMs in all (3 with a trainable
  head), as eager autograd; the backward only scales the saved gradients. Memory: one C x V fp32 chunk and
  the N x H gradient, which becomes hidden.grad.
Chunk size: `chunk_rows`, or the caller's override. The three take the arguments of the Triton launchers
(`uno_engine.kernels.linear_cross_entropy`; the forward also a chunk size), so `_lce_ops` calls either alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_rows(N: int, V: int, H: int = 0) -> int:
    """Tokens per chunk: the largest of 1/128 of the tokens (the fp32 C x V buffers then stay under 2% of the
    N x V fp32 logits), 1 MiB of logits, and H / 2 rows; at most 256 MiB of logits and N.

    Why H / 2: each chunk streams the V x H weight twice (the logits GEMM and the dhidden GEMM) and its own
    C x V logits a few times; below about H / 2 rows the weight's traffic dominates and the GEMMs run far
    from the matmul rate (the CPU benchmark at V=32000, H=768, N=128: 8-row chunks several times slower
    than one 128-row chunk, and slower than eager). The chunk stays smaller than eager's logits."""
    row_bytes = max(V, 1) * 4
    rows = max(-(-N // 128), (1 << 20) // row_bytes, H // 2)
    return max(1, min(N, rows, (256 << 20) // row_bytes))


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


def _dlogits_(e, t, m, log_s, g, y, valid, label_smoothing, z_loss):
    """dL/dz of one chunk in place in e = exp(z - m): g * ((1 + 2 zl lse) softmax - (1 - eps) onehot - eps / V),
    times 1 - t^2 with softcap; rows of ignored tokens are 0. softmax = e / exp(log_s) (rather than
    exp(z - lse), whose fp32 rounding would matter for logits ~1e4). g: (C, 1) fp32."""
    V = e.shape[1]
    u = e.mul_((1.0 + 2.0 * z_loss * (m + log_s))[:, None] * torch.exp(-log_s)[:, None] * g)
    if label_smoothing > 0:
        u.sub_((label_smoothing / V) * g)
    rows = torch.arange(u.shape[0], device=u.device)
    u[rows, torch.where(valid, y, 0)] -= (1.0 - label_smoothing) * g[:, 0]
    if t is not None:
        u.mul_(t.square_().neg_().add_(1.0))
    return u.masked_fill_(~valid[:, None], 0.0)


def forward(hidden, weight, labels, bias, *, ignore_index, label_smoothing, z_loss, softcap, chunk_rows=None):
    """(loss (N,) fp32, lse (2, N) fp32 = row max and log sum exp(z - max))."""
    N = hidden.shape[0]
    loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
    lse = torch.empty((2, N), device=hidden.device, dtype=torch.float32)
    for c0, c1 in _chunks(hidden, weight, chunk_rows):
        z, _ = _logits(hidden[c0:c1], weight, bias, softcap)
        y = labels[c0:c1]
        loss[c0:c1], lse[0, c0:c1], lse[1, c0:c1] = _row_stats_(
            z, y, y != ignore_index, label_smoothing, z_loss
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
):
    """(dhidden in hidden.dtype, dweight, dbias in fp32 (fp64 for fp64 inputs)) for the per-token upstream
    gradient g (N,) fp32; None where not needed. Recomputes each chunk's logits."""
    dh, dw, db = _grad_buffers(hidden, weight, need_dhidden, need_dweight, need_dbias)
    for c0, c1 in _chunks(hidden, weight, chunk_rows):
        h_c, y = hidden[c0:c1], labels[c0:c1]
        z, t = _logits(h_c, weight, bias, softcap)
        m, log_s = lse[0, c0:c1], lse[1, c0:c1]
        e = z.sub_(m[:, None]).exp_()
        u = _dlogits_(e, t, m, log_s, g[c0:c1, None], y, y != ignore_index, label_smoothing, z_loss)
        _accumulate(u, h_c, weight, dh, dw, db, c0, c1)
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
):
    """(loss (N,) fp32, dhidden, dweight, dbias) with the gradients for an upstream gradient of 1 on every
    non-ignored token's loss (dhidden in hidden.dtype; dweight, dbias in fp32 / fp64); None where not
    needed."""
    loss = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    dh, dw, db = _grad_buffers(hidden, weight, need_dhidden, need_dweight, need_dbias)
    any_grad = need_dhidden or need_dweight or need_dbias
    for c0, c1 in _chunks(hidden, weight, chunk_rows):
        h_c, y = hidden[c0:c1], labels[c0:c1]
        valid = y != ignore_index
        z, t = _logits(h_c, weight, bias, softcap)
        loss[c0:c1], m, log_s = _row_stats_(z, y, valid, label_smoothing, z_loss)
        if any_grad:
            one = torch.ones((1, 1), device=z.device, dtype=z.dtype)
            u = _dlogits_(z, t, m, log_s, one, y, valid, label_smoothing, z_loss)
            _accumulate(u, h_c, weight, dh, dw, db, c0, c1)
    return loss, dh, dw, db


def _chunks(hidden, weight, rows):
    """(c0, c1) token ranges of `rows` tokens (None: the `chunk_rows` rule)."""
    N = hidden.shape[0]
    step = rows or chunk_rows(N, weight.shape[0], hidden.shape[1])
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
