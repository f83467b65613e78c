"""The main benchmark: what understanding supervision costs on top of a generation step, and how close
uno_engine comes to the floor of that cost.

    python benchmarks/step_throughput.py                        # CPU: tiny preset, eager vs engine, < 2 min
    python benchmarks/step_throughput.py --preset sd15-llava7b  # GPU: real shapes, random weights, offline
    python benchmarks/step_throughput.py --preset janus-pro-1b --max-batch-search 8 --compare results/old.json

For each preset (uno_engine.testing.presets.build_preset) and provider:
  eager            UNOConfig(backend="reference"), Critic(checkpoint="none"): what users write by hand
  eager+compile    the same, with the critic, its image preprocessing and the loss under torch.compile
  engine           UNOConfig(backend="auto"), Critic(checkpoint=<the preset's choice, e.g. "selective">)
  engine+compile   the engine with UNOConfig(compile=True) (the critic compiled block by block)
it measures, on one fixed batch, side by side (the providers and the generation-only step take turns):
  - the median time of a training step (step(batch).loss.backward()) over >= 20 steps after warm-up, each
    step timed alone with CUDA events on a GPU (perf_counter on the CPU), and images/s;
  - the peak memory of one step above the level before it (uno_engine.memory.track_peak_memory);
  - the understanding overhead: step time - the time of a generation-only training step of the same generator
    on the same batch (forward, images.float().square().mean(), backward), in ms and in % of the latter,
    broken down per phase from UNOConfig(profile=True) steps (bridge, critic and loss, forward + backward);
  - the critic's FLOP floor: 2 x the FLOPs of one critic forward (vision tower, LM, and the lm_head on the
    caption positions; torch.utils.flop_counter), at the matmul rate harness.measure_ceilings() measures in
    the same run; and overhead / floor. (Forward plus an input-only backward of a frozen critic: ~2x forward.)
  - optionally (GPU, --max-batch-search N): the largest batch before out-of-memory, by doubling then
    bisection, at most N trials per provider.
Results: a table on stdout, JSON + CSV under benchmarks/results/ (harness.write_results, with env_metadata and
the ceilings), and with --compare FILE each metric against a committed results file (exit 1 if any metric is
more than 10% worse).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PROVIDERS = ("eager", "eager+compile", "engine", "engine+compile")
GEN_ONLY = "generation-only"
PHASES = ("generate", "bridge", "critic", "loss", "loss_bwd", "critic_bwd", "bridge_bwd", "generator_bwd")
TABLE_COLUMNS = [
    "preset",
    "provider",
    "batch",
    "median_ms",
    "images_per_s",
    "peak_MB",
    "overhead_ms",
    "overhead_pct",
    "floor_ms",
    "overhead_over_floor",
    "time_vs_eager",
    "peak_vs_eager",
    "max_batch",
]
PHASE_COLUMNS = (
    ["preset", "provider"]
    + [f"phase_{p}_ms" for p in PHASES]
    + ["overhead_bridge_ms", "overhead_critic_ms", "overhead_loss_ms", "overhead_other_ms"]
)
MIN_STEPS = 20


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- providers
def make_step(provider: str, preset, loss):
    """The UNOStep of `provider` over the preset's generator and (shared) HF critic model."""
    from uno_engine.config import UNOConfig
    from uno_engine.step import UNOStep

    if provider == "eager":
        return UNOStep(preset.generator, preset.make_critic("none"), loss, UNOConfig(backend="reference"))
    if provider == "eager+compile":
        # the reference path under torch.compile: its own Critic wrapper (the eager provider's stays eager)
        critic = preset.make_critic("none", cache=False)
        critic.compile()
        critic.prepare = torch.compile(critic.prepare)
        loss.compile()
        return UNOStep(preset.generator, critic, loss, UNOConfig(backend="reference"))
    if provider == "engine":
        return UNOStep(
            preset.generator, preset.make_critic(preset.engine_checkpoint), loss, UNOConfig(backend="auto")
        )
    if provider == "engine+compile":
        # the engine's own critic: its checkpoint wrappers are on the shared layers (a second critic of the
        # same policy would find them taken); compile_blocks then compiles those layers in place
        critic = preset.make_critic(preset.engine_checkpoint)
        return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto", compile=True))
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def uno_train_step(step, batch):
    def run():
        out = step(batch)
        out.loss.backward()
        return out

    return run


