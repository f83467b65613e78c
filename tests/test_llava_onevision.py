"""LLaVA-OneVision critic (SigLIP + Qwen2, one anyres tile) on a tiny random-weight
`LlavaOnevisionForConditionalGeneration`, against the HF model's own forward (logits -> cross-entropy, eager
autograd) on the processor's two views; its processor in the bridge against the HF processor; and the
errors for the layouts it does not take (anyres tiling, non-square images)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_bridge import photo, to_input

from uno_engine import reference
from uno_engine.bridge_spec import BridgeSpec
from uno_engine.critics import Critic, CriticInputs, LlavaOnevisionCritic
from uno_engine.testing.presets.critics import build_critic_model, llava_onevision_processor

B, L = 3, 6


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with a random image_newline (the preset's random init zeroes 1-D parameters)."""
    model, processor = build_critic_model("tiny-llava-onevision")
    with torch.no_grad():
        model.model.image_newline.copy_(torch.randn(32, generator=torch.Generator().manual_seed(5)))
    return model, processor


def _captions(batch=B, length=L):
    caps = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, 3:] = 0  # right padding
    return caps, mask


def _hf_ce(model, pixel_values, image_sizes, caps, mask) -> torch.Tensor:
    """Caption CE of the model's own forward on the processor's (B, 2, 3, s, s) views (base + one tile)."""
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n = g * g + g * (g + 1)  # base view, then the tile with a newline after each row
    b = caps.shape[0]
    ids = torch.cat([torch.full((b, n), cfg.image_token_id), caps], 1)
    am = torch.cat([torch.ones(b, n, dtype=torch.long), mask], 1)
    logits = model(
        input_ids=ids, attention_mask=am, pixel_values=pixel_values, image_sizes=image_sizes
    ).logits
    pred = logits[:, n - 1 : n - 1 + caps.shape[1]].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), caps.masked_fill(mask == 0, -100).reshape(-1))


def _ce(out) -> torch.Tensor:
    logits = out.logits()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), out.caption_labels.reshape(-1))


@pytest.mark.parametrize("checkpoint", ["none", "selective"])
def test_loss_and_input_gradient_match_hf_forward(tiny, checkpoint):
    """The processor's two views of a square image are equal; the critic reads the base view once. Its loss is
    the HF loss, and its gradient on the view is the sum of HF's gradients on the two views."""
    model, processor = tiny
    critic = Critic.from_hf(model, processor, checkpoint=checkpoint)
    assert isinstance(critic, LlavaOnevisionCritic)
    rng = np.random.default_rng(0)
    o = processor(
        images=[rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(B)], return_tensors="pt"
    )
    views = o["pixel_values"]
    assert views.shape == (B, 2, 3, 32, 32) and torch.equal(views[:, 0], views[:, 1])
    caps, mask = _captions()

    pv = views[:, 0].clone().requires_grad_(True)
    ours = _ce(critic(CriticInputs(pixel_values=pv), caps, mask))
    (g_ours,) = torch.autograd.grad(ours, pv)
    ref_views = views.clone().requires_grad_(True)
    ref = _hf_ce(model, ref_views, o["image_sizes"], caps, mask)
    (g_ref,) = torch.autograd.grad(ref, ref_views)

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ref = g_ref.sum(1)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def test_tile_layout_is_what_the_parity_checks(tiny):
    """The prefix is base (16) + tile (4 rows of 4 + newline) tokens and equals HF's; the newline tokens are
    in it: with image_newline zeroed the loss moves, so the parity above checks the layout."""
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    caps, mask = _captions(batch=2)
    with torch.no_grad():
        inputs = critic.prepare(images, backend="reference")
        base, _, (gh, gw) = critic.encode_image_tokens(inputs)
        assert base.shape[1] == gh * gw + gh * (gw + 1) == 36
        ours = _ce(critic(inputs, caps, mask))
        views = inputs.pixel_values[:, None].expand(2, 2, 3, 32, 32)
        ref = _hf_ce(model, views, torch.tensor([[40, 40]] * 2), caps, mask)
        newline = model.model.image_newline.detach().clone()
        model.model.image_newline.data.zero_()
        try:
            moved = _ce(critic(inputs, caps, mask))
        finally:
            model.model.image_newline.data.copy_(newline)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert abs(float(moved - ours)) > 1e-4  # the newline tokens are in the sequence


def test_prepare_through_the_bridge_matches_hf_with_gradient(tiny):
    model, processor = tiny
    critic = Critic.from_hf(model, processor)
    caps, mask = _captions(batch=2)
    images = (torch.rand(2, 3, 40, 40) * 2 - 1).requires_grad_(True)
    ours = _ce(critic(critic.prepare(images, backend="torch"), caps, mask))
    (g_ours,) = torch.autograd.grad(ours, images)
    images_ref = images.detach().clone().requires_grad_(True)
    view = reference.bridge(images_ref, critic.spec)
    ref = _hf_ce(model, torch.stack([view, view], 1), torch.tensor([[40, 40]] * 2), caps, mask)
    (g_ref,) = torch.autograd.grad(ref, images_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))
    # the fused patch embedding (SigLIP's conv computed in the bridge) gives the same loss
    fused = critic.prepare(images.detach(), fuse_patch_embed=True)
    assert fused.patch_tokens is not None
    with torch.no_grad():
        torch.testing.assert_close(_ce(critic(fused, caps, mask)), ours.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(300, 300), (97, 97), (211, 300)])
def test_bridge_parity_with_the_processor_base_view(size):
    """The base view (exact resize to 384, SigLIP mean/std): mean |d| <= 0.5/255, max |d| <= 6/255 before
    normalization, against the PIL processor (any aspect ratio: the base view ignores it)."""
    proc = llava_onevision_processor(384)
    spec = BridgeSpec.from_image_processor(proc)
    assert (spec.resize, spec.size, spec.crop_size) == ("exact", (384, 384), None)
    H, W = size
    img = photo(H, W, seed=H * 1000 + W)
    exp = proc(images=img, return_tensors="pt", do_normalize=False)["pixel_values"][:, 0].double()
    got = reference.bridge(to_input(img), dataclasses.replace(spec, do_normalize=False)).double()
    assert got.shape == exp.shape == (1, 3, 384, 384)
    d = (got - exp).abs() * 255
    assert d.mean() <= 0.5 and d.max() <= 6.0, (float(d.mean()), float(d.max()))


def test_anyres_tiling_and_non_square_images_raise_naming_the_setting(tiny):
    model, processor = tiny
    tiled = llava_onevision_processor(32)
    tiled.image_grid_pinpoints = [[32, 32], [32, 64], [64, 32]]
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        BridgeSpec.from_image_processor(tiled)
    default = type(processor)()  # the checkpoints' 36 pinpoints up to 2304 x 2304
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        BridgeSpec.from_image_processor(default)
    cfg = model.config
    old = cfg.image_grid_pinpoints
    cfg.image_grid_pinpoints = [[32, 32], [32, 64]]
    try:
        with pytest.raises(ValueError, match=r"config\.image_grid_pinpoints"):
            Critic.from_hf(model, processor)
    finally:
        cfg.image_grid_pinpoints = old
    critic = Critic.from_hf(model, processor)
    with pytest.raises(ValueError, match=r"square, got \(32, 48\)"):
        critic.prepare(torch.zeros(1, 3, 32, 48))
    with pytest.raises(ValueError, match="pixel_values must be"):  # the processor's 5-D views, unsplit
        critic(CriticInputs(pixel_values=torch.zeros(1, 2, 3, 32, 32)), torch.zeros(1, 2, dtype=torch.long))
