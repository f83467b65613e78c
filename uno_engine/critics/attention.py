"""Attention backends of the critic: `attn_backend="auto" | "sdpa" | "flash_attn" | "xformers" | "eager"`.

- "auto": flash-attn when it is installed and the critic is on CUDA, else PyTorch SDPA (which itself runs
  flash kernels on sm80+). `choose_auto()` says what it picked and why (`python -m uno_engine.info` prints
  it).
- "sdpa" / "eager": transformers' own implementations.
- "flash_attn": transformers' "flash_attention_2" (needs the flash-attn package).
- "xformers": xformers' `memory_efficient_attention`, registered as a transformers attention function through
  `transformers.AttentionInterface.register` under the name "uno_xformers" (with the SDPA mask builder), so
  every HF attention module that dispatches through ALL_ATTENTION_FUNCTIONS can use it.

A backend asked for explicitly but not installed raises ImportError with an install hint
(uno_engine._optional).
"""

from __future__ import annotations

import torch

from uno_engine import _optional

ATTN_BACKENDS = ("auto", "sdpa", "flash_attn", "xformers", "eager")
XFORMERS_NAME = "uno_xformers"


def check_attn_backend(attn_backend: str) -> str:
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
    return attn_backend


def choose_auto(device: str | torch.device | None = None) -> tuple[str, str]:
    """What "auto" picks on `device` (default: CUDA when available) -> (backend, reason)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return (
            "sdpa",
            f"device is {device.type}: flash-attn runs on CUDA only; PyTorch SDPA picks its CPU kernel",
        )
    if _optional.flash_attn.available:
        return "flash_attn", f"flash-attn {_optional.flash_attn.version} is installed"
    return "sdpa", (
        f"flash-attn is not installed ({_optional.flash_attn.error}); "
        "PyTorch SDPA uses its own flash kernels on sm80+"
    )


def resolve_attn_backend(attn_backend: str, device: str | torch.device | None = None) -> tuple[str, str]:
    """-> (transformers attn_implementation name, reason). Raises ValueError (unknown name) or ImportError
    (an explicitly requested package that is missing, with an install hint)."""
    check_attn_backend(attn_backend)
    if attn_backend == "auto":
        backend, reason = choose_auto(device)
    else:
        backend, reason = attn_backend, "requested explicitly"
    if backend == "flash_attn":
        _optional.flash_attn.require("attn_backend='flash_attn'")
        return "flash_attention_2", reason
    if backend == "xformers":
        _optional.xformers.require("attn_backend='xformers'")
        register_xformers()
        return XFORMERS_NAME, reason
    return backend, reason


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """A transformers attention function on xformers' memory_efficient_attention.

    query: (B, Hq, Lq, D), key/value: (B, Hkv, Lk, D) (transformers' layout); attention_mask: None, or the
    SDPA mask (B|1, 1|H, Lq, Lk), bool (True = attend) or additive float. Returns ((B, Lq, Hq, D), None)."""
    xops = _optional.xformers.require("attn_backend='xformers'").ops
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if Hkv != Hq:  # grouped-query attention: repeat the kv heads
        key = key.repeat_interleave(Hq // Hkv, dim=1)
        value = value.repeat_interleave(Hq // Hkv, dim=1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, H, D), xformers' layout
    bias = None
    if attention_mask is not None:
        mask = attention_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        # xformers wants a (B, H, Lq, Lk) bias whose last dim is 8-aligned in memory: pad, then slice.
        pad = (-Lk) % 8
        full = torch.zeros(B, Hq, Lq, Lk + pad, dtype=q.dtype, device=q.device)
        full[..., :Lk] = mask.to(q.dtype)
        bias = full[..., :Lk]
    elif getattr(module, "is_causal", False) and Lq > 1:
        bias = xops.LowerTriangularMask() if Lq == Lk else xops.LowerTriangularFromBottomRightMask()
    p = dropout if module.training else 0.0
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=p, scale=scaling)
    return out, None


_registered = False


def register_xformers() -> str:
    """Register "uno_xformers" with transformers' AttentionInterface (and the SDPA mask builder).
    Idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(XFORMERS_NAME, xformers_attention_forward)
        AttentionMaskInterface.register(XFORMERS_NAME, sdpa_mask)
        _registered = True
    return XFORMERS_NAME


def set_attention(modules, impl: str, *, fallback: str | None = "sdpa") -> dict[str, str]:
    """Set `impl` on each transformers PreTrainedModel in `modules` (name -> module). With `fallback`, a
    module that cannot take `impl` gets `fallback` instead (used by "auto"). Returns name -> implementation
    set."""
    chosen = {}
    for name, module in modules.items():
        try:
            _set_one(module, impl)
            chosen[name] = impl
        except (ValueError, ImportError) as e:
            if fallback is None or impl == fallback:
                raise ValueError(
                    f"attn_backend: {type(module).__name__} ({name}) cannot use {impl!r}: {e}"
                ) from e
            _set_one(module, fallback)
            chosen[name] = fallback
    return chosen


def _set_one(module, impl: str):
    if hasattr(module, "set_attn_implementation"):
        module.set_attn_implementation(impl)
        if module.config._attn_implementation != impl:
            raise ValueError(f"transformers kept {module.config._attn_implementation!r}")
    else:
        module.config._attn_implementation = impl
