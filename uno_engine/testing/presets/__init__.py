"""Benchmark and test presets: a generator and a critic of real transformers / diffusers classes with random
weights (nothing is downloaded), at tiny CPU shapes or at the real models' shapes.

    preset = build_preset("tiny")                           # CPU: tiny SD generator + tiny LLaVA critic
    critic = preset.make_critic(checkpoint="selective")     # a uno_engine.Critic over the shared HF model
    step = UNOStep(preset.generator, critic, preset.make_loss(), UNOConfig())
    out = step(preset.make_batch())

`build_preset` builds each model once; `make_critic` wraps the same HF model in as many `Critic`s as needed
(one per checkpoint mode), so every provider of a benchmark runs the same weights. For the Janus presets the
unified model is both the generator (`JanusGenerator`, its generation path) and the critic (its understanding
path): one model, frozen understanding modules, trainable generation modules.

The models come from `uno_engine.testing.presets.critics.build_critic_model` and
`uno_engine.testing.presets.generators.build_generator`; this module only pairs them and sizes the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from uno_engine.testing.presets.cached_janus import CachedSamplingJanusGenerator


@dataclass(frozen=True, kw_only=True)
class PresetSpec:
    """What a preset pairs, and at which batch shape it runs by default."""

    name: str
    critic: str  # name for presets.critics.build_critic_model
    generator: (
        str  # name for presets.generators.build_generator, or "janus": the critic model's own generator
    )
    batch_size: int  # default images per step
    caption_len: int  # caption tokens per image
    # the engine provider's Critic(checkpoint=...); the real-shape presets keep "selective", the policy
    # their GPU runs measured ("auto" would pick "layer" for them: > 1 GiB of activations per image)
    engine_checkpoint: str = "selective"
    real_shapes: bool = False  # real model sizes: meant for a GPU (bf16)
    description: str = ""


def _cpu(name: str, critic: str, generator: str, description: str, *, batch_size=2, caption_len=16):
    """A CPU preset (tiny or mid shapes); the engine's critic checkpointing is Critic(checkpoint="auto")."""
    return PresetSpec(
        name=name,
        critic=critic,
        generator=generator,
        batch_size=batch_size,
        caption_len=caption_len,
        engine_checkpoint="auto",
        description=description,
    )


def _gpu(name: str, critic: str, generator: str, batch_size: int, description: str):
    """A real-shape preset (one GPU, bf16), 32 caption tokens, checkpoint "selective"."""
    return PresetSpec(
        name=name,
        critic=critic,
        generator=generator,
        batch_size=batch_size,
        caption_len=32,
        real_shapes=True,
        description=description,
    )


