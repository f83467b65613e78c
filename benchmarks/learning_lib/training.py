"""Pretraining of the critic (captions of every composition) and of the generator (seen compositions only),
and the cache of their weights (benchmarks/results/learning_cache/, committed; a few MB).

Both trainings are deterministic given their seed (fresh renders from a seeded `random.Random`, seeded torch)
up to floating-point summation order; the cached files are the reference models of the experiment.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models, world

CACHE = Path(__file__).resolve().parent.parent / "results" / "learning_cache"
# the cached critics by name: "old" (trained on clean renders; the committed figures before 2026-12-06 used
# it) and "aug" (fine-tuned from it on augmented renders: augment_finetune_critic)
CRITICS = {"old": CACHE / "critic.safetensors", "aug": CACHE / "critic-aug.safetensors"}


def _log(msg: str, log) -> None:
    if log is not None:
        log(msg)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------------ critic
def caption_batch(prompts, rng, device="cpu"):
    images, ids, mask, scenes = world.make_batch(prompts, rng)
    return torch.from_numpy(images).to(device), torch.from_numpy(ids), torch.from_numpy(mask), scenes


def critic_loss(critic, images, ids, mask):
    """Teacher-forced caption CE (the same layout UNO uses: image tokens, then the caption)."""
    inputs = critic.prepare(images, backend="torch")
    out = critic(inputs, ids, mask)
    logits = out.logits()
    return F.cross_entropy(logits.flatten(0, 1), out.caption_labels.flatten(), ignore_index=-100), logits


def train_critic(
    steps: int = 1500,
    batch: int = 64,
    seed: int = 0,
    lr: float = 2e-3,
    log=print,
    bar=None,
    on_checkpoint=None,
    every: int = 500,
    *,
    init=None,
    augment: dict | None = None,
    warmup: int = 100,
):
    """-> (hf_model, processor, stats). Trained on renders of ALL prompts (held-out compositions included).
    `on_checkpoint(model, step)` is called every `every` steps (a cache that exists early). `init`: a
    (model, processor) to continue from (trained in place) instead of a fresh one; `augment`: the renders go
    through augment_renders with these settings (a generator seeded with `seed`)."""
    from uno_engine import Critic

    model, proc = init if init is not None else models.build_critic_model(seed)
    critic = Critic.from_hf(model, proc)
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    prompts = world.all_prompts()
    t0, c0 = time.time(), time.process_time()
    it = range(steps) if bar is None else bar(range(steps), "critic")
    for step in it:
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, steps, lr, warmup)
        images, ids, mask, _ = caption_batch([rng.choice(prompts) for _ in range(batch)], rng)
        if augment is not None:
            images = augment_renders(images, g, augment)
        loss, _ = critic_loss(critic, images, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            _log(f"critic step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", log)
        if on_checkpoint is not None and step % every == every - 1:
            on_checkpoint(model, step + 1)
    for p in params:
        p.requires_grad_(False)
    model.eval()
    stats = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "train_s": time.time() - t0}
    stats["cpu_s"] = time.process_time() - c0
    return model, proc, stats


@torch.no_grad()
def critic_accuracy(
    model, proc, n: int = 1024, seed: int = 12345, held_out_only: bool = False, augment: bool = False
) -> dict:
    """Teacher-forced caption token accuracy (argmax of each next-token prediction, <eos> included) and
    whole-caption accuracy on fresh renders of every prompt (or only held-out ones); `augment`: on renders
    passed through augment_renders (every one augmented: p_aug 1)."""
    from uno_engine import Critic

    critic = Critic.from_hf(model, proc)
    rng = random.Random(seed)
    prompts = world.split_prompts()[1] if held_out_only else world.all_prompts()
    correct = total = exact = 0
    cls_of = torch.tensor([word_class(w) for w in range(world.VOCAB_SIZE)])
    by_cls = torch.zeros(len(WORD_CLASSES), 2)
    for i in range(0, n, 128):
        images, ids, mask, _ = caption_batch([rng.choice(prompts) for _ in range(min(128, n - i))], rng)
        if augment:
            images = augment_renders(images, torch.Generator().manual_seed(seed + i), {"p_aug": 1.0})
        _, logits = critic_loss(critic, images, ids, mask)
        hit = (logits.argmax(-1) == ids) & (mask == 1)
        ok = hit | (mask == 0)
        correct += int(hit.sum())
        total += int(mask.sum())
        exact += int(ok.all(dim=1).sum())
        cls = cls_of[ids][mask == 1]
        by_cls[:, 0] += torch.bincount(cls[hit[mask == 1]], minlength=len(WORD_CLASSES)).float()
        by_cls[:, 1] += torch.bincount(cls, minlength=len(WORD_CLASSES)).float()
    return {
        "token_accuracy": correct / total,
        "caption_accuracy": exact / n,
        "n_images": n,
        "token_accuracy_by_class": {
            c: float(by_cls[j, 0] / by_cls[j, 1]) for j, c in enumerate(WORD_CLASSES) if by_cls[j, 1] > 0
        },
    }


WORD_CLASSES = ("number", "color", "shape", "relation", "other")


def word_class(token_id: int) -> int:
    """Index in WORD_CLASSES of a token id ("relation": left/right/above/below; "other": of, <eos>, <pad>)."""
    w = world.WORDS[token_id] if token_id < len(world.WORDS) else "<pad>"
    if w in world.NUMBERS:
        return 0
    if w in world.COLORS:
        return 1
    if w in world.SHAPES or w in world.PLURAL.values():
        return 2
    if w in ("left", "right", "above", "below"):
        return 3
    return 4


# --------------------------------------------------------------------------------------------- generator
def velocity_target(x0, noise, abar):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (diffusers' get_velocity); abar (B,) broadcast."""
    a = abar.sqrt().view(-1, 1, 1, 1)
    s = (1 - abar).sqrt().view(-1, 1, 1, 1)
    return a * noise - s * x0, a * x0 + s * noise


