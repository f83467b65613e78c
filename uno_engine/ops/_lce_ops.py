"""The registered ops of `ops.linear_cross_entropy` (`uno_engine.ops._register.custom_op`: a torch custom op with
a fake and an autograd formula, plus the eager fast path). Each takes `backend` ("triton" | "torch") and runs
the Triton launchers (`uno_engine.kernels.linear_cross_entropy`) or the torch path (`_lce_torch`).

- `uno_engine::linear_cross_entropy` (recompute): (loss, lse) with lse (2, N) = row max and log sum exp(z - max)
  saved for `uno_engine::linear_cross_entropy_backward`, which recomputes the logits.
- `uno_engine::linear_cross_entropy_grad_in_forward`: (loss, dhidden, dweight, dbias) with the gradients for
  an upstream gradient of 1 on every token; the backward only scales them (no kernel but the scale). In eager
  the scale is in place and the buffer is handed over as the gradient (no second N x H), so a second backward
  through the same graph (retain_graph=True) raises: use impl="recompute" there. Under tracing (compile,
  export) the scale is out of place.

Arguments the public function resolves (the chunk override, the loss reduction) are op arguments, so a
traced graph holds them as constants and nothing here reads the environment. Labels are checked against
[0, V) without a host sync on CUDA (`torch._assert_async`, reported at the next synchronization); on the
CPU it is a ValueError naming the first bad position.
"""

from __future__ import annotations

import torch

from uno_engine.ops import _lce_torch
from uno_engine.ops._register import custom_op

_NONE = (None,)


def check_label_range(labels: torch.Tensor, V: int, ignore_index: int) -> None:
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
        torch._assert_async(~bad.any(), f"linear_cross_entropy: labels must be in [0, {V}) or ignore_index")


