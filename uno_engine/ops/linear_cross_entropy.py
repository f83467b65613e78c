"""Fused linear + cross-entropy: `F.cross_entropy(hidden @ weight.T + bias, labels)` without N x V logits.

Two backends, as custom ops with a fake and an autograd formula (so a compiled critic has no graph break):
- "triton", with two implementations (`uno_engine.kernels.linear_cross_entropy`; see that file):
  - "gif" (gradient in forward; `uno_engine::linear_cross_entropy_gif`), the default when a gradient is needed:
    chunks of tokens, cuBLAS GEMMs for the logits and dhidden, one Triton kernel for the loss and the logits
    gradient in place; the backward only scales the saved gradients by the upstream gradient.
  - "recompute" (`uno_engine::linear_cross_entropy`): online log-sum-exp forward in Triton, the backward
    recomputes the logit tiles. Used without a gradient, and for reduction="none" with a trainable weight or
    bias, whose gradient needs the per-token upstream gradients that only the backward knows.
  The environment variable UNO_LCE_IMPL = auto | gif | recompute picks one (auto: as above; an explicit
  "gif" that cannot take the inputs raises with the reason). The choice is made here, in Python, before the
  custom op, and logged once per choice (logger "uno_engine.ops").
- "torch": the same math in plain PyTorch, chunked over tokens so that memory stays O(chunk * V); the backward
  recomputes each chunk's logits. Runs anywhere (CPU CI, or a GPU without Triton).
The eager, unchunked oracle is `uno_engine.reference.linear_cross_entropy`.

The gif path runs one backward per forward: in eager its backward scales the saved gradient in place and hands
that buffer over as the gradient of hidden (no second N x H allocation), so a second backward through the
same graph (retain_graph=True) raises; set UNO_LCE_IMPL=recompute for that. Under torch.compile the scale is
out of place (see `_scale_unit_grad`).

No host sync: the "mean" divisor (number of non-ignored tokens) stays a device tensor, and the check that
labels lie in [0, V) is `torch._assert_async` on CUDA (the error surfaces at the next synchronization, as a
CUDA device assert); on the CPU it is an ordinary ValueError.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from uno_engine.ops._dispatch import resolve_backend

log = logging.getLogger("uno_engine.ops")

_OP = "uno_engine::linear_cross_entropy"
_GIF_OP = "uno_engine::linear_cross_entropy_gif"
IMPL_ENV = "UNO_LCE_IMPL"
IMPLS = ("auto", "gif", "recompute")
_announced: set[tuple[str, str]] = set()
_REDUCTIONS = ("none", "sum", "mean")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `logits = hidden @ weight.T + bias` against `labels`, never holding the N x V logits.

    Semantics are those of `F.cross_entropy(logits, labels, ignore_index=, label_smoothing=, reduction=)` with
    `logits = softcap * tanh(logits / softcap)` first when softcap is set, plus
    `z_loss * logsumexp(logits)**2` for each non-ignored token. "mean" divides by the number of non-ignored
    tokens; when every token is ignored the loss is 0 and every gradient is 0 (PyTorch would give NaN).

    Args:
        hidden: (N, H) or (B, L, H), float32 / float16 / bfloat16 (float64 with backend="torch"); any strides.
        weight: (V, H), same dtype and device as hidden. Gradients for it are computed only when it requires
            grad, accumulated in fp32.
        labels: (N,) or (B, L), integer class ids in [0, V) or ignore_index.
        bias: optional (V,), same dtype and device.
        ignore_index: label value that contributes neither loss nor gradient.
        label_smoothing: in [0, 1], as in F.cross_entropy.
        z_loss: coefficient >= 0 of lse**2 per non-ignored token.
        softcap: None or > 0.
        reduction: "mean" | "sum" | "none" ("none" returns labels.shape, 0 at ignored tokens).
        backend: "auto" | "triton" | "torch" (see uno_engine.ops._dispatch). On Triton, a call that needs a
            gradient computes it during the forward (see the module docstring; UNO_LCE_IMPL overrides).
    Returns:
        float32 loss: a 0-d tensor, or labels.shape for reduction="none".
    """
    _check_inputs(hidden, weight, labels, bias, label_smoothing, z_loss, softcap, reduction)
    unsupported = []
    if hidden.dtype not in _TRITON_DTYPES:
        unsupported.append(f"hidden dtype {hidden.dtype} (the kernels take float32, float16, bfloat16)")
    choice = resolve_backend("linear_cross_entropy", backend, (hidden, weight, labels, bias), unsupported)
    lead_shape = labels.shape
    H = hidden.shape[-1]
    hidden2d = hidden.reshape(-1, H)
    labels1d = labels.reshape(-1)
    if labels1d.dtype != torch.int64:
        labels1d = labels1d.long()
    if choice == "triton" and resolve_triton_impl(hidden, weight, bias, reduction) == "gif":
        grad_on = torch.is_grad_enabled()
        loss, *_ = torch.ops.uno_engine.linear_cross_entropy_gif(
            hidden2d,
            weight,
            labels1d,
            bias,
            int(ignore_index),
            float(label_smoothing),
            float(z_loss),
            float(softcap) if softcap is not None else 0.0,
            reduction,
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
        )
        return loss.reshape(lead_shape) if reduction == "none" else loss
    loss, _ = torch.ops.uno_engine.linear_cross_entropy(
        hidden2d,
        weight,
        labels1d,
        bias,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap is not None else 0.0,
        reduction,
        choice,
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss


def resolve_triton_impl(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reduction: str
) -> str:
    """Pick the Triton implementation, "gif" or "recompute", from UNO_LCE_IMPL (auto | gif | recompute).

    auto: "gif" when a gradient is needed and gif can take the inputs, else "recompute" (silently, logged).
    An explicit "gif" that cannot take the inputs raises with the reason; without a gradient it still runs
    (the loss-only pass: the logits GEMM and the row kernel).
    """
    requested = os.environ.get(IMPL_ENV, "auto") or "auto"
    if requested not in IMPLS:
        raise ValueError(f"linear_cross_entropy: {IMPL_ENV} must be one of {IMPLS}, got {requested!r}")
    head_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_trainable)
    reasons = []
    if needs_grad and reduction == "none" and head_trainable:
        reasons.append(
            "reduction='none' with a trainable weight or bias: dweight = sum_n g_n dloss_n/dweight needs the "
            "per-token upstream gradients g_n, which only the backward knows"
        )
    if requested == "gif" and reasons:
        raise RuntimeError(f"linear_cross_entropy: {IMPL_ENV}=gif cannot run: " + "; ".join(reasons))
    if requested == "auto":
        if not needs_grad:
            reasons.append("no gradient needed: the loss-only online log-sum-exp kernel")
        choice = "gif" if not reasons else "recompute"
    else:
        choice = requested
    if ("linear_cross_entropy", choice) not in _announced:
        _announced.add(("linear_cross_entropy", choice))
        log.info(
            "linear_cross_entropy: triton %s=%r -> %s%s",
            IMPL_ENV,
            requested,
            choice,
            f" ({'; '.join(reasons)})" if reasons else "",
        )
    return choice


