"""LoRA, the default way to train a diffusers denoiser with UNO: peft adapters added with diffusers'
`denoiser.add_adapter(LoraConfig(...))` are the only trainable parameters of the step; saved and loaded with
diffusers' own LoRA functions. Tiny SD UNet + VAE generator, tiny LLaVA critic (random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from doc_snippets import python_block
from peft import LoraConfig  # a test extra (pyproject [test]); the engine itself does not import peft
from peft.utils import get_peft_model_state_dict

from uno_engine import Critic, UNOLoss, UNOStep
from uno_engine.testing.presets import caption_vocab_size
from uno_engine.testing.presets.critics import build_critic_model
from uno_engine.testing.presets.generators import build_generator

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers' LoRA scripts do


@pytest.fixture(scope="module")
def critic():
    model, processor = build_critic_model("tiny-llava-clip")
    return Critic.from_hf(model, processor)


def _generator_and_batch(critic):
    gen, make_batch = build_generator("tiny-sd", num_inference_steps=2)
    vocab = caption_vocab_size(critic.hf_model)
    batch = make_batch(1, 6, vocab, generator=torch.Generator().manual_seed(0))
    return gen, batch


def _add_lora(denoiser, seed=1, b_scale=0.0, **kw):
    """Freeze the denoiser, add a LoRA adapter ("gaussian": A random, B = 0), fp32 adapter weights."""
    denoiser.requires_grad_(False)
    torch.manual_seed(seed)
    denoiser.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS, **kw)
    )
    cast_training_params(denoiser, dtype=torch.float32)  # diffusers' way to keep trainable weights in fp32
    if b_scale:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in denoiser.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    return [p for p in denoiser.parameters() if p.requires_grad]


def test_adapter_gradients_are_the_merged_weight_gradient_projected(critic):
    """With B = 0 the adapted denoiser computes the same step, and for each adapted linear W + s B A the
    gradient of B is s (dL/dW) A^T, where dL/dW comes from a separate step that trains the plain weight W
    (no adapter). A gets no gradient while B = 0 (dL/dA = s B^T dL/dW). Nothing else gets a gradient: not
    the denoiser's base weights, not the VAE, not the critic."""
    gen, batch = _generator_and_batch(critic)
    batch["read_step"] = 0  # both calls below read the same views (the default reading draws per step)
    den = gen.denoiser
    linears = {n: m for n, m in den.named_modules() if n.endswith(tuple(TARGETS))}
    assert len(linears) == 32
    den.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    step = UNOStep(gen, critic, UNOLoss(caption=1.0))
    ref = step(batch).loss
    d_w = torch.autograd.grad(ref, [m.weight for m in linears.values()])

    adapters = _add_lora(den)
    assert len(adapters) == 2 * len(linears)
    out = step(batch)
    assert torch.equal(out.loss, ref)  # B = 0: the adapted step is the plain one
    out.loss.backward()
    for (name, _), g in zip(linears.items(), d_w, strict=True):
        layer = den.get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = layer.scaling["default"] * g @ a.detach().T
        assert expected.abs().max() > 0
        torch.testing.assert_close(b.grad, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
        assert a.grad is not None and not a.grad.any()
    trained = {id(p) for p in adapters}
    others = [n for n, p in gen.named_parameters() if id(p) not in trained and p.grad is not None]
    assert not others, f"base weights got gradients: {others[:3]}"
    assert all(p.grad is None for p in critic.parameters())
    assert {id(p) for p in gen.trainable_parameters()} == trained


def test_bf16_base_with_fp32_adapters(critic):
    """A bf16 denoiser with fp32 adapters (CPU bf16 kernels: the UNet's convs, attention, norms) gives the
    fp32 model's loss within 1e-3 and its adapter gradients within 5% (cosine > 0.999); gradients stay fp32
    and the bf16 base weights get none."""
    gen32, batch = _generator_and_batch(critic)
    gen16 = copy.deepcopy(gen32)
    gen16.denoiser.to(torch.bfloat16)
    results = {}
    for name, gen in (("fp32", gen32), ("bf16", gen16)):
        adapters = _add_lora(gen.denoiser, b_scale=0.05)
        assert {p.dtype for p in adapters} == {torch.float32}
        out = UNOStep(gen, critic, UNOLoss(caption=1.0))(batch)
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters)
        results[name] = (out.loss.detach(), torch.cat([p.grad.flatten() for p in adapters]))
    base16 = [p for n, p in gen16.denoiser.named_parameters() if "lora" not in n]
    assert {p.dtype for p in base16} == {torch.bfloat16} and all(p.grad is None for p in base16)
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert abs(float(l16 - l32)) <= 1e-3 * abs(float(l32))
    assert float((g16 - g32).norm() / g32.norm()) < 0.05
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.999


