"""Benchmark: fused multi-term regression (one Triton launch: losses + every pred's gradient; one backward
launch) vs the eager reference (autograd) vs torch.compile of the eager reference, three terms (mse with a
per-token mask, smooth_l1, cosine with a per-row mask), forward + backward as a training step runs them.

CUDA default: B x N x D = 32 x 729 x 1152 (SigLIP-so400m at 384 px), bf16. CPU default: small, and the
fused path runs under the Triton interpreter (TRITON_INTERPRET=1, set here): CPU timings of it say nothing
about speed, the run checks that the script and the numbers agree.

Two times per case, side by side:
- `wall_ms`: what a user sees per call: N back-to-back calls, then one synchronize, divided by N (host
  overhead included: whichever of host and GPU is slower sets it);
- `gpu_ms` (CUDA): the GPU time of one call, CUDA events around it with the host run ahead (a sleep kernel
  queued first holds the GPU until the call's launches are all queued), so host overhead is left out.
`pct_of_copy` = bytes model / gpu_ms against the copy bandwidth (bytes read + written) measured in the same
run. Bytes model per term: forward = read pred + target (+ mask at its own size) + write the gradient;
backward = read + write the gradient.

    python benchmarks/bench_regression.py [--shape B N D] [--dtype bf16|fp16|fp32] [--providers ...]
    python benchmarks/bench_regression.py --configs default "tile=8192" "per_sm=-1" ...   # kernel sweep
    python benchmarks/bench_regression.py --host-overhead   # CPU: host path per call, launches stubbed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    add_output_args,
    default_device,
    env_metadata,
    measure_ceilings,
    output_dir,
    print_table,
    progress,
    write_results,
)

from uno_engine import ops, reference  # noqa: E402
from uno_engine.ops.regression import RegressionTerm, kernel_config_override  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fused", "eager", "compiled")


def make_terms(B, N, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device=device, generator=g).to(dtype)

    preds = [rnd(B, N, D).requires_grad_() for _ in range(3)]
    tgts = [rnd(B, N, D) for _ in range(3)]
    tok_mask = torch.rand(B, N, 1, device=device, generator=g) > 0.2
    row_mask = torch.rand(B, N, device=device, generator=g) > 0.2
    terms = [
        RegressionTerm(preds[0], tgts[0], "mse", 1.0, tok_mask),
        RegressionTerm(preds[1], tgts[1], "smooth_l1", 0.5, None, 0.5),
        RegressionTerm(preds[2], tgts[2], "cosine", 0.25, row_mask),
    ]
    return terms, preds


def wall_ms(fn, n: int, cuda: bool) -> float:
    """Milliseconds per call of n back-to-back calls (one synchronize at the end)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


_SLEEP_CYCLES_PER_MS = []


def _sleep_cycles_per_ms() -> float:
    """torch.cuda._sleep's spin cycles per millisecond on this GPU (measured once)."""
    if not _SLEEP_CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm up
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS.append(10_000_000 / start.elapsed_time(end))
    return _SLEEP_CYCLES_PER_MS[0]


