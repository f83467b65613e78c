"""`uno-train` end to end on the CPU, on tiny models written with save_pretrained into a temporary folder
(uno_engine.testing.presets.folders: SD-1.x and FLUX.1 pipelines, LLaVA and Qwen2-VL critics with word-level
tokenizers and a chat template built in-process).

- a run writes the LoRA in diffusers' format (pipe.load_lora_weights loads it, and it changes the denoiser),
  the model card, a PNG grid per validation (one before training) and the per-token diagnosis;
- a run resumed from its checkpoint equals the uninterrupted run, bitwise (every LoRA tensor, torch.equal);
- each bad input of the issue exits non-zero with one line naming the thing, no traceback;
- (distributed) 2 gloo processes under `accelerate launch` equal 1 process on the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uno_engine.testing.presets.folders import save_tiny_critic, save_tiny_pipeline, write_prompts
from uno_engine.train import main

pytest.importorskip("peft")
pytest.importorskip("accelerate")

FAST = ["--resolution", "32", "--num_inference_steps", "2", "--rank", "4", "--lora_alpha", "8"]
FAST += ["--learning_rate", "1e-2"]
FAST += ["--cpu", "--no_progress_bar"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("uno_tiny")
    for name in ("tiny-sd", "tiny-flux"):
        save_tiny_pipeline(name, root / name)
    for name in ("tiny-llava", "tiny-qwen2-vl"):
        save_tiny_critic(name, root / name)
    write_prompts(root / "prompts.jsonl")
    return root


def _argv(tiny, out, pipe="tiny-sd", critic="tiny-llava", *extra):
    return [
        "--pretrained_model_name_or_path",
        str(tiny / pipe),
        "--critic_model_name_or_path",
        str(tiny / critic),
        "--train_data",
        str(tiny / "prompts.jsonl"),
        "--output_dir",
        str(out),
        *FAST,
        *extra,
    ]


def _denoiser_out(pipe, seed=3):
    """The denoiser's output on a fixed input (no text encoder: random conditioning of the right shape)."""
    g = torch.Generator().manual_seed(seed)
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    with torch.no_grad():
        if hasattr(pipe, "unet"):
            x = torch.randn(1, 4, 4, 4, generator=g)
            return den(x, torch.tensor([500.0]), torch.randn(1, 8, 32, generator=g)).sample
        x = torch.randn(1, 4, 16, generator=g)  # FLUX: packed 2x2 latent tokens of a 4x4 latent
        return den(
            hidden_states=x,
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            pooled_projections=torch.randn(1, 24, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(4, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        ).sample


def _check_lora_loads(tiny, pipe_name, out, rank=4, alpha=8):
    """pipe.load_lora_weights(out) loads the trained adapters (equal to the last checkpoint's) with the run's
    rank and lora_alpha, and changes the denoiser's output."""
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(tiny / pipe_name)
    before = _denoiser_out(pipe)
    pipe.load_lora_weights(out, adapter_name="uno")
    after = _denoiser_out(pipe)
    assert (after - before).abs().max() > 1e-4, "the LoRA does not change the denoiser"
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    loaded = get_peft_model_state_dict(den, adapter_name="uno")
    assert (den.peft_config["uno"].r, den.peft_config["uno"].lora_alpha) == (rank, alpha)
    lora_fields = ("r", "lora_alpha", "target_modules")
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    trained = load_file(last / "uno_lora.safetensors")
    assert len(loaded) == len(trained) > 0
    for k, v in trained.items():
        assert torch.equal(loaded[k], v), k
    # the same adapters put in by peft with the run's LoraConfig (lora_alpha included): the same output
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    ref = DiffusionPipeline.from_pretrained(tiny / pipe_name)
    ref_den = ref.unet if hasattr(ref, "unet") else ref.transformer
    ref_den.add_adapter(LoraConfig(**{k: getattr(den.peft_config["uno"], k) for k in lora_fields}))
    set_peft_model_state_dict(ref_den, trained)
    torch.testing.assert_close(_denoiser_out(ref), after, rtol=1e-5, atol=1e-6)


def test_sd_llava_run_writes_lora_card_and_validation(tiny, tmp_path, capsys):
    """SD-1.x + LLaVA reading in its chat template (--instruction): the caption is the template's completion,
    which ends with the end-of-turn token </s> (id 3 of the tiny tokenizer)."""
    out = tmp_path / "run"
    argv = _argv(tiny, out, "tiny-sd", "tiny-llava", "--max_train_steps", "2", "--train_batch_size", "2")
    argv += ["--checkpointing_steps", "2", "--validation_prompts", "a red cube|a blue ball"]
    argv += ["--validation_steps", "2", "--instruction", "describe this image ."]
    assert main(argv) == 0
    rows = json.loads((out / "validation" / "step-000000" / "diagnosis.json").read_text())["images"]
    for row in rows:
        real = [t for t, m in zip(row["caption_ids"], row["caption_mask"], strict=True) if m]
        assert real[-1] == 3, f"not the template's completion: {real}"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    for step in (0, 2):  # one validation before training, one at step 2
        assert (out / "validation" / f"step-{step:06d}.png").is_file()
        diag = json.loads((out / "validation" / f"step-{step:06d}" / "diagnosis.json").read_text())
        assert len(diag["images"]) == 2
    card = (out / "README.md").read_text()
    assert str(tiny / "tiny-sd") in card and str(tiny / "tiny-llava") in card
    assert "| caption_ce |" in card and "`--rank` | `4`" in card
    _check_lora_loads(tiny, "tiny-sd", out)


def test_flux_qwen2vl_run(tiny, tmp_path):
    out = tmp_path / "flux"
    argv = _argv(tiny, out, "tiny-flux", "tiny-qwen2-vl", "--max_train_steps", "2", "--train_batch_size", "1")
    argv += ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2"]
    assert main(argv) == 0
    assert "flux denoiser" in (out / "README.md").read_text()
    _check_lora_loads(tiny, "tiny-flux", out)


def test_resume_equals_uninterrupted_run_bitwise(tiny, tmp_path):
    """4 steps straight vs a run interrupted after its checkpoint at step 2 and resumed by a new Trainer (new
    models, optimizer, scheduler, stream) with --resume_from_checkpoint latest; a cosine schedule, and the data
    stream crosses an epoch (8 records, 3 per step)."""
    from uno_engine.train.args import parse_args
    from uno_engine.train.loop import Trainer

    common = ["--train_batch_size", "3", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    common += ["--max_train_steps", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_argv(tiny, straight, "tiny-sd", "tiny-llava", *common)) == 0
    interrupted = Trainer.build(parse_args(_argv(tiny, split, "tiny-sd", "tiny-llava", *common)))
    for _ in range(2):
        interrupted.train_step()
    interrupted.save_checkpoint()
    del interrupted
    resumed = ["--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1"]
    assert main(_argv(tiny, split, "tiny-sd", "tiny-llava", *common, *resumed)) == 0
    assert [p.name for p in split.glob("checkpoint-*")] == ["checkpoint-4"]  # the limit removed checkpoint-2
    a = load_file(straight / "checkpoint-4" / "uno_lora.safetensors")
    b = load_file(split / "checkpoint-4" / "uno_lora.safetensors")
    mid = load_file(straight / "checkpoint-2" / "uno_lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert any(not torch.equal(a[k], mid[k]) for k in a), "steps 3-4 must change the LoRA"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: resumed run differs from the uninterrupted one"
    fa = load_file(straight / "pytorch_lora_weights.safetensors")
    fb = load_file(split / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------------------------------- bad input
def _bad_jsonl(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


def _unknown_family(tmp_path):
    """A diffusers pipeline no family takes: an unconditional DDPMPipeline (UNet2DModel)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    return tmp_path / "ddpm"


BAD = {
    "missing pipeline folder": (
        lambda t, tiny: ["--pretrained_model_name_or_path", str(t / "nope")],
        r"--pretrained_model_name_or_path .*nope: folder does not exist",
    ),
    "missing critic folder": (
        lambda t, tiny: ["--critic_model_name_or_path", "./no/such/critic"],
        r"--critic_model_name_or_path ./no/such/critic: folder does not exist",
    ),
    "line not JSON": (
        lambda t, tiny: ["--train_data", str(_bad_jsonl(t, '{"prompt": "a cube"}\n{"prompt": oops}\n'))],
        r"bad\.jsonl:2: not JSON",
    ),
    "line without prompt": (
        lambda t, tiny: ["--train_data", str(_bad_jsonl(t, '{"prompt": "a"}\n\n{"caption": "b"}\n'))],
        r'bad\.jsonl:3: no "prompt"',
    ),
    "caption longer than the context": (
        lambda t, tiny: [
            "--train_data",
            str(_bad_jsonl(t, json.dumps({"prompt": "a", "caption": "cat " * 5000}) + "\n")),
        ],
        r"record 1: the caption has 5000 tokens, longer than the critic's context \(4096 positions",
    ),
    "unknown pipeline family": (
        lambda t, tiny: ["--pretrained_model_name_or_path", str(_unknown_family(t))],
        r"DDPMPipeline with UNet2DModel denoiser is not a supported pipeline family",
    ),
    "instruction without a chat processor": (
        lambda t, tiny: [
            "--critic_model_name_or_path",
            str(tiny / "tiny-qwen2-vl"),
            "--instruction",
            "describe",
        ],
        r"--instruction needs the critic's full processor \(its chat template\), which AutoProcessor could not",
    ),
    "latent view without an adapter": (
        lambda t, tiny: ["--view", "latent"],
        r"--view latent: ValueError: UNOConfig\(view='latent'\) cannot run .*no LatentAdapter is attached",
    ),
    "latent adapter file missing": (
        lambda t, tiny: ["--view", "latent", "--latent_adapter", str(t / "none.safetensors")],
        r"--latent_adapter .*none\.safetensors: ",
    ),
    "tracker not installed": (
        lambda t, tiny: ["--report_to", "wandb"],
        r"--report_to wandb needs `wandb`: pip install wandb",
    ),
    "read views 0": (lambda t, tiny: ["--read_views", "0"], r"--read_views must be >= 1, got 0"),
    "read noise nan": (lambda t, tiny: ["--read_noise", "nan"], r"--read_noise must be a finite number >= 0"),
    "read flags with read off": (
        lambda t, tiny: ["--read", "off", "--read_shift", "0.5"],
        r"--read_shift needs --read default",
    ),
    "missing resume checkpoint": (
        lambda t, tiny: ["--resume_from_checkpoint", str(t / "checkpoint-7")],
        r"--resume_from_checkpoint .*checkpoint-7: no such checkpoint folder",
    ),
}


try:
    import datasets  # noqa: F401
except ImportError:  # the datasets source is optional: without the package, a clear line
    BAD["datasets source without datasets"] = (
        lambda t, tiny: ["--train_data", "some-org/some-prompts"],
        r"--train_data some-org/some-prompts: not a JSONL file, and reading a `datasets` folder or name needs",
    )
try:
    import wandb  # noqa: F401

    del BAD["tracker not installed"]
except ImportError:
    pass


def _replace(argv, extra):
    """argv with the options in `extra` replaced (or added)."""
    argv = list(argv)
    for i in range(0, len(extra), 2):
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i : i + 2]
    return argv


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, tiny, tmp_path, capsys):
    make, pattern = BAD[case]
    argv = _replace(
        _argv(tiny, tmp_path / "out", "tiny-sd", "tiny-llava", "--max_train_steps", "1"), make(tmp_path, tiny)
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [l for l in err if "torchvision" not in l and "Loading" not in l]  # library notices, not ours
    ours = [l for l in err if l.startswith("uno-train: error:")]
    assert len(ours) == 1, err
    import re

    assert re.search(pattern, ours[0]), ours[0]


def test_bad_input_exits_without_traceback(tiny, tmp_path):
    """The installed entry point, as a process: exit status 2, one error line, no traceback."""
    argv = _replace(
        _argv(tiny, tmp_path / "o", "tiny-sd", "tiny-llava"), ["--train_data", str(tmp_path / "none.jsonl")]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "uno_engine.train", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"uno-train: error: --train_data {tmp_path / 'none.jsonl'}: file does not exist"
    )


# ---------------------------------------------------------------------------------------------- reading
def test_read_flags_build_the_steps_reading(tiny, tmp_path):
    """--read default (the default): ReadAugment.default(); --read off: read=None (the processor's exact
    read); --read_* refine the default; --read_scale checks its order; the trainer's step reads that way."""
    from uno_engine import ReadAugment
    from uno_engine.train.args import UsageError, parse_args, read_config
    from uno_engine.train.loop import Trainer

    base = _argv(tiny, tmp_path / "o", "tiny-sd", "tiny-llava", "--max_train_steps", "1")
    assert read_config(parse_args(base)) == "auto"
    assert read_config(parse_args([*base, "--read", "off"])) is None
    more = ["--read_views", "2", "--read_shift", "0.5", "--read_scale", "0.9", "1.1", "--read_noise", "0"]
    want = ReadAugment(views=2, shift=0.5, shift_unit="patch", scale=(0.9, 1.1), noise=0.0)
    assert read_config(parse_args([*base, *more])) == want
    with pytest.raises(UsageError, match="--read_scale must be LO HI with 0 < LO <= HI"):
        parse_args([*base, "--read_scale", "1.2", "0.9"])
    with pytest.raises(UsageError, match="--read_views needs --view pixel"):
        parse_args([*base, "--view", "latent", "--read_views", "2"])
    assert Trainer.build(parse_args(base)).step.config.read == ReadAugment.default()
    assert Trainer.build(parse_args([*base, "--read", "off"])).step.config.read is None


# ------------------------------------------------------------------------------------------- distributed
def first_step(argv) -> dict:
    """Build a Trainer from `argv`, run one step; {"loss", "grads" (full LoRA grads before clipping), "world"}."""
    from uno_engine import distributed as D
    from uno_engine.train.args import parse_args
    from uno_engine.train.loop import Trainer

    trainer = Trainer.build(parse_args(argv))
    grads = {}
    trainer.after_backward = lambda t: grads.update(D.full_grads(t.step.generator))
    metrics = trainer.train_step()
    return {
        "trainer": trainer,
        "loss": metrics["loss"],
        "grads": grads,
        "world": trainer.world,
        "main": trainer.accelerator.is_main_process,
    }


DRIVER = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_train_cli import first_step

run = first_step(sys.argv[2:])
if run["main"]:
    torch.save({{k: v for k, v in run.items() if k != "trainer"}}, sys.argv[1])
run["trainer"].run()  # on to --max_train_steps: a checkpoint and a validation with the sharded critic
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_equal_one(tiny, tmp_path):
    """accelerate launch, 2 gloo processes x 2 accumulated micro-batches of 1 (the critic FSDP2-sharded) == 1
    process x batch 4 (in this process, critic replicated): loss and LoRA gradients of the first step within
    1e-5 (relative). The 2 processes then run on to a checkpoint and a validation (collectives of the sharded
    critic on every rank)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    one = first_step(_argv(tiny, tmp_path / "out1", "tiny-sd", "tiny-llava", "--train_batch_size", "4"))
    dump = tmp_path / "w2.pt"
    argv = _argv(
        tiny, tmp_path / "out2", "tiny-sd", "tiny-llava", "--train_batch_size", "1", "--shard_critic"
    )
    argv += [
        "--gradient_accumulation_steps",
        "2",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--validation_prompts",
        "a red cube",
    ]
    accelerate = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1"
    accelerate += " --mixed_precision no --dynamo_backend no --main_process_port"
    launch = [sys.executable, *accelerate.split(), str(_free_port()), str(driver), str(dump), *argv]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(dump)
    out2 = tmp_path / "out2"
    assert (out2 / "checkpoint-2" / "uno_lora.safetensors").is_file() and (out2 / "README.md").is_file()
    assert (out2 / "validation" / "step-000002.png").is_file()
    assert one["world"] == 1 and two["world"] == 2
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"])
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 0
    num = sum((two["grads"][k] - g).double().norm() ** 2 for k, g in one["grads"].items()) ** 0.5
    den = sum(g.double().norm() ** 2 for g in one["grads"].values()) ** 0.5
    print(
        f"2 processes vs 1: loss rel {abs(two['loss'] - one['loss']) / abs(one['loss']):.2e}, grads rel {float(num / den):.2e}"
    )
    assert den > 0 and num / den <= 1e-5, f"LoRA gradients differ: relative {float(num / den):.2e}"


def test_prompt_cache_reuses_rows_and_evicts(tiny):
    """The cached encoder gives the uncached embeddings (within fp32 noise: rows are encoded one at a time),
    runs the text encoder only for prompts it has not seen, and keeps at most `cache_size` prompts."""
    from diffusers import DiffusionPipeline

    from uno_engine.train.models import PromptEncoder

    pipe = DiffusionPipeline.from_pretrained(tiny / "tiny-sd")
    calls = []
    pipe.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cached = PromptEncoder(pipe, cfg=True, cache_size=2)
    first = cached(["a red cube", "a blue ball"])
    assert calls == [1, 1, 1, 1]  # each prompt alone, and its empty negative
    again = cached(["a blue ball", "a red cube"])
    assert len(calls) == 4, "cached prompts must not run the text encoder"
    assert torch.equal(again["prompt_embeds"], first["prompt_embeds"].flip(0))
    plain = PromptEncoder(pipe, cfg=True, cache_size=0)(["a red cube", "a blue ball"])
    assert plain.keys() == first.keys() == {"prompt_embeds", "negative_prompt_embeds"}
    torch.testing.assert_close(first["prompt_embeds"], plain["prompt_embeds"], rtol=1e-5, atol=1e-6)
    cached(["a green tree"])  # a third prompt: the least recently used ("a blue ball") leaves
    assert list(cached.cache) == ["a red cube", "a green tree"]


def test_datasets_source_reads_the_named_columns(monkeypatch, tmp_path):
    """A `datasets` name (a stand-in module: the package is optional): --prompt_column / --caption_column /
    --dataset_split pick the records; a missing split or column is one UsageError naming the argument."""
    import types

    from uno_engine.train.args import UsageError, parse_args
    from uno_engine.train.data import read_records

    class Split(list):
        column_names = ["text", "target"]

    class DatasetDict(dict):
        pass

    rows = Split([{"text": "a red cube", "target": "a cube"}, {"text": "a blue ball", "target": None}])
    stub = types.ModuleType("datasets")
    stub.DatasetDict = DatasetDict
    stub.load_dataset = lambda name: DatasetDict(train=rows)
    stub.load_from_disk = lambda name: pytest.fail("not a save_to_disk folder")
    monkeypatch.setitem(sys.modules, "datasets", stub)
    base = ["--pretrained_model_name_or_path", "p", "--critic_model_name_or_path", "c", "--output_dir", "o"]
    base += ["--train_data", "org/prompts", "--prompt_column", "text", "--caption_column", "target"]
    records = read_records(parse_args(base))
    assert [(r.prompt, r.caption) for r in records] == [
        ("a red cube", "a cube"),
        ("a blue ball", "a blue ball"),
    ]
    with pytest.raises(UsageError, match=r"--dataset_split 'test': org/prompts has splits \['train'\]"):
        read_records(parse_args([*base, "--dataset_split", "test"]))
    with pytest.raises(UsageError, match=r"--prompt_column 'prompt': org/prompts has columns"):
        read_records(parse_args([*base, "--prompt_column", "prompt"]))


def test_latent_view_with_a_fitted_adapter(tiny, tmp_path):
    """--view latent --latent_adapter: an adapter fitted (2 steps) for this critic and VAE, saved, then a run
    that reads the latents (and checks the adapter against the pair when it loads it)."""
    from uno_engine.generators import DiffusersGenerator
    from uno_engine.latent import fit_latent_adapter
    from uno_engine.train import models
    from uno_engine.train.args import parse_args

    argv = _argv(tiny, tmp_path / "out", "tiny-sd", "tiny-llava", "--max_train_steps", "1")
    args = parse_args(argv)
    critic, _ = models.load_critic(args, torch.float32)
    gen = DiffusersGenerator.from_pipeline(models.load_pipeline(args, torch.float32), height=32, width=32)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    adapter = fit_latent_adapter(critic, gen, images, steps=2, batch_size=2, progress=False)
    adapter.save(tmp_path / "adapter.safetensors")
    assert main([*argv, "--view", "latent", "--latent_adapter", str(tmp_path / "adapter.safetensors")]) == 0
    assert "`--view` | `latent`" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_reference_images_feed_the_joint_and_regression_terms(tiny, tmp_path):
    """JSONL records with "image" (paths relative to the file) and "negatives": the generator's own loss, the
    density head and the hard negatives all get their inputs; the step's metrics name each term."""
    import numpy as np
    from PIL import Image

    from uno_engine.train.args import UsageError, parse_args
    from uno_engine.train.loop import Trainer

    (tmp_path / "refs").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, prompt in enumerate(["a red cube", "a blue ball", "two green star"]):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / "refs" / f"{i}.png"
        )
        lines.append({"prompt": prompt, "image": f"refs/{i}.png", "negatives": ["a yellow square"]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = _replace(_argv(tiny, tmp_path / "out", "tiny-sd", "tiny-llava"), ["--train_data", str(data)])
    argv += ["--generator_loss_weight", "0.5", "--density_weight", "0.5", "--negatives_weight", "0.5"]
    argv += ["--train_batch_size", "3"]
    metrics = Trainer.build(parse_args(argv)).train_step()
    assert {"caption_ce", "density", "generator_loss", "negatives", "loss"} <= set(metrics), metrics
    lines[1].pop("image")
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(UsageError, match=r'record 2 differs from record 1 in having an "image"'):
        Trainer.build(parse_args(argv))
