"""Fused linear + cross-entropy: `F.cross_entropy(hidden @ weight.T + bias, labels)` without N x V logits.

The public function: argument checks, the backend ("triton" | "torch", `_dispatch`) and the implementation:
- "grad_in_forward": chunks of tokens; per chunk the logits GEMM, the loss and the logits' gradient in place,
  the dhidden GEMM (and dW); the backward only scales the saved gradients by the upstream gradient. The same
  GEMMs as eager autograd (2, or 3 with a trainable head), memory one C x V chunk plus the N x H gradient
  (the torch path: blocks of C tokens x Vb classes with an online softmax, within the byte budget
  `_lce_torch.CHUNK_BYTES`).
- "recompute": the forward keeps two floats per token (row max, log-sum); the backward recomputes each
  chunk's logits (one GEMM more than eager). No gradient state is held between forward and backward.
"auto" takes grad_in_forward when a gradient is needed and it can form it, recompute otherwise: without a
gradient (the loss-only pass), and for reduction="none" with a trainable weight or bias (dweight needs the
per-token upstream gradients, which only the backward knows). Both implementations exist on both backends
(kernels: `uno_engine.kernels.linear_cross_entropy`; torch path: `_lce_torch`), registered as custom ops in
`_lce_ops`. The choice is logged once per (backend, implementation) (logger "uno_engine.ops").

Environment overrides (sweeps; `uno_engine._env`): UNO_LCE_IMPL overrides `impl`, UNO_LCE_CHUNK_ROWS the
chunk size of both implementations.

Results for edge inputs, identical on both backends: zero tokens give an empty per-token loss ("none"), a
loss of 0 ("sum", "mean") and empty / zero gradients; every token ignored gives 0 and zero gradients
(PyTorch would give NaN for "mean"); a NaN or Inf in a non-ignored token's logits gives a NaN loss (never
dropped); labels outside [0, V) other than ignore_index raise ValueError on the CPU and a device assert on
CUDA (no host sync).
"""

from __future__ import annotations

import logging
import math

import torch

from uno_engine import _env
from uno_engine._log import log_once
from uno_engine.ops import _lce_ops
from uno_engine.ops._dispatch import resolve_backend

log = logging.getLogger("uno_engine.ops")

