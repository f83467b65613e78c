"""Triton kernels of uno_engine, shipped as `uno_engine.kernels` (one file per op: @triton.jit kernels and
their host launchers). This folder knows nothing of `uno_engine`; `uno_engine.ops` imports it.

It must never import as a top-level `kernels`: transformers takes that name for the Hub kernels library."""

if __name__ != "uno_engine.kernels":
    raise ImportError(
        "this folder is uno_engine's Triton kernels and imports only as `uno_engine.kernels`, "
        "not as a top-level `kernels` (that name belongs to the Hugging Face kernels library)"
    )
