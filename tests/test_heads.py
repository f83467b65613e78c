"""DensityHead / StructureHead: shapes, detach_params routing of gradients, and the joint training recipe of
the heads.py docstring (fit on reference features; used with detach_params=True on generated features)."""

import pytest
import torch

from uno_engine import ops
from uno_engine.heads import DensityHead, StructureHead
from uno_engine.ops.regression import RegressionTerm


@pytest.mark.parametrize(
    "head_cls, out_dim, out_shape",
    [(DensityHead, None, (2, 37)), (StructureHead, 1, (2, 37)), (StructureHead, 33, (2, 37, 33))],
)
def test_shapes_and_dtypes(head_cls, out_dim, out_shape, device):
    head = (head_cls(48) if out_dim is None else head_cls(48, out_dim)).to(device)
    x = torch.randn(2, 37, 48, device=device)
    y = head(x)
    assert y.shape == out_shape and y.dtype == torch.float32
    assert head(x.to(torch.bfloat16)).dtype == torch.float32  # computed in the parameters' dtype


def test_detach_params_routes_gradient_to_features_only():
    head = StructureHead(16, 4)
    x = torch.randn(3, 5, 16, requires_grad=True)
    head(x, detach_params=True).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())
    x.grad = None
    head(x).square().sum().backward()
    assert all(p.grad is not None for p in head.parameters()) and x.grad is not None
    torch.testing.assert_close(head(x, detach_params=True), head(x))  # same function either way


def test_bad_feature_dim():
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        DensityHead(16)(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="in_dim"):
        StructureHead(0)


def test_joint_training_recipe_learns_from_reference_only():
    """Heads fitted on 'reference' features learn the target; the generated-side term moves the generated
    features toward the target and leaves the heads untouched."""
    torch.manual_seed(0)
    D, N = 12, 9
    head = DensityHead(D, hidden=32)
    w_true = torch.randn(D)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    gen_feat = torch.randn(
        4, N, D, requires_grad=True
    )  # stands in for the critic's features of generated images
    first = None
    for _ in range(150):
        ref_feat = torch.randn(8, N, D)  # critic features of reference images (no grad)
        target = torch.tanh(ref_feat @ w_true)  # reference targets
        total, per = ops.fused_regression(
            [
                RegressionTerm(head(ref_feat), target, "mse"),
                RegressionTerm(head(gen_feat, detach_params=True), torch.zeros(4, N), "mse", 0.1),
            ],
            backend="torch",
        )
        opt.zero_grad()
        total.backward()
        first = per[0].item() if first is None else first
        opt.step()
    assert per[0].item() < 0.25 * first
    assert gen_feat.grad is not None
    # the generated-side term alone gives no gradient to the heads
    opt.zero_grad()
    loss = ops.regression_loss(head(gen_feat, detach_params=True), torch.zeros(4, N), backend="torch")
    loss.backward()
    assert all(p.grad is None for p in head.parameters())
