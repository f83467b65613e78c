"""The engine's one dispatch point: `for_backend(op, backend)` maps an engine backend (UNOConfig.backend: the
ops' "auto" | "triton" | "torch", or "reference", the eager baseline) to the function to call."""

from __future__ import annotations

import functools
from collections.abc import Callable

from uno_engine import eager
from uno_engine.ops._dispatch import BACKENDS
from uno_engine.ops.bridge import bridge
from uno_engine.ops.linear_cross_entropy import linear_cross_entropy
from uno_engine.ops.regression import fused_regression, regression_loss

ENGINE_BACKENDS = (*BACKENDS, "reference")
_OPS = {
    "bridge": bridge,
    "linear_cross_entropy": linear_cross_entropy,
    "fused_regression": fused_regression,
    "regression_loss": regression_loss,
}


def for_backend(op: str, backend: str, **choices) -> Callable:
    """The function computing `op` ("bridge", "linear_cross_entropy", "fused_regression", "regression_loss") for
    an engine backend: for "reference" the eager statement `uno_engine.eager.<op>` (the eager baseline: plain
    autograd, no custom op, no algorithm choice), else `uno_engine.ops.<op>` with `backend=` bound.

    choices: the op's algorithm arguments (`impl=` of linear_cross_entropy, `kernel=` of bridge), bound for
        the ops; the eager statement has one algorithm, so they do not reach it.
    Returns a callable taking the op's remaining arguments (the same for both)."""
    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {ENGINE_BACKENDS}, got {backend!r}")
    if op not in _OPS:
        raise ValueError(f"for_backend: op must be one of {tuple(_OPS)}, got {op!r}")
    if backend == "reference":
        return getattr(eager, op)
    return functools.partial(_OPS[op], backend=backend, **choices)
