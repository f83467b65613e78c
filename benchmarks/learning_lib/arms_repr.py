"""Arms of the learning benchmark for the representation view and the early window (issue: UNO that teaches).

Registered in `experiment.ABLATIONS` (after the default set, so they run with a flag:
`python benchmarks/learning.py --ablations representation "early window"`). Each arm's spec has a
"prepare" hook that `experiment.run_uno` calls with the freshly built generator, before the UNOSteps:

- "representation": `UNOConfig(view="representation")`; a `RepresentationHead` on the UNet's `mid_block`
  (4 x 4 x 64, resampled to the critic's 8 x 8 tokens) attached to the generator, so it trains with the UNet.
  Held-out stream: caption CE of the critic reading the hidden states of the generator's own no-grad sample,
  re-noised. Seen stream: the real render, noised; caption CE + the generator's own v-loss from the same UNet
  call + the metaquery regression (UNOLoss structure, mode "features": cosine of the projected tokens to the
  critic's tokens of the render). Masked prompts with probability 0.5.
- "early window": the pixel view with `grad_window=(0.0, 0.5), recover="one_step"`: the grad step lies in the
  first half of the 10-step schedule and its x0 prediction is decoded (no rest of the chain).

`quick_check` (python -m benchmarks... or `benchmarks/learning_repr_check.py`) runs one arm on the tuning seed
with a paired before / after evaluation and standard errors, plus the copy-leak measure of the representation.
"""

from __future__ import annotations

import math
import random

import torch

from . import judge, models, world

REPR_BLOCK = "mid_block"
LAST: dict = {}  # the last generator a prepare hook built in this process (quick_check reads its head)
REPR_OPTIONS = {"prompt_dropout": 0.5, "noise_range": (0.0, 1.0)}
REPR_FIT_STEPS = 150  # head-only warm start (lr 1e-3) before the UNO steps


def _prepare_representation(gen, critic, text, s, seed: int):
    from uno_engine import UNOConfig, UNOLoss, UNOStep
    from uno_engine.representation import attach_representation, fit_head

    from .experiment import prompt_batch

    seen, _ = world.split_prompts()
    rng = random.Random(seed)
    batch = prompt_batch([rng.choice(seen) for _ in range(2)], text, seed=seed)
    torch.manual_seed(seed)  # the head's init
    opts = dict(REPR_OPTIONS, **(s.extra.get("representation") or {}))
    block = opts.pop("block", REPR_BLOCK)
    fit_steps = opts.pop("fit_steps", REPR_FIT_STEPS)
    attach_representation(critic, gen, batch, block=block, **opts)
    if fit_steps:  # the head alone first, on real renders of seen prompts (the UNet and the critic frozen)
        step = UNOStep(
            gen, critic, UNOLoss(**ARMS["representation"]["loss"]), UNOConfig(view="representation")
        )

        def batches(i):
            b = [rng.choice(seen) for _ in range(s.batch_seen)]
            return prompt_batch(b, text, seed=rng.randrange(2**31), rng=rng, references=True)

        losses = fit_head(step, batches, steps=fit_steps, lr=1e-3)
        LAST["fit_losses"] = (losses[0], losses[-1])
        LAST["copy_leak_after_head_fit"] = leak_on_held(critic, gen, text, seed=seed)
    LAST["generator"] = gen
    return gen


def _prepare_early_window(gen, critic, text, s, seed: int):
    from uno_engine.generators import DiffusersGenerator

    gen = DiffusersGenerator(
        gen.denoiser,
        models.build_scheduler(),
        models.SpaceToDepthVAE(),
        num_inference_steps=s.sample_steps,
        k_grad_steps=s.k_grad_steps,
        grad_window=(0.0, 0.5),
        recover="one_step",
        guidance_scale=s.guidance,
        reference="off",
    )
    LAST["generator"] = gen
    return gen


ARMS = {
    "representation": {
        "loss": {"caption": 1.0, "generator_loss": 1.0, "structure": 0.5, "structure_mode": "features"},
        "config": {"view": "representation"},
        "prepare": _prepare_representation,
    },
    "early window": {"loss": {"caption": 1.0}, "prepare": _prepare_early_window},
}


# ------------------------------------------------------------------------------------- re-phrased captions
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def rephrase(prompt: world.Prompt) -> str:
    """The second grammar of a scene: a relation caption named from the other object ("B <inverse> A"); a count
    caption is its own (the world's vocabulary has no second way to say it)."""
    if prompt.kind != "relation":
        return prompt.caption
    (ca, sa), (cb, sb) = prompt.objects
    return f"{cb} {sb} {INVERSE[prompt.relation]} {ca} {sa}"


# ---------------------------------------------------------------------------------------- the quick check
@torch.no_grad()
def judged(unet, text, prompts, *, seed: int, s) -> list[bool]:
    """Per sample: the judge's overall verdict on the generator's final sample (same noise for the same seed)."""
    from .experiment import generate

    images = generate(unet, text, prompts, seed=seed, s=s)
    return [judge.check(p, judge.parse(im))["overall"] for p, im in zip(prompts, images, strict=True)]


