"""Configuration dataclasses for the UNO step."""

from __future__ import annotations

from dataclasses import dataclass

from uno_engine import _env
from uno_engine.read import ReadAugment


@dataclass(kw_only=True)
class UNOConfig:
    """How `UNOStep` runs. One line per field."""

    backend: str = "auto"  # "auto" | "triton" | "torch": ops backend; "reference": the eager baseline path
    input_range: tuple[float, float] = (-1.0, 1.0)  # value range of generated images (generator output)
    clamp: str = "clamp"  # out-of-range pixels: "clamp" (as the processor's uint8 path) | "straight_through"
    check_inputs: bool = True  # validate images/captions; costs at most one device check per step
    profile: bool = False  # time each phase with device events (adds one sync per step, at the end)
    compile: bool = False  # torch.compile the critic's blocks layer by layer
    # the bridge also applies the critic's conv patch embedding, so the normalized image is not kept for the
    # backward: True | False | "auto" (where exact: LLaVA / Janus towers, non-reference backend, images with
    # grad in the critic's dtype; see Critic.prepare)
    fuse_patch_embed: bool | str = "auto"
    # what the critic reads: "pixel" (decoded images through the bridge and the vision tower) | "latent" (the
    # generator's latents: Janus tokens through the generation embedding, or a diffusion latent through the
    # critic's attached LatentAdapter; no decode, no vision tower; see uno_engine.latent) | "representation" (the
    # generator's own hidden states for a noised latent through its attached RepresentationHead; no rollout
    # with grad, no decode; see uno_engine.representation)
    view: str = "pixel"
    latent_input: str = "x0"  # view="latent", diffusion: the adapter reads the grad step's "x0" | "xt"
    latent_feature_layer: int | None = None  # view="latent": LM layer of the patch features (None: L // 2)
    # algorithm choices (environment overrides for sweeps: `python -m uno_engine.info`, uno_engine._env)
    lce_impl: str = (
        "auto"  # linear cross-entropy: "auto" | "grad_in_forward" | "recompute" (ops.linear_cross_entropy)
    )
    bridge_kernel: str = "auto"  # Triton bridge kernels: "auto" | "two_pass" | "fused" (ops.bridge)
    # how the critic reads each generated image: "auto" (ReadAugment.default(), one jittered view, for the
    # pixel view; None for the latent and representation views; resolved here: `config.read` is never "auto"),
    # None (once, exactly as the processor would) or a ReadAugment: K random views in the bridge (crop boxes,
    # noise, re-noising), the losses averaged over them (uno_engine.read, docs/reading.md)
    read: ReadAugment | None | str = "auto"

    def __post_init__(self):
        if self.backend not in ("auto", "triton", "torch", "reference"):
            raise ValueError(f"UNOConfig.backend must be auto|triton|torch|reference, got {self.backend!r}")
        if self.clamp not in ("clamp", "straight_through"):
            raise ValueError(f"UNOConfig.clamp must be 'clamp' or 'straight_through', got {self.clamp!r}")
        if not (isinstance(self.fuse_patch_embed, bool) or self.fuse_patch_embed == "auto"):
            raise ValueError(
                f"UNOConfig.fuse_patch_embed must be True, False or 'auto', got {self.fuse_patch_embed!r}"
            )
        if self.lce_impl not in _env.LCE_IMPLS:
            raise ValueError(f"UNOConfig.lce_impl must be {'|'.join(_env.LCE_IMPLS)}, got {self.lce_impl!r}")
        if self.bridge_kernel not in _env.BRIDGE_KERNELS:
            raise ValueError(
                f"UNOConfig.bridge_kernel must be {'|'.join(_env.BRIDGE_KERNELS)}, got {self.bridge_kernel!r}"
            )
        if self.view not in ("pixel", "latent", "representation"):
            raise ValueError(
                f"UNOConfig.view must be 'pixel', 'latent' or 'representation', got {self.view!r}"
            )
        if self.latent_input not in ("x0", "xt"):
            raise ValueError(f"UNOConfig.latent_input must be 'x0' or 'xt', got {self.latent_input!r}")
        if isinstance(self.read, str):
            if self.read != "auto":
                raise ValueError(f"UNOConfig.read must be 'auto', None or a ReadAugment, got {self.read!r}")
            self.read = ReadAugment.default() if self.view == "pixel" else None
        if self.read is not None and not isinstance(self.read, ReadAugment):
            raise TypeError(
                f"UNOConfig.read must be 'auto', None or a uno_engine.ReadAugment, "
                f"got {type(self.read).__name__}"
            )
        if self.read is not None and self.view == "representation":
            raise ValueError(
                "UNOConfig.read needs view='pixel' or 'latent'; the representation view has none"
            )
        if self.read is not None and self.view == "latent" and self.read.pixel_only:
            raise ValueError(
                f"UNOConfig(view='latent') cannot apply ReadAugment.{', ReadAugment.'.join(self.read.pixel_only)}"
                " (crop boxes, blur and pixel noise act on pixels in the bridge); the latent view reads with "
                "views=K and renoise=(t_min, t_max) only (docs/reading.md)"
            )
        lo, hi = self.input_range
        if not hi > lo:
            raise ValueError(
                f"UNOConfig.input_range must be (low, high) with high > low, got {self.input_range!r}"
            )
