"""`uno-train`'s checkpoints: `output_dir/checkpoint-N`, written with `accelerator.save_state`.

What one holds: the trainable state only (the denoiser's LoRA adapters as a peft state dict in
`uno_lora.safetensors`, the same adapters in diffusers' format in `pytorch_lora_weights.safetensors` so any
checkpoint loads into a pipeline, the loss heads in `uno_heads.safetensors` when there are any), the optimizer,
the LR scheduler, every process's RNG states and the data position (registered custom objects). The frozen
base weights are never written (a FLUX.1 checkpoint would otherwise be 24 GB). Loading copies every saved
tensor back bit for bit, so a resumed run equals an uninterrupted one (tests/test_train_cli.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from .args import UsageError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N under output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint: a folder, or "latest" (None when there is none yet: a fresh start)."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not path.is_dir() and not path.is_absolute():
        path = output_dir / value  # diffusers' scripts take a bare "checkpoint-N" too
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if not (path / "uno_lora.safetensors").is_file():
        raise UsageError(
            f"--resume_from_checkpoint {value}: not a uno-train checkpoint (no uno_lora.safetensors)"
        )
    return path


def step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    if not m:
        raise UsageError(f"--resume_from_checkpoint {path}: the folder name must be checkpoint-N")
    return int(m.group(1))


class CheckpointIO:
    """accelerate save/load hooks that write the trainable state only (module docstring)."""

    def __init__(self, accelerator, generator, loss, save_lora):
        from uno_engine.distributed import unwrap

        self.accelerator, self.save_lora = accelerator, save_lora
        self.generator, self.loss = unwrap(generator), unwrap(loss)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _heads(self) -> dict[str, torch.Tensor]:
        return {
            k: v
            for k, v in self.loss.state_dict().items()
            if k.startswith(("density_head", "structure_head"))
        }

    def _save_hook(self, models, weights, output_dir):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            out = Path(output_dir)
            den = self.generator.denoiser
            save_file(
                {k: v.contiguous() for k, v in get_peft_model_state_dict(den).items()},
                out / "uno_lora.safetensors",
            )
            self.save_lora(den, out)
            if heads := self._heads():
                save_file({k: v.contiguous() for k, v in heads.items()}, out / "uno_heads.safetensors")
        while weights:  # nothing else of the models: the frozen base weights stay where they are
            weights.pop()

    def _load_hook(self, models, input_dir):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(input_dir)
        result = set_peft_model_state_dict(self.generator.denoiser, load_file(path / "uno_lora.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise UsageError(
                f"--resume_from_checkpoint {input_dir}: LoRA keys that this run does not have "
                f"(first: {result.unexpected_keys[0]}); was it written with other --rank / targets?"
            )
        if (path / "uno_heads.safetensors").is_file():
            self.loss.load_state_dict(load_file(path / "uno_heads.safetensors"), strict=False)
        while models:
            models.pop()


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """Write checkpoint-`step`; first remove the oldest ones so that at most `total_limit` remain."""
    if accelerator.is_main_process and total_limit is not None:
        found = list_checkpoints(output_dir)
        for _, old in found[: max(0, len(found) - total_limit + 1)]:
            shutil.rmtree(old)
    path = output_dir / f"checkpoint-{step}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    return path
