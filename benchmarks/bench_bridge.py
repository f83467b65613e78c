"""Benchmark of the image -> critic bridge: forward and backward, GB/s against the measured copy bandwidth.

Providers: eager reference (`uno_engine.reference.bridge`), torch.compile of it, the HF fast image processor
on a
tensor that requires grad (needs torchvision; skipped with the reason otherwise), triton (`ops.bridge`).
Bytes model (the one-read-one-write minimum): forward = images read once + output written once; backward = grad_out read once +
grad_images written once. The Triton backward reads the images as well, but only in planes where the forward
clamped a pixel: the default images lie in [-1, 1) (nothing clamped); the "triton+clamped" row scales them
by 1.1 so that every plane has clamped pixels and the backward reads them (its bytes model adds that read).
--sweep times the two-pass Triton kernels under several (BLOCK_R, BLOCK_C, num_warps) settings (UNO_BRIDGE_BLOCKS,
read by the op); --kernel picks the Triton kernels (`ops.bridge(kernel=)`: auto | two_pass | fused).
CUDA defaults: 8x3x1024x1024 -> Janus 384 and 32x3x512x512 -> SigLIP 224. CPU: small shapes, torch providers
only.

--views 1,2,4,8 times augmented reading instead (`ops.bridge(views=)`, `uno_engine.read`): forward + backward
of one call reading K random views of each image ("views") against K calls of one view each ("K x 1 view")
and the plain read, all on the op's default backend (triton on CUDA, torch on the CPU), the host's draw and
tables included (a step pays them). Views: shift 3 px, scale 0.9-1.1, noise 0.1.

    python benchmarks/bench_bridge.py [--cases janus,siglip] [--rep 20]
    python benchmarks/bench_bridge.py --views 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import env_metadata, measure_ceilings, print_table, time_fn, write_results  # noqa: E402

from uno_engine import ops, reference  # noqa: E402
from uno_engine.bridge_spec import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BridgeSpec  # noqa: E402

JANUS = BridgeSpec(
    resize="longest_edge",
    size=(384, 384),
    min_size=14,
    pad_to_square=True,
    background_color=(122, 116, 104),
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
)
SIGLIP = BridgeSpec(resize="exact", size=(224, 224))


def _hf_fast(name):
    """A fast (torchvision) HF processor or the reason it cannot run."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return None, f"torchvision missing ({type(e).__name__})"
    try:
        import transformers

        cls = {"janus": "JanusImageProcessor", "siglip": "SiglipImageProcessor"}[name]
        proc = getattr(transformers, cls + "Fast", None) or getattr(transformers, cls)
        return proc(), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="janus,siglip")
    ap.add_argument("--rep", type=int, default=20 if torch.cuda.is_available() else 3)
    ap.add_argument(
        "--cpu-compile", action="store_true", help="also time torch.compile on the CPU (slow build)"
    )
    ap.add_argument(
        "--sweep",
        default="",
        help="Triton block settings to compare, e.g. '4,256,4;8,128,4' (R,C,warps; kernels.bridge_two_pass)",
    )
    ap.add_argument(
        "--kernel", default="auto", choices=("auto", "two_pass", "fused"), help="ops.bridge(kernel=)"
    )
    ap.add_argument("--views", default="", help="time augmented reading with these K, e.g. 1,2,4,8")
    args = ap.parse_args()
    if args.views:
        return bench_views(args, [int(k) for k in args.views.split(",")])
    cuda = torch.cuda.is_available()
    # do_bench replays backward on one graph (retain_graph=True); compiled graphs with donated buffers refuse that
    torch._functorch.config.donated_buffer = False
    device = "cuda" if cuda else "cpu"
    shapes = (
        {"janus": (8, 1024, 1024), "siglip": (32, 512, 512)}
        if cuda
        else {"janus": (1, 128, 96), "siglip": (1, 128, 96)}
    )
    specs = {"janus": JANUS, "siglip": SIGLIP}
    ceil = measure_ceilings(device)
    print(f"device {env_metadata(device)['device']}: copy {ceil['copy_GBps']:.1f} GB/s")
    rows = []
    for name in args.cases.split(","):
        spec = specs[name]
        B, H, W = shapes[name]
        dtype = torch.float32
        x = (torch.rand(B, 3, H, W, device=device, dtype=dtype) * 2 - 1).requires_grad_()
        Hc, Wc = spec.output_size(H, W)
        in_bytes = x.numel() * x.element_size()
        out_bytes = B * 3 * Hc * Wc * x.element_size()
        providers = {"eager": lambda t, spec=spec: reference.bridge(t, spec)}
        if cuda or args.cpu_compile:
            providers["compile"] = torch.compile(lambda t, spec=spec: reference.bridge(t, spec))
        else:
            print(
                "compile: skipped on the CPU (inductor's C++ build alone exceeds the one-minute CPU budget; "
                "--cpu-compile runs it)"
            )
        if cuda:
            providers["triton"] = lambda t, spec=spec: ops.bridge(
                t, spec, backend="triton", kernel=args.kernel
            )
            providers["triton+clamped"] = providers["triton"]
        else:
            print("triton: skipped on the CPU (the interpreter is not timed)")
        proc, why = _hf_fast(name)
        if proc is None:
            print(f"hf_fast: skipped ({why})")
        else:

            def hf(t, proc=proc):
                u = (t + 1) * 127.5
                return proc(images=list(u), return_tensors="pt", do_convert_rgb=False)["pixel_values"]

            try:
                keeps = hf(x[:1]).requires_grad
            except Exception as e:  # noqa: BLE001
                keeps, why = False, f"{type(e).__name__}: {e}"
            if keeps:
                providers["hf_fast"] = hf
            else:
                print(f"hf_fast: skipped (does not keep the graph: {why or 'output has no grad_fn'})")
        x_clamped = (x.detach() * 1.1).requires_grad_()
        for prov, fn in providers.items():
            xin = x_clamped if prov == "triton+clamped" else x
            if prov == "triton" and args.sweep:
                for cfg in args.sweep.split(";"):
                    env = {"UNO_BRIDGE_BLOCKS": cfg}  # "R,C,W" or "R0,C0,W0/R1,C1,W1"
                    os.environ.update(env)
                    o = fn(xin)
                    f = time_fn(lambda fn=fn, xin=xin: fn(xin), device=device, rep=args.rep)
                    gg = torch.randn_like(o)
                    b = time_fn(
                        lambda o=o, xin=xin, gg=gg: torch.autograd.grad(o, xin, gg, retain_graph=True),
                        device=device,
                        rep=args.rep,
                    )
                    print(
                        f"sweep {name} {prov} blocks={cfg}: fwd {f['median_ms']:.4f} ms, bwd {b['median_ms']:.4f} ms"
                    )
                    for k in env:
                        os.environ.pop(k)
            out = fn(xin)
            g = torch.randn_like(out)
            fwd = time_fn(lambda fn=fn, xin=xin: fn(xin), device=device, rep=args.rep)
            out = fn(xin)
            bwd = time_fn(
                lambda out=out, xin=xin, g=g: torch.autograd.grad(out, xin, g, retain_graph=True),
                device=device,
                rep=args.rep,
            )
            bwd_ms = bwd["median_ms"]
            row = dict(
                case=name,
                provider=prov,
                shape=f"{B}x3x{H}x{W}->{Hc}x{Wc}",
                dtype="fp32",
                kernel=args.kernel if prov.startswith("triton") else "",
                fwd_ms=fwd["median_ms"],
                bwd_ms=bwd_ms,
                fwd_GBps=(in_bytes + out_bytes) / (fwd["median_ms"] * 1e-3) / 1e9,
                bwd_GBps=(in_bytes * (2 if prov == "triton+clamped" else 1) + out_bytes)
                / (bwd_ms * 1e-3)
                / 1e9,
            )
            row["fwd_frac_copy"] = row["fwd_GBps"] / ceil["copy_GBps"]
            row["bwd_frac_copy"] = row["bwd_GBps"] / ceil["copy_GBps"]
            if prov.startswith("triton"):
                (g1,) = torch.autograd.grad(fn(xin), xin, g)
                (g2,) = torch.autograd.grad(fn(xin), xin, g)
                row["bwd_bit_identical"] = bool(torch.equal(g1, g2))
                print(f"{name}: {prov} backward bit-identical across two runs: {row['bwd_bit_identical']}")
            rows.append(row)
    print_table(
        rows,
        [
            "case",
            "provider",
            "shape",
            "fwd_ms",
            "bwd_ms",
            "fwd_GBps",
            "bwd_GBps",
            "fwd_frac_copy",
            "bwd_frac_copy",
            "bwd_bit_identical",
        ],
        title="bridge (bwd: the backward alone, on a retained graph)",
    )
    meta = env_metadata(device)
    meta.update(ceil)
    paths = write_results("bench_bridge", rows, meta, tag=None if args.kernel == "auto" else args.kernel)
    print("results:", *paths)


