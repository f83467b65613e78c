"""regression_loss / fused_regression: Triton (interpreter on CPU) and torch paths against autograd through
the float64 reference; tolerance = 2x the float32 reference's own error + a small atol."""

import math

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
    """Schema, fake tensors, autograd registration and AOTAutograd (forward + backward) of the op."""
    from uno_engine.ops.regression import fused_regression_fwd

    p = torch.randn(3, 8, requires_grad=True)
    y = torch.randn(3, 8)
    m = torch.rand(3, 1) > 0.5
    p2 = torch.randn(2, 5, requires_grad=True)
    y2 = torch.randn(2, 5, requires_grad=True)
    # layout: mean, then (kind, has_mask, has_weight, grad_pred, grad_target) per term
    layout = [1, 0, 1, 0, 1, 0, 2, 0, 0, 1, 1]
    args = ([p, y, m, p2, y2], layout, [1.0, 0.5, 1.0, 2.0])
    torch.library.opcheck(fused_regression_fwd.overload, args)
    total, _, grads = fused_regression_fwd(*args)
    assert len(grads) == 3


def _terms_vs_reference(terms, config=None, *, check_plan=None):
    """fused_regression (Triton) against autograd through the float64 and float32 references."""
    ctx = ops.regression.kernel_config_override(config) if config else torch.enable_grad()
    with ctx:
        total, per_term = ops.fused_regression(terms, backend="triton")
    leaves = [x for t in terms for x in (t.pred, t.target) if x.requires_grad]
    grads = torch.autograd.grad(total, leaves)

    def ref(dtype):
        rterms = [
            RegressionTerm(
                t.pred.detach().to(dtype).requires_grad_(t.pred.requires_grad),
                t.target.detach().to(dtype).requires_grad_(t.target.requires_grad),
                t.kind,
                t.weight.to(dtype) if isinstance(t.weight, torch.Tensor) else t.weight,
                t.mask,
                t.beta,
            )
            for t in terms
        ]
        tot, per = reference.fused_regression(rterms)
        rl = [x for t in rterms for x in (t.pred, t.target) if x.requires_grad]
        return tot, per, torch.autograd.grad(tot, rl)

    t64, p64, g64 = ref(torch.float64)
    t32, p32, g32 = ref(torch.float32)
    assert_close(total.detach(), t64, t32, name="total")
    assert_close(per_term, p64, p32, name="per_term")
    for i, (g, e, r) in enumerate(zip(grads, g64, g32, strict=True)):
        assert g.shape == e.shape
        assert_close(g, e, r, name=f"grad {i}")


def _plans_for(terms, config):
    """The launch plan the op builds for these terms (kind, FAST, BLOCK_R, BLOCK_D, mask / weight modes)."""
    from uno_engine.ops import _regression_ops, _regression_plan

    with _regression_plan.kernel_config_override(config) as cfg:
        tensors, layout, _ = [], [1], []
        for t in terms:
            tensors += [t.pred, t.target] + [x for x in (t.mask, t.weight) if isinstance(x, torch.Tensor)]
            layout += [
                _regression_ops.KIND_IDS[t.kind],
                int(t.mask is not None),
                int(isinstance(t.weight, torch.Tensor)),
                1,
                0,
            ]
        plan = _regression_plan._build_plan(tensors, layout, tensors[0].device, cfg)
    return [tp for chunk in plan.chunks for tp in chunk]


FAST_CFG = "tile=64,cos_tile=64,group=2"  # small tiles: many tiles and grid-stride steps on tiny shapes


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
def test_fast_path_row_masks_and_flat_terms(kind):
    """The streaming case: contiguous (R, D) with D % 16 == 0 and R % BLOCK_R == 0 (no bounds masks), a
    per-row mask and per-row weight (one load per tile row), and a term with no mask read flat."""
    gen = torch.Generator(DEV).manual_seed(8)
    shape = (4, 8, 32)
    terms = [
        RegressionTerm(
            torch.randn(shape, generator=gen).requires_grad_(),
            torch.randn(shape, generator=gen),
            kind,
            torch.rand(4, 8, 1, generator=gen) + 0.5,
            torch.rand(4, 8, 1, generator=gen) > 0.3,
            0.4,
        ),
        RegressionTerm(
            torch.randn(4, 48, generator=gen).requires_grad_(), torch.randn(4, 48, generator=gen), kind
        ),
    ]
    plans = _plans_for(terms, FAST_CFG)
    assert [p.flags[5] for p in plans] == [True, True], "both terms take the no-bounds-mask path"
    assert plans[0].modes == (1, 1) and plans[0].flags[7] == 32  # per-row mask and weight, BLOCK_D = 32
    assert (plans[1].R, plans[1].D) == (3, 64)  # no mask / weight: the 192 elements read as (3, 64)
    _terms_vs_reference(terms, FAST_CFG)


