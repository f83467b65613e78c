"""uno_engine._env: the registry of environment variables (parsing, errors naming the variable, aliases), the
rule that kernels never read the environment, `python -m uno_engine.info` listing every knob, and
`uno_engine.ops._register.custom_op` (the one registration pattern) on a small op with a tensor list."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from uno_engine import _env
from uno_engine.config import UNOConfig
from uno_engine.ops._register import custom_op

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "name, raw, value",
    [
        ("UNO_LCE_IMPL", "recompute", "recompute"),
        ("UNO_LCE_IMPL", " grad_in_forward ", "grad_in_forward"),
        ("UNO_LCE_CHUNK_ROWS", "300", 300),
        ("UNO_REGRESSION_CONFIG", "tile=8192, per_sm=0", {"tile": 8192, "per_sm": 0}),
        ("UNO_BRIDGE_FORWARD", "fused_loads", "fused_loads"),
        ("UNO_BRIDGE_BACKWARD", "fused", "fused"),
        ("UNO_BRIDGE_BLOCKS", "4,256,4", ((4, 256, 4), (4, 256, 4))),
        ("UNO_BRIDGE_BLOCKS", "4,256,4/8,128,2", ((4, 256, 4), (8, 128, 2))),
        ("UNO_BRIDGE_FUSED_TILE", "64,128,4", (64, 128, 4)),
        ("UNO_BRIDGE_FUSED_BWD_TILE", "32,64,8", (32, 64, 8)),
        ("UNO_DISABLE_EXT", "1", True),
        ("UNO_DISABLE_EXT", "0", False),
    ],
)
def test_parse(name, raw, value, monkeypatch):
    monkeypatch.setenv(name, raw)
    assert _env.get(name) == value
    monkeypatch.delenv(name)
    assert _env.get(name) is None


@pytest.mark.parametrize(
    "name, raw, pattern",
    [
        ("UNO_LCE_IMPL", "gif", "must be one of auto|grad_in_forward|recompute"),
        ("UNO_LCE_CHUNK_ROWS", "0", "positive integer"),
        ("UNO_LCE_CHUNK_ROWS", "many", "positive integer"),
        ("UNO_REGRESSION_CONFIG", "tile", "expected NAME=INT"),
        ("UNO_REGRESSION_CONFIG", "tile=big", "expected NAME=INT"),
        ("UNO_BRIDGE_FORWARD", "fast", "must be one of"),
        ("UNO_BRIDGE_BLOCKS", "4,256", "R,C,W"),
        ("UNO_BRIDGE_BLOCKS", "4,256,0", ">= 1"),
        ("UNO_BRIDGE_FUSED_TILE", "48,128,4", "powers of two"),
        ("UNO_BRIDGE_FUSED_TILE", "64,128,3", "num_warps"),
        ("UNO_DISABLE_EXT", "maybe", "0 or 1"),
    ],
)
def test_invalid_value_names_the_variable(name, raw, pattern, monkeypatch):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=rf"environment variable {name}={raw!r}: .*{pattern}"):
        _env.get(name)


def test_deprecated_alias(monkeypatch):
    monkeypatch.delenv("UNO_LCE_CHUNK_ROWS", raising=False)
    monkeypatch.setenv("UNO_LCE_GIF_CHUNK_ROWS", "12")
    monkeypatch.setattr(_env, "_warned", set())
    with pytest.warns(
        DeprecationWarning, match="UNO_LCE_GIF_CHUNK_ROWS is deprecated; use UNO_LCE_CHUNK_ROWS"
    ):
        assert _env.get("UNO_LCE_CHUNK_ROWS") == 12
    monkeypatch.setenv("UNO_LCE_CHUNK_ROWS", "7")  # the new name wins
    assert _env.get("UNO_LCE_CHUNK_ROWS") == 7
    monkeypatch.setenv("UNO_LCE_CHUNK_ROWS", "")
    monkeypatch.setenv("UNO_LCE_GIF_CHUNK_ROWS", "-1")
    with pytest.raises(ValueError, match="UNO_LCE_GIF_CHUNK_ROWS='-1'"):  # names the variable actually set
        _env.get("UNO_LCE_CHUNK_ROWS")


def test_regression_config_from_env(monkeypatch):
    from uno_engine.ops import regression

    pytest.importorskip("triton")
    monkeypatch.setenv("UNO_REGRESSION_CONFIG", "tile=4096,group=2")
    cfg = regression.kernel_config()
    assert (cfg.tile, cfg.group) == (4096, 2)
    monkeypatch.setenv("UNO_REGRESSION_CONFIG", "tiles=4096")
    with pytest.raises(ValueError, match="UNO_REGRESSION_CONFIG"):
        regression.kernel_config()
    monkeypatch.setenv("UNO_REGRESSION_CONFIG", "tile=3000")  # not a power of two: RegressionConfig says so
    with pytest.raises(ValueError, match="UNO_REGRESSION_CONFIG.*power of two"):
        regression.kernel_config()


def test_every_environment_read_goes_through_the_registry():
    """No os.environ / os.getenv outside uno_engine/_env.py in the library, none at all in kernels/ (launchers
    take arguments), and every UNO_* name used anywhere in the library is registered."""
    allowed = {
        ROOT / "uno_engine" / "_env.py",
        ROOT / "uno_engine" / "distributed.py",
    }  # torchrun's RANK etc.
    offenders, names = [], set()
    for folder in ("uno_engine", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            names |= set(re.findall(r"\bUNO_[A-Z0-9_]+\b", text))
            if path not in allowed and re.search(r"os\.environ|os\.getenv|getenv\(", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"read the environment through uno_engine._env: {offenders}"
    registered = set(_env.KNOBS) | {a for k in _env.KNOBS.values() for a in k.aliases}
    assert names - registered == set(), f"unregistered knobs: {sorted(names - registered)}"


def test_info_lists_every_knob(monkeypatch, capsys):
    from uno_engine import info

    monkeypatch.setenv("UNO_LCE_IMPL", "bogus")
    info.main()
    out = capsys.readouterr().out
    for name in _env.KNOBS:
        assert name in out, name
    assert re.search(r"UNO_LCE_IMPL +now INVALID: environment variable UNO_LCE_IMPL='bogus'", out), out
    for op in ("linear_cross_entropy", "fused_regression", "bridge"):
        assert re.search(rf"^{op} auto +backend (torch|triton) \(", out, re.M), op


def test_docs_list_every_knob():
    page = (ROOT / "docs" / "environment.md").read_text()
    missing = [name for name in _env.KNOBS if f"`{name}`" not in page]
    assert missing == [], f"docs/environment.md's table lacks {missing}"


def test_config_choices():
    assert UNOConfig(lce_impl="recompute").lce_impl == "recompute"
    with pytest.raises(ValueError, match="UNOConfig.lce_impl"):
        UNOConfig(lce_impl="gif")
    with pytest.raises(ValueError, match="UNOConfig.bridge_kernel"):
        UNOConfig(bridge_kernel="fastest")


# ------------------------------------------------------------------------------------- the registration
def _scale_fake(xs, k):
    return [torch.empty_like(x) for x in xs], xs[0].new_empty(())


@custom_op("uno_engine_test::scale_list", fake=_scale_fake)
def _scale_list(xs: list[torch.Tensor], k: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [x * k for x in xs], sum(x.sum() for x in xs)


def _setup(ctx, inputs, output):
    ctx.k = inputs[1]


def _backward(ctx, g_list, g_total):
    needs = ctx.needs_input_grad[0]
    assert isinstance(needs, list)
    grads = []
    for g, need in zip(g_list, needs, strict=True):
        out = torch.zeros(()) if g is None else g * ctx.k
        if g_total is not None:
            out = out + g_total
        grads.append(out if need else None)
    return grads, None


_scale_list.register_autograd(_backward, setup_context=_setup)


def test_register_eager_compile_and_opcheck():
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)  # no grad: the backward gets None there

    def f(a, b):
        outs, total = _scale_list([a, b], 2.5)
        return outs[0].sum() * 3 + total

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        (g,) = torch.autograd.grad(fn(a, b), [a])
        grads.append(g)
    for g in grads:
        torch.testing.assert_close(g, torch.full_like(a, 3 * 2.5 + 1))
    with torch.no_grad():  # no graph: the implementation itself
        outs, total = _scale_list([a, b], 2.0)
    assert outs[0].grad_fn is None
    torch.testing.assert_close(total, a.sum() + b.sum())
    torch.library.opcheck(_scale_list.overload, ([torch.randn(3, requires_grad=True), torch.randn(2)], 2.0))


@pytest.mark.parametrize("raw, on", [("1", True), ("true", True), ("0", False), ("", False)])
def test_triton_interpret_has_one_parse(raw, on, monkeypatch):
    """TRITON_INTERPRET is read by the registry's parser only: interpreter_enabled() agrees with _env.get for
    every spelling, and a malformed value raises naming the variable."""
    from uno_engine.ops._dispatch import interpreter_enabled

    monkeypatch.setenv("TRITON_INTERPRET", raw)
    assert _env.interpreter_enabled() is on and interpreter_enabled() is on
    assert bool(_env.get("TRITON_INTERPRET")) is on
    monkeypatch.setenv("TRITON_INTERPRET", "maybe")
    with pytest.raises(ValueError, match="environment variable TRITON_INTERPRET='maybe'"):
        _env.interpreter_enabled()


def test_choices_are_listed_once():
    """The kernels' bridge lists (kernels cannot import uno_engine) equal the registry's, and the op and
    UNOConfig take exactly the registry's choices."""
    pytest.importorskip("triton")
    from uno_engine.kernels import bridge as kernels_bridge

    # the modules (the package's attributes of these names are the functions)
    ops_bridge = importlib.import_module("uno_engine.ops.bridge")
    lce = importlib.import_module("uno_engine.ops.linear_cross_entropy")
    assert kernels_bridge.FORWARD_KERNELS == _env.BRIDGE_FORWARD
    assert kernels_bridge.BACKWARD_KERNELS == _env.BRIDGE_BACKWARD
    assert ops_bridge.KERNELS is _env.BRIDGE_KERNELS and lce.IMPLS is _env.LCE_IMPLS
    for impl in _env.LCE_IMPLS:
        assert UNOConfig(lce_impl=impl).lce_impl == impl
    for kernel in _env.BRIDGE_KERNELS:
        assert UNOConfig(bridge_kernel=kernel).bridge_kernel == kernel
