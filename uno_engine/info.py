"""`python -m uno_engine.info`: what this install can run, and why not.

Versions, the device, Triton (and whether kernels run under the interpreter), the attention backend "auto"
picks and why, the optional packages, and whether the compiled extension uno_engine._C is built.
Pattern: xformers `xformers/info.py`.
"""

from __future__ import annotations

import os
import platform


def collect() -> dict:
    """Everything `main` prints, as a flat-ish dict (also used by benchmarks' metadata)."""
    import torch

    import uno_engine
    from uno_engine import _optional

    info: dict = {
        "uno_engine": uno_engine.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch.cuda": torch.version.cuda,
    }
    for mod in ("transformers", "diffusers"):
        dep = getattr(_optional, mod, None) or _optional.OptionalDependency(mod, f"pip install {mod}")
        info[mod] = dep.version if dep.available else f"not available ({dep.error})"

    # device
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        info["device"] = f"cuda:{idx} {torch.cuda.get_device_name(idx)} (sm{cap[0]}{cap[1]})"
    else:
        info["device"] = (
            f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); no CUDA device"
        )

    # triton
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if _optional.triton.available:
        where = (
            "interpreter (TRITON_INTERPRET=1)"
            if interp
            else (
                "compiled kernels on CUDA"
                if torch.cuda.is_available()
                else "no CUDA device: ops use the torch path unless TRITON_INTERPRET=1"
            )
        )
        info["triton"] = f"{_optional.triton.version}: {where}"
    else:
        info["triton"] = f"not available ({_optional.triton.error}): ops use the torch path"

    # attention
    from uno_engine.critics.attention import choose_auto

    backend, reason = choose_auto()
    info["attn_backend auto"] = f"{backend}: {reason}"

    # optional packages
    for name in ("flash_attn", "xformers", "nvtx", "liger_kernel", "cut_cross_entropy"):
        dep = getattr(_optional, name)
        info[name] = dep.version if dep.available else f"not installed ({_short(dep.error)}); {dep.hint}"

    # compiled extension (loaded lazily; its absence is fine)
    try:
        from uno_engine import _ext

        st = _ext.status()
        info["uno_engine._C"] = (
            f"built ({st['path']}, openmp={st['openmp']})"
            if st["built"]
            else f"not built ({st['error']}); pure-Python fallback. Build: {_ext.BUILD_HINT}"
        )
    except Exception as e:  # noqa: BLE001
        info["uno_engine._C"] = f"loader unavailable ({type(e).__name__}: {e})"
    return info


def _short(err) -> str:
    text = f"{type(err).__name__}: {err}" if err is not None else "unknown"
    return text if len(text) < 100 else text[:97] + "..."


def main() -> None:
    info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
