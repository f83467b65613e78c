"""Density and structure targets of reference images over the critic's patch grid, and caption packing.

Definition (one for every version: torch, C++ `uno_engine._C`, numpy fallback):
- Luminance on [0, 1]: Y = 0.299 R + 0.587 G + 0.114 B, with R, G, B = (x + 1) / 2 for float images in
  [-1, 1] (not clamped) and u / 255 for uint8 images.
- Borders replicate (the row above row 0 is row 0, and so on).
- density, per pixel: (Y[r, c+1] - Y[r, c])^2 + (Y[r+1, c] - Y[r, c])^2 (forward differences; 0 across the
  last row / column): the gradient energy, large on fine texture.
- structure, per pixel: sqrt(Gx^2 + Gy^2), Gx and Gy the 3x3 Sobel responses divided by 8 (so a unit step
  gives 1/2 on the edge): the edge map.
- Grid (gh, gw) (an int g means (g, g)): cell (a, b) covers rows [floor(a H / gh), floor((a+1) H / gh)) and
  columns [floor(b W / gw), floor((b+1) W / gw)): a partition of the image whose cells differ in size by at
  most one pixel when H, W are not multiples of the grid. 1 <= gh <= H and 1 <= gw <= W, else ValueError.
- Target of a cell: the mean of the per-pixel value over the cell; cells in row-major order (a * gw + b),
  matching the critic's patch order N = gh * gw.

Versions:
- torch tensor (B, 3, H, W) float in [-1, 1], any device -> (B, gh*gw) float32 on that device (no gradient).
- numpy uint8 HWC (H, W, 3) -> (gh*gw,) or (B, H, W, 3) -> (B, gh*gw) float32 numpy: uno_engine._C when
  built (C++, GIL released, OpenMP threads), else the numpy fallback with a one-time warning. The two
  agree with the torch version within 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uno_engine import _ext

LUMA = (0.299, 0.587, 0.114)
IMPLS = ("auto", "cpp", "python")


# ------------------------------------------------------------------------------------------------- checks
def _parse_grid(grid) -> tuple[int, int]:
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        return int(grid), int(grid)
    if isinstance(grid, Sequence) and len(grid) == 2 and all(isinstance(g, (int, np.integer)) for g in grid):
        return int(grid[0]), int(grid[1])
    raise TypeError(f"grid must be an int or a (gh, gw) pair of ints, got {grid!r}")


def _check_grid(gh: int, gw: int, H: int, W: int) -> None:
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got ({gh}, {gw})")
    if gh > H or gw > W:
        raise ValueError(
            f"grid ({gh}, {gw}) is larger than the image (H, W) = ({H}, {W}): every patch cell "
            "needs at least one pixel"
        )


def _check_uint8(image) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a numpy uint8 array (H, W, 3) or (B, H, W, 3), got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise TypeError(
            f"image must be a uint8 array of shape (H, W, 3) or (B, H, W, 3), got dtype {image.dtype} "
            "(float images go through the torch version: pass a (B, 3, H, W) tensor in [-1, 1])"
        )
    if image.ndim not in (3, 4):
        raise ValueError(f"image must have shape (H, W, 3) or (B, H, W, 3) (HWC), got shape {image.shape}")
    if image.shape[-1] != 3:
        raise ValueError(f"image must be RGB in HWC layout (last dim 3), got shape {image.shape}")


def _check_float_images(images: torch.Tensor) -> None:
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating tensor (B, 3, H, W) in [-1, 1], got {images.dtype} (uint8 "
            "images go as numpy HWC arrays)"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")


def _edges(n: int, g: int) -> list[int]:
    return [a * n // g for a in range(g + 1)]


# -------------------------------------------------------------------------------------------- torch versions
def _cell_mean_torch(v: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(B, H, W) -> (B, gh*gw) mean over each grid cell (segment sums; no host sync)."""
    B, H, W = v.shape
    dev = v.device
    # cell of row r: the largest a with floor(a H / gh) <= r, i.e. ceil((r + 1) gh / H) - 1
    ridx = ((torch.arange(H, device=dev) + 1) * gh + H - 1) // H - 1
    cidx = ((torch.arange(W, device=dev) + 1) * gw + W - 1) // W - 1
    rows = v.new_zeros(B, gh, W).index_add_(1, ridx, v)
    cells = v.new_zeros(B, gh, gw).index_add_(2, cidx, rows)
    re = torch.arange(gh + 1, device=dev) * H // gh  # cell edges, computed on the device (no copy)
    ce = torch.arange(gw + 1, device=dev) * W // gw
    counts = (re[1:] - re[:-1])[:, None] * (ce[1:] - ce[:-1])[None, :]
    return (cells / counts.to(v.dtype)).reshape(B, gh * gw)


