"""The value path's arm of the learning benchmark: `uno_engine.reward.ValueStep` (the critic as a reward).

Each optimizer step sums two ValueSteps that share the generator, as experiment.run_uno sums two UNOSteps:
- held-out stream: held-out prompts only; G samples per prompt drawn without grad (DDIM with the evaluation's
  guidance), rewarded by the critic's caption log-probability against the prompt's hard negatives, trained by
  the group-relative objective on the samples (`RewardObjective`);
- seen stream: the same on seen prompts, plus the generator's own denoising loss on fresh real renders (the
  real-data anchor, `generator_loss`).
No gradient goes through the critic, the sampler or the decoder; no real image of a held-out composition is used.

`quick_check(...)` (the command line below) runs one arm on one seed and judges the same prompts with the same
noise before and after (paired), with the standard error of the paired difference:

    cd benchmarks && python -m learning_lib.value --seed 100 --samples 2 --work /tmp/value   # the tuning seed only
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch

from . import experiment, judge, world

# the arm's default settings (RewardObjective's arguments), overridable per ablation ("value" in its spec)
DEFAULTS = {"kind": "nft", "group_size": 4, "beta": 1.0, "clip": 2.0, "reward": "log", "generator_loss": 1.0}
# the arm's run, chosen on the tuning seed 100 (docs/reward.md): prompts per stream, steps, Adam's lr; Settings.extra
# "value_batch", "value_steps", "value_lr" override them
RUN = {"batch": 4, "steps": 60, "lr": 3e-5}


def run_value(
    base_unet, text, critic, name: str, *, seed: int, s, bar=None, log=None, resume: Path | None = None
) -> tuple:
    """-> (trained unet, metrics history): experiment.run_uno's contract, for a spec with "runner": "value".
    `resume`: a file the run saves itself to every 5 steps (weights, optimizer, random states, history) and
    continues from when it exists, so a run can be spread over several processes on a loaded machine."""
    from uno_engine import UNOConfig
    from uno_engine.reward import RewardObjective, ValueStep

    spec = experiment.ABLATIONS[name]
    opts = {**DEFAULTS, **spec.get("value", {}), **(s.extra.get("value") or {})}
    torch.manual_seed(seed)
    unet = copy.deepcopy(base_unet).train()
    unet.requires_grad_(True)
    from . import models

    gen = models.make_generator(unet, steps=s.sample_steps, guidance=s.guidance)
    cfg = UNOConfig(**spec.get("config", {}))
    step_held = ValueStep(gen, critic, RewardObjective(**{**opts, "generator_loss": 0.0}), cfg)
    step_seen = ValueStep(gen, critic, RewardObjective(**opts), cfg)
    if s.extra.get("value_control") == "shuffled":  # the control: each sample gets another sample's reward
        step_held.reward = ShuffledReward(step_held.reward, seed)
        step_seen.reward = ShuffledReward(step_seen.reward, seed + 1)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.extra.get("value_lr", RUN["lr"]))
    k = spec.get("negatives", 4)
    rng = random.Random(seed)
    seen, held = world.split_prompts()
    steps = s.extra.get("value_steps", RUN["steps"])
    batch = s.extra.get("value_batch", RUN["batch"])
    history, start = [], 0
    shuffles = [st.reward for st in (step_held, step_seen) if isinstance(st.reward, ShuffledReward)]
    if resume is not None and Path(resume).exists():
        ck = torch.load(resume, weights_only=False)
        unet.load_state_dict(ck["unet"])
        opt.load_state_dict(ck["opt"])
        rng.setstate(ck["rng"])
        torch.set_rng_state(ck["torch"])
        for sh, st in zip(shuffles, ck["shuffles"], strict=True):
            sh.g.set_state(st)
        history, start = ck["history"], ck["step"]
    it = range(start, steps) if bar is None else bar(range(start, steps), f"value {name} seed {seed}")
    for i in it:
        bh = [rng.choice(held) for _ in range(batch)]
        bs = [rng.choice(seen) for _ in range(batch)]
        batch_h = experiment.prompt_batch(bh, text, seed=rng.randrange(2**31))
        batch_s = experiment.prompt_batch(bs, text, seed=rng.randrange(2**31), rng=rng, references=True)
        batch_h["negative_captions"], batch_h["negative_caption_mask"] = experiment.negative_captions(
            bh, k, seed
        )
        batch_s["negative_captions"], batch_s["negative_caption_mask"] = experiment.negative_captions(
            bs, k, seed
        )
        out_h, out_s = step_held(batch_h), step_seen(batch_s)
        loss = 0.5 * (out_h.loss + out_s.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": i, "loss": float(loss.detach())}
        rec.update({f"held_{n}": float(v) for n, v in out_h.metrics.items()})
        rec.update({f"seen_{n}": float(v) for n, v in out_s.metrics.items()})
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"value {name} seed {seed}: loss is {rec['loss']} at step {i}")
        history.append(rec)
        if resume is not None and ((i + 1) % 5 == 0 or i + 1 == steps):
            state = {"unet": unet.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate()}
            state.update(torch=torch.get_rng_state(), shuffles=[sh.g.get_state() for sh in shuffles])
            torch.save({**state, "history": history, "step": i + 1}, resume)
        if log is not None and (i % 10 == 0 or i == steps - 1):
            log(
                f"value {name} seed {seed} step {i} loss {rec['loss']:.4f} held reward {rec['held_reward']:.3f} "
                f"(ranked first {rec['held_ranked_first']:.2f}) seen reward {rec['seen_reward']:.3f}"
            )
    unet.eval().requires_grad_(False)
    return unet, history


class ShuffledReward:
    """The control arm's reward: the critic's rewards of the batch, randomly permuted across all its samples, so
    the advantages carry no information about the sample they weight (the metrics' means are unchanged)."""

    def __init__(self, inner, seed: int):
        self.inner, self.g = inner, torch.Generator().manual_seed(seed)

    def __call__(self, generation, batch):
        from uno_engine.reward import Reward

        r = self.inner(generation, batch)
        perm = torch.randperm(r.log_prob.shape[0], generator=self.g).to(r.log_prob.device)
        return Reward(r.log_prob[perm], r.prob[perm], r.scores[perm], r.ranked_first[perm])


# ------------------------------------------------------------------------------------- the quick check
def judged(unet, text, prompts, *, seed: int, s) -> list[bool]:
    """Per prompt: the judge's overall verdict on one sample (seeded: the same noise for any unet)."""
    images = experiment.generate(unet, text, prompts, seed=seed, s=s)
    return [bool(judge.check(p, judge.parse(im))["overall"]) for p, im in zip(prompts, images, strict=True)]


def paired(before: list[bool], after: list[bool]) -> dict:
    """Accuracies, their difference, and the standard error of the paired difference (points)."""
    n = len(before)
    d = [float(a) - float(b) for a, b in zip(after, before, strict=True)]
    m = sum(d) / n
    se = (sum((x - m) ** 2 for x in d) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return {
        "n": n,
        "before": 100 * sum(before) / n,
        "after": 100 * sum(after) / n,
        "gain_points": 100 * m,
        "gain_se_points": 100 * se,
    }


def quick_check(
    seed: int,
    steps: int,
    samples: int,
    name: str,
    batch: int = RUN["batch"],
    seen_samples: int = 1,
    *,
    work: Path | None = None,
    stop_after: str | None = None,
    log=print,
    **extra,
) -> dict | None:
    """Judge before, train, judge after (paired). With `work` (a folder), each phase's result is kept there and
    re-used by the next call with the same settings, so the three phases can run as separate processes on a
    loaded machine (`stop_after`: "before" | "train" ends the call after that phase, returning None)."""

    from . import training

    torch.set_num_threads(1)
    critic_model, proc = training.load_critic(training.CACHE / "critic.safetensors")
    unet, text = training.load_generator(training.CACHE / "generator.safetensors")
    s = experiment.Settings(
        seeds=(seed,), extra={"value_steps": steps, "value_batch": batch, "value_lr": RUN["lr"], **extra}
    )
    reps = {"held_out": samples, "seen": seen_samples}
    seen, held = world.split_prompts()
    t0 = time.time()
    tag = f"s{seed}-h{samples}-n{seen_samples}"
    key = f"{tag}-{name}-t{steps}-b{batch}-" + "-".join(f"{k}{v}" for k, v in sorted(extra.items()))
    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    cached = _Cache(work)

    def verdicts(model, label):
        return {
            split: judged(model, text, prompts * reps[split], seed=seed * 7 + (split == "seen"), s=s)
            for split, prompts in (("held_out", held), ("seen", seen))
        }

    before = cached.get(f"before-{tag}.json", lambda: verdicts(unet, "before"))
    log(f"before judged ({time.time() - t0:.0f}s)")
    if stop_after == "before":
        return None
    resume = None if work is None else Path(work) / f"progress-{key}.pt"
    state = cached.get(
        f"trained-{key}.pt", lambda: _train(unet, text, critic_model, proc, name, seed, s, log, resume)
    )
    if stop_after == "train":
        return None
    trained = copy.deepcopy(unet)
    trained.load_state_dict(state["unet"])
    trained.eval().requires_grad_(False)
    after = verdicts(trained, "after")
    res = {split: paired(before[split], after[split]) for split in before}
    res["denoising_loss"] = {
        "before": experiment.denoising_loss(unet, text, seed=seed, n=s.denoise_images),
        "after": experiment.denoising_loss(trained, text, seed=seed, n=s.denoise_images),
    }
    hist = state["history"]
    first, last = hist[: max(1, steps // 5)], hist[-max(1, steps // 5) :]
    for k in ("held_reward", "held_ranked_first", "seen_reward", "seen_ranked_first"):
        res[k] = {"first": sum(h[k] for h in first) / len(first), "last": sum(h[k] for h in last) / len(last)}
    res["train_seconds"] = state["seconds"]
    res["settings"] = {
        "seed": seed, "steps": steps, "samples": reps, "batch": batch, "name": name, "lr": s.extra["value_lr"],
        **extra,
    }  # fmt: skip
    return res


def _train(unet, text, critic_model, proc, name, seed, s, log, resume=None) -> dict:
    from uno_engine import Critic

    t0 = time.time()
    critic = Critic.from_hf(critic_model, proc, checkpoint="none")
    trained, hist = run_value(unet, text, critic, name, seed=seed, s=s, log=log, resume=resume)
    return {"unet": trained.state_dict(), "history": hist, "seconds": time.time() - t0}


class _Cache:
    """A phase's result in a folder (JSON or torch.save), computed once; no folder: always computed."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def get(self, name: str, make):
        if self.folder is None:
            return make()
        path = Path(self.folder) / name
        if path.exists():
            return json.loads(path.read_text()) if name.endswith(".json") else torch.load(path, weights_only=False)
        value = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".json"):
            path.write_text(json.dumps(value))
        else:
            torch.save(value, path)
        return value


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=100, help="the tuning seed (never 0-2 here)")
    ap.add_argument("--steps", type=int, default=RUN["steps"])
    ap.add_argument(
        "--samples", type=int, default=1, help="samples per held-out prompt in the judged evaluation"
    )
    ap.add_argument(
        "--seen-samples", type=int, default=1, help="samples per seen prompt in the judged evaluation"
    )
    ap.add_argument(
        "--batch", type=int, default=RUN["batch"], help="prompts per stream per step (each sampled G times)"
    )
    ap.add_argument("--name", default="value (group reward)")
    ap.add_argument(
        "--lr", type=float, default=None, help="the value arm's learning rate (default RUN['lr'])"
    )
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("--work", type=Path, default=None, help="keep each phase's result here (resumable)")
    ap.add_argument("--stop-after", choices=("before", "train"), default=None)
    ap.add_argument("--control", choices=("shuffled",), default=None, help="rewards permuted across samples")
    ap.add_argument("--kind", choices=("nft", "advantage"), default=None, help="RewardObjective kind")
    ap.add_argument("--kl", type=float, default=None, help="RewardObjective kl")
    ap.add_argument("--beta", type=float, default=None, help="RewardObjective beta")
    a = ap.parse_args()
    extra = {} if a.lr is None else {"value_lr": a.lr}
    if a.control:
        extra["value_control"] = a.control
    objective = {k: v for k, v in (("kind", a.kind), ("kl", a.kl), ("beta", a.beta)) if v is not None}
    if objective:
        extra["value"] = objective
    r = quick_check(
        a.seed,
        a.steps,
        a.samples,
        a.name,
        a.batch,
        a.seen_samples,
        work=a.work,
        stop_after=a.stop_after,
        **extra,
    )
    print(json.dumps(r, indent=2))
    if a.out and r is not None:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
