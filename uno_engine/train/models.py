"""`uno-train`'s models: the diffusers pipeline (its denoiser gets LoRA adapters), the critic, and the step.

The pipeline loads with `DiffusionPipeline.from_pretrained`; any family `DiffusersGenerator.from_pipeline` takes
works. The critic loads with `AutoModelForImageTextToText` + `AutoProcessor` (Janus with its own class); when
the full processor cannot be built (e.g. Qwen2-VL's wants torchvision for video), the image processor and the
tokenizer load on their own. peft and accelerate are the `train` extra: `pip install uno_engine[train]`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .args import UsageError, one_line, read_config

# LoRA targets per denoiser family (diffusers' LoRA scripts' choices): the attention projections; the DiTs'
# joint attention also has the text stream's projections.
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
DIT_TARGETS = UNET_TARGETS + ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
DEFAULT_TARGETS = {"sd": UNET_TARGETS, "sdxl": UNET_TARGETS}  # every other family: DIT_TARGETS


def require(module: str, why: str, install: str = "'uno_engine[train]'"):
    """Import an optional dependency of the command, or a UsageError with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{why} needs `{module}`: pip install {install}") from None


def check_model_path(value: str, arg: str) -> None:
    """A local-looking path that does not exist is an error here (a hub id "org/name" is tried as one)."""
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{arg} {value}: not a folder")
        return
    hub_like = value.count("/") <= 1 and not value.startswith((".", "/", "~")) and "\\" not in value
    if not hub_like:
        raise UsageError(f"{arg} {value}: folder does not exist")