def _luma_padded_torch(images: torch.Tensor) -> torch.Tensor:
    x = (images.float() + 1.0) * 0.5
    y = LUMA[0] * x[:, 0] + LUMA[1] * x[:, 1] + LUMA[2] * x[:, 2]
    return F.pad(y[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]  # (B, H+2, W+2)


def _density_map_torch(yp: torch.Tensor) -> torch.Tensor:
    yc = yp[:, 1:-1, 1:-1]
    gx = yp[:, 1:-1, 2:] - yc
    gy = yp[:, 2:, 1:-1] - yc
    return gx * gx + gy * gy


def _structure_map_torch(yp: torch.Tensor) -> torch.Tensor:
    u, c, d = yp[:, :-2], yp[:, 1:-1], yp[:, 2:]
    gx = ((u[..., 2:] - u[..., :-2]) + 2.0 * (c[..., 2:] - c[..., :-2]) + (d[..., 2:] - d[..., :-2])) * 0.125
    gy = (
        (d[..., :-2] - u[..., :-2]) + 2.0 * (d[..., 1:-1] - u[..., 1:-1]) + (d[..., 2:] - u[..., 2:])
    ) * 0.125
    return torch.sqrt(gx * gx + gy * gy)


@torch.no_grad()
def density_targets_torch(images: torch.Tensor, grid) -> torch.Tensor:
    """images: (B, 3, H, W) float in [-1, 1], any device -> (B, gh*gw) float32: per-cell mean gradient
    energy."""
    _check_float_images(images)
    gh, gw = _parse_grid(grid)
    _check_grid(gh, gw, images.shape[2], images.shape[3])
    return _cell_mean_torch(_density_map_torch(_luma_padded_torch(images)), gh, gw)


@torch.no_grad()
def structure_targets_torch(images: torch.Tensor, grid) -> torch.Tensor:
    """images: (B, 3, H, W) float in [-1, 1], any device -> (B, gh*gw) float32: per-cell mean Sobel
    magnitude."""
    _check_float_images(images)
    gh, gw = _parse_grid(grid)
    _check_grid(gh, gw, images.shape[2], images.shape[3])
    return _cell_mean_torch(_structure_map_torch(_luma_padded_torch(images)), gh, gw)


# ------------------------------------------------------------------------------------ numpy (the fallback)
def _targets_numpy(image: np.ndarray, gh: int, gw: int, kind: str) -> np.ndarray:
    batched = image.ndim == 4
    imgs = image if batched else image[None]
    H, W = imgs.shape[1], imgs.shape[2]
    k = np.float32(1.0 / 255.0)
    kr, kg, kb = (np.float32(c) * k for c in LUMA)
    re, ce = _edges(H, gh), _edges(W, gw)
    counts = np.outer(np.diff(re), np.diff(ce)).astype(np.float64)
    out = np.empty((imgs.shape[0], gh * gw), dtype=np.float32)
    for i, img in enumerate(imgs):
        f = img.astype(np.float32)
        y = kr * f[..., 0] + kg * f[..., 1] + kb * f[..., 2]
        yp = np.pad(y, 1, mode="edge")
        if kind == "density":
            yc = yp[1:-1, 1:-1]
            gx = yp[1:-1, 2:] - yc
            gy = yp[2:, 1:-1] - yc
            v = gx * gx + gy * gy
        else:
            u, c, d = yp[:-2], yp[1:-1], yp[2:]
            gx = ((u[:, 2:] - u[:, :-2]) + 2.0 * (c[:, 2:] - c[:, :-2]) + (d[:, 2:] - d[:, :-2])) * 0.125
            gy = ((d[:, :-2] - u[:, :-2]) + 2.0 * (d[:, 1:-1] - u[:, 1:-1]) + (d[:, 2:] - u[:, 2:])) * 0.125
            v = np.sqrt(gx * gx + gy * gy)
        sums = np.add.reduceat(np.add.reduceat(v.astype(np.float64), re[:-1], axis=0), ce[:-1], axis=1)
        out[i] = (sums / counts).reshape(-1).astype(np.float32)
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------- public
def _pick(impl: str, feature: str):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "python":
        return None
    if impl == "cpp":
        return _ext.require(feature)
    return _ext.ext_or_none(feature)


def _targets(images, grid, kind: str, num_threads: int, impl: str):
    if isinstance(images, torch.Tensor):
        return (density_targets_torch if kind == "density" else structure_targets_torch)(images, grid)
    _check_uint8(images)
    gh, gw = _parse_grid(grid)
    _check_grid(gh, gw, images.shape[-3], images.shape[-2])
    C = _pick(impl, f"{kind}_targets")
    if C is None:
        return _targets_numpy(images, gh, gw, kind)
    fn = C.density_targets if kind == "density" else C.structure_targets
    return fn(images, (gh, gw), int(num_threads))


def density_targets(images, grid, *, num_threads: int = 0, impl: str = "auto"):
    """Per-patch texture density: the mean luminance gradient energy of each grid cell (module docstring).

    Args:
        images: torch (B, 3, H, W) float in [-1, 1] (any device), or numpy uint8 (H, W, 3) / (B, H, W, 3).
        grid: int g or (gh, gw), the critic's patch grid.
        num_threads: C++ threads (<= 0: OpenMP default); numpy inputs only.
        impl: numpy inputs only: "auto" (C++ if built, else the numpy fallback with a one-time warning),
            "cpp" (ImportError if not built) or "python".
    Returns:
        (B, gh*gw) float32 tensor for tensors; (gh*gw,) or (B, gh*gw) float32 numpy for numpy images.
    """
    return _targets(images, grid, "density", num_threads, impl)


def structure_targets(images, grid, *, num_threads: int = 0, impl: str = "auto"):
    """Per-patch structure: the mean Sobel magnitude of the luminance in each grid cell. Same arguments
    and returns as `density_targets`."""
    return _targets(images, grid, "structure", num_threads, impl)


# ---------------------------------------------------------------------------------------- caption packing
def _pack_captions_python(token_lists, prompt_lens, pad_id, ignore_index, max_len):
    B = len(token_lists)
    L = max_len if max_len is not None else max((len(t) for t in token_lists), default=0)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    am = np.zeros((B, L), dtype=np.int64)
    labels = np.full((B, L), ignore_index, dtype=np.int64)
    for b, toks in enumerate(token_lists):
        n = min(len(toks), L)
        ids[b, :n] = np.asarray(list(toks)[:n], dtype=np.int64)
        am[b, :n] = 1
        pl = 0 if prompt_lens is None else prompt_lens[b]
        labels[b, pl:n] = ids[b, pl:n]
    return ids, am, labels


def pack_captions(
    token_lists,
    *,
    prompt_lens=None,
    pad_id: int = 0,
    ignore_index: int = -100,
    max_len: int | None = None,
    impl: str = "auto",
):
    """Token-id lists -> right-padded batch tensors for the critic.

    Args:
        token_lists: B sequences of int token ids (prompt tokens first, then caption tokens).
        prompt_lens: None or B ints: the first prompt_lens[b] tokens of row b are prompt (label ignored).
        pad_id: id written on padding. ignore_index: label on prompt and padding.
        max_len: L (longer lists are truncated on the right); None: the longest list.
        impl: "auto" | "cpp" | "python" (as in `density_targets`).
    Returns:
        ids (B, L) int64, attention_mask (B, L) int64 (1 on tokens), labels (B, L) int64 (ids on caption
        tokens, ignore_index elsewhere; not shifted).
    """
    try:
        lists = [list(map(int, t)) for t in token_lists]
    except TypeError as e:
        raise TypeError("token_lists must be a sequence of sequences of ints (token ids)") from e
    if prompt_lens is not None:
        prompt_lens = [int(p) for p in prompt_lens]
        if len(prompt_lens) != len(lists):
            raise ValueError(f"prompt_lens has {len(prompt_lens)} entries but token_lists has {len(lists)}")
        for b, (p, t) in enumerate(zip(prompt_lens, lists, strict=False)):
            if not 0 <= p <= len(t):
                raise ValueError(
                    f"prompt_lens[{b}] = {p} must be in [0, len(token_lists[{b}])] = [0, {len(t)}]"
                )
    if max_len is not None and (not isinstance(max_len, (int, np.integer)) or max_len < 0):
        raise ValueError(f"max_len must be None or an int >= 0, got {max_len!r}")
    C = _pick(impl, "pack_captions")
    if C is None:
        out = _pack_captions_python(lists, prompt_lens, pad_id, ignore_index, max_len)
    else:
        out = C.pack_captions(
            lists, prompt_lens, int(pad_id), int(ignore_index), None if max_len is None else int(max_len)
        )
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in out)
