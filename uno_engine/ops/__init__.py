"""Public functional ops. Each takes `backend="auto" | "triton" | "torch"` (see `_dispatch`) and, where it has
several algorithms, an argument choosing one (`linear_cross_entropy(impl=)`); each is registered with the one
pattern of `_register.custom_op` (a torch custom op, namespace `uno_engine::`, so a compiled critic has no
graph breaks, plus an eager fast path), and has an eager twin with the same signature (minus `backend`) in
`uno_engine.eager` (re-exported by the test oracle `uno_engine.reference`).

The functions are imported eagerly: a lazy attribute would be shadowed by the submodule of the same name
(`uno_engine.ops.linear_cross_entropy` the module vs. the function) once anything imports the submodule.
Triton itself is imported only when a Triton kernel is launched. `for_backend(op, backend)` maps an engine
backend (the three above, or "reference": the eager baseline) to the function to call."""

from uno_engine.ops._engine import ENGINE_BACKENDS, for_backend
from uno_engine.ops.bridge import bridge
from uno_engine.ops.linear_cross_entropy import linear_cross_entropy
from uno_engine.ops.regression import RegressionTerm, fused_regression, regression_loss

__all__ = [
    "ENGINE_BACKENDS",
    "RegressionTerm",
    "bridge",
    "for_backend",
    "fused_regression",
    "linear_cross_entropy",
    "regression_loss",
]
