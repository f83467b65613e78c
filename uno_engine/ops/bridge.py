"""`ops.bridge`: generated images -> exactly the critic input of the critic's HF image processor, with its
gradient.

Registered as torch custom ops `uno_engine::bridge_fwd` / `uno_engine::bridge_bwd` (register_fake +
register_autograd), so a compiled step has no graph break. Backends: "triton" (kernels/bridge.py: one tap
launch per resampling pass, forward and backward; exact fp32, deterministic gathers, no atomics on the data;
UNO_BRIDGE_FORWARD=fused / UNO_BRIDGE_BACKWARD=fused opt into one-launch kernels, `kernels.bridge`)
and "torch" (dense resampling matmuls, forward and an explicit deterministic backward). The eager oracle is
`uno_engine.reference.bridge`.
"""

from __future__ import annotations

import numpy as np
import torch

from uno_engine.bridge_spec import BridgeSpec, bridge_tensors
from uno_engine.ops._dispatch import resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------- torch path
def _unlayout(g: torch.Tensor, B: int, Hc: int, Wc: int, qwen) -> torch.Tensor:
    """Gradient in the output layout -> (B, 3, Hc, Wc), summing Qwen2-VL's temporal copies."""
    if qwen is None:
        return g
    p, m, T = qwen
    gh, gw = Hc // p, Wc // p
    g = g.reshape(B, gh // m, gw // m, m, m, 3, T, p, p).sum(6)  # (B, gh/m, gw/m, mh, mw, C, ph, pw)
    return g.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(B, 3, Hc, Wc)


def _torch_forward(images, wy, wx, consts, region, lo, hi, clip, qwen, vf):
    from uno_engine.reference import bridge_qwen2_vl_patchify

    cdtype = wy.dtype
    u = ((images.to(cdtype) - lo) / (hi - lo)).clamp(0.0, 1.0)
    t = torch.matmul(wy, u) if vf else torch.matmul(u, wx.T)
    if clip:
        t = t.clamp(0.0, 1.0)
    r = torch.matmul(t, wx.T) if vf else torch.matmul(wy, t)
    if clip:
        r = r.clamp(0.0, 1.0)
    B, _, Hc, Wc = r.shape
    scale, shift, fill = (consts[:, i].view(1, 3, 1, 1) for i in range(3))
    y0, y1, x0, x1 = region
    if (y0, y1, x0, x1) != (0, Hc, 0, Wc):
        inside = torch.zeros(Hc, Wc, dtype=cdtype, device=images.device)
        inside[y0:y1, x0:x1] = 1.0
        r = r * inside + fill * (1.0 - inside)
    out = r * scale + shift
    if qwen is not None:
        out = bridge_qwen2_vl_patchify(out, *qwen)
    return out.to(images.dtype)


def _torch_backward(grad_out, images, wy, wx, consts, region, lo, hi, clip, qwen, use_masks, vf):
    cdtype = wy.dtype
    B = images.shape[0]
    Hc, Wc = wy.shape[0], wx.shape[0]
    g = _unlayout(grad_out.to(cdtype), B, Hc, Wc, qwen) * consts[:, 0].view(1, 3, 1, 1)
    y0, y1, x0, x1 = region
    if (y0, y1, x0, x1) != (0, Hc, 0, Wc):
        inside = torch.zeros(Hc, Wc, dtype=cdtype, device=images.device)
        inside[y0:y1, x0:x1] = 1.0
        g = g * inside
    if use_masks:
        u_pre = (images.to(cdtype) - lo) / (hi - lo)
        u = u_pre.clamp(0.0, 1.0)
        t_pre = torch.matmul(wy, u) if vf else torch.matmul(u, wx.T)
        if clip:
            t = t_pre.clamp(0.0, 1.0)
            r_pre = torch.matmul(t, wx.T) if vf else torch.matmul(wy, t)
            g = g * ((r_pre >= 0) & (r_pre <= 1)).to(cdtype)
    g_t = torch.matmul(g, wx) if vf else torch.matmul(wy.T, g)
    if use_masks and clip:
        g_t = g_t * ((t_pre >= 0) & (t_pre <= 1)).to(cdtype)
    g_u = torch.matmul(wy.T, g_t) if vf else torch.matmul(g_t, wx)
    if use_masks:
        g_u = g_u * ((u_pre >= 0) & (u_pre <= 1)).to(cdtype)
    return (g_u / (hi - lo)).to(images.dtype)


# ----------------------------------------------------------------------------------------- the ops
def _unpack(meta):
    y0, y1, x0, x1, clip, is_qwen, p, m, T, vf, *counts = meta
    qwen = (p, m, T) if is_qwen else None
    return (y0, y1, x0, x1), bool(clip), qwen, counts, bool(vf)


def _tables(tables, counts) -> dict:
    from uno_engine.kernels.bridge import COUNTS, TABLES

    return dict(zip(TABLES, tables, strict=True), **dict(zip(COUNTS, counts, strict=True)))


def _out_shape(images, wy, wx, qwen):
    B, C = images.shape[:2]
    Hc, Wc = wy.shape[0], wx.shape[0]
    if qwen is None:
        return (B, C, Hc, Wc)
    p, _, T = qwen
    return (B * (Hc // p) * (Wc // p), C * T * p * p)


def _fwd_impl(images, wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask):
    region, clip, qwen, counts, vf = _unpack(meta)
    if use_triton:
        from uno_engine.kernels.bridge import bridge_forward

        out, mask = bridge_forward(
            images,
            _tables(tables, counts),
            consts,
            (wy.shape[0], wx.shape[0]),
            region,
            (lo, hi),
            clip_each_pass=clip,
            store_mask=store_mask,
            qwen=qwen,
            out_dtype=images.dtype,
            vertical_first=vf,
        )
        if mask is None:
            mask = images.new_empty((0,), dtype=torch.uint8)
        return out, mask
    out = _torch_forward(images, wy, wx, consts, region, lo, hi, clip, qwen, vf)
    return out, images.new_empty((0,), dtype=torch.uint8)


def _bwd_impl(grad_out, images, mask, wy, wx, consts, tables, meta, lo, hi, use_triton, use_masks):
    region, clip, qwen, counts, vf = _unpack(meta)
    if use_triton:
        from uno_engine.kernels.bridge import bridge_backward

        return bridge_backward(
            grad_out,
            images,
            mask if mask.numel() else None,
            _tables(tables, counts),
            consts,
            (wy.shape[0], wx.shape[0]),
            region,
            (lo, hi),
            clip_each_pass=clip,
            use_masks=use_masks,
            qwen=qwen,
            vertical_first=vf,
        )
    return _torch_backward(grad_out, images, wy, wx, consts, region, lo, hi, clip, qwen, use_masks, vf)


@torch.library.custom_op("uno_engine::bridge_fwd", mutates_args=())
def _bridge_fwd(
    images: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    consts: torch.Tensor,
    tables: list[torch.Tensor],
    meta: list[int],
    lo: float,
    hi: float,
    use_triton: bool,
    store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(images, wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask)


@_bridge_fwd.register_fake
def _(images, wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask):
    region, clip, qwen, _, vf = _unpack(meta)
    out = images.new_empty(_out_shape(images, wy, wx, qwen))
    if use_triton and store_mask:
        from uno_engine.kernels.bridge import mask_layout

        B, _, H, W = images.shape
        numel = mask_layout(B, H, W, wy.shape[0], wx.shape[0], vf, clip)[0]
        mask = images.new_empty((numel,), dtype=torch.uint8)
    else:
        mask = images.new_empty((0,), dtype=torch.uint8)
    return out, mask


@torch.library.custom_op("uno_engine::bridge_bwd", mutates_args=())
def _bridge_bwd(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    consts: torch.Tensor,
    tables: list[torch.Tensor],
    meta: list[int],
    lo: float,
    hi: float,
    use_triton: bool,
    use_masks: bool,
) -> torch.Tensor:
    return _bwd_impl(grad_out, images, mask, wy, wx, consts, tables, meta, lo, hi, use_triton, use_masks)


@_bridge_bwd.register_fake
def _(grad_out, images, mask, wy, wx, consts, tables, meta, lo, hi, use_triton, use_masks):
    return torch.empty_like(images, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    images, wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask = inputs
    ctx.save_for_backward(images, output[1], wy, wx, consts, *tables)
    ctx.meta, ctx.lo, ctx.hi, ctx.use_triton, ctx.use_masks = meta, lo, hi, use_triton, store_mask
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, grad_mask):
    images, mask, wy, wx, consts, *tables = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = _bridge_bwd(
            grad_out,
            images,
            mask,
            wy,
            wx,
            consts,
            tables,
            ctx.meta,
            ctx.lo,
            ctx.hi,
            ctx.use_triton,
            ctx.use_masks,
        )
    return gx, None, None, None, [None] * len(tables), None, None, None, None, None


_bridge_fwd.register_autograd(_backward, setup_context=_setup_context)


class _BridgeFunction(torch.autograd.Function):
    """The eager path: the same implementation as the custom ops, without their dispatch (the custom op's
    autograd wrapper flattens every list argument on each call: ~0.15 ms of host time per direction, more than
    the kernels take on an H200). `bridge` uses the custom ops whenever torch.compile traces it."""

    @staticmethod
    def forward(ctx, images, wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask):
        out, mask = _fwd_impl(images, wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask)
        ctx.save_for_backward(images, mask)
        ctx.args = (wy, wx, consts, tables, meta, lo, hi, use_triton, store_mask)  # cached plan constants
        return out

    @staticmethod
    def backward(ctx, grad_out):
        images, mask = ctx.saved_tensors
        wy, wx, consts, tables, meta, lo, hi, use_triton, use_masks = ctx.args
        gx = _bwd_impl(grad_out, images, mask, wy, wx, consts, tables, meta, lo, hi, use_triton, use_masks)
        return gx, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------- host helpers
_PLANS: dict = {}


def _plan(spec: BridgeSpec, H: int, W: int, device: torch.device, dtype: torch.dtype, triton: bool):
    """Device constants and int meta of one (spec, input size, device): built and copied once. A cache hit is
    a dict lookup (cheap to trace under torch.compile); a miss runs eagerly (numpy) outside any graph."""
    key = (spec, int(H), int(W), torch.device(device), dtype, bool(triton))
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    plan = _build_plan(*key)
    _PLANS[key] = plan
    return plan


@torch.compiler.disable
def _build_plan(spec: BridgeSpec, H: int, W: int, device: torch.device, dtype: torch.dtype, triton: bool):
    wy, wx, consts = bridge_tensors(spec, H, W, device, dtype)
    region = spec.region(H, W)
    qwen = spec.layout == "qwen2_vl"
    p, m, T = (spec.patch_size, spec.merge_size, spec.temporal_patch_size) if qwen else (1, 1, 1)
    vf = spec.vertical_first(H, W)
    if triton:
        from uno_engine.kernels.bridge import COUNTS, TABLES, tap_tables

        wy_np, wx_np = spec.resize_matrices(H, W)
        tab = tap_tables(np.asarray(wy_np), np.asarray(wx_np))
        tables = [torch.from_numpy(tab[k]).to(device) for k in TABLES]
        counts = [int(tab[k]) for k in COUNTS]
    else:
        tables, counts = [], [0] * 4
    meta = [*region, int(spec.clip_each_pass), int(qwen), p, m, T, int(vf), *counts]
    return wy, wx, consts, tables, meta


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


def _check(images, spec, input_range, clamp, patch_embed) -> None:
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
    lo, hi = input_range
    if not float(hi) > float(lo):
        raise ValueError(f"bridge: input_range must be (lo, hi) with hi > lo, got {input_range}")
    if clamp not in ("clamp", "straight_through"):
        raise ValueError(f"bridge: clamp must be 'clamp' or 'straight_through', got {clamp!r}")
    if patch_embed is not None:
        if spec.layout != "nchw":
            raise ValueError(
                f"bridge: patch_embed needs a spec with layout 'nchw', this one is {spec.layout!r}"
            )
        weight = patch_embed[0]
        if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"bridge: patch_embed weight must be (D, 3, p, p), got {tuple(weight.shape)}")


def bridge(
    images: torch.Tensor,
    spec: BridgeSpec,
    *,
    input_range: tuple[float, float] = (-1.0, 1.0),
    clamp: str = "clamp",
    patch_embed: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Generated images -> the critic input `spec`'s image processor would make of them, differentiably.

    Args:
        images: (B, 3, H, W) float32 / bfloat16 / float16 (float64: torch backend), RGB in `input_range`.
        spec: `uno_engine.BridgeSpec` (e.g. `BridgeSpec.from_image_processor(processor)`).
        input_range: the (lo, hi) of the images; lo maps to uint8 0 and hi to 255 of the processor's input.
        clamp: the clamp policy. The processor sees uint8 values, so inputs outside `input_range` are clamped,
            and Pillow clips each resampling pass to [0, 255] (`spec.clip_each_pass`). "clamp" (default):
            these clamps are real, and their gradient is zero where they saturate (as autograd through
            torch.clamp: it passes at the bounds). "straight_through": the same forward, but the gradient
            passes through every clamp as if it were the identity (no masks; the backward does not read
            the images).
        patch_embed: optional (weight (D, 3, p, p), bias (D,) | None) of the critic's conv patch embedding
            (layout "nchw" only): returns the patch tokens (B, N, D), N = (h // p) * (w // p). With a frozen
            weight the normalized image is not kept for the backward (the grad needs only the weight).
        backend: "auto" | "triton" | "torch" (see `uno_engine.ops._dispatch`).

    Memory: with clamp="clamp" and images that require grad, the Triton forward keeps uint8 clip masks of
    both resampling passes for the backward (one byte per canvas pixel and per element of the intermediate
    pass) and one int32 flag per image plane that says whether any pixel was clamped. The backward reads them
    and grad_out, reads the images only in flagged planes (input-clamp mask), and writes grad_images once,
    deterministically (gathers, no atomics). With the default two-pass kernels each direction also holds
    one fp32 intermediate (the first pass's output, (B, 3, H, Wc) or (B, 3, Hc, W)) while it runs; the
    opt-in fused kernels (UNO_BRIDGE_FORWARD / UNO_BRIDGE_BACKWARD=fused) hold none. The torch path
    recomputes the passes in its backward instead.

    Returns:
        layout "nchw": pixel_values (B, 3, h, w), (h, w) = spec.output_size(H, W); layout "qwen2_vl": patches
        (B*gh*gw, 3*T*p*p) in Qwen2VLImageProcessor order (grid: spec.image_grid_thw(B, H, W)); or the
        (B, N, D) tokens with `patch_embed`. Dtype: images.dtype (values computed in float32).
    """
    _check(images, spec, input_range, clamp, patch_embed)
    B, _, H, W = images.shape
    reasons = []
    if images.dtype == torch.float64:
        reasons.append("float64 images run on the torch path")
    if B * 3 > 65535:
        reasons.append(f"batch {B} x 3 planes exceeds the launch grid limit 65535")
    choice = resolve_backend("bridge", backend, [images], reasons)
    use_triton = choice == "triton"
    cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    wy, wx, consts, tables, meta = _plan(spec, H, W, images.device, cdtype, use_triton)
    lo, hi = float(input_range[0]), float(input_range[1])
    use_masks = clamp == "clamp"
    args = (images, wy, wx, consts, tables, meta, lo, hi, use_triton, use_masks and images.requires_grad)
    if torch.compiler.is_compiling():
        out, _ = _bridge_fwd(*args)  # the registered op: traced as one node, no graph break
    else:
        out = _BridgeFunction.apply(*args)
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
