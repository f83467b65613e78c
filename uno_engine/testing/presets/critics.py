"""Critic models of real transformers classes with random weights (nothing is downloaded).

`build_critic_model(name, *, device="cpu", dtype=torch.float32) -> (hf_model, image_processor)`

Tiny CPU presets (seconds): "tiny-llava-clip", "tiny-llava-siglip", "tiny-janus", "tiny-qwen2-vl",
"tiny-qwen3-vl" (DeepStack from 2 of 3 vision layers, interleaved M-RoPE);
"mid-llava": a ~100M-parameter LLaVA (CLIP tower at 224 px / patch 14 -> 256 image tokens, a Llama LM);
real shapes (meant for a GPU in bf16): "llava-1.5-7b" (CLIP-L/336 + Llama-7B), "siglip-so400m-qwen2-1.5b"
(LLaVA class with a SigLIP-so400m/384 tower and a Qwen2-1.5B LM), "janus-pro-1b", "janus-pro-7b",
"qwen2-vl-2b", "qwen3-vl-8b" (Qwen3-VL-8B-Instruct's shapes: a 27-layer SigLIP-2-style tower at patch 16,
DeepStack from layers 8 / 16 / 24, a 36-layer LM with head_dim 128; the processor is Qwen2-VL's at patch 16).
"tiny-llava-onevision" (SINGLE_TILE): LLaVA-OneVision with one anyres tile, outside TINY.

Models are constructed under `torch.device(device)` in the target dtype with transformers' weight
initialisation skipped where possible, then given small random weights on the device, so a 7B model builds in
seconds on a GPU. The image processors are the PIL classes ("...ImageProcessorPil", no torchvision needed)
when they import, else the default classes, with the real checkpoints' settings (sizes, resample, mean/std).
"""

from __future__ import annotations

import contextlib
import math

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

TINY = ("tiny-llava-clip", "tiny-llava-siglip", "tiny-janus", "tiny-qwen2-vl", "tiny-qwen3-vl")
REAL = (
    "llava-1.5-7b",
    "siglip-so400m-qwen2-1.5b",
    "janus-pro-1b",
    "janus-pro-7b",
    "qwen2-vl-2b",
    "qwen3-vl-8b",
)
NAMES = TINY + ("mid-llava",) + REAL
# tiny presets outside TINY: the generic critic tests (tests/test_critics.py) feed TINY non-square
# processor images, which these critics refuse (LLaVA-OneVision: square images, one anyres tile; see
# tests/test_llava_onevision.py)
SINGLE_TILE = ("tiny-llava-onevision",)


