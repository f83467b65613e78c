"""Does the generator keep fitting real data while the critic steers it? Caption loss alone vs the joint
objective (caption + generator_loss), 50 UNO steps each from the same weights, on the tiny preset.

    nice python benchmarks/joint_objective.py                 # CPU: preset "tiny" (tiny SD UNet + VAE, tiny
                                                              # LLaVA critic), 50 steps, Adam lr 1e-3

"Real data": the tiny preset has none, so a fixed family of smooth synthetic images (random colored
gradients and disks, in [-1, 1]) stands in; their VAE latents (posterior mode, no grad) are the reference
latents. Training batches draw images from the family with one seed, the held-out evaluation batch with
another. Every `--eval-every` steps the denoising loss of the generator (`generator.denoising_loss`, its own
parameterization, fixed timesteps and noise through the batch seed) is measured on the held-out batch, under
no grad. Two runs from the same initial weights: "caption" (UNOLoss(caption=1)) and "joint"
(UNOLoss(caption=1, generator_loss=--w)). Result rows: the curve of each run, and its start / end / max.
Results: joint_objective-<device>.json/.csv in benchmarks/runs/ (--record: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--w", type=float, default=1.0, help="generator_loss weight of the joint run")
    harness.add_output_args(p)
    return p.parse_args(argv)


def synthetic_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, 3, height, width) in [-1, 1]: a random linear color gradient plus one random colored disk."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    out = []
    for _ in range(n):
        a, b = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
        angle = float(torch.rand((), generator=g)) * 2 * math.pi
        img = a + (b - a) * (0.5 + 0.5 * (math.cos(angle) * xx + math.sin(angle) * yy))[None]
        cx, cy, r = (
            torch.rand(3, generator=g) * torch.tensor([1.2, 1.2, 0.4]) + torch.tensor([-0.6, -0.6, 0.2])
        ).tolist()
        disk = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).float()[None]
        color = torch.rand(3, 1, 1, generator=g) * 2 - 1
        out.append((img * (1 - disk) + color * disk).clamp(-1, 1))
    return torch.stack(out)


def run(args, joint: bool) -> list[dict]:
    from uno_engine import UNOConfig, UNOStep
    from uno_engine.testing.presets import build_preset

    torch.manual_seed(0)  # the same initial weights in both runs
    preset = build_preset(args.preset)
    gen = preset.generator
    loss = preset.make_loss(caption=1.0, generator_loss=args.w if joint else 0.0)
    # the plain read (read=None), as the recorded results were measured (before the jittered default reading)
    step = UNOStep(gen, preset.make_critic(preset.engine_checkpoint), loss, UNOConfig(read=None))
    opt = torch.optim.Adam(preset.generator_parameters(), lr=args.lr)
    size = (gen.height, gen.width)
    eval_batch = preset.make_batch(seed=12345)
    with torch.no_grad():
        eval_batch["reference_latents"] = gen.encode_images(
            synthetic_images(preset.batch_size, *size, seed=777)
        )
    train_batch = preset.make_batch(seed=0)
    with torch.no_grad():
        train_batch["reference_latents"] = gen.encode_images(
            synthetic_images(preset.batch_size, *size, seed=1)
        )
    rows = []

    def evaluate(i, caption_ce=None):
        with torch.no_grad():
            d = float(gen.denoising_loss(eval_batch))
        rows.append(
            {"run": "joint" if joint else "caption", "step": i, "denoising_loss": d, "caption_ce": caption_ce}
        )

    evaluate(0)
    for i in harness.progress(
        range(1, args.steps + 1), desc="joint" if joint else "caption", total=args.steps
    ):
        out = step({**train_batch, "seed": i})  # a fresh timestep / noise every step
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i % args.eval_every == 0 or i == args.steps:
            evaluate(i, float(out.metrics["caption_ce"]))
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = run(args, joint=False) + run(args, joint=True)
    summary = []
    for name in ("caption", "joint"):
        curve = [r["denoising_loss"] for r in rows if r["run"] == name]
        ces = [r["caption_ce"] for r in rows if r["run"] == name and r["caption_ce"] is not None]
        summary.append(
            {
                "run": name,
                "step": "summary",
                "denoising_start": curve[0],
                "denoising_end": curve[-1],
                "denoising_max": max(curve),
                "end_over_start": curve[-1] / curve[0],
                "caption_ce_first": ces[0],
                "caption_ce_last": ces[-1],
            }
        )
    meta = harness.env_metadata("cpu")
    meta.update(preset=args.preset, steps=args.steps, lr=args.lr, generator_loss_weight=args.w)
    paths = harness.write_results("joint_objective", rows + summary, meta, out_dir=harness.output_dir(args))
    harness.print_table(
        summary,
        [
            "run",
            "denoising_start",
            "denoising_end",
            "denoising_max",
            "end_over_start",
            "caption_ce_first",
            "caption_ce_last",
        ],
        meta["device"],
    )
    print("results:", *paths)


if __name__ == "__main__":
    main()
