"""The critic as a reward (the value path): `CaptionReward`, `RewardObjective`, `ValueStep`.

The reward of a generated image is how strongly the frozen critic prefers the image's true caption to its hard
negatives (`uno_engine.negatives.make_negatives`: one color, count, relation, binding or object changed):

    s_j = sum_l log p(c_jl | image, c_j<l)          sequence log-likelihood of candidate j (j = 0: the caption)
    r   = s_0 - logsumexp_{j=0..K} s_j               in [-inf, 0]: log P(true caption | image, candidates)
    p   = exp(r)                                     in [0, 1]: the softmax probability of the true caption

Each s_j is one fused linear cross-entropy with reduction="none" (`uno_engine.loss.sequence_log_likelihoods`):
forward only under torch.no_grad, the [N, V] logits never exist; the critic reads the image once for all K+1
captions (`Critic.forward_with_negatives`). Whatever reads the generation reads it here: the pixel critic,
or the latent view's reader (`CaptionReward.from_step(step)` takes the step's reader and its reading options).

The reward drives a negative-aware objective on the generator's OWN samples (`ValueStep`), in the manner of
GRPO (group-relative advantages) and DiffusionNFT (a forward-process loss on clean samples): no gradient flows
through the critic, the sampler or the decoder. Per optimizer step, for B prompts and a group of G samples each:

1. sample x0_i, i = 1..B*G, with the whole chain under no_grad (`generator.sample_latents`), decode (pixel view);
2. reward r_i (above); group-relative advantage A_i = clip((r_i - mean_group r) / (std_group r + eps), +-c);
3. re-noise x0_i at a random timestep (`generator.denoising_pair` with x0_i as "reference_latents"): the
   prediction v_theta_i, its target v_i and the frozen initial model's prediction v_ref_i at the same point;
4. the objective, per sample (`reward_objective`):
   - kind="nft" (DiffusionNFT): o_i = 0.5 + 0.5 A_i / c in [0, 1],
         v+_i = (1 - beta) v_ref_i + beta v_theta_i,   v-_i = (1 + beta) v_ref_i - beta v_theta_i,
         l_i  = o_i mean (v+_i - v_i)^2 + (1 - o_i) mean (v-_i - v_i)^2.
     Quadratic in v_theta with a finite minimizer, v_theta* = v_ref - (2 o - 1)(v_ref - v) / beta: a sample
     above its group's mean is fitted, one below is pushed away, and a sample at the mean keeps the initial
     model's prediction (the anchor is built in: no separate KL is needed);
   - kind="advantage" (advantage-weighted denoising): l_i = A_i mean (v_theta_i - v_i)^2, with the `kl`
     anchor mean (v_theta_i - v_ref_i)^2 (DRaFT+'s penalty at the same points) to bound the push-away.
5. loss = mean_i l_i + kl * mean_i mean (v_theta_i - v_ref_i)^2 + generator_loss * (the generator's own
   denoising loss on the batch's real pairs, when the batch carries "reference_latents" / "reference_images").

The initial model is `uno_engine.loss.InitialModel`: LoRA adapters disabled (no copy), or a frozen copy of the
trainable weights. Cost per prompt: G full no-grad sampling chains + G decodes + one critic forward over
P + (K+1) L positions per sample (no backward) + 2 denoiser calls per sample (one with grad, one without);
docs/reward.md has the measured figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from uno_engine.config import UNOConfig
from uno_engine.loss import InitialModel, sequence_log_likelihoods

__all__ = [
    "CaptionReward",
    "Reward",
    "RewardObjective",
    "ValueStep",
    "caption_reward",
    "group_advantages",
    "reward_objective",
]

KINDS = ("nft", "advantage")
FORMS = ("log", "prob")


@dataclass
class Reward:
    """The critic's reward of B generations.

    log_prob: (B,) r = s_0 - logsumexp_j s_j in [-inf, 0] (the log-probability of the true caption among the
        candidates). prob: (B,) exp(r) in [0, 1]. scores: (B, K+1) sequence log-likelihoods s_j (j = 0 the
        caption; -inf for absent negatives). ranked_first: (B,) bool, s_0 above every present negative.
    All float32 (bool) on the critic's device, without grad."""

    log_prob: torch.Tensor
    prob: torch.Tensor
    scores: torch.Tensor
    ranked_first: torch.Tensor

    def value(self, form: str = "log") -> torch.Tensor:
        """(B,) the reward in the `form` "log" (r, in [-inf, 0]) or "prob" (exp(r), in [0, 1])."""
        if form not in FORMS:
            raise ValueError(f"Reward.value: `form` must be one of {FORMS}, got {form!r}")
        return self.log_prob if form == "log" else self.prob


