"""The torch path of `ops.bridge`: the Pillow resampling as dense matmuls, forward and an explicit backward (it
recomputes the passes for the clamp masks instead of keeping them). Runs anywhere (CPU, a GPU without Triton).

Plain read (`forward` / `backward`): wy (Hc, H), wx (Wc, W) shared by the batch. Views (`views_forward` /
`views_backward`, `uno_engine.read`): wy (V, Hc, H), wx (V, Wc, W) per view, V = B * K image-major; the
backward sums the K views of an image. Noise and re-noising: clip(alpha * r + beta + sigma * eps) before the
last clip, eps from `bridge_math.hash_normal` (the Triton kernels draw the same numbers).
"""

from __future__ import annotations

import torch

from uno_engine.bridge_math import fill_padding, hash_normal, qwen2_vl_patchify, qwen2_vl_unpatchify_sum


def forward(images, wy, wx, consts, region, lo, hi, clip, qwen, vf):
    """images (B, 3, H, W) -> the critic input in images.dtype (plain read)."""
    cdtype = wy.dtype
    u = ((images.to(cdtype) - lo) / (hi - lo)).clamp(0.0, 1.0)
    t = torch.matmul(wy, u) if vf else torch.matmul(u, wx.T)
    if clip:
        t = t.clamp(0.0, 1.0)
    r = torch.matmul(t, wx.T) if vf else torch.matmul(wy, t)
    if clip:
        r = r.clamp(0.0, 1.0)
    return _epilogue(r, images.dtype, consts, region, qwen)


def backward(grad_out, images, wy, wx, consts, region, lo, hi, clip, qwen, use_masks, vf):
    """grad_images (B, 3, H, W) of `forward` (masks: where each clamp passed, unless straight-through)."""
    cdtype = wy.dtype
    B = images.shape[0]
    Hc, Wc = wy.shape[0], wx.shape[0]
    g = _grad_canvas(grad_out, B, Hc, Wc, cdtype, consts, region, qwen)
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


# --------------------------------------------------------------------------------------------- views
def view_noise(affine, keys, Hc, Wc):
    """(alpha, beta, sigma * eps) of the views' epilogue, shaped to broadcast over (V, 3, Hc, Wc)."""
    V = keys.shape[0]
    a, b, s = (affine[:, i].view(V, 1, 1, 1) for i in range(3))
    eps = hash_normal(keys, 3 * Hc * Wc).view(V, 3, Hc, Wc).to(affine.dtype)
    return a, b, s * eps


def _view_passes(u, wy, wx, K, clip, vf, first_only=False):
    """u (B, 3, H, W) clamped -> (t_pre (B, K, 3, ...), r (B*K, 3, Hc, Wc) before its clip; None when
    `first_only`)."""
    B = u.shape[0]
    wy5, wx5 = wy.view(B, K, 1, *wy.shape[1:]), wx.view(B, K, 1, *wx.shape[1:])
    u5 = u.unsqueeze(1)
    t_pre = torch.matmul(wy5, u5) if vf else torch.matmul(u5, wx5.transpose(-1, -2))
    if first_only:
        return t_pre, None
    t = t_pre.clamp(0.0, 1.0) if clip else t_pre
    r = torch.matmul(t, wx5.transpose(-1, -2)) if vf else torch.matmul(wy5, t)
    return t_pre, r.flatten(0, 1)