def paired(before: list[bool], after: list[bool]) -> dict:
    """Accuracies with standard errors, and the paired difference (same prompts, same noise) with its SE."""
    n = len(before)

    def mean_se(xs):
        m = sum(xs) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, n - 1))
        return m, sd / math.sqrt(n)

    b, bse = mean_se([float(x) for x in before])
    a, ase = mean_se([float(x) for x in after])
    d, dse = mean_se([float(y) - float(x) for x, y in zip(before, after, strict=True)])
    return {"before": b, "before_se": bse, "after": a, "after_se": ase, "diff": d, "diff_se": dse, "n": n}


def quick_check(
    arm: str,
    *,
    seed: int = 100,
    steps: int = 60,
    samples: int = 4,
    n_held: int = 96,
    n_seen: int = 48,
    log=print,
    extra: dict | None = None,
    lr: float | None = None,
) -> dict:
    """One arm on the tuning seed: train `steps` UNO steps, judge held-out / seen prompts x `samples` before and
    after on the same noise (paired), and (representation) the copy leak before and after training."""
    from uno_engine import Critic

    from . import experiment, training

    torch.set_num_threads(1)
    critic_model, proc = training.load_critic(training.CACHE / "critic.safetensors")
    unet, text = training.load_generator(training.CACHE / "generator.safetensors")
    s = experiment.Settings(seeds=(seed,), uno_steps=steps, extra=dict(extra or {}))
    if lr is not None:
        s.lr = lr
    seen, held = world.split_prompts()
    r = random.Random(seed)
    held_p = r.sample(held, min(n_held, len(held))) * samples
    seen_p = r.sample(seen, min(n_seen, len(seen))) * samples
    before = {
        "held_out": judged(unet, text, held_p, seed=seed, s=s),
        "seen": judged(unet, text, seen_p, seed=seed + 1, s=s),
    }
    critic = Critic.from_hf(critic_model, proc, checkpoint="none")
    LAST.clear()
    trained, hist = experiment.run_uno(unet, text, critic, arm, seed=seed, s=s, log=log)
    after = {
        "held_out": judged(trained, text, held_p, seed=seed, s=s),
        "seen": judged(trained, text, seen_p, seed=seed + 1, s=s),
    }
    out = {"arm": arm, "seed": seed, "steps": steps, "samples_per_prompt": samples, "lr": s.lr}
    out["loss"] = {k: v for k, v in ARMS[arm]["loss"].items()}
    if arm == "representation":
        out["representation"] = {"block": REPR_BLOCK, **REPR_OPTIONS, "fit_steps": REPR_FIT_STEPS}
        out["representation"].update(s.extra.get("representation") or {})
    out.update({k: paired(before[k], after[k]) for k in before})
    out["denoising_loss_before"] = experiment.denoising_loss(unet, text, seed=seed, n=128)
    out["denoising_loss_after"] = experiment.denoising_loss(trained, text, seed=seed, n=128)
    out["caption_ce_held_first_last"] = (hist[0].get("held_caption_ce"), hist[-1].get("held_caption_ce"))
    out["head_fit_loss_first_last"] = LAST.get("fit_losses")
    out["copy_leak_after_head_fit"] = LAST.get("copy_leak_after_head_fit")
    gen = LAST.get("generator")
    if getattr(gen, "representation", None) is not None:
        out["copy_leak_after"] = leak_on_held(critic, gen, text, seed=seed)
    return out


def leak_on_held(critic, gen, text, *, seed: int, n: int = 64) -> dict:
    """`copy_leak` on n held-out prompts (and on n seen prompts with their real renders' captions)."""
    from uno_engine.representation import copy_leak

    from .experiment import prompt_batch

    _, held = world.split_prompts()
    rng = random.Random(seed + 5)
    batch = prompt_batch([rng.choice(held) for _ in range(n)], text, seed=seed + 5)
    return copy_leak(critic, gen, batch)


def main(argv=None) -> int:
    """python -m learning_lib.arms_repr ARM [--steps N --samples S --held N --seen N] (run from benchmarks/):
    the quick check of one arm on the tuning seed; writes results/learning-check-<arm>.json."""
    import argparse
    import json
    import shlex
    import subprocess
    import time
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("arm", choices=sorted(ARMS))
    ap.add_argument("--seed", type=int, default=100, help="the tuning seed (never 0-2)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--samples", type=int, default=3, help="samples per prompt")
    ap.add_argument("--held", type=int, default=96, help="held-out prompts")
    ap.add_argument("--seen", type=int, default=32, help="seen prompts")
    ap.add_argument("--prompt-dropout", type=float, default=None, help="representation: masked-prompt rate")
    ap.add_argument("--lr", type=float, default=None, help="UNO learning rate (default: Settings.lr)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    t0 = time.time()  # the commit is read at the start: the code that ran
    extra = {} if args.prompt_dropout is None else {"representation": {"prompt_dropout": args.prompt_dropout}}
    from . import arms_repr  # this module as the package imports it: the prepare hooks fill ITS `LAST`

    res = arms_repr.quick_check(
        args.arm,
        extra=extra,
        lr=args.lr,
        seed=args.seed,
        steps=args.steps,
        samples=args.samples,
        n_held=args.held,
        n_seen=args.seen,
    )
    res["wall_s"] = time.time() - t0
    res["env"] = {
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": "2-core CPU, 1 thread, shared with other sessions",
        "torch": torch.__version__,
        "command": "cd benchmarks && python -m learning_lib.arms_repr " + shlex.join(argv or []),
    }
    name = args.arm.replace(" ", "-") + (f"-{args.tag}" if args.tag else "")
    out = root / "benchmarks" / "results" / f"learning-check-{name}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
