"""Generators on tiny real classes (diffusers UNet2DConditionModel / SanaTransformer2DModel /
PixArtTransformer2DModel, transformers JanusForConditionalGeneration), random weights, nothing downloaded.

What is checked: output shape / dtype as documented (values nominally in [-1, 1], never clamped by the
generator); trainable parameters get nonzero finite grads and nothing else does; exactly K denoiser calls run
with grad; the sampler's schedule math (an oracle denoiser must land on its x0); noised-reference mode; seeded
determinism; errors that name the argument.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uno_engine.generators import CallableGenerator, DiffusersGenerator, Generator, JanusGenerator
from uno_engine.testing.presets.generators import NAMES, build_generator

TINY = ("tiny-sd", "tiny-sana", "tiny-pixart")
EXPECTED_HW = {"tiny-sd": (64, 48), "tiny-sana": (64, 64), "tiny-pixart": (64, 64)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on shared CPU cores (pytest -n 2) a second intra-op thread only adds sync
    overhead (measured ~10x slower under load). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(name, **kw):
    return build_generator(name, **kw)


def _batch(make_batch, b=2, seed=0):
    return make_batch(b, 6, 50, generator=torch.Generator().manual_seed(seed))


def _grad_report(gen: Generator, module: nn.Module):
    """(trainable params without a nonzero finite grad, names of non-trainable params that got a grad)."""
    trainable = {id(p) for p in gen.trainable_parameters()}
    bad = [
        n
        for n, p in module.named_parameters()
        if id(p) in trainable and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    zero = sum(
        1
        for n, p in module.named_parameters()
        if id(p) in trainable and p.grad is not None and p.grad.abs().sum() == 0
    )
    leaked = [n for n, p in module.named_parameters() if id(p) not in trainable and p.grad is not None]
    return bad, zero, leaked


class _CallCounter:
    """Counts a module's forward calls with and without grad enabled."""

    def __init__(self, module: nn.Module):
        self.grad = self.no_grad = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.no_grad += 1

    def remove(self):
        self.handle.remove()


# --------------------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("name", TINY)
def test_diffusers_output_and_grads(name):
    gen, make_batch = _gen(name)
    batch = _batch(make_batch)
    images = gen(batch)
    h, w = EXPECTED_HW[name]
    assert images.shape == (2, 3, h, w) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert images.requires_grad
    images.mean().backward()
    bad, zero, leaked = _grad_report(gen, gen)
    assert not bad, f"trainable params without a finite grad: {bad[:5]}"
    assert zero < len(gen.trainable_parameters()) // 4, f"{zero} trainable params got an all-zero grad"
    assert sum(p.grad.abs().sum() for p in gen.trainable_parameters()) > 0
    assert not leaked, f"params outside the trainable set got grads: {leaked[:5]}"
    assert all(not p.requires_grad for p in gen.vae.parameters()), "the VAE must be frozen by default"


@pytest.mark.parametrize("name,hw", [("tiny-sana", (32, 48)), ("tiny-pixart", (48, 32))])
def test_diffusers_other_sizes(name, hw):
    """DiTs take sizes other than their config's sample_size (e.g. Sana-0.6B at 512 px with height=512)."""
    gen, make_batch = _gen(name, height=hw[0], width=hw[1])
    assert gen(_batch(make_batch)).shape == (2, 3, *hw)


