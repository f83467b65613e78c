"""Triton kernels of uno_engine, shipped as `uno_engine.kernels` (one file per op: @triton.jit kernels and
their host launchers). This folder knows nothing of `uno_engine`; `uno_engine.ops` imports it.

It is never a top-level `kernels`: transformers takes that name for the Hugging Face kernels library. Installed,
`import kernels` does not find this folder. From the repository root (where `python -c` / `python -m` put the
working directory on sys.path), an accidental top-level import finds an empty module with no `__file__` and no
version, which transformers' probe treats as a folder shadowing sys.path, not an installed library (raising
here instead would break `import transformers` from the repository root).
"""

if __name__ != "uno_engine.kernels":
    __file__ = None  # noqa: A001  (see the docstring)

    def __getattr__(name):
        raise AttributeError(
            f"top-level `kernels` here is uno_engine's kernel folder, not a library: "
            f"import uno_engine.kernels instead (no attribute {name!r})"
        )
