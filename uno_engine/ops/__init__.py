"""Public functional ops. Each takes `backend="auto" | "triton" | "torch"` (see `_dispatch`), is registered as a
torch custom op (namespace `uno_engine::`) so a compiled critic has no graph breaks, and has an eager twin with
the same signature (minus `backend`) in `uno_engine.reference`.

The functions are imported eagerly: a lazy attribute would be shadowed by the submodule of the same name
(`uno_engine.ops.linear_cross_entropy` the module vs. the function) once anything imports the submodule.
Triton itself is imported only when a Triton kernel is launched."""

from uno_engine.ops.bridge import bridge
from uno_engine.ops.linear_cross_entropy import linear_cross_entropy
from uno_engine.ops.regression import RegressionTerm, fused_regression, regression_loss

__all__ = ["RegressionTerm", "bridge", "fused_regression", "linear_cross_entropy", "regression_loss"]
