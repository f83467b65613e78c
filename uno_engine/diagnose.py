"""`uno_engine.diagnose(step, batch)`: what the critic reads in a generated image, token by token, and whose
fault each misread is.

For every image of the batch, without grad:

- `greedy_ids` (B, G): the critic's greedy caption of the generated image (G = the batch's caption length, or
  `max_new_tokens`), stopped at the tokenizer's EOS when a tokenizer is given; `greedy_text` with a tokenizer;
- `token_ce` (B, L): the per-token caption cross-entropy -log p(c_l | generated image, c_<l) of the batch's
  caption (the fused linear CE with reduction="none"; 0 at padding);
- `reference_token_ce` (B, L): the same on `batch["reference_images"]` when the batch has them;
- `verdict` (B lists of L strings). A token is *read right* on an image when it is the critic's top-1
  prediction there OR its CE is below `threshold` (default ln 2: the token has probability > 1/2):
    "generation error"    the critic reads the token right on the reference but not on the generated image:
                          the generator failed to show it;
    "understanding error" the critic misreads the token on the reference too: the critic (or the caption)
                          is at fault, and training the generator on it teaches noise;
    "fine"                read right on the generated image and on the reference (if any);
    "misread"             without a reference: read wrong on the generated image, cause unknown;
    "pad"                 padding.
  Precisely: pad if mask 0; else with a reference: understanding error if the reference is misread,
  generation error if only the generated image is, fine otherwise; without one: misread or fine.

`Diagnosis.save(out_dir)` writes diagnosis.json and diagnosis.png (per image: the generated image, the critic's
greedy caption, per-token CE bars colored by verdict with the reference's CE as black ticks). The diagnosis
materializes the (B, L, V) caption logits for the top-1 test and runs the critic G times for the greedy
caption: a debugging tool, not a training-step cost.

On a preset with random weights (a test-support command, in uno_engine.testing):

    python -m uno_engine.testing.diagnose_preset --preset tiny --out DIR
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

VERDICTS = ("fine", "generation error", "understanding error", "misread", "pad")
COLORS = {
    "fine": "#4c9f50",
    "generation error": "#d64541",
    "understanding error": "#f0a030",
    "misread": "#8c8c8c",
    "pad": "#dddddd",
}


@dataclass
class Diagnosis:
    """Per image (index b): see the module docstring. Tensors are on the CPU."""

    captions: torch.Tensor  # (B, L) the batch's caption ids
    caption_mask: torch.Tensor  # (B, L)
    greedy_ids: torch.Tensor  # (B, G)
    token_ce: torch.Tensor  # (B, L) fp32
    top1: torch.Tensor  # (B, L) bool: the caption token is the critic's argmax on the generated image
    verdict: list[list[str]]
    threshold: float
    images: torch.Tensor = field(repr=False)  # (B, 3, H, W) generated, in [-1, 1]
    reference_token_ce: torch.Tensor | None = None
    reference_top1: torch.Tensor | None = None
    greedy_text: list[str] | None = None
    caption_tokens: list[list[str]] | None = None  # token strings, with a tokenizer

    def counts(self) -> dict[str, int]:
        """Number of caption tokens per verdict over the batch."""
        flat = [v for row in self.verdict for v in row]
        return {k: flat.count(k) for k in VERDICTS}

    def to_json(self) -> dict:
        rows = []
        for b in range(self.captions.shape[0]):
            row = {
                "caption_ids": self.captions[b].tolist(),
                "caption_mask": self.caption_mask[b].tolist(),
                "greedy_ids": self.greedy_ids[b].tolist(),
                "token_ce": [round(float(x), 6) for x in self.token_ce[b]],
                "top1": self.top1[b].tolist(),
                "verdict": self.verdict[b],
            }
            if self.reference_token_ce is not None:
                row["reference_token_ce"] = [round(float(x), 6) for x in self.reference_token_ce[b]]
                row["reference_top1"] = self.reference_top1[b].tolist()
            if self.greedy_text is not None:
                row["greedy_text"] = self.greedy_text[b]
            if self.caption_tokens is not None:
                row["caption_tokens"] = self.caption_tokens[b]
            rows.append(row)
        return {
            "threshold": self.threshold,
            "rule": "read right = top-1 or CE < threshold; understanding error = reference misread; "
            "generation error = reference read right, generated image misread",
            "counts": self.counts(),
            "images": rows,
        }

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write diagnosis.json and diagnosis.png into out_dir -> (json path, png path)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        jpath, ppath = out / "diagnosis.json", out / "diagnosis.png"
        jpath.write_text(json.dumps(self.to_json(), indent=1))
        self.plot(ppath)
        return jpath, ppath

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        B, L = self.captions.shape
        fig, axes = plt.subplots(B, 2, figsize=(4 + 0.42 * L, 2.8 * B), squeeze=False, width_ratios=[1, 3])
        for b in range(B):
            ax_img, ax = axes[b]
            img = ((self.images[b].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax_img.imshow(img)
            ax_img.set_axis_off()
            ax_img.set_title(f"image {b}", fontsize=9)
            ce = self.token_ce[b].tolist()
            colors = [COLORS[v] for v in self.verdict[b]]
            ax.bar(range(L), ce, color=colors, edgecolor="black", linewidth=0.3)
            if self.reference_token_ce is not None:
                ax.scatter(
                    range(L), self.reference_token_ce[b].tolist(), marker="_", s=160, c="black", zorder=3
                )
            ax.axhline(self.threshold, color="black", linestyle=":", linewidth=0.8)
            labels = (
                self.caption_tokens[b]
                if self.caption_tokens is not None
                else [str(t) for t in self.captions[b].tolist()]
            )
            ax.set_xticks(range(L))
            ax.set_xticklabels(labels, rotation=60, fontsize=7, ha="right")
            ax.set_ylabel("caption CE (nats)", fontsize=8)
            greedy = (
                self.greedy_text[b]
                if self.greedy_text is not None
                else " ".join(str(t) for t in self.greedy_ids[b].tolist())
            )
            n = {k: self.verdict[b].count(k) for k in VERDICTS if k != "pad"}
            summary = ", ".join(f"{v} {k}" for k, v in n.items() if v)
            ax.set_title(f"critic reads: {_short(greedy)}\n{summary}", fontsize=8, loc="left")
        handles = [Patch(color=COLORS[k], label=k) for k in VERDICTS if k != "pad"]
        if self.reference_token_ce is not None:
            handles.append(
                plt.Line2D([], [], color="black", marker="_", linestyle="", label="CE on reference")
            )
        handles.append(
            plt.Line2D([], [], color="black", linestyle=":", label=f"threshold {self.threshold:.2f}")
        )
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _read(critic, inputs, captions, mask):
    """-> (token_ce (B, L) fp32, top1 (B, L) bool) of the captions on prepared images."""
    from uno_engine import ops

    out = critic(inputs, captions, mask)
    ce = ops.linear_cross_entropy(
        out.caption_hidden.float(),
        out.lm_head_weight.float(),
        out.caption_labels,
        bias=None if out.lm_head_bias is None else out.lm_head_bias.float(),
        softcap=out.logit_softcap,
        reduction="none",
        backend="torch",
    )
    top1 = out.logits().argmax(-1) == out.caption_labels
    return ce.float(), top1


def greedy_caption(critic, inputs, length: int, eos: int | None, start: torch.Tensor) -> torch.Tensor:
    """Greedy caption (B, length) token ids: token i is the argmax of the critic's prediction after tokens < i.

    critic: a `Critic`; inputs: its `CriticInputs` of B images (`critic.prepare`); length: tokens to generate
    (stops early once every row has produced `eos`, when eos is not None); start: (B, >= 1) token ids whose
    first column fills the slot being predicted (any valid id: position i's prediction does not read it)."""
    B = start.shape[0]
    ids = torch.zeros(B, 0, dtype=torch.long, device=start.device)
    for i in range(length):
        caps = torch.cat([ids, start[:, :1]], dim=1)  # a placeholder in slot i: position i predicts it
        nxt = critic(inputs, caps).logits()[:, i].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos is not None and bool((ids == eos).any(dim=1).all()):
            break
    return ids


@torch.no_grad()
def diagnose(
    step,
    batch: dict,
    *,
    tokenizer=None,
    threshold: float = math.log(2.0),
    max_new_tokens: int | None = None,
    out_dir: str | Path | None = None,
) -> Diagnosis:
    """Diagnose one batch with a `UNOStep` (module docstring). `tokenizer` (a HF tokenizer) adds text;
    `out_dir` also saves diagnosis.json / diagnosis.png there."""
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"diagnose: `threshold` must be a number > 0, got {threshold!r}")
    captions = batch.get("captions")
    if not isinstance(captions, torch.Tensor) or captions.dim() != 2 or captions.shape[1] == 0:
        raise ValueError("diagnose: batch['captions'] must be a non-empty (B, L) tensor of token ids")
    cfg, critic = step.config, step.critic
    bridge = dict(input_range=cfg.input_range, backend=cfg.backend, fuse_patch_embed=False)
    mask = batch.get("caption_mask")
    mask = torch.ones_like(captions) if mask is None else mask
    images = step.generator(batch)
    lo, hi = cfg.input_range
    inputs = critic.prepare(images, clamp=cfg.clamp, **bridge)
    ce, top1 = _read(critic, inputs, captions, mask)
    ref_ce = ref_top1 = None
    if batch.get("reference_images") is not None:
        ref_inputs = critic.prepare(batch["reference_images"], clamp=cfg.clamp, **bridge)
        ref_ce, ref_top1 = _read(critic, ref_inputs, captions, mask)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    greedy = greedy_caption(critic, inputs, max_new_tokens or captions.shape[1], eos, captions)
    ok = top1 | (ce < threshold)
    ref_ok = None if ref_ce is None else (ref_top1 | (ref_ce < threshold))
    verdict = []
    for b in range(captions.shape[0]):
        row = []
        for i in range(captions.shape[1]):
            if mask[b, i] == 0:
                row.append("pad")
            elif ref_ok is None:
                row.append("fine" if ok[b, i] else "misread")
            elif not ref_ok[b, i]:
                row.append("understanding error")
            else:
                row.append("fine" if ok[b, i] else "generation error")
        verdict.append(row)
    text = toks = None
    if tokenizer is not None:
        text = [
            tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True)
            for row in greedy.tolist()
        ]
        toks = [tokenizer.convert_ids_to_tokens(row) for row in captions.tolist()]
    diag = Diagnosis(
        captions=captions.cpu(),
        caption_mask=mask.cpu(),
        greedy_ids=greedy.cpu(),
        token_ce=ce.cpu(),
        top1=top1.cpu(),
        verdict=verdict,
        threshold=float(threshold),
        images=((images.float() - lo) * (2.0 / (hi - lo)) - 1.0).cpu(),
        reference_token_ce=None if ref_ce is None else ref_ce.cpu(),
        reference_top1=None if ref_top1 is None else ref_top1.cpu(),
        greedy_text=text,
        caption_tokens=toks,
    )
    if out_dir is not None:
        diag.save(out_dir)
    return diag


class _CallableModule(types.ModuleType):
    """`uno_engine.diagnose(step, batch)` works whether the name resolves to this module or its function."""

    def __call__(self, *args, **kwargs):
        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
