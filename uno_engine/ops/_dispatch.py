"""Backend dispatch that explains itself.

Every op takes `backend="auto" | "triton" | "torch"`:
- "auto": Triton when every tensor is on CUDA, Triton imports and the op names no reason against these inputs;
  the torch path otherwise (silently: auto may fall back).
- "triton": Triton or an error listing every reason it cannot run. On CPU tensors it runs only under
  TRITON_INTERPRET=1 (the Triton interpreter; slow, small shapes, used by the CPU test suite).
- "torch": the op's torch path (chunked where memory matters), never Triton.
The eager statements of the math are `uno_engine.eager` (no backend argument; the oracle re-exports them).

The engine (UNOConfig.backend, UNOLoss, Critic.prepare) has one backend more, "reference": the eager baseline,
plain autograd through those eager statements. `uno_engine.ops.for_backend` is the one place
that maps an engine backend to the function to call, so no caller branches on "reference" itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from uno_engine import _env, _optional
from uno_engine._log import log_once

log = logging.getLogger("uno_engine.ops")

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the numpy interpreter (TRITON_INTERPRET=1)."""
    return _env.interpreter_enabled()


@torch.compiler.assume_constant_result
def _triton_import_error() -> str:
    """'' when triton imports, else the error. Under torch.compile it is evaluated once, eagerly, as a
    constant (the import is not traced)."""
    return "" if _optional.triton.available else str(_optional.triton.error)


def triton_unsupported_reasons(tensors: Iterable[torch.Tensor | None]) -> list[str]:
    """Why Triton cannot run on these tensors (empty list when it can)."""
    reasons = []
    err = _triton_import_error()
    if err:
        reasons.append(f"triton cannot be imported ({err})")
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if devices - {"cuda"} and not interpreter_enabled():
        reasons.append(
            f"inputs are on {sorted(devices)}: Triton runs on CUDA, or on the CPU only under TRITON_INTERPRET=1"
        )
    if "cuda" in devices and interpreter_enabled():
        reasons.append(
            "TRITON_INTERPRET=1 is set but inputs are on CUDA: unset it to run the compiled kernels"
        )
    return reasons


def resolve_backend(
    op: str,
    backend: str,
    tensors: Sequence[torch.Tensor | None],
    unsupported: Sequence[str] = (),
) -> str:
    """Pick "triton" or "torch" for `op`.

    Args:
        op: the op's name, for messages.
        backend: "auto" | "triton" | "torch".
        tensors: the op's tensor inputs (None entries are ignored).
        unsupported: op-specific reasons the Triton kernel cannot take these inputs (e.g. a dtype).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reasons = triton_unsupported_reasons(tensors) + list(unsupported)
    if backend == "triton" and reasons:
        raise RuntimeError(f"{op}: backend='triton' cannot run: " + "; ".join(reasons))
    if backend == "auto":
        devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
        choice = "triton" if not reasons and devices == {"cuda"} else "torch"
    else:
        choice = "triton"
    why = f" ({'; '.join(reasons)})" if reasons else ""
    log_once(log, ("backend", op, choice), "%s: backend=%r -> %s%s", op, backend, choice, why)
    return choice

