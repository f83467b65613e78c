"""UNO post-training with PyTorch Lightning: a `LightningModule` around `UNOStep`.

    python examples/train_lightning.py                          # CPU, tiny presets (random weights), 4 steps
    python examples/train_lightning.py --lora-rank 4 --steps 8  # train LoRA adapters on the denoiser only

`training_step` returns the step's loss, and Lightning runs the backward (through the frozen critic into the
generator) and the optimizer. The metrics go to `self.log` as the detached device tensors `UNOStep` returns:
with `prog_bar=False` Lightning keeps them on the device and reads them to the host only every
`Trainer(log_every_n_steps=...)` steps, so the training step has no host sync of its own beyond the step's one
input check (`UNOConfig(check_inputs=False)` removes it). The critic stays frozen and in eval mode
(`UNOStep.train`), whatever Lightning does with `.train()`; `configure_optimizers` takes only the parameters
that require grad (the generator's, or its LoRA adapters, and the loss heads').

Multi-GPU: `Trainer(strategy="ddp")` wraps the whole LightningModule in DDP, which then also sees the frozen
critic; that is fine (it has no gradients to reduce), but the generator-only wrapping of
`uno_engine.distributed.data_parallel` (examples/train_ddp.py) moves less.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader

from uno_engine import UNOConfig, UNOStep


class UNOLightningModule(L.LightningModule):
    """`UNOStep` as a LightningModule.

    Args:
        step: a built `UNOStep` (generator, critic, loss, config).
        lr, weight_decay, betas: AdamW over `step`'s parameters that require grad (torch's defaults but lr).
    """

    def __init__(self, step: UNOStep, *, lr: float = 1e-4, weight_decay: float = 0.01, betas=(0.9, 0.999)):
        super().__init__()
        self.step = step
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)

    def forward(self, batch: dict):
        return self.step(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        # detached device tensors; prog_bar=False keeps them off the host until the logger's interval
        self.log_dict(
            {f"uno/{k}": v for k, v in out.metrics.items()},
            on_step=True,
            on_epoch=False,
            prog_bar=False,
            batch_size=batch["captions"].shape[0],
        )
        return out.loss

    def configure_optimizers(self):
        params = [p for p in self.step.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "UNOLightningModule: the step has no trainable parameters (all requires_grad=False)"
            )
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)


def _batches(make_batch, n: int, batch_size: int):
    """n fixed batches (DataLoader(batch_size=None) hands them over as they are: "seed" stays an int)."""
    return [make_batch(batch_size, seed=i) for i in range(n)]


def build(preset: str = "tiny", *, lora_rank: int = 0, lr: float = 1e-4, batch_size: int = 2, steps: int = 4):
    """(UNOLightningModule, DataLoader) for a preset of uno_engine.testing.presets (random weights)."""
    from uno_engine.testing.presets import build_preset

    p = build_preset(preset, batch_size=batch_size)
    if lora_rank:
        from peft import LoraConfig

        den = p.generator.denoiser
        den.requires_grad_(False)
        den.add_adapter(
            LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
    step = UNOStep(p.generator, p.make_critic(p.engine_checkpoint), p.make_loss(caption=1.0), UNOConfig())
    loader = DataLoader(_batches(p.make_batch, steps, batch_size), batch_size=None)
    return UNOLightningModule(step, lr=lr), loader


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters of this rank only")
    ap.add_argument("--log-every", type=int, default=1)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    module, loader = build(
        args.preset, lora_rank=args.lora_rank, lr=args.lr, batch_size=args.batch_size, steps=args.steps
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        logger=L.pytorch.loggers.CSVLogger("lightning_logs"),
    )
    trainer.fit(module, loader)
    print({k: float(v) for k, v in trainer.logged_metrics.items()})


if __name__ == "__main__":
    main()
