"""The main benchmark: what understanding supervision costs on top of a generation step, and how close
uno_engine comes to the floor of that cost. This file is the command line; the measurement lives in
benchmarks/_step.py (providers, what is measured and how, derived figures, goals).

    python benchmarks/step_throughput.py                        # CPU: tiny preset, eager vs engine, < 2 min
    python benchmarks/step_throughput.py --preset tiny,tiny-janus,mid
    python benchmarks/step_throughput.py --preset sd15-llava7b  # GPU: real shapes, random weights, offline
    python benchmarks/step_throughput.py --preset janus-pro-1b --max-batch-search 8 --compare results/old.json

For each preset (uno_engine.testing.presets.build_preset) and provider (_step.PROVIDERS; add one with
`@_step.provider`):
  eager            UNOConfig(backend="reference"), Critic(checkpoint="none"): what users write by hand
  eager+compile    the same, with the critic, its image preprocessing and the loss under torch.compile
  engine           UNOConfig(backend="auto"), Critic(checkpoint=<the preset's choice: "auto" on the CPU presets>)
  engine+compile   the engine with UNOConfig(compile=True) (the critic compiled block by block)
  (eager and engine read with the default reading, one jittered view per image; engine+plain reads with
  read=None, the processor's exact read; engine+readK reads K views)
it measures, side by side on one fixed batch, the median step time and images/s, the peak memory of a step,
the understanding overhead over a generation-only step (in total and per phase), the critic's FLOP floor, and
optionally (GPU, --max-batch-search N) the largest batch before out-of-memory.
Outputs: a progress bar and the tables (figures, per-phase ms, goals) on the terminal; JSON + CSV under
benchmarks/runs/ (ignored by git), or --out-dir DIR, or with --record benchmarks/results/ (the committed figures
behind the README: how they are recorded) (harness.write_results, with env_metadata and the ceilings); the
per-phase picture step_throughput.png beside them (benchmarks/plot.py; --no-plot skips it); with --compare FILE
each metric against a committed results file (exit 1 if any metric is more than 10% worse).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _step  # noqa: E402
import harness  # noqa: E402
from _step import GEN_ONLY, PROVIDERS, Options, check_goals, log, print_report, run_preset  # noqa: E402

MIN_STEPS = 20


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help="comma-separated presets: tiny (CPU default), tiny-janus, mid, sd15-llava7b, sana-siglip-qwen2, "
        "janus-pro-1b, janus-pro-7b",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated, from:\n"
        + "\n".join(f"  {name:<15} {prov.doc}" for name, prov in PROVIDERS.items())
        + "\n(default: those meant for the device; on the CPU the compile providers are skipped unless named)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument("--steps", type=int, default=MIN_STEPS, help=f"timed steps per provider (>= {MIN_STEPS})")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per provider (default 3 GPU, 2 CPU)"
    )
    p.add_argument(
        "--allow-few-steps",
        action="store_true",
        help=f"allow --steps < {MIN_STEPS} (quick CPU smoke runs; not a measurement)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=None,
        help="profiled steps per provider for the phase breakdown (default 5 GPU, 3 CPU; 0: off)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--caption-len", type=int, default=None, help="caption tokens (default: the preset's)")
    p.add_argument(
        "--engine-checkpoint",
        default=None,
        choices=["auto", "none", "layer", "selective", "offload"],
        help="the engine providers' Critic(checkpoint=...) (default: the preset's choice)",
    )
    p.add_argument(
        "--janus-sampling",
        default="cached",
        choices=["cached", "every-step"],
        help="Janus presets: 'cached' samples the 576 image tokens once per batch and times the training "
        "part of the step (the sampling time is reported as sample_ms); 'every-step' samples in "
        "every step (seconds per step on a GPU)",
    )
    p.add_argument(
        "--loss",
        default="caption=1.0",
        help="UNOLoss weights, e.g. 'caption=1.0,density=0.0,structure=0.0' (default caption only)",
    )
    p.add_argument(
        "--max-batch-search",
        type=int,
        default=0,
        metavar="N",
        help="GPU only: find the largest batch before OOM with at most N trials per provider (0: off)",
    )
    p.add_argument("--max-batch-time", type=float, default=90.0, help="seconds per provider for that search")
    p.add_argument("--max-batch-cap", type=int, default=1024, help="largest batch the search tries")
    p.add_argument(
        "--max-batch-providers",
        default=f"{GEN_ONLY},eager,engine",
        help="providers the search runs for (compile providers would recompile per batch size)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="FILE",
        help="a committed results JSON: report each metric against it; exit 1 if any is >10%% worse",
    )
    p.add_argument("--tolerance", type=float, default=0.10, help="--compare: allowed relative slowdown")
    harness.add_output_args(p)
    p.add_argument("--tag", default=None, help="extra tag in the results file names")
    p.add_argument(
        "--quick-ceilings",
        action="store_true",
        help="measure the ceilings on small buffers (cache-sized: a smoke test, not a measurement)",
    )
    p.add_argument(
        "--from-results",
        default=None,
        metavar="FILE",
        help="run nothing: print the tables (and --compare) of an existing results JSON",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads). Default on the CPU: 1, so that timings on a shared or "
        "small machine are not ruined by OpenMP oversubscription; 0 keeps torch's default",
    )
    p.add_argument(
        "--no-plot", action="store_true", help="do not draw step_throughput.png beside the results"
    )
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    args = p.parse_args(argv)

    args.presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    device = torch.device(args.device or harness.default_device())
    if args.providers:
        args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
        bad = [s for s in args.providers if s not in PROVIDERS]
        if bad:
            p.error(f"unknown providers {bad}; choose from {PROVIDERS}")
    else:
        args.providers = _step.default_providers(device.type)
        skipped = [name for name in PROVIDERS if name not in args.providers]
        if skipped:
            log(
                f"note: providers {', '.join(skipped)} do not run by default on the {device.type.upper()} (the "
                "compile providers run by default on CUDA only); name them with --providers to run them"
            )
    if args.steps < MIN_STEPS and not args.allow_few_steps:
        p.error(
            f"--steps {args.steps} < {MIN_STEPS}: the median needs >= {MIN_STEPS} steps "
            "(pass --allow-few-steps for a quick smoke run)"
        )
    if args.steps < 1:
        p.error("--steps must be >= 1")
    cuda = device.type == "cuda"
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    args.profile_steps = args.profile_steps if args.profile_steps is not None else (5 if cuda else 3)
    args.max_batch_providers = frozenset(s.strip() for s in args.max_batch_providers.split(","))
    args.loss_kwargs = {}
    for part in filter(None, (s.strip() for s in args.loss.split(","))):
        k, _, v = part.partition("=")
        args.loss_kwargs[k.strip()] = float(v)
    args.options = Options(
        providers=args.providers,
        steps=args.steps,
        warmup=args.warmup,
        profile_steps=args.profile_steps,
        batch_size=args.batch_size,
        caption_len=args.caption_len,
        dtype=args.dtype,
        engine_checkpoint=args.engine_checkpoint,
        janus_sampling=args.janus_sampling,
        loss_kwargs=args.loss_kwargs,
        max_batch_search=args.max_batch_search,
        max_batch_time=args.max_batch_time,
        max_batch_cap=args.max_batch_cap,
        max_batch_providers=args.max_batch_providers,
        verbose=args.verbose,
    )
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    t_start = time.perf_counter()
    all_rows, paths = [], []
    if args.from_results:
        data = json.loads(Path(args.from_results).read_text())
        meta, all_rows = data["meta"], data["rows"]
        ceilings = meta.get("ceilings", {"matmul_TFLOPs": math.nan})
        device = torch.device("cuda" if "cpu" not in str(meta.get("device", "cpu")).lower() else "cpu")
        steps = meta.get("steps", "?")
    else:
        from uno_engine.testing.presets import PRESETS

        unknown = [n for n in args.presets if n not in PRESETS]
        if unknown:
            log(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
            return 2
        log("measuring device ceilings (copy bandwidth, matmul rate) ...")
        small = {"copy_bytes": 16 << 20, "matmul_n": 256} if args.quick_ceilings else {}
        ceilings = harness.measure_ceilings(str(device), **small)
        log(
            f"  copy {ceilings['copy_GBps']:.1f} GB/s, matmul {ceilings['matmul_TFLOPs']:.3g} TFLOP/s "
            f"({ceilings['matmul_dtype']})"
        )
        meta = {
            **harness.env_metadata(str(device)),
            "ceilings": ceilings,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "steps": args.steps,
            "warmup": args.warmup,
            "profile_steps": args.profile_steps,
            "providers": args.providers,
            "loss": args.loss_kwargs,
        }
        steps = args.steps
        out_dir = harness.output_dir(args)
        note = "" if args.record else " (the committed figures: --record)"
        log(f"results go to {os.path.relpath(out_dir)}/{note}")
        for name in args.presets:
            tag = name + (f"-{args.tag}" if args.tag else "")

            def save(rows, tag=tag):
                meta_p = {
                    **meta,
                    "goals": check_goals(rows, device),
                    "wall_s": round(time.perf_counter() - t_start, 1),
                }
                return harness.write_results("step_throughput", rows, meta_p, out_dir=out_dir, tag=tag)

            try:
                rows = run_preset(name, args.options, device, ceilings, save=save)
            except Exception as e:  # noqa: BLE001
                log(f"[{name}] failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                rows = [{"preset": name, "provider": "-", "error": f"{type(e).__name__}: {e}"[:500]}]
            all_rows += rows
            paths += save(rows)

    goals = check_goals(all_rows, device)
    print_report(
        all_rows, goals, device_name=meta["device"], steps=steps, matmul_tflops=ceilings["matmul_TFLOPs"]
    )
    errors = [r for r in all_rows if r.get("error")]
    if paths and not args.no_plot:
        print()
        draw_plot([p for p in paths if p.suffix == ".json"], paths[0].parent / "step_throughput.png")
    print()
    for pth in paths:
        print(f"wrote {os.path.relpath(pth)}")
    print(f"total {time.perf_counter() - t_start:.1f} s")

    rc = 0
    if args.compare:
        cmp_rows, worse = harness.compare_results(
            all_rows, args.compare, keys=("preset", "provider", "batch"), tolerance=args.tolerance
        )
        print()
        if cmp_rows:
            harness.print_table(
                cmp_rows,
                ["preset", "provider", "batch", "metric", "baseline", "current", "ratio", "status"],
                title=f"compared with {args.compare}",
            )
        else:
            print(f"compare: no rows of {args.compare} match this run (preset, provider, batch)")
        if worse:
            print(f"compare: at least one metric is more than {args.tolerance:.0%} worse than {args.compare}")
            rc = 1
    if errors:
        rc = rc or 3  # the other providers' figures are still in the table and the results files
    return rc


def draw_plot(json_paths: list[Path], out: Path) -> None:
    """The per-phase picture of this run's results (benchmarks/plot.py); a failure to draw is reported, the
    figures are already written."""
    import plot

    try:
        plot.main([*map(str, json_paths), "--out", str(out)])
    except Exception as e:  # noqa: BLE001
        print(f"plot: not drawn ({type(e).__name__}: {e})")


if __name__ == "__main__":
    sys.exit(main())
