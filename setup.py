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
                    extra_compile_args=["-O3"] + ([] if sys.platform == "darwin" else ["-fopenmp"]),
                    extra_link_args=[] if sys.platform == "darwin" else ["-fopenmp"],
                )
            )
    except ImportError as e:  # pybind11 missing: still install the Python package
        warnings.warn(f"uno_engine: pybind11 not available ({e}); skipping the uno_engine._C build", stacklevel=1)


class OptionalBuildExt(build_ext):
    """A failed C++ build is a warning, not a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"uno_engine: building uno_engine._C failed ({e}); using the Python fallback", stacklevel=1)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"uno_engine: building {ext.name} failed ({e}); using the Python fallback", stacklevel=1)


setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
