"""Loaded diffusers pipelines as generators, and prompts encoded with the pipeline's own text encoders.

    pipe = FluxPipeline.from_pretrained(...)                     # or SDXL / SD3 / Qwen-Image / FLUX.2 / ...
    gen = DiffusersGenerator.from_pipeline(pipe, num_inference_steps=28, k_grad_steps=1)
    batch = encode_prompts(pipe, ["a red cube on a table", ...])  # prompt_embeds, pooled_prompt_embeds, ...
    images = gen(batch | {"seed": 0})

`from_pipeline` takes the pipeline's denoiser (`pipe.transformer` or `pipe.unet`), its VAE and a copy of
its scheduler (the generator sets the grid on its copy; the pipeline's own stays as it was). The text
encoders stay outside the generator: `encode_prompts` runs `pipe.encode_prompt` under `torch.no_grad()`
with the text encoders frozen (requires_grad_(False)), once per batch of prompts, and returns the tensors
under diffusers' names. Pre-computing them for a whole dataset (and dropping the text encoders from memory)
is the usual way to train the 2026 models (T5-XXL, Qwen2.5-VL-7B, Mistral-3 as text encoders).
"""

from __future__ import annotations

import inspect

import torch

from .diffusers import DiffusersGenerator, pipeline_denoiser
from .families import FAMILIES, family_for

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def from_pipeline(pipe, **options) -> DiffusersGenerator:
    """`DiffusersGenerator.from_pipeline(pipe, **options)`: the pipeline's denoiser, VAE and a copy of its
    scheduler."""
    return DiffusersGenerator.from_pipeline(pipe, **options)


@torch.no_grad()
def encode_prompts(pipe, prompts: str | list[str], negative_prompts: str | list[str] | None = None, **kwargs):
    """Encode text prompts with `pipe.encode_prompt` into a batch dict for the pipeline's generator.

    Returns {"prompt_embeds": (B, S, D), and what the family reads: "pooled_prompt_embeds" (B, P) (SDXL,
    SD3, FLUX.1), "prompt_attention_mask" (SANA, PixArt) / "prompt_embeds_mask" (Qwen-Image) (B, S)}, plus
    the "negative_*" ones when `negative_prompts` is given (for guidance_scale > 1). All detached, on the
    pipeline's execution device, in the text encoders' dtype. `kwargs` go to `encode_prompt` (e.g.
    max_sequence_length). The text encoders are frozen (requires_grad_(False)) and run without grad."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"encode_prompts: prompts must be a non-empty list of str, got {prompts!r}")
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(
            f"encode_prompts: negative_prompts has {len(negative_prompts)} entries for {len(prompts)} prompts"
        )
    for attr in _TEXT_ENCODERS:
        enc = getattr(pipe, attr, None)
        if enc is not None:
            enc.requires_grad_(False)
    den = pipeline_denoiser(pipe)
    family = next((f for f in FAMILIES if f.matches(den)), None)
    if family is None:
        family_for(den, pipe.vae)  # raises the TypeError that lists the supported families
    outputs = family.encode_prompt_outputs
    params = inspect.signature(pipe.encode_prompt).parameters
    call = dict(kwargs)
    if "device" in params:
        call.setdefault("device", pipe._execution_device)
    if "num_images_per_prompt" in params:
        call.setdefault("num_images_per_prompt", 1)
    for extra in ("prompt_2", "prompt_3"):  # SD3 takes them positionally; None = reuse `prompt`
        if extra in params:
            call.setdefault(extra, None)
    joint_cfg = "do_classifier_free_guidance" in params
    if joint_cfg:
        call["do_classifier_free_guidance"] = negative_prompts is not None
        if negative_prompts is not None:
            call["negative_prompt"] = negative_prompts
    batch = _name(pipe.encode_prompt(prompt=prompts, **call), outputs)
    if negative_prompts is not None and not joint_cfg:
        neg = _name(pipe.encode_prompt(prompt=negative_prompts, **call), outputs)
        batch.update({f"negative_{k}": v for k, v in neg.items() if not k.startswith("negative_")})
    for key in [k for k in batch if k.endswith("mask")]:
        emb = batch[key.replace("_attention_mask", "_embeds").replace("_embeds_mask", "_embeds")]
        if batch[key] is None:  # Qwen-Image returns None for an all-ones mask
            batch[key] = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
    return {k: v.detach() for k, v in batch.items() if v is not None}


def _name(out, outputs: tuple) -> dict:
    if not isinstance(out, tuple):
        out = (out,)
    return {k: v for k, v in zip(outputs, out, strict=False) if k is not None}