def views_forward(images, wy, wx, affine, keys, K, consts, region, lo, hi, clip, qwen, vf, store_mask=False):
    """images (B, 3, H, W) -> (the critic input of its B * K views (row b * K + k: view k of image b), mask).
    wy (V, Hc, H), wx (V, Wc, W); affine (V, 3) [alpha, beta, sigma] and keys (V, 2), or None (no noise).
    mask: with noise, a clip and `store_mask`, (V * 3 * Hc * Wc,) uint8, 1 where the last clip passed (what the
    backward would otherwise recompute, the noise draw included), else None."""
    u = ((images.to(wy.dtype) - lo) / (hi - lo)).clamp(0.0, 1.0)
    _, r = _view_passes(u, wy, wx, K, clip, vf)
    mask = None
    if affine is not None:
        a, b, n = view_noise(affine, keys, *r.shape[-2:])
        r = a * r + b + n
        if clip and store_mask:
            mask = ((r >= 0) & (r <= 1)).to(torch.uint8).flatten()
    if clip:
        r = r.clamp(0.0, 1.0)
    return _epilogue(r, images.dtype, consts, region, qwen), mask


def views_mask_numel(V: int, canvas: tuple[int, int], noisy: bool, clip: bool, store_mask: bool) -> int:
    """Elements of `views_forward`'s mask (0: none)."""
    return V * 3 * canvas[0] * canvas[1] if noisy and clip and store_mask else 0


def views_backward(
    grad_out, images, wy, wx, affine, keys, K, consts, region, lo, hi, clip, qwen, use_masks, vf, mask=None
):
    """grad_images (B, 3, H, W) of `views_forward`: each view's transposed passes, summed over the K views.
    mask: the forward's last-clip mask, or None (recomputed here, the noise draw included)."""
    cdtype = wy.dtype
    B = images.shape[0]
    V, Hc, Wc = wy.shape[0], wy.shape[1], wx.shape[1]
    g = _grad_canvas(grad_out, V, Hc, Wc, cdtype, consts, region, qwen)
    if use_masks:
        u_pre = (images.to(cdtype) - lo) / (hi - lo)
        saved = mask is not None and clip
        t_pre, r_pre = _view_passes(u_pre.clamp(0.0, 1.0), wy, wx, K, clip, vf, first_only=saved)
        if saved:
            g = torch.where(mask.view(V, 3, Hc, Wc).bool(), g, 0.0)
        elif clip:
            if affine is not None:
                a, b, n = view_noise(affine, keys, Hc, Wc)
                r_pre = a * r_pre + b + n
            g = torch.where((r_pre >= 0) & (r_pre <= 1), g, 0.0)
    if affine is not None:
        g = g * affine[:, 0].view(V, 1, 1, 1)
    g = g.view(B, K, 3, Hc, Wc)
    wy5, wx5 = wy.view(B, K, 1, *wy.shape[1:]), wx.view(B, K, 1, *wx.shape[1:])
    g_t = torch.matmul(g, wx5) if vf else torch.matmul(wy5.transpose(-1, -2), g)
    if use_masks and clip:
        g_t = torch.where((t_pre >= 0) & (t_pre <= 1), g_t, 0.0)
    g_u = (torch.matmul(wy5.transpose(-1, -2), g_t) if vf else torch.matmul(g_t, wx5)).sum(1)
    if use_masks:
        g_u = torch.where((u_pre >= 0) & (u_pre <= 1), g_u, 0.0)
    return (g_u / (hi - lo)).to(images.dtype)


# ------------------------------------------------------------------------------------------ shared
def _epilogue(r, dtype, consts, region, qwen):
    scale, shift, fill = (consts[:, i].view(1, 3, 1, 1) for i in range(3))
    out = fill_padding(r, region, fill) * scale + shift
    if qwen is not None:
        out = qwen2_vl_patchify(out, *qwen)
    return out.to(dtype)


def _grad_canvas(grad_out, B, Hc, Wc, cdtype, consts, region, qwen):
    """grad_out in the output layout -> (B, 3, Hc, Wc) gradient of the clipped canvas r (scale applied,
    zero in the padding)."""
    g = grad_out.to(cdtype)
    if qwen is not None:
        g = qwen2_vl_unpatchify_sum(g, B, Hc, Wc, *qwen)
    return fill_padding(
        g * consts[:, 0].view(1, 3, 1, 1), region, torch.zeros((), dtype=cdtype, device=g.device)
    )
