"""Triton kernels of uno_engine, shipped as `uno_engine.kernels` (one file per op: @triton.jit kernels and
their host launchers). This folder knows nothing of `uno_engine`; `uno_engine.ops` imports it.

It is never a top-level `kernels`: that name belongs to the Hugging Face kernels library, which transformers
>= 5.25 installs and imports. Installed, `import kernels` does not find this folder. From the repository root
(where `python -c` / `python -m` put the working directory on sys.path) an import of `kernels` finds this
folder first; it then hands the import on to the installed library (the same name found on sys.path without
this repository's root), so `import transformers` works from the root. Where no such library is installed
it is an empty module with no `__file__` and no version, which transformers' probe treats as a folder
shadowing sys.path, not an installed library.
"""


def _installed_library():
    """The installed top-level `kernels` (HF's library) found on sys.path without this repository's root, or
    None. Loaded under the name `kernels`, it replaces this module in sys.modules (the import then returns it)."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__spec__.origin)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None or spec.origin == __spec__.origin:
        return None
    module, this = importlib.util.module_from_spec(spec), sys.modules.get("kernels")
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules["kernels"] = this
        raise
    return module


if __name__ != "uno_engine.kernels" and _installed_library() is None:
    __file__ = None  # noqa: A001  (see the docstring)

    def __getattr__(name):
        raise AttributeError(
            f"top-level `kernels` here is uno_engine's kernel folder, not a library: "
            f"import uno_engine.kernels instead (no attribute {name!r})"
        )