def generation_only_step(generator, batch):
    """The generation-only training step the overhead is measured against: same generator, same batch."""

    def run():
        images = generator(batch)
        images.float().square().mean().backward()

    return run


# ------------------------------------------------------------------------------------------------- metrics
def measure_peak_mb(fn, device, before) -> float:
    """Peak MiB allocated by one call of `fn` above the level before it (uno_engine.memory.track_peak_memory:
    CUDA allocator statistics on a GPU, live tensor storages on the CPU)."""
    from uno_engine.memory import track_peak_memory

    before()
    harness.free_device_memory(str(device))
    with track_peak_memory(device) as m:
        fn()
    before()
    return m.peak_bytes / 2**20


def critic_forward_flops(preset, critic, batch) -> float:
    """FLOPs of one critic forward on the generated images of `batch`: vision tower + LM + the lm_head on the
    caption positions (the logits the caption loss needs; the engine never materializes them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        images = preset.generator(batch)
        with FlopCounterMode(display=False) as counter:
            inputs = critic.prepare(images, backend="reference")
            out = critic(inputs, batch["captions"], batch.get("caption_mask"))
            torch.nn.functional.linear(out.caption_hidden, out.lm_head_weight)
    return float(counter.get_total_flops())


def profile_phases(step, fn_step, device, n: int, before) -> dict[str, float]:
    """Median per-phase ms over `n` UNOConfig(profile=True) steps. generator_bwd = the step's own total time
    minus the stamped phases (the generator's backward and whatever else is left)."""
    step.config.profile = True
    per_phase: dict[str, list[float]] = {}
    try:
        for _ in range(n):
            before()
            t = _Clock(device)
            out = fn_step()
            total = t.stop()
            ph = {k[:-3]: v for k, v in out.timings().items()}
            ph["generator_bwd"] = total - sum(ph.values())
            for k, v in ph.items():
                per_phase.setdefault(k, []).append(v)
    finally:
        step.config.profile = False
        before()
    return {k: statistics.median(v) for k, v in per_phase.items()}


def profile_generation_only(generator, batch, device, n: int, before) -> dict[str, float]:
    fwd, bwd = [], []
    for _ in range(n):
        before()
        t = _Clock(device)
        images = generator(batch)
        t_fwd = t.stop()
        t2 = _Clock(device)
        images.float().square().mean().backward()
        fwd.append(t_fwd)
        bwd.append(t2.stop())
    before()
    return {"generate": statistics.median(fwd), "generator_bwd": statistics.median(bwd)}


class _Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t0) * 1e3


def search_max_batch(preset, run_factory, args, device, before) -> dict:
    """Largest batch of a provider (or of the generation-only step); run_factory(batch) -> a training step."""

    def try_batch(b):
        batch = preset.make_batch(b, presampled=True)
        before()
        try:
            run_factory(batch)()
        finally:
            before()

    return harness.largest_batch(
        try_batch,
        start=preset.batch_size,
        max_trials=args.max_batch_search,
        cap=args.max_batch_cap,
        time_budget_s=args.max_batch_time,
        device=str(device),
    )


