"""`BridgeSpec`: what a critic's HF image processor does to an image, as data.

The bridge (`uno_engine.ops.bridge`, eager twin `uno_engine.reference.bridge`) turns a generated image into
exactly the critic input the processor's PIL path would make of it. The processor steps it captures:

1. size rule (`resize`): "exact" (SigLIP: to `size`), "shortest_edge" (CLIP/LLaVA: shortest edge to
   `shortest_edge`, the other one `int(s * long / short)`), "longest_edge" (Janus: longest edge to `size[0]`,
   the other `max(round(edge * s / long), min_size)`), "smart" (Qwen2-VL `smart_resize`: multiples of
   patch*merge, pixel count within [min_pixels, max_pixels]) or "none";
2. resample filter as Pillow computes it (`Resample.c::precompute_coeffs`): Keys cubic a = -0.5 ("bicubic") or
   the triangle ("bilinear"), support scaled by the downscale factor (antialiasing), sampled at PIL's pixel
   centres and normalised per output pixel; Pillow's 8-bit path clips each 1-D pass to [0, 255]
   (`clip_each_pass`), so the pass order matters where a pass clips (`pass_order`, `vertical_first`);
3. an optional center crop (`crop_size`, zero-padded like `image_transforms.center_crop` when too small) or a
   pad to square with `background_color` (Janus);
4. rescale (`rescale_factor`) and normalize (`image_mean`, `image_std`);
5. the output layout: "nchw" `pixel_values`, or "qwen2_vl" flattened patches (B*gh*gw, 3*T*p*p) in
   Qwen2VLImageProcessor order, with `image_grid_thw`. Qwen2-VL, Qwen2.5-VL and Qwen3-VL share it (Qwen3-VL
   checkpoints ship a Qwen2VLImageProcessor with patch 16, merge 2, mean = std = 0.5).

All resampling is written as two matrices on a *canvas* (the final image after crop or pad):
`resized = clip(Wy @ clip(u @ Wx^T))`, with `Wy: (Hc, H)`, `Wx: (Wc, W)`, zero rows where the canvas shows
padding. `u` is the image mapped to [0, 1] (the processor's uint8 value / 255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

RESIZE_RULES = ("exact", "shortest_edge", "longest_edge", "smart", "none")
RESAMPLES = ("bicubic", "bilinear")
LAYOUTS = ("nchw", "qwen2_vl")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------- Pillow's filters
def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's `bicubic_filter` (Keys, a = -0.5), support 2."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    """Pillow's `bilinear_filter` (triangle), support 1."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}
RESAMPLE_FILTERS = _FILTERS  # resample name -> (Pillow's filter, its support): public for `uno_engine.read`


