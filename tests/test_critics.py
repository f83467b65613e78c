"""Critic adapters on tiny real transformers classes (random weights): against the HF model's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uno_engine.critics import Critic, CriticInputs, CriticOutput
from uno_engine.testing.presets.critics import NAMES, REAL, TINY, build_critic_model

B, L = 3, 7


def _hf_inputs(name, model, processor, batch=B, seed=0):
    """Processor-made critic inputs from random uint8 images (the HF way)."""
    rng = np.random.default_rng(seed)
    side = 32 if name in ("tiny-qwen2-vl", "tiny-qwen2_5-vl", "tiny-qwen3-vl") else 40
    images = [rng.integers(0, 256, (side, side + 3 * i, 3), dtype=np.uint8) for i in range(batch)]
    if name in ("tiny-qwen2-vl", "tiny-qwen2_5-vl", "tiny-qwen3-vl"):
        images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(batch)]
        o = processor(images=images, return_tensors="pt")
        return CriticInputs(pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"])
    return CriticInputs(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])


def _captions(batch=B, length=L, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 2 :] = 0  # right padding
    mask[2, 3:] = 0
    return caps, mask


def _hf_caption_loss(name, model, inputs, caps, mask):
    """CE of the HF model's own forward: input_ids with the image placeholders, labels on the caption only."""
    cfg = model.config
    if inputs.image_grid_thw is not None:
        n_img = int(inputs.image_grid_thw[0].prod()) // cfg.vision_config.spatial_merge_size**2
        prefix = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
    else:
        p = cfg.vision_config.patch_size
        n = (inputs.pixel_values.shape[-2] // p) * (inputs.pixel_values.shape[-1] // p)
        if (
            getattr(cfg, "vision_feature_select_strategy", "full") == "full"
            and "clip" in cfg.vision_config.model_type
        ):
            n += 1
        prefix = [cfg.image_token_id] * n
    b = caps.shape[0]
    ids = torch.cat([torch.tensor(prefix).expand(b, -1), caps], 1)
    am = torch.cat([torch.ones(b, len(prefix), dtype=torch.long), mask], 1)
    labels = torch.cat([torch.full((b, len(prefix)), -100), caps.masked_fill(mask == 0, -100)], 1)
    kw = dict(input_ids=ids, attention_mask=am, pixel_values=inputs.pixel_values, labels=labels)
    if inputs.image_grid_thw is not None:
        kw["image_grid_thw"] = inputs.image_grid_thw
        kw["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
    with torch.no_grad():
        return model(**kw).loss


def _ce(out: CriticOutput) -> torch.Tensor:
    logits = out.logits()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), out.caption_labels.reshape(-1))


def _tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from uno_engine.testing.presets.critics import qwen2_vl_processor

    text = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        out_hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=124,
        video_token_id=125,
        vision_start_token_id=126,
        vision_end_token_id=127,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return model, qwen2_vl_processor(patch_size=4, min_pixels=32 * 32, max_pixels=32 * 32)


def _build(name):
    if name == "tiny-qwen2_5-vl":
        return _tiny_qwen2_5_vl()
    return build_critic_model(name)


@pytest.mark.parametrize("name", list(TINY) + ["tiny-qwen2_5-vl"])
@pytest.mark.parametrize("checkpoint", ["none", "layer", "selective"])
def test_caption_ce_matches_hf_forward(name, checkpoint):
    model, processor = _build(name)
    critic = Critic.from_hf(model, processor, checkpoint=checkpoint)
    inputs = _hf_inputs(name, model, processor)
    caps, mask = _captions()
    out = critic(inputs, caps, mask)
    ours = _ce(out)
    ref = _hf_caption_loss(name, model, inputs, caps, mask)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (
        f"{name}: critic CE {ours.item()} != HF {ref.item()}"
    )
    # shapes of the contract
    H = critic.hidden_size
    assert out.caption_hidden.shape == (B, L, H)
    assert out.lm_head_weight.shape == (critic.vocab_size, H)
    assert out.caption_labels.dtype == torch.int64
    assert (out.caption_labels == caps.masked_fill(mask == 0, -100)).all()
    gh, gw = out.grid
    assert out.patch_features.shape == (B, gh * gw, critic.vision_dim)


@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-llava-siglip"])
def test_llava_patch_features_are_the_selected_layer_without_cls(name):
    model, processor = build_critic_model(name)
    critic = Critic.from_hf(model, processor)
    inputs = _hf_inputs(name, model, processor)
    feats, grid = critic.encode_patches(inputs)
    with torch.no_grad():
        hs = model.model.vision_tower(inputs.pixel_values, output_hidden_states=True).hidden_states
    ref = hs[model.config.vision_feature_layer]
    ref = ref[:, ref.shape[1] - grid[0] * grid[1] :]  # CLIP: drop CLS; SigLIP: none
    torch.testing.assert_close(feats, ref)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2_5-vl"])
