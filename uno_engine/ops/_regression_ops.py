"""The registered ops of `ops.fused_regression` (`uno_engine.ops._register.custom_op`: a torch custom op with a
fake and an autograd formula, plus the eager fast path), and `run_terms`, which turns RegressionTerms into
the op's arguments.

- `uno_engine::fused_regression_fwd`: ONE launch per MAX_TERMS terms computes every term's (numerator, mask
  sum) and writes the unscaled gradient of every pred (and target) that needs one; a one-program launch turns
  the partial sums into the losses and their total.
- `uno_engine::fused_regression_bwd`: one launch multiplies the saved gradients by d total / d numerator.
The launch plan and settings are `_regression_plan`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uno_engine.eager import COSINE_EPS
from uno_engine.ops._regression_plan import (
    _L_HEAD,
    _L_TERM,
    _PLANS,
    _build_plan,
    _plan,
    _prep,
    _sm_props,
    kernel_config,
)
from uno_engine.ops._register import custom_op

KIND_IDS = {"mse": 0, "smooth_l1": 1, "cosine": 2}  # the kernels' `kind` constexpr

# ------------------------------------------------------------------------------------------ the op
def _grad_buffer(x: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer like x (empty_like is the cheap call; it keeps x's strides, so only when contiguous)."""
    return torch.empty_like(x) if x.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fwd_fake(tensors, layout, params):
    n = (len(layout) - _L_HEAD) // _L_TERM
    x0 = tensors[0]
    grads, pos = [], 0
    for i in range(n):
        _, has_m, has_w, g_p, g_t = layout[_L_HEAD + _L_TERM * i : _L_HEAD + _L_TERM * (i + 1)]
        if g_p:
            grads.append(torch.empty_like(tensors[pos], memory_format=torch.contiguous_format))
        if g_t:
            grads.append(torch.empty_like(tensors[pos + 1], memory_format=torch.contiguous_format))
        pos += 2 + bool(has_m) + bool(has_w)
    total = x0.new_empty((), dtype=torch.float32)
    return total, x0.new_empty(2 * n, dtype=torch.float32), grads


def _bwd_fake(grads, stats, g_total, g_stats, terms, mean):
    return [torch.empty_like(g) for g in grads]


@custom_op("uno_engine::fused_regression_bwd", fake=_bwd_fake)
def fused_regression_bwd(
    grads: list[torch.Tensor],
    stats: torch.Tensor,
    g_total: torch.Tensor | None,
    g_stats: torch.Tensor | None,
    terms: list[int],
    mean: bool,
) -> list[torch.Tensor]:
    """d pred = saved gradient x (g_total + g_stats[t]) / den_t: one launch per MAX_TERMS gradients."""
    from uno_engine.kernels import regression as K

    outs = [torch.empty_like(g) for g in grads]
    t_all = stats.shape[0] // 2
    block = kernel_config().bwd_block
    for c in range(0, len(grads), K.MAX_TERMS):
        sl = slice(c, c + K.MAX_TERMS)
        K.launch_scale(outs[sl], grads[sl], terms[sl], g_total, g_stats, stats, t_all, mean, block)
    return outs


