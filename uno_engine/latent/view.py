"""`LatentCritic`: the critic as the latent view (`UNOConfig(view="latent")`) reads a generation.

The step, the losses and the metrics are those of the pixel view; only what the critic reads changes. The
generator hands over `GeneratedLatents` (`generator.latents_for_critic(batch)`) instead of pixels, and

- unified token models (Janus, generator and critic on one model): the LM reads the straight-through token
  distribution through the model's generation embedding (critics/janus.py documents the exact sequence);
  no VQ decode, no vision tower;
- diffusion models with a separate critic: the critic's attached, frozen `LatentAdapter` maps a latent that
  carries the grad steps' gradient to the critic's vision tokens, which take the image tokens' place in the
  critic's own sequence (its reader's prefix: the chat template when it has one); no VAE decode, no vision
  tower. `latent_input`: "x0" (default)
  reads the last grad step's x0 prediction at sigma = 0; "xt" reads that step's output, the noised latent,
  at its noise level. Why "x0" by default: it is the latent the pixel view decodes, so both views supervise
  the same object, and an adapter is most faithful at low noise (benchmarks/bench_latent.py measures the
  cosine to the critic's tokens by noise level); "xt" is the PRFL / DiNa-LRM reading (a noise-aware reward
  on the noised state), cheaper to fit well at high noise only with a longer fit.

Patch-level regression terms (density / structure heads, cosine to reference features) read the LM's hidden
states at the image positions after decoder layer `feature_layer` (default: the middle layer, L // 2).
Why the middle: the last layers of a causal LM at an image position are shaped to predict the NEXT token
(for Janus, the next VQ code through the generation head), and the first layers have barely mixed context;
the middle of the stack is where representation-alignment work finds the most transferable per-patch
features (REPA aligns an early-middle block, DiNa-LRM taps layers 4 / 8 / 12 of 12-24). The heads are
therefore sized to the LM width (`vision_dim` of this view = the LM hidden size), and reference images are
read through the same path: Janus: VQ encoder -> token ids -> generation embedding -> LM; diffusion: VAE
encoder (posterior mode) -> adapter at sigma = 0 -> LM. No caption is appended for reference features.

Hard-negative captions (`forward_with_negatives`) follow `Critic.forward_with_negatives`: one packed LM
sequence per image, [prefix (P), caption (L), negative 1 (L), ..., negative K (L)], under a block mask (prefix
rows causal; caption j's rows see the prefix and, causally, caption j's real tokens) with every caption block
at positions P .. P+L-1, so each caption's hidden states equal those of a separate pass up to float rounding.
The prefix here is this view's (Janus: [BOS] <begin_of_image> g(y) <end_of_image>; adapter: the critic's
reader's prefix around the adapter tokens), and the adapter or the generation embedding runs once per image.
With an instruction (`Critic.from_hf(..., instruction=)`) both read the critic's chat template, the latent
tokens where the image goes. The sequence itself is built by `Critic.reader` (uno_engine.critics.reader), as
for the pixel view.

Reading (`UNOConfig(view="latent", read=ReadAugment(views=K, renoise=(t_min, t_max), schedule=...))`): the
adapter reads each generated x0 K times, view k re-noised by the forward process at its drawn level t,
x_t = a(t) x0 + s(t) eps (`uno_engine.read.renoise_latents`; the draw of `ReadAugment.draw`, from (seed, step,
global sample index), eps a counter hash), and is conditioned on that view's noise level sigma = s(t): the
noise-aware reading of classifier guidance, with the adapter that `fit_latent_adapter` already fits over
sigma. The schedule must be the adapter's family ("flow", or the generator scheduler's alphas_cumprod for
"ddpm"). Crop boxes, blur and pixel noise act on pixels and are refused; Janus token distributions and
latent_input="xt" cannot be re-noised (errors name the field).

The step reads the generator through its forward, `generator(batch, view="latent")` (which returns
`latents_for_critic(batch)`), so that a DDP / FSDP2 wrapper's hooks run. Not in this view: Qwen2-VL critics
with an adapter (M-RoPE positions over a size-dependent grid) and generators whose forward takes no `view`
keyword raise with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from uno_engine.critics.common import find_layers
from uno_engine.critics.types import CriticOutput
from uno_engine.distributed import unwrap
from uno_engine.latent.types import GeneratedLatents
from uno_engine.read import Views, per_view, renoise_latents

__all__ = ["LatentCritic", "LatentInputs", "latent_view_reasons"]

LATENT_INPUTS = ("x0", "xt")


@dataclass
class LatentInputs:
    """What `LatentCritic.prepare` returns: image_embeds (B, N, H) in the LM's input space, grid (gh, gw)."""

    image_embeds: torch.Tensor
    grid: tuple[int, int]

    @property
    def bridge_output(self) -> torch.Tensor:
        """What stands in the pixel view's bridge output (the step's profiler hooks it): image_embeds."""
        return self.image_embeds


