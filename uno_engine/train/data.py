"""`uno-train`'s data: records from a JSONL file or a `datasets` source, a resumable stream of global batches,
and the batch the step reads (captions tokenized for the critic, reference images, per-sample noise).

Record: {"prompt": str (required), "caption": str (the critic's target; default the prompt),
"negatives": [str, ...] (hard-negative captions, optional), "image": path (a reference image, optional,
relative to the JSONL file's folder)}.

Determinism: the order of the records in epoch e is a permutation drawn from (seed, e); optimizer step i reads
the next `global_batch` records of that stream, whatever the number of processes; sample n of the stream
starts its sampling chain from noise drawn from (seed, n). So a run on 1 process and on W processes (each
keeping its slice) see the same global batch and the same noise, and a resumed run continues the stream where
the checkpoint left it (`DataStream.state_dict`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .args import UsageError, one_line


@dataclass(frozen=True)
class Record:
    prompt: str
    caption: str
    negatives: tuple[str, ...] = ()
    image: str | None = None  # an absolute path


def _record(obj, where: str, base: Path) -> Record:
    if not isinstance(obj, dict):
        raise UsageError(f'{where}: expected a JSON object with "prompt", got {type(obj).__name__}')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f'{where}: no "prompt" (a non-empty string is required)')
    caption = obj.get("caption", prompt)
    if caption is None:
        caption = prompt
    if not isinstance(caption, str) or not caption.strip():
        raise UsageError(f'{where}: "caption" must be a non-empty string')
    negatives = obj.get("negatives") or []
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise UsageError(f'{where}: "negatives" must be a list of non-empty strings')
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise UsageError(f'{where}: "image" must be a path string')
        path = Path(image) if Path(image).is_absolute() else base / image
        if not path.is_file():
            raise UsageError(f'{where}: "image" file {image!r} does not exist (looked at {path})')
        image = str(path)
    return Record(prompt, caption, tuple(negatives), image)


def read_jsonl(path: str | Path) -> list[Record]:
    """Records of a JSONL file; a bad line raises UsageError naming the file and the line number."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--train_data {path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            records.append(_record(obj, where, path.parent))
    if not records:
        raise UsageError(f"--train_data {path}: no records (the file is empty)")
    return records


def read_dataset(name: str, *, prompt_column: str, caption_column: str, split: str) -> list[Record]:
    """Records of a `datasets` folder (save_to_disk) or name (load_dataset); needs the `datasets` package."""
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"--train_data {name}: not a JSONL file, and reading a `datasets` folder or name needs the "
            "`datasets` package (pip install datasets)"
        ) from None
    try:  # a folder written by save_to_disk, else a name (or folder of data files) for load_dataset
        saved = any((Path(name) / f).is_file() for f in ("dataset_dict.json", "dataset_info.json"))
        ds = datasets.load_from_disk(name) if saved else datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's source: one line
        raise UsageError(f"--train_data {name}: cannot load it with `datasets` ({one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UsageError(f"--dataset_split {split!r}: {name} has splits {sorted(ds)}")
        ds = ds[split]
    if prompt_column not in ds.column_names:
        raise UsageError(f"--prompt_column {prompt_column!r}: {name} has columns {ds.column_names}")
    records = []
    for i, row in enumerate(ds):
        obj = {
            "prompt": row[prompt_column],
            "caption": row.get(caption_column),
            "negatives": row.get("negatives"),
        }
        records.append(_record(obj, f"--train_data {name} row {i}", Path(".")))
    if not records:
        raise UsageError(f"--train_data {name}: no rows")
    return records


def read_records(args) -> list[Record]:
    """The --train_data records (JSONL when the path is a file, else a `datasets` source)."""
    path = Path(args.train_data)
    if path.is_file():
        return read_jsonl(path)
    if (
        path.suffix in (".jsonl", ".json")
        or args.train_data.startswith((".", "/", "~"))
        and not path.exists()
    ):
        raise UsageError(f"--train_data {args.train_data}: file does not exist")
    return read_dataset(
        args.train_data,
        prompt_column=args.prompt_column,
        caption_column=args.caption_column,
        split=args.dataset_split,
    )


def check_records(records: list[Record], args) -> bool:
    """The records carry what the objective's weights need; returns whether they carry reference images."""
    if args.negatives_weight > 0 and not any(r.negatives for r in records):
        raise UsageError('--negatives_weight > 0 but no --train_data record has "negatives"')
    with_images = [r.image is not None for r in records]
    if any(with_images) and not all(with_images):
        first = with_images.index(not with_images[0]) + 1
        raise UsageError(
            f'--train_data {args.train_data}: record {first} differs from record 1 in having an "image" '
            "(all records or none)"
        )
    needs_images = args.generator_loss_weight > 0 or args.density_weight > 0 or args.structure_weight > 0
    if needs_images and not all(with_images):
        raise UsageError(
            '--generator_loss_weight / --density_weight / --structure_weight need an "image" in every record'
        )
    return all(with_images)


def read_validation_prompts(value: str | None) -> list[str]:
    """--validation_prompts: a text file (one prompt a line) or prompts separated by '|'."""
    if not value:
        return []
    path = Path(value)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else value.split("|")
    prompts = [p.strip() for p in lines if p.strip()]
    if not prompts:
        raise UsageError(f"--validation_prompts {value!r}: no prompt in it")
    return prompts


# ------------------------------------------------------------------------------------------- the stream
class DataStream:
    """An endless, seeded stream over the records; `state_dict` / `load_state_dict` make it resumable
    (registered with accelerate's checkpointing: the data position)."""

    def __init__(self, n_records: int, seed: int):
        self.n, self.seed = n_records, seed
        self.epoch, self.offset, self.samples_seen = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, count: int) -> list[tuple[int, int]]:
        """The next `count` (sample number in the stream, record index) pairs."""
        out = []
        for _ in range(count):
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append((self.samples_seen, self._order[self.offset]))
            self.offset += 1
            self.samples_seen += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "samples_seen": self.samples_seen, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise UsageError(
                f"--resume_from_checkpoint: the checkpoint was written for {state['n']} records, --train_data "
                f"has {self.n}"
            )
        self.epoch, self.offset, self.samples_seen = state["epoch"], state["offset"], state["samples_seen"]
        self._order = self._permutation(self.epoch)


