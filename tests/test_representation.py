"""The representation view (`UNOConfig(view="representation")`, uno_engine.representation): the frozen critic's
LM reads the generator's own hidden states for a noised latent through the generator's trainable head.

Tiny SD generator (UNet, DDIM epsilon) + tiny LLaVA-CLIP critic, random weights. What is checked: the head
reads the named block; one denoiser call with grad per pass, no decode, no vision tower on generated pixels,
a no-grad sample only where the batch has no real image; gradients reach the generator and the head, never
the critic; the generator's own loss comes from the same call (recomputed by hand); the metaquery regression
is the cosine to the critic's tokens of the clean image; `noise_at` against the float64 formula; masked prompts
read the negative conditioning; the head is saved with the generator; `read_tokens` equals the critic's own
pass on the same image tokens; copy_leak; errors name the argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uno_engine import UNOConfig, UNOLoss, UNOStep
from uno_engine.representation import (
    RepresentationHead,
    attach_representation,
    copy_leak,
    critic_image_tokens,
    fit_head,
    read_tokens,
)
from uno_engine.representation.capture import block_output
from uno_engine.testing.presets import build_preset
from uno_engine.testing.presets.generators import build_generator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # learning_lib, for its arms


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def critic():
    return build_preset("tiny").make_critic("none")


def _pair(critic, *, seed=0, **head):
    gen, make_batch = build_generator("tiny-sd", num_inference_steps=4)
    batch = make_batch(2, 6, critic.vocab_size, generator=torch.Generator().manual_seed(seed))
    batch["negative_prompt_embeds"] = torch.zeros_like(batch["prompt_embeds"])
    torch.manual_seed(seed)
    attach_representation(critic, gen, batch, block=head.pop("block", "mid_block"), **head)
    return gen, batch


def _with_images(gen, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {**batch, "reference_images": torch.rand(2, 3, gen.height, gen.width, generator=g) * 2 - 1}


class _Calls:
    def __init__(self, module):
        self.grad = self.no_grad = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.no_grad += 1


def test_the_head_reads_the_named_block(critic):
    gen, batch = _pair(critic, block="up_blocks.0")
    head = gen.representation
    assert head.out_dim == critic.hidden_size and head.num_tokens == 25  # the critic's 5 x 5 tokens
    with block_output(gen.denoiser, "up_blocks.0") as box:
        rep = gen(_with_images(gen, batch), view="representation")
    torch.testing.assert_close(rep.tokens, head(box["hidden"], gen.latent_size))
    assert rep.tokens.shape == (2, 25, critic.hidden_size)


def test_one_grad_call_no_decode_no_vision_tower(critic):
    gen, batch = _pair(critic)
    step = UNOStep(gen, critic, UNOLoss(caption=1.0), UNOConfig(view="representation"))
    den, dec = _Calls(gen.denoiser), _Calls(gen.vae.decoder)
    tower = _Calls(critic.hf_model.model.vision_tower)
    try:
        step(_with_images(gen, batch))  # a real image: x_t from it, nothing sampled
        assert (den.grad, den.no_grad, dec.grad + dec.no_grad, tower.grad + tower.no_grad) == (1, 0, 0, 0)
        den.grad = den.no_grad = 0
        out = step(batch)  # no real image: the generator's own no-grad sample, re-noised
        assert (den.grad, den.no_grad, tower.grad + tower.no_grad) == (1, gen.num_inference_steps, 0)
    finally:
        tower.handle.remove()
    assert out.images is None and "generator_loss" not in out.metrics


def test_gradients_reach_generator_and_head_not_critic(critic):
    gen, batch = _pair(critic)
    loss = UNOLoss(caption=1.0, generator_loss=1.0, structure=0.5, structure_mode="features")
    step = UNOStep(gen, critic, loss, UNOConfig(view="representation"))
    out = step(_with_images(gen, batch))
    out.loss.backward()
    for name, p in list(gen.denoiser.named_parameters()) + list(gen.representation.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in gen.representation.parameters()) > 0
    assert all(p.grad is None for p in critic.parameters())
    assert {"caption_ce", "generator_loss", "structure"} <= set(out.metrics)


def test_own_loss_is_the_same_call_and_regression_is_the_metaquery_cosine(critic):
    gen, batch = _pair(critic)
    batch = _with_images(gen, batch)
    loss = UNOLoss(caption=0.0, generator_loss=1.0, structure=1.0, structure_mode="features")
    step = UNOStep(gen, critic, loss, UNOConfig(view="representation"))
    out = step(batch)
    (call,) = gen.last_grad_steps
    x0 = gen.encode_images(batch["reference_images"])
    eps = (call.x_t - _alpha(gen, call.t) * x0) / _sigma(gen, call.t)
    want_own = (call.prediction - eps).pow(2).mean()  # epsilon prediction: the target is the noise
    torch.testing.assert_close(out.metrics["generator_loss"], want_own.detach(), rtol=1e-4, atol=1e-6)
    ref, _ = critic_image_tokens(critic, batch["reference_images"])
    want_cos = (1 - F.cosine_similarity(out.latents.tokens.float(), ref.float(), dim=-1)).mean()
    torch.testing.assert_close(out.metrics["structure"], want_cos.detach(), rtol=1e-4, atol=1e-6)


def _abar(gen, t):
    return gen.scheduler.alphas_cumprod.double()[t.long()].view(-1, 1, 1, 1)


def _alpha(gen, t):
    return _abar(gen, t).sqrt().float()


def _sigma(gen, t):
    return (1 - _abar(gen, t)).sqrt().float()


def test_noise_at_is_the_schedule_formula_in_float64(critic):
    gen, _ = _pair(critic)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 4, 8, 6, generator=g), torch.randn(4, 4, 8, 6, generator=g)
    u = torch.tensor([0.0, 0.25, 0.7, 1.0])
    x_t, t, target = gen.noise_at(x0, u, eps)
    ti = (u.double() * (gen.num_train_timesteps - 1)).round()
    abar = gen.scheduler.alphas_cumprod.double()[ti.long()].view(-1, 1, 1, 1)
    want = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    assert (x_t.double() - want).abs().max() < 1e-6
    assert torch.equal(t, ti.float()) and torch.equal(target, eps)


def test_masked_prompts_read_the_negative_conditioning(critic):
    gen, batch = _pair(critic, prompt_dropout=1.0)
    batch = {**_with_images(gen, batch), "seed": 5}
    masked = gen(batch, view="representation")
    assert not masked.prompt_kept.any()
    gen.representation.prompt_dropout = 0.0
    neg = {**batch, "prompt_embeds": batch["negative_prompt_embeds"]}
    plain = gen(neg, view="representation")
    torch.testing.assert_close(masked.tokens, plain.tokens)
    kept = gen(batch, view="representation")
    assert kept.prompt_kept.all() and not torch.allclose(kept.tokens, masked.tokens)


def test_read_tokens_is_the_critics_own_pass(critic):
    """Given the critic's own image tokens, read_tokens gives the caption states of Critic.forward."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 30, 30, generator=g) * 2 - 1
    caps = torch.randint(1, critic.vocab_size, (2, 5), generator=g)
    own = critic(critic.prepare(images, fuse_patch_embed=False), caps)
    tokens, _ = critic_image_tokens(critic, images)
    hidden, P = read_tokens(critic, tokens, caps)
    torch.testing.assert_close(hidden[:, P - 1 : P + 4], own.caption_hidden, rtol=1e-5, atol=1e-5)


