"""The latent view on Janus: the shared LM reads the generated image tokens through the generation embedding.

Ground truth: a hand-written eager computation through the HF model's own modules (generation head,
generation_embeddings, generation_aligner, the LM, lm_head) in float64, independent of uno_engine's critic,
loss and kernels.
"""

import pytest
import torch
import torch.nn.functional as F

from uno_engine import UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import JanusGenerator
from uno_engine.testing.presets import build_preset
from uno_engine.testing.presets.critics import build_critic_model

MARKERS = (1, 125, 126)  # bos, <begin_of_image>, <end_of_image> of the tiny model (ids below its 128 vocab)


@pytest.fixture(scope="module")
def janus64():
    """tiny-janus in float64: the engine and the hand computation agree to rounding."""
    return build_preset("tiny-janus", dtype=torch.float64)


def _batch(preset, seed=3):
    b = preset.make_batch(seed=seed)
    mask = torch.ones_like(b["captions"])
    mask[1, -5:] = 0  # one right-padded caption
    b["caption_mask"] = mask
    return b


def _gumbel(seed, shape):
    """The generator's documented noise: Gumbel(0, 1) from U(0, 1) drawn on a CPU generator seeded by batch['seed']."""
    u = torch.rand(shape, generator=torch.Generator("cpu").manual_seed(seed)).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _hand_loss(model, batch, tokens, feature_layer):
    """The latent view's caption CE, eagerly through the HF modules (float64), and the layer's image states."""
    inner = model.model
    lm, emb = inner.language_model, inner.language_model.get_input_embeddings()
    ids = batch["gen_input_ids"]
    B, N = tokens.shape
    # generator: teacher-forced pass over [prompt, gen_embed(tokens[:-1])], generation-head logits
    prompt = emb(ids)
    tf = inner.generation_aligner(inner.generation_embeddings(tokens[:, :-1]))
    h = lm(inputs_embeds=torch.cat([prompt, tf], 1), use_cache=False).last_hidden_state
    logits = inner.generation_head(h[:, ids.shape[1] - 1 :])
    V = logits.shape[-1]
    soft = torch.softmax(logits + _gumbel(batch["seed"], (B, N, V)).to(logits.dtype), -1)  # tau = T = 1
    y = F.one_hot(tokens, V).to(soft.dtype) + soft - soft.detach()
    # critic: [bos, boi, aligner(y @ E), eoi, caption]
    img = inner.generation_aligner(y @ inner.generation_embeddings.weight)
    bos, boi, eoi = (emb(torch.tensor([t]))[None].expand(B, -1, -1) for t in MARKERS)
    caps, mask = batch["captions"], batch["caption_mask"]
    seq = torch.cat([bos, boi, img, eoi, emb(caps)], 1)
    P = 3 + N
    am = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
    out = lm(inputs_embeds=seq, attention_mask=am, use_cache=False, output_hidden_states=True)
    hid = out.last_hidden_state[:, P - 1 : P - 1 + caps.shape[1]]
    logits_txt = model.lm_head(hid)
    labels = caps.masked_fill(mask == 0, -100)
    ce = F.cross_entropy(logits_txt.reshape(-1, logits_txt.shape[-1]), labels.reshape(-1), reduction="sum")
    feats = out.hidden_states[feature_layer][:, 2 : 2 + N]
    return ce / (labels != -100).sum(), feats


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("train", ["gen_modules", "gen_head"])
def test_latent_loss_and_gradients_equal_the_hand_computation(janus64, train):
    model = janus64.hf_model
    gen = JanusGenerator(model, train=train)
    critic = janus64.make_critic("none")
    critic.latent_markers = MARKERS
    step = UNOStep(gen, critic, UNOLoss(), UNOConfig(view="latent", backend="torch"))
    batch = _batch(janus64)
    params = gen.trainable_parameters()
    for p in params:
        p.grad = None
    out = step(batch)
    out.loss.backward()
    engine = _grads(params)
    tokens = gen.last_tokens
    assert out.images is None and out.latents.kind == "tokens"

    for p in params:
        p.grad = None
    want, _ = _hand_loss(model, batch, tokens, critic.language_model.config.num_hidden_layers // 2)
    want.backward()
    hand = _grads(params)
    # the engine computes the generation-head logits, the Gumbel-softmax and the CE sum in fp32 by design
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-6, atol=0)
    inner = model.model
    names = {id(p): n for n, p in inner.named_parameters()}
    reached = set()
    for p, a, b in zip(params, engine, hand, strict=True):
        assert (a is None) == (b is None), names[id(p)]
        if a is not None:
            err = (a - b).abs().max() / b.abs().max()
            assert err < 1e-5, (names[id(p)], float(err))
            if a.abs().sum() > 0:
                reached.add(names[id(p)].split(".")[0])
    assert "generation_head" in reached
    if train == "gen_modules":
        assert {"generation_embeddings", "generation_aligner"} <= reached
    else:
        assert not inner.generation_embeddings.weight.requires_grad


