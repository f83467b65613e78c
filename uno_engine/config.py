"""Configuration dataclasses for the UNO step."""

from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self):
        if self.backend not in ("auto", "triton", "torch", "reference"):
            raise ValueError(f"UNOConfig.backend must be auto|triton|torch|reference, got {self.backend!r}")
        if self.clamp not in ("clamp", "straight_through"):
            raise ValueError(f"UNOConfig.clamp must be 'clamp' or 'straight_through', got {self.clamp!r}")
        if not (isinstance(self.fuse_patch_embed, bool) or self.fuse_patch_embed == "auto"):
            raise ValueError(
                f"UNOConfig.fuse_patch_embed must be True, False or 'auto', got {self.fuse_patch_embed!r}"
            )
        lo, hi = self.input_range
        if not hi > lo:
            raise ValueError(
                f"UNOConfig.input_range must be (low, high) with high > low, got {self.input_range!r}"
            )
