"""The test oracle: eager PyTorch versions of every op in `uno_engine.ops`, with the same signatures minus
`backend`.

They are the oracle of every kernel test and readable statements of the math. The code lives in
`uno_engine.eager`, which production shares (the eager baseline `UNOConfig(backend="reference")`, the
regression torch path); this module re-exports it so that tests and benchmarks name the oracle, and
production never imports it.
"""

from __future__ import annotations

from uno_engine.eager import (
    COSINE_EPS,
    REGRESSION_KINDS,
    bridge,
    fused_regression,
    linear_cross_entropy,
    regression_loss,
)

__all__ = [
    "COSINE_EPS",
    "REGRESSION_KINDS",
    "bridge",
    "fused_regression",
    "linear_cross_entropy",
    "regression_loss",
]
