"""The one reader: how every view of a generation becomes the critic's language-model sequence.

A critic reads a generation as one sequence per image:

    without a chat template (today's default):   [image block] caption
    with a chat template and an instruction:     [prompt head] [image block] [prompt tail] completion

The image block is the family's image tokens (LLaVA: N slots; Qwen2-VL: <|vision_start|> N slots
<|vision_end|>; Janus: N slots, or in the latent view [BOS] <begin_of_image> N slots <end_of_image>), and its
slots take whatever the view produced: the vision tower's projected tokens (the pixel view), a latent adapter's
tokens or Janus's generation embeddings (the latent view), a projector's tokens (other views). Everything else
is the same for every view, and lives here, once:

- `ChatPrompt`: the chat template, tokenized once per instruction: `processor.apply_chat_template([user: image
  + instruction], add_generation_prompt=True)` split at its image placeholder, which expands to the family's
  image block exactly as `processor(text=..., images=...)` expands it. A caption is the template's
  **completion**: the tokens of `apply_chat_template([user, assistant: caption])` after the generation prompt
  (TRL's prompt-completion convention), so the end-of-turn token is read and scored too.
- `SequenceReader.read`: assembles [prefix, caption] (or [prefix, caption, negative 1 .. K] packed under a block
  mask, each caption block at the one-caption positions), builds the position ids (the family's, M-RoPE
  included), runs the language model inside the critic's pass context (checkpointing, offloading) and returns
  the `CriticOutput` the losses read. The template is tokenized once (`ChatPrompt`), and the prefix's
  token-id tensors are cached per (prefix, device): nothing is tokenized or copied to the device per step.

`CaptionReader` is what `UNOStep` needs from whatever reads the generation (a `Critic`, a `LatentCritic`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from uno_engine.critics.trim import reading_rows
from uno_engine.critics.types import CriticOutput

__all__ = [
    "CaptionReader",
    "ChatPrompt",
    "SequenceReader",
    "check_negatives",
    "pack_negatives",
    "packed_caption_mask",
    "packed_output",
]


@runtime_checkable
class CaptionReader(Protocol):
    """What `UNOStep` and `UNOLoss` read a generation with (a `Critic`, or `uno_engine.latent.LatentCritic`).

    prepare(x, **bridge_options) -> inputs: the generation (images, or GeneratedLatents) or reference images.
    __call__(inputs, captions (B, L), caption_mask (B, L) | None) -> CriticOutput.
    forward_with_negatives(inputs, captions, caption_mask, negatives (B, K, L), negative_mask) -> CriticOutput.
    encode_patches(inputs) -> (patch_features (B, N, vision_dim), grid (gh, gw)): reference features.
    vision_dim: the width of patch_features (the heads are sized to it).
    """

    vision_dim: int

    def prepare(self, x, **bridge_options): ...

    def __call__(
        self, inputs, captions: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> CriticOutput: ...

    def forward_with_negatives(
        self, inputs, captions, caption_mask, negative_captions, negative_mask=None
    ) -> CriticOutput: ...

    def encode_patches(self, inputs) -> tuple[torch.Tensor, tuple[int, int]]: ...


# ------------------------------------------------------------------------------------------- the template
def _image_token_id(processor) -> int:
    tid = getattr(processor, "image_token_id", None)
    if isinstance(tid, int):
        return tid
    token = getattr(processor, "image_token", None)
    if token is None:
        raise ValueError(
            f"instruction=: the processor ({type(processor).__name__}) names no image token (`image_token`), so "
            "the image slot of its chat template cannot be found"
        )
    return processor.tokenizer.convert_tokens_to_ids(token)


class ChatPrompt:
    """The critic's chat template around one image and one instruction, tokenized once.

    Args:
        processor: the model's full HF processor (tokenizer + image processor + chat_template).
        instruction: the user turn's text after the image ("Describe this image.").
        image_markers: (head ids, tail ids) the processor writes around the image tokens when it expands the
            image placeholder (Janus: <begin_of_image> / <end_of_image>; others: none).

    prefix(n): the prompt's token ids with the image block expanded to n slots (None marks a slot).
    completion(caption): the caption's completion token ids (see the module docstring).
    Raises ValueError naming `instruction` for a processor without a chat template or tokenizer, a template
    without exactly one image slot, and a template whose assistant turn does not extend its generation prompt.
    """

    def __init__(self, processor, instruction: str, image_markers=((), ())):
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        tok = getattr(processor, "tokenizer", None)
        if tok is None or not callable(getattr(processor, "apply_chat_template", None)):
            raise ValueError(
                f"instruction={instruction!r} needs the model's full processor (tokenizer + chat template); got "
                f"{type(processor).__name__}, which has no tokenizer: pass AutoProcessor.from_pretrained(...)"
            )
        if not (getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)):
            raise ValueError(
                f"instruction={instruction!r}: the processor ({type(processor).__name__}) has no chat template; "
                "set processor.chat_template, or build the critic without an instruction"
            )
        self.processor, self.instruction = processor, instruction
        self.messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
        ]
        self.prompt_text = processor.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=False
        )
        self.prompt_ids = self._tokenize(self.prompt_text)
        image_id = _image_token_id(processor)
        slots = [i for i, t in enumerate(self.prompt_ids) if t == image_id]
        if len(slots) != 1:
            raise ValueError(
                f"instruction={instruction!r}: the chat template writes {len(slots)} image placeholders (token id "
                f"{image_id}) for one image; the critic needs a template with exactly one image slot "
                f"(prompt: {self.prompt_text!r})"
            )
        s = slots[0]
        self.head, self.tail = tuple(self.prompt_ids[:s]), tuple(self.prompt_ids[s + 1 :])
        self.image_head, self.image_tail = (tuple(int(t) for t in m) for m in image_markers)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.processor.tokenizer(text)["input_ids"])

    def prefix(self, n_image_tokens: int) -> list[int | None]:
        """[head, image markers, n slots (None), image markers, tail]: what processor(text=prompt) gives."""
        block = [*self.image_head, *([None] * n_image_tokens), *self.image_tail]
        return [*self.head, *block, *self.tail]

    def completion(self, caption: str) -> list[int]:
        """The caption's completion ids: the full conversation's tokens after the generation prompt's."""
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")
        answer = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
        full = self.processor.apply_chat_template([*self.messages, answer], tokenize=False)
        ids = self._tokenize(full)
        n = len(self.prompt_ids)
        if not full.startswith(self.prompt_text) or ids[:n] != self.prompt_ids:
            raise ValueError(
                f"instruction={self.instruction!r}: the chat template's text for a caption does not start with "
                f"its generation prompt, so the caption is not a completion of the prompt (prompt "
                f"{self.prompt_text!r}, conversation {full!r})"
            )
        return ids[n:]