def _check_views(views, gen: GeneratedLatents) -> int:
    """K, after refusing (naming `views`) views that are not `Views` for these latents, or that carry a crop
    box, blur or pixel noise (pixel reads only)."""
    if not isinstance(views, Views):
        raise TypeError(f"views must be uno_engine.read.Views (ReadAugment.draw), got {type(views).__name__}")
    B, K = gen.batch_size, views.per_image
    if views.boxes.shape[0] != B * K or tuple(views.image_size) != tuple(gen.grid):
        raise ValueError(
            f"views were drawn for {views.boxes.shape[0] // K} latents of {tuple(views.image_size)}, got "
            f"{B} of {tuple(gen.grid)}"
        )
    h, w = gen.grid
    box = (views.boxes != np.array([0.0, h, 0.0, w])).any()
    if box or views.blur > 0 or views.noise > 0:
        raise ValueError("views: the latent view reads no crop box, blur or pixel noise (renoise only)")
    return K


def _is(obj, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(obj).__mro__)


def _takes_view(forward) -> bool:
    params = inspect.signature(forward).parameters.values()
    return any(p.name == "view" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def latent_view_reasons(critic, generator) -> list[str]:
    """Why this critic cannot read this generator's latents (empty when it can)."""
    reasons = []
    generator = unwrap(generator)
    if not callable(getattr(generator, "latents_for_critic", None)):
        reasons.append(
            f"the generator {type(generator).__name__} has no latents_for_critic(batch): it can only hand over "
            "pixels (use view='pixel')"
        )
    elif not _takes_view(generator.forward):
        reasons.append(
            f"the generator {type(generator).__name__}'s forward takes no `view` keyword: the step calls "
            "generator(batch, view='latent') (so that a DDP / FSDP2 wrapper's hooks run), which must return "
            "latents_for_critic(batch) (uno_engine.generators.Generator documents it)"
        )
    if _is(generator, "JanusGenerator"):
        if getattr(critic, "family", None) != "Janus":
            reasons.append(
                f"a Janus generator's image tokens are read through its own model's generation embedding, but "
                f"the critic is a {getattr(critic, 'family', type(critic).__name__)} critic whose LM cannot read them"
            )
        elif critic.hf_model is not generator.model:
            reasons.append(
                "the Janus critic wraps a different model than the Janus generator: its LM cannot read this "
                "generator's tokens (build both on the same JanusForConditionalGeneration)"
            )
        return reasons
    adapter = getattr(critic, "latent_adapter", None)
    if getattr(critic, "family", None) == "Qwen2-VL":
        reasons.append("Qwen2-VL critics cannot take adapter tokens (M-RoPE over a size-dependent grid)")
    if adapter is None:
        reasons.append(
            "no LatentAdapter is attached to the critic: fit one with uno_engine.latent.fit_latent_adapter("
            "critic, generator, images, steps=...) and call critic.attach_latent_adapter(adapter)"
        )
    else:
        reasons += [
            f"the attached LatentAdapter does not fit this generator: {d}"
            for d in adapter.generator_mismatch(generator)
        ]
    return reasons


class LatentCritic:
    """The critic of the latent view; used by `UNOStep` where the pixel view uses the critic itself, and
    passed to the loss as `critic=` (it has the `prepare` / `encode_patches` / `vision_dim` / `parameters`
    the loss reads). Not an nn.Module: it owns no parameters (the step's state_dict is unchanged).

    Args:
        critic: a `uno_engine.Critic`. generator: the step's generator (`latents_for_critic`).
        latent_input: "x0" (default) | "xt": which latent a diffusion generator's adapter reads.
        feature_layer: decoder layer whose output gives the patch features (1..L; default L // 2).
    Raises ValueError listing every reason when the pair cannot do the latent view (`latent_view_reasons`).
    """

    def __init__(
        self,
        critic,
        generator,
        *,
        latent_input: str = "x0",
        feature_layer: int | None = None,
        read=None,
    ):
        reasons = latent_view_reasons(critic, generator)
        if reasons:
            raise ValueError(
                "UNOConfig(view='latent') cannot run with this critic and generator: " + "; ".join(reasons)
            )
        if latent_input not in LATENT_INPUTS:
            raise ValueError(f"latent_input must be one of {LATENT_INPUTS}, got {latent_input!r}")
        generator = unwrap(generator)  # its methods: grid, encode_images, vae (reference images)
        self.critic, self.generator, self.latent_input = critic, generator, latent_input
        self.tokens = _is(generator, "JanusGenerator")
        n_layers = len(find_layers(critic.language_model))
        feature_layer = n_layers // 2 if feature_layer is None else feature_layer
        if not isinstance(feature_layer, int) or not 1 <= feature_layer <= n_layers:
            raise ValueError(f"feature_layer must be an int in [1, {n_layers}], got {feature_layer!r}")
        self.feature_layer = feature_layer
        self._layer = find_layers(critic.language_model)[feature_layer - 1]
        if read is not None:
            self._check_read(read)

    def _check_read(self, read) -> None:
        """Refuse, naming the field, a re-noising `ReadAugment` this view cannot apply (module docstring,
        "Reading"; UNOConfig refuses the pixel-only fields, `prepare` any views that carry them)."""
        if read.renoise is None:
            return
        if self.tokens:
            raise ValueError(
                "ReadAugment.renoise: a Janus latent view reads token distributions, which have no forward "
                "process to re-noise (renoise=None; or view='pixel')"
            )
        if self.latent_input != "x0":
            raise ValueError(
                "ReadAugment.renoise re-noises the clean latent: it needs latent_input='x0', got "
                f"latent_input={self.latent_input!r}"
            )
        family = "flow" if read.schedule == "flow" else "ddpm"
        fitted = self.critic.latent_adapter.identity.noise
        if family != fitted:
            raise ValueError(
                f"ReadAugment.schedule: the attached LatentAdapter is conditioned on the {fitted!r} forward "
                f"process, but the schedule is {'flow' if family == 'flow' else 'alphas_cumprod (ddpm)'} "
                "(flow: schedule='flow'; ddpm: the generator scheduler's alphas_cumprod)"
            )

    # ---------------------------------------------------------------------------------------- the loss's API
    @property
    def vision_dim(self) -> int:
        """Width of this view's patch features: the LM hidden size."""
        return self.critic.hidden_size

    def parameters(self):
        return self.critic.parameters()

    def train(self, mode: bool = True):
        self.critic.eval()
        return self

    def eval(self):
        return self.train(False)

    def prepare(self, x, *, input_range=(-1.0, 1.0), views=None, **_ignored) -> LatentInputs:
        """GeneratedLatents (with grad) or reference images (B, 3, H, W) in input_range (no grad) -> LatentInputs.
        `views`: None, or `uno_engine.read.Views` drawn for the latents (`draw_for_step`): B * K rows, row
        b * K + k reads latent b re-noised as view k (`read.renoise_latents`), the adapter conditioned on that
        view's noise level; views without re-noising are K plain reads. Bridge options of the pixel view
        (clamp, backend, fuse_patch_embed) do not apply and are ignored."""
        if isinstance(x, GeneratedLatents):
            return self._from_latents(x, views)
        if views is not None:
            raise ValueError("views: reference images are read once, without views (the loss repeats them)")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"reference images must be (B, 3, H, W), got {getattr(x, 'shape', type(x).__name__)}"
            )
        lo, hi = input_range
        images = (x.float() - lo) * (2.0 / (hi - lo)) - 1.0  # VQ / VAE encoders take [-1, 1]
        with torch.no_grad():
            if self.tokens:
                ids = self.critic.image_tokens(images)
                V = self.critic.generation_vocab_size
                probs = torch.nn.functional.one_hot(ids, V).float()
                return LatentInputs(self.critic.embed_token_probs(probs), tuple(self.generator.grid))
            adapter = self.critic.latent_adapter
            lat = self.generator.encode_images(images.to(self.generator.vae.dtype))
            return LatentInputs(adapter(lat, 0.0), tuple(adapter.grid))

    def _from_latents(self, gen: GeneratedLatents, views=None) -> LatentInputs:
        K = 1 if views is None else _check_views(views, gen)
        if self.tokens:
            if gen.kind != "tokens":
                raise ValueError(
                    f"a Janus latent view needs GeneratedLatents(kind='tokens'), got {gen.kind!r}"
                )
            if views is not None and views.noisy:
                raise ValueError("views: a Janus latent view cannot re-noise token distributions")
            probs = per_view(K, gen.token_probs)
            return LatentInputs(self.critic.embed_token_probs(probs), tuple(gen.grid))
        if gen.kind != "latents":
            raise ValueError(
                f"an adapter latent view needs GeneratedLatents(kind='latents'), got {gen.kind!r}"
            )
        adapter = self.critic.latent_adapter
        x, sigma = (gen.x0, 0.0) if self.latent_input == "x0" else (gen.xt, gen.sigma_t)
        if views is not None and views.noisy:
            if self.latent_input != "x0":
                raise ValueError("views: re-noising reads the clean latent, latent_input='x0'")
            x, sigma = renoise_latents(x, views)  # B * K latents, each at its view's noise level
        else:
            x = per_view(K, x)  # K == 1: the tensor itself (today's read)
        return LatentInputs(adapter(x, sigma), tuple(adapter.grid))

    def _read(self, inputs: LatentInputs, captions, caption_mask=None, negatives=None, negative_mask=None):
        """One pass of the critic's reader over [this view's prefix, captions (, negatives)] -> CriticOutput
        whose patch_features (B, N, H) are decoder layer `feature_layer`'s output at the image slots."""
        grid = inputs.grid
        return self.critic.reader.read(
            lambda: (inputs.image_embeds, None, grid),
            captions,
            caption_mask,
            negatives,
            negative_mask,
            latent=self.tokens,  # Janus's generation-format prefix ([BOS] <boi> tokens <eoi>) without a template
            capture=self._layer,
        )

    def encode_patches(self, inputs: LatentInputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features (B, N, H) of prepared inputs: the image block alone through the LM."""
        B = inputs.image_embeds.shape[0]
        device = self.critic.lm_head_weight.device
        out = self._read(inputs, torch.zeros(B, 0, dtype=torch.long, device=device))
        return out.patch_features, inputs.grid

    def _check(self, inputs) -> None:
        if not isinstance(inputs, LatentInputs):
            raise TypeError(
                f"inputs must be LatentInputs (from LatentCritic.prepare), got {type(inputs).__name__}"
            )

    def __call__(
        self, inputs: LatentInputs, captions: torch.Tensor, caption_mask: torch.Tensor | None = None
    ):
        """-> CriticOutput, as `Critic.forward`: caption hidden states (B, L, H) after the final norm,
        patch_features (B, N, H) from decoder layer `feature_layer`."""
        self._check(inputs)
        return self._read(inputs, captions, caption_mask)

    def forward_with_negatives(
        self,
        inputs: LatentInputs,
        captions: torch.Tensor,
        caption_mask: torch.Tensor | None,
        negative_captions: torch.Tensor,
        negative_mask: torch.Tensor | None = None,
    ) -> CriticOutput:
        """`__call__` for each image's caption AND its K negative captions, the prefix computed once: the
        contract and output of `Critic.forward_with_negatives` (module docstring). One LM pass over
        T = P + (K+1) L positions per image, against K+1 passes over P + L; the attention reads a (B, 1, T, T)
        additive mask. flash_attention_2 cannot take the mask (ValueError); sdpa and eager can.

        Args:
            captions, caption_mask: as `__call__`, (B, L).
            negative_captions: (B, K, L) int token ids (right padded); K = 0 gives `__call__`'s output.
            negative_mask: (B, K, L) 1 real / 0 pad, or None (all real).
        Returns: CriticOutput with caption_hidden / caption_labels of the true captions, patch_features, and
        negative_hidden (B, K, L, H) / negative_labels (B, K, L) (-100 at padding).
        """
        self._check(inputs)
        return self._read(inputs, captions, caption_mask, negative_captions, negative_mask)
