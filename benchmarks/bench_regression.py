"""Benchmark: fused multi-term regression (one Triton launch: losses + every pred's gradient) vs the eager
reference (autograd), three terms (mse with a per-token mask, smooth_l1, cosine with a per-row mask).

CUDA default: B x N x D = 32 x 729 x 1152 (SigLIP-so400m at 384 px), bf16. CPU default: small, and the
fused path runs under the Triton interpreter (TRITON_INTERPRET=1, set here): CPU timings of it say nothing
about speed, the run checks that the script and the numbers agree.

Times: `median_ms` is the wall time of a call (harness.time_fn: do_bench on CUDA), host overhead included;
`device_ms` (CUDA) is the GPU time of its kernels and copies (torch.profiler), what a call costs inside a
training step where the host runs ahead.

Bytes model (per term): fused forward pass = read pred + target (+ mask at its own size) + write the
gradient; the backward adds read + write of the gradient (scaling by d total / d term). Reported against
the copy bandwidth (bytes read + written) measured in the same run.

    python benchmarks/bench_regression.py [--shape B N D] [--dtype bf16|fp16|fp32] [--rep 20]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    default_device,
    env_metadata,
    measure_ceilings,
    print_table,
    progress,
    time_fn,
    write_results,
)

from uno_engine import ops, reference  # noqa: E402
from uno_engine.ops.regression import RegressionTerm  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def device_ms(fn, iters: int = 10) -> float:
    """GPU time of one call: the sum of its kernels' and copies' device time (torch.profiler), i.e. what the
    call costs inside a busy training step where the host runs ahead of the GPU."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("B", "N", "D"))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--rep", type=int, default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    device = default_device()
    cuda = device == "cuda"
    B, N, D = args.shape or ((32, 729, 1152) if cuda else (2, 37, 96))
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    rep = args.rep or (20 if cuda else 3)

    ceil = measure_ceilings(device)
    terms, preds = make_terms(B, N, D, dtype, device)
    el = B * N * D * dtype.itemsize
    mask_bytes = 2 * B * N * 4  # the two per-row masks, read by the kernel as float32
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

    # correctness of this very run (fp32 reference)
    g_f = fused_fwd_bwd()
    g_e = eager_fwd_bwd()
    max_rel = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        for a, b in zip(g_f, g_e, strict=False)
    )
    tot_f = fused_fwd()[0].item()
    tot_e = reference.fused_regression(terms)[0].item()

    rows = []
    cases = [
        ("fused fwd (losses + grads, 1 launch)", fused_fwd, fwd_bytes),
        ("fused fwd+bwd", fused_fwd_bwd, fwd_bytes + bwd_bytes),
        ("eager fwd+bwd (reference)", eager_fwd_bwd, None),
    ]
    times = {}
    for name, fn, nbytes in progress(cases, desc="bench_regression"):
        t = time_fn(fn, device=device, warmup=2 if cuda else 1, rep=rep)
        times[name] = t["median_ms"]
        row = {
            "case": name,
            "B": B,
            "N": N,
            "D": D,
            "dtype": str(dtype).replace("torch.", ""),
            "terms": 3,
            "median_ms": t["median_ms"],
            "p20_ms": t["p20_ms"],
            "p80_ms": t["p80_ms"],
        }
        if cuda:
            row["device_ms"] = device_ms(fn)
            times[name + " device"] = row["device_ms"]
        if nbytes is not None:
            gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
            row.update(model_GB=nbytes / 1e9, GBps=gbps, pct_of_copy=100 * gbps / ceil["copy_GBps"])
            if cuda:
                dev_gbps = nbytes / (row["device_ms"] * 1e-3) / 1e9
                row.update(device_GBps=dev_gbps, device_pct_of_copy=100 * dev_gbps / ceil["copy_GBps"])
        rows.append(row)
    speedup = times["eager fwd+bwd (reference)"] / times["fused fwd+bwd"]
    dev_speedup = (
        (times["eager fwd+bwd (reference) device"] / times["fused fwd+bwd device"]) if cuda else None
    )
    for r in rows:
        r["copy_GBps"] = ceil["copy_GBps"]
        r["speedup_vs_eager_fwd_bwd"] = speedup if r["case"] == "fused fwd+bwd" else None
        r["device_speedup_vs_eager_fwd_bwd"] = dev_speedup if r["case"] == "fused fwd+bwd" else None
        r["max_rel_grad_err_vs_eager"] = max_rel
        r["interpreter"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    print_table(
        rows,
        [
            "case",
            "dtype",
            "median_ms",
            "GBps",
            "pct_of_copy",
            "speedup_vs_eager_fwd_bwd",
            "device_ms",
            "device_pct_of_copy",
            "device_speedup_vs_eager_fwd_bwd",
        ],
        title=f"fused regression, 3 terms of {B}x{N}x{D} on {env_metadata(device)['device']} "
        f"(copy {ceil['copy_GBps']:.0f} GB/s)",
    )
    print(f"total fused {tot_f:.6g} vs eager {tot_e:.6g}; max relative grad error {max_rel:.3g}")
    if not cuda:
        print(
            "note: on the CPU the fused path runs in the Triton interpreter; its time is not a speed figure"
        )
    if not args.no_write:
        paths = write_results("bench_regression", rows, env_metadata(device))
        print("wrote", *paths)


if __name__ == "__main__":
    main()
