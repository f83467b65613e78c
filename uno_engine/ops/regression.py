"""Regression losses for the critic's patch-feature heads: `regression_loss` (one term) and
`fused_regression` (several weighted terms, their losses and every pred's gradient in ONE Triton launch).

Semantics (identical to `uno_engine.reference.regression_loss`):
- kind "mse": (p - y)^2; "smooth_l1": 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta (beta = 0 is L1);
  "cosine": 1 - <p, y> / (max(|p|, 1e-8) max(|y|, 1e-8)) per row over the last dim.
- mask broadcasts to pred (to pred.shape[:-1] for cosine, per row); weight multiplies elementwise (per row
  for cosine); a float weight or a 0-d tensor simply scales the term.
- "mean" divides sum(weight * mask * loss) by sum(mask broadcast to the loss's shape), a device tensor (no
  host sync). An all-zero mask gives a loss of 0 (and zero gradients), not NaN.

The Triton path (`backend="triton"`, or "auto" on CUDA) is the custom op `uno_engine::fused_regression_fwd`:
ONE persistent launch computes every term's (numerator, mask sum) and writes the gradient s*w*m*dl/dp of every
pred that needs one (and of every target that requires grad) in the same pass; the gradients are saved, and
backward multiplies them by d total / d numerator (grad_output / mask sum) in one read + write each. All terms
that share (pred dtype, target dtype) go in one launch, whatever their shapes and kinds (a descriptor table
per launch); a term with another dtype pair gets its own launch. weight and mask are constants on this path
(a weight or mask that requires grad sends "auto" to the torch path and makes "triton" raise).
The torch path is the eager reference (autograd through it).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uno_engine import reference
from uno_engine.ops._dispatch import resolve_backend

KINDS = reference.REGRESSION_KINDS
_KIND_IDS = {"mse": 0, "smooth_l1": 1, "cosine": 2}
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
    """src broadcasts to exactly dst (plain tuples: torch.broadcast_shapes costs ~70 us a call, and the op
    is host-bound on a GPU)."""
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


# ------------------------------------------------------------------------------------------ the custom op
def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """(R, D) view with a unit last-dim stride (a copy only when no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x.reshape(1, 1)
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _aux_view(a: torch.Tensor | None, pred: torch.Tensor, kind: int):
    """Mask/weight as float32 (R, D) (or (R,) for cosine) strided view; returns (tensor, s_row, s_col)."""
    if a.numel() == 0:
        return None, 0, 0
    if kind == 2:
        a2 = a.expand(pred.shape[:-1]).reshape(-1)
        return a2, (a2.stride(0) if a2.numel() > 1 else 0), 0
    a2 = a.expand(pred.shape).reshape(-1, pred.shape[-1]) if pred.dim() >= 1 else a.reshape(1, 1)
    return a2, (a2.stride(0) if a2.shape[0] > 1 else 0), (a2.stride(1) if a2.shape[1] > 1 else 0)


@functools.cache
def _n_programs(device: torch.device) -> int:
    """Persistent programs of the fused kernel: SMs x resident programs on CUDA; a few on the interpreter (so
    the tests walk the grid-stride loop)."""
    if device.type != "cuda":
        return 3
    per_sm = int(os.environ.get("UNO_REGRESSION_PROGRAMS_PER_SM", "16"))
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


def _host_table(rows: list[list], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small table to the device without a host sync: through pinned memory (the caching host allocator
    keeps the block until the copy is done). A pageable copy waits for the stream: measured on an H200, that
    made the op host-bound (1.2 ms a call around a 0.25 ms kernel)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return t
    pinned = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    pinned.copy_(t)
    return pinned.to(device, non_blocking=True)


@torch.library.custom_op("uno_engine::fused_regression_fwd", mutates_args=(), device_types=None)
def _fused_regression_fwd(
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    masks: list[torch.Tensor],
    weights: list[torch.Tensor],
    kinds: list[int],
    betas: list[float],
    scales: list[float],
    grad_pred: list[bool],
    grad_target: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """sums (T, 2) = per term (sum(s w m l), sum(m)), and the gradients s w m dl/dp (not yet divided by the
    mask sum; empty where not asked). masks/weights: float32, broadcastable (see RegressionTerm), or an empty
    (numel 0) tensor for "none" (not Optional: lists of optional tensors complicate the autograd structure);
    viewed strided. scales: each term's float weight s."""
    from uno_engine.kernels import regression as K

    n = len(preds)
    device = preds[0].device
    grads_p = [
        torch.empty(p.shape, dtype=p.dtype, device=device) if g else p.new_empty(0)
        for p, g in zip(preds, grad_pred, strict=False)
    ]
    grads_t = [
        torch.empty(y.shape, dtype=y.dtype, device=device) if g else y.new_empty(0)
        for y, g in zip(targets, grad_target, strict=False)
    ]
    write_grad = any(grad_pred) or any(grad_target)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault((preds[i].dtype, targets[i].dtype), []).append(i)
    f32 = torch.empty(0, dtype=torch.float32, device=device)
    launches = []
    keep = []  # views whose addresses sit in the descriptor tables must live through the launches
    for idx in groups.values():
        rows, fpar = [], []
        r_max, d_max, aligned = 1, 1, True
        for i in idx:
            p2, y2 = _rows_view(preds[i]), _rows_view(targets[i])
            m2, s_mr, s_md = _aux_view(masks[i], preds[i], kinds[i])
            w2, s_wr, s_wd = _aux_view(weights[i], preds[i], kinds[i])
            keep += [p2, y2, m2, w2]
            R, D = p2.shape
            r_max, d_max = max(r_max, R), max(d_max, D)
            desc = [0] * K.N_DESC
            desc[K.D_PRED], desc[K.D_TGT] = p2.data_ptr(), y2.data_ptr()
            desc[K.D_GRAD] = grads_p[i].data_ptr() if grad_pred[i] else 0
            desc[K.D_TGRAD] = grads_t[i].data_ptr() if grad_target[i] else 0
            desc[K.D_MASK] = m2.data_ptr() if m2 is not None else 0
            desc[K.D_WEIGHT] = w2.data_ptr() if w2 is not None else 0
            desc[K.D_R], desc[K.D_D], desc[K.D_S_PR], desc[K.D_S_TR] = R, D, p2.stride(0), y2.stride(0)
            desc[K.D_S_MR], desc[K.D_S_MD], desc[K.D_S_WR], desc[K.D_S_WD] = s_mr, s_md, s_wr, s_wd
            desc[K.D_KIND], desc[K.D_OUT_ROW] = kinds[i], i
            rows.append(desc)
            fpar.append([betas[i], scales[i]])
            aligned &= all(a % 16 == 0 for a in desc[K.D_PRED : K.D_TGRAD + 1]) and all(
                v % 8 == 0 for v in (D, desc[K.D_S_PR], desc[K.D_S_TR])
            )
        launches.append((idx, rows, fpar, r_max, d_max, aligned))
    n_blocks_all = max(K.n_row_blocks(r, d) for _, _, _, r, d, _ in launches)
    part = torch.zeros((n, n_blocks_all, 2), dtype=torch.float32, device=device)
    for idx, rows, fpar, r_max, d_max, aligned in launches:
        desc_t = _host_table(rows, torch.int64, device)
        fpar_t = _host_table(fpar, torch.float32, device)
        K.fused_regression_forward(
            part,
            desc_t,
            fpar_t,
            preds[idx[0]],
            targets[idx[0]],
            f32,
            n_blocks=K.n_row_blocks(r_max, d_max),
            n_terms=len(idx),
            d_max=d_max,
            write_grad=write_grad,
            aligned=aligned,
            n_programs=_n_programs(device),
        )
    del keep
    sums = part.sum(dim=1, dtype=torch.float64).to(torch.float32)
    return sums, grads_p, grads_t


@_fused_regression_fwd.register_fake
def _(preds, targets, masks, weights, kinds, betas, scales, grad_pred, grad_target):
    sums = preds[0].new_empty((len(preds), 2), dtype=torch.float32)
    grads_p = [p.new_empty(p.shape) if g else p.new_empty(0) for p, g in zip(preds, grad_pred, strict=False)]
    grads_t = [
        y.new_empty(y.shape) if g else y.new_empty(0) for y, g in zip(targets, grad_target, strict=False)
    ]
    return sums, grads_p, grads_t


def _setup_context(ctx, inputs, output):
    grad_pred, grad_target = inputs[-2], inputs[-1]
    _, grads_p, grads_t = output
    ctx.grad_pred = list(grad_pred)
    ctx.grad_target = list(grad_target)
    ctx.save_for_backward(*grads_p, *grads_t)


def _backward(ctx, g_sums, g_gp, g_gt):
    """d total / d pred = saved gradient x d total / d num (grad_output / mask sum): one read + write of each
    gradient (a Triton scale: bf16 x a 0-d fp32 CUDA tensor takes eager PyTorch's slow casting path)."""
    from uno_engine.kernels import regression as K

    saved = ctx.saved_tensors
    n = len(ctx.grad_pred)
    gp, gt = saved[:n], saved[n:]
    nones = [None] * n
    if g_sums is None:
        return nones, nones, nones, nones, None, None, None, None, None
    d_num = g_sums[:, 0].to(torch.float32).contiguous()
    d_preds = [K.scale(g, d_num, i) if ctx.grad_pred[i] else None for i, g in enumerate(gp)]
    d_tgts = [K.scale(g, d_num, i) if ctx.grad_target[i] else None for i, g in enumerate(gt)]
    return d_preds, d_tgts, nones, nones, None, None, None, None, None


_fused_regression_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public
def _split_weight(weight):
    """(scale: float | 0-d tensor, elementwise tensor | None)."""
    if weight is None:
        return 1.0, None
    if isinstance(weight, (int, float)):
        return float(weight), None
    if weight.dim() == 0:
        return weight, None
    return 1.0, weight


def _triton_terms(terms: Sequence[RegressionTerm]):
    """Run the custom op; returns (per_term (T,) weighted mean losses with grad, num (T,), tensor scales)."""
    grad_on = torch.is_grad_enabled()
    preds, targets, masks, weights, kinds, betas, scales, gp, gt = [], [], [], [], [], [], [], [], []
    tensor_scales = []
    for t in terms:
        scale, w_el = _split_weight(t.weight)
        m = t.mask
        if isinstance(m, (int, float)):
            m = torch.full((), float(m), device=t.pred.device)
        none = t.pred.new_empty(0, dtype=torch.float32)
        preds.append(t.pred)
        targets.append(t.target)
        masks.append(none if m is None else m.to(torch.float32))
        weights.append(none if w_el is None else w_el.to(torch.float32))
        kinds.append(_KIND_IDS[t.kind])
        betas.append(float(t.beta))
        scales.append(scale if isinstance(scale, float) else 1.0)  # a float weight goes into the kernel
        tensor_scales.append(None if isinstance(scale, float) else scale)
        gp.append(grad_on and t.pred.requires_grad)
        gt.append(grad_on and t.target.requires_grad)
    sums, _, _ = _fused_regression_fwd(preds, targets, masks, weights, kinds, betas, scales, gp, gt)
    num, den = sums[:, 0], sums[:, 1]
    per_term = num / torch.where(den > 0, den, torch.ones_like(den))
    if any(s is not None for s in tensor_scales):  # 0-d tensor weights: on the device, no sync
        per_term = per_term * torch.stack(
            [per_term.new_ones(()) if s is None else s.to(per_term).reshape(()) for s in tensor_scales]
        )
    return per_term, num, tensor_scales


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
    devices = {t.pred.device for t in terms}
    if len(devices) > 1:
        raise ValueError(f"terms must all be on one device, got {sorted(map(str, devices))}")
    tensors = [x for t in terms for x in (t.pred, t.target, t.mask, t.weight) if isinstance(x, torch.Tensor)]
    choice = resolve_backend("fused_regression", backend, tensors, _triton_reasons(terms))
    if choice == "torch":
        return reference.fused_regression(terms)
    per_term, _, _ = _triton_terms(terms)
    return per_term.sum(), per_term.detach()


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
        return reference.regression_loss(
            pred, target, kind=kind, weight=weight, mask=mask, beta=beta, reduction=reduction
        )
    per_term, num, tensor_scales = _triton_terms([term])
    if reduction == "mean":
        return per_term[0]
    return num[0] if tensor_scales[0] is None else num[0] * tensor_scales[0].to(num)
