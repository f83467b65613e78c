"""Reading a named block's output during a forward (a forward hook, removed on exit). No uno_engine imports:
generators use it for the representation view."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["block_output", "find_block"]


def find_block(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path` ("mid_block", "up_blocks.1", "transformer_blocks.4"); a ValueError names the
    path and lists the top-level children otherwise."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"block {path!r} is not a module path of {type(model).__name__} (its children: {children})"
        ) from None


@contextlib.contextmanager
def block_output(model: nn.Module, path: str, output_index: int = 0):
    """Yields a dict whose "hidden" is the output of `model.<path>` in the forward run inside the context
    (element `output_index` when the block returns a tuple or list). With several calls, the last one wins."""
    block = find_block(model, path)
    box: dict = {}

    def hook(_mod, _args, output):
        if isinstance(output, (tuple, list)):
            if output_index >= len(output):
                raise ValueError(
                    f"block {path!r} returns {len(output)} outputs; output_index={output_index} is out of range"
                )
            output = output[output_index]
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"block {path!r} output {output_index} is a {type(output).__name__}, not a tensor"
            )
        box["hidden"] = output

    handle = block.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