PRESETS: dict[str, PresetSpec] = {
    s.name: s
    for s in (
        # the CPU presets let Critic(checkpoint="auto") decide: tiny / tiny-janus keep about 0.4 MiB of
        # critic activations per image (next to the generator's VAE), so "auto" is "none" (recomputation
        # would only cost time); mid keeps about 164 MiB per image, so "auto" is "selective"
        _cpu(
            "tiny",
            "tiny-llava-clip",
            "tiny-sd",
            "tiny SD UNet+VAE generator, tiny LLaVA (CLIP) critic; the CPU default",
        ),
        _cpu("tiny-janus", "tiny-janus", "janus", "tiny Janus, a unified model that is its own critic (CPU)"),
        _cpu(
            "mid",
            "mid-llava",
            "tiny-sd",
            "tiny SD generator, ~100M-param LLaVA critic with 256 image tokens",
            batch_size=4,
            caption_len=32,
        ),
        _gpu(
            "sd15-llava7b",
            "llava-1.5-7b",
            "sd15",
            4,
            "SD-1.5 UNet + VAE (512px), LLaVA-1.5-7B critic (CLIP-L/336 + 7B LM)",
        ),
        _gpu(
            "sana-siglip-qwen2",
            "siglip-so400m-qwen2-1.5b",
            "sana-0.6b",
            4,
            "SANA-0.6B DiT + DC-AE, SigLIP-so400m + Qwen2-1.5B critic",
        ),
        _gpu(
            "janus-pro-1b", "janus-pro-1b", "janus", 4, "Janus-Pro-1B, a unified model that is its own critic"
        ),
        _gpu(
            "janus-pro-7b", "janus-pro-7b", "janus", 2, "Janus-Pro-7B, a unified model that is its own critic"
        ),
        # the denoiser families people train in 2026: tiny CPU generators with the tiny LLaVA critic, and the
        # real shapes with a Qwen3-VL-8B critic (random weights; meant for one GPU in bf16)
        *(
            _cpu(f"{gen}-llava", "tiny-llava-clip", gen, f"{gen} generator (CPU), tiny LLaVA (CLIP) critic")
            for gen in ("tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-qwen-image")
        ),
        *(
            _gpu(f"{gen}-qwen3vl8b", "qwen3-vl-8b", gen, bs, f"{desc}, Qwen3-VL-8B critic")
            for gen, bs, desc in (
                ("sdxl", 4, "SDXL UNet (2.6B) + VAE at 1024 px"),
                ("sd3.5-medium", 2, "SD3.5-Medium MMDiT (2.2B) + 16-ch VAE at 1024 px"),
                ("flux.1-dev", 1, "FLUX.1-dev (11.9B, guidance-distilled) + 16-ch VAE at 1024 px"),
                ("flux.2-klein-4b", 2, "FLUX.2-Klein-4B (3.9B) + FLUX.2 VAE at 1024 px"),
                ("qwen-image", 1, "Qwen-Image MMDiT (20.4B) + Qwen-Image VAE at 1024 px"),
            )
        ),
    )
}


@dataclass
class Preset:
    """The built models of a preset. `generator` is trained; `hf_model` is the critic's HF model (for Janus
    the same model the generator wraps)."""

    spec: PresetSpec
    hf_model: nn.Module
    image_processor: object
    generator: nn.Module
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    caption_len: int
    engine_checkpoint: str
    _make_batch: Callable[..., dict] = field(repr=False)
    _critics: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def make_critic(
        self,
        checkpoint: str = "none",
        attn_backend: str = "auto",
        *,
        cache: bool = True,
        instruction: str | None = None,
        trim: bool = True,
    ):
        """A `uno_engine.Critic` over the preset's HF model (`Critic.from_hf`), one per (checkpoint,
        attention, instruction, trim) unless `cache=False`. `instruction`: read in the family's chat template,
        with the preset's full processor (`presets.processors.chat_processor`). `trim=False`: the model's full
        forward (the eager baseline's)."""
        from uno_engine.critics import Critic

        key = (checkpoint, attn_backend, instruction, trim)
        if cache and key in self._critics:
            return self._critics[key]
        processor = self.image_processor
        if instruction is not None:
            from uno_engine.testing.presets.processors import chat_processor

            processor = chat_processor(self.spec.critic, self.hf_model, self.image_processor)
        critic = Critic.from_hf(
            self.hf_model,
            processor,
            instruction=instruction,
            checkpoint=checkpoint,
            attn_backend=attn_backend,
            trim=trim,
        )
        if cache:
            self._critics[key] = critic
        return critic

    def make_loss(self, **kwargs):
        """`UNOLoss(**kwargs)` (caption cross-entropy only by default), on the preset's device."""
        from uno_engine.loss import UNOLoss

        return UNOLoss(**kwargs).to(self.device)

    def caption_vocab(self) -> int:
        """Caption ids are drawn below this: the LM's vocabulary less special ids at its end (image token)."""
        return caption_vocab_size(self.hf_model)

    def make_batch(self, batch_size: int | None = None, *, seed: int = 0, presampled: bool = False) -> dict:
        """A fixed batch of `batch_size` (default: the preset's) with random captions. Carries `seed`, so
        every forward draws the same noise and timestep: repeated steps on it do the same work. `presampled`
        (Janus with janus_sampling="cached"): random image tokens instead of sampling them."""
        g = torch.Generator("cpu").manual_seed(seed)
        bs = batch_size or self.batch_size
        batch = self._make_batch(bs, self.caption_len, self.caption_vocab(), generator=g)
        batch.setdefault("seed", seed)
        if presampled and isinstance(self.generator, CachedSamplingJanusGenerator):
            batch["gen_tokens"] = self.generator.random_tokens(bs, generator=g)
        return batch

    def generator_parameters(self) -> list[nn.Parameter]:
        if hasattr(self.generator, "trainable_parameters"):
            return list(self.generator.trainable_parameters())
        return [p for p in self.generator.parameters() if p.requires_grad]


