"""`UNOStep`: one understanding-supervised training step, dropped into any trainer.

    images = generator(batch)                    # uno/generate  (grad to the generator)
    inputs = critic.prepare(images)              # uno/bridge    (exactly the critic's image processor; with
                                                 #  fuse_patch_embed, also its conv patch embedding)
    out    = critic(inputs, captions, mask)      # uno/critic    (frozen, input-grad only, checkpointed; hard
                                                 #  negative captions reuse the image prefix: one pass)
    loss   = uno_loss(out, batch)                # uno/loss      (fused caption CE + visual regression
                                                 #  + negatives + the generator's own loss + KL)

`out.loss.backward()` sends the understanding losses back through the frozen critic into the generator.
`UNOConfig(view="representation")`: the generator hands over its own hidden states for a noised latent,
projected by its `RepresentationHead`, and a `uno_engine.representation.RepresentationCritic` reads them (no
rollout with grad, no decode). `UNOConfig(view="latent")`: the generator hands over latents
(`generator(batch, view="latent")`) and a `uno_engine.latent.LatentCritic` reads them in the bridge's and the
critic's place: no pixel decode, no vision tower; the losses and metrics are the same. `UNOOutput.images` is
then None (`decoded_images()` decodes).
`UNOConfig(read=ReadAugment(views=K, ...))`: the bridge makes K random views of each image (crop boxes, noise,
re-noising; `uno_engine.read`), the critic reads the B * K views as one batch and every loss averages over them.
The default (read="auto") is one jittered view (`ReadAugment.default()`); read=None, the processor's exact
read.
Metrics are detached device tensors: nothing in the step syncs with the host except the one input check
(`UNOConfig(check_inputs=False)` removes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from uno_engine._profiling import PhaseTimer
from uno_engine.config import UNOConfig
from uno_engine.distributed import unwrap
from uno_engine.read import draw_for_step, per_view


@dataclass
class UNOOutput:
    loss: torch.Tensor  # 0-d, carries the graph: out.loss.backward()
    metrics: dict[str, torch.Tensor]  # detached, on the device until read
    images: torch.Tensor | None  # (B, 3, H, W) generated images in config.input_range; None for other views
    timer: PhaseTimer | None = field(default=None, repr=False)
    latents: object | None = field(default=None, repr=False)  # GeneratedLatents / GeneratedRepresentation

    def decoded_images(self) -> torch.Tensor:
        """The generated images: `images`, or (view="latent") the latents decoded now, with grad."""
        return self.images if self.images is not None else self.latents.decode()

    def timings(self) -> dict[str, float]:
        """Per-phase milliseconds (needs UNOConfig(profile=True); call after loss.backward(); syncs once)."""
        return self.timer.result() if self.timer is not None else {}


class UNOStep(nn.Module):
    """generator -> bridge -> frozen critic -> UNO losses. `step.parameters()` holds the generator's and the
    loss heads' parameters (the critic's are frozen); `out = step(batch)` returns a `UNOOutput`.

    Args:
        generator: nn.Module, batch -> images (B, 3, H, W) in config.input_range with grad (uno_engine.generators).
        critic: a `uno_engine.Critic` (`Critic.from_hf(model, image_processor)`).
        loss: a `uno_engine.UNOLoss`; its heads are sized to the critic here.
        config: `UNOConfig`.
    """

    def __init__(
        self, generator: nn.Module, critic: nn.Module, loss: nn.Module, config: UNOConfig | None = None
    ):
        super().__init__()
        self.config = config or UNOConfig()
        self.generator, self.critic, self.uno_loss = generator, critic, loss
        # what reads the generation (a CaptionReader, uno_engine.critics.reader): the critic, or its latent view
        self.__dict__["reader"] = critic
        if self.config.view == "latent":
            from uno_engine.latent import LatentCritic

            c = self.config
            self.reader = LatentCritic(
                critic,
                generator,
                latent_input=c.latent_input,
                feature_layer=c.latent_feature_layer,
                read=c.read,
            )
        elif self.config.view == "representation":
            from uno_engine.representation import RepresentationCritic

            self.reader = RepresentationCritic(critic, generator)
        loss.bind(self.reader, generator)
        self._reads = 0  # forward calls: the step of UNOConfig.read's draws when the batch has no "read_step"
        if self.config.fuse_patch_embed is True and (why := critic.fused_patch_embed_reasons()):
            raise ValueError("UNOConfig(fuse_patch_embed=True) with this critic: " + "; ".join(why))
        if self.config.compile:
            critic.compile_blocks()

    def train(self, mode: bool = True):
        """Trainers call .train(); the frozen critic stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.critic.eval()
        return self

    def forward(self, batch: dict) -> UNOOutput:
        cfg = self.config
        timer = PhaseTimer(cfg.profile, _device_of(self.critic))
        # every bridge call (generated images here, reference images in the loss) runs with these
        bridge = dict(input_range=cfg.input_range, backend=cfg.backend, fuse_patch_embed=cfg.fuse_patch_embed)
        with timer.phase("generate"):  # latent / representation views: nothing decoded
            latent = cfg.view != "pixel"
            # through the (DDP / FSDP2-wrapped) generator's forward: its hooks run in every view
            images = self.generator(batch, view=cfg.view) if latent else self.generator(batch)
        if cfg.check_inputs:
            check_step_inputs(images, batch, vocab_size=self.critic.vocab_size)
        K = 1 if cfg.read is None else cfg.read.views  # the critic reads K views of each image (B * K rows)
        with timer.phase("bridge"):
            read, n = cfg.read, self._reads
            views = None if read is None else draw_for_step(read, images, batch, n, self.critic)
            self._reads += 1
            inputs = self.reader.prepare(
                images, clamp=cfg.clamp, bridge_kernel=cfg.bridge_kernel, views=views, **bridge
            )
        with timer.phase("critic"):
            caps = (inputs, *per_view(K, batch["captions"], batch.get("caption_mask")))
            # hard negatives share the image prefix: one pass
            neg = unwrap(self.uno_loss).negatives_of(batch)
            neg = None if neg is None else per_view(K, *neg)
            out = self.reader(*caps) if neg is None else self.reader.forward_with_negatives(*caps, *neg)
        with timer.phase("loss"):
            loss, metrics = self.uno_loss(
                out,
                batch,
                critic=self.reader,
                generator=unwrap(self.generator),  # its methods (denoising_loss, predict), not its forward
                lce_impl=cfg.lce_impl,
                bridge_kernel=cfg.bridge_kernel,
                views=K,
                **bridge,
            )
        timer.on_grad(loss, "grad.loss")
        timer.on_grad(out.caption_hidden, "grad.caption")
        timer.on_grad(inputs.bridge_output, "grad.pixels")
        timer.on_grad(getattr(images, "tensor", images), "grad.images")
        timer = timer if cfg.profile else None
        return UNOOutput(loss, metrics, None if latent else images, timer, images if latent else None)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def check_step_inputs(images: torch.Tensor, batch: dict, vocab_size: int | None = None) -> None:
    """Clear errors, naming the argument, for bad step inputs. Shape and dtype checks are free; the
    non-finite-image, empty-caption and caption-id range checks share ONE device->host read. Caption ids
    are checked against the critic's vocabulary (`vocab_size`) at every position, padding included (the
    critic embeds padded positions too), before any embedding runs."""
    if getattr(images, "kind", None) in (
        "tokens",
        "latents",
        "representation",
    ):  # latent / representation view
        images = images.tensor  # (B, N, V_img) token distribution, (B, C, h, w) latent or (B, N, H) tokens
    elif not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"generator output `images` must be (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"generator output `images` must be a float tensor, got {images.dtype}")
    captions = batch.get("captions")
    if not isinstance(captions, torch.Tensor) or captions.dim() != 2:
        raise ValueError(
            "batch['captions'] must be an int64 tensor (B, L) of caption token ids, got "
            f"{tuple(captions.shape) if isinstance(captions, torch.Tensor) else type(captions).__name__}"
        )
    if captions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"batch['captions'] must hold integer token ids, got {captions.dtype}")
    if captions.shape[0] != images.shape[0]:
        raise ValueError(
            f"batch size differs: generator produced {images.shape[0]} images but batch['captions'] "
            f"has {captions.shape[0]} rows"
        )
    if captions.shape[1] == 0:
        raise ValueError("batch['captions'] is empty (L == 0): every image needs a caption")
    mask = batch.get("caption_mask")
    if mask is not None and tuple(mask.shape) != tuple(captions.shape):
        raise ValueError(
            f"batch['caption_mask'] must match batch['captions'] {tuple(captions.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    with torch.no_grad():
        out_of_vocab = (
            (captions < 0) | (captions >= vocab_size) if vocab_size is not None else captions.new_zeros(())
        )
        flags = [~torch.isfinite(images).all(), out_of_vocab.any()]
        if mask is not None:
            flags.append((mask.sum(dim=1) == 0).any())
        bad = torch.stack([f.to(images.device) for f in flags]).tolist()  # the one host read of the step
    if bad[0]:
        raise ValueError("generator output `images` contains NaN or Inf")
    if bad[1]:
        rows = out_of_vocab.any(dim=1).nonzero().flatten().tolist()
        lo, hi = int(captions.min()), int(captions.max())
        raise ValueError(
            f"batch['captions'] holds token ids outside the critic's vocabulary [0, {vocab_size}) in rows "
            f"{rows} (min {lo}, max {hi})"
        )
    if len(bad) > 2 and bad[2]:
        rows = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"batch['caption_mask'] marks an empty caption (no tokens) in rows {rows}")
