"""Why UNO's caption gradient does (or does not) teach this generator: two probes of the critic as a teacher.

1. **The critic as a reward (its values).** Sample the pretrained generator on every held-out prompt, judge each
   image, and score it with the critic's summed caption CE (nats per caption, lower is better). The AUC is
   P(CE of a judge-passing image < CE of a judge-failing one): 0.5 is no information, 1.0 a perfect ranking.
   A high AUC says the critic *knows* which generations are right.
2. **The critic as a gradient (its derivatives).** Take the same generations and descend the caption CE in
   pixel space directly (Adam on the pixels, clamped to [-1, 1]; no generator in the way): the most freedom any
   generator could give the caption gradient. If the CE falls to ~0 while the judge's accuracy does not move,
   the gradient is not perceptually aligned: it is satisfied by changes a rule-based reader of objects does not
   see (here: faint textures on the patch grid, below the judge's foreground threshold). A generator trained
   through that gradient is pushed toward the same changes, which is what UNO's caption term then teaches.

`run_probes` returns both as a dict and the before/after pixels of the attack for a figure.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from . import experiment, judge, stats, training, world


def caption_nats(
    critic, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, *, read=None, step: int = 0
) -> torch.Tensor:
    """(B,) summed caption CE (nats) of images (B, 3, 32, 32) in [-1, 1] under the critic, teacher-forced.
    `read`: a `uno_engine.ReadAugment` (the library's reading): the critic reads each image's K views drawn at
    `step` (ReadAugment.draw) and the CE is the mean over them; None: the plain read."""
    if read is None:
        _, logits = training.critic_loss(critic, images, ids, mask)
    else:
        from uno_engine.read import per_view

        views = read.draw(images.shape[0], images.shape[2], images.shape[3], step=step)
        inputs = critic.prepare(images, backend="torch", views=views)
        ids, mask = per_view(read.views, ids, mask)
        logits = critic(inputs, ids, mask).logits()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    nats = (ce * mask).sum(1)
    return nats if read is None else nats.view(-1, read.views).mean(1)


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] translated by (dy, dx) whole pixels; background (-1) comes in."""
    H, W = images.shape[-2:]
    out = torch.full_like(images, -1.0)
    out[..., max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = images[
        ..., max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)
    ]
    return out


ONE_PIXEL = ((0, 1), (0, -1), (1, 0), (-1, 0))


@torch.no_grad()
def hack_gap(critic, images, ids, mask) -> dict:
    """The plain-read caption CE of `images` unshifted and averaged over the four one-pixel shifts, and their
    ratio (the hack gap: how much of a low CE lives in the phase of the critic's patch grid)."""
    plain = caption_nats(critic, images, ids, mask).mean()
    shift = torch.stack([caption_nats(critic, shifted(images, *d), ids, mask).mean() for d in ONE_PIXEL]).mean()
    return {"ce_unshifted": float(plain), "ce_one_pixel_shift": float(shift), "hack_gap": float(shift / plain)}


def auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float | None:
    """P(pos < neg) + 0.5 P(pos == neg): how often a passing image has the lower CE. None if a side is empty."""
    if scores_pos.numel() == 0 or scores_neg.numel() == 0:
        return None
    lt = (scores_pos[:, None] < scores_neg[None, :]).double().mean()
    eq = (scores_pos[:, None] == scores_neg[None, :]).double().mean()
    return float(lt + 0.5 * eq)


READINGS = ("plain", "augmented", "noise-aware")


def readings(views: int = 8, names=None) -> dict:
    """The readings the probe compares (experiment.reading): `names` of READINGS (None: all of them)."""
    return {name: experiment.reading(name, views=views) for name in (READINGS if names is None else names)}


def _judge(prompts, images) -> list[int]:
    return [int(bool(judge.check(p, judge.parse(im))["overall"])) for p, im in zip(prompts, images, strict=True)]


def descend(critic, x0, ids, mask, prompts, *, read, steps: int, lr: float, log=None, tag=""):
    """Pixel descent (Adam on the pixels, clamped to [-1, 1]) of the caption CE read through `read` ->
    (descended images, record): the CE trace (through the reading and plain), the hack gap of the descended
    images, and the judge before / after (per-prompt passes, accuracy with SE, paired difference with SE)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    trace = []
    for step in range(steps + 1):
        ce = caption_nats(critic, x.clamp(-1, 1), ids, mask, read=read, step=step)
        if step % max(1, steps // 4) == 0 or step == steps:
            with torch.no_grad():
                xs = x.detach().clamp(-1, 1)
                plain = ce if read is None else caption_nats(critic, xs, ids, mask)
                trace.append(
                    {
                        "step": step,
                        "ce_nats_read": float(ce.detach().mean()),
                        "ce_nats_plain": float(plain.mean()),
                        "judge_overall": sum(_judge(prompts, xs)) / len(prompts),
                        "mean_abs_pixel_change": float((xs - x0).abs().mean()),
                    }
                )
            if log is not None:
                log(f"probe {tag} step {step}: {trace[-1]}")
        if step == steps:
            break
        ce.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            x.clamp_(-1, 1)
    xs = x.detach().clamp(-1, 1)
    k0, k1 = _judge(prompts, x0), _judge(prompts, xs)
    rec = {
        "trace": trace,
        "ce_after_read": trace[-1]["ce_nats_read"],
        **hack_gap(critic, xs, ids, mask),
        "hack_gap_before_descent": hack_gap(critic, x0, ids, mask)["hack_gap"],
        "judge_before": stats.accuracy(k0, 1),
        "judge_after": stats.accuracy(k1, 1),
        "judge_change": stats.paired(k1, k0, 1),
        "per_prompt_pass_before": k0,
        "per_prompt_pass_after": k1,
    }
    return xs, rec


def run_probes(
    critics: dict,
    unet,
    text,
    *,
    reads: dict | None = None,
    seed: int = 0,
    samples: int = 2,
    attack_prompts: int | None = None,
    attack_steps: int = 100,
    attack_lr: float = 0.01,
    s: experiment.Settings | None = None,
    log=None,
) -> tuple[dict, dict]:
    """critics: name -> (hf model, processor). -> (results, figure data).

    1. For each critic, the reward probe: `samples` images per held-out prompt, the AUC of its caption CE
       for the judge's verdict.
    2. For each reading (`reads`, default `readings()`) x critic: pixel descent (`descend`) on the first
       sample of `attack_prompts` held-out prompts (a seeded sample; None: all 162), `attack_steps` Adam steps
       of `attack_lr`."""
    from uno_engine import Critic

    s = s or experiment.Settings()
    reads = readings() if reads is None else reads
    _, held = world.split_prompts()
    t0 = time.time()
    prompts = held * samples
    images = experiment.generate(unet, text, prompts, seed=seed * 7 + 3, s=s)
    ids, mask = (torch.tensor(v) for v in zip(*(world.encode(p.caption) for p in prompts), strict=True))
    passed = torch.tensor(_judge(prompts, images), dtype=torch.bool)
    n = len(held) if attack_prompts is None else min(attack_prompts, len(held))
    pick = sorted(random.Random(seed).sample(range(len(held)), n))
    ap = [prompts[i] for i in pick]
    x0, aids, amask = images[pick].clamp(-1, 1), ids[pick], mask[pick]
    res = {"reward": {}, "descent": {}, "seed": seed}
    res["readings"] = {k: (None if v is None else repr(v)) for k, v in reads.items()}
    res["attack"] = {"prompts": n, "steps": attack_steps, "lr": attack_lr}
    fig = {"generated": x0[:8], "captions": [p.caption for p in ap[:8]], "rows": {}}
    for cname, (model, proc) in critics.items():
        critic = Critic.from_hf(model, proc, checkpoint="none")
        with torch.no_grad():
            nats = torch.cat(
                [caption_nats(critic, images[i : i + 256], ids[i : i + 256], mask[i : i + 256]) for i in range(0, len(prompts), 256)]
            )
        res["reward"][cname] = {
            "images": len(prompts),
            "judge_pass_rate": float(passed.float().mean()),
            "auc": auc(nats[passed], nats[~passed]),
            "ce_nats_pass_mean": float(nats[passed].mean()) if passed.any() else None,
            "ce_nats_fail_mean": float(nats[~passed].mean()) if (~passed).any() else None,
        }
        for rname, read in reads.items():
            xs, rec = descend(
                critic, x0, aids, amask, ap, read=read, steps=attack_steps, lr=attack_lr, log=log, tag=f"{rname}/{cname}"
            )
            res["descent"].setdefault(rname, {})[cname] = rec
            fig["rows"][f"{rname} / {cname}"] = (xs[:8], rec)
    res["probe_s"] = time.time() - t0
    return res, fig


def save_figure(fig: dict, res: dict, path) -> None:
    """The generated images (first 8 attacked prompts) and, per (reading, critic), the same images after pixel
    descent through that reading, titled with the CE after descent, the hack gap and the judge change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("generated", fig["generated"], None)] + [(k, x, r) for k, (x, r) in fig["rows"].items()]
    n = len(fig["captions"])
    f, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.75 * len(rows)), squeeze=False)
    for r, (name, ims, rec) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(((ims[i].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(fig["captions"][i], fontsize=6)
        label = name if rec is None else (
            f"{name}\nCE {rec['ce_unshifted']:.2f}, gap {rec['hack_gap']:.1f}x\njudge "
            f"{100 * rec['judge_before']['mean']:.1f}->{100 * rec['judge_after']['mean']:.1f}%"
        )
        axes[r][0].set_ylabel(label, fontsize=6)
    a = res["attack"]
    f.suptitle(
        f"pixel descent of the caption CE through each reading ({a['steps']} Adam steps, lr {a['lr']}, "
        f"{a['prompts']} held-out generations; CE and hack gap read plainly)",
        fontsize=8,
    )
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)
