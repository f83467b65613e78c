"""Checkpoint policies of a frozen critic: equal gradients, memory ratios, input-gradient-only
backward, layer-wise torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from uno_engine.critics import CHECKPOINT_POLICIES, Critic
from uno_engine.critics import checkpointing as ckpt
from uno_engine.memory import track_peak_memory
from uno_engine.testing.presets.critics import (
    build_critic_model,
    clip_processor,
    clip_vision_config,
    llama_config,
    llava_config,
    random_init,
)


def _small_llava():
    """The mid preset's structure (CLIP tower, 8 + 8 layers, 64 image tokens) at a size the CPU tests
    afford."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(
        clip_vision_config(64, 8, 4, 256, 112, 14),
        llama_config(96, 8, 4, 256, 500),
        image_token_id=499,
        feature_layer=-2,
        strategy="default",
    )
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).eval()
    random_init(model, 0)
    return model, clip_processor(112)


def _critic_pass(critic, images, caps, mask=None):
    inputs = critic.prepare(images, backend="torch")
    out = critic(inputs, caps, mask)
    loss = out.caption_hidden.square().mean() + out.patch_features.square().mean()
    loss.backward()


def test_memory_ratios_and_equal_gradients():
    """layer <= 40% and selective <= 60% of "none" (understanding peak above the level before the critic);
    the generator-side gradient is the same for every policy (<= 1e-6 relative, fp32)."""
    torch.manual_seed(0)
    model, processor = _small_llava()
    caps = torch.randint(0, 400, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    images0 = torch.rand(2, 3, 112, 112) * 2 - 1
    peaks, grads = {}, {}
    # one HF model, one critic per policy: the layer wrappers follow the critic that runs
    critics = {policy: Critic.from_hf(model, processor, checkpoint=policy) for policy in CHECKPOINT_POLICIES}
    for policy in CHECKPOINT_POLICIES + ("none",):
        images = images0.clone().requires_grad_(True)
        with track_peak_memory("cpu") as mem:
            _critic_pass(critics[policy], images, caps, mask)
        peaks[policy], grads[policy] = mem.peak_bytes, images.grad
    for policy in CHECKPOINT_POLICIES:
        rel = ((grads[policy] - grads["none"]).norm() / grads["none"].norm()).item()
        assert rel <= 1e-6, f"{policy}: generator-side gradient differs from 'none' by {rel:.3g} (relative)"
    ratios = {p: peaks[p] / peaks["none"] for p in peaks}
    assert ratios["layer"] <= 0.40, ratios
    assert ratios["selective"] <= 0.60, ratios
    assert ratios["offload"] <= 1.0 + 1e-9, ratios  # on the CPU offload is "none"


def test_fused_patch_embed_under_every_policy():
    """Fused bridge patch tokens give the unfused "none" gradient under every checkpoint policy (the stand-in
    patch embedding runs outside the checkpointed layers, once per forward)."""
    model, processor = build_critic_model("tiny-llava-clip")
    caps = torch.randint(0, 100, (2, 6))
    images0 = torch.rand(2, 3, 40, 56) * 2 - 1
    grads = {}
    for policy in CHECKPOINT_POLICIES:
        critic = Critic.from_hf(model, processor, checkpoint=policy)
        for fuse in (False, True):
            images = images0.clone().requires_grad_(True)
            out = critic(critic.prepare(images, backend="torch", fuse_patch_embed=fuse), caps)
            (out.caption_hidden.square().mean() + out.patch_features.square().mean()).backward()
            grads[policy, fuse] = images.grad
    ref = grads["none", False]
    for key, g in grads.items():
        rel = ((g - ref).norm() / ref.norm()).item()
        assert rel <= 1e-6, f"{key}: gradient differs from unfused 'none' by {rel:.3g} (relative)"


class _ForwardMatmuls(TorchDispatchMode):
    """Counts, for each forward matmul, its operands that require grad: the input-gradient matmuls the
    backward must run (a frozen weight needs none)."""

    OPS = {
        torch.ops.aten.mm.default: (0, 1),
        torch.ops.aten.bmm.default: (0, 1),
        torch.ops.aten.addmm.default: (1, 2),
        torch.ops.aten.baddbmm.default: (1, 2),
    }

    def __init__(self):
        super().__init__()
        self.input_grad_matmuls = 0
        self.weight_matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            for i in self.OPS[func]:
                self.input_grad_matmuls += int(args[i].requires_grad)
        return func(*args, **(kwargs or {}))


def test_backward_runs_only_input_gradient_matmuls():
    model, processor = build_critic_model("tiny-janus")
    critic = Critic.from_hf(
        model, processor, checkpoint="none", attn_backend="eager"
    )  # attention matmuls visible
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    caps = torch.randint(0, 100, (2, 6))
    inputs = critic.prepare(images, backend="torch")  # the bridge's own backward matmuls are not counted here
    inputs.pixel_values.requires_grad_(True)
    counter = _ForwardMatmuls()
    with counter:
        out = critic(inputs, caps)
        loss = torch.nn.functional.cross_entropy(out.logits().flatten(0, 1), out.caption_labels.flatten())
        loss = loss + out.patch_features.square().mean()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
    backward_matmuls = sum(e.count for e in prof.key_averages() if e.key in names)
    assert counter.input_grad_matmuls > 0
    assert backward_matmuls == counter.input_grad_matmuls, (
        f"backward ran {backward_matmuls} matmuls, the input gradients need {counter.input_grad_matmuls}"
    )
    assert all(p.grad is None for p in model.parameters())
    assert inputs.pixel_values.grad is not None and inputs.pixel_values.grad.abs().sum() > 0


def test_frozen_linear_inputs_are_not_saved():
    """Autograd keeps no input of a frozen linear: what "none" saves inside a critic linear is only its
    weight."""
    lin = torch.nn.Linear(16, 32).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)


