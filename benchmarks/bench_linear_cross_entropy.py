"""Benchmark: fused linear + cross-entropy (issue 4), forward + backward with a frozen head.

Providers: eager (F.linear + F.cross_entropy in the input dtype), torch.compile of eager, torch's native
F.linear_cross_entropy with chunking options (where the installed torch has it), cut-cross-entropy exact mode
and liger-kernel (where installed), and ours (uno_engine.ops.linear_cross_entropy).

Reported per (provider, N): median fwd+bwd time, model TFLOP/s (2 GEMMs of 2*N*V*H: logits and dhidden; our
recompute is not counted) against the matmul ceiling measured in the same run, and peak extra memory:
peak bytes above the start of the step minus the returned dhidden, also as a % of the eager fp32 N x V logits
(issue 4's target is <= 2%). CUDA: torch.cuda peak stats. CPU: the profiler's allocation events (the same
measurement as tests/test_linear_cross_entropy.py::test_cpu_memory_torch_path).

    python benchmarks/bench_linear_cross_entropy.py        # CUDA: bf16, V=152064, H=3584, N in {2048, 8192}
    python benchmarks/bench_linear_cross_entropy.py --n 2048 --v 32000 --h 1024   # the CPU memory shape
CPU defaults are small and use the torch path only (the Triton interpreter is never timed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import env_metadata, measure_ceilings, print_table, progress, time_fn, write_results  # noqa: E402

from uno_engine import _optional  # noqa: E402
from uno_engine.ops import linear_cross_entropy  # noqa: E402

ALL_PROVIDERS = ("eager", "compile", "native", "cce_exact", "liger", "ours")


def _eager(h, w, y):
    return F.cross_entropy(F.linear(h, w), y)


_compiled = None


def _make_providers(device: str) -> dict:
    """name -> (loss_fn(h, w, y) or None, why it is unavailable)."""
    global _compiled
    cuda = device == "cuda"
    out = {"eager": (_eager, None)}
    if _compiled is None:
        _compiled = torch.compile(_eager)
    out["compile"] = (_compiled, None)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        out["native"] = (lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts), None)
    else:
        out["native"] = (None, f"torch {torch.__version__} has no F.linear_cross_entropy with options")
    if _optional.cut_cross_entropy.available and cuda:
        cce = _optional.cut_cross_entropy.module
        out["cce_exact"] = (lambda h, w, y: cce.linear_cross_entropy(h, w, y, impl="cce_exact"), None)
    else:
        out["cce_exact"] = (
            None,
            "needs CUDA and cut-cross-entropy"
            if _optional.cut_cross_entropy.available
            else f"cut-cross-entropy not importable ({_optional.cut_cross_entropy.error})",
        )
    if _optional.liger_kernel.available and cuda:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = (lambda h, w, y: liger(w, h, y), None)
    else:
        out["liger"] = (
            None,
            "needs CUDA and liger-kernel"
            if _optional.liger_kernel.available
            else f"liger-kernel not importable ({_optional.liger_kernel.error})",
        )
    backend = "auto" if cuda else "torch"
    out["ours"] = (lambda h, w, y: linear_cross_entropy(h, w, y, backend=backend), None)
    return out


def _cpu_peak(fn) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _peak_extra(step, device: str, dhidden_bytes: int) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start - dhidden_bytes
    return _cpu_peak(step) - dhidden_bytes


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192] if cuda else [512])
    p.add_argument("--v", type=int, default=152064 if cuda else 8000)
    p.add_argument("--h", type=int, default=3584 if cuda else 256)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument(
        "--providers",
        nargs="+",
        choices=ALL_PROVIDERS,
        default=list(ALL_PROVIDERS) if cuda else ["eager", "native", "ours"],
    )
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)

    meta = env_metadata(device)
    ceilings = measure_ceilings(device)
    meta.update(ceilings=ceilings, shape={"V": args.v, "H": args.h, "dtype": args.dtype, "frozen_head": True})
    providers = _make_providers(device)
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(args.v, args.h, device=device, dtype=dtype, generator=g) / args.h**0.5
    for n in args.n:
        hidden = torch.randn(n, args.h, device=device, dtype=dtype, generator=g).requires_grad_(True)
        labels = torch.randint(0, args.v, (n,), device=device, generator=g)
        labels[::13] = -100
        logits_bytes = n * args.v * 4
        for name in progress(args.providers, desc=f"N={n}"):
            fn, why = providers[name]
            row = {"provider": name, "N": n, "V": args.v, "H": args.h, "dtype": args.dtype}
            if fn is None:
                rows.append({**row, "skipped": why})
                continue

            def step(fn=fn, hidden=hidden, labels=labels):
                hidden.grad = None
                fn(hidden, weight, labels).backward()

            try:
                step()  # compile / autotune outside the measurements
                t = time_fn(step, device=device, warmup=2, rep=args.rep, grad_to_none=[hidden])
                extra = _peak_extra(step, device, hidden.numel() * hidden.element_size())
            except Exception as e:  # noqa: BLE001  (report a failing provider, keep the others)
                rows.append({**row, "skipped": f"{type(e).__name__}: {str(e)[:200]}"})
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            tflops = 2 * (2 * n * args.v * args.h) / (t["median_ms"] * 1e-3) / 1e12
            rows.append(
                {
                    **row,
                    "fwd_bwd_ms": t["median_ms"],
                    "p20_ms": t["p20_ms"],
                    "p80_ms": t["p80_ms"],
                    "model_TFLOPs": tflops,
                    "pct_of_matmul_ceiling": 100 * tflops / ceilings["matmul_TFLOPs"],
                    "peak_extra_MiB": extra / 2**20,
                    "pct_of_fp32_logits": 100 * extra / logits_bytes,
                }
            )
            hidden.grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
        eager = next(
            (r for r in rows if r["N"] == n and r["provider"] == "eager" and "fwd_bwd_ms" in r), None
        )
        for r in rows:
            if r["N"] == n and eager and "fwd_bwd_ms" in r:
                r["time_vs_eager"] = r["fwd_bwd_ms"] / eager["fwd_bwd_ms"]
    print(
        f"device: {meta['device']}  matmul ceiling {ceilings['matmul_TFLOPs']:.1f} TFLOP/s "
        f"({ceilings['matmul_dtype']}), copy {ceilings['copy_GBps']:.0f} GB/s"
    )
    print_table(
        rows,
        [
            "provider",
            "N",
            "fwd_bwd_ms",
            "time_vs_eager",
            "model_TFLOPs",
            "pct_of_matmul_ceiling",
            "peak_extra_MiB",
            "pct_of_fp32_logits",
            "skipped",
        ],
        title=f"linear_cross_entropy fwd+bwd, frozen head, V={args.v}, H={args.h}, {args.dtype}",
    )
    paths = write_results("linear_cross_entropy", rows, meta, tag=args.tag)
    print("results:", *paths)


if __name__ == "__main__":
    main()