def test_caption_ce_per_caption_is_the_masked_mean(critic):
    from uno_engine.representation import caption_ce

    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 30, 30, generator=g) * 2 - 1
    caps = torch.randint(1, critic.vocab_size, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]])
    out = critic(critic.prepare(images, fuse_patch_embed=False), caps, mask)
    nll = F.cross_entropy(out.logits().double().transpose(1, 2), out.caption_labels, reduction="none")
    want = nll.sum(1) / mask.sum(1)
    tokens, _ = critic_image_tokens(critic, images)
    got = caption_ce(critic, tokens, caps, mask, per_caption=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caption_ce(critic, tokens, caps, mask).double(), nll.sum() / mask.sum())


@pytest.mark.parametrize(
    "name, block, index", [("tiny-sana", "transformer_blocks.1", 0), ("tiny-sd3", "transformer_blocks.0", 1)]
)
def test_dit_blocks_are_read_as_image_tokens(critic, name, block, index):
    """DiTs: a block's (B, M, C) image tokens are laid on the latent grid; SD3's joint blocks return
    (text, image): output_index=1."""
    gen, make_batch = build_generator(name, num_inference_steps=2)
    batch = make_batch(2, 6, critic.vocab_size, generator=torch.Generator().manual_seed(0))
    head = attach_representation(critic, gen, batch, block=block, output_index=index, source="sample")
    rep = gen(batch, view="representation")
    assert rep.tokens.shape == (2, head.num_tokens, critic.hidden_size) and not rep.from_reference
    rep.tokens.square().mean().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert sum(float(p.grad.abs().sum()) for p in gen.denoiser.parameters() if p.grad is not None) > 0


