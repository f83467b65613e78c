"""`RepresentationCritic`: the critic as the representation view (`UNOConfig(view="representation")`) reads a
generation: the frozen critic's LM reads, through the generator's trainable `RepresentationHead`, the
generator's own hidden states for a noised latent x_t (the UNO paper's path: the understanding expert reads the
noised generative representation). No rollout with grad, no decode, no vision tower on generated pixels.

The step, the losses and the metrics are those of the pixel view; what changes:
- the generator hands over `GeneratedRepresentation` (`generator(batch, view="representation")`), whose
  projected tokens take the image tokens' place in the critic's own sequence (its prefix, then the caption);
- `CriticOutput.patch_features` are the projected tokens (B, N, H), and `encode_patches` of reference images
  gives the critic's own image tokens of the clean image (vision tower + multimodal projector, no grad), so
  `UNOLoss(structure=w, structure_mode="features")` is the metaquery regression: per token, 1 - cos(projected
  token, the critic's token of the real image x_t was noised from);
- `UNOLoss(generator_loss=w)` takes the generator's own loss from the same denoiser call (the output's
  `generator_loss`) instead of a second call, where x_t came from a real image.

The one function that runs the critic's LM over [prefix, projected tokens, captions] is `read_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uno_engine.critics.base import CriticInputs, CriticOutput
from uno_engine.distributed import unwrap
from uno_engine.representation.head import RepresentationHead
from uno_engine.representation.types import GeneratedRepresentation

__all__ = [
    "RepresentationCritic",
    "RepresentationInputs",
    "RepresentationOutput",
    "attach_representation",
    "critic_image_tokens",
    "read_tokens",
    "representation_view_reasons",
]


@dataclass
class RepresentationInputs:
    """What `RepresentationCritic.prepare` returns for a generation: tokens (B, N, H), grid, and the
    generator's own loss of the same call (or None)."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    generator_loss: torch.Tensor | None = None

    @property
    def bridge_output(self) -> torch.Tensor:
        """What stands in the pixel view's bridge output (the step's profiler hooks it): the tokens."""
        return self.tokens


@dataclass
class RepresentationOutput(CriticOutput):
    """`CriticOutput` plus generator_loss: the generator's own loss from the representation pass (0-d) or None."""

    generator_loss: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------ the critic side
def read_tokens(critic, tokens: torch.Tensor, captions: torch.Tensor, caption_mask=None):
    """THE reading of projected tokens by the critic's LM: one pass over [prefix (the critic's image prefix
    with `tokens` in the image slots), captions]. tokens (B, N, H); captions (B, L) long on the critic's
    device; caption_mask (B, L) or None. -> (last hidden states (B, P + L, H) after the final norm, P)."""
    B = tokens.shape[0]
    device = critic.lm_head_weight.device
    prefix, _ = critic._prefix_ids(tokens.shape[1])
    P = len(prefix)
    attention_mask = None
    if caption_mask is not None:
        ones = torch.ones(B, P, dtype=torch.long, device=device)
        attention_mask = torch.cat([ones, caption_mask.to(device).long()], dim=1)
    with critic._running():
        embeds = critic._assemble(tokens.to(critic.lm_head_weight.dtype), prefix, captions)
        out = critic.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, return_dict=True
        )
    return out.last_hidden_state, P


def critic_image_tokens(
    critic, images: torch.Tensor, *, input_range=(-1.0, 1.0)
) -> tuple[torch.Tensor, tuple]:
    """The critic's own image tokens (B, N, H) of real images (B, 3, H, W) (vision tower + multimodal
    projector: what its LM reads at the image slots) and their grid, without grad."""
    with torch.no_grad():
        return encode_image_tokens(
            critic, critic.prepare(images, input_range=input_range, fuse_patch_embed=False)
        )


def encode_image_tokens(critic, inputs: CriticInputs) -> tuple[torch.Tensor, tuple]:
    """THE reading of real images on the critic side: CriticInputs -> (image tokens (B, N, H), grid)."""
    with critic._running():
        emb, _, grid = critic._encode(inputs)
    return emb, tuple(grid)


def _token_grid(n: int, grid: tuple[int, int]) -> tuple[int, int]:
    gh, gw = grid
    if gh * gw == n:
        return gh, gw
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(
            f"the critic reads {n} image tokens, which is neither its patch grid {grid} nor a square"
        )
    return side, side


def representation_view_reasons(critic, generator) -> list[str]:
    """Why this critic cannot read this generator's representation (empty when it can)."""
    reasons = []
    gen = unwrap(generator)
    if not callable(getattr(gen, "representation_for_critic", None)):
        reasons.append(
            f"the generator {type(gen).__name__} has no representation_for_critic(batch) (DiffusersGenerator and "
            "JanusGenerator have)"
        )
        return reasons
    head = getattr(gen, "representation", None)
    if head is None:
        reasons.append(
            "no RepresentationHead is attached to the generator: uno_engine.representation.attach_representation("
            "critic, generator, batch, block=...)"
        )
    elif head.out_dim != critic.hidden_size:
        reasons.append(
            f"the attached head gives {head.out_dim}-wide tokens, the critic's LM is {critic.hidden_size} wide"
        )
    if getattr(critic, "family", None) in ("Qwen2-VL", "Qwen3-VL"):
        reasons.append(f"{critic.family} critics place image tokens with M-RoPE over a size-dependent grid")
    return reasons


