"""LatentAdapter (diffusion latents -> the critic's vision tokens) and the latent view with a separate critic."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uno_engine import ReadAugment, UNOConfig, UNOLoss, UNOStep
from uno_engine.bridge_math import hash_normal
from uno_engine.latent import (
    GeneratedLatents,
    LatentAdapter,
    LatentAdapterMismatch,
    LatentCritic,
    fit_latent_adapter,
    noise_latents,
)
from uno_engine.read import renoise_latents
from uno_engine.testing.presets import build_preset
from uno_engine.testing.presets.generators import build_generator

ARCH = dict(dim=32, heads=2, depth_in=1, depth_out=1)  # small: these tests check wiring, not fidelity


@pytest.fixture(scope="module")
def tiny():
    """tiny SD generator (64 x 48 images, 8 x 6 x 4 latents) + tiny LLaVA-CLIP critic (30 px crop, 5 x 5 tokens)."""
    preset = build_preset("tiny")
    critic = preset.make_critic("none")
    return preset, critic


def _smooth_images(n, H, W, seed):
    """Natural-looking test images in [-1, 1]: upsampled low-frequency noise plus a linear gradient."""
    g = torch.Generator("cpu").manual_seed(seed)
    low = F.interpolate(
        torch.randn(n, 3, 4, 3, generator=g), size=(H, W), mode="bicubic", align_corners=False
    )
    ramp = torch.linspace(-1, 1, W)[None, None, None, :] * torch.rand(n, 3, 1, 1, generator=g)
    return torch.tanh(0.8 * low + ramp)


@pytest.fixture(scope="module")
def fitted(tiny):
    preset, critic = tiny
    gen = preset.generator
    images = _smooth_images(12, gen.height, gen.width, seed=0)
    return fit_latent_adapter(critic, gen, images, steps=60, batch_size=4, lr=3e-3, progress=False, **ARCH)


def test_resample_follows_the_critic_processor(tiny):
    """Critic token (i, j) averages the latent patches its pixels come from: checked against the critic's own
    bridge on indicator images (one latent block lit), which includes the processor's center crop. The
    bridge clips bicubic overshoot, the matrices do not: agreement to 0.03."""
    preset, critic = tiny
    gen = preset.generator
    ad = LatentAdapter.for_pair(critic, gen, **ARCH)
    ry, rx = ad.resample_rows, ad.resample_cols  # (5, 8), (5, 6)
    (h, w), f, p = gen.latent_size, gen.height // gen.latent_size[0], critic.patch_size
    blocks = torch.zeros(h * w, 3, gen.height, gen.width)
    for k in range(h * w):
        r, c = divmod(k, w)
        blocks[k, :, r * f : (r + 1) * f, c * f : (c + 1) * f] = 1.0
    pv = critic.prepare(blocks, input_range=(0.0, 1.0), backend="torch", fuse_patch_embed=False).pixel_values
    scale, shift = critic.spec.normalize_affine()
    u = (pv[:, 0] - shift[0]) / scale[0]  # back to [0, 1]
    gh, gw = ad.identity.token_grid
    per_token = u.reshape(h * w, gh, p, gw, p).mean((2, 4))  # (blocks, gh, gw)
    want = torch.einsum("ir,jc->rcij", ry, rx).reshape(h * w, gh, gw)
    assert (per_token - want).abs().max() < 0.03
    # every critic token lies inside the image (a crop, no pad): its weights sum to 1; the crop of the
    # 40 resized rows to 30 leaves the top latent row with less weight than a middle one
    assert ry.sum(1).sub(1).abs().max() < 1e-5 and rx.sum(1).sub(1).abs().max() < 1e-5
    assert ry[:, 0].sum() < 0.75 * ry[:, 3].sum()


def test_fit_learns_and_the_adapter_is_frozen(tiny, fitted):
    """The distillation loss falls (random-weight critics make held-out fidelity a benchmark matter:
    benchmarks/bench_latent.py), and the fitted adapter comes back frozen."""
    info = fitted.fit_info
    assert info["final_loss"] < 0.8 * info["first_loss"], info
    assert not any(p.requires_grad for p in fitted.parameters()) and not fitted.training
    assert info["steps"] == 60 and info["images"] == 12
    with pytest.raises(ValueError, match="images must be 64x48"):
        fit_latent_adapter(tiny[1], tiny[0].generator, torch.zeros(2, 3, 32, 32), steps=1)
    with pytest.raises(ValueError, match="NaN"):
        fit_latent_adapter(tiny[1], tiny[0].generator, torch.full((2, 3, 64, 48), float("nan")), steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit_latent_adapter(tiny[1], tiny[0].generator, torch.zeros(2, 3, 64, 48), steps=0)


def test_save_load_roundtrip(tiny, fitted, tmp_path):
    preset, critic = tiny
    path = tmp_path / "adapter.safetensors"
    fitted.save(path)
    back = LatentAdapter.load(path, critic=critic, generator=preset.generator)
    x = torch.randn(3, 4, *preset.generator.latent_size)
    torch.testing.assert_close(
        back(x, torch.tensor([0.0, 0.4, 0.9])), fitted(x, torch.tensor([0.0, 0.4, 0.9]))
    )
    assert back.identity == fitted.identity and back.fit_info["steps"] == 60
    torch.testing.assert_close(back(x, 0.25), back(x, torch.full((3,), 0.25)))  # float sigma == tensor sigma


def test_mismatches_are_refused_by_name(tiny, fitted, tmp_path):
    preset, critic = tiny
    path = tmp_path / "adapter.safetensors"
    fitted.save(path)
    other = build_preset("tiny-janus").make_critic("none")  # another critic: 4 x 4 tokens, another config
    with pytest.raises(LatentAdapterMismatch, match="token_grid") as e:
        LatentAdapter.load(path, critic=other)
    assert {"critic", "token_grid", "critic_hash"} <= set(e.value.fields)
    wide = LatentAdapter(
        dataclasses.replace(fitted.identity, critic_width=64),
        (fitted.resample_rows, fitted.resample_cols),
        **ARCH,
    )
    with pytest.raises(LatentAdapterMismatch, match="critic_width") as e:
        critic.attach_latent_adapter(wide)
    assert e.value.fields == ["critic_width"]
    sana, _ = build_generator("tiny-sana")  # 8 latent channels (DC-AE), flow matching
    with pytest.raises(LatentAdapterMismatch, match="latent_channels") as e:
        LatentAdapter.load(path, generator=sana)
    assert "latent_channels" in e.value.fields and "noise" in e.value.fields
    small, _ = build_generator("tiny-sd", height=32)  # 4 x 6 latents: another patch grid
    with pytest.raises(LatentAdapterMismatch, match="latent_size"):
        LatentAdapter.load(path, generator=small)
    with pytest.raises(LatentAdapterMismatch, match="latent_channels"):
        fitted(torch.randn(1, 8, *preset.generator.latent_size), 0.0)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a LatentAdapter file"):
        LatentAdapter.load(tmp_path / "plain.safetensors")


def _hand_caption_ce(critic, adapter, x0, captions, mask):
    """Eager: adapter tokens, then the captions, through the LLaVA LM and lm_head; CE mean over real tokens."""
    lm = critic.language_model
    img = adapter(x0, 0.0)
    seq = torch.cat([img, lm.get_input_embeddings()(captions)], 1)
    B, N = img.shape[:2]
    am = torch.cat([torch.ones(B, N, dtype=torch.long), mask], 1)
    hid = lm(inputs_embeds=seq, attention_mask=am, use_cache=False).last_hidden_state[
        :, N - 1 : N - 1 + captions.shape[1]
    ]
    logits = critic.lm_head(hid).double()
    labels = captions.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / (labels != -100).sum()


def _assert_step_is_hand(out, engine, want, params):
    """The step's loss equals the hand loss `want` (to 2e-6), and its gradients `engine` the hand gradients."""
    want.backward()
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=2e-6, atol=0)
    num = max(float((a - p.grad).abs().max()) for a, p in zip(engine, params, strict=True))
    den = max(float(p.grad.abs().max()) for p in params)
    assert den > 0 and num / den < 1e-4