@pytest.mark.parametrize(
    "config",
    ["tile=64,cos_tile=64,group=1", "tile=64,cos_tile=64,per_sm=2", "tile=32,cos_tile=32,cos_max_d=16"],
)
def test_general_path_grid_modes_and_two_pass_cosine(config):
    """Odd shapes, elementwise (2-D) masks and weights, a target that needs a gradient, mixed dtypes; one
    program per tile, persistent programs, and cosine rows wider than cos_max_d (two passes over D)."""
    gen = torch.Generator(DEV).manual_seed(9)
    terms = [
        RegressionTerm(
            torch.randn(3, 7, 37, generator=gen).requires_grad_(),
            torch.randn(3, 7, 37, generator=gen).requires_grad_(),
            "smooth_l1",
            torch.rand(7, 37, generator=gen)
            + 0.5,  # broadcast over the batch: a (R, D) view with row stride 37
            torch.rand(3, 7, 37, generator=gen) > 0.4,
            0.7,
        ),
        RegressionTerm(
            torch.randn(5, 37, generator=gen).requires_grad_(),
            torch.randn(5, 37, generator=gen).requires_grad_(),
            "cosine",
            torch.rand(5, generator=gen) + 0.5,
            torch.rand(5, generator=gen) > 0.3,
        ),
        RegressionTerm(
            torch.randn(2, 3, 17, generator=gen).to(torch.float16).requires_grad_(),
            torch.randn(2, 3, 17, generator=gen),
            "mse",
            2.0,
            torch.rand(2, 1, 1, generator=gen),  # a copy (no single row stride): (2, 3) rows
        ),
    ]
    plans = _plans_for(terms, config)
    assert not plans[0].flags[5] and plans[0].modes == (2, 2)
    assert plans[1].flags[5] == ("cos_max_d" not in config)
    assert plans[2].modes == (1, 0)
    fp16 = terms[2]
    terms[2] = RegressionTerm(fp16.pred.float().detach().requires_grad_(), fp16.target, "mse", 2.0, fp16.mask)
    _terms_vs_reference(terms, config)
    with ops.regression.kernel_config_override(config):  # the fp16 pred: its gradient is stored in fp16
        k_total, k_per = ops.fused_regression([fp16], backend="triton")
        (g,) = torch.autograd.grad(k_total, fp16.pred)
    r_total, _ = reference.fused_regression([fp16])
    (rg,) = torch.autograd.grad(r_total, fp16.pred)
    assert g.dtype == torch.float16
    torch.testing.assert_close(k_total, r_total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), rg.float(), rtol=2e-3, atol=1e-6)


def test_more_terms_than_one_launch_takes():
    """6 terms: two forward launches (4 + 2), the total over both; 6 gradients: two backward launches."""
    gen = torch.Generator(DEV).manual_seed(10)
    kinds = ["mse", "cosine", "smooth_l1", "mse", "cosine", "smooth_l1"]
    terms = [
        RegressionTerm(
            torch.randn(3, 4 + i, generator=gen).requires_grad_(),
            torch.randn(3, 4 + i, generator=gen),
            k,
            0.5 + i,
            (torch.rand(3, generator=gen) > 0.3) if k == "cosine" else None,
        )
        for i, k in enumerate(kinds)
    ]
    _terms_vs_reference(terms, "tile=32,cos_tile=32")