def denoising_loss(unet, text, x0_images, ids, t, noise, alphas_cumprod):
    """v-prediction MSE on (space-to-depth) pixel latents at given timesteps t (B,) and noise."""
    x0 = models.to_latents(x0_images)
    abar = alphas_cumprod[t].float()
    v, xt = velocity_target(x0, noise, abar)
    pred = unet(xt, t, encoder_hidden_states=text(ids)).sample
    return F.mse_loss(pred.float(), v)


def train_generator(
    steps: int = 3000,
    batch: int = 32,
    seed: int = 0,
    lr: float = 1e-3,
    p_uncond: float = 0.1,
    log=print,
    bar=None,
    on_checkpoint=None,
    every: int = 500,
    stop_at: int | None = None,
    base: str = "old",
):
    """-> (unet (EMA weights), text encoder, stats). Trained on SEEN prompts only. `on_checkpoint(ema, text,
    step)` is called every `every` steps (a cache that exists early). `base`: the architecture
    (models.BASES)."""
    torch.manual_seed(seed)
    unet = models.build_unet(seed, base)
    text = models.build_text_encoder(base)
    ema = models.build_unet(seed, base)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ac = models.build_scheduler().alphas_cumprod
    rng = random.Random(seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    seen, _ = world.split_prompts()
    t0, c0 = time.time(), time.process_time()
    n = steps if stop_at is None else min(stop_at, steps)
    it = range(n) if bar is None else bar(range(n), "generator")
    for step in it:
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, steps, lr)
        images, ids, _, _ = caption_batch([rng.choice(seen) for _ in range(batch)], rng)
        drop = torch.rand(batch, generator=g) < p_uncond
        ids = torch.where(drop[:, None], text.null_ids(batch), ids)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(images.shape[0], 12, world.SIZE // 2, world.SIZE // 2, generator=g)
        loss = denoising_loss(unet, text, images, ids, t, noise, ac)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        if step % 100 == 0 or step == n - 1:
            _log(f"generator step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", log)
        if on_checkpoint is not None and step % every == every - 1:
            on_checkpoint(ema, text, step + 1)
    stats = {
        "base": base,
        "parameters": sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text.parameters()),
        "steps": n,
        "schedule_steps": steps,
        "batch": batch,
        "seed": seed,
        "lr": lr,
        "p_uncond": p_uncond,
        "train_s": time.time() - t0,
        "cpu_s": time.process_time() - c0,
    }
    return ema.eval(), text.eval(), stats


