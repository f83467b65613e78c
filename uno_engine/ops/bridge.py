"""`ops.bridge`: generated images -> exactly the critic input of the critic's HF image processor, with its
gradient.

Registered with `uno_engine.ops._register.custom_op` as `uno_engine::bridge_fwd` / `uno_engine::bridge_bwd`
(fake + autograd; an eager fast path), so a compiled step has no graph break. Backends:
- "triton" (`uno_engine.kernels.bridge`): the separable Pillow resampling as tap kernels, exact fp32,
  deterministic gathers in the backward (no atomics). `kernel=` picks the algorithm: "two_pass" (one launch
  per resampling pass and an fp32 intermediate), "fused" (one launch per direction, no intermediate; not yet
  measured on a GPU) or "auto" (two-pass; `explain_kernel_choice` says why). UNO_BRIDGE_FORWARD /
  UNO_BRIDGE_BACKWARD override the choice per direction, UNO_BRIDGE_BLOCKS / UNO_BRIDGE_FUSED_TILE /
  UNO_BRIDGE_FUSED_BWD_TILE the tiles (`uno_engine._env`; sweeps).
- "torch": dense resampling matmuls, forward and an explicit backward (recomputes the passes for the masks).
The eager twin is `uno_engine.eager.bridge` (the baseline path; the test oracle `uno_engine.reference`
re-exports it); the layout math both use is `uno_engine.bridge_math`.

Non-finite pixels, on both backends: +-Inf is outside input_range and clamps to its bound (zero gradient
under clamp="clamp"); a NaN is never turned into a finite value: every output whose resampling taps read it
is NaN (the torch path's dense matmuls spread it to its whole image plane, 0 * NaN = NaN), and its own
gradient is zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from uno_engine import _env
from uno_engine.bridge_math import fill_padding, qwen2_vl_patchify, qwen2_vl_unpatchify_sum
from uno_engine.bridge_spec import BridgeSpec, bridge_tensors
from uno_engine.ops._dispatch import resolve_backend
from uno_engine.ops._register import custom_op

KERNELS = _env.BRIDGE_KERNELS  # ("auto", "two_pass", "fused"), listed once in uno_engine._env
CLAMPS = ("clamp", "straight_through")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_AUTO_WHY = (
    "auto -> two_pass: the two-pass kernels are measured on an H200; the fused kernels (one launch per "
    "direction, no intermediate) have not run on a GPU yet"
)


# ------------------------------------------------------------------------------------ algorithm choice
def explain_kernel_choice(kernel: str = "auto") -> dict:
    """The Triton kernels `ops.bridge(kernel=kernel)` runs and why: {"forward", "backward", "why"}.
    Forward: "two_pass" | "fused" | "fused_loads"; backward: "two_pass" | "fused". A fused kernel whose tile
    band does not fit a program (`kernels.bridge_fused.MAX_FUSED_BAND`: extreme downscales) runs the two
    passes instead. For `python -m uno_engine.info`."""
    if kernel not in KERNELS:
        raise ValueError(f"bridge: kernel must be one of {KERNELS}, got {kernel!r}")
    fwd = bwd = "two_pass" if kernel == "auto" else kernel
    why = [_AUTO_WHY if kernel == "auto" else f"kernel={kernel!r}"]
    env_fwd, env_bwd = _env.get("UNO_BRIDGE_FORWARD"), _env.get("UNO_BRIDGE_BACKWARD")
    if env_fwd is not None:
        fwd = env_fwd
        why.append(f"UNO_BRIDGE_FORWARD={env_fwd} overrides the forward")
    if env_bwd is not None:
        bwd = env_bwd
        why.append(f"UNO_BRIDGE_BACKWARD={env_bwd} overrides the backward")
    return {"forward": fwd, "backward": bwd, "why": "; ".join(why)}


def _forward_kernel(kernel: str) -> str:
    env = _env.get("UNO_BRIDGE_FORWARD")
    return env if env is not None else ("two_pass" if kernel == "auto" else kernel)


def _backward_kernel(kernel: str) -> str:
    env = _env.get("UNO_BRIDGE_BACKWARD")
    return env if env is not None else ("two_pass" if kernel == "auto" else kernel)


def _blocks():
    return _env.get("UNO_BRIDGE_BLOCKS")


# --------------------------------------------------------------------------------------- torch path
def _torch_forward(images, wy, wx, consts, region, lo, hi, clip, qwen, vf):
    cdtype = wy.dtype
    u = ((images.to(cdtype) - lo) / (hi - lo)).clamp(0.0, 1.0)
    t = torch.matmul(wy, u) if vf else torch.matmul(u, wx.T)
    if clip:
        t = t.clamp(0.0, 1.0)
    r = torch.matmul(t, wx.T) if vf else torch.matmul(wy, t)
    if clip:
        r = r.clamp(0.0, 1.0)
    scale, shift, fill = (consts[:, i].view(1, 3, 1, 1) for i in range(3))
    out = fill_padding(r, region, fill) * scale + shift
    if qwen is not None:
        out = qwen2_vl_patchify(out, *qwen)
    return out.to(images.dtype)


def _torch_backward(grad_out, images, wy, wx, consts, region, lo, hi, clip, qwen, use_masks, vf):
    cdtype = wy.dtype
    B = images.shape[0]
    Hc, Wc = wy.shape[0], wx.shape[0]
    g = grad_out.to(cdtype)
    if qwen is not None:
        g = qwen2_vl_unpatchify_sum(g, B, Hc, Wc, *qwen)
    g = fill_padding(
        g * consts[:, 0].view(1, 3, 1, 1), region, torch.zeros((), dtype=cdtype, device=g.device)
    )
    if use_masks:
        u_pre = (images.to(cdtype) - lo) / (hi - lo)
        u = u_pre.clamp(0.0, 1.0)
        t_pre = torch.matmul(wy, u) if vf else torch.matmul(u, wx.T)
        if clip:
            t = t_pre.clamp(0.0, 1.0)
            r_pre = torch.matmul(t, wx.T) if vf else torch.matmul(wy, t)
            g = torch.where((r_pre >= 0) & (r_pre <= 1), g, 0.0)
    g_t = torch.matmul(g, wx) if vf else torch.matmul(wy.T, g)
    if use_masks and clip:
        g_t = torch.where((t_pre >= 0) & (t_pre <= 1), g_t, 0.0)
    g_u = torch.matmul(wy.T, g_t) if vf else torch.matmul(g_t, wx)
    if use_masks:  # masks as selects (as the Triton kernels): 0 where a clamp saturated and at NaN
        g_u = torch.where((u_pre >= 0) & (u_pre <= 1), g_u, 0.0)
    return (g_u / (hi - lo)).to(images.dtype)


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


def _plan(spec: BridgeSpec, H: int, W: int, device: torch.device, dtype: torch.dtype, triton: bool) -> _Plan:
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
    plan = _Plan(
        len(_PLAN_BY_ID), wy, wx, consts, tables, spec.region(H, W), bool(spec.clip_each_pass), qwen,
        bool(spec.vertical_first(H, W)),
    )  # fmt: skip
    _PLAN_BY_ID.append(plan)
    _PLANS[key] = plan
    return plan


# ----------------------------------------------------------------------------------------- the ops
def _out_shape(images: torch.Tensor, plan: _Plan) -> tuple[int, ...]:
    B, C = images.shape[:2]
    Hc, Wc = plan.canvas
    if plan.qwen is None:
        return (B, C, Hc, Wc)
    p, _, T = plan.qwen
    return (B * (Hc // p) * (Wc // p), C * T * p * p)


def _bridge_fwd_fake(images, plan, lo, hi, use_triton, store_mask, kernel):
    pl = _PLAN_BY_ID[plan]
    numel = 0
    if use_triton and store_mask:
        from uno_engine.kernels.bridge import mask_layout

        B, _, H, W = images.shape
        numel = mask_layout(B, H, W, *pl.canvas, pl.vertical_first, pl.clip)[0]
    return images.new_empty(_out_shape(images, pl)), images.new_empty((numel,), dtype=torch.uint8)


def _bridge_bwd_fake(grad_out, images, mask, plan, lo, hi, use_triton, use_masks, kernel):
    return torch.empty_like(images, memory_format=torch.contiguous_format)


@custom_op("uno_engine::bridge_bwd", fake=_bridge_bwd_fake)
def _bridge_bwd(
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
        return _torch_backward(
            grad_out, images, pl.wy, pl.wx, pl.consts, pl.region, lo, hi, pl.clip, pl.qwen, use_masks,
            pl.vertical_first,
        )  # fmt: skip
    from uno_engine.kernels import bridge as K

    bwd = _backward_kernel(kernel)
    return K.bridge_backward(
        grad_out, images, mask if mask.numel() else None, pl.tables, pl.consts, pl.canvas, pl.region, (lo, hi),
        clip_each_pass=pl.clip, use_masks=use_masks, qwen=pl.qwen, vertical_first=pl.vertical_first,
        kernel=bwd, blocks=_blocks(), fused_tile=_env.get("UNO_BRIDGE_FUSED_BWD_TILE") if bwd == "fused" else None,
    )  # fmt: skip


@custom_op("uno_engine::bridge_fwd", fake=_bridge_fwd_fake)
def _bridge_fwd(
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
        out = _torch_forward(
            images, pl.wy, pl.wx, pl.consts, pl.region, lo, hi, pl.clip, pl.qwen, pl.vertical_first
        )
        return out, images.new_empty((0,), dtype=torch.uint8)
    from uno_engine.kernels import bridge as K

    fwd = _forward_kernel(kernel)
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
        gx = _bridge_bwd(grad_out, images, mask, *ctx.args)
    return gx, None, None, None, None, None, None


_bridge_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- host helpers
class _PatchEmbedNoSave(torch.autograd.Function):
    """tokens = conv2d(x, weight, bias, stride=p) flattened to (B, N, D), for a frozen weight: the backward
    needs only the weight, so the normalized image `x` is not kept for it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        p = weight.shape[-1]
        ctx.save_for_backward(weight)
        ctx.shape = x.shape
        tok = torch.nn.functional.conv2d(x, weight, bias, stride=p)
        return tok.flatten(2).transpose(1, 2)

    @staticmethod
    def backward(ctx, g):  # g: (B, N, D)
        (weight,) = ctx.saved_tensors
        B, C, Hc, Wc = ctx.shape
        D, _, p, _ = weight.shape
        gh, gw = Hc // p, Wc // p
        gp = torch.matmul(g, weight.reshape(D, C * p * p).to(g.dtype))  # (B, N, C*p*p)
        gx = gp.reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)
        if (gh * p, gw * p) != (Hc, Wc):
            gx = torch.nn.functional.pad(gx, (0, Wc - gw * p, 0, Hc - gh * p))
        return gx, None, None


