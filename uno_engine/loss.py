"""`UNOLoss`: the understanding-supervision objective.

    L = caption * CE(critic captions the generated image)                      fused linear + CE, no [B,L,V]
      + density * MSE(DensityHead(gen features), density targets)              per patch
      + structure * MSE(StructureHead(gen features), edge targets)             mode "edges"
                  | (1 - cos(gen features, reference features)) per patch     mode "features"
      + head_fit * (the same head losses on the reference images' features)    trains the heads only
      + negatives * mean_b [ logsumexp_j s_bj - s_b0 ]                           hard negative captions
      + generator_loss * the generator's own training loss on the real pairs     keeps the prior
      + kl * mean_k mean (f_theta(x_k, t_k, c) - f_init(x_k, t_k, c))^2          DRaFT+ penalty

Hard negatives (`negatives`, batch "negative_captions" (B, K, L), optional "negative_caption_mask"): s_b0 is
the critic's log-likelihood of image b's true caption, s_b1..s_bK of its K negatives (from
`uno_engine.negatives.make_negatives`), s_bj = sum_l log p(c_bjl | image_b, c_bj<l), each a fused linear CE
with reduction="none" summed over the caption's real tokens. The term is the cross-entropy of a softmax over
the K+1 candidate captions: -log P(true caption | image, candidates) under a uniform prior, i.e. the critic
must rank the true caption first. Why this form: the caption term already raises s_b0; the softmax adds the
push-down of each negative weighted by its posterior, so the gradient concentrates on the negatives the
critic confuses with the truth and vanishes once it ranks the truth first (a hinge would need a margin and
stops abruptly, unlikelihood pushes every negative token down without bound, including the tokens a hard
negative shares with the truth). Sequence log-likelihoods (sums, not means) make s_b0 - s_bj the
log-likelihood ratio of the two captions, which for a one-word swap is decided by the swapped tokens. A
negative with no real token (mask all 0) is absent: it leaves the softmax (lets K vary per image). The
critic computes the image prefix once for all K+1 captions (`Critic.forward_with_negatives`).

Joint objective: `generator_loss` adds `generator.denoising_loss(batch)` (diffusion: the denoising loss in the
model's parameterization at random t on batch "reference_latents" / VAE-encoded "reference_images"; Janus:
the image-token CE of the reference image's VQ tokens), so the generator keeps fitting real data while the
critic steers it (ImageReward's maintainers advise adding the pre-training loss to ReFL: the reward alone
degrades the model). `kl` is DRaFT+'s penalty: over the generator's grad steps (`generator.last_grad_steps`:
records with .x_t, .t, .cond, .prediction), the mean squared difference between the trained prediction and
the INITIAL model's, `generator.predict(x_t, t, cond)` under no grad. The initial model: a peft LoRA denoiser with its adapters disabled (no copy); otherwise a frozen
copy of the generator's trainable weights, taken in `bind` (memory: one copy of the trainable parameters;
not saved in state_dict: a resumed run's "initial" model is the resumed weights).

Heads are fitted on the critic's features of *real* reference images (no gradient into the critic or the
generator); on generated images they run with detached parameters, so their gradient reaches the generator
only. In editing, `batch["edit_mask"]` (B, N) marks edited patches with 1: structure holds only the unedited
patches (mask = 1 - edit_mask) to the source image.

Views (`UNOConfig(read=ReadAugment(views=K))`, `views=K` here): the critic read K views of each image, so
`out` has B * K rows (row b * K + k: view k of image b). Every term averages over the views: the caption CE
divides by the tokens of all B * K rows (a given `num_caption_tokens` counts images, so it is multiplied by
K), the negatives term is a mean over the B * K rows, the regression terms' targets (B rows) are repeated
per view, and the per-image factors (`num_images`) count images, not views.

Normalization of the caption CE: "local" divides by this batch's caption tokens; "global" by the token count
summed over data-parallel ranks (an all_reduce on the device, no host sync) and multiplies by the world size,
so that DDP's gradient averaging yields the global token mean (under "global", `metrics["caption_ce"]` on one
rank is scaled by the world size; average it over ranks to read it).

Gradient accumulation: `batch["num_caption_tokens"]` (a device scalar) replaces the count, with no world-size
factor applied: pass (caption tokens over all ranks and micro-batches) / world_size, which
`uno_engine.distributed.accumulation_token_count` computes. `batch["num_images"]` (this rank's images over its
micro-batches) rescales the per-patch regression terms likewise, so M accumulated micro-batches equal one batch;
the negatives, generator_loss and kl terms are per-image means and are rescaled the same way (B / num_images).
Under "global" without num_images, their image count is all-reduced and multiplied by the world size, as the
caption term's token count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from uno_engine import eager, ops
from uno_engine.read import per_view


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
    negatives: weight of the hard-negative caption term (needs batch "negative_captions" (B, K, L)).
    generator_loss: weight of the generator's own training loss on the batch's real pairs (needs
        "reference_latents", "reference_images" or, for Janus, "reference_image_tokens"). In the
        representation view it is the loss of the representation pass's own denoiser call (out.generator_loss).
    kl: weight of DRaFT+'s penalty between the trained and the initial model's predictions over the grad steps.
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
        negatives: float = 0.0,
        generator_loss: float = 0.0,
        kl: float = 0.0,
    ):
        super().__init__()
        for name, w in (
            ("caption", caption),
            ("density", density),
            ("structure", structure),
            ("head_fit", head_fit),
            ("negatives", negatives),
            ("generator_loss", generator_loss),
            ("kl", kl),
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
        self.w_negatives, self.w_generator, self.w_kl = negatives, generator_loss, kl
        self._initial: InitialModel | None = None

    def bind(self, critic, generator=None) -> None:
        """Create the heads for this critic's patch-feature width; with kl > 0, capture the generator's
        initial model (called by UNOStep)."""
        from uno_engine.heads import DensityHead, StructureHead

        if self.w_kl > 0 and generator is not None and self._initial is None:
            self._initial = InitialModel(generator)

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
        generator=None,
        lce_impl: str = "auto",
        bridge_kernel: str = "auto",
        views: int = 1,
    ):
        """Returns (loss: 0-d tensor with grad, metrics: dict of detached 0-d device tensors).
        `views`: the critic read this many views of each image (`out` has B * views rows; module docstring).
        `fuse_patch_embed` and `bridge_kernel` go to `critic.prepare` of the reference images, `lce_impl` to
        every linear cross-entropy (UNOConfig's fields of the same names; UNOStep passes them).
        `generator` (UNOStep passes it) is needed by the generator_loss and kl terms."""
        metrics: dict[str, torch.Tensor] = {}
        total = out.caption_hidden.new_zeros((), dtype=torch.float32)
        if self.w_caption > 0:
            ce = self.caption_loss(out, batch, backend, lce_impl, views)
            metrics["caption_ce"] = ce.detach()
            total = total + self.w_caption * ce
        prep = dict(
            input_range=input_range,
            backend=backend,
            fuse_patch_embed=fuse_patch_embed,
            bridge_kernel=bridge_kernel,
        )
        terms, names = self._regression_terms(out, batch, critic, backend, input_range, prep, views)
        if terms:
            fused = eager.fused_regression if backend == "reference" else ops.fused_regression
            kw = {} if backend == "reference" else {"backend": backend}
            reg_total, per_term = fused(terms, **kw)
            if batch.get("num_images") is not None:  # accumulation: a micro-batch's share of the whole batch
                reg_total = reg_total * (out.patch_features.shape[0] / views / batch["num_images"])
            total = total + reg_total
            for i, name in enumerate(names):
                metrics[name] = per_term[i]
        total = total + self._objective_terms(out, batch, backend, generator, metrics, lce_impl, views)
        metrics["loss"] = total.detach()
        return total, metrics

    # ------------------------------------------------------------------------------- the whole objective
    def negatives_of(self, batch: dict):
        """(negative_captions (B, K, L), negative_caption_mask or None) when the negatives term is on and
        K > 0, else None. UNOStep then runs `critic.forward_with_negatives`. Checks the shapes (no sync)."""
        if self.w_negatives <= 0:
            return None
        neg = batch.get("negative_captions")
        if neg is None:
            raise KeyError(
                "UNOLoss(negatives=...) needs batch['negative_captions'] (B, K, L) token ids "
                "(uno_engine.negatives.make_negatives makes them; K = 0 turns the term off)"
            )
        caps = batch["captions"]
        if not isinstance(neg, torch.Tensor) or neg.dim() != 3 or neg.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                "batch['negative_captions'] must be an integer tensor (B, K, L), got "
                + (f"{tuple(neg.shape)} {neg.dtype}" if isinstance(neg, torch.Tensor) else type(neg).__name__)
            )
        if neg.shape[0] != caps.shape[0] or neg.shape[2] != caps.shape[1]:
            raise ValueError(
                f"batch['negative_captions'] {tuple(neg.shape)} must be (B, K, L) with B, L of "
                f"batch['captions'] {tuple(caps.shape)}"
            )
        mask = batch.get("negative_caption_mask")
        if mask is not None and tuple(mask.shape) != tuple(neg.shape):
            raise ValueError(
                f"batch['negative_caption_mask'] must match batch['negative_captions'] {tuple(neg.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        return None if neg.shape[1] == 0 else (neg, mask)

    def negatives_loss(self, out, backend: str, lce_impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: logsumexp_j s_j - s_0 over the true caption (j = 0) and its K negatives (module
        docstring). Returns (loss (B,) float32, ranked_first (B,) bool: s_0 > every present s_j)."""
        s = sequence_log_likelihoods(out, backend=backend, lce_impl=lce_impl)  # (B, K+1)
        loss = torch.logsumexp(s, dim=1) - s[:, 0]
        return loss, (s[:, :1] > s[:, 1:]).all(dim=1)

    def _objective_terms(self, out, batch, backend, generator, metrics, lce_impl="auto", views=1) -> torch.Tensor:
        """negatives + generator_loss + kl (each a per-image mean, rescaled like the caption term)."""
        total = out.caption_hidden.new_zeros((), dtype=torch.float32)
        if self.w_negatives <= 0 and self.w_generator <= 0 and self.w_kl <= 0:
            return total
        share = self._image_share(out.caption_hidden.shape[0] // views, batch, out.caption_hidden.device)
        if self.w_negatives > 0 and out.negative_hidden is not None and out.negative_hidden.shape[1] > 0:
            per_image, first = self.negatives_loss(out, backend, lce_impl)
            term = per_image.mean() * share
            metrics["negatives"] = term.detach()
            metrics["negatives_ranked_first"] = first.float().mean().detach()
            total = total + self.w_negatives * term
        if self.w_generator > 0:
            own = getattr(out, "generator_loss", None)  # view="representation": from the same denoiser call
            term = (own if own is not None else self.generator_term(generator, batch)) * share
            metrics["generator_loss"] = term.detach()
            total = total + self.w_generator * term
        if self.w_kl > 0:
            term = self.kl_term(generator) * share
            metrics["kl"] = term.detach()
            total = total + self.w_kl * term
        return total

    def generator_term(self, generator, batch: dict) -> torch.Tensor:
        """`generator.denoising_loss(batch)`: the generator's own loss on the batch's real pairs (0-d)."""
        if generator is None or not callable(getattr(generator, "denoising_loss", None)):
            raise TypeError(
                "UNOLoss(generator_loss=...) needs a generator with denoising_loss(batch) (DiffusersGenerator, "
                f"JanusGenerator), got {type(generator).__name__}"
            )
        keys = ("reference_latents", "reference_images", "reference_image_tokens")
        if all(batch.get(k) is None for k in keys):
            raise KeyError(
                "UNOLoss(generator_loss=...) needs real targets: batch['reference_latents'] or "
                "batch['reference_images'] (Janus: also batch['reference_image_tokens'])"
            )
        return generator.denoising_loss(batch).float()

    def kl_term(self, generator) -> torch.Tensor:
        """DRaFT+: mean over the last forward's grad steps k of mean((f_theta - f_init)(x_k, t_k, c_k)^2)."""
        if generator is None:
            raise TypeError("UNOLoss(kl=...) needs the generator: call it as loss(..., generator=...)")
        if self._initial is None:
            self._initial = InitialModel(generator)  # not bound: the current weights are the initial ones
        steps = getattr(generator, "last_grad_steps", None)
        if not steps:
            raise ValueError(
                "UNOLoss(kl=...): generator.last_grad_steps is empty; the generator must record its grad steps "
                "in forward, each with .x_t, .t, .cond and .prediction (DiffusersGenerator's GradStep)"
            )
        terms = []
        for st in steps:
            init = self._initial.predict(generator, st.x_t.detach(), st.t, st.cond)
            terms.append((st.prediction.float() - init.float()).pow(2).mean())
        return torch.stack(terms).mean()

    def _image_share(self, n: int, batch: dict, device) -> torch.Tensor | float:
        """Factor that turns this micro-batch's per-image mean into its share of the normalized objective."""
        if batch.get("num_images") is not None:
            return n / batch["num_images"]
        if self.normalize == "global" and dist.is_available() and dist.is_initialized():
            count = torch.tensor(float(n), device=device)
            dist.all_reduce(count)
            return n * float(dist.get_world_size()) / count
        return 1.0

    def caption_loss(self, out, batch: dict, backend: str, lce_impl: str = "auto", views: int = 1) -> torch.Tensor:
        """Caption CE summed over tokens, divided by the (local, global or given) caption-token count (a given
        count is of the images' tokens: times `views`, the rows per image)."""
        kw = dict(
            bias=out.lm_head_bias,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=out.logit_softcap,
            reduction="sum",
        )
        if backend == "reference":
            ce_sum = eager.linear_cross_entropy(
                out.caption_hidden, out.lm_head_weight, out.caption_labels, **kw
            )
        else:
            ce_sum = ops.linear_cross_entropy(
                out.caption_hidden,
                out.lm_head_weight,
                out.caption_labels,
                backend=backend,
                impl=lce_impl,
                **kw,
            )
        count = batch.get("num_caption_tokens")
        scale = 1.0
        if count is not None and views > 1:
            count = count * views
        if count is None:
            count = (out.caption_labels != -100).sum().to(torch.float32)
            if self.normalize == "global" and dist.is_available() and dist.is_initialized():
                count = count.clone()
                dist.all_reduce(count)
                scale = float(dist.get_world_size())
        return ce_sum.float() * scale / count.to(torch.float32).clamp_min(1.0)

    def _regression_terms(self, out, batch, critic, backend, input_range, prep, views=1):
        terms, names = [], []
        if self.w_density <= 0 and self.w_structure <= 0:
            return terms, names
        ref_images = batch.get("reference_images")
        ref_feats = None
        if ref_images is not None:
            with torch.no_grad():
                ref_inputs = critic.prepare(ref_images, **prep)
                ref_feats, _ = critic.encode_patches(ref_inputs)
        feats = out.patch_features.float()
        if self.w_density > 0:
            target = self._target(batch, "density_target", ref_images, out.grid, "density", input_range)
            pred = self.density_head(feats, detach_params=True)
            terms.append(ops.RegressionTerm(pred, per_view(views, target), kind="mse", weight=self.w_density))
            names.append("density")
            if ref_feats is not None and self.w_fit > 0:
                fit = self.density_head(ref_feats.float())
                terms.append(ops.RegressionTerm(fit, target, kind="mse", weight=self.w_fit * self.w_density))
                names.append("density_head_fit")
        if self.w_structure > 0:
            keep = None
            if batch.get("edit_mask") is not None:
                keep = per_view(views, 1.0 - batch["edit_mask"].to(feats.dtype))
            if self.structure_mode == "features":
                target = batch.get("structure_target", ref_feats)
                if target is None:
                    raise ValueError(
                        "UNOLoss(structure_mode='features') needs batch['reference_images'] or "
                        "batch['structure_target'] (B, N, D)"
                    )
                terms.append(
                    ops.RegressionTerm(
                        feats, per_view(views, target.float()), kind="cosine", weight=self.w_structure, mask=keep
                    )
                )
                names.append("structure")
            else:
                target = self._target(
                    batch, "structure_target", ref_images, out.grid, "structure", input_range
                )
                pred = self.structure_head(feats, detach_params=True)
                terms.append(
                    ops.RegressionTerm(pred, per_view(views, target), kind="mse", weight=self.w_structure, mask=keep)
                )
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


def sequence_log_likelihoods(out, *, backend: str = "auto", lce_impl: str = "auto") -> torch.Tensor:
    """The critic's log-likelihood of each whole caption: s_bj = sum_l log p(c_bjl | image_b, c_bj<l).

    Args:
        out: a `CriticOutput`; with negatives (`Critic.forward_with_negatives`) j = 0 is the true caption and
            j = 1..K its negatives, else K = 0.
        backend, lce_impl: of the fused linear cross-entropy (reduction="none": per token, no [N, V] logits).
    Returns: (B, K+1) float32; -inf for a caption with no real token (an absent negative). Carries the graph
    of `out.caption_hidden` / `out.negative_hidden` unless called under torch.no_grad().
    """
    if out.negative_hidden is None:
        hidden, labels = out.caption_hidden[:, None], out.caption_labels[:, None]
    else:
        hidden = torch.cat([out.caption_hidden[:, None], out.negative_hidden], dim=1)  # (B, K+1, L, H)
        labels = torch.cat([out.caption_labels[:, None], out.negative_labels], dim=1)  # (B, K+1, L)
    ce = _lce(hidden, out, labels, backend, lce_impl)  # (B, K+1, L), 0 at padding
    present = (labels != -100).any(dim=-1)
    return (-ce.sum(dim=-1)).masked_fill(~present, float("-inf"))


def _lce(hidden, out, labels, backend, impl="auto") -> torch.Tensor:
    """Per-token caption CE (labels.shape, 0 at -100) with the critic's head, bias and softcap."""
    H = hidden.shape[-1]
    args = (hidden.reshape(-1, H), out.lm_head_weight, labels.reshape(-1))
    kw = dict(bias=out.lm_head_bias, softcap=out.logit_softcap, reduction="none")
    if backend == "reference":  # the eager baseline path
        return eager.linear_cross_entropy(*args, **kw).reshape(labels.shape)
    return ops.linear_cross_entropy(*args, backend=backend, impl=impl, **kw).reshape(labels.shape)


class _Predict(nn.Module):
    """generator.predict as a module forward, for torch.func.functional_call."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x_t, t, cond):
        return self.generator.predict(x_t, t, cond)


def _lora_layers(module: nn.Module) -> list[nn.Module]:
    """peft tuner layers (LoRA etc.) inside module, found by class name (peft is not imported)."""
    return [m for m in module.modules() if any(c.__name__ == "BaseTunerLayer" for c in type(m).__mro__)]


class InitialModel:
    """The generator's initial model for the kl term. With peft adapters (LoRA), the same modules with the
    adapters disabled (no copy). Otherwise a frozen copy of the trainable parameters only (the frozen ones
    are shared), used through `torch.func.functional_call`: memory = one copy of the trainable weights."""

    def __init__(self, generator: nn.Module):
        trainable = [(n, p) for n, p in generator.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "UNOLoss(kl=...): the generator has no trainable weights, so the trained and the initial model "
                "are the same and the kl term is 0; unfreeze weights (or LoRA adapters) or set kl=0"
            )
        if not callable(getattr(generator, "predict", None)):
            raise TypeError(
                f"UNOLoss(kl=...) needs generator.predict(x_t, t, cond) and generator.last_grad_steps; "
                f"{type(generator).__name__} has no predict"
            )
        self.lora = _lora_layers(generator)
        self.snapshot = None if self.lora else {n: p.detach().clone() for n, p in trainable}

    @torch.no_grad()
    def predict(self, generator: nn.Module, x_t, t, cond) -> torch.Tensor:
        if self.lora:
            was = [bool(m.disable_adapters) for m in self.lora]
            try:
                for m in self.lora:
                    m.enable_adapters(False)
                return generator.predict(x_t, t, cond)
            finally:
                for m, off in zip(self.lora, was, strict=True):
                    m.enable_adapters(not off)
        params = {"generator." + n: v for n, v in self.snapshot.items()}
        return torch.func.functional_call(_Predict(generator), params, (x_t, t, cond), strict=False)