def _run_step(step, batch, params):
    """(the step's output, the gradients of `params` after its backward); the gradients are cleared again."""
    for p in params:
        p.grad = None
    out = step(batch)
    out.loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out, grads


def test_step_latent_view_equals_hand_and_skips_decode_and_tower(tiny, fitted):
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    step = UNOStep(gen, critic, UNOLoss(), UNOConfig(view="latent", backend="torch"))
    batch = preset.make_batch(seed=5)
    ran = []
    watch = (
        ("vae.decoder", gen.vae.decoder),
        ("vision_tower", critic.vision_tower),
        ("projector", critic.projector),
    )
    hooks = [m.register_forward_hook(lambda *a, n=n: ran.append(n)) for n, m in watch]
    params = [p for p in gen.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = step(batch)
    out.loss.backward()
    for h in hooks:
        h.remove()
    assert ran == [] and out.images is None
    engine = [p.grad.clone() for p in params]
    assert all(p.grad is None for p in fitted.parameters())  # frozen adapter
    for p in params:
        p.grad = None
    x0 = gen.generate_latents(batch)  # the same seed: the same draw and grad step
    want = _hand_caption_ce(critic, fitted, x0, batch["captions"], batch["caption_mask"])
    _assert_step_is_hand(out, engine, want, params)


def test_hard_negatives_equal_separate_passes_with_an_adapter(tiny, fitted):
    """The packed negatives pass of the adapter view (the critic's prefix around the adapter tokens, K+1
    captions after it under a block mask) against K+1 separate `LatentCritic` passes: loss (float64
    log-softmax over the vocabulary) and the denoiser's gradients."""
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    w_neg, K = 0.7, 3
    step = UNOStep(
        gen, critic, UNOLoss(caption=1.0, negatives=w_neg), UNOConfig(view="latent", backend="torch")
    )
    batch = preset.make_batch(seed=4)
    B, L = batch["captions"].shape
    g = torch.Generator().manual_seed(11)
    batch["caption_mask"] = torch.ones(B, L, dtype=torch.long)
    batch["caption_mask"][1, L - 4 :] = 0
    batch["negative_captions"] = torch.randint(1, preset.caption_vocab(), (B, K, L), generator=g)
    batch["negative_caption_mask"] = torch.ones(B, K, L, dtype=torch.long)
    batch["negative_caption_mask"][0, 2, L // 2 :] = 0
    params = [p for p in gen.parameters() if p.requires_grad]
    out, engine = _run_step(step, batch, params)
    view = LatentCritic(critic, gen)
    inputs = view.prepare(gen(batch, view="latent"))  # the same seed: the same draw and grad step
    caps = torch.cat([batch["captions"][:, None], batch["negative_captions"]], 1)
    masks = torch.cat([batch["caption_mask"][:, None], batch["negative_caption_mask"]], 1)
    scores = []
    for j in range(K + 1):
        o = view(inputs, caps[:, j], masks[:, j])
        logp = torch.log_softmax(o.caption_hidden.double() @ o.lm_head_weight.double().T, -1)
        scores.append((logp.gather(-1, caps[:, j, :, None]).squeeze(-1) * masks[:, j]).sum(-1))
    s = torch.stack(scores, 1)
    want = -s[:, 0].sum() / masks[:, 0].sum() + w_neg * (torch.logsumexp(s, 1) - s[:, 0]).mean()
    want.backward()
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    num = sum(float((a - p.grad).double().norm() ** 2) for a, p in zip(engine, params, strict=True)) ** 0.5
    den = sum(float(p.grad.double().norm() ** 2) for p in params) ** 0.5
    assert den > 0 and num / den < 1e-5, num / den


@pytest.mark.parametrize("window", [(0.0, 0.5), (1.0, 1.0)])
def test_xt_input_is_the_grad_steps_noised_output(tiny, fitted, window):
    preset, critic = tiny
    gen, _ = build_generator("tiny-sd", grad_window=window, num_inference_steps=8)
    gen.load_state_dict(preset.generator.state_dict())
    critic.attach_latent_adapter(fitted)
    view = LatentCritic(critic, gen, latent_input="xt")
    batch = preset.make_batch(seed=2)
    lat = gen.latents_for_critic(batch)
    i = gen.last_step_index
    x_in = gen.last_grad_steps[-1].x_t.detach()
    with torch.no_grad():
        x_next, x0, _ = gen._step(x_in, i, gen.conditioning(batch))
    torch.testing.assert_close(lat.xt.detach(), x_next, rtol=1e-5, atol=1e-6)
    if window == (1.0, 1.0):  # the end of the schedule: the final sample, at DDIM's final noise level
        # (set_alpha_to_one=False: sigma = sqrt(1 - alphas_cumprod[0]) = 0.029 for the scaled-linear betas)
        assert lat.sigma_t == pytest.approx(0.0291551, abs=1e-6)
    else:
        assert 0.05 < lat.sigma_t < 1.0 and lat.xt.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(view.prepare(lat).image_embeds, fitted(lat.xt, lat.sigma_t))
        torch.testing.assert_close(LatentCritic(critic, gen).prepare(lat).image_embeds, fitted(lat.x0, 0.0))
    with pytest.raises(ValueError, match="latent_input"):
        LatentCritic(critic, gen, latent_input="both")


def test_regression_heads_read_lm_states_in_latent_view(tiny, fitted):
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    loss = UNOLoss(density=1.0, structure=1.0, structure_mode="features")
    step = UNOStep(gen, critic, loss, UNOConfig(view="latent"))
    batch = preset.make_batch(seed=1)
    batch["reference_images"] = _smooth_images(2, gen.height, gen.width, seed=7)
    out = step(batch)
    out.loss.backward()
    assert loss.density_head.in_dim == critic.hidden_size
    assert {"density", "structure", "density_head_fit"} <= set(out.metrics)
    assert loss.density_head.fc1.weight.grad is not None and loss.density_head.fc1.weight.grad.abs().sum() > 0


def test_missing_adapter_and_foreign_adapter_list_the_reasons(tiny, fitted):
    preset, _ = tiny
    bare = preset.make_critic("none", cache=False)
    with pytest.raises(ValueError, match="no LatentAdapter is attached"):
        UNOStep(preset.generator, bare, UNOLoss(), UNOConfig(view="latent"))
    bare.attach_latent_adapter(fitted)
    small, _ = build_generator("tiny-sd", height=32)
    with pytest.raises(ValueError, match="does not fit this generator: latent_size"):
        UNOStep(small, bare, UNOLoss(), UNOConfig(view="latent"))


def test_noise_latents_families():
    x0, eps, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0.0, 0.6])
    flow = noise_latents(x0, s, eps, "flow")
    ddpm = noise_latents(x0, s, eps, "ddpm")
    torch.testing.assert_close(flow[0], x0[0]) and torch.testing.assert_close(ddpm[0], x0[0])
    torch.testing.assert_close(flow[1], 0.4 * x0[1] + 0.6 * eps[1])
    torch.testing.assert_close(ddpm[1], 0.8 * x0[1] + 0.6 * eps[1])