def bench_views(args, ks):
    """Augmented reading: K views in one call vs K one-view calls vs the plain read (module docstring)."""
    from uno_engine import ReadAugment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {"janus": (8, 1024, 1024), "siglip": (32, 512, 512)} if device == "cuda" else None
    shapes = shapes or {"janus": (2, 128, 96), "siglip": (2, 128, 96)}
    specs = {"janus": JANUS, "siglip": SIGLIP}
    aug = dict(shift=3.0, scale=(0.9, 1.1), noise=0.1)
    rows = []
    for name in args.cases.split(","):
        spec = specs[name]
        B, H, W = shapes[name]
        x = (torch.rand(B, 3, H, W, device=device) * 2 - 1).requires_grad_()
        one = ReadAugment(views=1, **aug)

        def fwd_bwd(views):
            out = ops.bridge(x, spec, views=views)
            torch.autograd.grad(out, x, torch.ones_like(out))

        plain = time_fn(lambda: fwd_bwd(None), device=device, rep=args.rep)["median_ms"]
        step = [0]

        def k_single(K):
            for _ in range(K):
                step[0] += 1
                fwd_bwd(one.draw(B, H, W, step=step[0]))

        for K in ks:
            read = ReadAugment(views=K, **aug)
            many = time_fn(lambda read=read: fwd_bwd(read.draw(B, H, W, step=1)), device=device, rep=args.rep)
            single = time_fn(lambda K=K: k_single(K), device=device, rep=args.rep)
            rows.append(
                dict(
                    case=name,
                    shape=f"{B}x3x{H}x{W}->{'x'.join(map(str, spec.output_size(H, W)))}",
                    views=K,
                    plain_ms=plain,
                    views_ms=many["median_ms"],
                    k_single_ms=single["median_ms"],
                    views_over_k_single=many["median_ms"] / single["median_ms"],
                    views_over_k_plain=many["median_ms"] / (K * plain),
                )
            )
    cols = ["case", "shape", "views", "plain_ms", "views_ms", "k_single_ms", "views_over_k_single", "views_over_k_plain"]
    print_table(rows, cols, title="bridge with K views: forward + backward, one call vs K one-view calls")
    meta = env_metadata(device)
    paths = write_results("bench_bridge", rows, meta, tag="views")
    print("results:", *paths)


if __name__ == "__main__":
    main()