def test_tensor_weight_sum_reduction_and_direct_op_call():
    gen = torch.Generator(DEV).manual_seed(11)
    pred = torch.randn(4, 19, generator=gen, requires_grad=True)
    target = torch.randn(4, 19, generator=gen)
    w = torch.tensor(0.3)
    # 0-d tensor weight: scales outside the kernel, with grad through the per-term loss
    pred2 = pred.detach().clone().requires_grad_()
    _terms_vs_reference([RegressionTerm(pred, target, "mse", w), RegressionTerm(pred2, target, "cosine")])
    s = ops.regression_loss(
        pred, target, kind="smooth_l1", weight=w, beta=0.2, reduction="sum", backend="triton"
    )
    r = reference.regression_loss(pred, target, kind="smooth_l1", weight=w, beta=0.2, reduction="sum")
    torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*(torch.autograd.grad(x, pred)[0] for x in (s, r)), rtol=1e-5, atol=1e-7)
    # the op called directly: its layout flags decide which gradients it forms (the target's too); an input
    # that requires grad without its flag is an error at the backward, not a silent None
    from uno_engine.ops.regression import fused_regression_fwd

    y = target.clone().requires_grad_()
    total, stats, grads = fused_regression_fwd([pred, y], [1, 0, 0, 0, 1, 1], [1.0, 1.0])
    assert len(grads) == 2 and stats.shape == (2,)
    gp, gy = torch.autograd.grad(total, [pred, y])
    torch.testing.assert_close(gp, -gy)
    torch.testing.assert_close(gp, 2 * (pred - target).detach() / pred.numel())
    total, _, grads = fused_regression_fwd([pred, y], [1, 0, 0, 0, 1, 0], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="target requires grad but the forward formed no gradient"):
        torch.autograd.grad(total, [pred, y])


