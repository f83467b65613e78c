"""Public functional ops. Each takes `backend="auto" | "triton" | "torch"` (see `_dispatch`) and, where it has
several algorithms, an argument choosing one (`linear_cross_entropy(impl=)`); each is registered with the one
pattern of `_register.custom_op` (a torch custom op, namespace `uno_engine::`, so a compiled critic has no
graph breaks, plus an eager fast path), and has an eager twin with the same signature (minus `backend`) in
`uno_engine.eager` (re-exported by the test oracle `uno_engine.reference`).

The functions are imported eagerly: a lazy attribute would be shadowed by the submodule of the same name
(`uno_engine.ops.linear_cross_entropy` the module vs. the function) once anything imports the submodule.
Triton itself is imported only when a Triton kernel is launched. `for_backend(op, backend)` maps an engine
backend (the three above, or "reference": the eager baseline) to the function to call."""

import functools
from collections.abc import Callable

from uno_engine import eager
from uno_engine.ops._dispatch import BACKENDS
from uno_engine.ops.bridge import bridge
from uno_engine.ops.linear_cross_entropy import linear_cross_entropy
from uno_engine.ops.regression import RegressionTerm, fused_regression, regression_loss

ENGINE_BACKENDS = (*BACKENDS, "reference")  # UNOConfig.backend: the ops' backends and the eager baseline
_OPS = ("bridge", "linear_cross_entropy", "fused_regression", "regression_loss")


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
        raise ValueError(f"for_backend: op must be one of {_OPS}, got {op!r}")
    if backend == "reference":
        return getattr(eager, op)
    # the package attribute, read at call time: a monkeypatched uno_engine.ops.<op> is what runs
    return functools.partial(globals()[op], backend=backend, **choices)


__all__ = [
    "ENGINE_BACKENDS",
    "RegressionTerm",
    "bridge",
    "for_backend",
    "fused_regression",
    "linear_cross_entropy",
    "regression_loss",
]
