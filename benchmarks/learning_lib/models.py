"""The three trained models of the learning experiment, built from configs (nothing downloaded).

- critic: `LlavaForConditionalGeneration` (tiny CLIP vision tower, 32 px / patch 4 -> 64 image tokens; tiny
  Llama LM over the world's 32-word vocabulary) + a CLIP image processor at 32 px, wrapped by
  `uno_engine.Critic.from_hf`;
- generator: a pixel-space `UNet2DConditionModel` (v-prediction, cosine schedule) behind a parameter-free
  "VAE" that is a space-to-depth rearrangement (32 x 32 x 3 pixels <-> 16 x 16 x 12 "latents", orthogonal
  and exactly invertible: pixel space, 4x cheaper convolutions), sampled by
  `uno_engine.generators.DiffusersGenerator` (DDIM, few steps, classifier-free guidance);
- text encoder: a learned embedding table (word + position; the "strong" base adds two transformer layers),
  trained with the generator during pretraining and frozen afterwards. Its output (B, MAX_LEN, TEXT_DIM) is
  the batch's "prompt_embeds".
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from . import world

TEXT_DIM = 64


def build_critic_model(seed: int = 0):
    """-> (LlavaForConditionalGeneration, CLIP image processor), random weights from `seed`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from uno_engine.testing.presets.critics import clip_processor

    vision = dict(
        model_type="clip_vision_model",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=world.SIZE,
        patch_size=4,
        projection_dim=64,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=world.VOCAB_SIZE,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=world.IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    return model, clip_processor(world.SIZE)


# the generator bases (issue 27: "strengthen the base generator before concluding, and report both bases").
# "old": the base of every figure before 2026-12-07; "strong": the same UNet behind a contextual text encoder
# (two transformer layers over the prompt) and trained 6500 steps instead of 3000, in 35 minutes of one core:
# seen accuracy 23.6% -> 64.0% (docs/teach-results.md section 5). Which of the two (the encoder, the
# steps) matters was not separated. A wider UNet ((64, 96, 96), 4.1M parameters, the same encoder) in the same
# budget got 3300 steps and reached 37%.
# "steps": the length of the pretraining's lr schedule (`learning.py --from-scratch --base B`)
BASES = {
    "old": {"block_out_channels": (32, 64, 64), "text_layers": 0, "steps": 3000},
    "strong": {"block_out_channels": (32, 64, 64), "text_layers": 2, "steps": 6500},
}


def base_arch(base: str) -> dict:
    if base not in BASES:
        raise ValueError(f"base must be one of {sorted(BASES)}, got {base!r}")
    return BASES[base]


def build_unet(seed: int = 0, base: str = "old"):
    """1.69M parameters: 16 x 16 x 12 latents, three levels (channels BASES[base]), cross-attention at 8 x 8 and
    4 x 4."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=12,
        out_channels=12,
        block_out_channels=base_arch(base)["block_out_channels"],
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
    )


class _Config(dict):
    """A dict with attribute access: what DiffusersGenerator reads from `vae.config`."""

    __getattr__ = dict.__getitem__


class SpaceToDepthVAE(nn.Module):
    """Pixel space, rearranged: encode = pixel_unshuffle(x, 2) (B, 3, H, W) -> (B, 12, H/2, W/2), decode =
    pixel_shuffle. No parameters, exactly invertible, a permutation of the pixels (so an MSE in latent space is
    the MSE in pixel space). `config.block_out_channels` has two entries: DiffusersGenerator's scale factor 2."""

    def __init__(self):
        super().__init__()
        self.config = _Config(
            block_out_channels=(12, 12), latent_channels=12, scaling_factor=1.0, shift_factor=None
        )
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        return (torch.nn.functional.pixel_shuffle(z, 2),)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Like AutoencoderDC's output: an object with `.latent` (a bare tuple's tensor would be read as a
        distribution: torch.Tensor has a `.mode()`)."""
        return SimpleNamespace(latent=torch.nn.functional.pixel_unshuffle(x, 2))


def to_latents(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pixel_unshuffle(images, 2)


class TextEncoder(nn.Module):
    """ids (B, L) -> (B, L, TEXT_DIM): word embedding + position embedding, then `layers` pre-norm transformer
    layers (4 heads, no dropout; 0 layers: the "old" base's bag of positioned words), LayerNorm."""

    def __init__(
        self, vocab: int = world.VOCAB_SIZE, length: int = world.MAX_LEN, dim: int = TEXT_DIM, layers: int = 0
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def null_ids(self, batch: int) -> torch.Tensor:
        """The unconditional caption (classifier-free guidance): <eos> then padding."""
        ids = torch.full((batch, world.MAX_LEN), world.PAD, dtype=torch.long)
        ids[:, 0] = world.EOS
        return ids


def build_text_encoder(base: str = "old") -> TextEncoder:
    """The text encoder of a base (models.BASES): its `text_layers` transformer layers."""
    return TextEncoder(layers=base_arch(base)["text_layers"])


def make_generator(
    unet, *, steps: int = 10, guidance: float = 2.0, k_grad_steps: int = 1, grad_window=(0.5, 1.0)
):
    """DiffusersGenerator on the pixel-space UNet. grad_window (1.0, 1.0) samples to the end (evaluation)."""
    from uno_engine.generators import DiffusersGenerator

    return DiffusersGenerator(
        unet,
        build_scheduler(),
        SpaceToDepthVAE(),
        num_inference_steps=steps,
        k_grad_steps=k_grad_steps,
        grad_window=grad_window,
        guidance_scale=guidance,
        reference="off",
    )
