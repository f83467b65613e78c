"""uno_engine.memory.track_peak_memory: peak bytes above the level at entry, forward and backward."""

from __future__ import annotations

import pytest
import torch

from uno_engine.memory import track_peak_memory


def test_counts_new_storages_and_their_release():
    with track_peak_memory("cpu") as mem:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(250, dtype=torch.float64)  # 2000 B
        del a
        c = torch.empty(100)  # 400 B, after a was freed
    assert mem.peak_bytes == 6000
    assert mem.end_bytes == 2400
    del b, c


def test_views_inplace_and_preexisting_tensors_are_not_counted():
    w = torch.randn(64, 64)  # allocated before the region
    with track_peak_memory("cpu") as mem:
        v = w.t()  # a view of a pre-existing storage
        w.mul_(2.0)  # in place
        x = w[:8]  # view
        y = x.clone()  # new: 8 * 64 * 4 B
    assert mem.peak_bytes == 8 * 64 * 4
    del v, y


def test_backward_is_counted():
    lin = torch.nn.Linear(128, 256).requires_grad_(False)
    x = torch.randn(32, 128, requires_grad=True)
    with track_peak_memory("cpu") as fwd_only:
        y = torch.relu(lin(x)).sum()
    with track_peak_memory("cpu") as both:
        y = torch.relu(lin(x)).sum()
        y.backward()
    assert both.peak_bytes > fwd_only.peak_bytes
    # the backward allocates at least x.grad and the (32, 256) upstream gradient
    assert both.peak_bytes >= 32 * 256 * 4 + 32 * 128 * 4


def test_deterministic():
    def run():
        lin = torch.nn.Linear(64, 64).requires_grad_(False)
        x = torch.randn(16, 64, requires_grad=True)
        with track_peak_memory() as mem:
            torch.nn.functional.gelu(lin(x)).square().mean().backward()
        return mem.peak_bytes

    assert run() == run()


def test_bad_device():
    with pytest.raises(ValueError, match="device"):
        with track_peak_memory("meta"):
            pass


@pytest.mark.gpu
def test_cuda_peak():
    with track_peak_memory("cuda") as mem:
        a = torch.empty(1 << 20, device="cuda")
        del a
    assert mem.peak_bytes >= 4 << 20
    assert mem.end_bytes == 0
