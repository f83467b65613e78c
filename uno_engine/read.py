"""`ReadAugment`: how the critic reads each generated image. K random views per image, drawn in the bridge.

A critic without adversarial or noise training rewards textures on its patch grid (a one-pixel shift undoes
them). Reading every generated image under K random views and averaging the losses over them changes what the
gradient asks for. Each view is

- a crop box in the generated image: a sub-pixel offset of its centre (`shift`, uniform in [-shift, shift]
  per axis, in image pixels or, with `shift_unit="patch"`, in the critic's vision patches) and a size `s`
  times the image's (`scale` = (lo, hi), s uniform; s < 1 zooms in).
  The bridge resamples the box to the processor's size with Pillow's own coefficients for a box
  (`Resample.c::precompute_coeffs(in0, in1)`: centre of output i at in0 + (i + 0.5) * (in1 - in0) / out,
  antialiased support, taps clipped to the image and renormalised): the processor reading that crop. The
  view's canvas (crop or pad, normalisation, layout) is the full image's;
- optionally a Gaussian blur of std `blur` image pixels (edges replicated), folded into each resampling pass's
  taps (the pass reads the image blurred along its axis; equal to blurring first except where Pillow's clip
  of the first pass bites);
- Gaussian pixel noise of std `noise` (input_range units), added to the processor's image (after the resize,
  before its last clip), and / or
- re-noising as a forward process (`renoise=(t_min, t_max)`, `schedule`): with x0 = 2u - 1 the processor's
  image on [-1, 1], the critic reads x_t = a(t) x0 + s(t) eps, clipped like the processor's uint8 image:
  "flow" a = 1 - t, s = t (t in [0, 1]); or a diffusers scheduler's `alphas_cumprod` (t an integer index,
  a = sqrt(ac[t]), s = sqrt(1 - ac[t])).

So a view's value at a canvas pixel is clip(alpha * r + beta + sigma * eps), r the Pillow-resampled box
(before its last clip), alpha = a, beta = (1 - a) / 2, sigma = sqrt((a * noise / (hi - lo))^2 + (s / 2)^2),
eps a standard-normal draw (`bridge_math.hash_normal`: a counter hash, the same numbers on every backend).

The default. `UNOConfig()` reads every generated image once, jittered: `ReadAugment.default()` = one view,
shift 0.75 of the critic's patch, scale 0.85-1.15, noise 0.15 (the learning world's probed reading: 3 px of
its 4-px patch). One view is one read, as the plain read is; `UNOConfig(read=None)` is the processor's exact
read.

Patch units. With `shift_unit="patch"` the shift is resolved per step where `UNOStep` draws
(`draw_for_step`): one patch in image pixels = the critic's `patch_size` (processor pixels) x (image side /
resized side), per axis, the resized side from the critic's `BridgeSpec.resized_size` (crop and pad do not
change the scale). `patch_size` is the vision tower's conv stride for every family (CLIP / SigLIP for LLaVA,
LLaVA-OneVision and Janus; the tower's own patch for Qwen2-VL and Qwen3-VL, not patch x merge): the grid a
hack locks onto is the patch embedding's, and +-0.75 of it covers every phase of that grid. Qwen's 2x2 merge
comes after the tower.

Draws. `ReadAugment.draw(B, H, W, step=, sample_offset=)` draws on the host (numpy), from
(seed, step, global sample index): reproducible, the same on every rank for the same global sample, no device
work and no host sync. `UNOStep` passes `batch["read_step"]` (an int; default: its own step counter) and
`batch["sample_offset"]` (the global index of the batch's first image; default rank * B under
torch.distributed). Views are ordered image-major: row b * K + k of the bridge output is view k of image b.

The latent view (`UNOConfig(view="latent")`, a diffusion generator read through a `LatentAdapter`) takes
`views` and `renoise` only: `renoise_latents` re-noises each generated latent by the forward process at each
view's drawn level, and the adapter is conditioned on that level (`uno_engine.latent.view`, "Reading"). Crop
boxes, blur and pixel noise act on pixels (`ReadAugment.pixel_only`) and are refused there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from uno_engine.bridge_spec import RESAMPLE_FILTERS, BridgeSpec

__all__ = [
    "ReadAugment",
    "Views",
    "box_taps",
    "DEFAULT_READ",
    "draw_for_step",
    "patch_in_image",
    "per_view",
    "renoise_latents",
    "view_matrices",
    "view_tap_tables",
]


@dataclass(frozen=True, kw_only=True)
class ReadAugment:
    """How the critic reads each generated image: `views` random views, averaged (module docstring)."""

    views: int = 1  # K views per generated image; the critic reads B * K images
    shift: float = 0.0  # max offset of a view box's centre per axis, in `shift_unit`s (uniform, sub-pixel)
    shift_unit: str = "pixel"  # "pixel" (image pixels) | "patch" (the critic's patches, resolved per step)
    scale: tuple[float, float] = (1.0, 1.0)  # the box's size relative to the image, uniform in [lo, hi]
    noise: float = 0.0  # std of Gaussian noise on the processor's image, in input_range units
    blur: float = (
        0.0  # std (image pixels) of a Gaussian blur before each axis's resample, folded into its taps
    )
    renoise: tuple[float, float] | None = None  # forward-process level t, uniform in [t_min, t_max]
    schedule: str | tuple[float, ...] = "flow"  # "flow" (x_t = (1-t) x0 + t eps) or alphas_cumprod values
    seed: int = 0  # base seed of the draws (with the step and the global sample index)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ReadAugment: {msg}")

        if not isinstance(self.views, int) or isinstance(self.views, bool) or self.views < 1:
            bad(f"views must be an int >= 1, got {self.views!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift >= 0):
            bad(f"shift must be a finite number >= 0 (in shift_unit), got {self.shift!r}")
        if self.shift_unit not in SHIFT_UNITS:
            bad(f"shift_unit must be 'pixel' or 'patch', got {self.shift_unit!r}")
        try:
            lo, hi = (float(v) for v in self.scale)
        except (TypeError, ValueError):
            bad(f"scale must be (lo, hi), two numbers, got {self.scale!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            bad(f"scale must be (lo, hi) with 0 < lo <= hi, finite, got {self.scale!r}")
        object.__setattr__(self, "scale", (lo, hi))
        for name in ("noise", "blur"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.schedule, str):
            if self.schedule != "flow":
                bad(f"schedule must be 'flow' or a sequence of alphas_cumprod, got {self.schedule!r}")
        else:
            try:
                ac = tuple(float(v) for v in torch.as_tensor(self.schedule).flatten().tolist())
            except (TypeError, ValueError, RuntimeError):
                bad(
                    f"schedule must be 'flow' or a sequence of alphas_cumprod, got {type(self.schedule).__name__}"
                )
            if not ac or not all(0.0 <= a <= 1.0 for a in ac):
                bad("schedule (alphas_cumprod) must be non-empty with values in [0, 1]")
            object.__setattr__(self, "schedule", ac)
        if self.renoise is not None:
            try:
                t0, t1 = (float(v) for v in self.renoise)
            except (TypeError, ValueError):
                bad(f"renoise must be (t_min, t_max), two numbers, or None, got {self.renoise!r}")
            top = 1.0 if self.schedule == "flow" else float(len(self.schedule) - 1)
            if not (0.0 <= t0 <= t1 <= top):
                bad(
                    f"renoise must be (t_min, t_max) with 0 <= t_min <= t_max <= {top:g} "
                    f"(schedule {'flow' if self.schedule == 'flow' else 'alphas_cumprod'}), got {self.renoise!r}"
                )
            object.__setattr__(self, "renoise", (t0, t1))
        if not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed must be an int >= 0, got {self.seed!r}")

    @classmethod
    def default(cls, **overrides) -> ReadAugment:
        """The default reading (`UNOConfig(read="auto")`, pixel view): one view, centre shift up to 0.75
        of the critic's patch, box scale 0.85-1.15, pixel noise 0.15 (docs/reading.md, "The default").
        `overrides` replace fields, e.g. `ReadAugment.default(views=4)`."""
        return cls(**{**DEFAULT_READ, **overrides})

    @property
    def jitter(self) -> bool:
        """Whether a view differs from the plain read (a box other than the image, noise or re-noising)."""
        return (
            self.shift > 0
            or self.scale != (1.0, 1.0)
            or self.noise > 0
            or self.blur > 0
            or self.renoise is not None
        )

    @property
    def pixel_only(self) -> list[str]:
        """The fields set here that only a pixel read can apply (a latent view refuses them): the crop box
        (`shift`, `scale`), `blur` and pixel `noise`."""
        on = (("shift", self.shift > 0), ("scale", self.scale != (1.0, 1.0)), ("blur", self.blur > 0))
        return [name for name, set_ in (*on, ("noise", self.noise > 0)) if set_]

    def draw(
        self,
        batch_size: int,
        height: int,
        width: int,
        *,
        step: int = 0,
        sample_offset: int = 0,
        patch: tuple[float, float] | None = None,
    ) -> Views:
        """The views of a batch of `batch_size` (height, width) images whose first image has the global index
        `sample_offset`, at `step`: image g's draws depend only on (seed, step, g). Host only (numpy).
        `patch`: (py, px) the critic's patch in image pixels (`patch_in_image`), for shift_unit="patch"."""
        for name, v in (("batch_size", batch_size), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ReadAugment.draw: {name} must be an int >= 1, got {v!r}")
        shift = np.full((2, 1), float(self.shift))  # (y, x) in image pixels
        if self.shift_unit == "patch":
            if patch is None:
                raise ValueError(
                    "ReadAugment.draw: shift_unit='patch' needs `patch`, the critic's patch in image pixels"
                )
            p = np.asarray(patch, dtype=np.float64).reshape(-1)
            if p.shape != (2,) or not (np.isfinite(p).all() and (p > 0).all()):
                raise ValueError(f"ReadAugment.draw: `patch` must be (py, px), both > 0, got {patch!r}")
            shift = shift * p[:, None]
        for name, v in (("step", step), ("sample_offset", sample_offset)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ReadAugment.draw: {name} must be an int >= 0, got {v!r}")
        K, V = self.views, batch_size * self.views
        dy, dx, s = np.zeros(V), np.zeros(V), np.ones(V)
        alpha, s_noise = np.ones(V), np.zeros(V)
        keys = np.zeros((V, 2), dtype=np.int64)
        for b in range(batch_size):
            rng = np.random.default_rng([self.seed, step, sample_offset + b])
            sl = slice(b * K, (b + 1) * K)
            keys[sl] = rng.integers(0, 1 << 32, size=(K, 2), dtype=np.int64)
            if self.shift > 0:
                dy[sl], dx[sl] = rng.uniform(-shift, shift, size=(2, K))
            if self.scale != (1.0, 1.0):
                s[sl] = rng.uniform(*self.scale, size=K)
            if self.renoise is not None:
                t = rng.uniform(*self.renoise, size=K)
                if self.schedule == "flow":
                    alpha[sl], s_noise[sl] = 1.0 - t, t
                else:
                    ac = np.asarray(self.schedule)[np.rint(t).astype(np.int64)]
                    alpha[sl], s_noise[sl] = np.sqrt(ac), np.sqrt(1.0 - ac)
        cy, cx = height / 2 + dy, width / 2 + dx
        hh, hw = s * height / 2, s * width / 2
        boxes = np.stack([cy - hh, cy + hh, cx - hw, cx + hw], axis=1)  # identity: exactly (0, H, 0, W)
        return Views(
            K, (height, width), boxes, alpha, s_noise, float(self.noise), keys, self.jitter, float(self.blur)
        )


class Views(NamedTuple):
    """Drawn views of a batch (host numpy; `ReadAugment.draw`). V = B * K rows, image-major."""

    per_image: int  # K
    image_size: tuple[int, int]  # (H, W) the boxes were drawn for
    boxes: np.ndarray  # (V, 4) float64 (y0, y1, x0, x1) in image pixels (continuous: pixel i spans [i, i+1))
    alpha: np.ndarray  # (V,) forward-process a(t) (1 without renoise)
    renoise_std: np.ndarray  # (V,) forward-process s(t) on the [-1, 1] scale (0 without renoise)
    noise: float  # pixel noise std in input_range units
    keys: np.ndarray  # (V, 2) int64 in [0, 2^32): the noise counters' keys
    jitter: bool  # False: every view is the plain read (identity box, no noise)
    blur: float = 0.0  # Gaussian blur std in image pixels (0: none), folded into the taps

    def affine(self, input_range: tuple[float, float]) -> np.ndarray:
        """(V, 3) float64 [alpha, beta, sigma] of clip(alpha * r + beta + sigma * eps) on the [0, 1] scale."""
        lo, hi = input_range
        a = self.alpha
        sigma = np.sqrt((a * self.noise / (hi - lo)) ** 2 + (self.renoise_std / 2) ** 2)
        return np.stack([a, (1.0 - a) / 2, sigma], axis=1)

    @property
    def noisy(self) -> bool:
        """Whether any view adds noise or re-noises (the epilogue's affine map is not the identity)."""
        return bool(self.noise > 0 or (self.renoise_std > 0).any() or (self.alpha != 1).any())

    def check(self, batch: int, H: int, W: int) -> None:
        """Raise ValueError (naming `views`) unless these views were drawn for `batch` (H, W) images."""
        if self.boxes.shape[0] != batch * self.per_image or tuple(self.image_size) != (H, W):
            raise ValueError(
                f"bridge: views were drawn for {self.boxes.shape[0] // self.per_image} images of "
                f"{tuple(self.image_size)}, got images {(batch, 3, H, W)}"
            )


SHIFT_UNITS = ("pixel", "patch")
# the default reading (ReadAugment.default(), UNOConfig(read="auto")): docs/reading.md "The default"
DEFAULT_READ = dict(views=1, shift=0.75, shift_unit="patch", scale=(0.85, 1.15), noise=0.15)


# ------------------------------------------------------------------------------------------ the step
def patch_in_image(spec: BridgeSpec, patch_size: int, height: int, width: int) -> tuple[float, float]:
    """(py, px): a critic patch of `patch_size` processor pixels in the pixels of a (height, width) image the
    processor resizes to `spec.resized_size(height, width)` (per axis: patch_size * side / resized side)."""
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_in_image: patch_size must be an int >= 1, got {patch_size!r}")
    h, w = spec.resized_size(height, width)
    return patch_size * height / h, patch_size * width / w


def draw_for_step(
    read: ReadAugment, images: torch.Tensor, batch: dict, counter: int, critic=None
) -> Views | None:
    """The views of a step's generated images (B, 3, H, W), or of its `GeneratedLatents` (B latents of
    their grid (h, w)): step = batch["read_step"] (an int, e.g. the
    trainer's global step) or `counter` (UNOStep's own count of forward calls); the global index of the first
    image = batch["sample_offset"] or rank * B under torch.distributed (0 otherwise). With
    shift_unit="patch", the shift is in the `critic`'s patches (its `patch_size` and `spec`; patch_in_image).
    Host only. None for empty images (the bridge then refuses them)."""
    import torch.distributed as dist

    if getattr(images, "kind", None) in ("latents", "tokens"):  # the latent view (GeneratedLatents): its grid
        B, (H, W) = images.batch_size, images.grid
    else:
        B, _, H, W = images.shape
    if B * H * W == 0:
        return None  # nothing to draw: the bridge refuses empty images, naming them
    step = batch.get("read_step", counter)
    offset = batch.get("sample_offset")
    if offset is None:
        offset = B * dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    for name, v in (("read_step", step), ("sample_offset", offset)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"batch['{name}'] must be a Python int >= 0 (read on the host), got {v!r}")
    patch = None
    if read.shift_unit == "patch":
        size = getattr(critic, "patch_size", None)
        if size is None:
            raise ValueError(
                f"ReadAugment(shift_unit='patch'): the critic ({type(critic).__name__}) has no `patch_size`; "
                "give the shift in image pixels (shift_unit='pixel') or read=None"
            )
        patch = patch_in_image(critic.spec, int(size), H, W)
    return read.draw(B, H, W, step=step, sample_offset=offset, patch=patch)


def renoise_latents(x0: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent view's noise-aware reading: x0 (B, C, h, w) -> (x_t (B * K, C, h, w) in x0's dtype, sigma
    (B * K,) float32). Row v = b * K + k reads view k of latent b re-noised by the forward process,
    x_t = alpha_v x0[b] + sigma_v eps_v, with (alpha_v, sigma_v) = (views.alpha, views.renoise_std) (flow:
    1 - t, t; alphas_cumprod: sqrt(ac[t]), sqrt(1 - ac[t])) and eps_v = `hash_normal(views.keys[v], C h w)`
    over the latent's elements in (C, h, w) order: the draw of (seed, step, global sample index), the same on
    every rank and backend. The gradient to x0 sums alpha_v g_v over the K views (autograd)."""
    if not isinstance(views, Views):
        raise TypeError(f"renoise_latents: views must be uno_engine.read.Views, got {type(views).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4 or not x0.is_floating_point():
        got = f"{tuple(x0.shape)} {x0.dtype}" if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"renoise_latents: x0 must be a float (B, C, h, w) tensor, got {got}")
    B, C, h, w = x0.shape
    if views.boxes.shape[0] != B * views.per_image or tuple(views.image_size) != (h, w):
        raise ValueError(
            f"renoise_latents: views were drawn for {views.boxes.shape[0] // views.per_image} latents of "
            f"{tuple(views.image_size)}, got x0 {tuple(x0.shape)}"
        )
    from uno_engine.bridge_math import hash_normal

    dev = x0.device
    alpha = torch.from_numpy(views.alpha).to(device=dev, dtype=x0.dtype).view(-1, 1, 1, 1)
    sigma = torch.from_numpy(views.renoise_std).to(device=dev, dtype=torch.float32)
    eps = hash_normal(torch.from_numpy(views.keys).to(dev), C * h * w).view(-1, C, h, w).to(x0.dtype)
    x_t = alpha * per_view(views.per_image, x0) + sigma.to(x0.dtype).view(-1, 1, 1, 1) * eps
    return x_t, sigma


def per_view(K: int, *tensors):
    """Each (B, ...) tensor (None passes) as (B * K, ...) rows, row b * K + k = row b: the rows of the K views
    of image b. `repeat_interleave` (a copy): the critic's sequence assembly and the embedding need contiguous
    rows; caption ids and masks are small next to the (B * K, L, H) hidden states the critic makes anyway."""
    out = tuple(None if t is None or K == 1 else t.repeat_interleave(K, dim=0) for t in tensors)
    out = tuple(t if o is None else o for t, o in zip(tensors, out, strict=True))
    return out if len(out) > 1 else out[0]


# ---------------------------------------------------------------------------------- Pillow box taps
def box_taps(n_in: int, n_out: int, lo: np.ndarray, hi: np.ndarray, resample: str = "bicubic"):
    """Pillow's 1-D resampling coefficients of a box [lo, hi) of an n_in-pixel axis to n_out pixels
    (`Resample.c::precompute_coeffs(inSize, in0, in1, outSize)`), for V boxes at once.

    lo, hi: (V,) float64. Returns (start (V, n_out) int64, weights (V, n_out, K) float64, count (V, n_out)):
    output o of box v is sum_k weights[v, o, k] * src[start[v, o] + k], k < count[v, o]. A box (0, n_in)
    gives `bridge_spec.pil_resize_matrix`'s rows (equal in float32; in float64 up to the order of the
    normalising sum, here sequential over the taps)."""
    filt, base = RESAMPLE_FILTERS[resample]
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    scale = (hi - lo) / n_out  # (V,)
    fs = np.maximum(scale, 1.0)
    support = base * fs
    center = lo[:, None] + (np.arange(n_out) + 0.5) * scale[:, None]  # (V, n_out)
    first = np.maximum(np.trunc(center - support[:, None] + 0.5).astype(np.int64), 0)  # C int(): truncation
    last = np.minimum(np.trunc(center + support[:, None] + 0.5).astype(np.int64), n_in)
    count = np.maximum(last - first, 0)
    K = max(int(count.max()), 1)
    k = np.arange(K)
    w = filt((first[..., None] + k - center[..., None] + 0.5) / fs[:, None, None])
    w = np.where(k < count[..., None], w, 0.0)
    total = np.zeros(center.shape)
    for i in range(K):  # sequential, as Pillow's loop
        total = total + w[..., i]
    w = w / np.where(total != 0.0, total, 1.0)[..., None]
    return np.minimum(first, n_in - 1), w, count


def _blur_taps(start, wt, count, n_in: int, sigma: float):
    """The taps of (resample o blur): each row's taps convolved with a normalised Gaussian of std `sigma`
    (radius ceil(3 sigma)), edges replicated (taps past an edge add to the edge pixel)."""
    R = max(int(math.ceil(3 * sigma)), 1)
    g = np.exp(-0.5 * (np.arange(-R, R + 1) / sigma) ** 2)
    g /= g.sum()
    V, n, K = wt.shape
    new_start = np.maximum(start - R, 0)
    KB = K + 2 * R
    out = np.zeros((V, n, KB))
    vi, oi = np.meshgrid(np.arange(V), np.arange(n), indexing="ij")
    for k in range(K):  # tap k of the resample reads pixel start + k, which the blur spreads over +-R
        wk = np.where(k < count, wt[..., k], 0.0)
        for m in range(2 * R + 1):
            src = np.clip(start + k + m - R, 0, n_in - 1)
            np.add.at(out, (vi, oi, src - new_start), wk * g[m])
    last = np.minimum(start + count + R, n_in)  # exclusive end of the blurred band
    new_count = np.where(count > 0, last - new_start, 0)
    return np.minimum(new_start, n_in - 1), out[..., : max(int(new_count.max()), 1)], new_count


def _canvas_taps(spec: BridgeSpec, H: int, W: int, views: Views):
    """Per axis (y, x): (start (V, n_canvas), weights (V, n_canvas, K), count) of each view's canvas rows
    (columns): the box resampled to the resized size, placed on the canvas like the full image (rows outside
    the image region: no taps)."""
    h, w = spec.resized_size(H, W)
    hc, wc = spec.output_size(H, W)
    oy, ox = spec.placement(H, W)
    out = []
    for n_in, n_out, n_canvas, off, (a, b) in (
        (H, h, hc, oy, (views.boxes[:, 0], views.boxes[:, 1])),
        (W, w, wc, ox, (views.boxes[:, 2], views.boxes[:, 3])),
    ):
        start, wt, count = box_taps(n_in, n_out, a, b, spec.resample)
        if views.blur > 0:
            start, wt, count = _blur_taps(start, wt, count, n_in, views.blur)
        V, K = wt.shape[0], wt.shape[2]
        cs = np.zeros((V, n_canvas), dtype=np.int64)
        cw = np.zeros((V, n_canvas, K))
        cc = np.zeros((V, n_canvas), dtype=np.int64)
        lo_, hi_ = max(off, 0), min(off + n_out, n_canvas)
        cs[:, lo_:hi_], cw[:, lo_:hi_], cc[:, lo_:hi_] = (
            start[:, lo_ - off : hi_ - off], wt[:, lo_ - off : hi_ - off], count[:, lo_ - off : hi_ - off]
        )  # fmt: skip
        out.append((cs, cw, cc))
    return out


def view_matrices(spec: BridgeSpec, H: int, W: int, views: Views) -> tuple[np.ndarray, np.ndarray]:
    """(Wy (V, Hc, H), Wx (V, Wc, W)) float64 dense canvas matrices of each view (the torch path and the
    eager reference; for the identity box they are `spec.resize_matrices(H, W)` up to float64 rounding)."""
    mats = []
    for (start, wt, count), n_in in zip(_canvas_taps(spec, H, W, views), (H, W), strict=True):
        V, n, K = wt.shape
        dense = np.zeros((V, n, n_in + K))  # room past the last column for the zero-weight padding taps
        idx = start[..., None] + np.arange(K)
        np.put_along_axis(dense, idx, np.where(np.arange(K) < count[..., None], wt, 0.0), axis=2)
        mats.append(dense[:, :, :n_in])
    return mats[0], mats[1]


def view_tap_tables(spec: BridgeSpec, H: int, W: int, views: Views) -> dict:
    """Each view's tap tables for the Triton kernels, the layout of `kernels.bridge_taps.tap_tables` with a
    leading view axis: ys (V, Hc) int32, wy (V, Hc, KY) fp32, xs, wx; and the transposed tables (for the
    backward's gathers: for each image row, the first canvas row of that view that reads it, and the
    weights) oys (V, H), wyT (V, H, KTY), oxs, wxT; plus the int counts KY, KX, KTY, KTX."""
    out = {}
    for name, (start, wt, count), n_in in zip("yx", _canvas_taps(spec, H, W, views), (H, W), strict=True):
        V, n, K = wt.shape
        out[name + "s"] = start.astype(np.int32)
        out["w" + name] = wt.astype(np.float32)
        out["K" + name.upper()] = K
        # transposed: canvas rows o with start[o] <= j < start[o] + count[o] (both monotone in o)
        end = np.where(count > 0, start + count, 0)
        end = np.maximum.accumulate(end, axis=1)  # rows without taps (padding) keep the order
        beg = np.where(count > 0, start, n_in)
        beg = np.minimum.accumulate(beg[:, ::-1], axis=1)[:, ::-1]
        j = np.arange(n_in)
        o_first = np.stack([np.searchsorted(end[v], j, side="right") for v in range(V)])  # (V, n_in)
        o_last = np.stack([np.searchsorted(beg[v], j, side="right") for v in range(V)]) - 1
        KT = max(int((o_last - o_first + 1).max()), 1)
        o = o_first[..., None] + np.arange(KT)  # (V, n_in, KT)
        ok = o <= o_last[..., None]
        oc = np.minimum(o, n - 1)
        s_o = np.take_along_axis(start[:, :, None], oc, axis=1)  # start of canvas row o
        c_o = np.take_along_axis(count[:, :, None], oc, axis=1)
        rel = j[None, :, None] - s_o
        ok &= (rel >= 0) & (rel < c_o)
        wT = wt[np.arange(V)[:, None, None], oc, np.clip(rel, 0, K - 1)]  # (V, n_in, KT)
        out["o" + name + "s"] = np.minimum(o_first, n - 1).astype(np.int32)
        out["w" + name + "T"] = np.where(ok, wT, 0.0).astype(np.float32)
        out["KT" + name.upper()] = KT
    return out
