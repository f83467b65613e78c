"""The one benchmark harness every `benchmarks/*.py` script uses.

- `time_fn`: median (and 20/80 quantiles) of many runs after warm-up; CUDA events via triton.testing.do_bench
  on a GPU, `time.perf_counter` on the CPU.
- `measure_ceilings`: the device's copy bandwidth (bytes read + written) and matmul rate, measured in the
  same run, so every kernel figure is reported as a fraction of a ceiling of the same machine.
- `env_metadata` / `write_results`: JSON and CSV under benchmarks/results/ with device, versions, commit, date.
- `progress`: a tqdm bar on stderr.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | torch.device | None = None) -> str:
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def env_metadata(device: str | None = None) -> dict:
    """Device, versions, commit and date for a results file."""
    meta = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("triton", "transformers", "diffusers", "xformers", "flash_attn", "liger_kernel", "cut_cross_entropy"):
        try:
            m = __import__(mod)
            meta[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001
            meta[mod] = None
    return meta


def progress(iterable: Iterable, desc: str, total: int | None = None):
    """A progress bar on stderr (tqdm), or the plain iterable when tqdm is missing."""
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
    except ImportError:
        return iterable


def _sync(device: str):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device: str | None = None, warmup: int = 3, rep: int = 10,
            grad_to_none: list[torch.Tensor] | None = None) -> dict:
    """Time `fn()`; returns {"median_ms", "p20_ms", "p80_ms", "n"}.

    On CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs); `warmup`/`rep` are run counts here
    and converted to do_bench's milliseconds from a first estimate. On the CPU: perf_counter over `rep` runs."""
    device = device or default_device()
    if torch.device(device).type == "cuda":
        import triton.testing

        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        q = triton.testing.do_bench(fn, warmup=max(25, int(est_ms * warmup)), rep=max(100, int(est_ms * rep)),
                                    grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "n": rep}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[int(0.2 * (len(times) - 1))],
            "p80_ms": times[int(0.8 * (len(times) - 1))], "n": rep}


def measure_ceilings(device: str | None = None) -> dict:
    """Measured ceilings of this device: copy bandwidth in GB/s (bytes read + written) and matmul TFLOP/s
    (bf16 on CUDA, fp32 on the CPU), each the median of several runs on random data."""
    device = device or default_device()
    cuda = torch.device(device).type == "cuda"
    n_bytes = (2 << 30) if cuda else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device=device, warmup=3, rep=20)
    copy_gbps = 2 * n_bytes / (copy["median_ms"] * 1e-3) / 1e9
    del src, dst
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_fn(lambda: a @ b, device=device, warmup=3, rep=20)
    tflops = 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12
    return {"copy_GBps": copy_gbps, "matmul_TFLOPs": tflops, "matmul_dtype": str(dtype).replace("torch.", "")}


def write_results(name: str, rows: list[dict], meta: dict | None = None, *, out_dir: Path | None = None,
                  tag: str | None = None) -> tuple[Path, Path]:
    """Write `rows` (flat dicts) as JSON (with `meta`) and CSV; returns the two paths.

    Files: results/<name>[-<tag>]-<device slug>.json/.csv, overwritten by a newer run on the same device."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta or env_metadata()
    slug = "".join(c if c.isalnum() else "_" for c in meta.get("device", "unknown")).strip("_").lower()
    slug = "cpu" if slug.startswith("cpu") else slug
    stem = f"{name}{'-' + tag if tag else ''}-{slug}"
    json_path = out_dir / f"{stem}.json"
    csv_path = out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return json_path, csv_path


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> str:
    """Print rows as an aligned text table (and return it)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ([title] if title else []) + ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
                                          "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text