IMPLS = _env.LCE_IMPLS  # ("auto", "grad_in_forward", "recompute")
_REDUCTIONS = ("none", "sum", "mean")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `logits = hidden @ weight.T + bias` against `labels`, never holding the N x V logits.

    Semantics are those of `F.cross_entropy(logits, labels, ignore_index=, label_smoothing=, reduction=)` with
    `logits = softcap * tanh(logits / softcap)` first when softcap is set, plus
    `z_loss * logsumexp(logits)**2` for each non-ignored token. "mean" divides by the number of non-ignored
    tokens; when every token is ignored (or there are none) the loss is 0 and every gradient is 0.

    Args:
        hidden: (N, H) or (B, L, H), float32 / float16 / bfloat16 (float64 with backend="torch"); any strides;
            H >= 1, N >= 0.
        weight: (V, H), V >= 1, same dtype and device as hidden. Gradients for it are computed only when it
            requires grad, accumulated in fp32.
        labels: (N,) or (B, L), integer class ids in [0, V) or ignore_index.
        bias: optional (V,), same dtype and device.
        ignore_index: label value that contributes neither loss nor gradient.
        label_smoothing: in [0, 1], as in F.cross_entropy.
        z_loss: coefficient >= 0 of lse**2 per non-ignored token.
        softcap: None or > 0.
        reduction: "mean" | "sum" | "none" ("none" returns labels.shape, 0 at ignored tokens).
        impl: "auto" | "grad_in_forward" | "recompute" (module docstring). An explicit "grad_in_forward" that
            cannot form the needed gradient raises with the reason; without a gradient it runs its loss-only
            pass. UNO_LCE_IMPL, when set, overrides it. grad_in_forward allows one backward per forward.
        backend: "auto" | "triton" | "torch" (see uno_engine.ops._dispatch).
    Returns:
        float32 loss: a 0-d tensor, or labels.shape for reduction="none".
    """
    _check_inputs(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, reduction)
    unsupported = []
    if hidden.dtype not in _TRITON_DTYPES:
        unsupported.append(f"hidden dtype {hidden.dtype} (the kernels take float32, float16, bfloat16)")
    choice = resolve_backend("linear_cross_entropy", backend, (hidden, weight, labels, bias), unsupported)
    lead_shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    if labels1d.dtype != torch.int64:
        labels1d = labels1d.long()
    args = (
        hidden2d,
        weight,
        labels1d,
        bias,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap is not None else 0.0,
        reduction,
        choice,
        _env.get("UNO_LCE_CHUNK_ROWS") or 0,
    )
    if resolve_impl(impl, hidden, weight, bias, reduction, choice) == "grad_in_forward":
        grad_on = torch.is_grad_enabled()
        loss = _lce_ops.lce_grad_in_forward(
            *args,
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
        )[0]
    else:
        loss = _lce_ops.lce_forward(*args)[0]
    return loss.reshape(lead_shape) if reduction == "none" else loss


def resolve_impl(
    impl: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    backend: str = "triton",
) -> str:
    """The implementation, "grad_in_forward" or "recompute", for these inputs (see the module docstring);
    UNO_LCE_IMPL overrides `impl`. Logged once per (backend, choice)."""
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    source = "impl"
    forced = _env.get("UNO_LCE_IMPL")
    if forced is not None:
        impl, source = forced, "UNO_LCE_IMPL"
    head_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_trainable)
    reasons = []
    if needs_grad and reduction == "none" and head_trainable:
        reasons.append(
            "reduction='none' with a trainable weight or bias: dweight = sum_n g_n dloss_n/dweight needs the "
            "per-token upstream gradients g_n, which only the backward knows"
        )
    if impl == "grad_in_forward" and reasons:
        raise RuntimeError(
            f"linear_cross_entropy: {source}='grad_in_forward' cannot run: " + "; ".join(reasons)
        )
    if impl == "auto":
        if not needs_grad:
            reasons.append("no gradient needed: the loss-only pass")
        choice = "grad_in_forward" if not reasons else "recompute"
    else:
        choice = impl
    why = f" ({'; '.join(reasons)})" if reasons else ""
    msg = "linear_cross_entropy[%s]: %s=%r -> %s%s"
    log_once(log, ("impl", backend, choice), msg, backend, source, impl, choice, why)
    return choice


def explain_impl_choice(impl: str = "auto") -> str:
    """What `impl` resolves to, in words (for `python -m uno_engine.info`); UNO_LCE_IMPL overrides it."""
    try:
        forced = _env.get("UNO_LCE_IMPL")
    except ValueError as e:
        return f"invalid override: {e}"
    if forced is not None:
        return f"{forced} (UNO_LCE_IMPL overrides impl={impl!r})"
    if impl != "auto":
        return impl
    return (
        "auto: grad_in_forward when a gradient is needed (same GEMMs as eager, no logits recompute), except "
        "reduction='none' with a trainable head and calls without a gradient: recompute"
    )


def _check_inputs(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, softcap, reduction):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(
            f"linear_cross_entropy: hidden must be (N, H) or (B, L, H), got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}"
        )
    if not hidden.is_floating_point():
        raise TypeError(f"linear_cross_entropy: hidden must be floating point, got {hidden.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, H) with H = hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] == 0 or weight.shape[0] == 0:
        raise ValueError(
            f"linear_cross_entropy: hidden needs H >= 1 features and weight V >= 1 classes, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"linear_cross_entropy: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: weight is on {weight.device} but hidden is on {hidden.device}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels must have shape hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: labels is on {labels.device} but hidden is on {hidden.device}"
        )
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"linear_cross_entropy: bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"linear_cross_entropy: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}"
            )
        if bias.device != hidden.device:
            raise ValueError(
                f"linear_cross_entropy: bias is on {bias.device} but hidden is on {hidden.device}"
            )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(
            f"linear_cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"linear_cross_entropy: z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"linear_cross_entropy: softcap must be None or a finite float > 0, got {softcap}")
