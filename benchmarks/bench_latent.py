"""Benchmark: fidelity of a `LatentAdapter` (the latent view of a diffusion generator with a separate critic).

On a preset's generator + critic (default "mid": tiny SD VAE, ~100M-parameter LLaVA critic with 5 x 5 ... 16 x 16
tokens, random weights), in one run:
  - fit time of `fit_latent_adapter` on `--train` real-looking images (smooth random fields, rendered shapes
    on gradients; generated here, nothing downloaded), `--steps` optimizer steps;
  - held-out cosine between the adapter's tokens of the noised latent x_t (noise level sigma) and the
    critic's vision tokens of the CLEAN image, per sigma, mean over tokens and images; beside it the cosine
    of a per-position mean token (from the training images): what an adapter that ignores the latent gets;
  - caption CE per held-out image through the adapter (sigma = 0, the default "x0" input) and through the
    pixel path (bridge + vision tower + projector), the same random caption per image through the same LM:
    Spearman rank correlation over images and mean relative difference |CE_a - CE_p| / CE_p.
Targets (mid): cosine >= 0.9 at sigma <= 0.5, mean CE within 10% (ce_ratio), rank correlation >= 0.8.
The cost of the latent view (understanding overhead, peak memory) is measured by
`benchmarks/step_throughput.py --providers engine,latent` (the "latent" provider).

`--world learning`: the same measurements on the TRAINED models of the learning benchmark
(benchmarks/learning_lib/, cached in benchmarks/results/learning_cache/): the critic trained to caption every
composition of the shapes world (LLaVA-shaped, 32 x 32 images, 8 x 8 x 64 vision tokens) and the pretrained
pixel-space UNet's generator, whose "VAE" is an exact space-to-depth rearrangement (12 x 16 x 16 latents: all
the pixel information). The adapter is fitted on `--train` renders of random prompts of the world (every
composition, as the critic was trained) WITH their captions (the caption KL of `fit_latent_adapter`; off with
--no-captions), and measured on `--held` fresh renders (another seed); the caption CE per image uses the
image's TRUE caption (padding masked), through the adapter at sigma 0 (and at 0.25, 0.5: the adapter's tokens
of the noised latent against the pixel path on the clean image) and through the pixel path, and the fraction
of images whose caption the LM reads exactly (teacher forced: every caption token is the argmax) on either
path. Beside it the CE with the per-position mean token (what an adapter that ignores the latent gets).
"Caption CE within 10% on average" is read as the ratio of the mean CEs (ce_ratio, |ratio - 1| <= 0.1); the
mean per-image relative difference (ce_rel_diff) is reported too, and is dominated by the images whose
pixel-path CE is ~1e-4 nats (the trained critic is nearly certain of most captions).
`--pool 2`: an adapter that emits (8 / 2)^2 = 16 tokens (the LM reads 4x fewer image tokens); its cosine is to
the critic's tokens averaged over 2 x 2 blocks.
Writes bench_latent-learning[-<tag>]-<device>.json/.csv to benchmarks/runs/ (--record: benchmarks/results/).

    python benchmarks/bench_latent.py [--preset mid] [--train 96] [--held 32] [--steps 200] [--threads 1]
    python benchmarks/bench_latent.py --world learning [--train 4096] [--held 256] [--steps 12000] \
        [--pool 2] [--no-captions] [--clean-fraction 0.5] [--dim 128] [--tag pool2]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import add_output_args, env_metadata, output_dir, print_table, write_results  # noqa: E402

SIGMAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def natural_images(n: int, H: int, W: int, seed: int) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]: a two-scale smooth random field or a gradient background, with 1-4 soft-edged
    shapes (discs, rectangles) in random colours on half of them."""
    g = torch.Generator("cpu").manual_seed(seed)
    out = torch.empty(n, 3, H, W)
    ys = torch.linspace(-1, 1, H)[:, None].expand(H, W)
    xs = torch.linspace(-1, 1, W)[None, :].expand(H, W)
    for i in range(n):
        if torch.rand((), generator=g) < 0.5:
            img = sum(
                F.interpolate(
                    torch.randn(1, 3, s, s, generator=g), size=(H, W), mode="bicubic", align_corners=False
                )[0]
                * a
                for s, a in ((3, 0.8), (7, 0.35))
            )
        else:
            c0, c1 = torch.rand(3, 1, 1, generator=g) * 2 - 1, torch.rand(3, 1, 1, generator=g) * 2 - 1
            ang = float(torch.rand((), generator=g)) * 2 * math.pi
            t = (math.cos(ang) * xs + math.sin(ang) * ys + 1.5) / 3.0
            img = c0 + (c1 - c0) * t
        if torch.rand((), generator=g) < 0.5:
            for _ in range(int(torch.randint(1, 5, (), generator=g))):
                cy, cx, r = (
                    torch.rand(3, generator=g) * torch.tensor([2.0, 2.0, 0.5]) - torch.tensor([1, 1, -0.15])
                ).tolist()
                colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
                if torch.rand((), generator=g) < 0.5:
                    d = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt() - r
                else:
                    d = torch.maximum((ys - cy).abs(), (xs - cx).abs()) - r
                alpha = torch.sigmoid(-d * 25.0)
                img = img * (1 - alpha) + colour * alpha
        out[i] = img.clamp(-1, 1)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@torch.no_grad()
