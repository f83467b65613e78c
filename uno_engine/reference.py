"""Eager PyTorch versions of every op in `uno_engine.ops`, with the same signatures minus `backend`.

They are the oracle of every kernel test, the baseline of every benchmark (`backend="reference"` in
`UNOConfig`), and readable statements of the math. Speed and memory are not goals here; exactness is.
Each op owns one section below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401

# ---------------------------------------------------------------------------------------------- bridge (#3)
# (section owned by the bridge op)

# ------------------------------------------------------------------------------ linear_cross_entropy (#4)
# (section owned by the linear cross-entropy op)

# ------------------------------------------------------------------------------------- regression (#5)
# (section owned by the regression ops)
