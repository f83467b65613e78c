"""The one reader (uno_engine.critics.reader): every family read in its own chat template, exact against the HF
model's own `labels=` loss on what its processor gives; hard negatives and the latent view through the same
template; the errors that name the argument; and no package calling another's private members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uno_engine import UNOConfig, UNOLoss, UNOStep
from uno_engine.critics import Critic
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets import build_preset
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.processors import TEMPLATES, chat_processor

FAMILIES = (
    "tiny-llava-clip",
    "tiny-llava-siglip",
    "tiny-llava-onevision",
    "tiny-janus",
    "tiny-qwen2-vl",
    "tiny-qwen3-vl",
)
INSTRUCTION = "describe this image ."
CAPTIONS = ["a red circle left of a blue square .", "two green stars"]
_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = build_critic_model(name, dtype=torch.float32)
    return _MODELS[name]


def _size(image_processor) -> int:
    s = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    return int(s.get("height") or s.get("shortest_edge") or 32) if isinstance(s, dict) else 32


def _conversation(proc, caption):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
    prompt = proc.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    return prompt, proc.apply_chat_template([user, answer], tokenize=False)


def _hf_loss_sum(model, proc, image_u8, caption):
    """(sum of the HF model's own per-token loss over the completion, token count, input_ids): the processor's
    input for the templated conversation, labels -100 outside the completion (TRL's convention)."""
    prompt, full = _conversation(proc, caption)
    inputs = proc(text=[full], images=[image_u8], return_tensors="pt")
    n_prompt = proc(text=[prompt], images=[image_u8], return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    count = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    return float(loss) * count, count, inputs["input_ids"][0]


@pytest.mark.parametrize("name", FAMILIES)
def test_templated_caption_loss_equals_the_hf_models_own_loss(name):
    model, image_processor = _model(name)
    proc = chat_processor(name, model, image_processor)
    critic = Critic.from_hf(model, proc, instruction=INSTRUCTION, checkpoint="none")
    S = _size(image_processor)
    rng = np.random.default_rng(0)
    images_u8 = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in CAPTIONS]
    want_sum, want_n = 0.0, 0
    for img, cap in zip(images_u8, CAPTIONS, strict=True):
        s, n, hf_ids = _hf_loss_sum(model, proc, img, cap)
        want_sum, want_n = want_sum + s, want_n + n
    # the critic's sequence is the processor's, token for token (last caption's sequence)
    ids, mask = critic.tokenize_captions(CAPTIONS)
    n_img = int((hf_ids == model.config.image_token_id).sum())
    prefix = critic.reader.prefix(n_img)
    ours = [model.config.image_token_id if t is None else t for t in prefix] + ids[-1][mask[-1] > 0].tolist()
    assert ours == hf_ids.tolist()

    images = torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images_u8])
    images.requires_grad_(True)
    step = UNOStep(
        CallableGenerator(lambda batch: images),
        critic,
        UNOLoss(caption=1.0),
        UNOConfig(input_range=(0.0, 1.0), backend="torch", read=None),
    )
    out = step({"captions": ids, "caption_mask": mask})
    torch.testing.assert_close(
        out.loss.double(), torch.tensor(want_sum / want_n, dtype=torch.float64), rtol=1e-5, atol=0
    )
    out.loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the gradient reaches the image