@custom_op("uno_engine::fused_regression_fwd", fake=_fwd_fake)
def fused_regression_fwd(
    tensors: list[torch.Tensor], layout: list[int], params: list[float]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(total (), stats (2T,) = per-term losses then mask sums, grads) where grads are the UNSCALED gradients
    s w m dl/dp (not yet divided by the mask sum) of each pred / target that layout flags, in that order."""
    from uno_engine.kernels import regression as K

    device = tensors[0].device
    config = kernel_config()
    key, plan = _plan(tensors, layout, device, config)
    n = (len(layout) - _L_HEAD) // _L_TERM
    grads = []
    total = torch.empty((), dtype=torch.float32, device=device)
    stats = torch.empty(2 * n, dtype=torch.float32, device=device)
    part = torch.empty((plan.part_rows, 2), dtype=torch.float32, device=device)
    learned = None
    for c, chunk in enumerate(plan.chunks):
        slots, flags = [], []
        for t in chunk:
            ip, iy, im, iw = t.tensors
            pred = tensors[ip]
            p = _prep(pred, t.preps[0], pred, t.D)
            y = _prep(tensors[iy], t.preps[1], pred, t.D)
            m = _prep(tensors[im], t.preps[2], pred, t.D) if im >= 0 else None
            w = _prep(tensors[iw], t.preps[3], pred, t.D) if iw >= 0 else None
            g = gy = None
            if t.grads[0]:
                g = _grad_buffer(pred)
                grads.append(g)
            if t.grads[1]:
                gy = _grad_buffer(tensors[iy])
                grads.append(gy)
            beta, scale = params[2 * t.index], params[2 * t.index + 1]
            slots.append((p, y, g, gy, m, w, t.R, t.D, *t.strides, beta, scale, t.n_programs))
            flags.append(t.flags)
        n_prog = sum(t.n_programs for t in chunk)
        kernel = K.launch_forward(part, slots, flags, n_prog, plan.num_warps, COSINE_EPS)
        if plan.learn_resident:  # per_sm = -1: size the persistent grid by what fits on an SM
            _, regs, threads = _sm_props(device)
            fit = K.resident_programs(kernel, plan.num_warps, regs, threads)
            learned = fit if learned is None or fit is None else min(learned, fit)
        K.launch_finish(
            total,
            stats,
            part,
            [t.n_programs for t in chunk],
            chunk[0].index,
            n,
            plan.mean,
            c == len(plan.chunks) - 1,
        )
    if learned is not None:
        _PLANS[key] = _build_plan(tensors, layout, device, config, resident=learned)
    return total, stats, grads


def _setup_context(ctx, inputs, output):
    tensors, layout, params = inputs
    total, stats, grads = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(stats, *grads)
    ctx.layout = layout
    ctx.n_tensors = len(tensors)


def _backward(ctx, g_total, g_stats, _g_grads):
    """d pred (and d target) = saved unscaled gradient x (g_total + g_stats[t]) / den_t, for the inputs whose
    layout flags formed one; None elsewhere."""
    stats, *saved = ctx.saved_tensors
    layout = ctx.layout
    out = [None] * ctx.n_tensors
    wanted = ctx.needs_input_grad[0]
    targets, terms, pos = [], [], 0  # which input each saved gradient belongs to, and its term
    for i in range((len(layout) - _L_HEAD) // _L_TERM):
        _, has_m, has_w, g_p, g_t = layout[_L_HEAD + _L_TERM * i : _L_HEAD + _L_TERM * (i + 1)]
        for j, (formed, arg) in enumerate(((g_p, "pred"), (g_t, "target"), (0, "mask"), (0, "weight"))):
            at = pos + (j if j < 2 else 2 + (j == 3 and has_m))
            if j >= 2 and not (has_m if j == 2 else has_w):
                continue
            if wanted[at] and not formed:
                raise RuntimeError(
                    f"fused_regression_fwd: term {i}'s {arg} requires grad but the forward formed no gradient "
                    "for it (its layout flag was 0, or it is a mask / weight, which the op treats as constants)"
                )
        if g_p:
            targets.append(pos)
            terms.append(i)
        if g_t:
            targets.append(pos + 1)
            terms.append(i)
        pos += 2 + bool(has_m) + bool(has_w)
    if (g_total is None and g_stats is None) or not saved:
        return out, None, None
    if g_stats is not None:
        g_stats = g_stats.contiguous()
    scaled = fused_regression_bwd(saved, stats, g_total, g_stats, terms, bool(layout[0]))
    for j, g in zip(targets, scaled, strict=True):
        out[j] = g
    return out, None, None


fused_regression_fwd.register_autograd(_backward, setup_context=_setup_context)


def run_terms(terms: Sequence, mean: bool):
    """Run the op on checked RegressionTerms; returns (total with grad, per-term losses (T,) with grad).

    Float weights go into the kernel; a 0-d tensor weight multiplies the term's loss outside it (then the
    total is recomputed from the per-term losses, with grad through them)."""
    tensors, layout, params = [], [int(mean)], []
    grad_on = torch.is_grad_enabled()
    tensor_scales = None
    for i, t in enumerate(terms):
        w, m = t.weight, t.mask
        scale = 1.0
        if w is None:
            pass
        elif isinstance(w, (int, float)):
            scale, w = float(w), None
        elif w.dim() == 0:
            tensor_scales = tensor_scales or [None] * len(terms)
            tensor_scales[i], w = w, None
        if isinstance(m, (int, float)):
            m = torch.full((), float(m), device=t.pred.device)
        elif m is not None and m.device != t.pred.device:
            m = m.to(t.pred.device)  # a 0-d CPU mask
        tensors += [t.pred, t.target]
        if m is not None:
            tensors.append(m)
        if w is not None:
            tensors.append(w if w.device == t.pred.device else w.to(t.pred.device))
        g_p, g_t = grad_on and t.pred.requires_grad, grad_on and t.target.requires_grad
        layout += [KIND_IDS[t.kind], int(m is not None), int(w is not None), int(g_p), int(g_t)]
        params += [float(t.beta), scale]
    total, stats, _ = fused_regression_fwd(tensors, layout, params)
    per_term = stats[: len(terms)]
    if tensor_scales is not None:  # on the device, no sync
        per_term = per_term * torch.stack(
            [per_term.new_ones(()) if s is None else s.to(per_term).reshape(()) for s in tensor_scales]
        )
        total = per_term.sum()
    return total, per_term
