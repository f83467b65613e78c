"""Bridge diagnosis on a GPU: GPU-only time, host time and per-kernel time of `ops.bridge`, per configuration.

GPU-only time: a sleep kernel holds the GPU while the host queues 20 calls, so host overhead is left out
(`bench_bridge.py` uses do_bench, which includes host time where the host is slower than the GPU). Host time:
the same 20 calls timed on the host. Configurations are env settings joined by "&", several separated by "|":

    DIAG='UNO_BRIDGE_BLOCKS=4,256,4|UNO_BRIDGE_BLOCKS=8,128,4' CASES=janus python benchmarks/diag_bridge.py

Used for the tile sweep behind `kernels.bridge_two_pass.DEFAULT_BLOCKS` (benchmarks/results/GPU_RUNS.md, session
2). The environment variables are the op's overrides (`uno_engine._env`): UNO_BRIDGE_FORWARD / _BACKWARD override
`ops.bridge(kernel=)` per direction. The "no-grad" forward stores no clip masks:

    DIAG='default|UNO_BRIDGE_FORWARD=fused|UNO_BRIDGE_FORWARD=fused_loads' python benchmarks/diag_bridge.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bridge import JANUS, SIGLIP  # noqa: E402

from uno_engine import ops  # noqa: E402


def gpu_only_ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(3e8))  # ~0.15 s: longer than the host needs to queue n calls
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def host_ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e8))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t


def kernel_ms(fn, n: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0) / n / 1e3
        if t > 0.001:
            rows.append(f"{ev.key[:60]}={t:.4f}ms")
    return "; ".join(rows)


def main():
    if not torch.cuda.is_available():
        sys.exit("diag_bridge.py needs a CUDA device")
    all_cases = {"janus": (JANUS, (8, 1024, 1024)), "siglip": (SIGLIP, (32, 512, 512))}
    cases = os.environ.get("CASES", "janus,siglip").split(",")
    configs = os.environ.get("DIAG", "default").split("|")
    for name in cases:
        spec, (B, H, W) = all_cases[name]
        x = (torch.rand(B, 3, H, W, device="cuda") * 2 - 1).requires_grad_()
        for cfg in configs:
            env = dict(kv.split("=", 1) for kv in cfg.split("&")) if "=" in cfg else {}
            os.environ.update(env)
            try:
                fwd = lambda x=x, spec=spec: ops.bridge(x, spec, backend="triton")  # noqa: E731
                out = fwd()
                g = torch.randn_like(out)
                bwd = lambda out=out, x=x, g=g: torch.autograd.grad(out, x, g, retain_graph=True)  # noqa: E731
                xd = x.detach()
                fwd_ng = lambda xd=xd, spec=spec: ops.bridge(xd, spec, backend="triton")  # noqa: E731
                print(
                    f"{name} {cfg}: fwd gpu {gpu_only_ms(fwd):.4f} ms host {host_ms(fwd):.4f} ms | "
                    f"bwd gpu {gpu_only_ms(bwd):.4f} ms host {host_ms(bwd):.4f} ms | "
                    f"fwd no-grad gpu {gpu_only_ms(fwd_ng):.4f} ms host {host_ms(fwd_ng):.4f} ms",
                    flush=True,
                )
                print(
                    f"   fwd kernels: {kernel_ms(fwd)}\n   bwd kernels: {kernel_ms(bwd)}\n"
                    f"   fwd no-grad kernels: {kernel_ms(fwd_ng)}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001  (report and go on with the next configuration)
                print(f"{name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            for k in env:
                os.environ.pop(k)


if __name__ == "__main__":
    main()