# ----------------------------------------------------------------------------- caption distillation and pooling
def _captions(preset, n, L, seed):
    g = torch.Generator("cpu").manual_seed(seed)
    ids = torch.randint(1, preset.caption_vocab(), (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, L - 2 :] = 0  # one padded caption
    return ids, mask


def test_caption_logits_equal_the_critics_own_forward(tiny):
    """caption_logits (what the fit's KL and bench_latent read) is the critic's own forward: the pixel path's
    tokens through it give Critic.forward's logits, padding included."""
    from uno_engine.latent import caption_logits

    preset, critic = tiny
    gen = preset.generator
    images = _smooth_images(3, gen.height, gen.width, seed=11)
    ids, mask = _captions(preset, 3, 6, seed=1)
    inputs = critic.prepare(images, fuse_patch_embed=False)
    want = critic(inputs, ids, mask).logits()
    tokens = critic.encode_image_tokens(inputs)[0]
    got = caption_logits(critic, tokens, ids, mask)
    assert got.shape == (3, 6, critic.lm_head_weight.shape[0])
    m = mask.bool()
    torch.testing.assert_close(got[m], want.float()[m], rtol=1e-5, atol=1e-5)


def test_caption_loss_falls_and_bad_captions_are_refused(tiny):
    preset, critic = tiny
    gen = preset.generator
    images = _smooth_images(8, gen.height, gen.width, seed=0)
    ids, mask = _captions(preset, 8, 5, seed=2)
    # the random LM barely reads the image (KL ~0.003 nats at the mean token); a large weight on clean
    # latents makes the caption term the one the fit follows
    ad = fit_latent_adapter(
        critic,
        gen,
        images,
        steps=40,
        captions=(ids, mask),
        caption_weight=1e3,
        clean_fraction=1.0,
        batch_size=8,
        lr=3e-3,
        progress=False,
        **ARCH,
    )
    info = ad.fit_info
    assert info["captions"] and info["clean_fraction"] == 1.0
    assert info["final_caption_kl"] < 0.8 * info["first_caption_kl"], info
    fit = dict(steps=1, progress=False, **ARCH)
    with pytest.raises(ValueError, match="one row per image"):
        fit_latent_adapter(critic, gen, images, captions=ids[:3], **fit)
    with pytest.raises(ValueError, match="caption token ids must lie in"):
        fit_latent_adapter(critic, gen, images, captions=ids + 10_000, **fit)
    with pytest.raises(ValueError, match="at least one real token"):
        fit_latent_adapter(critic, gen, images, captions=(ids, mask * 0), **fit)
    with pytest.raises(ValueError, match="caption mask"):
        fit_latent_adapter(critic, gen, images, captions=(ids, mask[:, :2]), **fit)
    with pytest.raises(ValueError, match="captions must be"):
        fit_latent_adapter(critic, gen, images, captions=ids.float(), **fit)
    with pytest.raises(ValueError, match="clean_fraction"):
        fit_latent_adapter(critic, gen, images, clean_fraction=1.5, **fit)
    with pytest.raises(ValueError, match="caption_weight"):
        fit_latent_adapter(critic, gen, images, captions=ids, caption_weight=0.0, **fit)


def test_pool_tokens_is_the_block_mean():
    from uno_engine.latent.fit import pool_tokens

    t = torch.randn(2, 4 * 6, 3, dtype=torch.float64)
    got = pool_tokens(t, (4, 6), 2)
    grid = t.view(2, 4, 6, 3)
    want = torch.stack(
        [grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((1, 2)) for r in range(2) for c in range(3)], 1
    )
    torch.testing.assert_close(got, want)
    assert pool_tokens(t, (4, 6), 1) is t


def test_pooled_adapter_emits_fewer_tokens_and_runs_the_step(tiny, tmp_path):
    """pool=5 on the 5 x 5-token critic: one token per image. Its resample rows average the critic's rows;
    a bad pool is refused by name; fitting it without captions is refused; fitted with captions it saves,
    loads and drives a latent-view step (the LM reads 1 image token instead of 25)."""
    preset, critic = tiny
    gen = preset.generator
    with pytest.raises(ValueError, match="pool must be an int >= 1 dividing"):
        LatentAdapter.for_pair(critic, gen, pool=2, **ARCH)
    full = LatentAdapter.for_pair(critic, gen, **ARCH)
    ad = LatentAdapter.for_pair(critic, gen, pool=5, **ARCH)
    assert ad.grid == (1, 1) and full.grid == full.identity.token_grid == (5, 5)
    torch.testing.assert_close(ad.resample_rows, full.resample_rows.mean(0, keepdim=True))
    images = _smooth_images(6, gen.height, gen.width, seed=3)
    with pytest.raises(ValueError, match="pooled adapter"):
        fit_latent_adapter(critic, gen, images, steps=1, adapter=ad, progress=False)
    ids, mask = _captions(preset, 6, 5, seed=4)
    ad = fit_latent_adapter(
        critic, gen, images, steps=3, captions=(ids, mask), adapter=ad, batch_size=2, progress=False
    )
    ad.save(tmp_path / "pooled.safetensors")
    back = LatentAdapter.load(tmp_path / "pooled.safetensors", critic=critic, generator=gen)
    assert back.grid == (1, 1) and back.arch["pool"] == 5
    x = torch.randn(2, 4, *gen.latent_size)
    assert back(x, 0.0).shape == (2, 1, critic.hidden_size)
    torch.testing.assert_close(back(x, 0.3), ad(x, 0.3))
    critic.attach_latent_adapter(back)
    try:
        lc = LatentCritic(critic, gen)
        out = lc(lc.prepare(_smooth_images(2, gen.height, gen.width, seed=9)), ids[:2], mask[:2])
        assert out.patch_features.shape[1] == 1 and out.grid == (1, 1)
    finally:
        critic.attach_latent_adapter(full)


def test_default_patch_size_matches_a_critic_token():
    """The largest latent patch whose pixels fit in one critic token: tiny critic, 5 x 5 tokens of a 64 x 48
    image (9.6 px per token); latents at 8 px -> 1, at 2 px -> 4 (8 px), at 4 px -> 2."""
    from types import SimpleNamespace

    from uno_engine.latent.adapter import default_patch_size

    critic = build_preset("tiny").make_critic("none")
    for (h, w), want in (((8, 6), 1), ((32, 24), 4), ((16, 12), 2)):
        gen = SimpleNamespace(latent_size=(h, w), height=64, width=48)
        assert default_patch_size(critic, gen) == want, (h, w)


# ----------------------------------------------------------------------------- noise-aware reading (ReadAugment)
def _renoise_read(gen, views=3, window=(50.0, 600.0), seed=4):
    """A noise-aware reading in the tiny SD generator's own forward process (DDPM: its alphas_cumprod)."""
    return ReadAugment(views=views, renoise=window, schedule=gen.scheduler.alphas_cumprod, seed=seed)


def _latents(x0):
    return GeneratedLatents(kind="latents", grid=tuple(x0.shape[2:]), x0=x0, xt=x0.detach(), sigma_t=0.0)


def test_renoised_latent_view_matches_float64_reference(tiny, fitted):
    """The adapter tokens of K re-noised views and their gradient to the latent, against a float64 statement of
    the forward process (x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) eps, eps the draw's counter hash) read by a
    float64 copy of the adapter conditioned on each view's sigma. Forward: within 2x the fp32 hand
    computation's error + 1e-5; gradient: within 1e-5 of its largest entry."""
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    read = _renoise_read(gen)
    view = LatentCritic(critic, gen, read=read)
    B, (h, w), K = 2, gen.latent_size, read.views
    views = read.draw(B, h, w, step=3, sample_offset=5)
    x0 = torch.randn(B, 4, h, w, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = view.prepare(_latents(x0), views=views).image_embeds
    assert out.shape == (B * K, *fitted(x0[:1], 0.0).shape[1:])
    # the forward process, in float64, from the schedule itself
    ac = gen.scheduler.alphas_cumprod.double()
    g = np.random.default_rng([read.seed, 3, 5])  # image 0's draws: keys first, then the levels
    g.integers(0, 1 << 32, size=(K, 2), dtype=np.int64)
    t0 = torch.from_numpy(np.rint(g.uniform(*read.renoise, size=K)).astype(np.int64))
    a64 = torch.from_numpy(views.alpha).double()
    s64 = torch.from_numpy(views.renoise_std).double()
    torch.testing.assert_close(a64[:K], ac[t0].sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s64[:K], (1 - ac[t0]).sqrt(), rtol=1e-12, atol=0)
    assert 0.05 < float(s64.min()) and float(s64.max()) < 0.95  # a real range of levels
    eps = hash_normal(torch.from_numpy(views.keys), 4 * h * w).double().view(B * K, 4, h, w)
    x64 = x0.detach().double().requires_grad_(True)
    xt64 = a64.view(-1, 1, 1, 1) * x64.repeat_interleave(K, 0) + s64.view(-1, 1, 1, 1) * eps
    ad64 = copy.deepcopy(fitted).double()
    ref = ad64(xt64, s64)
    with torch.no_grad():  # the same computation by hand in fp32: the rounding the 2x rule allows
        xt32 = (
            a64.float().view(-1, 1, 1, 1) * x0.repeat_interleave(K, 0)
            + s64.float().view(-1, 1, 1, 1) * eps.float()
        )
        hand = fitted(xt32, s64.float())
    err, hand_err = (out.double() - ref).abs().max(), (hand.double() - ref).abs().max()
    assert err <= 2 * hand_err + 1e-5, (float(err), float(hand_err))
    wgt = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * wgt).sum().backward()
    (ref * wgt).sum().backward()
    gerr = (x0.grad.double() - x64.grad).abs().max()
    assert x64.grad.abs().max() > 0 and gerr <= 1e-5 * x64.grad.abs().max(), float(gerr)
    # the views differ: each is read at its own level (not K copies of one read)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_renoised_views_reproducible_and_per_global_sample(tiny, fitted):
    """Two calls with the same (seed, step, global index) give the same tokens bit for bit; a rank holding
    image 1 alone (sample_offset=1) draws that image's views exactly; another step draws other views."""
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    read = _renoise_read(gen, views=2)
    view = LatentCritic(critic, gen, read=read)
    (h, w), K = gen.latent_size, read.views
    x0 = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = view.prepare(_latents(x0), views=read.draw(2, h, w, step=9)).image_embeds
        b = view.prepare(_latents(x0.clone()), views=read.draw(2, h, w, step=9)).image_embeds
        one = view.prepare(_latents(x0[1:]), views=read.draw(1, h, w, step=9, sample_offset=1)).image_embeds
        other = view.prepare(_latents(x0), views=read.draw(2, h, w, step=10)).image_embeds
    assert torch.equal(a, b) and torch.equal(a[K:], one)
    assert (a - other).abs().max() > 1e-3


def test_latent_view_one_plain_view_is_bit_identical(tiny, fitted):
    """UNOConfig(view="latent", read=ReadAugment(views=1)) (renoise=None) is today's latent step, bit for bit."""
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    params = [p for p in gen.parameters() if p.requires_grad]
    res = []
    for read in (None, ReadAugment(views=1)):
        step = UNOStep(gen, critic, UNOLoss(), UNOConfig(view="latent", read=read))
        out, grads = _run_step(step, preset.make_batch(seed=6), params)
        res.append((out.loss.detach(), grads))
    assert torch.equal(res[0][0], res[1][0])
    assert all(torch.equal(x, y) for x, y in zip(res[0][1], res[1][1], strict=True))


def test_renoised_latent_step_averages_over_the_views(tiny, fitted):
    """The step with K re-noised views: its caption loss is the CE over all B * K rows of the adapter tokens of
    `renoise_latents(x0, read.draw(B, h, w, step=batch["read_step"]))`, computed by hand, and the denoiser's
    gradient agrees."""
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    read = _renoise_read(gen, views=2)
    step = UNOStep(gen, critic, UNOLoss(), UNOConfig(view="latent", read=read, backend="torch"))
    batch = preset.make_batch(seed=5)
    batch["read_step"] = 7
    params = [p for p in gen.parameters() if p.requires_grad]
    out, engine = _run_step(step, batch, params)
    x0 = gen.generate_latents(batch)
    B, (h, w) = x0.shape[0], gen.latent_size
    xt, sigma = renoise_latents(x0, read.draw(B, h, w, step=7))

    class _Renoised(torch.nn.Module):  # the adapter at each view's level, as _hand_caption_ce reads it
        def forward(self, x, _sigma):
            return fitted(x, sigma)

    caps, mask = (t.repeat_interleave(2, 0) for t in (batch["captions"], batch["caption_mask"]))
    want = _hand_caption_ce(critic, _Renoised(), xt, caps, mask)
    _assert_step_is_hand(out, engine, want, params)


def test_latent_read_bad_input_names_the_field(tiny, fitted):
    preset, critic = tiny
    gen = preset.generator
    critic.attach_latent_adapter(fitted)
    for kw, field in (
        (dict(shift=1.0), "ReadAugment.shift"),
        (dict(scale=(0.9, 1.1)), "ReadAugment.scale"),
        (dict(blur=0.5), "ReadAugment.blur"),
        (dict(noise=0.1), "ReadAugment.noise"),
    ):
        with pytest.raises(ValueError, match=field):
            UNOConfig(view="latent", read=ReadAugment(views=2, renoise=(0.0, 0.3), **kw))
    with pytest.raises(ValueError, match="representation view"):
        UNOConfig(view="representation", read=ReadAugment(views=2))
    flow = ReadAugment(views=2, renoise=(0.0, 0.3))  # tiny SD is DDPM: the adapter is conditioned on ddpm
    with pytest.raises(ValueError, match="ReadAugment.schedule"):
        UNOStep(gen, critic, UNOLoss(), UNOConfig(view="latent", read=flow))
    with pytest.raises(ValueError, match="latent_input"):
        UNOStep(gen, critic, UNOLoss(), UNOConfig(view="latent", latent_input="xt", read=_renoise_read(gen)))
    read = _renoise_read(gen, views=2)
    view = LatentCritic(critic, gen, read=read)
    (h, w) = gen.latent_size
    x0 = torch.randn(2, 4, h, w)
    with pytest.raises(ValueError, match="views were drawn for 3 latents"):
        view.prepare(_latents(x0), views=read.draw(3, h, w))
    with pytest.raises(ValueError, match="views were drawn for 2 latents of \\(5, 5\\)"):
        view.prepare(_latents(x0), views=read.draw(2, 5, 5))
    with pytest.raises(TypeError, match="views must be uno_engine.read.Views"):
        view.prepare(_latents(x0), views=read)
    boxed = ReadAugment(views=2, shift=1.0).draw(2, h, w)
    with pytest.raises(ValueError, match="views: the latent view reads no crop box"):
        view.prepare(_latents(x0), views=boxed)
    with pytest.raises(ValueError, match="views: reference images"):
        view.prepare(torch.zeros(2, 3, gen.height, gen.width), views=read.draw(2, h, w))
    with pytest.raises(ValueError, match="x0 must be a float"):
        renoise_latents(x0[0], read.draw(2, h, w))
    with pytest.raises(ValueError, match="x0 must be a float"):
        renoise_latents(x0.long(), read.draw(2, h, w))
    with pytest.raises(TypeError, match="views must be"):
        renoise_latents(x0, None)


def test_janus_latent_view_refuses_renoise():
    preset = build_preset("tiny-janus")
    critic = preset.make_critic("none")
    read = ReadAugment(views=2, renoise=(0.0, 0.3))
    with pytest.raises(ValueError, match="ReadAugment.renoise"):
        UNOStep(preset.generator, critic, preset.make_loss(), UNOConfig(view="latent", read=read))


def test_reading_doc_latent_snippet_runs():
    """docs/reading.md's latent-view snippet is a config the step takes (flow family: a flow adapter)."""
    from doc_snippets import python_block

    scope = {}
    exec(python_block("docs/reading.md", "## The latent view: noise-aware reading"), scope)
    read = scope["config"].read
    assert scope["config"].view == "latent" and read.renoise == (0.0, 0.3) and read.schedule == "flow"
