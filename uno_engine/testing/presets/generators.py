"""Generator presets: real diffusers classes with random weights, nothing downloaded.

`build_generator(name, *, device="cpu", dtype=torch.float32, **overrides) -> (generator, make_batch)`

| name          | denoiser + VAE + scheduler                                     | H x W       | (S, D)      |
|---------------|----------------------------------------------------------------|-------------|-------------|
| "tiny-sd"     | tiny UNet2DConditionModel + AutoencoderKL (f8) + DDIM (eps)    | 64 x 48     | (12, 32)    |
| "tiny-sana"   | tiny SanaTransformer2DModel + AutoencoderDC (f4) + FlowMatch   | 64 x 64     | (12, 32)    |
| "tiny-pixart" | tiny PixArtTransformer2DModel (learned sigma) + AutoencoderKL  | 64 x 64     | (12, 32)    |
| "sd15"        | SD-1.5 UNet + VAE shapes, DDIM scaled_linear, 20 steps         | 512 x 512   | (77, 768)   |
| "sana-0.6b"   | Sana_600M_1024px DiT + DC-AE f32c32, FlowMatch shift 3, 20 st. | 1024 x 1024 | (300, 2304) |
| "tiny-sdxl"   | tiny SDXL UNet (text_time) + KL f4 + DDIM; pooled (16,)        | 32 x 48     | (10, 32)    |
| "tiny-sd3"    | tiny SD3Transformer2DModel (dual attn, qk-norm) + KL16-style   | 32 x 48     | (10, 32)    |
| "tiny-flux"   | tiny FluxTransformer2DModel (guidance embeds) + KL, dyn. shift | 32 x 48     | (10, 32)    |
| "tiny-flux2"  | tiny Flux2Transformer2DModel + AutoencoderKLFlux2 (bn stats)   | 32 x 48     | (10, 32)    |
| "tiny-qwen-image" | tiny QwenImageTransformer2DModel + AutoencoderKLQwenImage  | 32 x 48     | (10, 32)    |
| "sdxl"        | SDXL-base UNet (2.57B) + VAE, DDIM, 20 steps; pooled (1280,)   | 1024 x 1024 | (77, 2048)  |
| "sd3.5-medium"| SD3.5-Medium MMDiT-X (2.24B) + 16-ch VAE, FlowMatch shift 3    | 1024 x 1024 | (333, 4096) |
| "flux.1-dev"  | FLUX.1-dev (11.9B) + 16-ch VAE, dynamic shift, 28 steps        | 1024 x 1024 | (512, 4096) |
| "flux.2-klein-4b" | FLUX.2-Klein-4B (3.88B) + FLUX.2 VAE, 4 steps              | 1024 x 1024 | (512, 7680) |
| "qwen-image"  | Qwen-Image (20.4B) + Qwen-Image VAE, 30 steps                  | 1024 x 1024 | (128, 3584) |

(S, D): the text-encoder states the batch carries as "prompt_embeds" (CLIP-L for SD-1.5, Gemma-2-2B for Sana,
CLIP-L + bigG for SDXL, CLIPs + T5-XXL for SD3.5, T5-XXL for FLUX.1, three Qwen3-4B layers for FLUX.2-Klein,
Qwen2.5-VL-7B for Qwen-Image). SDXL, SD3.5 and FLUX.1 batches also carry "pooled_prompt_embeds" (B, P);
Qwen-Image batches "prompt_embeds_mask" (B, S).

Real shapes are built under `with torch.device(device)` directly in `dtype`, so a GPU build takes seconds.
The tiny ones run a training step in well under a second on a CPU. `overrides` go to DiffusersGenerator
(e.g. height=512, width=512 for Sana at 512 px; num_inference_steps; k_grad_steps; grad_window).

make_batch(batch_size, caption_len, vocab_size, *, generator=None) -> dict, random but seeded by `generator`
(a CPU torch.Generator; default: torch's global RNG):
  "captions": (B, caption_len) int64 in [1, vocab_size); "caption_mask": (B, caption_len) int64, right padded,
  at least half of each row real; "prompt_embeds": (B, S, D) in the generator's dtype on its device;
  "prompt_attention_mask": (B, S) int64 (DiTs only); "seed": an int that fixes the sampling noise and the
  drawn step.

Janus generators are `JanusGenerator(model)` on a critic preset's model (uno_engine.testing.presets.critics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from uno_engine.generators import DiffusersGenerator

TINY = (
    "tiny-sd",
    "tiny-sana",
    "tiny-pixart",
    "tiny-sdxl",
    "tiny-sd3",
    "tiny-flux",
    "tiny-flux2",
    "tiny-qwen-image",
)
REAL = ("sd15", "sana-0.6b", "sdxl", "sd3.5-medium", "flux.1-dev", "flux.2-klein-4b", "qwen-image")
NAMES = TINY + REAL


# --------------------------------------------------------------------------------------- shared parts
def _tiny_unet(cross_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _tiny_vae_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _tiny_vae_kl16(cls_name: str = "AutoencoderKL", **kw):
    """The 2026 families' tiny KL VAE: 3 stages (factor 4), 4 latent channels; `cls_name` a diffusers KL
    class with AutoencoderKL's arguments (AutoencoderKLFlux2)."""
    import diffusers

    return getattr(diffusers, cls_name)(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **kw,
    )


