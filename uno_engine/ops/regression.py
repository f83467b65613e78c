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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uno_engine import _env, eager
from uno_engine.ops._dispatch import resolve_backend
from uno_engine.ops._register import custom_op

KINDS = eager.REGRESSION_KINDS
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


# ------------------------------------------------------------------------------------- kernel settings
_config_override = None


def kernel_config():
    """The `RegressionConfig` in force: `kernel_config_override`'s, else UNO_REGRESSION_CONFIG's fields over
    the defaults, else the defaults."""
    if _config_override is not None:
        return _config_override
    fields = _env.get("UNO_REGRESSION_CONFIG")
    if not fields:
        return _default_config()
    return _config_from_env(tuple(sorted(fields.items())))


@functools.cache
def _default_config():
    from uno_engine.kernels import regression as K

    return K.RegressionConfig()


@functools.cache
def _config_from_env(items: tuple):
    from uno_engine.kernels import regression as K

    try:
        return K.RegressionConfig(**dict(items))
    except (TypeError, ValueError) as e:
        raise ValueError(f"environment variable UNO_REGRESSION_CONFIG: {e}") from None


@contextlib.contextmanager
def kernel_config_override(config):
    """Run the Triton path with another `uno_engine.kernels.regression.RegressionConfig` (benchmark sweeps,
    tests); a string is parsed ('tile=8192,per_sm=0')."""
    global _config_override
    from uno_engine.kernels import regression as K

    prev = _config_override
    _config_override = K.RegressionConfig.parse(config) if isinstance(config, str) else config
    try:
        yield _config_override
    finally:
        _config_override = prev


@functools.cache
def _sm_props(device: torch.device) -> tuple[int, int, int]:
    """(SMs, registers per SM, threads per SM) of a CUDA device."""
    p = torch.cuda.get_device_properties(device)
    regs = getattr(p, "regs_per_multiprocessor", 65536)
    return p.multi_processor_count, regs, getattr(p, "max_threads_per_multi_processor", 2048)


def _n_programs(device: torch.device, per_sm: int, resident: int | None) -> int:
    """Forward programs: SMs x per_sm on CUDA (per_sm -1: x resident, 2 until it is known; 0: see
    `split_programs`); 4 under the interpreter, so the tests walk the grid-stride loops."""
    if per_sm == 0:
        return 0
    if device.type != "cuda":
        return 4
    return _sm_props(device)[0] * (per_sm if per_sm > 0 else resident or 2)


# ---------------------------------------------------------------------------------------------- the plan
# layout (the op's int[] argument): [mean, then per term: kind, has_mask, has_weight, grad_pred, grad_target]
# tensors (Tensor[]): per term pred, target, then its mask and weight when present; params (float[]): per term
# beta, scale (the float weight folded into the kernel).
_L_HEAD, _L_TERM = 1, 5
# how a tensor reaches the kernel: as it is, or through a copy (`_prep`)
_AS_IS, _CONTIG, _ROW_COPY, _ROW_COPY_COS, _TILE_COPY = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class _TermPlan:
    index: int  # position of the term in the op
    kind: int
    tensors: tuple  # positions in `tensors` of pred, target, mask, weight (-1: absent)
    preps: tuple  # (_AS_IS | copy kind) for pred, target, mask, weight
    R: int
    D: int
    strides: tuple  # row strides of pred, target, mask, weight as the kernel reads them
    modes: tuple  # (mask mode, weight mode): kernels.regression.AUX_*
    grads: tuple  # (grad_pred, grad_target)
    flags: tuple  # (kind, mask mode, weight mode, grad, target grad, FAST, BLOCK_R, BLOCK_D)
    tiles: int  # work items: tiles (mse / smooth_l1) or row blocks (cosine)
    n_programs: int = 1


@dataclass(frozen=True)
class _Plan:
    chunks: tuple  # tuples of _TermPlan, <= MAX_TERMS each: one forward launch each
    part_rows: int  # programs of the largest launch
    num_warps: int
    mean: bool
    learn_resident: bool  # per_sm = -1 and not yet known: rebuild after the first launch


