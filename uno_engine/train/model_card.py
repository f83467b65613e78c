"""`uno-train`'s model card: output_dir/README.md with the base model, the critic, the settings and the final
metrics (Hugging Face model-card front matter, so the hub shows it as a LoRA of the base model)."""

from __future__ import annotations

from pathlib import Path

SETTINGS = (
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "rank",
    "lora_alpha",
    "lora_target_modules",
    "resolution",
    "num_inference_steps",
    "k_grad_steps",
    "guidance_scale",
    "caption_weight",
    "negatives_weight",
    "generator_loss_weight",
    "kl_weight",
    "density_weight",
    "structure_weight",
    "view",
    "instruction",
    "mixed_precision",
    "seed",
)


def write_model_card(
    out_dir: Path, args, *, family: str, targets, metrics: dict, world_size: int, validation: list[str]
) -> Path:
    """Write out_dir/README.md and return its path."""
    base, critic = args.pretrained_model_name_or_path, args.critic_model_name_or_path
    rows = []
    for name in SETTINGS:
        value = getattr(args, name, None)
        if name == "lora_target_modules":
            value = ",".join(targets)
        rows.append(f"| `--{name}` | `{value}` |")
    metric_rows = [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())] or ["| (none) | |"]
    images = "\n".join(f"![{Path(p).stem}]({p})" for p in validation)
    text = f"""---
base_model: {base}
library_name: diffusers
tags:
- lora
- text-to-image
- diffusers
- uno
---

# UNO LoRA for {base}

LoRA adapters ({family} denoiser) post-trained with `uno-train` (uno_engine): the frozen critic
`{critic}` captions the generated images, and the caption cross-entropy (plus the other terms weighted
below) trains the adapters through the last sampling steps and the VAE decoder.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors
```

## Settings

{world_size} process(es); global batch = train_batch_size x processes x gradient_accumulation_steps
= {args.train_batch_size * world_size * args.gradient_accumulation_steps}.

| argument | value |
|---|---|
{chr(10).join(rows)}

## Final metrics (mean over the last logged step, all processes)

| metric | value |
|---|---|
{chr(10).join(metric_rows)}

## Validation

{images or "(no --validation_prompts)"}
"""
    path = out_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
