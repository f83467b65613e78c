"""`UNOLoss`: the understanding-supervision objective.

    L = caption * CE(critic captions the generated image)                      fused linear + CE, no [B,L,V]
      + density * MSE(DensityHead(gen features), density targets)              per patch
      + structure * MSE(StructureHead(gen features), edge targets)             mode "edges"
                  | (1 - cos(gen features, reference features)) per patch     mode "features"
      + head_fit * (the same head losses on the reference images' features)    trains the heads only

Heads are fitted on the critic's features of *real* reference images (no gradient into the critic or the
generator); on generated images they run with detached parameters, so their gradient reaches the generator
only. In editing, `batch["edit_mask"]` (B, N) marks edited patches with 1: structure holds only the unedited
patches (mask = 1 - edit_mask) to the source image.

Normalization of the caption CE: "local" divides by this batch's caption tokens; "global" by the token count
summed over data-parallel ranks (an all_reduce on the device, no host sync) and multiplies by the world size,
so that DDP's gradient averaging yields the global token mean (under "global", `metrics["caption_ce"]` on one
rank is scaled by the world size; average it over ranks to read it).

Gradient accumulation: `batch["num_caption_tokens"]` (a device scalar) replaces the count, with no world-size
factor applied: pass (caption tokens over all ranks and micro-batches) / world_size, which
`uno_engine.distributed.accumulation_token_count` computes. `batch["num_images"]` (this rank's images over its
micro-batches) rescales the per-patch regression terms likewise, so M accumulated micro-batches equal one batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from uno_engine import ops, reference


class UNOLoss(nn.Module):
    """Args:
    caption: weight of the caption cross-entropy.
    density: weight of the density regression (needs batch "density_target" (B, N) or "reference_images").
    structure: weight of the structure term (needs "structure_target" or "reference_images").
    structure_mode: "edges" (StructureHead vs per-patch Sobel targets) or "features" (cosine between the
        generated and the reference image's critic patch features).
    head_fit: weight of fitting the heads on reference images (when the batch carries them).
    label_smoothing, z_loss: passed to the caption cross-entropy.
    normalize: "local" or "global" caption-token normalization (see module docstring).
    """

    def __init__(
        self,
        caption: float = 1.0,
        density: float = 0.0,
        structure: float = 0.0,
        *,
        structure_mode: str = "edges",
        head_fit: float = 1.0,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        normalize: str = "local",
    ):
        super().__init__()
        for name, w in (
            ("caption", caption),
            ("density", density),
            ("structure", structure),
            ("head_fit", head_fit),
        ):
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"UNOLoss: `{name}` must be a non-negative number, got {w!r}")
        if structure_mode not in ("edges", "features"):
            raise ValueError(
                f"UNOLoss: `structure_mode` must be 'edges' or 'features', got {structure_mode!r}"
            )
        if normalize not in ("local", "global"):
            raise ValueError(f"UNOLoss: `normalize` must be 'local' or 'global', got {normalize!r}")
        self.w_caption, self.w_density, self.w_structure, self.w_fit = caption, density, structure, head_fit
        self.structure_mode, self.normalize = structure_mode, normalize
        self.label_smoothing, self.z_loss = label_smoothing, z_loss
        self.density_head: nn.Module | None = None
        self.structure_head: nn.Module | None = None

    def bind(self, critic) -> None:
        """Create the heads for this critic's patch-feature width (called by UNOStep)."""
        from uno_engine.heads import DensityHead, StructureHead

        device = next(critic.parameters()).device
        if self.w_density > 0 and self.density_head is None:
            self.density_head = DensityHead(critic.vision_dim).to(device)
        if self.w_structure > 0 and self.structure_mode == "edges" and self.structure_head is None:
            self.structure_head = StructureHead(critic.vision_dim).to(device)

    # -------------------------------------------------------------------------------------------------
    def forward(
        self,
        out,
        batch: dict,
        *,
        critic,
        backend: str = "auto",
        input_range=(-1.0, 1.0),
        fuse_patch_embed="auto",
    ):
        """Returns (loss: 0-d tensor with grad, metrics: dict of detached 0-d device tensors).
        `fuse_patch_embed` goes to `critic.prepare` of the reference images (UNOConfig.fuse_patch_embed)."""
        metrics: dict[str, torch.Tensor] = {}
        total = out.caption_hidden.new_zeros((), dtype=torch.float32)
        if self.w_caption > 0:
            ce = self.caption_loss(out, batch, backend)
            metrics["caption_ce"] = ce.detach()
            total = total + self.w_caption * ce
        terms, names = self._regression_terms(out, batch, critic, backend, input_range, fuse_patch_embed)
        if terms:
            fused = reference.fused_regression if backend == "reference" else ops.fused_regression
            kw = {} if backend == "reference" else {"backend": backend}
            reg_total, per_term = fused(terms, **kw)
            if batch.get("num_images") is not None:  # accumulation: a micro-batch's share of the whole batch
                reg_total = reg_total * (out.patch_features.shape[0] / batch["num_images"])
            total = total + reg_total
            for i, name in enumerate(names):
                metrics[name] = per_term[i]
        metrics["loss"] = total.detach()
        return total, metrics

    def caption_loss(self, out, batch: dict, backend: str) -> torch.Tensor:
        """Caption CE summed over tokens, divided by the (local, global or given) caption-token count."""
        kw = dict(
            bias=out.lm_head_bias,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=out.logit_softcap,
            reduction="sum",
        )
        if backend == "reference":
            ce_sum = reference.linear_cross_entropy(
                out.caption_hidden, out.lm_head_weight, out.caption_labels, **kw
            )
        else:
            ce_sum = ops.linear_cross_entropy(
                out.caption_hidden, out.lm_head_weight, out.caption_labels, backend=backend, **kw
            )
        count = batch.get("num_caption_tokens")
        scale = 1.0
        if count is None:
            count = (out.caption_labels != -100).sum().to(torch.float32)
            if self.normalize == "global" and dist.is_available() and dist.is_initialized():
                count = count.clone()
                dist.all_reduce(count)
                scale = float(dist.get_world_size())
        return ce_sum.float() * scale / count.to(torch.float32).clamp_min(1.0)

    def _regression_terms(self, out, batch, critic, backend, input_range, fuse_patch_embed):
        terms, names = [], []
        if self.w_density <= 0 and self.w_structure <= 0:
            return terms, names
        ref_images = batch.get("reference_images")
        ref_feats = None
        if ref_images is not None:
            with torch.no_grad():
                ref_inputs = critic.prepare(
                    ref_images, input_range=input_range, backend=backend, fuse_patch_embed=fuse_patch_embed
                )
                ref_feats, _ = critic.encode_patches(ref_inputs)
        feats = out.patch_features.float()
        if self.w_density > 0:
            target = self._target(batch, "density_target", ref_images, out.grid, "density", input_range)
            pred = self.density_head(feats, detach_params=True)
            terms.append(ops.RegressionTerm(pred, target, kind="mse", weight=self.w_density))
            names.append("density")
            if ref_feats is not None and self.w_fit > 0:
                fit = self.density_head(ref_feats.float())
                terms.append(ops.RegressionTerm(fit, target, kind="mse", weight=self.w_fit * self.w_density))
                names.append("density_head_fit")
        if self.w_structure > 0:
            keep = None
            if batch.get("edit_mask") is not None:
                keep = 1.0 - batch["edit_mask"].to(feats.dtype)
            if self.structure_mode == "features":
                target = batch.get("structure_target", ref_feats)
                if target is None:
                    raise ValueError(
                        "UNOLoss(structure_mode='features') needs batch['reference_images'] or "
                        "batch['structure_target'] (B, N, D)"
                    )
                terms.append(
                    ops.RegressionTerm(
                        feats, target.float(), kind="cosine", weight=self.w_structure, mask=keep
                    )
                )
                names.append("structure")
            else:
                target = self._target(
                    batch, "structure_target", ref_images, out.grid, "structure", input_range
                )
                pred = self.structure_head(feats, detach_params=True)
                terms.append(ops.RegressionTerm(pred, target, kind="mse", weight=self.w_structure, mask=keep))
                names.append("structure")
                if ref_feats is not None and self.w_fit > 0:
                    fit = self.structure_head(ref_feats.float())
                    terms.append(
                        ops.RegressionTerm(fit, target, kind="mse", weight=self.w_fit * self.w_structure)
                    )
                    names.append("structure_head_fit")
        return terms, names

    @staticmethod
    def _target(batch, key, ref_images, grid, kind, input_range):
        from uno_engine import targets

        if batch.get(key) is not None:
            return batch[key].float()
        if ref_images is None:
            raise ValueError(
                f"UNOLoss: the {kind} term needs batch['{key}'] (B, N) or batch['reference_images']"
            )
        lo, hi = input_range
        images = (ref_images.float() - lo) * (2.0 / (hi - lo)) - 1.0  # targets take images in [-1, 1]
        fn = targets.density_targets if kind == "density" else targets.structure_targets
        return fn(images, grid).float()
