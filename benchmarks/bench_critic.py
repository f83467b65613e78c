"""Critic checkpoint policies side by side: understanding peak memory and time (issue 6).

    python benchmarks/bench_critic.py                       # CPU: mid-llava (~100M, 256 image tokens), B=2
    python benchmarks/bench_critic.py --batch 8             # CPU: the issue's figure (B=8, 64 caption tokens)
    python benchmarks/bench_critic.py --preset qwen2-vl-2b  # any critic preset; on CUDA the default is
                                                            # llava-1.5-7b in bf16, B=8

One "understanding pass" = generated images (the generator-side input, requires grad) -> critic.prepare (the
bridge) -> critic forward -> caption cross-entropy (ops.linear_cross_entropy) + a density regression on the
patch
features -> backward to the images. For each policy ("none", "layer", "selective", "offload") on the same
weights:

- peak memory of the understanding part: the peak above what was allocated just before the critic's forward
  (weights excluded), uno_engine.memory.track_peak_memory (CUDA allocator stats; on the CPU a dispatch-mode
  count of live tensor storage);
- median time of the whole pass over interleaved rounds (harness.time_fn per policy and round), and the
  FLOP floor of the critic: 2 x its forward FLOPs
  (torch.utils.flop_counter) at the matmul rate measured in the same run (bf16 on CUDA, fp32 on the CPU);
- the generator-side gradient (d loss / d images) relative to "none".

Targets (issue 6): layer <= 40% of none; selective <= 60% of none in <= 1.15x its time; gradients equal
(<= 1e-6 relative in fp32). On the CPU "offload" equals "none" (activations already live in host memory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

POLICIES = ("none", "layer", "selective", "offload")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b" if cuda else "mid-llava")
    p.add_argument("--batch", type=int, default=8 if cuda else 2)
    p.add_argument("--caption-len", type=int, default=64)
    p.add_argument(
        "--dtype", default="bfloat16" if cuda else "float32", choices=("float32", "bfloat16", "float16")
    )
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rep", type=int, default=3 if cuda else 2)
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--device", default=harness.default_device())
    return p.parse_args(argv)


def image_side(critic) -> int:
    """The side of square generated images: the processor's own output side (so the bridge is a pure rescale
    and normalize, and the critic sees its native token count)."""
    h, w = critic.spec.output_size(512, 512)
    return h if h == w else 384


def main(argv=None):
    args = parse_args(argv)
    from uno_engine import ops
    from uno_engine.critics import Critic
    from uno_engine.memory import track_peak_memory
    from uno_engine.presets.critics import build_critic_model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "none" not in policies:
        policies = ["none"] + policies
    ceilings = harness.measure_ceilings(args.device)
    model, processor = build_critic_model(args.preset, device=device, dtype=dtype)
    critics = {
        p: Critic.from_hf(model, processor, checkpoint=p, attn_backend=args.attn_backend) for p in policies
    }
    ref = critics["none"]
    side = image_side(ref)
    g = torch.Generator(device="cpu").manual_seed(0)
    B, L = args.batch, args.caption_len
    images0 = (torch.rand(B, 3, side, side, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    captions = torch.randint(0, min(ref.vocab_size, 30000), (B, L), generator=g).to(device)
    caption_mask = torch.ones(B, L, dtype=torch.long, device=device)
    caption_mask[B // 2 :, L - L // 4 :] = 0  # some right padding
    head = torch.nn.Linear(ref.vision_dim, 1, device=device, dtype=dtype)  # a density head (trainable)

    def understanding(critic, images):
        return critic.prepare(images)

    def loss_of(critic, inputs):
        out = critic(inputs, captions, caption_mask)
        caption = ops.linear_cross_entropy(
            out.caption_hidden,
            out.lm_head_weight,
            out.caption_labels,
            bias=out.lm_head_bias,
            softcap=out.logit_softcap,
        )
        density = head(out.patch_features).squeeze(-1).float()
        return caption + torch.nn.functional.mse_loss(density, torch.zeros_like(density))

    def full_pass(critic):
        images = images0.clone().requires_grad_(True)
        loss_of(critic, understanding(critic, images)).backward()
        return images.grad

    # FLOP floor: 2 x the critic's forward FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ref(understanding(ref, images0), captions, caption_mask)
    fwd_flops = fc.get_total_flops()
    floor_ms = 2 * fwd_flops / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3

    rows, grads = [], {}
    for policy in harness.progress(policies, desc="memory"):
        critic = critics[policy]
        grads[policy] = full_pass(critic)  # warm (and the gradient for the comparison)
        images = images0.clone().requires_grad_(True)
        inputs = understanding(critic, images)
        head.zero_grad(set_to_none=True)
        with track_peak_memory(device) as mem:
            loss_of(critic, inputs).backward()
        rows.append({"policy": policy, "peak_MiB": mem.peak_bytes / 2**20, "peak_bytes": mem.peak_bytes})
    # time: interleaved rounds (one timing of every policy per round, the order rotated), so that a change of
    # machine load during the run hits every policy alike; the median over rounds is reported
    times = {p: [] for p in policies}
    for r in harness.progress(range(args.rep), desc="timing rounds"):
        order = policies[r % len(policies) :] + policies[: r % len(policies)]
        for policy in order:
            t = harness.time_fn(
                lambda c=critics[policy]: full_pass(c),
                device=args.device,
                warmup=args.warmup if r == 0 else 0,
                rep=1,
            )
            times[policy].append(t["median_ms"])
    for row in rows:
        ts = sorted(times[row["policy"]])
        row.update(time_ms=statistics.median(ts), min_ms=ts[0], max_ms=ts[-1], rounds=len(ts))
    base = rows[0]
    for r in rows:
        g_rel = (
            (grads[r["policy"]].float() - grads["none"].float()).norm() / grads["none"].float().norm()
        ).item()
        r.update(
            peak_vs_none=r["peak_bytes"] / base["peak_bytes"],
            time_vs_none=r["time_ms"] / base["time_ms"],
            floor_ms=floor_ms,
            time_vs_floor=r["time_ms"] / floor_ms,
            grad_rel_diff=g_rel,
            preset=args.preset,
            batch=B,
            caption_len=L,
            image_side=side,
            dtype=args.dtype,
            critic_fwd_GFLOP=fwd_flops / 1e9,
        )
    title = (
        f"critic checkpoint policies: {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"params), B={B}, {side}px images, {L} caption tokens, {args.dtype}, {harness.device_name(device)}; "
        f"floor = 2 x {fwd_flops / 1e9:.1f} GFLOP at {ceilings['matmul_TFLOPs']:.3g} TFLOP/s "
        f"({ceilings['matmul_dtype']})"
    )
    harness.print_table(
        rows,
        [
            "policy",
            "peak_MiB",
            "peak_vs_none",
            "time_ms",
            "time_vs_none",
            "floor_ms",
            "time_vs_floor",
            "grad_rel_diff",
        ],
        title=title,
    )
    by = {r["policy"]: r for r in rows}
    checks = []
    if "layer" in by:
        checks.append(("layer peak <= 40% of none", by["layer"]["peak_vs_none"], 0.40))
    if "selective" in by:
        checks.append(("selective peak <= 60% of none", by["selective"]["peak_vs_none"], 0.60))
        checks.append(("selective time <= 1.15x none", by["selective"]["time_vs_none"], 1.15))
    if dtype == torch.float32:
        checks.append(("max generator-grad rel diff <= 1e-6", max(r["grad_rel_diff"] for r in rows), 1e-6))
    for name, value, limit in checks:
        print(f"  {'PASS' if value <= limit else 'FAIL'}  {name}: {value:.4g}")
    meta = harness.env_metadata(args.device)
    meta.update(ceilings=ceilings, args=vars(args))
    paths = harness.write_results("bench_critic", rows, meta, tag=f"{args.preset}-b{B}")
    print("wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
