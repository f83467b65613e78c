"""Running `UNOStep` on many ranks with PyTorch's own data parallelism (DDP, FSDP2): small helpers only.

What is trained and how it is wrapped:

    step = UNOStep(generator, critic, UNOLoss(normalize="global"))
    data_parallel(step, mode="ddp")                       # generator (+ loss heads) in DDP; critic replicated
    data_parallel(step, mode="fsdp")                      # generator (+ loss heads) sharded with FSDP2
    data_parallel(step, mode="fsdp", shard_critic=True)   # ... and the frozen critic sharded too

- The critic is frozen. Replicated, it needs no wrapper at all: no parameter of it has a gradient, so there is
  nothing to synchronize. Sharded (`shard_frozen_critic`), each transformer block is its own FSDP2 unit with
  `reshard_after_forward=True`; its parameters are all-gathered for the forward and again for the backward
  (the critic passes the input gradient back to the generator), never get a `.grad`, and so no reduce-scatter
  and no gradient buffer exist for them. Parameters outside the blocks (embeddings, lm_head, norms, patch
  embedding) stay plain replicated tensors, so `CriticOutput.lm_head_weight` and the bridge's fused patch
  embedding keep working outside the forward.
- Loss normalization: `UNOLoss(normalize="global")` divides the caption CE sum by the token count all-reduced
  on the device and multiplies by the world size, so that the ranks' gradient *average* (DDP and FSDP2 both
  average) is the global token mean. For gradient accumulation stamp every micro-batch with
  `accumulation_token_count(micro_batches)` (see its docstring) and call `loss.backward()` on each, inside
  `no_sync(step)` for all but the last.
- Janus as its own critic (one model, generation modules trainable): `shard_frozen_critic` refuses a critic
  with trainable parameters; shard the whole model once with `shard_module` instead (FSDP2 keeps the frozen
  understanding parameters gradient-free).
- Failures: `fail_fast()` turns an exception on one rank (an OOM included) into a prompt non-zero exit of that
  process; torchrun then stops the other ranks and exits non-zero, and with gloo the peers blocked in a
  collective get a "connection closed" error themselves. `init_distributed(timeout_s=...)` bounds any wait.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # torch 2.4 / 2.5
    try:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule, fully_shard = None, None

__all__ = [
    "DistEnv",
    "init_distributed",
    "launched_world_size",
    "fail_fast",
    "shard_batch",
    "caption_token_count",
    "accumulation_token_count",
    "data_parallel",
    "wrap_ddp",
    "shard_module",
    "shard_frozen_critic",
    "transformer_blocks",
    "no_sync",
    "reduce_mean",
    "unwrap",
    "full_grads",
]


# --------------------------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank (0 when not launched by torchrun)
    world_size: int  # number of ranks (1 when not launched by torchrun)
    local_rank: int  # rank on this machine: the CUDA device index
    device: torch.device  # cuda:<local_rank> when CUDA is available, else cpu

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 for a plain `python script.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(
    backend: str | None = None, *, timeout_s: float = 300.0, device: str | None = None
) -> DistEnv:
    """Join the process group that torchrun / accelerate launch describe in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...). Without those variables (a plain `python script.py`) nothing is initialized and a
    1-rank `DistEnv` is returned, so one script runs both ways.

    Args:
        backend: "nccl" on CUDA, "gloo" on CPU when None.
        timeout_s: the longest any collective may wait for a peer before raising (bounds a hang).
        device: "cuda" | "cpu"; default cuda when available.
    """
    world_size = launched_world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if kind == "cuda" else "gloo"), timeout=datetime.timedelta(seconds=timeout_s)
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, dev)


@contextlib.contextmanager
def fail_fast(exit_code: int = 1) -> Iterator[None]:
    """Run a rank's main body so that an exception ends this process at once with `exit_code`.

    A rank that raises and then lingers (waiting in interpreter teardown, in a process-group destructor, or
    simply not reaching the collective its peers wait in) leaves the other ranks hanging. Here the traceback
    is printed with the rank, stdout/stderr are flushed and the process exits immediately; torchrun sees a
    failed worker, stops the others and exits non-zero. `SystemExit(0)` and a normal return pass through.
    """
    try:
        yield
    except SystemExit as e:
        if e.code in (0, None):
            raise
        _die(exit_code if not isinstance(e.code, int) else e.code)
    except BaseException:  # every failure, OOM and KeyboardInterrupt included, must end the rank
        rank = os.environ.get("RANK", "0")
        print(f"[uno_engine] rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        _die(exit_code)


def _die(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -------------------------------------------------------------------------------------------------- batches
def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's contiguous slice (dim 0) of a global batch; non-tensor values are kept as they are, except
    an int batch["sample_offset"] (the global index of the first sample, which the reading's draws use:
    uno_engine.read), which moves to the slice's first sample. The global batch size must be divisible by
    `world_size`."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] % world_size:
                raise ValueError(
                    f"shard_batch: batch[{key!r}] has {value.shape[0]} rows, not divisible by "
                    f"world_size={world_size}"
                )
            n = value.shape[0] // world_size
            value = value[rank * n : (rank + 1) * n]
        out[key] = value
    if isinstance(batch.get("sample_offset"), int) and isinstance(batch.get("captions"), torch.Tensor):
        out["sample_offset"] = batch["sample_offset"] + rank * (batch["captions"].shape[0] // world_size)
    return out


def caption_token_count(batch: dict) -> torch.Tensor:
    """The number of supervised caption tokens of one batch, a float32 device scalar: the sum of
    `batch["caption_mask"]`, or every position of `batch["captions"]` when there is no mask."""
    mask = batch.get("caption_mask")
    if mask is not None:
        return mask.sum().to(torch.float32)
    captions = batch["captions"]
    return torch.full((), captions.numel(), dtype=torch.float32, device=captions.device)


def accumulation_token_count(
    micro_batches: Sequence[dict], *, group=None, stamp: bool = True
) -> torch.Tensor:
    """The `batch["num_caption_tokens"]` that makes accumulated, rank-averaged gradients equal to the caption
    CE's mean over every token of every micro-batch on every rank. Stays on the device (one all_reduce when a
    process group is initialized, no host sync). With `stamp=True` it is written into each micro-batch.

    UNOLoss divides the summed CE of a micro-batch by this count and applies no world-size factor to it, while
    DDP and FSDP2 average gradients over ranks; so the value is (tokens over all ranks and micro-batches) /
    world_size. On one process it is simply the token count of the whole accumulated batch.
    Also stamps `batch["num_images"]`, this rank's image count over its micro-batches.
    """
    total = torch.stack([caption_token_count(b) for b in micro_batches]).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
        total = total / dist.get_world_size(group)
    if stamp:
        images = sum(b["captions"].shape[0] for b in micro_batches)  # this rank's, a host int: no sync
        for b in micro_batches:
            b["num_caption_tokens"] = total
            b["num_images"] = images  # lets a loss scale its per-micro-batch means by B_micro / num_images
    return total


def reduce_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of a (detached) device tensor over the ranks, for logging; identity on one process.
    (gloo has no ReduceOp.AVG, so this is SUM / world_size.)"""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------- wrapping
