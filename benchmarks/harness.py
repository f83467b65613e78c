"""The one benchmark harness every `benchmarks/*.py` script uses.

- `time_fn`: median (and 20/80 quantiles) of many runs after warm-up; CUDA events via triton.testing.do_bench
  on a GPU, `time.perf_counter` on the CPU.
- `measure_ceilings`: the device's copy bandwidth (bytes read + written) and matmul rate, measured in the
  same run, so every kernel figure is reported as a fraction of a ceiling of the same machine.
- `env_metadata` / `write_results`: JSON and CSV with device, versions, commit, date.
- `add_output_args` / `output_dir`: where a run writes. By default benchmarks/runs/ (ignored by git) or the
  `--out-dir` the user gives; only `--record` writes benchmarks/results/, the committed figures behind the
  README and docs/benchmarks.md (how those figures are made), so a user's first run never changes them.
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

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed figures: written only under --record
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # every other run (ignored by git)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | torch.device | None = None) -> str:
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _commit() -> str:
    """HEAD's short sha, "+dirty" when a tracked file outside benchmarks/results/ differs from it (the results
    other runs wrote are not the code that was measured)."""
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)benchmarks/results",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


# read when a benchmark starts, not when it writes: the code a run measured is the code it started with
COMMIT_AT_START = _commit()


def env_metadata(device: str | None = None) -> dict:
    """Device, versions, commit and date for a results file."""
    meta = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": COMMIT_AT_START,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in (
        "triton",
        "transformers",
        "diffusers",
        "xformers",
        "flash_attn",
        "liger_kernel",
        "cut_cross_entropy",
    ):
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


def time_fn(
    fn: Callable[[], object],
    *,
    device: str | None = None,
    warmup: int = 3,
    rep: int = 10,
    grad_to_none: list[torch.Tensor] | None = None,
) -> dict:
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
        q = triton.testing.do_bench(
            fn,
            warmup=max(25, int(est_ms * warmup)),
            rep=max(100, int(est_ms * rep)),
            grad_to_none=grad_to_none,
            quantiles=[0.5, 0.2, 0.8],
        )
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
    return {
        "median_ms": statistics.median(times),
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1))],
        "n": rep,
    }


def measure_ceilings(
    device: str | None = None, *, copy_bytes: int | None = None, matmul_n: int | None = None
) -> dict:
    """Measured ceilings of this device: copy bandwidth in GB/s (bytes read + written) and matmul TFLOP/s
    (bf16 on CUDA, fp32 on the CPU), each the median of several runs on random data. `copy_bytes` and
    `matmul_n` override the sizes (defaults: 2 GiB and 8192 on CUDA, 256 MiB and 1024 on the CPU; smaller
    sizes are for smoke tests only: they measure caches, not the device)."""
    device = device or default_device()
    cuda = torch.device(device).type == "cuda"
    n_bytes = copy_bytes or ((2 << 30) if cuda else (256 << 20))
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device=device, warmup=3, rep=20)  # noqa: F821 (deleted after)
    copy_gbps = 2 * n_bytes / (copy["median_ms"] * 1e-3) / 1e9
    del src, dst
    n = matmul_n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_fn(lambda: a @ b, device=device, warmup=3, rep=20)
    tflops = 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12
    return {"copy_GBps": copy_gbps, "matmul_TFLOPs": tflops, "matmul_dtype": str(dtype).replace("torch.", "")}


def add_output_args(parser, *names: str) -> None:
    """Add the output flags every benchmark shares: `--out-dir DIR` (or the `names` given) and `--record`,
    mutually exclusive. Read them back with `output_dir(args)`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        *(names or ("--out-dir",)),
        dest="out_dir",
        type=Path,
        default=None,
        help="results folder (default: benchmarks/runs/, ignored by git)",
    )
    group.add_argument(
        "--record",
        action="store_true",
        help="write benchmarks/results/: the committed figures behind the README (how they are recorded)",
    )


def output_dir(args) -> Path:
    """The folder a run writes to: benchmarks/results/ under `--record`, else `--out-dir`, else
    benchmarks/runs/."""
    if getattr(args, "record", False):
        return RESULTS_DIR
    out = getattr(args, "out_dir", None)
    return Path(out) if out else RUNS_DIR


