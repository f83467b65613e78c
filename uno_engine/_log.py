"""The one log-once helper: choices the engine makes on its own (a backend, an implementation) are logged the
first time they are made, once per distinct key, and never while torch.compile traces (a log call would break
the graph, and the eager run has logged it already)."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

_SEEN: set[tuple[str, Hashable]] = set()


def log_once(logger: logging.Logger, key: Hashable, msg: str, *args, level: int = logging.INFO) -> bool:
    """logger.log(level, msg, *args) the first time `key` is seen for this logger; True when it logged."""
    if torch.compiler.is_compiling():
        return False
    k = (logger.name, key)
    if k in _SEEN:
        return False
    _SEEN.add(k)
    logger.log(level, msg, *args)
    return True


def reset_once() -> None:
    """Forget every key (tests that check a message)."""
    _SEEN.clear()