def test_diffusers_train_vae_and_lora_style_subset():
    gen, make_batch = _gen("tiny-sd")
    # A user freezes most of the denoiser (as LoRA would): only the trainable subset gets grads.
    gen.denoiser.requires_grad_(False)
    gen.denoiser.conv_out.requires_grad_(True)
    gen.vae.decoder.conv_out.requires_grad_(True)  # and one VAE layer
    gen(_batch(make_batch)).mean().backward()
    names = {n for n, p in gen.named_parameters() if p.grad is not None}
    assert names == {
        "denoiser.conv_out.weight",
        "denoiser.conv_out.bias",
        "vae.decoder.conv_out.weight",
        "vae.decoder.conv_out.bias",
    }, names
    assert len(gen.trainable_parameters()) == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_only_k_denoiser_calls_keep_a_graph(k):
    gen, make_batch = _gen("tiny-sana", k_grad_steps=k, grad_window=(0.5, 1.0))
    n = gen.num_inference_steps
    counter = _CallCounter(gen.denoiser)
    seen = set()
    try:
        for seed in range(6):
            batch = _batch(make_batch, seed=seed)
            counter.grad = counter.no_grad = 0
            gen(batch)
            s = gen.last_step_index
            seen.add(s)
            assert counter.grad == k, f"{counter.grad} denoiser calls ran with grad, expected K={k}"
            assert counter.no_grad == s, f"{counter.no_grad} no-grad calls, expected the drawn step s={s}"
            assert n // 2 <= s <= n - k, f"start step {s} outside the window [{n // 2}, {n - k}]"
    finally:
        counter.remove()
    assert len(seen) > 1, "the start step is never redrawn"


