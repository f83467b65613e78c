"""UNO post-training through HF accelerate: `accelerator.prepare` wraps the generator (and the trainable loss
heads) for whatever `accelerate launch` was configured with (DDP on GPUs or CPUs); the frozen critic is left
alone, replicated on every process.

    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py   # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/train_accelerate.py --cpu                    # 2 CPU processes (gloo)

(`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate's simple CPU launcher goes
multi-process only through mpirun. `--multi_gpu` launches through torchrun, and `Accelerator(cpu=True)` then
runs the ranks on the CPU with gloo.)

Gradient accumulation: the caption CE is normalized by the token count of the whole accumulated batch
(`uno_engine.distributed.accumulation_token_count`), so the Accelerator keeps gradient_accumulation_steps=1
(it would divide the loss again) and the non-final micro-batches run under `no_sync`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_ddp import build, global_batch, parse_args  # noqa: E402

from uno_engine import distributed as D  # noqa: E402


def main(argv=None):
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--cpu", action="store_true", help="run every process on the CPU (gloo)")
    ours, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    # the density head learns only from reference images: steps without them leave it unused
    ddp = DistributedDataParallelKwargs(find_unused_parameters=args.density > 0)
    accelerator = Accelerator(cpu=ours.cpu, kwargs_handlers=[ddp])
    rank, world = accelerator.process_index, accelerator.num_processes
    step, make_batch = build(args, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=args.lr)
    step.generator, optimizer = accelerator.prepare(step.generator, optimizer)
    if any(p.requires_grad for p in step.uno_loss.parameters()):
        step.uno_loss = accelerator.prepare_model(step.uno_loss)

    for i in range(args.steps):
        local = D.shard_batch(global_batch(args, make_batch, step.critic, i, accelerator.device), rank, world)
        micro = [D.shard_batch(local, j, args.accumulate) for j in range(args.accumulate)]
        D.accumulation_token_count(micro)
        loss = torch.zeros((), device=accelerator.device)
        for j, mb in enumerate(micro):
            with D.no_sync(step) if j < len(micro) - 1 else contextlib.nullcontext():
                out = step(mb)
                accelerator.backward(out.loss)
            loss += out.loss.detach()
        loss = accelerator.reduce(loss, reduction="mean")
        if i == 0 and args.dump and accelerator.is_main_process:
            grads = D.full_grads(step.generator)
            torch.save({"loss": loss.cpu(), "grads": {k: v.cpu() for k, v in grads.items()}}, args.dump)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accelerator.print(f"step {i} loss {loss.item():.6f} world_size {world}")


if __name__ == "__main__":
    with D.fail_fast():
        main()
