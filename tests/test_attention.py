"""Attention backends of the critic: auto choice, explicit backends, xformers through AttentionInterface."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from uno_engine import _optional
from uno_engine.critics import Critic, CriticInputs
from uno_engine.critics import attention as attn
from uno_engine.testing.presets.critics import build_critic_model


def _run(critic, seed=0):
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(2, 3, 30, 30, generator=g)
    caps = torch.randint(0, 100, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return critic(CriticInputs(pixel_values=pv), caps, mask)


def test_auto_on_cpu_is_sdpa_with_a_reason():
    backend, reason = attn.choose_auto("cpu")
    assert backend == "sdpa" and "CUDA" in reason
    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor, attn_backend="auto")
    assert set(critic.attn_implementation.values()) == {"sdpa"}
    assert critic.attn_reason


def test_auto_prefers_flash_attn_on_cuda_when_installed(monkeypatch):
    monkeypatch.setattr(
        _optional, "flash_attn", _optional.OptionalDependency("math", "pip install flash-attn")
    )
    assert attn.choose_auto("cuda")[0] == "flash_attn"
    monkeypatch.setattr(
        _optional, "flash_attn", _optional.OptionalDependency("no_such_pkg_x", "pip install x")
    )
    assert attn.choose_auto("cuda")[0] == "sdpa"


def test_eager_and_sdpa_agree():
    outs = []
    for backend in ("eager", "sdpa"):
        model, processor = build_critic_model("tiny-llava-clip")
        critic = Critic.from_hf(model, processor, attn_backend=backend)
        assert set(critic.attn_implementation.values()) == {backend}
        outs.append(_run(critic))
    torch.testing.assert_close(outs[0].caption_hidden, outs[1].caption_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].patch_features, outs[1].patch_features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,module", [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_explicit_missing_backend_raises_with_install_hint(monkeypatch, backend, module):
    monkeypatch.setattr(
        _optional, module, _optional.OptionalDependency("no_such_pkg_x", f"pip install {module}")
    )
    model, processor = build_critic_model("tiny-llava-clip")
    with pytest.raises(ImportError, match=f"attn_backend='{backend}'.*pip install {module}"):
        Critic.from_hf(model, processor, attn_backend=backend)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="attn_backend"):
        attn.resolve_attn_backend("flex")


def _fake_xformers():
    """A stand-in xformers.ops with memory_efficient_attention in torch: (B, L, H, D) layout, attn_bias a
    tensor (B, H, Lq, Lk) or a causal mask class."""
    ops = types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    class LowerTriangularFromBottomRightMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        """softmax(q k^T * scale + bias) v written out in float64, independent of SDPA, so the test checks
        our adapter's layout, GQA and mask conversion against SDPA rather than SDPA against itself."""
        ops.calls += 1
        dtype = q.dtype
        q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))  # (B, H, L, D)
        if k.shape[1] != q.shape[1]:  # GQA: xformers wants the heads expanded by the caller
            raise AssertionError(f"fake xformers got {q.shape[1]} query heads and {k.shape[1]} kv heads")
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if isinstance(attn_bias, torch.Tensor):
            s = s + attn_bias.double()
        elif attn_bias is not None:  # causal, aligned at the bottom right as xformers' mask classes are
            lq, lk = s.shape[-2:]
            keep = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
            s = s.masked_fill(~keep, float("-inf"))
        out = torch.softmax(s, dim=-1) @ v
        return out.transpose(1, 2).to(dtype)

    ops.calls = 0
    ops.LowerTriangularMask = LowerTriangularMask
    ops.LowerTriangularFromBottomRightMask = LowerTriangularFromBottomRightMask
    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    pkg.__version__ = "fake"
    return pkg, ops


@pytest.mark.parametrize("name", ["tiny-llava-clip", "tiny-qwen2-vl"])
def test_xformers_registered_through_attention_interface(monkeypatch, name):
    """With an xformers stand-in the critic runs through AttentionInterface's "uno_xformers" and matches SDPA
    (layouts, GQA, padding and causal masks, Qwen2-VL's per-image vision attention)."""
    pkg, ops = _fake_xformers()
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(
        _optional, "xformers", _optional.OptionalDependency("xformers", "pip install xformers")
    )
    from transformers import AttentionInterface

    outs = []
    for backend in ("sdpa", "xformers"):
        model, processor = build_critic_model(name)
        critic = Critic.from_hf(model, processor, attn_backend=backend)
        if name == "tiny-qwen2-vl":
            import numpy as np

            rng = np.random.default_rng(0)
            o = processor(
                images=[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)],
                return_tensors="pt",
            )
            caps = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
            mask = torch.ones(2, 6, dtype=torch.long)
            mask[1, 4:] = 0
            outs.append(critic(CriticInputs(o["pixel_values"], o["image_grid_thw"]), caps, mask))
        else:
            outs.append(_run(critic))
    assert ops.calls > 0, "the xformers backend never called memory_efficient_attention"
    assert attn.XFORMERS_NAME in AttentionInterface._global_mapping
    assert set(critic.attn_implementation.values()) == {attn.XFORMERS_NAME}
    valid = torch.ones_like(outs[0].caption_labels, dtype=torch.bool)
    valid[1, 4:] = False  # padded positions may differ (fully masked rows)
    torch.testing.assert_close(
        outs[1].caption_hidden[valid], outs[0].caption_hidden[valid], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(outs[1].patch_features, outs[0].patch_features, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_sdpa_bf16_on_cuda():
    model, processor = build_critic_model("tiny-llava-clip", device="cuda", dtype=torch.bfloat16)
    critic = Critic.from_hf(model, processor, attn_backend="auto")
    out = critic(
        CriticInputs(pixel_values=torch.randn(2, 3, 30, 30, device="cuda")),
        torch.randint(0, 100, (2, 6), device="cuda"),
    )
    assert torch.isfinite(out.caption_hidden.float()).all()


def test_info_reports_the_auto_choice_and_the_extension():
    import subprocess

    from uno_engine import info

    d = info.collect()
    assert d["attn_backend auto"].startswith(("sdpa", "flash_attn"))
    assert "uno_engine._C" in d and "triton" in d and "xformers" in d
    # the module runs as a script (from a neutral cwd: the repo root holds kernels/)
    out = subprocess.run(
        [sys.executable, "-m", "uno_engine.info"], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "attn_backend auto" in out.stdout
