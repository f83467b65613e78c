"""Hard negative captions: the prefix-shared critic pass against K+1 separate passes, in one run.

    nice python benchmarks/bench_negatives.py                  # CPU: preset "mid" (256 image tokens, 32 caption
                                                               # tokens, B=4), K=4
    python benchmarks/bench_negatives.py --device cuda --preset sd15-llava7b

Three whole training steps (generator -> bridge -> critic -> loss -> backward to the generator), timed
interleaved (every variant once per round, so drift hits them alike), medians of the wall time and of this
process's CPU time (the CPU figure is the one to read on a machine shared with other jobs):

- "caption": UNOStep with the caption CE only (no negatives): the baseline;
- "shared": UNOStep with UNOLoss(negatives=1.0) and K negative captions per image: one vision pass and one
  packed LM pass of P + (K+1) L positions per image (Critic.forward_with_negatives);
- "separate": the naive way: the generator and bridge once, then the critic run K+1 times (vision tower and
  LM prefix each time), the same loss.

Ratios over "caption" are reported, and the relative difference of the generator gradients of "shared" and
"separate" (they compute the same objective). Results: bench_negatives-<device>.json/.csv in
benchmarks/runs/ (--record: benchmarks/results/).
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
    p.add_argument("--preset", default="mid")
    p.add_argument("--device", default=harness.default_device())
    p.add_argument("--k", type=int, default=4, help="negatives per image")
    p.add_argument("--steps", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1)
    harness.add_output_args(p)
    return p.parse_args(argv)


def separate_loss(step, batch):
    """The negatives objective with K+1 separate critic passes (the naive baseline)."""
    from uno_engine import ops

    images = step.generator(batch)
    inputs = step.critic.prepare(images, input_range=step.config.input_range, backend=step.config.backend)
    caps = torch.cat([batch["captions"][:, None], batch["negative_captions"]], dim=1)
    masks = torch.cat([batch["caption_mask"][:, None], batch["negative_caption_mask"]], dim=1)
    scores, ce0 = [], None
    for j in range(caps.shape[1]):
        out = step.critic(inputs, caps[:, j], masks[:, j])
        ce = ops.linear_cross_entropy(
            out.caption_hidden,
            out.lm_head_weight,
            out.caption_labels,
            bias=out.lm_head_bias,
            reduction="none",
        )
        scores.append(-ce.sum(-1))
        if j == 0:
            ce0 = ce.sum() / masks[:, 0].sum()
    s = torch.stack(scores, dim=1)
    return ce0 + (torch.logsumexp(s, 1) - s[:, 0]).mean()


def time_both(fns, *, steps, warmup, before):
    """Interleaved rounds (every variant once per round, as harness.time_interleaved) recording the wall time
    (perf_counter) and this process's CPU time (process_time, all threads) of each call. On a CPU shared with
    other jobs the wall time swings with their load; the CPU time is the work the step itself does."""
    for name, fn in fns.items():
        for _ in range(warmup):
            before(name)
            fn()
    wall = {n: [] for n in fns}
    cpu = {n: [] for n in fns}
    for _ in harness.progress(range(steps), desc="negatives", total=steps):
        for name, fn in fns.items():
            before(name)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    out = {}
    for n in fns:
        q = statistics.quantiles(wall[n], n=5) if len(wall[n]) > 1 else wall[n] * 4
        out[n] = {
            "median_ms": statistics.median(wall[n]),
            "p20_ms": q[0],
            "p80_ms": q[-1],
            "cpu_median_ms": statistics.median(cpu[n]),
            "n": steps,
        }
    return out


def main(argv=None):
    args = parse_args(argv)
    from uno_engine import UNOConfig, UNOStep
    from uno_engine.testing.presets import build_preset

    preset = build_preset(args.preset, device=args.device)
    critic = preset.make_critic(preset.engine_checkpoint)
    batch = preset.make_batch()
    B, L = batch["captions"].shape
    g = torch.Generator().manual_seed(1)
    vocab = preset.caption_vocab()
    batch["negative_captions"] = torch.randint(1, vocab, (B, args.k, L), generator=g).to(preset.device)
    batch["negative_caption_mask"] = torch.ones_like(batch["negative_captions"])
    plain = UNOStep(preset.generator, critic, preset.make_loss(), UNOConfig())
    shared = UNOStep(preset.generator, critic, preset.make_loss(negatives=1.0), UNOConfig())
    params = preset.generator_parameters()

    def zero(_name=None):
        for p in params:
            p.grad = None

    fns = {
        "caption": lambda: plain(batch).loss.backward(),
        "shared": lambda: shared(batch).loss.backward(),
        "separate": lambda: separate_loss(shared, batch).backward(),
    }
    grads = {}
    for name in ("shared", "separate"):
        zero()
        fns[name]()
        grads[name] = torch.cat([p.grad.flatten().double() for p in params if p.grad is not None])
    rel = float((grads["shared"] - grads["separate"]).norm() / grads["separate"].norm().clamp_min(1e-30))
    res = time_both(fns, steps=args.steps, warmup=args.warmup, before=zero)
    base = res["caption"]["median_ms"]
    rows = []
    for name, r in res.items():
        rows.append(
            {
                "preset": args.preset,
                "variant": name,
                "batch": B,
                "caption_len": L,
                "k": args.k if name != "caption" else 0,
                "critic_checkpoint": preset.engine_checkpoint,
                "median_ms": round(r["median_ms"], 2),
                "p20_ms": round(r["p20_ms"], 2),
                "p80_ms": round(r["p80_ms"], 2),
                "cpu_median_ms": round(r["cpu_median_ms"], 2),
                "n": r["n"],
                "vs_caption": round(r["median_ms"] / base, 3),
                "cpu_vs_caption": round(r["cpu_median_ms"] / res["caption"]["cpu_median_ms"], 3),
                "grad_rel_diff_shared_vs_separate": rel,
            }
        )
    meta = harness.env_metadata(args.device)
    paths = harness.write_results("bench_negatives", rows, meta, out_dir=harness.output_dir(args))
    harness.print_table(
        rows,
        ["variant", "k", "median_ms", "p20_ms", "p80_ms", "vs_caption", "cpu_median_ms", "cpu_vs_caption"],
        meta["device"],
    )
    print(f"generator-gradient relative difference shared vs separate: {rel:.2e}")
    print("results:", *paths)


if __name__ == "__main__":
    main()
