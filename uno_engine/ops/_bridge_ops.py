"""The registered ops of `ops.bridge` (`uno_engine.ops._register.custom_op`: a torch custom op with a fake and
an autograd formula, plus the eager fast path), and the plans they read. Each takes `use_triton` and runs the
Triton launchers (`uno_engine.kernels.bridge`) or the torch path (`_bridge_torch`).

- `uno_engine::bridge_fwd` / `uno_engine::bridge_bwd`: the plain read; the constants of one (spec, input size,
  device, dtype, backend) live in a `_Plan`, built once, passed as an int handle.
- `uno_engine::bridge_views_fwd` / `uno_engine::bridge_views_bwd`: K views per image (`uno_engine.read`):
  the plan's geometry plus each view's tables, built per call on the host from the drawn boxes and passed as
  a tensor list (torch path: dense wy (V, Hc, H), wx (V, Wc, W); Triton: the per-view tap tables, the tap
  counts their last dimension), with the views' affine map (V, 3) and noise keys (V, 2) (empty: no noise).

Arguments the public function resolves (the kernel choice) are op arguments; the kernels' env overrides are
read here, at call time, as before the split.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from uno_engine import _env
from uno_engine.bridge_spec import BridgeSpec, bridge_tensors
from uno_engine.ops import _bridge_torch
from uno_engine.ops._register import custom_op

_AUTO_KERNEL = "two_pass"


def forward_kernel(kernel: str) -> str:
    """The Triton forward kernels `kernel` runs (UNO_BRIDGE_FORWARD overrides)."""
    env = _env.get("UNO_BRIDGE_FORWARD")
    return env if env is not None else (_AUTO_KERNEL if kernel == "auto" else kernel)


def backward_kernel(kernel: str) -> str:
    """The Triton backward kernels `kernel` runs (UNO_BRIDGE_BACKWARD overrides)."""
    env = _env.get("UNO_BRIDGE_BACKWARD")
    return env if env is not None else (_AUTO_KERNEL if kernel == "auto" else kernel)


def _blocks():
    return _env.get("UNO_BRIDGE_BLOCKS")


# ------------------------------------------------------------------------------------------- plans
class _Plan(NamedTuple):
    """The constants of one (spec, input size, device, compute dtype, backend), built once: the dense
    resampling matrices wy (Hc, H), wx (Wc, W) and per-channel consts (3, 3) [scale, shift, fill] (torch
    path), the device tap tables with their counts (Triton path), and the geometry."""

    id: int  # the handle the registered ops take (an int: no tensor-list argument to flatten per call)
    wy: torch.Tensor
    wx: torch.Tensor
    consts: torch.Tensor
    tables: dict | None  # `kernels.bridge.tap_tables` as device tensors + int counts; None on the torch path
    region: tuple[int, int, int, int]  # canvas rectangle (y0, y1, x0, x1) that shows the image
    clip: bool  # spec.clip_each_pass
    qwen: tuple[int, int, int] | None  # (patch, merge, temporal) of layout "qwen2_vl"
    vertical_first: bool

    @property
    def canvas(self) -> tuple[int, int]:
        return self.wy.shape[0], self.wx.shape[0]


_PLANS: dict = {}  # key -> _Plan
_PLAN_BY_ID: list[_Plan] = []  # handle -> _Plan (plans live as long as the process, like compiled kernels)


def plan(spec: BridgeSpec, H: int, W: int, device: torch.device, dtype: torch.dtype, triton: bool) -> _Plan:
    """The plan of one (spec, input size, device, dtype, backend): built and copied to the device once. A
    cache hit is a dict lookup (cheap to trace under torch.compile); a miss runs eagerly (numpy) outside any
    graph."""
    key = (spec, int(H), int(W), torch.device(device), dtype, bool(triton))
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    return _build_plan(key)


@torch.compiler.disable
def _build_plan(key) -> _Plan:
    spec, H, W, device, dtype, triton = key
    wy, wx, consts = bridge_tensors(spec, H, W, device, dtype)
    qwen = (spec.patch_size, spec.merge_size, spec.temporal_patch_size) if spec.layout == "qwen2_vl" else None
    tables = None
    if triton:
        from uno_engine.kernels.bridge import COUNTS, TABLES, tap_tables

        wy_np, wx_np = spec.resize_matrices(H, W)
        tab = tap_tables(np.asarray(wy_np), np.asarray(wx_np))
        tables = {k: torch.from_numpy(tab[k]).to(device) for k in TABLES}
        tables.update({k: int(tab[k]) for k in COUNTS})
    p = _Plan(
        len(_PLAN_BY_ID), wy, wx, consts, tables, spec.region(H, W), bool(spec.clip_each_pass), qwen,
        bool(spec.vertical_first(H, W)),
    )  # fmt: skip
    _PLAN_BY_ID.append(p)
    _PLANS[key] = p
    return p


def _out_shape(rows: int, C: int, pl: _Plan) -> tuple[int, ...]:
    Hc, Wc = pl.canvas
    if pl.qwen is None:
        return (rows, C, Hc, Wc)
    p, _, T = pl.qwen
    return (rows * (Hc // p) * (Wc // p), C * T * p * p)


def _mask_numel(rows: int, H: int, W: int, pl: _Plan, use_triton: bool, store_mask: bool) -> int:
    if not (use_triton and store_mask):
        return 0
    from uno_engine.kernels.bridge import mask_layout

    return mask_layout(rows, H, W, *pl.canvas, pl.vertical_first, pl.clip)[0]


# ----------------------------------------------------------------------------------- the plain read
def _bridge_fwd_fake(images, plan, lo, hi, use_triton, store_mask, kernel):
    pl = _PLAN_BY_ID[plan]
    B, C, H, W = images.shape
    numel = _mask_numel(B, H, W, pl, use_triton, store_mask)
    return images.new_empty(_out_shape(B, C, pl)), images.new_empty((numel,), dtype=torch.uint8)


def _bridge_bwd_fake(grad_out, images, mask, plan, lo, hi, use_triton, use_masks, kernel):
    return torch.empty_like(images, memory_format=torch.contiguous_format)


@custom_op("uno_engine::bridge_bwd", fake=_bridge_bwd_fake)
def bridge_bwd(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    plan: int,
    lo: float,
    hi: float,
    use_triton: bool,
    use_masks: bool,
    kernel: str,
) -> torch.Tensor:
    """grad_images (B, 3, H, W) from grad_out in the output layout; mask: the forward's side outputs; plan:
    the handle of a `_Plan`."""
    pl = _PLAN_BY_ID[plan]
    if not use_triton:
        return _bridge_torch.backward(
            grad_out, images, pl.wy, pl.wx, pl.consts, pl.region, lo, hi, pl.clip, pl.qwen, use_masks,
            pl.vertical_first,
        )  # fmt: skip
    from uno_engine.kernels import bridge as K

    bwd = backward_kernel(kernel)
    return K.bridge_backward(
        grad_out, images, mask if mask.numel() else None, pl.tables, pl.consts, pl.canvas, pl.region, (lo, hi),
        clip_each_pass=pl.clip, use_masks=use_masks, qwen=pl.qwen, vertical_first=pl.vertical_first,
        kernel=bwd, blocks=_blocks(), fused_tile=_env.get("UNO_BRIDGE_FUSED_BWD_TILE") if bwd == "fused" else None,
    )  # fmt: skip


@custom_op("uno_engine::bridge_fwd", fake=_bridge_fwd_fake)
def bridge_fwd(
    images: torch.Tensor,
    plan: int,
    lo: float,
    hi: float,
    use_triton: bool,
    store_mask: bool,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(critic input, side outputs for the backward: uint8, empty unless Triton with store_mask); plan: the
    handle of a `_Plan`."""
    pl = _PLAN_BY_ID[plan]
    if not use_triton:
        out = _bridge_torch.forward(
            images, pl.wy, pl.wx, pl.consts, pl.region, lo, hi, pl.clip, pl.qwen, pl.vertical_first
        )
        return out, images.new_empty((0,), dtype=torch.uint8)
    from uno_engine.kernels import bridge as K

    fwd = forward_kernel(kernel)
    out, side = K.bridge_forward(
        images, pl.tables, pl.consts, pl.canvas, pl.region, (lo, hi), clip_each_pass=pl.clip,
        store_mask=store_mask, qwen=pl.qwen, out_dtype=images.dtype, vertical_first=pl.vertical_first,
        kernel=fwd, blocks=_blocks(), fused_tile=_env.get("UNO_BRIDGE_FUSED_TILE") if fwd != "two_pass" else None,
    )  # fmt: skip
    return out, side if side is not None else images.new_empty((0,), dtype=torch.uint8)


