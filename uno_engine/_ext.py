"""Loader of the compiled extension `uno_engine._C` (csrc/, built by setup.py when it can be).

Never raises at import: a missing or broken build is remembered. Callers ask `ext_or_none(feature)`: it
returns the module, or None and warns ONCE (per process) that the pure-Python fallback is used.
`require(feature)` raises ImportError with a build hint instead. `status()` feeds `python -m uno_engine.info`.
Set UNO_DISABLE_EXT=1 to ignore a built extension (tests and benchmarks of the fallback).
Pattern: xformers `xformers/_cpp_lib.py`.
"""

from __future__ import annotations

import importlib
import warnings

BUILD_HINT = "cd <repo> && pip install --no-build-isolation -e .  (needs a C++17 compiler and pybind11)"


class ExtensionFallbackWarning(UserWarning):
    """The compiled extension is unavailable and a slower pure-Python version runs instead."""


def _load():
    from uno_engine import _env

    if _env.get("UNO_DISABLE_EXT"):
        return None, RuntimeError("disabled by UNO_DISABLE_EXT=1")
    try:
        return importlib.import_module("uno_engine._C"), None
    except Exception as e:  # noqa: BLE001  (a stale or ABI-broken build raises more than ImportError)
        return None, e


_C, ERROR = _load()
BUILT = _C is not None
_warned = False


def ext_or_none(feature: str):
    """The extension module, or None after a one-time ExtensionFallbackWarning naming `feature`."""
    global _warned
    if _C is not None:
        return _C
    if not _warned:
        _warned = True
        warnings.warn(
            f"uno_engine._C is not available ({type(ERROR).__name__}: {ERROR}); {feature} and the other "
            f"data-side ops use the slower pure-Python fallback (warned once). Build it with: {BUILD_HINT}",
            ExtensionFallbackWarning,
            stacklevel=3,
        )
    return None


def require(feature: str):
    """The extension module, or ImportError naming `feature` and how to build it."""
    if _C is None:
        raise ImportError(
            f"{feature} needs the compiled extension uno_engine._C, which is not available "
            f"({type(ERROR).__name__}: {ERROR}). Build it with: {BUILD_HINT}"
        ) from ERROR
    return _C


def status() -> dict:
    """{"built": bool, "path": str | None, "openmp": bool | None, "error": str | None}."""
    return {
        "built": BUILT,
        "path": getattr(_C, "__file__", None),
        "openmp": getattr(_C, "openmp", None),
        "error": None if ERROR is None else f"{type(ERROR).__name__}: {ERROR}",
    }
