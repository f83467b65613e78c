"""The critic: a frozen understanding model that captions the generated image and exposes its patch features.

`Critic.from_hf(model, image_processor, checkpoint=..., attn_backend=...)` wraps a transformers model and
returns the family's adapter (LLaVA, LLaVA-OneVision, Janus, Qwen2-VL / Qwen2.5-VL, Qwen3-VL). The adapter

- freezes the understanding parameters (`requires_grad_(False)`) and keeps them in eval mode (`train()` is a
  no-op on a critic: dropout never runs in the critic);
- takes its preprocessing from the model's own image processor (`BridgeSpec.from_image_processor`);
- can take the vision tower's patch tokens from the fused bridge instead of pixel_values
  (`prepare(..., fuse_patch_embed=...)`, see uno_engine.critics.patch_embed): LLaVA (CLIP / SigLIP towers)
  and Janus. Qwen2-VL's patch embedding is a Conv3d over the processor's flattened patch rows, a layout the
  bridge's `patch_embed` does not take, so Qwen2-VL always gets pixel_values;
- assembles the sequence image tokens, then caption tokens (right padded), and returns the LM's final hidden
  states (after the final norm) at the positions that predict each caption token, the lm_head weight (and
  bias, softcap), and the vision patch features. The full [B, L, V] logits are never computed.

Only the understanding modules are registered as submodules of the critic (so `critic.parameters()` are the
frozen ones); the full HF model is kept as `critic.hf_model`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from uno_engine.critics.attention import check_attn_backend, resolve_attn_backend, set_attention
from uno_engine.critics.checkpointing import (
    NOMINAL_CAPTION_TOKENS,
    RECOMPUTED_PROJECTIONS,
    ActivationEstimate,
    CheckpointState,
    check_policy,
    choose_auto_policy,
    compile_layers,
    offload_context,
    record_auto_decision,
    wrap_layers,
)
from uno_engine.critics.common import find_layers, packed_caption_mask
from uno_engine.critics.patch_embed import find_patch_embedding, precomputed_patch_embedding
from uno_engine.critics.registry import lookup, supported_classes

__all__ = ["Critic", "CriticInputs", "CriticOutput"]


@dataclass
class CriticInputs:
    """What `Critic.prepare` returns and `Critic.forward` takes: pixel_values or patch_tokens, not both.

    pixel_values: (B, 3, h, w) for LLaVA / Janus; (B*gh*gw, 3*tps*p*p) pre-patchified for Qwen2-VL; None when
        patch_tokens are given.
    image_grid_thw: (B, 3) int64, Qwen2-VL only.
    patch_tokens: (B, N, D) output of the vision tower's conv patch embedding, computed by the fused bridge
        (LLaVA / Janus; N = (image_size // p)**2, D = the conv's output channels), or None.
    grid_thw: (t, gh, gw) of every image as Python ints (Qwen2-VL), known on the host from the spec, so
        the adapter never reads `image_grid_thw` back from the device; None -> read it (one sync).
    """

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None

    @property
    def bridge_output(self) -> torch.Tensor:
        """The tensor the bridge produced: patch_tokens when fused, else pixel_values."""
        return self.pixel_values if self.patch_tokens is None else self.patch_tokens


@dataclass
class CriticOutput:
    """caption_hidden: (B, L, H) final-norm hidden states; position l predicts caption token l.
    caption_labels: (B, L) int64 caption ids, -100 where caption_mask == 0.
    lm_head_weight: (V, H); lm_head_bias: (V,) or None; logit_softcap: float or None.
    patch_features: (B, N, Dv) vision patch features (no CLS), N = gh * gw in raster order; grid: (gh, gw).
    negative_hidden: (B, K, L, H) and negative_labels: (B, K, L), the same for K negative captions of each
    image (`Critic.forward_with_negatives`), else None."""

    caption_hidden: torch.Tensor
    caption_labels: torch.Tensor
    lm_head_weight: torch.Tensor
    lm_head_bias: torch.Tensor | None
    logit_softcap: float | None
    patch_features: torch.Tensor
    grid: tuple[int, int]
    negative_hidden: torch.Tensor | None = None
    negative_labels: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """(B, L, V) caption logits. For tests and debugging only: the engine never materializes them."""
        logits = self.caption_hidden @ self.lm_head_weight.T
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


class Critic(nn.Module):
    """Base class of the family adapters. Build one with `Critic.from_hf`."""

    hf_class_names: tuple[str, ...] = ()
    family: str = "?"  # for messages

    # ---------------------------------------------------------------------------------------------- build
    @staticmethod
    def from_hf(
        model: nn.Module, image_processor=None, *, checkpoint: str = "auto", attn_backend: str = "auto"
    ) -> Critic:
        """Wrap a transformers model as a frozen critic.

        Args:
            model: LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration (one anyres tile),
                JanusForConditionalGeneration (its understanding path), Qwen2VLForConditionalGeneration,
                Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration (the registry's list:
                `uno_engine.critics.supported_classes()`).
            image_processor: the model's HF image processor (its settings define the bridge); may be None when
                only `forward` on ready pixel_values is used (then `.spec` / `.prepare` raise).
            checkpoint: "auto" | "none" | "layer" | "selective" | "offload" (see
                uno_engine.critics.checkpointing). "auto" picks "none", "selective" or "layer" from the
                activation bytes per image estimated from the model's shapes (`activation_estimate`); the
                choice and why: `critic.checkpoint_policy`, `critic.checkpoint_reason`.
            attn_backend: "auto" | "sdpa" | "flash_attn" | "xformers" | "eager".
        """
        check_policy(checkpoint, allow_auto=True)
        check_attn_backend(attn_backend)
        cls = lookup(model)  # the family adapters register themselves (uno_engine.critics.registry)
        if cls is None:
            raise TypeError(
                f"Critic.from_hf: model of class {type(model).__name__} is not supported; supported classes: "
                + ", ".join(supported_classes())
            )
        return cls(model, image_processor, checkpoint=checkpoint, attn_backend=attn_backend)

    def __init__(self, model: nn.Module, image_processor, *, checkpoint: str, attn_backend: str):
        super().__init__()
        self.__dict__["hf_model"] = model  # not registered: a unified model's generation side is not ours
        self.image_processor = image_processor
        check_policy(checkpoint, allow_auto=True)
        self.attn_backend = check_attn_backend(attn_backend)
        self._spec = None
        self._compiled = False
        self._patch_site = None  # (site | None, reasons) of the fused patch embedding, found on first use
        self._build()  # family: registers the understanding submodules
        self.checkpoint_reason = "requested"
        if checkpoint == "auto":  # from the shapes (uno_engine.critics.checkpointing, "auto")
            checkpoint, self.checkpoint_reason = choose_auto_policy(self.activation_estimate())
            record_auto_decision(f"{self.family} critic ({type(model).__name__})", self.checkpoint_reason)
        self.checkpoint_policy = checkpoint
        self._ckpt = CheckpointState(checkpoint)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        device = self.lm_head_weight.device
        impl, self.attn_reason = resolve_attn_backend(attn_backend, device)
        self.attn_implementation = set_attention(
            self._attention_modules(), impl, fallback="sdpa" if attn_backend == "auto" else None
        )
        if checkpoint in ("layer", "selective"):
            wrap_layers(self._checkpoint_layers(), self._recomputed_projections())

    # ------------------------------------------------------------------------------------- family hooks
    def _build(self):
        raise NotImplementedError

    def _attention_modules(self) -> dict[str, nn.Module]:
        """name -> PreTrainedModel whose attention implementation the critic sets."""
        raise NotImplementedError

    def _checkpoint_layers(self) -> list[nn.Module]:
        """Vision-encoder layers + LM decoder layers (the checkpoint regions)."""
        raise NotImplementedError

    def _recomputed_projections(self) -> list[nn.Module]:
        """Linears whose matmul outputs the "selective" policy recomputes instead of saving (see
        uno_engine.critics.checkpointing): the attention input projections and each layer's last
        projection."""
        out = []
        for layer in self._checkpoint_layers():
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear) and name.split(".")[-1] in RECOMPUTED_PROJECTIONS:
                    out.append(mod)
        return out

    def _encode(self, inputs: CriticInputs) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """-> (image_embeds (B, Ni, H) LM-space tokens, patch_features (B, N, Dv), grid)."""
        raise NotImplementedError

    def _vision_tower(self) -> nn.Module:
        """The vision tower whose conv patch embedding the fused bridge may compute."""
        raise NotImplementedError

    def activation_estimate(self) -> ActivationEstimate:
        """What checkpoint="none" keeps per image, from the shapes (what checkpoint="auto" decides on):
        the vision encoder's layers x its patch tokens x its width, and the LM's layers x (image tokens +
        NOMINAL_CAPTION_TOKENS) x hidden_size. Patch tokens: (image_size // patch_size)**2 when the family
        has a fixed image size, else the processor's grid of a 448 x 448 image (1024 without a processor);
        LM image tokens: the patch tokens / merge_size**2 where the family merges patches (Qwen2-VL)."""
        n_lm = len(find_layers(self.language_model))
        n_vision = len(self._checkpoint_layers()) - n_lm  # the checkpoint regions: vision layers + LM layers
        if getattr(self, "image_size", None) and getattr(self, "patch_size", None):
            n_patch = (self.image_size // self.patch_size) ** 2
        elif self.image_processor is not None and hasattr(self.spec, "grid"):
            gh, gw = self.spec.grid(448, 448)
            n_patch = gh * gw
        else:
            n_patch = 1024
        n_image = n_patch // (getattr(self, "merge", 1) ** 2)
        v_cfg = getattr(self.hf_model.config, "vision_config", None)  # Qwen2-VL: embed_dim is the width
        v_hidden = getattr(v_cfg, "embed_dim", None) or getattr(v_cfg, "hidden_size", None) or self.vision_dim
        stacks = (
            ("vision", n_vision, n_patch, int(v_hidden)),
            ("LM", n_lm, n_image + NOMINAL_CAPTION_TOKENS, self.hidden_size),
        )
        return ActivationEstimate(stacks, self.lm_head_weight.element_size())

    # ---------------------------------------------------------------------------- fused patch embedding
    def fused_patch_embed_reasons(self) -> list[str]:
        """Why this critic cannot take patch tokens from the fused bridge (`prepare(fuse_patch_embed=True)`);
        empty when it can."""
        reasons = list(self._find_patch_site()[1])
        if self.image_processor is not None and self.spec.layout != "nchw":
            reasons.append(
                f"the bridge takes patch_embed for layout 'nchw' only, this spec is {self.spec.layout!r}"
            )
        return reasons

    def _find_patch_site(self):
        """(site | None, reasons) of the tower's conv patch embedding (patch_embed.find_patch_embedding)."""
        if self._patch_site is None:
            self._patch_site = find_patch_embedding(self._vision_tower())
        return self._patch_site

    def _use_fused_patch_embed(self, fuse, images: torch.Tensor, backend: str) -> bool:
        if fuse is False:
            return False
        if fuse not in (True, "auto"):
            raise ValueError(f"fuse_patch_embed must be True, False or 'auto', got {fuse!r}")
        reasons = self.fused_patch_embed_reasons()
        if fuse is True:
            if reasons:
                raise ValueError(
                    f"fuse_patch_embed=True: this {self.family} critic cannot take fused patch tokens: "
                    + "; ".join(reasons)
                    + ". Use fuse_patch_embed='auto' or False"
                )
            return True
        conv = self._find_patch_site()[0][2] if not reasons else None
        return (
            conv is not None
            and isinstance(images, torch.Tensor)
            and backend != "reference"  # the eager baseline keeps the plain HF path
            and torch.is_grad_enabled()
            and images.requires_grad  # without a backward there is nothing to save
            and images.dtype == conv.weight.dtype  # the conv in the critic's own dtype: the same forward
        )

    @contextlib.contextmanager
    def _vision_pixels(self, inputs: CriticInputs, dtype: torch.dtype):
        """Yields (what to pass the vision tower as pixel_values, grid (gh, gw)). With patch_tokens: a
        zero-stride placeholder of the critic image's shape, while the tower's patch embedding returns the
        tokens (uno_engine.critics.patch_embed.precomputed_patch_embedding)."""
        p = self.patch_size
        if inputs.patch_tokens is None:
            pv = inputs.pixel_values
            if pv.dim() != 4 or pv.shape[1] != 3:
                raise ValueError(
                    f"pixel_values must be (B, 3, h, w) for a {self.family} critic, got {tuple(pv.shape)}"
                )
            yield pv.to(dtype), (pv.shape[-2] // p, pv.shape[-1] // p)
            return
        site = self._find_patch_site()[0]  # not None: _check_inputs ran
        weight = site[2].weight
        tokens, side = inputs.patch_tokens, self.image_size
        g, D = side // p, weight.shape[0]
        if (
            not isinstance(tokens, torch.Tensor)
            or not tokens.is_floating_point()
            or tokens.dim() != 3
            or tuple(tokens.shape[1:]) != (g * g, D)
        ):
            raise ValueError(
                f"inputs.patch_tokens must be a float tensor (B, N={g * g}, D={D}) for this {self.family} critic "
                f"({side}px images, patch {p}), got {_describe(tokens)}; make them with "
                "Critic.prepare(images, fuse_patch_embed=True)"
            )
        placeholder = weight.new_zeros(()).expand(tokens.shape[0], 3, side, side)
        with precomputed_patch_embedding(site, tokens, (g, g)):
            yield placeholder, (g, g)

    def _prefix_ids(self, n_image_tokens: int) -> tuple[list[int | None], int]:
        """Token ids of the image prefix: None marks an image-feature slot. Default: image tokens only."""
        return [None] * n_image_tokens, n_image_tokens

    def _position_ids(
        self, inputs: CriticInputs, prefix: list[int | None], batch: int, length: int, device
    ) -> torch.Tensor | None:
        return None

    # language model parts, set by _build
    language_model: nn.Module
    lm_head: nn.Linear

    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def spec(self):
        """BridgeSpec of the model's own image processor."""
        if self._spec is None:
            if self.image_processor is None:
                raise ValueError(f"{type(self).__name__}: image_processor is None, so there is no BridgeSpec")
            from uno_engine.bridge_spec import BridgeSpec

            self._spec = BridgeSpec.from_image_processor(self.image_processor)
        return self._spec

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return self.lm_head.bias

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    @property
    def vision_dim(self) -> int:
        raise NotImplementedError

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self.text_config, "final_logit_softcapping", None)

    def train(self, mode: bool = True):
        """A critic always stays in eval mode (frozen; no dropout)."""
        return super().train(False)

    # ------------------------------------------------------------------------------------------- running
    def prepare(
        self,
        images: torch.Tensor,
        *,
        input_range=(-1.0, 1.0),
        clamp: str = "clamp",
        backend: str = "auto",
        fuse_patch_embed: bool | str = False,
        bridge_kernel: str = "auto",
        views=None,
    ) -> CriticInputs:
        """Generated images (B, 3, H, W) in `input_range` -> CriticInputs, differentiably, with the model's
        own preprocessing. backend "reference" -> uno_engine.eager.bridge, else uno_engine.ops.bridge (with
        kernel=bridge_kernel, UNOConfig.bridge_kernel).

        fuse_patch_embed: False: pixel_values. True: the bridge also applies the vision tower's conv patch
            embedding and returns patch_tokens (B, N, D), so the normalized image is not kept for the backward
            (raises ValueError for a critic that cannot take them: `fused_patch_embed_reasons()`). "auto": True
            where it is exact and saves memory: the critic can take them, backend is not "reference" (the eager
            baseline keeps the plain HF path), the images require grad under grad mode (else nothing is saved
            anyway), and images.dtype is the critic's dtype (the conv then runs in the same dtype as unfused:
            the same forward). Either bridge backend saves the same (both apply the conv after the resampling
            through the same no-save autograd function), so "auto" does not depend on it.
        views: None, or `uno_engine.read.Views` drawn for these images: the inputs of their B * K views
            (row b * K + k: view k of image b; `UNOConfig(read=ReadAugment(...))`).
        """
        fuse = self._use_fused_patch_embed(fuse_patch_embed, images, backend)
        conv = self._find_patch_site()[0][2] if fuse else None
        kw = dict(
            input_range=input_range,
            clamp=clamp,
            patch_embed=(conv.weight, conv.bias) if fuse else None,
            views=views,
        )
        if backend == "reference":
            from uno_engine import eager

            pixel_values = eager.bridge(images, self.spec, **kw)
        else:
            from uno_engine.ops import bridge

            pixel_values = bridge(images, self.spec, backend=backend, kernel=bridge_kernel, **kw)
        if fuse:
            return CriticInputs(patch_tokens=pixel_values)
        grid_thw = grid_host = None
        if getattr(self.spec, "layout", "nchw") == "qwen2_vl":
            H, W = images.shape[-2], images.shape[-1]
            rows = images.shape[0] * (1 if views is None else views.per_image)
            grid_thw = self.spec.image_grid_thw(rows, H, W, images.device)
            grid_host = (1, *self.spec.grid(H, W))
        return CriticInputs(pixel_values=pixel_values, image_grid_thw=grid_thw, grid_thw=grid_host)

    def encode_patches(self, inputs: CriticInputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """Vision only -> (patch_features (B, N, Dv), grid (gh, gw))."""
        self._check_inputs(inputs)
        with self._running():
            _, feats, grid = self._encode(inputs)
        return feats, grid

    def forward(
        self, inputs: CriticInputs, captions: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> CriticOutput:
        """Run the critic on prepared images and captions.

        Args:
            inputs: from `prepare` (or built by hand with the processor's pixel layout).
            captions: (B, L) int64 caption token ids (right padded).
            caption_mask: (B, L) 1 for real tokens, 0 for padding; None means all real.
        """
        if not isinstance(captions, torch.Tensor) or captions.dim() != 2:
            raise ValueError(f"captions must be a (B, L) int64 tensor, got {_describe(captions)}")
        if captions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"captions must hold integer token ids, got dtype {captions.dtype}")
        if caption_mask is not None and caption_mask.shape != captions.shape:
            raise ValueError(
                f"caption_mask must have the shape of captions {tuple(captions.shape)}, "
                f"got {tuple(caption_mask.shape)}"
            )
        self._check_inputs(inputs)
        B, L = captions.shape
        device = self.lm_head_weight.device
        captions = captions.to(device=device, dtype=torch.long)
        with self._running():
            image_embeds, patch_features, grid = self._encode(inputs)
            if image_embeds.shape[0] != B:
                raise ValueError(f"captions has batch size {B} but the images have {image_embeds.shape[0]}")
            prefix, _ = self._prefix_ids(image_embeds.shape[1])
            embeds = self._assemble(image_embeds, prefix, captions)
            P = len(prefix)
            attention_mask = None
            if caption_mask is not None:
                caption_mask = caption_mask.to(device)
                attention_mask = torch.cat(
                    [torch.ones(B, P, dtype=torch.long, device=device), caption_mask.long()], dim=1
                )
            position_ids = self._position_ids(inputs, prefix, B, P + L, device)
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                return_dict=True,
            )
            hidden = out.last_hidden_state
        labels = captions if caption_mask is None else captions.masked_fill(caption_mask == 0, -100)
        return CriticOutput(
            caption_hidden=hidden[:, P - 1 : P - 1 + L],
            caption_labels=labels,
            lm_head_weight=self.lm_head_weight,
            lm_head_bias=self.lm_head_bias,
            logit_softcap=self.logit_softcap,
            patch_features=patch_features,
            grid=grid,
        )

    def forward_with_negatives(
        self,
        inputs: CriticInputs,
        captions: torch.Tensor,
        caption_mask: torch.Tensor | None,
        negative_captions: torch.Tensor,
        negative_mask: torch.Tensor | None = None,
    ) -> CriticOutput:
        """`forward` for each image's caption AND its K negative captions, with the image prefix computed once.

        The vision tower runs once per image, and the LM runs ONE packed sequence per image,
        [prefix (P), caption (L), negative 1 (L), ..., negative K (L)], T = P + (K+1) L positions, under a
        block mask: prefix rows are causal; the rows of caption j see the whole prefix and, causally, caption j
        only (never another caption, never a padded key). Every caption block takes the positions P .. P+L-1
        (Qwen2-VL: the M-RoPE positions of the one-caption sequence, its caption part repeated), so each
        caption's hidden states equal those of `forward` on that caption alone, up to float rounding. Cost:
        one vision pass and P + (K+1) L LM positions per image, against (K+1) (vision + P + L) for K+1
        separate passes; the attention also reads the (B, 1, T, T) additive mask (T^2 floats per image).
        It is a plain LM forward, so every checkpoint policy applies unchanged; attention backends: sdpa,
        eager and xformers take the mask, flash_attention_2 cannot (ValueError).

        Args:
            captions, caption_mask: as `forward`, (B, L).
            negative_captions: (B, K, L) int token ids (right padded); K = 0 gives `forward`'s output.
            negative_mask: (B, K, L) 1 real / 0 pad, or None (all real).
        Returns: CriticOutput with caption_hidden / caption_labels of the true captions and
        negative_hidden (B, K, L, H) / negative_labels (B, K, L) (-100 at padding).
        """
        if not isinstance(captions, torch.Tensor) or captions.dim() != 2:
            raise ValueError(f"captions must be a (B, L) int64 tensor, got {_describe(captions)}")
        B, L = captions.shape
        K = check_negatives(captions, negative_captions, negative_mask)
        if K == 0:
            return self.forward(inputs, captions, caption_mask)
        if caption_mask is not None and caption_mask.shape != captions.shape:
            raise ValueError(
                f"caption_mask must have the shape of captions {tuple(captions.shape)}, "
                f"got {tuple(caption_mask.shape)}"
            )
        self._check_inputs(inputs)
        device = self.lm_head_weight.device
        caps, masks = pack_negatives(self, captions, caption_mask, negative_captions, negative_mask, device)
        with self._running():
            image_embeds, patch_features, grid = self._encode(inputs)
            if image_embeds.shape[0] != B:
                raise ValueError(f"captions has batch size {B} but the images have {image_embeds.shape[0]}")
            prefix, _ = self._prefix_ids(image_embeds.shape[1])
            P = len(prefix)
            embeds = self._assemble(image_embeds, prefix, caps.reshape(B, (K + 1) * L))
            pos = self._position_ids(inputs, prefix, B, P + L, device)
            if pos is None:
                pos = torch.arange(P + L, device=device).expand(B, -1)
            pos = torch.cat([pos[..., :P], pos[..., P:].repeat(*([1] * (pos.dim() - 1)), K + 1)], dim=-1)
            mask4 = packed_caption_mask(P, K + 1, masks.reshape(B, -1).to(device), embeds.dtype)
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=mask4,
                position_ids=pos,
                use_cache=False,
                return_dict=True,
            )
            hidden = out.last_hidden_state
        return packed_output(self, hidden, P, caps, masks, patch_features, grid)

    def _assemble(self, image_embeds: torch.Tensor, prefix: list[int | None], captions: torch.Tensor):
        """inputs_embeds (B, P + L, H): the prefix (image features and wrapper tokens), then the captions."""
        B = captions.shape[0]
        emb = self.embed_tokens
        text = emb(captions)
        image_embeds = image_embeds.to(text.dtype)
        parts, i, n_img = [], 0, image_embeds.shape[1]
        while i < len(prefix):
            if prefix[i] is None:
                parts.append(image_embeds)
                i += n_img
            else:
                j = i
                while j < len(prefix) and prefix[j] is not None:
                    j += 1
                ids = torch.tensor(prefix[i:j], dtype=torch.long, device=captions.device)
                parts.append(emb(ids).unsqueeze(0).expand(B, -1, -1))
                i = j
        return torch.cat(parts + [text], dim=1)

    def _check_inputs(self, inputs) -> None:
        if not isinstance(inputs, CriticInputs):
            raise TypeError(
                f"inputs must be a CriticInputs (from Critic.prepare), got {type(inputs).__name__}"
            )
        if (inputs.pixel_values is None) == (inputs.patch_tokens is None):
            raise ValueError(
                "inputs must carry exactly one of pixel_values and patch_tokens, got "
                + ("both" if inputs.pixel_values is not None else "neither")
            )
        reasons = self.fused_patch_embed_reasons() if inputs.patch_tokens is not None else []
        if reasons:
            raise ValueError(
                f"inputs.patch_tokens: this {self.family} critic cannot take fused patch tokens: "
                + "; ".join(reasons)
                + ". Pass pixel_values"
            )

    def _running(self):
        """Context of a critic pass: layer checkpointing active, offloading when asked for."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._ckpt.activate())
        stack.enter_context(offload_context(self.checkpoint_policy, self.lm_head_weight.device))
        return stack

    # ------------------------------------------------------------------------------------------- compile
    def compile_blocks(self, **compile_kwargs) -> int:
        """torch.compile every vision-encoder layer and LM decoder layer, one by one (what
        `UNOConfig(compile=True)` calls). Keyword arguments go to torch.compile. Returns the number of
        blocks."""
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        if (major, minor) < (2, 4) or not hasattr(nn.Module, "compile"):
            raise RuntimeError(
                f"compile=True needs torch >= 2.4 (layer-wise compile of non-reentrant checkpoint regions); "
                f"this is torch {torch.__version__}. Upgrade torch or set UNOConfig(compile=False)."
            )
        n = compile_layers(self._checkpoint_layers(), **compile_kwargs)
        self._compiled = True
        return n

    # ---------------------------------------------------------------------------------------- latent view
    def attach_latent_adapter(self, adapter) -> Critic:
        """Attach a fitted `uno_engine.latent.LatentAdapter` for `UNOConfig(view="latent")` with a diffusion
        generator. Raises `LatentAdapterMismatch` (naming the fields) when it was fitted for another critic
        (class, LM width, token grid, config hash). The adapter is frozen (requires_grad False, eval mode),
        moved to this critic's device, and registered as a submodule (saved with the critic's state_dict)."""
        adapter.check_critic(self)
        adapter.requires_grad_(False).eval()
        self.latent_adapter = adapter.to(self.lm_head_weight.device)
        return self


def check_negatives(captions: torch.Tensor, negative_captions, negative_mask) -> int:
    """K of negative_captions (B, K, L), checked against captions (B, L) and negative_mask ((B, K, L) or None);
    a ValueError names the argument otherwise."""
    B, L = captions.shape
    neg = negative_captions
    if (
        not isinstance(neg, torch.Tensor)
        or neg.dim() != 3
        or neg.shape[0] != B
        or neg.shape[2] != L
        or neg.dtype not in (torch.int64, torch.int32)
    ):
        raise ValueError(
            f"negative_captions must be an integer tensor (B={B}, K, L={L}) matching captions, got {_describe(neg)}"
        )
    if negative_mask is not None and tuple(negative_mask.shape) != tuple(neg.shape):
        raise ValueError(
            f"negative_caption_mask must have the shape of negative_captions {tuple(neg.shape)}, "
            f"got {_describe(negative_mask)}"
        )
    return neg.shape[1]


def pack_negatives(critic, captions, caption_mask, negative_captions, negative_mask, device):
    """-> (caps, masks), both (B, K+1, L) int64 on `device`: the caption, then its K negatives; masks 1 real /
    0 pad (a None mask: all real). Refuses a flash_attention_2 LM, which cannot take the block mask."""
    if getattr(critic, "attn_implementation", {}).get("language_model") == "flash_attention_2":
        raise ValueError(
            "negative captions share the image prefix through a block attention mask, which the "
            "flash_attention_2 backend cannot take; build the critic with attn_backend='sdpa'"
        )
    neg = negative_captions
    caps = torch.cat([captions[:, None], neg.to(captions.device)], dim=1).to(device=device, dtype=torch.long)
    cmask = torch.ones_like(captions) if caption_mask is None else caption_mask
    nmask = torch.ones_like(neg) if negative_mask is None else negative_mask
    masks = torch.cat([cmask.to(device).long()[:, None], nmask.to(device).long()], dim=1)
    return caps, masks


def packed_output(critic, hidden, P: int, caps, masks, patch_features, grid) -> CriticOutput:
    """The CriticOutput of one packed pass: hidden (B, P + (K+1) L, H) over [prefix, caption, negatives],
    caps / masks (B, K+1, L). Caption j's token 0 is predicted by the last prefix state, its token i > 0 by its
    own block's state i - 1."""
    B, K1, L = caps.shape
    H = hidden.shape[-1]
    first = hidden[:, P - 1 : P, None].expand(B, K1, 1, H)
    body = hidden[:, P:].reshape(B, K1, L, H)[:, :, : L - 1]
    cap_hidden = torch.cat([first, body], dim=2)  # (B, K+1, L, H)
    labels = caps.masked_fill(masks == 0, -100)
    return CriticOutput(
        caption_hidden=cap_hidden[:, 0],
        caption_labels=labels[:, 0],
        lm_head_weight=critic.lm_head_weight,
        lm_head_bias=critic.lm_head_bias,
        logit_softcap=critic.logit_softcap,
        patch_features=patch_features,
        grid=grid,
        negative_hidden=cap_hidden[:, 1:],
        negative_labels=labels[:, 1:],
    )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"
