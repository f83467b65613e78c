"""UNOStep end to end on tiny real transformers / diffusers classes (random weights, no downloads)."""

import math
import time

import pytest
import torch
from torch import nn

import uno_engine
from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator

CRITICS = ["tiny-llava-clip", "tiny-llava-siglip", "tiny-janus", "tiny-qwen2-vl"]
PLAIN = UNOConfig(read=None)  # the processor's exact read: these tests compare against it


class PixelGenerator(nn.Module):
    """The smallest honest generator: learnable pixels (B, 3, H, W) squashed into [-1, 1]."""

    def __init__(self, batch=2, h=40, w=56):
        super().__init__()
        self.pixels = nn.Parameter(torch.randn(batch, 3, h, w) * 0.5)

    def forward(self, batch):
        return torch.tanh(self.pixels)


def _critic(name):
    model, processor = build_critic_model(name)
    return Critic.from_hf(model, processor)


def _batch(critic, b=2, length=6, seed=0, image_hw=(40, 56)):
    g = torch.Generator().manual_seed(seed)
    captions = torch.randint(3, critic.vocab_size - 1, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0  # one right-padded caption
    ref = torch.rand(b, 3, *image_hw, generator=g) * 2 - 1
    return {"captions": captions, "caption_mask": mask, "reference_images": ref}


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("critic_name", CRITICS)
def test_generator_gets_grads_critic_none(critic_name):
    critic = _critic(critic_name)
    gen = PixelGenerator()
    step = UNOStep(
        CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0, density=0.5, structure=0.5)
    )
    out = step(_batch(critic))
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert set(out.metrics) >= {"loss", "caption_ce", "density", "structure"}
    assert all(not v.requires_grad for v in out.metrics.values())
    out.loss.backward()
    g = gen.pixels.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters()), "the frozen critic must receive no gradient"
    heads = [m for m in (step.uno_loss.density_head, step.uno_loss.structure_head) if m is not None]
    assert heads and all(p.grad is not None for h in heads for p in h.parameters())


@pytest.mark.parametrize("critic_name", CRITICS)
def test_engine_equals_reference(critic_name):
    critic = _critic(critic_name)
    gen = PixelGenerator()
    batch = _batch(critic)
    results = []
    for backend in ("reference", "auto"):
        gen.pixels.grad = None
        loss = UNOLoss(caption=1.0, density=0.5, structure=0.5)
        torch.manual_seed(1)  # identical head init
        cfg = UNOConfig(backend=backend, read=None)
        step = UNOStep(CallableGenerator(gen, module=gen), critic, loss, cfg)
        out = step(batch)
        out.loss.backward()
        results.append((out.loss.detach(), gen.pixels.grad.clone(), {k: v for k, v in out.metrics.items()}))
    (l_ref, g_ref, m_ref), (l_eng, g_eng, m_eng) = results
    torch.testing.assert_close(l_eng, l_ref, rtol=1e-5, atol=1e-6)
    for k in m_ref:
        torch.testing.assert_close(
            m_eng[k], m_ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"metric {k}: {m}"
        )
    rel = (g_eng - g_ref).norm() / g_ref.norm()
    assert rel < 1e-5, f"generator grad differs from the reference path: relative {rel:.3e}"


@pytest.mark.parametrize("critic_name", ["tiny-llava-siglip", "tiny-qwen2-vl"])
def test_sgd_lowers_caption_ce(critic_name):
    critic = _critic(critic_name)
    gen = PixelGenerator()
    # the plain read: a fixed objective (the threshold below was measured on it; jittered views draw anew)
    cfg = UNOConfig(check_inputs=False, read=None)
    step = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0), cfg)
    batch = _batch(critic)
    opt = torch.optim.SGD(gen.parameters(), lr=2.0, momentum=0.9)
    first = last = None
    for _ in range(30):
        opt.zero_grad()
        out = step(batch)
        out.loss.backward()
        opt.step()
        first = out.metrics["caption_ce"].item() if first is None else first
        last = out.metrics["caption_ce"].item()
    # a random tiny critic barely looks at the image: the CE moves by ~1% (qwen2-vl 4.838 -> 4.788 measured)
    assert last < first - 0.02, f"caption CE did not go down: {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("gen_name", ["tiny-sd", "tiny-sana", "tiny-pixart"])
