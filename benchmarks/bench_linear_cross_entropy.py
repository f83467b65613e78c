"""Benchmark: fused linear + cross-entropy, forward + backward with a frozen head.

Providers: eager (F.linear + F.cross_entropy in the input dtype), torch.compile of eager, torch's native
F.linear_cross_entropy with chunking options (where the installed torch has it), cut-cross-entropy exact mode
(no gradient filtering) and liger-kernel (where installed), and ours (uno_engine.ops.linear_cross_entropy):
  ours            the default dispatch (impl="auto": gradient in forward; Triton on CUDA, torch on the CPU)
  ours_recompute  impl="recompute" (forward keeps the log-sum-exp, the backward recomputes the logits)
  ours_c<C>       the default dispatch with UNO_LCE_CHUNK_ROWS=C (see --chunk-rows): the memory /
                  speed trade-off of the gradient-in-forward chunk size
A provider that is not installed is reported as skipped with the reason; one that raises is reported as
failed with the exception (and printed to stderr), never silently dropped.

Reported per (provider, N): median fwd+bwd time, model TFLOP/s (2 GEMMs of 2*N*V*H: logits and dhidden; our
recompute is not counted) against the matmul ceiling measured in the same run, and peak memory: peak bytes
above the start of the step minus the returned dhidden ("extra"), and without that subtraction ("total"),
each also as a % of the eager fp32 N x V logits (the target is <= 2%). CUDA: torch.cuda peak stats.
CPU: the profiler's allocation events (the same measurement as
tests/test_linear_cross_entropy.py::test_cpu_memory_torch_path).

    python benchmarks/bench_linear_cross_entropy.py        # CUDA: bf16, V=152064, H=3584, N in {2048, 8192}
    # ours vs recompute, and the gradient-in-forward chunk-size sweep:
    python benchmarks/bench_linear_cross_entropy.py --n 8192 --providers eager ours ours_recompute
        --chunk-rows 256 512 1024 --rep 5
    python benchmarks/bench_linear_cross_entropy.py --n 2048 --v 32000 --h 1024   # the CPU memory shape
    python benchmarks/bench_linear_cross_entropy.py --n 128 --v 32000 --h 768 --providers eager ours ours_recompute
                                                    # the CPU mid preset's caption shape
CPU defaults are small and use the torch path only (the Triton interpreter is never timed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    add_output_args,
    env_metadata,
    measure_ceilings,
    output_dir,
    print_table,
    progress,
    time_fn,
    write_results,
)

from uno_engine import _optional  # noqa: E402
from uno_engine.ops import linear_cross_entropy  # noqa: E402

ALL_PROVIDERS = ("eager", "compile", "native", "cce_exact", "liger", "ours", "ours_recompute")


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
        out["cce_exact"] = (_cce_exact(_optional.cut_cross_entropy.module), None)
    else:
        out["cce_exact"] = (
            None,
            "needs CUDA (its Triton kernels; its torch_compile impl is not the exact-mode peer) and "
            "cut-cross-entropy"
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
    out["ours_recompute"] = (
        lambda h, w, y: linear_cross_entropy(h, w, y, impl="recompute", backend=backend),
        None,
    )
    return out


def _chunk_provider(rows: int, cuda: bool):
    if not cuda:
        return None, "needs CUDA (the Triton interpreter is never timed)"

    def fn(h, w, y):
        with _env(UNO_LCE_CHUNK_ROWS=rows):
            return linear_cross_entropy(h, w, y, backend="triton")

    return fn, None


def _cce_exact(cce):
    """cut-cross-entropy without gradient filtering. Releases that name a "cce_exact" impl (the enum member
    CCE_EXACT; also fp32/Kahan accumulation) get it; older ones (25.1.1 on PyPI: impls "cce" and
    "torch_compile" only, so impl="cce_exact" raised NotImplementedError) get impl="cce", filter_eps=None,
    which is their documented way to turn filtering off. Inputs: (embeddings (N, H), classifier (V, H), targets)."""
    impls = getattr(cce, "LinearCrossEntropyImpl", None)
    if impls is not None and "CCE_EXACT" in impls.__members__:
        return lambda h, w, y: cce.linear_cross_entropy(h, w, y, impl="cce_exact")
    return lambda h, w, y: cce.linear_cross_entropy(h, w, y, impl="cce", filter_eps=None)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fp32_reference(hidden, weight, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dhidden) of the eager computation in fp32 (IEEE matmuls: TF32 off for the duration)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        h = hidden.detach().float().requires_grad_(True)
        loss = _eager(h, weight.float(), labels)
        loss.backward()
        return loss.detach(), h.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _errors(fn, hidden, weight, labels, ref) -> dict:
    """|loss - ref| and max|dhidden - ref| / max|ref| for one fwd+bwd of a provider."""
    hidden.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    ref_loss, ref_dh = ref
    out = {
        "loss_abs_err": (loss.detach().float() - ref_loss).abs().item(),
        "dh_rel_err": ((hidden.grad.float() - ref_dh).abs().max() / ref_dh.abs().max()).item(),
    }
    hidden.grad = None
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


def _peak_above_start(step, device: str) -> int:
    """Peak bytes allocated above the start of one step (the returned dhidden included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _cpu_peak(step)


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
    p.add_argument(
        "--chunk-rows",
        "--gif-chunk-rows",  # former name, kept for benchmarks/gpu_kernels.sh
        dest="chunk_rows",
        type=int,
        nargs="*",
        default=[],
        metavar="C",
        help="also time ours with UNO_LCE_CHUNK_ROWS=C, as providers ours_c<C> (CUDA only)",
    )
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also report each provider's loss and dhidden error against an fp32 eager reference "
        "(IEEE fp32 matmuls; needs about 4 x N x V x 4 bytes once per N)",
    )
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--tag", default=None)
    add_output_args(p)
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)

    meta = env_metadata(device)
    ceilings = measure_ceilings(device)
    meta.update(ceilings=ceilings, shape={"V": args.v, "H": args.h, "dtype": args.dtype, "frozen_head": True})
    providers = _make_providers(device)
    names = list(args.providers)
    for rows in args.chunk_rows:
        providers[f"ours_c{rows}"] = _chunk_provider(rows, device == "cuda")
        names.append(f"ours_c{rows}")
    if _optional.cut_cross_entropy.available:
        meta["cut_cross_entropy"] = _optional.cut_cross_entropy.version
    if _optional.liger_kernel.available:
        meta["liger_kernel"] = _optional.liger_kernel.version
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(args.v, args.h, device=device, dtype=dtype, generator=g) / args.h**0.5
    for n in args.n:
        hidden = torch.randn(n, args.h, device=device, dtype=dtype, generator=g).requires_grad_(True)
        labels = torch.randint(0, args.v, (n,), device=device, generator=g)
        labels[::13] = -100
        logits_bytes = n * args.v * 4
        ref = _fp32_reference(hidden, weight, labels) if args.check else None
        for name in progress(names, desc=f"N={n}"):
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
                hidden.grad = None  # the previous step's dhidden must not count in the start
                total = _peak_above_start(step, device)
            except Exception as e:  # noqa: BLE001  (report a failing provider, keep the others)
                print(f"[bench_linear_cross_entropy] provider {name} FAILED at N={n}:", file=sys.stderr)
                traceback.print_exc()
                rows.append({**row, "skipped": f"FAILED {type(e).__name__}: {str(e)[:200]}"})
                hidden.grad = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            extra = total - hidden.numel() * hidden.element_size()
            errors = _errors(fn, hidden, weight, labels, ref) if ref is not None else {}
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
                    "peak_total_MiB": total / 2**20,
                    "pct_total_of_fp32_logits": 100 * total / logits_bytes,
                    **errors,
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
            "peak_total_MiB",
            "pct_total_of_fp32_logits",
            "loss_abs_err",
            "dh_rel_err",
            "skipped",
        ],
        title=f"linear_cross_entropy fwd+bwd, frozen head, V={args.v}, H={args.h}, {args.dtype}",
    )
    paths = write_results("linear_cross_entropy", rows, meta, tag=args.tag, out_dir=output_dir(args))
    print("results:", *paths)


if __name__ == "__main__":
    main()