def gpu_ms(fn, reps: int, host_ms: float) -> float:
    """Median GPU time of one call (CUDA events), the host run ahead: a sleep kernel longer than the call's
    host time is queued first, so the call's kernels run back to back."""
    cycles = int(max(2.0 * host_ms, 0.5) * _sleep_cycles_per_ms())
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_overhead(args) -> None:
    """Host path per call (the public `fused_regression`, checks included) on the CPU with every Triton
    launch stubbed: what a GPU host pays besides the launches themselves and the kernels."""
    import uno_engine.kernels.regression as K

    counts = {"launches": 0}

    def stub(*a, **k):
        counts["launches"] += 1

    K.launch_forward = K.launch_finish = K.launch_scale = stub
    B, N, D = args.shape or (2, 9, 32)
    terms, preds = make_terms(B, N, D, torch.float32, "cpu")

    def fwd():
        return ops.fused_regression(terms, backend="triton")

    def fwd_bwd():
        total, _ = fwd()
        return torch.autograd.grad(total, preds)

    rows = []
    for name, fn in (("fused fwd", fwd), ("fused fwd+bwd", fwd_bwd)):
        for _ in range(50):
            fn()
        counts["launches"] = 0
        fn()
        n_launch = counts["launches"]
        ts = []
        for _ in range(args.rep or 500):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        rows.append({"case": name, "host_us": statistics.median(ts), "launches": n_launch})
    print_table(
        rows,
        ["case", "host_us", "launches"],
        title=f"host path, launches stubbed, {env_metadata('cpu')['device']}",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("B", "N", "D"))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--rep", type=int, default=None, help="timed calls per case")
    ap.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="kernel configs to sweep ('default' or e.g. 'tile=8192,per_sm=-1'; fields of "
        "uno_engine.kernels.regression.RegressionConfig): fused fwd+bwd only, one row each",
    )
    ap.add_argument("--host-overhead", action="store_true", help="CPU: host path per call, launches stubbed")
    ap.add_argument("--tag", default=None, help="results file tag")
    ap.add_argument("--no-write", action="store_true")
    add_output_args(ap)
    args = ap.parse_args()
    if args.host_overhead:
        return host_overhead(args)
    device = default_device()
    cuda = device == "cuda"
    B, N, D = args.shape or ((32, 729, 1152) if cuda else (2, 37, 96))
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    rep = args.rep or (50 if cuda else 3)

    ceil = measure_ceilings(device, copy_bytes=None if cuda else 64 << 20, matmul_n=None if cuda else 256)
    terms, preds = make_terms(B, N, D, dtype, device)
    el = B * N * D * dtype.itemsize
    mask_bytes = B * N * 2  # the two bool masks, one byte per row each
    fwd_bytes = 3 * 3 * el + mask_bytes
    bwd_bytes = 3 * 2 * el

    def fused_fwd():
        return ops.fused_regression(terms, backend="triton")

    def fused_fwd_bwd():
        total, _ = ops.fused_regression(terms, backend="triton")
        return torch.autograd.grad(total, preds)

    def eager_fwd_bwd():
        total, _ = reference.fused_regression(terms)
        return torch.autograd.grad(total, preds)

    compiled_loss = torch.compile(lambda: reference.fused_regression(terms)[0])

    def compiled_fwd_bwd():
        return torch.autograd.grad(compiled_loss(), preds)

    # correctness of this very run (fp32 math reference, autograd)
    g_e = eager_fwd_bwd()
    tot_e = reference.fused_regression(terms)[0].item()

    def max_rel(gs):
        return max(
            ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for a, b in zip(gs, g_e, strict=True)
        )

    base = {"B": B, "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""), "terms": 3}
    base["copy_GBps"] = ceil["copy_GBps"]
    base["interpreter"] = os.environ.get("TRITON_INTERPRET", "0") == "1"

    def measure(name, fn, nbytes, extra=None):
        fn()  # compile / warm up
        w = wall_ms(fn, rep, cuda)
        row = {"case": name, **base, **(extra or {}), "wall_ms": w}
        if cuda:
            row["gpu_ms"] = gpu_ms(fn, max(5, rep // 2), w)
        if nbytes is not None:
            row["model_GB"] = nbytes / 1e9
            t = row.get("gpu_ms", w)
            row["pct_of_copy"] = 100 * nbytes / (t * 1e-3) / 1e9 / ceil["copy_GBps"]
        return row

    rows = []
    if args.configs:  # kernel sweep: fused fwd+bwd per config
        for cfg in progress(args.configs, desc="configs"):
            with kernel_config_override("" if cfg == "default" else cfg) as c:
                row = measure("fused fwd+bwd", fused_fwd_bwd, fwd_bytes + bwd_bytes, {"config": c.label()})
                row["max_rel_grad_err_vs_eager"] = max_rel(fused_fwd_bwd())
            rows.append(row)
        rows.sort(key=lambda r: r.get("gpu_ms", r["wall_ms"]))
        columns = ["config", "dtype", "gpu_ms", "wall_ms", "pct_of_copy", "max_rel_grad_err_vs_eager"]
    else:
        cases = []
        if "fused" in args.providers:
            cases += [
                ("fused fwd", fused_fwd, fwd_bytes),
                ("fused fwd+bwd", fused_fwd_bwd, fwd_bytes + bwd_bytes),
            ]
        if "eager" in args.providers:
            cases.append(("eager fwd+bwd", eager_fwd_bwd, None))
        if "compiled" in args.providers and cuda:  # inductor on the CPU would need a C++ toolchain
            cases.append(("compiled fwd+bwd", compiled_fwd_bwd, None))
        for name, fn, nbytes in progress(cases, desc="bench_regression"):
            rows.append(measure(name, fn, nbytes))
            if name.endswith("fwd+bwd"):
                rows[-1]["max_rel_grad_err_vs_eager"] = max_rel(fn())
        by = {r["case"]: r for r in rows}
        fused = by.get("fused fwd+bwd")
        for r in rows:
            if fused is not None and r is not fused and r["case"].endswith("fwd+bwd"):
                fused[f"wall_speedup_vs_{r['case'].split()[0]}"] = r["wall_ms"] / fused["wall_ms"]
                if cuda:
                    fused[f"gpu_speedup_vs_{r['case'].split()[0]}"] = r["gpu_ms"] / fused["gpu_ms"]
        columns = ["case", "dtype", "gpu_ms", "wall_ms", "pct_of_copy", "max_rel_grad_err_vs_eager"]
        columns += [k for k in (fused or {}) if "speedup" in k]
    print_table(
        rows,
        columns,
        title=f"fused regression, 3 terms of {B}x{N}x{D} on {env_metadata(device)['device']} "
        f"(copy {ceil['copy_GBps']:.0f} GB/s)",
    )
    print(f"eager total {tot_e:.6g}; fused total {fused_fwd()[0].item():.6g}")
    if not cuda:
        print(
            "note: on the CPU the fused path runs in the Triton interpreter; its time is not a speed figure"
        )
    if not args.no_write:
        tag = args.tag or ("configs" if args.configs else None)
        paths = write_results(
            "bench_regression", rows, env_metadata(device), tag=tag, out_dir=output_dir(args)
        )
        print("wrote", *paths)


if __name__ == "__main__":
    main()
