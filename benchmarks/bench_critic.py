"""Critic checkpoint policies (and the fused bridge patch embedding) side by side: understanding peak memory,
time, and time over the critic's FLOP floor.

    python benchmarks/bench_critic.py                        # CPU: mid-llava (~100M, 256 image tokens), B=2
    python benchmarks/bench_critic.py --batch 8              # CPU: B=8, 64 caption tokens
    python benchmarks/bench_critic.py --device cuda          # GPU: llava-1.5-7b (CLIP-L/336 + Llama-7B shapes,
                                                             # random weights) in bf16, B=8, within --budget-s
    python benchmarks/bench_critic.py --preset janus-pro-7b  # any critic preset (uno_engine.testing.presets.critics)

One "understanding pass" = generated images (the generator-side input, requires grad) -> critic.prepare (the
bridge; with --fuse on, the bridge also applies the vision tower's conv patch embedding) -> critic forward ->
caption cross-entropy (ops.linear_cross_entropy) + a density regression on the patch features -> backward to
the images. For each variant (checkpoint policy x fused patch embedding off / on) on the same weights:

- peak_MiB: peak memory of the understanding part above what was allocated just before the critic's forward
  (by definition: weights and the bridge output excluded), uno_engine.memory.track_peak_memory (CUDA
  allocator statistics; on the CPU a dispatch-mode count of live tensor storage); peak_vs_none: over the
  "none" row with the same fuse setting;
- peak_w_bridge_MiB: the same from just before the bridge, the bridge output held only as long as autograd
  keeps it (as in UNOStep): where the fused patch embedding saves memory, the normalized image (B, 3, S, S)
  that the unfused conv keeps until its backward; fuse_vs_unfused: over the same policy unfused;
- time_ms: median over interleaved rounds (every variant once per round, the order rotated), one synced pass
  each (CUDA events on a GPU); time_vs_none;
- floor_ms: the critic's FLOP floor, 2 x its forward FLOPs (vision tower + LM over image and caption tokens +
  the caption logits the loss needs; torch.utils.flop_counter, with torch's own SDPA formula also applied to
  the CPU flash-attention op, which the counter leaves out; causal attention counted in full, as torch does)
  at the matmul rate harness.measure_ceilings measures in the same run (bf16 on CUDA, fp32 on the CPU);
  time_vs_floor = time_ms / floor_ms (the pass also holds the bridge, the loss and its backward);
- grad_rel_diff: the generator-side gradient (d loss / d images) relative to "none" unfused.

Wall-clock budget (--budget-s, default 100 s on CUDA, none on the CPU; counted from when this script has
imported torch): model build, ceilings, FLOP count, one warm pass and the two measured passes of every variant
come first; timing rounds then run while the next round fits in the budget (at least one); a variant whose
measured passes would not fit is skipped and reported as such. --lm-layers N keeps only the first N LM decoder
layers (built in full, then cut; the FLOPs, floor and memory are those of what runs, and the rows say so).

Targets: layer <= 40% of none; selective <= 60% of none in <= 1.15x its time; gradients equal
(<= 1e-6 relative in fp32). On the CPU "offload" equals "none" (activations already live in host memory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

T0 = time.perf_counter()  # the wall-clock budget counts from here

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

POLICIES = ("none", "layer", "selective", "offload")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=harness.default_device())
    p.add_argument("--preset", default=None, help="default: llava-1.5-7b on CUDA, mid-llava on the CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 2 on the CPU")
    p.add_argument("--caption-len", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--fuse", default="off,on", help="fused bridge patch embedding: off | on | off,on")
    p.add_argument("--lm-layers", type=int, default=None, help="keep only the first N LM decoder layers")
    p.add_argument("--rep", type=int, default=None, help="timing rounds (default: 3 on CUDA, 2 on the CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default: 100 on CUDA)")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--quick-ceilings", action="store_true", help="small ceiling sizes (smoke runs only)")
    harness.add_output_args(p)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("llava-1.5-7b" if cuda else "mid-llava")
    args.batch = args.batch or (8 if cuda else 2)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.rep = args.rep or (3 if cuda else 2)
    if args.budget_s is None and cuda:
        args.budget_s = 100.0
    fuse = [f.strip() for f in args.fuse.split(",") if f.strip()]
    if not fuse or set(fuse) - {"off", "on"}:
        p.error(f"--fuse takes off, on or off,on; got {args.fuse!r}")
    args.fuse_values = fuse
    return args


def elapsed() -> float:
    return time.perf_counter() - T0


def image_side(critic) -> int:
    """The side of square generated images: the processor's own output side (so the bridge is a pure rescale
    and normalize, and the critic sees its native token count)."""
    h, w = critic.spec.output_size(512, 512)
    return h if h == w else 384


def truncate_lm(model, n: int) -> int:
    """Keep the first `n` decoder layers of the model's language model; returns the original count."""
    lm = model.model.language_model
    total = len(lm.layers)
    if not 1 <= n <= total:
        raise SystemExit(f"--lm-layers must be in 1..{total} for this preset, got {n}")
    del lm.layers[n:]
    lm.config.num_hidden_layers = n
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:n]
    return total


