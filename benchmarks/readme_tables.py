"""Regenerate the result tables of README.md and docs/benchmarks.md from the results files
(benchmarks/results/*.json, written only by a benchmark run with --record).

Three generated blocks, each between marker comments, in the file `TARGETS` names:

    <!-- cpu-table:begin --> ... <!-- cpu-table:end -->   README.md: the CPU step table (tiny, tiny-janus, mid)
    <!-- cpu-goals:begin --> ... <!-- cpu-goals:end -->   README.md: the CPU goals, as the runs judged them
    <!-- gpu-table:begin --> ... <!-- gpu-table:end -->   docs/benchmarks.md: every GPU figure (ops, critic, step)

Every row names the commit its figures were measured at (the results file's `meta.commit`) and whether that
commit still has the current kernels: a figure is **stale** when a file its op depends on (`OP_PATHS`) changed
in a commit that is not an ancestor of the measured one (`git merge-base --is-ancestor`), or is modified in the
working tree; a figure whose commit is "unknown" or absent from the history is marked so. Stale figures stay
in the table, marked, never hidden. A stale mark depends on the committed history only through ancestry, so
committing a kernel change (with the README regenerated beside it) does not change the generated text.

    python benchmarks/readme_tables.py            # rewrite the blocks in README.md and docs/benchmarks.md
    python benchmarks/readme_tables.py --check    # exit 1 (and print a diff) when a file differs
    python benchmarks/readme_tables.py --print    # print the blocks

Nothing here measures anything; numbers come from the JSON files only.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
# file (relative to the repository root) -> the generated blocks it holds; each block lives in one file
TARGETS = {"README.md": ("cpu-table", "cpu-goals"), "docs/benchmarks.md": ("gpu-table",)}
BLOCKS = tuple(name for names in TARGETS.values() for name in names)

# the files each figure depends on (git pathspecs, relative to the repository root)
OP_PATHS = {
    "bridge": ("kernels/bridge*.py", "uno_engine/ops/bridge.py", "uno_engine/bridge_spec.py"),
    "linear_cross_entropy": ("kernels/linear_cross_entropy.py", "uno_engine/ops/linear_cross_entropy.py"),
    "regression": ("kernels/regression.py", "uno_engine/ops/regression.py"),
    "critic": ("kernels", "uno_engine/ops", "uno_engine/critics"),
    "step": ("kernels", "uno_engine"),
}
# results-file prefix -> op
FILE_OP = {
    "bench_bridge": "bridge",
    "linear_cross_entropy": "linear_cross_entropy",
    "bench_regression": "regression",
    "bench_critic": "critic",
    "step_throughput": "step",
}


# ------------------------------------------------------------------------------------------------- git
def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def git_usable() -> bool:
    """A work tree with its full history (a shallow clone cannot say which commit came first)."""
    p = _git("rev-parse", "--is-shallow-repository")
    return p is not None and p.returncode == 0 and p.stdout.strip() == "false"


@functools.cache
def _last_change(op: str) -> tuple[str | None, bool]:
    """(last commit touching the op's files, whether they are modified in the working tree)."""
    paths = OP_PATHS[op]
    p = _git("log", "-1", "--format=%H", "--", *paths)
    last = p.stdout.strip() or None if p is not None and p.returncode == 0 else None
    s = _git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    dirty = bool(s is not None and s.returncode == 0 and s.stdout.strip())
    return last, dirty


@functools.cache
def freshness(commit_field: str | None, op: str) -> str:
    """The table cell for a figure measured at `commit_field` (e.g. "21aec89+dirty"): commit and status."""
    commit = (commit_field or "unknown").strip()
    base = commit.split("+", 1)[0]
    if base in ("", "unknown"):
        return "unknown commit, **stale?**"
    cell = f"`{base}`" + ("+dirty" if "+dirty" in commit else "")
    if not git_usable():
        return cell + ", not checked (no git history)"
    known = _git("cat-file", "-e", f"{base}^{{commit}}")
    if known is None or known.returncode != 0:
        return cell + ", **stale?** (commit not in history)"
    last, dirty = _last_change(op)
    if dirty:
        return cell + ", **stale**"
    if last is None:
        return cell
    anc = _git("merge-base", "--is-ancestor", last, base)
    return cell if anc is not None and anc.returncode == 0 else cell + ", **stale**"


# --------------------------------------------------------------------------------------------- loading
def load_results(results_dir: Path = RESULTS) -> list[dict]:
    """Every results JSON as {"name", "tag", "slug", "meta", "rows", "file"}."""
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
            continue
        name = next(
            (n for n in sorted(FILE_OP, key=len, reverse=True) if path.stem.startswith(n + "-")), None
        )
        if name is None:
            continue
        meta = data["meta"]
        dev = str(meta.get("device", "unknown"))
        slug = "".join(c if c.isalnum() else "_" for c in dev).strip("_").lower()
        slug = "cpu" if slug.startswith("cpu") else slug
        rest = path.stem[len(name) + 1 :]
        if not rest.endswith(slug):
            continue
        tag = rest[: -len(slug)].rstrip("-")
        out.append(
            {"name": name, "tag": tag, "slug": slug, "meta": meta, "rows": data["rows"], "file": path.name}
        )
    return out


def _is_gpu(r: dict) -> bool:
    return r["slug"] != "cpu"


# ------------------------------------------------------------------------------------------ formatting
def _f(x, nd: int = 3, unit: str = "") -> str:
    if x is None:
        return "-"
    x = float(x)
    if abs(x) >= 100:
        s = f"{x:.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.{nd}g}" if abs(x) < 1 else f"{x:.{nd - 1}f}" if nd > 1 else f"{x:.0f}"
    return s + unit


def _ms(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    return f"{x:.3f}" if 0.01 <= x < 1 else f"{x:.2g}" if x < 0.01 else _f(x)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _versions(meta: dict) -> str:
    parts = [f"torch {str(meta.get('torch', '?')).split('+')[0]}"]
    if meta.get("triton"):
        parts.append(f"triton {meta['triton']}")
    return ", ".join(parts)


def _status(row: dict) -> str | None:
    for key in ("status", "skipped", "failed", "error"):
        if row.get(key):
            text = " ".join(str(row[key]).split()).replace("|", "/")
            text = text if len(text) <= 60 else text[:57] + "..."
            return text if key in ("status", "skipped") else f"{key}: {text}"
    return None


# ------------------------------------------------------------------------------------------------ ops
def _fwd_bwd(r: dict | None) -> str:
    if not r or r.get("fwd_ms") is None:
        return "-"
    return f"{_ms(r['fwd_ms'])} / {_ms(r.get('bwd_ms'))}"


def _bridge_rows(res: dict) -> list[list]:
    rows = []
    by = {}
    for r in res["rows"]:
        by.setdefault(r.get("case"), {})[r.get("provider")] = r
    kernel = f", kernel={res['tag']}" if res["tag"] else ""
    for case, prov in by.items():
        ours = prov.get("triton", {})
        shape = ours.get("shape") or next(iter(prov.values())).get("shape", "?")
        dtype = ours.get("dtype", "")

        def fb(p, prov=prov):
            return _fwd_bwd(prov.get(p))

        ours_cell = fb("triton") + (" ms" if "triton" in prov else "")
        if ours.get("kernel"):
            ours_cell += f" ({ours['kernel']})"
        peers = "; ".join(f"{p.replace('hf_fast', 'HF fast')} {fb(p)}" for p in prov if p == "hf_fast")
        rows.append(
            [
                f"bridge fwd / bwd, {case}{kernel}",
                f"{shape.replace('x1024x1024', 'x1024²').replace('x512x512', 'x512²')}, {dtype}",
                ours_cell,
                fb("eager"),
                fb("compile"),
                peers or "-",
            ]
        )
    return rows


def _lce_cell(r: dict | None, mem: bool) -> str | None:
    if r is None:
        return None
    if r.get("fwd_bwd_ms") is None:
        return _status(r) or "no time"
    s = f"{_f(r['fwd_bwd_ms'])} ms"
    if r.get("pct_of_matmul_ceiling") is not None:
        s += f" ({_f(r['pct_of_matmul_ceiling'], 2)}% of matmul)"
    if mem and r.get("peak_extra_MiB") is not None:
        s += f", {_f(r['peak_extra_MiB'])} MiB extra"
    return s


def _lce_rows(res: dict) -> list[list]:
    rows = []
    by_n: dict = {}
    for r in res["rows"]:
        by_n.setdefault(r.get("N"), {})[r.get("provider")] = r
    peer_names = {"native": "torch native", "cce_exact": "CCE exact", "liger": "Liger"}
    for n, prov in by_n.items():
        ours = prov.get("ours", {})
        eager = prov.get("eager", {})
        shape = f"N={n}, V={ours.get('V', eager.get('V'))}, H={ours.get('H', eager.get('H'))}, "
        shape += str(ours.get("dtype", eager.get("dtype", ""))).replace("bfloat16", "bf16")

        def cell(p, mem=False, prov=prov):
            return _lce_cell(prov.get(p), mem)

        peers = [
            f"{label} {cell(p)}" if prov[p].get("fwd_bwd_ms") is not None else f"{label}: {cell(p)}"
            for p, label in peer_names.items()
            if p in prov
        ]
        chunks = sorted((p for p in prov if re.fullmatch(r"ours_c\d+", p)), key=lambda p: int(p[6:]))
        recompute = [f"recompute {cell('ours_recompute')}"] if "ours_recompute" in prov else []
        variants = recompute + [f"{p[6:]}-token chunks {cell(p, mem=True)}" for p in chunks]
        rows.append(
            [
                "linear CE fwd+bwd, frozen head",
                shape,
                cell("ours", mem=True) or "-",
                cell("eager", mem=True) or "-",
                cell("compile") or "-",
                "; ".join(peers + variants) or "-",
            ]
        )
    return rows


def _regression_rows(res: dict) -> list[list]:
    by = {r.get("case"): r for r in res["rows"]}
    f = by.get("fused fwd+bwd")
    if f is None:
        return []
    shape = f"{f.get('B')}x{f.get('N')}x{f.get('D')}, {str(f.get('dtype')).replace('bfloat16', 'bf16')}"

    def cell(case):
        r = by.get(case)
        if r is None:
            return "-"
        s = f"{_ms(r.get('gpu_ms'))} ms GPU"
        if r.get("pct_of_copy") is not None:
            s += f" ({_f(r['pct_of_copy'])}% of copy)"
        return s + f", {_ms(r.get('wall_ms'))} ms wall"

    return [
        [
            f"fused regression, {f.get('terms', '?')} terms fwd+bwd",
            shape,
            cell("fused fwd+bwd"),
            cell("eager fwd+bwd"),
            cell("compiled fwd+bwd"),
            "-",
        ]
    ]


def _critic_rows(res: dict) -> list[list]:
    rows = []
    a = res["meta"].get("args", {})
    for r in res["rows"]:
        if r.get("time_ms") is None:
            continue
        shape = f"{r.get('preset', a.get('preset'))}, B={r.get('batch')}, {r.get('dtype')}"
        ours = f"{_f(r['time_ms'])} ms, peak {_f(r.get('peak_MiB'))} MiB"
        if r.get("time_vs_floor") is not None:
            ours += f", {_f(r['time_vs_floor'])}x floor"
        rows.append(
            [
                f"critic fwd+bwd, checkpoint={r.get('policy')}, fuse={r.get('fuse')}",
                shape,
                ours,
                "-",
                "-",
                "-",
            ]
        )
    return rows


OPS_HEADER = ["op", "shape", "ours", "eager", "torch.compile", "peers and variants", "measured at"]


def _step_table(results: list[dict]) -> list[str]:
    rows = []
    for res in results:
        fr = freshness(res["meta"].get("commit"), "step")
        for r in res["rows"]:
            if r.get("median_ms") is None:
                continue
            over = "-"
            if r.get("overhead_ms") is not None:
                over = f"{_f(r['overhead_ms'], 2)} ms ({_f(r.get('overhead_pct'), 2)}%)"
            vs_floor = "-" if r.get("overhead_over_floor") is None else f"{_f(r['overhead_over_floor'])}x"
            vs_eager = "-"
            if r.get("time_vs_eager") is not None:
                vs_eager = f"{r['time_vs_eager']:.3f} / {r.get('peak_vs_eager', float('nan')):.3f}"
            name = "eager (reference path)" if r.get("provider") == "eager" else r.get("provider")
            rows.append(
                [
                    r.get("preset", res["tag"]),
                    name,
                    _f(r["median_ms"]),
                    _f(r.get("images_per_s")),
                    f"{r['peak_MB']:.2f}"
                    if r.get("peak_MB") is not None and r["peak_MB"] < 100
                    else _f(r.get("peak_MB")),
                    over,
                    vs_floor,
                    vs_eager,
                    fr,
                ]
            )
    header = [
        "preset",
        "provider",
        "median step ms",
        "images/s",
        "peak MB",
        "understanding overhead",
        "overhead / floor",
        "vs eager (time / peak)",
        "measured at",
    ]
    return _table(header, rows) if rows else []


def gpu_block(results: list[dict]) -> list[str]:
    gpu = [r for r in results if _is_gpu(r)]
    if not gpu:
        return ["No GPU results files in `benchmarks/results/`."]
    lines: list[str] = []
    for slug in sorted({r["slug"] for r in gpu}):
        mine = [r for r in gpu if r["slug"] == slug]
        dev = mine[0]["meta"].get("device", slug)
        lines.append(
            f"**GPU: {dev}** (`benchmarks/results/*{slug}*`; how each was run: `benchmarks/results/GPU_RUNS.md`)"
        )
        lines.append("")
        lines.append("| results file | versions | copy ceiling | matmul ceiling | commit |")
        lines.append("|---|---|---|---|---|")
        for res in mine:
            m = res["meta"]
            c = m.get("ceilings") or {}
            copy = c.get("copy_GBps", m.get("copy_GBps"))
            if copy is None:
                copy = next((r.get("copy_GBps") for r in res["rows"] if r.get("copy_GBps")), None)
            mm = c.get("matmul_TFLOPs", m.get("matmul_TFLOPs"))
            mm_dt = str(c.get("matmul_dtype", m.get("matmul_dtype", "")) or "").replace("bfloat16", "bf16")
            lines.append(
                _row(
                    [
                        f"`{res['file']}`",
                        _versions(m),
                        "-" if copy is None else f"{copy / 1000:.2f} TB/s",
                        "-" if mm is None else f"{mm:.0f} TFLOP/s {mm_dt}".rstrip(),
                        f"{m.get('commit', 'unknown')} ({str(m.get('date', '?'))[:10]})",
                    ]
                )
            )
        lines.append("")
        ops = []
        order = ["bench_bridge", "linear_cross_entropy", "bench_regression", "bench_critic"]
        for name in order:
            for res in sorted(
                (r for r in mine if r["name"] == name), key=lambda r: (r["tag"] != "", r["tag"])
            ):
                if name == "linear_cross_entropy" and res["tag"]:
                    continue  # tagged LCE files are side sweeps; the untagged file holds the default shapes
                fr = freshness(res["meta"].get("commit"), FILE_OP[name])
                fn = {
                    "bench_bridge": _bridge_rows,
                    "linear_cross_entropy": _lce_rows,
                    "bench_regression": _regression_rows,
                    "bench_critic": _critic_rows,
                }[name]
                ops += [row + [fr] for row in fn(res)]
        if ops:
            lines += _table(OPS_HEADER, ops)
            lines.append("")
        steps = _step_table([r for r in mine if r["name"] == "step_throughput"])
        if steps:
            lines += steps
        else:
            lines.append("No `step_throughput` results on this GPU yet.")
        lines.append("")
    lines.append(
        "Op times: medians of `triton.testing.do_bench` (host time included where the host is slower than the "
        "GPU) unless marked GPU; step times: medians of the timed steps. **stale**: measured at a commit older "
        "than the last change of the files the figure depends on (`benchmarks/readme_tables.py`, `OP_PATHS`)."
    )
    return lines


CPU_PRESETS = ("tiny", "tiny-janus", "mid")  # the CPU goals' presets, in this order


def cpu_block(results: list[dict]) -> list[str]:
    steps = [
        r
        for tag in CPU_PRESETS
        for r in results
        if r["name"] == "step_throughput" and r["slug"] == "cpu" and r["tag"] == tag
    ]
    if not steps:
        return ["No `step_throughput-tiny-cpu.json` in `benchmarks/results/`."]
    return _step_table(steps)


def cpu_goals_block(results: list[dict]) -> list[str]:
    """The goals each CPU run judged itself by (`meta.goals`, written by step_throughput's check_goals)."""
    rows = []
    for tag in CPU_PRESETS:
        for res in results:
            if res["name"] != "step_throughput" or res["slug"] != "cpu" or res["tag"] != tag:
                continue
            fr = freshness(res["meta"].get("commit"), "step")
            for g in res["meta"].get("goals") or []:
                measured = g.get("measured")
                status = str(g.get("status", "?"))
                rows.append(
                    [
                        str(g.get("goal", "?")).removeprefix("CPU: "),
                        g.get("preset", tag),
                        "-" if measured is None else f"{float(measured):.3f}x",
                        f"**{status}**" if status != "met" else status,
                        fr,
                    ]
                )
    if not rows:
        return ["No goals in the CPU `step_throughput` results files."]
    return _table(["goal", "preset", "measured", "status", "measured at"], rows)


def generate(results_dir: Path = RESULTS) -> dict[str, str]:
    results = load_results(results_dir)
    return {
        "gpu-table": "\n".join(gpu_block(results)),
        "cpu-table": "\n".join(cpu_block(results)),
        "cpu-goals": "\n".join(cpu_goals_block(results)),
    }


# ------------------------------------------------------------------------------------------------ README
def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(<!-- {name}:end -->)", re.S)


def render(text: str, blocks: dict[str, str]) -> str:
    """`text` with each block's content replaced; a block whose markers are missing is an error."""
    for name, body in blocks.items():
        pat = _pattern(name)
        if len(pat.findall(text)) != 1:
            raise ValueError(f"expected one '<!-- {name}:begin -->' ... '<!-- {name}:end -->' pair")
        text = pat.sub(lambda m, body=body: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text)
    return text


def extract(text: str, name: str) -> str:
    m = _pattern(name).search(text)
    if m is None:
        raise ValueError(f"no '<!-- {name}:begin -->' ... '<!-- {name}:end -->' pair")
    return m.group(2).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when a file differs from the results")
    mode.add_argument("--print", action="store_true", help="print the generated blocks")
    ap.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the tree whose README.md and docs/benchmarks.md are rewritten",
    )
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    blocks = generate(args.results)
    if args.print:
        for name in BLOCKS:
            print(f"<!-- {name}:begin -->\n{blocks[name]}\n<!-- {name}:end -->\n")
        return 0
    rc = 0
    for rel, names in TARGETS.items():
        path = args.root / rel
        old = path.read_text()
        try:
            new = render(old, {name: blocks[name] for name in names})
        except ValueError as e:
            raise ValueError(f"{rel}: {e}") from None
        if args.check:
            if new != old:
                sys.stdout.writelines(
                    difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, "generated", n=1)
                )
                print(f"{rel}: result tables differ from benchmarks/results; run {Path(__file__).name}")
                rc = 1
            else:
                print(f"{rel}: result tables match benchmarks/results")
        elif new != old:
            path.write_text(new)
            print(f"wrote {path}")
        else:
            print(f"{path} unchanged")
    return rc


if __name__ == "__main__":
    sys.exit(main())