def test_qwen_patch_features_in_raster_order(name):
    """Row (i, j) of the patch features is the vision output of processor patch (i, j)."""
    model, processor = _build(name)
    critic = Critic.from_hf(model, processor)
    inputs = _hf_inputs(name, model, processor, batch=2)
    feats, (gh, gw) = critic.encode_patches(inputs)
    m = model.config.vision_config.spatial_merge_size
    # processor order of one image: (gh/m, gw/m, m, m)
    order = torch.arange(gh * gw).reshape(gh // m, gw // m, m, m).permute(0, 2, 1, 3).reshape(-1)
    seen = {}

    def hook(mod, args, out):
        seen["x"] = args[0]

    # the merger's input is the blocks' output in processor order (Qwen2.5: window order, undone by the model)
    h = model.model.visual.merger.register_forward_hook(hook)
    with torch.no_grad():
        model.model.visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
    h.remove()
    x = seen["x"]
    if "2_5" in name:
        from transformers.vision_utils import get_vision_window_index

        vc = model.config.vision_config
        win, _ = get_vision_window_index(inputs.image_grid_thw, m, vc.window_size, vc.patch_size)
        x = x.reshape(-1, m * m, x.shape[-1])[torch.argsort(win)].reshape(-1, x.shape[-1])
    x = x.reshape(2, gh * gw, -1)
    torch.testing.assert_close(feats, x[:, order])


def test_critic_is_frozen_and_gives_input_gradients():
    model, processor = build_critic_model("tiny-llava-siglip")
    critic = Critic.from_hf(model, processor)
    assert all(not p.requires_grad for p in critic.parameters())
    critic.train()
    assert not any(m.training for m in critic.modules()), "a critic stays in eval mode"
    inputs = _hf_inputs("tiny-llava-siglip", model, processor)
    inputs.pixel_values.requires_grad_(True)
    caps, mask = _captions()
    out = critic(inputs, caps, mask)
    (_ce(out) + out.patch_features.square().mean()).backward()
    g = inputs.pixel_values.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_janus_freezes_only_the_understanding_modules():
    model, processor = build_critic_model("tiny-janus")
    critic = Critic.from_hf(model, processor, checkpoint="layer")
    inner = model.model
    for mod in (inner.vision_model, inner.aligner, inner.language_model, model.lm_head):
        assert all(not p.requires_grad for p in mod.parameters())
    for mod in (inner.vqmodel, inner.generation_embeddings, inner.generation_aligner, inner.generation_head):
        assert all(p.requires_grad for p in mod.parameters()), "generation modules must stay trainable"
    gen_ids = {id(p) for m in (inner.vqmodel, inner.generation_head) for p in m.parameters()}
    assert not gen_ids & {id(p) for p in critic.parameters()}
    # the LM layer wrappers act only inside the critic: a plain LM call takes the normal path
    emb = torch.randn(2, 5, model.config.text_config.hidden_size, requires_grad=True)
    inner.language_model(inputs_embeds=emb).last_hidden_state.sum().backward()
    assert emb.grad is not None


def test_unsupported_model_names_the_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64
        )
    )
    with pytest.raises(
        TypeError, match="LlavaForConditionalGeneration.*JanusForConditionalGeneration.*Qwen2VL"
    ):
        Critic.from_hf(model, None)


