"""The latent view under DDP: the step calls the wrapped generator's forward, `generator(batch, view="latent")`,
so DDP's hooks run and the generator's gradients are all-reduced.

Two spawned ranks (gloo on the CPU, one thread each) run one step of tiny-janus in float64, each on its own half
of a global batch; the reference is the single-process gradients of the two halves, averaged (DDP's mean).
"""

from __future__ import annotations

import gc
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from uno_engine import UNOConfig, UNOLoss, UNOStep
from uno_engine.distributed import data_parallel
from uno_engine.testing.presets import build_preset

pytestmark = pytest.mark.distributed

WORLD = 2
TIMEOUT = 120  # seconds: a hung rank fails the test instead of blocking the suite


def _step():
    preset = build_preset("tiny-janus", dtype=torch.float64)  # fixed seeds: the same weights in every process
    step = UNOStep(preset.generator, preset.make_critic("none"), UNOLoss(), UNOConfig(view="latent"))
    return preset, step


def _half(preset, rank: int) -> dict:
    """Rank r's share of the global batch: its own prompts, captions and sampling seed."""
    return preset.make_batch(batch_size=2, seed=20 + rank)


def _generator_grads(step, batch) -> dict[str, torch.Tensor]:
    gen = step.generator.module if hasattr(step.generator, "module") else step.generator
    params = {n: p for n, p in gen.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    step(batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in params.items()}


def _ddp_grads(rank: int) -> dict[str, torch.Tensor]:
    preset, step = _step()
    data_parallel(step, mode="ddp")  # DistributedDataParallel(step.generator)
    return _generator_grads(step, _half(preset, rank))


def _rank(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save(_ddp_grads(rank), f"{out_dir}/rank{rank}.pt")
        gc.collect()  # the DDP wrapper goes before its process group: the other order can hang at exit
    finally:
        dist.destroy_process_group()


def test_latent_view_gradients_are_all_reduced_under_ddp(tmp_path):
    ranks = mp.start_processes(
        _rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=False
    )
    try:
        preset, step = _step()  # the reference, while the ranks start
        halves = [_generator_grads(step, _half(preset, r)) for r in range(WORLD)]
        deadline = time.monotonic() + TIMEOUT
        while not ranks.join(timeout=1.0):
            done = sorted(p.name for p in tmp_path.glob("rank*.pt"))
            assert time.monotonic() < deadline, f"the DDP ranks did not exit in {TIMEOUT} s (results: {done})"
    finally:
        for proc in ranks.processes:  # a hung or failed rank: end the ones this test started
            if proc.is_alive():
                proc.kill()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert set(got[0]) == set(halves[0]) and len(halves[0]) > 0
    for name, g0 in halves[0].items():
        g1, mean = halves[1][name], (halves[0][name] + halves[1][name]) / 2
        # the halves differ (else the all-reduce would go unseen), and every rank holds their mean
        assert (g0 - g1).norm() > 1e-3 * g0.norm(), name
        for r in range(WORLD):
            torch.testing.assert_close(got[r][name], mean, rtol=1e-10, atol=1e-12, msg=f"rank {r}: {name}")


def _wrapped_grads(how: str, store: str) -> dict[str, torch.Tensor]:
    """Generator gradients of one latent step in a one-process gloo group, the generator wrapped `how`. The
    wrapper is gone before the process group (the other order can hang at exit)."""
    preset, step = _step()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        if how == "ddp-first":  # a step built around a generator already in DDP
            wrapped = DistributedDataParallel(step.generator, find_unused_parameters=True)
            step = UNOStep(wrapped, step.critic, UNOLoss(), UNOConfig(view="latent"))
        else:
            data_parallel(step, mode="fsdp")
        grads = _generator_grads(step, _half(preset, 1))
        grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}  # DTensors
        del step, preset
        gc.collect()
        return grads
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["ddp-first", "fsdp2"])
def test_wrapped_generator_in_one_process(how, tmp_path):
    """ddp-first: UNOStep(DDP(generator), ..., view="latent") builds (the latent view reads the module inside)
    and runs; find_unused_parameters=True walks the GeneratedLatents output for tensors. fsdp2: FSDP2 gathers
    the shards in the forward's pre-hook, which the latent view now passes through. Both give the bare
    generator's gradients (one-process gloo group)."""
    preset, step = _step()
    want = _generator_grads(step, _half(preset, 1))
    got = _wrapped_grads(how, str(tmp_path / "store"))
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-14, msg=name)