def _setup_context(ctx, inputs, output):
    images, plan, lo, hi, use_triton, store_mask, kernel = inputs
    ctx.save_for_backward(images, output[1])
    ctx.args = (plan, lo, hi, use_triton, store_mask, kernel)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, grad_mask):
    gx = None
    if ctx.needs_input_grad[0]:
        images, mask = ctx.saved_tensors
        gx = bridge_bwd(grad_out, images, mask, *ctx.args)
    return gx, None, None, None, None, None, None


bridge_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------- the views
VIEW_TABLES = ("ys", "wy", "xs", "wx", "oys", "wyT", "oxs", "wxT")  # Triton: the per-view tables' order


@torch.compiler.disable
def view_tensors(spec: BridgeSpec, H: int, W: int, views, input_range, device, dtype, use_triton: bool):
    """(tabs, affine, keys): the per-view tables on `device` (torch path: [wy (V, Hc, H), wx (V, Wc, W)] in
    `dtype`; Triton: `read.view_tap_tables` in VIEW_TABLES order, the tap counts their last dimension), the
    views' affine map (V, 3) [alpha, beta, sigma] in `dtype` and noise keys (V, 2) int64, both empty without
    noise. Built on the host from the drawn boxes (numpy) and copied once; no device-to-host read."""
    from uno_engine import read

    if use_triton:
        t = read.view_tap_tables(spec, H, W, views)
        tabs = [torch.from_numpy(t[k]).to(device, non_blocking=True) for k in VIEW_TABLES]
    else:
        wy, wx = read.view_matrices(spec, H, W, views)
        tabs = [torch.from_numpy(m).to(device=device, dtype=dtype) for m in (wy, wx)]
    if views.noisy:
        affine = torch.from_numpy(np.ascontiguousarray(views.affine(input_range))).to(
            device=device, dtype=dtype
        )
        keys = torch.from_numpy(np.ascontiguousarray(views.keys)).to(device)
    else:
        affine = torch.empty((0, 3), device=device, dtype=dtype)
        keys = torch.empty((0, 2), device=device, dtype=torch.int64)
    return tabs, affine, keys


