"""The training-step benchmark behind `benchmarks/step_throughput.py` (the script is its command line).

Providers
---------
A provider is one way to build the UNO training step that is timed beside the generation-only step of the same
generator on the same batch. Each is a function `(preset, loss) -> UNOStep` registered with `@provider(...)`;
the order of registration is the order of the rows. Adding one (e.g. a critic that reads the generator's
latents) is a few lines here, nothing else:

    @provider("latent", doc="the critic reads the generator's latents (Critic.attach_latent_adapter)")
    def _latent(preset, loss):
        critic = preset.make_critic("auto", cache=False)   # its own Critic: the others' stay unchanged
        critic.attach_latent_adapter(...)
        return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto"))

It then runs with `--providers ...,latent` (and by default on the device types in `default_on`); its row gets
every figure (time, images/s, overhead, phases, peak, ratios to eager, goals where defined). The step must
return a `UNOOutput` from `step(batch)` and have `.config` (`profile` is switched on for the phase breakdown)
and `.critic` (its resolved `checkpoint_policy` goes into the row). A provider that compiles the preset's
shared layers in place must say `compiles=True`: it is then timed in a group of its own, after the others.

What one preset's run measures (`run_preset`), side by side in one process:
  - the median time of a training step (step(batch).loss.backward()) over >= 20 rounds after warm-up, the
    providers and the generation-only step taking turns (harness.time_interleaved), and images/s;
  - the peak memory of one step above the level before it (uno_engine.memory.track_peak_memory);
  - the understanding overhead: step time - the generation-only step's time (forward,
    images.float().square().mean(), backward), in ms and %, and per phase from UNOConfig(profile=True) steps;
  - the critic's FLOP floor: 2 x the FLOPs of one critic forward (torch.utils.flop_counter) at the matmul
    rate harness.measure_ceilings() measured in the same run, and overhead / floor;
  - optionally (GPU) the largest batch before out-of-memory (harness.largest_batch).
`save(rows)` is called whenever a set of figures is complete, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import harness
import torch

GEN_ONLY = "generation-only"
PHASES = ("generate", "bridge", "critic", "loss", "loss_bwd", "critic_bwd", "bridge_bwd", "generator_bwd")
TABLE_COLUMNS = [
    "preset",
    "provider",
    "checkpoint",
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
GOAL_COLUMNS = ["preset", "provider", "goal", "measured", "status", "note"]
# CPU goals of the engine provider: (step time / eager, peak memory / eager), both at most
CPU_GOALS = {"tiny": (1.1, 1.0), "tiny-janus": (1.1, 1.0), "mid": (1.1, 0.6)}


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ providers
@dataclass(frozen=True)
class Provider:
    """name: the row's `provider`. build(preset, loss) -> UNOStep. compiles: compiles the preset's shared
    layers in place (timed in a group of its own). default_on: device types it runs on when --providers is
    not given. doc: one line for --help."""

    name: str
    build: Callable
    compiles: bool = False
    default_on: tuple[str, ...] = ("cpu", "cuda")
    doc: str = ""


PROVIDERS: dict[str, Provider] = {}


def provider(name: str, *, compiles: bool = False, default_on=("cpu", "cuda"), doc: str = ""):
    """Register `build(preset, loss) -> UNOStep` as the provider `name` (see the module docstring)."""

    def register(build):
        if name in PROVIDERS or name == GEN_ONLY:
            raise ValueError(f"provider {name!r} is already registered")
        PROVIDERS[name] = Provider(name, build, compiles, tuple(default_on), doc)
        return build

    return register


def default_providers(device_type: str) -> list[str]:
    return [p.name for p in PROVIDERS.values() if device_type in p.default_on]


@provider(
    "eager",
    doc='UNOConfig(backend="reference"), Critic(checkpoint="none", trim=False): what users write by hand; '
    "the default reading (one jittered view, ReadAugment.default()), as engine, so the two stay comparable",
)
def _eager(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    critic = preset.make_critic("none", trim=False)
    return UNOStep(preset.generator, critic, loss, UNOConfig(backend="reference"))


@provider(
    "eager+compile",
    compiles=True,
    default_on=("cuda",),
    doc="eager, with the critic, its image preprocessing and the loss under torch.compile",
)
def _eager_compile(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    # the reference path under torch.compile: its own Critic wrapper (the eager provider's stays eager)
    critic = preset.make_critic("none", cache=False)
    critic.compile()
    critic.prepare = torch.compile(critic.prepare)
    loss.compile()
    return UNOStep(preset.generator, critic, loss, UNOConfig(backend="reference"))


@provider(
    "engine",
    doc='UNOConfig(backend="auto"), Critic(checkpoint=<the preset\'s choice, e.g. "auto">); the default '
    "reading (one jittered view, ReadAugment.default()), as eager",
)
def _engine(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    return UNOStep(
        preset.generator, preset.make_critic(preset.engine_checkpoint), loss, UNOConfig(backend="auto")
    )


@provider(
    "engine+compile",
    compiles=True,
    default_on=("cuda",),
    doc="the engine with UNOConfig(compile=True): the critic compiled block by block",
)
def _engine_compile(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    # the engine's own critic: its checkpoint wrappers are on the shared layers (a second critic of the
    # same policy would find them taken); compile_blocks then compiles those layers in place
    critic = preset.make_critic(preset.engine_checkpoint)
    return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto", compile=True))


@provider(
    "engine-template",
    default_on=(),
    doc="the engine reading in the critic's chat template (Critic.from_hf(..., instruction=)): the same "
    "captions after a longer prefix (system turn, user turn with the image and the instruction, generation "
    "prompt)",
)
def _engine_template(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    # its own Critic (cache=False): a second critic of the same checkpoint policy wraps the shared layers anew
    critic = preset.make_critic(preset.engine_checkpoint, cache=False, instruction=TEMPLATE_INSTRUCTION)
    return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto"))


TEMPLATE_INSTRUCTION = "describe this image ."


READ_AUGMENT = dict(shift=3.0, scale=(0.9, 1.1), noise=0.1)  # the views of the engine+readK providers


@provider(
    "engine+plain",
    default_on=(),
    doc="the engine with UNOConfig(read=None): the processor's exact read, no views (what the default "
    "reading costs over it)",
)
def _engine_plain(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    critic = preset.make_critic(preset.engine_checkpoint)
    return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto", read=None))

for _k in (1, 2, 4, 8):

    @provider(
        f"engine+read{_k}",
        default_on=(),
        doc=f"the engine with UNOConfig(read=ReadAugment(views={_k}, shift=3, scale=(0.9, 1.1), noise=0.1)): "
        f"the critic reads {_k} random view(s) of each image in one batch",
    )
    def _engine_read(preset, loss, _k=_k):
        from uno_engine import ReadAugment, UNOConfig, UNOStep

        read = ReadAugment(views=_k, **READ_AUGMENT)
        critic = preset.make_critic(preset.engine_checkpoint)
        return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto", read=read))


def _latent_step(preset, pool: int, loss):
    from uno_engine import UNOConfig, UNOStep

    # its own Critic: the adapter attached below is its own
    critic = preset.make_critic(preset.engine_checkpoint, cache=False)
    if not hasattr(preset.generator, "model"):  # a diffusion generator: read through a LatentAdapter
        from uno_engine.latent import LatentAdapter

        adapter = LatentAdapter.for_pair(critic, preset.generator, pool=pool)
        critic.attach_latent_adapter(adapter.to(preset.device, preset.dtype))
    elif pool != 1:
        raise ValueError(
            "a pooled latent view needs a LatentAdapter (a diffusion generator), not Janus tokens"
        )
    return UNOStep(preset.generator, critic, loss, UNOConfig(backend="auto", view="latent"))


@provider(
    "latent",
    default_on=(),
    doc='UNOConfig(view="latent"): the critic reads the generator\'s latents (Janus: tokens through the '
    "generation embedding; diffusion: an attached LatentAdapter, unfitted: its cost does not depend on its "
    "weights); no decode, no vision tower",
)
def _latent(preset, loss):
    return _latent_step(preset, 1, loss)


for _pool in (2, 4):

    @provider(
        f"latent-pool{_pool}",
        default_on=(),
        doc=f"the latent view with LatentAdapter(pool={_pool}): the LM reads {_pool * _pool}x fewer image tokens "
        "(diffusion generators only)",
    )
    def _latent_pooled(preset, loss, _pool=_pool):
        return _latent_step(preset, _pool, loss)


def _representation_step(preset, loss, source: str):
    from uno_engine import UNOConfig, UNOStep
    from uno_engine.representation import attach_representation

    gen, batch = preset.generator, preset.make_batch()
    if not hasattr(gen, "attach_representation"):
        raise ValueError(f"the representation view needs a diffusion generator, not {type(gen).__name__}")
    critic = preset.make_critic(preset.engine_checkpoint, cache=False)
    block = "mid_block" if hasattr(gen.denoiser, "mid_block") else "transformer_blocks.0"
    # the head is the generator's submodule (one for both providers; the pixel-view steps never call it); its
    # source "auto": x_t from the batch's reference latents where it has them, else from the generator's sample
    if gen.representation is None:
        attach_representation(critic, gen, batch, block=block)
    step = UNOStep(gen, critic, loss, UNOConfig(backend="auto", view="representation"))
    if source == "sample":
        return step
    h, w = gen.latent_size
    g = torch.Generator("cpu").manual_seed(0)
    ref = torch.randn(preset.batch_size, gen.latent_channels, h, w, generator=g).to(preset.device)
    forward = step.forward
    step.forward = lambda b: forward({**b, "reference_latents": ref})  # a real image's latents in the batch
    return step


@provider(
    "representation",
    default_on=(),
    doc='UNOConfig(view="representation"), a prompt with a real image: one denoiser call with grad at x_t '
    "noised from it, its mid-block read by the critic's LM through the generator's RepresentationHead",
)
def _representation(preset, loss):
    return _representation_step(preset, loss, "reference")


@provider(
    "representation-sample",
    default_on=(),
    doc="the representation view for a prompt without an image: the generator's own no-grad sample "
    "(num_inference_steps calls), re-noised, then the one grad call",
)
def _representation_sample(preset, loss):
    return _representation_step(preset, loss, "sample")


# ------------------------------------------------------------------------------------------- step callables
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


# --------------------------------------------------------------------------------------------- one preset
@dataclass
class Options:
    """What one run measures (the command line's choices; see step_throughput.py --help)."""

    providers: list[str]
    steps: int = 20
    warmup: int = 2
    profile_steps: int = 3
    batch_size: int | None = None
    caption_len: int | None = None
    dtype: str | None = None
    engine_checkpoint: str | None = None
    janus_sampling: str = "cached"
    loss_kwargs: dict | None = None
    max_batch_search: int = 0
    max_batch_time: float = 90.0
    max_batch_cap: int = 1024
    max_batch_providers: frozenset = frozenset({GEN_ONLY, "eager", "engine"})
    verbose: bool = False


class PresetRun:
    """The providers of one preset, measured side by side (see `run`)."""

    def __init__(self, name: str, opts: Options, device: torch.device, ceilings: dict, save=None):
        from uno_engine.testing.presets import build_preset

        self.name, self.opts, self.device, self.ceilings, self.save = name, opts, device, ceilings, save
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.preset = build_preset(
            name,
            device=device,
            dtype=getattr(torch, opts.dtype) if opts.dtype else None,
            batch_size=opts.batch_size,
            caption_len=opts.caption_len,
            janus_sampling=opts.janus_sampling,
            engine_checkpoint=opts.engine_checkpoint,
        )
        build_s = time.perf_counter() - t0
        p = self.preset
        log(
            f"[{name}] built in {build_s:.1f} s: {p.spec.description}; batch {p.batch_size}, "
            f"caption {p.caption_len} tokens, {p.dtype}"
        )
        self.batch = p.make_batch()
        self.gen_params = p.generator_parameters()
        self.losses: dict[str, torch.nn.Module] = {}
        self.base = {
            "preset": name,
            "device": harness.device_name(device),
            "dtype": str(p.dtype).replace("torch.", ""),
            "batch": p.batch_size,
            "caption_len": p.caption_len,
            "build_s": round(build_s, 2),
        }
        if p.spec.generator == "janus":
            self.base["janus_sampling"] = opts.janus_sampling
        self.rows: dict[str, dict] = {GEN_ONLY: {**self.base, "provider": GEN_ONLY, "checkpoint": None}}
        self.gen_fn = generation_only_step(p.generator, self.batch)
        self.flops = self.floor_ms = None

    def drop_grads(self, *_):
        for p in self.gen_params:
            p.grad = None
        for loss in self.losses.values():
            for p in loss.parameters():
                p.grad = None

    def checkpoint(self):
        """Finish the figures measured so far and hand them to `save`."""
        sample_ms = getattr(self.preset.generator, "sample_ms", None)
        if sample_ms is not None:
            for r in self.rows.values():  # the first (sampling) forward, outside the timing
                r["sample_ms"] = sample_ms
        finish_rows(self.rows, self.flops, self.floor_ms, self.ceilings)
        if self.save is not None:
            self.save(list(self.rows.values()))

    def run(self) -> list[dict]:
        # FLOP floor of the critic (eager critic; does not depend on the provider)
        try:
            self.flops = critic_forward_flops(self.preset, self.preset.make_critic("none"), self.batch)
            self.floor_ms = 2 * self.flops / (self.ceilings["matmul_TFLOPs"] * 1e12) * 1e3
        except Exception as e:  # noqa: BLE001
            log(f"[{self.name}] FLOP count failed: {type(e).__name__}: {e}")
        # Providers that do not compile are timed together first, then each compiling provider in a group
        # of its own: compile_blocks compiles the HF layers in place, which changes the other providers'
        # critic (and for Janus the generator, which shares the LM). Every group times the generation-only
        # step beside it, and a provider's overhead is taken against the generation-only time of its group.
        provs = self.opts.providers
        groups = [[p for p in provs if not PROVIDERS[p].compiles]] + [
            [p] for p in provs if PROVIDERS[p].compiles
        ]
        for gi, group in enumerate(g for g in groups if g):
            self.run_group(group, first=gi == 0)
        self.checkpoint()
        harness.free_device_memory(str(self.device))
        return list(self.rows.values())

    def build_steps(self, group: list[str]) -> tuple[dict, dict]:
        """Build each provider's step and run it once (compile / autotune / lazy init). A provider that
        fails keeps its error in its row; the others go on."""
        steps, fns = {}, {}
        for prov in group:
            row = self.rows[prov] = {**self.base, "provider": prov, "checkpoint": None}
            try:
                self.losses[prov] = self.preset.make_loss(**(self.opts.loss_kwargs or {}))
                steps[prov] = PROVIDERS[prov].build(self.preset, self.losses[prov])
                row["checkpoint"] = getattr(getattr(steps[prov], "critic", None), "checkpoint_policy", None)
                fn = uno_train_step(steps[prov], self.batch)
                t = time.perf_counter()
                self.drop_grads()
                fn()
                self.drop_grads()
                row["first_step_s"] = round(time.perf_counter() - t, 2)
                fns[prov] = fn
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"[{self.name}] provider {prov} failed: {row['error']}")
                if self.opts.verbose:
                    traceback.print_exc()
                steps.pop(prov, None)
                self.drop_grads()
                harness.free_device_memory(str(self.device))
        return steps, fns

    def run_group(self, group: list[str], *, first: bool):
        steps, fns = self.build_steps(group)
        if not fns:
            return
        timed = {GEN_ONLY: self.gen_fn, **fns}
        res = harness.time_interleaved(
            timed,
            steps=self.opts.steps,
            warmup=self.opts.warmup,
            device=str(self.device),
            before=self.drop_grads,
            desc=f"{self.name}: {' | '.join(timed)}",
        )
        gen_res = res.pop(GEN_ONLY)
        keys = ("median_ms", "p20_ms", "p80_ms")
        if first:
            self.rows[GEN_ONLY].update({k: gen_res[k] for k in keys}, steps=gen_res["n"])
        for prov, r in res.items():
            self.rows[prov].update({k: r[k] for k in keys}, steps=r["n"], gen_only_ms=gen_res["median_ms"])
        if self.opts.profile_steps > 0:
            self.profile(steps, fns, first=first)
        # peak memory of one step (untimed: the CPU tracker slows the step down)
        for prov, fn in timed.items() if first else fns.items():
            try:
                self.rows[prov]["peak_MB"] = measure_peak_mb(fn, self.device, self.drop_grads)
            except Exception as e:  # noqa: BLE001
                log(f"[{self.name}] memory of {prov} failed: {type(e).__name__}: {e}")
        self.checkpoint()
        # largest batch before OOM (GPU only; the plain providers, before any compile changes the layers)
        if first and self.opts.max_batch_search > 0 and self.device.type == "cuda":
            self.search_max_batches(steps)

    def profile(self, steps: dict, fns: dict, *, first: bool):
        """Per-phase breakdown (separate profiled steps: profiling adds a sync per step)."""
        n = self.opts.profile_steps
        if first:
            ph = profile_generation_only(self.preset.generator, self.batch, self.device, n, self.drop_grads)
            self.rows[GEN_ONLY].update({f"phase_{k}_ms": v for k, v in ph.items()})
        for prov, step in steps.items():
            try:
                ph = profile_phases(step, fns[prov], self.device, n, self.drop_grads)
                self.rows[prov].update({f"phase_{k}_ms": v for k, v in ph.items()})
            except Exception as e:  # noqa: BLE001
                log(f"[{self.name}] profiling {prov} failed: {type(e).__name__}: {e}")

    def search_max_batches(self, steps: dict):
        preset, opts = self.preset, self.opts
        for prov in [GEN_ONLY, *steps]:
            if prov not in opts.max_batch_providers:
                continue

            def try_batch(b, prov=prov):
                batch = preset.make_batch(b, presampled=True)
                self.drop_grads()
                try:
                    if prov == GEN_ONLY:
                        generation_only_step(preset.generator, batch)()
                    else:
                        uno_train_step(steps[prov], batch)()
                finally:
                    self.drop_grads()

            try:
                mb = harness.largest_batch(
                    try_batch,
                    start=preset.batch_size,
                    max_trials=opts.max_batch_search,
                    cap=opts.max_batch_cap,
                    time_budget_s=opts.max_batch_time,
                    device=str(self.device),
                )
                self.rows[prov].update(
                    max_batch=mb["max_batch"],
                    max_batch_first_oom=mb["first_oom"],
                    max_batch_exact=mb["exact"],
                    max_batch_trials=len(mb["trials"]),
                )
                log(
                    f"[{self.name}] {prov}: largest batch {mb['max_batch']} (first OOM {mb['first_oom']}; "
                    f"trials {mb['trials']})"
                )
            except Exception as e:  # noqa: BLE001
                log(f"[{self.name}] max-batch search of {prov} failed: {type(e).__name__}: {e}")
            self.checkpoint()