def per_image_ce(critic, image_embeds, captions, mask=None, exact=False):
    """Mean caption CE per image through the critic's LM with these image tokens (B, N, H) (the critic's own
    prefix and sequence, exactly as Critic.forward assembles it: `uno_engine.latent.caption_logits`). mask:
    (B, L) 1 for real caption tokens, 0 for padding (masked out of the attention and of the mean); None: all
    real. exact: also return (B,) bool, whether every real caption token is the LM's argmax (teacher forced:
    the caption is read exactly)."""
    from uno_engine.latent import caption_logits

    logits = caption_logits(critic, image_embeds, captions, mask)
    ce = F.cross_entropy(logits.transpose(1, 2), captions, reduction="none")
    if mask is None:
        return ce.mean(1)
    m = mask.float()
    ce = (ce * m).sum(1) / m.sum(1)
    if exact:
        return ce, ((logits.argmax(-1) == captions) | (mask == 0)).all(1)
    return ce


@torch.no_grad()
def vision_tokens(critic, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """The critic's vision tokens (projector output) of images in [-1, 1]: (B, N, H)."""
    out = []
    for i in range(0, len(images), chunk):
        out.append(critic.encode_image_tokens(critic.prepare(images[i : i + chunk], fuse_patch_embed=False))[0])
    return torch.cat(out)


@torch.no_grad()
def cosine_rows(adapter, lat_held, tok_held, mean_tok, g) -> list[dict]:
    """Per sigma in SIGMAS: cosine of the adapter's tokens of the noised latents to the clean image's tokens
    (mean over tokens and images), the mean-token cosine, and the MSE relative to the mean token's MSE."""
    from uno_engine.latent import noise_latents

    base_cos = float(F.cosine_similarity(mean_tok, tok_held, dim=-1).mean())
    rows = []
    for s in SIGMAS:
        eps = torch.randn(lat_held.shape, generator=g)
        x_t = noise_latents(lat_held, torch.full((len(lat_held),), s), eps, adapter.identity.noise)
        pred = adapter(x_t, s).float()
        cos = float(F.cosine_similarity(pred, tok_held, dim=-1).mean())
        rel = float((pred - tok_held).pow(2).mean() / (tok_held - mean_tok).pow(2).mean())
        rows.append(
            dict(
                kind="cosine",
                sigma=s,
                cosine=round(cos, 4),
                mean_token_cosine=round(base_cos, 4),
                mse_over_mean_token_mse=round(rel, 4),
            )
        )
    return rows


def fit(args, critic, gen, train, captions=None):
    """-> (adapter, fit seconds); also saves (and reloads, checking the identity) with --save."""
    from uno_engine.latent import LatentAdapter, fit_latent_adapter

    t0 = time.perf_counter()
    adapter = fit_latent_adapter(
        critic,
        gen,
        train,
        steps=args.steps,
        captions=captions,
        caption_weight=args.caption_weight,
        clean_fraction=args.clean_fraction,
        batch_size=args.batch_size,
        lr=args.lr,
        dim=args.dim,
        pool=args.pool,
    )
    fit_s = time.perf_counter() - t0
    if args.save:
        adapter.save(args.save)
        LatentAdapter.load(args.save, critic=critic, generator=gen)
    return adapter, fit_s


def fit_summary(args, adapter, fit_s) -> dict:
    ident = adapter.identity
    return dict(
        critic_tokens=f"{ident.token_grid[0]}x{ident.token_grid[1]}x{ident.critic_width}",
        adapter_tokens=f"{adapter.grid[0]}x{adapter.grid[1]}",
        latent=f"{ident.latent_channels}x{ident.latent_size[0]}x{ident.latent_size[1]}",
        patch_size=ident.patch_size,
        adapter_params=sum(p.numel() for p in adapter.parameters()),
        train_images=args.train,
        held_images=args.held,
        steps=args.steps,
        fit_s=round(fit_s, 1),
        fit_first_loss=round(adapter.fit_info["first_loss"], 4),
        fit_final_loss=round(adapter.fit_info["final_loss"], 4),
        clean_fraction=adapter.fit_info["clean_fraction"],
        caption_loss=adapter.fit_info["captions"],
    )


def run_preset(args) -> tuple[str, list[dict], float, float, str]:
    """Random-weight preset: natural-looking synthetic images, random captions (K captions x every image).
    -> (result name, rows, mean relative CE difference, Spearman, table title)."""
    from uno_engine.testing.presets import build_preset

    preset = build_preset(args.preset)
    if hasattr(preset.generator, "model"):
        raise SystemExit(
            f"preset {args.preset!r} has a Janus generator: the adapter is for diffusion generators"
        )
    critic = preset.make_critic("none")
    gen = preset.generator
    H, W = gen.height, gen.width
    train = natural_images(args.train, H, W, seed=1)
    held = natural_images(args.held, H, W, seed=2)
    fit_caps = None
    if args.pool > 1:  # a pooled adapter needs the caption loss: random captions (the LM is random too)
        gc = torch.Generator("cpu").manual_seed(4)
        fit_caps = torch.randint(1, preset.caption_vocab(), (args.train, args.caption_len), generator=gc)
    adapter, fit_s = fit(args, critic, gen, train, fit_caps)

    with torch.no_grad():
        tok_held, lat_held, mean_tok, rows, g = held_tokens(adapter, critic, gen, train, held)
        # the same K captions for every image, so CE differences across images come from the images
        caps = torch.randint(1, preset.caption_vocab(), (args.captions, args.caption_len), generator=g)
        ad_tokens = adapter(lat_held, 0.0)
        ce_pix, ce_ad = [], []
        for k in range(args.captions):
            c = caps[k : k + 1].expand(len(held), -1)
            ce_pix.append(per_image_ce(critic, tok_held, c))
            ce_ad.append(per_image_ce(critic, ad_tokens, c))
        ce_pix, ce_ad = torch.stack(ce_pix), torch.stack(ce_ad)  # (K, images)
    rel_diff = float(((ce_ad - ce_pix).abs() / ce_pix).mean())
    rho = sum(spearman(a, b) for a, b in zip(ce_ad, ce_pix, strict=True)) / args.captions
    spread = float((ce_pix.std(1) / ce_pix.mean(1)).mean())  # how much the images move the CE at all
    summary = dict(kind="summary", preset=args.preset, **fit_summary(args, adapter, fit_s))
    summary.update(
        ce_pixel_mean=round(float(ce_pix.mean()), 4),
        ce_adapter_mean=round(float(ce_ad.mean()), 4),
        ce_ratio=round(float(ce_ad.mean() / ce_pix.mean()), 4),
        ce_rel_diff=round(rel_diff, 5),
        ce_spearman=round(rho, 4),
        ce_pixel_rel_spread=round(spread, 5),
        threads=args.threads,
    )
    rows.append(summary)
    return "bench_latent", rows, float(ce_ad.mean() / ce_pix.mean()), rho, args.preset


def world_renders(world, n: int, seed: int):
    """n renders of uniformly drawn prompts of the world (every composition): (images, ids, mask, held_out)."""
    rng = random.Random(seed)
    prompts = world.all_prompts()
    chosen = [rng.choice(prompts) for _ in range(n)]
    images, ids, mask, _ = world.make_batch(chosen, rng)
    held_out = torch.tensor([p.held_out for p in chosen])
    return torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask), held_out