def _views_mask_numel(rows, H, W, pl, affine, use_triton, store_mask) -> int:
    if use_triton:
        return _mask_numel(rows, H, W, pl, use_triton, store_mask)
    return _bridge_torch.views_mask_numel(rows, pl.canvas, affine.numel() > 0, pl.clip, store_mask)


def _views_fwd_fake(images, tabs, affine, keys, plan, views, lo, hi, use_triton, store_mask, kernel):
    pl = _PLAN_BY_ID[plan]
    B, C, H, W = images.shape
    numel = _views_mask_numel(B * views, H, W, pl, affine, use_triton, store_mask)
    return images.new_empty(_out_shape(B * views, C, pl)), images.new_empty((numel,), dtype=torch.uint8)


def _views_bwd_fake(grad_out, images, mask, tabs, affine, keys, plan, views, lo, hi, use_triton, use_masks, kernel):  # fmt: skip
    return torch.empty_like(images, memory_format=torch.contiguous_format)


def _triton_views(tabs, affine, keys, views):
    from uno_engine.kernels.bridge import ViewTables

    tables = dict(zip(VIEW_TABLES, tabs, strict=True))
    tables.update(KY=tabs[1].shape[-1], KX=tabs[3].shape[-1], KTY=tabs[5].shape[-1], KTX=tabs[7].shape[-1])
    return ViewTables(views, tables, affine if affine.numel() else None, keys if keys.numel() else None)


