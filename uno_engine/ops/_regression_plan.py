"""The Triton host path of `ops.fused_regression`: the launch settings (`kernel_config`) and the launch plan
(views, strides, block sizes, programs per term), cached per (layout, shapes, strides, dtypes), which
`_regression_ops.fused_regression_fwd` runs. Triton (`uno_engine.kernels.regression`) is imported only when a
plan is built or a config is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from uno_engine import _env

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
