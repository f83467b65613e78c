"""Evidence that understanding supervision teaches: a miniature GenEval on a CPU.

A synthetic world of colored shapes (benchmarks/learning_lib/world.py), a LLaVA-shaped critic trained to
caption every composition, a pixel-space diffusers UNet pretrained on the seen compositions only, a rule-based
judge, and UNO post-training (UNOStep) on held-out and seen prompts; judged before and after, over 3 seeds,
with ablations of the loss terms.

    python benchmarks/learning.py                 # cached models; the headline arm and the control, 3 seeds
    python benchmarks/learning.py --from-scratch  # retrain the critic and the generator first (rewrites cache)
    python benchmarks/learning.py --base strong   # the stronger base (seen 64%) and its headline (480 steps)
    python benchmarks/learning.py --plot-bases A.json B.json   # two bases' gains side by side
    python benchmarks/learning.py --seed 5        # seeds 5, 6, 7 for every draw of post-training and eval
    python benchmarks/learning.py --smoke         # CI version (< 60 s): untrained tiny run of the wiring
    python benchmarks/learning.py --ablations caption "caption+joint+kl"   # other arms ('all': every arm)
    python benchmarks/learning.py --probe         # the critic as a reward (AUC) and as a gradient (pixel descent)

Writes learning-<tag>.json and learning-<tag>.png (tag: "cpu", or "smoke") to benchmarks/runs/ (ignored by git),
or --out DIR, or with --record to benchmarks/results/ (the committed figures: how they are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import torch  # noqa: E402
from learning_lib import experiment, judge, models, probe, training, world  # noqa: E402

TARGETS = {
    "held_out_gain_points": 15.0,
    "seen_drop_points": 3.0,
    "denoise_rise_frac": 0.10,
    "vs_control_points": 10.0,
}
CONTROL = "control (generator loss only)"
NOTES = {
    "premise": "the critic is trained to caption EVERY composition, held-out ones included (understanding "
    "covers more than generation); the generator is pretrained on seen compositions only",
    "text_encoder": "a learned word + position embedding table (LayerNorm; the strong base adds two transformer "
    "layers), trained with the generator in pretraining, frozen in UNO",
    "uno_data": "held-out stream: prompts only (caption loss); seen stream: prompts + fresh real renders of "
    "seen prompts (regression targets, joint generator loss). No real image of a held-out composition "
    "reaches the generator",
    "overall": "fraction of prompts whose every check passes (GenEval-style), judged by the rule-based judge",
}


def commit_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=10
            ).stdout
        except Exception:  # noqa: BLE001
            return ""

    sha = git("rev-parse", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": sha, "dirty": bool(dirty), "dirty_files": dirty}


def headline(res: dict, main: str) -> tuple[dict, dict, dict]:
    """-> (before, after, targets): top-level summaries of the main ablation (held-out "overall" in [0, 1]),
    each figure with its standard error ("*_se", learning_lib.stats; the gains are paired differences)."""

    def block(mean: dict, acc: dict | None) -> dict:
        h = mean["held_out"]
        out = {"overall": h["overall"], "overall_std": h.get("overall_std")}
        out["overall_se"] = acc["held_out"]["se"] if acc else None
        out.update({c: h[c] for c in judge.CATEGORIES})
        out["held_out_by_kind"] = mean.get("held_out_by_kind")
        out["seen"] = {"overall": mean["seen"]["overall"], "overall_std": mean["seen"].get("overall_std")}
        out["seen"]["overall_se"] = acc["seen"]["se"] if acc else None
        out["seen"].update({c: mean["seen"][c] for c in judge.CATEGORIES})
        out["denoising_loss"] = mean["denoising_loss"]
        out["denoising_loss_std"] = mean.get("denoising_loss_std")
        return out

    before = block(res["before_mean"], res.get("before_accuracy"))
    ab = res["ablations"].get(main, {})
    if ab.get("status") != "ran":
        return before, {"status": ab.get("status", "not run")}, {}
    after = block(ab["mean"], ab.get("accuracy"))
    after["ablation"] = main
    paired = ab.get("paired")
    gain = 100 * (after["overall"] - before["overall"])
    drop = 100 * (before["seen"]["overall"] - after["seen"]["overall"])
    rise = after["denoising_loss"] / before["denoising_loss"] - 1
    targets = {
        "held_out_gain_points": gain,
        "held_out_gain_se": 100 * paired["held_out"]["se"] if paired else None,
        "held_out_gain_ok": gain >= TARGETS["held_out_gain_points"],
        "seen_drop_points": drop,
        "seen_drop_se": 100 * paired["seen"]["se"] if paired else None,
        "seen_drop_ok": drop <= TARGETS["seen_drop_points"],
        "denoise_rise_frac": rise,
        "denoise_rise_ok": rise <= TARGETS["denoise_rise_frac"],
        "required": TARGETS,
    }
    ctrl = res["ablations"].get(CONTROL, {})
    if ctrl.get("status") == "ran" and main != CONTROL:
        vs = experiment.power(ab["per_seed"], ctrl["per_seed"])["paired"]["held_out"]
        targets["vs_control_points"] = 100 * vs["mean"]
        targets["vs_control_se"] = 100 * vs["se"] if vs["se"] is not None else None
        targets["vs_control_ok"] = targets["vs_control_points"] >= TARGETS["vs_control_points"]
    return before, after, targets


def _pm(x, se, scale=100.0) -> str:
    if x is None:
        return "-"
    return f"{scale * x:6.1f} +- {scale * se:4.1f}" if se is not None else f"{scale * x:6.1f}"


def table(res: dict) -> str:
    """The printed table: judge accuracy (% of prompts, mean of seeds +- SE) before and per ablation, the
    paired gains (points +- SE) with the seed-to-seed sd of the held-out gain, and the denoising loss with its
    change over the pretrained generator's on the same seeds."""
    rows = [
        "| arm | seeds | held-out % | held-out gain (pts) | gain seed sd | seen % | seen change (pts) | "
        "denoise loss (change) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    b = res.get("before_accuracy") or {}
    if b:
        rows.append(
            f"| pretrained | {_seeds(res['settings']['seeds'])} | {_pm(b['held_out']['mean'], b['held_out']['se'])} "
            f"| | | {_pm(b['seen']['mean'], b['seen']['se'])} | | {res['before_mean']['denoising_loss']:.4f} |"
        )
    before = dict(zip(res["settings"]["seeds"], res.get("before_per_seed") or [], strict=False))
    for name, ab in res["ablations"].items():
        if ab.get("status") != "ran" or "accuracy" not in ab:
            rows.append(f"| {name} | | {ab.get('status', 'not run')} | | | | | |")
            continue
        a, d = ab["accuracy"], ab["paired"]
        sd = d["held_out"].get("seed_sd")
        dl = ab["mean"]["denoising_loss"]
        bl = [before[sd_]["denoising_loss"] for sd_ in ab["seeds"] if sd_ in before]
        rise = f" ({100 * (dl / (sum(bl) / len(bl)) - 1):+.1f}%)" if len(bl) == len(ab["seeds"]) else ""
        rows.append(
            f"| {name} | {_seeds(ab['seeds'])} | {_pm(a['held_out']['mean'], a['held_out']['se'])} | "
            f"{_pm(d['held_out']['mean'], d['held_out']['se'])} | {'-' if sd is None else f'{100 * sd:.1f}'} | "
            f"{_pm(a['seen']['mean'], a['seen']['se'])} | {_pm(d['seen']['mean'], d['seen']['se'])} | "
            f"{dl:.4f}{rise} |"
        )
    return "\n".join(rows)


def _seeds(seeds: list[int]) -> str:
    return (
        f"{seeds[0]}-{seeds[-1]}"
        if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1))
        else ",".join(map(str, seeds))
    )