def test_a_custom_template_is_read_exactly():
    """The template comes from the processor, never hard-coded: another wording of the prompt and the turns."""
    name = "tiny-qwen2-vl"
    model, image_processor = _model(name)
    custom = TEMPLATES["qwen"].replace("you are a helpful assistant .", "what is in this picture ?")
    proc = chat_processor(name, model, image_processor, chat_template=custom)
    critic = Critic.from_hf(model, proc, instruction=INSTRUCTION, checkpoint="none")
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    s, n, hf_ids = _hf_loss_sum(model, proc, img, CAPTIONS[0])
    ids, mask = critic.tokenize_captions(CAPTIONS[:1])
    assert proc.tokenizer.convert_tokens_to_ids("picture") in critic.reader.prefix(16)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    out = critic(critic.prepare(x, input_range=(0.0, 1.0)), ids, mask)
    logp = torch.log_softmax(out.logits().double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(-logp.sum(), torch.tensor(s, dtype=torch.float64), rtol=1e-5, atol=0)


def test_without_an_instruction_the_sequence_is_unchanged():
    """A full processor without an instruction, or an image processor alone: [image tokens] caption."""
    name = "tiny-qwen2-vl"
    model, image_processor = _model(name)
    proc = chat_processor(name, model, image_processor)
    plain = Critic.from_hf(model, image_processor, checkpoint="none")
    full = Critic.from_hf(model, proc, checkpoint="none")
    cfg = model.config
    assert (
        plain.reader.prefix(3)
        == full.reader.prefix(3)
        == [cfg.vision_start_token_id, None, None, None, cfg.vision_end_token_id]
    )
    ids, mask = full.tokenize_captions(CAPTIONS)
    assert (
        ids[0, : int(mask[0].sum())].tolist()
        == proc.tokenizer(CAPTIONS[0], add_special_tokens=False)["input_ids"]
    )


def _separate_and_packed(view_or_critic, inputs, caps, masks, negs, nmask):
    packed = view_or_critic.forward_with_negatives(inputs, caps, masks, negs, nmask)
    outs = [view_or_critic(inputs, caps, masks)] + [
        view_or_critic(inputs, negs[:, j], nmask[:, j]) for j in range(negs.shape[1])
    ]
    real = masks > 0
    torch.testing.assert_close(
        packed.caption_hidden[real], outs[0].caption_hidden[real], rtol=1e-5, atol=1e-5
    )
    for j in range(negs.shape[1]):
        r = nmask[:, j] > 0
        torch.testing.assert_close(
            packed.negative_hidden[:, j][r], outs[j + 1].caption_hidden[r], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(packed.negative_labels[:, j], outs[j + 1].caption_labels)


def _negatives(critic, k=2):
    texts = [["a blue circle left of a red square .", "a red square"], ["two red stars", "three green stars"]]
    from uno_engine.negatives import to_tensor

    caps, masks = critic.tokenize_captions(CAPTIONS)
    negs, nmask = to_tensor(texts, critic.encode_caption, k=k, length=caps.shape[1])
    return caps, masks, negs, nmask


@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-qwen2-vl"])
def test_templated_negatives_equal_separate_passes(name):
    model, image_processor = _model(name)
    critic = Critic.from_hf(
        model, chat_processor(name, model, image_processor), instruction=INSTRUCTION, checkpoint="none"
    )
    S = _size(image_processor)
    images = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        _separate_and_packed(critic, critic.prepare(images), *_negatives(critic))


def test_templated_latent_view_reads_the_template_and_equals_separate_passes():
    """Janus's latent view with a template: the generation embeddings fill the template's image slots
    (<begin_of_image> slots <end_of_image> inside the user turn), and packed negatives equal separate passes."""
    from uno_engine.generators import JanusGenerator
    from uno_engine.latent import LatentCritic

    preset = build_preset("tiny-janus")
    model = preset.hf_model
    proc = chat_processor("tiny-janus", model, preset.image_processor)
    critic = Critic.from_hf(model, proc, instruction=INSTRUCTION, checkpoint="none")
    gen = JanusGenerator(model)
    view = LatentCritic(critic, gen)
    batch = preset.make_batch(seed=3)
    with torch.no_grad():
        inputs = view.prepare(gen(batch, view="latent"))
        N = inputs.image_embeds.shape[1]
        prefix = critic.reader.prefix(N, latent=True)
        boi, eoi = proc.tokenizer.convert_tokens_to_ids(["<begin_of_image>", "<end_of_image>"])
        i0 = prefix.index(None)
        assert (
            prefix[i0 - 1] == boi
            and prefix[i0 + N] == eoi
            and prefix[i0 + N + 1 :] == list(critic.reader.prompt.tail)
        )
        _separate_and_packed(view, inputs, *_negatives(critic))


def test_bad_input_names_the_argument():
    name = "tiny-llava-clip"
    model, image_processor = _model(name)
    proc = chat_processor(name, model, image_processor)
    with pytest.raises(ValueError, match="instruction=.*full processor"):
        Critic.from_hf(model, image_processor, instruction=INSTRUCTION)
    bare = chat_processor(name, model, image_processor)
    bare.chat_template = None
    with pytest.raises(ValueError, match="instruction=.*no chat template"):
        Critic.from_hf(model, bare, instruction=INSTRUCTION)
    no_slot = chat_processor(
        name, model, image_processor, chat_template=TEMPLATES["llava"].replace("<image>", "")
    )
    with pytest.raises(ValueError, match="instruction=.*0 image placeholders"):
        Critic.from_hf(model, no_slot, instruction=INSTRUCTION)
    with pytest.raises(ValueError, match="tokenize_captions: .*without a tokenizer"):
        Critic.from_hf(model, image_processor).tokenize_captions(CAPTIONS)
    critic = Critic.from_hf(model, proc, instruction=INSTRUCTION, checkpoint="none")
    with pytest.raises(ValueError, match="more than length=3"):
        critic.tokenize_captions(CAPTIONS, length=3)
    limit = model.config.text_config.max_position_embeddings
    long = " ".join(["red"] * limit)
    with pytest.raises(ValueError, match="captions: .*context"):
        critic.tokenize_captions([long])
    ids = torch.ones(1, limit, dtype=torch.long)  # too long after the image prefix, in the step's read too
    with pytest.raises(ValueError, match="captions: .*context"):
        critic(critic.prepare(torch.zeros(1, 3, 30, 30)), ids)
