"""`uno-train`: post-train a diffusers pipeline with LoRA from the command line (docs/cli.md).

    uno-train --pretrained_model_name_or_path PIPE --critic_model_name_or_path CRITIC \
        --train_data prompts.jsonl --output_dir out

Modules, one concern each: `args` (the command line, UsageError), `data` (records, the resumable stream,
caption tokens), `models` (pipeline, critic, LoRA, the step), `checkpoints` (accelerate state), `loop`
(`Trainer`), `validation` (PNG grids + the per-token diagnosis), `model_card` (README.md), `cli` (`main`).
"""

from uno_engine.train.args import UsageError
from uno_engine.train.cli import main

__all__ = ["UsageError", "main"]