def test_head_is_saved_with_the_generator(critic):
    gen, _ = _pair(critic)
    keys = [k for k in gen.state_dict() if k.startswith("representation.")]
    assert "representation.fc1.weight" in keys
    assert {id(p) for p in gen.representation.parameters()} <= {id(p) for p in gen.trainable_parameters()}


def test_copy_leak_and_fit_head(critic):
    gen, batch = _pair(critic, prompt_dropout=0.5)
    leak = copy_leak(critic, gen, batch)
    assert set(leak) == {"ce_pure_noise", "ce_prompt_free", "ce_blank", "leak", "leak_se", "n"}
    assert leak["leak"] == pytest.approx(leak["ce_prompt_free"] - leak["ce_pure_noise"], abs=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in leak.values())
    assert gen.representation.prompt_dropout == 0.5  # restored
    step = UNOStep(gen, critic, UNOLoss(caption=1.0), UNOConfig(view="representation"))
    before = [p.detach().clone() for p in gen.denoiser.parameters()]
    losses = fit_head(step, lambda i: {**_with_images(gen, batch), "seed": i}, steps=8, lr=3e-3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, gen.denoiser.parameters(), strict=True))
    assert all(p.grad is None for p in gen.denoiser.parameters())


def test_errors_name_the_argument(critic):
    gen, batch = _pair(critic)
    for kw, arg in [
        ({"prompt_dropout": 1.5}, "prompt_dropout"),
        ({"noise_range": (0.5, 0.2)}, "noise_range"),
        ({"source": "pixels"}, "source"),
        ({"grid": (0, 5)}, "grid"),
        ({"block": ""}, "block"),
        ({"target_rms": float("nan")}, "target_rms"),
    ]:
        args = {"in_dim": 8, "out_dim": 8, "grid": (5, 5), "block": "mid_block", **kw}
        with pytest.raises(ValueError, match=arg):
            RepresentationHead(**args)
    with pytest.raises(ValueError, match="not_a_block"):
        attach_representation(critic, gen, batch, block="not_a_block")
    with pytest.raises(ValueError, match="representation_noise_level"):
        gen({**batch, "representation_noise_level": 1.5}, view="representation")
    gen.representation.prompt_dropout = 1.0
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        gen({k: v for k, v in batch.items() if k != "negative_prompt_embeds"}, view="representation")
    gen.representation.source = "reference"
    with pytest.raises(KeyError, match="reference_images"):
        gen(batch, view="representation")
    bare, _ = build_generator("tiny-sd", num_inference_steps=4)
    with pytest.raises(ValueError, match="no RepresentationHead is attached"):
        UNOStep(bare, critic, UNOLoss(caption=1.0), UNOConfig(view="representation"))
    with pytest.raises(ValueError, match="view"):
        UNOConfig(view="representations")
    gen.representation.source, gen.representation.prompt_dropout = "auto", 0.0
    step = UNOStep(gen, critic, UNOLoss(caption=1.0, negatives=1.0), UNOConfig(view="representation"))
    neg = {**batch, "negative_captions": batch["captions"][:, None]}
    with pytest.raises(NotImplementedError, match="negatives"):
        step(neg)


