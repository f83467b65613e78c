"""Benchmark: density / structure targets of one uint8 1024x1024 RGB image on the 27 x 27 patch grid,
C++ (uno_engine._C) on ONE thread vs the numpy fallback and the torch CPU version (torch on one thread),
all in this one run; plus the C++ on all threads and caption packing.

The target: the one-thread C++ at least 5x faster than the CPU reference (numpy or torch: the ratio is
reported against each and against the faster of the two) with outputs within 1e-5 of the torch version.

    python benchmarks/bench_targets.py [--size 1024] [--grid 27] [--rep 20]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

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

from uno_engine import _ext, targets  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=27)
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    add_output_args(ap)
    args = ap.parse_args()
    C = _ext.require("bench_targets")
    torch.set_num_threads(1)  # the torch reference and the copy ceiling on one thread, like the C++ run
    ceil = measure_ceilings("cpu")
    rng = np.random.default_rng(0)
    H = W = args.size
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    grid = args.grid

    def torch_ref(kind):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # conversion is part of it
        return getattr(targets, f"{kind}_targets_torch")(x, grid)

    rows = []
    for kind in progress(["density", "structure"], desc="bench_targets"):
        cpp1 = lambda k=kind: getattr(C, f"{k}_targets")(img, grid, 1)  # noqa: E731
        # explicit count: torch.set_num_threads(1) above also lowers OpenMP's default when torch and the
        # extension share libgomp
        cppn = lambda k=kind: getattr(C, f"{k}_targets")(img, grid, os.cpu_count())  # noqa: E731
        npy = lambda k=kind: getattr(targets, f"{k}_targets_numpy")(img, grid)  # noqa: E731
        trc = lambda k=kind: torch_ref(k)  # noqa: E731
        err = float(np.abs(cpp1().astype(np.float64) - trc()[0].numpy()).max())
        err_np = float(np.abs(npy().astype(np.float64) - trc()[0].numpy()).max())
        t = {
            name: time_fn(fn, device="cpu", warmup=3, rep=args.rep)["median_ms"]
            for name, fn in [
                ("cpp_1thread", cpp1),
                ("cpp_all_threads", cppn),
                ("numpy", npy),
                ("torch_1thread", trc),
            ]
        }
        ref_best = min(t["numpy"], t["torch_1thread"])
        rows.append(
            {
                "kind": kind,
                "H": H,
                "W": W,
                "grid": grid,
                "cpp_1thread_ms": t["cpp_1thread"],
                "cpp_all_threads_ms": t["cpp_all_threads"],
                "numpy_ms": t["numpy"],
                "torch_1thread_ms": t["torch_1thread"],
                "speedup_vs_numpy": t["numpy"] / t["cpp_1thread"],
                "speedup_vs_torch": t["torch_1thread"] / t["cpp_1thread"],
                "speedup_vs_faster_ref": ref_best / t["cpp_1thread"],
                "max_abs_err_cpp_vs_torch": err,
                "max_abs_err_numpy_vs_torch": err_np,
                "cpp_1thread_image_GBps": H * W * 3 / (t["cpp_1thread"] * 1e-3) / 1e9,
                "copy_GBps_1thread": ceil["copy_GBps"],
            }
        )
    print_table(
        rows,
        [
            "kind",
            "cpp_1thread_ms",
            "cpp_all_threads_ms",
            "numpy_ms",
            "torch_1thread_ms",
            "speedup_vs_faster_ref",
            "max_abs_err_cpp_vs_torch",
        ],
        title=f"targets of a {H}x{W} uint8 image, grid {grid}x{grid} ({env_metadata('cpu')['device']})",
    )

    lists = [rng.integers(0, 32000, rng.integers(20, 77)).tolist() for _ in range(256)]
    pls = [5] * len(lists)
    tc = time_fn(
        lambda: targets.pack_captions(lists, prompt_lens=pls, max_len=77, impl="cpp"),
        device="cpu",
        rep=args.rep,
    )["median_ms"]
    tp = time_fn(
        lambda: targets.pack_captions(lists, prompt_lens=pls, max_len=77, impl="python"),
        device="cpu",
        rep=args.rep,
    )["median_ms"]
    cap = {
        "kind": "pack_captions B=256 L=77",
        "cpp_1thread_ms": tc,
        "numpy_ms": tp,
        "speedup_vs_numpy": tp / tc,
    }
    print(
        f"pack_captions (256 x <=77 tokens): cpp {tc:.3f} ms, python {tp:.3f} ms ({tp / tc:.1f}x; "
        "both include "
        "the list conversion)"
    )
    rows.append(cap)
    if not args.no_write:
        print("wrote", *write_results("bench_targets", rows, env_metadata("cpu"), out_dir=output_dir(args)))


if __name__ == "__main__":
    main()