def run_preset(name: str, opts: Options, device: torch.device, ceilings: dict, save=None) -> list[dict]:
    """All providers of one preset (see `PresetRun`); the rows of the results file."""
    return PresetRun(name, opts, device, ceilings, save).run()


# ----------------------------------------------------------------------------------------- derived figures
def finish_rows(rows: dict[str, dict], flops, floor_ms, ceilings):
    """Throughput, overhead (against the generation-only step of the provider's own group), overhead per
    phase, overhead / FLOP floor and the ratios to the eager provider."""
    gen_ms = rows[GEN_ONLY].get("median_ms")
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


def check_goals(rows: list[dict], device: torch.device) -> list[dict]:
    """The goals, each with its measured figure (never hidden when missed): on a GPU for every engine
    provider, on the CPU for the engine provider of the presets in CPU_GOALS."""
    goals = []

    def add(preset, prov, goal, value, limit, *, at_most=True, note=""):
        if value is None:
            status = "n/a"
        else:
            status = "met" if (value <= limit if at_most else value >= limit) else "MISSED"
        measured = None if value is None else round(value, 3)
        goals.append(
            {
                "preset": preset,
                "provider": prov,
                "goal": goal,
                "status": status,
                "note": note,
                "measured": measured,
            }
        )

    for r in rows:
        preset, prov = r["preset"], r["provider"]
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
        elif preset in CPU_GOALS and prov == "engine":
            t_max, peak_max = CPU_GOALS[preset]
            add(preset, prov, f"CPU: step time <= {t_max:g}x eager", r.get("time_vs_eager"), t_max)
            add(preset, prov, f"CPU: peak memory <= {peak_max:g}x eager", r.get("peak_vs_eager"), peak_max)
    return goals


def print_report(rows: list[dict], goals: list[dict], *, device_name: str, steps, matmul_tflops: float):
    """The tables on stdout: figures, per-phase ms, errors, goals."""
    print()
    harness.print_table(
        rows,
        TABLE_COLUMNS,
        title=f"step_throughput on {device_name} (median of {steps} steps; ms, MB; "
        f"floor = 2 x critic fwd FLOPs at {matmul_tflops:.3g} TFLOP/s)",
    )
    print()
    harness.print_table(
        [r for r in rows if r.get("phase_generate_ms") is not None],
        PHASE_COLUMNS,
        title="per-phase ms (profiled steps; overhead_* = forward + backward of that phase)",
    )
    errors = [r for r in rows if r.get("error")]
    if errors:
        print()
        for r in errors:
            print(f"ERROR {r['preset']}/{r['provider']}: {r['error']}")
    if goals:
        print()
        harness.print_table(goals, GOAL_COLUMNS, title="goals")