def test_op_compiles_fullgraph():
    """The op under torch.compile (AOTAutograd, fake tensors, the backward op traced): one graph, same
    numbers as eager."""
    from uno_engine.ops._regression_ops import run_terms

    gen = torch.Generator(DEV).manual_seed(12)
    p = torch.randn(3, 5, 32, generator=gen, requires_grad=True)
    y = torch.randn(3, 5, 32, generator=gen)
    m = torch.rand(3, 5, generator=gen) > 0.3

    def f(p, y, m):
        total, per = run_terms(
            [RegressionTerm(p, y, "mse", 0.5), RegressionTerm(p, y, "cosine", 1.0, m)], True
        )
        return total * 2, per

    outs = []
    for fn in (torch.compile(f, backend="aot_eager", fullgraph=True), f):
        total, per = fn(p, y, m)
        outs.append((total, per, torch.autograd.grad(total, p)[0]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "text, match",
    [("tile=100", "power of two"), ("tiles=64", "bad regression config"), ("per_sm=-2", "per_sm")],
)
def test_bad_kernel_config(text, match):
    from uno_engine.kernels.regression import RegressionConfig

    with pytest.raises(ValueError, match=match):
        RegressionConfig.parse(text)
    assert RegressionConfig.parse("tile=8192, num_warps=8").label() == "tile=8192,num_warps=8"


def _x(*shape, **kw):
    return torch.randn(*shape, **kw)


# (id, call(backend), error class, message pattern): each bad input is named, identically on both backends
BAD_INPUTS = [
    ("shape", lambda b: ops.regression_loss(_x(3, 4), _x(3, 5), backend=b), ValueError, "target has shape"),
    ("kind", lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), kind="l3", backend=b), ValueError, "kind"),
    (
        "mask_shape",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), mask=torch.ones(5), backend=b),
        ValueError,
        "mask of shape",
    ),
    (
        "mask_per_element_for_cosine",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), kind="cosine", mask=torch.ones(3, 4), backend=b),
        ValueError,
        "mask of shape",
    ),
    (
        "mask_device",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), mask=torch.ones(3, 4, device="meta"), backend=b),
        ValueError,
        "mask is on meta",
    ),
    (
        "mask_type",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), mask=[1, 0, 1], backend=b),
        TypeError,
        "mask must be None",
    ),
    (
        "weight_shape_for_cosine",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), kind="cosine", weight=torch.ones(4), backend=b),
        ValueError,
        "weight of shape",
    ),
    (
        "beta_negative",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), beta=-1.0, backend=b),
        ValueError,
        "beta",
    ),
    (
        "beta_nan",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), beta=float("nan"), backend=b),
        ValueError,
        "beta",
    ),
    (
        "reduction",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4), reduction="max", backend=b),
        ValueError,
        "reduction",
    ),
    (
        "pred_int",
        lambda b: ops.regression_loss(torch.ones(3, dtype=torch.long), torch.ones(3), backend=b),
        TypeError,
        "pred must be a floating",
    ),
    (
        "target_int",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4).long(), backend=b),
        TypeError,
        "target must be a floating",
    ),
    (
        "target_device",
        lambda b: ops.regression_loss(_x(3, 4), _x(3, 4, device="meta"), backend=b),
        ValueError,
        "target is on meta",
    ),
    (
        "pred_not_tensor",
        lambda b: ops.regression_loss([1.0, 2.0], _x(2), backend=b),
        TypeError,
        "pred must be",
    ),
    (
        "terms_target_shape",
        lambda b: ops.fused_regression([RegressionTerm(_x(2, 3), _x(3, 2))], backend=b),
        ValueError,
        r"terms\[0\].target",
    ),
    ("terms_empty", lambda b: ops.fused_regression([], backend=b), ValueError, "terms"),
    (
        "terms_second_bad",
        lambda b: ops.fused_regression(
            [RegressionTerm(_x(2, 3), _x(2, 3)), RegressionTerm(_x(3), _x(2))], backend=b
        ),
        ValueError,
        r"terms\[1\].target",
    ),
    (
        "terms_mask_mismatch",
        lambda b: ops.fused_regression(
            [RegressionTerm(_x(2, 3), _x(2, 3), mask=torch.ones(3, 2))], backend=b
        ),
        ValueError,
        r"terms\[0\].mask of shape",
    ),
    (
        "terms_not_terms",
        lambda b: ops.fused_regression([(_x(2), _x(2))], backend=b),
        TypeError,
        "RegressionTerm",
    ),
    (
        "terms_devices",
        lambda b: ops.fused_regression(
            [RegressionTerm(_x(2), _x(2)), RegressionTerm(_x(2, device="meta"), _x(2, device="meta"))],
            backend=b,
        ),
        ValueError,
        "one device",
    ),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_table(backend):
    for name, call, exc, match in BAD_INPUTS:
        with pytest.raises(exc, match=match):
            call(backend)
            pytest.fail(f"{name}: no error")
    with pytest.raises(ValueError, match="backend"):
        ops.regression_loss(_x(3, 4), _x(3, 4), backend="cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_edge_results_agree_across_backends(kind):
    """Documented results, the same on both backends: empty inputs give a loss of 0 and empty gradients; a NaN
    or Inf in pred reaches the loss (never dropped, even under a zero mask: the mask multiplies)."""
    for backend in ("torch", "triton"):
        p = torch.zeros(0, 4, requires_grad=True)
        loss = ops.regression_loss(p, torch.zeros(0, 4), kind=kind, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and p.grad.shape == (0, 4), backend
    y = _x(3, 4)
    row_mask = torch.tensor([True, False, True])
    mask = row_mask if kind == "cosine" else row_mask[:, None]
    got = {}
    for backend in ("torch", "triton"):
        nan = _x(3, 4)
        nan[1, 2] = float("nan")  # in the masked-out row
        inf = torch.ones(3, 4)
        inf[0, 0] = float("inf")
        got[backend] = [
            ops.regression_loss(nan, y, kind=kind, mask=mask, backend=backend).item(),
            ops.regression_loss(inf, y, kind=kind, backend=backend).item(),
        ]
    assert math.isnan(got["torch"][0]) and math.isnan(got["triton"][0])
    assert repr(got["torch"][1]) == repr(got["triton"][1])  # inf for mse / smooth_l1, nan for cosine
    assert not math.isfinite(got["torch"][1])


def test_triton_refuses_weight_requiring_grad_and_auto_falls_back():
    pred, target = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    w = torch.rand(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        ops.fused_regression([RegressionTerm(pred, target, "mse", w)], backend="triton")
    total, _ = ops.fused_regression([RegressionTerm(pred, target, "mse", w)], backend="auto")
    total.backward()
    assert w.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["default", "per_sm=-1", "per_sm=0,group=1,tile=2048"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_regression_cuda(dtype, config):
    """Compiled kernels at a real shape: three critic-shaped terms; grid modes (per_sm=-1 learns the resident
    programs from the first launch and rebuilds its plan)."""
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
    from uno_engine.ops import _regression_plan

    with _regression_plan.kernel_config_override("" if config == "default" else config):
        for _ in range(2):  # the second call runs the learned plan (per_sm=-1)
            total, per = ops.fused_regression(terms, backend="triton")
            grads = torch.autograd.grad(total, [t.pred for t in terms])
    if config == "per_sm=-1":
        assert not any(p.learn_resident for p in _regression_plan._PLANS.values() if p.chunks[0][0].R == 4 * 729)
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
