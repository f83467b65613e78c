"""Tiny model FOLDERS for `uno-train` (random weights, nothing downloaded): a diffusers pipeline and an
image-text-to-text critic written with `save_pretrained`, with word-level tokenizers and a chat template built
in-process, so the command loads them exactly as it loads FLUX.1-dev or Qwen2.5-VL from disk.

    python -m uno_engine.testing.presets.folders --out /tmp/uno-tiny      # sd + flux pipelines, llava + qwen2-vl
    # then: /tmp/uno-tiny/{tiny-sd,tiny-flux,tiny-llava,tiny-qwen2-vl} and /tmp/uno-tiny/prompts.jsonl

Pipelines: "tiny-sd" (StableDiffusionPipeline: the tiny-sd UNet + VAE, a 1-layer CLIP text encoder) and
"tiny-flux" (FluxPipeline: the tiny-flux transformer + VAE, a CLIP and a 1-layer T5). Critics: "tiny-llava"
(LlavaForConditionalGeneration + LlavaProcessor) and "tiny-qwen2-vl" (Qwen2VLForConditionalGeneration with
an image processor and a tokenizer only: Qwen2VLProcessor needs torchvision for its video half).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

WORDS = (
    "a an the red green blue yellow black white cube ball cat dog bird tree house car photo of on under "
    "next to in sky table grass two three small big"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = [
    "a red cube on the table",
    "two blue balls under a tree",
    "a black cat next to a white dog",
    "a yellow car in the grass",
    "a small bird in the sky",
    "a big green house",
    "three red balls on the grass",
    "a photo of a blue car",
]


def word_tokenizer(max_len: int, *, special: dict[str, int] | None = None, vocab_size: int | None = None):
    """A word-level PreTrainedTokenizerFast on WORDS (ids 4..), pad 0 / unk 1 / eos 2 / bos 3, plus `special`
    tokens at fixed ids (e.g. {"<image>": 127}), with CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    vocab.update(special or {})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_len,
        additional_special_tokens=list(special or {}),
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def _clip(hidden: int, *, projection_dim=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=8,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=3,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    return (CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection)(cfg).eval()


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    cfg = T5Config(
        vocab_size=len(WORDS) + 4, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2, pad_token_id=0
    )
    return T5EncoderModel(cfg).eval()


def save_tiny_pipeline(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline `name` ("tiny-sd" | "tiny-flux") to `out` with save_pretrained."""
    import diffusers as d

    from uno_engine.testing.presets.generators import build_generator

    torch.manual_seed(seed)
    gen, _ = build_generator(name)
    if name == "tiny-sd":
        pipe = d.StableDiffusionPipeline(
            vae=gen.vae,
            text_encoder=_clip(32),
            tokenizer=word_tokenizer(8),
            unet=gen.denoiser,
            scheduler=gen.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif name == "tiny-flux":
        pipe = d.FluxPipeline(
            scheduler=gen.scheduler,
            vae=gen.vae,
            text_encoder=_clip(24),
            tokenizer=word_tokenizer(8),
            text_encoder_2=_t5(32),
            tokenizer_2=word_tokenizer(8),
            transformer=gen.denoiser,
        )
    else:
        raise ValueError(f"save_tiny_pipeline: name must be 'tiny-sd' or 'tiny-flux', got {name!r}")
    pipe.save_pretrained(out)
    return Path(out)


def save_tiny_critic(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny critic `name` ("tiny-llava" | "tiny-qwen2-vl") to `out` with save_pretrained."""
    from uno_engine.testing.presets.critics import build_critic_model

    out = Path(out)
    if name == "tiny-llava":
        from transformers import LlavaProcessor

        model, image_processor = build_critic_model("tiny-llava-clip", seed=seed)
        tok = word_tokenizer(4096, special={"<image>": 127})
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=6,
            vision_feature_select_strategy="default",
            image_token="<image>",
            chat_template=CHAT_TEMPLATE,
        )
        model.save_pretrained(out)
        processor.save_pretrained(out)
    elif name == "tiny-qwen2-vl":
        model, image_processor = build_critic_model("tiny-qwen2-vl", seed=seed)
        specials = {
            "<|image_pad|>": 124,
            "<|video_pad|>": 125,
            "<|vision_start|>": 126,
            "<|vision_end|>": 127,
        }
        model.save_pretrained(out)
        image_processor.save_pretrained(out)  # image-only: Qwen2VLProcessor's video half wants torchvision
        word_tokenizer(4096, special=specials).save_pretrained(out)
    else:
        raise ValueError(f"save_tiny_critic: name must be 'tiny-llava' or 'tiny-qwen2-vl', got {name!r}")
    return out


def write_prompts(path: str | Path, prompts=PROMPTS) -> Path:
    """A JSONL of prompts (the caption defaults to the prompt)."""
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m uno_engine.testing.presets.folders", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", required=True, help="folder to write the tiny models and prompts.jsonl into")
    args = p.parse_args(argv)
    out = Path(args.out)
    for name in ("tiny-sd", "tiny-flux"):
        save_tiny_pipeline(name, out / name)
    for name in ("tiny-llava", "tiny-qwen2-vl"):
        save_tiny_critic(name, out / name)
    write_prompts(out / "prompts.jsonl")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
