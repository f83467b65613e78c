"""Hard negatives: caption text -> GenEval-style negatives, the prefix-shared critic pass, and the loss term."""

import pytest
import torch
from torch import nn

from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import CallableGenerator
from uno_engine.negatives import CATEGORIES, make_negatives, to_tensor
from uno_engine.testing.presets.critics import build_critic_model

PLAIN = UNOConfig(read=None)  # the processor's exact read: these tests compare against it

# ---------------------------------------------------------------------------------------------- text


def test_make_negatives_examples():
    caps = [
        "a photo of a red dog and a blue cat",
        "a photo of three apples",
        "A bus left of a cow",
        "a photo of an orange orange",
        "hello world",
    ]
    negs, cats = make_negatives(caps, k=6, seed=0, return_categories=True)
    assert "a photo of a blue dog and a red cat" in negs[0]  # attribute binding: colors swapped
    assert "a photo of a red cat and a blue dog" in negs[0]  # binding: objects swapped around their colors
    assert {"two", "four"} <= {n.split()[3] for n in negs[1] if n.endswith("apples")}  # count +-1
    assert (
        "A bus right of a cow" in negs[2] and "A cow left of a bus" in negs[2]
    )  # relation flipped / swapped
    assert negs[4] == []  # nothing to negate: no negatives (documented)
    for caption, row, crow in zip(caps, negs, cats, strict=True):
        assert len(row) <= 6 and len(set(row)) == len(row)
        assert all(n.lower() != caption.lower() for n in row)
        assert all(c in CATEGORIES for c in crow)
    # "orange orange": the first is a color, the second the fruit; articles follow the new word
    assert all(not n.endswith("orange red") for n in negs[3])
    assert any(n.startswith("a photo of a ") and n.endswith(" orange") for n in negs[3])
    for caption, row in zip(caps, negs, strict=True):  # one change per negative: same word count +-1
        assert all(abs(len(n.split()) - len(caption.split())) <= 1 for n in row)


def test_make_negatives_spreads_over_categories_and_is_deterministic():
    caps = ["two red cars to the left of a blue bench"]
    a, ca = make_negatives(caps, k=5, seed=3, return_categories=True)
    b = make_negatives(caps, k=5, seed=3)
    assert a == b
    assert len(set(ca[0])) >= 4  # round-robin over color, binding, count, relation, object
    # a caption gets the same negatives at any batch position
    assert make_negatives(["a photo of a dog"] + caps, k=5, seed=3)[1] == a[0]
    assert any(make_negatives(caps, k=5, seed=s) != a for s in range(4, 10))
    assert make_negatives(caps, k=0, seed=0) == [[]]


def test_make_negatives_bad_input():
    with pytest.raises(TypeError, match="captions_text"):
        make_negatives("a dog", k=2, seed=0)
    with pytest.raises(ValueError, match="`k`"):
        make_negatives(["a dog"], k=-1, seed=0)


def test_to_tensor_pads_missing_and_rejects_long():
    enc = {"a": 1, "red": 2, "dog": 3, "blue": 4}
    ids, mask = to_tensor(
        [["a red dog", "a blue dog"], ["a dog"]], lambda s: [enc[w] for w in s.split()], k=2, length=4
    )
    assert ids.tolist() == [[[1, 2, 3, 0], [1, 4, 3, 0]], [[1, 3, 0, 0], [0, 0, 0, 0]]]
    assert mask.sum(-1).tolist() == [[3, 3], [2, 0]]
    with pytest.raises(ValueError, match="length=2"):
        to_tensor([["a red dog"]], lambda s: [enc[w] for w in s.split()], k=1, length=2)


# ------------------------------------------------------------------------------------- critic + loss


class PixelGenerator(nn.Module):
    def __init__(self, batch=2, h=40, w=56):
        super().__init__()
        self.pixels = nn.Parameter(torch.randn(batch, 3, h, w) * 0.5)

    def forward(self, batch):
        return torch.tanh(self.pixels)


_CRITICS = {}


def _critic(name, checkpoint="none"):
    if name not in _CRITICS:
        _CRITICS[name] = build_critic_model(name)
    model, processor = _CRITICS[name]
    return Critic.from_hf(model, processor, checkpoint=checkpoint)


