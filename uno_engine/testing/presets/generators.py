"""Generator presets: real diffusers classes with random weights, nothing downloaded.

`build_generator(name, *, device="cpu", dtype=torch.float32, **overrides) -> (generator, make_batch)`

| name          | denoiser + VAE + scheduler                                     | H x W       | (S, D)      |
|---------------|----------------------------------------------------------------|-------------|-------------|
| "tiny-sd"     | tiny UNet2DConditionModel + AutoencoderKL (f8) + DDIM (eps)    | 64 x 48     | (12, 32)    |
| "tiny-sana"   | tiny SanaTransformer2DModel + AutoencoderDC (f4) + FlowMatch   | 64 x 64     | (12, 32)    |
| "tiny-pixart" | tiny PixArtTransformer2DModel (learned sigma) + AutoencoderKL  | 64 x 64     | (12, 32)    |
| "sd15"        | SD-1.5 UNet + VAE shapes, DDIM scaled_linear, 20 steps         | 512 x 512   | (77, 768)   |
| "sana-0.6b"   | Sana_600M_1024px DiT + DC-AE f32c32, FlowMatch shift 3, 20 st. | 1024 x 1024 | (300, 2304) |

(S, D): the text-encoder states the batch carries as "prompt_embeds" (CLIP-L for SD-1.5, Gemma-2-2B for Sana).

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

NAMES = ("tiny-sd", "tiny-sana", "tiny-pixart", "sd15", "sana-0.6b")


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


def _tiny_vae_dc():
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3,
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
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


def _build_modules(name: str):
    """(denoiser, vae, make_scheduler, defaults, (S, D), needs_mask) for a preset name. The scheduler is made
    outside the device context: its tables must stay on the CPU (they are read once, at construction)."""
    if name == "tiny-sd":
        return (
            _tiny_unet(32),
            _tiny_vae_kl(),
            _ddim,
            dict(num_inference_steps=8, height=64, width=48),
            (12, 32),
            False,
        )
    if name == "tiny-sana":
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
        return dit, _tiny_vae_dc(), _flow, dict(num_inference_steps=8), (12, 32), True
    if name == "tiny-pixart":
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
        return dit, _tiny_vae_kl(), _ddim, dict(num_inference_steps=8), (12, 32), True
    if name == "sd15":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(  # sd-v1-5 vae/config.json
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        return unet, vae, _ddim, dict(num_inference_steps=20), (77, 768), False
    if name == "sana-0.6b":
        from diffusers import AutoencoderDC, SanaTransformer2DModel

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
        vae = AutoencoderDC(  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers
            latent_channels=32,
            attention_head_dim=32,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
            decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            upsample_block_type="interpolate",
            downsample_block_type="Conv",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
        return dit, vae, _flow, dict(num_inference_steps=20), (300, 2304), True
    raise ValueError(f"build_generator: unknown name {name!r}; known: {', '.join(NAMES)}")


def build_generator(
    name: str, *, device="cpu", dtype: torch.dtype = torch.float32, **overrides
) -> tuple[DiffusersGenerator, Callable[..., dict]]:
    """Build a named generator preset (random weights) and its batch maker. See the module docstring."""
    device = torch.device(device)
    prev_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        with torch.device(device):
            denoiser, vae, make_scheduler, defaults, (S, D), needs_mask = _build_modules(name)
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
        if needs_mask:
            plen = torch.randint(max(1, S // 2), S + 1, (batch_size,), generator=g)
            batch["prompt_attention_mask"] = (torch.arange(S)[None, :] < plen[:, None]).long().to(device)
        return batch

    return gen, make_batch
