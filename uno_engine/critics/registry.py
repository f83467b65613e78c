"""Which critic adapter wraps which transformers model: the family registry behind `Critic.from_hf`.

A family adapter is a `Critic` subclass in a module of its own under uno_engine/critics/. It names the
transformers classes it wraps in `hf_class_names` and registers itself with the `register_critic` decorator;
`Critic.from_hf(model)` walks `type(model).__mro__` (most derived class first) and returns the first
registered adapter whose class names match, so a subclass of a supported model is wrapped as its base.

This module holds data only and imports nothing of uno_engine: `critics/base.py` reads it, the family modules
write to it, and `uno_engine/critics/__init__.py` imports every family module so that importing anything of
`uno_engine.critics` (the package runs first) registers them all. Imports go one way:
`registry <- base <- family modules <- critics/__init__`.

Adding a family (e.g. Qwen3-VL):

1. `uno_engine/critics/qwen3_vl.py`::

       from uno_engine.critics.base import Critic, CriticInputs
       from uno_engine.critics.common import find_layers
       from uno_engine.critics.registry import register_critic


       @register_critic
       class Qwen3VLCritic(Critic):
           hf_class_names = ("Qwen3VLForConditionalGeneration",)
           family = "Qwen3-VL"

           def _build(self): ...  # register the understanding submodules, set lm_head / language_model
           def _attention_modules(self): ...
           def _checkpoint_layers(self): ...  # vision layers + LM decoder layers
           def _vision_tower(self): ...
           def _encode(self, inputs: CriticInputs): ...  # -> (image_embeds, patch_features, grid)

   (the hooks are documented on `Critic` in critics/base.py; `default_prefix` / `_position_ids` when the
   sequence has wrapper tokens or its own position ids, as critics/qwen2_vl.py does; `image_markers` when
   the processor writes tokens around the image tokens of a chat template, as critics/janus.py does; the
   sequence itself is built by critics/reader.py for every family);
2. one import line in `uno_engine/critics/__init__.py` (`from uno_engine.critics.qwen3_vl import
   Qwen3VLCritic`) and its name in `__all__`;
3. a tiny preset in uno_engine/testing/presets/critics.py and its case in tests/test_critics.py.

Nothing else changes: `Critic.from_hf`, `supported_classes()` and its error message read this registry.
"""

from __future__ import annotations

__all__ = ["register_critic", "lookup", "supported_classes", "registered_families"]

_BY_CLASS_NAME: dict[str, type] = {}  # transformers class name -> adapter class, in registration order


def register_critic(cls: type) -> type:
    """Class decorator: make `cls` the adapter of every transformers class named in `cls.hf_class_names`.

    Raises ValueError when `hf_class_names` is empty or not a tuple of strings, or when a name is already
    taken by another adapter (re-registering the same class, e.g. on a module reload, is allowed)."""
    names = getattr(cls, "hf_class_names", None)
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"register_critic: {cls.__name__}.hf_class_names must be a non-empty tuple of transformers class "
            f"names, got {names!r}"
        )
    for name in names:
        other = _BY_CLASS_NAME.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"register_critic: {name} is already wrapped by {other.__module__}.{other.__qualname__}; "
                f"cannot register {cls.__module__}.{cls.__qualname__} for it too"
            )
    for name in names:
        _BY_CLASS_NAME[name] = cls
    return cls


def lookup(model: object) -> type | None:
    """The adapter class for `model` (the first class of its MRO that is registered), or None."""
    for klass in type(model).__mro__:
        cls = _BY_CLASS_NAME.get(klass.__name__)
        if cls is not None:
            return cls
    return None


def supported_classes() -> tuple[str, ...]:
    """Every registered transformers class name, in registration order."""
    return tuple(_BY_CLASS_NAME)


def registered_families() -> dict[str, tuple[str, ...]]:
    """family name -> the transformers classes its adapter wraps."""
    out: dict[str, tuple[str, ...]] = {}
    for name, cls in _BY_CLASS_NAME.items():
        family = getattr(cls, "family", cls.__name__)
        out[family] = (*out.get(family, ()), name)
    return out
