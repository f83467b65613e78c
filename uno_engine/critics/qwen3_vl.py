"""Qwen3-VL critic: `Qwen3VLForConditionalGeneration` (in transformers 5.17 and 5.24 alike).

Qwen3-VL keeps Qwen2-VL's input side, so this adapter extends `Qwen2VLCritic`:

- pixel_values pre-patchified (B*gh*gw, 3*T*p*p) with image_grid_thw (B, 3), made by the same
  `Qwen2VLImageProcessor` (Qwen3-VL checkpoints: patch 16, merge 2, temporal patch 2, mean = std = 0.5), so
  the bridge's "qwen2_vl" layout and `smart` resize reproduce it;
- the sequence <|vision_start|> image tokens <|vision_end|> caption, and 3-row M-RoPE position ids from the
  model's own `get_rope_index` with `mm_token_type_ids` (1 on image tokens, 0 elsewhere). The rotary
  embedding of the LM interleaves the t / h / w frequencies (`mrope_interleaved`: frequency j takes its
  position from row j mod 3 within the h / w sections); that happens inside the HF LM from these ids.

What is new is DeepStack: the vision tower also returns, for each layer in
`vision_config.deepstack_visual_indexes`, that layer's hidden states through its own patch merger,
`deepstack_features[k]: (B*Ni, H)` in LM space, and the LM adds feature k to the hidden states of the image
tokens after decoder layer k (k = 0 .. K-1):

    h_k[:, image slots] <- h_k[:, image slots] + deepstack_k

HF does this with a boolean `visual_pos_masks` (`hidden[mask] += f`: a nonzero, so a device-to-host sync per
DeepStack layer on CUDA). Here the image slots are a fixed slice of the sequence (after <|vision_start|>), so
the same sum is a slice add, done by a forward hook on decoder layer k (installed once per layer, outside the
layer's checkpoint region and outside `torch.compile` of the layer, which wraps `layer.forward`). The hook
acts only inside this critic's pass (`running()`): the model's own forward is untouched.

Patch features are the last vision block's output before the merger, in raster order (as Qwen2-VL).
Memory: the K DeepStack features add K x (B, Ni, H) to what the vision pass keeps (Ni = image tokens).
"""

from __future__ import annotations

import torch

from uno_engine.critics.base import CriticInputs
from uno_engine.critics.qwen2_vl import Qwen2VLCritic
from uno_engine.critics.registry import register_critic

__all__ = ["Qwen3VLCritic"]

# the Qwen3-VL critic whose pass is running now (innermost last); its `_deepstack` is what the hooks add
_ACTIVE: list[Qwen3VLCritic] = []


@register_critic
class Qwen3VLCritic(Qwen2VLCritic):
    hf_class_names = ("Qwen3VLForConditionalGeneration",)
    family = "Qwen3-VL"

    def _build(self):
        super()._build()
        self.window_size = None  # no window attention in the Qwen3-VL vision tower
        self.deepstack_layers = tuple(self.hf_model.config.vision_config.deepstack_visual_indexes)
        self._deepstack: tuple[int, list[torch.Tensor]] | None = None  # (first image slot, features)
        n = len(self.deepstack_layers)
        if n > len(self.language_model.layers):
            raise ValueError(
                f"Qwen3-VL: {n} DeepStack features (vision_config.deepstack_visual_indexes="
                f"{list(self.deepstack_layers)}) but the LM has {len(self.language_model.layers)} layers"
            )
        for k, layer in enumerate(self.language_model.layers[:n]):
            if "_uno_deepstack" not in layer.__dict__:  # one hook per layer, whichever critic installs it
                layer._uno_deepstack = k
                layer.register_forward_hook(_add_deepstack)

    def fused_patch_embed_reasons(self) -> list[str]:
        return [
            "Qwen3-VL's patch embedding is a Conv3d over the processor's flattened patch rows "
            "(B*gh*gw, 3*T*p*p), and ops.bridge(patch_embed=) takes layout 'nchw' only"
        ]

    def _encode(self, inputs: CriticInputs):
        out, grid_thw, (B, t, gh, gw) = self._run_vision(inputs)
        image_embeds = out.pooler_output.reshape(B, -1, out.pooler_output.shape[-1])
        start = self.reader.image_start(image_embeds.shape[1])  # the image slots of the sequence
        self._deepstack = (start, [f.reshape(B, -1, f.shape[-1]) for f in out.deepstack_features])
        patch = self._raster_patches(out.last_hidden_state, grid_thw, B, t, gh, gw)
        return image_embeds, patch, (gh, gw)

    def running(self):
        stack = super().running()
        _ACTIVE.append(self)
        stack.callback(self._end_pass)
        return stack

    def _end_pass(self):
        _ACTIVE.remove(self)
        self._deepstack = None  # the features belong to one pass (they hold its autograd graph)


def _add_deepstack(layer, args, output):
    """Forward hook of LM decoder layer k: add DeepStack feature k to the image slots of its output."""
    critic = _ACTIVE[-1] if _ACTIVE else None
    if critic is None or critic._deepstack is None:
        return None  # not a critic pass (the model's own forward, or the LM used alone)
    start, feats = critic._deepstack
    k = layer.__dict__["_uno_deepstack"]
    if k >= len(feats):
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    f = feats[k].to(hidden.dtype)
    end = start + f.shape[1]
    hidden = torch.cat([hidden[:, :start], hidden[:, start:end] + f, hidden[:, end:]], dim=1)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
