"""Critics: frozen understanding models wrapped for UNO (see `Critic.from_hf`).

Importing this package imports every family module below, and each registers its adapter
(uno_engine.critics.registry, which also says how to add a family): one import line per family.
"""

from uno_engine.critics.attention import ATTN_BACKENDS
from uno_engine.critics.base import Critic, CriticInputs, CriticOutput
from uno_engine.critics.checkpointing import CHECKPOINT_POLICIES
from uno_engine.critics.registry import register_critic, supported_classes

# family adapters: importing them registers them, in this order (the order of SUPPORTED_CLASSES and of
# from_hf's error message)
# isort: off
from uno_engine.critics.llava import LlavaCritic
from uno_engine.critics.llava_onevision import LlavaOnevisionCritic
from uno_engine.critics.janus import JanusCritic
from uno_engine.critics.qwen2_vl import Qwen2VLCritic
from uno_engine.critics.qwen3_vl import Qwen3VLCritic
# isort: on

SUPPORTED_CLASSES = supported_classes()  # the transformers classes Critic.from_hf takes

__all__ = [
    "ATTN_BACKENDS",
    "CHECKPOINT_POLICIES",
    "SUPPORTED_CLASSES",
    "Critic",
    "CriticInputs",
    "CriticOutput",
    "JanusCritic",
    "LlavaCritic",
    "LlavaOnevisionCritic",
    "Qwen2VLCritic",
    "Qwen3VLCritic",
    "register_critic",
    "supported_classes",
]