def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model, in execution order: modules whose class an HF model names in
    `_no_split_modules` and that occur more than once (decoder / encoder layers, not the one-off patch
    embedding), else the elements of the outermost `nn.ModuleList`s. (Never `module` itself.)"""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    if names:
        blocks, inside = [], set()
        for name, m in module.named_modules():
            nested = any(name.startswith(p + ".") for p in inside)
            if m is not module and type(m).__name__ in names and not nested:
                blocks.append(m)
                inside.add(name)
        counts = Counter(type(b).__name__ for b in blocks)
        repeated = [b for b in blocks if counts[type(b).__name__] > 1]  # layers, not one-off embeddings
        if repeated or blocks:
            return repeated or blocks
    blocks = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                visit(child)

    visit(module)
    return blocks


def _require_fsdp2() -> None:
    if fully_shard is None:
        raise RuntimeError(f"FSDP2 (fully_shard) needs torch >= 2.4; this is torch {torch.__version__}")


def shard_module(
    module: nn.Module,
    *,
    mesh=None,
    blocks: Iterable[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    **fsdp_kwargs,
) -> nn.Module:
    """FSDP2 for a trainable module: every block (default `transformer_blocks(module)`) is a unit that
    reshards after forward, then the module itself is the root unit (the rest of its parameters).
    Create the optimizer *after* this: the parameters become sharded DTensors."""
    _require_fsdp2()
    for block in transformer_blocks(module) if blocks is None else blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    fully_shard(module, mesh=mesh, **fsdp_kwargs)  # root: not resharded after forward (freed after backward)
    return module


def shard_frozen_critic(
    critic: nn.Module, *, mesh=None, blocks: Iterable[nn.Module] | None = None, **fsdp_kwargs
) -> nn.Module:
    """FSDP2 for the frozen critic: each transformer block (default `transformer_blocks(critic)`, i.e. the
    vision tower's and the LM's layers) is sharded over the ranks with `reshard_after_forward=True`.

    The parameters are frozen (checked), so they never get a `.grad`: no gradient buffer and no
    reduce-scatter. Blocks are all-gathered for the forward and again for the backward, where the critic
    carries the input gradient back to the generated image. Everything outside the blocks stays a plain,
    replicated tensor (embeddings, lm_head, norms, patch embedding: the adapter reads some of them outside
    its forward). Each block is its own FSDP2 root (no unit above it), so all-gathers are not prefetched
    across blocks: FSDP2 cannot prefetch into another root's unit.
    """
    _require_fsdp2()
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"shard_frozen_critic: the critic must be frozen, but {len(trainable)} parameters "
            f"require grad (first: {trainable[0]!r}); use Critic.from_hf, which freezes it"
        )
    units = list(transformer_blocks(critic) if blocks is None else blocks)
    if not units:
        raise ValueError("shard_frozen_critic: found no transformer blocks to shard; pass `blocks=`")
    for block in units:
        # Each block is its own root (no FSDP unit above it owns the replicated parameters); an explicit
        # reshard_after_forward=True makes even a root free its gathered parameters after the forward.
        fully_shard(block, mesh=mesh, reshard_after_forward=True, **fsdp_kwargs)
    return critic


def wrap_ddp(module: nn.Module, *, device: torch.device | None = None, **ddp_kwargs) -> nn.Module:
    """`DistributedDataParallel(module)` on this rank's device (device_ids only on CUDA)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = device or next(module.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    return DDP(module, **ddp_kwargs)


