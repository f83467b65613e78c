"""The value path: the critic's caption reward against its hard negatives, the group-relative objective and
ValueStep, each against a float64 reference computed independently (full logits, explicit loops)."""

import copy

import pytest
import torch

from uno_engine import CaptionReward, Critic, RewardObjective, UNOConfig, UNOLoss, UNOStep, ValueStep
from uno_engine.generators import CallableGenerator
from uno_engine.reward import caption_reward, group_advantages, repeat_batch, reward_objective
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator

_CRITICS = {}


def _critic(name="tiny-llava-clip"):
    if name not in _CRITICS:
        model, processor = build_critic_model(name)
        _CRITICS[name] = Critic.from_hf(model, processor, checkpoint="none")
    return _CRITICS[name]


def _captions(critic, b=3, length=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = critic.vocab_size - 1
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0  # a padded caption
    nmask = torch.ones(b, k, length, dtype=torch.long)
    nmask[0, 1, 3:] = 0  # a shorter negative
    nmask[1, 2] = 0  # an absent negative: leaves the softmax
    return {
        "captions": torch.randint(3, hi, (b, length), generator=g),
        "caption_mask": mask,
        "negative_captions": torch.randint(3, hi, (b, k, length), generator=g),
        "negative_caption_mask": nmask,
    }


def _reference_reward(critic, images, batch, input_range=(-1.0, 1.0)):
    """float64: every candidate caption through the critic SEPARATELY, full logits in float64."""
    inputs = critic.prepare(images, input_range=input_range, backend="reference")
    caps = torch.cat([batch["captions"][:, None], batch["negative_captions"]], 1)
    masks = torch.cat([batch["caption_mask"][:, None], batch["negative_caption_mask"]], 1)
    scores = []
    for j in range(caps.shape[1]):
        out = critic(inputs, caps[:, j], masks[:, j])
        logits = out.caption_hidden.double() @ out.lm_head_weight.double().T
        logp = torch.log_softmax(logits, -1)
        tok = logp.gather(-1, caps[:, j, :, None]).squeeze(-1) * masks[:, j]
        s = tok.sum(-1)
        scores.append(torch.where(masks[:, j].sum(-1) > 0, s, torch.full_like(s, float("-inf"))))
    s = torch.stack(scores, 1)
    return s[:, 0] - torch.logsumexp(s, 1), s


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_caption_reward_equals_float64_reference(backend):
    critic = _critic()
    batch = _captions(critic)
    images = (torch.randn(3, 3, 40, 56) * 0.6).requires_grad_()
    reward = CaptionReward(critic, UNOConfig(backend=backend, read=None))(images, batch)
    r_ref, s_ref = _reference_reward(critic, images.detach(), batch)
    torch.testing.assert_close(reward.scores.double(), s_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reward.log_prob.double(), r_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward.prob.double(), r_ref.exp(), rtol=1e-4, atol=1e-6)
    assert torch.isinf(reward.scores[1, 3]) and reward.scores[1, 3] < 0  # the absent negative
    assert (reward.log_prob <= 0).all() and r_ref.std() > 1e-3  # not vacuous: rewards differ
    assert reward.ranked_first.tolist() == (s_ref[:, :1] > s_ref[:, 1:]).all(1).tolist()
    assert not reward.log_prob.requires_grad  # forward only: nothing kept for a backward


def test_caption_reward_reads_with_the_steps_options():
    """from_step takes the step's reader and its reading options: images in [0, 1] under
    input_range=(0, 1) score as the same images in [-1, 1] under the default."""
    critic = _critic()
    batch = _captions(critic, seed=1)
    images = torch.rand(3, 3, 40, 56) * 2 - 1
    gen = CallableGenerator(lambda b: images)
    step = UNOStep(gen, critic, UNOLoss(), UNOConfig(input_range=(0.0, 1.0), read=None))
    r01 = CaptionReward.from_step(step)(images * 0.5 + 0.5, batch)
    r11 = CaptionReward(critic)(images, batch)
    r_ref, _ = _reference_reward(critic, images, batch)
    torch.testing.assert_close(r01.log_prob.double(), r_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r11.log_prob.double(), r_ref, rtol=1e-4, atol=1e-5)
    wrong = CaptionReward(critic)(images * 0.5 + 0.5, batch)  # misread range: a different reward
    assert (wrong.log_prob - r11.log_prob).abs().max() > 1e-3


def test_caption_reward_bad_input():
    critic = _critic()
    batch = _captions(critic)
    images = torch.randn(3, 3, 40, 56)
    reward = CaptionReward(critic)
    with pytest.raises(KeyError, match="negative_captions"):
        reward(images, {k: v for k, v in batch.items() if not k.startswith("negative")})
    with pytest.raises(ValueError, match="negative_captions"):
        reward(images, {**batch, "negative_captions": batch["negative_captions"][:2]})
    with pytest.raises(ValueError, match="NaN or Inf"):
        reward(images.clone().fill_(float("nan")), batch)
    with pytest.raises(TypeError, match="reader"):
        CaptionReward(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config"):
        CaptionReward(critic, {"backend": "torch"})
    out = critic(critic.prepare(images), batch["captions"], batch["caption_mask"])
    with pytest.raises(ValueError, match="no negative captions"):
        caption_reward(out)


# --------------------------------------------------------------------------------------------- objective


def test_group_advantages_equal_float64_reference():
    g = torch.Generator().manual_seed(0)
    r = -torch.rand(12, generator=g, dtype=torch.float64) * 5
    r[4:8] = -1.0  # a group of equal rewards: advantage 0
    a = group_advantages(r, 4, clip=1.5)
    ref = []
    for i in range(0, 12, 4):
        grp = [float(x) for x in r[i : i + 4]]
        m = sum(grp) / 4
        sd = (sum((x - m) ** 2 for x in grp) / 4) ** 0.5
        ref += [min(max((x - m) / (sd + 1e-4), -1.5), 1.5) for x in grp]
    torch.testing.assert_close(a, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert a[4:8].abs().max() == 0 and a.abs().max() == 1.5  # clipped
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="`reward`"):
        group_advantages(r, 5)
    with pytest.raises(ValueError, match="`clip`"):
        group_advantages(r, 4, clip=0.0)


def _objective_reference(pred, tgt, ref, adv, kind, beta, clip):
    """Per sample, element by element, in float64."""
    out = []
    for i in range(pred.shape[0]):
        p, t, r = pred[i].flatten(), tgt[i].flatten(), ref[i].flatten()
        n = p.numel()
        if kind == "advantage":
            out.append(adv[i] * sum((p[e] - t[e]) ** 2 for e in range(n)) / n)
        else:
            o = min(max(0.5 + 0.5 * adv[i] / clip, 0.0), 1.0)
            pos = sum(((1 - beta) * r[e] + beta * p[e] - t[e]) ** 2 for e in range(n)) / n
            neg = sum(((1 + beta) * r[e] - beta * p[e] - t[e]) ** 2 for e in range(n)) / n
            out.append(o * pos + (1 - o) * neg)
    return torch.stack(out)


@pytest.mark.parametrize("kind,beta", [("nft", 1.0), ("nft", 0.3), ("advantage", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reward_objective_equals_float64_reference(kind, beta, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (5, 3, 7, 5)  # odd sizes
    pred = torch.randn(shape, generator=g, dtype=torch.float64)
    tgt, ref = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    adv = torch.tensor([-2.0, -0.7, 0.0, 0.9, 2.0], dtype=torch.float64)
    p = pred.detach().to(dtype).clone().requires_grad_()
    got = reward_objective(p, tgt.to(dtype), ref.to(dtype), adv.to(dtype), kind=kind, beta=beta, clip=2.0)
    got.sum().backward()
    p64 = pred.detach().clone().requires_grad_()
    want = _objective_reference(p64, tgt, ref, adv, kind, beta, 2.0)
    want.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    torch.testing.assert_close(p.grad.double(), p64.grad, **tol)


def test_nft_minimizer_fits_good_samples_and_pushes_bad_ones_a_bounded_distance():
    """The NFT loss is quadratic in the prediction: zero gradient at v* = ref - (2o - 1)(ref - target) / beta.
    o = 1 fits the target, o = 0.5 keeps the reference, o = 0 reflects away (finite)."""
    g = torch.Generator().manual_seed(2)
    tgt, ref = (
        torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64),
    )
    adv, beta = torch.tensor([2.0, 0.0, -2.0], dtype=torch.float64), 0.5
    o = 0.5 + 0.5 * adv / 2.0
    star = (ref - (2 * o - 1).view(3, 1, 1, 1) * (ref - tgt) / beta).requires_grad_()
    reward_objective(star, tgt, ref, adv, kind="nft", beta=beta).sum().backward()
    assert star.grad.abs().max() < 1e-12
    torch.testing.assert_close(star[0].detach(), ref[0] + (tgt[0] - ref[0]) / beta)
    torch.testing.assert_close(star[1].detach(), ref[1])


def test_reward_objective_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="`kind`"):
        reward_objective(x, x, x, torch.zeros(2), kind="ppo")
    with pytest.raises(ValueError, match="`target`"):
        reward_objective(x, x[:1], x, torch.zeros(2))
    with pytest.raises(ValueError, match="`advantage`"):
        reward_objective(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="`reference`"):
        reward_objective(x, x, None, torch.zeros(2), kind="nft")
    with pytest.raises(ValueError, match="`beta`"):
        reward_objective(x, x, x, torch.zeros(2), beta=0.0)
    for kw, name in (
        ({"group_size": 1}, "group_size"),
        ({"kind": "x"}, "kind"),
        ({"reward": "lin"}, "reward"),
        ({"beta": -1.0}, "beta"),
        ({"kl": -1.0}, "kl"),
        ({"generator_loss": -1.0}, "generator_loss"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            RewardObjective(**kw)


# --------------------------------------------------------------------------------------------- ValueStep


def _value_batch(gen, make_batch, critic, b=2):
    g = torch.Generator().manual_seed(0)
    batch = make_batch(b, 6, critic.vocab_size - 1, generator=g)
    k = 2
    batch["negative_captions"] = torch.randint(1, critic.vocab_size - 1, (b, k, 6), generator=g)
    batch["negative_caption_mask"] = batch["caption_mask"][:, None].expand(b, k, 6).clone()
    batch["seed"] = 11
    h, w = gen.latent_size
    batch["reference_latents"] = torch.randn(b, gen.latent_channels, h, w, generator=g)
    return batch


@pytest.mark.parametrize("kind", ["nft", "advantage"])
def test_value_step_equals_float64_recomputation(kind):
    critic = _critic()
    gen, make_batch = build_generator("tiny-sd", num_inference_steps=3)
    initial = copy.deepcopy(gen.denoiser).requires_grad_(False)
    obj = RewardObjective(kind, group_size=3, beta=0.7, kl=0.2, generator_loss=0.5)
    step = ValueStep(gen, critic, obj)
    with torch.no_grad():  # training moved the weights away from the initial model
        for p in gen.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _value_batch(gen, make_batch, critic)
    out = step(batch)
    out.loss.backward()
    assert out.images.shape[0] == 6 and all(p.grad is not None for p in gen.trainable_parameters())

    # independent recomputation: the same draws (batch seed), every candidate scored separately in float64
    rep = repeat_batch({k: v for k, v in batch.items() if k != "reference_latents"}, 3)
    with torch.no_grad():
        x0 = gen.sample_latents(rep)
        r, _ = _reference_reward(critic, gen.decode_latents(x0), rep)
        grp = r.view(2, 3)
        adv = ((grp - grp.mean(1, keepdim=True)) / (grp.std(1, unbiased=False, keepdim=True) + 1e-4)).clamp(
            -2, 2
        )
        pair = gen.denoising_pair({**rep, "reference_latents": x0})
        ref = gen.predict(pair.x_t, pair.t, pair.cond, denoiser=initial).double()
        pred, tgt = pair.prediction.double(), pair.target.double()
        per = _objective_reference(pred, tgt, ref, adv.flatten(), kind, 0.7, 2.0)
        kl = (pred - ref).pow(2).mean()
        anchor = gen.denoising_loss(batch).double()
    torch.testing.assert_close(out.metrics["reward"].double(), r.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["objective"].double(), per.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.metrics["kl"].double(), kl, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(
        out.loss.detach().double(), per.mean() + 0.2 * kl + 0.5 * anchor, rtol=1e-4, atol=1e-6
    )
    assert adv.abs().max() > 0.1 and kl > 0  # not vacuous


def test_value_step_bad_input():
    critic = _critic()
    gen, make_batch = build_generator("tiny-sd", num_inference_steps=2)
    step = ValueStep(gen, critic, RewardObjective(group_size=2))
    batch = _value_batch(gen, make_batch, critic)
    with pytest.raises(KeyError, match="negative_captions"):
        step({k: v for k, v in batch.items() if not k.startswith("negative")})
    with pytest.raises(TypeError, match="sample_latents"):
        ValueStep(CallableGenerator(lambda b: b), critic)
    with pytest.raises(TypeError, match="`objective`"):
        ValueStep(gen, critic, {"kind": "nft"})
    frozen, _ = build_generator("tiny-sd")
    frozen.denoiser.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable weights"):
        ValueStep(frozen, critic)


def test_value_step_latent_view_reads_through_the_steps_reader():
    """UNOConfig(view="latent"): the reward comes from the latent reader (an attached LatentAdapter) on the
    no-grad samples, equal to a float64 pass of each candidate caption through that reader separately."""
    from uno_engine.latent import LatentAdapter
    from uno_engine.latent.types import GeneratedLatents

    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor, checkpoint="none")
    gen, make_batch = build_generator("tiny-sd", num_inference_steps=2)
    critic.attach_latent_adapter(LatentAdapter.for_pair(critic, gen))
    step = ValueStep(gen, critic, RewardObjective("advantage", group_size=2), UNOConfig(view="latent"))
    batch = _value_batch(gen, make_batch, critic)
    out = step(batch)
    out.loss.backward()
    assert out.images is None and out.latents.kind == "latents"
    rep = repeat_batch({k: v for k, v in batch.items() if k != "reference_latents"}, 2)
    with torch.no_grad():
        x0 = gen.sample_latents(rep)
        lat = GeneratedLatents(kind="latents", grid=gen.latent_size, x0=x0, xt=x0, sigma_t=0.0)
        inputs = step.reader.prepare(lat)
        caps = torch.cat([rep["captions"][:, None], rep["negative_captions"]], 1)
        masks = torch.cat([rep["caption_mask"][:, None], rep["negative_caption_mask"]], 1)
        s = []
        for j in range(caps.shape[1]):
            o = step.reader(inputs, caps[:, j], masks[:, j])
            logp = torch.log_softmax(o.caption_hidden.double() @ o.lm_head_weight.double().T, -1)
            s.append((logp.gather(-1, caps[:, j, :, None]).squeeze(-1) * masks[:, j]).sum(-1))
        s = torch.stack(s, 1)
        r = s[:, 0] - torch.logsumexp(s, 1)
    torch.testing.assert_close(out.metrics["reward"].double(), r.mean(), rtol=1e-4, atol=1e-5)
    pixel = CaptionReward(critic)(gen.decode_latents(x0), rep).log_prob.mean()  # the pixel critic differs
    assert (pixel - out.metrics["reward"]).abs() > 1e-4
