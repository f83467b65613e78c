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
Targets (mid): cosine >= 0.9 at sigma <= 0.5, mean relative CE difference <= 10%, rank correlation >= 0.8.
The cost of the latent view (understanding overhead, peak memory) is measured by
`benchmarks/step_throughput.py --providers engine,latent` (the "latent" provider).

    python benchmarks/bench_latent.py [--preset mid] [--train 96] [--held 32] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import env_metadata, print_table, write_results  # noqa: E402

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
def per_image_ce(critic, image_embeds, captions):
    """Mean caption CE per image through the critic's LM with these image tokens (B, N, H) (the critic's own
    prefix and sequence, exactly as Critic.forward assembles it)."""
    prefix, _ = critic._prefix_ids(image_embeds.shape[1])
    P = len(prefix)
    with critic._running():
        embeds = critic._assemble(image_embeds.to(critic.lm_head_weight.dtype), prefix, captions)
        hidden = critic.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    logits = critic.lm_head(hidden[:, P - 1 : P - 1 + captions.shape[1]]).float()
    ce = F.cross_entropy(logits.transpose(1, 2), captions, reduction="none")
    return ce.mean(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--held", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=None, help="adapter width (default: LatentAdapter.for_pair's)")
    ap.add_argument("--caption-len", type=int, default=16)
    ap.add_argument("--captions", type=int, default=4, help="random captions, each read with every image")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1 by default)")
    ap.add_argument("--save", default=None, help="also save the fitted adapter (safetensors) here")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from uno_engine.latent import LatentAdapter, fit_latent_adapter, noise_latents
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

    t0 = time.perf_counter()
    adapter = fit_latent_adapter(
        critic, gen, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, dim=args.dim
    )
    fit_s = time.perf_counter() - t0
    if args.save:
        adapter.save(args.save)
        LatentAdapter.load(args.save, critic=critic, generator=gen)

    with torch.no_grad():
        tok_train = torch.cat(
            [
                critic._encode(critic.prepare(train[i : i + 8], fuse_patch_embed=False))[0]
                for i in range(0, len(train), 8)
            ]
        )
        tok_held = torch.cat(
            [
                critic._encode(critic.prepare(held[i : i + 8], fuse_patch_embed=False))[0]
                for i in range(0, len(held), 8)
            ]
        )
        lat_held = gen.encode_images(held)
        mean_tok = tok_train.mean(0, keepdim=True).expand_as(tok_held)
        base_cos = float(F.cosine_similarity(mean_tok, tok_held, dim=-1).mean())
        g = torch.Generator("cpu").manual_seed(3)
        rows = []
        for s in SIGMAS:
            eps = torch.randn(lat_held.shape, generator=g)
            x_t = noise_latents(lat_held, torch.full((len(held),), s), eps, adapter.identity.noise)
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
    summary = dict(
        kind="summary",
        preset=args.preset,
        critic_tokens=f"{adapter.identity.token_grid[0]}x{adapter.identity.token_grid[1]}x{adapter.identity.critic_width}",
        latent=f"{adapter.identity.latent_channels}x{adapter.identity.latent_size[0]}x{adapter.identity.latent_size[1]}",
        adapter_params=sum(p.numel() for p in adapter.parameters()),
        train_images=args.train,
        held_images=args.held,
        steps=args.steps,
        fit_s=round(fit_s, 1),
        fit_first_loss=round(adapter.fit_info["first_loss"], 4),
        fit_final_loss=round(adapter.fit_info["final_loss"], 4),
        ce_pixel_mean=round(float(ce_pix.mean()), 4),
        ce_adapter_mean=round(float(ce_ad.mean()), 4),
        ce_rel_diff=round(rel_diff, 5),
        ce_spearman=round(rho, 4),
        ce_pixel_rel_spread=round(spread, 5),
        threads=args.threads,
    )
    rows.append(summary)
    print_table(
        [r for r in rows if r["kind"] == "cosine"],
        ["sigma", "cosine", "mean_token_cosine", "mse_over_mean_token_mse"],
        title=f"held-out cosine to the critic's clean-image tokens ({args.preset})",
    )
    print_table([summary], [k for k in summary if k != "kind"], title="fit and caption CE")
    goals = dict(
        cosine_at_half=min(r["cosine"] for r in rows if r["kind"] == "cosine" and r["sigma"] <= 0.5) >= 0.9,
        ce_rel_diff=rel_diff <= 0.10,
        ce_spearman=rho >= 0.8,
    )
    print("goals:", goals)
    if not args.no_write:
        meta = env_metadata("cpu")
        meta["goals"] = goals
        paths = write_results("bench_latent", rows, meta)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