def upstream(grad: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """dL/dloss[n] in fp32: 0 at ignored tokens, divided by the (device-side) count for "mean"."""
    valid = labels != ignore_index
    g = grad.float()
    if reduction == "mean":
        g = g / valid.sum().clamp(min=1).to(torch.float32)
    if reduction != "none":
        g = g.expand(labels.shape)
    return torch.where(valid, g, 0.0).contiguous()


def reduce(loss_tok: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Reduce per-token losses: "none" as is; "sum"; "mean" over non-ignored tokens (0 when there are none)."""
    if reduction == "none":
        return loss_tok
    total = loss_tok.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


def _entry(backend: str, name: str):
    """The entry point `name` ("forward", "backward", "grad_in_forward") of the backend: the Triton launcher
    `uno_engine.kernels.linear_cross_entropy.linear_cross_entropy_<name>` or `_lce_torch.<name>`, which take
    the same arguments (the torch forward also `chunk_rows`)."""
    if backend == "triton":
        from uno_engine.kernels import linear_cross_entropy as kernels

        return getattr(kernels, f"linear_cross_entropy_{name}")
    return getattr(_lce_torch, name)


def _loss_args(ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> dict:
    """The loss definition as the entry points take it (softcap 0 = off = None)."""
    return dict(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap if softcap > 0 else None,
    )


# ------------------------------------------------------------------------------------- recompute: forward
def _fwd_fake(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    backend,
    chunk_rows,
):
    N = hidden.shape[0]
    loss_shape = (N,) if reduction == "none" else ()
    return hidden.new_empty(loss_shape, dtype=torch.float32), hidden.new_empty((2, N), dtype=torch.float32)


@custom_op("uno_engine::linear_cross_entropy", fake=_fwd_fake)
def lce_forward(
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
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss as reduced by `reduction` (fp32), lse (2, N) fp32). softcap 0 = off; chunk_rows 0 = default."""
    check_label_range(labels, weight.shape[0], ignore_index)
    chunking = {} if backend == "triton" else {"chunk_rows": chunk_rows or None}  # the kernel does not chunk
    loss_tok, lse = _entry(backend, "forward")(
        hidden, weight, labels, bias, **_loss_args(ignore_index, label_smoothing, z_loss, softcap), **chunking
    )
    return reduce(loss_tok, labels, ignore_index, reduction), lse


def _bwd_fake(
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
    chunk_rows,
    need_dhidden,
    need_dweight,
    need_dbias,
):
    return (
        hidden.new_empty(hidden.shape) if need_dhidden else _empty(hidden),
        weight.new_empty(weight.shape) if need_dweight else _empty(hidden),
        bias.new_empty(bias.shape) if need_dbias else _empty(hidden),
    )


@custom_op("uno_engine::linear_cross_entropy_backward", fake=_bwd_fake)
def lce_backward(
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
    chunk_rows: int,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes; a 0-element tensor for each gradient not needed."""
    dh, dw, db = _entry(backend, "backward")(
        upstream(grad, labels, ignore_index, reduction),
        hidden,
        weight,
        labels,
        bias,
        lse,
        **_loss_args(ignore_index, label_smoothing, z_loss, softcap),
        need_dhidden=need_dhidden,
        need_dweight=need_dweight,
        need_dbias=need_dbias,
        chunk_rows=chunk_rows or None,
    )
    return (
        dh if dh is not None else _empty(hidden),
        dw.to(weight.dtype) if dw is not None else _empty(hidden),
        db.to(bias.dtype) if db is not None else _empty(hidden),
    )


def _fwd_setup(ctx, inputs, output):
    hidden, weight, labels, bias, *args = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(output[1])


def _fwd_backward(ctx, grad_loss, _grad_lse):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
    need_db = need_db and bias is not None
    if not (need_dh or need_dw or need_db):
        return (None,) * 11
    dh, dw, db = lce_backward(
        grad_loss, hidden, weight, labels, bias, lse, *ctx.args, need_dh, need_dw, need_db
    )
    return (dh if need_dh else None, dw if need_dw else None, None, db if need_db else None) + _NONE * 7


lce_forward.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ------------------------------------------------------------------------------------- gradient in forward
def _grad_in_forward_fake(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    backend,
    chunk_rows,
    need_dhidden,
    need_dweight,
    need_dbias,
):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return (
        hidden.new_empty((N,) if reduction == "none" else (), dtype=torch.float32),
        hidden.new_empty((N, H) if need_dhidden else (0,)),
        hidden.new_empty((V, H) if need_dweight else (0,), dtype=acc),
        hidden.new_empty((V,) if need_dbias else (0,), dtype=acc),
    )


@custom_op("uno_engine::linear_cross_entropy_grad_in_forward", fake=_grad_in_forward_fake)
def lce_grad_in_forward(
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
    chunk_rows: int,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dhidden, dweight, dbias): loss as reduced by `reduction` (fp32), and the gradients for an upstream
    gradient of 1 on every token's loss (dhidden (N, H) in hidden.dtype, dweight (V, H) and dbias (V,) in
    fp32 (fp64 for fp64 inputs); a 0-element tensor where not needed), which the backward scales."""
    if reduction == "none" and (need_dweight or need_dbias):
        raise ValueError(
            "linear_cross_entropy_grad_in_forward: reduction='none' cannot form dweight / dbias in the forward "
            "(they need the per-token upstream gradients); use the recompute op"
        )
    check_label_range(labels, weight.shape[0], ignore_index)
    loss_tok, dh, dw, db = _entry(backend, "grad_in_forward")(
        hidden,
        weight,
        labels,
        bias,
        **_loss_args(ignore_index, label_smoothing, z_loss, softcap),
        need_dhidden=need_dhidden,
        need_dweight=need_dweight,
        need_dbias=need_dbias,
        chunk_rows=chunk_rows or None,
    )
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return (
        reduce(loss_tok, labels, ignore_index, reduction),
        dh if dh is not None else _empty(hidden),
        dw if dw is not None else _empty(hidden, acc),
        db if db is not None else _empty(hidden, acc),
    )


def _scale_unit_grad(x: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """x * g[:, None] for a per-row g (R,), or x * g for a one-element g, in fp32 arithmetic (or x's, if
    wider), rounded once.

    In eager x is the op's own buffer, which nothing else holds: it is scaled in place (a Triton kernel, or
    torch's mul_) and handed over (no second N x H). Under tracing (torch.compile, export) x is a subclass
    (functional / fake tensor) and the op's outputs are graph values: an in-place write to them from the
    backward cannot be partitioned, so the scale is out of place there (the compiler may fuse it)."""
    factor = g[:, None] if g.numel() != 1 else g
    if type(x) is not torch.Tensor:
        return (x.to(torch.promote_types(x.dtype, torch.float32)) * factor).to(x.dtype)
    if backend == "triton":
        from uno_engine.kernels.linear_cross_entropy import scale_rows_

        scale_rows_(x, g)
        return x
    return x.mul_(factor)


def _grad_in_forward_setup(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, _, _, _, reduction, backend, _, need_dh, need_dw, need_db = (
        inputs
    )
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    # No zero gradients for the three gradient outputs: autograd would materialize an N x H (and V x H) zero
    # tensor for them in the backward, as large as dhidden itself.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(labels, dh, dw, db)
    ctx.args = (
        ignore_index,
        reduction,
        backend,
        need_dh,
        need_dw,
        need_db,
        weight.dtype,
        bias.dtype if bias is not None else None,
    )
    ctx.grad_used = False


def _grad_in_forward_backward(ctx, grad_loss, *_unused):
    if ctx.grad_used:
        raise RuntimeError(
            "linear_cross_entropy: a second backward through the same gradient-in-forward graph "
            "(retain_graph=True). Its backward scales the saved gradient in place and hands it over as the "
            "gradient; use impl='recompute' for graphs that are run backward more than once."
        )
    ctx.grad_used = True
    labels, dh, dw, db = ctx.saved_tensors
    ignore_index, reduction, backend, need_dh, need_dw, need_db, w_dtype, b_dtype = ctx.args
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
        dh = _scale_unit_grad(dh, upstream(grad_loss, labels, ignore_index, reduction), backend)
    if need_dw or need_db:
        # "mean" / "sum" only (a trainable head with "none" takes the recompute op): every token has the same
        # upstream gradient, so the summed unit gradients scale by one factor.
        g = grad_loss.float().reshape(1)
        if reduction == "mean":
            g = g / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
        if need_dw:
            dw = _scale_unit_grad(dw, g, backend)
        if need_db:
            db = _scale_unit_grad(db, g, backend)
    return (
        dh if need_dh else None,
        dw.to(w_dtype) if need_dw else None,
        None,
        db.to(b_dtype) if need_db else None,
    ) + _NONE * 10


lce_grad_in_forward.register_autograd(_grad_in_forward_backward, setup_context=_grad_in_forward_setup)
