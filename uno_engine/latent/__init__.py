"""The latent view: the critic reads the generator's latents, with no pixel decode and no vision tower.

`UNOConfig(view="latent")` makes `UNOStep` ask the generator for `GeneratedLatents`
(`generator.latents_for_critic(batch)`) and hand them to a `LatentCritic`:

- Janus (a unified token model that is its own critic): the LM reads the straight-through token
  distribution through the generation embedding (uno_engine/critics/janus.py, "Latent view");
- a diffusion generator with a separate critic: a `LatentAdapter` fitted by `fit_latent_adapter` and attached
  with `critic.attach_latent_adapter(adapter)` maps the grad step's latent to the critic's vision tokens.

Public names: GeneratedLatents, LatentCritic, LatentInputs, latent_view_reasons, LatentAdapter,
AdapterIdentity, LatentAdapterMismatch, fit_latent_adapter, caption_logits, noise_latents. Resolved lazily, so that
generators can import `uno_engine.latent.types` without importing the critics.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GeneratedLatents": "uno_engine.latent.types",
    "LatentCritic": "uno_engine.latent.view",
    "LatentInputs": "uno_engine.latent.view",
    "latent_view_reasons": "uno_engine.latent.view",
    "LatentAdapter": "uno_engine.latent.adapter",
    "AdapterIdentity": "uno_engine.latent.adapter",
    "LatentAdapterMismatch": "uno_engine.latent.adapter",
    "fit_latent_adapter": "uno_engine.latent.fit",
    "caption_logits": "uno_engine.latent.fit",
    "noise_latents": "uno_engine.latent.adapter",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uno_engine.latent' has no attribute {name!r}")


def __dir__():
    return __all__
