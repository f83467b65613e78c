"""Hard negative captions from caption text, by GenEval's categories (Ghosh et al., "GenEval", 2023).

`make_negatives(captions, k=4, seed=0)` returns, for each caption, up to k captions that differ from it in
ONE of the ways GenEval scores a generated image:

- "color": one color word changed ("a red car" -> "a blue car");
- "binding": two objects' colors swapped ("a red car and a blue bird" -> "a blue car and a red bird"), or,
  when there are no colors, the two objects swapped around their attributes;
- "count": one number word changed ("three apples" -> "four apples"; 2..10, spelled out);
- "relation": one spatial relation flipped ("left of" <-> "right of", "above" <-> "below", "on top of" <->
  "under", "in front of" <-> "behind"), or the two objects of a relation swapped;
- "object": one object (a COCO class, GenEval's object set) replaced by another with the same number
  ("two dogs" -> "two horses").

Candidates are collected per category, shuffled, and taken round-robin across categories in a shuffled order,
so the k negatives of one caption spread over its categories. Deterministic: the random source of caption i
is seeded by (seed, caption text), so the same caption gets the same negatives at any batch position. Words
are matched case-insensitively on word boundaries; the replacement keeps the first letter's case. A caption
with fewer than k possible negatives gets fewer (possibly none): `to_tensor` pads the missing ones with empty
captions, which `UNOLoss(negatives=...)` treats as absent. Every negative differs from its caption and the
negatives of a caption are distinct.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch

CATEGORIES = ("color", "binding", "count", "relation", "object")

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = (
    ("left of", "right of"),
    ("above", "below"),
    ("on top of", "under"),
    ("in front of", "behind"),
)
# COCO classes (GenEval's objects), singular -> plural
_IRREGULAR = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "broccoli": "broccoli",
    "wine glass": "wine glasses",
}
OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def _plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    return word + "s"


_SINGULAR = {o: o for o in OBJECTS}
_PLURAL = {_plural(o): o for o in OBJECTS}


def _pattern(words: Sequence[str]) -> re.Pattern:
    alts = sorted(words, key=len, reverse=True)  # longest first: "wine glass" before "glass"
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alts) + r")\b", re.IGNORECASE)


# a color is a word before another word ("orange car"); "orange" at the end is the fruit
_COLOR_RE = re.compile(_pattern(COLORS).pattern + r"(?=\s+[a-z])", re.IGNORECASE)
_NUMBER_RE = _pattern(NUMBERS)
_REL_RE = _pattern([w for pair in RELATIONS for w in pair])
_OBJ_RE = _pattern(list(_SINGULAR) + [p for p in _PLURAL if p not in _SINGULAR])
_OPPOSITE = {a: b for pair in RELATIONS for a, b in (pair, pair[::-1])}


def _case_like(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


_ARTICLE_RE = re.compile(r"\b(a|an)(\s+)$", re.IGNORECASE)


def _replace(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """Replace (start, end, new) spans (non-overlapping) in text; "a" / "an" just before a span follows the new
    word ("a dog" -> "an apple")."""
    out, last = [], 0
    for a, b, new in sorted(spans):
        before = text[last:a]
        m = _ARTICLE_RE.search(before)
        if m:
            art = "an" if new[:1].lower() in "aeiou" else "a"
            before = before[: m.start()] + _case_like(art, m.group(1)) + m.group(2)
        out += [before, _case_like(new, text[a:b])]
        last = b
    return "".join(out + [text[last:]])


def _objects(text: str, colors) -> list[tuple[int, int, str, bool]]:
    """(start, end, singular form, is_plural) of each COCO object mention that is not a color word."""
    found = []
    for m in _OBJ_RE.finditer(text):
        if any(a == m.start() for a, _, _ in colors):
            continue
        w = m.group(1).lower()
        if w in _SINGULAR:
            found.append((m.start(), m.end(), w, False))
        else:
            found.append((m.start(), m.end(), _PLURAL[w], True))
    return found


def _form(obj: str, plural: bool) -> str:
    return _plural(obj) if plural else obj


def candidates(caption: str, rng: random.Random) -> dict[str, list[str]]:
    """All negatives of one caption by category (before the k-selection), each different from the caption."""
    cands: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    colors = [(m.start(), m.end(), m.group(1).lower()) for m in _COLOR_RE.finditer(caption)]
    objects = _objects(caption, colors)
    for a, b, c in colors:
        for other in rng.sample([x for x in COLORS if x != c], 2):
            cands["color"].append(_replace(caption, [(a, b, other)]))
    distinct = [(a, b, c) for i, (a, b, c) in enumerate(colors) if all(c != x[2] for x in colors[:i])]
    if len(distinct) >= 2:
        (a1, b1, c1), (a2, b2, c2) = distinct[:2]
        cands["binding"].append(_replace(caption, [(a1, b1, c2), (a2, b2, c1)]))
    swap = None
    pair = [o for i, o in enumerate(objects) if all(o[2] != x[2] for x in objects[:i])][:2]
    if len(pair) == 2:
        (a1, b1, o1, p1), (a2, b2, o2, p2) = pair
        swap = _replace(caption, [(a1, b1, _form(o2, p1)), (a2, b2, _form(o1, p2))])
    for m in _NUMBER_RE.finditer(caption):
        n = NUMBERS.index(m.group(1).lower())
        near = [i for i in (n - 1, n + 1) if 0 <= i < len(NUMBERS)]
        far = [i for i in range(len(NUMBERS)) if i not in near and i != n]
        for i in near + rng.sample(far, 1):
            cands["count"].append(_replace(caption, [(m.start(), m.end(), NUMBERS[i])]))
    relations = list(_REL_RE.finditer(caption))
    for m in relations:
        cands["relation"].append(_replace(caption, [(m.start(), m.end(), _OPPOSITE[m.group(1).lower()])]))
    if swap is not None:
        cands["binding" if colors else "relation" if relations else "object"].append(swap)
    for a, b, obj, plural in objects:
        for other in rng.sample([o for o in OBJECTS if o != obj], 2):
            cands["object"].append(_replace(caption, [(a, b, _form(other, plural))]))
    low = caption.lower()
    for c in CATEGORIES:
        cands[c] = [x for x in dict.fromkeys(cands[c]) if x.lower() != low]
    return cands


def make_negatives(
    captions_text: Sequence[str], *, k: int, seed: int = 0, return_categories: bool = False
) -> list[list[str]] | tuple[list[list[str]], list[list[str]]]:
    """Up to k hard negatives per caption (module docstring). Returns a list (one per caption) of lists of
    at most k distinct strings; with return_categories, also the category of each negative."""
    if isinstance(captions_text, str) or not all(isinstance(c, str) for c in captions_text):
        raise TypeError("make_negatives: `captions_text` must be a sequence of strings")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"make_negatives: `k` must be an int >= 0, got {k!r}")
    negatives, categories = [], []
    for caption in captions_text:
        rng = random.Random(f"{seed}\x00{caption}")
        cands = candidates(caption, rng)
        for c in CATEGORIES:
            rng.shuffle(cands[c])
        order = [c for c in CATEGORIES if cands[c]]
        rng.shuffle(order)
        chosen, cats, seen = [], [], set()
        while len(chosen) < k and any(cands[c] for c in order):
            for c in order:
                while cands[c] and len(chosen) < k:
                    x = cands[c].pop()
                    if x.lower() not in seen:
                        seen.add(x.lower())
                        chosen.append(x)
                        cats.append(c)
                        break
        negatives.append(chosen)
        categories.append(cats)
    return (negatives, categories) if return_categories else negatives


def to_tensor(
    negatives: Sequence[Sequence[str]],
    encode: Callable[[str], Sequence[int]],
    *,
    k: int,
    length: int,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the negatives -> (negative_captions (B, k, length) int64, negative_caption_mask (B, k,
    length)), right padded with pad_id. `encode(text)` -> token ids (e.g. `lambda s: tok(s)["input_ids"]`,
    tokenized as the true captions are). Missing negatives (fewer than k) are all padding (mask 0: absent for
    the loss). A negative longer than `length` raises ValueError (nothing is cut silently)."""
    B = len(negatives)
    ids = torch.full((B, k, length), pad_id, dtype=torch.long)
    mask = torch.zeros(B, k, length, dtype=torch.long)
    for b, row in enumerate(negatives):
        if len(row) > k:
            raise ValueError(f"to_tensor: caption {b} has {len(row)} negatives, more than k={k}")
        for j, text in enumerate(row):
            tok = list(encode(text))
            if len(tok) > length:
                raise ValueError(
                    f"to_tensor: negative {j} of caption {b} has {len(tok)} tokens, more than length={length}"
                )
            ids[b, j, : len(tok)] = torch.tensor(tok, dtype=torch.long)
            mask[b, j, : len(tok)] = 1
    return ids, mask


__all__ = [
    "CATEGORIES",
    "COLORS",
    "NUMBERS",
    "OBJECTS",
    "RELATIONS",
    "candidates",
    "make_negatives",
    "to_tensor",
]
