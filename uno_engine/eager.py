"""Eager PyTorch statements of the math of every op in `uno_engine.ops`, with the same signatures minus
`backend`: the one module that production and the test oracle share.

- The eager baseline path (`UNOConfig(backend="reference")`, the benchmarks' "eager" provider) calls these.
- `uno_engine.ops.regression`'s torch path is `fused_regression` / `regression_loss` here.
- The test oracle `uno_engine.reference` re-exports them (production never imports reference.py).
Speed and memory are not goals here (linear_cross_entropy materializes the N x V logits); exactness and
readability are. Each op owns one section below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------- bridge
# (section owned by the bridge op; the layout math is shared with ops.bridge's torch path: bridge_math)


def _bridge_clamp(x: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """clamp to [0, 1]; straight-through: the forward clamps, the gradient passes as if it did not."""
    c = x.clamp(0.0, 1.0)
    return x + (c - x).detach() if straight_through else c


def bridge(images, spec, *, input_range=(-1.0, 1.0), clamp="clamp", patch_embed=None, views=None):
    """Eager bridge: generated images -> the critic input `spec`'s HF image processor would make of them.

    images: (B, 3, H, W) float in `input_range`; spec: `uno_engine.BridgeSpec`.
    Returns (B, 3, h, w) pixel_values (layout "nchw"), (B*gh*gw, 3*T*p*p) patches (layout "qwen2_vl"), or
    (B, N, D) patch tokens when `patch_embed=(weight (D, 3, p, p), bias (D,) | None)` (nchw layouts), in
    images.dtype. Computed in float32 (float64 for float64 input) as dense resampling matrices:
    u = clamp((x - lo) / (hi - lo)); t = clamp(u @ Wx^T) (horizontal pass); r = clamp(Wy @ t) (vertical;
    the two passes swap when spec.vertical_first(H, W)),
    each clamp being the [0, 255] clip of the processor's uint8 path (clip_each_pass) and the first one the
    input clamp; clamp="straight_through" keeps those clamps in the forward but passes their gradient.

    views: None, or `uno_engine.read.Views` drawn for these images: B * K rows (row b * K + k: view k of
    image b), each view with its own Wy (Hc, H), Wx (Wc, W) (Pillow's coefficients of its box,
    `read.view_matrices`) and, with noise, r = clamp(alpha * (Wy @ t) + beta + sigma * eps) in place of the
    last clamp (eps: `bridge_math.hash_normal` of the view's keys over the (3, Hc, Wc) canvas, row-major).
    """
    from uno_engine.bridge_math import fill_padding, hash_normal, qwen2_vl_patchify
    from uno_engine.bridge_spec import bridge_tensors

    if clamp not in ("clamp", "straight_through"):
        raise ValueError(f"clamp must be 'clamp' or 'straight_through', got {clamp!r}")
    st = clamp == "straight_through"
    B, C, H, W = images.shape
    cdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    wy, wx, consts = bridge_tensors(spec, H, W, images.device, cdtype)
    lo, hi = float(input_range[0]), float(input_range[1])
    u = _bridge_clamp((images.to(cdtype) - lo) / (hi - lo), st)
    rows = B
    if views is not None:  # per-view matrices (B, K, 1, n, m) against the images (B, 1, 3, H, W)
        from uno_engine.read import view_matrices

        K, rows = views.per_image, B * views.per_image
        wy, wx = (
            torch.from_numpy(m).to(images.device, cdtype).view(B, K, 1, *m.shape[1:])
            for m in view_matrices(spec, H, W, views)
        )
        u = u.unsqueeze(1)
    wxT = wx.transpose(-1, -2)
    vertical_first = spec.vertical_first(H, W)
    t = torch.matmul(wy, u) if vertical_first else torch.matmul(u, wxT)  # first pass
    if spec.clip_each_pass:
        t = _bridge_clamp(t, st)
    r = torch.matmul(t, wxT) if vertical_first else torch.matmul(wy, t)  # (B[, K], 3, Hc, Wc)
    r = r.reshape(rows, C, *r.shape[-2:])
    if views is not None and views.noisy:
        a, b, s = (
            torch.from_numpy(v).to(images.device, cdtype).view(rows, 1, 1, 1)
            for v in views.affine((lo, hi)).T
        )
        keys = torch.from_numpy(views.keys).to(images.device)
        eps = hash_normal(keys, C * r.shape[-2] * r.shape[-1]).view(r.shape).to(cdtype)
        r = a * r + b + s * eps
    if spec.clip_each_pass:
        r = _bridge_clamp(r, st)
    scale, shift, fill = (consts[:, i].view(1, 3, 1, 1) for i in range(3))
    out = fill_padding(r, spec.region(H, W), fill) * scale + shift
    if patch_embed is not None:
        if spec.layout != "nchw":
            raise ValueError("patch_embed needs a spec with layout 'nchw'")
        weight, bias = patch_embed
        p = weight.shape[-1]
        tok = F.conv2d(out, weight.to(cdtype), None if bias is None else bias.to(cdtype), stride=p)
        return tok.flatten(2).transpose(1, 2).to(images.dtype)
    if spec.layout == "qwen2_vl":
        out = qwen2_vl_patchify(out, spec.patch_size, spec.merge_size, spec.temporal_patch_size)
    return out.to(images.dtype)


# ------------------------------------------------------------------------------ linear_cross_entropy
# (section owned by the linear cross-entropy op)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eager, unchunked `F.cross_entropy(hidden @ weight.T + bias, labels)` in fp32 (float64 stays float64).

    hidden: (N, H) or (B, L, H); weight: (V, H); labels: (N,) or (B, L); bias: (V,) or None.
    softcap applies `softcap * tanh(logits / softcap)` first; z_loss adds `z_loss * logsumexp(logits)**2` per
    non-ignored token; "mean" divides by the number of non-ignored tokens (0 when all are ignored, not NaN).
    Returns a 0-d loss, or labels.shape for reduction="none". Materializes the N x V logits (the oracle only).
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.reshape(-1, weight.shape[0])
    flat = labels.reshape(-1).long()
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


# ------------------------------------------------------------------------------------- regression
# (section owned by the regression ops)
REGRESSION_KINDS = ("mse", "smooth_l1", "cosine")
COSINE_EPS = 1e-8


def regression_loss(pred, target, *, kind="mse", weight=None, mask=None, beta=1.0, reduction="mean"):
    """One regression term, eagerly, in float32 (float64 inputs stay float64).

    pred, target: (..., D) same shape. kind: "mse" | "smooth_l1" (with `beta`; beta=0 is L1) | "cosine"
    (1 - cosine similarity per row over the last dim, norms floored at 1e-8). weight, mask: tensors (or
    floats) broadcastable to pred, or to pred.shape[:-1] for cosine; weight multiplies the loss, mask too,
    and "mean" divides sum(weight * mask * loss) by sum(mask broadcast to the loss's shape) (the element
    count without a mask). An all-zero mask gives 0, not NaN. reduction: "mean" | "sum" | "none".
    """
    if kind not in REGRESSION_KINDS:
        raise ValueError(f"kind must be one of {REGRESSION_KINDS}, got {kind!r}")
    if pred.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal pred shape {tuple(pred.shape)}")
    ct = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    p, y = pred.to(ct), target.to(ct)
    if kind == "mse":
        loss = (p - y) ** 2
    elif kind == "smooth_l1":
        d = p - y
        ad = d.abs()
        loss = torch.where(ad < beta, 0.5 * d * d / max(beta, 1e-30), ad - 0.5 * beta)
    else:
        a = torch.linalg.vector_norm(p, dim=-1).clamp_min(COSINE_EPS)
        b = torch.linalg.vector_norm(y, dim=-1).clamp_min(COSINE_EPS)
        loss = 1.0 - (p * y).sum(-1) / (a * b)
    if mask is not None:
        m = torch.as_tensor(mask, device=loss.device).to(ct).expand(loss.shape)
        loss = loss * m
    if weight is not None:
        loss = loss * torch.as_tensor(weight, device=loss.device).to(ct)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    den = m.sum() if mask is not None else torch.tensor(float(loss.numel()), dtype=ct, device=loss.device)
    return loss.sum() / torch.where(den > 0, den, torch.ones_like(den))


def fused_regression(terms):
    """Weighted sum of mean-reduced terms: returns (total 0-d with grad, per_term (T,) detached).

    terms: objects with .pred, .target, .kind, .weight, .mask, .beta (e.g. `uno_engine.ops.RegressionTerm`);
    per_term[t] is the term's loss including its weight, and total = per_term.sum() (with grad)."""
    losses = [
        regression_loss(t.pred, t.target, kind=t.kind, weight=t.weight, mask=t.mask, beta=t.beta)
        for t in terms
    ]
    if not losses:
        raise ValueError("terms must not be empty")
    stacked = torch.stack([l.float() for l in losses])
    return stacked.sum(), stacked.detach()
