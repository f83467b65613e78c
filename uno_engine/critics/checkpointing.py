"""Activation checkpointing of a frozen critic that runs in eval mode and needs only input gradients.

Policies (`Critic.from_hf(..., checkpoint=...)`), all non-reentrant (`use_reentrant=False`): reentrant
checkpointing gives no gradients when no input of a region requires grad, and HF's
`gradient_checkpointing_enable()` acts only in train mode, so the layers are wrapped here instead:

- "none": autograd's own saving. With frozen weights it already skips every weight-gradient matmul and does
  not keep the inputs of frozen linears (their backward needs only the weight).
- "layer": `torch.utils.checkpoint.checkpoint` around every vision-encoder layer and every LM decoder layer;
  only each layer's input is kept and the layer is recomputed in the backward (non-reentrant early stop ends
  the recomputation as soon as the tensors the backward needs exist again, so a layer's last projection is
  not redone).
- "selective": the same regions under `create_selective_checkpoint_contexts`: the outputs of the attention
  kernels, of the MLP's wide matmuls (up / gate / fc1) and of the LM's attention output projection (o_proj)
  are saved; pointwise ops and norms are recomputed, and so are the attention input projections (q / k / v)
  and the vision towers' output projections (out_proj / proj / dense). Why not save every matmul output: with
  frozen weights "none" already keeps only what the backward reads (a frozen linear's backward reads no
  activation), so saving every matmul output keeps about 80% of what "none" keeps. Each attention
  projection costs about 8% of a layer's FLOPs and frees one (tokens x hidden) tensor per layer; recomputing
  q / k / v everywhere and the towers' output projections brings the critic to about 58% of "none" at about
  1.12x its FLOPs, while the MLP's wide matmuls (the most FLOPs) run once. Saving the LM's o_proj as well
  (one tensor per LM layer; 0.552x -> 0.585x of "none" on the test critic, under the 0.6 bar) buys back a
  quarter of the LM's recomputed projections: on the CPU mid preset that is what keeps the whole step within
  1.1x of eager. Each layer's last projection (MLP down / fc2) is not saved
  either: no backward in the layer reads its output, and non-reentrant early stop never recomputes it.
  Under torch.compile (`Critic.compile_blocks`) the policy is applied to the traced graph, where the
  projection hooks that mark q / k / v do not run: there it saves every matmul output (about 80% of
  "none"), and recomputes pointwise ops and norms.
- "offload": `torch.autograd.graph.save_on_cpu(pin_memory=True)` around the critic's forward on CUDA; on the
  CPU the activations already live in host memory, so it is the same as "none".
- "auto": one of the above, chosen when the critic is built from what "none" would keep per image, estimated
  from the model's shapes (`ActivationEstimate`): for each stack (vision encoder, LM) layers x tokens x
  hidden x `SAVED_PER_TOKEN` (16: what a frozen pre-norm layer keeps per token in units of its hidden size:
  the norms' inputs (the fp32 upcast counted), q / k / v and the attention output, and the MLP's two or
  three intermediate tensors of 2.7-4x hidden) x the element size. Tokens: the image's patch tokens in the
  vision encoder; its image tokens plus `NOMINAL_CAPTION_TOKENS` (64) caption tokens in the LM. Then
  "none" below `AUTO_SELECTIVE_BYTES` (64 MiB per image: a batch of 8 keeps < 0.5 GiB; recomputing would
  only add FLOPs and host time, which is all a small critic's step is made of), "selective" up to
  `AUTO_LAYER_BYTES` (1 GiB per image: about 58% of "none" for about 1.12x the critic's FLOPs), "layer"
  above it (only layer inputs kept: a 7B critic's 2.5 GB per image becomes about 0.2 GB). The decision and
  its figures are logged once per distinct reason (logger "uno_engine"), kept as `critic.checkpoint_reason`,
  and listed by `python -m uno_engine.info` (`auto_decisions()`).

The layer wrappers act only while a critic's forward runs (`CheckpointState.activate`), by that critic's
policy: a model shared with a generator (Janus) is checkpointed only on the critic's path, and several critics
with different policies can wrap the same HF model (benchmarks compare them on the same weights). The module
tree and state_dict keys are unchanged (the wrapper is an instance attribute `forward`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from uno_engine.critics.trim import bind

CHECKPOINT_POLICIES = ("none", "layer", "selective", "offload")
CHECKPOINT_CHOICES = (*CHECKPOINT_POLICIES, "auto")  # what Critic.from_hf(checkpoint=...) takes
SAVED_PER_TOKEN = 16  # hidden-sized tensors a frozen layer keeps per token under "none" (see the docstring)
NOMINAL_CAPTION_TOKENS = 64  # caption tokens the "auto" estimate counts in the LM
AUTO_SELECTIVE_BYTES = 64 << 20  # "auto": "selective" from this many activation bytes per image ...
AUTO_LAYER_BYTES = 1 << 30  # ... and "layer" from this many
# linears (by attribute name) whose matmul outputs "selective" recomputes rather than saves
RECOMPUTED_PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv",
    "query",
    "key",
    "value",  # attention input projections
    "out_proj",
    "proj",
    "projection_layer",
    "dense",  # attention output projections
    "down_proj",
    "fc2",  # the layer's last projection (never recomputed: early stop)
)

_aten = torch.ops.aten
_MATMUL_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}
_ATTENTION_OPS = {
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
}


def check_policy(checkpoint: str, *, allow_auto: bool = False) -> str:
    choices = CHECKPOINT_CHOICES if allow_auto else CHECKPOINT_POLICIES
    if checkpoint not in choices:
        raise ValueError(f"checkpoint must be one of {choices}, got {checkpoint!r}")
    return checkpoint


# ----------------------------------------------------------------------------------------- checkpoint="auto"
@dataclass(frozen=True)
class ActivationEstimate:
    """What checkpoint="none" keeps for one image: `stacks` are (name, layers, tokens, hidden) of the
    vision encoder and the LM; bytes = sum(layers x tokens x hidden) x SAVED_PER_TOKEN x element_size."""

    stacks: tuple[tuple[str, int, int, int], ...]
    element_size: int

    @property
    def bytes_per_image(self) -> int:
        return sum(n * t * h for _, n, t, h in self.stacks) * SAVED_PER_TOKEN * self.element_size

    def describe(self) -> str:
        parts = ", ".join(f"{name} {n} layers x {t} tokens x {h}" for name, n, t, h in self.stacks)
        return f"{self.bytes_per_image / 2**20:.1f} MiB per image ({parts}, x {SAVED_PER_TOKEN} x {self.element_size} B)"


def choose_auto_policy(estimate: ActivationEstimate) -> tuple[str, str]:
    """checkpoint="auto" -> (policy, reason), by the thresholds in the module docstring."""
    b = estimate.bytes_per_image
    if b < AUTO_SELECTIVE_BYTES:
        policy, why = "none", f"< {AUTO_SELECTIVE_BYTES >> 20} MiB: recomputation would only cost time"
    elif b < AUTO_LAYER_BYTES:
        policy, why = "selective", f">= {AUTO_SELECTIVE_BYTES >> 20} MiB and < {AUTO_LAYER_BYTES >> 20} MiB"
    else:
        policy, why = "layer", f">= {AUTO_LAYER_BYTES >> 20} MiB"
    return policy, f'{policy}, as "none" would keep about {estimate.describe()}; {why}'


_AUTO_DECISIONS: dict[str, str] = {}  # reason -> critic description, in the order first seen
_log = logging.getLogger("uno_engine")


def record_auto_decision(what: str, reason: str) -> None:
    """Log a checkpoint="auto" decision once per distinct reason, and keep it for `auto_decisions()`."""
    if reason not in _AUTO_DECISIONS:
        _AUTO_DECISIONS[reason] = what
        _log.info("checkpoint='auto' for %s: %s", what, reason)


def auto_decisions() -> list[str]:
    """The checkpoint="auto" decisions made in this process ("<critic>: <reason>")."""
    return [f"{what}: {reason}" for reason, what in _AUTO_DECISIONS.items()]


def auto_rule() -> str:
    """The checkpoint="auto" rule in one line (for `python -m uno_engine.info`)."""
    return (
        f'"none" below {AUTO_SELECTIVE_BYTES >> 20} MiB of activations per image, "selective" below '
        f'{AUTO_LAYER_BYTES >> 20} MiB, else "layer"; estimate = layers x tokens x hidden x {SAVED_PER_TOKEN} x '
        f"element size, vision + LM ({NOMINAL_CAPTION_TOKENS} caption tokens)"
    )


def _is_attention_op(func) -> bool:
    if func in _ATTENTION_OPS:
        return True
    name = str(getattr(func, "_schema", func)).split("(")[0]
    # custom attention ops of flash-attn and xformers (flash_attn::_flash_attn_forward, xformers::...)
    return ("flash_attn" in name or "xformers" in name) and "backward" not in name and "bwd" not in name


_ACTIVE: list[CheckpointState] = []  # the critic pass running now (innermost last)


class CheckpointState:
    """One critic's policy. The layer wrappers are shared by every critic built on the same HF model and act
    according to the critic whose forward is running (`activate`); outside any critic pass (e.g. a Janus
    generator running the shared LM) they call the layer unchanged."""

    def __init__(self, policy: str):
        self.policy = check_policy(policy)
        self._in_skip = 0
        # a functools.partial of a plain function: what torch.compile accepts as a checkpoint context_fn
        self.context_fn = functools.partial(_selective_contexts, self)

    @contextlib.contextmanager
    def activate(self):
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.pop()

    @property
    def active(self) -> bool:
        return self in _ACTIVE

    def sac_policy(self, ctx, func, *args, **kwargs):
        """The "selective" policy: save attention kernels and matmuls, except those of the recomputed
        projections; recompute the rest."""
        if func in _MATMUL_OPS:
            return CheckpointPolicy.PREFER_RECOMPUTE if self._in_skip else CheckpointPolicy.MUST_SAVE
        if _is_attention_op(func):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts(state: CheckpointState):
    return create_selective_checkpoint_contexts(state.sac_policy)


# the state of the checkpointed layer running now: set by the layer wrapper around the function it
# checkpoints, so it is set both in the forward and when the backward recomputes the layer (the critic's
# `activate` scope has exited by then). The "selective" policy must decide the same for every op in both
# runs, or the recomputation replays the wrong saved tensors.
_IN_LAYER: list[CheckpointState] = []


def _current() -> CheckpointState | None:
    if _IN_LAYER:
        return _IN_LAYER[-1]
    return _ACTIVE[-1] if _ACTIVE else None


def _scoped(st: CheckpointState, fn):
    def run(*args, **kwargs):
        # the projection counter starts at 0 in each run of the layer: a recomputation ended early (non-
        # reentrant early stop raises out of a projection's forward) leaves no count behind
        _IN_LAYER.append(st)
        saved, st._in_skip = st._in_skip, 0
        try:
            return fn(*args, **kwargs)
        finally:
            st._in_skip = saved
            _IN_LAYER.pop()

    return run


# The projection hooks count only in eager code. Under torch.compile a checkpointed layer is one higher-order
# op whose selective policy is applied to the traced graph, where these counts are never read; and torch 2.11
# refuses any mutation of outside state inside the checkpoint op ("HOP: Unsafe side effect").
def _enter_recomputed(module, args):
    if torch.compiler.is_compiling():
        return
    st = _current()
    if st is not None:
        st._in_skip += 1


def _exit_recomputed(module, args, output):
    if torch.compiler.is_compiling():
        return
    st = _current()
    if st is not None:
        st._in_skip -= 1


def wrap_layers(layers: Iterable[nn.Module], recomputed: Iterable[nn.Module] = ()) -> int:
    """Install the checkpoint wrapper on each module of `layers` (an instance attribute `forward`).
    Idempotent.
    `recomputed`: linears whose matmul outputs "selective" recomputes instead of saving.
    Returns the number of newly wrapped layers."""
    n = 0
    for layer in layers:
        if "_uno_inner" in layer.__dict__:  # already wrapped (by another critic on the same model)
            continue
        layer._uno_inner = layer.forward  # the class forward, bound

        def forward(*args, __layer=layer, **kwargs):
            inner = __layer.__dict__["_uno_inner"]
            st = _ACTIVE[-1] if _ACTIVE else None
            if st is None or not torch.is_grad_enabled() or st.policy not in ("layer", "selective"):
                return inner(*args, **kwargs)
            # eager: the recomputation must see the state of this run (the reading rows of `trim`; the
            # selective policy's projection counter); a compiled layer is one higher-order op whose policy is
            # applied to the traced graph (no Python replay; trimming is off under compile)
            compiling = torch.compiler.is_compiling()
            fn = inner if compiling else bind(inner)
            if st.policy == "selective":
                fn = fn if compiling else _scoped(st, fn)
                return checkpoint(fn, *args, use_reentrant=False, context_fn=st.context_fn, **kwargs)
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        n += 1
    for proj in recomputed:
        if "_uno_recomputed" not in proj.__dict__:
            proj._uno_recomputed = True
            proj.register_forward_pre_hook(_enter_recomputed)
            proj.register_forward_hook(_exit_recomputed)
    return n


def offload_context(policy: str, device: torch.device):
    """The context the critic's forward runs in: save_on_cpu for "offload" on CUDA, else nothing."""
    if policy == "offload" and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def compile_layers(layers: Iterable[nn.Module], **compile_kwargs) -> int:
    """torch.compile each layer's forward, its checkpoint wrapper included (Dynamo traces a non-reentrant
    checkpoint, selective context included, as one higher-order op). The layer's own forward hooks
    (transformers' hidden-state capture) stay outside the compiled function."""
    _make_output_capture_traceable()
    n = 0
    for layer in layers:
        if "_uno_compiled" not in layer.__dict__:
            layer.forward = _tolerate_kernel_context(torch.compile(layer.forward, **compile_kwargs))
            layer._uno_compiled = True
        n += 1
    return n


