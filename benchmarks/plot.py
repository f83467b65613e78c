"""Plot the benchmark results: one PNG with
  - for each preset, stacked per-phase bars of a training step, the generation-only step, the eager baseline
    and the engine side by side (from results/step_throughput-*.json);
  - the kernel roofline fractions: each kernel benchmark row's achieved GB/s or TFLOP/s as a fraction of the
    device ceiling measured in the same run (from results/bench_*.json; skipped when there are none).

    python benchmarks/plot.py                       # all results files -> runs/step_throughput.png
    python benchmarks/plot.py --record              # ... -> results/step_throughput.png (the committed one)
    python benchmarks/plot.py FILE.json ... --out plot.png

matplotlib is a dependency of uno_engine (so `python benchmarks/step_throughput.py` after `pip install -e .`
draws this picture); without it this script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # ignored by git: where a run writes without --record
PHASES = ("generate", "bridge", "critic", "loss", "loss_bwd", "critic_bwd", "bridge_bwd", "generator_bwd")
PHASE_COLORS = {
    "generate": "#4c72b0",
    "generator_bwd": "#8fa9d6",
    "bridge": "#dd8452",
    "bridge_bwd": "#f0b98d",
    "critic": "#c44e52",
    "critic_bwd": "#e8999b",
    "loss": "#55a868",
    "loss_bwd": "#a3d3ad",
}
PROVIDER_ORDER = ("generation-only", "eager", "eager+compile", "engine", "engine+compile")
# row keys that hold a fraction of a measured ceiling: e.g. fwd_frac_copy, pct_of_matmul_ceiling, pct_of_copy,
# device_pct_of_copy (a "pct" key is a percentage)
FRACTION_KEY = re.compile(r"(frac|pct_of)_?(copy|matmul|ceiling|peak)")
MAX_KERNEL_BARS = 48


def load(paths: list[Path]) -> tuple[list[tuple[dict, list[dict]]], list[tuple[str, dict, list[dict]]]]:
    """(step_throughput results, kernel benchmark results) from the given files."""
    steps, kernels = [], []
    for p in paths:
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"plot.py: skipping {p}: {e}", file=sys.stderr)
            continue
        meta, rows = (data.get("meta", {}), data.get("rows", [])) if isinstance(data, dict) else ({}, data)
        (
            steps.append((meta, rows))
            if p.name.startswith("step_throughput")
            else kernels.append((p.stem, meta, rows))
        )
    return steps, kernels


def roofline_fractions(row: dict) -> list[tuple[str, float]]:
    """(key, fraction of the ceiling) for every roofline key of a kernel benchmark row."""
    out = []
    for k, v in row.items():
        if FRACTION_KEY.search(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out.append((k, v / 100.0 if "pct" in k else float(v)))
    return out


def short_device(meta: dict) -> str:
    """ "NVIDIA H200" -> "H200", "CPU (x86_64, 2 cores)" -> "CPU"."""
    return str(meta.get("device", "?")).replace("NVIDIA ", "").split(" (")[0]


def kernel_label(name: str, meta: dict, row: dict, key: str) -> str:
    parts = [f"[{short_device(meta)}] " + name.rsplit("-", 1)[0].removeprefix("bench_")]
    for k in ("case", "op", "name", "provider", "backend", "shape"):
        if row.get(k) not in (None, ""):
            parts.append(str(row[k]))
    parts.append(key)
    return " | ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot step_throughput and kernel roofline results.")
    ap.add_argument(
        "files", nargs="*", type=Path, help="results JSON files (default: all in benchmarks/results)"
    )
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, default=None, help="PNG path (default runs/step_throughput.png)")
    out.add_argument(
        "--record", action="store_true", help="write results/step_throughput.png (the committed one)"
    )
    ap.add_argument("--device", default=None, help="only results whose device contains this (e.g. H200, CPU)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(
            f"plot.py: matplotlib is not installed ({e}); no plot drawn. Install it with "
            "`pip install matplotlib` (a dependency of `pip install -e .`)."
        )
        return 0

    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    steps, kernels = load(files)
    if args.device:
        want = args.device.lower()
        steps = [(m, r) for m, r in steps if want in str(m.get("device", "")).lower()]
        kernels = [(n, m, r) for n, m, r in kernels if want in str(m.get("device", "")).lower()]
    presets = []  # (label, rows) per step_throughput file and preset
    for meta, rows in steps:
        for preset in dict.fromkeys(r.get("preset") for r in rows):
            prow = [r for r in rows if r.get("preset") == preset and r.get("median_ms") is not None]
            if prow:
                presets.append((f"{preset}\n{meta.get('device', '?')}", prow))
    kernel_rows = [
        (kernel_label(name, meta, r, k), f)
        for name, meta, rows in kernels
        for r in rows
        for k, f in roofline_fractions(r)
    ]
    if len(kernel_rows) > MAX_KERNEL_BARS:
        print(f"plot.py: {len(kernel_rows)} kernel roofline figures; drawing the first {MAX_KERNEL_BARS}")
        kernel_rows = kernel_rows[:MAX_KERNEL_BARS]
    if not presets and not kernel_rows:
        print(
            f"plot.py: no step_throughput or kernel results with figures in "
            f"{[str(f) for f in files] or RESULTS_DIR}; nothing to plot"
        )
        return 0

    n_panels = len(presets) + (1 if kernel_rows else 0)
    height = max(5.5, 0.18 * len(kernel_rows) + 1.5)
    fig, axes = plt.subplots(
        1, n_panels, figsize=(4.5 * len(presets) + (8 if kernel_rows else 0), height), squeeze=False
    )
    axes = list(axes[0])
    for ax, (label, rows) in zip(axes, presets, strict=False):
        rows = sorted(
            rows, key=lambda r: PROVIDER_ORDER.index(r["provider"]) if r["provider"] in PROVIDER_ORDER else 99
        )
        x = range(len(rows))
        bottoms = [0.0] * len(rows)
        for ph in PHASES:
            vals = [max(0.0, r.get(f"phase_{ph}_ms") or 0.0) for r in rows]
            if any(vals):
                ax.bar(x, vals, bottom=bottoms, color=PHASE_COLORS[ph], label=ph, width=0.6)
                bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        # providers without a phase breakdown: the median as one grey bar
        plain = [(i, r["median_ms"]) for i, r in enumerate(rows) if not bottoms[i]]
        if plain:
            ax.bar(
                [i for i, _ in plain],
                [v for _, v in plain],
                color="#999999",
                width=0.6,
                label="step (no phases)",
            )
        ax.scatter(
            list(x),
            [r["median_ms"] for r in rows],
            marker="_",
            s=400,
            color="black",
            zorder=3,
            label="median step",
        )
        ax.set_xticks(list(x))
        ax.set_xticklabels([r["provider"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("ms per training step")
        ax.set_title(label, fontsize=9)
        for i, r in enumerate(rows):
            if r.get("overhead_pct") is not None:
                ax.annotate(
                    f"+{r['overhead_pct']:.0f}%",
                    (i, r["median_ms"]),
                    textcoords="offset points",
                    xytext=(0, 4),
                    ha="center",
                    fontsize=7,
                )
    if presets:
        # one legend for every preset panel (the union of their phases), right of the panels; the figure is
        # saved with a tight bounding box, so the legend is never cut off whatever the panel count
        legend = {}
        for ax in axes[: len(presets)]:
            for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True):
                legend.setdefault(lbl, h)
        fig.legend(
            list(legend.values()),
            list(legend),
            fontsize=8,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
    if kernel_rows:
        ax = axes[-1]
        labels = [lbl for lbl, _ in kernel_rows]
        fracs = [f for _, f in kernel_rows]
        ax.barh(range(len(fracs)), fracs, color="#4c72b0")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(fracs)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_xlabel("fraction of the ceiling measured in the same run")
        ax.set_title("kernel roofline", fontsize=9)
        ax.set_xlim(0, max(1.05, max(fracs) * 1.05))
    elif not args.files:
        print("plot.py: no kernel benchmark results with a roofline fraction; the kernel panel is left out")
    fig.tight_layout()
    out = args.out or (RESULTS_DIR if args.record else RUNS_DIR) / "step_throughput.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"plot.py: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
