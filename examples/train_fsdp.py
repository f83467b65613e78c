"""UNO post-training with FSDP2 (`torch.distributed.fsdp.fully_shard`): the generator is sharded over the
ranks (parameters, gradients and optimizer state), and the frozen critic is sharded too (`--shard-critic`,
the default): its transformer blocks are all-gathered for the forward and again for the backward (which
carries the input gradient to the generator), then freed; they never hold a gradient.

    torchrun --nproc_per_node=2 examples/train_fsdp.py                       # CPU: gloo; GPUs: nccl
    torchrun --nproc_per_node=2 examples/train_fsdp.py --no-shard-critic     # critic replicated instead
    python examples/train_fsdp.py                                            # one process, same global batch

Model, data and the training loop are those of train_ddp.py; only the wrapping differs. Build the optimizer
after sharding: the parameters become DTensors.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_ddp import build, parse_args, train  # noqa: E402

from uno_engine import distributed as D  # noqa: E402


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--shard-critic", action=argparse.BooleanOptionalAction, default=True)
    ours, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    env = D.init_distributed(timeout_s=120)
    step, make_batch = build(args, env.device)
    if env.world_size > 1:
        D.data_parallel(step, mode="fsdp", shard_critic=ours.shard_critic)
    if env.is_main:
        local, full = _critic_numel(step.critic)
        print(
            f"critic parameters held per rank: {local} of {full} "
            f"({'sharded' if ours.shard_critic and env.world_size > 1 else 'replicated'})",
            flush=True,
        )
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=args.lr)
    train(args, env, step, make_batch, optimizer)


def _critic_numel(critic):
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in critic.parameters())
    return local, sum(p.numel() for p in critic.parameters())


if __name__ == "__main__":
    with D.fail_fast():
        main()
