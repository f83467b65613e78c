"""`uno-train`'s arguments, named as in diffusers' training scripts (train_text_to_image_lora.py,
train_dreambooth_lora_flux.py), and the one error type every module of the command raises for bad input.

    uno-train --pretrained_model_name_or_path PIPE --critic_model_name_or_path CRITIC \
        --train_data prompts.jsonl --output_dir out --max_train_steps 1000
"""

from __future__ import annotations

import argparse
import math

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb")


class UsageError(Exception):
    """Bad input from the user (a path, a file, a value): `main` prints its message as ONE line and exits
    non-zero, without a traceback. The message names the argument or the file (and line)."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uno-train",
        description="Post-train a diffusers pipeline with LoRA under a frozen understanding critic (UNO).",
    )
    m = p.add_argument_group("models")
    m.add_argument(
        "--pretrained_model_name_or_path", required=True, help="diffusers pipeline folder or hub id"
    )
    m.add_argument("--revision", default=None, help="hub revision of the pipeline (and the critic)")
    m.add_argument("--variant", default=None, help="weights variant of the pipeline, e.g. fp16")
    m.add_argument(
        "--critic_model_name_or_path", required=True, help="image-text-to-text model folder or hub id"
    )
    m.add_argument(
        "--instruction",
        default=None,
        help="the critic's prompt before the caption (its chat template); default: none, the caption follows "
        "the image tokens directly",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--train_data",
        required=True,
        help='a JSONL file (one object a line: "prompt", optional "caption", "negatives", "image"), or a '
        "`datasets` folder or name with the same columns",
    )
    d.add_argument("--prompt_column", default="prompt", help="datasets source: the prompt column")
    d.add_argument("--caption_column", default="caption", help="datasets source: the caption column")
    d.add_argument("--dataset_split", default="train", help="datasets source: the split")
    t = p.add_argument_group("training")
    t.add_argument("--output_dir", required=True)
    t.add_argument("--max_train_steps", type=int, default=1000)
    t.add_argument("--train_batch_size", type=int, default=1, help="images per process per micro-batch")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=1e-4)
    t.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    t.add_argument("--lr_warmup_steps", type=int, default=0)
    t.add_argument("--adam_weight_decay", type=float, default=1e-2)
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="0: no clipping")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"))
    t.add_argument("--cpu", action="store_true", help="run on the CPU (every process; gloo when several)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--rank", type=int, default=16)
    lo.add_argument("--lora_alpha", type=int, default=None, help="default: --rank")
    lo.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names (default: the family's attention projections)",
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    s.add_argument("--num_inference_steps", type=int, default=20)
    s.add_argument("--k_grad_steps", type=int, default=1, help="sampling steps that run with grad")
    s.add_argument("--guidance_scale", type=float, default=1.0, help="CFG (> 1 encodes an empty negative)")
    o = p.add_argument_group("objective")
    o.add_argument("--caption_weight", type=float, default=1.0)
    o.add_argument("--negatives_weight", type=float, default=0.0)
    o.add_argument("--generator_loss_weight", type=float, default=0.0)
    o.add_argument("--kl_weight", type=float, default=0.0)
    o.add_argument("--density_weight", type=float, default=0.0)
    o.add_argument("--structure_weight", type=float, default=0.0)
    o.add_argument("--view", default="pixel", choices=("pixel", "latent"))
    o.add_argument(
        "--latent_adapter",
        default=None,
        help="--view latent: a LatentAdapter file fitted for this critic and VAE (uno_engine.latent)",
    )
    r = p.add_argument_group("reading (how the critic reads each generated image; docs/reading.md)")
    r.add_argument(
        "--read",
        default="default",
        choices=("default", "off"),
        help="default: one jittered view per image (ReadAugment.default(); --view pixel); off: the "
        "processor's exact read (read=None)",
    )
    r.add_argument("--read_views", type=int, default=None, help="views per image (default 1)")
    r.add_argument(
        "--read_shift", type=float, default=None, help="max view centre shift, critic patches (default 0.75)"
    )
    r.add_argument(
        "--read_scale",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="view box size relative to the image (default 0.85 1.15)",
    )
    r.add_argument("--read_noise", type=float, default=None, help="pixel noise std (default 0.15)")
    mem = p.add_argument_group("memory")
    mem.add_argument("--critic_checkpoint", default="auto", help="auto | none | layer | selective | offload")
    mem.add_argument(
        "--shard_critic", action="store_true", help="FSDP2-shard the frozen critic (multi-process)"
    )
    mem.add_argument(
        "--prompt_embeds_cache",
        type=int,
        default=256,
        help="prompts whose text-encoder outputs stay cached on the device (least recently used; 0: none); "
        "FLUX.1: 4 MiB each",
    )
    mem.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute the grad sampling steps"
    )
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpointing_steps", type=int, default=500)
    c.add_argument("--checkpoints_total_limit", type=int, default=None)
    c.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    v = p.add_argument_group("seeing it work")
    v.add_argument("--report_to", default="none", choices=REPORT_TO)
    v.add_argument("--tracker_project_name", default="uno-train")
    v.add_argument(
        "--validation_prompts", default=None, help="prompts separated by '|', or a text file, one a line"
    )
    v.add_argument("--validation_steps", type=int, default=100)
    v.add_argument("--num_validation_images", type=int, default=1, help="images per validation prompt")
    v.add_argument("--no_progress_bar", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; a bad value raises UsageError naming the argument."""
    args = build_parser().parse_args(argv)
    positive = (
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "rank",
        "num_inference_steps",
        "k_grad_steps",
        "checkpointing_steps",
        "validation_steps",
        "num_validation_images",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in (
        "caption_weight",
        "negatives_weight",
        "generator_loss_weight",
        "kl_weight",
        "density_weight",
        "structure_weight",
        "learning_rate",
        "max_grad_norm",
        "adam_weight_decay",
    ):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):  # also NaN
            raise UsageError(f"--{name} must be a finite number >= 0, got {value}")
    if args.k_grad_steps > args.num_inference_steps:
        raise UsageError(
            f"--k_grad_steps ({args.k_grad_steps}) must be <= --num_inference_steps ({args.num_inference_steps})"
        )
    if args.guidance_scale < 1:
        raise UsageError(f"--guidance_scale must be >= 1 (1: no CFG), got {args.guidance_scale}")
    if args.prompt_embeds_cache < 0:
        raise UsageError(f"--prompt_embeds_cache must be >= 0, got {args.prompt_embeds_cache}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.resolution is not None and args.resolution < 8:
        raise UsageError(f"--resolution must be >= 8 pixels, got {args.resolution}")
    _check_read(args)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    if args.lora_target_modules is not None:
        args.lora_target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
        if not args.lora_target_modules:
            raise UsageError("--lora_target_modules is empty")
    return args


READ_FLAGS = ("read_views", "read_shift", "read_scale", "read_noise")


def _check_read(args) -> None:
    """--read_* refine the default reading: they need --read default and --view pixel, and valid values."""
    given = [name for name in READ_FLAGS if getattr(args, name) is not None]
    if given and args.read == "off":
        raise UsageError(f"--{given[0]} needs --read default (--read off is the processor's exact read)")
    if given and args.view != "pixel":
        raise UsageError(f"--{given[0]} needs --view pixel (the views are drawn in the pixel bridge)")
    if args.read_views is not None and args.read_views < 1:
        raise UsageError(f"--read_views must be >= 1, got {args.read_views}")
    for name in ("read_shift", "read_noise"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a finite number >= 0, got {value}")
    if args.read_scale is not None:
        lo, hi = args.read_scale
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise UsageError(f"--read_scale must be LO HI with 0 < LO <= HI, got {lo} {hi}")


def read_config(args):
    """UNOConfig.read for these arguments: None (--read off), "auto" (the default reading for the pixel view,
    None for the latent view) or ReadAugment.default() with the --read_* values."""
    if args.read == "off":
        return None
    over = dict(
        views=args.read_views,
        shift=args.read_shift,
        scale=None if args.read_scale is None else tuple(args.read_scale),
        noise=args.read_noise,
    )
    over = {k: v for k, v in over.items() if v is not None}
    if not over:
        return "auto"
    from uno_engine import ReadAugment

    return ReadAugment.default(**over)
