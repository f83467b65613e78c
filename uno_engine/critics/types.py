"""What the critic takes and returns: `CriticInputs` (from `prepare`) and `CriticOutput` (from a read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CriticInputs", "CriticOutput"]


@dataclass
class CriticInputs:
    """What `Critic.prepare` returns and `Critic.forward` takes: pixel_values or patch_tokens, not both.

    pixel_values: (B, 3, h, w) for LLaVA / Janus; (B*gh*gw, 3*tps*p*p) pre-patchified for Qwen2-VL; None when
        patch_tokens are given.
    image_grid_thw: (B, 3) int64, Qwen2-VL only.
    patch_tokens: (B, N, D) output of the vision tower's conv patch embedding, computed by the fused bridge
        (LLaVA / Janus; N = (image_size // p)**2, D = the conv's output channels), or None.
    grid_thw: (t, gh, gw) of every image as Python ints (Qwen2-VL), known on the host from the spec, so
        the adapter never reads `image_grid_thw` back from the device; None -> read it (one sync).
    """

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None

    @property
    def bridge_output(self) -> torch.Tensor:
        """The tensor the bridge produced: patch_tokens when fused, else pixel_values."""
        return self.pixel_values if self.patch_tokens is None else self.patch_tokens


@dataclass
class CriticOutput:
    """caption_hidden: (B, L, H) final-norm hidden states; position l predicts caption token l.
    caption_labels: (B, L) int64 caption ids, -100 where caption_mask == 0.
    lm_head_weight: (V, H); lm_head_bias: (V,) or None; logit_softcap: float or None.
    patch_features: (B, N, Dv) vision patch features (no CLS), N = gh * gw in raster order; grid: (gh, gw).
    negative_hidden: (B, K, L, H) and negative_labels: (B, K, L), the same for K negative captions of each
    image (`Critic.forward_with_negatives`), else None."""

    caption_hidden: torch.Tensor
    caption_labels: torch.Tensor
    lm_head_weight: torch.Tensor
    lm_head_bias: torch.Tensor | None
    logit_softcap: float | None
    patch_features: torch.Tensor
    grid: tuple[int, int]
    negative_hidden: torch.Tensor | None = None
    negative_labels: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """(B, L, V) caption logits. For tests and debugging only: the engine never materializes them."""
        logits = self.caption_hidden @ self.lm_head_weight.T
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
