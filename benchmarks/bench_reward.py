"""The value path's cost per sample against the pixel-path UNOStep, in one run (uno_engine.reward).

    nice python benchmarks/bench_reward.py                        # CPU: preset "tiny", K=4, G=4
    python benchmarks/bench_reward.py --device cuda --preset sd15-llava7b

Timed interleaved (every variant once per round, harness.time_interleaved), medians of the wall time, and the
median of this process's CPU time (the figure to read on a machine shared with other jobs), per generated
sample:

- "uno_step": the pixel-path training step, UNOStep with the caption CE (generate with truncated backprop,
  bridge, critic forward and backward, generator backward): the baseline;
- "reward": `CaptionReward` alone on ready images with K negatives (no grad: one vision pass, one packed LM
  pass of P + (K+1) L positions, the fused linear CE with reduction="none", forward only);
- "value_step": the whole `ValueStep` (kind "nft", G samples per prompt): the no-grad sampling chain, the
  decode, the reward, one denoiser call with grad, one without (the initial model), and the backward.

Results: benchmarks/results/bench_reward-<preset>-<device>.json/.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default=harness.default_device())
    p.add_argument("--k", type=int, default=4, help="negatives per image")
    p.add_argument("--group", type=int, default=4, help="ValueStep samples per prompt (G)")
    p.add_argument("--steps", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from uno_engine import CaptionReward, RewardObjective, UNOConfig, UNOStep, ValueStep
    from uno_engine.testing.presets import build_preset

    preset = build_preset(args.preset, device=args.device)
    critic = preset.make_critic(preset.engine_checkpoint)
    batch = preset.make_batch()
    B, L = batch["captions"].shape
    g = torch.Generator().manual_seed(1)
    batch["negative_captions"] = torch.randint(1, preset.caption_vocab(), (B, args.k, L), generator=g).to(
        preset.device
    )
    batch["negative_caption_mask"] = batch["caption_mask"][:, None].expand(B, args.k, L).contiguous()
    # read=None: the reward reads each image once, plainly; the UNO step read the same way, as recorded
    uno = UNOStep(preset.generator, critic, preset.make_loss(), UNOConfig(read=None))
    value = ValueStep(preset.generator, critic, RewardObjective("nft", group_size=args.group), UNOConfig())
    reward = CaptionReward(critic, UNOConfig())
    with torch.no_grad():
        images = preset.generator(batch).detach()
    params = preset.generator_parameters()

    def zero(_name=None):
        for p in params:
            p.grad = None

    fns = {
        "uno_step": lambda: uno(batch).loss.backward(),
        "reward": lambda: reward(images, batch),
        "value_step": lambda: value(batch).loss.backward(),
    }
    samples = {"uno_step": B, "reward": B, "value_step": B * args.group}
    cpu = {n: [] for n in fns}

    def timed_cpu(name, fn):
        def run():
            c0 = time.process_time()
            fn()
            cpu[name].append((time.process_time() - c0) * 1e3)

        return run

    res = harness.time_interleaved(
        {n: timed_cpu(n, f) for n, f in fns.items()},
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        before=zero,
        desc="reward",
    )
    base = res["uno_step"]["median_ms"] / B
    base_cpu = statistics.median(cpu["uno_step"][args.warmup :]) / B
    rows = []
    for name, r in res.items():
        n = samples[name]
        c = statistics.median(cpu[name][args.warmup :]) / n
        rows.append(
            {
                "preset": args.preset,
                "variant": name,
                "batch": B,
                "samples": n,
                "k": args.k,
                "group": args.group if name == "value_step" else 1,
                "median_ms": round(r["median_ms"], 2),
                "p20_ms": round(r["p20_ms"], 2),
                "p80_ms": round(r["p80_ms"], 2),
                "ms_per_sample": round(r["median_ms"] / n, 2),
                "cpu_ms_per_sample": round(c, 2),
                "per_sample_vs_uno_step": round(r["median_ms"] / n / base, 3),
                "cpu_per_sample_vs_uno_step": round(c / base_cpu, 3),
                "n": r["n"],
            }
        )
    meta = harness.env_metadata(args.device)
    paths = harness.write_results(f"bench_reward-{args.preset}", rows, meta)
    harness.print_table(
        rows,
        [
            "variant",
            "samples",
            "median_ms",
            "ms_per_sample",
            "per_sample_vs_uno_step",
            "cpu_ms_per_sample",
            "cpu_per_sample_vs_uno_step",
        ],
        meta["device"],
    )
    print("results:", *paths)


if __name__ == "__main__":
    main()