def caption_vocab_size(hf_model: nn.Module) -> int:
    """The number of ordinary token ids the critic's LM can take in a caption: the text vocabulary, capped
    below the image-placeholder id when the config has one (a random caption must never contain it)."""
    cfg = hf_model.config
    text_cfg = getattr(cfg, "text_config", None) or getattr(cfg, "language_config", None) or cfg
    vocab = int(getattr(text_cfg, "vocab_size", None) or cfg.vocab_size)
    for attr in (
        "image_token_id",
        "image_token_index",
        "video_token_id",
        "vision_start_token_id",
        "boi_token_id",
        "eoi_token_id",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    ):
        tid = getattr(cfg, attr, None)
        if isinstance(tid, int) and 16 < tid < vocab:
            vocab = tid
    return vocab


def _janus_make_batch(hf_model: nn.Module, device, gen_prompt_len: int = 16):
    """Janus generation inputs: a prompt of `gen_prompt_len` random text ids per image (`gen_input_ids`)."""

    def make_batch(batch_size: int, caption_len: int, vocab_size: int, *, generator=None) -> dict:
        gen_ids = torch.randint(1, vocab_size, (batch_size, gen_prompt_len), generator=generator)
        captions = torch.randint(1, vocab_size, (batch_size, caption_len), generator=generator)
        return {
            "gen_input_ids": gen_ids.to(device),
            "captions": captions.to(device),
            "caption_mask": torch.ones_like(captions, device=device),
        }

    return make_batch


def build_preset(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    caption_len: int | None = None,
    janus_sampling: str = "every-step",
    engine_checkpoint: str | None = None,
) -> Preset:
    """Build the preset `name` (see `PRESETS`) on `device` in `dtype` (default: float32 on the CPU, bfloat16
    on CUDA). Random weights; nothing is downloaded. `engine_checkpoint` overrides the spec's choice of the
    engine's critic checkpointing. `janus_sampling` (Janus presets): "every-step" (the plain
    JanusGenerator) or "cached" (sample once per batch, then time only the training part; see
    uno_engine.testing.presets.cached_janus)."""
    if janus_sampling not in ("every-step", "cached"):
        raise ValueError(f"janus_sampling must be 'every-step' or 'cached', got {janus_sampling!r}")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[name]
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from uno_engine.testing.presets.critics import build_critic_model

    hf_model, processor = build_critic_model(spec.critic, device=device, dtype=dtype)
    if spec.generator == "janus":
        if janus_sampling == "cached":
            generator = CachedSamplingJanusGenerator(hf_model)
        else:
            from uno_engine.generators import JanusGenerator

            generator = JanusGenerator(hf_model)
        make_batch = _janus_make_batch(hf_model, device)
    else:
        from uno_engine.testing.presets.generators import build_generator

        generator, make_batch = build_generator(spec.generator, device=device, dtype=dtype)
    return Preset(
        spec=spec,
        hf_model=hf_model,
        image_processor=processor,
        generator=generator,
        device=device,
        dtype=dtype,
        batch_size=batch_size or spec.batch_size,
        caption_len=caption_len or spec.caption_len,
        engine_checkpoint=engine_checkpoint or spec.engine_checkpoint,
        _make_batch=make_batch,
    )


__all__ = [
    "PRESETS",
    "CachedSamplingJanusGenerator",
    "Preset",
    "PresetSpec",
    "build_preset",
    "caption_vocab_size",
]