def _check_inputs(hidden, weight, labels, bias, label_smoothing, z_loss, softcap, reduction):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(
            f"linear_cross_entropy: hidden must be (N, H) or (B, L, H), got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}"
        )
    if not hidden.is_floating_point():
        raise TypeError(f"linear_cross_entropy: hidden must be floating point, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, H) with H = hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"linear_cross_entropy: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: weight is on {weight.device} but hidden is on {hidden.device}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels must have shape hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: labels is on {labels.device} but hidden is on {hidden.device}"
        )
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"linear_cross_entropy: bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"linear_cross_entropy: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}"
            )
        if bias.device != hidden.device:
            raise ValueError(
                f"linear_cross_entropy: bias is on {bias.device} but hidden is on {hidden.device}"
            )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be None or > 0, got {softcap}")


def _check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """labels in [0, V) or == ignore_index, without a host sync on CUDA."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if labels.device.type == "cpu":
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"linear_cross_entropy: labels must be in [0, {V}) or ignore_index="
                f"{ignore_index}; labels[{i}] = {int(labels[i])}"
            )
    else:
        # Device-side assert: no .item(); reported at the next synchronization.
        torch._assert_async(~bad.any(), f"linear_cross_entropy: labels must be in [0, {V}) or ignore_index")


def _upstream(grad: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """dL/dloss[n] in fp32: 0 at ignored tokens, divided by the (device-side) count for "mean"."""
    valid = labels != ignore_index
    g = grad.float()
    if reduction == "mean":
        g = g / valid.sum().clamp(min=1).to(torch.float32)
    if reduction != "none":
        g = g.expand(labels.shape)
    return torch.where(valid, g, 0.0).contiguous()


def _reduce(loss_tok: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_tok
    total = loss_tok.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)


# ------------------------------------------------------------------------------------------ torch backend


def _torch_chunk_rows(N: int, V: int) -> int:
    """Tokens per chunk of the torch path: at most 1/128 of the tokens (so the two fp32 C x V buffers stay
    under 2% of the N x V fp32 logits), at least 1 MiB of logits, at most 256 MiB."""
    row_bytes = V * 4
    rows = max(-(-N // 128), (1 << 20) // row_bytes)
    return max(1, min(N, rows, (256 << 20) // row_bytes))


def _torch_logits(h_c, weight, bias, softcap):
    """fp32 logits of one chunk (matmul in the input dtype, as eager), and tanh(x / softcap) (or None)."""
    z = F.linear(h_c, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _torch_forward(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap):
    N, V = hidden.shape[0], weight.shape[0]
    loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
    lse = torch.empty((2, N), device=hidden.device, dtype=torch.float32)  # row max m, log sum exp(z - m)
    step = _torch_chunk_rows(N, V)
    for c0 in range(0, N, step):
        c1 = min(N, c0 + step)
        z, t = _torch_logits(hidden[c0:c1], weight, bias, softcap)
        del t
        y = labels[c0:c1]
        valid = y != ignore_index
        m = z.amax(dim=1)
        log_s = torch.exp(z - m[:, None]).sum(dim=1).log()
        tgt = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
        l_c = (1.0 - label_smoothing) * ((m - tgt) + log_s)
        if label_smoothing > 0:
            l_c = l_c + label_smoothing * ((m - z.mean(dim=1)) + log_s)
        if z_loss > 0:
            l_c = l_c + z_loss * (m + log_s).square()
        del z
        loss[c0:c1] = torch.where(valid, l_c, 0.0)
        lse[0, c0:c1] = m
        lse[1, c0:c1] = log_s
    return loss, lse


def _torch_backward(
    g,
    hidden,
    weight,
    labels,
    bias,
    lse,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    need_dh,
    need_dw,
    need_db,
):
    N, H = hidden.shape
    V = weight.shape[0]
    dh = torch.empty((N, H), device=hidden.device, dtype=hidden.dtype) if need_dh else None
    acc = torch.promote_types(hidden.dtype, torch.float32)
    dw = torch.zeros((V, H), device=hidden.device, dtype=acc) if need_dw else None
    db = torch.zeros((V,), device=hidden.device, dtype=acc) if need_db else None
    step = _torch_chunk_rows(N, V)
    for c0 in range(0, N, step):
        c1 = min(N, c0 + step)
        h_c = hidden[c0:c1]
        y = labels[c0:c1]
        valid = y != ignore_index
        m, log_s = lse[0, c0:c1, None], lse[1, c0:c1, None]
        z, t = _torch_logits(h_c, weight, bias, softcap)
        # u = g * ((1 + 2 zl lse) softmax - (1 - eps) onehot - eps / V), in place in z; exp((z - m) - log_s)
        # rather than exp(z - lse), whose fp32 rounding would matter for logits ~1e4.
        u = z.sub_(m).sub_(log_s).exp_().mul_((1.0 + 2.0 * z_loss * (m + log_s)) * g[c0:c1, None])
        if label_smoothing > 0:
            u.sub_((label_smoothing / V) * g[c0:c1, None])
        rows = torch.arange(c1 - c0, device=hidden.device)
        u[rows, torch.where(valid, y, 0)] -= (1.0 - label_smoothing) * g[c0:c1]
        u.mul_(valid[:, None])
        if t is not None:
            u.mul_(t.square_().neg_().add_(1.0))
            del t
        if need_dh:
            dh[c0:c1] = (u.to(weight.dtype) @ weight).to(hidden.dtype)
        if need_dw:
            dw.addmm_(u.t(), h_c.to(acc))
        if need_db:
            db += u.sum(0)
        del u, z
    return dh, dw, db


# ------------------------------------------------------------------------------------------ the custom op


@torch.library.custom_op(_OP, mutates_args=())
def _lce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse): loss as reduced by `reduction` (fp32); lse (2, N) fp32 = row max and log sum exp(z - max),
    saved for the backward. softcap 0 = off."""
    cap = softcap if softcap > 0 else None
    _check_label_range(labels, weight.shape[0], ignore_index)
    if backend == "triton":
        from uno_engine.kernels.linear_cross_entropy import linear_cross_entropy_forward

        loss_tok, lse = linear_cross_entropy_forward(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=cap,
        )
    else:
        loss_tok, lse = _torch_forward(
            hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, cap
        )
    return _reduce(loss_tok, labels, ignore_index, reduction), lse