def test_patch_features_are_the_middle_layer_image_states(janus64):
    model = janus64.hf_model
    critic = janus64.make_critic("none")
    critic.latent_markers = MARKERS
    from uno_engine.latent import LatentCritic

    gen = JanusGenerator(model)
    view = LatentCritic(critic, gen)
    L = critic.language_model.config.num_hidden_layers
    assert view.feature_layer == L // 2
    batch = _batch(janus64)
    lat = gen.latents_for_critic(batch)
    out = view(view.prepare(lat), batch["captions"], batch["caption_mask"])
    _, feats = _hand_loss(model, batch, gen.last_tokens, L // 2)
    # y = onehot + soft - soft is one-hot only up to fp32 rounding of soft (the engine's soft is fp32)
    torch.testing.assert_close(out.patch_features, feats, rtol=1e-5, atol=1e-9)
    assert out.grid == gen.grid and out.patch_features.shape[-1] == critic.hidden_size
    with pytest.raises(ValueError, match="feature_layer"):
        LatentCritic(critic, gen, feature_layer=L + 1)


def test_reference_images_read_through_the_vq_encoder_and_the_generation_embedding(janus64):
    model = janus64.hf_model
    critic = janus64.make_critic("none")
    critic.latent_markers = (None, None, None)
    from uno_engine.latent import LatentCritic

    gen = JanusGenerator(model)
    view = LatentCritic(critic, gen)
    S = gen.grid[0] * 2 ** (len(model.config.vq_config.channel_multiplier) - 1)
    ref = torch.rand(2, 3, S, S, dtype=torch.float64)  # in [0, 1]: input_range (0, 1)
    feats, grid = view.encode_patches(view.prepare(ref, input_range=(0.0, 1.0)))
    vq, inner = model.model.vqmodel, model.model
    _, _, idx = vq.quantize(vq.quant_conv(vq.encoder(ref * 2 - 1)))
    seq = inner.generation_aligner(inner.generation_embeddings(idx.view(2, -1)))
    hs = inner.language_model(inputs_embeds=seq, output_hidden_states=True).hidden_states
    torch.testing.assert_close(
        feats, hs[critic.language_model.config.num_hidden_layers // 2], rtol=1e-10, atol=1e-12
    )
    assert view.vision_dim == critic.hidden_size
    with pytest.raises(ValueError, match="VQ model's resolution"):
        view.prepare(torch.rand(2, 3, S + 8, S + 8, dtype=torch.float64))


def test_no_decoder_and_no_vision_tower_run():
    preset = build_preset("tiny-janus")
    inner = preset.hf_model.model
    critic = preset.make_critic("none")
    step = UNOStep(preset.generator, critic, preset.make_loss(), UNOConfig(view="latent"))
    ran = []
    hooks = [
        m.register_forward_hook(lambda *a, n=n: ran.append(n))
        for n, m in (
            ("vq.decoder", inner.vqmodel.decoder),
            ("vision_model", inner.vision_model),
            ("aligner", inner.aligner),
        )
    ]
    out = step(preset.make_batch())
    out.loss.backward()
    assert ran == []
    img = out.decoded_images()  # lazily, on request: the VQ decoder runs now
    assert ran == ["vq.decoder"] and img.shape[1] == 3
    pixel = preset.generator(preset.make_batch())  # the pixel view's images of the same seed
    torch.testing.assert_close(img, pixel)
    for h in hooks:
        h.remove()


def test_default_markers_and_sequence():
    preset = build_preset("tiny-janus")
    critic = preset.make_critic("none")
    assert critic.latent_markers == (preset.hf_model.config.text_config.bos_token_id, None, None)
    critic.latent_markers = (1, 125, 126)
    assert critic.default_prefix(3, latent=True) == [1, 125, None, None, None, 126]
    critic.latent_markers = (None, 125, None)
    assert critic.default_prefix(2, latent=True) == [125, None, None]
    assert critic.default_prefix(2) == [None, None]  # the pixel view: image tokens only
    with pytest.raises(ValueError, match="codebook"):
        critic.embed_token_probs(torch.zeros(1, 2, 7))


def test_pairs_that_cannot_read_tokens_list_the_reasons():
    preset = build_preset("tiny-janus")
    llava, proc = build_critic_model("tiny-llava-clip")
    from uno_engine.critics import Critic
    from uno_engine.generators import CallableGenerator

    with pytest.raises(ValueError, match="LLaVA critic whose LM cannot read them"):
        UNOStep(preset.generator, Critic.from_hf(llava, proc), preset.make_loss(), UNOConfig(view="latent"))
    other, oproc = build_critic_model("tiny-janus", seed=1)
    with pytest.raises(ValueError, match="different model"):
        UNOStep(preset.generator, Critic.from_hf(other, oproc), preset.make_loss(), UNOConfig(view="latent"))
    fn = CallableGenerator(lambda b: torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="latents_for_critic") as e:
        UNOStep(fn, preset.make_critic("none"), preset.make_loss(), UNOConfig(view="latent"))
    assert "no LatentAdapter is attached" in str(e.value)  # every reason is listed
    with pytest.raises(ValueError, match="UNOConfig.view"):
        UNOConfig(view="latents")


def _negatives_batch(preset, k=3, seed=3):
    """A batch with K hard-negative captions: one padded caption, one padded negative."""
    b = _batch(preset, seed=seed)
    B, L = b["captions"].shape
    g = torch.Generator().manual_seed(seed + 100)
    b["negative_captions"] = torch.randint(1, preset.caption_vocab(), (B, k, L), generator=g)
    nmask = torch.ones(B, k, L, dtype=torch.long)
    nmask[0, 1, L // 2 :] = 0
    b["negative_caption_mask"] = nmask
    return b


def _separate_passes_loss(view, inputs, batch, w_neg):
    """Caption CE + w_neg * hard-negative term from K+1 SEPARATE `LatentCritic.__call__` passes; float64
    log-softmax over the vocabulary: mean_b [logsumexp_j s_bj - s_b0], s_bj = sum of caption j's log-probs."""
    caps = torch.cat([batch["captions"][:, None], batch["negative_captions"]], 1)
    masks = torch.cat([batch["caption_mask"][:, None], batch["negative_caption_mask"]], 1)
    scores, outs = [], []
    for j in range(caps.shape[1]):
        out = view(inputs, caps[:, j], masks[:, j])
        logp = torch.log_softmax(out.caption_hidden.double() @ out.lm_head_weight.double().T, -1)
        tok = logp.gather(-1, caps[:, j, :, None]).squeeze(-1) * masks[:, j]
        scores.append(tok.sum(-1))
        outs.append(out)
    caption = -scores[0].sum() / masks[:, 0].sum()
    s = torch.stack(scores, 1)
    return caption + w_neg * (torch.logsumexp(s, 1) - s[:, 0]).mean(), outs


def test_hard_negatives_equal_separate_passes(janus64):
    """The packed pass (one prefix, K+1 captions under a block mask) against K+1 separate passes of the
    latent view: hidden states, the step's loss and the generator's gradients (float64)."""
    from uno_engine.latent import LatentCritic

    model = janus64.hf_model
    gen = JanusGenerator(model, train="gen_modules")
    critic = janus64.make_critic("none")
    critic.latent_markers = MARKERS
    w_neg = 0.7
    step = UNOStep(
        gen, critic, UNOLoss(caption=1.0, negatives=w_neg), UNOConfig(view="latent", backend="torch")
    )
    batch = _negatives_batch(janus64)
    params = gen.trainable_parameters()
    for p in params:
        p.grad = None
    out = step(batch)
    out.loss.backward()
    engine = _grads(params)
    assert "negatives" in out.metrics

    for p in params:
        p.grad = None
    view = LatentCritic(critic, gen)
    inputs = view.prepare(gen(batch, view="latent"))  # the same seed: the same tokens and Gumbel noise
    want, outs = _separate_passes_loss(view, inputs, batch, w_neg)
    want.backward()
    hand = _grads(params)
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    num = sum(float((a - b).double().norm() ** 2) for a, b in zip(engine, hand, strict=True)) ** 0.5
    den = sum(float(b.double().norm() ** 2) for b in hand) ** 0.5
    assert den > 0 and num / den < 1e-5, num / den

    with torch.no_grad():  # the packed hidden states themselves, caption by caption, and the patch features
        packed = view.forward_with_negatives(
            inputs,
            batch["captions"],
            batch["caption_mask"],
            batch["negative_captions"],
            batch["negative_caption_mask"],
        )
        torch.testing.assert_close(packed.caption_hidden, outs[0].caption_hidden, rtol=1e-9, atol=1e-10)
        for j in range(batch["negative_captions"].shape[1]):
            torch.testing.assert_close(
                packed.negative_hidden[:, j], outs[j + 1].caption_hidden, rtol=1e-9, atol=1e-10
            )
            torch.testing.assert_close(packed.negative_labels[:, j], outs[j + 1].caption_labels)
        torch.testing.assert_close(packed.patch_features, outs[0].patch_features, rtol=1e-9, atol=1e-10)
        assert packed.negative_labels[0, 1, -1] == -100  # the padded negative's labels


def test_hard_negatives_bad_input_and_k0(janus64):
    from uno_engine.latent import LatentCritic

    gen = JanusGenerator(janus64.hf_model)
    critic = janus64.make_critic("none")
    view = LatentCritic(critic, gen)
    batch = _negatives_batch(janus64)
    with torch.no_grad():
        inputs = view.prepare(gen(batch, view="latent"))
        caps, mask, neg = batch["captions"], batch["caption_mask"], batch["negative_captions"]
        with pytest.raises(ValueError, match="negative_captions"):
            view.forward_with_negatives(inputs, caps, mask, neg[:1])  # B differs
        with pytest.raises(ValueError, match="negative_captions"):
            view.forward_with_negatives(inputs, caps, mask, neg[..., :4])  # L differs
        with pytest.raises(ValueError, match="negative_caption_mask"):
            view.forward_with_negatives(inputs, caps, mask, neg, batch["negative_caption_mask"][:, :1])
        with pytest.raises(TypeError, match="LatentInputs"):
            view.forward_with_negatives(inputs.image_embeds, caps, mask, neg)
        k0 = view.forward_with_negatives(inputs, caps, mask, neg[:, :0])  # K = 0: the caption-only pass
        plain = view(inputs, caps, mask)
        assert k0.negative_hidden is None
        torch.testing.assert_close(k0.caption_hidden, plain.caption_hidden, rtol=0, atol=0)


class _NoViewJanus(JanusGenerator):
    """A subclass whose forward takes no `view` keyword: the step could not reach its latent view."""

    def forward(self, batch):
        return super().forward(batch)


def test_forward_view_keyword():
    """The latent view goes through forward (so DDP / FSDP2 hooks run): view='latent' returns
    `latents_for_critic`; a bad view, a pixels-only generator and a forward without the keyword say so."""
    preset = build_preset("tiny-janus")
    gen, batch = preset.generator, preset.make_batch()
    lat = gen(batch, view="latent")
    torch.testing.assert_close(lat.token_probs, gen.latents_for_critic(batch).token_probs)
    assert lat.kind == "tokens" and torch.equal(lat.tokens, gen.last_tokens)
    with pytest.raises(ValueError, match="view must be one of"):
        gen(batch, view="latents")
    from uno_engine.generators import CallableGenerator

    with pytest.raises(ValueError, match="pixels only"):
        CallableGenerator(lambda b: torch.zeros(2, 3, 8, 8))(batch, view="latent")
    with pytest.raises(ValueError, match="forward takes no `view` keyword"):
        UNOStep(
            _NoViewJanus(preset.hf_model), preset.make_critic("none"), UNOLoss(), UNOConfig(view="latent")
        )