def attach_representation(
    critic, generator, batch: dict, *, block: str, output_index: int = 0, **options
) -> RepresentationHead:
    """Build a `RepresentationHead` sized to this pair and attach it to the generator (saved and trained with
    it). One no-grad pass of the generator on `batch` (`generator.representation_probe`: the denoiser with the
    batch's prompt_embeds, or Janus's LM over its gen_input_ids) reads the block's width; one critic pass on a
    gray image gives its image-token count, grid and the RMS of its tokens (the head's initial output scale).
    `options` go to RepresentationHead (prompt_dropout, noise_range, source, width). Errors name the argument."""
    gen = unwrap(generator)
    if not callable(getattr(gen, "representation_probe", None)):
        raise TypeError(f"attach_representation: `generator` {type(gen).__name__} has no representation view")
    in_dim, image_hw = gen.representation_probe(batch, block, output_index)
    device = critic.lm_head_weight.device
    emb, grid = critic_image_tokens(critic, torch.zeros(1, 3, *image_hw, device=device))
    grid = _token_grid(emb.shape[1], grid)
    rms = float(emb.float().pow(2).mean().sqrt())
    head = RepresentationHead(
        int(in_dim),
        critic.hidden_size,
        grid,
        block=block,
        output_index=output_index,
        target_rms=rms,
        **options,
    )
    p = next(p for p in gen.parameters() if p.is_floating_point())
    gen.attach_representation(head.to(p.device))
    return head


class RepresentationCritic:
    """The critic of the representation view; used by `UNOStep` where the pixel view uses the critic itself
    and passed to the loss as `critic=`. Not an nn.Module: it owns no parameters (the head is the generator's).

    Args: critic: a `uno_engine.Critic`. generator: the step's generator, with an attached RepresentationHead.
    Raises ValueError listing every reason when the pair cannot do this view (`representation_view_reasons`).
    """

    def __init__(self, critic, generator):
        reasons = representation_view_reasons(critic, generator)
        if reasons:
            raise ValueError(
                "UNOConfig(view='representation') cannot run with this critic and generator: "
                + "; ".join(reasons)
            )
        self.critic, self.generator = critic, unwrap(generator)

    @property
    def vision_dim(self) -> int:
        """Width of this view's patch features: the projected tokens, the LM hidden size."""
        return self.critic.hidden_size

    def parameters(self):
        return self.critic.parameters()

    def train(self, mode: bool = True):
        self.critic.eval()
        return self

    def eval(self):
        return self.train(False)

    def prepare(self, x, *, input_range=(-1.0, 1.0), **_ignored):
        """GeneratedRepresentation -> RepresentationInputs; reference images (B, 3, H, W) -> the critic's
        CriticInputs (for `encode_patches`: the metaquery target). Other bridge options do not apply."""
        if isinstance(x, GeneratedRepresentation):
            return RepresentationInputs(x.tokens, tuple(x.grid), x.generator_loss)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"reference images must be (B, 3, H, W), got {getattr(x, 'shape', type(x).__name__)}"
            )
        return self.critic.prepare(x, input_range=input_range, fuse_patch_embed=False)

    def encode_patches(self, inputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """Reference images' CriticInputs -> the critic's own image tokens (B, N, H) (the metaquery target)."""
        if not isinstance(inputs, CriticInputs):
            raise TypeError(f"inputs must be CriticInputs of reference images, got {type(inputs).__name__}")
        emb, grid = encode_image_tokens(self.critic, inputs)
        return emb, _token_grid(emb.shape[1], grid)

    def __call__(self, inputs: RepresentationInputs, captions: torch.Tensor, caption_mask=None):
        """-> RepresentationOutput: caption hidden states (B, L, H), patch_features = the projected tokens."""
        if not isinstance(inputs, RepresentationInputs):
            raise TypeError(
                f"inputs must be RepresentationInputs (from RepresentationCritic.prepare), got {type(inputs).__name__}"
            )
        if (
            not isinstance(captions, torch.Tensor)
            or captions.dim() != 2
            or captions.dtype
            not in (
                torch.int64,
                torch.int32,
            )
        ):
            raise ValueError(
                f"captions must be a (B, L) integer tensor, got {getattr(captions, 'shape', type(captions))}"
            )
        if caption_mask is not None and caption_mask.shape != captions.shape:
            raise ValueError(
                f"caption_mask must have the shape of captions {tuple(captions.shape)}, got {tuple(caption_mask.shape)}"
            )
        B, L = captions.shape
        if inputs.tokens.shape[0] != B:
            raise ValueError(
                f"captions has batch size {B} but the representation has {inputs.tokens.shape[0]}"
            )
        critic = self.critic
        captions = captions.to(device=critic.lm_head_weight.device, dtype=torch.long)
        hidden, P = read_tokens(critic, inputs.tokens, captions, caption_mask)
        labels = (
            captions
            if caption_mask is None
            else captions.masked_fill(caption_mask.to(captions.device) == 0, -100)
        )
        return RepresentationOutput(
            caption_hidden=hidden[:, P - 1 : P - 1 + L],
            caption_labels=labels,
            lm_head_weight=critic.lm_head_weight,
            lm_head_bias=critic.lm_head_bias,
            logit_softcap=critic.logit_softcap,
            patch_features=inputs.tokens,
            grid=inputs.grid,
            generator_loss=inputs.generator_loss,
        )

    def forward_with_negatives(self, *args, **kwargs):
        raise NotImplementedError(
            "UNOLoss(negatives=...) is not in the representation view yet: set negatives=0 with "
            "UNOConfig(view='representation')"
        )
