"""`uno-train`'s training loop: `Trainer.build(args)` loads everything, `trainer.train_step()` runs one
optimizer step, `trainer.run()` the whole run (validation, checkpoints, logging, the LoRA and the card).

One optimizer step reads the next global batch (train_batch_size x processes x gradient_accumulation_steps
records, `data.DataStream`); each process keeps its contiguous slice, cut into micro-batches. The caption CE is
normalized by the token count of the whole global batch (`uno_engine.distributed.accumulation_token_count`),
so the non-final micro-batches run under `no_sync` and the sum of the accumulated gradients is the global
batch's, whatever the number of processes (the same as examples/train_accelerate.py).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import checkpoints, data, models


def _lr_lambda(name: str, warmup: int, total: int):
    def f(step: int) -> float:
        if name != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class Trainer:
    """Everything one `uno-train` run holds; build with `Trainer.build(args)`."""

    @classmethod
    def build(cls, args) -> Trainer:
        accelerate = models.require("accelerate", "uno-train")
        out = Path(args.output_dir)
        records = data.read_records(args)
        validation_prompts = data.read_validation_prompts(args.validation_prompts)
        resume = checkpoints.resolve_resume(args.resume_from_checkpoint, out)
        log_with = None if args.report_to == "none" else args.report_to
        if log_with is not None:
            models.require(log_with, f"--report_to {log_with}", install=log_with)
        accelerator = accelerate.Accelerator(
            cpu=args.cpu,
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=accelerate.utils.ProjectConfiguration(
                project_dir=str(out), logging_dir=str(out / "logs")
            ),
            kwargs_handlers=[accelerate.utils.DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )
        pipe = models.load_pipeline(args, dtype)
        critic, tokenizer = models.load_critic(args, dtype)
        return cls(args, accelerator, pipe, critic, tokenizer, records, validation_prompts, resume)

    def __init__(self, args, accelerator, pipe, critic, tokenizer, records, validation_prompts, resume):
        from uno_engine import distributed as D

        self.args, self.accelerator, self.pipe, self.tokenizer = args, accelerator, pipe, tokenizer
        self.records, self.validation_prompts, self.resume_path = records, validation_prompts, resume
        self.device = accelerator.device
        self.output_dir = Path(args.output_dir)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        pipe.to(self.device)
        critic.to(self.device)
        self.tokenize = data.CaptionTokenizer(critic)
        step, gen = models.build_step(args, pipe, critic, self.device)
        self.targets = sorted(next(iter(gen.denoiser.peft_config.values())).target_modules)
        data.check_caption_lengths(
            records,
            self.tokenize,
            critic.text_config.max_position_embeddings,
            data.prefix_length(critic, gen.height, gen.width),
            args.train_data,
        )
        self.with_images = data.check_records(records, args)
        if args.shard_critic and self.world > 1:
            D.shard_frozen_critic(critic)
        params = [p for p in step.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        step.generator, self.optimizer = accelerator.prepare(step.generator, self.optimizer)
        if any(p.requires_grad for p in step.uno_loss.parameters()):
            step.uno_loss = accelerator.prepare_model(step.uno_loss)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer,
            _lr_lambda(args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps),
        )
        self.step, self.gen = step, gen
        cache = args.prompt_embeds_cache
        self.encode = models.PromptEncoder(pipe, cfg=args.guidance_scale > 1, cache_size=cache)
        self.stream = data.DataStream(len(records), args.seed)
        accelerator.register_for_checkpointing(self.stream, self.lr_scheduler)
        checkpoints.CheckpointIO(
            accelerator, step.generator, step.uno_loss, lambda den, d: models.save_lora(pipe, den, d)
        )
        self.global_step, self.metrics, self.validation_images = 0, {}, []
        self.after_backward = None  # tests: a callable(trainer) run after the step's last backward
        self.latent_shape = (gen.latent_channels, *gen.latent_size)

    # ------------------------------------------------------------------------------------------------ step
    def autocast(self):
        return (
            self.accelerator.autocast()
            if self.accelerator.mixed_precision != "no"
            else contextlib.nullcontext()
        )

    def micro_batches(self) -> list[dict]:
        """This process's micro-batches of the next global batch (module docstring). Each holds, for B =
        --train_batch_size: "captions" / "caption_mask" (B, L) padded to the global batch's longest caption,
        "negative_captions" / "negative_caption_mask" (B, K, L) with --negatives_weight, the family's prompt
        conditioning ("prompt_embeds" (B, S, D), ...), "initial_noise" (B, C, h, w) drawn per sample, "seed"
        (the sampling start step's source: one per global step), "reference_images" (B, 3, H, W) in [-1, 1]
        when the records have images, and the accumulation counts "num_caption_tokens" / "num_images"."""
        from uno_engine import distributed as D

        a = self.args
        B, A = a.train_batch_size, a.gradient_accumulation_steps
        picks = self.stream.take(B * A * self.world)
        records = [self.records[i] for _, i in picks]
        tokens = data.caption_batch(records, self.tokenize, a.negatives_weight > 0)
        local = range(self.rank * B * A, (self.rank + 1) * B * A)
        seed = a.seed * 1_000_003 + self.global_step  # the start step s: one per global batch
        out = []
        for j in range(A):
            rows = list(local[j * B : (j + 1) * B])
            batch = {k: v[rows].to(self.device) for k, v in tokens.items()}
            batch.update(self.encode([records[r].prompt for r in rows]))
            noise = data.sample_noise([picks[r][0] for r in rows], a.seed, self.latent_shape)
            batch["initial_noise"] = noise.to(self.device)
            batch["seed"] = seed
            # the reading's draws (uno_engine.read): from the global step and the sample's index in the global
            # batch, so a resumed run and any number of processes draw the same views
            batch["read_step"], batch["sample_offset"] = self.global_step, rows[0]
            if self.with_images:
                size = (self.gen.height, self.gen.width)
                imgs = torch.stack([data.load_image(records[r].image, size) for r in rows])
                batch["reference_images"] = imgs.to(self.device)
            out.append(batch)
        D.accumulation_token_count(out)
        return out

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the metrics (means over processes) as floats."""
        from uno_engine import distributed as D

        micro = self.micro_batches()
        sums: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro):
            sync = j == len(micro) - 1
            with contextlib.nullcontext() if sync else D.no_sync(self.step), self.autocast():
                out = self.step(batch)
            self.accelerator.backward(out.loss)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + v.float()
        if self.after_backward is not None:
            self.after_backward(self)
        if self.args.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        names = sorted(sums)
        values = self.accelerator.reduce(torch.stack([sums[k] for k in names]), reduction="mean")
        metrics = dict(zip(names, values.tolist(), strict=True))  # the step's one host read
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        return metrics

    # ------------------------------------------------------------------------------------------------ run
    def resume(self) -> None:
        if self.args.resume_from_checkpoint is not None and self.resume_path is None:
            self.accelerator.print(
                f"--resume_from_checkpoint latest: no checkpoint in {self.output_dir}; starting fresh"
            )
        if self.resume_path is None:
            return
        step = checkpoints.step_of(self.resume_path)
        self.accelerator.load_state(str(self.resume_path))
        self.global_step = step
        self.accelerator.print(f"resumed from {self.resume_path} (step {step})")

    def save_checkpoint(self) -> Path:
        return checkpoints.save_checkpoint(
            self.accelerator, self.output_dir, self.global_step, self.args.checkpoints_total_limit
        )

    def validate(self) -> None:
        from .validation import validate

        sharded = self.args.shard_critic and self.world > 1  # the critic's forward is then a collective
        if self.validation_prompts and (self.accelerator.is_main_process or sharded):
            self.accelerator.log(validate(self, self.global_step), step=self.global_step)
        self.accelerator.wait_for_everyone()

    def run(self) -> dict[str, float]:
        """The whole run from the current step to --max_train_steps; returns the last step's metrics."""
        from tqdm.auto import tqdm

        a, acc = self.args, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        acc.init_trackers(a.tracker_project_name, config={k: str(v) for k, v in vars(a).items()})
        self.resume()
        if self.global_step == 0:
            self.validate()  # the images before training
        bar = tqdm(
            total=a.max_train_steps,
            initial=self.global_step,
            desc="uno-train",
            disable=a.no_progress_bar or not acc.is_local_main_process,
        )
        while self.global_step < a.max_train_steps:
            self.metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(
                loss=f"{self.metrics['loss']:.4f}", caption_ce=f"{self.metrics.get('caption_ce', 0):.4f}"
            )
            acc.log(self.metrics, step=self.global_step)
            if self.global_step % a.checkpointing_steps == 0:
                self.save_checkpoint()
            if self.global_step % a.validation_steps == 0 or self.global_step == a.max_train_steps:
                self.validate()
        bar.close()
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.finish()
        acc.end_training()
        return self.metrics

    def finish(self) -> None:
        """The LoRA in diffusers' format and the model card, in output_dir."""
        from uno_engine.distributed import unwrap

        from .model_card import write_model_card

        models.save_lora(self.pipe, unwrap(self.step.generator).denoiser, self.output_dir)
        write_model_card(
            self.output_dir,
            self.args,
            family=self.gen.kind,
            targets=self.targets,
            metrics=self.metrics,
            world_size=self.world,
            validation=self.validation_images,
        )
