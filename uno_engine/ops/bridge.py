"""`ops.bridge`: generated images -> exactly the critic input of the critic's HF image processor, with its
gradient; optionally K random views of each image (`views=`, `uno_engine.read`).

The op in three files, as linear cross-entropy: this one (the public function, its argument checks and the
kernel choice), `_bridge_ops` (the registered ops `uno_engine::bridge_fwd` / `bridge_bwd` and
`bridge_views_fwd` / `bridge_views_bwd`: custom ops with fake + autograd and an eager fast path, so a compiled
step has no graph break; the plans they read) and `_bridge_torch` (the torch path). Backends:
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

import torch

from uno_engine import _env
from uno_engine.bridge_spec import BridgeSpec
from uno_engine.ops import _bridge_ops
from uno_engine.ops._dispatch import resolve_backend

KERNELS = ("auto", "two_pass", "fused")
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
    fwd = bwd = _bridge_ops._AUTO_KERNEL if kernel == "auto" else kernel
    why = [_AUTO_WHY if kernel == "auto" else f"kernel={kernel!r}"]
    env_fwd, env_bwd = _env.get("UNO_BRIDGE_FORWARD"), _env.get("UNO_BRIDGE_BACKWARD")
    if env_fwd is not None:
        fwd = env_fwd
        why.append(f"UNO_BRIDGE_FORWARD={env_fwd} overrides the forward")
    if env_bwd is not None:
        bwd = env_bwd
        why.append(f"UNO_BRIDGE_BACKWARD={env_bwd} overrides the backward")
    return {"forward": fwd, "backward": bwd, "why": "; ".join(why)}


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


def _check(images, spec, input_range, clamp, patch_embed, kernel, views=None) -> None:
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
    if views is not None:
        from uno_engine.read import Views

        if not isinstance(views, Views):
            raise TypeError(
                f"bridge: views must be uno_engine.read.Views (ReadAugment.draw(...)) or None, "
                f"got {type(views).__name__}"
            )
        views.check(images.shape[0], images.shape[2], images.shape[3])
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
    views=None,
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
        views: None (the plain read) or `uno_engine.read.Views` drawn for these images
            (`ReadAugment(...).draw(B, H, W, ...)`): the critic input of B * K views, row b * K + k view k of
            image b, each its box resampled with Pillow's box coefficients, then the views' noise / re-noising
            before the last clip. Triton: the two-pass kernels with per-view tap tables read the images once
            per view (no augmented copy) and the backward sums the K views in one deterministic gather.
            Views without jitter (identity boxes, no noise) run the plain read for each view.

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
    _check(images, spec, input_range, clamp, patch_embed, kernel, views)
    B, _, H, W = images.shape
    reasons = []
    if images.dtype == torch.float64:
        reasons.append("float64 images run on the torch path")
    rows = B * (views.per_image if views is not None else 1)
    if rows * 3 > 65535:
        reasons.append(f"batch {rows} x 3 planes exceeds the launch grid limit 65535")
    use_triton = resolve_backend("bridge", backend, [images], reasons) == "triton"
    cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    plan = _bridge_ops.plan(spec, H, W, images.device, cdtype, use_triton)
    store_mask = clamp == "clamp" and images.requires_grad
    lo, hi = float(input_range[0]), float(input_range[1])
    if views is not None and not views.jitter:  # every view is the plain read
        images = images.repeat_interleave(views.per_image, dim=0) if views.per_image > 1 else images
        views = None
    if views is None:
        out, _ = _bridge_ops.bridge_fwd(images, plan.id, lo, hi, use_triton, store_mask, kernel)
    else:
        tabs, affine, keys = _bridge_ops.view_tensors(
            spec, H, W, views, (lo, hi), images.device, cdtype, use_triton
        )
        out, _ = _bridge_ops.bridge_views_fwd(
            images, tabs, affine, keys, plan.id, views.per_image, lo, hi, use_triton, store_mask, kernel
        )
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
