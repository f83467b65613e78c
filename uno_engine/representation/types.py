"""What a generator hands the critic in the representation view (`UNOConfig(view="representation")`).

Data only; imports nothing of uno_engine, so generators can import it (imports go one way: generators ->
representation.types / representation.passes; representation.view -> critics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GeneratedRepresentation"]


@dataclass
class GeneratedRepresentation:
    """The generator's own hidden states for a noised latent, projected into the critic's LM input space.

    tokens: (B, N, H) the projector's output with grad (H = the critic LM's hidden size, N = the critic's
        image-token count); they take the image tokens' place in the critic's sequence.
    grid: (gh, gw) token grid, N = gh * gw.
    noise_level: (B,) fp32 in [0, 1], the fraction of the training schedule x_t was noised to (1: pure noise).
    prompt_kept: (B,) bool, False where the prompt conditioning was masked for this pass.
    from_reference: True when x_t was noised from the batch's real image (reference_latents / _images), False
        when from the generator's own no-grad sample.
    generator_loss: 0-d fp32, the generator's own training loss at the same x_t from the same denoiser call
        (prediction vs its target on the real image), or None when x_t came from the generator's own sample.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    noise_level: torch.Tensor
    prompt_kept: torch.Tensor
    from_reference: bool
    generator_loss: torch.Tensor | None = None
    kind: str = "representation"

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor carrying the generator's gradient: the projected tokens (B, N, H)."""
        return self.tokens

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def decode(self) -> torch.Tensor:
        raise RuntimeError(
            "view='representation' generates no image: the critic reads the generator's hidden states for a "
            "noised latent (sample with the generator's pixel view to see images)"
        )