def test_bad_arguments_name_the_argument():
    model, processor = build_critic_model("tiny-llava-clip")
    with pytest.raises(ValueError, match="checkpoint"):
        Critic.from_hf(model, processor, checkpoint="full")
    with pytest.raises(ValueError, match="attn_backend"):
        Critic.from_hf(model, processor, attn_backend="flash3")
    critic = Critic.from_hf(model, processor)
    inputs = _hf_inputs("tiny-llava-clip", model, processor)
    with pytest.raises(ValueError, match="captions"):
        critic(inputs, torch.zeros(B, L))
    with pytest.raises(ValueError, match="caption_mask"):
        critic(inputs, torch.zeros(B, L, dtype=torch.long), torch.ones(B, L + 1))
    with pytest.raises(ValueError, match="batch size"):
        critic(inputs, torch.zeros(B + 1, L, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_values"):
        critic(CriticInputs(pixel_values=torch.zeros(B, 4, 30, 30)), torch.zeros(B, L, dtype=torch.long))


def test_no_full_vocabulary_logits_in_forward():
    from torch.utils._python_dispatch import TorchDispatchMode

    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor)
    V = critic.vocab_size
    shapes = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    inputs = _hf_inputs("tiny-llava-clip", model, processor)
    caps, mask = _captions()
    with Shapes():
        critic(inputs, caps, mask)
    assert shapes and not any(s and s[-1] == V for s in shapes), "the critic must not compute [.., V] logits"


@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-janus", "tiny-qwen2-vl"])
def test_prepare_runs_the_bridge_with_gradient(name):
    model, processor = build_critic_model(name)
    critic = Critic.from_hf(model, processor)
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    for backend in ("reference", "torch"):
        inputs = critic.prepare(images, backend=backend)
        if name == "tiny-qwen2-vl":
            assert inputs.image_grid_thw.shape == (2, 3)
        out = critic(inputs, torch.randint(0, 100, (2, 5)))
        (_ce(out) + out.patch_features.square().mean()).backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        images.grad = None


def test_prepare_matches_the_processor():
    """Critic.prepare(images) equals the processor's pixel_values for the same (uint8-exact) image."""
    model, processor = build_critic_model("tiny-llava-siglip")
    critic = Critic.from_hf(model, processor)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = processor(images=list(u8), return_tensors="pt")["pixel_values"]
    images = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    ours = critic.prepare(images, backend="reference").pixel_values
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_preset_names():
    assert set(NAMES) == set(TINY) | {"mid-llava"} | set(REAL)
    with pytest.raises(ValueError, match="unknown name"):
        build_critic_model("tiny-gpt")


@pytest.mark.parametrize(
    "name,params_b",
    [
        ("llava-1.5-7b", 7.06),
        ("siglip-so400m-qwen2-1.5b", 1.97),
        ("janus-pro-1b", 2.09),
        ("janus-pro-7b", 7.42),
        ("qwen2-vl-2b", 2.21),
    ],
)
def test_real_shapes_build_on_meta(name, params_b):
    """Real-shaped presets construct (no allocation on the meta device) with about the real parameter
    count."""
    model, processor = build_critic_model(name, device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - params_b) / params_b < 0.1, f"{name}: {n:.2f}B parameters, expected about {params_b}B"
    assert processor is not None
    critic = Critic.from_hf(model, processor, checkpoint="selective")
    assert critic.hidden_size == model.config.text_config.hidden_size


def test_qwen2_vl_grid_is_known_on_the_host():
    """prepare() carries the grid as Python ints, so our adapter never reads image_grid_thw back (a sync per
    read on CUDA). transformers' own Qwen2-VL vision tower still reads it inside its forward."""
    from uno_engine import Critic
    from uno_engine.critics.qwen2_vl import _host_grid
    from uno_engine.testing.presets.critics import build_critic_model

    model, processor = build_critic_model("tiny-qwen2-vl")
    critic = Critic.from_hf(model, processor)
    inputs = critic.prepare(torch.rand(2, 3, 40, 56) * 2 - 1)
    assert inputs.grid_thw is not None
    assert list(inputs.grid_thw) == inputs.image_grid_thw[0].tolist()

    class NoReadback(torch.Tensor):
        def tolist(self):
            raise AssertionError("image_grid_thw was read back to the host")

    inputs.image_grid_thw = inputs.image_grid_thw.as_subclass(NoReadback)
    assert _host_grid(inputs) == tuple(inputs.grid_thw)


# ------------------------------------------------------------------------------- fused bridge patch embedding
FUSED = ["tiny-llava-clip", "tiny-llava-siglip", "tiny-janus"]


@pytest.mark.parametrize("name,backend", [(n, "torch") for n in FUSED] + [("tiny-llava-siglip", "triton")])
def test_fused_patch_embed_equals_unfused_and_keeps_no_image(name, backend, device, monkeypatch):
    """prepare(fuse_patch_embed=True): the bridge applies the tower's conv patch embedding. Loss and image
    gradient equal the unfused path (<= 1e-6 relative, fp32), and the normalized image (B, 3, S, S) that the
    frozen conv keeps for its backward (PyTorch issue 133566) is no longer saved."""
    dev = device if backend == "triton" else "cpu"  # triton: CUDA, or the interpreter on the CPU
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs on CUDA, as on the CPU
    model, processor = build_critic_model(name, device=dev)
    critic = Critic.from_hf(model, processor)
    S = critic.image_size
    images0 = (torch.rand(B, 3, 40, 56) * 2 - 1).to(dev)  # not S x S: the bridge's saved input is told apart
    caps, mask = (t.to(dev) for t in _captions())
    runs = {}
    for fuse in (False, True):
        images = images0.clone().requires_grad_(True)
        saved = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs = critic.prepare(images, backend=backend, fuse_patch_embed=fuse)
            out = critic(inputs, caps, mask)
        loss = _ce(out) + out.patch_features.square().mean()
        loss.backward()
        runs[fuse] = (loss.detach(), images.grad, saved.count((B, 3, S, S)), inputs)
    (l0, g0, n0, _), (l1, g1, n1, fused) = runs[False], runs[True]
    assert fused.pixel_values is None and fused.patch_tokens.shape[:2] == (B, out.patch_features.shape[1])
    assert abs(l1 - l0) <= 1e-6 * abs(l0), f"{name}: fused loss {l1.item()} != unfused {l0.item()}"
    rel = ((g1 - g0).norm() / g0.norm()).item()
    tol = 1e-6 if dev == "cpu" else 1e-5  # CUDA: the attention backward's own atomics
    assert rel <= tol, f"{name}: image gradient differs by {rel:.3g} (relative)"
    assert n0 >= 1, "the unfused conv should keep its input (B, 3, S, S)"
    assert n1 == 0, f"fused: {n1} tensors of the normalized image's shape were saved for the backward"
    emb = [m for n, m in model.named_modules() if n.endswith("patch_embedding")]
    assert len(emb) == 1 and isinstance(emb[0], torch.nn.Conv2d), "the conv must be back after the forward"


def test_fuse_patch_embed_auto_and_qwen2_vl():
    """ "auto" fuses only where it is exact and saves memory; Qwen2-VL never takes patch tokens."""
    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor)
    x = torch.rand(2, 3, 40, 56) * 2 - 1

    def fused(images, **kw):
        return critic.prepare(images, fuse_patch_embed="auto", **kw).patch_tokens is not None

    assert fused(x.clone().requires_grad_(True), backend="torch")
    assert not fused(x), "no grad: nothing to save, pixel_values are kept"
    assert not fused(x.clone().requires_grad_(True), backend="reference"), "the eager baseline stays unfused"
    assert not fused(x.bfloat16().requires_grad_(True), backend="torch"), (
        "images in another dtype than the critic"
    )
    assert critic.prepare(x).patch_tokens is None, "prepare's default is the unfused path"

    qmodel, qproc = build_critic_model("tiny-qwen2-vl")
    qwen = Critic.from_hf(qmodel, qproc)
    assert any("Conv3d" in r for r in qwen.fused_patch_embed_reasons())
    xq = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert qwen.prepare(xq, fuse_patch_embed="auto").pixel_values is not None
    with pytest.raises(ValueError, match="fuse_patch_embed=True.*Qwen2-VL.*Conv3d"):
        qwen.prepare(xq, fuse_patch_embed=True)
    with pytest.raises(ValueError, match="patch_tokens.*Qwen2-VL"):
        qwen(CriticInputs(patch_tokens=torch.zeros(2, 64, 32)), torch.zeros(2, 4, dtype=torch.long))