@_lce_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, reduction, backend):
    N = hidden.shape[0]
    loss_shape = (N,) if reduction == "none" else ()
    return (hidden.new_empty(loss_shape, dtype=torch.float32), hidden.new_empty((2, N), dtype=torch.float32))


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _lce_backward_op(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    backend: str,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes; a 0-element tensor for each gradient not needed."""
    cap = softcap if softcap > 0 else None
    g = _upstream(grad, labels, ignore_index, reduction)
    if backend == "triton":
        from uno_engine.kernels.linear_cross_entropy import linear_cross_entropy_backward

        dh, dw, db = linear_cross_entropy_backward(
            g,
            hidden,
            weight,
            labels,
            bias,
            lse,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=cap,
            need_dhidden=need_dhidden,
            need_dweight=need_dweight,
            need_dbias=need_dbias,
        )
    else:
        dh, dw, db = _torch_backward(
            g,
            hidden,
            weight,
            labels,
            bias,
            lse,
            ignore_index,
            label_smoothing,
            z_loss,
            cap,
            need_dhidden,
            need_dweight,
            need_dbias,
        )
    return (
        dh if dh is not None else hidden.new_empty((0,)),
        dw.to(weight.dtype) if dw is not None else hidden.new_empty((0,)),
        db.to(bias.dtype) if db is not None else hidden.new_empty((0,)),
    )


@_lce_backward_op.register_fake
def _(
    grad,
    hidden,
    weight,
    labels,
    bias,
    lse,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    backend,
    need_dhidden,
    need_dweight,
    need_dbias,
):
    return (
        hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty((0,)),
        weight.new_empty(weight.shape) if need_dweight else hidden.new_empty((0,)),
        bias.new_empty(bias.shape) if need_dbias else hidden.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, reduction, backend = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, reduction, backend)


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
    need_db = need_db and bias is not None
    if not (need_dh or need_dw or need_db):
        return (None,) * 10
    dh, dw, db = torch.ops.uno_engine.linear_cross_entropy_backward(
        grad_loss, hidden, weight, labels, bias, lse, *ctx.args, need_dh, need_dw, need_db
    )
    return (dh if need_dh else None, dw if need_dw else None, None, db if need_db else None) + (None,) * 6


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ gradient in forward (gif)


@torch.library.custom_op(_GIF_OP, mutates_args=())
def _lce_gif_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dweight, dbias): loss as reduced by `reduction` (fp32), and the gradients for an upstream
    gradient of 1 on every token's loss (dhidden (N, H) in hidden.dtype, dweight (V, H) and dbias (V,) in
    fp32; a 0-element tensor where not needed), which the backward scales. softcap 0 = off."""
    from uno_engine.kernels.linear_cross_entropy import linear_cross_entropy_gif

    if reduction == "none" and (need_dweight or need_dbias):
        raise ValueError(
            "linear_cross_entropy_gif: reduction='none' cannot form dweight / dbias in the forward (they need "
            "the per-token upstream gradients); use the recompute op"
        )
    cap = softcap if softcap > 0 else None
    _check_label_range(labels, weight.shape[0], ignore_index)
    loss_tok, dh, dw, db = linear_cross_entropy_gif(
        hidden,
        weight,
        labels,
        bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=cap,
        need_dhidden=need_dhidden,
        need_dweight=need_dweight,
        need_dbias=need_dbias,
    )
    return (
        _reduce(loss_tok, labels, ignore_index, reduction),
        dh if dh is not None else hidden.new_empty((0,)),
        dw if dw is not None else hidden.new_empty((0,), dtype=torch.float32),
        db if db is not None else hidden.new_empty((0,), dtype=torch.float32),
    )


@_lce_gif_op.register_fake
def _(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    need_dhidden,
    need_dweight,
    need_dbias,
):
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = torch.float32
    return (
        hidden.new_empty((N,) if reduction == "none" else (), dtype=f32),
        hidden.new_empty((N, H) if need_dhidden else (0,)),
        hidden.new_empty((V, H) if need_dweight else (0,), dtype=f32),
        hidden.new_empty((V,) if need_dbias else (0,), dtype=f32),
    )


def _scale_unit_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x * g[:, None] for a per-row g (R,), or x * g for a one-element g, in fp32 arithmetic, rounded once.

    In eager x is the op's own buffer, which nothing else holds: it is scaled in place by a Triton kernel and
    handed over (no second N x H). Under tracing (torch.compile, export) x is a subclass (functional / fake
    tensor) and the op's outputs are graph values: an in-place write to them from the backward cannot be
    partitioned, so the scale is out of place there (the compiler may fuse it).
    """
    if type(x) is torch.Tensor:
        from uno_engine.kernels.linear_cross_entropy import scale_rows_

        scale_rows_(x, g)
        return x
    factor = g[:, None] if g.numel() != 1 else g
    return (x.float() * factor).to(x.dtype)


def _gif_setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, *_, reduction, need_dh, need_dw, need_db = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.save_for_backward(labels, dh, dw, db)
    ctx.args = (
        ignore_index,
        reduction,
        need_dh,
        need_dw,
        need_db,
        weight.dtype,
        bias.dtype if bias is not None else None,
    )
    ctx.gif_used = False


def _gif_backward(ctx, grad_loss, *_unused):
    if ctx.gif_used:
        raise RuntimeError(
            "linear_cross_entropy: a second backward through the same gradient-in-forward graph "
            "(retain_graph=True). Its backward scales the saved gradient in place and hands it over as the "
            f"gradient; set {IMPL_ENV}=recompute for graphs that are run backward more than once."
        )
    ctx.gif_used = True
    labels, dh, dw, db = ctx.saved_tensors
    ignore_index, reduction, need_dh, need_dw, need_db, w_dtype, b_dtype = ctx.args
    wanted = ctx.needs_input_grad
    missing = [
        name
        for name, asked, formed in (
            ("hidden", wanted[0], need_dh),
            ("weight", wanted[1], need_dw),
            ("bias", wanted[3], need_db),
        )
        if asked and not formed
    ]
    if missing:
        raise RuntimeError(
            f"linear_cross_entropy: the forward formed no gradient for {missing} (they did not require grad, or "
            "grad mode was off, when it ran)"
        )
    if need_dh:
        # dloss_n/dhidden_n is linear in the upstream gradient g_n of token n: one scale per row.
        dh = _scale_unit_grad(dh, _upstream(grad_loss, labels, ignore_index, reduction))
    if need_dw or need_db:
        # "mean" / "sum" only (the dispatch sends "none" with a trainable head to the recompute path): every
        # token has the same upstream gradient, so the summed unit gradients scale by one factor.
        g = grad_loss.float().reshape(1)
        if reduction == "mean":
            g = g / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
        if need_dw:
            dw = _scale_unit_grad(dw, g)
        if need_db:
            db = _scale_unit_grad(db, g)
    return (
        dh if need_dh else None,
        dw.to(w_dtype) if need_dw else None,
        None,
        db.to(b_dtype) if need_db else None,
    ) + (None,) * 8


_lce_gif_op.register_autograd(_gif_backward, setup_context=_gif_setup_context)