# --------------------------------------------------------------------------------------------- one preset
def run_preset(name: str, args, device: torch.device, ceilings: dict, save=None) -> list[dict]:
    """All providers of one preset. `save(rows)` is called whenever a set of figures is complete (after the
    plain providers, after the compile providers, after the batch search), so a run cut short keeps them."""
    from uno_engine.testing.presets import build_preset

    torch.manual_seed(0)
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    preset = build_preset(
        name,
        device=device,
        dtype=dtype,
        batch_size=args.batch_size,
        caption_len=args.caption_len,
        janus_sampling=args.janus_sampling,
        engine_checkpoint=args.engine_checkpoint,
    )
    build_s = time.perf_counter() - t0
    log(
        f"[{name}] built in {build_s:.1f} s: {preset.spec.description}; batch {preset.batch_size}, "
        f"caption {preset.caption_len} tokens, {preset.dtype}"
    )
    batch = preset.make_batch()
    gen_params = preset.generator_parameters()
    losses: dict[str, torch.nn.Module] = {}

    def drop_grads(*_):
        for p in gen_params:
            p.grad = None
        for loss in losses.values():
            for p in loss.parameters():
                p.grad = None

    base = {
        "preset": name,
        "device": harness.device_name(device),
        "dtype": str(preset.dtype).replace("torch.", ""),
        "batch": preset.batch_size,
        "caption_len": preset.caption_len,
        "build_s": round(build_s, 2),
    }
    if preset.spec.generator == "janus":
        base["janus_sampling"] = args.janus_sampling
    rows: dict[str, dict] = {GEN_ONLY: {**base, "provider": GEN_ONLY, "checkpoint": None}}
    gen_fn = generation_only_step(preset.generator, batch)

    # FLOP floor of the critic (eager critic; does not depend on the provider)
    try:
        flops = critic_forward_flops(preset, preset.make_critic("none"), batch)
    except Exception as e:  # noqa: BLE001
        log(f"[{name}] FLOP count failed: {type(e).__name__}: {e}")
        flops = None
    floor_ms = (2 * flops / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3) if flops else None

    def checkpoint():
        if getattr(preset.generator, "sample_ms", None) is not None:
            for r in rows.values():  # the first (sampling) forward, outside the timing
                r["sample_ms"] = preset.generator.sample_ms
        finish_rows(rows, flops, floor_ms, ceilings)
        if save is not None:
            save(list(rows.values()))

    # Providers without compile are timed together first, then each compile provider in a group of its own:
    # compile_blocks compiles the HF layers in place, which changes the other providers' critic (and for Janus
    # the generator, which shares the LM). Every group times the generation-only step beside it, and a
    # provider's overhead is taken against the generation-only time of its own group.
    groups = [[p for p in args.providers if "compile" not in p]] + [
        [p] for p in args.providers if "compile" in p
    ]
    for gi, group in enumerate(g for g in groups if g):
        steps, fns = {}, {}
        for prov in group:
            row = rows[prov] = {
                **base,
                "provider": prov,
                "checkpoint": "none" if prov.startswith("eager") else preset.engine_checkpoint,
            }
            try:
                losses[prov] = preset.make_loss(**args.loss_kwargs)
                steps[prov] = make_step(prov, preset, losses[prov])
                fn = uno_train_step(steps[prov], batch)
                t = time.perf_counter()
                drop_grads()
                fn()  # first call: compile / autotune / lazy init; a failing provider stops here
                drop_grads()
                row["first_step_s"] = round(time.perf_counter() - t, 2)
                fns[prov] = fn
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"[{name}] provider {prov} failed: {row['error']}")
                if args.verbose:
                    traceback.print_exc()
                steps.pop(prov, None)
                drop_grads()
                harness.free_device_memory(str(device))
        if not fns:
            continue
        timed = {GEN_ONLY: gen_fn, **fns}
        res = harness.time_interleaved(
            timed,
            steps=args.steps,
            warmup=args.warmup,
            device=str(device),
            before=drop_grads,
            desc=f"{name}: {' | '.join(timed)}",
        )
        gen_res = res.pop(GEN_ONLY)
        if gi == 0:
            rows[GEN_ONLY].update(
                median_ms=gen_res["median_ms"],
                p20_ms=gen_res["p20_ms"],
                p80_ms=gen_res["p80_ms"],
                steps=gen_res["n"],
            )
        for prov, r in res.items():
            rows[prov].update(
                median_ms=r["median_ms"],
                p20_ms=r["p20_ms"],
                p80_ms=r["p80_ms"],
                steps=r["n"],
                gen_only_ms=gen_res["median_ms"],
            )
        # per-phase breakdown (separate profiled steps: profiling adds a sync per step)
        if args.profile_steps > 0:
            if gi == 0:
                ph = profile_generation_only(preset.generator, batch, device, args.profile_steps, drop_grads)
                rows[GEN_ONLY].update({f"phase_{k}_ms": v for k, v in ph.items()})
            for prov, step in steps.items():
                try:
                    ph = profile_phases(step, fns[prov], device, args.profile_steps, drop_grads)
                    rows[prov].update({f"phase_{k}_ms": v for k, v in ph.items()})
                except Exception as e:  # noqa: BLE001
                    log(f"[{name}] profiling {prov} failed: {type(e).__name__}: {e}")
        # peak memory of one step (untimed: the CPU tracker slows the step down)
        for prov, fn in timed.items() if gi == 0 else fns.items():
            try:
                rows[prov]["peak_MB"] = measure_peak_mb(fn, device, drop_grads)
            except Exception as e:  # noqa: BLE001
                log(f"[{name}] memory of {prov} failed: {type(e).__name__}: {e}")
        checkpoint()
        # largest batch before OOM (GPU only; the plain providers, before any compile changes the layers)
        if gi == 0 and args.max_batch_search > 0 and device.type == "cuda":
            for prov in [GEN_ONLY, *steps]:
                if prov not in args.max_batch_providers:
                    continue
                factory = (
                    (lambda b: generation_only_step(preset.generator, b))
                    if prov == GEN_ONLY
                    else (lambda b, s=steps[prov]: uno_train_step(s, b))
                )
                try:
                    mb = search_max_batch(preset, factory, args, device, drop_grads)
                    rows[prov].update(
                        max_batch=mb["max_batch"],
                        max_batch_first_oom=mb["first_oom"],
                        max_batch_exact=mb["exact"],
                        max_batch_trials=len(mb["trials"]),
                    )
                    log(
                        f"[{name}] {prov}: largest batch {mb['max_batch']} (first OOM {mb['first_oom']}; "
                        f"trials {mb['trials']})"
                    )
                except Exception as e:  # noqa: BLE001
                    log(f"[{name}] max-batch search of {prov} failed: {type(e).__name__}: {e}")
                checkpoint()
        del steps, fns, timed

    checkpoint()
    harness.free_device_memory(str(device))
    return list(rows.values())