def ce_stats(ce_ad: torch.Tensor, ce_pix: torch.Tensor) -> dict:
    """Per-image CEs (images,) through the adapter and the pixel path -> mean relative difference, ratio of
    the means, mean absolute difference, Spearman over images."""
    return dict(
        rel_diff=float(((ce_ad - ce_pix).abs() / ce_pix).mean()),
        ratio=float(ce_ad.mean() / ce_pix.mean()),
        abs_diff=float((ce_ad - ce_pix).abs().mean()),
        spearman=spearman(ce_ad, ce_pix),
    )


def run_learning(args) -> tuple[str, list[dict], float, float, str]:
    """The learning benchmark's trained critic and generator, renders of the world, true captions."""
    from learning_lib import models, training, world

    from uno_engine import Critic
    from uno_engine.latent import noise_latents

    for f in ("critic.safetensors", "generator.safetensors"):
        if not (training.CACHE / f).exists():
            raise SystemExit(f"{training.CACHE / f} is missing: run `python benchmarks/learning.py` first")
    model, proc = training.load_critic(training.CACHE / "critic.safetensors")
    critic = Critic.from_hf(model, proc, checkpoint="none")
    unet, _ = training.load_generator(training.CACHE / "generator.safetensors")
    gen = models.make_generator(unet)
    train, train_ids, train_mask, _ = world_renders(world, args.train, seed=1)
    held, ids, mask, held_out = world_renders(world, args.held, seed=2)
    captions = None if args.no_captions else (train_ids, train_mask)
    adapter, fit_s = fit(args, critic, gen, train, captions)

    with torch.no_grad():
        tok_held, lat_held, mean_tok, rows, g = held_tokens(adapter, critic, gen, train, held)
        ce_pix, ok_pix = per_image_ce(critic, tok_held, ids, mask, exact=True)
        ce_mean_tok = per_image_ce(critic, mean_tok, ids, mask)
        ce_ad, ok_ad = {}, {}
        for s in (0.0, 0.25, 0.5):
            eps = torch.randn(lat_held.shape, generator=g)
            x_t = noise_latents(lat_held, torch.full((len(held),), s), eps, adapter.identity.noise)
            ce_ad[s], ok_ad[s] = per_image_ce(critic, adapter(x_t, s).float(), ids, mask, exact=True)
    everything = torch.ones(len(held), dtype=torch.bool)
    for s, ce in ce_ad.items():
        subsets = [("all", everything)]
        if s == 0.0:
            subsets += [("seen", ~held_out), ("held_out", held_out)]
        for name, sel in subsets:
            if int(sel.sum()) < 2:
                continue
            row = dict(kind="ce", sigma=s, images=f"{name} ({int(sel.sum())})")
            row.update(
                ce_pixel_mean=round(float(ce_pix[sel].mean()), 4),
                ce_adapter_mean=round(float(ce[sel].mean()), 4),
                **{k: round(v, 4) for k, v in ce_stats(ce[sel], ce_pix[sel]).items()},
                exact_pixel=round(float(ok_pix[sel].float().mean()), 4),
                exact_adapter=round(float(ok_ad[s][sel].float().mean()), 4),
            )
            rows.append(row)
    st0 = ce_stats(ce_ad[0.0], ce_pix)
    summary = dict(kind="summary", world="learning", **fit_summary(args, adapter, fit_s))
    summary.update(
        adapter_dim=adapter.arch["dim"],
        ce_pixel_mean=round(float(ce_pix.mean()), 4),
        ce_adapter_mean=round(float(ce_ad[0.0].mean()), 4),
        ce_mean_token_mean=round(float(ce_mean_tok.mean()), 4),
        ce_ratio=round(st0["ratio"], 4),
        ce_rel_diff=round(st0["rel_diff"], 5),
        ce_spearman=round(st0["spearman"], 4),
        ce_pixel_rel_spread=round(float(ce_pix.std() / ce_pix.mean()), 5),
        threads=args.threads,
    )
    rows.append(summary)
    print_table(
        [r for r in rows if r["kind"] == "ce"],
        [
            "sigma",
            "images",
            "ce_pixel_mean",
            "ce_adapter_mean",
            "rel_diff",
            "ratio",
            "abs_diff",
            "spearman",
            "exact_pixel",
            "exact_adapter",
        ],
        title="caption CE with the true caption: adapter (noised latent) vs pixel path (clean image)",
    )
    return "bench_latent-learning", rows, st0["ratio"], st0["spearman"], "learning: trained critic"


