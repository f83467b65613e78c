"""Optional dependencies, each imported once. The import error is remembered and raised with an install hint
only when a feature that needs the package is asked for (pattern: xformers `ops/fmha/flash.py`)."""

from __future__ import annotations

import importlib


class OptionalDependency:
    """A lazily imported optional package. `.available` never raises; `.require(feature)` raises ImportError
    naming the feature and how to install the package."""

    def __init__(self, module: str, hint: str):
        self.module_name = module
        self.hint = hint
        self._cache = None

    @property
    def _loaded(self):
        # a plain cache, not functools.cached_property: on Python < 3.12 that takes an RLock, which Dynamo
        # cannot trace (a compiled critic reads `.available` through the ops' dispatch)
        if self._cache is None:
            try:
                self._cache = (importlib.import_module(self.module_name), None)
            except Exception as e:  # noqa: BLE001  (a broken install raises more than ImportError)
                self._cache = (None, e)
        return self._cache

    @property
    def available(self) -> bool:
        return self._loaded[0] is not None

    @property
    def error(self) -> Exception | None:
        return self._loaded[1]

    @property
    def module(self):
        return self._loaded[0]

    @property
    def version(self) -> str | None:
        mod = self._loaded[0]
        return getattr(mod, "__version__", "installed") if mod is not None else None

    def require(self, feature: str):
        mod, err = self._loaded
        if mod is None:
            raise ImportError(
                f"{feature} needs the optional package '{self.module_name}', which could not be imported "
                f"({type(err).__name__}: {err}). Install it with: {self.hint}"
            ) from err
        return mod


triton = OptionalDependency("triton", "pip install triton  (Linux; ships with CUDA builds of torch)")
nvtx = OptionalDependency("nvtx", "pip install nvtx")
flash_attn = OptionalDependency(
    "flash_attn", "pip install flash-attn --no-build-isolation  (or uno_engine[flash-attn])"
)
xformers = OptionalDependency("xformers", "pip install xformers  (or uno_engine[xformers])")
liger_kernel = OptionalDependency("liger_kernel", "pip install liger-kernel  (or uno_engine[bench])")
cut_cross_entropy = OptionalDependency(
    "cut_cross_entropy", "pip install cut-cross-entropy  (or uno_engine[bench])"
)
diffusers = OptionalDependency("diffusers", "pip install diffusers")