def test_checkpoint_only_inside_the_critic_and_layers_keep_their_names():
    model, processor = build_critic_model("tiny-llava-clip")
    keys = set(model.state_dict())
    critic = Critic.from_hf(model, processor, checkpoint="layer")
    assert set(model.state_dict()) == keys
    layer = model.model.language_model.layers[0]
    assert "forward" in layer.__dict__  # wrapped at the instance, the module tree unchanged
    assert critic._ckpt.active is False
    none_critic = Critic.from_hf(model, processor, checkpoint="none")  # same model, no checkpointing
    seen = []
    orig = torch.utils.checkpoint.checkpoint

    def spy(*a, **k):
        seen.append(k.get("use_reentrant"))
        return orig(*a, **k)

    import uno_engine.critics.checkpointing as ck

    ck.checkpoint, saved = spy, ck.checkpoint
    try:
        emb = torch.randn(1, 4, model.config.text_config.hidden_size, requires_grad=True)
        model.model.language_model(inputs_embeds=emb)
        assert seen == []
        images = (torch.rand(1, 3, 30, 30) * 2 - 1).requires_grad_(True)
        _critic_pass(critic, images, torch.randint(0, 100, (1, 4)))
        assert seen and all(v is False for v in seen)  # non-reentrant, every layer
        seen.clear()
        _critic_pass(none_critic, images, torch.randint(0, 100, (1, 4)))
        assert seen == []  # the wrappers follow the running critic's policy
    finally:
        ck.checkpoint = saved


def test_compile_blocks_without_graph_breaks():
    model, processor = build_critic_model("tiny-llava-siglip")
    ref_model, _ = build_critic_model("tiny-llava-siglip")
    torch._dynamo.reset()
    critic = Critic.from_hf(model, processor, checkpoint="selective")
    n = critic.compile_blocks(backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    assert n == 4
    ref = Critic.from_hf(ref_model, processor)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    caps = torch.randint(0, 100, (2, 5))
    grads = []
    for c in (critic, ref):
        x = images.clone().requires_grad_(True)
        _critic_pass(c, x, caps)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_compile_on_old_torch_is_a_clear_error(monkeypatch):
    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor)
    monkeypatch.setattr(torch, "__version__", "2.3.1")
    with pytest.raises(RuntimeError, match="torch >= 2.4"):
        critic.compile_blocks()


