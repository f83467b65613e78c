"""The synthetic world: scenes of 1-3 colored shapes at 32 px, captions from a small grammar, a word-level
tokenizer, and the held-out compositions the generator never sees in pretraining.

Grammar (every caption is a function of the image, so a perfect captioner exists):
    count scene:    "<one|two|three> <color> <shape|shapes>"      n objects, all the same color and shape
    relation scene: "<color> <shape> <left of|right of|above|below> <color> <shape>"
                    two objects of different (color, shape); the first named is the one with the smaller
                    (shape, color) index (a canonical order, so the caption is unique); the relation is the
                    dominant axis of the displacement from the first to the second (the other axis is at most
                    half of it, by construction).

Held-out compositions (GenEval's compositional split in miniature): color-shape bindings, count-shape pairs
and (shape, relation, shape) triples listed in HELD_OUT. A prompt is held out when it contains any of them;
every word still occurs in seen prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

SIZE = 32
COLORS = ("red", "green", "blue", "yellow")
PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = ("one", "two", "three")
RELATIONS = ("left of", "right of", "above", "below")

HELD_OUT = {
    "binding": {("red", "triangle"), ("green", "circle"), ("blue", "square")},
    "count": {(3, "circle"), (2, "triangle")},
    "position": {
        ("circle", "above", "square"),
        ("square", "left of", "triangle"),
        ("circle", "below", "triangle"),
    },
}

# ------------------------------------------------------------------------------------------- tokenizer
WORDS = (
    ("<pad>", "<eos>")
    + NUMBERS
    + COLORS
    + SHAPES
    + tuple(PLURAL[s] for s in SHAPES)
    + ("left", "right", "of", "above", "below")
)
VOCAB_SIZE = 32  # WORDS + unused ids; the last id is the critic's image token
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
PAD, EOS = 0, 1
MAX_LEN = 8  # longest caption: "yellow triangle right of yellow circle <eos>" = 7 tokens
WORD_ID = {w: i for i, w in enumerate(WORDS)}


def encode(caption: str, max_len: int = MAX_LEN) -> tuple[list[int], list[int]]:
    """caption -> (ids, mask), right padded to max_len, ending with <eos>. Unknown words raise."""
    words = caption.split()
    bad = [w for w in words if w not in WORD_ID]
    if bad:
        raise ValueError(f"encode: unknown words {bad} in {caption!r}")
    ids = [WORD_ID[w] for w in words] + [EOS]
    if len(ids) > max_len:
        raise ValueError(f"encode: caption {caption!r} has {len(ids)} tokens > max_len={max_len}")
    mask = [1] * len(ids) + [0] * (max_len - len(ids))
    return ids + [PAD] * (max_len - len(ids)), mask


def decode(ids) -> str:
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        out.append(WORDS[i] if 0 <= i < len(WORDS) else f"<{i}>")
    return " ".join(out)


# --------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """kind "count": objects = ((color, shape),), n = count. kind "relation": objects = (A, B), relation."""

    kind: str
    objects: tuple[tuple[str, str], ...]
    n: int = 1
    relation: str | None = None

    @property
    def caption(self) -> str:
        if self.kind == "count":
            ((c, s),) = self.objects
            return f"{NUMBERS[self.n - 1]} {c} {s if self.n == 1 else PLURAL[s]}"
        (ca, sa), (cb, sb) = self.objects
        return f"{ca} {sa} {self.relation} {cb} {sb}"

    def held_out_kinds(self) -> set[str]:
        """Which held-out compositions this prompt contains (empty: a seen prompt)."""
        kinds = set()
        if any(o in HELD_OUT["binding"] for o in self.objects):
            kinds.add("binding")
        if self.kind == "count" and (self.n, self.objects[0][1]) in HELD_OUT["count"]:
            kinds.add("count")
        if self.kind == "relation":
            (_, sa), (_, sb) = self.objects
            if (sa, self.relation, sb) in HELD_OUT["position"]:
                kinds.add("position")
        return kinds

    @property
    def held_out(self) -> bool:
        return bool(self.held_out_kinds())


def _key(obj) -> tuple[int, int]:
    return SHAPES.index(obj[1]), COLORS.index(obj[0])


def all_prompts() -> list[Prompt]:
    """Every caption of the grammar (36 count + 264 relation prompts), in a fixed order."""
    out = [Prompt("count", ((c, s),), n=n) for n in (1, 2, 3) for s in SHAPES for c in COLORS]
    objs = sorted(((c, s) for s in SHAPES for c in COLORS), key=_key)
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            for r in RELATIONS:
                out.append(Prompt("relation", (a, b), relation=r))
    return out


def split_prompts() -> tuple[list[Prompt], list[Prompt]]:
    """-> (seen, held_out)."""
    ps = all_prompts()
    return [p for p in ps if not p.held_out], [p for p in ps if p.held_out]


# ----------------------------------------------------------------------------------------------- scenes
@dataclass
class Obj:
    color: str
    shape: str
    x: int  # top-left of the s x s box
    y: int
    s: int

    @property
    def center(self) -> tuple[float, float]:
        return self.x + (self.s - 1) / 2, self.y + (self.s - 1) / 2


@dataclass
class Scene:
    prompt: Prompt
    objects: list[Obj] = field(default_factory=list)


def _overlaps(a: Obj, b: Obj, gap: int = 2) -> bool:
    return not (
        a.x + a.s + gap <= b.x or b.x + b.s + gap <= a.x or a.y + a.s + gap <= b.y or b.y + b.s + gap <= a.y
    )


def sample_scene(prompt: Prompt, rng: random.Random, size: int = SIZE) -> Scene:
    """Random layout for a prompt: sizes 8-10 px, >= 2 px apart; relations with a dominant axis."""
    for _ in range(1000):
        if prompt.kind == "count":
            c, s = prompt.objects[0]
            objs: list[Obj] = []
            for _ in range(prompt.n):
                for _ in range(100):
                    k = rng.randint(8, 10)
                    o = Obj(c, s, rng.randint(0, size - k), rng.randint(0, size - k), k)
                    if not any(_overlaps(o, p) for p in objs):
                        objs.append(o)
                        break
            if len(objs) == prompt.n:
                return Scene(prompt, objs)
            continue
        (ca, sa), (cb, sb) = prompt.objects
        ka, kb = rng.randint(8, 10), rng.randint(8, 10)
        a = Obj(ca, sa, rng.randint(0, size - ka), rng.randint(0, size - ka), ka)
        b = Obj(cb, sb, rng.randint(0, size - kb), rng.randint(0, size - kb), kb)
        if _overlaps(a, b):
            continue
        if relation_of(a.center, b.center) == prompt.relation:
            return Scene(prompt, [a, b])
    raise RuntimeError(f"sample_scene: no layout found for {prompt.caption!r}")


def relation_of(ca, cb, ratio: float = 2.0) -> str | None:
    """Relation of A (center ca) to B (center cb) when one axis dominates by `ratio`, else None."""
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]
    if abs(dx) >= ratio * abs(dy) and abs(dx) >= 9:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= ratio * abs(dx) and abs(dy) >= 9:
        return "above" if dy > 0 else "below"
    return None


def shape_mask(shape: str, s: int) -> np.ndarray:
    """(s, s) bool mask: filled square, disc of diameter s, upward isosceles triangle (base s, height s)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "circle":
        r = s / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":
        half = (yy / s) * (s / 2)  # half-width grows linearly from the apex (top) to the base
        return np.abs(xx - s / 2) <= half
    raise ValueError(f"shape_mask: unknown shape {shape!r}")


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """-> float32 (3, size, size) image in [-1, 1]: black background, pure palette colors."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    for o in scene.objects:
        m = shape_mask(o.shape, o.s)
        img[o.y : o.y + o.s, o.x : o.x + o.s][m] = PALETTE[o.color]
    return img.transpose(2, 0, 1) * 2.0 - 1.0


def make_batch(prompts: list[Prompt], rng: random.Random):
    """-> (images float32 (B, 3, 32, 32) in [-1, 1], ids int64 (B, MAX_LEN), mask (B, MAX_LEN), scenes)."""
    scenes = [sample_scene(p, rng) for p in prompts]
    images = np.stack([render(s) for s in scenes])
    enc = [encode(p.caption) for p in prompts]
    ids = np.array([e[0] for e in enc], dtype=np.int64)
    mask = np.array([e[1] for e in enc], dtype=np.int64)
    return images, ids, mask, scenes