@lru_cache(maxsize=256)
def pil_resize_matrix(in_size: int, out_size: int, resample: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) float64 matrix of Pillow's 1-D resampling weights (`precompute_coeffs`).

    scale = in/out; filterscale = max(scale, 1) (antialiasing widens the filter when downscaling);
    output pixel i is centred at (i + 0.5) * scale; taps j in [int(c - support + .5), int(c + support + .5))
    clipped to the image, weight filter((j - c + 0.5) / filterscale), normalised to sum 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    filt, base_support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C int(): truncation toward zero, as in Pillow
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi, dtype=np.float64)
        w = filt((taps - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        m[i, lo:hi] = w
    return m


def _round_half_even(x: float) -> int:
    return int(round(x))  # Python's round, as the processors use


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL `smart_resize` (transformers `image_processing_qwen2_vl.py`)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True, kw_only=True)
class BridgeSpec:
    """An HF image processor's steps, as the bridge runs them (see the module docstring)."""

    resize: str = "exact"  # size rule: one of RESIZE_RULES
    size: tuple[int, int] | None = None  # (h, w) for "exact"; (s, s) target for "longest_edge"
    shortest_edge: int | None = None  # target of the shortest edge ("shortest_edge")
    min_size: int = 1  # floor of each resized edge ("longest_edge"; Janus uses 14)
    min_pixels: int | None = None  # "smart": lower bound of h*w
    max_pixels: int | None = None  # "smart": upper bound of h*w
    resample: str = "bicubic"  # "bicubic" (Pillow Keys a=-0.5, antialiased) or "bilinear"
    clip_each_pass: bool = True  # clip to [0, 1] after each 1-D pass, as Pillow's 8-bit path does
    pass_order: str = "auto"  # "horizontal_first" | "vertical_first" | "auto" (see `vertical_first`)
    crop_size: tuple[int, int] | None = None  # center crop (h, w) after the resize, or None
    pad_to_square: bool = False  # pad the resized image to a centred square (Janus)
    background_color: tuple[int, int, int] = (0, 0, 0)  # pad colour on the 0..255 scale
    do_rescale: bool = True  # multiply the 0..255 values by rescale_factor
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True  # (x - mean) / std per channel
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    layout: str = "nchw"  # "nchw" pixel_values, or "qwen2_vl" flattened patches
    patch_size: int | None = None  # vision patch size (required by "qwen2_vl" and "smart")
    merge_size: int = 1  # Qwen2-VL spatial merge size
    temporal_patch_size: int = 1  # Qwen2-VL temporal patch (the still image is repeated this many times)
    source: str = field(default="", compare=False)  # the processor class it was read from (for messages)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"BridgeSpec{f' (from {self.source})' if self.source else ''}: {msg}")

        if self.resize not in RESIZE_RULES:
            bad(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.resample not in RESAMPLES:
            bad(f"resample must be one of {RESAMPLES}, got {self.resample!r}")
        if self.pass_order not in ("auto", "horizontal_first", "vertical_first"):
            bad(f"pass_order must be 'auto', 'horizontal_first' or 'vertical_first', got {self.pass_order!r}")
        if self.layout not in LAYOUTS:
            bad(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.resize == "exact" and (self.size is None or min(self.size) < 1):
            bad(f"resize='exact' needs size=(h, w), got {self.size}")
        if self.resize == "shortest_edge" and not self.shortest_edge:
            bad("resize='shortest_edge' needs shortest_edge")
        if self.resize == "longest_edge" and (self.size is None or self.size[0] != self.size[1]):
            bad(f"resize='longest_edge' needs a square size=(s, s), got {self.size}")
        if self.resize == "smart" and (not self.patch_size or not self.min_pixels or not self.max_pixels):
            bad("resize='smart' needs patch_size, merge_size, min_pixels and max_pixels")
        if self.crop_size is not None and self.pad_to_square:
            bad("crop_size and pad_to_square cannot both be set")
        for name in ("image_mean", "image_std", "background_color"):
            if len(getattr(self, name)) != 3:
                bad(f"{name} must have 3 entries (RGB), got {getattr(self, name)}")
        if any(s == 0 for s in self.image_std):
            bad(f"image_std must be nonzero, got {self.image_std}")
        if self.layout == "qwen2_vl":
            if not self.patch_size or self.merge_size < 1 or self.temporal_patch_size < 1:
                bad("layout='qwen2_vl' needs patch_size, merge_size and temporal_patch_size")
            if self.resize != "smart" or self.crop_size is not None or self.pad_to_square:
                bad(
                    "layout='qwen2_vl' needs resize='smart' (sizes in multiples of patch_size*merge_size) "
                    "and no "
                    f"crop or pad, got resize={self.resize!r}, crop_size={self.crop_size}, "
                    f"pad_to_square={self.pad_to_square}"
                )

    # ------------------------------------------------------------------------------------- from HF
    @classmethod
    def from_image_processor(cls, processor) -> BridgeSpec:
        """Read an HF image processor (slow PIL or fast torchvision class) of SigLIP, CLIP/LLaVA, Janus,
        LLaVA-OneVision (one tile only) or Qwen2-VL (Qwen2.5-VL, Qwen3-VL) into a spec. Raises TypeError for
        other processors and ValueError for settings the bridge does not reproduce (e.g. LLaVA's
        pad-before-resize, LLaVA-OneVision's anyres tiles)."""
        name = type(processor).__name__
        if not hasattr(processor, "size") or not hasattr(processor, "image_mean"):
            raise TypeError(
                f"BridgeSpec.from_image_processor: {name} is not an HF image processor "
                "(no size / image_mean). "
                "Supported: SigLIP, CLIP/LLaVA, Janus, Qwen2-VL image processors (slow or fast)."
            )

        def get(d, key):
            if d is None:
                return None
            if isinstance(d, dict):
                return d.get(key)
            return getattr(d, key, None)

        size = processor.size
        do_resize = getattr(processor, "do_resize", True)
        kw: dict = dict(source=name)
        kw["resample"] = _resample_name(getattr(processor, "resample", 2), name)
        kw["do_rescale"] = bool(getattr(processor, "do_rescale", True))
        kw["rescale_factor"] = float(getattr(processor, "rescale_factor", 1 / 255))
        kw["do_normalize"] = bool(getattr(processor, "do_normalize", True))
        mean, std = processor.image_mean, processor.image_std
        kw["image_mean"] = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
        kw["image_std"] = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))

        is_qwen = (
            "Qwen2VL" in name
            or "Qwen2_5_VL" in name
            or (hasattr(processor, "merge_size") and hasattr(processor, "temporal_patch_size"))
        )
        is_janus = "Janus" in name
        if is_qwen:
            min_pixels = get(size, "shortest_edge") or getattr(processor, "min_pixels", None)
            max_pixels = get(size, "longest_edge") or getattr(processor, "max_pixels", None)
            kw.update(
                resize="smart" if do_resize else "none",
                min_pixels=int(min_pixels),
                max_pixels=int(max_pixels),
                patch_size=int(processor.patch_size),
                merge_size=int(processor.merge_size),
                temporal_patch_size=int(processor.temporal_patch_size),
                layout="qwen2_vl",
            )
            if not do_resize:
                raise ValueError(f"{name} with do_resize=False is not supported by the bridge")
            return cls(**kw)
        if is_janus:
            h, w = get(size, "height"), get(size, "width")
            kw.update(
                resize="longest_edge" if do_resize else "none",
                size=(int(h), int(w)),
                min_size=int(getattr(processor, "min_size", 14) or 1),
            )
            if getattr(processor, "do_pad", True):
                bg = getattr(processor, "background_color", None)
                if bg is None:
                    bg = tuple(int(x * 255) for x in kw["image_mean"])
                bg = (int(bg),) * 3 if isinstance(bg, (int, float)) else tuple(int(b) for b in bg)
                kw.update(pad_to_square=True, background_color=bg)
            return cls(**kw)
        if "LlavaOnevision" in name:
            # anyres: the base view (an exact resize to `size`) and the tiles of the best of
            # `image_grid_pinpoints` (`do_pad` only pads the tile count for batching). The bridge makes one
            # view: the base. With image_grid_pinpoints == [[h, w]] the one tile of a square image is that
            # same view (critics/llava_onevision.py); more pinpoints tile, which the bridge does not make.
            h, w = int(get(size, "height")), int(get(size, "width"))
            pins = getattr(processor, "image_grid_pinpoints", None) or []
            pins = [tuple(int(v) for v in p) for p in pins]
            if pins != [(h, w)]:
                raise ValueError(
                    f"{name}: image_grid_pinpoints={[list(p) for p in pins]} tiles "
                    f"the image (anyres), which the bridge does not reproduce; set "
                    f"processor.image_grid_pinpoints = [[{h}, {w}]] (one tile: the base view)"
                )
            return cls(resize="exact", size=(h, w), **kw)
        if getattr(processor, "do_pad", False):
            raise ValueError(
                f"{name} with do_pad=True (pad to square before the resize) is not supported by the bridge; "
                "set processor.do_pad = False"
            )
        if not do_resize:
            kw["resize"] = "none"
        elif get(size, "shortest_edge") and not get(size, "longest_edge"):
            kw.update(resize="shortest_edge", shortest_edge=int(get(size, "shortest_edge")))
        elif get(size, "height") and get(size, "width"):
            kw.update(resize="exact", size=(int(get(size, "height")), int(get(size, "width"))))
        else:
            raise ValueError(
                f"{name}: size {size} is not a rule the bridge reproduces (exact, shortest_edge)"
            )
        if getattr(processor, "do_center_crop", False):
            crop = processor.crop_size
            kw["crop_size"] = (int(get(crop, "height")), int(get(crop, "width")))
        return cls(**kw)

    # ----------------------------------------------------------------------------------- geometry
    def resized_size(self, H: int, W: int) -> tuple[int, int]:
        """(h, w) of the image right after the resize (before crop or pad), for an (H, W) input."""
        if self.resize == "none":
            return H, W
        if self.resize == "exact":
            return int(self.size[0]), int(self.size[1])
        if self.resize == "shortest_edge":
            s = self.shortest_edge
            short, long = (W, H) if W <= H else (H, W)
            new_long = int(s * long / short)
            return (new_long, s) if W <= H else (s, new_long)
        if self.resize == "longest_edge":
            target = self.size[0]
            delta = target / max(H, W)
            return max(_round_half_even(H * delta), self.min_size), max(
                _round_half_even(W * delta), self.min_size
            )
        factor = self.patch_size * self.merge_size
        return smart_resize(H, W, factor, self.min_pixels, self.max_pixels)

    def vertical_first(self, H: int, W: int) -> bool:
        """Whether the vertical pass runs first. The order matters only where a pass clips (Pillow's uint8
        path). Pillow < 13 always runs the horizontal pass first; Pillow >= 13 (python-pillow/Pillow#9549)
        runs the vertical pass first when the height shrinks by more than twice as many pixels as the width
        (h < H and H - h > 2 * (W - w); measured against Pillow 13.0's 8-bit output on 198 random shapes, no
        exception). "auto" follows the Pillow installed here, i.e. what the processor would do here."""
        if self.pass_order != "auto":
            return self.pass_order == "vertical_first"
        if _pillow_major() < 13:
            return False
        h, w = self.resized_size(H, W)
        return h < H and (H - h) > 2 * (W - w)

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """(h, w) of the critic image (after crop or pad) for an (H, W) input."""
        h, w = self.resized_size(H, W)
        if self.crop_size is not None:
            return int(self.crop_size[0]), int(self.crop_size[1])
        if self.pad_to_square:
            m = max(h, w)
            return m, m
        return h, w

    def placement(self, H: int, W: int) -> tuple[int, int]:
        """(row, col) offset of the resized image on the output canvas (negative: cropped away)."""
        h, w = self.resized_size(H, W)
        hc, wc = self.output_size(H, W)
        if self.crop_size is not None:
            # image_transforms.center_crop: top = (h - hc) // 2; when the image is smaller, it is first
            # zero-padded by ceil((hc - h) / 2) on top.
            def off(n, c):
                return -((n - c) // 2) if n >= c else math.ceil((c - n) / 2)

            return off(h, hc), off(w, wc)
        if self.pad_to_square:
            return (hc - h) // 2, (wc - w) // 2
        return 0, 0

    def region(self, H: int, W: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1): the canvas rectangle that shows the image; the rest is fill."""
        h, w = self.resized_size(H, W)
        hc, wc = self.output_size(H, W)
        oy, ox = self.placement(H, W)
        return max(oy, 0), min(oy + h, hc), max(ox, 0), min(ox + w, wc)

    def fill_values(self) -> tuple[float, float, float]:
        """Per-channel value (on the [0, 1] scale of u) of canvas pixels outside the image."""
        if self.pad_to_square:
            return tuple(b / 255.0 for b in self.background_color)
        return (0.0, 0.0, 0.0)

    def normalize_affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(scale, shift) per channel so that critic value = u * scale + shift (u = uint8 value / 255)."""
        a = 255.0 * (self.rescale_factor if self.do_rescale else 1.0)
        if self.do_normalize:
            return (
                tuple(a / s for s in self.image_std),
                tuple(-m / s for m, s in zip(self.image_mean, self.image_std, strict=True)),
            )
        return (a, a, a), (0.0, 0.0, 0.0)

    def resize_matrices(self, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
        """(Wy (Hc, H), Wx (Wc, W)) float64 canvas weights: rows outside the image region are zero."""
        return _canvas_matrices(self, H, W)

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """(gh, gw) patch grid of the critic image (patch_size required)."""
        if not self.patch_size:
            raise ValueError("BridgeSpec.grid needs patch_size")
        h, w = self.output_size(H, W)
        return h // self.patch_size, w // self.patch_size

    def image_grid_thw(self, batch: int, H: int, W: int, device=None) -> torch.Tensor:
        """(batch, 3) int64 `image_grid_thw` rows [1, gh, gw] (layout 'qwen2_vl' only)."""
        if self.layout != "qwen2_vl":
            raise ValueError(
                f"image_grid_thw is defined for layout='qwen2_vl' only (this spec: {self.layout!r})"
            )
        gh, gw = self.grid(H, W)
        return torch.tensor([[1, gh, gw]], dtype=torch.int64, device=device).expand(batch, 3).contiguous()

    def check_input_size(self, H: int, W: int) -> None:
        """Raise ValueError when (H, W) gives an output the layout cannot take."""
        hc, wc = self.output_size(H, W)
        if self.layout == "qwen2_vl":
            f = self.patch_size * self.merge_size
            if hc % f or wc % f:
                raise ValueError(
                    f"spec layout 'qwen2_vl' needs an output size in multiples of patch_size*merge_size={f}, "
                    f"got {(hc, wc)} for input {(H, W)}"
                )


@lru_cache(maxsize=1)
def _pillow_major() -> int:
    try:
        import PIL

        return int(PIL.__version__.split(".")[0])
    except Exception:  # noqa: BLE001  (no Pillow: the classic order)
        return 0


def _resample_name(resample, proc_name: str) -> str:
    """PILImageResampling / int / torchvision InterpolationMode / str -> 'bicubic' | 'bilinear'."""
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        value = value.lower()
    table = {3: "bicubic", 2: "bilinear", "bicubic": "bicubic", "bilinear": "bilinear"}
    if value not in table:
        raise ValueError(
            f"{proc_name}: resample {resample!r} is not supported by the bridge (bicubic, bilinear)"
        )
    return table[value]


@lru_cache(maxsize=128)
def _canvas_matrices(spec: BridgeSpec, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = spec.resized_size(H, W)
    hc, wc = spec.output_size(H, W)
    oy, ox = spec.placement(H, W)
    mats = []
    for n_in, n_out, n_canvas, off in ((H, h, hc, oy), (W, w, wc, ox)):
        m = pil_resize_matrix(n_in, n_out, spec.resample)
        canvas = np.zeros((n_canvas, n_in), dtype=np.float64)
        lo, hi = max(off, 0), min(off + n_out, n_canvas)
        canvas[lo:hi] = m[lo - off : hi - off]
        canvas.setflags(write=False)
        mats.append(canvas)
    return mats[0], mats[1]


@lru_cache(maxsize=64)
def _cached_tensors(spec: BridgeSpec, H: int, W: int, device: torch.device, dtype: torch.dtype):
    wy, wx = _canvas_matrices(spec, H, W)
    scale, shift = spec.normalize_affine()
    consts = torch.tensor([scale, shift, spec.fill_values()], dtype=torch.float64).T.contiguous()  # (3, 3)
    return (
        torch.from_numpy(np.array(wy)).to(device=device, dtype=dtype),
        torch.from_numpy(np.array(wx)).to(device=device, dtype=dtype),
        consts.to(device=device, dtype=dtype),
    )


def bridge_tensors(spec: BridgeSpec, H: int, W: int, device, dtype=torch.float32):
    """(wy (Hc, H), wx (Wc, W), consts (3, 3) = per channel [scale, shift, fill]) on `device` in `dtype`,
    cached per (spec, H, W, device, dtype) so the host builds and copies them once."""
    return _cached_tensors(spec, int(H), int(W), torch.device(device), dtype)
