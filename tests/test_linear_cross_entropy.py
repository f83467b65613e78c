"""uno_engine.ops.linear_cross_entropy against a float64 ground truth.

Pass rule (per output: loss, dhidden, dweight, dbias): max|ours - gt| <= 2 max|torch - gt| + atol max|gt|,
where "torch" is the plain eager computation (F.linear, then F.cross_entropy) in the same dtype as the inputs.
On the CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32 and fp16; bf16 needs a GPU).

Backends: "torch" and "triton" with the default implementation (impl="auto": the gradient-in-forward path
whenever a gradient is needed and it can form it), and "torch_recompute" / "triton_recompute"
(impl="recompute": the log-sum-exp forward and the recomputing backward).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from uno_engine.kernels import linear_cross_entropy as lce_kernels

from uno_engine import ops, reference
from uno_engine._log import reset_once
from uno_engine.ops import _lce_ops, _lce_torch
from uno_engine.ops._dispatch import interpreter_enabled

# Through the package's lazy attribute (this also registers the uno_engine:: custom ops). Importing the submodule
# `uno_engine.ops.linear_cross_entropy` first would make `ops.linear_cross_entropy` the module, not the function.
assert callable(ops.linear_cross_entropy)
lce_op_module = sys.modules["uno_engine.ops.linear_cross_entropy"]

BACKENDS = ["torch", "triton"]
# and the recompute implementation explicitly where the default dispatch would take grad_in_forward (the options
# and bias tests reach it through reduction="none" with a trainable head, test_several_backward_chunks too)
BACKENDS_ALL = [*BACKENDS, "torch_recompute", "triton_recompute"]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
N, V, H = 37, 1007, 33  # odd on every axis


@contextlib.contextmanager
def _env(**values):
    """Set environment variables for the duration (None removes one)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lce(*args, backend, **kw):
    """ops.linear_cross_entropy for a test backend name ("<backend>_recompute": impl="recompute")."""
    backend, _, impl = backend.partition("_")
    return ops.linear_cross_entropy(*args, backend=backend, impl=impl or "auto", **kw)


