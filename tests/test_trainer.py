"""UNOStep inside a real transformers.Trainer: compute_loss returns step(batch).loss."""

import torch
from torch import nn
from torch.utils.data import Dataset

from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets.critics import build_critic_model


class _Captions(Dataset):
    def __init__(self, n, length, vocab):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab - 1, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "captions": self.ids[i],
            "caption_mask": torch.ones_like(self.ids[i]),
            "index": torch.tensor(i),
        }


class _Pixels(nn.Module):
    def __init__(self, n, h=32, w=32):
        super().__init__()
        self.pixels = nn.Parameter(torch.randn(n, 3, h, w) * 0.5)

    def forward(self, batch):
        return torch.tanh(self.pixels[batch["index"]])


def test_hf_trainer_runs_uno_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor = build_critic_model("tiny-llava-siglip")
    critic = Critic.from_hf(model, processor)
    gen = _Pixels(8)
    step = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss(caption=1.0), UNOConfig())
    before = gen.pixels.detach().clone()

    class UNOTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(inputs)
            return (out.loss, out) if return_outputs else out.loss

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = UNOTrainer(model=step, args=args, train_dataset=_Captions(8, 6, critic.vocab_size))
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, gen.pixels.detach()), "the generator was not updated"
    assert not critic.training, "the critic must stay in eval mode under Trainer"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in critic.parameters())
