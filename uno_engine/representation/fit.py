"""Warm-starting the representation head: train the head alone, the generator and the critic frozen.

A fresh head maps the generator's hidden states to tokens the critic cannot read, so the first UNO steps'
caption gradient into the generator would come through a random projection. `fit_head` first fits the head
with the step's own losses (caption CE, and the metaquery regression where the batches carry real images),
gradients to the head's parameters only (torch.autograd.grad: nothing accumulates in the generator's .grad).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["fit_head"]


def fit_head(
    step, batches: Callable[[int], dict], *, steps: int, lr: float = 1e-3, progress: bool = False
) -> list[float]:
    """Fit the generator's attached RepresentationHead through `step` (a `UNOStep` with
    `UNOConfig(view="representation")`): `steps` Adam steps at `lr` on `batches(i)` (the i-th batch dict, with
    "reference_images" / "reference_latents" for the regression). -> the loss per step (floats; this is setup
    work, it reads each loss back)."""
    from uno_engine.distributed import unwrap

    if getattr(step.config, "view", None) != "representation":
        raise ValueError("fit_head: `step` must be a UNOStep with UNOConfig(view='representation')")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fit_head: `steps` must be an int >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"fit_head: `lr` must be a number > 0, got {lr!r}")
    head = unwrap(step.generator).representation
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="representation head", leave=False)
    for i in it:
        out = step(batches(i))
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return losses