def _real_vae_kl(latent_channels: int, sample_size: int, scaling_factor: float, **kw):
    """The SD-1.5 / SDXL / SD3 / FLUX.1 KL VAE (4 stages, 128-512 channels); checkpoints' vae/config.json."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **kw,
    )


def _kl16(scaling: float, shift: float):
    """The SD3 / FLUX.1 16-channel VAE (no quant convs)."""
    return _real_vae_kl(
        16, 1024, scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False
    )


def _dc_ae(
    *, latent_channels, attention_head_dim, block_types, channels, encoder_layers, decoder_layers, **kw
):
    """SANA's DC-AE (AutoencoderDC); the EfficientViT stages get multi-scale (5) attention."""
    from diffusers import AutoencoderDC

    multiscales = tuple((5,) if b == "EfficientViTBlock" else () for b in block_types)
    return AutoencoderDC(
        latent_channels=latent_channels,
        attention_head_dim=attention_head_dim,
        encoder_block_types=block_types,
        decoder_block_types=block_types,
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        encoder_layers_per_block=encoder_layers,
        decoder_layers_per_block=decoder_layers,
        encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
        **kw,
    )


def _ddim(**kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        **kw,
    )


def _flow(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _flow_dynamic(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **kw)


# Qwen-Image's scheduler config (exponential time shift, terminal shift)
_QWEN_IMAGE_FLOW = dict(
    shift=1.0, max_image_seq_len=8192, max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential"
)


# ----------------------------------------------------------------------- builders: (denoiser, vae, scheduler)
# Each returns (denoiser, vae, make_scheduler), denoiser built first; `_PRESETS` pairs it with the rest.
def _tiny_sd():
    return _tiny_unet(32), _tiny_vae_kl(), _ddim


def _tiny_sana():
    from diffusers import SanaTransformer2DModel

    dit = SanaTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=16,
        patch_size=1,
    )
    vae = _dc_ae(
        in_channels=3,
        latent_channels=8,
        attention_head_dim=8,
        block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        channels=(8, 16, 16),
        encoder_layers=(1, 1, 1),
        decoder_layers=(1, 1, 1),
    )
    return dit, vae, _flow


def _tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    dit = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=8,
        patch_size=2,
        norm_num_groups=8,
    )
    return dit, _tiny_vae_kl(), _ddim


# the 2026 families. Tiny: 1-2 layers, a few channels, 32-48 px; a VAE with 3 stages (factor 4).
def _tiny_sdxl():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        use_linear_projection=True,
    )
    return unet, _tiny_vae_kl16(scaling_factor=0.13025), _ddim


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    dit = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _tiny_vae_kl16(
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    return dit, vae, _flow


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    dit = FluxTransformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    vae = _tiny_vae_kl16(
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )
    return dit, vae, _flow_dynamic(shift=3.0)


def _tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    dit = Flux2Transformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    )
    vae = _tiny_vae_kl16("AutoencoderKLFlux2")
    with torch.no_grad():  # non-trivial batch-norm statistics, so the normalization is exercised
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    return dit, vae, _flow_dynamic(shift=3.0)