def _check(images, spec, input_range, clamp, patch_embed, kernel) -> None:
    """Argument checks, the same on every backend (run before the backend is chosen)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"bridge: images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"bridge: images must be float32, bfloat16 or float16 in input_range, got dtype {images.dtype}; "
            "map uint8 images to input_range first (e.g. x / 127.5 - 1)"
        )
    if images.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bridge: images dtype {images.dtype} is not supported (float32, bfloat16, float16)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"bridge: images must have shape (B, 3, H, W) (3 RGB channels), got {tuple(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"bridge: images must be non-empty, got shape {tuple(images.shape)}")
    if not isinstance(spec, BridgeSpec):
        raise TypeError(
            f"bridge: spec must be a uno_engine.BridgeSpec (BridgeSpec.from_image_processor(processor)), "
            f"got {type(spec).__name__}"
        )
    spec.check_input_size(images.shape[2], images.shape[3])
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError(f"bridge: input_range must be (lo, hi), two numbers, got {input_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"bridge: input_range must be (lo, hi), finite, with hi > lo, got {input_range!r}")
    if clamp not in CLAMPS:
        raise ValueError(f"bridge: clamp must be one of {CLAMPS}, got {clamp!r}")
    if kernel not in KERNELS:
        raise ValueError(f"bridge: kernel must be one of {KERNELS}, got {kernel!r}")
    if patch_embed is not None:
        if spec.layout != "nchw":
            raise ValueError(
                f"bridge: patch_embed needs a spec with layout 'nchw', this one is {spec.layout!r}"
            )
        weight, bias = patch_embed
        if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"bridge: patch_embed weight must be (D, 3, p, p), got {tuple(weight.shape)}")
        if weight.device != images.device or (bias is not None and bias.device != images.device):
            raise ValueError(
                f"bridge: patch_embed must be on the images' device {images.device}, got weight on "
                f"{weight.device}" + ("" if bias is None else f" and bias on {bias.device}")
            )


def bridge(
    images: torch.Tensor,
    spec: BridgeSpec,
    *,
    input_range: tuple[float, float] = (-1.0, 1.0),
    clamp: str = "clamp",
    patch_embed: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    backend: str = "auto",
    kernel: str = "auto",
) -> torch.Tensor:
    """Generated images -> the critic input `spec`'s image processor would make of them, differentiably.

    Math (per image and channel; Pillow's separable resampling as two banded matrices on the output canvas,
    Wy (Hc, H) and Wx (Wc, W)): u = clamp((x - lo) / (hi - lo), 0, 1); t = clip(u Wx^T); r = clip(Wy t)
    (the passes swap when `spec.vertical_first(H, W)`; the clips are Pillow's 8-bit clip of each pass,
    `spec.clip_each_pass`); out = where(inside, r, fill) * scale + shift, in the spec's layout.

    Args:
        images: (B, 3, H, W) float32 / bfloat16 / float16 (float64: torch backend), RGB in `input_range`.
        spec: `uno_engine.BridgeSpec` (e.g. `BridgeSpec.from_image_processor(processor)`).
        input_range: the finite (lo, hi), lo < hi, of the images; lo maps to uint8 0 and hi to 255 of the
            processor's input.
        clamp: the clamp policy. The processor sees uint8 values, so inputs outside `input_range` are clamped,
            and Pillow clips each resampling pass to [0, 255] (`spec.clip_each_pass`). "clamp" (default):
            these clamps are real, and their gradient is zero where they saturate (as autograd through
            torch.clamp: it passes at the bounds). "straight_through": the same forward, but the gradient
            passes through every clamp as if it were the identity (no masks; the backward does not read
            the images).
        patch_embed: optional (weight (D, 3, p, p), bias (D,) | None) of the critic's conv patch embedding
            (layout "nchw" only, on the images' device): returns the patch tokens (B, N, D),
            N = (h // p) * (w // p). With a frozen weight the normalized image is not kept for the backward.
        backend: "auto" | "triton" | "torch" (see `uno_engine.ops._dispatch`).
        kernel: the Triton algorithm, "auto" | "two_pass" | "fused" (see the module docstring and
            `explain_kernel_choice`); the torch backend ignores it. The values are the same either way.

    Non-finite pixels: +-Inf clamps to the bound of input_range; a NaN gives NaN at every output that reads
    it (the torch backend: its whole image plane), never a finite value; its own gradient is zero.

    Memory: with clamp="clamp" and images that require grad, the Triton forward keeps uint8 clip masks of
    both resampling passes for the backward (one byte per canvas pixel and per element of the intermediate
    pass) and one int32 flag per image plane that says whether any pixel was clamped. The backward reads them
    and grad_out, reads the images only in flagged planes (input-clamp mask), and writes grad_images once,
    deterministically (gathers, no atomics). The two-pass kernels also hold one fp32 intermediate (the first
    pass's output, (B, 3, H, Wc) or (B, 3, Hc, W)) while a direction runs; the fused kernels hold none. The
    torch path recomputes the passes in its backward instead.

    Returns:
        layout "nchw": pixel_values (B, 3, h, w), (h, w) = spec.output_size(H, W); layout "qwen2_vl": patches
        (B*gh*gw, 3*T*p*p) in Qwen2VLImageProcessor order (grid: spec.image_grid_thw(B, H, W)); or the
        (B, N, D) tokens with `patch_embed`. Dtype: images.dtype (values computed in float32).

    References: Pillow `Resample.c` (`precompute_coeffs`, the pass order, the 8-bit clip); transformers'
    image processors (crop / pad / patch order).
    """
    _check(images, spec, input_range, clamp, patch_embed, kernel)
    B, _, H, W = images.shape
    reasons = []
    if images.dtype == torch.float64:
        reasons.append("float64 images run on the torch path")
    if B * 3 > 65535:
        reasons.append(f"batch {B} x 3 planes exceeds the launch grid limit 65535")
    use_triton = resolve_backend("bridge", backend, [images], reasons) == "triton"
    cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    plan = _plan(spec, H, W, images.device, cdtype, use_triton)
    store_mask = clamp == "clamp" and images.requires_grad
    lo, hi = float(input_range[0]), float(input_range[1])
    out, _ = _bridge_fwd(images, plan.id, lo, hi, use_triton, store_mask, kernel)
    if patch_embed is None:
        return out
    weight, bias = patch_embed
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        p = weight.shape[-1]
        tok = torch.nn.functional.conv2d(
            out, weight.to(out.dtype), None if bias is None else bias.to(out.dtype), stride=p
        )
        return tok.flatten(2).transpose(1, 2)
    return _PatchEmbedNoSave.apply(out, weight.to(out.dtype), None if bias is None else bias.to(out.dtype))


bridge.explain_kernel_choice = (
    explain_kernel_choice  # ops.bridge.explain_kernel_choice() (ops.bridge is this)
)