def finish_rows(rows: dict[str, dict], flops, floor_ms, ceilings):
    gen = rows[GEN_ONLY]
    gen_ms = gen.get("median_ms")
    eager = rows.get("eager", {})
    for prov, r in rows.items():
        r["critic_fwd_GFLOP"] = flops / 1e9 if flops else None
        r["floor_ms"] = floor_ms
        r["matmul_TFLOPs"] = ceilings["matmul_TFLOPs"]
        ms = r.get("median_ms")
        if ms:
            r["images_per_s"] = r["batch"] / (ms * 1e-3)
        ref_ms = r.get("gen_only_ms") or gen_ms
        if prov == GEN_ONLY or not ms or not ref_ms:
            continue
        over = ms - ref_ms
        r["gen_only_ms"] = ref_ms
        r["overhead_ms"] = over
        r["overhead_pct"] = 100.0 * over / ref_ms
        if floor_ms:
            r["overhead_over_floor"] = over / floor_ms
        if "phase_bridge_ms" in r:
            parts = {
                k: r.get(f"phase_{k}_ms", 0.0) + r.get(f"phase_{k}_bwd_ms", 0.0)
                for k in ("bridge", "critic", "loss")
            }
            for k, v in parts.items():
                r[f"overhead_{k}_ms"] = v
            r["overhead_other_ms"] = over - sum(parts.values())
        if eager.get("median_ms") and prov != "eager":
            r["time_vs_eager"] = ms / eager["median_ms"]
            if eager.get("overhead_ms") and eager["overhead_ms"] > 0:
                r["overhead_vs_eager"] = over / eager["overhead_ms"]
        if r.get("peak_MB") and eager.get("peak_MB") and prov != "eager":
            r["peak_vs_eager"] = r["peak_MB"] / eager["peak_MB"]
        if r.get("max_batch") and eager.get("max_batch") and prov != "eager":
            r["max_batch_vs_eager"] = r["max_batch"] / eager["max_batch"]