# ----------------------------------------------------------------------------------------- the sequence
def check_captions(captions, caption_mask) -> None:
    """ValueError naming the argument unless captions is (B, L) integer and caption_mask None or (B, L)."""
    if not isinstance(captions, torch.Tensor) or captions.dim() != 2:
        raise ValueError(f"captions must be a (B, L) int64 tensor, got {_describe(captions)}")
    if captions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"captions must hold integer token ids, got dtype {captions.dtype}")
    if caption_mask is not None and tuple(caption_mask.shape) != tuple(captions.shape):
        raise ValueError(
            f"caption_mask must have the shape of captions {tuple(captions.shape)}, got {_describe(caption_mask)}"
        )


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


def packed_caption_mask(P: int, blocks: int, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (B, 1, T, T) of [prefix (P), caption 1 (L), ..., caption `blocks` (L)],
    T = P + blocks L: the layout of hard-negative captions packed after one image prefix. keys (B, blocks L):
    1 real token / 0 padding. 0 where allowed, finfo(dtype).min where masked: prefix rows are causal; caption
    j's rows see the whole prefix and, causally, caption j's real tokens only. (B, T, T) memory: this is
    for short captions (T of a few hundred)."""
    B, device = keys.shape[0], keys.device
    T = P + keys.shape[1]
    L = keys.shape[1] // blocks
    block = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(1, blocks + 1).repeat_interleave(L)])
    block, idx = block.to(device), torch.arange(T, device=device)
    allowed = (idx[None, :] <= idx[:, None]) & ((block[None, :] == 0) | (block[None, :] == block[:, None]))
    real = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), keys > 0], dim=1)
    allowed = allowed[None] & real[:, None, :]  # (B, T, T): query row x key column
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


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


@contextlib.contextmanager
def _capture(layer: nn.Module | None):
    """Keeps the output of `layer` (a forward hook, removed on exit); nothing when layer is None."""
    box: dict = {}
    if layer is None:
        yield box
        return

    def hook(_mod, _args, output):
        box["h"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layer.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


Encoded = tuple[torch.Tensor, "torch.Tensor | None", "tuple[int, int] | None"]


class SequenceReader:
    """Runs a critic's language model over [prefix, captions] for every view (module docstring).

    Args:
        critic: the `Critic` whose LM, embeddings and pass context (`critic.running()`) are used; its family
            hook `default_prefix(n, latent=)` gives the sequence without a template, and `image_markers()` the
            tokens its processor writes around the image tokens.
        prompt: a `ChatPrompt`, or None (no template: `critic.default_prefix`).
    """

    def __init__(self, critic, prompt: ChatPrompt | None = None):
        self.critic, self.prompt = critic, prompt
        self._segments: dict[tuple, list[torch.Tensor | None]] = {}

    def prefix(self, n_image_tokens: int, *, latent: bool = False) -> list[int | None]:
        """The token ids before the caption, None marking the n image slots."""
        if self.prompt is not None:
            return self.prompt.prefix(n_image_tokens)
        return self.critic.default_prefix(n_image_tokens, latent=latent)

    def image_start(self, n_image_tokens: int, *, latent: bool = False) -> int:
        """Position of the first image slot in the sequence."""
        return self.prefix(n_image_tokens, latent=latent).index(None)

    def assemble(
        self, image_embeds: torch.Tensor, prefix: list[int | None], captions: torch.Tensor
    ) -> torch.Tensor:
        """inputs_embeds (B, P + T, H): `prefix` (image_embeds (B, N, H) in its slots) then captions (B, T)."""
        B = image_embeds.shape[0]
        emb = self.critic.embed_tokens
        text = emb(captions)
        image_embeds = image_embeds.to(text.dtype)
        parts = [
            image_embeds if ids is None else emb(ids).unsqueeze(0).expand(B, -1, -1)
            for ids in self._prefix_segments(prefix, image_embeds.shape[1], captions.device)
        ]
        return torch.cat(parts + [text], dim=1)

    def _prefix_segments(self, prefix: list[int | None], n: int, device) -> list[torch.Tensor | None]:
        """The prefix as runs: a LongTensor of token ids on `device` per text run, None for the image block;
        cached per (prefix, device), so no token ids are copied to the device per step."""
        key = (tuple(prefix), str(device))
        segs = self._segments.get(key)
        if segs is None:
            segs, i = [], 0
            while i < len(prefix):
                j = i
                if prefix[i] is None:
                    while j < len(prefix) and prefix[j] is None:
                        j += 1
                    if j - i != n:
                        raise ValueError(f"the prefix's image block has {j - i} slots, not {n}")
                    segs.append(None)
                else:
                    while j < len(prefix) and prefix[j] is not None:
                        j += 1
                    segs.append(torch.tensor(prefix[i:j], dtype=torch.long, device=device))
                i = j
            self._segments[key] = segs
        return segs

    def check_context(self, prefix_len: int, caption_len: int) -> None:
        """ValueError naming `captions` when prefix + caption exceed the LM's position range."""
        limit = getattr(self.critic.text_config, "max_position_embeddings", None)
        if limit is not None and prefix_len + caption_len > limit:
            raise ValueError(
                f"captions: {caption_len} caption tokens after a {prefix_len}-token prefix exceed the critic's "
                f"context of {limit} positions (max_position_embeddings); shorten the captions"
            )

    def read(
        self,
        encode: Callable[[], Encoded],
        captions: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        negative_captions: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        *,
        positions: Callable[[Sequence, int], torch.Tensor | None] | None = None,
        latent: bool = False,
        capture: nn.Module | None = None,
    ) -> CriticOutput:
        """One critic pass: encode the view, assemble, run the LM, return what the losses read.

        Args:
            encode: () -> (image_embeds (B, N, H) LM-space tokens, patch_features (B, N', Dv) or None, grid),
                called inside the critic's pass context (the vision tower's checkpointing applies).
            captions: (B, L) int token ids (completions, with a template), right padded; caption_mask (B, L) 1
                real / 0 pad, or None (all real).
            negative_captions: (B, K, L) or None; negative_mask (B, K, L) or None. With K > 0 the LM runs ONE
                packed sequence [prefix (P), caption (L), negative 1 (L), ..., negative K (L)] per image under the
                block mask of `packed_caption_mask`, every caption block at the one-caption positions P..P+L-1,
                so each caption's states equal a separate pass's up to float rounding.
            positions: (prefix, length) -> position ids of one [prefix, caption] sequence of `length` ((B, T)
                or (3, B, T) for M-RoPE), or None for 0..T-1.
            latent: the latent view's prefix (`default_prefix(n, latent=True)` without a template).
            capture: a decoder layer whose output at the image slots becomes patch_features (the latent view).
        Returns: CriticOutput (negative_hidden / negative_labels with K > 0).
        """
        check_captions(captions, caption_mask)
        K = 0 if negative_captions is None else check_negatives(captions, negative_captions, negative_mask)
        critic = self.critic
        device = critic.lm_head_weight.device
        B, L = captions.shape
        captions = captions.to(device=device, dtype=torch.long)
        if K:
            caps, masks = pack_negatives(
                critic, captions, caption_mask, negative_captions, negative_mask, device
            )
            flat = caps.reshape(B, (K + 1) * L)
        else:
            flat = captions
        with critic.running(), _capture(capture) as box:
            image_embeds, patch_features, grid = encode()
            if image_embeds.shape[0] != B:
                raise ValueError(f"captions has batch size {B} but the images have {image_embeds.shape[0]}")
            N = image_embeds.shape[1]
            prefix = self.prefix(N, latent=latent)
            P = len(prefix)
            self.check_context(P, L)
            embeds = self.assemble(image_embeds, prefix, flat)
            pos = positions(prefix, P + L) if positions is not None else None
            if K:
                if pos is None:
                    pos = torch.arange(P + L, device=device).expand(B, -1)
                pos = torch.cat([pos[..., :P], pos[..., P:].repeat(*([1] * (pos.dim() - 1)), K + 1)], dim=-1)
                attention_mask = packed_caption_mask(P, K + 1, masks.reshape(B, -1), embeds.dtype)
            elif caption_mask is not None:
                ones = torch.ones(B, P, dtype=torch.long, device=device)
                attention_mask = torch.cat([ones, caption_mask.to(device).long()], dim=1)
            else:
                attention_mask = None
            # the losses read rows P - 1.. (critic.trim: the last layer's row-wise work runs on those only)
            last = critic.trimmed_layer
            first = P - 1 if last is not None and capture is not last else None
            with reading_rows(first):
                hidden = critic.language_model(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=pos,
                    use_cache=False,
                    return_dict=True,
                ).last_hidden_state
        if capture is not None:
            i0 = prefix.index(None)
            patch_features = box["h"][:, i0 : i0 + N]
        if K:
            return packed_output(critic, hidden, P, caps, masks, patch_features, grid)
        labels = (
            captions if caption_mask is None else captions.masked_fill(caption_mask.to(device) == 0, -100)
        )
        return CriticOutput(
            caption_hidden=hidden[:, P - 1 : P - 1 + L],
            caption_labels=labels,
            lm_head_weight=critic.lm_head_weight,
            lm_head_bias=critic.lm_head_bias,
            logit_softcap=critic.logit_softcap,
            patch_features=patch_features,
            grid=grid,
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"