def _saved_bytes(gen, batch):
    """Bytes of tensors autograd saves for backward during one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gen(batch)
    return total[0]


def test_saved_activations_scale_with_k_not_with_the_sampled_steps():
    mem = {}
    for k in (1, 2):
        for window in ((0.0, 0.0), (1.0, 1.0)):  # start at step 0, or as late as possible
            gen, make_batch = _gen("tiny-sana", k_grad_steps=k, grad_window=window)
            mem[k, window] = _saved_bytes(gen, _batch(make_batch))
            assert gen.last_step_index == (0 if window == (0.0, 0.0) else gen.num_inference_steps - k)
    # the no-grad steps before s keep nothing: same saved bytes whether s = 0 or s = n - K
    assert mem[1, (0.0, 0.0)] == mem[1, (1.0, 1.0)] and mem[2, (0.0, 0.0)] == mem[2, (1.0, 1.0)], mem
    # one more grad step adds one denoiser call's activations (the decode is shared)
    gen, make_batch = _gen("tiny-sana")
    batch = _batch(make_batch)
    h, w = gen.latent_size
    decode_only = _saved_bytes(
        lambda b: gen.decode_latents(torch.randn(2, gen.latent_channels, h, w, requires_grad=True)), batch
    )
    one_call = mem[1, (0.0, 0.0)] - decode_only
    assert one_call > 0
    assert abs((mem[2, (0.0, 0.0)] - mem[1, (0.0, 0.0)]) - one_call) <= 0.05 * one_call, (mem, decode_only)


@pytest.mark.parametrize("name", ["tiny-sana", "tiny-pixart"])
def test_low_precision_with_cfg(name):
    gen, make_batch = _gen(name, dtype=torch.bfloat16, guidance_scale=2.0)
    batch = _batch(make_batch)
    batch["negative_prompt_embeds"] = torch.zeros_like(batch["prompt_embeds"])
    images = gen(batch)
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()
    images.float().mean().backward()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in gen.trainable_parameters())


def test_draft_k_window_is_the_last_k_steps():
    gen, make_batch = _gen("tiny-sd", k_grad_steps=2, grad_window=(1.0, 1.0))
    gen(_batch(make_batch))
    assert gen.last_step_index == gen.num_inference_steps - 2


def test_gradient_checkpointing_same_grads():
    state = _gen("tiny-pixart")[0].state_dict()
    grads = []
    for ckpt in (False, True):
        gen, make_batch = _gen("tiny-pixart", k_grad_steps=2, gradient_checkpointing=ckpt)
        gen.load_state_dict(state)
        gen(_batch(make_batch)).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.trainable_parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_seeded_determinism():
    gen, make_batch = _gen("tiny-sd")
    batch = _batch(make_batch)
    a, sa = gen(batch), gen.last_step_index
    b, sb = gen(batch), gen.last_step_index
    assert sa == sb and torch.equal(a, b), "same batch seed must give the same step and images"
    c = gen(batch | {"seed": batch["seed"] + 1})
    assert not torch.equal(a, c)
    # a torch.Generator in the batch, or given at construction
    g1 = gen(batch | {"seed": None, "generator": torch.Generator().manual_seed(5)})
    g2 = gen(batch | {"seed": None, "generator": torch.Generator().manual_seed(5)})
    assert torch.equal(g1, g2)
    gen.default_generator = torch.Generator().manual_seed(5)
    g3 = gen({k: v for k, v in batch.items() if k != "seed"})
    assert torch.equal(g1, g3)


class _Oracle:
    """A denoiser output that is exact for a fixed clean latent x0: eps/v/flow/sample as the type asks."""

    def __init__(self, gen: DiffusersGenerator, x0: torch.Tensor):
        self.gen, self.x0 = gen, x0

    def __call__(self, x, t, cond):
        g = self.gen
        i = g._timesteps.index(t)
        a, s = g._alphas[i], g._sigmas[i]
        eps = (x - a * self.x0) / s
        return {
            "epsilon": eps,
            "v_prediction": a * eps - s * self.x0,
            "sample": self.x0,
            "flow": eps - self.x0,
        }[g.prediction_type]


@pytest.mark.parametrize(
    "name,prediction_type",
    [("tiny-sd", "epsilon"), ("tiny-sd", "v_prediction"), ("tiny-sd", "sample"), ("tiny-sana", "flow")],
)
@pytest.mark.parametrize("reference", [False, True])
def test_schedule_math_lands_on_the_oracle_x0(name, prediction_type, reference):
    gen, make_batch = _gen(name, prediction_type=prediction_type, k_grad_steps=2, grad_window=(0.0, 1.0))
    h, w = gen.latent_size
    x0 = torch.randn(2, gen.latent_channels, h, w, dtype=torch.float64).float()
    gen._call_denoiser = _Oracle(gen, x0)
    decoded = []
    gen.decode_latents = lambda lat: (decoded.append(lat), torch.zeros(lat.shape[0], 3, 8, 8))[1]
    batch = _batch(make_batch)
    if reference:  # noised-reference mode from the same x0: still lands on it
        batch["reference_latents"] = x0
    gen(batch)
    torch.testing.assert_close(decoded[0], x0, rtol=1e-4, atol=1e-4)


def test_noised_reference_mode():
    gen, make_batch = _gen("tiny-sd", k_grad_steps=1)
    batch = _batch(make_batch)
    h, w = gen.latent_size
    ref = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(1))
    counter = _CallCounter(gen.denoiser)
    try:
        img_ref = gen(batch | {"reference_latents": ref})
        assert counter.no_grad == 0 and counter.grad == 1, "reference mode must skip the no-grad sampling"
    finally:
        counter.remove()
    img_ref2 = gen(batch | {"reference_latents": ref * -1})
    assert not torch.equal(img_ref, img_ref2), "the output must depend on the reference latents"
    img_ref.mean().backward()
    assert all(p.grad is not None for p in gen.trainable_parameters())
    # reference="off" ignores them; the default ignores reference_images (the losses read those)
    off, _ = _gen("tiny-sd", reference="off")
    off.load_state_dict(gen.state_dict())
    refimgs = torch.rand(2, 3, 64, 48) * 2 - 1
    plain = gen(batch)
    torch.testing.assert_close(off(batch | {"reference_latents": ref}), plain)
    torch.testing.assert_close(gen(batch | {"reference_images": refimgs}), plain)
    # reference="images" encodes them with the VAE (no grad) = passing those latents
    enc, _ = _gen("tiny-sd", reference="images")
    enc.load_state_dict(gen.state_dict())
    lat = enc.encode_images(refimgs)
    assert lat.shape == (2, 4, h, w) and not lat.requires_grad
    torch.testing.assert_close(
        enc(batch | {"reference_images": refimgs}), gen(batch | {"reference_latents": lat})
    )


def test_noised_reference_with_dc_ae():
    gen, make_batch = _gen("tiny-sana", reference="images")
    batch = _batch(make_batch)
    out = gen(batch | {"reference_images": torch.rand(2, 3, 64, 64) * 2 - 1})
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_cfg_needs_negative_embeds_and_runs():
    gen, make_batch = _gen("tiny-pixart", guidance_scale=4.0)
    batch = _batch(make_batch)
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        gen(batch)
    batch["negative_prompt_embeds"] = torch.zeros_like(batch["prompt_embeds"])
    counter = _CallCounter(gen.denoiser)
    try:
        out = gen(batch)
    finally:
        counter.remove()
    assert counter.grad == 1  # one (doubled-batch) call with grad
    out.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.trainable_parameters())


def test_diffusers_errors_name_the_argument():
    gen, make_batch = _gen("tiny-sd")
    batch = _batch(make_batch)
    with pytest.raises(KeyError, match="prompt_embeds"):
        gen({k: v for k, v in batch.items() if k != "prompt_embeds"})
    with pytest.raises(ValueError, match=r"prompt_embeds.*\(2, 12, 32\).*\(2, 12, 31\)"):
        gen(batch | {"prompt_embeds": torch.randn(2, 12, 31)})
    with pytest.raises(ValueError, match="prompt_embeds"):
        gen(batch | {"prompt_embeds": torch.randn(2, 32)})
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        gen(batch | {"prompt_attention_mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="reference_latents"):
        gen(batch | {"reference_latents": torch.randn(2, 5, 8, 6)})
    with pytest.raises(ValueError, match="k_grad_steps"):
        _gen("tiny-sd", k_grad_steps=0)
    with pytest.raises(ValueError, match="grad_window"):
        _gen("tiny-sd", grad_window=(0.9, 0.5))
    with pytest.raises(ValueError, match="height"):
        _gen("tiny-sd", height=60)
    with pytest.raises(ValueError, match="prediction_type"):
        _gen("tiny-sana", prediction_type="epsilon")
    with pytest.raises(TypeError, match="UNet2DConditionModel.*SanaTransformer2DModel"):
        DiffusersGenerator(nn.Linear(2, 2), gen.scheduler, gen.vae)


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", TINY)
def test_preset_batches_are_seeded(name):
    _, make_batch = _gen(name)
    a, b = _batch(make_batch, b=3, seed=7), _batch(make_batch, b=3, seed=7)
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
    )
    assert a["captions"].shape == a["caption_mask"].shape == (3, 6) and a["captions"].dtype == torch.int64
    assert (a["captions"] > 0).all() and (a["captions"] < 50).all() and (a["caption_mask"].sum(1) >= 3).all()
    assert a["prompt_embeds"].shape[0] == 3
    if name != "tiny-sd":
        assert a["prompt_attention_mask"].shape == a["prompt_embeds"].shape[:2]
    with pytest.raises(ValueError, match="unknown name"):
        build_generator("sd-99")


@pytest.mark.parametrize(
    "name,denoiser_m,vae_m,hw",
    [
        ("sd15", 859.52, 83.65, (512, 512)),
        ("sana-0.6b", 591.75, 312.25, (1024, 1024)),
        ("sdxl", 2567.46, 83.65, (1024, 1024)),  # SDXL-base UNet: 2.567B
        ("sd3.5-medium", 2243.17, 83.82, (1024, 1024)),
        ("flux.1-dev", 11901.41, 83.82, (1024, 1024)),  # FLUX.1-dev: 11.9B
        ("flux.2-klein-4b", 3875.54, 84.05, (1024, 1024)),
        ("qwen-image", 20430.4, 126.89, (1024, 1024)),  # Qwen-Image: 20.4B
    ],
)
def test_real_shapes_on_meta(name, denoiser_m, vae_m, hw):
    """Real-shaped presets construct in place on the target device (meta here: shapes only, no memory)."""
    gen, make_batch = build_generator(name, device="meta", dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in gen.denoiser.parameters()) / 1e6, 2) == denoiser_m
    assert round(sum(p.numel() for p in gen.vae.parameters()) / 1e6, 2) == vae_m
    assert (gen.height, gen.width) == hw
    assert all(p.dtype == torch.bfloat16 and p.is_meta for p in gen.parameters())
    assert make_batch(1, 4, 10)["prompt_embeds"].is_meta


# --------------------------------------------------------------------------------------------- callable
def test_callable_generator():
    pixels = nn.Parameter(torch.randn(2, 3, 8, 8) * 2)
    holder = nn.Module()
    holder.pixels = pixels
    gen = CallableGenerator(lambda batch: pixels * 1.5, module=holder)
    out = gen({})
    torch.testing.assert_close(out, pixels.detach() * 1.5)  # returned as is: never clamped
    assert out.abs().max() > 1
    out.mean().backward()
    assert gen.trainable_parameters() == [pixels] and torch.isfinite(pixels.grad).all()
    assert CallableGenerator(lambda b: torch.zeros(1, 3, 4, 4)).trainable_parameters() == []
    with pytest.raises(ValueError, match=r"images.*\(B, 3, H, W\)"):
        CallableGenerator(lambda b: torch.zeros(2, 4, 8, 8))({})
    with pytest.raises(TypeError, match="fn"):
        CallableGenerator(3)
    with pytest.raises(TypeError, match="module"):
        CallableGenerator(lambda b: b, module=3)


# --------------------------------------------------------------------------------------------- janus
def tiny_janus():
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    vision = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        depth=1,
        num_image_tokens=16,
        mlp_ratio=2.0,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=48,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 2],
        num_res_blocks=1,
        projection_dim=32,
        image_token_embed_dim=32,
        num_hidden_layers=2,
    )
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=63)
    return JanusForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def janus():
    torch.manual_seed(0)
    return tiny_janus()


def _janus_batch(b=2, s=5, seed=0, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    batch = {"gen_input_ids": torch.randint(1, 60, (b, s), generator=g), "seed": seed}
    if left_pad:
        mask = torch.ones(b, s, dtype=torch.long)
        mask[0, :2] = 0
        batch["gen_attention_mask"] = mask
    return batch


@pytest.mark.parametrize(
    "train,cfg", [("gen_head", 1.0), ("gen_modules", 1.0), ("gen_modules", 3.0), ("all", 1.0)]
)
def test_janus_output_and_grads(janus, train, cfg):
    janus.zero_grad(set_to_none=True)
    janus.requires_grad_(True)  # a fresh model: everything trainable until someone freezes
    gen = JanusGenerator(janus, train=train, cfg_scale=cfg)
    images = gen(_janus_batch(left_pad=True))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32  # 4 patches * 2**2 upsampling
    assert torch.isfinite(images).all()
    images.mean().backward()
    bad, zero, leaked = _grad_report(gen, janus)
    assert not bad, f"trainable params without a finite grad: {bad[:5]}"
    assert zero == 0 or train == "all", f"{zero} trainable params got an all-zero grad"
    assert not leaked, f"params outside the trainable set got grads: {leaked[:5]}"
    inner = janus.model
    expected = {
        "gen_head": [inner.generation_head],
        "gen_modules": [inner.generation_embeddings, inner.generation_aligner, inner.generation_head],
        "all": [
            inner.generation_embeddings,
            inner.generation_aligner,
            inner.generation_head,
            inner.language_model,
        ],
    }[train]
    assert {id(p) for p in gen.trainable_parameters()} == {id(p) for m in expected for p in m.parameters()}
    # the generator never touches the understanding vision tower; the VQ model is frozen
    assert all(p.requires_grad for p in inner.vision_model.parameters())
    assert not any(p.requires_grad for p in inner.vqmodel.parameters())
    assert all(p.requires_grad == (train == "all") for p in inner.language_model.parameters())


def test_janus_straight_through_forward_is_the_sampled_image(janus):
    """Forward of the straight-through path = the VQ decode of the hard tokens (HF's decode_image_tokens)."""
    gen = JanusGenerator(janus)
    images = gen(_janus_batch())
    with torch.no_grad():
        ref = janus.decode_image_tokens(gen.last_tokens).permute(0, 3, 1, 2)
    torch.testing.assert_close(images.detach(), ref, rtol=1e-4, atol=1e-5)
    assert gen.last_tokens.shape == (2, 16) and (gen.last_tokens < 48).all()


def test_janus_seeded_and_teacher_forcing_consistent(janus):
    a = JanusGenerator(janus, train="gen_modules")
    b = JanusGenerator(janus, train="gen_head")  # samples the same way; differs only in the grad pass
    x1, t1 = a(_janus_batch(seed=3)), a.last_tokens.clone()
    x2, t2 = a(_janus_batch(seed=3)), a.last_tokens.clone()
    assert torch.equal(t1, t2) and torch.equal(x1, x2)
    b(_janus_batch(seed=3))
    assert torch.equal(b.last_tokens, t1)
    a(_janus_batch(seed=4))
    assert not torch.equal(a.last_tokens, t1)


def test_janus_teacher_forced_logits_match_the_cached_sampling(janus):
    """The grad pass recomputes the logits the sampler used: the gen_modules and gen_head grads on the head
    agree."""
    grads = []
    for train in ("gen_modules", "gen_head"):
        janus.zero_grad(set_to_none=True)
        gen = JanusGenerator(janus, train=train, tau=0.7)
        gen(_janus_batch(seed=1, left_pad=True)).sum().backward()
        grads.append(janus.model.generation_head.vision_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("train", ["gen_modules", "gen_head"])
def test_janus_pre_sampled_tokens(janus, train):
    """batch["gen_tokens"] skips the sampling (one LM call instead of N) and gives the same images and
    grads."""
    gen = JanusGenerator(janus, train=train)
    grads, images, tokens = [], [], None
    counter = _CallCounter(janus.model.language_model)
    try:
        for given in (False, True):
            janus.zero_grad(set_to_none=True)
            batch = _janus_batch(seed=2, left_pad=True)
            if given:
                batch["gen_tokens"] = tokens
            counter.grad = counter.no_grad = 0
            out = gen(batch)
            if given:
                assert counter.grad + counter.no_grad == 1, "pre-sampled tokens must skip the sampling loop"
            tokens = gen.last_tokens
            out.sum().backward()
            images.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in gen.trainable_parameters()]))
    finally:
        counter.remove()
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-5)  # ST: hard + soft - soft rounds
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="gen_tokens"):
        gen(_janus_batch() | {"gen_tokens": tokens[:, :3]})


