"""Peak-memory measurement of a region of code, on CUDA and on the CPU.

`track_peak_memory(device)` is a context manager; its result's `.peak_bytes` is the peak of bytes allocated
*above the level at entry* while the region ran (forward and backward alike), so weights and anything that
existed before are excluded.

- CUDA: `torch.cuda` memory statistics (the caching allocator's allocated bytes; reset at entry).
- CPU: PyTorch keeps no allocation statistics for the CPU, so a `TorchDispatchMode` counts the bytes of every
  tensor storage created by an op inside the region and subtracts them when that storage is freed (a weakref
  on the storage; storages keep their Python object alive as long as the C++ storage lives). Views and
  in-place results share a storage and are not counted twice. Kernel-internal scratch buffers that never
  become tensors are not seen; the backward pass runs on the calling thread for CPU tensors and is seen like
  the forward. The count is deterministic: the same code gives the same figure on every run (the
  checkpointing tests compare such counts).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakMemory", "track_peak_memory"]


@dataclass
class PeakMemory:
    """Result of `track_peak_memory`. `peak_bytes` is valid once the `with` block has exited (and, on the CPU,
    is also kept up to date while it runs)."""

    device: torch.device
    peak_bytes: int = 0
    end_bytes: int = 0  # bytes allocated inside the region that were still alive at exit
    _live: dict = field(default_factory=dict, repr=False)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class _StorageCounter(TorchDispatchMode):
    """Counts live bytes of storages created under it (CPU tensors only)."""

    def __init__(self, result: PeakMemory):
        super().__init__()
        self.result = result
        self.current = 0
        self._lock = threading.Lock()

    def _freed(self, key: int, nbytes: int):
        with self._lock:
            if self.result._live.pop(key, None) is not None:
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and in-place results share an input's storage (which may predate the region, e.g. a weight's)
        seen = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, meta)
                continue
            key = st._cdata
            if key in self.result._live or key in seen:
                continue
            nbytes = st.nbytes()
            with self._lock:
                self.result._live[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._freed(k, n))
                self.current += nbytes
                if self.current > self.result.peak_bytes:
                    self.result.peak_bytes = self.current
        return out


def _key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


@contextmanager
def track_peak_memory(device: str | torch.device = "cpu"):
    """Measure the peak bytes allocated above the level at entry inside the `with` block.

    Args:
        device: the device whose memory is measured ("cpu" or a CUDA device).

    Example:
        with track_peak_memory("cpu") as mem:
            loss = critic_loss(images); loss.backward()
        print(mem.peak_bytes)
    """
    device = torch.device(device)
    result = PeakMemory(device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_bytes = max(0, torch.cuda.max_memory_allocated(device) - base)
            result.end_bytes = max(0, torch.cuda.memory_allocated(device) - base)
        return
    if device.type != "cpu":
        raise ValueError(f"track_peak_memory: device must be 'cpu' or a CUDA device, got {device!r}")
    counter = _StorageCounter(result)
    try:
        with counter:
            yield result
    finally:
        result.end_bytes = counter.current
        result._live.clear()
