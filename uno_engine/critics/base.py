"""The critic: a frozen understanding model that captions the generated image and exposes its patch features.

`Critic.from_hf(model, processor, instruction=..., checkpoint=..., attn_backend=...)` wraps a transformers model and
returns the family's adapter (LLaVA, LLaVA-OneVision, Janus, Qwen2-VL / Qwen2.5-VL, Qwen3-VL). The adapter

- freezes the understanding parameters (`requires_grad_(False)`) and keeps them in eval mode (`train()` is a
  no-op on a critic: dropout never runs in the critic);
- takes its preprocessing from the model's own image processor (`BridgeSpec.from_image_processor`);
- can take the vision tower's patch tokens from the fused bridge instead of pixel_values
  (`prepare(..., fuse_patch_embed=...)`, see uno_engine.critics.patch_embed): LLaVA (CLIP / SigLIP towers)
  and Janus. Qwen2-VL's patch embedding is a Conv3d over the processor's flattened patch rows, a layout the
  bridge's `patch_embed` does not take, so Qwen2-VL always gets pixel_values;
- reads through its `SequenceReader` (uno_engine.critics.reader): without an instruction, the sequence image
  tokens then caption tokens (right padded); with `instruction=` and the full processor, the model's own chat
  template ([prompt with the image] then the caption as the assistant's completion). It returns the LM's final
  hidden states (after the final norm) at the positions that predict each caption token, the lm_head weight
  (and bias, softcap), and the vision patch features. The full [B, L, V] logits are never computed.

Only the understanding modules are registered as submodules of the critic (so `critic.parameters()` are the
frozen ones); the full HF model is kept as `critic.hf_model`.
"""

from __future__ import annotations

import contextlib

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
from uno_engine.critics.common import find_layers
from uno_engine.critics.patch_embed import find_patch_embedding, precomputed_patch_embedding
from uno_engine.critics.reader import ChatPrompt, SequenceReader, check_captions
from uno_engine.critics.registry import lookup, supported_classes
from uno_engine.critics.trim import trim_rows, trimmed_modules
from uno_engine.critics.types import CriticInputs, CriticOutput

__all__ = ["Critic", "CriticInputs", "CriticOutput"]


