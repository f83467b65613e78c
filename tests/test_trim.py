"""`Critic.from_hf(..., trim=True)`: the critic computes only what its losses read (uno_engine.critics.trim).

The trimmed critic must give the untrimmed one's caption and negative hidden states, patch features and image
gradient under every checkpoint policy, for every family; and it must actually skip the work (the LM's last
layer's MLP sees only the rows read, LLaVA's tower stops at its feature layer)."""

from __future__ import annotations

import pytest
import torch

from uno_engine.critics import Critic
from uno_engine.critics.common import find_layers
from uno_engine.critics.trim import reading_rows, trim_rows, vision_hidden_states
from uno_engine.testing.presets.critics import TINY, build_critic_model

_MODELS: dict[str, tuple] = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = build_critic_model(name, dtype=torch.float32)
    return _MODELS[name]


def _pass(critic, *, negatives: bool, capture=None):
    """Caption (+ 2 negatives) read of 2 fixed images; a loss over every output; -> (outputs, image grad)."""
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(2, 3, 40, 48, generator=g) * 2 - 1).requires_grad_(True)
    caps = torch.randint(5, 60, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    negs = torch.randint(5, 60, (2, 2, 7), generator=g) if negatives else None
    out = critic.forward_with_negatives(critic.prepare(images, backend="torch"), caps, mask, negs, None)
    w = torch.linspace(-1, 1, out.caption_hidden.shape[-1])
    loss = (out.caption_hidden * w).sum() + out.patch_features.square().mean()
    if negatives:
        loss = loss + (out.negative_hidden * w).sum()
    loss.backward()
    got = [out.caption_hidden, out.patch_features] + ([out.negative_hidden] if negatives else [])
    return [t.detach() for t in got], images.grad


@pytest.mark.parametrize("policy", ["none", "selective", "layer"])
@pytest.mark.parametrize("name", TINY)
def test_trimmed_critic_equals_the_full_forward(name, policy):
    model, processor = _model(name)
    full = Critic.from_hf(model, processor, checkpoint=policy, trim=False)
    trimmed = Critic.from_hf(model, processor, checkpoint=policy, trim=True)
    for negatives in (False, True):
        want, want_grad = _pass(full, negatives=negatives)
        got, grad = _pass(trimmed, negatives=negatives)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        rel = ((grad - want_grad).norm() / want_grad.norm()).item()
        assert rel <= 1e-6, f"{name}/{policy}: image gradient differs by {rel:.3g} (relative)"


@pytest.mark.parametrize("name", TINY)
def test_the_last_layer_runs_on_the_rows_read_only(name):
    model, processor = _model(name)
    critic = Critic.from_hf(model, processor, checkpoint="selective", trim=True)
    last = find_layers(critic.language_model)[-1]
    rows = []
    handle = last.mlp.down_proj.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[1]))
    seq = []
    first = find_layers(critic.language_model)[0]
    handle2 = first.register_forward_pre_hook(lambda _m, args, kw=None: seq.append(args[0].shape[1]))
    try:
        _pass(critic, negatives=False)
    finally:
        handle.remove()
        handle2.remove()
    T = seq[0]  # prefix P + caption 7
    P = T - 7
    # the forward, then the selective policy's recomputation in the backward: both on rows P - 1..
    assert rows and all(r == T - (P - 1) for r in rows), (rows, T, P)
    assert critic.trimmed_layer is last


def test_llava_tower_stops_at_its_feature_layer_and_hf_still_records_every_layer():
    model, processor = _model("tiny-llava-clip")  # vision_feature_layer = -2: the last layer is never read
    layers = find_layers(model.model.vision_tower)
    calls = []
    handle = layers[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        trimmed = Critic.from_hf(model, processor, checkpoint="none", trim=True)
        _pass(trimmed, negatives=False)  # first: transformers must not install its recorder on fewer layers
        assert calls == []
        full = Critic.from_hf(model, processor, checkpoint="none", trim=False)
        _pass(full, negatives=False)
        assert calls == [1]
    finally:
        handle.remove()
    side = model.config.vision_config.image_size
    pv = torch.rand(1, 3, side, side)
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True, return_dict=True).hidden_states
        assert len(hs) == len(layers) + 1
        for idx in ([0], [1], [len(layers)], [2, 1]):
            got = vision_hidden_states(model.model.vision_tower, pv, idx)
            for i, t in zip(idx, got, strict=True):
                torch.testing.assert_close(t, hs[i], rtol=0, atol=0)
    with pytest.raises(ValueError, match="indices"):
        vision_hidden_states(model.model.vision_tower, pv, [len(layers) + 1])


def test_a_capture_of_the_last_layer_is_not_trimmed():
    """The latent view may read a decoder layer's output at the image slots: from the last layer, those rows
    must be the model's, so the reader does not trim then."""
    model, processor = _model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor, checkpoint="none", trim=True)
    images = torch.rand(1, 3, 40, 48) * 2 - 1
    caps = torch.randint(5, 60, (1, 5))
    inputs = critic.prepare(images, backend="torch")
    last = critic.trimmed_layer

    def read(c, capture):
        return c.reader.read(lambda: c.encode_image_tokens(inputs), caps, capture=capture).patch_features

    with torch.no_grad():
        got = read(critic, last)
        want = read(Critic.from_hf(model, processor, checkpoint="none", trim=False), last)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_trim_rows_outside_a_read_and_bad_input():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    want = lin(x)
    trim_rows(lin)
    torch.testing.assert_close(lin(x), want)  # no reading scope: untrimmed
    with reading_rows(2):
        y = lin(x)
    torch.testing.assert_close(y[:, 2:], want[:, 2:])
    assert torch.equal(y[:, :2], torch.zeros(2, 2, 3))
    model, processor = _model("tiny-llava-clip")
    with pytest.raises(ValueError, match="trim"):
        Critic.from_hf(model, processor, trim="yes")
