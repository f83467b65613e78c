"""examples/train_lightning.py: UNOStep inside a real Lightning Trainer (CPU), against a plain PyTorch loop on
the same generator weights, batches and seeds."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from uno_engine import Critic, UNOLoss, UNOStep
from uno_engine.testing.presets import caption_vocab_size
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lightning.py"
LR = 1e-3


def _example():
    spec = importlib.util.spec_from_file_location("train_lightning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_host_reads(mp, record) -> None:
    """Patch the Tensor methods that read a value to the host; while `record.on`, append (method, caller's
    file, caller's function) to `record.reads`."""
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        method = getattr(torch.Tensor, name)

        def wrapper(self, *args, __method=method, __name=name, **kwargs):
            if record.on:
                code = sys._getframe(1).f_code
                record.reads.append((__name, code.co_filename, code.co_name))
            return __method(self, *args, **kwargs)

        mp.setattr(torch.Tensor, name, wrapper)


class _Record(L.Callback):
    """The loss each training step returned (what Lightning ran the backward on), and the host reads from the
    first training batch to the end of training (the data setup before it excluded)."""

    def __init__(self):
        self.losses, self.reads, self.on = [], [], False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = True

    def on_train_end(self, trainer, pl_module):
        self.on = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def test_lightning_module_trains_like_a_plain_loop(monkeypatch):
    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor)
    gen, make_batch = build_generator("tiny-sd", num_inference_steps=2)
    vocab = caption_vocab_size(model)
    batches = [make_batch(2, 6, vocab, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gen_plain = copy.deepcopy(gen)
    before = {n: p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}

    # the plain loop: step, backward, AdamW
    step_plain = UNOStep(gen_plain, critic, UNOLoss(caption=1.0))
    opt = torch.optim.AdamW([p for p in step_plain.parameters() if p.requires_grad], lr=LR)
    plain_losses = []
    for batch in batches:
        out = step_plain(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        plain_losses.append(out.loss.detach())

    # the same two steps through Lightning
    module = _example().UNOLightningModule(UNOStep(gen, critic, UNOLoss(caption=1.0)), lr=LR)
    record = _Record()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    with monkeypatch.context() as mp:
        _record_host_reads(mp, record)
        trainer.fit(module, DataLoader(batches, batch_size=None))
    # in the training steps neither the module nor Lightning's loop reads a value to the host (prog_bar=False,
    # the logger's interval not reached)
    ours = [r for r in record.reads if r[1] == str(EXAMPLE) or "lightning" in r[1]]
    assert not ours, ours
    assert any(r[1].endswith("step.py") for r in record.reads)  # the recorder works: the step's input check

    assert trainer.global_step == 2 and len(record.losses) == 2
    assert all(torch.isfinite(v) for v in record.losses)
    # the same weights, batch and seed; then the same after the same update
    torch.testing.assert_close(record.losses[0], plain_losses[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(record.losses[1], plain_losses[1], rtol=1e-5, atol=0)
    # the same gradients and the same AdamW: the same parameters (each step moves them by about lr)
    plain = dict(gen_plain.named_parameters())
    moved = 0
    for name, p in gen.named_parameters():
        if name in before:
            torch.testing.assert_close(p.detach(), plain[name].detach(), rtol=1e-6, atol=1e-4 * LR)
            moved += int((p.detach() - before[name]).abs().max() > 0.5 * LR)
    assert moved > 0.9 * len(before), f"only {moved} of {len(before)} generator tensors changed"
    assert not critic.training and all(p.grad is None for p in critic.parameters())
    metrics = trainer.callback_metrics
    assert {"uno/loss", "uno/caption_ce"} <= set(metrics)
    torch.testing.assert_close(metrics["uno/loss"], record.losses[1])


def test_configure_optimizers_takes_only_trainable_parameters():
    example = _example()
    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor)
    gen, _ = build_generator("tiny-sd", num_inference_steps=2)
    gen.vae.requires_grad_(False)
    gen.denoiser.conv_in.requires_grad_(False)
    module = example.UNOLightningModule(UNOStep(gen, critic, UNOLoss(caption=1.0)), lr=LR)
    opt = module.configure_optimizers()
    got = {id(p) for group in opt.param_groups for p in group["params"]}
    assert got == {id(p) for p in gen.parameters() if p.requires_grad}
    assert id(gen.denoiser.conv_in.weight) not in got and opt.param_groups[0]["lr"] == LR
    gen.requires_grad_(False)
    try:
        module.configure_optimizers()
    except ValueError as e:
        assert "no trainable parameters" in str(e)
    else:
        raise AssertionError("configure_optimizers must refuse a step without trainable parameters")
