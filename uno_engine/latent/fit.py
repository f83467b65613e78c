"""`fit_latent_adapter`: distil a critic's pixel path into a `LatentAdapter` on real images.

The images are encoded once by the generator's VAE (posterior mode) and by the critic's vision path
(`Critic.encode_image_tokens`, the projector's output; averaged over pool x pool blocks for a pooled adapter). Each step
draws a batch of images and noise levels, noises their latents, x_t = alpha(sigma) x0 + sigma eps (flow
matching: alpha = 1 - sigma; DDPM family: alpha = sqrt(1 - sigma^2)), and minimises against the CLEAN image:

    token loss    mean ||a - b||^2 / E||b||^2 + mean (1 - cos(a, b)) per token;
    caption loss  (with `captions`) caption_weight * KL(p_pixel || p_adapter) per caption token: the critic's
                  LM reads the caption once after the pixel path's tokens (the teacher, no grad) and once after
                  the adapter's, and the adapter learns to make the LM predict what it predicts on the image.

Why the caption loss: a trained LM is sharp, and token errors that a cosine of 0.95 allows cost it most of
its caption likelihood (benchmarks/bench_latent.py --world learning: CE 17x the pixel path's at cosine 0.95
with the token loss alone). The KL puts the adapter's error where the LM does not read it. A pooled adapter
(`pool` > 1) emits a prefix the LM never saw, so it needs captions.

Noise levels: with probability `clean_fraction` sigma = 0 (the step's default latent input is the grad step's
x0 prediction, read at sigma = 0), otherwise sigma = u^2, u ~ U(0, 1) (71% of those at sigma <= 0.5).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from uno_engine.latent.adapter import LatentAdapter, noise_latents

__all__ = ["caption_logits", "fit_latent_adapter"]


@torch.no_grad()
def _critic_tokens(critic, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """The critic's vision tokens (its projector's output) of images in [-1, 1], (B, gh * gw, H) fp32."""
    out = []
    for i in range(0, images.shape[0], chunk):
        inputs = critic.prepare(images[i : i + chunk], fuse_patch_embed=False)
        out.append(critic.encode_image_tokens(inputs)[0].float())
    return torch.cat(out)


@torch.no_grad()
def _vae_latents(generator, images: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat(
        [generator.encode_images(images[i : i + chunk]).float() for i in range(0, images.shape[0], chunk)]
    )


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """(B, gh * gw, H) -> (B, (gh / pool) * (gw / pool), H): the mean of each pool x pool block of tokens."""
    if pool == 1:
        return tokens
    B, _, H = tokens.shape
    gh, gw = grid
    t = tokens.view(B, gh // pool, pool, gw // pool, pool, H).mean((2, 4))
    return t.reshape(B, -1, H)


def caption_logits(critic, image_embeds: torch.Tensor, captions: torch.Tensor, mask=None) -> torch.Tensor:
    """(B, L, V) fp32 logits of each caption token, the critic's LM reading `image_embeds` (B, N, H) in the image
    slots of its own sequence and the captions (B, L) after it: `Critic.forward`'s reader, the image tokens
    given. mask: (B, L) 1 real / 0 padding (keys masked), or None. Differentiable in image_embeds."""
    out = critic.reader.read(lambda: (image_embeds, None, None), captions, mask)
    return out.logits().float()


def _check_captions(captions, M: int, vocab: int):
    """-> (ids (M, L) long, mask (M, L) long) from ids or (ids, mask); errors name the argument."""
    ids, mask = captions if isinstance(captions, (tuple, list)) else (captions, None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"fit_latent_adapter: captions must be (M, L) integer token ids or (ids, mask), got "
            f"{getattr(ids, 'shape', type(ids).__name__)} {getattr(ids, 'dtype', '')}"
        )
    if ids.shape[0] != M or ids.shape[1] < 1:
        raise ValueError(
            f"fit_latent_adapter: captions must have one row per image ({M}) and L >= 1, got {tuple(ids.shape)}"
        )
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"fit_latent_adapter: caption token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    if mask is None:
        mask = torch.ones_like(ids)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(
            f"fit_latent_adapter: the caption mask must have the captions' shape {tuple(ids.shape)}, got "
            f"{getattr(mask, 'shape', type(mask).__name__)}"
        )
    elif bool((mask.sum(1) == 0).any()):
        raise ValueError(
            "fit_latent_adapter: every caption needs at least one real token (a mask row is all 0)"
        )
    return ids.long(), mask.long()


def fit_latent_adapter(
    critic,
    generator,
    images: torch.Tensor,
    *,
    steps: int,
    captions=None,
    caption_weight: float = 1.0,
    clean_fraction: float = 0.5,
    batch_size: int = 8,
    lr: float = 1e-3,
    adapter: LatentAdapter | None = None,
    seed: int = 0,
    progress: bool = True,
    chunk: int = 8,
    **arch,
) -> LatentAdapter:
    """Distil the critic's pixel path into a `LatentAdapter` on real images (module docstring).

    Args:
        critic: a `uno_engine.Critic` (its vision path and LM give the targets; frozen, not changed).
        generator: a `DiffusersGenerator` (its VAE encoder gives the clean latents; not changed).
        images: (M, 3, H, W) real images in [-1, 1] at the generator's output size (H, W).
        steps: optimizer steps; batch_size: images per step; lr: AdamW peak learning rate (warm-up then
            cosine decay).
        captions: None (token loss only), (M, L) caption token ids, or (ids, mask) with mask (M, L) 1 real /
            0 padding: adds the caption loss (KL to the LM's predictions on the pixel path), weighted by
            `caption_weight` (> 0). Required for a pooled adapter (`pool` > 1).
        clean_fraction: the fraction of draws at sigma = 0, in [0, 1].
        adapter: continue fitting this one (default: `LatentAdapter.for_pair(critic, generator, **arch)`;
            arch: dim, heads, depth_in, depth_out, patch_size, pool).
        seed: noise levels, noise and subsets; progress: a tqdm bar; chunk: images per encode call.
    Returns the adapter in eval mode with requires_grad False (frozen for UNO post-training);
    `adapter.fit_info` holds the steps, seconds, number of images, settings and the first / last losses.
    """
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1] != 3
        or images.shape[0] < 1
    ):
        raise ValueError(
            f"fit_latent_adapter: images must be (M >= 1, 3, H, W), got {getattr(images, 'shape', type(images))}"
        )
    if (images.shape[2], images.shape[3]) != (generator.height, generator.width):
        raise ValueError(
            f"fit_latent_adapter: images must be {generator.height}x{generator.width} (the generator's output "
            f"size), got {images.shape[2]}x{images.shape[3]}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fit_latent_adapter: steps must be an int >= 1, got {steps!r}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("fit_latent_adapter: images contain NaN or Inf")
    if not 0.0 <= float(clean_fraction) <= 1.0:
        raise ValueError(f"fit_latent_adapter: clean_fraction must lie in [0, 1], got {clean_fraction!r}")
    if not float(caption_weight) > 0.0 or not math.isfinite(float(caption_weight)):
        raise ValueError(
            f"fit_latent_adapter: caption_weight must be a finite number > 0, got {caption_weight!r}"
        )
    M = images.shape[0]
    device = critic.lm_head_weight.device
    if captions is not None:
        ids, cmask = _check_captions(captions, M, critic.lm_head_weight.shape[0])
        ids, cmask = ids.to(device), cmask.to(device)
    t0 = time.perf_counter()
    if adapter is None:
        adapter = LatentAdapter.for_pair(critic, generator, **arch).to(device)
    else:
        adapter.check_critic(critic)
        adapter.check_generator(generator)
    pool = adapter.arch.get("pool", 1)
    if pool > 1 and captions is None:
        raise ValueError(
            f"fit_latent_adapter: a pooled adapter (pool={pool}) emits a prefix the critic's LM never saw; "
            "fit it with captions=(ids, mask) so that it is distilled on the LM's caption predictions"
        )
    images = images.to(device)
    latents = _vae_latents(generator, images.to(generator.vae.dtype), chunk)
    pixel_tokens = _critic_tokens(critic, images.to(critic.lm_head_weight.dtype), chunk)
    grid = adapter.identity.token_grid
    if pixel_tokens.shape[1:] != (math.prod(grid), adapter.identity.critic_width):
        raise ValueError(
            f"fit_latent_adapter: the critic gives {tuple(pixel_tokens.shape[1:])} vision tokens per image but "
            f"the adapter's token grid is {grid} x width {adapter.identity.critic_width} "
            "(a critic with a CLS token among its LM image tokens is not supported)"
        )
    targets = pool_tokens(pixel_tokens, grid, pool)
    scale = targets.pow(2).mean().clamp_min(1e-12)
    if not adapter.fit_info:  # a fresh adapter: standardize its output to the critic's token statistics
        adapter.token_mean.copy_(targets.mean(dim=(0, 1)))
        adapter.token_scale.copy_((targets - adapter.token_mean).std().clamp_min(1e-12))
    teacher_all = None  # the LM's caption log-probs on the pixel path, kept when they fit in 512 MiB
    if captions is not None and M * ids.shape[1] * critic.lm_head_weight.shape[0] * 4 <= 512 * 2**20:
        with torch.no_grad():
            teacher_all = torch.cat(
                [
                    caption_logits(
                        critic, pixel_tokens[i : i + chunk], ids[i : i + chunk], cmask[i : i + chunk]
                    ).log_softmax(-1)
                    for i in range(0, M, chunk)
                ]
            )
    adapter.train().requires_grad_(True)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    g = torch.Generator("cpu").manual_seed(seed)
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="fit_latent_adapter", disable=not progress)
    losses, kls = [], []
    noise = adapter.identity.noise
    for _ in bar:
        idx = torch.randint(0, M, (min(batch_size, M),), generator=g)
        sigma = torch.rand(len(idx), generator=g) ** 2
        if clean_fraction > 0:  # (no draw at 0: the stream of a clean_fraction=0 fit is that of earlier fits)
            clean = torch.rand(len(idx), generator=g) < clean_fraction
            sigma = torch.where(clean, torch.zeros_like(sigma), sigma)
        eps = torch.randn(latents[idx].shape, generator=g)
        x_t = noise_latents(latents[idx], sigma.to(device), eps.to(device), noise)
        with torch.enable_grad():
            pred = adapter(x_t, sigma).float()
            tgt = targets[idx]
            loss = (pred - tgt).pow(2).mean() / scale + (1 - F.cosine_similarity(pred, tgt, dim=-1)).mean()
            if captions is not None:
                on = idx.to(device)
                c, m = ids[on], cmask[on]
                if teacher_all is not None:
                    teacher = teacher_all[on]
                else:
                    with torch.no_grad():
                        teacher = caption_logits(critic, pixel_tokens[on], c, m).log_softmax(-1)
                student = caption_logits(critic, pred, c, m).log_softmax(-1)
                kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
                kl = (kl * m).sum() / m.sum()
                loss = loss + caption_weight * kl
                kls.append(float(kl.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    opt.zero_grad(set_to_none=True)
    adapter.requires_grad_(False).eval()
    k = max(1, len(losses) // 10)
    adapter.fit_info = dict(
        steps=steps,
        images=M,
        seconds=time.perf_counter() - t0,
        first_loss=sum(losses[:k]) / k,  # mean of the first and the last 10% of the steps
        final_loss=sum(losses[-k:]) / k,
        lr=lr,
        seed=seed,
        clean_fraction=float(clean_fraction),
        captions=captions is not None,
        caption_weight=float(caption_weight) if captions is not None else None,
        first_caption_kl=sum(kls[:k]) / k if kls else None,
        final_caption_kl=sum(kls[-k:]) / k if kls else None,
    )
    return adapter
