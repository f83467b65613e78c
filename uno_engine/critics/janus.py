"""Janus critic: the understanding path of `JanusForConditionalGeneration` (SigLIP vision model + aligner +
LM).

Only the understanding modules (vision_model, aligner, language_model, lm_head) are registered in the critic
and frozen; the generation modules (vqmodel, generation_embeddings, generation_aligner, generation_head) are
never touched, so the same model can be the generator. The language model is shared by both paths: the
critic's layer checkpointing acts only inside the critic's forward.

Latent view (`UNOConfig(view="latent")`, run by `uno_engine.latent.LatentCritic`): the LM reads the generated
image tokens the way it read them while generating, through the GENERATION embedding, and neither the VQ
decoder nor the SigLIP tower runs. The sequence the LM sees is

    [BOS] [<begin_of_image>] g(y_1) ... g(y_N) [<end_of_image>] c_1 ... c_L

with g(y) = generation_aligner(y @ generation_embeddings.weight) and y the straight-through token
distribution (forward: exactly `prepare_embeddings_for_image_generation(tokens)`; backward: the
Gumbel-softmax gradient into the generation head, and into generation_embeddings / generation_aligner when
they train). No text prompt: the prompt is masked (UNO's prompt masking), otherwise the LM could copy the
generation condition into the caption instead of reading the image. The caption starts right after the
image block: the last prefix position (`<end_of_image>`, or the last image token without one) predicts c_1.
Why it matches training: in Janus's text-to-image data the image tokens follow `<begin_of_image>` and are
embedded by the generation embedding (exactly the states above), and in its understanding data an image
block closed by `<end_of_image>` is followed by text. The markers are `latent_markers` = (bos, boi, eoi),
read from `text_config.bos_token_id` and the generation config's `generation_kwargs` ("boi_token_id",
"eoi_token_id"; Janus-Pro ships only boi); set the attribute to override, None drops a marker.
"""

from __future__ import annotations

import torch

from uno_engine.critics.base import Critic, CriticInputs
from uno_engine.critics.common import find_layers
from uno_engine.critics.registry import register_critic


@register_critic
class JanusCritic(Critic):
    hf_class_names = ("JanusForConditionalGeneration",)
    family = "Janus"

    def _build(self):
        m = self.hf_model
        self.vision_model = m.model.vision_model
        self.aligner = m.model.aligner
        self.language_model = m.model.language_model
        self.lm_head = m.lm_head
        vcfg = m.config.vision_config
        self.patch_size, self.image_size = vcfg.patch_size, vcfg.image_size
        self._vision_dim = vcfg.hidden_size
        gk = getattr(getattr(m, "generation_config", None), "generation_kwargs", None) or {}
        self.latent_markers = (
            m.config.text_config.bos_token_id,
            gk.get("boi_token_id"),
            gk.get("eoi_token_id"),
        )

    @property
    def vision_dim(self) -> int:
        return self._vision_dim

    def _attention_modules(self):
        return {"vision_model": self.vision_model, "language_model": self.language_model}

    def _checkpoint_layers(self):
        return list(find_layers(self.vision_model)) + list(find_layers(self.language_model))

    def _vision_tower(self):
        return self.vision_model

    def _encode(self, inputs: CriticInputs):
        dtype = self.aligner.fc1.weight.dtype
        with self._vision_pixels(inputs, dtype) as (pv, (gh, gw)):  # pixel_values, or the fused patch tokens
            feats = self.vision_model(pv, return_dict=True).last_hidden_state  # (B, N, Dv), no CLS
        image_embeds = self.aligner(feats)
        return image_embeds, feats, (gh, gw)

    # ---------------------------------------------------------------- latent view (module docstring)
    def default_prefix(self, n_image_tokens: int, *, latent: bool = False) -> list[int | None]:
        """Pixel view: the N image slots. Latent view: [bos, boi] + N image slots (None) + [eoi], markers that
        are None left out."""
        if not latent:
            return [None] * n_image_tokens
        bos, boi, eoi = self.latent_markers
        head = [t for t in (bos, boi) if t is not None]
        return head + [None] * n_image_tokens + ([eoi] if eoi is not None else [])

    def image_markers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """JanusProcessor writes <begin_of_image> N x <image_placeholder> <end_of_image> for one image."""
        p = self.processor
        if p is None:
            return (), ()
        ids = p.tokenizer.convert_tokens_to_ids([p.image_start_token, p.image_end_token])
        return (ids[0],), (ids[1],)

    @property
    def generation_vocab_size(self) -> int:
        """Size of the generation codebook (the latent view's token distributions are over it)."""
        return self.hf_model.model.generation_embeddings.num_embeddings

    def embed_token_probs(self, token_probs: torch.Tensor) -> torch.Tensor:
        """(B, N, V_img) token distribution -> (B, N, H) LM inputs through the generation embedding:
        generation_aligner(token_probs @ generation_embeddings.weight). For one-hot rows this is exactly
        `prepare_embeddings_for_image_generation(tokens)`."""
        inner = self.hf_model.model
        table = inner.generation_embeddings.weight  # (V_img, D)
        if token_probs.dim() != 3 or token_probs.shape[-1] != table.shape[0]:
            raise ValueError(
                f"token_probs must be (B, N, {table.shape[0]}) (the generation codebook size), "
                f"got {tuple(token_probs.shape)}"
            )
        return inner.generation_aligner(token_probs.to(table.dtype) @ table)

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """VQ token ids (B, N) of images (B, 3, S, S) in [-1, 1] at the VQ model's resolution (encoder and
        quantizer only, no grad): the latent view's reference images."""
        vq = self.hf_model.model.vqmodel
        gh, gw = vq.quantize.quant_state_dims
        x = vq.quant_conv(vq.encoder(images.to(vq.quant_conv.weight.dtype)))
        if tuple(x.shape[-2:]) != (gh, gw):
            raise ValueError(
                f"images must be at the VQ model's resolution (a {gh}x{gw} token grid), got {tuple(images.shape)} "
                f"-> a {tuple(x.shape[-2:])} grid"
            )
        _, _, idx = vq.quantize(x)
        return idx.view(images.shape[0], gh * gw)
