"""Regression losses for the critic's patch-feature heads: `regression_loss` (one term) and
`fused_regression` (several weighted terms, their losses and every pred's gradient in ONE Triton launch).

Semantics (identical to `uno_engine.eager.regression_loss`, the oracle):
- kind "mse": (p - y)^2; "smooth_l1": 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta (beta = 0 is L1);
  "cosine": 1 - <p, y> / (max(|p|, 1e-8) max(|y|, 1e-8)) per row over the last dim.
- mask broadcasts to pred (to pred.shape[:-1] for cosine, per row); weight multiplies elementwise (per row
  for cosine); a float weight or a 0-d tensor simply scales the term.
- "mean" divides sum(weight * mask * loss) by sum(mask broadcast to the loss's shape), a device tensor (no
  host sync). An all-zero mask gives a loss of 0 (and zero gradients), not NaN; empty inputs give 0.
- A NaN or Inf in pred or target reaches the loss on both backends, even under a zero mask or weight (they
  multiply the per-element loss): non-finite values are never dropped.

The Triton path (`backend="triton"`, or "auto" on CUDA) is the op `uno_engine::fused_regression_fwd`:
ONE launch computes every term's (numerator, mask sum) and writes the gradient s*w*m*dl/dp of every pred
that needs one (and of every target that requires grad) in the same pass, a one-program launch turns the
partial sums into the losses and their total; the gradients are saved, and the backward
(`uno_engine::fused_regression_bwd`, one launch) multiplies them by d total / d numerator = grad_output /
mask sum. weight and mask are constants on this path (a weight or mask that requires grad sends "auto" to
the torch path and makes "triton" raise). Masks and weights of any dtype (bool included) are read as they
are: no conversion kernels. The torch path is `uno_engine.eager` (autograd through it).

Host cost. The op is host-bound at the critic's shapes (its kernels are short), so the host path is kept
short: the launch plan (views, strides, block sizes, programs per term) is cached per (layout, shapes,
strides, dtypes); tensors go to the kernel as plain arguments (no descriptor table, no host-to-device copy);
the op is registered with `uno_engine.ops._register.custom_op`, whose eager path skips the custom op's
generic autograd adapter (benchmarks/bench_host_overhead.py measures it). It is a real op: a fake, an
autograd formula, opcheck-tested, and its backward is an op too, so torch.compile and AOTAutograd trace it.

Launch settings: `kernel_config()`: `kernel_config_override(...)`, else the environment override
UNO_REGRESSION_CONFIG (`uno_engine._env`), else `RegressionConfig()`'s defaults.

Files, as linear cross-entropy's: this one holds the API and the argument checks; the torch path is
`uno_engine.eager`; the registered ops (and the RegressionTerm -> op arguments step) are `_regression_ops`;
the Triton launch settings and the cached launch plan are `_regression_plan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uno_engine import eager
from uno_engine.ops._dispatch import resolve_backend
from uno_engine.ops._regression_ops import fused_regression_bwd, fused_regression_fwd, run_terms
from uno_engine.ops._regression_plan import kernel_config, kernel_config_override

KINDS = eager.REGRESSION_KINDS
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class RegressionTerm:
    """One term of `fused_regression`.

    pred: (..., D) floating tensor (gets the gradient). target: same shape as pred.
    kind: "mse" | "smooth_l1" | "cosine". weight: float or 0-d tensor (scales the term) or a tensor
    broadcastable to pred (to pred.shape[:-1] for cosine) weighting elements (rows). mask: None or a
    bool/float tensor broadcastable like weight; the term is mean-reduced over the mask's sum.
    beta: smooth_l1 threshold (>= 0).
    """

    pred: torch.Tensor
    target: torch.Tensor
    kind: str = "mse"
    weight: float | torch.Tensor = 1.0
    mask: torch.Tensor | None = None
    beta: float = 1.0


# ------------------------------------------------------------------------------------------------ checks
def _loss_shape(pred: torch.Tensor, kind: str) -> torch.Size:
    return pred.shape[:-1] if kind == "cosine" else pred.shape


def _broadcasts_to(src: tuple, dst: tuple) -> bool:
    """src broadcasts to exactly dst (plain tuples: torch.broadcast_shapes runs torch._refs' symbolic-shape
    code on every call, and the op is host-bound on a GPU)."""
    if len(src) > len(dst):
        return False
    return all(s == d or s == 1 for s, d in zip(src[::-1], dst[::-1], strict=False))


def _check_term(pred, target, kind, weight, mask, beta, name: str) -> None:
    """Errors name the argument (`name` is "" for regression_loss, "terms[i]." for fused_regression)."""
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"{name}pred must be a torch.Tensor, got {type(pred).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}target must be a torch.Tensor, got {type(target).__name__}")
    if not pred.is_floating_point():
        raise TypeError(f"{name}pred must be a floating tensor, got {pred.dtype}")
    if not target.is_floating_point():
        raise TypeError(f"{name}target must be a floating tensor, got {target.dtype}")
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}target has shape {tuple(target.shape)}, which differs from "
            f"{name}pred's shape {tuple(pred.shape)}; they must be equal"
        )
    if pred.device != target.device:
        raise ValueError(f"{name}target is on {target.device} but {name}pred is on {pred.device}")
    if kind not in KINDS:
        raise ValueError(f"{name}kind must be one of {KINDS}, got {kind!r}")
    if kind == "cosine" and pred.dim() < 1:
        raise ValueError(f"{name}pred must have at least one dim for kind='cosine' (rows over the last dim)")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"{name}beta must be a finite float >= 0, got {beta!r}")
    shape = _loss_shape(pred, kind)
    what = "pred.shape[:-1] (per row, kind='cosine')" if kind == "cosine" else "pred's shape"
    for arg, val in (("mask", mask), ("weight", weight)):
        if val is None or isinstance(val, (int, float)):
            continue
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"{name}{arg} must be None, a float or a tensor, got {type(val).__name__}")
        if val.device != pred.device and val.dim() > 0:
            raise ValueError(f"{name}{arg} is on {val.device} but {name}pred is on {pred.device}")
        if not _broadcasts_to(tuple(val.shape), tuple(shape)):
            raise ValueError(
                f"{name}{arg} of shape {tuple(val.shape)} does not broadcast to {what} {tuple(shape)}"
            )


def _triton_reasons(terms: Sequence[RegressionTerm]) -> list[str]:
    reasons = []
    for i, t in enumerate(terms):
        if t.pred.dtype not in _TRITON_DTYPES or t.target.dtype not in _TRITON_DTYPES:
            reasons.append(
                f"terms[{i}] has dtype {t.pred.dtype}/{t.target.dtype}; the kernel takes "
                "float32, float16 or bfloat16"
            )
        for arg in ("weight", "mask"):
            v = getattr(t, arg)
            if isinstance(v, torch.Tensor) and v.requires_grad:
                reasons.append(f"terms[{i}].{arg} requires grad; the fused kernel treats it as a constant")
    return reasons



# ---------------------------------------------------------------------------------------------- public
def fused_regression(terms: Sequence[RegressionTerm], *, backend: str = "auto"):
    """Weighted sum of mean-reduced regression terms, computed in one fused pass.

    Args:
        terms: RegressionTerm list (each pred (..., D_t); shapes, kinds and dtypes may differ).
        backend: "auto" | "triton" | "torch".
    Returns:
        total: 0-d float32 tensor with grad = sum_t per_term[t];
        per_term: (T,) float32, detached: each term's weighted mean loss, for logging.
    """
    terms = list(terms)
    if not terms:
        raise ValueError("terms must be a non-empty sequence of RegressionTerm")
    for i, t in enumerate(terms):
        if not isinstance(t, RegressionTerm):
            raise TypeError(f"terms[{i}] must be a RegressionTerm, got {type(t).__name__}")
        _check_term(t.pred, t.target, t.kind, t.weight, t.mask, t.beta, f"terms[{i}].")
    device = terms[0].pred.device
    if any(t.pred.device != device for t in terms):
        raise ValueError(
            f"terms must all be on one device, got {sorted({str(t.pred.device) for t in terms})}"
        )
    tensors = [x for t in terms for x in (t.pred, t.target, t.mask, t.weight) if isinstance(x, torch.Tensor)]
    choice = resolve_backend("fused_regression", backend, tensors, _triton_reasons(terms))
    if choice == "torch":
        return eager.fused_regression(terms)
    total, per_term = run_terms(terms, mean=True)
    return total, per_term.detach()


def regression_loss(
    pred, target, *, kind="mse", weight=None, mask=None, beta=1.0, reduction="mean", backend="auto"
):
    """One regression term.

    Args:
        pred: (..., D) floating tensor. target: same shape (gets a gradient only if it requires grad).
        kind: "mse" | "smooth_l1" | "cosine" (1 - cosine similarity per row over the last dim).
        weight: None, float, or tensor broadcastable to pred (to pred.shape[:-1] for cosine).
        mask: None or bool/float tensor broadcastable like weight.
        beta: smooth_l1 threshold (>= 0; 0 is L1).
        reduction: "mean" (sum(weight * mask * loss) / sum(mask); 0 for an all-zero mask) | "sum" | "none"
            ("none" runs on the torch path: the fused kernel produces sums only).
        backend: "auto" | "triton" | "torch".
    Returns:
        0-d float32 tensor ("mean"/"sum"), or the weighted, masked loss of pred's shape (pred.shape[:-1]
        for cosine) for "none".
    """
    _check_term(pred, target, kind, weight, mask, beta, "")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    term = RegressionTerm(pred, target, kind, 1.0 if weight is None else weight, mask, beta)
    reasons = _triton_reasons([term])
    if reduction == "none":
        reasons.append("reduction='none' is not fused (the kernel produces sums)")
    tensors = [x for x in (pred, target, mask, weight) if isinstance(x, torch.Tensor)]
    choice = resolve_backend("regression_loss", backend, tensors, reasons)
    if choice == "torch":
        return eager.regression_loss(
            pred, target, kind=kind, weight=weight, mask=mask, beta=beta, reduction=reduction
        )
    total, _ = run_terms([term], mean=reduction == "mean")
    return total


__all__ = [
    "RegressionTerm",
    "fused_regression",
    "fused_regression_bwd",
    "fused_regression_fwd",
    "kernel_config",
    "kernel_config_override",
    "regression_loss",
]