@pytest.mark.gpu
def test_offload_and_checkpointing_on_cuda():
    model, processor = build_critic_model("tiny-llava-clip", device="cuda")
    caps = torch.randint(0, 100, (4, 8), device="cuda")
    images0 = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    peaks, grads = {}, {}
    for policy in CHECKPOINT_POLICIES:
        critic = Critic.from_hf(model, processor, checkpoint=policy)
        images = images0.clone().requires_grad_(True)
        with track_peak_memory("cuda") as mem:
            _critic_pass(critic, images, caps)
        peaks[policy], grads[policy] = mem.peak_bytes, images.grad
    for policy in CHECKPOINT_POLICIES:
        torch.testing.assert_close(grads[policy], grads["none"], rtol=1e-5, atol=1e-7)
    assert peaks["offload"] < peaks["none"]


def test_selective_state_seen_in_recompute():
    """Selective checkpointing replays saved outputs by position, and torch < 2.13 asks the policy again for
    every op of the recomputation: it must decide as in the forward. The policy reads the critic's state
    (which projection is running), so that state must be current when the backward recomputes the layer,
    after the critic's `activate` scope has exited (measured on torch 2.11: a mismatch replays the wrong
    tensors)."""
    from uno_engine.critics import checkpointing as ckpt

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8, bias=False)
            self.up = torch.nn.Linear(8, 16, bias=False)

        def forward(self, x):
            return torch.relu(self.up(torch.tanh(self.q_proj(x))))

    layer = Layer().requires_grad_(False)
    ckpt.wrap_layers([layer], recomputed=[layer.q_proj])
    st = ckpt.CheckpointState("selective")
    seen = []
    layer.q_proj.register_forward_pre_hook(lambda m, a: seen.append((ckpt._current() is st, st._in_skip)))
    x = torch.randn(2, 3, 8, requires_grad=True)
    with st.activate():
        y = layer(x)
    assert seen == [(True, 1)]
    y.square().sum().backward()
    assert len(seen) == 2, "the backward should recompute the layer"
    assert seen[1] == (True, 1)
    assert st._in_skip == 0


def test_projection_hooks_do_not_mutate_state_under_compile():
    """The projection hooks count only in eager code: inside a compiled (checkpointed) layer torch 2.11 refuses
    any mutation of outside state ("HOP: Unsafe side effect", `compile_blocks(fullgraph=True)` with
    "selective"), and newer torch would replay it after the graph, leaving a count behind."""
    from uno_engine.critics import checkpointing as ck

    st = ck.CheckpointState("selective")
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def layer(x):
        ck._enter_recomputed(None, (x,))
        y = x * 2
        ck._exit_recomputed(None, (x,), y)
        ck._enter_recomputed(None, (x,))  # unbalanced on purpose: a count would be left behind
        return y

    with st.activate():
        layer(torch.ones(3))
    assert st._in_skip == 0
    with st.activate():  # eager: counted
        ck._enter_recomputed(None, ())
    assert st._in_skip == 1