def load_pipeline(args, dtype: torch.dtype):
    """The diffusers pipeline, its family checked (UsageError for a missing folder or an unknown family)."""
    from diffusers import DiffusionPipeline

    from uno_engine.generators.diffusers import pipeline_denoiser
    from uno_engine.generators.families import FAMILIES

    path = args.pretrained_model_name_or_path
    check_model_path(path, "--pretrained_model_name_or_path")
    try:
        kw = (
            {} if dtype == torch.float32 else {"torch_dtype": dtype}
        )  # fp32: the default, no deprecation notice
        pipe = DiffusionPipeline.from_pretrained(path, revision=args.revision, variant=args.variant, **kw)
    except Exception as e:  # noqa: BLE001 - a folder that is not a loadable pipeline: one line, no traceback
        raise UsageError(
            f"--pretrained_model_name_or_path {path}: cannot load a diffusers pipeline ({one_line(e)})"
        ) from None
    try:
        den = pipeline_denoiser(pipe)
    except ValueError:
        den = None
    if den is None or not any(f.matches(den) for f in FAMILIES):
        what = type(den).__name__ if den is not None else "no"
        raise UsageError(
            f"--pretrained_model_name_or_path {path}: {type(pipe).__name__} with {what} denoiser is not a "
            f"supported pipeline family (supported: {', '.join(f.name for f in FAMILIES)})"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ProcessorParts:
    """A critic's image processor and tokenizer, when its full processor cannot be built (e.g. Qwen2-VL's
    AutoProcessor without torchvision): `Critic.from_hf` takes it as a processor without a chat template, and
    reads captions as the tokenizer's plain ids."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer


def load_critic(args, dtype: torch.dtype):
    """(critic, tokenizer): the critic model frozen and wrapped with `Critic.from_hf`."""
    import transformers

    from uno_engine import Critic

    path = args.critic_model_name_or_path
    check_model_path(path, "--critic_model_name_or_path")
    kw = dict(revision=args.revision) if args.revision and not Path(path).exists() else {}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kw)
        cls = (
            transformers.JanusForConditionalGeneration
            if config.model_type == "janus"
            else transformers.AutoModelForImageTextToText
        )
        model = cls.from_pretrained(path, dtype=dtype, **kw).eval()
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            f"--critic_model_name_or_path {path}: cannot load an image-text-to-text model ({one_line(e)})"
        ) from None
    try:
        processor, why_not = transformers.AutoProcessor.from_pretrained(path, **kw), None
    except Exception as e:  # noqa: BLE001 - e.g. Qwen2-VL's processor wants torchvision for its video half
        processor, why_not = None, one_line(e)
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        try:
            processor = ProcessorParts(
                transformers.AutoImageProcessor.from_pretrained(path, **kw),
                transformers.AutoTokenizer.from_pretrained(path, **kw),
            )
        except Exception as e:  # noqa: BLE001
            raise UsageError(
                f"--critic_model_name_or_path {path}: cannot load its image processor / tokenizer ({one_line(e)})"
            ) from None
        if args.instruction is not None:
            raise UsageError(
                f"--instruction needs the critic's full processor (its chat template), which AutoProcessor could "
                f"not build from {path} ({why_not or 'no processor'})"
            )
    try:
        critic = Critic.from_hf(
            model, processor, instruction=args.instruction, checkpoint=args.critic_checkpoint
        )
    except (TypeError, ValueError) as e:
        arg = "--instruction" if args.instruction is not None else "--critic_model_name_or_path"
        raise UsageError(f"{arg} ({path}): {one_line(e)}") from None
    return critic, processor.tokenizer


def add_lora(denoiser, family: str, args) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add peft LoRA adapters (diffusers' `add_adapter`), keep them in fp32."""
    peft = require("peft", "LoRA training")
    from diffusers.training_utils import cast_training_params

    targets = list(args.lora_target_modules or DEFAULT_TARGETS.get(family, DIT_TARGETS))
    denoiser.requires_grad_(False)
    torch.manual_seed(args.seed)  # the same adapter init on every process
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=targets
    )
    try:
        denoiser.add_adapter(config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {','.join(targets)}: {one_line(e)}") from None
    cast_training_params(denoiser, dtype=torch.float32)
    return [p for p in denoiser.parameters() if p.requires_grad]


def build_step(args, pipe, critic, device):
    """(UNOStep, the generator) over the pipeline with LoRA on its denoiser."""
    from uno_engine import UNOConfig, UNOLoss, UNOStep
    from uno_engine.generators import DiffusersGenerator

    size = {} if args.resolution is None else dict(height=args.resolution, width=args.resolution)
    try:
        gen = DiffusersGenerator.from_pipeline(
            pipe,
            num_inference_steps=args.num_inference_steps,
            k_grad_steps=args.k_grad_steps,
            guidance_scale=args.guidance_scale,
            gradient_checkpointing=args.gradient_checkpointing,
            **size,
        )
    except ValueError as e:
        raise UsageError(f"--pretrained_model_name_or_path / --resolution: {one_line(e)}") from None
    add_lora(gen.denoiser, gen.kind, args)
    torch.manual_seed(args.seed + 1)  # the loss heads, identical on every process
    loss = UNOLoss(
        caption=args.caption_weight,
        density=args.density_weight,
        structure=args.structure_weight,
        negatives=args.negatives_weight,
        generator_loss=args.generator_loss_weight,
        kl=args.kl_weight,
        normalize="global",  # the caption-token mean over every process and micro-batch
    )
    gen.to(device)
    if args.latent_adapter is not None:
        from uno_engine.latent import LatentAdapter

        try:
            adapter = LatentAdapter.load(args.latent_adapter, critic=critic, generator=gen, device=device)
        except Exception as e:  # noqa: BLE001 - a missing, malformed or mismatched file: one line
            raise UsageError(f"--latent_adapter {args.latent_adapter}: {one_line(e)}") from None
        critic.attach_latent_adapter(adapter)
    try:
        step = UNOStep(gen, critic, loss, UNOConfig(view=args.view, read=read_config(args)))
    except ValueError as e:
        raise UsageError(f"--view {args.view}: {one_line(e)}") from None
    return step, gen


def save_lora(pipe, denoiser, out_dir: Path) -> Path:
    """The denoiser's adapters as out_dir/pytorch_lora_weights.safetensors in diffusers' LoRA format, with the
    LoraConfig as metadata (so `pipe.load_lora_weights(out_dir)` restores lora_alpha)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    attr = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    out_dir.mkdir(parents=True, exist_ok=True)
    saver = getattr(type(pipe), "save_lora_weights", None)
    if saver is None:  # a pipeline without diffusers' LoRA loader: the same file, keys under the denoiser
        from safetensors.torch import save_file

        save_file(
            {f"{attr}.{k}": v.contiguous() for k, v in layers.items()},
            out_dir / "pytorch_lora_weights.safetensors",
        )
    else:
        kw = {f"{attr}_lora_layers": layers}
        if f"{attr}_lora_adapter_metadata" in inspect.signature(saver).parameters:
            kw[f"{attr}_lora_adapter_metadata"] = denoiser.peft_config["default"].to_dict()
        saver(out_dir, **kw)
    return out_dir / "pytorch_lora_weights.safetensors"


class PromptEncoder:
    """prompts -> the pipeline's conditioning (`encode_prompts`), with the negative (empty) prompt for CFG, and
    a least-recently-used cache of `cache_size` prompts' embeddings kept on the device (0: no cache). With the
    cache, each prompt is encoded alone (a batch of one), so its embedding is the same bits whichever prompts
    share its batch: a resumed run (empty cache) and an uninterrupted one read identical rows. Repeated prompts
    (every epoch, the validation prompts) skip the text encoders."""

    def __init__(self, pipe, *, cfg: bool, cache_size: int):
        from collections import OrderedDict

        self.pipe, self.cfg, self.cache_size = pipe, cfg, cache_size
        self.cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from uno_engine.generators import encode_prompts

        negatives = {"negative_prompts": [""] * len(prompts)} if self.cfg else {}
        return encode_prompts(self.pipe, prompts, **negatives)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.cache_size == 0:
            return self._encode(prompts)
        for p in dict.fromkeys(prompts):
            if p not in self.cache:  # one prompt a call: its row never depends on which others were missing
                self.cache[p] = self._encode([p])
        rows = []
        for p in prompts:
            self.cache.move_to_end(p)
            rows.append(self.cache[p])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
