"""Builds csrc/ into uno_engine._C (pybind11, no torch). If the extension cannot be built, warn and go on:
uno_engine falls back to its pure-Python data-side ops, and `python -m uno_engine.info` says so.
Set UNO_SKIP_EXT=1 to skip the build on purpose."""

import glob
import os
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

ext_modules = []
# The C++ runtime is linked in and hidden: once torch is imported, its libraries' exported C++ runtime symbols
# can interpose on ours, and an exception thrown by an input check then crashed the process (seen on the GPU
# image: torch 2.11 cu130, gcc 13). Dropped (with a warning) when the toolchain cannot link it statically.
STATIC_RUNTIME = (
    [] if sys.platform == "darwin" else ["-static-libstdc++", "-static-libgcc", "-Wl,--exclude-libs,ALL"]
)
if os.environ.get("UNO_SKIP_EXT", "0") != "1":
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension

        ParallelCompile("UNO_BUILD_JOBS", default=0).install()
        sources = sorted(glob.glob("csrc/*.cpp"))
        if sources:
            ext_modules.append(
                Pybind11Extension(
                    "uno_engine._C",
                    sources,
                    include_dirs=["csrc"],
                    cxx_std=17,
                    # -fno-math-errno lets the compiler vectorize sqrtf (Sobel magnitude); no -ffast-math:
                    # the float results must match the torch versions.
                    extra_compile_args=["-O3", "-fno-math-errno"]
                    + ([] if sys.platform == "darwin" else ["-fopenmp"]),
                    extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"] + STATIC_RUNTIME,
                )
            )
    except ImportError as e:  # pybind11 missing: still install the Python package
        warnings.warn(
            f"uno_engine: pybind11 not available ({e}); skipping the uno_engine._C build", stacklevel=1
        )


class OptionalBuildExt(build_ext):
    """A failed C++ build is a warning, not a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001
            warnings.warn(
                f"uno_engine: building uno_engine._C failed ({e}); using the Python fallback", stacklevel=1
            )

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            if STATIC_RUNTIME and all(f in ext.extra_link_args for f in STATIC_RUNTIME):
                warnings.warn(f"uno_engine: static C++ runtime link failed ({e}); retrying", stacklevel=1)
                ext.extra_link_args = [f for f in ext.extra_link_args if f not in STATIC_RUNTIME]
                return self.build_extension(ext)
            warnings.warn(
                f"uno_engine: building {ext.name} failed ({e}); using the Python fallback", stacklevel=1
            )


setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