# ------------------------------------------------------------------------------------------- captions
class CaptionTokenizer:
    """texts -> (ids (B, L) int64, mask (B, L) int64), right-padded to the longest: the critic's own
    `tokenize_captions` (its chat template's completion with --instruction, else the tokenizer's plain ids)."""

    def __init__(self, critic):
        self.critic = critic

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.critic.tokenize_captions(list(texts))

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens per text (the completion the critic reads)."""
        return [len(self.critic.encode_caption(t)) for t in texts]


def prefix_length(critic, height: int, width: int) -> int:
    """How many positions of the critic's sequence come before the caption: the image's tokens (its patch grid
    after merging) plus, with a chat template, the prompt's other tokens."""
    size, patch = getattr(critic, "image_size", None), getattr(critic, "patch_size", None)
    if size and patch:
        n = (size // patch) ** 2
    else:  # Qwen-VL: the processor's grid for this image size, merged
        try:
            gh, gw = critic.spec.grid(height, width)
            n = gh * gw // (getattr(critic, "merge", 1) ** 2)
        except (ValueError, AttributeError):
            n = 0
    prompt = critic.reader.prompt
    return n + (len(prompt.prefix(0)) if prompt is not None else 0)


def check_caption_lengths(
    records: list[Record], tokenize: CaptionTokenizer, context: int, prefix: int, source
):
    """Every caption and negative fits the critic's context after its prefix (`prefix_length`): else UsageError
    naming the record."""
    budget = context - prefix
    texts = [(i, "caption", r.caption) for i, r in enumerate(records)]
    texts += [(i, "negative", n) for i, r in enumerate(records) for n in r.negatives]
    for (i, what, _), n in zip(texts, tokenize.lengths([t for _, _, t in texts]), strict=True):
        if n > budget:
            raise UsageError(
                f"--train_data {source} record {i + 1}: the {what} has {n} tokens, longer than the critic's "
                f"context ({context} positions, {prefix} of them before the caption: the image and the prompt)"
            )


# ------------------------------------------------------------------------------------------- batches
def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]: resized (shorter side) and center-cropped to `size`."""
    import numpy as np
    from PIL import Image

    h, w = size
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(h / im.height, w / im.width)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def sample_noise(sample_ids: list[int], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal: row b drawn from (seed, sample_ids[b]) alone, on the CPU."""
    rows = []
    for n in sample_ids:
        g = torch.Generator().manual_seed((seed + 1) * 1_000_003 + n)
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows)


def caption_batch(records: list[Record], tokenize: CaptionTokenizer, with_negatives: bool) -> dict:
    """Tokenized captions of a whole global batch ("captions", "caption_mask", and with negatives
    "negative_captions" (B, K, L) / "negative_caption_mask"; a record with fewer than K negatives gets
    all-padding rows, which the loss leaves out)."""
    texts = [r.caption for r in records]
    negs = [list(r.negatives) for r in records] if with_negatives else []
    K = max((len(n) for n in negs), default=0)
    flat = texts + [n for row in negs for n in row]
    ids, mask = tokenize(flat)
    out = {"captions": ids[: len(texts)], "caption_mask": mask[: len(texts)]}
    if with_negatives:
        L = ids.shape[1]
        nid = torch.zeros(len(records), K, L, dtype=torch.long)
        nmask = torch.zeros(len(records), K, L, dtype=torch.long)
        j = len(texts)
        for b, row in enumerate(negs):
            nid[b, : len(row)] = ids[j : j + len(row)]
            nmask[b, : len(row)] = mask[j : j + len(row)]
            j += len(row)
        out["negative_captions"], out["negative_caption_mask"] = nid, nmask
    return out