# ------------------------------------------------------------------------------------------ processors
def _processor(kind: str, **kwargs):
    import transformers

    for name in (f"{kind}ImageProcessorPil", f"{kind}ImageProcessor"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            return cls(**kwargs)
        except ImportError:  # the default (torchvision) class without torchvision
            continue
    raise ImportError(f"no usable {kind} image processor class in transformers {transformers.__version__}")


def clip_processor(size: int):
    return _processor(
        "CLIP",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _square(size: int) -> dict:
    """A size x size bicubic resize with mean = std = 0.5 (SigLIP-style towers)."""
    return dict(size={"height": size, "width": size}, resample=3, image_mean=HALF, image_std=HALF)


def siglip_processor(size: int):
    return _processor("Siglip", **_square(size))


def llava_onevision_processor(size: int):
    """LLaVA-OneVision's processor (SigLIP mean/std) with image_grid_pinpoints reduced to the base view: the
    one anyres layout the bridge makes (see uno_engine.critics.llava_onevision)."""
    return _processor("LlavaOnevision", image_grid_pinpoints=[[size, size]], **_square(size))


def janus_processor(size: int):
    return _processor("Janus", do_pad=True, **_square(size))


def qwen2_vl_processor(
    *,
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
):
    return _processor(
        "Qwen2VL",
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        resample=3,
        image_mean=image_mean,
        image_std=image_std,
    )


def qwen3_vl_processor(*, patch_size=16, min_pixels=256 * 256, max_pixels=4096 * 4096):
    """Qwen3-VL checkpoints ship a Qwen2-VL image processor at patch 16 with mean = std = 0.5."""
    return qwen2_vl_processor(
        patch_size=patch_size, min_pixels=min_pixels, max_pixels=max_pixels, image_mean=HALF, image_std=HALF
    )


# ---------------------------------------------------------------------------------------------- configs
def _decoder(model_type, hidden, layers, heads, kv, inter, vocab, *, max_pos, eps, **kw):
    """A decoder LM's text config (model_type None: the composite config's own text class)."""
    typed = {"model_type": model_type} if model_type else {}
    return dict(
        typed,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        rms_norm_eps=eps,
        **kw,
    )


def llama_config(hidden, layers, heads, inter, vocab, kv=None, max_pos=4096, eps=1e-5, **kw):
    """A Llama text config (a dict for a composite config's text_config): hidden size, layers, heads,
    MLP intermediate size, vocabulary; kv heads default to heads."""
    return _decoder("llama", hidden, layers, heads, kv or heads, inter, vocab, max_pos=max_pos, eps=eps, **kw)


def _qwen2(hidden, layers, heads, kv, inter, vocab, max_pos=32768, **kw):
    return _decoder("qwen2", hidden, layers, heads, kv, inter, vocab, max_pos=max_pos, eps=1e-6, **kw)


def _vision(model_type, hidden, layers, heads, inter, image, patch, **kw):
    return dict(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        image_size=image,
        patch_size=patch,
        **kw,
    )


def clip_vision_config(hidden, layers, heads, inter, image, patch, proj=None):
    """A CLIP vision tower config (dict): hidden size, layers, heads, MLP size, image side, patch side."""
    return _vision(
        "clip_vision_model",
        hidden,
        layers,
        heads,
        inter,
        image,
        patch,
        projection_dim=proj or hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _siglip_vision(hidden, layers, heads, inter, image, patch):
    return _vision(
        "siglip_vision_model",
        hidden,
        layers,
        heads,
        inter,
        image,
        patch,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )


def llava_config(vision, text, *, image_token_id, feature_layer, strategy):
    """A LlavaConfig from a vision config (e.g. `clip_vision_config`) and a text config (`llama_config`)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=text.pop("tie", False),
    )


def _janus(*, v_hidden, v_layers, v_heads, image, patch, text, vq):
    from transformers import JanusConfig

    lm_hidden = text["hidden_size"]
    vision = dict(
        hidden_size=v_hidden,
        num_hidden_layers=v_layers,
        num_attention_heads=v_heads,
        image_size=image,
        patch_size=patch,
        projection_dim=lm_hidden,
        depth=2,
        mlp_ratio=4.0,
        hidden_act="gelu",
        num_image_tokens=(image // patch) ** 2,
    )
    vq = dict(vq, projection_dim=lm_hidden, image_token_embed_dim=lm_hidden)
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=text["vocab_size"] - 1,
        tie_word_embeddings=False,
    )


def _vision_token_ids(vocab: int) -> dict:
    """Qwen-VL image / video / vision start / end ids: the last four ids of a small test vocabulary; the
    config defaults (the real tokenizer's ids) for a real-sized one."""
    if vocab >= 151000:
        return {}
    return dict(
        image_token_id=vocab - 4,
        video_token_id=vocab - 3,
        vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1,
    )


def _qwen2_vl(*, depth, embed_dim, v_heads, patch, hidden, layers, heads, kv, inter, vocab, mrope, tie):
    from transformers import Qwen2VLConfig

    text = _decoder(
        None,
        hidden,
        layers,
        heads,
        kv,
        inter,
        vocab,
        max_pos=32768,
        eps=1e-6,
        bos_token_id=0 if vocab < 151000 else 151643,
        eos_token_id=1 if vocab < 151000 else 151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope)},
    )
    vision = dict(
        depth=depth,
        embed_dim=embed_dim,
        hidden_size=hidden,
        num_heads=v_heads,
        mlp_ratio=4,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        hidden_act="quick_gelu",
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie, **_vision_token_ids(vocab)
    )


def _qwen3_vl(*, vision: dict, text: dict, vocab: int, tie: bool):
    """Qwen3VLConfig. vision: depth, hidden_size, intermediate_size, num_heads, patch_size, out_hidden_size,
    num_position_embeddings, deepstack_visual_indexes. text: hidden_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rope_theta, mrope_section."""
    from transformers import Qwen3VLConfig

    text = dict(text)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": list(text.pop("mrope_section")),
        "mrope_interleaved": True,
    }
    text = dict(
        text,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        hidden_act="silu",
        rope_parameters=rope,
        tie_word_embeddings=tie,
    )
    vision = dict(
        vision, spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh", in_channels=3
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie, **_vision_token_ids(vocab)
    )


# a small VQ for the tiny Janus (GroupNorm(32) needs channels % 32 == 0): 8x8 tokens -> 32x32 images
_TINY_VQ = dict(
    embed_dim=8,
    num_embeddings=64,
    latent_channels=32,
    base_channels=32,
    channel_multiplier=[1, 1, 2],
    num_res_blocks=1,
    num_patches=8,
    num_hidden_layers=2,
)


def _config(name: str):
    """-> (config, model class name, image processor)."""
    if name == "tiny-llava-clip":
        cfg = llava_config(
            clip_vision_config(32, 2, 4, 64, 30, 6),
            llama_config(32, 2, 4, 64, 128, kv=2),
            image_token_id=127,
            feature_layer=-2,
            strategy="default",
        )
        return cfg, "LlavaForConditionalGeneration", clip_processor(30)
    if name == "tiny-llava-siglip":
        cfg = llava_config(
            _siglip_vision(32, 2, 4, 64, 32, 8),
            _qwen2(32, 2, 4, 2, 64, 128, tie=True),
            image_token_id=127,
            feature_layer=-1,
            strategy="full",
        )
        return cfg, "LlavaForConditionalGeneration", siglip_processor(32)
    if name == "tiny-llava-onevision":
        from transformers import LlavaOnevisionConfig

        text = _qwen2(32, 2, 4, 2, 64, 128, tie=True)
        tie = text.pop("tie")
        cfg = LlavaOnevisionConfig(
            vision_config=_siglip_vision(32, 2, 4, 64, 32, 8),
            text_config=text,
            image_token_id=127,
            video_token_id=126,
            image_grid_pinpoints=[[32, 32]],  # one anyres tile: the base view
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            tie_word_embeddings=tie,
        )
        return cfg, "LlavaOnevisionForConditionalGeneration", llava_onevision_processor(32)
    if name == "tiny-janus":
        cfg = _janus(
            v_hidden=32,
            v_layers=2,
            v_heads=4,
            image=32,
            patch=8,
            text=llama_config(32, 2, 4, 64, 128, kv=2),
            vq=_TINY_VQ,
        )
        return cfg, "JanusForConditionalGeneration", janus_processor(32)
    if name == "tiny-qwen2-vl":
        cfg = _qwen2_vl(
            depth=2,
            embed_dim=32,
            v_heads=4,
            patch=4,
            hidden=32,
            layers=2,
            heads=4,
            kv=2,
            inter=64,
            vocab=128,
            mrope=(1, 1, 2),
            tie=True,
        )
        return (
            cfg,
            "Qwen2VLForConditionalGeneration",
            qwen2_vl_processor(patch_size=4, min_pixels=32 * 32, max_pixels=32 * 32),
        )
    if name == "tiny-qwen3-vl":
        cfg = _qwen3_vl(
            vision=dict(
                depth=3,
                hidden_size=32,
                intermediate_size=64,
                num_heads=4,
                patch_size=4,
                out_hidden_size=32,
                num_position_embeddings=16,  # a 4 x 4 learned grid, bilinearly resampled to each image's
                deepstack_visual_indexes=[0, 1],
            ),
            text=dict(
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                intermediate_size=64,
                rope_theta=5e6,
                mrope_section=(2, 1, 1),
            ),
            vocab=128,
            tie=False,
        )
        return (
            cfg,
            "Qwen3VLForConditionalGeneration",
            qwen3_vl_processor(patch_size=4, min_pixels=32 * 32, max_pixels=32 * 32),
        )
    if name == "mid-llava":
        cfg = llava_config(
            clip_vision_config(512, 8, 8, 2048, 224, 14),
            llama_config(640, 8, 10, 1728, 32064),
            image_token_id=32000,
            feature_layer=-2,
            strategy="default",
        )
        return cfg, "LlavaForConditionalGeneration", clip_processor(224)
    if name == "llava-1.5-7b":
        cfg = llava_config(
            clip_vision_config(1024, 24, 16, 4096, 336, 14, proj=768),
            llama_config(4096, 32, 32, 11008, 32064),
            image_token_id=32000,
            feature_layer=-2,
            strategy="default",
        )
        return cfg, "LlavaForConditionalGeneration", clip_processor(336)
    if name == "siglip-so400m-qwen2-1.5b":
        cfg = llava_config(
            _siglip_vision(1152, 27, 16, 4304, 384, 14),
            _qwen2(1536, 28, 12, 2, 8960, 151936, tie=True, rope_theta=1e6),
            image_token_id=151646,
            feature_layer=-1,
            strategy="full",
        )
        return cfg, "LlavaForConditionalGeneration", siglip_processor(384)
    if name in ("janus-pro-1b", "janus-pro-7b"):
        text = (
            llama_config(2048, 24, 16, 5632, 102400, max_pos=16384)
            if name.endswith("1b")
            else llama_config(4096, 30, 32, 11008, 102400, max_pos=16384)
        )
        vq = dict(
            embed_dim=8,
            num_embeddings=16384,
            latent_channels=256,
            base_channels=128,
            channel_multiplier=[1, 1, 2, 2, 4],
            num_res_blocks=2,
            num_patches=24,
            num_hidden_layers=2,
        )
        cfg = _janus(v_hidden=1024, v_layers=24, v_heads=16, image=384, patch=16, text=text, vq=vq)
        cfg.image_token_id = 100581
        return cfg, "JanusForConditionalGeneration", janus_processor(384)
    if name == "qwen2-vl-2b":
        cfg = _qwen2_vl(
            depth=32,
            embed_dim=1280,
            v_heads=16,
            patch=14,
            hidden=1536,
            layers=28,
            heads=12,
            kv=2,
            inter=8960,
            vocab=151936,
            mrope=(16, 24, 24),
            tie=True,
        )
        return (
            cfg,
            "Qwen2VLForConditionalGeneration",
            qwen2_vl_processor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
        )
    if name == "qwen3-vl-8b":
        cfg = _qwen3_vl(
            vision=dict(
                depth=27,
                hidden_size=1152,
                intermediate_size=4304,
                num_heads=16,
                patch_size=16,
                out_hidden_size=4096,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24],
            ),
            text=dict(
                hidden_size=4096,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                intermediate_size=12288,
                rope_theta=5e6,
                mrope_section=(24, 20, 20),
            ),
            vocab=151936,
            tie=False,
        )
        return cfg, "Qwen3VLForConditionalGeneration", qwen3_vl_processor()
    raise ValueError(f"build_critic_model: unknown name {name!r}; known: {', '.join(NAMES + SINGLE_TILE)}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int):
    """Small random weights, generated on the model's device (fast for real shapes on a GPU)."""
    gen_device = next(model.parameters()).device
    g = torch.Generator(device=gen_device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.dim() == 1
            and ("norm" in name or "ln" in name.lower() or "layrnorm" in name)
            and leaf == "weight"
        ):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            fan_in = p[0].numel()
            std = min(0.02, 1.0 / math.sqrt(fan_in))
            p.copy_(
                torch.randn(p.shape, generator=g, device=gen_device, dtype=torch.float32).to(p.dtype) * std
            )
    for name, b in model.named_buffers():
        if not torch.isfinite(b.float()).all():
            raise RuntimeError(f"non-finite buffer {name}")


def build_critic_model(name: str, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """Build a critic preset -> (hf_model in eval mode on `device` in `dtype`, image_processor)."""
    import transformers

    config, cls_name, processor = _config(name)
    cls = getattr(transformers, cls_name)
    config._attn_implementation = "sdpa"
    device = torch.device(device)
    with torch.device(device), _default_dtype(dtype), _no_init():
        model = cls(config)
    model = model.to(device=device, dtype=dtype)
    if device.type != "meta":  # meta: shapes only (tests of the real-shaped configs)
        random_init(model, seed)
    if getattr(config, "tie_word_embeddings", False) or getattr(
        config.get_text_config(), "tie_word_embeddings", False
    ):
        model.tie_weights()
    return model.eval(), processor


@contextlib.contextmanager
def _no_init():
    """Skip transformers' (slow, CPU-side) weight initialisation: weights are set by `random_init`."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = None
    with no_init_weights() if no_init_weights is not None else contextlib.nullcontext():
        yield
