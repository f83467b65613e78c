"""Qwen3-VL critic (DeepStack, interleaved M-RoPE) on a tiny random-weight `Qwen3VLForConditionalGeneration`,
against the HF model's own forward (logits -> cross-entropy, eager autograd), and its processor layout in the
bridge against the HF processor on photograph-like images (tests/test_bridge.py's `photo`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_bridge import photo, to_input

import uno_engine.critics.qwen3_vl as q3
from uno_engine import reference
from uno_engine.bridge_spec import BridgeSpec
from uno_engine.critics import Critic, CriticInputs, Qwen3VLCritic
from uno_engine.testing.presets.critics import build_critic_model, qwen3_vl_processor

B, L = 3, 7


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with its DeepStack mergers scaled up, so that DeepStack moves the loss by far more than
    the tolerance (with the preset's small random weights its share would be near the rounding error)."""
    model, processor = build_critic_model("tiny-qwen3-vl")
    with torch.no_grad():
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(40.0)
    return model, processor


def _captions(batch=B, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(0, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 2 :] = 0  # right padding
    mask[-1, 3:] = 0
    return caps, mask


def _processor_inputs(processor, H=24, W=40, batch=B, seed=0) -> CriticInputs:
    """A non-square grid (the processor makes 32 x 48 of a 24 x 40 image: 8 x 12 patches), so the h and w rows
    of the M-RoPE ids differ."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(batch)]
    o = processor(images=images, return_tensors="pt")
    return CriticInputs(pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"])


def _hf_ce(model, pixel_values, grid_thw, caps, mask) -> torch.Tensor:
    """Caption CE of the model's own forward: input_ids with the processor's placeholders, mm_token_type_ids,
    logits -> cross-entropy on the caption tokens (eager; gradients flow to pixel_values)."""
    cfg = model.config
    n = int(grid_thw[0].prod()) // cfg.vision_config.spatial_merge_size**2
    prefix = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    b = caps.shape[0]
    ids = torch.cat([torch.tensor(prefix).expand(b, -1), caps], 1)
    am = torch.cat([torch.ones(b, len(prefix), dtype=torch.long), mask], 1)
    logits = model(
        input_ids=ids,
        attention_mask=am,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        mm_token_type_ids=(ids == cfg.image_token_id).int(),
    ).logits
    P = len(prefix)
    pred = logits[:, P - 1 : P - 1 + caps.shape[1]].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), caps.masked_fill(mask == 0, -100).reshape(-1))


def _ce(out) -> torch.Tensor:
    logits = out.logits()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), out.caption_labels.reshape(-1))


class _NeverActive(list):
    """Stands in for qwen3_vl._ACTIVE: no critic pass is ever active, so the DeepStack hooks add nothing."""

    def append(self, item):
        pass

    def remove(self, item):
        pass


@pytest.mark.parametrize("checkpoint", ["none", "layer", "selective"])
def test_loss_and_input_gradient_match_hf_forward(tiny, checkpoint):
    model, processor = tiny
    critic = Critic.from_hf(model, processor, checkpoint=checkpoint)
    assert isinstance(critic, Qwen3VLCritic)
    inputs = _processor_inputs(processor)
    assert inputs.image_grid_thw[0].tolist() == [1, 8, 12]
    caps, mask = _captions()

    pv = inputs.pixel_values.clone().requires_grad_(True)
    ours = _ce(critic(CriticInputs(pixel_values=pv, image_grid_thw=inputs.image_grid_thw), caps, mask))
    (g_ours,) = torch.autograd.grad(ours, pv)

    pv_ref = inputs.pixel_values.clone().requires_grad_(True)
    ref = _hf_ce(model, pv_ref, inputs.image_grid_thw, caps, mask)
    (g_ref,) = torch.autograd.grad(ref, pv_ref)

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def test_deepstack_and_mrope_are_what_the_parity_checks(tiny, monkeypatch):
    """The parity above is sensitive to both new parts: without the DeepStack sums, or with 1-D positions
    instead of the M-RoPE ids, the critic's loss moves by far more than its tolerance."""
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    inputs = _processor_inputs(processor)
    caps, mask = _captions()
    with torch.no_grad():
        ref = _hf_ce(model, inputs.pixel_values, inputs.image_grid_thw, caps, mask)
        full = _ce(critic(inputs, caps, mask))
        with monkeypatch.context() as mp:
            mp.setattr(q3, "_ACTIVE", _NeverActive())
            no_deepstack = _ce(critic(inputs, caps, mask))
        with monkeypatch.context() as mp:
            mp.setattr(Qwen3VLCritic, "_position_ids", lambda self, *a: None)
            plain_positions = _ce(critic(inputs, caps, mask))
    tol = 1e-5 * abs(float(ref)) + 1e-6
    assert abs(float(full - ref)) <= tol
    assert abs(float(no_deepstack - ref)) > 100 * tol, (float(no_deepstack), float(ref))
    assert abs(float(plain_positions - ref)) > 30 * tol, (float(plain_positions), float(ref))


def test_deepstack_hooks_act_only_inside_the_critic(tiny):
    """The hooks leave the model's own forward alone (before and after a critic pass) and hold no features
    after the pass."""
    model, processor = tiny
    inputs = _processor_inputs(processor)
    caps, mask = _captions()
    with torch.no_grad():
        before = _hf_ce(model, inputs.pixel_values, inputs.image_grid_thw, caps, mask)
        critic = Critic.from_hf(model, processor)
        critic(inputs, caps, mask)
        after = _hf_ce(model, inputs.pixel_values, inputs.image_grid_thw, caps, mask)
    assert critic._deepstack is None and not q3._ACTIVE
    assert float(before) == float(after)
    hooks = [len(layer._forward_hooks) for layer in model.model.language_model.layers]
    Critic.from_hf(model, processor)  # a second critic on the same model installs no second hook
    assert [len(layer._forward_hooks) for layer in model.model.language_model.layers] == hooks
    assert hooks[: len(critic.deepstack_layers)] == [1] * len(critic.deepstack_layers)


def test_prepare_through_the_bridge_matches_hf_with_gradient(tiny):
    """Generated images -> Critic.prepare (bridge) -> critic loss, against the same bridge output fed to the
    HF model: equal loss and equal gradient on the images."""
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    caps, mask = _captions(batch=2)
    images = (torch.rand(2, 3, 40, 56) * 2 - 1).requires_grad_(True)
    inputs = critic.prepare(images, backend="torch")
    assert inputs.grid_thw == tuple(inputs.image_grid_thw[0].tolist())
    ours = _ce(critic(inputs, caps, mask))
    (g_ours,) = torch.autograd.grad(ours, images)

    images_ref = images.detach().clone().requires_grad_(True)
    pv = reference.bridge(images_ref, critic.spec)
    ref = _hf_ce(model, pv, critic.spec.image_grid_thw(2, 40, 56), caps, mask)
    (g_ref,) = torch.autograd.grad(ref, images_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def test_patch_features_are_the_last_block_in_raster_order(tiny):
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    inputs = _processor_inputs(processor, batch=2)
    seen = {}
    handle = model.model.visual.blocks[-1].register_forward_hook(lambda m, a, out: seen.update(h=out))
    try:
        feats, grid = critic.encode_patches(inputs)
    finally:
        handle.remove()
    gh, gw = grid
    m = critic.merge
    assert (gh, gw) == (8, 12) and feats.shape == (2, gh * gw, critic.vision_dim)
    h = seen["h"]  # (2 * gh * gw, D) in the processor's merge-window order
    for b, r, c in [(0, 0, 0), (0, 3, 10), (1, 7, 11), (1, 4, 1)]:
        window = (r // m) * (gw // m) + c // m
        row = b * gh * gw + window * m * m + (r % m) * m + c % m
        torch.testing.assert_close(feats[b, r * gw + c], h[row])


@pytest.mark.parametrize("size", [(300, 211), (211, 300), (97, 131), (517, 703)])
def test_bridge_parity_with_the_qwen3_vl_processor(size):
    """Qwen3-VL's processor (Qwen2-VL class, patch 16, mean = std = 0.5, 256^2..4096^2 pixels): mean |d| <=
    0.5/255 and max |d| <= 6/255 before normalization, the same grid, and the normalized values within
    6/255/std."""
    proc = qwen3_vl_processor()
    spec = BridgeSpec.from_image_processor(proc)
    assert (spec.layout, spec.patch_size, spec.merge_size, spec.temporal_patch_size) == ("qwen2_vl", 16, 2, 2)
    assert spec.image_mean == (0.5, 0.5, 0.5) and spec.image_std == (0.5, 0.5, 0.5)
    H, W = size
    img = photo(H, W, seed=H * 1000 + W)
    out = proc(images=img, return_tensors="pt", do_normalize=False)
    exp, grid = out["pixel_values"].double(), out["image_grid_thw"]
    got = reference.bridge(to_input(img), dataclasses.replace(spec, do_normalize=False)).double()
    assert got.shape == exp.shape
    d = (got - exp).abs() * 255
    assert d.mean() <= 0.5 and d.max() <= 6.0, (float(d.mean()), float(d.max()))
    torch.testing.assert_close(spec.image_grid_thw(1, H, W), grid.long())
    exp_n = proc(images=img, return_tensors="pt")["pixel_values"].double()
    got_n = reference.bridge(to_input(img), spec).double()
    assert (got_n - exp_n).abs().max() <= 6.0 / 255 / 0.5 + 1e-6


def test_real_shape_builds_on_meta():
    """qwen3-vl-8b: Qwen3-VL-8B-Instruct's shapes (about 8.77B parameters) on the meta device."""
    model, processor = build_critic_model("qwen3-vl-8b", device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - 8.77) / 8.77 < 0.03, n
    critic = Critic.from_hf(model, processor, checkpoint="selective")
    assert isinstance(critic, Qwen3VLCritic)
    assert critic.deepstack_layers == (8, 16, 24) and critic.hidden_size == 4096
    assert critic.spec.grid(448, 448) == (28, 28)
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True


def test_bad_inputs_name_the_argument(tiny):
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    inputs = _processor_inputs(processor, batch=2)
    caps = torch.randint(0, 100, (2, 4))
    with pytest.raises(ValueError, match="image_grid_thw"):
        critic(CriticInputs(pixel_values=inputs.pixel_values), caps)
    with pytest.raises(ValueError, match="pixel_values must be pre-patchified"):
        critic(
            CriticInputs(pixel_values=torch.zeros(2, 3, 32, 48), image_grid_thw=inputs.image_grid_thw), caps
        )
    with pytest.raises(ValueError, match="fuse_patch_embed=True"):
        critic.prepare(torch.zeros(2, 3, 32, 48), fuse_patch_embed=True)
    assert critic._deepstack is None and not q3._ACTIVE  # a failed pass leaves nothing behind


def test_negative_captions_share_the_prefix_with_deepstack(tiny):
    """forward_with_negatives packs K negatives after one image prefix; the DeepStack sums land on that
    prefix, so each negative's hidden states are those of a plain forward with it."""
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    inputs = critic.prepare(torch.rand(2, 3, 32, 48) * 2 - 1)
    caps = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    neg = torch.randint(0, 100, (2, 2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = critic.forward_with_negatives(inputs, caps, None, neg, None)
        torch.testing.assert_close(
            out.caption_hidden, critic(inputs, caps).caption_hidden, rtol=1e-5, atol=1e-5
        )
        for k in range(2):
            plain = critic(inputs, neg[:, k]).caption_hidden
            torch.testing.assert_close(out.negative_hidden[:, k], plain, rtol=1e-5, atol=1e-5)