def _tolerate_kernel_context(compiled):
    """Run (and so trace) a compiled layer with Dynamo's `skip_fwd_side_effects_in_bwd_under_checkpoint`, scoped
    to the call. Why: with the Hugging Face `kernels` library installed (transformers >= 5.25 depends on it),
    hub-kernel layers (attention) set and reset a ContextVar around their forward; inside a checkpointed,
    compiled layer Dynamo refuses that mutation (a graph break, an error under fullgraph=True) because the
    backward's recomputation would not replay it. The variable only picks which kernel functions run, and is
    reset before the layer returns, so not replaying it changes nothing the recomputation computes
    (tests/test_checkpointing.py compares gradients with the uncompiled critic). Torch without the setting:
    the compiled layer as it is."""
    cfg = torch._dynamo.config
    if not hasattr(cfg, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return compiled

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        with cfg.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(*args, **kwargs)

    return forward


class _TraceableCollector:
    """transformers' output-capturing hooks read a ContextVar, which Dynamo cannot trace (a graph break inside
    every compiled layer). This stand-in delegates to it in eager code and answers "nothing to capture" inside
    compiled code: hooks of modules *inside* a compiled layer (per-attention outputs) do not capture; the
    layers' own hooks (hidden states) run outside the compiled function and still do."""

    def __init__(self, inner):
        self._inner = inner

    def get(self):
        if torch.compiler.is_compiling():
            return None
        return self._inner.get()

    def set(self, value):
        return self._inner.set(value)

    def reset(self, token):
        return self._inner.reset(token)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _make_output_capture_traceable():
    try:
        from transformers.utils import output_capturing as oc
    except ImportError:  # layouts without output capturing hooks
        return
    collector = getattr(oc, "_active_collector", None)
    if collector is not None and not isinstance(collector, _TraceableCollector):
        oc._active_collector = _TraceableCollector(collector)