# ------------------------------------------------------------------------------------------------- cache
def save_critic(model, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_critic(path: Path):
    from safetensors.torch import load_file

    model, proc = models.build_critic_model(0)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # lm_head may be tied
        raise RuntimeError(f"load_critic: missing {missing}, unexpected {unexpected}")
    model.requires_grad_(False)
    return model.eval(), proc


def save_generator(unet, text, path: Path, base: str = "old") -> None:
    """UNet weights stored in fp16 (the cache defines the base model; they are loaded back to fp32). The base's
    name goes in the file's metadata, so load_generator builds the right architecture."""
    from safetensors.torch import save_file

    models.base_arch(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {"unet." + k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    sd.update({"text." + k: v.detach().contiguous() for k, v in text.state_dict().items()})
    save_file(sd, str(path), metadata={"base": base})


def generator_path(cache: Path, base: str) -> Path:
    """The cache file of a base generator: generator.safetensors ("old"), generator-<base>.safetensors."""
    models.base_arch(base)
    return cache / ("generator.safetensors" if base == "old" else f"generator-{base}.safetensors")


def generator_base(path: Path) -> str:
    """The base (models.BASES) a cached generator was saved with ("old" for files without the metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("base", "old")


def load_generator(path: Path):
    from safetensors.torch import load_file

    base = generator_base(path)
    if base not in models.BASES:
        raise ValueError(
            f"load_generator: {path} was saved as base {base!r}, not one of {sorted(models.BASES)}"
        )
    sd = load_file(str(path))
    unet, text = models.build_unet(0, base), models.build_text_encoder(base)
    unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")})
    text.requires_grad_(False)
    return unet.eval(), text.eval()


def write_meta(path: Path, **entries) -> None:
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta.update(entries)
    path.write_text(json.dumps(meta, indent=2) + "\n")


# ------------------------------------------------------------------------------- pretraining to the cache
def pretrain_critic_to(path: Path, steps: int, threads: int = 1, log=print, bar=None) -> dict:
    """Train the critic and save it at `path` (a top-level function: it can run in a spawned process)."""
    torch.set_num_threads(threads)
    m, _, st = train_critic(steps=steps, log=log, bar=bar)
    save_critic(m, path)
    return st


def pretrain_generator_to(
    path: Path,
    steps: int,
    stop_at: int | None = None,
    threads: int = 1,
    log=print,
    bar=None,
    base: str = "old",
) -> dict:
    """Train the generator (checkpointed to `path` every 500 steps) and save it at `path`."""
    torch.set_num_threads(threads)
    u, t, st = train_generator(
        steps=steps,
        stop_at=stop_at,
        log=log,
        bar=bar,
        on_checkpoint=lambda uu, tt, k: save_generator(uu, tt, path, base),
        base=base,
    )
    save_generator(u, t, path, base)
    return st


def robust_finetune_critic(
    model,
    proc,
    *,
    steps: int = 600,
    eps: float = 0.3,
    pgd: int = 4,
    lr: float = 1e-3,
    seed: int = 7,
    log=None,
):
    """A copy of the critic fine-tuned to be harder to fool: per batch of 64 renders of every prompt, half are
    replaced by an L-inf PGD attack on the caption CE (radius `eps` on the [-1, 1] pixel scale, `pgd` steps of
    2.5 eps / pgd, random start; Madry et al. 2018), the other half get a random texture of amplitude U(0, 0.5):
    white noise or a 4 x 4-pixel random grid (the patch grid the attack of `probe.py` writes). -> (model, stats)."""
    import copy

    from uno_engine import Critic

    model = copy.deepcopy(model)
    critic = Critic.from_hf(model, proc)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    prompts = world.all_prompts()
    t0 = time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, steps, lr, warmup=20)
        images, ids, mask, _ = caption_batch([rng.choice(prompts) for _ in range(64)], rng)
        x, c = images[:32], images[32:]
        d = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
        model.requires_grad_(False)
        for _ in range(pgd):
            d.requires_grad_(True)
            loss, _ = critic_loss(critic, (x + d).clamp(-1, 1), ids[:32], mask[:32])
            (gd,) = torch.autograd.grad(loss, d)
            d = (d.detach() + 2.5 * eps / pgd * gd.sign()).clamp(-eps, eps)
        model.requires_grad_(True)
        amp = torch.rand(c.shape[0], 1, 1, 1, generator=g) * 0.5
        white = torch.randn(c.shape, generator=g)
        grid = F.interpolate(torch.randn(c.shape[0], 3, 8, 8, generator=g), scale_factor=4, mode="nearest")
        pick = (torch.rand(c.shape[0], 1, 1, 1, generator=g) < 0.5).float()
        c = (c + amp * (pick * white + (1 - pick) * grid)).clamp(-1, 1)
        loss, _ = critic_loss(critic, torch.cat([(x + d).clamp(-1, 1), c]), ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"robust critic step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    model.requires_grad_(False)
    stats = {"steps": steps, "eps": eps, "pgd": pgd, "lr": lr, "seed": seed, "train_s": time.time() - t0}
    return model.eval(), stats


# ------------------------------------------------------------------- the augmentation-trained critic
AUG = {"scale": (0.85, 1.15), "shift_px": 3.0, "noise": 0.15, "p_noise": 0.5, "p_aug": 0.8}


def augment_renders(images: torch.Tensor, g: torch.Generator, aug: dict | None = None) -> torch.Tensor:
    """The critic's TRAINING augmentation (what a real VLM sees in pretraining, in miniature), not a reading.

    images (B, 3, H, W) in [-1, 1] -> same shape: each row, with probability aug["p_aug"], is zoomed by a
    random scale in aug["scale"] (a random resized crop for > 1, a zoom-out on the black background for < 1),
    translated by a continuous (sub-patch, sub-pixel) shift of at most aug["shift_px"] pixels per axis
    (bilinear resampling; what leaves the frame is background), and with probability aug["p_noise"] given
    Gaussian pixel noise of a std drawn in U(0, aug["noise"]). The scale range keeps every object in frame in
    all but rare layouts, so the caption stays true."""
    import torch.nn.functional as F

    aug = {**AUG, **(aug or {})}
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"augment_renders: `images` must be (B, 3, H, W), got {tuple(images.shape)}")
    B, _, H, W = images.shape
    on = (torch.rand(B, generator=g) < aug["p_aug"]).float()
    lo, hi = aug["scale"]
    scale = 1 + on * (lo + (hi - lo) * torch.rand(B, generator=g) - 1)
    shift = on[:, None] * (torch.rand(B, 2, generator=g) * 2 - 1) * aug["shift_px"]
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale  # output pixel -> input: a zoom by `scale`
    theta[:, 0, 2] = -shift[:, 0] * 2 / W
    theta[:, 1, 2] = -shift[:, 1] * 2 / H
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # background is -1: resample (x + 1) with zero padding, then shift back
    out = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    noisy = on * (torch.rand(B, generator=g) < aug["p_noise"]).float()
    sigma = (noisy * torch.rand(B, generator=g) * aug["noise"]).view(B, 1, 1, 1)
    return (out + sigma * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def augment_finetune_critic(
    model, proc, *, steps: int = 1500, lr: float = 5e-4, batch: int = 64, seed: int = 11, log=None, bar=None
):
    """A copy of the critic fine-tuned on augmented renders of every prompt (`augment_renders`, the AUG
    settings): the critic "trained the way real ones are". -> (model, stats)."""
    import copy

    model, _, st = train_critic(
        steps, batch, seed, lr, log, bar, init=(copy.deepcopy(model), proc), augment=AUG, warmup=50
    )
    return model, {"finetuned_from": "critic.safetensors", "augmentation": AUG, **st}


def pretrain_aug_critic_to(path: Path, base: Path, steps: int, threads: int = 1, log=print, bar=None) -> dict:
    """Fine-tune the cached critic `base` on augmented renders and save it at `path` (a new cache file; the
    old critic stays)."""
    torch.set_num_threads(threads)
    model, proc = load_critic(base)
    m, st = augment_finetune_critic(model, proc, steps=steps, log=log, bar=bar)
    save_critic(m, path)
    return st