@custom_op("uno_engine::bridge_views_bwd", fake=_views_bwd_fake)
def bridge_views_bwd(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    tabs: list[torch.Tensor],
    affine: torch.Tensor,
    keys: torch.Tensor,
    plan: int,
    views: int,
    lo: float,
    hi: float,
    use_triton: bool,
    use_masks: bool,
    kernel: str,
) -> torch.Tensor:
    """grad_images (B, 3, H, W) from the gradient of the B * views views' critic input (summed over views)."""
    pl = _PLAN_BY_ID[plan]
    if not use_triton:
        noisy = affine.numel() > 0
        return _bridge_torch.views_backward(
            grad_out, images, tabs[0], tabs[1], affine if noisy else None, keys, views, pl.consts, pl.region,
            lo, hi, pl.clip, pl.qwen, use_masks, pl.vertical_first, mask if mask.numel() else None,
        )  # fmt: skip
    from uno_engine.kernels import bridge as K

    return K.bridge_backward(
        grad_out, images, mask if mask.numel() else None, None, pl.consts, pl.canvas, pl.region, (lo, hi),
        clip_each_pass=pl.clip, use_masks=use_masks, qwen=pl.qwen, vertical_first=pl.vertical_first,
        kernel="two_pass", blocks=_blocks(), views=_triton_views(tabs, affine, keys, views),
    )  # fmt: skip


@custom_op("uno_engine::bridge_views_fwd", fake=_views_fwd_fake)
def bridge_views_fwd(
    images: torch.Tensor,
    tabs: list[torch.Tensor],
    affine: torch.Tensor,
    keys: torch.Tensor,
    plan: int,
    views: int,
    lo: float,
    hi: float,
    use_triton: bool,
    store_mask: bool,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(critic input of the B * views views, side outputs for the backward)."""
    pl = _PLAN_BY_ID[plan]
    if not use_triton:
        noisy = affine.numel() > 0
        out, mask = _bridge_torch.views_forward(
            images, tabs[0], tabs[1], affine if noisy else None, keys, views, pl.consts, pl.region, lo, hi,
            pl.clip, pl.qwen, pl.vertical_first, store_mask,
        )  # fmt: skip
        return out, mask if mask is not None else images.new_empty((0,), dtype=torch.uint8)
    from uno_engine.kernels import bridge as K

    out, side = K.bridge_forward(
        images, None, pl.consts, pl.canvas, pl.region, (lo, hi), clip_each_pass=pl.clip,
        store_mask=store_mask, qwen=pl.qwen, out_dtype=images.dtype, vertical_first=pl.vertical_first,
        kernel="two_pass", blocks=_blocks(), views=_triton_views(tabs, affine, keys, views),
    )  # fmt: skip
    return out, side if side is not None else images.new_empty((0,), dtype=torch.uint8)


def _views_setup_context(ctx, inputs, output):
    images, tabs, affine, keys, plan, views, lo, hi, use_triton, store_mask, kernel = inputs
    ctx.save_for_backward(images, output[1], affine, keys, *tabs)
    ctx.args = (plan, views, lo, hi, use_triton, store_mask, kernel)
    ctx.mark_non_differentiable(output[1])


def _views_backward(ctx, grad_out, grad_mask):
    gx = None
    images, mask, affine, keys, *tabs = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        gx = bridge_views_bwd(grad_out, images, mask, tabs, affine, keys, *ctx.args)
    # one entry per input, the tensor list as a list (the custom op's autograd checks the structure)
    return gx, [None] * len(tabs), None, None, None, None, None, None, None, None, None


bridge_views_fwd.register_autograd(_views_backward, setup_context=_views_setup_context)