@pytest.mark.parametrize("critic_name", CRITICS)
def test_diffusers_generator_pairs(critic_name, gen_name):
    critic = _critic(critic_name)
    gen, make_batch = build_generator(gen_name)
    step = UNOStep(gen, critic, UNOLoss(caption=1.0, density=0.3))
    batch = make_batch(2, 5, critic.vocab_size, generator=torch.Generator().manual_seed(0))
    out = step(batch | {"density_target": torch.rand(2, _n_patches(critic, step, batch))})
    out.loss.backward()
    grads = [p.grad for p in gen.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in critic.parameters())


@pytest.mark.parametrize("critic_name", ["tiny-llava-clip", "tiny-qwen2-vl"])
def test_engine_equals_reference_with_diffusers_generator(critic_name):
    """The same seeded sampling twice: the engine path and the reference path give the same loss and the same
    gradients on every trainable generator parameter."""
    critic = _critic(critic_name)
    gen, make_batch = build_generator("tiny-sd")
    batch = make_batch(2, 5, critic.vocab_size, generator=torch.Generator().manual_seed(0))
    runs = []
    for backend in ("reference", "auto"):
        gen.zero_grad(set_to_none=True)
        out = UNOStep(gen, critic, UNOLoss(caption=1.0), UNOConfig(backend=backend, read=None))(batch)
        out.loss.backward()
        runs.append((out.loss.detach(), [p.grad.clone() for p in gen.parameters() if p.requires_grad]))
    (l_ref, g_ref), (l_eng, g_eng) = runs
    torch.testing.assert_close(l_eng, l_ref, rtol=1e-5, atol=1e-6)
    num = sum((a - b).double().norm() ** 2 for a, b in zip(g_eng, g_ref, strict=True)) ** 0.5
    den = sum(b.double().norm() ** 2 for b in g_ref) ** 0.5
    assert den > 0 and num / den < 1e-5, f"generator grads differ from the reference path: {num / den:.3e}"


def _n_patches(critic, step, batch):
    with torch.no_grad():
        images = step.generator(batch)
        feats, _ = critic.encode_patches(critic.prepare(images))
    return feats.shape[1]


def test_janus_is_its_own_critic():
    model, processor = build_critic_model("tiny-janus")
    critic = Critic.from_hf(model, processor)
    from uno_engine.generators import JanusGenerator

    gen = JanusGenerator(model)
    step = UNOStep(gen, critic, UNOLoss(caption=1.0))
    g = torch.Generator().manual_seed(0)
    batch = {
        "captions": torch.randint(3, critic.vocab_size - 1, (2, 5), generator=g),
        "gen_input_ids": torch.randint(3, critic.vocab_size - 1, (2, 4), generator=g),
    }
    out = step(batch)
    out.loss.backward()
    trainable = [p for p in gen.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in critic.parameters() if not p.requires_grad)


@pytest.mark.parametrize("critic_name", ["tiny-llava-clip", "tiny-llava-siglip", "tiny-janus"])
def test_fused_patch_embed_gives_the_same_step(critic_name):
    """UNOConfig(fuse_patch_embed=True / False): the same loss, metrics and generator gradients (<= 1e-6
    relative, fp32), the reference images' features (loss side) included."""
    critic = _critic(critic_name)
    gen = PixelGenerator()
    batch = _batch(critic)
    runs = []
    for fuse in (False, True):
        gen.pixels.grad = None
        torch.manual_seed(1)  # identical head init
        loss = UNOLoss(caption=1.0, density=0.5, structure=0.5, structure_mode="features")
        cfg = UNOConfig(fuse_patch_embed=fuse, read=None)
        step = UNOStep(CallableGenerator(gen, module=gen), critic, loss, cfg)
        out = step(batch)
        out.loss.backward()
        runs.append((out.metrics, gen.pixels.grad.clone()))
    (m0, g0), (m1, g1) = runs
    for k in m0:
        assert abs(m1[k] - m0[k]) <= 1e-6 * abs(m0[k]) + 1e-7, f"metric {k}: {m1[k]} != {m0[k]}"
    rel = ((g1 - g0).norm() / g0.norm()).item()
    assert rel <= 1e-6, f"generator gradient differs with the fused patch embedding: {rel:.3g} relative"


