"""Trim: the critic computes only what its losses read (`Critic.from_hf(..., trim=True)`, the default).

Two kinds of work in a critic pass are never read by any loss, and `trim` skips both, exactly:

- **vision layers after the last feature layer.** LLaVA reads the hidden states of `vision_feature_layer`
  (-2 for LLaVA-1.5: the tower's last layer runs for nothing). The tower runs only up to the deepest layer
  read (`vision_hidden_states`).
- **the last LM layer's row-wise work at rows no loss reads.** The losses read the LM's final hidden states
  only from row P - 1 on (P: the prefix length; the caption blocks and the packed negatives all come after
  it). In the last decoder layer every row still gives its keys and values to the attention, but its
  output projection and its MLP act on each row alone: `trim_rows` runs them on rows P - 1.. only and leaves
  zeros in the rows before (their final hidden states are then not the model's, and nothing reads them;
  `SequenceReader.read` exposes only rows P - 1..). For a 256-image-token LLaVA with a 32-token caption that is
  88% of the last layer's MLP, forward and backward.

What is trimmed is known on the host (the prefix length), so nothing here syncs. The rows are set by the
reader around its LM call (`reading_rows`); a checkpointed layer's recomputation runs in the backward, after
that scope ended, so the checkpoint wrapper binds the rows to the function it checkpoints (`bind`). Under
torch.compile the trimmed modules run untrimmed (the rows would be a guard per prefix length).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from uno_engine.critics.common import find_layers

__all__ = ["bind", "current_rows", "reading_rows", "trim_rows", "trimmed_modules", "vision_hidden_states"]

_ROWS: list[int] = []  # the first sequence row any loss reads, for the LM run in progress (innermost last)


@contextlib.contextmanager
def reading_rows(first: int | None):
    """Within this scope the trimmed modules compute rows `first`.. only (None: every row)."""
    if first is None:
        yield
        return
    _ROWS.append(int(first))
    try:
        yield
    finally:
        _ROWS.pop()


def current_rows() -> int | None:
    return _ROWS[-1] if _ROWS else None


def bind(fn):
    """`fn`, run with the reading rows in force now: what a checkpointed layer's recomputation needs."""
    rows = current_rows()
    if rows is None:
        return fn

    def run(*args, **kwargs):
        with reading_rows(rows):
            return fn(*args, **kwargs)

    return run


def trim_rows(module: nn.Module) -> bool:
    """Make `module` (a row-wise map of (B, T, D_in) to (B, T, D_out): an MLP, an output projection) compute
    only rows `current_rows()`.. and return zeros in the rows before. Idempotent; outside a reading scope and
    under torch.compile the module runs as it is. Returns whether it was newly wrapped."""
    if "_uno_trimmed" in module.__dict__:
        return False
    inner = module.forward

    def forward(x, *args, **kwargs):
        first = current_rows()
        if first is None or torch.compiler.is_compiling() or x.dim() != 3 or not 0 < first < x.shape[1]:
            return inner(x, *args, **kwargs)
        y = inner(x[:, first:], *args, **kwargs)
        return torch.cat([y.new_zeros(y.shape[0], first, *y.shape[2:]), y], dim=1)

    module.forward = forward
    module._uno_trimmed = True
    return True


def trimmed_modules(last_layer: nn.Module) -> list[nn.Module]:
    """The row-wise modules of a decoder layer that `trim_rows` may trim: its attention output projection and
    its MLP (Llama-style attribute names; a family without them is not trimmed)."""
    out = []
    attn = getattr(last_layer, "self_attn", None)
    if isinstance(getattr(attn, "o_proj", None), nn.Module):
        out.append(attn.o_proj)
    if isinstance(getattr(last_layer, "mlp", None), nn.Module):
        out.append(last_layer.mlp)
    return out


def vision_hidden_states(tower: nn.Module, pixel_values, indices: list[int]) -> list[torch.Tensor]:
    """What `tower(pixel_values, output_hidden_states=True).hidden_states[i]` holds for each absolute index i
    of `indices` (0: the first layer's input, i >= 1: layer i's output), computed by the encoder's first
    max(indices) layers only (at least one).

    The deeper layers are taken out of the encoder's layer list for the call, and the states are caught by
    hooks on the layers, not by transformers' own recorder: that one installs its hooks once, on the layers
    present at its first call, and must never see the shortened list."""
    layers = find_layers(tower)
    if not indices or min(indices) < 0 or max(indices) > len(layers):
        raise ValueError(f"indices must be in [0, {len(layers)}], got {indices}")
    depth = max(1, max(indices))  # index 0 is caught as layer 0's input
    got: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_mod, args, output=None):
            h = args[0] if i == 0 else output
            got[i] = h[0] if isinstance(h, (tuple, list)) else h

        return hook

    handles = [
        layers[0].register_forward_pre_hook(keep(0)) if i == 0 else layers[i - 1].register_forward_hook(keep(i))
        for i in sorted(set(indices))
    ]
    parent, attr = _owner(tower, layers)
    setattr(parent, attr, nn.ModuleList(list(layers)[:depth]))
    try:
        tower(pixel_values, output_hidden_states=False, return_dict=True)
    finally:
        setattr(parent, attr, layers)
        for h in handles:
            h.remove()
    return [got[i] for i in indices]


def _owner(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for mod in root.modules():
        for attr, sub in mod.named_children():
            if sub is child:
                return mod, attr
    raise ValueError(f"{type(child).__name__} is not a submodule of {type(root).__name__}")