# ------------------------------------------------------------------------------------------------- Janus
@pytest.fixture(scope="module")
def janus():
    return build_preset("tiny-janus")


def test_janus_reads_the_lm_hidden_states_at_the_image_positions(janus):
    """Janus: the head reads the LM block's output at the N image positions of one teacher-forced pass over
    [prompt, noised tokens]; Janus's own loss (generation-head CE to the clean tokens) from the same pass;
    pure noise (level 1) replaces every token; gradients reach the generation modules and the head."""
    gen, critic = janus.generator, janus.make_critic("none", cache=False)
    batch = janus.make_batch(seed=1)
    B, N = batch["gen_input_ids"].shape[0], gen.num_image_tokens
    V = gen.model.model.generation_head.vision_head.out_features
    clean = torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    head = attach_representation(critic, gen, batch, block="layers.0")
    try:
        ref = {**batch, "reference_image_tokens": clean, "representation_noise_level": 0.0}
        lm = gen.model.model.language_model
        with block_output(lm, "layers.0") as box:
            rep = gen(ref, view="representation")
        S = batch["gen_input_ids"].shape[1]
        torch.testing.assert_close(rep.tokens, head(box["hidden"][:, S : S + N], gen.grid))
        assert rep.from_reference and rep.generator_loss is not None
        step = UNOStep(
            gen, critic, UNOLoss(caption=1.0, generator_loss=1.0), UNOConfig(view="representation")
        )
        out = step(ref)
        out.loss.backward()
        for p in list(gen.trainable_parameters()) + list(head.parameters()):
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert sum(float(p.grad.abs().sum()) for p in gen.model.model.generation_embeddings.parameters()) > 0
        noisy = gen({**ref, "representation_noise_level": 1.0}, view="representation")
        assert not torch.allclose(noisy.tokens, rep.tokens)
        leak = copy_leak(critic, gen, batch)
        assert all(torch.isfinite(torch.tensor(v)) for v in leak.values())
    finally:
        gen.representation = None
        gen.zero_grad(set_to_none=True)


@pytest.mark.slow  # the cached learning models, 2 UNO steps
def test_learning_arm_trains_the_head_with_the_generator():
    """The learning benchmark's "representation" arm: a head on the UNet's mid block, warm-started, then
    trained with the UNet (2 steps on the cached models)."""
    from learning_lib import arms_repr, experiment, training

    from uno_engine import Critic

    critic_model, proc = training.load_critic(training.CACHE / "critic.safetensors")
    unet, text = training.load_generator(training.CACHE / "generator.safetensors")
    s = experiment.Settings(
        uno_steps=2, batch_held=2, batch_seen=2, extra={"representation": {"fit_steps": 3}}
    )
    assert experiment.feature_status("representation") is None
    arms_repr.LAST.clear()
    trained, hist = experiment.run_uno(
        unet, text, Critic.from_hf(critic_model, proc), "representation", seed=100, s=s
    )
    gen = arms_repr.LAST["generator"]
    assert gen.representation.block == "mid_block" and gen.denoiser is trained
    assert {"held_caption_ce", "seen_caption_ce", "seen_generator_loss", "seen_structure"} <= set(hist[-1])
    assert "held_generator_loss" not in hist[-1]  # no real image on the held-out stream
    assert set(arms_repr.LAST["copy_leak_after_head_fit"]) >= {"ce_pure_noise", "ce_prompt_free", "leak"}