def caption_reward(out, *, backend: str = "auto", lce_impl: str = "auto") -> Reward:
    """The reward from a critic pass with negatives (`Critic.forward_with_negatives`), under no_grad.

    Args:
        out: CriticOutput with caption_hidden (B, L, H) and negative_hidden (B, K, L, H), K >= 1.
        backend, lce_impl: of the fused linear cross-entropy (`ops.linear_cross_entropy`, reduction="none").
    """
    if out.negative_hidden is None or out.negative_hidden.shape[1] == 0:
        raise ValueError(
            "caption_reward: `out` has no negative captions (out.negative_hidden is None or K = 0); the reward "
            "ranks the caption against its hard negatives: run Critic.forward_with_negatives with K >= 1"
        )
    with torch.no_grad():
        s = sequence_log_likelihoods(out, backend=backend, lce_impl=lce_impl)  # (B, K+1)
        r = s[:, 0] - torch.logsumexp(s, dim=1)
        first = (s[:, :1] > s[:, 1:]).all(dim=1)
    return Reward(log_prob=r, prob=r.exp(), scores=s, ranked_first=first)


class CaptionReward:
    """The critic's reward of generations: `CaptionReward(reader, config)(generation, batch) -> Reward`.

    Args:
        reader: what reads the generation: a `uno_engine.Critic` (pixels) or the latent view's reader
            (`UNOStep.reader` under UNOConfig(view="latent")); anything with `prepare` and
            `forward_with_negatives`.
        config: `UNOConfig`; its reading options (input_range, clamp, backend, fuse_patch_embed, bridge_kernel,
            lce_impl, check_inputs) apply exactly as in `UNOStep`.
    Call:
        generation: (B, 3, H, W) images in config.input_range, or the reader's `GeneratedLatents`.
        batch: "captions" (B, L), optional "caption_mask" (B, L), "negative_captions" (B, K, L) with K >= 1,
            optional "negative_caption_mask" (B, K, L).
    Runs under torch.no_grad: nothing is kept for a backward.
    """

    def __init__(self, reader: nn.Module, config: UNOConfig | None = None):
        if not callable(getattr(reader, "forward_with_negatives", None)) or not callable(
            getattr(reader, "prepare", None)
        ):
            raise TypeError(
                "CaptionReward: `reader` must be a critic (or the latent view's reader) with prepare() and "
                f"forward_with_negatives(), got {type(reader).__name__}"
            )
        if config is not None and not isinstance(config, UNOConfig):
            raise TypeError(f"CaptionReward: `config` must be a UNOConfig, got {type(config).__name__}")
        self.reader, self.config = reader, config or UNOConfig()

    @classmethod
    def from_step(cls, step) -> CaptionReward:
        """The reward as `step` (a UNOStep or ValueStep) reads: its reader and its config."""
        return cls(step.reader, step.config)

    @torch.no_grad()
    def __call__(self, generation, batch: dict) -> Reward:
        from uno_engine.step import check_step_inputs

        cfg = self.config
        neg = batch.get("negative_captions")
        if neg is None:
            raise KeyError(
                "CaptionReward needs batch['negative_captions'] (B, K, L) token ids, K >= 1 "
                "(uno_engine.negatives.make_negatives makes them)"
            )
        if cfg.check_inputs:
            check_step_inputs(generation, batch, vocab_size=getattr(self.reader, "vocab_size", None))
        inputs = self.reader.prepare(
            generation,
            clamp=cfg.clamp,
            bridge_kernel=cfg.bridge_kernel,
            input_range=cfg.input_range,
            backend=cfg.backend,
            fuse_patch_embed=cfg.fuse_patch_embed,
        )
        out = self.reader.forward_with_negatives(
            inputs, batch["captions"], batch.get("caption_mask"), neg, batch.get("negative_caption_mask")
        )
        return caption_reward(out, backend=cfg.backend, lce_impl=cfg.lce_impl)


