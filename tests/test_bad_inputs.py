"""Bad inputs at the public entry points (UNOStep, UNOLoss, UNOConfig, Critic.from_hf), run on both op
backends: every row gets an error that names the argument, with the same error class on "torch" and
"triton" (the Triton kernels run under the interpreter on CPU). The ops' own bad-input tables live in their
test files (test_bridge.py, test_linear_cross_entropy.py, test_regression.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets.critics import build_critic_model

B, H, W, L = 2, 24, 28, 6


@pytest.fixture(scope="module")
def critic():
    model, processor = build_critic_model("tiny-llava-clip")
    return Critic.from_hf(model, processor)


def _images(kind: str) -> torch.Tensor:
    x = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if kind == "rank3":
        return x[0]
    if kind == "channels4":
        return torch.cat([x, x[:, :1]], dim=1)
    if kind == "int":
        return (x * 100).to(torch.int64)
    if kind == "nan":
        x[1, 2, 3, 4] = float("nan")
    if kind == "inf":
        x[0, 0, 0, 0] = float("inf")
    if kind == "empty":
        return x[:0]
    return x


def _batch(vocab: int, kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    caps = torch.randint(3, vocab - 1, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if kind == "captions_rank1":
        return {"captions": caps[0]}
    if kind == "captions_float":
        return {"captions": caps.float()}
    if kind == "captions_empty":
        return {"captions": caps[:, :0]}
    if kind == "captions_negative_id":
        caps[1, 2] = -5
    if kind == "captions_id_past_vocab":
        caps[0, 3] = vocab
    if kind == "captions_batch_mismatch":
        return {"captions": caps[:1]}
    if kind == "mask_shape":
        return {"captions": caps, "caption_mask": mask[:, :-1]}
    if kind == "mask_empty_row":
        mask[1] = 0
    return {"captions": caps, "caption_mask": mask}


# (images kind, batch kind, error class, a word the message must contain)
STEP_TABLE = [
    ("rank3", "ok", ValueError, "images"),
    ("channels4", "ok", ValueError, "images"),
    ("int", "ok", TypeError, "images"),
    ("nan", "ok", ValueError, "NaN"),
    ("inf", "ok", ValueError, "Inf"),
    ("empty", "ok", ValueError, "captions"),  # 0 images against B captions: the batch sizes differ
    ("ok", "captions_rank1", ValueError, "captions"),
    ("ok", "captions_float", TypeError, "captions"),
    ("ok", "captions_empty", ValueError, "captions"),
    ("ok", "captions_negative_id", ValueError, "vocabulary"),
    ("ok", "captions_id_past_vocab", ValueError, "vocabulary"),
    ("ok", "captions_batch_mismatch", ValueError, "captions"),
    ("ok", "mask_shape", ValueError, "caption_mask"),
    ("ok", "mask_empty_row", ValueError, "caption_mask"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("images_kind,batch_kind,error,word", STEP_TABLE)
def test_step_bad_inputs(critic, backend, images_kind, batch_kind, error, word):
    images = _images(images_kind)
    gen = CallableGenerator(lambda b: images)
    step = UNOStep(gen, critic, UNOLoss(caption=1.0), UNOConfig(backend=backend))
    with pytest.raises(error, match=word):
        step(_batch(critic.vocab_size, batch_kind))


def test_step_empty_batch_is_an_error_not_a_nan(critic):
    """B == 0 everywhere: no caption tokens to average over, so the step refuses it instead of returning 0/0."""
    gen = CallableGenerator(lambda b: _images("empty"))
    step = UNOStep(gen, critic, UNOLoss(caption=1.0))
    batch = {"captions": torch.zeros(0, L, dtype=torch.long)}
    with pytest.raises(ValueError, match="empty"):
        step(batch)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"caption": -1.0}, "caption"),
        ({"density": float("nan")}, "density"),
        ({"structure": "a"}, "structure"),
        ({"structure_mode": "pixels"}, "structure_mode"),
        ({"normalize": "batch"}, "normalize"),
    ],
)
def test_loss_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        UNOLoss(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_missing_targets_name_the_key(critic, backend):
    gen = CallableGenerator(lambda b: _images("ok"))
    step = UNOStep(gen, critic, UNOLoss(caption=1.0, density=1.0), UNOConfig(backend=backend))
    with pytest.raises(ValueError, match="density_target.*reference_images"):
        step(_batch(critic.vocab_size, "ok"))


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"backend": "cuda"}, "backend"),
        ({"clamp": "wrap"}, "clamp"),
        ({"input_range": (1.0, -1.0)}, "input_range"),
        ({"fuse_patch_embed": "yes"}, "fuse_patch_embed"),
    ],
)
def test_config_bad_fields(kwargs, word):
    with pytest.raises(ValueError, match=word):
        UNOConfig(**kwargs)


def test_from_hf_unsupported_model_lists_the_families():
    with pytest.raises((TypeError, ValueError), match="(?is)(?=.*llava)(?=.*janus)(?=.*qwen2)"):
        Critic.from_hf(nn.Linear(2, 2), None)


def test_from_hf_bad_checkpoint_names_the_argument():
    model, processor = build_critic_model("tiny-llava-clip")
    with pytest.raises(ValueError, match="checkpoint"):
        Critic.from_hf(model, processor, checkpoint="sometimes")