def test_adapters_save_and_load_with_diffusers(critic, tmp_path):
    """Train the adapters one step (B random, so A and B both move), save them with
    `StableDiffusionPipeline.save_lora_weights` (the LoraConfig as metadata, so lora_alpha survives), load
    them into a fresh copy of the base UNet with `lora_state_dict` + `load_lora_into_unet`: the same adapter
    weights and the same UNet output."""
    gen, batch = _generator_and_batch(critic)
    den = gen.denoiser
    fresh = copy.deepcopy(den)  # the base weights, no adapter
    adapters = _add_lora(den, b_scale=0.05)
    before = [p.detach().clone() for p in adapters]
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    UNOStep(gen, critic, UNOLoss(caption=1.0))(batch).loss.backward()
    opt.step()
    assert all((p - q).abs().max() > 1e-3 for p, q in zip(adapters, before, strict=True)), (
        "every adapter moved"
    )

    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(den))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=lora, unet_lora_adapter_metadata=den.peft_config["default"].to_dict()
    )
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(
        state, alphas, unet=fresh, adapter_name="uno", metadata=metadata
    )

    saved = get_peft_model_state_dict(den)
    loaded = get_peft_model_state_dict(fresh, adapter_name="uno")
    assert saved.keys() == loaded.keys() and len(saved) == 64
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    x = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(3))
    t, emb = torch.tensor([500.0]), batch["prompt_embeds"]
    with torch.no_grad():
        y = den(x, t, emb).sample
        assert torch.equal(fresh(x, t, emb).sample, y)
        fresh.disable_adapters()
        assert (fresh(x, t, emb).sample - y).abs().max() > 1e-4  # the adapter matters: not a vacuous check


def _docs_lora_block() -> str:
    return python_block("docs/usage.md", "## LoRA (the default way to train a denoiser)")


def test_docs_lora_block_runs(critic, tmp_path):
    """The LoRA block of docs/usage.md as written: only the adapters change, and what it saves loads back into
    the base UNet with diffusers' loader (the saved adapter, lora_alpha included: the same output)."""
    from uno_engine import UNOConfig
    from uno_engine.generators import DiffusersGenerator

    gen, batch = _generator_and_batch(critic)
    unet = gen.denoiser
    base = copy.deepcopy(unet)
    code = _docs_lora_block()
    assert "add_adapter" in code and "save_lora_weights" in code
    namespace = dict(
        torch=torch,
        unet=unet,
        scheduler=gen.scheduler,
        vae=gen.vae,
        critic=critic,
        loader=[batch],
        lora_dir=tmp_path,
        DiffusersGenerator=DiffusersGenerator,
        UNOStep=UNOStep,
        UNOLoss=UNOLoss,
        UNOConfig=UNOConfig,
    )
    exec(compile(code, "docs/usage.md", "exec"), namespace)  # noqa: S102
    for name, p in unet.named_parameters():
        if "lora" not in name:
            assert torch.equal(p, base.get_parameter(name.replace(".base_layer", ""))), name
    assert namespace["opt"].param_groups[0]["params"] and all(
        "lora" in n for n, p in unet.named_parameters() if p.requires_grad
    )
    assert all(p.any() for n, p in unet.named_parameters() if "lora_B" in n), "the step trained every adapter"
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=base, metadata=metadata)
    x, t = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(4)), torch.tensor([300.0])
    with torch.no_grad():
        assert torch.equal(
            base(x, t, batch["prompt_embeds"]).sample, unet(x, t, batch["prompt_embeds"]).sample
        )
