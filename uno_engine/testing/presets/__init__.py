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
    engine_checkpoint: str = "selective"  # the engine provider's Critic(checkpoint=...)
    real_shapes: bool = False  # real model sizes: meant for a GPU (bf16)
    description: str = ""


PRESETS: dict[str, PresetSpec] = {
    s.name: s
    for s in (
        # tiny: the critic's activations are a few hundred KB next to the generator's VAE, so checkpointing
        # them saves nothing and its recomputation only costs time; the engine runs the critic unchanged
        PresetSpec(
            name="tiny",
            critic="tiny-llava-clip",
            generator="tiny-sd",
            batch_size=2,
            caption_len=16,
            engine_checkpoint="none",
            description="tiny SD UNet+VAE generator, tiny LLaVA (CLIP) critic; the CPU default",
        ),
        PresetSpec(
            name="tiny-janus",
            critic="tiny-janus",
            generator="janus",
            batch_size=2,
            caption_len=16,
            description="tiny Janus, a unified model that is its own critic (CPU)",
        ),
        PresetSpec(
            name="mid",
            critic="mid-llava",
            generator="tiny-sd",
            batch_size=4,
            caption_len=32,
            description="tiny SD generator, ~100M-param LLaVA critic with 256 image tokens",
        ),
        PresetSpec(
            name="sd15-llava7b",
            critic="llava-1.5-7b",
            generator="sd15",
            batch_size=4,
            caption_len=32,
            real_shapes=True,
            description="SD-1.5 UNet + VAE (512px), LLaVA-1.5-7B critic (CLIP-L/336 + 7B LM)",
        ),
        PresetSpec(
            name="sana-siglip-qwen2",
            critic="siglip-so400m-qwen2-1.5b",
            generator="sana-0.6b",
            batch_size=4,
            caption_len=32,
            real_shapes=True,
            description="SANA-0.6B DiT + DC-AE, SigLIP-so400m + Qwen2-1.5B critic",
        ),
        PresetSpec(
            name="janus-pro-1b",
            critic="janus-pro-1b",
            generator="janus",
            batch_size=4,
            caption_len=32,
            real_shapes=True,
            description="Janus-Pro-1B, a unified model that is its own critic",
        ),
        PresetSpec(
            name="janus-pro-7b",
            critic="janus-pro-7b",
            generator="janus",
            batch_size=2,
            caption_len=32,
            real_shapes=True,
            description="Janus-Pro-7B, a unified model that is its own critic",
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

    def make_critic(self, checkpoint: str = "none", attn_backend: str = "auto", *, cache: bool = True):
        """A `uno_engine.Critic` over the preset's HF model (`Critic.from_hf`), one per (checkpoint,
        attention) unless `cache=False`."""
        from uno_engine.critics import Critic

        key = (checkpoint, attn_backend)
        if cache and key in self._critics:
            return self._critics[key]
        critic = Critic.from_hf(
            self.hf_model, self.image_processor, checkpoint=checkpoint, attn_backend=attn_backend
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
        n_tokens = getattr(self.generator, "num_image_tokens", None)
        if presampled and n_tokens and hasattr(self.generator, "_sampled"):
            v_img = self.generator.model.model.generation_head.vision_head.out_features
            batch["gen_tokens"] = torch.randint(0, v_img, (bs, n_tokens), generator=g).to(self.device)
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


def _cached_sampling_janus(model: nn.Module):
    """A `JanusGenerator` whose no-grad sampling runs once per batch and is then reused.

    Janus samples its N = 576 image tokens one LM call at a time (no grad, KV cache): seconds per step on a
    GPU at batch 4, the same in every provider and in the generation-only step. A benchmark that must time
    >= 20 steps of several providers within minutes samples on a batch's first call (keyed by the prompt
    shape and the seed), then passes those tokens back as `batch["gen_tokens"]`, so later calls time only the
    training part of the step (the teacher-forced LM pass with grad, the straight-through Gumbel-softmax and
    the VQ decoder). The first forward's time is reported apart (`sample_ms`)."""
    import time

    from uno_engine.generators import JanusGenerator

    class CachedSamplingJanusGenerator(JanusGenerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sampled: dict = {}  # (prompt shape, seed) -> sampled tokens (B, N)
            self.sample_ms: float | None = None

        def forward(self, batch):
            key = (tuple(batch["gen_input_ids"].shape), batch.get("seed"))
            if "gen_tokens" in batch or key in self._sampled:
                tokens = batch.get("gen_tokens", self._sampled.get(key))
                return super().forward({**batch, "gen_tokens": tokens})
            t0 = time.perf_counter()
            images = super().forward(batch)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
            self.sample_ms = (time.perf_counter() - t0) * 1e3  # the whole first forward, sampling included
            self._sampled[key] = self.last_tokens
            return images

    return CachedSamplingJanusGenerator(model)


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
    `_cached_sampling_janus`)."""
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
            generator = _cached_sampling_janus(hf_model)
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


__all__ = ["PRESETS", "Preset", "PresetSpec", "build_preset", "caption_vocab_size"]