def group_advantages(reward: torch.Tensor, group_size: int, *, clip: float = 2.0, eps: float = 1e-4):
    """GRPO's group-relative advantage: (r - mean_group r) / (std_group r + eps), clipped to [-clip, clip].

    Args:
        reward: (B * G,) rewards, the G samples of each prompt adjacent (`repeat_batch`'s order).
        group_size: G >= 2. clip: > 0. eps: > 0, keeps a group of equal rewards at advantage 0.
    Returns: (B * G,) float32 (float64 for float64 rewards); std is the group's population standard deviation.
    A non-finite reward gives NaN advantages for its group (never dropped).
    """
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_advantages: `group_size` must be an int >= 2, got {group_size!r}")
    if reward.dim() != 1 or reward.shape[0] % group_size != 0 or reward.shape[0] == 0:
        raise ValueError(
            f"group_advantages: `reward` must be (B * G,) with G = group_size = {group_size}, "
            f"got {tuple(reward.shape)}"
        )
    if not clip > 0 or not eps > 0:
        raise ValueError(f"group_advantages: `clip` and `eps` must be > 0, got clip={clip}, eps={eps}")
    r = reward.to(torch.promote_types(reward.dtype, torch.float32)).view(-1, group_size)
    a = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return a.clamp(-clip, clip).reshape(-1)


