"""COMPUTED (not measured) memory of `uno-train` for FLUX.1-dev + Qwen2.5-VL-7B: weights and LoRA training state
from parameter counts, the critic's kept activations from `Critic.activation_estimate`.

    python benchmarks/cli_memory.py [--rank 16] [--dtype-bytes 2]

Models are built on the meta device (no memory, nothing downloaded): the FLUX.1-dev transformer and VAE from
the preset `flux.1-dev` (uno_engine.testing.presets.generators), the text encoders (CLIP-L text, T5-v1.1-XXL
encoder) and Qwen2.5-VL-7B-Instruct from their published config values. The pipeline's text encoders stay
resident: `uno-train` encodes each step's prompts. LoRA: `uno-train`'s default targets for the family, fp32
weights + grads + AdamW's two moments (16 bytes per parameter). Not included: the generator's activations of
the grad step and the VAE decode at 1024 px (measure them on the GPU), the CUDA context, fragmentation.
"""

from __future__ import annotations

import argparse

import torch


def _meta(build):
    with torch.device("meta"):
        return build()


def text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextConfig(  # openai/clip-vit-large-patch14, text half
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768,
    )  # fmt: skip
    t5 = T5Config(  # google/t5-v1_1-xxl (FLUX.1's text_encoder_2)
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    return {
        "CLIP-L text": _meta(lambda: CLIPTextModel(clip)),
        "T5-v1.1-XXL encoder": _meta(lambda: T5EncoderModel(t5)),
    }


def qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(  # Qwen/Qwen2.5-VL-7B-Instruct config.json
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=False,
    )  # fmt: skip
    return _meta(lambda: Qwen2_5_VLForConditionalGeneration(cfg))


def lora_params(module: torch.nn.Module, targets, rank: int) -> int:
    """r * (in + out) for every nn.Linear whose name ends with a target (peft's matching)."""
    n = 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (m.in_features + m.out_features)
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per frozen weight (bf16: 2)")
    args = p.parse_args(argv)
    from uno_engine import Critic
    from uno_engine.testing.presets.generators import build_generator
    from uno_engine.train.models import DIT_TARGETS

    gen, _ = build_generator("flux.1-dev", device="meta")
    critic_model = qwen25_vl_7b().to(torch.bfloat16)
    parts = {"FLUX.1-dev transformer": gen.denoiser, "FLUX.1 VAE": gen.vae, **text_encoders()}
    parts["Qwen2.5-VL-7B (critic)"] = critic_model
    gib = 1024**3
    rows, total = [], 0.0
    for name, m in parts.items():
        n = sum(q.numel() for q in m.parameters())
        rows.append((name, n / 1e9, n * args.dtype_bytes / gib))
        total += n * args.dtype_bytes / gib
    n_lora = lora_params(gen.denoiser, DIT_TARGETS, args.rank)
    lora_gib = n_lora * 16 / gib
    est = Critic.from_hf(critic_model, None, checkpoint="none").activation_estimate()
    print(f"COMPUTED from parameter counts (bf16 frozen weights, {args.dtype_bytes} bytes each)")
    for name, b, g in rows:
        print(f"  {name:28s} {b:7.3f} B params  {g:7.2f} GiB")
    print(f"  LoRA rank {args.rank} ({n_lora / 1e6:.1f} M params, fp32 + grad + AdamW)  {lora_gib:.2f} GiB")
    print(f"  critic activations per image, checkpoint='none' (1024 patches: no processor): {est.describe()}")
    print(f"  weights + LoRA state: {total + lora_gib:.1f} GiB (without the generator's activations)")


if __name__ == "__main__":
    main()
