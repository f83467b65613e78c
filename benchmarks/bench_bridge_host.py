"""Host time of one `ops.bridge` call (Triton path), forward and backward, with the kernel launches stubbed.

What is timed is everything the host does around the kernels: argument checks, backend choice, the cached
plan lookup, the autograd wrapper, the launchers' output allocation and argument marshalling. The Triton
launches themselves are replaced by a no-op (`JITFunction.run` / the interpreter's `run`), so the figure is
the op's own Python overhead and does not depend on a GPU: it runs on the CPU (TRITON_INTERPRET=1 only lets
the dispatcher pick the Triton path for CPU tensors; no kernel runs). Small images, so that allocation is
negligible next to the Python work.

Side by side with another source tree (e.g. `git archive HEAD | tar -x -C /tmp/old` plus a symlink
/tmp/old/uno_engine/kernels -> ../kernels): child processes alternate between the two trees, each reporting
the median over its timed batches; the result is the median over children and the ratio. Two figures per
call: wall time, and the thread's CPU time (`time.thread_time`, one torch thread), which a busy shared machine
disturbs less (time spent descheduled is not counted).

    python benchmarks/bench_bridge_host.py [--against /tmp/old] [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("fwd_us", "bwd_us", "fwd_cpu_us", "bwd_cpu_us")  # wall time and thread CPU time per call
REPO = os.path.dirname(HERE)


def _child(calls: int, batches: int) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" take CPU tensors; launches are stubbed
    import torch
    from triton.runtime import interpreter, jit

    def no_launch(self, *args, **kwargs):
        return None

    interpreter.InterpretedFunction.run = no_launch
    jit.JITFunction.run = no_launch

    from uno_engine import ops
    from uno_engine.bridge_spec import BridgeSpec

    torch.set_num_threads(1)
    spec = BridgeSpec(
        resize="longest_edge", size=(48, 48), min_size=4, pad_to_square=True, background_color=(122, 116, 104)
    )
    x = (torch.rand(2, 3, 64, 96) * 2 - 1).requires_grad_()
    out = ops.bridge(x, spec, backend="triton")  # builds the cached plan
    g = torch.ones_like(out)
    torch.autograd.grad(out, x, g, retain_graph=True)

    def per_call_us(fn) -> tuple[float, float]:
        wall, cpu = [], []
        for _ in range(batches):
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            c1, t1 = time.thread_time(), time.perf_counter()
            wall.append((t1 - t0) / calls * 1e6)
            cpu.append((c1 - c0) / calls * 1e6)
        return statistics.median(wall), statistics.median(cpu)

    fwd, fwd_cpu = per_call_us(lambda: ops.bridge(x, spec, backend="triton"))
    bwd, bwd_cpu = per_call_us(lambda: torch.autograd.grad(out, x, g, retain_graph=True))
    src = os.path.dirname(os.path.dirname(ops.__file__))
    return {"fwd_us": fwd, "bwd_us": bwd, "fwd_cpu_us": fwd_cpu, "bwd_cpu_us": bwd_cpu, "source": src}


def main():
    sys.path.insert(0, HERE)
    import harness

    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="", help="another source tree to time side by side (PYTHONPATH)")
    ap.add_argument("--rounds", type=int, default=5, help="child processes per tree")
    ap.add_argument("--calls", type=int, default=300, help="calls per timed batch")
    ap.add_argument("--batches", type=int, default=15, help="timed batches per child (median)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    harness.add_output_args(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.calls, args.batches)))
        return
    trees = {"this": REPO}
    if args.against:
        trees["against"] = os.path.abspath(args.against)
    res: dict = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, root in trees.items():
            env = dict(os.environ, PYTHONPATH=root, TRITON_INTERPRET="1")
            cmd = [sys.executable, "-P", os.path.abspath(__file__), "--child"]
            cmd += ["--calls", str(args.calls), "--batches", str(args.batches)]
            out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert os.path.realpath(r["source"]).startswith(os.path.realpath(root)), (r["source"], root)
            res[name].append(r)
    from harness import env_metadata, print_table, write_results

    rows = []
    for name, rs in res.items():
        rows.append(
            dict(
                tree=name,
                source=trees[name],
                **{k: statistics.median(r[k] for r in rs) for k in KEYS},
                children=len(rs),
            )
        )
    if len(rows) == 2:
        for k in KEYS:
            rows[0][k.replace("_us", "_ratio")] = rows[0][k] / rows[1][k]
    print_table(rows, list(rows[0]), title="ops.bridge host time per call (launches stubbed), median")
    meta = env_metadata("cpu")
    print("results:", *write_results("bench_bridge_host", rows, meta, out_dir=harness.output_dir(args)))


if __name__ == "__main__":
    main()
