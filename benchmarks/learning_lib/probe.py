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

from . import experiment, judge, training, world


def caption_nats(critic, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) summed caption CE (nats) of images (B, 3, 32, 32) in [-1, 1] under the critic, teacher-forced."""
    _, logits = training.critic_loss(critic, images, ids, mask)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return (ce * mask).sum(1)


def auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float | None:
    """P(pos < neg) + 0.5 P(pos == neg): how often a passing image has the lower CE. None if a side is empty."""
    if scores_pos.numel() == 0 or scores_neg.numel() == 0:
        return None
    lt = (scores_pos[:, None] < scores_neg[None, :]).double().mean()
    eq = (scores_pos[:, None] == scores_neg[None, :]).double().mean()
    return float(lt + 0.5 * eq)


def run_probes(
    critic_model,
    proc,
    unet,
    text,
    *,
    seed: int = 0,
    samples: int = 2,
    attack_prompts: int = 64,
    attack_steps: int = 100,
    attack_lr: float = 0.01,
    s: experiment.Settings | None = None,
    log=None,
) -> tuple[dict, dict]:
    """-> (results, figure data). `samples` images per held-out prompt for the reward probe; the attack runs on
    `attack_prompts` of them (a seeded sample) for `attack_steps` Adam steps of `attack_lr` on the pixels."""
    from uno_engine import Critic

    s = s or experiment.Settings()
    critic = Critic.from_hf(critic_model, proc, checkpoint="none")
    _, held = world.split_prompts()
    t0 = time.time()

    # 1. values: AUC of the caption CE for the judge's verdict
    prompts = held * samples
    images = experiment.generate(unet, text, prompts, seed=seed * 7 + 3, s=s)
    ids, mask = (torch.tensor(v) for v in zip(*(world.encode(p.caption) for p in prompts), strict=True))
    passed = torch.tensor(
        [bool(judge.check(p, judge.parse(im))["overall"]) for p, im in zip(prompts, images, strict=True)]
    )
    with torch.no_grad():
        nats = torch.cat(
            [
                caption_nats(critic, images[i : i + 256], ids[i : i + 256], mask[i : i + 256])
                for i in range(0, len(prompts), 256)
            ]
        )
    reward = {
        "images": len(prompts),
        "judge_pass_rate": float(passed.float().mean()),
        "auc": auc(nats[passed], nats[~passed]),
        "ce_nats_pass_mean": float(nats[passed].mean()) if passed.any() else None,
        "ce_nats_fail_mean": float(nats[~passed].mean()) if (~passed).any() else None,
    }
    if log is not None:
        log(f"probe: reward AUC {reward['auc']}, pass rate {reward['judge_pass_rate']:.3f}")

    # 2. derivatives: descend the caption CE in pixel space
    pick = random.Random(seed).sample(range(len(held)), min(attack_prompts, len(held)))
    ap = [prompts[i] for i in pick]
    x0, aids, amask = images[pick].clone(), ids[pick], mask[pick]
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=attack_lr)
    trace = []
    for step in range(attack_steps + 1):
        ce = caption_nats(critic, x.clamp(-1, 1), aids, amask)
        if step % max(1, attack_steps // 4) == 0 or step == attack_steps:
            with torch.no_grad():
                xs = x.detach().clamp(-1, 1)
                acc = judge.summarize([judge.check(p, judge.parse(im)) for p, im in zip(ap, xs, strict=True)])
            trace.append(
                {
                    "step": step,
                    "ce_nats_mean": float(ce.detach().mean()),
                    "judge_overall": acc["overall"],
                    "mean_abs_pixel_change": float((xs - x0).abs().mean()),
                }
            )
        if step == attack_steps:
            break
        ce.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            x.clamp_(-1, 1)
    attack = {"prompts": len(ap), "steps": attack_steps, "lr": attack_lr, "trace": trace}
    if log is not None:
        log(f"probe: attack {trace[0]} -> {trace[-1]}")
    res = {"reward": reward, "pixel_attack": attack, "seed": seed, "probe_s": time.time() - t0}
    fig = {"before": x0[:8], "after": x.detach()[:8], "captions": [p.caption for p in ap[:8]]}
    return res, fig


def save_figure(fig: dict, res: dict, path) -> None:
    """Attack before/after images (first 8 prompts) and the CE / judge trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(fig["captions"])
    f = plt.figure(figsize=(2 * n, 5.6))
    gs = f.add_gridspec(3, n, height_ratios=[1, 1, 1.3])
    for i in range(n):
        for r, key in enumerate(("before", "after")):
            ax = f.add_subplot(gs[r, i])
            ax.imshow(((fig[key][i].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel("generated" if key == "before" else "after pixel\ndescent on CE", fontsize=8)
            if r == 0:
                ax.set_title(fig["captions"][i], fontsize=6)
    tr = res["pixel_attack"]["trace"]
    ax = f.add_subplot(gs[2, : n // 2])
    ax.plot([t["step"] for t in tr], [t["ce_nats_mean"] for t in tr], "o-", color="tab:purple")
    ax.set_yscale("log")
    ax.set_xlabel("pixel descent step")
    ax.set_ylabel("critic caption CE (nats)")
    ax2 = f.add_subplot(gs[2, n // 2 :])
    ax2.plot([t["step"] for t in tr], [100 * t["judge_overall"] for t in tr], "o-", color="tab:green")
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("pixel descent step")
    ax2.set_ylabel("judge accuracy, %")
    r = res["reward"]
    f.suptitle(
        f"critic as reward: AUC {r['auc']:.3f} for the judge's verdict ({r['images']} held-out generations); "
        "critic as gradient: CE falls, the judge does not move",
        fontsize=9,
    )
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)