def _has_trainable(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def data_parallel(
    step: nn.Module, *, mode: str = "ddp", shard_critic: bool = False, mesh=None, **wrapper_kwargs
) -> nn.Module:
    """Wrap the trainable parts of a `UNOStep` in place and return it.

    Args:
        step: a `UNOStep` (attributes `generator`, `critic`, `uno_loss`).
        mode: "ddp" (`DistributedDataParallel`) or "fsdp" (FSDP2 `fully_shard`, blocks then root) for the
            generator and, when it has trainable heads, the loss (its own unit; DDP with
            find_unused_parameters, since the heads learn only when the batch carries reference images).
        shard_critic: shard the frozen critic with `shard_frozen_critic` (else it stays replicated as is).
        mesh: the FSDP2 DeviceMesh (default: all ranks).
        **wrapper_kwargs: passed to DDP or to fully_shard.
    Build the optimizer after this call, from `step.parameters()`.
    """
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"data_parallel: `mode` must be 'ddp' or 'fsdp', got {mode!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("data_parallel: no process group; call init_distributed() under torchrun first")
    if shard_critic:
        shard_frozen_critic(step.critic, mesh=mesh)
    trainable_loss = _has_trainable(step.uno_loss)  # the density / structure heads, when the loss has them
    if mode == "ddp":
        step.generator = wrap_ddp(step.generator, **wrapper_kwargs)
        if trainable_loss:  # heads learn only from reference images: a batch without them leaves them unused
            step.uno_loss = wrap_ddp(step.uno_loss, **{"find_unused_parameters": True, **wrapper_kwargs})
    else:
        shard_module(step.generator, mesh=mesh, **wrapper_kwargs)
        if trainable_loss:
            fully_shard(step.uno_loss, mesh=mesh, **wrapper_kwargs)
    return step


@contextlib.contextmanager
def no_sync(step: nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of every DDP or FSDP2 unit inside `step` (the
    non-final micro-batches of gradient accumulation); gradients accumulate locally and the next backward
    outside this context synchronizes the sum."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    fsdp = [m for m in step.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    with contextlib.ExitStack() as stack:
        for m in step.modules():
            if isinstance(m, DDP):
                stack.enter_context(m.no_sync())
        for m in fsdp:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in fsdp:
                m.set_requires_gradient_sync(True, recurse=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own unwrapped selves)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def full_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full gradient} of the trainable parameters, gathering FSDP2's sharded DTensor gradients, named
    as in the unwrapped module, so that runs with any wrapper compare name by name (a collective under
    FSDP2: call it on every rank)."""
    out = {}
    for name, p in unwrap(module).named_parameters():
        if not p.requires_grad or p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out