def _rows_of(shape) -> tuple[int, int]:
    D = shape[-1] if len(shape) else 1
    return (math.prod(shape) // D if D else math.prod(shape[:-1])), D


def _is_view_of(v: torch.Tensor, x: torch.Tensor) -> bool:
    return v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and v.data_ptr() == x.data_ptr()


def _as_rows(x: torch.Tensor, D: int):
    """(prep, row stride) of x read as an (R, D) view with a unit column stride (a copy when none exists)."""
    if x.dim() == 0 or x.numel() == 0:
        return _AS_IS, max(D, 1)
    v = x.reshape(-1, D)
    if _is_view_of(v, x) and (v.stride(1) == 1 or D == 1):
        return _AS_IS, (v.stride(0) if v.shape[0] > 1 else D)
    return _CONTIG, D


def _aux_plan(a: torch.Tensor, pred: torch.Tensor, kind: int, R: int, D: int):
    """(prep, row stride, mode) of a mask / weight broadcast to pred (to pred.shape[:-1] for cosine)."""
    from uno_engine.kernels import regression as K

    if kind == 2 or a.dim() == 0 or a.shape[-1] == 1 or pred.dim() == 0:  # one value per row
        rows = a.expand(pred.shape[:-1]) if kind == 2 else a.expand(pred.shape)[..., 0] if pred.dim() else a
        v = rows.reshape(-1)
        if _is_view_of(v, a):
            return _AS_IS, (v.stride(0) if v.numel() > 1 else 0), K.AUX_ROW
        return (_ROW_COPY_COS if kind == 2 else _ROW_COPY), 1, K.AUX_ROW
    v = a.expand(pred.shape).reshape(-1, D)
    if _is_view_of(v, a) and v.stride(1) == 1:
        return _AS_IS, (v.stride(0) if v.shape[0] > 1 else 0), K.AUX_2D
    return _TILE_COPY, D, K.AUX_2D


def _prep(x: torch.Tensor, prep: int, pred: torch.Tensor, D: int) -> torch.Tensor:
    """The tensor the kernel reads (a copy only where no strided view exists)."""
    if prep == _AS_IS:
        return x
    if prep == _CONTIG:
        return x.contiguous()
    if prep == _ROW_COPY:
        return x.expand(pred.shape)[..., 0].reshape(-1).contiguous()
    if prep == _ROW_COPY_COS:
        return x.expand(pred.shape[:-1]).reshape(-1).contiguous()
    return x.expand(pred.shape).reshape(-1, D).contiguous()


def _build_plan(tensors, layout, device, config, resident: int | None = None) -> _Plan:
    from uno_engine.kernels import regression as K

    n = (len(layout) - _L_HEAD) // _L_TERM
    terms, pos = [], 0
    for i in range(n):
        kind, has_m, has_w, g_p, g_t = layout[_L_HEAD + _L_TERM * i : _L_HEAD + _L_TERM * (i + 1)]
        ip, iy = pos, pos + 1
        im = pos + 2 if has_m else -1
        iw = pos + 2 + bool(has_m) if has_w else -1
        pos += 2 + bool(has_m) + bool(has_w)
        pred, tgt = tensors[ip], tensors[iy]
        R, D = _rows_of(tuple(pred.shape))
        prep_p, sp = _as_rows(pred, D)
        prep_y, sy = _as_rows(tgt, D)
        aux = [(_AS_IS, 0, K.AUX_NONE), (_AS_IS, 0, K.AUX_NONE)]
        for j, ia in enumerate((im, iw)):
            if ia >= 0:
                aux[j] = _aux_plan(tensors[ia], pred, kind, R, D)
        if kind != 2 and not has_m and not has_w and prep_p == prep_y == _AS_IS and pred.numel() % 16 == 0:
            if pred.is_contiguous() and tgt.is_contiguous() and pred.numel() > 0:
                # no per-row data: any (R', D') factorization of the flat tensors; take D' a power of two
                D = K.pow2_divisor(pred.numel(), min(512, config.tile))
                R, sp, sy = pred.numel() // D, D, D
        block_r, block_d, fast = K.term_settings(kind, R, D, config)
        modes = (aux[0][2], aux[1][2])
        grads = (bool(g_p), bool(g_t))
        terms.append(
            _TermPlan(
                index=i,
                kind=kind,
                tensors=(ip, iy, im, iw),
                preps=(prep_p, prep_y, aux[0][0], aux[1][0]),
                R=R,
                D=D,
                strides=(sp, sy, aux[0][1], aux[1][1]),
                modes=modes,
                grads=grads,
                flags=(kind, *modes, *grads, fast, block_r, block_d),
                tiles=K.n_tiles(kind, R, D, block_r, block_d),
            )
        )
    total = _n_programs(device, config.per_sm, resident)
    chunks = []
    for c in range(0, n, K.MAX_TERMS):
        chunk = terms[c : c + K.MAX_TERMS]
        nps = K.split_programs([t.R * t.D for t in chunk], [t.tiles for t in chunk], total, config.group)
        chunks.append(tuple(dataclasses.replace(t, n_programs=k) for t, k in zip(chunk, nps, strict=True)))
    part_rows = max(sum(t.n_programs for t in ch) for ch in chunks)
    learn = config.per_sm == -1 and resident is None and device.type == "cuda"
    return _Plan(tuple(chunks), part_rows, config.num_warps, bool(layout[0]), learn)


_PLANS: dict = {}


def _plan(tensors, layout, device, config) -> tuple[tuple, _Plan]:
    key = (tuple(layout), device, config, *((x.shape, x.stride(), x.dtype) for x in tensors))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 512:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(tensors, layout, device, config)
    return key, plan


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
        kernel = K.launch_forward(part, slots, flags, n_prog, plan.num_warps)
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


# ---------------------------------------------------------------------------------------------- public
def _triton_terms(terms: Sequence[RegressionTerm], mean: bool):
    """Run the op; returns (total with grad, per-term losses (T,) with grad, tensor scales or None).

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
        layout += [_KIND_IDS[t.kind], int(m is not None), int(w is not None), int(g_p), int(g_t)]
        params += [float(t.beta), scale]
    total, stats, _ = fused_regression_fwd(tensors, layout, params)
    per_term = stats[: len(terms)]
    if tensor_scales is not None:  # on the device, no sync
        per_term = per_term * torch.stack(
            [per_term.new_ones(()) if s is None else s.to(per_term).reshape(()) for s in tensor_scales]
        )
        total = per_term.sum()
    return total, per_term


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
    total, per_term = _triton_terms(terms, mean=True)
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
    total, _ = _triton_terms([term], mean=reduction == "mean")
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
