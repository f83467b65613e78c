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

from uno_engine.testing.presets.processors import WORDS, chat_processor, chat_tokenizer

PROMPTS = [
    "a red cube on a blue ball",
    "two green circle left of a star",
    "a yellow triangle above a square",
    "three small blue star",
    "a big red ball under a green cube",
    "a photo of a yellow star",
    "one blue square and two red circle",
    "a small green triangle on the right",
]
TEXT_VOCAB = 6 + len(WORDS)  # the pipelines' text encoders: chat_tokenizer's base ids and WORDS


def text_tokenizer(max_len: int):
    """The pipelines' word-level tokenizer (presets.processors.chat_tokenizer, no extra special tokens)."""
    return chat_tokenizer(TEXT_VOCAB, {}, model_max_length=max_len)


def _clip(hidden: int, *, projection_dim=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=TEXT_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=8,
        eos_token_id=3,
        pad_token_id=0,
        bos_token_id=2,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    return (CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection)(cfg).eval()


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    cfg = T5Config(
        vocab_size=TEXT_VOCAB, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2, pad_token_id=0
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
            tokenizer=text_tokenizer(8),
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
            tokenizer=text_tokenizer(8),
            text_encoder_2=_t5(32),
            tokenizer_2=text_tokenizer(8),
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
    preset = {"tiny-llava": "tiny-llava-clip", "tiny-qwen2-vl": "tiny-qwen2-vl"}.get(name)
    if preset is None:
        raise ValueError(f"save_tiny_critic: name must be 'tiny-llava' or 'tiny-qwen2-vl', got {name!r}")
    model, image_processor = build_critic_model(preset, seed=seed)
    processor = chat_processor(preset, model, image_processor)
    model.save_pretrained(out)
    if name == "tiny-llava":
        processor.save_pretrained(out)  # LlavaProcessor: AutoProcessor loads it back
    else:  # Qwen2VLProcessor's video half wants torchvision: the parts, the template on the tokenizer
        image_processor.save_pretrained(out)
        processor.tokenizer.chat_template = processor.chat_template
        processor.tokenizer.save_pretrained(out)
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
