"""`CachedSamplingJanusGenerator`: a `JanusGenerator` whose no-grad sampling runs once per batch.

Janus samples its N = 576 image tokens one LM call at a time (no grad, KV cache): seconds per step on a GPU at
batch 4, the same in every provider of a benchmark and in its generation-only step. A benchmark that must time
>= 20 steps of several providers within minutes samples on a batch's first call (keyed by the prompt shape and
the seed), then passes those tokens back through the generator's public `batch["gen_tokens"]` input, so later
calls time only the training part of the step (the teacher-forced LM pass with grad, the straight-through
Gumbel-softmax and the VQ decoder). The first forward's time is kept apart (`sample_ms`).
"""

from __future__ import annotations

import time

import torch

from uno_engine.generators import JanusGenerator

__all__ = ["CachedSamplingJanusGenerator"]


class CachedSamplingJanusGenerator(JanusGenerator):
    """JanusGenerator + a per-batch cache of the sampled image tokens (see the module docstring).

    `sampled_tokens`: (prompt shape, seed) -> the (B, N) tokens of that batch's first call.
    `sample_ms`: wall time of the last first call (sampling included), or None before any."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled_tokens: dict[tuple, torch.Tensor] = {}
        self.sample_ms: float | None = None

    @property
    def image_vocab_size(self) -> int:
        """Number of VQ codebook entries: image token ids are below it."""
        return int(self.model.config.vq_config.num_embeddings)

    def random_tokens(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch_size, N) random image tokens on the model's device, to pass as batch["gen_tokens"] (a
        presampled batch: the training part's cost does not depend on the token values)."""
        tokens = torch.randint(
            0, self.image_vocab_size, (batch_size, self.num_image_tokens), generator=generator
        )
        return tokens.to(self.model.device)

    def forward(self, batch, *, view="pixel"):
        if view != "pixel":  # JanusGenerator.forward checks it and calls latents_for_critic (below)
            return super().forward(batch, view=view)
        key = (tuple(batch["gen_input_ids"].shape), batch.get("seed"))
        if "gen_tokens" in batch:
            return super().forward(batch)
        if key in self.sampled_tokens:
            return super().forward({**batch, "gen_tokens": self.sampled_tokens[key]})
        t0 = time.perf_counter()
        images = super().forward(batch)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.sample_ms = (time.perf_counter() - t0) * 1e3  # the whole first forward, sampling included
        self.sampled_tokens[key] = self.last_tokens
        return images

    def latents_for_critic(self, batch):
        """The latent view's forward, with the same per-batch token cache as `forward`."""
        key = (tuple(batch["gen_input_ids"].shape), batch.get("seed"))
        if "gen_tokens" not in batch and key in self.sampled_tokens:
            batch = {**batch, "gen_tokens": self.sampled_tokens[key]}
        out = super().latents_for_critic(batch)
        self.sampled_tokens.setdefault(key, self.last_tokens)
        return out