# --------------------------------------------------------------------------------------- checkpoint="auto"
def test_auto_estimate_counts_the_shapes_and_matches_what_none_keeps():
    """The estimate is layers x tokens x hidden x SAVED_PER_TOKEN x element size, counted here from the
    configs by hand, and within 0.67-1.5x of what a "none" critic forward actually keeps per image."""
    model, processor = _small_llava()
    critic = Critic.from_hf(model, processor, checkpoint="none")
    est = critic.activation_estimate()
    # CLIP 112 px / patch 14: 64 patch tokens, 8 layers of width 64; LM: 64 image + 64 caption tokens,
    # 8 layers of width 96; fp32
    want = (8 * 64 * 64 + 8 * (64 + ckpt.NOMINAL_CAPTION_TOKENS) * 96) * ckpt.SAVED_PER_TOKEN * 4
    assert est.bytes_per_image == want, est
    B = 4
    images = (torch.rand(B, 3, 112, 112) * 2 - 1).requires_grad_(True)
    caps = torch.randint(0, 400, (B, ckpt.NOMINAL_CAPTION_TOKENS))
    inputs = critic.prepare(images, backend="torch")
    with track_peak_memory("cpu") as m:
        out = critic(inputs, caps)
    del out
    ratio = m.peak_bytes / B / est.bytes_per_image
    assert 0.67 <= ratio <= 1.5, (m.peak_bytes / B, est.bytes_per_image)


@pytest.mark.parametrize(
    ("bytes_per_image", "policy"),
    [
        (ckpt.AUTO_SELECTIVE_BYTES - ckpt.SAVED_PER_TOKEN, "none"),
        (ckpt.AUTO_SELECTIVE_BYTES, "selective"),
        (ckpt.AUTO_LAYER_BYTES - ckpt.SAVED_PER_TOKEN, "selective"),
        (ckpt.AUTO_LAYER_BYTES, "layer"),
    ],
)
def test_auto_thresholds(bytes_per_image, policy):
    # one stack of 1 layer x 1 token x h, 1-byte elements: bytes = h x SAVED_PER_TOKEN
    est = ckpt.ActivationEstimate((("LM", 1, 1, bytes_per_image // ckpt.SAVED_PER_TOKEN),), 1)
    assert est.bytes_per_image == bytes_per_image
    got, reason = ckpt.choose_auto_policy(est)
    assert got == policy and reason.startswith(policy) and "MiB per image" in reason


def test_auto_from_hf_chooses_wraps_and_logs_once(monkeypatch, caplog):
    """Small critic: "auto" is "none" (no layer wrapped). With the threshold below its estimate: "selective",
    the layers are wrapped and the gradient equals "none"'s; the decision is logged once and listed by
    uno_engine.info."""
    import logging

    from uno_engine import info

    model, processor = _small_llava()
    small = Critic.from_hf(model, processor)  # the default is "auto"
    assert small.checkpoint_policy == "none" and "none, as" in small.checkpoint_reason
    assert not any("_uno_inner" in layer.__dict__ for layer in small._checkpoint_layers())

    monkeypatch.setattr(ckpt, "AUTO_SELECTIVE_BYTES", 1 << 20)
    monkeypatch.setattr(ckpt, "_AUTO_DECISIONS", {})
    with caplog.at_level(logging.INFO, logger="uno_engine"):
        critics = [Critic.from_hf(model, processor, checkpoint="auto") for _ in range(2)]
    assert all(c.checkpoint_policy == "selective" for c in critics)
    assert all("_uno_inner" in layer.__dict__ for layer in critics[0]._checkpoint_layers())
    logged = [r for r in caplog.records if "checkpoint='auto'" in r.getMessage()]
    assert len(logged) == 1 and "selective" in logged[0].getMessage()
    assert critics[0].checkpoint_reason in info.collect()["checkpoint auto"]

    images0 = torch.rand(2, 3, 112, 112) * 2 - 1
    caps = torch.randint(0, 400, (2, 16))
    grads = []
    for critic in (critics[0], Critic.from_hf(model, processor, checkpoint="none")):
        images = images0.clone().requires_grad_(True)
        _critic_pass(critic, images, caps)
        grads.append(images.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


def test_auto_is_a_choice_of_from_hf_only():
    model, processor = _small_llava()
    with pytest.raises(ValueError, match=r"checkpoint must be one of .*'auto'.*, got 'fast'"):
        Critic.from_hf(model, processor, checkpoint="fast")
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        ckpt.CheckpointState("auto")  # a resolved policy only