def _tiny_qwen_image():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    dit = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 1.2, 2.0],
    )
    return dit, vae, _flow_dynamic(**_QWEN_IMAGE_FLOW)


# Real shapes: the checkpoints' configs.
def _real_sd15():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return unet, _real_vae_kl(4, 512, 0.18215), _ddim


def _real_sana_600m():
    from diffusers import SanaTransformer2DModel

    dit = SanaTransformer2DModel(  # Efficient-Large-Model/Sana_600M_1024px_diffusers transformer config
        in_channels=32,
        out_channels=32,
        num_attention_heads=36,
        attention_head_dim=32,
        num_layers=28,
        num_cross_attention_heads=16,
        cross_attention_head_dim=72,
        cross_attention_dim=1152,
        caption_channels=2304,
        mlp_ratio=2.5,
        sample_size=32,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = _dc_ae(  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers
        latent_channels=32,
        attention_head_dim=32,
        block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers=(2, 2, 2, 3, 3, 3),
        decoder_layers=(3, 3, 3, 3, 3, 3),
    )
    return dit, vae, _flow


def _real_sdxl():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    )
    return unet, _real_vae_kl(4, 1024, 0.13025), _ddim


def _real_sd35_medium():
    from diffusers import SD3Transformer2DModel

    dit = SD3Transformer2DModel(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )
    return dit, _kl16(1.5305, 0.0609), _flow