def _eager_same_dtype(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    reduction="mean",
):
    """What a user would write in PyTorch, in the inputs' dtype: the error budget of the test."""
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.reshape(-1, weight.shape[0])
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    loss = F.cross_entropy(
        logits, flat, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def _loss_and_grads(fn, hidden, weight, bias, labels, upstream, **kw):
    h = hidden.detach().requires_grad_(True)  # a detached view keeps a non-contiguous layout
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    b = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    loss = fn(h, w, labels, bias=b, **kw)
    loss.backward(upstream.to(loss.dtype))
    return {
        "loss": loss.detach(),
        "dhidden": h.grad,
        "dweight": w.grad,
        "dbias": None if b is None else b.grad,
    }


def _to64(t):
    if t is None:
        return None
    out = t.detach().to(torch.float64)
    return out.requires_grad_(t.requires_grad)


def _check(ours: dict, gt: dict, torch_same: dict, dtype, what: str):
    for name, g in gt.items():
        o, t = ours[name], torch_same[name]
        if g is None:
            assert o is None, f"{what}: {name} should be None (no grad requested)"
            continue
        assert o is not None and o.shape == g.shape, f"{what}: {name} shape {None if o is None else o.shape}"
        assert torch.isfinite(o).all(), f"{what}: {name} has non-finite values"
        err = (o.double() - g).abs()
        err_torch = (t.double() - g).abs().max().item()
        scale = max(g.abs().max().item(), 1e-30)
        bound = 2 * err_torch + ATOL[dtype] * scale
        if err.max().item() > bound:
            worst = torch.topk(err.flatten(), min(5, err.numel())).indices
            idx = [tuple(int(i) for i in torch.unravel_index(w, err.shape)) for w in worst]
            raise AssertionError(
                f"{what}: {name} max error {err.max().item():.3e} > bound {bound:.3e} (torch {dtype} error "
                f"{err_torch:.3e}, scale {scale:.3e}); worst at {idx}: ours "
                f"{[o[i].item() for i in idx]} vs gt {[g[i].item() for i in idx]}"
            )


def _compare(backend, hidden, weight, labels, *, bias=None, upstream=None, **kw):
    dtype = hidden.dtype
    ref_out = reference.linear_cross_entropy(
        hidden.detach().double(), weight.double(), labels, bias=None if bias is None else bias.double(), **kw
    )
    if upstream is None:
        upstream = torch.randn_like(ref_out) if ref_out.dim() else torch.tensor(1.0, device=ref_out.device)
    gt = _loss_and_grads(
        reference.linear_cross_entropy,
        _to64(hidden),
        _to64(weight),
        _to64(bias),
        labels,
        upstream.double(),
        **kw,
    )
    same = _loss_and_grads(_eager_same_dtype, hidden, weight, bias, labels, upstream, **kw)
    ours = _loss_and_grads(
        lambda *a, **k: _lce(*a, backend=backend, **k),
        hidden,
        weight,
        bias,
        labels,
        upstream,
        **kw,
    )
    assert ours["loss"].dtype == torch.float32
    _check(ours, gt, same, dtype, f"backend={backend} dtype={dtype} {kw}")
    return ours


def _inputs(device, dtype, *, n=N, v=V, h=H, ignore_frac=0.2, weight_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 3).to(device=device, dtype=dtype)
    weight.requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, labels.to(device)


# ----------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_reductions(backend, dtype, reduction, device):
    # frozen head for mean and none (grad_in_forward by default), trainable for sum (grad_in_forward with dW)
    hidden, weight, labels = _inputs(device, dtype, weight_grad=reduction == "sum")
    _compare(backend, hidden, weight, labels, reduction=reduction)


@pytest.mark.parametrize(
    "extra",
    [
        dict(label_smoothing=0.1),
        dict(z_loss=1e-3),
        dict(softcap=5.0),
        dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0, reduction="none"),
        dict(ignore_index=7),
    ],
    ids=["smoothing", "z_loss", "softcap", "all_options_none", "ignore_index_7"],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_options(backend, dtype, extra, device):
    hidden, weight, labels = _inputs(device, dtype, weight_grad=True)
    if "ignore_index" in extra:
        labels[labels == -100] = extra["ignore_index"]
    _compare(backend, hidden, weight, labels, **extra)


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias(backend, dtype, weight_grad, device):
    hidden, weight, labels = _inputs(device, dtype, weight_grad=weight_grad)
    bias = torch.randn(V, device=device).to(dtype).requires_grad_(True)
    _compare(backend, hidden, weight, labels, bias=bias, softcap=4.0, label_smoothing=0.05)


@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_non_contiguous_and_3d(backend, device):
    dtype = torch.float32
    base = torch.randn(N, 2 * H, device=device)
    hidden = base[:, ::2]  # stride (2H, 2)
    assert not hidden.is_contiguous()
    _, weight, labels = _inputs(device, dtype, weight_grad=True)
    _compare(backend, hidden, weight, labels)
    # a non-contiguous (transposed-storage) weight and a (B, L, H) input with (B, L) labels
    weight_t = torch.randn(H, V, device=device).t()
    hidden3 = torch.randn(3, 11, H, device=device)
    labels3 = torch.randint(0, V, (3, 11), device=device)
    labels3[0, 5:] = -100
    out = _compare(backend, hidden3, weight_t, labels3, reduction="none")
    assert out["loss"].shape == (3, 11) and out["dhidden"].shape == (3, 11, H)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_all_ignored_is_zero_not_nan(backend, reduction, device):
    # trainable head for mean / sum, frozen for none: every case reaches grad_in_forward by default
    hidden, weight, labels = _inputs(device, torch.float32, weight_grad=reduction != "none")
    labels[:] = -100
    h = hidden.clone().requires_grad_(True)
    loss = _lce(h, weight, labels, reduction=reduction, backend=backend, z_loss=1e-2, label_smoothing=0.1)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert torch.equal(h.grad, torch.zeros_like(h.grad))
    if weight.requires_grad:
        assert torch.equal(weight.grad, torch.zeros_like(weight.grad))


@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_extreme_logits(backend, device):
    # logits around +-1e4: the loss and gradients must stay finite and exact.
    hidden, weight, labels = _inputs(device, torch.float32, weight_grad=True, ignore_frac=0.1)
    hidden = hidden / hidden.norm(dim=1, keepdim=True)
    weight = (weight / weight.norm(dim=1, keepdim=True) * 1e4).requires_grad_(True)
    _compare(backend, hidden, weight, labels, z_loss=1e-6)  # _check: finite and within the error bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_backward_chunks(backend, monkeypatch, device):
    # Several recompute-backward chunks (and a partial last one) on a small shape.
    monkeypatch.setenv("UNO_LCE_CHUNK_ROWS", "16")
    hidden, weight, labels = _inputs(device, torch.float32, weight_grad=True)
    bias = torch.randn(V, device=device, requires_grad=True)
    _compare(backend, hidden, weight, labels, bias=bias, reduction="none", softcap=6.0)


# ------------------------------------------------------------------------------------ gradient in forward


class _Spy:
    """Wraps the entry points of both implementations (kernels module and torch path) and records which ran
    (and the grad_in_forward dhidden buffer)."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.dhidden = None
        for mod, gf_name, fwd_name in (
            (lce_kernels, "linear_cross_entropy_grad_in_forward", "linear_cross_entropy_forward"),
            (_lce_torch, "grad_in_forward", "forward"),
        ):
            self._wrap(monkeypatch, mod, gf_name, "grad_in_forward", True)
            self._wrap(monkeypatch, mod, fwd_name, "recompute", False)

    def _wrap(self, monkeypatch, mod, name, label, keep):
        fn = getattr(mod, name)

        def spy(*a, **k):
            self.calls.append(label)
            out = fn(*a, **k)
            if keep:
                self.dhidden = out[1]
            return out

        monkeypatch.setattr(mod, name, spy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_is_the_path_when_a_gradient_is_needed(backend, monkeypatch, device, caplog):
    hidden, weight, labels = _inputs(device, torch.float32, n=9, v=40, h=8)
    spy = _Spy(monkeypatch)
    monkeypatch.delenv("UNO_LCE_IMPL", raising=False)
    reset_once()

    def run(h, w, **kw):
        spy.calls.clear()
        ops.linear_cross_entropy(h, w, labels, backend=backend, **kw)
        return spy.calls

    h_grad = hidden.clone().requires_grad_(True)
    w_grad = weight.clone().requires_grad_(True)
    gf = "grad_in_forward"
    with caplog.at_level(logging.INFO, logger="uno_engine.ops"):
        assert run(h_grad, weight) == [gf]  # frozen head, mean
    assert any(f"[{backend}]: impl='auto' -> {gf}" in r.getMessage() for r in caplog.records), caplog.text
    assert run(h_grad, w_grad, reduction="sum") == [gf]  # trainable head, sum
    assert run(h_grad, weight, reduction="none") == [gf]  # frozen head: none is linear per token
    assert run(hidden, w_grad, reduction="mean") == [gf]  # only the head trains
    assert run(hidden, weight) == ["recompute"]  # no gradient needed
    with torch.no_grad():
        assert run(h_grad, w_grad) == ["recompute"]
    reset_once()  # the choice is logged once per implementation
    with caplog.at_level(logging.INFO, logger="uno_engine.ops"):
        assert run(h_grad, w_grad, reduction="none") == ["recompute"]  # dW needs per-token upstream grads
    assert any("reduction='none' with a trainable" in r.getMessage() for r in caplog.records), caplog.text
    # the argument, and the environment override over it
    assert run(h_grad, weight, impl="recompute") == ["recompute"]
    with pytest.raises(RuntimeError, match="impl='grad_in_forward' cannot run: reduction='none'"):
        run(h_grad, w_grad, reduction="none", impl=gf)
    with torch.no_grad():
        assert run(h_grad, weight, impl=gf) == [gf]  # explicit, without a gradient: the loss-only pass
    with pytest.raises(ValueError, match="impl must be one of"):
        run(h_grad, weight, impl="gif")
    monkeypatch.setenv("UNO_LCE_IMPL", "recompute")
    assert run(h_grad, weight, impl=gf) == ["recompute"]
    monkeypatch.setenv("UNO_LCE_IMPL", gf)
    with pytest.raises(RuntimeError, match="UNO_LCE_IMPL='grad_in_forward' cannot run: reduction='none'"):
        run(h_grad, w_grad, reduction="none")
    monkeypatch.setenv("UNO_LCE_IMPL", "fast")
    with pytest.raises(ValueError, match="environment variable UNO_LCE_IMPL='fast': must be one of"):
        run(h_grad, weight)


@pytest.mark.parametrize(
    "kw",
    [
        dict(weight_grad=True, bias=True, softcap=6.0, label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
        dict(weight_grad=False, bias=False, softcap=None, label_smoothing=0.2, z_loss=0.0, reduction="none"),
    ],
    ids=["trainable_head_mean", "frozen_head_none"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_several_chunks(backend, kw, monkeypatch, device):
    # 5 chunks of 8 rows (the last partial), every option.
    monkeypatch.setenv("UNO_LCE_CHUNK_ROWS", "8")
    kw = dict(kw)
    hidden, weight, labels = _inputs(device, torch.float32, weight_grad=kw.pop("weight_grad"))
    bias = torch.randn(V, device=device, requires_grad=True) if kw.pop("bias") else None
    spy = _Spy(monkeypatch)
    _compare(backend, hidden, weight, labels, bias=bias, **kw)
    assert "grad_in_forward" in spy.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_hands_its_buffer_over_and_refuses_a_second_backward(backend, monkeypatch, device):
    hidden, weight, labels = _inputs(device, torch.float32, n=9, v=40, h=8)
    spy = _Spy(monkeypatch)
    h = hidden.clone().requires_grad_(True)
    loss = ops.linear_cross_entropy(h, weight, labels, backend=backend, label_smoothing=0.1)
    assert spy.calls == ["grad_in_forward"]
    loss.backward(retain_graph=True)
    # hidden.grad is the N x H buffer the forward filled: no second N x H in the backward.
    assert h.grad.data_ptr() == spy.dhidden.data_ptr()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    # the recompute path keeps the usual autograd behaviour
    h.grad = None
    loss = ops.linear_cross_entropy(h, weight, labels, backend=backend, label_smoothing=0.1, impl="recompute")
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_grad_in_forward_triton_cpu_memory(monkeypatch):
    """grad_in_forward holds one C x V logits chunk and the N x H gradient (which becomes hidden.grad), nothing
    N x V."""
    if not interpreter_enabled():
        pytest.skip("CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    n, v, h, rows = 256, 3000, 16, 32
    monkeypatch.setenv("UNO_LCE_CHUNK_ROWS", str(rows))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = torch.randn(v, h, generator=g) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)

    def step():
        ops.linear_cross_entropy(hidden, weight, labels, backend="triton", label_smoothing=0.1).backward()

    step()  # warm the kernels' caches outside the measurement
    hidden.grad = None
    peak, largest = _cpu_alloc_profile(step)
    chunk = rows * v * 4
    assert largest <= chunk, f"largest allocation {largest} B > one chunk {chunk} B"
    assert peak <= chunk + n * h * 4 + (32 << 10), f"peak {peak} B: more than a chunk and dhidden"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_loss_only_matches(backend, device):
    hidden, weight, labels = _inputs(device, torch.float32)
    kw = dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    with torch.no_grad():
        loss = ops.linear_cross_entropy(hidden, weight, labels, backend=backend, impl="grad_in_forward", **kw)
    ref = reference.linear_cross_entropy(hidden.double(), weight.double(), labels, **kw)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "backend, impl", [("torch", "grad_in_forward"), ("triton", "grad_in_forward"), ("triton", "recompute")]
)
def test_under_torch_compile(backend, impl, device):
    # One graph (fullgraph=True): the implementation is decided in Python before the custom op; under tracing
    # the grad_in_forward backward scales out of place. Same numbers as eager.
    hidden, weight, labels = _inputs(device, torch.float32, n=9, v=40, h=8)
    kw = dict(softcap=3.0, label_smoothing=0.1, reduction="sum", impl=impl)

    def f(h, w):
        return ops.linear_cross_entropy(h, w, labels, backend=backend, **kw)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (f, compiled):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_grad_in_forward_chunk_rows(monkeypatch):
    rows = lce_kernels.grad_in_forward_chunk_rows
    n, v, h = 8192, 152064, 3584  # the GPU target shape, bf16, frozen head
    c = rows(n, v, h, 2, False)
    assert c == 256
    # one logits chunk (the op's memory beyond the N x H gradient it returns) within 2% of the fp32 logits
    assert c * v * 2 <= 0.02 * n * v * 4
    assert rows(37, 1007, 33, 4, False) == 37  # never more than N
    assert rows(100_000, 2_000_000, 64, 4, False) == 64  # at least 64 rows
    assert rows(100_000, 1000, 64, 2, False) == 2048  # at most 2048 rows
    assert rows(n, v, h, 2, True) == 512  # trainable head: budget V*H*4/8 (the fp32 dW is 2.2 GB)


def test_torch_path_chunks():
    budget = _lce_torch.CHUNK_BYTES
    for n, v in ((37, 1007), (2048, 32000), (8192, 152064), (128, 32000), (1, 10**7)):
        c, vb = _lce_torch.block_shape(n, v)
        assert 1 <= c <= n and 1 <= vb <= v and c * vb * 4 <= budget, (n, v, c, vb)
        rows = _lce_torch.chunk_rows(n, v)
        assert 1 <= rows <= n and (rows * v * 4 <= budget or rows == 1), (n, v, rows)
    assert _lce_torch.block_shape(37, 1007) == (37, 1007)  # small problems: one block
    assert _lce_torch.block_shape(2048, 32000) == (1024, 1024)  # square: weight and rescale traffic balanced
    assert _lce_torch.block_shape(128, 32000) == (128, 8192)  # few tokens: the block widens to the budget
    assert _lce_torch.chunk_rows(2048, 32000) == budget // (32000 * 4)
    # the CPU memory bar: one block within 2% of the fp32 N x V logits at N=2048, V=32000
    assert budget <= 0.02 * 2048 * 32000 * 4


@pytest.mark.parametrize(
    "kw",
    [
        dict(softcap=None, label_smoothing=0.0, z_loss=0.0),
        dict(softcap=None, label_smoothing=0.2, z_loss=1e-3),
        dict(softcap=6.0, label_smoothing=0.1, z_loss=1e-3),
        dict(softcap=6.0, label_smoothing=0.0, z_loss=0.0),
    ],
    ids=["plain", "smoothing_zloss", "softcap_smoothing_zloss", "softcap"],
)
@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("impl", ["auto", "recompute"])
def test_torch_path_respects_the_byte_budget(impl, head, kw, monkeypatch):
    """With a budget of three full rows, every logits block the torch path forms fits it (blocks of 37 tokens
    x 81 classes: 13 class blocks, the last partial; grad_in_forward with a trainable head: full-row chunks,
    13 chunks of 3 tokens), and the results still equal the float64 reference."""
    budget = 4 * 3 * V
    monkeypatch.setattr(_lce_torch, "CHUNK_BYTES", budget)
    blocks = []
    logits = _lce_torch._logits

    def spy(h_c, w, b, softcap):
        z, t = logits(h_c, w, b, softcap)
        blocks.append(z.numel() * z.element_size() * (1 if t is None else 2))
        return z, t

    monkeypatch.setattr(_lce_torch, "_logits", spy)
    hidden, weight, labels = _inputs("cpu", torch.float32, weight_grad=head == "trainable")
    bias = torch.randn(V, requires_grad=head == "trainable")
    _compare(f"torch_{impl}" if impl != "auto" else "torch", hidden, weight, labels, bias=bias, **kw)
    assert len(blocks) > 5 and max(blocks) <= budget, (len(blocks), max(blocks))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    """Schema, fake tensors, autograd registration and AOTAutograd of the three registered ops."""
    hidden, weight, labels = _inputs(device, torch.float32, n=9, v=40, h=8, weight_grad=True)
    hidden.requires_grad_(True)
    bias = torch.randn(40, device=device, requires_grad=True)
    for reduction in ("mean", "none"):
        args = (hidden, weight, labels, bias, -100, 0.1, 1e-3, 2.0, reduction, backend, 0)
        torch.library.opcheck(_lce_ops.lce_forward.overload, args)
        loss, lse = _lce_ops.lce_forward(*args)
        grad = torch.ones_like(loss)
        torch.library.opcheck(
            _lce_ops.lce_backward.overload,
            (
                grad,
                hidden.detach(),
                weight.detach(),
                labels,
                bias.detach(),
                lse.detach(),
                *args[4:],
                True,
                True,
                True,
            ),
        )
    # Not test_aot_dispatch_dynamic for grad_in_forward: it compares the op's outputs after a backward, and the
    # eager backward scales the op's gradient outputs in place (they never leave ops.linear_cross_entropy,
    # which drops them). The compiled path through the public function is test_under_torch_compile.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in (
        (hidden, weight, labels, bias, -100, 0.1, 1e-3, 2.0, "mean", backend, 0, True, True, True),
        (hidden, weight.detach(), labels, None, -100, 0.0, 0.0, 0.0, "none", backend, 4, True, False, False),
    ):
        torch.library.opcheck(_lce_ops.lce_grad_in_forward.overload, args, test_utils=utils)
    # the in-place scale kernel of the eager backward
    x, g = torch.randn(9, 40, device=device), torch.rand(9, device=device)
    expect = x * g[:, None]
    lce_kernels.scale_rows_(x, g)
    torch.testing.assert_close(x, expect)
    expect = x * g[:1]
    lce_kernels.scale_rows_(x, g[:1])
    torch.testing.assert_close(x, expect)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors(device):
    hidden, weight, labels = _inputs(device, torch.float32)
    with pytest.raises(TypeError, match="weight dtype"):
        ops.linear_cross_entropy(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match="weight is on"):
        ops.linear_cross_entropy(hidden, weight.to("meta"), labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.linear_cross_entropy(hidden, weight, labels[:, None])
    with pytest.raises(TypeError, match="labels must be an integer"):
        ops.linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="bias must be"):
        ops.linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(V - 1, device=device))
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ops.linear_cross_entropy(hidden, weight, labels, backend="cuda")


def _bad_cases(device):
    """(id, kwargs of ops.linear_cross_entropy, error class, message pattern): every bad input is named."""
    hidden, weight, labels = _inputs(device, torch.float32, n=6, v=20, h=8)
    lab = labels.clone()
    lab[4] = 20
    return [
        ("hidden_rank_1", dict(hidden=hidden[0], labels=labels[0]), ValueError, "hidden must be"),
        ("hidden_rank_4", dict(hidden=hidden[None, None]), ValueError, "hidden must be"),
        ("hidden_int", dict(hidden=hidden.long()), TypeError, "hidden must be floating"),
        ("weight_dtype", dict(weight=weight.half()), TypeError, "weight dtype"),
        ("weight_shape", dict(weight=weight[:, :-1]), ValueError, "weight must be"),
        ("weight_device", dict(weight=weight.to("meta")), ValueError, "weight is on"),
        ("weight_empty_vocab", dict(weight=weight[:0]), ValueError, "V >= 1"),
        ("no_features", dict(hidden=hidden[:, :0], weight=weight[:, :0]), ValueError, "H >= 1"),
        ("labels_shape", dict(labels=labels[:-1]), ValueError, "labels must have shape"),
        ("labels_float", dict(labels=labels.float()), TypeError, "labels must be an integer"),
        ("labels_bool", dict(labels=labels > 0), TypeError, "labels must be an integer"),
        ("labels_device", dict(labels=labels.to("meta")), ValueError, "labels is on"),
        ("labels_out_of_range", dict(labels=lab), ValueError, r"labels\[4\] = 20"),
        ("bias_shape", dict(bias=torch.zeros(19, device=device)), ValueError, "bias must be"),
        (
            "bias_dtype",
            dict(bias=torch.zeros(20, device=device, dtype=torch.float64)),
            TypeError,
            "bias dtype",
        ),
        ("smoothing_range", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        ("smoothing_nan", dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        ("z_loss_negative", dict(z_loss=-1.0), ValueError, "z_loss"),
        ("z_loss_nan", dict(z_loss=float("nan")), ValueError, "z_loss"),
        ("softcap_zero", dict(softcap=0.0), ValueError, "softcap"),
        ("softcap_inf", dict(softcap=float("inf")), ValueError, "softcap"),
        ("ignore_index_float", dict(ignore_index=-100.0), TypeError, "ignore_index"),
        ("reduction", dict(reduction="avg"), ValueError, "reduction"),
        ("impl", dict(impl="fast"), ValueError, "impl must be one of"),
    ], dict(hidden=hidden, weight=weight, labels=labels)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_table(backend, grad, device):
    """The same error class and message on both backends, with and without a gradient."""
    cases, base = _bad_cases(device)
    for name, kw, err, pattern in cases:
        args = {**base, **kw}
        if grad and args["hidden"].is_floating_point():
            args["hidden"] = args["hidden"].detach().requires_grad_(True)
        h, w, y = args.pop("hidden"), args.pop("weight"), args.pop("labels")
        with pytest.raises(err, match=pattern):
            ops.linear_cross_entropy(h, w, y, backend=backend, **args)
            pytest.fail(f"{name}: no error")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_edge_results_agree_across_backends(reduction, device):
    """Documented results, identical on both backends and both implementations: zero tokens (0, or an empty
    per-token loss, and empty gradients); a NaN in a non-ignored token's hidden makes that token's loss NaN
    (never dropped); a NaN in an ignored token's hidden does not reach the loss."""
    _, weight, _ = _inputs(device, torch.float32, n=6, v=20, h=8)
    hidden = torch.randn(4, 8, device=device)
    labels = torch.tensor([1, -100, 3, 4], device=device)
    hidden[2, 0] = float("nan")  # a counted token
    hidden[1, 0] = float("nan")  # an ignored token
    results = {}
    for backend in BACKENDS_ALL:
        h0 = torch.zeros(0, 8, device=device, requires_grad=True)
        loss0 = _lce(
            h0, weight, torch.zeros(0, dtype=torch.long, device=device), backend=backend, reduction=reduction
        )
        loss0.sum().backward()
        assert loss0.shape == ((0,) if reduction == "none" else ()), backend
        assert reduction == "none" or loss0.item() == 0.0, backend
        assert h0.grad.shape == (0, 8), backend
        with torch.no_grad():
            results[backend] = _lce(hidden, weight, labels, backend=backend, reduction="none")
    for backend, r in results.items():
        assert torch.isnan(r).tolist() == [False, False, True, False], (backend, r)
        assert r[1].item() == 0.0, (backend, r)
        torch.testing.assert_close(r[[0, 3]], results["torch"][[0, 3]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS_ALL)
def test_label_out_of_range_cpu(backend):
    if backend.startswith("triton") and not interpreter_enabled():
        pytest.skip(
            "CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1; on a GPU machine "
            "test_label_out_of_range_cuda_raises_without_sync covers the kernel path"
        )
    hidden, weight, labels = _inputs("cpu", torch.float32)
    for bad in (V, V + 5, -3):
        lab = labels.clone()
        lab[4] = bad
        with pytest.raises(ValueError, match=r"labels\[4\]"):
            _lce(hidden, weight, lab, backend=backend)
        with pytest.raises(ValueError, match=r"labels\[4\]"):  # with a gradient: grad_in_forward
            _lce(hidden.requires_grad_(True), weight, lab, backend=backend)
        hidden.requires_grad_(False)


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True], ids=["recompute", "grad_in_forward"])
def test_label_out_of_range_cuda_raises_without_sync(grad):
    # A device-side assert poisons the CUDA context, so it runs in a child process.
    code = textwrap.dedent(f"""
        import torch
        from uno_engine import ops
        h = torch.randn(8, 16, device="cuda").requires_grad_({grad}); w = torch.randn(50, 16, device="cuda")
        y = torch.zeros(8, dtype=torch.long, device="cuda"); y[3] = 50
        loss = ops.linear_cross_entropy(h, w, y)   # returns without a host sync
        torch.cuda.synchronize()                   # the assert surfaces here
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "labels must be in" in r.stderr or "device-side assert" in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- memory


def _cpu_alloc_profile(fn) -> tuple[int, int]:
    """(peak live bytes above the start, largest single allocation) of every CPU allocation made by fn(),
    inside custom ops and the backward included (from the profiler's allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    events.sort()
    live = peak = largest = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
        largest = max(largest, size)
    return peak, largest


@pytest.mark.slow
def test_cpu_memory_torch_path():
    """The op's peak extra memory <= 2% of the eager fp32 N x V logits (torch path, CPU, N=2048, V=32000), for
    both implementations. Extra = peak live bytes above the start minus the returned dhidden. Fails if N x V
    logits ever exist."""
    n, v, h = 2048, 32000, 32  # H=1024 runs in the benchmark (H sets the size of dhidden)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = torch.randn(v, h, generator=g) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    logits_bytes = n * v * 4

    def step(impl):
        hidden.grad = None
        loss = ops.linear_cross_entropy(
            hidden, weight, labels, backend="torch", label_smoothing=0.1, impl=impl
        )
        loss.backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small chunk ops: on a shared 2-core runner, 1 thread is ~10x faster
    try:
        for impl in ("grad_in_forward", "recompute"):
            peak, largest = _cpu_alloc_profile(lambda impl=impl: step(impl))
            extra = peak - n * h * 4
            assert largest <= max(n * h * 4, logits_bytes / 50), f"{impl}: largest allocation {largest} B"
            assert extra <= 0.02 * logits_bytes, f"{impl}: peak extra {extra / 2**20:.2f} MiB > 2% of logits"
    finally:
        torch.set_num_threads(threads)
    # the measurement itself sees a full-logits computation
    small = hidden[:256].detach()
    _, largest_eager = _cpu_alloc_profile(lambda: reference.linear_cross_entropy(small, weight, labels[:256]))
    assert largest_eager >= 256 * v * 4


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["grad_in_forward", "recompute"])
def test_cuda_memory_target_shape(impl):
    """On a GPU: bf16, frozen head, N=8192, V=152064, H=3584; peak extra <= 2% of the fp32 logits.
    Extra = peak allocated above the start minus the returned dhidden (grad_in_forward's N x H gradient is
    held from the forward on and becomes hidden.grad)."""
    n, v, h = 8192, 152064, 3584
    hidden = (torch.randn(n, h, device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    labels = torch.randint(0, v, (n,), device="cuda")
    with _env(UNO_LCE_IMPL=None, UNO_LCE_CHUNK_ROWS=None):
        ops.linear_cross_entropy(
            hidden, weight, labels, backend="triton", impl=impl
        ).backward()  # compile first
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        ops.linear_cross_entropy(hidden, weight, labels, backend="triton", impl=impl).backward()
    torch.cuda.synchronize()
    total = torch.cuda.max_memory_allocated() - start
    extra = total - hidden.grad.numel() * hidden.grad.element_size()
    bar = 0.02 * n * v * 4
    # the bar is on the op's memory beyond the dhidden it returns (every implementation, eager included,
    # returns that N x H gradient); the total with it is reported by benchmarks/bench_linear_cross_entropy.py
    assert extra <= bar, f"peak extra {extra / 2**20:.1f} MiB > 2% of {n * v * 4 / 2**20} MiB"