def write_results(
    name: str,
    rows: list[dict],
    meta: dict | None = None,
    *,
    out_dir: Path | None = None,
    tag: str | None = None,
) -> tuple[Path, Path]:
    """Write `rows` (flat dicts) as JSON (with `meta`) and CSV; returns the two paths.

    Files: <out_dir>/<name>[-<tag>]-<device slug>.json/.csv, overwritten by a newer run on the same device.
    `out_dir` defaults to benchmarks/runs/ (ignored by git): pass `output_dir(args)`, which is
    benchmarks/results/ only under `--record`."""
    out_dir = Path(out_dir or RUNS_DIR)
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
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ([title] if title else []) + [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


# ------------------------------------------------------------------------------------------------------------
# Step timing, OOM-bounded batch search, regression checks (used by step_throughput.py; any bench may use)


def _quantile_summary(times_ms: list[float]) -> dict:
    s = sorted(times_ms)
    if not s:
        return {"median_ms": None, "p20_ms": None, "p80_ms": None, "n": 0, "times_ms": []}
    return {
        "median_ms": statistics.median(s),
        "p20_ms": s[int(0.2 * (len(s) - 1))],
        "p80_ms": s[int(0.8 * (len(s) - 1))],
        "n": len(s),
        "times_ms": list(times_ms),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    steps: int,
    warmup: int = 2,
    device: str | None = None,
    before: Callable[[str], None] | None = None,
    desc: str | None = None,
) -> dict[str, dict]:
    """Time several whole-step callables side by side: `warmup` untimed calls of each, then `steps` rounds,
    each calling every fn once (in order), so that drift of the machine (clocks, other load) hits them alike.

    Each call is timed on its own: CUDA events around it on a GPU (no sync between calls; one sync per
    round to read the events), `time.perf_counter` on the CPU. `before(name)` runs before each call, untimed
    (e.g. to drop gradients). Returns {name: {"median_ms", "p20_ms", "p80_ms", "n", "times_ms"}}."""
    device = device or default_device()
    cuda = torch.device(device).type == "cuda"
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            if before:
                before(name)
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in progress(range(steps), desc=desc or "timing", total=steps):
        events = []
        for name in names:
            if before:
                before(name)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize()
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
    return {name: _quantile_summary(times[name]) for name in names}


def time_steps(
    fn: Callable[[], object],
    *,
    steps: int,
    warmup: int = 2,
    device: str | None = None,
    before: Callable[[], None] | None = None,
    desc: str | None = None,
) -> dict:
    """`time_interleaved` for one callable: the median of `steps` individually timed calls after warm-up."""
    return time_interleaved(
        {"fn": fn},
        steps=steps,
        warmup=warmup,
        device=device,
        before=(lambda _n: before()) if before else None,
        desc=desc,
    )["fn"]


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of any device (torch.OutOfMemoryError or an allocator RuntimeError)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory(device: str | None = None):
    import gc

    gc.collect()
    if torch.device(device or default_device()).type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(
    try_batch: Callable[[int], object],
    *,
    start: int,
    max_trials: int = 8,
    cap: int = 4096,
    time_budget_s: float | None = None,
    device: str | None = None,
) -> dict:
    """The largest batch size b for which `try_batch(b)` does not run out of memory: double from `start`
    until the first OOM (or `cap`; halve instead if `start` itself runs out), then bisect between the last
    fit and the first OOM. Bounded by
    `max_trials` calls and `time_budget_s`. Any error other than OOM propagates.

    Returns {"max_batch": largest fit (None if even batch 1 ran out), "first_oom": smallest OOM seen (None if
    none: max_batch is then a lower bound), "exact": bisection closed, "trials": [(b, fits), ...]}."""
    t_end = None if time_budget_s is None else time.perf_counter() + time_budget_s
    fit, oom, trials = None, None, []

    def attempt(b: int) -> bool:
        ok = True
        try:
            try_batch(b)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            ok = False
        # the exception (and the graph its traceback holds) is gone here: free the cached blocks
        free_device_memory(device)
        trials.append((b, ok))
        return ok

    def budget_left() -> bool:
        return len(trials) < max_trials and (t_end is None or time.perf_counter() < t_end)

    b = start
    while budget_left():
        if attempt(b):
            fit = b
            if b >= cap:
                break
            b = min(2 * b, cap)
        else:
            oom = b
            break
    while fit is None and oom is not None and oom > 1 and budget_left():  # even `start` ran out: halve
        b = oom // 2
        if attempt(b):
            fit = b
        else:
            oom = b
    while fit is not None and oom is not None and oom - fit > 1 and budget_left():
        mid = (fit + oom) // 2
        if attempt(mid):
            fit = mid
        else:
            oom = mid
    exact = fit is not None and oom is not None and oom - fit <= 1
    return {"max_batch": fit, "first_oom": oom, "exact": exact, "trials": trials}


# metric name -> +1 if higher is better, -1 if lower is better
DEFAULT_COMPARE_METRICS = {
    "median_ms": -1,
    "images_per_s": +1,
    "peak_MB": -1,
    "overhead_ms": -1,
    "max_batch": +1,
    "GBps": +1,
    "TFLOPs": +1,
}


def compare_results(
    rows: list[dict],
    baseline_path: str | Path,
    *,
    keys: tuple[str, ...],
    metrics: dict[str, int] | None = None,
    tolerance: float = 0.10,
) -> tuple[list[dict], bool]:
    """Compare `rows` with the rows of a results JSON written by `write_results`, matched on `keys`.

    For each metric present (and numeric) in both: ratio current/baseline and whether it is more than
    `tolerance` worse (slower, bigger, fewer). Returns (comparison rows, any_worse)."""
    metrics = metrics or DEFAULT_COMPARE_METRICS
    base = json.loads(Path(baseline_path).read_text())
    base_rows = base["rows"] if isinstance(base, dict) else base
    index = {tuple(r.get(k) for k in keys): r for r in base_rows}
    out, any_worse = [], False
    for r in rows:
        b = index.get(tuple(r.get(k) for k in keys))
        if b is None:
            continue
        for m, sign in metrics.items():
            cur, old = r.get(m), b.get(m)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (cur, old))
            if not numbers or old <= 0:  # no ratio to a zero or negative baseline (an overhead in the noise)
                continue
            ratio = cur / old
            worse = (ratio > 1 + tolerance) if sign < 0 else (ratio < 1 - tolerance)
            any_worse |= worse
            out.append(
                {
                    **{k: r.get(k) for k in keys},
                    "metric": m,
                    "baseline": old,
                    "current": cur,
                    "ratio": ratio,
                    "status": "WORSE" if worse else "ok",
                }
            )
    return out, any_worse