def save_grid(grid, captions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(captions), 3.2))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([34 * i + 17 for i in range(len(captions))], captions, rotation=35, ha="right", fontsize=7)
    ax.set_yticks([17, 51], ["pretrained", "after UNO"], fontsize=8)
    ax.set_title("held-out prompts, same noise (seed 0 of the main ablation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(res: dict, path: Path, samples=None) -> None:
    """Left: judge accuracy (% of prompts) before and per arm, held-out and seen, +- SE (learning_lib.stats).
    Right: the paired gains over the pretrained generator (points, +- SE), with the number of seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if samples is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 5.5))
    ran = [n for n, a in res["ablations"].items() if a.get("status") == "ran" and "accuracy" in a]
    accs = [res.get("before_accuracy")] + [res["ablations"][n]["accuracy"] for n in ran]
    names = ["pretrained"] + [f"{n} ({len(res['ablations'][n]['seeds'])}s)" for n in ran]
    x = range(len(names))
    for off, split, color in ((-0.2, "held_out", "tab:red"), (0.2, "seen", "tab:blue")):
        m = [100 * a[split]["mean"] if a else 0 for a in accs]
        e = [100 * (a[split]["se"] or 0) if a else 0 for a in accs]
        axes[0].bar(
            [i + off for i in x], m, 0.4, yerr=e, capsize=3, color=color, label=split.replace("_", "-")
        )
    axes[0].set_xticks(list(x), names, rotation=35, ha="right", fontsize=7)
    axes[0].set_ylabel("judge accuracy, % of prompts (mean of seeds +- SE)")
    axes[0].set_title("before / after, by arm")
    axes[0].legend()
    for off, split, color in ((-0.2, "held_out", "tab:red"), (0.2, "seen", "tab:blue")):
        d = [res["ablations"][n]["paired"][split] for n in ran]
        axes[1].bar(
            [i + off for i in range(len(ran))],
            [100 * v["mean"] for v in d],
            0.4,
            yerr=[100 * (v["se"] or 0) for v in d],
            capsize=3,
            color=color,
            label=split.replace("_", "-"),
        )
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(ran)), names[1:], rotation=35, ha="right", fontsize=7)
    axes[1].set_ylabel("paired change over the pretrained generator, points (+- SE)")
    axes[1].set_title("gain by arm (same prompts, same noise)")
    axes[1].legend()
    missing = [n for n, a in res["ablations"].items() if a.get("status") != "ran"]
    if missing:
        axes[1].text(
            0.01, 0.98, "not run: " + "; ".join(missing), transform=axes[1].transAxes, fontsize=6, va="top"
        )
    if samples is not None:
        axes[2].imshow(samples)
        axes[2].set_title("held-out prompts: pretrained (top) / after UNO (bottom)", fontsize=9)
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bases(files: list[Path], path: Path) -> list[str]:
    """The held-out and seen gains (paired, points +- SE) of the arms that ran in every file of `files`
    (learning-*.json of different bases or settings), side by side per arm: the figure that compares the
    bases. Each file's label: its base and UNO steps. -> the arms drawn. SystemExit naming --plot-bases
    when the files share no arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(f.read_text()) for f in files]
    ran = [{n for n, a in r["ablations"].items() if a.get("status") == "ran" and "paired" in a} for r in runs]
    arms = [n for n in runs[0]["ablations"] if all(n in r for r in ran)]
    if not arms:
        raise SystemExit(f"--plot-bases: {[f.name for f in files]} have no arm in common")
    labels = [
        f"{r['settings'].get('base', 'old')} base, {r['settings']['uno_steps']} steps "
        f"(pretrained {100 * r['before']['overall']:.1f}% held-out, {100 * r['before']['seen']['overall']:.1f}% seen)"
        for r in runs
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(runs)
    for ax, split in zip(axes, ("held_out", "seen"), strict=True):
        for k, (r, label) in enumerate(zip(runs, labels, strict=True)):
            d = [r["ablations"][n]["paired"][split] for n in arms]
            ax.bar(
                [i - 0.4 + width * (k + 0.5) for i in range(len(arms))],
                [100 * v["mean"] for v in d],
                width,
                yerr=[100 * (v["se"] or 0) for v in d],
                capsize=3,
                label=label,
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("paired change over the pretrained generator, points (+- SE)", fontsize=8)
        ax.set_title(f"{split.replace('_', '-')} prompts")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return arms


def sample_grid(unet_before, unet_after, text, s, n: int = 8):
    """(2*34, n*34, 3) uint8: the first n held-out prompts, pretrained vs after UNO, same noise."""
    import numpy as np

    _, held = world.split_prompts()
    prompts = held[:: max(1, len(held) // n)][:n]
    rows = []
    for u in (unet_before, unet_after):
        ims = experiment.generate(u, text, prompts, seed=123, s=s).clamp(-1, 1)
        ims = ((ims + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        rows.append(
            np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=128) for im in ims], 1)
        )
    return np.concatenate(rows, 0), [p.caption for p in prompts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="first of the seeds (seed, seed+1, seed+2)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--from-scratch", action="store_true", help="retrain critic and generator, rewrite cache")
    ap.add_argument("--smoke", action="store_true", help="CI version: untrained models, a few steps (< 60 s)")
    ap.add_argument(
        "--ablations",
        nargs="*",
        default=None,
        help="arms to run (default: --main and the control; 'all'): " + str(list(experiment.ABLATIONS)),
    )
    ap.add_argument(
        "--main",
        default=None,
        help="ablation reported as top-level 'after' (default: the base's headline, experiment.BASE_HEADLINES)",
    )
    ap.add_argument("--uno-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument(
        "--weights",
        nargs="*",
        default=None,
        metavar="TERM=W",
        help="override a loss weight in every ablation that uses the term, e.g. kl=0.5 generator_loss=2",
    )
    ap.add_argument("--note", default=None, help="free text stored in settings.extra['note'] (e.g. tuning)")
    ap.add_argument("--critic-steps", type=int, default=5000)
    ap.add_argument(
        "--aug-critic-steps",
        type=int,
        default=1500,
        help="fine-tune steps of the augmentation-trained critic (cache critic-aug.safetensors; made when missing)",
    )
    ap.add_argument(
        "--base",
        choices=sorted(models.BASES),
        default="old",
        help="the pretrained generator: 'old' (generator.safetensors, every figure before 2026-12-07) or "
        "'strong' (the same UNet behind a 2-layer text encoder, trained 6500 steps: "
        "generator-strong.safetensors; seen 64%%); the critic is the same",
    )
    ap.add_argument(
        "--generator-steps", type=int, default=None, help="length of the lr schedule (default: the base's)"
    )
    ap.add_argument("--generator-stop", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("UNO_LEARNING_THREADS", "1")))
    ap.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes for the independent work (the two pretrainings; the (ablation, seed) UNO runs), each "
        "with --threads threads",
    )
    ap.add_argument("--cache", type=Path, default=training.CACHE)
    harness.add_output_args(ap, "--out", "--out-dir")
    ap.add_argument("--tag", default=None)
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="merge the ablations of these learning-*.json files (run with --ablations, other --tag) into "
        "learning-<tag>.json and redraw its plot; nothing is run",
    )
    ap.add_argument(
        "--plot-bases",
        nargs="+",
        type=Path,
        default=None,
        help="draw the gains of the arms these learning-*.json files share (e.g. the old and the strong base) "
        "side by side into learning-bases-<tag>.png; nothing is run",
    )
    ap.add_argument(
        "--probe",
        action="store_true",
        help="instead of UNO: probe the cached critics as a reward (AUC for the judge's verdict) and as a "
        "gradient (pixel descent of the caption CE through each reading: the CE after, the hack gap, the judge "
        "before / after); writes learning-probe-<tag>.json/.png",
    )
    ap.add_argument(
        "--probe-critic", type=Path, default=None, help="--probe this critic (safetensors) instead"
    )
    ap.add_argument(
        "--probe-prompts", type=int, default=None, help="--probe: held-out prompts attacked (all)"
    )
    ap.add_argument("--probe-steps", type=int, default=100, help="--probe: pixel descent steps")
    ap.add_argument("--probe-views", type=int, default=8, help="--probe: views per image of the readings")
    ap.add_argument(
        "--probe-readings",
        default=None,
        help="--probe only these readings, comma-separated (plain, augmented, noise-aware; default all)",
    )
    ap.add_argument(
        "--probe-critics",
        default=None,
        help="--probe only these cached critics, comma-separated (old, aug; default all that exist)",
    )
    ap.add_argument(
        "--reuse-before",
        type=Path,
        default=None,
        help="take the pretrained generator's evaluations from this learning-*.json (same settings but the "
        "arms) instead of re-judging them: for arms run apart and folded in with --merge",
    )
    ap.add_argument(
        "--probe-robust-steps",
        type=int,
        default=0,
        help="--probe also a copy of the critic fine-tuned this many steps against PGD attacks and textures "
        "(training.robust_finetune_critic; 0: skip)",
    )
    args = ap.parse_args(argv)
    args.out = harness.output_dir(args)
    if args.probe_views < 1:
        ap.error(f"--probe-views must be >= 1, got {args.probe_views}")
    for flag, value, known in (
        ("--probe-readings", args.probe_readings, probe.READINGS),
        ("--probe-critics", args.probe_critics, tuple(training.CRITICS)),
    ):
        names = None if value is None else [v.strip() for v in value.split(",") if v.strip()]
        if names is not None and (not names or not set(names) <= set(known)):
            ap.error(f"{flag} must be a comma-separated subset of {', '.join(known)}, got {value!r}")
        setattr(args, flag[2:].replace("-", "_"), names)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.probe:
        return run_probe(args)
    if args.merge:
        return merge(args.out / f"learning-{args.tag or 'cpu'}.json", args.merge)
    if args.plot_bases:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"learning-bases-{args.tag or 'cpu'}.png"
        print(f"drew {plot_bases(args.plot_bases, path)} into {path}")
        return 0
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.time(), time.process_time()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    bar = harness.progress
    tag = args.tag or ("smoke" if args.smoke else "cpu")
    pretrain = {}

    head = experiment.BASE_HEADLINES[args.base]
    main_arm = args.main or head["main"]
    s = experiment.Settings(
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        ablations=(main_arm, CONTROL),
        main=main_arm,
        uno_steps=head["uno_steps"],
        threads=args.threads,
        base=args.base,
    )
    if args.generator_steps is None:
        args.generator_steps = models.base_arch(args.base)["steps"]
    if args.smoke:
        s.seeds, s.uno_steps, s.batch_held, s.batch_seen = (args.seed,), 2, 2, 2
        s.sample_steps, s.eval_held, s.eval_seen, s.denoise_images = 3, 6, 6, 8
        # the wiring of the committed ablations, the control and a reading arm with the augmentation-trained
        # critic (the value, representation and early-window arms have their own tests): < 60 s of CPU
        s.eval_samples, s.eval_samples_seen, s.ablations = 2, 2, experiment.SMOKE_ABLATIONS
        s.latent_fit_steps, s.latent_fit_images = 3, 16
        critic_model, proc = models.build_critic_model(0)
        unet, text = models.build_unet(0, args.base), models.build_text_encoder(args.base)
        unet.eval().requires_grad_(False)
        text.eval().requires_grad_(False)
        pretrain["note"] = "smoke: untrained models (wiring only)"
    else:
        crit_path, gen_path = (
            args.cache / "critic.safetensors",
            training.generator_path(args.cache, args.base),
        )
        gen_key = "generator" if args.base == "old" else f"generator_{args.base}"
        meta_path = args.cache / "meta.json"
        todo = {
            "critic": args.from_scratch or not crit_path.exists(),
            "generator": args.from_scratch or not gen_path.exists(),
        }
        if todo["critic"] and todo["generator"] and args.jobs > 1:
            # the two pretrainings are independent: one process each, side by side
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            log("pretraining the critic and the generator in two processes (progress: their logs)")
            with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
                fc = ex.submit(training.pretrain_critic_to, crit_path, args.critic_steps, args.threads)
                fg = ex.submit(
                    training.pretrain_generator_to,
                    gen_path,
                    args.generator_steps,
                    args.generator_stop,
                    args.threads,
                    base=args.base,
                )
                training.write_meta(meta_path, critic=fc.result(), **{gen_key: fg.result()})
        else:
            if todo["critic"]:
                st = training.pretrain_critic_to(crit_path, args.critic_steps, args.threads, log=log, bar=bar)
                training.write_meta(meta_path, critic=st)
            if todo["generator"]:
                st = training.pretrain_generator_to(
                    gen_path,
                    args.generator_steps,
                    args.generator_stop,
                    args.threads,
                    log=log,
                    bar=bar,
                    base=args.base,
                )
                training.write_meta(meta_path, **{gen_key: st})
        aug_path = training.CRITICS["aug"]
        if args.aug_critic_steps > 0 and (args.from_scratch or not aug_path.exists()):
            st = training.pretrain_aug_critic_to(
                aug_path, crit_path, args.aug_critic_steps, args.threads, log=log, bar=bar
            )
            training.write_meta(meta_path, critic_aug=st)
        critic_model, proc = training.load_critic(crit_path)
        unet, text = training.load_generator(gen_path)
        pretrain = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if args.ablations is not None:
        s.ablations = tuple(experiment.ABLATIONS) if args.ablations == ["all"] else tuple(args.ablations)
        unknown = [a for a in s.ablations if a not in experiment.ABLATIONS]
        if unknown:
            ap.error(f"--ablations: unknown {unknown}; known: {list(experiment.ABLATIONS)} or 'all'")
    if args.uno_steps is not None:
        s.uno_steps = args.uno_steps
    if args.lr is not None:
        s.lr = args.lr
    if args.weights:
        s.extra["weights"] = {k: float(v) for k, v in (w.split("=", 1) for w in args.weights)}
    if args.note:
        s.extra["note"] = args.note

    t_eval, cpu_eval = time.time(), time.process_time()
    critic_acc = training.critic_accuracy(critic_model, proc, n=64 if args.smoke else 1024)
    critic_acc_held = training.critic_accuracy(
        critic_model, proc, n=64 if args.smoke else 1024, held_out_only=True
    )
    judge_acc = judge.true_render_accuracy(n=50 if args.smoke else 1000, seed=777 + args.seed)
    log(
        f"critic token accuracy {critic_acc['token_accuracy']:.4f}; judge exact parse {judge_acc['exact_parse_accuracy']:.4f}"
    )

    cache = (
        None
        if args.smoke
        else (args.cache / "critic.safetensors", training.generator_path(args.cache, args.base))
    )
    before = None
    if args.reuse_before is not None:
        try:
            before = reused_before(args.reuse_before, s)
        except ValueError as e:
            ap.error(str(e))
    res = experiment.run_all(
        critic_model, proc, unet, text, s, bar=bar, log=log, jobs=args.jobs, cache=cache, before=before
    )
    trained = res.pop("_trained_main_seed0")
    before, after, targets = headline(res, s.main)
    out = {
        "notes": NOTES,
        "before": before,
        "after": after,
        "targets": targets,
        "critic": {
            "fresh_renders_all_prompts": critic_acc,
            "fresh_renders_held_out_prompts": critic_acc_held,
        },
        "judge_on_true_renders": judge_acc,
        "pretraining": pretrain,
        **res,
        "world": {
            "size": world.SIZE,
            "colors": world.COLORS,
            "shapes": world.SHAPES,
            "held_out": {k: sorted(map(list, v)) for k, v in world.HELD_OUT.items()},
            "n_seen_prompts": len(world.split_prompts()[0]),
            "n_held_out_prompts": len(world.split_prompts()[1]),
        },
        "machine": {
            **harness.env_metadata("cpu"),
            "load_average_at_end": os.getloadavg(),
            "note": "shared CPU (other sessions running); wall times are not idle-machine times",
        },
        **commit_info(),
        "wall_s": {"total": time.time() - t_start, "eval_and_uno": time.time() - t_eval},
        # CPU seconds of this process (1 thread): what the wall time would be on an idle machine, about
        "cpu_s": {"total": time.process_time() - cpu_start, "eval_and_uno": time.process_time() - cpu_eval},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    jpath = args.out / f"learning-{tag}.json"
    jpath.write_text(json.dumps(out, indent=2, default=str) + "\n")
    plot(res, args.out / f"learning-{tag}.png")
    if not args.smoke and trained is not None:
        grid, caps = sample_grid(unet, trained, text, s)
        save_grid(grid, caps, args.out / f"learning-{tag}-samples.png")
        out["sample_grid_prompts"] = caps
        jpath.write_text(json.dumps(out, indent=2, default=str) + "\n")
    log(f"wrote {jpath}")
    print(table(res))
    print(
        json.dumps(
            {"before": before.get("overall"), "after": after.get("overall"), "targets": targets}, default=str
        )
    )
    return 0


def reused_before(path: Path, s) -> list[dict]:
    """--reuse-before: the pretrained generator's evaluations of the seeds `s.seeds`, in that order, from the
    learning-*.json at `path` (run with the same settings but the arms and the seeds; each evaluation is
    taken by its seed, so --seed 1 --seeds 2 gets seeds 1 and 2 of a 0-2 run). ValueError naming
    --reuse-before on other settings or a seed the file did not judge."""
    other = json.loads(path.read_text())
    mine = {k: v for k, v in asdict(s).items() if k not in ("ablations", "seeds")}
    theirs = {
        "base": "old",
        **{k: v for k, v in other["settings"].items() if k not in ("ablations", "seeds")},
    }
    if json.loads(json.dumps(mine)) != theirs:
        raise ValueError(f"--reuse-before: {path} was run with other settings: {theirs} != {mine}")
    by_seed = dict(zip(other["settings"]["seeds"], other["before_per_seed"], strict=True))
    missing = [seed for seed in s.seeds if seed not in by_seed]
    if missing:
        raise ValueError(
            f"--reuse-before: {path} has no evaluation of seeds {missing} (it has {sorted(by_seed)})"
        )
    return [by_seed[seed] for seed in s.seeds]


def run_probe(args) -> int:
    """`--probe`: learning_lib.probe for each reading (plain, augmented, noise-aware: uno_engine.ReadAugment)
    x each critic (the cached "old" and "aug" critics, or --probe-critic; --probe-robust-steps adds a PGD
    fine-tune of the old one) on the cached base generator."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.probe_critic is not None:
        paths = {args.probe_critic.stem: args.probe_critic}
    else:
        paths = {k: v for k, v in training.CRITICS.items() if v.exists()}
        if args.probe_critics is not None:
            missing = [k for k in args.probe_critics if k not in paths]
            if missing:
                raise SystemExit(f"--probe-critics: no cached critic {missing} (train them first)")
            paths = {k: paths[k] for k in args.probe_critics}
    critics = {k: training.load_critic(v) for k, v in paths.items()}
    unet, text = training.load_generator(training.generator_path(args.cache, args.base))
    extra = {}
    if args.probe_robust_steps > 0:
        robust, st = training.robust_finetune_critic(*critics["old"], steps=args.probe_robust_steps, log=log)
        critics["robust"] = (robust, critics["old"][1])
        extra["robust_finetune"] = st
    res, fig = probe.run_probes(
        critics,
        unet,
        text,
        seed=args.seed,
        attack_prompts=args.probe_prompts,
        attack_steps=args.probe_steps,
        reads=probe.readings(args.probe_views, names=args.probe_readings),
        log=log,
    )
    res["critics"] = {
        k: {
            "file": str(v.relative_to(HERE.parent) if v.is_relative_to(HERE.parent) else v),
            "token_accuracy_clean": training.critic_accuracy(*critics[k], n=512)["token_accuracy"],
            "token_accuracy_augmented": training.critic_accuracy(*critics[k], n=512, augment=True)[
                "token_accuracy"
            ],
        }
        for k, v in paths.items()
    }
    res.update(extra, machine=harness.env_metadata("cpu"), wall_s=time.time() - t0, **commit_info())
    tag = "probe-" + (args.tag or "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"learning-{tag}.json"
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    probe.save_figure(fig, res, args.out / f"learning-{tag}.png")
    print(probe_table(res))
    log(f"wrote {path}")
    return 0


def probe_table(res: dict) -> str:
    """The printed probe table: per reading x critic, the CE after descent (through the reading, and plain),
    the hack gap, and the judge before -> after (%, +- SE) with the paired change."""
    rows = [
        "| reading | critic | reward AUC | CE after (read / plain, nats) | hack gap | judge before % | "
        "judge after % | change (pts) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rname, by_critic in res["descent"].items():
        for cname, r in by_critic.items():
            jb, ja, jc = r["judge_before"], r["judge_after"], r["judge_change"]
            rows.append(
                f"| {rname} | {cname} | {res['reward'][cname]['auc']:.3f} | {r['ce_after_read']:.3f} / "
                f"{r['ce_unshifted']:.3f} | {r['hack_gap']:.2f}x | {_pm(jb['mean'], jb['se'])} | "
                f"{_pm(ja['mean'], ja['se'])} | {_pm(jc['diff'], jc['se'])} |"
            )
    return "\n".join(rows)


def _arm_sources(res: dict, name: str, ab: dict, target: Path) -> dict:
    """{seed: (file, commit)} of an arm already in `res` (the file at `target`): from its "seed_sources", else
    from the run it was merged from ("merged_from"), else the target's own run."""
    if "seed_sources" in ab:
        return {int(k): (v["file"], v["commit"]) for k, v in ab["seed_sources"].items()}
    came = [m for m in res.get("merged_from", []) if name in m["arms"]]
    file, commit = (came[-1]["file"], came[-1]["commit"]) if came else (target.name, res.get("commit"))
    return {seed: (file, ab.get("commit", commit)) for seed in ab["seeds"]}


def merge(target: Path, others: list[Path]) -> int:
    """Fold other runs' arms into `target`, seed by seed. Every file must have the target's settings but the
    arms and the seeds, and judged the pretrained generator on seeds of the target's with the same figures.
    An arm's seeds from all the files (the target's included) are combined; a seed of an arm found in two
    files is an error naming both. Each combined arm's mean, std and SEs are recomputed over its seeds by
    `experiment.arm_result`, as a run of all those seeds records them; then the headline."""
    res = json.loads(target.read_text())
    before = dict(zip(res["settings"]["seeds"], res["before_per_seed"], strict=True))

    def shared(settings: dict) -> dict:  # files from before the "base" setting ran the old base
        return {"base": "old", **{k: v for k, v in settings.items() if k not in ("ablations", "seeds")}}

    found: dict[str, dict] = {}  # arm -> {seed: (evaluation, file, commit)}
    for name, ab in res["ablations"].items():
        if ab.get("status") == "ran":
            src = _arm_sources(res, name, ab, target)
            found[name] = {sd: (ev, *src[sd]) for sd, ev in zip(ab["seeds"], ab["per_seed"], strict=True)}
    for path in others:
        other = json.loads(path.read_text())
        if shared(other["settings"]) != shared(res["settings"]):
            raise SystemExit(
                f"--merge: {path} was run with other settings: {other['settings']} != {res['settings']}"
            )
        for seed, ev in zip(other["settings"]["seeds"], other["before_per_seed"], strict=True):
            if seed not in before:
                raise SystemExit(
                    f"--merge: {path} ran seed {seed}; {target} judged the pretrained generator on "
                    f"seeds {sorted(before)} only"
                )
            if any(
                ev[sp]["per_prompt_pass"] != before[seed][sp]["per_prompt_pass"]
                for sp in ("held_out", "seen")
            ):
                raise SystemExit(
                    f"--merge: {path} judged another pretrained generator on seed {seed} than {target}"
                )
        for name, ab in other["ablations"].items():
            if ab.get("status") != "ran":
                res["ablations"].setdefault(name, ab)
                continue
            have = found.setdefault(name, {})
            for seed, ev in zip(ab["seeds"], ab["per_seed"], strict=True):
                if seed in have:
                    raise SystemExit(
                        f"--merge: arm {name!r} seed {seed} is in both {have[seed][1]} and {path.name}"
                    )
                have[seed] = (ev, path.name, other.get("commit"))
        res.setdefault("merged_from", []).append(
            {
                "file": path.name,
                "arms": [n for n, a in other["ablations"].items() if a.get("status") == "ran"],
                "seeds": other["settings"]["seeds"],
                "commit": other.get("commit"),
                "dirty": other.get("dirty"),
                "wall_s": other.get("wall_s"),
                "cpu_s": other.get("cpu_s"),
            }
        )
    for name, by_seed in found.items():
        seeds = sorted(by_seed)
        ab = experiment.arm_result([by_seed[sd][0] for sd in seeds], seeds, [before[sd] for sd in seeds])
        ab["seed_sources"] = {str(sd): {"file": by_seed[sd][1], "commit": by_seed[sd][2]} for sd in seeds}
        res["ablations"][name] = ab
    res["before"], res["after"], res["targets"] = headline(res, res["settings"]["main"])
    print(table(res))
    res["notes"] = NOTES
    target.write_text(json.dumps(res, indent=2, default=str) + "\n")
    plot(res, target.with_suffix(".png"))
    print(f"merged {len(others)} file(s) into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
