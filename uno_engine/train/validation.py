"""`uno-train`'s validation: for the --validation_prompts, a PNG grid of full samples (the whole deterministic
sampling chain, fixed noise, so grids of different steps compare image for image) and `uno_engine.diagnose`'s
per-token report (diagnosis.json / diagnosis.png: what the critic reads in each image, token by token)."""

from __future__ import annotations

import types
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """images (B, 3, H, W) in [-1, 1] -> one PNG, `columns` per row (default: all in one row)."""
    import numpy as np
    from PIL import Image

    B, _, H, W = images.shape
    cols = columns or B
    rows = -(-B // cols)
    grid = torch.zeros(3, rows * H, cols * W)
    for i in range(B):
        r, c = divmod(i, cols)
        grid[:, r * H : (r + 1) * H, c * W : (c + 1) * W] = images[i].float().clamp(-1, 1)
    arr = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path


@torch.no_grad()
def validate(trainer, global_step: int) -> dict[str, float]:
    """Run one validation; returns {"validation/caption_ce": ...} (masked token mean). Only the main process
    writes files (other processes run it too when the critic is sharded: its forward is a collective)."""
    from uno_engine.diagnose import diagnose
    from uno_engine.distributed import unwrap

    args = trainer.args
    prompts = [p for p in trainer.validation_prompts for _ in range(args.num_validation_images)]
    gen = unwrap(trainer.step.generator)
    out_dir = Path(args.output_dir) / "validation"
    batch = dict(trainer.encode(prompts))
    batch["seed"] = args.seed
    with trainer.autocast():
        images = gen.decode_latents(gen.sample_latents(batch)).float()
    main = trainer.accelerator.is_main_process
    grid = out_dir / f"step-{global_step:06d}.png"
    if main:
        save_grid(images, grid, columns=args.num_validation_images)
    ids, mask = trainer.tokenize(prompts)
    device = trainer.device
    batch |= {"captions": ids.to(device), "caption_mask": mask.to(device)}
    # diagnose reads a step's generator, critic and config: the unwrapped generator here, so that a run on one
    # process does not enter the DDP wrapper's forward (and its collectives) alone
    view = types.SimpleNamespace(generator=gen, critic=trainer.step.critic, config=trainer.step.config)
    with trainer.autocast():
        diag_dir = out_dir / f"step-{global_step:06d}" if main else None
        diag = diagnose(view, batch, tokenizer=trainer.tokenizer, out_dir=diag_dir)
    ce = float((diag.token_ce * diag.caption_mask).sum() / diag.caption_mask.sum())
    trainer.validation_images.append(str(grid.relative_to(args.output_dir)))
    return {"validation/caption_ce": ce}