def test_fuse_patch_embed_config_errors():
    with pytest.raises(ValueError, match="fuse_patch_embed"):
        UNOConfig(fuse_patch_embed="on")
    critic = _critic("tiny-qwen2-vl")
    gen = PixelGenerator()
    with pytest.raises(ValueError, match=r"fuse_patch_embed=True.*Conv3d"):
        UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(), UNOConfig(fuse_patch_embed=True))
    UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(), UNOConfig(fuse_patch_embed="auto"))


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_step():
    critic = _critic("tiny-llava-siglip")
    gen = PixelGenerator()
    return UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0)), critic, gen


def test_bad_input_non_finite(small_step):
    step, critic, gen = small_step
    with torch.no_grad():
        gen.pixels[0, 0, 0, 0] = float("nan")
    try:
        with pytest.raises(ValueError, match="images.*NaN"):
            step(_batch(critic))
    finally:
        with torch.no_grad():
            gen.pixels[0, 0, 0, 0] = 0.0


def test_bad_input_batch_size(small_step):
    step, critic, _ = small_step
    with pytest.raises(ValueError, match="batch size differs"):
        step(_batch(critic, b=3))


def test_bad_input_empty_caption(small_step):
    step, critic, _ = small_step
    batch = _batch(critic)
    batch["caption_mask"][0] = 0
    with pytest.raises(ValueError, match="empty caption"):
        step(batch)
    with pytest.raises(ValueError, match="captions.*empty"):
        step(batch | {"captions": batch["captions"][:, :0], "caption_mask": None})


def test_bad_input_channels(small_step):
    _, critic, _ = small_step
    step = UNOStep(CallableGenerator(lambda b: torch.zeros(2, 4, 16, 16)), critic, UNOLoss())
    with pytest.raises(ValueError, match=r"images.*\(B, 3, H, W\)"):
        step(_batch(critic))


def test_unsupported_critic():
    with pytest.raises(TypeError, match="Llava"):
        Critic.from_hf(nn.Linear(2, 2), None)