def reward_objective(
    prediction: torch.Tensor,
    target: torch.Tensor,
    reference: torch.Tensor | None,
    advantage: torch.Tensor,
    *,
    kind: str = "nft",
    beta: float = 1.0,
    clip: float = 2.0,
) -> torch.Tensor:
    """The per-sample objective (module docstring, step 4).

    Args:
        prediction: (N, ...) the trained model's prediction with grad. target: (N, ...) its training target on
            the sample. reference: (N, ...) the initial model's prediction at the same point (kind "nft";
            ignored by "advantage"). advantage: (N,) in [-clip, clip] (`group_advantages`).
        kind: "nft" | "advantage". beta: > 0, NFT's mixing of the trained and the reference prediction.
        clip: the advantages' clip; NFT's optimality o = 0.5 + 0.5 advantage / clip.
    Returns: (N,) per-sample losses in the prediction's dtype (float32 for half inputs).
    """
    if kind not in KINDS:
        raise ValueError(f"reward_objective: `kind` must be one of {KINDS}, got {kind!r}")
    if prediction.shape != target.shape or prediction.dim() < 1:
        raise ValueError(
            f"reward_objective: `target` {tuple(target.shape)} must match `prediction` {tuple(prediction.shape)}"
        )
    if advantage.shape != prediction.shape[:1]:
        raise ValueError(
            f"reward_objective: `advantage` must be (N,) = ({prediction.shape[0]},), got {tuple(advantage.shape)}"
        )
    dims = tuple(range(1, prediction.dim()))
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    pred, tgt, adv = prediction.to(dtype), target.to(dtype), advantage.to(dtype)
    if kind == "advantage":
        return adv * (pred - tgt).pow(2).mean(dim=dims)
    if reference is None or reference.shape != prediction.shape:
        raise ValueError(
            "reward_objective(kind='nft'): `reference` (the initial model's prediction) must match `prediction` "
            f"{tuple(prediction.shape)}, got {None if reference is None else tuple(reference.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"reward_objective: `beta` must be > 0, got {beta}")
    ref = reference.to(dtype)
    o = (0.5 + 0.5 * adv / clip).clamp(0.0, 1.0)
    pos = ((1 - beta) * ref + beta * pred - tgt).pow(2).mean(dim=dims)
    neg = ((1 + beta) * ref - beta * pred - tgt).pow(2).mean(dim=dims)
    return o * pos + (1 - o) * neg


class RewardObjective:
    """The settings of the value path's objective (module docstring).

    Args:
        kind: "nft" (DiffusionNFT's forward-process loss, anchored to the initial model) | "advantage"
            (advantage-weighted denoising loss; set kl > 0 to anchor it).
        group_size: G >= 2 samples per prompt.
        beta: NFT's mixing coefficient (> 0); smaller moves the model further per unit of loss.
        clip: clip of the group-relative advantages (> 0).
        reward: "log" (r in [-inf, 0]) or "prob" (exp(r) in [0, 1]), the form the advantages are computed from.
        kl: weight of mean (v_theta - v_ref)^2 at the re-noised samples (>= 0).
        generator_loss: weight of the generator's own denoising loss on the batch's real pairs (>= 0); used
            when the batch carries "reference_latents" or "reference_images".
    """

    def __init__(
        self,
        kind: str = "nft",
        *,
        group_size: int = 4,
        beta: float = 1.0,
        clip: float = 2.0,
        reward: str = "log",
        kl: float = 0.0,
        generator_loss: float = 0.0,
    ):
        if kind not in KINDS:
            raise ValueError(f"RewardObjective: `kind` must be one of {KINDS}, got {kind!r}")
        if reward not in FORMS:
            raise ValueError(f"RewardObjective: `reward` must be one of {FORMS}, got {reward!r}")
        if not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"RewardObjective: `group_size` must be an int >= 2, got {group_size!r}")
        for name, v, lo_open in (("beta", beta, True), ("clip", clip, True), ("kl", kl, False)):
            if not isinstance(v, (int, float)) or not (v > 0 if lo_open else v >= 0):
                raise ValueError(
                    f"RewardObjective: `{name}` must be {'> 0' if lo_open else '>= 0'}, got {v!r}"
                )
        if not isinstance(generator_loss, (int, float)) or generator_loss < 0:
            raise ValueError(f"RewardObjective: `generator_loss` must be >= 0, got {generator_loss!r}")
        self.kind, self.group_size, self.beta, self.clip = kind, group_size, float(beta), float(clip)
        self.reward, self.kl, self.generator_loss = reward, float(kl), float(generator_loss)

    @property
    def needs_reference(self) -> bool:
        return self.kind == "nft" or self.kl > 0

    def __repr__(self) -> str:
        return (
            f"RewardObjective(kind={self.kind!r}, group_size={self.group_size}, beta={self.beta}, clip={self.clip}, "
            f"reward={self.reward!r}, kl={self.kl}, generator_loss={self.generator_loss})"
        )


def repeat_batch(batch: dict, group_size: int) -> dict:
    """Each prompt's row G times, adjacent: every tensor whose first dimension is the batch size B (that of
    batch["captions"]) is repeat_interleave'd; other entries ("seed", ...) are kept as they are."""
    B = batch["captions"].shape[0]
    return {
        k: v.repeat_interleave(group_size, dim=0)
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == B
        else v
        for k, v in batch.items()
    }