def _batch(critic, b=2, length=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = critic.vocab_size - 1
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0
    nmask = torch.ones(b, k, length, dtype=torch.long)
    nmask[0, 1, 3:] = 0
    return {
        "captions": torch.randint(3, hi, (b, length), generator=g),
        "caption_mask": mask,
        "negative_captions": torch.randint(3, hi, (b, k, length), generator=g),
        "negative_caption_mask": nmask,
    }


def _reference_negatives(critic, gen, batch):
    """float64 eager: every caption through the critic SEPARATELY, logits in float64, the K+1 softmax."""
    inputs = critic.prepare(gen(batch))
    caps = torch.cat([batch["captions"][:, None], batch["negative_captions"]], 1)
    masks = torch.cat([batch["caption_mask"][:, None], batch["negative_caption_mask"]], 1)
    scores = []
    for j in range(caps.shape[1]):
        out = critic(inputs, caps[:, j], masks[:, j])
        logp = torch.log_softmax(out.caption_hidden.double() @ out.lm_head_weight.double().T, -1)
        tok = logp.gather(-1, caps[:, j, :, None]).squeeze(-1) * masks[:, j]
        scores.append(tok.sum(-1))
        if j == 0:
            caption = -tok.sum() / masks[:, 0].sum()
    s = torch.stack(scores, 1)
    return caption, (torch.logsumexp(s, 1) - s[:, 0]).mean()


@pytest.mark.parametrize(
    "name,checkpoint",
    [
        ("tiny-llava-clip", "none"),
        ("tiny-llava-siglip", "layer"),
        ("tiny-janus", "layer"),
        ("tiny-llava-clip", "selective"),
        ("tiny-qwen2-vl", "none"),
    ],
)
def test_shared_prefix_equals_separate_passes_float64(name, checkpoint):
    critic = _critic(name, checkpoint)
    gen = PixelGenerator()
    batch = _batch(critic)
    step = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0, negatives=0.7), PLAIN)
    out = step(batch)
    out.loss.backward()
    g_eng = gen.pixels.grad.clone()
    gen.pixels.grad = None
    caption, neg = _reference_negatives(critic, lambda b: torch.tanh(gen.pixels), batch)
    ref = caption + 0.7 * neg
    ref.backward()
    torch.testing.assert_close(out.metrics["negatives"].double(), neg.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    rel = (g_eng.double() - gen.pixels.grad.double()).norm() / gen.pixels.grad.double().norm()
    assert rel < 1e-5, f"generator gradient relative difference {rel:.2e}"


def test_absent_negative_leaves_the_softmax():
    critic = _critic("tiny-llava-clip")
    gen = PixelGenerator()
    batch = _batch(critic, k=3)
    step = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=0.0, negatives=1.0), PLAIN)
    batch_absent = {**batch, "negative_caption_mask": batch["negative_caption_mask"].clone()}
    batch_absent["negative_caption_mask"][:, 2] = 0  # the third negative of every image is absent
    batch_two = {
        **batch,
        "negative_captions": batch["negative_captions"][:, :2],
        "negative_caption_mask": batch["negative_caption_mask"][:, :2],
    }
    a, b = step(batch_absent).metrics["negatives"], step(batch_two).metrics["negatives"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert step(batch).metrics["negatives"] > b  # a third present negative adds to the softmax


def test_negatives_bad_input_and_k0():
    critic = _critic("tiny-llava-clip")
    gen = PixelGenerator()
    step = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0, negatives=1.0), PLAIN)
    batch = _batch(critic)
    with pytest.raises(ValueError, match="negative_captions"):
        step({**batch, "negative_captions": batch["negative_captions"][:1]})  # B differs
    with pytest.raises(ValueError, match="negative_captions"):
        step({**batch, "negative_captions": batch["negative_captions"][..., :4]})  # L differs
    with pytest.raises(ValueError, match="negative_caption_mask"):
        step({**batch, "negative_caption_mask": batch["negative_caption_mask"][:, :1]})
    with pytest.raises(KeyError, match="negative_captions"):
        step({"captions": batch["captions"], "caption_mask": batch["caption_mask"]})
    # K = 0 turns the term off: the caption-only step
    k0 = {**batch, "negative_captions": batch["negative_captions"][:, :0], "negative_caption_mask": None}
    out = step(k0)
    plain = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0), PLAIN)(batch)
    assert "negatives" not in out.metrics
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="negative_captions"):
        critic.forward_with_negatives(critic.prepare(gen(batch)), batch["captions"], None, batch["captions"])


def test_negatives_scale_under_accumulation():
    critic = _critic("tiny-llava-clip")
    gen = PixelGenerator(batch=2)
    batch = _batch(critic, b=2)
    loss = UNOLoss(caption=0.0, negatives=1.0)
    full = UNOStep(CallableGenerator(gen, module=gen), critic, loss, PLAIN)(batch).metrics["negatives"]
    parts = []
    for i in range(2):
        gi = PixelGenerator(batch=1)
        gi.pixels.data.copy_(gen.pixels.data[i : i + 1])
        sub = {k: v[i : i + 1] for k, v in batch.items()}
        sub["num_images"] = torch.tensor(2.0)
        parts.append(UNOStep(CallableGenerator(gi, module=gi), critic, loss, PLAIN)(sub).metrics["negatives"])
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-6)


def test_step_config_unchanged_for_negatives():
    # the negatives path runs with the default config (fused patch embedding "auto") as well
    critic = _critic("tiny-llava-clip")
    gen = PixelGenerator()
    batch = _batch(critic)
    outs = []
    for fuse in (False, "auto"):
        gen.pixels.grad = None
        step = UNOStep(
            CallableGenerator(gen, module=gen),
            critic,
            UNOLoss(negatives=1.0),
            UNOConfig(fuse_patch_embed=fuse, read=None),
        )
        o = step(batch)
        o.loss.backward()
        outs.append((o.loss.detach(), gen.pixels.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-7)


def test_reference_backend_gives_the_same_negatives_term():
    critic = _critic("tiny-llava-clip")
    gen = PixelGenerator()
    batch = _batch(critic)
    vals = [
        UNOStep(
            CallableGenerator(gen, module=gen),
            critic,
            UNOLoss(negatives=1.0),
            UNOConfig(backend=b, read=None),
        )(batch).metrics["negatives"]
        for b in ("reference", "auto")
    ]
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-5, atol=1e-6)