def test_fused_patch_tokens_bad_input_names_the_argument():
    model, processor = build_critic_model("tiny-llava-clip")  # 30 px, patch 6 -> N = 25, D = 32
    critic = Critic.from_hf(model, processor)
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    tokens = critic.prepare(images, fuse_patch_embed=True).patch_tokens
    caps = torch.zeros(2, 4, dtype=torch.long)
    for bad in (tokens[:, 1:], torch.zeros(2, 25, 31), torch.zeros(50, 32), tokens.long()):
        with pytest.raises(ValueError, match=r"inputs.patch_tokens must be .*\(B, N=25, D=32\)"):
            critic(CriticInputs(patch_tokens=bad), caps)
    with pytest.raises(ValueError, match="exactly one of pixel_values and patch_tokens, got both"):
        critic(CriticInputs(pixel_values=torch.zeros(2, 3, 30, 30), patch_tokens=tokens), caps)
    with pytest.raises(ValueError, match="exactly one of pixel_values and patch_tokens, got neither"):
        critic(CriticInputs(), caps)
    with pytest.raises(ValueError, match="fuse_patch_embed must be True, False or 'auto'"):
        critic.prepare(images, fuse_patch_embed="yes")
    # an error inside the tower still puts the conv back
    layer = model.model.vision_tower.encoder.layers[0]

    def boom(*a):
        raise RuntimeError("boom")

    h = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            critic(CriticInputs(patch_tokens=tokens), caps)
    finally:
        h.remove()
    assert isinstance(model.model.vision_tower.embeddings.patch_embedding, torch.nn.Conv2d)
    out = critic(CriticInputs(patch_tokens=tokens), caps)  # and it still works
    assert out.patch_features.shape == (2, 25, critic.vision_dim)