def _real_flux1_dev():
    from diffusers import FluxTransformer2DModel

    dit = FluxTransformer2DModel(  # black-forest-labs/FLUX.1-dev transformer/config.json
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return dit, _kl16(0.3611, 0.1159), _flow_dynamic(shift=3.0)


def _real_flux2_klein_4b():
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    # black-forest-labs/FLUX.2-klein-4B: 5 double + 20 single blocks, 3072 wide
    dit = Flux2Transformer2DModel(
        in_channels=128,
        num_layers=5,
        num_single_layers=20,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=7680,  # Qwen3-4B hidden states of layers (9, 18, 27), 3 x 2560
        guidance_embeds=False,
        axes_dims_rope=(32, 32, 32, 32),
    )
    vae = AutoencoderKLFlux2()  # the FLUX.2 VAE: 32 latent channels, 2x2 patchified to 128
    return dit, vae, _flow_dynamic(shift=3.0)


def _real_qwen_image():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    dit = QwenImageTransformer2DModel(  # Qwen/Qwen-Image transformer/config.json
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    )
    vae = AutoencoderKLQwenImage()  # defaults = the Qwen-Image VAE (z_dim 16, per-channel mean / std)
    return dit, vae, _flow_dynamic(**_QWEN_IMAGE_FLOW)


# ---------------------------------------------------------------------------------------------- the table
# name -> (builder, DiffusersGenerator defaults, (S, D) of "prompt_embeds", further batch keys {key: trailing
# shape}: pooled embeds (P,), masks ("S",))
_MASK = {"prompt_attention_mask": ("S",)}
_TINY_2026 = dict(num_inference_steps=8, height=32, width=48)
_PRESETS = {
    "tiny-sd": (_tiny_sd, dict(num_inference_steps=8, height=64, width=48), (12, 32), {}),
    "tiny-sana": (_tiny_sana, dict(num_inference_steps=8), (12, 32), _MASK),
    "tiny-pixart": (_tiny_pixart, dict(num_inference_steps=8), (12, 32), _MASK),
    "tiny-sdxl": (_tiny_sdxl, _TINY_2026, (10, 32), {"pooled_prompt_embeds": (16,)}),
    "tiny-sd3": (_tiny_sd3, _TINY_2026, (10, 32), {"pooled_prompt_embeds": (24,)}),
    "tiny-flux": (_tiny_flux, _TINY_2026, (10, 32), {"pooled_prompt_embeds": (24,)}),
    "tiny-flux2": (_tiny_flux2, _TINY_2026, (10, 32), {}),
    "tiny-qwen-image": (_tiny_qwen_image, _TINY_2026, (10, 32), {"prompt_embeds_mask": ("S",)}),
    "sd15": (_real_sd15, dict(num_inference_steps=20), (77, 768), {}),
    "sana-0.6b": (_real_sana_600m, dict(num_inference_steps=20), (300, 2304), _MASK),
    "sdxl": (_real_sdxl, dict(num_inference_steps=20), (77, 2048), {"pooled_prompt_embeds": (1280,)}),
    # S = 77 CLIP tokens + 256 T5 tokens
    "sd3.5-medium": (
        _real_sd35_medium,
        dict(num_inference_steps=28),
        (333, 4096),
        {"pooled_prompt_embeds": (2048,)},
    ),
    "flux.1-dev": (
        _real_flux1_dev,
        dict(num_inference_steps=28, height=1024, width=1024),
        (512, 4096),
        {"pooled_prompt_embeds": (768,)},
    ),
    "flux.2-klein-4b": (
        _real_flux2_klein_4b,
        dict(num_inference_steps=4, height=1024, width=1024),
        (512, 7680),
        {},
    ),
    "qwen-image": (
        _real_qwen_image,
        dict(num_inference_steps=30, height=1024, width=1024),
        (128, 3584),
        {"prompt_embeds_mask": ("S",)},
    ),
}
assert set(_PRESETS) == set(NAMES)


def _build_modules(name: str):
    """(denoiser, vae, make_scheduler, defaults, (S, D), extras) for a preset name; extras: a dict {batch
    key: trailing shape} of further conditioning. The scheduler is made outside the device context: its
    tables must stay on the CPU (they are read once, at construction)."""
    if name not in _PRESETS:
        raise ValueError(f"build_generator: unknown name {name!r}; known: {', '.join(NAMES)}")
    build, defaults, sd, extras = _PRESETS[name]
    denoiser, vae, make_scheduler = build()
    return denoiser, vae, make_scheduler, dict(defaults), sd, extras


def build_generator(
    name: str, *, device="cpu", dtype: torch.dtype = torch.float32, **overrides
) -> tuple[DiffusersGenerator, Callable[..., dict]]:
    """Build a named generator preset (random weights) and its batch maker. See the module docstring."""
    device = torch.device(device)
    prev_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        with torch.device(device):
            denoiser, vae, make_scheduler, defaults, (S, D), extras = _build_modules(name)
    finally:
        torch.set_default_dtype(prev_dtype)
    scheduler = make_scheduler()
    for m in (denoiser, vae):  # already built in place; .to() only if something did not follow the defaults
        if any(p.dtype != dtype or p.device.type != device.type for p in m.parameters()):
            m.to(device=device, dtype=dtype)
    gen = DiffusersGenerator(denoiser, scheduler, vae, **{**defaults, **overrides})

    def make_batch(
        batch_size: int, caption_len: int, vocab_size: int, *, generator: torch.Generator | None = None
    ):
        """A random, seeded batch for this generator (see the module docstring for the keys)."""
        if batch_size < 1 or caption_len < 1 or vocab_size < 2:
            raise ValueError(
                f"make_batch: need batch_size >= 1, caption_len >= 1, vocab_size >= 2; got "
                f"batch_size={batch_size}, caption_len={caption_len}, vocab_size={vocab_size}"
            )
        g = generator
        captions = torch.randint(1, vocab_size, (batch_size, caption_len), generator=g)
        lengths = torch.randint((caption_len + 1) // 2, caption_len + 1, (batch_size,), generator=g)
        caption_mask = (torch.arange(caption_len)[None, :] < lengths[:, None]).long()
        embeds = torch.randn(batch_size, S, D, generator=g)
        batch = {
            "captions": captions.to(device),
            "caption_mask": caption_mask.to(device),
            "prompt_embeds": embeds.to(device=device, dtype=dtype),
            "seed": int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
        }
        for key, shape in extras.items():
            if shape == ("S",):  # a right-padded mask, at least half real
                plen = torch.randint(max(1, S // 2), S + 1, (batch_size,), generator=g)
                batch[key] = (torch.arange(S)[None, :] < plen[:, None]).long().to(device)
            else:
                batch[key] = torch.randn(batch_size, *shape, generator=g).to(device=device, dtype=dtype)
        return batch

    return gen, make_batch
