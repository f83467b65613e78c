"""Denoiser families (uno_engine.generators.families) on tiny real diffusers classes, random weights.

What is checked: every family runs one UNO step with gradients to exactly its trainable parameters, and the
engine's step equals the reference path (loss and gradients within 1e-5 relative, fp32); the hooks other
objectives use (`denoising_loss` against diffusers' own noising, `last_grad_steps` / `predict`, latents
without decoding); the VAE latent maps of FLUX.2 and Qwen-Image against their pipelines' formulas; errors
that name the argument; adding a family.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import DiffusersGenerator, register_family
from uno_engine.generators.families import FAMILIES, SD3Family
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator

FAMILY_PRESETS = {
    "sd": "tiny-sd",
    "sdxl": "tiny-sdxl",
    "sd3": "tiny-sd3",
    "flux": "tiny-flux",
    "flux2": "tiny-flux2",
    "qwen-image": "tiny-qwen-image",
    "sana": "tiny-sana",
    "pixart": "tiny-pixart",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def critic():
    model, processor = build_critic_model("tiny-llava-clip")
    return Critic.from_hf(model, processor)


def _batch(make_batch, b=2, seed=0, vocab=50):
    return make_batch(b, 5, vocab, generator=torch.Generator().manual_seed(seed))


def _dead(family: str, name: str) -> bool:
    """Parameters no output depends on: Qwen-Image's last block computes a text-stream output nothing reads
    (only the image stream goes on), so its text MLP and text attention output get no gradient."""
    last = "transformer_blocks.0."  # the tiny preset has one block
    return family == "qwen-image" and any(last + d in name for d in ("attn.to_add_out", "txt_mlp"))


def test_every_family_has_a_preset():
    assert {f.name for f in FAMILIES} == set(FAMILY_PRESETS)


@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_uno_step_engine_equals_reference(family, critic):
    """One UNO step per family: the generator's trainable parameters (and nothing else) get gradients, and the
    engine path equals the reference path on the same seeded sampling."""
    gen, make_batch = build_generator(FAMILY_PRESETS[family], num_inference_steps=4)
    assert gen.kind == family
    batch = _batch(make_batch, vocab=critic.vocab_size)
    trainable = gen.trainable_parameters()
    runs = []
    for backend in ("reference", "auto"):
        gen.zero_grad(set_to_none=True)
        out = UNOStep(gen, critic, UNOLoss(caption=1.0), UNOConfig(backend=backend, read=None))(batch)
        out.loss.backward()
        runs.append((out.loss.detach(), [p.grad.clone() if p.grad is not None else None for p in trainable]))
    (l_ref, g_ref), (l_eng, g_eng) = runs
    names = {id(p): n for n, p in gen.named_parameters()}
    missing = [names[id(p)] for p, g in zip(trainable, g_ref, strict=True) if g is None]
    assert all(_dead(family, n) for n in missing), f"trainable parameters without a gradient: {missing}"
    assert [g is None for g in g_eng] == [g is None for g in g_ref]
    g_ref, g_eng = [g for g in g_ref if g is not None], [g for g in g_eng if g is not None]
    assert not [n for n, p in gen.named_parameters() if not p.requires_grad and p.grad is not None]
    assert all(p.grad is None for p in critic.parameters())
    torch.testing.assert_close(l_eng, l_ref, rtol=1e-5, atol=1e-6)
    num = sum((a - b).double().norm() ** 2 for a, b in zip(g_eng, g_ref, strict=True)) ** 0.5
    den = sum(b.double().norm() ** 2 for b in g_ref) ** 0.5
    print(f"{family}: loss {l_eng.item():.6f} vs {l_ref.item():.6f}; grads relative {num / den:.2e}")
    assert den > 0 and num / den < 1e-5, (
        f"{family}: generator grads differ from the reference: {num / den:.3e}"
    )


# --------------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("family", ["sdxl", "flux", "qwen-image"])
def test_grad_steps_record_and_predict(family):
    gen, make_batch = build_generator(FAMILY_PRESETS[family], num_inference_steps=4, k_grad_steps=2)
    batch = _batch(make_batch)
    x0 = gen(batch, decode=False)
    assert x0.shape == (2, gen.latent_channels, *gen.latent_size) and x0.requires_grad
    steps = gen.last_grad_steps
    assert [s.index for s in steps] == [gen.last_step_index, gen.last_step_index + 1]
    assert all(s.prediction.requires_grad for s in steps)
    # the same seed again, decoded: the images are decode_latents of those latents
    images = gen(batch)
    torch.testing.assert_close(images, gen.decode_latents(x0))
    # predict re-evaluates a recorded call; a frozen copy gives the same, a perturbed copy does not
    s = gen.last_grad_steps[-1]
    with torch.no_grad():
        again = gen.predict(s.x_t.detach(), s.t, s.cond)
        frozen = copy.deepcopy(gen.denoiser).requires_grad_(False)
        same = gen.predict(s.x_t.detach(), s.t, s.cond, denoiser=frozen)
        for p in frozen.parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved = gen.predict(s.x_t.detach(), s.t, s.cond, denoiser=frozen)
    torch.testing.assert_close(again, s.prediction.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(same, again)
    assert (moved - again).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "flux2", "qwen-image"])
def test_denoising_loss_matches_diffusers_noising(family):
    """denoising_loss = mean (prediction - target)^2, with x_t built by the scheduler's own add_noise /
    scale_noise from the same draws (seed + 1), and the target its parameterization's."""
    gen, make_batch = build_generator(FAMILY_PRESETS[family], num_inference_steps=4)
    batch = _batch(make_batch)
    with pytest.raises(KeyError, match="reference_latents.*reference_images"):
        gen.denoising_loss(batch)
    h, w = gen.latent_size
    x0 = torch.randn(2, gen.latent_channels, h, w, generator=torch.Generator().manual_seed(3))
    loss = gen.denoising_loss(batch | {"reference_latents": x0})
    assert loss.dim() == 0 and loss.requires_grad

    g = torch.Generator().manual_seed(batch["seed"] + 1)
    sched = type(gen.scheduler).from_config(gen.scheduler.config)
    if gen.is_flow:
        sigma = torch.rand(2, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        t = sigma * 1000
        x_t = (1 - sigma).view(2, 1, 1, 1) * x0 + sigma.view(2, 1, 1, 1) * eps  # = FlowMatch scale_noise
        target = eps - x0
    else:
        ti = torch.randint(0, 1000, (2,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = sched.add_noise(x0, eps, ti)
        target = eps if gen.prediction_type == "epsilon" else sched.get_velocity(x0, eps, ti)
        t = ti.float()
    with torch.no_grad():
        pred = gen.predict(x_t, t, gen.conditioning(batch, cfg=False))
    torch.testing.assert_close(loss.detach(), (pred - target).pow(2).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    missing = [n for n, p in gen.named_parameters() if p.requires_grad and p.grad is None]
    assert all(_dead(family, n) for n in missing), missing
    assert all(p.grad is None for p in gen.vae.parameters())
    # reference_images are VAE-encoded (no grad) to the same latents encode_images gives
    imgs = torch.rand(2, 3, gen.height, gen.width, generator=torch.Generator().manual_seed(4)) * 2 - 1
    a = gen.denoising_loss(batch | {"reference_images": imgs})
    b = gen.denoising_loss(batch | {"reference_latents": gen.encode_images(imgs)})
    torch.testing.assert_close(a, b)


def test_flow_matching_noising_is_the_schedulers():
    """The flow x_t used above is FlowMatchEulerDiscreteScheduler.scale_noise at that sigma."""
    gen, _ = build_generator("tiny-sd3", num_inference_steps=4)
    sched = type(gen.scheduler).from_config(gen.scheduler.config)
    sched.set_timesteps(4)
    x0, eps = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    t = sched.timesteps[1:2]
    sigma = float(sched.sigmas[1])
    torch.testing.assert_close(sched.scale_noise(x0, t, eps), (1 - sigma) * x0 + sigma * eps)


# --------------------------------------------------------------------------------------------- VAE maps
def test_flux2_and_qwen_latent_maps_follow_their_pipelines():
    from diffusers import Flux2KleinPipeline

    gen, _ = build_generator("tiny-flux2")
    lat = torch.randn(1, gen.latent_channels, *gen.latent_size)
    vae = gen.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        want = vae.decode(Flux2KleinPipeline._unpatchify_latents(lat * std + mean), return_dict=False)[0]
        torch.testing.assert_close(gen.decode_latents(lat), want)
        imgs = torch.rand(1, 3, gen.height, gen.width) * 2 - 1
        z = vae.encode(imgs).latent_dist.mode()
        torch.testing.assert_close(
            gen.encode_images(imgs), (Flux2KleinPipeline._patchify_latents(z) - mean) / std
        )

    gen, _ = build_generator("tiny-qwen-image")
    vae, n = gen.vae, gen.vae.config.z_dim
    lat = torch.randn(1, gen.latent_channels, *gen.latent_size)
    m = torch.tensor(vae.config.latents_mean).view(1, n, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, n, 1, 1, 1)
    with torch.no_grad():
        want = vae.decode(lat[:, :, None] / inv_std + m, return_dict=False)[0][:, :, 0]
        torch.testing.assert_close(gen.decode_latents(lat), want)


# --------------------------------------------------------------------------------------------- errors
def test_sdxl_unet_runs():
    """An SDXL UNet (addition_embed_type="text_time") used to fail with `TypeError: argument of type
    'NoneType' is not iterable` (no added_cond_kwargs); its family supplies text_embeds and time_ids."""
    gen, make_batch = build_generator("tiny-sdxl", num_inference_steps=4)
    batch = _batch(make_batch)
    images = gen(batch)
    assert images.shape == (2, 3, 32, 48)
    # the time ids are built from the output size; other time ids change the output
    other = gen(batch | {"add_time_ids": torch.tensor([[64.0, 64, 8, 8, 32, 48]] * 2)})
    assert not torch.allclose(images, other)


def test_errors_name_the_argument():
    gen, make_batch = build_generator("tiny-flux", num_inference_steps=4)
    batch = _batch(make_batch)
    with pytest.raises(KeyError, match="pooled_prompt_embeds"):
        gen({k: v for k, v in batch.items() if k != "pooled_prompt_embeds"})
    with pytest.raises(ValueError, match="pooled_prompt_embeds.*\\(2, 24\\)"):
        gen(batch | {"pooled_prompt_embeds": torch.randn(2, 23)})
    with pytest.raises(ValueError, match=r"height=44, width=48.*multiples of 8"):
        build_generator("tiny-flux", height=44)  # VAE factor 4 x packing 2
    with pytest.raises(ValueError, match=r"height=32, width=36.*multiples of 8"):
        build_generator("tiny-sd3", width=36)  # VAE factor 4 x patch 2
    with pytest.raises(ValueError, match=r"height=36.*multiples of 8"):
        build_generator("tiny-flux2", height=36)  # VAE factor 4 x FLUX.2's 2x2 patchify
    cfg, _ = build_generator("tiny-sdxl", guidance_scale=2.0)
    b2 = _batch(make_batch) | {"pooled_prompt_embeds": torch.randn(2, 16)}
    b2["prompt_embeds"] = torch.randn(2, 10, 32)
    b2["negative_prompt_embeds"] = torch.zeros(2, 10, 32)
    with pytest.raises(KeyError, match="negative_pooled_prompt_embeds"):
        cfg(b2)
    b2["negative_pooled_prompt_embeds"] = torch.zeros(2, 16)
    assert cfg(b2).shape == (2, 3, 32, 48)


def test_unsupported_denoiser_lists_the_families():
    gen, _ = build_generator("tiny-sd3")
    with pytest.raises(TypeError) as e:
        DiffusersGenerator(nn.Linear(2, 2), gen.scheduler, gen.vae)
    msg = str(e.value)
    assert "Linear" in msg and all(f.name in msg and f.description in msg for f in FAMILIES), msg


class _WrappedSD3(nn.Module):
    """A user's wrapper around an SD3 transformer (e.g. a compiled or sharded module)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    def forward(self, **kwargs):
        return self.inner(**kwargs)


class _WrappedSD3Family(SD3Family):
    name = "wrapped-sd3"
    denoiser_classes = ("_WrappedSD3",)
    description = "test: a wrapped SD3 transformer"


def test_register_family():
    gen, make_batch = build_generator("tiny-sd3", num_inference_steps=4)
    batch = _batch(make_batch)
    wrapped = _WrappedSD3(gen.denoiser)
    with pytest.raises(TypeError, match="_WrappedSD3"):
        DiffusersGenerator(wrapped, gen.scheduler, gen.vae, num_inference_steps=4, height=32, width=48)
    register_family(_WrappedSD3Family)
    try:
        g2 = DiffusersGenerator(wrapped, gen.scheduler, gen.vae, num_inference_steps=4, height=32, width=48)
        assert g2.kind == "wrapped-sd3"
        torch.testing.assert_close(g2(batch), gen(batch))
    finally:
        FAMILIES.remove(_WrappedSD3Family)
    with pytest.raises(TypeError, match="DenoiserFamily"):
        register_family(int)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "flux2", "qwen-image"])
def test_bf16_with_cfg_follows_fp32(family):
    """bf16 weights and CFG (negative rows in front): the images follow the same model in fp32 (the casts
    and the doubled conditioning are right), within bf16's error over a few steps."""
    name = FAMILY_PRESETS[family]
    gen32, make_batch = build_generator(name, num_inference_steps=3, guidance_scale=2.0)
    gen16, _ = build_generator(name, dtype=torch.bfloat16, num_inference_steps=3, guidance_scale=2.0)
    gen16.load_state_dict({k: v.to(torch.bfloat16) for k, v in gen32.state_dict().items()})
    batch = _batch(make_batch)
    for key in [k for k in list(batch) if k.startswith(("prompt_embeds", "pooled_prompt_embeds"))]:
        if not key.endswith("mask"):
            batch["negative_" + key] = 0.5 * batch[key].flip(0)
    images16 = gen16(
        {
            k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()
        }
    )
    images32 = gen32(batch)
    assert images16.dtype == torch.bfloat16 and images32.dtype == torch.float32
    rel = (images16.float() - images32).norm() / images32.norm()
    assert rel < 0.05, f"{family}: bf16 images differ from fp32 by {rel:.3f} (relative)"
    images16.float().mean().backward()
    missing = [n for n, p in gen16.named_parameters() if p.requires_grad and p.grad is None]
    assert all(_dead(family, n) for n in missing), missing


def test_distilled_guidance_reaches_the_model():
    gen, make_batch = build_generator("tiny-flux", num_inference_steps=3)
    other, _ = build_generator("tiny-flux", num_inference_steps=3, distilled_guidance=1.0)
    other.load_state_dict(gen.state_dict())
    batch = _batch(make_batch)
    cond = gen.conditioning(batch)
    assert torch.equal(cond["guidance"], torch.full((2,), 3.5))
    assert not torch.allclose(gen(batch), other(batch))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "qwen-image", "sana"])
def test_cfg_prediction_is_the_guided_combination(family):
    """With CFG, one doubled call equals uncond + s (cond - uncond) from two plain calls on the negative and
    the positive conditioning (every conditioning key, pooled embeds and masks included, is doubled)."""
    gen, make_batch = build_generator(FAMILY_PRESETS[family], num_inference_steps=3, guidance_scale=3.0)
    batch = _batch(make_batch)
    neg = {}
    for key in [k for k in list(batch) if k.startswith(("prompt_", "pooled_prompt_embeds"))]:
        v = batch[key]
        neg["negative_" + key] = v.flip(1) if key.endswith("mask") else torch.randn_like(v)
    batch |= neg
    negative_only = {k: v for k, v in batch.items() if not k.startswith(("prompt_", "pooled_"))}
    negative_only |= {k[len("negative_") :]: v for k, v in neg.items()}
    x = torch.randn(2, gen.latent_channels, *gen.latent_size)
    t = gen._timesteps[1]
    with torch.no_grad():
        guided = gen.predict(x, t, gen.conditioning(batch))
        cond = gen.predict(x, t, gen.conditioning(batch, cfg=False))
        uncond = gen.predict(x, t, gen.conditioning(negative_only, cfg=False))
    want = uncond + 3.0 * (cond - uncond)
    if family == "qwen-image":  # the pipeline's true CFG: rescaled per packed token to the cond norm
        from diffusers import QwenImagePipeline

        h, w = gen.latent_size

        def pack(v):
            return QwenImagePipeline._pack_latents(v, 2, gen.latent_channels, h, w)

        tokens = pack(want) * (pack(cond).norm(dim=-1, keepdim=True) / pack(want).norm(dim=-1, keepdim=True))
        want = QwenImagePipeline._unpack_latents(tokens, gen.height, gen.width, gen.pixels_per_latent)[
            :, :, 0
        ]
    torch.testing.assert_close(guided, want, rtol=1e-4, atol=1e-5)
    assert (cond - uncond).abs().max() > 1e-4


def test_posterior_mode_of_each_encode_output_kind():
    """KL VAEs return latent_dist, DC-AE returns .latent, a tuple-returning encode returns the latent itself
    (a plain tensor's .mode() is the statistical mode along a dim, not a latent) or a distribution."""
    from types import SimpleNamespace

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from uno_engine.generators.families.base import posterior_mode

    z = torch.randn(2, 4, 3, 5)
    params = torch.cat([z, torch.zeros_like(z)], dim=1)  # mean z, log-variance 0
    assert torch.equal(posterior_mode(SimpleNamespace(latent_dist=DiagonalGaussianDistribution(params))), z)
    assert torch.equal(posterior_mode(SimpleNamespace(latent=z)), z)
    assert torch.equal(posterior_mode((z,)), z)
    assert torch.equal(posterior_mode((DiagonalGaussianDistribution(params),)), z)
