"""Every environment variable uno_engine reads, in one registry.

Algorithm choices are arguments (`ops.linear_cross_entropy(impl=)`, `UNOConfig.lce_impl`,
`UNOConfig.bridge_kernel`, ...). An environment variable only OVERRIDES such a choice, for benchmark sweeps
and experiments without code changes; `Knob.overrides` names what it overrides. Kernels (uno_engine.kernels)
never read the environment: the op reads the knob here and passes the value to the launcher.

    from uno_engine import _env
    rows = _env.get("UNO_LCE_CHUNK_ROWS")      # None when unset, else the parsed value

`get` reads os.environ on every call (tests and sweeps set variables at run time) and caches the parse per
raw string, so a call costs one dict lookup after the first. An invalid value raises ValueError naming the
variable and what it accepts. A deprecated alias is read when the new name is unset (with a one-time
DeprecationWarning). `python -m uno_engine.info` prints `describe()`; docs/environment.md has the same table.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KNOBS", "Knob", "describe", "get", "interpreter_enabled"]


@dataclass(frozen=True)
class Knob:
    """One environment variable: `parse(raw) -> value` raises ValueError on a bad value (the registry adds
    the variable's name); `default` is what applies when unset (for the docs); `overrides`: the argument or
    config field it overrides ("" when it is not a choice of ours)."""

    name: str
    parse: Callable[[str], Any]
    default: str
    doc: str
    overrides: str = ""
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # deprecated names, read when `name` is unset


# ------------------------------------------------------------------------------------------------ parsers
def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip()
        if v not in choices:
            raise ValueError(f"must be one of {'|'.join(choices)}")
        return v

    return parse


def _flag(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 0 or 1")


def _positive_int(raw: str) -> int:
    try:
        v = int(raw.strip())
    except ValueError:
        raise ValueError("must be a positive integer") from None
    if v < 1:
        raise ValueError("must be a positive integer")
    return v


def _int_triple(raw: str) -> tuple[int, int, int]:
    try:
        a, b, c = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError("must be three integers 'A,B,C'") from None
    return a, b, c


def _bridge_blocks(raw: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """'R,C,W' (both axes) or 'R0,C0,W0/R1,C1,W1' -> ((R0, C0, W0), (R1, C1, W1))."""
    parts = raw.split("/")
    if len(parts) not in (1, 2):
        raise ValueError("must be 'R,C,W' or 'R0,C0,W0/R1,C1,W1' (integers)")
    try:
        axes = [_int_triple(p) for p in parts]
    except ValueError:
        raise ValueError("must be 'R,C,W' or 'R0,C0,W0/R1,C1,W1' (integers)") from None
    if any(v < 1 for t in axes for v in t):
        raise ValueError("block sizes and warps must be >= 1")
    return (axes[0], axes[-1])


def _fused_tile(raw: str) -> tuple[int, int, int]:
    """'KH,KW,W': band rows and columns (powers of two) and num_warps."""
    try:
        kh, kw, nw = _int_triple(raw)
    except ValueError:
        raise ValueError("must be 'KH,KW,W' (integers)") from None
    if kh < 1 or kw < 1 or kh & (kh - 1) or kw & (kw - 1):
        raise ValueError("KH and KW must be powers of two")
    if nw not in (1, 2, 4, 8, 16, 32):
        raise ValueError("W (num_warps) must be 1, 2, 4, 8, 16 or 32")
    return kh, kw, nw


def _key_values(raw: str) -> dict[str, int]:
    """'name=int,name=int' -> dict (names are checked by the consumer, `RegressionConfig`)."""
    out = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        key, sep, val = item.partition("=")
        try:
            out[key.strip()] = int(val)
        except ValueError:
            raise ValueError(f"item {item!r}: expected NAME=INT") from None
        if not sep or not key.strip():
            raise ValueError(f"item {item!r}: expected NAME=INT")
    return out


# ----------------------------------------------------------------------------------------------- registry
# The choices, listed once (the ops, UNOConfig and the knobs below read these). The kernels' own lists
# (kernels.bridge.FORWARD_KERNELS / BACKWARD_KERNELS) cannot import this module (kernels know nothing of
# uno_engine): tests/test_env.py checks they are equal.
LCE_IMPLS = ("auto", "grad_in_forward", "recompute")  # ops.linear_cross_entropy(impl=), UNOConfig.lce_impl
BRIDGE_KERNELS = ("auto", "two_pass", "fused")  # ops.bridge(kernel=), UNOConfig.bridge_kernel
BRIDGE_FORWARD = ("two_pass", "fused", "fused_loads")  # UNO_BRIDGE_FORWARD
BRIDGE_BACKWARD = ("two_pass", "fused")  # UNO_BRIDGE_BACKWARD

KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob(
            "UNO_LCE_IMPL",
            _choice(LCE_IMPLS),
            "auto",
            "linear cross-entropy implementation (both backends): grad_in_forward (gradients formed in the "
            "forward pass, chunk by chunk) or recompute (log-sum-exp forward, the backward recomputes the logits)",
            overrides="ops.linear_cross_entropy(impl=) / UNOConfig.lce_impl",
            choices=LCE_IMPLS,
        ),
        Knob(
            "UNO_LCE_CHUNK_ROWS",
            _positive_int,
            "auto",
            "tokens per chunk of the linear cross-entropy, both implementations and backends (sweeps)",
            overrides="the chunk-size rules (kernels.linear_cross_entropy, ops._lce_torch.chunk_rows)",
            aliases=("UNO_LCE_GIF_CHUNK_ROWS",),
        ),
        Knob(
            "UNO_REGRESSION_CONFIG",
            _key_values,
            "defaults",
            "Triton regression launch settings, 'tile=8192,per_sm=0' (fields of RegressionConfig)",
            overrides="RegressionConfig() defaults / ops.regression.kernel_config_override",
        ),
        Knob(
            "UNO_BRIDGE_FORWARD",
            _choice(BRIDGE_FORWARD),
            "two_pass",
            "bridge forward kernels: two_pass (two launches, fp32 intermediate), fused (one launch, "
            "tl.gather) or fused_loads (one launch, gathered loads)",
            overrides="UNOConfig.bridge_kernel (forward)",
            choices=BRIDGE_FORWARD,
        ),
        Knob(
            "UNO_BRIDGE_BACKWARD",
            _choice(BRIDGE_BACKWARD),
            "two_pass",
            "bridge backward kernels: two_pass or fused (one launch, no intermediate)",
            overrides="UNOConfig.bridge_kernel (backward)",
            choices=BRIDGE_BACKWARD,
        ),
        Knob(
            "UNO_BRIDGE_BLOCKS",
            _bridge_blocks,
            "per device",
            "bridge two-pass tiles 'R,C,W' (both axes) or 'R0,C0,W0/R1,C1,W1' (sweeps)",
            overrides="kernels.bridge_two_pass.DEFAULT_BLOCKS (the two-pass tiles)",
        ),
        Knob(
            "UNO_BRIDGE_FUSED_TILE",
            _fused_tile,
            "64,128,4",
            "bridge fused forward band 'KH,KW,W' (sweeps)",
            overrides="kernels.bridge_fused forward tile defaults",
        ),
        Knob(
            "UNO_BRIDGE_FUSED_BWD_TILE",
            _fused_tile,
            "32,64,8",
            "bridge fused backward band 'KH,KW,W' (sweeps)",
            overrides="kernels.bridge_fused backward tile defaults",
        ),
        Knob(
            "UNO_DISABLE_EXT",
            _flag,
            "0",
            "1: ignore the compiled extension uno_engine._C (tests and benchmarks of the Python fallback)",
            overrides="loading uno_engine._C",
        ),
        Knob(
            "TRITON_INTERPRET",
            _flag,
            "0",
            "Triton's own: 1 runs Triton kernels in its interpreter on the CPU (tests); read, never set",
        ),
    )
}

_parsed: dict[tuple[str, str], Any] = {}
_warned: set[str] = set()


def get(name: str) -> Any:
    """The parsed value of knob `name`, or None when it (and its aliases) is unset or empty."""
    knob = KNOBS[name]
    env = os.environ
    raw = env.get(name)
    used = name
    if not raw and knob.aliases:
        for alias in knob.aliases:
            raw = env.get(alias)
            if raw:
                used = alias
                if alias not in _warned:
                    _warned.add(alias)
                    warnings.warn(f"{alias} is deprecated; use {name}", DeprecationWarning, stacklevel=2)
                break
    if not raw:
        return None
    key = (name, raw)
    try:
        return _parsed[key]
    except KeyError:
        pass
    try:
        value = knob.parse(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {used}={raw!r}: {e}") from None
    _parsed[key] = value
    return value


def interpreter_enabled() -> bool:
    """True when Triton kernels run under its interpreter (TRITON_INTERPRET=1, or true / yes / on as Triton
    reads it): the knob's one parse (a malformed value raises ValueError naming the variable)."""
    return bool(get("TRITON_INTERPRET"))


def describe() -> list[dict[str, str]]:
    """One row per knob: name, value now ("unset" or the raw value, "INVALID: ..." when it does not parse),
    default, choices, what it overrides, doc."""
    rows = []
    for k in KNOBS.values():
        raw = os.environ.get(k.name)
        if raw is None:
            raw = next((f"{os.environ[a]} (via deprecated {a})" for a in k.aliases if a in os.environ), None)
        now = "unset" if raw is None else raw
        if raw is not None:
            try:
                get(k.name)
            except ValueError as e:
                now = f"INVALID: {e}"
        rows.append(
            dict(
                name=k.name,
                now=now,
                default=k.default,
                choices="|".join(k.choices),
                overrides=k.overrides,
                doc=k.doc,
            )
        )
    return rows