class ValueStep(nn.Module):
    """The value path's training step: sample -> reward -> objective on the generator's own samples.

    `out = step(batch)` returns a `uno_engine.UNOOutput` (loss with grad to the generator, detached metrics,
    the sampled images (B*G, 3, H, W) under the pixel view, else None); `out.loss.backward()`. Nothing flows
    through the critic: it may sum with a UNOStep's loss in the same optimizer step.

    Args:
        generator: a `DiffusersGenerator` (needs sample_latents, decode_latents, denoising_pair, predict and
            trainable weights: LoRA or unfrozen).
        critic: a `uno_engine.Critic`; under UNOConfig(view="latent") it carries a LatentAdapter and the
            step reads latents, as UNOStep does.
        objective: `RewardObjective` (default: kind "nft", G = 4).
        config: `UNOConfig` (reading options, backend, lce_impl, check_inputs).
    batch: the generator's conditioning (B rows: "prompt_embeds", ... and "negative_*" under CFG), "captions"
        (B, L), "caption_mask", "negative_captions" (B, K, L), "negative_caption_mask", "seed"; optional
        "reference_latents" / "reference_images" (the generator_loss anchor).
    """

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        objective: RewardObjective | None = None,
        config: UNOConfig | None = None,
    ):
        super().__init__()
        from uno_engine.distributed import unwrap

        self.config = config or UNOConfig()
        self.objective = objective or RewardObjective()
        if not isinstance(self.objective, RewardObjective):
            raise TypeError(
                f"ValueStep: `objective` must be a RewardObjective, got {type(objective).__name__}"
            )
        gen = unwrap(generator)
        missing = [
            m
            for m in ("sample_latents", "decode_latents", "denoising_pair", "predict")
            if not callable(getattr(gen, m, None))
        ]
        if missing:
            raise TypeError(
                f"ValueStep: `generator` must sample and re-noise its own latents (DiffusersGenerator); "
                f"{type(gen).__name__} has no {', '.join(missing)}"
            )
        self.generator, self.critic = generator, critic
        self.__dict__["reader"] = critic
        if self.config.view == "latent":
            from uno_engine.latent import LatentCritic

            c = self.config
            self.reader = LatentCritic(
                critic, gen, latent_input=c.latent_input, feature_layer=c.latent_feature_layer
            )
        self.reward = CaptionReward(self.reader, self.config)
        self.__dict__["initial"] = InitialModel(gen) if self.objective.needs_reference else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.critic.eval()
        return self

    def _generation(self, gen, x0: torch.Tensor):
        """What the reader reads of the no-grad samples x0 (B*G, C, h, w): decoded images or GeneratedLatents."""
        if self.config.view != "latent":
            return gen.decode_latents(x0)
        from uno_engine.latent.types import GeneratedLatents

        return GeneratedLatents(
            kind="latents", grid=tuple(x0.shape[-2:]), x0=x0, xt=x0, sigma_t=0.0, timestep=0.0,
            decode=lambda: gen.decode_latents(x0),
        )  # fmt: skip

    def forward(self, batch: dict):
        from uno_engine.distributed import unwrap
        from uno_engine.step import UNOOutput

        obj, gen = self.objective, unwrap(self.generator)
        rep = repeat_batch(batch, obj.group_size)
        for key in ("reference_latents", "reference_images"):  # the samples are the targets here
            rep.pop(key, None)
        with torch.no_grad():
            x0 = gen.sample_latents(rep)  # (B*G, C, h, w)
            generation = self._generation(gen, x0)
            reward = self.reward(generation, rep)
            adv = group_advantages(reward.value(obj.reward), obj.group_size, clip=obj.clip).to(x0.device)
        pair = gen.denoising_pair({**rep, "reference_latents": x0})
        ref = self.initial.predict(gen, pair.x_t, pair.t, pair.cond) if obj.needs_reference else None
        per = reward_objective(
            pair.prediction, pair.target, ref, adv, kind=obj.kind, beta=obj.beta, clip=obj.clip
        )
        loss = per.mean()
        metrics = {
            "reward": reward.log_prob.mean(),
            "reward_prob": reward.prob.mean(),
            "ranked_first": reward.ranked_first.float().mean(),
            "objective": loss.detach(),
        }
        if obj.kl > 0:
            kl = (pair.prediction - ref).pow(2).mean()
            metrics["kl"] = kl.detach()
            loss = loss + obj.kl * kl
        if obj.generator_loss > 0 and any(
            batch.get(k) is not None for k in ("reference_latents", "reference_images")
        ):
            anchor = gen.denoising_loss(batch)
            metrics["generator_loss"] = anchor.detach()
            loss = loss + obj.generator_loss * anchor
        metrics["loss"] = loss.detach()
        images = generation if isinstance(generation, torch.Tensor) else None
        return UNOOutput(loss, metrics, images, None, None if images is not None else generation)