# ---------------------------------------------------------------------------------------------------- goals
def check_goals(rows: list[dict], device: torch.device) -> list[dict]:
    """Issue 8's goals, each with its measured figure (never hidden when missed)."""
    goals = []

    def add(preset, prov, goal, value, limit, *, at_most=True, note=""):
        status = (
            "n/a"
            if value is None
            else ("met" if (value <= limit if at_most else value >= limit) else "MISSED")
        )
        goals.append(
            {
                "preset": preset,
                "provider": prov,
                "goal": goal,
                "status": status,
                "note": note,
                "measured": None if value is None else round(value, 3),
            }
        )

    by = {(r["preset"], r["provider"]): r for r in rows}
    for (preset, prov), r in by.items():
        if not prov.startswith("engine") or r.get("median_ms") is None:
            continue
        if device.type == "cuda":
            phases = ("bridge", "critic", "loss", "loss_bwd", "critic_bwd", "bridge_bwd")
            fwd_bwd = {p: r[f"phase_{p}_ms"] for p in phases if r.get(f"phase_{p}_ms") is not None}
            largest = max(fwd_bwd.items(), key=lambda kv: kv[1]) if fwd_bwd else None
            note = f"largest overhead phase: {largest[0]} {largest[1]:.1f} ms" if largest else ""
            add(
                preset,
                prov,
                "overhead <= 1.2x critic FLOP floor",
                r.get("overhead_over_floor"),
                1.2,
                note=note,
            )
            add(preset, prov, "overhead <= 0.6x eager overhead", r.get("overhead_vs_eager"), 0.6, note=note)
            add(preset, prov, "peak memory <= 0.5x eager", r.get("peak_vs_eager"), 0.5)
            add(preset, prov, "largest batch >= 2x eager", r.get("max_batch_vs_eager"), 2.0, at_most=False)
        elif preset == "tiny" and prov == "engine":
            add(preset, prov, "CPU tiny: peak memory <= eager", r.get("peak_vs_eager"), 1.0)
            add(preset, prov, "CPU tiny: step time <= 1.1x eager", r.get("time_vs_eager"), 1.1)
    return goals


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help="comma-separated presets: tiny (CPU default), mid, sd15-llava7b, sana-siglip-qwen2, "
        "janus-pro-1b, janus-pro-7b",
    )
    p.add_argument(
        "--providers",
        default=None,
        help=f"comma-separated, from {','.join(PROVIDERS)} (default: all; on the CPU the compile "
        "providers are skipped unless named here)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument("--steps", type=int, default=MIN_STEPS, help=f"timed steps per provider (>= {MIN_STEPS})")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per provider (default 3 GPU, 2 CPU)"
    )
    p.add_argument(
        "--allow-few-steps",
        action="store_true",
        help=f"allow --steps < {MIN_STEPS} (quick CPU smoke runs; not a measurement)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=None,
        help="profiled steps per provider for the phase breakdown (default 5 GPU, 3 CPU; 0: off)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--caption-len", type=int, default=None, help="caption tokens (default: the preset's)")
    p.add_argument(
        "--engine-checkpoint",
        default=None,
        choices=["none", "layer", "selective", "offload"],
        help="the engine providers' Critic(checkpoint=...) (default: the preset's choice)",
    )
    p.add_argument(
        "--janus-sampling",
        default="cached",
        choices=["cached", "every-step"],
        help="Janus presets: 'cached' samples the 576 image tokens once per batch and times the training "
        "part of the step (the sampling time is reported as sample_ms); 'every-step' samples in "
        "every step (seconds per step on a GPU)",
    )
    p.add_argument(
        "--loss",
        default="caption=1.0",
        help="UNOLoss weights, e.g. 'caption=1.0,density=0.0,structure=0.0' (default caption only)",
    )
    p.add_argument(
        "--max-batch-search",
        type=int,
        default=0,
        metavar="N",
        help="GPU only: find the largest batch before OOM with at most N trials per provider (0: off)",
    )
    p.add_argument("--max-batch-time", type=float, default=90.0, help="seconds per provider for that search")
    p.add_argument("--max-batch-cap", type=int, default=1024, help="largest batch the search tries")
    p.add_argument(
        "--max-batch-providers",
        default=f"{GEN_ONLY},eager,engine",
        help="providers the search runs for (compile providers would recompile per batch size)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="FILE",
        help="a committed results JSON: report each metric against it; exit 1 if any is >10%% worse",
    )
    p.add_argument("--tolerance", type=float, default=0.10, help="--compare: allowed relative slowdown")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="extra tag in the results file names")
    p.add_argument(
        "--quick-ceilings",
        action="store_true",
        help="measure the ceilings on small buffers (cache-sized: a smoke test, not a measurement)",
    )
    p.add_argument(
        "--from-results",
        default=None,
        metavar="FILE",
        help="run nothing: print the tables (and --compare) of an existing results JSON",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads). Default on the CPU: 1, so that timings on a shared or "
        "small machine are not ruined by OpenMP oversubscription; 0 keeps torch's default",
    )
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    args = p.parse_args(argv)

    args.presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    device = torch.device(args.device or harness.default_device())
    if args.providers:
        args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
        bad = [s for s in args.providers if s not in PROVIDERS]
        if bad:
            p.error(f"unknown providers {bad}; choose from {PROVIDERS}")
    else:
        args.providers = list(PROVIDERS)
        if device.type != "cuda":
            args.providers = [s for s in PROVIDERS if "compile" not in s]
            log(
                "note: compile providers (eager+compile, engine+compile) are skipped on the CPU; "
                "name them with --providers to run them"
            )
    if args.steps < MIN_STEPS and not args.allow_few_steps:
        p.error(
            f"--steps {args.steps} < {MIN_STEPS}: the median needs >= {MIN_STEPS} steps "
            "(pass --allow-few-steps for a quick smoke run)"
        )
    if args.steps < 1:
        p.error("--steps must be >= 1")
    cuda = device.type == "cuda"
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    args.profile_steps = args.profile_steps if args.profile_steps is not None else (5 if cuda else 3)
    args.max_batch_providers = {s.strip() for s in args.max_batch_providers.split(",")}
    args.loss_kwargs = {}
    for part in filter(None, (s.strip() for s in args.loss.split(","))):
        k, _, v = part.partition("=")
        args.loss_kwargs[k.strip()] = float(v)
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    t_start = time.perf_counter()
    all_rows, paths = [], []
    if args.from_results:
        data = json.loads(Path(args.from_results).read_text())
        meta, all_rows = data["meta"], data["rows"]
        ceilings = meta.get("ceilings", {"matmul_TFLOPs": math.nan})
        device = torch.device("cuda" if "cpu" not in str(meta.get("device", "cpu")).lower() else "cpu")
        steps = meta.get("steps", "?")
    else:
        from uno_engine.testing.presets import PRESETS

        unknown = [n for n in args.presets if n not in PRESETS]
        if unknown:
            log(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
            return 2
        log("measuring device ceilings (copy bandwidth, matmul rate) ...")
        small = {"copy_bytes": 16 << 20, "matmul_n": 256} if args.quick_ceilings else {}
        ceilings = harness.measure_ceilings(str(device), **small)
        log(
            f"  copy {ceilings['copy_GBps']:.1f} GB/s, matmul {ceilings['matmul_TFLOPs']:.3g} TFLOP/s "
            f"({ceilings['matmul_dtype']})"
        )
        meta = {
            **harness.env_metadata(str(device)),
            "ceilings": ceilings,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "steps": args.steps,
            "warmup": args.warmup,
            "profile_steps": args.profile_steps,
            "providers": args.providers,
            "loss": args.loss_kwargs,
        }
        steps = args.steps
        out_dir = Path(args.out_dir) if args.out_dir else None
        for name in args.presets:
            tag = name + (f"-{args.tag}" if args.tag else "")

            def save(rows, tag=tag):
                meta_p = {
                    **meta,
                    "goals": check_goals(rows, device),
                    "wall_s": round(time.perf_counter() - t_start, 1),
                }
                return harness.write_results("step_throughput", rows, meta_p, out_dir=out_dir, tag=tag)

            try:
                rows = run_preset(name, args, device, ceilings, save=save)
            except Exception as e:  # noqa: BLE001
                log(f"[{name}] failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                rows = [{"preset": name, "provider": "-", "error": f"{type(e).__name__}: {e}"[:500]}]
            all_rows += rows
            paths += save(rows)

    print()
    harness.print_table(
        all_rows,
        TABLE_COLUMNS,
        title=f"step_throughput on {meta['device']} (median of {steps} steps; ms, MB; "
        f"floor = 2 x critic fwd FLOPs at {ceilings['matmul_TFLOPs']:.3g} TFLOP/s)",
    )
    print()
    harness.print_table(
        [r for r in all_rows if r.get("phase_generate_ms") is not None],
        PHASE_COLUMNS,
        title="per-phase ms (profiled steps; overhead_* = forward + backward of that phase)",
    )
    errors = [r for r in all_rows if r.get("error")]
    if errors:
        print()
        for r in errors:
            print(f"ERROR {r['preset']}/{r['provider']}: {r['error']}")
    goals = check_goals(all_rows, device)
    if goals:
        print()
        harness.print_table(
            goals, ["preset", "provider", "goal", "measured", "status", "note"], title="goals"
        )
    print()
    for pth in paths:
        print(f"wrote {os.path.relpath(pth)}")
    print(f"total {time.perf_counter() - t_start:.1f} s")

    rc = 0
    if args.compare:
        cmp_rows, worse = harness.compare_results(
            all_rows, args.compare, keys=("preset", "provider", "batch"), tolerance=args.tolerance
        )
        print()
        if cmp_rows:
            harness.print_table(
                cmp_rows,
                ["preset", "provider", "batch", "metric", "baseline", "current", "ratio", "status"],
                title=f"compared with {args.compare}",
            )
        else:
            print(f"compare: no rows of {args.compare} match this run (preset, provider, batch)")
        if worse:
            print(f"compare: at least one metric is more than {args.tolerance:.0%} worse than {args.compare}")
            rc = 1
    if errors:
        rc = rc or 3  # the other providers' figures are still in the table and the results files
    return rc


if __name__ == "__main__":
    sys.exit(main())
