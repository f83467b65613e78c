"""regression_loss / fused_regression: Triton (interpreter on CPU) and torch paths against autograd through
the float64 reference; tolerance = 2x the float32 reference's own error + a small atol."""

import pytest
import torch

from uno_engine import ops, reference
from uno_engine.ops.regression import RegressionTerm

KINDS = ["mse", "smooth_l1", "cosine"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest sets it)


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor of these tests on DEV (CUDA when present: compiled kernels, no interpreter)."""
    with torch.device(DEV):
        yield


def assert_close(actual, expected64, ref32, *, atol=1e-6, name=""):
    """|actual - expected| <= 2 |ref32 - expected| + atol (+ fp32 rounding); prints the worst index."""
    actual, ref32 = actual.double(), ref32.double()
    err = (actual - expected64).abs()
    allowed = 2 * (ref32 - expected64).abs() + atol + 2e-6 * expected64.abs()
    bad = err > allowed
    if bad.any():
        i = torch.argmax((err - allowed).flatten()).item()
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} / {err.numel()} mismatches; worst at {idx}: "
            f"got {actual.flatten()[i].item():.8g}, want {expected64.flatten()[i].item():.8g}, "
            f"allowed {allowed.flatten()[i].item():.3g}"
        )


def _mask(kind, shape, variant, gen):
    lshape = shape[:-1] if kind == "cosine" else shape
    if variant is None:
        return None
    if variant == "bool":
        return torch.rand(lshape, generator=gen) > 0.4
    if variant == "rowwise":  # broadcast: (..., 1) for elementwise kinds, per row for cosine
        s = lshape if kind == "cosine" else (*shape[:-1], 1)
        return torch.rand(s, generator=gen)
    if variant == "zeros":
        return torch.zeros(lshape)
    raise AssertionError(variant)


def _weight(kind, shape, variant, gen):
    if variant is None:
        return None
    if variant == "scalar":
        return 0.7
    lshape = shape[:-1] if kind == "cosine" else shape
    return torch.rand(lshape, generator=gen) + 0.5


def _check_against_reference(pred, target, *, kind, weight, mask, beta, backend, tgt_grad=False):
    p = pred.clone().requires_grad_(True)
    y = target.clone().requires_grad_(tgt_grad)
    loss = ops.regression_loss(p, y, kind=kind, weight=weight, mask=mask, beta=beta, backend=backend)
    grads = torch.autograd.grad(loss, [p, y] if tgt_grad else [p])

    def ref(dtype):
        p64 = pred.detach().to(dtype).requires_grad_(True)
        y64 = target.detach().to(dtype).requires_grad_(tgt_grad)
        w = weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
        m = mask.to(dtype) if isinstance(mask, torch.Tensor) else mask
        l = reference.regression_loss(p64, y64, kind=kind, weight=w, mask=m, beta=beta)
        return l, torch.autograd.grad(l, [p64, y64] if tgt_grad else [p64])

    l64, g64 = ref(torch.float64)
    l32, g32 = ref(torch.float32)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss.detach(), l64.detach(), l32.detach(), name=f"{kind} loss")
    for name, g, e, r in zip(("pred grad", "target grad"), grads, g64, g32, strict=False):
        assert g.shape == pred.shape and g.dtype == pred.dtype
        assert_close(g, e, r, name=f"{kind} {name}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(37,), (3, 33, 17), (2, 5, 1)])
@pytest.mark.parametrize("mask", [None, "bool", "rowwise"])
def test_regression_loss_triton_matches_reference(kind, shape, mask):
    gen = torch.Generator(DEV).manual_seed(1)
    pred, target = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    m = _mask(kind, shape, mask, gen)
    _check_against_reference(pred, target, kind=kind, weight=None, mask=m, beta=0.6, backend="triton")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight", ["scalar", "tensor"])
def test_regression_loss_weights_and_target_grad(kind, weight):
    gen = torch.Generator(DEV).manual_seed(2)
    shape = (4, 7, 19)
    pred, target = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    _check_against_reference(
        pred,
        target,
        kind=kind,
        weight=_weight(kind, shape, weight, gen),
        mask=_mask(kind, shape, "bool", gen),
        beta=1.0,
        backend="triton",
        tgt_grad=True,
    )


@pytest.mark.parametrize("beta", [0.0, 0.05, 3.0])
def test_smooth_l1_beta(beta):
    gen = torch.Generator(DEV).manual_seed(3)
    pred, target = torch.randn(5, 33, generator=gen), torch.randn(5, 33, generator=gen)
    target[0, :4] = pred[0, :4]  # d == 0 exactly
    _check_against_reference(
        pred, target, kind="smooth_l1", weight=None, mask=None, beta=beta, backend="triton"
    )


def test_cosine_zero_rows_and_extremes():
    pred = torch.randn(6, 33)
    target = torch.randn(6, 33)
    pred[1] = 0.0  # |p| < eps: the norm floor
    target[2] = 0.0
    pred[3] *= 1e4
    target[4] *= 1e-3
    _check_against_reference(
        pred, target, kind="cosine", weight=None, mask=None, beta=1.0, backend="triton", tgt_grad=True
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_zero_mask_gives_zero_not_nan(kind, backend):
    pred = torch.randn(3, 9, requires_grad=True)
    target = torch.randn(3, 9)
    mask = torch.zeros(3) if kind == "cosine" else torch.zeros(3, 9)
    loss = ops.regression_loss(pred, target, kind=kind, mask=mask, backend=backend)
    (g,) = torch.autograd.grad(loss, pred)
    assert loss.item() == 0.0
    assert torch.all(g == 0)


def test_non_contiguous_inputs():
    gen = torch.Generator(DEV).manual_seed(4)
    base = torch.randn(17, 6, 9, generator=gen)
    pred = base.transpose(0, 2)  # (9, 6, 17), last-dim stride != 1
    target = torch.randn(9, 17, 6, generator=gen).transpose(1, 2)
    mask = (torch.rand(9, 1, 17, generator=gen) > 0.5).expand(9, 6, 17)
    for kind in KINDS:
        m = mask[..., 0] if kind == "cosine" else mask
        _check_against_reference(
            pred, target, kind=kind, weight=None, mask=m, beta=0.5, backend="triton", tgt_grad=True
        )


def test_sum_reduction_and_none_falls_back():
    pred, target = torch.randn(4, 11), torch.randn(4, 11)
    s = ops.regression_loss(pred, target, reduction="sum", backend="triton")
    torch.testing.assert_close(s, ((pred - target) ** 2).sum(), rtol=1e-5, atol=1e-5)
    none = ops.regression_loss(pred, target, reduction="none", backend="auto")
    torch.testing.assert_close(none, (pred - target) ** 2)
    with pytest.raises(RuntimeError, match="reduction='none'"):
        ops.regression_loss(pred, target, reduction="none", backend="triton")


def _make_terms(gen, dtype2=torch.float16):
    t1 = RegressionTerm(
        torch.randn(2, 13, 37, generator=gen).requires_grad_(),
        torch.randn(2, 13, 37, generator=gen),
        "mse",
        0.5,
        (torch.rand(2, 13, 1, generator=gen) > 0.3),
    )
    t2 = RegressionTerm(
        torch.randn(2, 13, generator=gen).requires_grad_(),
        torch.randn(2, 13, generator=gen),
        "smooth_l1",
        2.0,
        None,
        0.3,
    )
    t3 = RegressionTerm(
        torch.randn(2, 13, 70, generator=gen).requires_grad_(),
        torch.randn(2, 13, 70, generator=gen).requires_grad_(),
        "cosine",
        torch.rand(2, 13, generator=gen),
        torch.rand(2, 13, generator=gen) > 0.2,
    )
    t4 = RegressionTerm(
        torch.randn(3, 5, generator=gen).to(dtype2).requires_grad_(),
        torch.randn(3, 5, generator=gen).to(dtype2),
        "mse",
        1.0,
        None,
    )
    return [t1, t2, t3, t4]


def test_fused_regression_matches_reference():
    gen = torch.Generator(DEV).manual_seed(5)
    terms = _make_terms(gen)
    total, per_term = ops.fused_regression(terms, backend="triton")
    assert total.shape == () and per_term.shape == (4,) and not per_term.requires_grad
    leaves = [terms[0].pred, terms[1].pred, terms[2].pred, terms[2].target, terms[3].pred]
    grads = torch.autograd.grad(total, leaves)

    def ref(dtype):
        rterms = [
            RegressionTerm(
                t.pred.detach().to(dtype).requires_grad_(),
                t.target.detach().to(dtype).requires_grad_(t.target.requires_grad),
                t.kind,
                t.weight.to(dtype) if isinstance(t.weight, torch.Tensor) else t.weight,
                t.mask,
                t.beta,
            )
            for t in terms
        ]
        tot, per = reference.fused_regression(rterms)
        rl = [rterms[0].pred, rterms[1].pred, rterms[2].pred, rterms[2].target, rterms[3].pred]
        return tot, per, torch.autograd.grad(tot, rl)

    t64, p64, g64 = ref(torch.float64)
    t32, p32, g32 = ref(torch.float32)
    assert_close(total.detach(), t64, t32, name="total")
    assert_close(per_term, p64, p32, name="per_term")
    for i, (g, e, r) in enumerate(zip(grads, g64, g32, strict=False)):
        if g.dtype == torch.float16:  # stored in the pred's dtype: fp16 rounding of the gradient
            torch.testing.assert_close(g.double(), e, rtol=2e-3, atol=1e-5, msg=f"grad {i}")
        else:
            assert_close(g, e, r, name=f"grad {i}")


def test_fused_regression_torch_backend_and_no_grad():
    gen = torch.Generator(DEV).manual_seed(6)
    terms = _make_terms(gen, dtype2=torch.float32)
    total_t, per_t = ops.fused_regression(terms, backend="torch")
    with torch.no_grad():
        total_k, per_k = ops.fused_regression(terms, backend="triton")
    assert not total_k.requires_grad
    torch.testing.assert_close(total_k, total_t.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_k, per_t, rtol=1e-5, atol=1e-6)


def test_backward_scales_by_grad_output_and_retains():
    pred = torch.randn(5, 21, requires_grad=True)
    target = torch.randn(5, 21)
    loss = ops.regression_loss(pred, target, kind="mse", backend="triton")
    (g1,) = torch.autograd.grad(loss * 3.0, pred, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(g1, 3.0 * g2)
    torch.testing.assert_close(g2, 2 * (pred - target).detach() / pred.numel())


def test_target_without_grad_gets_none():
    pred = torch.randn(4, 9, requires_grad=True)
    target = torch.randn(4, 9)
    total, _ = ops.fused_regression([RegressionTerm(pred, target, "mse")], backend="triton")
    total.backward()
    assert target.grad is None and pred.grad is not None


def test_custom_op_opcheck():
    from uno_engine.ops.regression import _fused_regression_fwd

    p = torch.randn(3, 8, requires_grad=True)
    y = torch.randn(3, 8)
    m = (torch.rand(3, 1) > 0.5).float()
    none = torch.empty(0)
    torch.library.opcheck(
        _fused_regression_fwd,
        ([p], [y], [m], [none], [0], [1.0], [0.5], [True], [False]),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize(
    "call, match, exc",
    [
        (lambda: ops.regression_loss(torch.randn(3, 4), torch.randn(3, 5)), "target has shape", ValueError),
        (lambda: ops.regression_loss(torch.randn(3, 4), torch.randn(3, 4), kind="l3"), "kind", ValueError),
        (
            lambda: ops.regression_loss(torch.randn(3, 4), torch.randn(3, 4), mask=torch.ones(5)),
            "mask",
            ValueError,
        ),
        (
            lambda: ops.regression_loss(
                torch.randn(3, 4), torch.randn(3, 4), kind="cosine", weight=torch.ones(4)
            ),
            "weight",
            ValueError,
        ),
        (lambda: ops.regression_loss(torch.randn(3, 4), torch.randn(3, 4), beta=-1.0), "beta", ValueError),
        (
            lambda: ops.regression_loss(torch.randn(3, 4), torch.randn(3, 4), reduction="max"),
            "reduction",
            ValueError,
        ),
        (lambda: ops.regression_loss(torch.ones(3, dtype=torch.long), torch.ones(3)), "pred", TypeError),
        (
            lambda: ops.fused_regression([RegressionTerm(torch.randn(2, 3), torch.randn(3, 2))]),
            r"terms\[0\].target",
            ValueError,
        ),
        (lambda: ops.fused_regression([]), "terms", ValueError),
        (
            lambda: ops.regression_loss(torch.randn(3, 4), torch.randn(3, 4), backend="cuda"),
            "backend",
            ValueError,
        ),
    ],
)
def test_bad_inputs(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


def test_triton_refuses_weight_requiring_grad_and_auto_falls_back():
    pred, target = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    w = torch.rand(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        ops.fused_regression([RegressionTerm(pred, target, "mse", w)], backend="triton")
    total, _ = ops.fused_regression([RegressionTerm(pred, target, "mse", w)], backend="auto")
    total.backward()
    assert w.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_regression_cuda(dtype):
    gen = torch.Generator("cuda").manual_seed(7)
    shape = (4, 729, 1152)
    terms = [
        RegressionTerm(
            torch.randn(shape, device="cuda", generator=gen).to(dtype).requires_grad_(),
            torch.randn(shape, device="cuda", generator=gen).to(dtype),
            k,
            0.5 + i,
            torch.rand(shape[:-1], device="cuda", generator=gen) > 0.3
            if k == "cosine"
            else (torch.rand(*shape[:-1], 1, device="cuda", generator=gen) > 0.3),
        )
        for i, k in enumerate(KINDS)
    ]
    total, per = ops.fused_regression(terms, backend="triton")
    grads = torch.autograd.grad(total, [t.pred for t in terms])
    rterms = [
        RegressionTerm(t.pred.detach().double().requires_grad_(), t.target.double(), t.kind, t.weight, t.mask)
        for t in terms
    ]
    rt, rp = reference.fused_regression(rterms)
    rg = torch.autograd.grad(rt, [t.pred for t in rterms])
    torch.testing.assert_close(per.double(), rp.double(), rtol=1e-4, atol=1e-6)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for g, r in zip(grads, rg, strict=False):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())
