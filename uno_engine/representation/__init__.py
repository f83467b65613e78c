"""The representation view: the critic's frozen LM reads the generator's own hidden states for a noised latent.

`UNOConfig(view="representation")` makes `UNOStep` ask the generator for a `GeneratedRepresentation`
(`generator(batch, view="representation")`): one denoiser call at x_t (noised from the batch's real image, or
from the generator's own no-grad sample for prompts without one), whose hidden states at a named block go
through the generator's trainable `RepresentationHead` into the critic's image-token slots. The caption CE,
the generator's own loss at the same x_t and the metaquery regression (projected tokens onto the critic's
tokens of the clean image) flow into the generator in that one forward. No decode, no vision tower on
generated pixels. docs/representation.md has the design, the guard against copying and the figures.

    head = attach_representation(critic, generator, batch, block="mid_block", prompt_dropout=0.5)
    step = UNOStep(generator, critic, UNOLoss(caption=1.0, generator_loss=1.0, structure=0.5,
                   structure_mode="features"), UNOConfig(view="representation"))

Public names resolve lazily, so that generators can import `types` and `capture` without the critics.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GeneratedRepresentation": "uno_engine.representation.types",
    "RepresentationHead": "uno_engine.representation.head",
    "RepresentationCritic": "uno_engine.representation.view",
    "RepresentationInputs": "uno_engine.representation.view",
    "RepresentationOutput": "uno_engine.representation.view",
    "attach_representation": "uno_engine.representation.view",
    "critic_image_tokens": "uno_engine.representation.view",
    "read_tokens": "uno_engine.representation.view",
    "representation_view_reasons": "uno_engine.representation.view",
    "caption_ce": "uno_engine.representation.leak",
    "copy_leak": "uno_engine.representation.leak",
    "fit_head": "uno_engine.representation.fit",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uno_engine.representation' has no attribute {name!r}")


def __dir__():
    return __all__
