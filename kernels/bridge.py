"""Image -> critic bridge: separable Pillow resampling + clamp + pad/crop + normalize + patch layout, forward
and backward. Host launchers; the kernels live in files by concern:

- `bridge_taps.py`: the tap tables (host, numpy): each pass's banded weight matrix as (start, weights) rows,
  and their transposes for the backward.
- `bridge_two_pass.py`: one tap-kernel launch per resampling pass (the default, measured on an H200).
- `bridge_fused.py`: both passes of a direction in one launch (opt-in; not yet measured on a GPU).
- `bridge_jit.py`: the jit helpers both families share (clamp, layouts, epilogues), so both compute the same
  values, bit for bit.

Math (per image b and channel c; u = clamp((x - lo) / (hi - lo), 0, 1) is the processor's uint8 value / 255):
    t = clip(u @ Wx^T)          (H, Wc)   horizontal pass (Pillow's first for most shapes)
    r = clip(Wy @ t)            (Hc, Wc)  vertical pass
    out = where(inside, r, fill) * scale_c + shift_c, stored in the spec's layout (NCHW or Qwen2-VL patches)
Wy (Hc, H) and Wx (Wc, W) are the banded Pillow weight matrices on the output canvas (zero rows = padding).
When Pillow runs the vertical pass first (`vertical_first`), t = clip(Wy @ u) is (Hc, W). The backward is
the transpose: grad_u = mask_u * (Wy^T (mask_r * scale * grad_r) Wx) (masks: where each clamp passed; the
straight-through policy drops them), grad_x = grad_u / (hi - lo).

Non-finite inputs: +-Inf lies outside input_range and clamps to its bound like any out-of-range value (zero
gradient under the clamp policy). The clips keep NaN (`bridge_jit._clamp01`), so a NaN pixel gives NaN at
every output whose taps read it (and, through zero-weight taps, possibly at neighbours), never a finite
value; its own gradient is zero (its clamp mask is 0).

Side outputs (`mask_layout`): with `store_mask`, the forward keeps for the backward one uint8 clip mask per
canvas pixel and per element of t, and one int32 per image plane that says whether a pixel was not inside
input_range; the backward reads the images only in such planes.

Memory traffic, 8x3x1024x1024 fp32 -> 384 (Janus): the input is 100.7 MB and the output 14.2 MB. The
two-pass kernels also write and read back t (37.7 MB; in L2 in part), 1.66x the one-read-one-write bytes;
the fused kernels move the input and output once plus their tiles' halos.

References: Pillow `Resample.c` (`precompute_coeffs`, two-pass order, 8-bit clip), transformers image
processors (crop/pad/patch order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import bridge_fused, bridge_two_pass
from .bridge_fused import check_tile, fused_plan, fused_tiles
from .bridge_taps import COUNTS, SPAN_TILES, TABLES, tap_tables
from .bridge_two_pass import check_blocks

__all__ = [
    "BACKWARD_KERNELS",
    "COUNTS",
    "FORWARD_KERNELS",
    "SPAN_TILES",
    "TABLES",
    "ViewTables",
    "bridge_backward",
    "bridge_forward",
    "check_blocks",
    "check_tile",
    "fused_plan",
    "fused_tiles",
    "mask_layout",
    "tap_tables",
]

FORWARD_KERNELS = ("two_pass", "fused", "fused_loads")  # fused_loads: fused, first pass by gathered loads
BACKWARD_KERNELS = ("two_pass", "fused")


class ViewTables(NamedTuple):
    """K views per image (`uno_engine.read`): each view's tap tables (the keys of `TABLES` with a leading view
    axis, V = B * K image-major, plus the int counts KY, KX, KTY, KTX), and its noise: affine (V, 3) fp32
    [alpha, beta, sigma] and keys (V, 2) int64, or None for none."""

    per_image: int
    tables: dict
    affine: torch.Tensor | None
    keys: torch.Tensor | None


def mask_layout(
    B: int, H: int, W: int, Hc: int, Wc: int, vertical_first: bool, clip: bool = True
) -> tuple[int, int, int, int]:
    """(numel of the uint8 buffer, start and end of the first-pass mask, offset of the int32 flags) of the
    forward's side outputs: the second-pass mask on the canvas [0, m1_at), the first-pass mask on t
    [m1_at, m1_end), zero padding to 16 bytes, the per-plane clamp flags [flags_at, numel). Without
    `clip` (no per-pass clip) there are no pass masks, only the flags."""
    P = B * 3
    n2 = P * Hc * Wc if clip else 0
    n1 = P * (Hc * W if vertical_first else H * Wc) if clip else 0
    flags_at = -(-(n2 + n1) // 16) * 16
    return flags_at + 4 * P, n2, n2 + n1, flags_at


def _geometry(qwen, Wc: int) -> tuple[int, int, int, int]:
    """(gw, patch, merge, temporal) kernel arguments of the output layout."""
    if qwen is None:
        return 1, 1, 1, 1
    patch, merge, temporal = qwen
    return Wc // patch, patch, merge, temporal


def bridge_forward(
    images: torch.Tensor,
    tables: dict,
    consts: torch.Tensor,
    canvas: tuple[int, int],
    region: tuple[int, int, int, int],
    input_range: tuple[float, float],
    *,
    clip_each_pass: bool,
    store_mask: bool,
    qwen: tuple[int, int, int] | None,
    out_dtype: torch.dtype,
    vertical_first: bool = False,
    kernel: str = "two_pass",
    blocks=None,
    fused_tile=None,
    views: ViewTables | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the forward. images: (B, 3, H, W) any strides; tables: `tap_tables` as int32 / fp32 device tensors
    plus the int counts; consts: (3, 3) fp32 per channel [scale, shift, fill]; canvas: (Hc, Wc); region: the
    canvas rectangle (y0, y1, x0, x1) that shows the image; qwen: (patch, merge, temporal) or None;
    vertical_first: Pillow's pass order. kernel: one of FORWARD_KERNELS (a fused kernel whose band does not
    fit falls back to the two passes); blocks: two-pass tiles (`bridge_two_pass.check_blocks`) or None;
    fused_tile: (KH, KW, num_warps) or None.

    views: K views per image (`ViewTables`; `tables` is then ignored): the two-pass kernels read each image
    once per view with that view's tables and write B * K rows, the noise drawn in the second pass.

    Returns (out, side): out (B, 3, Hc, Wc) or (B*gh*gw, 3*T*p*p) in out_dtype (B * K rows with views);
    side: the uint8 buffer of `mask_layout` the backward reads (store_mask), or None."""
    if kernel not in FORWARD_KERNELS:
        raise ValueError(f"bridge_forward: kernel must be one of {FORWARD_KERNELS}, got {kernel!r}")
    if views is not None and kernel != "two_pass":
        raise ValueError(f"bridge_forward: views run the two-pass kernels, got kernel={kernel!r}")
    B, C, H, W = images.shape
    if views is not None:
        tables, B = views.tables, B * views.per_image  # B: output rows from here
    Hc, Wc = canvas
    dev = images.device
    gw, patch, merge, temporal = _geometry(qwen, Wc)
    if qwen is None:
        out = torch.empty((B, C, Hc, Wc), device=dev, dtype=out_dtype)
    else:
        out = torch.empty((B * (Hc // patch) * gw, C * temporal * patch * patch), device=dev, dtype=out_dtype)
    lo, hi = float(input_range[0]), float(input_range[1])
    inv = 1.0 / (hi - lo)
    plan = None
    if kernel != "two_pass":
        plan = fused_plan(tables, (Hc, Wc), None if fused_tile is None else check_tile(fused_tile))
    side = m1 = m2 = flags = None
    if store_mask:
        numel, m1_at, m1_end, flags_at = mask_layout(B, H, W, Hc, Wc, vertical_first, clip_each_pass)
        side = torch.empty(numel, device=dev, dtype=torch.uint8)
        # padding and flags; the two passes write the masks whole, the fused kernel leaves the first-pass
        # mask of source rows (columns) outside every band unwritten: zeros there (their gradient is zero)
        side[m1_end if plan is None else m1_at :].zero_()
        flags = side[flags_at:].view(torch.int32)
        m2, m1 = side[:m1_at], side[m1_at:m1_end]
    args = (out, m1, m2, flags, images, tables, consts, canvas, region, lo, inv, gw, patch, merge, temporal)
    flags_kw = dict(
        clip=clip_each_pass, store_mask=store_mask, qwen=qwen is not None, vertical_first=vertical_first
    )
    if plan is not None:
        bridge_fused.forward(plan, *args, **flags_kw, gather=kernel == "fused")
    else:
        vw = None if views is None else (views.per_image, views.affine, views.keys)
        blocks = None if blocks is None else check_blocks(blocks)
        bridge_two_pass.forward(*args, **flags_kw, blocks=blocks, views=vw)
    return out, side


def bridge_backward(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    side: torch.Tensor | None,
    tables: dict,
    consts: torch.Tensor,
    canvas: tuple[int, int],
    region: tuple[int, int, int, int],
    input_range: tuple[float, float],
    *,
    clip_each_pass: bool,
    use_masks: bool,
    qwen: tuple[int, int, int] | None,
    vertical_first: bool = False,
    kernel: str = "two_pass",
    blocks=None,
    fused_tile=None,
    views: ViewTables | None = None,
) -> torch.Tensor:
    """Run the backward: grad of the images (B, 3, H, W) in images.dtype, each element written once.
    use_masks=False is the straight-through policy (no masks; the images are not read). kernel: one of
    BACKWARD_KERNELS; blocks / fused_tile as in `bridge_forward` (fused_tile: the canvas band of grad_out).
    views: as in `bridge_forward` (grad_out has B * K rows); each image's gradient sums its K views."""
    if kernel not in BACKWARD_KERNELS:
        raise ValueError(f"bridge_backward: kernel must be one of {BACKWARD_KERNELS}, got {kernel!r}")
    if views is not None and kernel != "two_pass":
        raise ValueError(f"bridge_backward: views run the two-pass kernels, got kernel={kernel!r}")
    B, C, H, W = images.shape
    K = 1 if views is None else views.per_image
    if views is not None:
        tables = views.tables
    Hc, Wc = canvas
    grad_out = grad_out.contiguous()
    gx = torch.empty((B, C, H, W), device=images.device, dtype=images.dtype)
    gw, patch, merge, temporal = _geometry(qwen, Wc)
    m1 = m2 = flags = None
    if use_masks:
        if side is None:
            raise ValueError("bridge_backward: use_masks needs the forward's side outputs (store_mask=True)")
        _, m1_at, m1_end, flags_at = mask_layout(B * K, H, W, Hc, Wc, vertical_first, clip_each_pass)
        m2, m1, flags = side[:m1_at], side[m1_at:m1_end], side[flags_at:].view(torch.int32)
        if K > 1:  # an image plane is read where any of its views saw a clamped pixel
            flags = flags.view(B, K, C).amax(1).reshape(-1)
    lo, hi = float(input_range[0]), float(input_range[1])
    inv = 1.0 / (hi - lo)
    plan = None
    if kernel == "fused":
        tile = None if fused_tile is None else check_tile(fused_tile)
        plan = fused_plan(tables, (H, W), tile, backward=True)
    args = (gx, grad_out, m1, m2, flags, images, tables, consts, canvas, region, lo, inv, gw, patch, merge, temporal)  # fmt: skip
    flags_kw = dict(
        clip=clip_each_pass, use_masks=use_masks, qwen=qwen is not None, vertical_first=vertical_first
    )
    if plan is not None:
        bridge_fused.backward(plan, *args, **flags_kw)
    else:
        vw = None if views is None else (K, views.affine, views.keys)
        blocks = None if blocks is None else check_blocks(blocks)
        bridge_two_pass.backward(*args, **flags_kw, blocks=blocks, views=vw)
    return gx
