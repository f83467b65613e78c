"""`uno-train`'s time per step against `UNOStep` alone, on the tiny preset's models (tiny-sd + tiny LLaVA).

    OMP_NUM_THREADS=1 python benchmarks/bench_cli.py [--record]     # CPU, 30 interleaved rounds

The models are written with save_pretrained into a temporary folder and loaded by the command's own
`Trainer.build` (the same code path as `uno-train`), at the preset's batch (2 images) and 8 sampling steps.
Two whole optimizer steps, timed interleaved on the SAME step object (every variant once per round, so drift
of a shared machine hits them alike):

- "unostep": `step(batch)`, `loss.backward()`, `optimizer.step()`, `zero_grad()` on a batch built once
  (prompt embeddings, caption ids, noise ready on the device): the engine alone. Its "seed" follows the CLI's
  sequence, so both draw the same sampling start steps (6 or 7 steps without grad before the grad step);
- "cli": one iteration of `uno-train`'s loop: `Trainer.train_step()` (the next records of the stream, caption
  tokenization, `encode_prompts` with the pipeline's text encoder, per-sample noise, the token count, forward,
  backward, gradient clipping, optimizer and LR scheduler, the metrics read back once) plus the progress bar
  and the tracker call of `Trainer.run`.

Reported: the medians of wall time and of this process's CPU time, and cli / unostep (the issue's bound:
<= 1.05). Results: benchmarks/runs/ (--record: benchmarks/results/) bench_cli-<device>.json/.csv.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="images per step (the tiny preset's)")
    p.add_argument("--num_inference_steps", type=int, default=8)
    harness.add_output_args(p)
    return p.parse_args(argv)


def build(args, root: Path):
    from uno_engine.testing.presets.folders import save_tiny_critic, save_tiny_pipeline, write_prompts
    from uno_engine.train.args import parse_args as cli_args
    from uno_engine.train.loop import Trainer

    save_tiny_pipeline("tiny-sd", root / "sd")
    save_tiny_critic("tiny-llava", root / "llava")
    write_prompts(root / "prompts.jsonl")
    argv = [
        "--pretrained_model_name_or_path", str(root / "sd"),
        "--critic_model_name_or_path", str(root / "llava"),
        "--train_data", str(root / "prompts.jsonl"),
        "--output_dir", str(root / "out"),
        "--train_batch_size", str(args.batch),
        "--num_inference_steps", str(args.num_inference_steps),
        "--resolution", "64",
        "--rank", "4",
        "--cpu",
    ]  # fmt: skip
    return Trainer.build(cli_args(argv))


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args, Path(tmp))
        step, opt = trainer.step, trainer.optimizer
        fixed = trainer.micro_batches()[0]  # the engine's batch, ready on the device
        bar = tqdm(total=10**9, file=io.StringIO())  # the loop's bar, drawn into a buffer
        cpu: dict[str, list[float]] = {"unostep": [], "cli": []}

        seeds = iter(range(10**9))

        def unostep():
            # the CLI's seed sequence: the same sampling start steps (their cost varies with the step drawn)
            fixed["seed"] = trainer.args.seed * 1_000_003 + next(seeds)
            t = time.process_time()
            step(fixed).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            cpu["unostep"].append((time.process_time() - t) * 1e3)

        def cli():
            t = time.process_time()
            metrics = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", caption_ce=f"{metrics['caption_ce']:.4f}")
            trainer.accelerator.log(metrics, step=trainer.global_step)
            cpu["cli"].append((time.process_time() - t) * 1e3)

        res = harness.time_interleaved(
            {"unostep": unostep, "cli": cli},
            steps=args.steps,
            warmup=args.warmup,
            device="cpu",
            desc="bench_cli",
        )
    rows = []
    cpu_ms = {k: statistics.median(v[args.warmup :]) for k, v in cpu.items()}  # the timed rounds only
    base_wall = res["unostep"]["median_ms"]
    for name in ("unostep", "cli"):
        rows.append(
            {
                "variant": name,
                "batch": args.batch,
                "num_inference_steps": args.num_inference_steps,
                "wall_median_ms": res[name]["median_ms"],
                "wall_p20_ms": res[name]["p20_ms"],
                "wall_p80_ms": res[name]["p80_ms"],
                "cpu_median_ms": cpu_ms[name],
                "wall_ratio": res[name]["median_ms"] / base_wall,
                "cpu_ratio": cpu_ms[name] / cpu_ms["unostep"],
                "n": res[name]["n"],
            }
        )
    harness.print_table(
        rows,
        [
            "variant",
            "wall_median_ms",
            "wall_p20_ms",
            "wall_p80_ms",
            "cpu_median_ms",
            "wall_ratio",
            "cpu_ratio",
        ],
        title=f"uno-train vs UNOStep alone, tiny preset models ({harness.device_name('cpu')}, "
        f"{torch.get_num_threads()} threads)",
    )
    paths = harness.write_results(
        "bench_cli", rows, harness.env_metadata("cpu"), out_dir=harness.output_dir(args)
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
