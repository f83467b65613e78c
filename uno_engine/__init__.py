"""uno_engine: understanding-supervised post-training (UNO) for unified multimodal models.

The generated image goes through the model's own frozen understanding side (the *critic*); the critic must
caption it and small heads on its patch features must read its fine structure; those losses flow back into
the generator. Public names are resolved lazily so that `import uno_engine` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "UNOStep": "uno_engine.step",
    "UNOOutput": "uno_engine.step",
    "UNOConfig": "uno_engine.config",
    "UNOLoss": "uno_engine.loss",
    "BridgeSpec": "uno_engine.bridge_spec",
    "ReadAugment": "uno_engine.read",
    "Critic": "uno_engine.critics",
    "CriticOutput": "uno_engine.critics",
    "DensityHead": "uno_engine.heads",
    "StructureHead": "uno_engine.heads",
    "ops": "uno_engine.ops",
    "reference": "uno_engine.reference",
    "targets": "uno_engine.targets",
    "generators": "uno_engine.generators",
    "diagnose": "uno_engine.diagnose",
    "reward": "uno_engine.reward",
    "CaptionReward": "uno_engine.reward",
    "RewardObjective": "uno_engine.reward",
    "ValueStep": "uno_engine.reward",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if _LAZY[name].endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'uno_engine' has no attribute {name!r}")


def __dir__():
    return __all__
