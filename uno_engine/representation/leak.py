"""How much of the caption the representation view could copy from the prompt (the guard against copying).

The generator's hidden states see the prompt, so the projected tokens can carry the caption without any image
content. `copy_leak` measures it at pure noise (noise level 1: the hidden states hold nothing of an image):
- ce_pure_noise: the caption CE with the prompt kept: what the head passes on from the prompt alone;
- ce_prompt_free: the same head and noise with the prompt masked (the negative conditioning): the best the
  critic can do knowing nothing of the scene through this head (the caption prior it has learned to emit);
- ce_blank: the critic reading its own tokens of a blank gray image (no head involved; off its training
  distribution, so usually far above both).
leak = ce_prompt_free - ce_pure_noise: > 0 means the caption is copied from the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uno_engine.representation.view import critic_image_tokens, read_tokens

__all__ = ["caption_ce", "copy_leak"]


def caption_ce(
    critic, tokens: torch.Tensor, captions: torch.Tensor, caption_mask=None, *, per_caption: bool = False
) -> torch.Tensor:
    """Caption CE of the critic's LM reading `tokens` (B, N, H) then captions (B, L): the mean per real token
    (0-d fp32), or with per_caption=True each caption's mean per real token (B,)."""
    device = critic.lm_head_weight.device
    captions = captions.to(device=device, dtype=torch.long)
    hidden, P = read_tokens(critic, tokens, captions, caption_mask)
    L = captions.shape[1]
    logits = hidden[:, P - 1 : P - 1 + L].float() @ critic.lm_head_weight.float().T
    if critic.lm_head_bias is not None:
        logits = logits + critic.lm_head_bias.float()
    labels = captions if caption_mask is None else captions.masked_fill(caption_mask.to(device) == 0, -100)
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, L)
    real = (labels != -100).float()
    if per_caption:
        return ce.sum(1) / real.sum(1).clamp_min(1.0)
    return ce.sum() / real.sum().clamp_min(1.0)


@torch.no_grad()
def copy_leak(critic, generator, batch: dict) -> dict[str, float]:
    """-> {"ce_pure_noise", "ce_prompt_free", "ce_blank", "leak", "leak_se", "n"} (module docstring) for the
    attached head: means over the batch's captions of each caption's CE per token (nats), the leak with the
    standard error of the paired per-caption difference. batch: the step's batch (prompt conditioning with its
    negative, captions, caption_mask)."""
    head = getattr(generator, "representation", None)
    if head is None:
        raise ValueError("copy_leak: `generator` has no attached RepresentationHead")
    caps, mask = batch["captions"], batch.get("caption_mask")
    rows = {}
    saved = head.prompt_dropout
    try:
        for name, p in (("ce_pure_noise", 0.0), ("ce_prompt_free", 1.0)):
            head.prompt_dropout = p
            rep = generator({**batch, "representation_noise_level": 1.0}, view="representation")
            rows[name] = caption_ce(critic, rep.tokens, caps, mask, per_caption=True)
    finally:
        head.prompt_dropout = saved
    diff = rows["ce_prompt_free"] - rows["ce_pure_noise"]  # paired: the same captions, noise and seed
    n = diff.numel()
    ce = {k: float(v.mean()) for k, v in rows.items()}
    _, image_hw = generator.representation_probe(batch, head.block, head.output_index)
    gray = torch.zeros(caps.shape[0], 3, *image_hw, device=critic.lm_head_weight.device)
    blank, _ = critic_image_tokens(critic, gray)
    ce["ce_blank"] = float(caption_ce(critic, blank, caps, mask, per_caption=True).mean())
    ce["leak"] = float(diff.mean())
    ce["leak_se"] = float(diff.std() / n**0.5) if n > 1 else float("nan")
    ce["n"] = n
    return ce
