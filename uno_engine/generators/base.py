"""The small base every generator builds on.

A generator is an `nn.Module` whose `forward(batch: dict) -> images` returns `(B, 3, H, W)` images meant to
lie in `[-1, 1]` (`output_range`), carrying a graph to `trainable_parameters()`. Generators never clamp: a
decoder can overshoot the range a little, and the bridge (`ops.bridge(..., clamp=...)`) applies the
documented clamp policy, so the gradient policy at the range edges lives in one place.

The latent view (`UNOConfig(view="latent")`) goes through `forward` too: `forward(batch, view="latent")` returns
`latents_for_critic(batch)` (a `uno_engine.latent.GeneratedLatents`) in a generator that has one. Through
`forward`, a wrapper's hooks run: DDP marks its gradient buckets and all-reduces, FSDP2 gathers the shards.
Calling `latents_for_critic` on the module inside a wrapper would skip them. The representation view
(`UNOConfig(view="representation")`, DiffusersGenerator) goes the same way: `forward(batch, view="representation")`
returns `representation_for_critic(batch)` (a `uno_engine.representation.GeneratedRepresentation`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

VIEWS = ("pixel", "latent", "representation")


class Generator(nn.Module):
    """Base class: `forward(batch) -> images (B, 3, H, W)` nominally in `output_range`, with grad to
    `trainable_parameters()`; `forward(batch, view="latent") -> GeneratedLatents` where the generator has a
    latent view (`latents_for_critic`; module docstring). Subclasses freeze what they do not train
    (`requires_grad_(False)`) so that `trainable_parameters()` is exactly the set of parameters that receive
    gradients."""

    output_range: tuple[float, float] = (-1.0, 1.0)

    def forward(self, batch: Mapping[str, torch.Tensor], *, view: str = "pixel"):  # pragma: no cover
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that get gradients from `forward` (those with requires_grad=True), deduplicated."""
        return list(_unique(p for p in self.parameters() if p.requires_grad))

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def _unique(params: Iterator[nn.Parameter]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def wants_latents(view: str, owner: str, views: tuple[str, ...] = ("pixel", "latent")) -> bool:
    """`forward`'s `view` keyword: True for "latent", False for "pixel", a ValueError naming it otherwise
    (also for a view of VIEWS that this generator, whose views are `views`, does not have)."""
    if view not in VIEWS or view not in views:
        raise ValueError(f"{owner}.forward: view must be one of {views}, got {view!r}")
    return view == "latent"


def require_key(batch: Mapping, key: str, owner: str) -> torch.Tensor:
    """batch[key], or a KeyError that names the key and who needs it."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{owner}: batch must be a dict of tensors, got {type(batch).__name__}")
    if key not in batch or batch[key] is None:
        raise KeyError(f"{owner}: batch[{key!r}] is required but missing (batch has keys {sorted(batch)})")
    return batch[key]


def check_shape(x: torch.Tensor, name: str, owner: str, expected: Sequence[int | None]) -> None:
    """Raise ValueError naming `name` when x's shape does not match `expected` (None = any size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{owner}: {name} must have shape {want}, got {tuple(x.shape)}")


def check_images(images: torch.Tensor, owner: str) -> torch.Tensor:
    """Shape check of a generator's output (no device sync: values are not inspected)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{owner}: must return a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{owner}: images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    return images


def draw_generator(batch: Mapping, default: torch.Generator | None, salt: int = 0) -> torch.Generator | None:
    """The random source for one forward: batch["seed"] (an int, or a 0-d/1-element CPU tensor) makes a fresh
    CPU generator seeded with seed + salt (salt: a separate stream for a second use of the same batch); else
    batch["generator"] (a torch.Generator); else the generator given at construction; else None (torch's
    global RNG)."""
    seed = batch.get("seed") if isinstance(batch, Mapping) else None
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            if seed.device.type != "cpu":
                raise ValueError(
                    "batch['seed'] must be a Python int or a CPU tensor (a device tensor would sync)"
                )
            seed = int(seed.reshape(-1)[0])
        return torch.Generator("cpu").manual_seed(int(seed) + int(salt))
    g = batch.get("generator") if isinstance(batch, Mapping) else None
    if g is not None:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"batch['generator'] must be a torch.Generator, got {type(g).__name__}")
        return g
    return default


def randn(shape, *, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the same numbers on
    every device), then moved to `device` in `dtype`."""
    gen_device = generator.device if generator is not None else torch.device(device)
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


def rand(shape, *, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device(device)
    x = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


def noise_levels(batch: Mapping, noise_range, B: int, generator, device, owner: str) -> torch.Tensor:
    """The representation view's noise level per row (B,) fp32 in [0, 1]: batch["representation_noise_level"]
    (a float or (B,) tensor, e.g. 1.0 for the copy-leak measure; checked, one host read: a measurement, not
    the training path), else u ~ U(noise_range) from `generator`."""
    u = batch.get("representation_noise_level")
    if u is None:
        lo, hi = noise_range
        return lo + (hi - lo) * rand((B,), generator=generator, device=device)
    u = torch.as_tensor(u, dtype=torch.float32, device=device).expand(B)
    if not bool(((u >= 0) & (u <= 1)).all()):
        raise ValueError(f'{owner}: batch["representation_noise_level"] must be in [0, 1], got {u.tolist()}')
    return u


def randint(low: int, high: int, *, generator: torch.Generator | None) -> int:
    """A Python int in [low, high] inclusive, drawn on the CPU (never a device sync): from `generator` when it
    is a CPU generator, else from torch's global CPU RNG (a CUDA generator cannot give a host int without a
    sync)."""
    if high <= low:
        return low
    g = generator if (generator is not None and generator.device.type == "cpu") else None
    return int(torch.randint(low, high + 1, (1,), generator=g).item())
