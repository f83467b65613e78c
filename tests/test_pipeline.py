"""Generators built from diffusers pipelines, checked against the pipelines themselves.

Sampler parity: every family's own diffusers pipeline, with the deterministic scheduler the generator follows
(DDIM eta=0 for the DDPM-family models, FlowMatchEulerDiscreteScheduler for flow models), the same initial
noise, the same steps, guidance off, `output_type="latent"`: the pipeline's final latents equal
`DiffusersGenerator.sample_latents` within 1e-4 relative. The pipeline is an independent implementation of
the loop (its own scheduler.step, packing, position ids, timestep scaling, latent normalization), so this
checks each family adapter end to end. Prompt encoding: `encode_prompts` against the pipeline's
`encode_prompt` called directly, with tiny CLIP / T5 text encoders (random weights) and word-level
tokenizers built in-process.
"""

from __future__ import annotations

import pytest
import torch

from uno_engine.generators import DiffusersGenerator, encode_prompts, from_pipeline
from uno_engine.generators.families.base import pack_2x2, unpack_2x2
from uno_engine.testing.presets.generators import build_generator


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# preset -> (pipeline class, its denoiser argument, components left None (no text encoders))
_TEXT_PARTS = ("text_encoder", "tokenizer")
_PIPELINES = {
    "tiny-sd": ("StableDiffusionPipeline", "unet", (*_TEXT_PARTS, "safety_checker", "feature_extractor")),
    "tiny-sdxl": ("StableDiffusionXLPipeline", "unet", (*_TEXT_PARTS, "text_encoder_2", "tokenizer_2")),
    "tiny-sd3": (
        "StableDiffusion3Pipeline",
        "transformer",
        (*_TEXT_PARTS, "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
    ),
    "tiny-flux": ("FluxPipeline", "transformer", (*_TEXT_PARTS, "text_encoder_2", "tokenizer_2")),
    "tiny-flux2": ("Flux2KleinPipeline", "transformer", _TEXT_PARTS),
    "tiny-qwen-image": ("QwenImagePipeline", "transformer", _TEXT_PARTS),
    "tiny-sana": ("SanaPipeline", "transformer", _TEXT_PARTS),
    "tiny-pixart": ("PixArtSigmaPipeline", "transformer", _TEXT_PARTS),
}


def _pipeline(name, gen):
    """The family's own pipeline around the generator's modules (no text encoders), with a fresh scheduler
    of the same config."""
    import diffusers as d

    cls, denoiser_arg, absent = _PIPELINES[name]
    extra = {"requires_safety_checker": False} if name == "tiny-sd" else {}
    return getattr(d, cls)(
        vae=gen.vae,
        scheduler=type(gen.scheduler).from_config(gen.scheduler.config),
        **{denoiser_arg: gen.denoiser},
        **dict.fromkeys(absent),
        **extra,
    )


def _rel(ours, theirs) -> float:
    """||ours - theirs|| / ||theirs||, in float64."""
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


PARITY = list(_PIPELINES)


@pytest.mark.parametrize("name", PARITY)
def test_sampler_matches_the_pipeline(name):
    gen, make_batch = build_generator(name, num_inference_steps=4)
    batch = make_batch(2, 4, 50, generator=torch.Generator().manual_seed(0))
    h, w = gen.latent_size
    noise = torch.randn(2, gen.latent_channels, h, w, generator=torch.Generator().manual_seed(1))
    ours = gen.sample_latents(batch, noise=noise)
    other = gen.sample_latents(batch, noise=noise.flip(0))
    assert (other - ours).abs().max() > 1e-3, "the final latents must depend on the noise"

    pipe = _pipeline(name, gen)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(
        height=gen.height,
        width=gen.width,
        num_inference_steps=4,
        output_type="latent",
        return_dict=False,
        prompt_embeds=batch["prompt_embeds"],
    )
    latents = noise
    if name in ("tiny-flux", "tiny-qwen-image"):
        latents = pack_2x2(noise)  # these pipelines take and return packed latents
    kw["latents"] = latents
    if "pooled_prompt_embeds" in batch:
        kw["pooled_prompt_embeds"] = batch["pooled_prompt_embeds"]
    if name == "tiny-qwen-image":
        kw["prompt_embeds_mask"] = batch["prompt_embeds_mask"]
    if name in ("tiny-sana", "tiny-pixart"):
        kw["prompt_attention_mask"] = batch["prompt_attention_mask"]
        kw["use_resolution_binning"] = False
    if name == "tiny-flux":
        kw["guidance_scale"] = 3.5  # the embedded (distilled) guidance, not CFG: same value as the generator
    elif name == "tiny-qwen-image":
        kw["true_cfg_scale"] = 1.0  # its CFG knob (guidance_scale is for guidance-distilled checkpoints)
    else:
        kw["guidance_scale"] = 1.0
    with torch.no_grad():
        out = pipe(**kw)[0]
    if name in ("tiny-flux", "tiny-qwen-image"):
        out = unpack_2x2(out, h, w)
    if (
        name == "tiny-flux2"
    ):  # the pipeline returns VAE latents: de-normalize and unpatchify ours the same way
        fam = gen.family
        mean, std = fam._bn(gen.vae, ours)
        ours = pipe._unpatchify_latents(ours * std + mean)
    assert out.shape == ours.shape, (out.shape, ours.shape)
    rel = _rel(ours, out)
    print(f"{name}: relative difference to the pipeline {rel:.2e}")
    assert rel < 1e-4, f"{name}: generator latents differ from the pipeline's by {rel:.2e} (relative)"


# --------------------------------------------------------------------------------------------- prompts
WORDS = "a red blue cube ball on the table under sky photo of cat dog".split()


def _tokenizer(max_len: int):
    """A word-level fast tokenizer built in-process (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="<eos>",
        model_max_length=max_len,
    )


def _clip(hidden: int, *, seed=0, layers=1, projection_dim=None):
    """A tiny CLIP text encoder on the `WORDS` vocabulary (with `projection_dim`: CLIPTextModelWithProjection,
    SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=8,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(cfg).eval()


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    cfg = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _ids(tok, prompts, n):
    return tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


def test_encode_prompts_sd_and_from_pipeline():
    import diffusers as d

    gen, make_batch = build_generator("tiny-sd", num_inference_steps=4)
    tok, clip = _tokenizer(8), _clip(32)
    pipe = d.StableDiffusionPipeline(
        vae=gen.vae,
        text_encoder=clip,
        tokenizer=tok,
        unet=gen.denoiser,
        scheduler=gen.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    prompts, negs = ["a red cube on the table", "photo of a cat"], ["blue sky", "dog"]
    batch = encode_prompts(pipe, prompts, negative_prompts=negs)
    assert set(batch) == {"prompt_embeds", "negative_prompt_embeds"}
    with torch.no_grad():  # independent: the CLIP text model's last hidden state on the padded ids
        want = clip(_ids(tok, prompts, 8))[0]
        want_neg = clip(_ids(tok, negs, 8))[0]
    torch.testing.assert_close(batch["prompt_embeds"], want)
    torch.testing.assert_close(batch["negative_prompt_embeds"], want_neg)
    assert not batch["prompt_embeds"].requires_grad and not any(p.requires_grad for p in clip.parameters())

    g = from_pipeline(pipe, num_inference_steps=4, height=32, width=32)
    assert g.denoiser is pipe.unet and g.vae is pipe.vae and g.scheduler is not pipe.scheduler
    assert g.kind == "sd" and g.scheduler.config == pipe.scheduler.config
    images = g(batch | {"seed": 0})
    assert images.shape == (2, 3, 32, 32)
    images.mean().backward()
    assert all(p.grad is not None for p in g.trainable_parameters())
    assert all(p.grad is None for p in clip.parameters())
    # CFG uses the negative embeddings the helper returned
    cfg = DiffusersGenerator.from_pipeline(
        pipe, num_inference_steps=4, height=32, width=32, guidance_scale=3.0
    )
    assert not torch.equal(cfg(batch | {"seed": 0}), images)


def test_encode_prompts_flux_clip_and_t5():
    import diffusers as d

    gen, _ = build_generator("tiny-flux", num_inference_steps=4)
    tok, tok2, clip, t5 = _tokenizer(8), _tokenizer(8), _clip(24), _t5(32)
    pipe = d.FluxPipeline(
        scheduler=gen.scheduler,
        vae=gen.vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=gen.denoiser,
    )
    prompts = ["a red cube on the table", "photo of a cat"]
    batch = encode_prompts(pipe, prompts, negative_prompts="blue sky", max_sequence_length=8)
    assert set(batch) == {
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    with torch.no_grad():
        pooled = clip(_ids(tok, prompts, 8)).pooler_output
        states = t5(_ids(tok2, prompts, 8))[0]
        neg_states = t5(_ids(tok2, ["blue sky"] * 2, 8))[0]
    torch.testing.assert_close(batch["pooled_prompt_embeds"], pooled)
    torch.testing.assert_close(batch["prompt_embeds"], states)
    torch.testing.assert_close(batch["negative_prompt_embeds"], neg_states)
    g = from_pipeline(pipe, num_inference_steps=4, height=32, width=32)
    assert g.kind == "flux" and g(batch | {"seed": 0}).shape == (2, 3, 32, 32)


def test_pipeline_errors():
    import diffusers as d

    gen, _ = build_generator("tiny-sd3", num_inference_steps=4)
    pipe = d.StableDiffusion3Pipeline(
        transformer=gen.denoiser,
        scheduler=gen.scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline has no VAE"):
        from_pipeline(pipe)
    with pytest.raises(ValueError, match="vae is None"):
        DiffusersGenerator(gen.denoiser, gen.scheduler, None)
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(pipe, [])


def test_from_pipeline_with_its_default_scheduler():
    """SDXL's pipelines ship EulerDiscreteScheduler: the generator takes a copy (the pipeline's is left as it
    was), reads its grid and abar table, and runs DDIM on them."""
    import diffusers as d

    gen, make_batch = build_generator("tiny-sdxl", num_inference_steps=4)
    euler = d.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = d.StableDiffusionXLPipeline(
        vae=gen.vae,
        unet=gen.denoiser,
        scheduler=euler,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
    )
    before = euler.timesteps.clone()
    g = from_pipeline(pipe, num_inference_steps=5, height=32, width=48)
    assert torch.equal(euler.timesteps, before), "the pipeline's own scheduler must not be changed"
    euler.set_timesteps(5)
    assert g._timesteps == [float(t) for t in euler.timesteps]
    abar = euler.alphas_cumprod.double()
    assert g._alphas[:5] == pytest.approx([float(abar[int(t)].sqrt()) for t in euler.timesteps], rel=1e-12)
    assert g(make_batch(2, 4, 50, generator=torch.Generator().manual_seed(0))).shape == (2, 3, 32, 48)


def test_encode_prompts_sdxl_two_clips():
    """SDXL: token states = both CLIPs' penultimate layers concatenated; pooled = the second CLIP's
    projected embedding; with negatives, the same for the negative prompts."""
    import diffusers as d

    gen, _ = build_generator("tiny-sdxl", num_inference_steps=4)
    tok, tok2, clip = _tokenizer(8), _tokenizer(8), _clip(16)
    clip2 = _clip(16, seed=2, layers=2, projection_dim=16)
    pipe = d.StableDiffusionXLPipeline(
        vae=gen.vae,
        unet=gen.denoiser,
        scheduler=gen.scheduler,
        text_encoder=clip,
        text_encoder_2=clip2,
        tokenizer=tok,
        tokenizer_2=tok2,
    )
    prompts, negs = ["a red cube", "photo of a dog"], ["sky", "the ball"]
    batch = encode_prompts(pipe, prompts, negative_prompts=negs)
    assert set(batch) == {
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    with torch.no_grad():
        for pos, text in (("", prompts), ("negative_", negs)):
            ids = _ids(tok, text, 8)
            h1 = clip(ids, output_hidden_states=True).hidden_states[-2]
            out2 = clip2(_ids(tok2, text, 8), output_hidden_states=True)
            torch.testing.assert_close(
                batch[pos + "prompt_embeds"], torch.cat([h1, out2.hidden_states[-2]], -1)
            )
            torch.testing.assert_close(batch[pos + "pooled_prompt_embeds"], out2.text_embeds)
    g = from_pipeline(pipe, num_inference_steps=4, height=32, width=48, guidance_scale=2.0)
    assert g(batch | {"seed": 0}).shape == (2, 3, 32, 48)


def test_qwen_image_true_cfg_matches_the_pipeline():
    """Qwen-Image's CFG is the pipeline's "true CFG" (guided prediction rescaled per token to the
    conditional prediction's norm): with negatives and true_cfg_scale = guidance_scale = 2.5, the final latents
    match."""
    gen, make_batch = build_generator("tiny-qwen-image", num_inference_steps=3, guidance_scale=2.5)
    batch = make_batch(2, 4, 50, generator=torch.Generator().manual_seed(0))
    batch["negative_prompt_embeds"] = torch.randn(
        batch["prompt_embeds"].shape, generator=torch.Generator().manual_seed(5)
    )
    batch["negative_prompt_embeds_mask"] = batch["prompt_embeds_mask"].flip(0)
    h, w = gen.latent_size
    noise = torch.randn(2, gen.latent_channels, h, w, generator=torch.Generator().manual_seed(1))
    ours = gen.sample_latents(batch, noise=noise)
    pipe = _pipeline("tiny-qwen-image", gen)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            height=gen.height,
            width=gen.width,
            num_inference_steps=3,
            output_type="latent",
            return_dict=False,
            latents=pack_2x2(noise),
            true_cfg_scale=2.5,
            **{k: v for k, v in batch.items() if "prompt" in k},
        )[0]
    rel = _rel(ours, unpack_2x2(out, h, w))
    assert rel < 1e-4, f"relative difference {rel:.2e}"
    plain = gen.sample_latents(batch | {"negative_prompt_embeds": batch["prompt_embeds"]}, noise=noise)
    assert (plain - ours).abs().max() > 1e-3
