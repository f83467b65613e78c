"""Critics: frozen understanding models wrapped for UNO (see `Critic.from_hf`)."""

from uno_engine.critics.attention import ATTN_BACKENDS
from uno_engine.critics.base import SUPPORTED_CLASSES, Critic, CriticInputs, CriticOutput
from uno_engine.critics.checkpointing import CHECKPOINT_POLICIES
from uno_engine.critics.janus import JanusCritic
from uno_engine.critics.llava import LlavaCritic
from uno_engine.critics.qwen2_vl import Qwen2VLCritic

__all__ = [
    "ATTN_BACKENDS",
    "CHECKPOINT_POLICIES",
    "SUPPORTED_CLASSES",
    "Critic",
    "CriticInputs",
    "CriticOutput",
    "JanusCritic",
    "LlavaCritic",
    "Qwen2VLCritic",
]