def held_tokens(adapter, critic, gen, train, held):
    """-> (the critic's tokens of the held images (the pixel path, never pooled), their latents, the
    per-position mean token of the training images (on the adapter's grid), the cosine rows by noise level
    (against the critic's tokens averaged as the adapter pools), the generator that drew the noise and goes
    on drawing)."""
    from uno_engine.latent.fit import pool_tokens

    grid, pool = adapter.identity.token_grid, adapter.arch["pool"]
    tok_train = pool_tokens(vision_tokens(critic, train), grid, pool)
    tok_held = vision_tokens(critic, held)
    pooled_held = pool_tokens(tok_held, grid, pool)
    lat_held = gen.encode_images(held)
    mean_tok = tok_train.mean(0, keepdim=True).expand_as(pooled_held)
    g = torch.Generator("cpu").manual_seed(3)
    return tok_held, lat_held, mean_tok, cosine_rows(adapter, lat_held, pooled_held, mean_tok, g), g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--world",
        choices=("preset", "learning"),
        default="preset",
        help="preset: a random-weight preset (--preset); learning: the learning benchmark's trained models",
    )
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--train", type=int, default=None, help="fit images (default 96; learning: 4096)")
    ap.add_argument("--held", type=int, default=None, help="held-out images (default 32; learning: 256)")
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default 200; learning: 12000)")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="images per fit step (default 8; learning: 16)"
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--dim",
        type=int,
        default=None,
        help="adapter width (default: LatentAdapter.for_pair's; learning: 128)",
    )
    ap.add_argument("--pool", type=int, default=1, help="adapter tokens: the critic's grid / pool per axis")
    ap.add_argument("--clean-fraction", type=float, default=0.5, help="fit draws at sigma = 0")
    ap.add_argument("--caption-weight", type=float, default=1.0, help="weight of the caption KL in the fit")
    ap.add_argument(
        "--no-captions", action="store_true", help="learning: fit on the token loss alone (no caption KL)"
    )
    ap.add_argument("--caption-len", type=int, default=16, help="random captions' length (preset)")
    ap.add_argument(
        "--captions", type=int, default=4, help="random captions, each read with every image (preset)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1 by default)")
    ap.add_argument("--save", default=None, help="also save the fitted adapter (safetensors) here")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tag", default=None, help="results file tag: results/<name>-<tag>-<device>.json")
    add_output_args(ap)
    args = ap.parse_args()
    learning = args.world == "learning"
    for k, preset_default, learning_default in (
        ("train", 96, 4096),
        ("held", 32, 256),
        ("steps", 200, 12000),
        ("dim", None, 128),
        ("batch_size", 8, 16),
    ):
        if getattr(args, k) is None:
            setattr(args, k, learning_default if learning else preset_default)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, rows, ce_ratio, rho, title = (run_learning if learning else run_preset)(args)
    summary = rows[-1]
    print_table(
        [r for r in rows if r["kind"] == "cosine"],
        ["sigma", "cosine", "mean_token_cosine", "mse_over_mean_token_mse"],
        title=f"held-out cosine to the critic's clean-image tokens ({title})",
    )
    print_table([summary], [k for k in summary if k != "kind"], title="fit and caption CE")
    goals = dict(
        cosine_at_half=min(r["cosine"] for r in rows if r["kind"] == "cosine" and r["sigma"] <= 0.5) >= 0.9,
        ce_mean_within_10pct=abs(ce_ratio - 1.0) <= 0.10,
        ce_spearman=rho >= 0.8,
    )
    print("goals:", goals)
    if not args.no_write:
        meta = env_metadata("cpu")
        meta["goals"] = goals
        if learning:
            meta["args"] = {
                k: v for k, v in vars(args).items() if k not in ("caption_len", "captions", "preset")
            }
            meta["notes"] = (
                "trained critic: the pixel path's CE on the true caption is ~0.03 nat/token, so ce_rel_diff "
                "(mean |CE_a - CE_p| / CE_p per image) is large for any adapter error; ratio = mean CE_a / mean "
                "CE_p; exact_*: fraction of images whose caption is every token's argmax (teacher forced)"
            )
        paths = write_results(name, rows, meta, tag=args.tag, out_dir=output_dir(args))
        print("wrote", *paths)


if __name__ == "__main__":
    main()
