"""`python -m uno_engine.info`: what this install can run, and why not.

Versions, the device, Triton (and whether kernels run under the interpreter), what "auto" picks on this machine
for each op (backend and algorithm) and why, the attention backend "auto" picks and why, the optional
packages, whether the compiled extension uno_engine._C is built, and every environment variable uno_engine
reads (`uno_engine._env`: its value now, default, and what it overrides).
Pattern: xformers `xformers/info.py`.
"""

from __future__ import annotations

import os
import platform


def collect() -> dict:
    """Everything `main` prints, as a flat-ish dict (also used by benchmarks' metadata)."""
    import torch

    import uno_engine
    from uno_engine import _env, _optional

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
    interp = _env.interpreter_enabled()
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

    # checkpoint="auto": the rule, and the decisions of the critics built in this process
    from uno_engine.critics.checkpointing import auto_decisions, auto_rule

    info["checkpoint auto"] = "; ".join([auto_rule(), *auto_decisions()])

    # ops: what "auto" picks here
    info.update(_op_choices())

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


def _op_choices() -> dict:
    """The "<op> auto" rows: the backend and algorithm `backend="auto"` (and `impl="auto"`) pick on this machine."""
    import importlib

    import torch

    from uno_engine.ops import _dispatch

    # the modules, not the functions of the same name that uno_engine.ops exports
    bridge = importlib.import_module("uno_engine.ops.bridge")
    linear_cross_entropy = importlib.import_module("uno_engine.ops.linear_cross_entropy")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.empty(0, device=device)
    reasons = _dispatch.triton_unsupported_reasons([probe])
    backend = "triton" if not reasons and device.type == "cuda" else "torch"
    why = "; ".join(reasons) if reasons else ("inputs on CUDA" if device.type == "cuda" else "CPU inputs")
    out = {}
    lce = linear_cross_entropy.explain_impl_choice()
    out["linear_cross_entropy auto"] = f"backend {backend} ({why}); impl {lce}"
    out["fused_regression auto"] = f"backend {backend} ({why}); one fused launch on Triton"
    try:
        k = bridge.explain_kernel_choice()
        kernels = f"kernels forward {k['forward']}, backward {k['backward']} ({k['why']})"
        out["bridge auto"] = f"backend {backend} ({why}); {kernels}"
    except Exception as e:  # noqa: BLE001  (an invalid override is reported, not raised)
        out["bridge auto"] = f"backend {backend} ({why}); kernels: {type(e).__name__}: {e}"
    return out


def _short(err) -> str:
    text = f"{type(err).__name__}: {err}" if err is not None else "unknown"
    return text if len(text) < 100 else text[:97] + "..."


def main() -> None:
    from uno_engine import _env

    info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\nenvironment variables (overrides for sweeps; see docs/environment.md):")
    rows = _env.describe()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        choices = f" [{r['choices']}]" if r["choices"] else ""
        over = f"; overrides {r['overrides']}" if r["overrides"] else ""
        print(f"  {r['name']:<{w}}  now {r['now']} (default {r['default']}){choices}{over}")
        print(f"  {'':<{w}}  {r['doc']}")


if __name__ == "__main__":
    main()