class Critic(nn.Module):
    """Base class of the family adapters. Build one with `Critic.from_hf`."""

    hf_class_names: tuple[str, ...] = ()
    family: str = "?"  # for messages

    # ---------------------------------------------------------------------------------------------- build
    @staticmethod
    def from_hf(
        model: nn.Module,
        processor=None,
        *,
        instruction: str | None = None,
        checkpoint: str = "auto",
        attn_backend: str = "auto",
        trim: bool = True,
    ) -> Critic:
        """Wrap a transformers model as a frozen critic.

        Args:
            model: LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration (one anyres tile),
                JanusForConditionalGeneration (its understanding path), Qwen2VLForConditionalGeneration,
                Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration (the registry's list:
                `uno_engine.critics.supported_classes()`).
            processor: the model's full HF processor (tokenizer + image processor + chat template), or its image
                processor alone (its settings define the bridge either way); may be None when only `forward` on
                ready pixel_values is used (then `.spec` / `.prepare` raise).
            instruction: with the full processor, the critic reads each image in its own chat template: the user
                turn holds the image and this instruction, the caption is the assistant's completion (batch
                captions from `critic.tokenize_captions(texts)`). None (default): no template, the sequence
                [image tokens] caption, whatever the processor.
            checkpoint: "auto" | "none" | "layer" | "selective" | "offload" (see
                uno_engine.critics.checkpointing). "auto" picks "none", "selective" or "layer" from the
                activation bytes per image estimated from the model's shapes (`activation_estimate`); the
                choice and why: `critic.checkpoint_policy`, `critic.checkpoint_reason`.
            attn_backend: "auto" | "sdpa" | "flash_attn" | "xformers" | "eager".
            trim: compute only what the losses read (uno_engine.critics.trim): the vision tower stops at its
                deepest feature layer, and the last LM layer's output projection and MLP run only on the rows
                the losses read. Exact; False runs the model's full forward (what a hand-written loop does).
        """
        check_policy(checkpoint, allow_auto=True)
        check_attn_backend(attn_backend)
        cls = lookup(model)  # the family adapters register themselves (uno_engine.critics.registry)
        if cls is None:
            raise TypeError(
                f"Critic.from_hf: model of class {type(model).__name__} is not supported; supported classes: "
                + ", ".join(supported_classes())
            )
        return cls(
            model, processor, instruction=instruction, checkpoint=checkpoint, attn_backend=attn_backend, trim=trim
        )

    def __init__(
        self,
        model: nn.Module,
        processor,
        *,
        instruction: str | None = None,
        checkpoint: str,
        attn_backend: str,
        trim: bool = True,
    ):
        super().__init__()
        self.__dict__["hf_model"] = model  # not registered: a unified model's generation side is not ours
        full = processor is not None and hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")
        self.processor = processor if full else None  # the full processor (tokenizer, chat template), or None
        self.image_processor = processor.image_processor if full else processor
        check_policy(checkpoint, allow_auto=True)
        self.attn_backend = check_attn_backend(attn_backend)
        if not isinstance(trim, bool):
            raise ValueError(f"trim must be True or False, got {trim!r}")
        self.trim = trim
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
        # the LM layer whose row-wise modules run only on the rows the losses read (uno_engine.critics.trim)
        self.trimmed_layer = find_layers(self.language_model)[-1] if trim else None
        for module in trimmed_modules(self.trimmed_layer) if trim else ():
            trim_rows(module)
        if instruction is not None and processor is not None and not full:
            raise ValueError(
                f"instruction={instruction!r} needs the model's full processor (tokenizer + chat template); got "
                f"the image processor {type(processor).__name__}: pass AutoProcessor.from_pretrained(...)"
            )
        prompt = None if instruction is None else ChatPrompt(processor, instruction, self.image_markers())
        self.reader = SequenceReader(self, prompt)  # the one sequence builder of every view

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

    def default_prefix(self, n_image_tokens: int, *, latent: bool = False) -> list[int | None]:
        """The sequence before the caption without a chat template: token ids, None marking an image slot.
        Default: the image tokens only (the latent view the same)."""
        return [None] * n_image_tokens

    def image_markers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids the processor writes before / after the image tokens when it expands the image placeholder
        of a chat template (default: none)."""
        return (), ()

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
        own preprocessing, through `uno_engine.ops.for_backend("bridge", backend)`: uno_engine.ops.bridge (with
        kernel=bridge_kernel, UNOConfig.bridge_kernel), or for backend "reference" uno_engine.eager.bridge.

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
        from uno_engine import ops

        pixel_values = ops.for_backend("bridge", backend, kernel=bridge_kernel)(images, self.spec, **kw)
        if fuse:
            return CriticInputs(patch_tokens=pixel_values)
        grid_thw = grid_host = None
        if getattr(self.spec, "layout", "nchw") == "qwen2_vl":
            H, W = images.shape[-2], images.shape[-1]
            rows = images.shape[0] * (1 if views is None else views.per_image)
            grid_thw = self.spec.image_grid_thw(rows, H, W, images.device)
            grid_host = (1, *self.spec.grid(H, W))
        return CriticInputs(pixel_values=pixel_values, image_grid_thw=grid_thw, grid_thw=grid_host)

    def encode_caption(self, text: str) -> list[int]:
        """One caption's token ids as the critic reads it: with an instruction, the chat template's completion
        (end-of-turn token included); without, the tokenizer's ids (no special tokens added). The `encode` for
        `uno_engine.negatives.to_tensor`."""
        if self.processor is None:
            raise ValueError(
                f"tokenize_captions: this {self.family} critic was built without a tokenizer (Critic.from_hf got "
                f"{type(self.image_processor).__name__ if self.image_processor is not None else None}); pass the "
                "model's full processor (AutoProcessor) to Critic.from_hf"
            )
        if self.reader.prompt is not None:
            return self.reader.prompt.completion(text)
        if not isinstance(text, str):
            raise TypeError(f"captions must be strings, got {type(text).__name__}")
        return list(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_captions(self, texts, *, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption texts -> (captions (B, L) int64, caption_mask (B, L) int64), right padded with the
        tokenizer's pad id, ready for the batch's "captions" / "caption_mask". Each row is `encode_caption(text)`
        (with an instruction: the completion of the chat template's prompt). `length`: pad to this L (default:
        the longest); a caption longer than `length`, or than the critic's context after its prompt, raises
        ValueError (nothing is cut)."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"tokenize_captions: texts must be a non-empty list of strings, got {texts!r:.80}")
        rows = [self.encode_caption(t) for t in texts]
        L = max(len(r) for r in rows) if length is None else length
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"tokenize_captions: caption {i} ({texts[i]!r}) has no tokens")
            if len(r) > L:
                raise ValueError(f"tokenize_captions: caption {i} has {len(r)} tokens, more than length={L}")
        prompt = self.reader.prompt
        self.reader.check_context(len(prompt.prompt_ids) if prompt is not None else 0, L)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(rows), L), 0 if pad is None else pad, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def encode_image_tokens(self, inputs: CriticInputs) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The vision path alone -> (image tokens (B, N, H) in LM space, i.e. what fills the image slots of
        the sequence; patch_features (B, N', Dv); grid (gh, gw))."""
        self._check_inputs(inputs)
        with self.running():
            return self._encode(inputs)

    def encode_patches(self, inputs: CriticInputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """Vision only -> (patch_features (B, N, Dv), grid (gh, gw))."""
        _, feats, grid = self.encode_image_tokens(inputs)
        return feats, grid

    def forward(
        self, inputs: CriticInputs, captions: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> CriticOutput:
        """Run the critic on prepared images and captions (through `self.reader`, uno_engine.critics.reader).

        Args:
            inputs: from `prepare` (or built by hand with the processor's pixel layout).
            captions: (B, L) int64 caption token ids (right padded); with an instruction, the completions
                from `tokenize_captions`.
            caption_mask: (B, L) 1 for real tokens, 0 for padding; None means all real.
        """
        return self.forward_with_negatives(inputs, captions, caption_mask, None)

    def forward_with_negatives(
        self,
        inputs: CriticInputs,
        captions: torch.Tensor,
        caption_mask: torch.Tensor | None,
        negative_captions: torch.Tensor | None,
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
        eager and xformers take the mask, flash_attention_2 cannot (ValueError). With a chat template the
        negatives are completions of the same prompt.

        Args:
            captions, caption_mask: as `forward`, (B, L).
            negative_captions: (B, K, L) int token ids (right padded), or None (= `forward`).
            negative_mask: (B, K, L) 1 real / 0 pad, or None (all real).
        Returns: CriticOutput with caption_hidden / caption_labels of the true captions and
        negative_hidden (B, K, L, H) / negative_labels (B, K, L) (-100 at padding); K = 0 or None: `forward`'s.
        """
        check_captions(captions, caption_mask)
        self._check_inputs(inputs)
        B, device = captions.shape[0], self.lm_head_weight.device
        return self.reader.read(
            lambda: self._encode(inputs),
            captions,
            caption_mask,
            negative_captions,
            negative_mask,
            positions=lambda prefix, length: self._position_ids(inputs, prefix, B, length, device),
        )

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

    def running(self):
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


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"
