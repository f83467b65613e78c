"""JanusGenerator: Janus's own image-token generation, differentiable by a straight-through Gumbel-softmax.

Janus (transformers `JanusForConditionalGeneration`) generates an image as `N = num_patches**2` VQ tokens, one
at a time: the LM (`model.model.language_model`) reads the prompt and the tokens so far, the generation head
(`model.model.generation_head`) gives logits over the VQ codebook, the sampled token is embedded by
`generation_embeddings` + `generation_aligner` for the next step, and the VQ decoder (`model.model.vqmodel`)
turns the N codebook vectors into pixels.

The training forward is **sample, then teacher-force** (chosen over a fully differentiable autoregressive
chain):

1. Sampling, no grad, with the LM's KV cache: N sequential LM calls on one new token each. Tokens are drawn by
   Gumbel-max, `token_i = argmax(logits_i / temperature + G_i)` (exactly a sample from softmax(logits/T)),
   with the Gumbel noise G drawn up front from the batch's seed / generator.
2. Gradient pass: ONE teacher-forced LM forward over [prompt, embed(token_0 .. token_{N-2})]
   (S + N - 1 positions) with grad, giving all N logit rows at once. With train="gen_head" this pass is
   skipped: the LM hidden states of step 1 are reused and only the head runs with grad (the cheapest mode).
   A batch may bring its own tokens ("gen_tokens"), which skips step 1 (step 2 then always runs, without an
   LM graph for train="gen_head").
3. Straight-through Gumbel-softmax with the SAME noise: y = onehot(token) + soft - soft.detach(),
   soft = softmax((logits / temperature + G) / tau). Forward: exactly the sampled tokens; backward: the
   Gumbel-softmax gradient.
4. Codebook vectors `y @ normalize(codebook)` (the VQ's `get_codebook_entry` L2-normalizes its rows), then
   `vqmodel.post_quant_conv` and `vqmodel.decoder`, with grad.

Cost: step 1 is N cached LM calls (as `model.generate(generation_mode="image")`), no activations kept; step 2
is one LM forward + backward over S + N tokens (a normal teacher-forced training step), plus (B, N, V_img)
fp32 logits / soft tensors. The gradient ignores how token i changes the later tokens (teacher forcing). A
fully autoregressive straight-through chain would instead keep N LM calls of activations; it is not offered.

Which parameters train (`train`): "gen_head" (generation_head), "gen_modules" (default: generation_embeddings,
generation_aligner, generation_head), "all" (those plus the language model). The generator sets requires_grad
on these generation modules; the VQ model is always frozen (as Janus ships it); the understanding vision tower
(`vision_model`, `aligner`) is not touched. The LM is SHARED with the critic: a `Critic` built on the same
model freezes it, and this generator freezes it too (requires_grad_(False)) unless train="all", the explicit
request to train the LM as well (it then also receives the critic path's gradient).

Latent view (`UNOConfig(view="latent")`): `latents_for_critic(batch)` runs steps 1-3 only and returns
`uno_engine.latent.GeneratedLatents(kind="tokens")`: the straight-through distribution y (B, N, V_img) (fp32)
and the tokens; the critic's LM then reads y through the generation embedding (uno_engine/critics/janus.py),
and step 4 (the VQ decoder) runs only if something calls its `decode()`. The step reaches it as
`forward(batch, view="latent")`, through a DDP / FSDP2 wrapper's forward and its hooks.

Returns (B, 3, H, W) images in the VQ decoder's dtype, H = W = num_patches * 2**(len(channel_multiplier) - 1)
(384 for Janus-Pro), nominally in [-1, 1] and NOT clamped (the bridge applies the engine's clamp policy).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from uno_engine.latent.types import GeneratedLatents
from uno_engine.representation.capture import block_output

from .base import (
    VIEWS,
    Generator,
    check_images,
    check_shape,
    draw_generator,
    noise_levels,
    rand,
    require_key,
    wants_latents,
)

_TRAIN_MODES = ("gen_head", "gen_modules", "all")


def _is_janus(model: nn.Module) -> bool:
    return any(c.__name__ == "JanusForConditionalGeneration" for c in type(model).__mro__)


class JanusGenerator(Generator):
    """Janus text-to-image as a generator (see the module docstring for the method and its cost).

    Args:
        model: a transformers `JanusForConditionalGeneration`.
        num_image_tokens: N; default (and the only value the VQ decoder takes) num_patches**2 from the config.
        tau: Gumbel-softmax temperature of the soft (backward) relaxation.
        temperature: sampling temperature of the hard tokens (1.0 = Janus's default sampling).
        cfg_scale: classifier-free guidance on the logits, uncond + w * (cond - uncond); 1.0 = off (Janus
            samples with 5.0). > 1 doubles every LM call. The unconditional prompt is
            batch["gen_uncond_input_ids"] or, by Janus's recipe, the prompt with every token except its first
            and last real ones replaced by `pad_token_id`.
        train: "gen_head" | "gen_modules" (default) | "all" (see the module docstring).
        pad_token_id: for the unconditional prompt (default: the model's generation/text config pad id,
            else 0).
        generator: default random source; a batch's "seed" (int) or "generator" wins.

    forward(batch) reads "gen_input_ids": (B, S) int64 prompt ids (Janus's generation prompt, ending with its
    image-start token), "gen_attention_mask": (B, S) optional (1 real, 0 pad; LEFT padded as the Janus
    processor pads prompts for generation), "gen_uncond_input_ids" optional, "seed" / "generator" optional,
    and "gen_tokens": (B, N) optional pre-sampled image tokens (skips step 1, e.g. to reuse one sampling
    across several timed steps; the training part's cost does not depend on the token values).
    After a call, `last_tokens` holds the (B, N) token ids used (detached).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_image_tokens: int | None = None,
        tau: float = 1.0,
        temperature: float = 1.0,
        cfg_scale: float = 1.0,
        train: str = "gen_modules",
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not _is_janus(model):
            raise TypeError(
                "JanusGenerator: model must be a transformers JanusForConditionalGeneration, "
                f"got {type(model).__name__}"
            )
        if train not in _TRAIN_MODES:
            raise ValueError(f"JanusGenerator: train must be one of {_TRAIN_MODES}, got {train!r}")
        if not tau > 0 or not temperature > 0:
            raise ValueError(
                f"JanusGenerator: tau and temperature must be > 0, got tau={tau}, temperature={temperature}"
            )
        if cfg_scale < 1.0:
            raise ValueError(f"JanusGenerator: cfg_scale must be >= 1 (1 = no CFG), got {cfg_scale!r}")
        self.model = model
        inner = model.model
        side = inner.vqmodel.quantize.quant_state_dims
        n_default = int(side[0] * side[1])
        if num_image_tokens is None:
            num_image_tokens = n_default
        if num_image_tokens != n_default:
            raise ValueError(
                f"JanusGenerator: num_image_tokens must be {n_default} (= num_patches**2 of the VQ decoder), "
                f"got {num_image_tokens}"
            )
        self.num_image_tokens = num_image_tokens
        self.grid = (int(side[0]), int(side[1]))
        self.tau, self.temperature, self.cfg_scale = float(tau), float(temperature), float(cfg_scale)
        self.train_mode = train
        if pad_token_id is None:
            gc = getattr(model, "generation_config", None)
            pad_token_id = getattr(gc, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(model.config.text_config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.default_generator = generator
        self.representation: nn.Module | None = None  # view="representation": attach_representation(head)
        lm_params = inspect.signature(inner.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in lm_params else "past_key_values"

        # requires_grad: generation modules per `train`; VQ frozen; LM frozen unless "all"; vision untouched.
        gen_mods = {
            "gen_head": [inner.generation_head],
            "gen_modules": [inner.generation_embeddings, inner.generation_aligner, inner.generation_head],
            "all": [inner.generation_embeddings, inner.generation_aligner, inner.generation_head],
        }[train]
        for m in (inner.generation_embeddings, inner.generation_aligner, inner.generation_head):
            m.requires_grad_(any(m is t for t in gen_mods))
        inner.vqmodel.requires_grad_(False)
        inner.language_model.requires_grad_(train == "all")

    # ------------------------------------------------------------------------------------------------------
    @property
    def _inner(self):
        return self.model.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The generation modules' parameters selected by `train` (+ the LM's for train="all")."""
        inner = self._inner
        mods = [inner.generation_head]
        if self.train_mode != "gen_head":
            mods = [inner.generation_embeddings, inner.generation_aligner, inner.generation_head]
        if self.train_mode == "all":
            mods.append(inner.language_model)
        seen, out = set(), []
        for m in mods:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _lm(self, embeds, mask, pos, cache=None, use_cache=False):
        kw = {self._cache_kw: cache} if cache is not None else {}
        out = self._inner.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            use_cache=use_cache,
            return_dict=True,
            **kw,
        )
        if not use_cache:
            return out.last_hidden_state, None
        # newer transformers name the returned cache `cache`, older ones `past_key_values`
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    def _gen_logits(self, hidden):
        """Generation-head logits (fp32), CFG-combined: hidden (B', ..., H) -> (B, ..., V_img)."""
        logits = self._inner.generation_head(hidden).float()
        if self.cfg_scale > 1.0:
            cond, uncond = logits.chunk(2)
            logits = uncond + self.cfg_scale * (cond - uncond)
        return logits

    def _prompts(self, batch: Mapping):
        name = type(self).__name__
        ids = require_key(batch, "gen_input_ids", name)
        check_shape(ids, 'batch["gen_input_ids"]', name, (None, None))
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f'{name}: batch["gen_input_ids"] must hold integer token ids, got {ids.dtype}')
        B, S = ids.shape
        if S == 0:
            raise ValueError(f'{name}: batch["gen_input_ids"] is empty (S == 0): a prompt is needed')
        mask = batch.get("gen_attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        check_shape(mask, 'batch["gen_attention_mask"]', name, (B, S))
        mask = mask.to(ids.device).long()
        if self.cfg_scale > 1.0:
            unc = self._uncond_ids(batch, ids, mask)
            ids = torch.cat([ids, unc.to(ids.device)])
            mask = torch.cat([mask, mask])
        return ids, mask, B

    def _uncond_ids(self, batch: Mapping, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """batch["gen_uncond_input_ids"], or Janus's recipe: keep the first and the last real token (BOS, image
        start) of each prompt, pad the rest."""
        B, S = ids.shape
        unc = batch.get("gen_uncond_input_ids")
        if unc is None:
            real = mask.bool()
            pos = torch.arange(S, device=ids.device)[None, :]
            first = torch.where(real, pos, S).amin(1, keepdim=True)
            keep = (pos == first) | (pos == S - 1) | ~real
            unc = torch.where(keep, ids, torch.full_like(ids, self.pad_token_id))
        check_shape(unc, 'batch["gen_uncond_input_ids"]', type(self).__name__, (B, S))
        return unc.to(ids.device)

    def forward(self, batch: Mapping[str, torch.Tensor], *, view: str = "pixel"):
        """Images (B, 3, H, W) (steps 1-4); view="latent": `latents_for_critic(batch)` (steps 1-3)."""
        if view == "representation":
            return self.representation_for_critic(batch)
        if wants_latents(view, type(self).__name__, VIEWS):
            return self.latents_for_critic(batch)
        logits, gumbel, tokens = self._train_logits(batch)
        y = self._straight_through(logits, gumbel, tokens)
        return check_images(self._decode_probs(y), type(self).__name__)

    # ---------------------------------------------------------------------------- representation view
    def attach_representation(self, head: nn.Module) -> JanusGenerator:
        """Attach a `uno_engine.representation.RepresentationHead` (a submodule: saved and trained with the
        generator); `uno_engine.representation.attach_representation` builds one sized to a critic."""
        self.representation = head
        return self

    @torch.no_grad()
    def representation_probe(self, batch: Mapping, block: str, output_index: int = 0):
        """-> (width of the LM block `block`'s output, (H, W) of this generator's images): one no-grad LM pass
        over the batch's prompts, what `attach_representation` sizes a head with."""
        ids, mask, _ = self._prompts({**batch, "gen_uncond_input_ids": batch["gen_input_ids"]})
        with block_output(self._inner.language_model, block, output_index) as box:
            self._lm(self._inner.language_model.get_input_embeddings()(ids), mask, None)
        vq = self._inner.vqmodel
        side = self.grid[0] * 2 ** (len(vq.config.channel_multiplier) - 1)
        return int(box["hidden"].shape[-1]), (side, side)

    def _reference_tokens(self, batch: Mapping, B: int, name: str) -> torch.Tensor | None:
        tokens = batch.get("reference_image_tokens")
        if tokens is None and batch.get("reference_images") is not None:
            imgs = batch["reference_images"]
            check_shape(imgs, 'batch["reference_images"]', name, (B, 3, None, None))
            with torch.no_grad():
                vq = self._inner.vqmodel
                tokens = vq.encode(imgs.to(vq.quant_conv.weight.dtype)).image_tokens.reshape(B, -1)
        if tokens is not None:
            check_shape(tokens, 'batch["reference_image_tokens"]', name, (B, self.num_image_tokens))
            tokens = tokens.long()
        return tokens

    def representation_for_critic(self, batch: Mapping[str, torch.Tensor]):
        """The representation view for Janus: ONE teacher-forced LM pass with grad over [prompt, noised image
        tokens], whose hidden states at the image positions (the output of the head's `block`, a module path
        inside the LM such as "layers.1") are projected to the critic's image tokens; Janus's own loss (the
        generation head's CE against the clean tokens) comes from the same pass.

        Clean tokens: batch["reference_image_tokens"] / VQ-encoded batch["reference_images"] (no grad), else the
        generator's own no-grad sample. Noise: each token is replaced by a uniform random code with probability
        u (per row, u ~ U(head.noise_range) or batch["representation_noise_level"]; u = 1: pure noise). Masked
        prompts (head.prompt_dropout): the row reads the unconditional prompt. No CFG in this pass."""
        from uno_engine.representation.types import GeneratedRepresentation

        name = f"{type(self).__name__}.representation_for_critic"
        head = getattr(self, "representation", None)
        if head is None:
            raise ValueError(
                f"{name}: no RepresentationHead is attached; build one with uno_engine.representation."
                "attach_representation(critic, generator, batch, block=...)"
            )
        inner = self._inner
        ids = require_key(batch, "gen_input_ids", name)
        B, S, N, device = ids.shape[0], ids.shape[1], self.num_image_tokens, ids.device
        mask = batch.get("gen_attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device).long()
        g = draw_generator(batch, self.default_generator, salt=2)
        clean = None if head.source == "sample" else self._reference_tokens(batch, B, name)
        if clean is None and head.source == "reference":
            raise KeyError(
                f'{name}: RepresentationHead(source="reference") needs batch["reference_image_tokens"] '
                'or batch["reference_images"]'
            )
        from_reference = clean is not None
        clean = (self._own_tokens(batch) if clean is None else clean).to(device)
        u = noise_levels(batch, head.noise_range, B, g, device, name)
        V = inner.generation_head.vision_head.out_features
        swap = rand((B, N), generator=g, device=device) < u.to(device)[:, None]
        codes = (rand((B, N), generator=g, device=device) * V).long().clamp_(max=V - 1)
        noised = torch.where(swap, codes, clean)
        kept = torch.ones(B, dtype=torch.bool, device=device)
        if head.prompt_dropout > 0:
            kept = rand((B,), generator=g, device=device) >= head.prompt_dropout
            ids = torch.where(kept[:, None], ids, self._uncond_ids(batch, ids, mask))
        pos = torch.cat(
            [(mask.cumsum(1) - 1).clamp(min=0), mask.sum(1, keepdim=True) + torch.arange(N, device=device)], 1
        )
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, N)], dim=1)
        with torch.enable_grad(), block_output(inner.language_model, head.block, head.output_index) as box:
            prompt = inner.language_model.get_input_embeddings()(ids)
            img = self.model.prepare_embeddings_for_image_generation(noised)
            hidden, _ = self._lm(torch.cat([prompt, img.to(prompt.dtype)], dim=1), full_mask, pos)
            tokens = head(box["hidden"][:, S : S + N], self.grid)
        own = None
        if from_reference:
            logits = inner.generation_head(hidden[:, S - 1 : S - 1 + N]).float()
            own = F.cross_entropy(logits.reshape(B * N, -1), clean.reshape(-1))
        return GeneratedRepresentation(
            tokens=tokens,
            grid=tuple(head.grid),
            noise_level=u,
            prompt_kept=kept,
            from_reference=from_reference,
            generator_loss=own,
        )

    @torch.no_grad()
    def _own_tokens(self, batch: Mapping) -> torch.Tensor:
        """The generator's own sample's tokens (B, N) (step 1, no grad)."""
        ids, mask, B = self._prompts(batch)
        V = self._inner.generation_head.vision_head.out_features
        g = draw_generator(batch, self.default_generator)
        u = rand((B, self.num_image_tokens, V), generator=g, device=ids.device).clamp_(1e-20, 1.0 - 1e-7)
        emb = self._inner.language_model.get_input_embeddings()(ids)
        tokens, _ = self._sample(emb, mask, mask.sum(1, keepdim=True), -torch.log(-torch.log(u)), B, False)
        return tokens

    def latents_for_critic(self, batch: Mapping[str, torch.Tensor]) -> GeneratedLatents:
        """The latent view (`UNOConfig(view="latent")`): steps 1-3 only, no VQ decode. Returns
        `GeneratedLatents(kind="tokens")` with the straight-through token distribution (B, N, V_img) (forward:
        one-hot of the sampled tokens; backward: the Gumbel-softmax gradient to the generation head and,
        through the teacher-forced pass, to the generation embeddings / aligner / LM per `train`) and a lazy
        `decode()` (step 4, with grad) for whoever asks for pixels."""
        logits, gumbel, tokens = self._train_logits(batch)
        y = self._straight_through(logits, gumbel, tokens)
        return GeneratedLatents(
            kind="tokens", grid=self.grid, token_probs=y, tokens=tokens, decode=lambda: self._decode_probs(y)
        )

    def _train_logits(self, batch: Mapping[str, torch.Tensor]):
        """Steps 1-2: -> (logits (B, N, V_img) fp32 with grad, gumbel (B, N, V_img), tokens (B, N))."""
        inner = self._inner
        ids, mask, B = self._prompts(batch)
        N = self.num_image_tokens
        V = inner.generation_head.vision_head.out_features
        device = ids.device
        g = draw_generator(batch, self.default_generator)
        u = rand((B, N, V), generator=g, device=device).clamp_(1e-20, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u))  # (B, N, V) fp32

        prompt_embeds = inner.language_model.get_input_embeddings()(ids)  # (B', S, H)
        prompt_pos = (mask.cumsum(1) - 1).clamp_(min=0)
        prompt_len = mask.sum(1, keepdim=True)  # (B', 1): position of the first image token

        tokens = batch.get("gen_tokens")
        hiddens = None
        if tokens is not None:  # pre-sampled tokens: skip step 1
            name = type(self).__name__
            check_shape(tokens, 'batch["gen_tokens"]', name, (B, N))
            if tokens.dtype not in (torch.int64, torch.int32):
                raise TypeError(
                    f'{name}: batch["gen_tokens"] must hold integer token ids, got {tokens.dtype}'
                )
            tokens = tokens.to(device=device, dtype=torch.long)
        else:
            tokens, hiddens = self._sample(
                prompt_embeds, mask, prompt_len, gumbel, B, keep_hidden=self.train_mode == "gen_head"
            )
        self.last_tokens = tokens

        # 2) logits with grad: the head on the sampled states (train="gen_head"), else a teacher-forced pass
        with torch.enable_grad():
            if hiddens is not None:
                logits = self._gen_logits(hiddens)
            else:
                tf_tokens = tokens[:, :-1]
                if self.cfg_scale > 1.0:
                    tf_tokens = torch.cat([tf_tokens, tf_tokens])
                S = ids.shape[1]
                pos = torch.cat([prompt_pos, prompt_len + torch.arange(N - 1, device=device)[None, :]], dim=1)
                full_mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, N - 1)], dim=1)
                # nothing upstream of the head trains with train="gen_head": run the LM without a graph
                with torch.set_grad_enabled(self.train_mode != "gen_head"):
                    # generation_embeddings + generation_aligner (their grads come through the LM)
                    img_embeds = self.model.prepare_embeddings_for_image_generation(tf_tokens)
                    full = torch.cat([prompt_embeds, img_embeds.to(prompt_embeds.dtype)], dim=1)
                    hidden, _ = self._lm(full, full_mask, pos, use_cache=False)
                logits = self._gen_logits(hidden[:, S - 1 :])  # (B, N, V): position p predicts token p+1
        return logits, gumbel, tokens

    def denoising_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Janus's own training loss on real pairs, 0-d fp32: the mean cross-entropy of the generation head's
        logits against the reference image's N VQ tokens, teacher-forced after the prompt (the conditional
        prompt only: no CFG). Tokens: batch["reference_image_tokens"] (B, N), or batch["reference_images"]
        (B, 3, H, W) in [-1, 1] VQ-encoded under no_grad. Grad reaches the modules `train` selects (with
        "gen_head" the LM pass runs without a graph)."""
        name = f"{type(self).__name__}.denoising_loss"
        inner = self._inner
        ids = require_key(batch, "gen_input_ids", name)
        B, S = ids.shape
        N = self.num_image_tokens
        tokens = batch.get("reference_image_tokens")
        if tokens is None and batch.get("reference_images") is not None:
            imgs = batch["reference_images"]
            check_shape(imgs, 'batch["reference_images"]', name, (B, 3, None, None))
            with torch.no_grad():
                vq = inner.vqmodel
                tokens = vq.encode(imgs.to(vq.quant_conv.weight.dtype)).image_tokens.reshape(B, -1)
        if tokens is None:
            raise KeyError(
                f'{name}: needs batch["reference_image_tokens"] (B, {N}) or batch["reference_images"] '
                f"(B, 3, H, W) in [-1, 1]; batch has keys {sorted(batch)}"
            )
        check_shape(tokens, 'batch["reference_image_tokens"]', name, (B, N))
        tokens = tokens.to(ids.device).long()
        mask = batch.get("gen_attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device).long()
        pos = torch.cat(
            [
                (mask.cumsum(1) - 1).clamp(min=0),
                mask.sum(1, keepdim=True) + torch.arange(N - 1, device=ids.device),
            ],
            dim=1,
        )
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, N - 1)], dim=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_mode != "gen_head"):
            prompt = inner.language_model.get_input_embeddings()(ids)
            img = self.model.prepare_embeddings_for_image_generation(tokens[:, :-1])
            hidden, _ = self._lm(torch.cat([prompt, img.to(prompt.dtype)], dim=1), full_mask, pos)
        logits = inner.generation_head(hidden[:, S - 1 :]).float()  # (B, N, V_img)
        return F.cross_entropy(logits.reshape(B * N, -1), tokens.reshape(-1))

    @torch.no_grad()
    def _sample(self, prompt_embeds, mask, prompt_len, gumbel, B: int, keep_hidden: bool):
        """Step 1: N tokens by Gumbel-max with the KV cache, no grad.
        Returns (tokens (B, N), hidden (B', N, H) or None)."""
        N = self.num_image_tokens
        tokens = torch.empty(B, N, dtype=torch.long, device=prompt_embeds.device)
        hiddens = []
        hidden, cache = self._lm(prompt_embeds, mask, (mask.cumsum(1) - 1).clamp_(min=0), use_cache=True)
        h = hidden[:, -1]
        step_mask = mask
        for i in range(N):
            if keep_hidden:
                hiddens.append(h)
            tok = torch.argmax(self._gen_logits(h) / self.temperature + gumbel[:, i], dim=-1)
            tokens[:, i] = tok
            if i == N - 1:
                break
            tok2 = torch.cat([tok, tok]) if self.cfg_scale > 1.0 else tok
            emb = self.model.prepare_embeddings_for_image_generation(tok2[:, None])
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            hidden, cache = self._lm(emb, step_mask, prompt_len + i, cache=cache, use_cache=True)
            h = hidden[:, -1]
        return tokens, (torch.stack(hiddens, dim=1) if keep_hidden else None)

    def _straight_through(self, logits, gumbel, tokens):
        """Step 3: straight-through Gumbel-softmax with the sampling noise -> y (B, N, V_img)."""
        with torch.enable_grad():
            V = logits.shape[-1]
            soft = torch.softmax((logits / self.temperature + gumbel) / self.tau, dim=-1)
            return F.one_hot(tokens, V).to(soft.dtype) + soft - soft.detach()  # forward: the sampled tokens

    def _decode_probs(self, y):
        """Step 4: token distribution y (B, N, V_img) -> codebook vectors -> VQ decoder -> (B, 3, H, W)."""
        B = y.shape[0]
        vq = self._inner.vqmodel
        with torch.enable_grad():
            codebook = F.normalize(vq.quantize.embedding.weight, p=2, dim=-1)  # (V, D), as get_codebook_entry
            z = (y.to(codebook.dtype) @ codebook).view(B, *self.grid, -1).permute(0, 3, 1, 2).contiguous()
            return vq.decoder(vq.post_quant_conv(z))

    def extra_repr(self) -> str:
        return (
            f"train={self.train_mode}, num_image_tokens={self.num_image_tokens}, tau={self.tau}, "
            f"temperature={self.temperature}, cfg_scale={self.cfg_scale}"
        )
