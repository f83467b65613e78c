"""Phase ranges for the UNO step: NVTX ranges (no-ops without the nvtx package) and, with
`UNOConfig(profile=True)`, per-phase timing that never syncs inside the step.

Forward phases are bracketed by device events (CUDA) or perf_counter (CPU). Backward phases are bracketed by
gradient hooks on the tensors between phases (grad of the loss -> backward starts; grad of caption_hidden
arrives -> loss backward done; grad of
pixel_values -> critic backward done; grad of images -> bridge backward done); `PhaseTimer.result()` reads
them after `loss.backward()`, with one sync."""

from __future__ import annotations

import contextlib
import time

import torch

from uno_engine import _optional


def nvtx_range(name: str):
    """An NVTX range named `name` when the nvtx package is importable, else a no-op."""
    if _optional.nvtx.available:
        return _optional.nvtx.module.annotate(name)
    return contextlib.nullcontext()


class _Stamp:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.t = time.perf_counter()

    def ms_since(self, other: _Stamp) -> float:
        if self.cuda:
            return other.event.elapsed_time(self.event)
        return (self.t - other.t) * 1e3


class PhaseTimer:
    """Collects stamps for forward phases and backward boundaries; disabled timers cost nothing."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.stamps: dict[str, _Stamp] = {}

    def stamp(self, name: str):
        if self.enabled:
            self.stamps[name] = _Stamp(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        with nvtx_range(f"uno/{name}"):
            self.stamp(f"{name}.start")
            yield
            self.stamp(f"{name}.end")

    def on_grad(self, tensor: torch.Tensor, name: str):
        """Stamp `name` when the gradient of `tensor` is computed during backward."""
        if self.enabled and tensor.requires_grad:
            tensor.register_hook(lambda g: (self.stamp(name), g)[1])

    def result(self) -> dict[str, float]:
        """Milliseconds per phase (forward: generate, bridge, critic, loss; backward, after loss.backward():
        loss_bwd, critic_bwd, bridge_bwd). Syncs once."""
        if not self.enabled:
            return {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        s = self.stamps
        out = {}
        for ph in ("generate", "bridge", "critic", "loss"):
            if f"{ph}.start" in s and f"{ph}.end" in s:
                out[f"{ph}_ms"] = s[f"{ph}.end"].ms_since(s[f"{ph}.start"])
        chain = [
            ("grad.loss", "grad.caption"),
            ("grad.caption", "grad.pixels"),
            ("grad.pixels", "grad.images"),
        ]
        for (a, b), ph in zip(chain, ("loss_bwd", "critic_bwd", "bridge_bwd"), strict=True):
            if a in s and b in s:
                out[f"{ph}_ms"] = s[b].ms_since(s[a])
        return out
