"""The judge: a rule-based parser of rendered pixels, independent of the critic (no learned parameters).

    pixels -> foreground (max channel > 0.5 on [0, 1]) -> nearest palette color (or "other" when no palette
    color is within 0.6 in RGB) -> 4-connected components per color (area >= MIN_AREA px; smaller ones are
    noise) -> per object: shape from the fill ratio area / bbox area (square ~1, disc ~pi/4, triangle ~1/2),
    centroid -> prompt checks.

Checks of a prompt (GenEval-style; a check is scored only where it applies):
    count prompt "n c s":       color: every object is c (and there is one); shape: every object is s;
                                count: exactly n objects; binding: some object is (c, s);
                                overall: exactly n objects, all (c, s).
    relation prompt "A rel B":  color / shape: both colors / shapes occur; binding: an object (cA, sA) and
                                another (cB, sB); position: binding and the dominant axis of the displacement
                                between their centroids (the largest objects of each) gives rel;
                                overall = position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from . import world

MIN_AREA = 12
FG_THRESHOLD = 0.5
COLOR_TOLERANCE = 0.6
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.66
CATEGORIES = ("color", "shape", "count", "position", "binding")


@dataclass
class Detected:
    color: str  # a palette color or "other"
    shape: str
    cx: float
    cy: float
    area: int
    fill: float


def _to_hwc01(image) -> np.ndarray:
    """(3, H, W) in [-1, 1] (torch or numpy) -> (H, W, 3) float64 in [0, 1]."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"judge: image must be (3, H, W), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("judge: image has non-finite values")
    return np.clip((a.astype(np.float64).transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)


def color_labels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> (H, W) int: -1 background, i = world.COLORS[i], len(COLORS) = "other"."""
    pal = np.array([world.PALETTE[c] for c in world.COLORS])
    d = np.linalg.norm(rgb[:, :, None, :] - pal[None, None], axis=-1)
    lab = d.argmin(-1)
    lab = np.where(d.min(-1) > COLOR_TOLERANCE, len(world.COLORS), lab)
    return np.where(rgb.max(-1) > FG_THRESHOLD, lab, -1)


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a bool mask, as lists of (y, x)."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp, q = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        out.append(comp)
    return out


def classify_shape(fill: float) -> str:
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return "triangle"


def parse(image) -> list[Detected]:
    """Objects in one image (3, H, W) in [-1, 1]."""
    lab = color_labels(_to_hwc01(image))
    objs = []
    names = world.COLORS + ("other",)
    for ci, name in enumerate(names):
        for comp in components(lab == ci):
            if len(comp) < MIN_AREA:
                continue
            ys = np.array([p[0] for p in comp])
            xs = np.array([p[1] for p in comp])
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(comp) / box
            objs.append(Detected(name, classify_shape(fill), xs.mean(), ys.mean(), len(comp), fill))
    return objs


def _largest(objs, color, shape):
    cands = [o for o in objs if o.color == color and o.shape == shape]
    return max(cands, key=lambda o: o.area) if cands else None


def check(prompt: world.Prompt, objs: list[Detected]) -> dict[str, bool]:
    """Prompt checks (see module docstring): category -> passed, plus "overall"."""
    if prompt.kind == "count":
        ((c, s),) = prompt.objects
        match = [o for o in objs if o.color == c and o.shape == s]
        return {
            "color": bool(objs) and all(o.color == c for o in objs),
            "shape": bool(objs) and all(o.shape == s for o in objs),
            "count": len(objs) == prompt.n,
            "binding": bool(match),
            "overall": len(objs) == prompt.n and len(match) == prompt.n,
        }
    (ca, sa), (cb, sb) = prompt.objects
    colors, shapes = {o.color for o in objs}, {o.shape for o in objs}
    a, b = _largest(objs, ca, sa), _largest(objs, cb, sb)
    bound = a is not None and b is not None and a is not b
    position = False
    if bound:
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dx) >= abs(dy):
            rel = "left of" if dx > 0 else "right of"
        else:
            rel = "above" if dy > 0 else "below"
        position = rel == prompt.relation
    return {
        "color": ca in colors and cb in colors,
        "shape": sa in shapes and sb in shapes,
        "binding": bound,
        "position": position,
        "overall": position,
    }


def scene_matches(scene: world.Scene, objs: list[Detected], tol: float = 1.5) -> bool:
    """Exact parse of a true render: same number of objects, and a one-to-one match in color, shape and
    centroid (within `tol` px of the true shape's pixel centroid)."""
    if len(objs) != len(scene.objects):
        return False
    left = list(objs)
    for o in scene.objects:
        m = world.shape_mask(o.shape, o.s)
        ys, xs = np.nonzero(m)
        cx, cy = o.x + xs.mean(), o.y + ys.mean()
        hit = next(
            (
                d
                for d in left
                if d.color == o.color
                and d.shape == o.shape
                and abs(d.cx - cx) <= tol
                and abs(d.cy - cy) <= tol
            ),
            None,
        )
        if hit is None:
            return False
        left.remove(hit)
    return True


def summarize(results: list[dict[str, bool]]) -> dict:
    """Mean of each check over the prompts where it applies (None where none), and n per category."""
    out = {}
    for k in CATEGORIES + ("overall",):
        vals = [r[k] for r in results if k in r]
        out[k] = (sum(vals) / len(vals)) if vals else None
        out[f"n_{k}"] = len(vals)
    return out


def true_render_accuracy(n: int = 1000, seed: int = 777) -> dict:
    """The judge on fresh true renders of every prompt: exact-parse accuracy and prompt-check accuracy."""
    import random

    rng = random.Random(seed)
    prompts = world.all_prompts()
    exact, results = 0, []
    for _ in range(n):
        p = rng.choice(prompts)
        scene = world.sample_scene(p, rng)
        objs = parse(world.render(scene))
        exact += scene_matches(scene, objs)
        results.append(check(p, objs))
    return {"n_images": n, "exact_parse_accuracy": exact / n, "checks": summarize(results)}
