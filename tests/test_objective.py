"""The joint objective: the generator's own loss (generator_loss) and DRaFT+'s KL penalty (kl) in UNOLoss."""

import copy
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uno_engine import Critic, UNOLoss, UNOStep
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator


class Step(NamedTuple):
    x_t: torch.Tensor
    t: float
    index: int
    cond: dict | None
    prediction: torch.Tensor


class ToyDiffusion(nn.Module):
    """A generator with the documented interface: predict / last_grad_steps / denoising_loss, 2 grad steps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def predict(self, x_t, t, cond):
        return self.conv(x_t) * (1.0 + t)

    def forward(self, batch):
        x, steps = batch["noise"], []
        for i, t in enumerate((0.5, 0.25)):
            pred = self.predict(x, t, None)
            steps.append(Step(x, t, i, None, pred))
            x = x - 0.5 * pred
        self.last_grad_steps = steps
        return torch.tanh(x)

    def denoising_loss(self, batch):
        x0, eps = batch["reference_latents"], batch["eps"]
        return (self.predict(0.8 * x0 + 0.6 * eps, 0.3, None) - eps).pow(2).mean()


def _ref_terms(w, b, w0, b0, batch):
    """float64 eager: (generator_loss, kl) from weights (w, b) and initial weights (w0, b0)."""

    def pred(x, t, ww, bb):
        return F.conv2d(x, ww, bb) * (1.0 + t)

    x0, eps = batch["reference_latents"].double(), batch["eps"].double()
    gl = (pred(0.8 * x0 + 0.6 * eps, 0.3, w, b) - eps).pow(2).mean()
    x, kls = batch["noise"].double(), []
    for t in (0.5, 0.25):
        p = pred(x, t, w, b)
        with torch.no_grad():
            p0 = pred(x, t, w0, b0)
        kls.append((p - p0).pow(2).mean())
        x = x - 0.5 * p
    return gl, torch.stack(kls).mean(), torch.tanh(x)


_CRITIC = {}


def _critic():
    if "c" not in _CRITIC:
        model, processor = build_critic_model("tiny-llava-clip")
        _CRITIC["c"] = Critic.from_hf(model, processor)
    return _CRITIC["c"]


def _toy_batch(critic, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "captions": torch.randint(3, critic.vocab_size - 1, (b, 5), generator=g),
        "noise": torch.randn(b, 3, 24, 24, generator=g),
        "reference_latents": torch.randn(b, 3, 24, 24, generator=g),
        "eps": torch.randn(b, 3, 24, 24, generator=g),
    }


def test_generator_loss_and_kl_equal_float64_reference():
    critic = _critic()
    gen = ToyDiffusion()
    w0, b0 = gen.conv.weight.detach().double().clone(), gen.conv.bias.detach().double().clone()
    loss = UNOLoss(caption=0.0, generator_loss=0.7, kl=0.3)
    step = UNOStep(gen, critic, loss)  # the initial model is taken here
    with torch.no_grad():  # "training" moved the weights
        gen.conv.weight.add_(0.2 * torch.randn_like(gen.conv.weight))
        gen.conv.bias.add_(0.1)
    batch = _toy_batch(critic)
    out = step(batch)
    out.loss.backward()
    w = gen.conv.weight.detach().double().requires_grad_()
    b = gen.conv.bias.detach().double().requires_grad_()
    gl, kl, _ = _ref_terms(w, b, w0, b0, batch)
    (0.7 * gl + 0.3 * kl).backward()
    torch.testing.assert_close(out.metrics["generator_loss"].double(), gl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.metrics["kl"].double(), kl.detach(), rtol=1e-5, atol=1e-7)
    assert kl > 1e-3  # the check is not vacuous
    for p, r in ((gen.conv.weight, w), (gen.conv.bias, b)):
        rel = (p.grad.double() - r.grad).norm() / r.grad.norm()
        assert rel < 1e-5, f"generator gradient relative difference {rel:.2e}"


def test_generator_loss_scales_under_accumulation():
    critic = _critic()
    gen = ToyDiffusion()
    loss = UNOLoss(caption=0.0, generator_loss=1.0, kl=1.0)
    step = UNOStep(gen, critic, loss)
    with torch.no_grad():
        gen.conv.weight.add_(0.1)
    batch = _toy_batch(critic, b=4)
    full = step(batch).metrics
    parts = [step({**{k: v[i : i + 2] for k, v in batch.items()}, "num_images": 4}).metrics for i in (0, 2)]
    for name in ("generator_loss", "kl"):
        torch.testing.assert_close(parts[0][name] + parts[1][name], full[name], rtol=1e-5, atol=1e-7)


def test_objective_bad_input():
    critic = _critic()
    gen = ToyDiffusion()
    step = UNOStep(gen, critic, UNOLoss(generator_loss=1.0))
    batch = _toy_batch(critic)
    del batch["reference_latents"]
    with pytest.raises(KeyError, match="reference_latents.*reference_images"):
        step(batch)
    frozen = ToyDiffusion().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable weights"):
        UNOStep(frozen, critic, UNOLoss(kl=1.0))
    with pytest.raises(ValueError, match="`kl`"):
        UNOLoss(kl=-1.0)


# ------------------------------------------------------------------------------- real diffusers / Janus


def _sd_batch(gen, make_batch, critic):
    g = torch.Generator().manual_seed(0)
    batch = make_batch(2, 6, critic.vocab_size - 1, generator=g)
    batch["seed"] = 5
    h, w = gen.latent_size
    batch["reference_latents"] = torch.randn(2, gen.latent_channels, h, w, generator=g)
    return batch


@pytest.mark.parametrize("lora", [False, True])
def test_diffusers_kl_against_a_copy_of_the_initial_denoiser(lora):
    critic = _critic()
    gen, make_batch = build_generator("tiny-sd")
    initial = copy.deepcopy(gen.denoiser).requires_grad_(False)  # the reference: a real weight copy
    if lora:
        from peft import LoraConfig

        gen.denoiser.requires_grad_(False)
        gen.denoiser.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
        )
    loss = UNOLoss(caption=1.0, generator_loss=0.5, kl=2.0)
    step = UNOStep(gen, critic, loss)
    assert (loss._initial.snapshot is None) == lora  # LoRA: adapters disabled, no copy
    if not lora:
        with torch.no_grad():
            for p in gen.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
    batch = _sd_batch(gen, make_batch, critic)
    out = step(batch)
    kls = []
    for st in gen.last_grad_steps:
        with torch.no_grad():
            ref = gen.predict(st.x_t.detach(), st.t, st.cond, denoiser=initial)
        kls.append((st.prediction.detach().double() - ref.double()).pow(2).mean())
    kl = torch.stack(kls).mean()
    assert kl > 0
    torch.testing.assert_close(out.metrics["kl"].double(), kl, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(
        out.metrics["generator_loss"], gen.denoising_loss(batch).detach(), rtol=1e-5, atol=1e-7
    )
    out.loss.backward()
    assert all(p.grad is not None for p in gen.trainable_parameters())


def test_janus_denoising_loss_is_teacher_forced_token_ce():
    model, _ = build_critic_model("tiny-janus")
    from uno_engine.generators import JanusGenerator

    gen = JanusGenerator(model)
    g = torch.Generator().manual_seed(0)
    V = model.model.generation_head.vision_head.out_features
    ids = torch.randint(1, 50, (2, 7), generator=g)
    tokens = torch.randint(0, V, (2, gen.num_image_tokens), generator=g)
    batch = {"gen_input_ids": ids, "reference_image_tokens": tokens}
    loss = gen.denoising_loss(batch)
    # independent path: the generator's own teacher-forced training pass with these tokens
    logits, _, _ = gen._train_logits({"gen_input_ids": ids, "gen_tokens": tokens, "seed": 0})
    ref = F.cross_entropy(logits.double().reshape(-1, V), tokens.reshape(-1))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert model.model.generation_head.vision_head.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="reference_image_tokens"):
        gen.denoising_loss({"gen_input_ids": ids})
    # reference images are VQ-encoded (no grad) into the same kind of targets
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    enc = model.model.vqmodel.encode(images).image_tokens.reshape(2, -1)
    torch.testing.assert_close(
        gen.denoising_loss({"gen_input_ids": ids, "reference_images": images}),
        gen.denoising_loss({"gen_input_ids": ids, "reference_image_tokens": enc}),
    )