def test_out_of_range_is_clamped_not_rejected(small_step):
    """Values past input_range are clamped as the processor's uint8 path clamps them: the loss equals the
    loss of the clamped image, and clamped pixels get no gradient."""
    step, critic, gen = small_step
    batch = _batch(critic)
    x = (torch.tanh(gen.pixels.detach()) * 3.0).requires_grad_(True)
    out = UNOStep(CallableGenerator(lambda b: x, module=gen), critic, UNOLoss(caption=1.0), PLAIN)(batch)
    out.loss.backward()
    clamped = x.detach().clamp(-1.0, 1.0)
    ref = UNOStep(CallableGenerator(lambda b: clamped, module=gen), critic, UNOLoss(caption=1.0), PLAIN)
    ref = ref(batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    outside = x.detach().abs() > 1.0
    assert outside.any() and (~outside).any()
    assert (x.grad[outside] == 0).all(), "clamped pixels must get no gradient"
    assert x.grad[~outside].abs().sum() > 0


def test_check_inputs_off_skips_the_check(small_step):
    """A NaN image raises with the check on, and is passed through (no host read) with it off."""
    _, critic, gen = small_step
    bad = CallableGenerator(lambda b: torch.tanh(gen.pixels) * torch.tensor(float("nan")), module=gen)
    with pytest.raises(ValueError, match="NaN or Inf"):
        UNOStep(bad, critic, UNOLoss())(_batch(critic, b=2))
    out = UNOStep(bad, critic, UNOLoss(), UNOConfig(check_inputs=False))(_batch(critic, b=2))
    assert torch.isnan(out.images).all()


def test_profile_timings(small_step):
    _, critic, gen = small_step
    s = UNOStep(
        CallableGenerator(lambda b: torch.tanh(gen.pixels), module=gen),
        critic,
        UNOLoss(),
        UNOConfig(profile=True),
    )
    batch = _batch(critic)
    t0 = time.perf_counter()
    out = s(batch)
    out.loss.backward()
    wall_ms = (time.perf_counter() - t0) * 1e3
    t = out.timings()
    phases = ("generate_ms", "bridge_ms", "critic_ms", "loss_ms", "loss_bwd_ms", "critic_bwd_ms", "bridge_bwd_ms")
    for k in phases:
        # every phase does work (the CPU clock is perf_counter): a zero or negative time is a broken stamp
        assert k in t and math.isfinite(t[k]) and t[k] > 0, (k, t)
    # the phases are disjoint parts of the step: together no longer than the step itself
    assert sum(t[k] for k in phases) <= wall_ms * 1.01, (t, wall_ms)


def test_public_names():
    assert uno_engine.UNOStep is UNOStep
    for name in uno_engine.__all__:
        getattr(uno_engine, name)


@pytest.mark.parametrize(
    "field,op,arg", [("lce_impl", "linear_cross_entropy", "impl"), ("bridge_kernel", "bridge", "kernel")]
)
def test_config_algorithm_choices_reach_every_op_call(monkeypatch, field, op, arg):
    """UNOConfig.lce_impl / bridge_kernel reach every call of their op in the step, the reference images'
    bridge and the hard negatives' per-token CE included, and change nothing in the result."""
    import uno_engine.ops as module

    critic = _critic("tiny-llava-clip")
    gen = PixelGenerator()
    batch = _batch(critic) | {
        "negative_captions": torch.randint(3, critic.vocab_size - 1, (2, 2, 6)),
    }
    choice = {"lce_impl": "recompute", "bridge_kernel": "two_pass"}[field]
    seen = []
    real = getattr(module, op)

    def spy(*a, **kw):
        seen.append(kw.get(arg))
        return real(*a, **kw)

    results = []
    for cfg in (UNOConfig(read=None), UNOConfig(read=None, **{field: choice})):
        torch.manual_seed(1)
        gen.pixels.grad = None
        step = UNOStep(
            CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0, density=0.5, negatives=0.5), cfg
        )
        seen.clear()
        monkeypatch.setattr(module, op, spy)
        out = step(batch)
        monkeypatch.setattr(module, op, real)
        out.loss.backward()
        results.append((out.loss.detach(), gen.pixels.grad.clone(), list(seen)))
    (l0, g0, _), (l1, g1, calls) = results
    assert len(calls) >= 2 and all(c == choice for c in calls), calls
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


def test_unwrap_reaches_the_module_inside_ddp(tmp_path):
    """The step calls loss and generator methods (negatives_of, denoising_loss, predict, last_grad_steps)
    that a DDP wrapper hides: `distributed.unwrap` (what the step uses) hands them the wrapped module (one-process gloo group)."""
    import torch.distributed as dist

    from uno_engine.distributed import unwrap as _unwrap

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = nn.Linear(3, 2)
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert not hasattr(ddp, "in_features") and _unwrap(ddp) is inner
        assert _unwrap(inner) is inner
    finally:
        dist.destroy_process_group()


def test_for_backend_is_the_one_dispatch_point():
    """UNOLoss and Critic.prepare reach every op through ops.for_backend: "reference" is the eager statement
    (no op, no algorithm choice), the other backends the op with backend= and the choice bound."""
    from uno_engine import eager, ops

    assert ops.for_backend("linear_cross_entropy", "reference", impl="recompute") is eager.linear_cross_entropy
    assert ops.for_backend("bridge", "reference", kernel="fused") is eager.bridge
    f = ops.for_backend("linear_cross_entropy", "torch", impl="recompute")
    assert f.func is ops.linear_cross_entropy and f.keywords == {"backend": "torch", "impl": "recompute"}
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    y = torch.randint(0, 11, (7,), generator=g)
    torch.testing.assert_close(
        ops.for_backend("linear_cross_entropy", "auto")(h, w, y),
        ops.for_backend("linear_cross_entropy", "reference")(h, w, y),
    )
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.for_backend("bridge", "eager")
