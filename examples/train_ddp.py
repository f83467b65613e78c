"""UNO post-training with DistributedDataParallel: the generator is replicated and its gradients averaged; the
frozen critic is simply replicated (no wrapper: it has no gradients to synchronize).

    torchrun --nproc_per_node=2 examples/train_ddp.py                  # CPU: gloo; GPUs: nccl, one per rank
    torchrun --nproc_per_node=2 examples/train_ddp.py --accumulate 2   # gradient accumulation
    python examples/train_ddp.py                                       # one process, same global batch

Tiny presets (real transformers / diffusers classes, random weights, nothing downloaded), a few steps; each
step prints the loss averaged over the ranks. Every rank draws the same global batch from the step's seed and
keeps its own slice, so any world size trains on the same data.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine import distributed as D
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--critic", default="tiny-llava-clip")
    p.add_argument("--critic-checkpoint", default="none", help="none | layer | selective | offload")
    p.add_argument(
        "--generator", default="tiny-sd", help="a generator preset, or 'tiny-sd-onestep' (deterministic)"
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4, help="images per step over all ranks")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step on each rank")
    p.add_argument("--caption-len", type=int, default=6)
    p.add_argument(
        "--density", type=float, default=0.5, help="density-regression weight (0: caption CE only)"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--read",
        default="default",
        choices=("default", "off"),
        help="default: one jittered view per image (UNOConfig's default); off: the processor's exact read",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dump", default=None, help="save the first step's loss and generator grads here (rank 0)"
    )
    p.add_argument(
        "--fail-rank",
        type=int,
        default=None,
        help="raise an out-of-memory error on this rank in step 0 (failure drill)",
    )
    return p.parse_args(argv)


def one_step_generator(preset):
    """A deterministic generator from a diffusers preset: x0 predicted by the denoiser from batch['latents']
    at a fixed timestep, decoded by the VAE. Images depend on each sample's own inputs only, so any split of
    the batch over ranks gives bit-comparable results (the sampling preset draws noise per batch)."""
    gen, make_batch = build_generator(preset)
    abar = float(gen.scheduler.alphas_cumprod[500])

    def x0_from_latents(batch):
        x = batch["latents"]
        t = torch.full((x.shape[0],), 500.0, device=x.device)
        eps = gen.denoiser(x, t, encoder_hidden_states=batch["prompt_embeds"], return_dict=False)[0]
        return gen.decode_latents((x - (1 - abar) ** 0.5 * eps) / abar**0.5)

    def make(n, length, vocab, *, generator):
        batch = make_batch(n, length, vocab, generator=generator)
        h, w = gen.latent_size
        batch["latents"] = torch.randn(n, gen.latent_channels, h, w, generator=generator)
        return batch

    return CallableGenerator(x0_from_latents, module=gen), make


def build(args, device):
    """(step, make_batch) — identical on every rank: the same seed before every random init."""
    torch.manual_seed(args.seed)
    model, processor = build_critic_model(args.critic, device=device)
    critic = Critic.from_hf(model, processor, checkpoint=args.critic_checkpoint)
    torch.manual_seed(args.seed + 1)
    if args.generator.endswith("-onestep"):
        generator, make_batch = one_step_generator(args.generator.removesuffix("-onestep"))
    else:
        generator, make_batch = build_generator(args.generator)
    torch.manual_seed(args.seed + 2)  # the loss heads
    loss = UNOLoss(caption=1.0, density=args.density, normalize="global")  # global caption-token mean
    config = UNOConfig(read="auto" if args.read == "default" else None)
    step = UNOStep(generator.to(device), critic, loss, config)
    return step, make_batch


def global_batch(args, make_batch, critic, i, device):
    g = torch.Generator().manual_seed(args.seed * 1000 + i)
    batch = make_batch(args.global_batch, args.caption_len, critic.vocab_size, generator=g)
    # the reading's draws (UNOConfig.read, one jittered view by default) from the step and the global sample
    # index: D.shard_batch moves sample_offset to each slice, so any world size and accumulation read alike
    batch["read_step"], batch["sample_offset"] = i, 0
    if args.density > 0:  # real images the density head learns from, and its targets
        batch["reference_images"] = torch.rand(args.global_batch, 3, 64, 48, generator=g) * 2 - 1
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(args, env, step, make_batch, optimizer):
    for i in range(args.steps):
        batch = global_batch(args, make_batch, step.critic, i, env.device)
        local = D.shard_batch(batch, env.rank, env.world_size)
        micro = [D.shard_batch(local, j, args.accumulate) for j in range(args.accumulate)]
        D.accumulation_token_count(micro)  # batch["num_caption_tokens"]: mean over every token, rank, micro
        loss = torch.zeros((), device=env.device)
        for j, mb in enumerate(micro):
            with D.no_sync(step) if j < len(micro) - 1 else contextlib.nullcontext():
                out = step(mb)
                out.loss.backward()
            loss += out.loss.detach()
        if i == 0 and args.fail_rank == env.rank:  # as if this rank ran out of memory: no rank may hang
            raise torch.cuda.OutOfMemoryError(f"failure drill: rank {env.rank} raises in step {i}")
        loss = D.reduce_mean(loss)  # the global mean caption CE (+ regression terms) over every rank
        if i == 0 and args.dump:
            grads = D.full_grads(step.generator)  # a collective under FSDP2: every rank calls it
            if env.is_main:
                torch.save({"loss": loss.cpu(), "grads": {k: v.cpu() for k, v in grads.items()}}, args.dump)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if env.is_main:
            print(f"step {i} loss {loss.item():.6f} world_size {env.world_size}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    env = D.init_distributed(timeout_s=120)
    step, make_batch = build(args, env.device)
    if env.world_size > 1:
        D.data_parallel(step, mode="ddp")  # generator (+ trainable loss heads) in DDP; critic replicated
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=args.lr)
    train(args, env, step, make_batch, optimizer)


if __name__ == "__main__":
    with D.fail_fast():  # an exception on any rank ends that rank at once, so torchrun stops the others
        main()
