"""Public functional ops. Each takes `backend="auto" | "triton" | "torch"` (see `_dispatch`), is registered as a
torch custom op (namespace `uno_engine::`) so a compiled critic has no graph breaks, and has an eager twin with
the same signature (minus `backend`) in `uno_engine.reference`."""

from __future__ import annotations

import importlib

_LAZY = {
    "bridge": "uno_engine.ops.bridge",
    "linear_cross_entropy": "uno_engine.ops.linear_cross_entropy",
    "regression_loss": "uno_engine.ops.regression",
    "fused_regression": "uno_engine.ops.regression",
    "RegressionTerm": "uno_engine.ops.regression",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uno_engine.ops' has no attribute {name!r}")