def forward_flops(critic, inputs, captions, caption_mask) -> float:
    """FLOPs of one critic forward plus the caption logits (see the module docstring)."""
    from torch.utils import flop_counter

    extra = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash not in flop_counter.flop_registry:
        extra[cpu_flash] = _sdpa_flops  # torch's own SDPA formula
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        out = critic(inputs, captions, caption_mask)
        torch.nn.functional.linear(out.caption_hidden, out.lm_head_weight)
    return float(counter.get_total_flops())


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils import flop_counter

    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def synced_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of `fn`, synchronized (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main(argv=None):
    args = parse_args(argv)
    from uno_engine import ops
    from uno_engine.critics import Critic
    from uno_engine.memory import track_peak_memory
    from uno_engine.testing.presets.critics import build_critic_model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    budget = args.budget_s or float("inf")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "none" not in policies:
        policies = ["none"] + policies
    quick = dict(copy_bytes=1 << 24, matmul_n=512) if args.quick_ceilings else {}
    ceilings = harness.measure_ceilings(args.device, **quick)
    model, processor = build_critic_model(args.preset, device=device, dtype=dtype)
    lm_total = truncate_lm(model, args.lm_layers) if args.lm_layers else None
    harness.free_device_memory(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    critics = {
        p: Critic.from_hf(model, processor, checkpoint=p, attn_backend=args.attn_backend) for p in policies
    }
    ref = critics["none"]
    fuse_values = list(args.fuse_values)
    if "on" in fuse_values and ref.fused_patch_embed_reasons():
        print(
            f"fused patch embedding skipped for {args.preset}: {'; '.join(ref.fused_patch_embed_reasons())}"
        )
        fuse_values = [f for f in fuse_values if f != "on"] or ["off"]
    side = image_side(ref)
    g = torch.Generator(device="cpu").manual_seed(0)
    B, L = args.batch, args.caption_len
    images0 = (torch.rand(B, 3, side, side, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    captions = torch.randint(0, min(ref.vocab_size, 30000), (B, L), generator=g).to(device)
    caption_mask = torch.ones(B, L, dtype=torch.long, device=device)
    caption_mask[B // 2 :, L - L // 4 :] = 0  # some right padding
    # a density head; frozen here as UNOLoss runs it on generated images (detach_params=True)
    head = torch.nn.Linear(ref.vision_dim, 1, device=device, dtype=dtype).requires_grad_(False)

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

    def full_pass(policy, fuse):
        """As in UNOStep: the bridge output is not held past the forward (only what autograd saves is)."""
        images = images0.clone().requires_grad_(True)
        critic = critics[policy]
        loss = loss_of(critic, critic.prepare(images, fuse_patch_embed=fuse == "on"))
        loss.backward()
        return images.grad

    with torch.no_grad():
        fwd_flops = forward_flops(ref, ref.prepare(images0), captions, caption_mask)
    floor_ms = 2 * fwd_flops / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3
    warm_s = synced_ms(lambda: full_pass("none", "off"), device) / 1e3  # kernels compiled, caches filled
    print(f"[{elapsed():.0f}s] built {args.preset} ({n_params / 1e6:.0f}M params); warm pass {warm_s:.2f} s")

    variants = [(p, f) for f in fuse_values for p in policies]
    rows, grads, skipped = {}, {}, []
    last_s = warm_s
    for policy, fuse in harness.progress(variants, desc="memory"):
        # this variant's two measured passes, then one timing round over it and every variant before it
        same = [r["pass_s"] for (p, _), r in rows.items() if p == policy]
        est = same[0] if same else last_s
        if elapsed() + 3 * est + sum(r["pass_s"] for r in rows.values()) > budget:
            skipped.append(f"{policy}/{fuse}")
            continue
        harness.free_device_memory(args.device)
        try:
            t = time.perf_counter()
            with track_peak_memory(device) as mem_all:  # from just before the bridge
                grads[policy, fuse] = full_pass(policy, fuse)
            images = images0.clone().requires_grad_(True)
            inputs = critics[policy].prepare(images, fuse_patch_embed=fuse == "on")
            with track_peak_memory(device) as mem:  # from just before the critic's forward
                loss_of(critics[policy], inputs).backward()
            del inputs, images
            last_s = (time.perf_counter() - t) / 2
        except Exception as e:  # noqa: BLE001
            if not harness.is_oom(e):
                raise
            harness.free_device_memory(args.device)
            skipped.append(f"{policy}/{fuse} (out of memory)")
            continue
        rows[policy, fuse] = {
            "policy": policy,
            "fuse": fuse,
            "peak_MiB": mem.peak_bytes / 2**20,
            "peak_w_bridge_MiB": mem_all.peak_bytes / 2**20,
            "pass_s": last_s,
        }
    if ("none", fuse_values[0]) not in rows:
        raise SystemExit(f"budget {args.budget_s} s spent before the first variant ran: {skipped}")
    # time: interleaved rounds, so that a change of machine load during the run hits every variant alike
    times = {k: [] for k in rows}
    order = list(rows)
    round_s = sum(r["pass_s"] for r in rows.values())
    for r in range(args.rep):
        if r > 0 and elapsed() + round_s > budget:
            break
        t = time.perf_counter()
        for key in order[r % len(order) :] + order[: r % len(order)]:
            times[key].append(synced_ms(lambda k=key: full_pass(*k), device))
        round_s = time.perf_counter() - t
    for key, row in rows.items():
        ts = sorted(times[key])
        row.update(time_ms=statistics.median(ts), min_ms=ts[0], max_ms=ts[-1], rounds=len(ts))
    g_ref = grads["none", fuse_values[0]].float()
    for (policy, fuse), row in rows.items():
        none, unfused = rows.get(("none", fuse)), rows.get((policy, "off"))
        row.update(
            peak_vs_none=row["peak_MiB"] / none["peak_MiB"] if none else None,
            fuse_vs_unfused=row["peak_w_bridge_MiB"] / unfused["peak_w_bridge_MiB"] if unfused else None,
            time_vs_none=row["time_ms"] / none["time_ms"] if none else None,
            floor_ms=floor_ms,
            time_vs_floor=row["time_ms"] / floor_ms,
            grad_rel_diff=((grads[policy, fuse].float() - g_ref).norm() / g_ref.norm()).item(),
            preset=args.preset,
            params_M=n_params / 1e6,
            lm_layers=args.lm_layers or "all",
            batch=B,
            caption_len=L,
            image_side=side,
            dtype=args.dtype,
            critic_fwd_GFLOP=fwd_flops / 1e9,
            matmul_TFLOPs=ceilings["matmul_TFLOPs"],
        )
    rows = list(rows.values())
    lm_note = f", LM cut to {args.lm_layers} of {lm_total} layers" if lm_total else ""
    title = (
        f"critic checkpoint policies: {args.preset} ({n_params / 1e6:.0f}M params{lm_note}), B={B}, {side}px "
        f"images, {L} caption tokens, {args.dtype}, {harness.device_name(device)}; floor = 2 x "
        f"{fwd_flops / 1e9:.1f} GFLOP at {ceilings['matmul_TFLOPs']:.3g} TFLOP/s ({ceilings['matmul_dtype']})"
    )
    columns = ["policy", "fuse", "peak_MiB", "peak_vs_none", "peak_w_bridge_MiB", "fuse_vs_unfused"]
    columns += ["time_ms", "time_vs_none", "floor_ms", "time_vs_floor", "rounds", "grad_rel_diff"]
    harness.print_table(rows, columns, title=title)
    if skipped:
        print(f"  skipped (budget {args.budget_s} s): {', '.join(skipped)}")
    checks = []
    for fuse in fuse_values:
        by = {r["policy"]: r for r in rows if r["fuse"] == fuse}
        if "none" not in by:
            continue
        if "layer" in by:
            checks.append((f"[fuse {fuse}] layer peak <= 40% of none", by["layer"]["peak_vs_none"], 0.40))
        if "selective" in by:
            checks.append(
                (f"[fuse {fuse}] selective peak <= 60% of none", by["selective"]["peak_vs_none"], 0.60)
            )
            checks.append(
                (f"[fuse {fuse}] selective time <= 1.15x none", by["selective"]["time_vs_none"], 1.15)
            )
    if dtype == torch.float32 and rows:
        checks.append(("max generator-grad rel diff <= 1e-6", max(r["grad_rel_diff"] for r in rows), 1e-6))
    for name, value, limit in checks:
        print(f"  {'PASS' if value <= limit else 'FAIL'}  {name}: {value:.4g}")
    meta = harness.env_metadata(args.device)
    meta.update(ceilings=ceilings, args=vars(args), skipped=skipped, wall_s=elapsed())
    tag = f"{args.preset}-b{B}" + (f"-lm{args.lm_layers}" if args.lm_layers else "")
    paths = harness.write_results("bench_critic", rows, meta, tag=tag, out_dir=harness.output_dir(args))
    print(f"[{elapsed():.0f}s] wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