def test_janus_errors_name_the_argument(janus):
    gen = JanusGenerator(janus)
    with pytest.raises(KeyError, match="gen_input_ids"):
        gen({"captions": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="gen_input_ids"):
        gen({"gen_input_ids": torch.zeros(2, 3, 4, dtype=torch.long)})
    with pytest.raises(TypeError, match="gen_input_ids"):
        gen({"gen_input_ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="gen_attention_mask"):
        gen({"gen_input_ids": torch.zeros(2, 3, dtype=torch.long), "gen_attention_mask": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="train"):
        JanusGenerator(janus, train="lm")
    with pytest.raises(ValueError, match="num_image_tokens"):
        JanusGenerator(janus, num_image_tokens=10)
    with pytest.raises(TypeError, match="JanusForConditionalGeneration"):
        JanusGenerator(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["sd15", "sana-0.6b", "sdxl", "sd3.5-medium", "flux.2-klein-4b", "flux.1-dev"]
)
def test_real_shapes_train_step_on_gpu(name):
    # FLUX.1-dev (11.9B) trains fully here: weights + grads take 48 GB in bf16, so it runs at 512 px
    size = {"height": 512, "width": 512} if name == "flux.1-dev" else {}
    gen, make_batch = build_generator(
        name, device="cuda", dtype=torch.bfloat16, num_inference_steps=4, **size
    )
    batch = make_batch(1, 8, 1000, generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    images = gen(batch)
    assert images.shape == (1, 3, gen.height, gen.width) and images.dtype == torch.bfloat16
    images.float().mean().backward()
    grads = [p.grad for p in gen.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    print(f"{name}: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def test_preset_names_listed():
    from uno_engine.testing.presets import PRESETS
    from uno_engine.testing.presets.critics import NAMES as CRITICS

    assert set(TINY) | {"sd15", "sana-0.6b"} <= set(NAMES)
    for spec in PRESETS.values():  # every paired preset resolves to a generator and a critic builder
        assert spec.generator in set(NAMES) | {"janus"}, spec.name
        assert spec.critic in CRITICS, spec.name
