"""`LatentAdapter`: a small timestep-conditioned network that maps a diffusion model's latents to a critic's
vision-token space, so the critic's LM reads a generated latent with no VAE decode and no vision tower.

    tokens = adapter(x_t, sigma)        x_t (B, C, h, w) denoiser latents at noise level sigma in [0, 1]
                                        -> (B, gh * gw, H): what the critic's projector hands its LM

Architecture (learned from DiNa-LRM's timestep-conditioned (FiLM) heads, PRFL's latent reward model and
DiT's adaLN-Zero blocks):

1. patchify: Conv2d(C, D, kernel = stride = p) on the latent grid -> (h/p) x (w/p) tokens, plus a fixed 2-D
   sinusoidal position code;
2. `depth_in` transformer blocks on the latent token grid, each modulated by the noise level (adaLN-Zero:
   shift / scale / gate from an MLP of a sinusoidal embedding of 1000 * sigma, gates initialised to zero);
3. resample to the critic's token grid with FIXED matrices derived from the critic's own image processor
   (`BridgeSpec`): critic token (r, c) averages the canvas rows r*P .. r*P+P-1 and columns c*P .. c*P+P-1
   (P = the vision tower's patch), pulled back through the processor's resize / crop / pad weights to image
   pixels and pooled over each latent patch, so every critic token starts from the latent patches its pixels
   come from (a center crop drops the latent columns it crops; a pad-to-square gives zero rows, filled by
   the learned position code);
4. `depth_out` blocks on the critic's grid (learned position code), an adaLN-modulated LayerNorm and a
   Linear to the critic's LM width H.

   With `pool` > 1 the adapter emits a coarser grid, (gh / pool) x (gw / pool) tokens, each standing for a
   pool x pool block of the critic's tokens (the resample rows averaged): the LM then reads pool^2 times fewer
   image tokens, which is where the latent view's remaining cost lies (the critic's LM runs in both views).
   Such a prefix is not one the LM saw in training, so a pooled adapter must be fitted with captions
   (`fit_latent_adapter(..., captions=...)`: it is distilled on the LM's caption predictions).

Cost per image: (depth_in * n_lat + depth_out * n_out) * (12 D^2 + 2 n D) multiply-adds plus the resample
(n_out * n_lat * D) and the output projection (n_out * D * H); for D = 256 this is a few GFLOP, against a
VAE decoder plus a vision tower of tens to hundreds of GFLOP per image.

Fitting: `fit_latent_adapter` (uno_engine/latent/fit.py), distillation from the critic's own pixel path.

Identity (`AdapterIdentity`): an adapter is tied to one critic (class, LM width, token grid, a hash of its
config and image processor settings) and one VAE / latent layout (channels, latent size, patch grid, a hash
of the VAE config, the noise family). `LatentAdapter.load(path, critic=..., generator=...)` and
`Critic.attach_latent_adapter` refuse a mismatch with `LatentAdapterMismatch`, which names every field that
differs. Saved as safetensors: the weights (and the fixed resample matrices) as tensors, the identity and
the architecture as JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdapterIdentity",
    "LatentAdapter",
    "LatentAdapterMismatch",
    "adapter_identity",
    "noise_latents",
]

_META_KEY = "uno_engine.latent_adapter"


class LatentAdapterMismatch(ValueError):
    """An adapter used with a critic or VAE it was not fitted for. `.fields`: the names that differ."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class AdapterIdentity:
    """What an adapter was fitted for. Shapes are checked field by field; the hashes fingerprint the critic's
    config + image processor settings and the VAE config (not the weights)."""

    critic: str  # family:class, e.g. "LLaVA:LlavaForConditionalGeneration"
    critic_width: int  # H: the LM's hidden size (what the projector hands the LM)
    token_grid: tuple[int, int]  # (gh, gw) critic tokens of one image
    critic_hash: str
    image_size: tuple[int, int]  # (H, W) generated images the critic's token grid refers to
    latent_channels: int
    latent_size: tuple[int, int]  # (h, w)
    patch_size: int
    vae_hash: str
    noise: str  # "flow" | "ddpm"

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.latent_size[0] // self.patch_size, self.latent_size[1] // self.patch_size

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> AdapterIdentity:
        d = dict(d)
        for k in ("token_grid", "image_size", "latent_size"):
            d[k] = tuple(int(v) for v in d[k])
        return cls(**d)

    def differences(self, other: AdapterIdentity, fields: tuple[str, ...]) -> list[str]:
        out = []
        for f in fields:
            a, b = getattr(self, f), getattr(other, f)
            if a != b:
                out.append(f"{f}: adapter fitted for {a!r}, got {b!r}")
        return out


_CRITIC_FIELDS = ("critic", "critic_width", "token_grid", "critic_hash")
_GENERATOR_FIELDS = ("latent_channels", "latent_size", "patch_size", "vae_hash", "noise", "image_size")


# ------------------------------------------------------------------------------------------ identity
def _clean(d):
    """A config dict without the keys that do not define the model (versions, dtypes, attention impl)."""
    if isinstance(d, dict):
        drop = {"transformers_version", "torch_dtype", "dtype", "architectures", "attn_implementation"}
        return {k: _clean(v) for k, v in sorted(d.items()) if not str(k).startswith("_") and k not in drop}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    return d


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def critic_fields(critic, image_size: tuple[int, int]) -> dict:
    """The critic part of an identity, from its shapes and config (no forward pass)."""
    cfg = critic.hf_model.config
    spec = critic.spec
    H, W = image_size
    hc, wc = spec.output_size(H, W)
    p = int(critic.patch_size)
    return dict(
        critic=f"{critic.family}:{type(critic.hf_model).__name__}",
        critic_width=int(critic.hidden_size),
        token_grid=(hc // p, wc // p),
        critic_hash=_hash({"config": _clean(cfg.to_dict()), "spec": repr(spec)}),
    )


def generator_fields(generator, patch_size: int) -> dict:
    """The VAE / latent part of an identity (a DiffusersGenerator: vae, latent_channels, latent_size)."""
    vae = generator.vae
    vcfg = _clean(dict(vae.config))
    return dict(
        image_size=(int(generator.height), int(generator.width)),
        latent_channels=int(generator.latent_channels),
        latent_size=tuple(int(v) for v in generator.latent_size),
        patch_size=int(patch_size),
        vae_hash=_hash({"class": type(vae).__name__, "config": vcfg}),
        noise="flow" if generator.is_flow else "ddpm",
    )


def adapter_identity(critic, generator, patch_size: int) -> AdapterIdentity:
    """The identity of an adapter for this critic and this generator's VAE."""
    g = generator_fields(generator, patch_size)
    return AdapterIdentity(**critic_fields(critic, g["image_size"]), **g)


def noise_latents(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, noise: str) -> torch.Tensor:
    """x_t = alpha(sigma) x0 + sigma eps; sigma (B,). flow: alpha = 1 - sigma; ddpm: sqrt(1 - sigma^2)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    alpha = 1.0 - s if noise == "flow" else torch.sqrt((1.0 - s * s).clamp_min(0.0))
    return alpha * x0 + s * eps


# ------------------------------------------------------------------------------------------ the network
def _sinusoid(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) -> (..., dim) sin/cos code of x with periods 2 pi .. 2 pi 10^4."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    a = x.float()[..., None] * freq
    return torch.cat([a.sin(), a.cos()], dim=-1)


def _pos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """(h * w, dim) fixed 2-D sinusoidal code: half the channels for rows, half for columns."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([_sinusoid(ys.flatten(), dim // 2), _sinusoid(xs.flatten(), dim // 2)], dim=-1)


class _Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation by the noise-level embedding c (B, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + g1 * self.proj(a)
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def resample_matrices(
    spec, identity: AdapterIdentity, critic_patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ry (gh, h/p), Rx (gw, w/p)) float32: critic token rows / columns as averages of latent patch rows /
    columns, through the processor's canvas weights (see the module docstring, step 3)."""
    H, W = identity.image_size
    wy, wx = spec.resize_matrices(H, W)  # (Hc, H), (Wc, W) float64
    out = []
    for m, g, n_lat in (
        (wy, identity.token_grid[0], identity.patch_grid[0]),
        (wx, identity.token_grid[1], identity.patch_grid[1]),
    ):
        t = torch.from_numpy(m.copy())[: g * critic_patch]
        t = t.view(g, critic_patch, -1).mean(1)  # (g, image pixels): canvas patch rows averaged
        t = t.view(g, n_lat, -1).sum(-1)  # (g, n_lat): image pixels pooled into latent patches
        out.append(t.float())
    return out[0], out[1]


def _check_pool(pool, grid: tuple[int, int]) -> None:
    if not isinstance(pool, int) or pool < 1 or grid[0] % pool or grid[1] % pool:
        raise ValueError(
            f"LatentAdapter: pool must be an int >= 1 dividing the critic's token grid {grid}, got {pool!r}"
        )


def pool_resample(ry: torch.Tensor, rx: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample matrices of the pooled grid: each output row / column averages `pool` critic rows / columns."""
    return (
        ry.view(ry.shape[0] // pool, pool, -1).mean(1),
        rx.view(rx.shape[0] // pool, pool, -1).mean(1),
    )


def default_patch_size(critic, generator) -> int:
    """The largest latent patch p (dividing both latent sides) whose pixel footprint, p * (image / latent), is
    at most the image pixels one critic token covers: one adapter token then sees what one critic patch sees
    (e.g. SD-1.5 at 512 px with a 24 x 24-token LLaVA: 21 px per token, 8 px per latent -> p = 2), and
    finer latents are not averaged away inside a critic token by the resample."""
    h, w = generator.latent_size
    H, W = int(generator.height), int(generator.width)
    g = critic_fields(critic, (H, W))["token_grid"]
    per_token = min(H / g[0], W / g[1])  # image pixels per critic token
    per_latent = max(H / h, W / w)
    best = 1
    for p in range(1, math.gcd(h, w) + 1):
        if h % p == 0 and w % p == 0 and p * per_latent <= per_token + 1e-9:
            best = p
    return best


class LatentAdapter(nn.Module):
    """Noised latent (B, C, h, w) at noise level sigma -> the critic's vision tokens (B, gh * gw, H), or with
    `pool` > 1 a coarser grid of (gh / pool) * (gw / pool) tokens (`adapter.grid`).

    Build with `LatentAdapter.for_pair(critic, generator, ...)`, fit with `fit_latent_adapter`, attach with
    `critic.attach_latent_adapter(adapter)`; `save(path)` / `LatentAdapter.load(path, critic=, generator=)`.

    Args:
        identity: `AdapterIdentity` (what it is fitted for).
        resample: (Ry (gh / pool, h/p), Rx (gw / pool, w/p)) fixed resample matrices (`resample_matrices`,
            pooled by `pool_resample`).
        dim, heads, depth_in, depth_out: width, attention heads, blocks on the latent grid / output grid.
        pool: critic tokens per output token along each axis (1: the critic's own grid).
    forward(latents (B, C, h, w), sigma: float or (B,) tensor in [0, 1]) -> (B, N, H) in the adapter's dtype,
    N = prod(adapter.grid).
    """

    def __init__(
        self,
        identity: AdapterIdentity,
        resample: tuple[torch.Tensor, torch.Tensor],
        *,
        dim: int = 256,
        heads: int = 4,
        depth_in: int = 2,
        depth_out: int = 2,
        pool: int = 1,
    ):
        super().__init__()
        if dim % heads or dim % 4:
            raise ValueError(
                f"LatentAdapter: dim must be a multiple of heads and of 4, got dim={dim}, heads={heads}"
            )
        self.identity = identity
        gh, gw = identity.token_grid
        _check_pool(pool, (gh, gw))
        self.arch = dict(dim=dim, heads=heads, depth_in=depth_in, depth_out=depth_out, pool=pool)
        self.fit_info: dict = {}
        C, p = identity.latent_channels, identity.patch_size
        (ph, pw), (gh, gw) = identity.patch_grid, (gh // pool, gw // pool)
        self.grid = (gh, gw)  # the grid of tokens this adapter emits: the critic's grid / pool
        ry, rx = resample
        if tuple(ry.shape) != (gh, ph) or tuple(rx.shape) != (gw, pw):
            raise ValueError(
                f"LatentAdapter: resample matrices must be ({gh}, {ph}) and ({gw}, {pw}) (the output grid x the "
                f"latent patch grid), got {tuple(ry.shape)} and {tuple(rx.shape)}"
            )
        self.patchify = nn.Conv2d(C, dim, kernel_size=p, stride=p)
        self.register_buffer("pos_in", _pos_2d(ph, pw, dim), persistent=False)
        self.register_buffer("resample_rows", ry.float().contiguous())
        self.register_buffer("resample_cols", rx.float().contiguous())
        self.pos_out = nn.Parameter(torch.zeros(gh * gw, dim))
        self.t_embed = nn.Sequential(nn.Linear(128, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks_in = nn.ModuleList(_Block(dim, heads) for _ in range(depth_in))
        self.blocks_out = nn.ModuleList(_Block(dim, heads) for _ in range(depth_out))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.out = nn.Linear(dim, identity.critic_width)
        # the critic's token statistics (set by fit_latent_adapter): the network predicts standardized tokens
        self.register_buffer("token_mean", torch.zeros(identity.critic_width))
        self.register_buffer("token_scale", torch.ones(()))

    @classmethod
    def for_pair(
        cls, critic, generator, *, patch_size: int | None = None, pool: int = 1, **arch
    ) -> LatentAdapter:
        """A fresh (unfitted) adapter for this critic and this generator's VAE.

        patch_size: latent patch (default `default_patch_size`: the largest one whose pixels fit in one critic
            token's). pool: critic tokens per output token along each axis (default 1).
        Width: `dim` (default the critic's LM width clamped to [64, 256], so the adapter stays far cheaper
        than the critic's tower and LM), `heads` (default dim // 64); `depth_in`, `depth_out` (default 2)."""
        if arch.get("dim") is None:
            arch["dim"] = int(min(256, max(64, critic.hidden_size)) // 64 * 64)
        if arch.get("heads") is None:
            arch["heads"] = max(1, arch["dim"] // 64)
        h, w = generator.latent_size
        if patch_size is None:
            patch_size = default_patch_size(critic, generator)
        if not isinstance(patch_size, int) or patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(
                f"LatentAdapter: patch_size must be an int >= 1 dividing the latent size {(h, w)}, got {patch_size!r}"
            )
        ident = adapter_identity(critic, generator, patch_size)
        _check_pool(pool, ident.token_grid)
        ry, rx = resample_matrices(critic.spec, ident, int(critic.patch_size))
        return cls(ident, pool_resample(ry, rx, pool), pool=pool, **arch)

    # --------------------------------------------------------------------------------------------------
    def check_latents(self, latents: torch.Tensor) -> None:
        ident = self.identity
        want = (ident.latent_channels, *ident.latent_size)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != want:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            fields = []
            if isinstance(latents, torch.Tensor) and latents.dim() == 4:
                if latents.shape[1] != ident.latent_channels:
                    fields.append("latent_channels")
                if tuple(latents.shape[2:]) != tuple(ident.latent_size):
                    fields.append("latent_size")
            raise LatentAdapterMismatch(
                f"LatentAdapter: latents must be (B, {want[0]}, {want[1]}, {want[2]}) (fitted for latent_channels="
                f"{ident.latent_channels}, latent_size={ident.latent_size}), got {got}",
                fields or ["latents"],
            )

    def forward(self, latents: torch.Tensor, sigma) -> torch.Tensor:
        self.check_latents(latents)
        B = latents.shape[0]
        dtype = self.out.weight.dtype
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.full((B,), float(sigma), device=latents.device)
        sigma = sigma.to(device=latents.device, dtype=torch.float32).reshape(-1).expand(B)
        c = self.t_embed(_sinusoid(sigma * 1000.0, 128).to(dtype))
        x = self.patchify(latents.to(dtype))  # (B, D, h', w')
        D, ph, pw = x.shape[1:]
        x = x.flatten(2).transpose(1, 2) + self.pos_in.to(dtype)
        for blk in self.blocks_in:
            x = blk(x, c)
        x = torch.einsum(
            "gh,bhwd,kw->bgkd",
            self.resample_rows.to(dtype),
            x.view(B, ph, pw, D),
            self.resample_cols.to(dtype),
        )
        x = x.reshape(B, -1, D) + self.pos_out
        for blk in self.blocks_out:
            x = blk(x, c)
        s, b = self.ada_out(F.silu(c))[:, None].chunk(2, dim=-1)
        y = self.out(self.norm_out(x) * (1 + s) + b)
        return y * self.token_scale.to(dtype) + self.token_mean.to(dtype)

    # ------------------------------------------------------------------------------------- identity checks
    def check_critic(self, critic) -> None:
        """Raise LatentAdapterMismatch when `critic` is not the critic this adapter was fitted for."""
        mine = self.identity
        other = AdapterIdentity(**{**mine.to_json(), **critic_fields(critic, mine.image_size)})
        diff = mine.differences(other, _CRITIC_FIELDS)
        if diff:
            raise LatentAdapterMismatch(
                "LatentAdapter fitted for another critic: " + "; ".join(diff), [d.split(":")[0] for d in diff]
            )

    def generator_mismatch(self, generator) -> list[str]:
        """Reasons this adapter cannot read `generator`'s latents (empty when it can)."""
        try:
            other = AdapterIdentity(
                **{**self.identity.to_json(), **generator_fields(generator, self.identity.patch_size)}
            )
        except AttributeError as e:
            return [f"the generator {type(generator).__name__} has no VAE latent layout ({e})"]
        return self.identity.differences(other, _GENERATOR_FIELDS)

    def check_generator(self, generator) -> None:
        diff = self.generator_mismatch(generator)
        if diff:
            raise LatentAdapterMismatch(
                "LatentAdapter fitted for another VAE / latent layout: " + "; ".join(diff),
                [d.split(":")[0] for d in diff],
            )

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, path) -> None:
        """safetensors file: the state_dict, and the identity / architecture / fit info as JSON metadata."""
        from safetensors.torch import save_file

        meta = {"identity": self.identity.to_json(), "arch": self.arch, "fit": self.fit_info}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path, *, critic=None, generator=None, device=None, dtype=None) -> LatentAdapter:
        """Load a saved adapter; with `critic` / `generator`, refuse (LatentAdapterMismatch) one fitted for
        another critic (width, token grid, config hash) or another VAE (channels, latent size, patch grid)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
        if meta is None:
            raise ValueError(
                f"LatentAdapter.load: {path} is not a LatentAdapter file (no {_META_KEY} metadata)"
            )
        meta = json.loads(meta)
        ident = AdapterIdentity.from_json(meta["identity"])
        state = load_file(str(path))
        adapter = cls(ident, (state["resample_rows"], state["resample_cols"]), **meta["arch"])
        adapter.load_state_dict(state)
        adapter.fit_info = meta.get("fit", {})
        if critic is not None:
            adapter.check_critic(critic)
        if generator is not None:
            adapter.check_generator(generator)
        adapter.requires_grad_(False).eval()
        return adapter.to(device=device, dtype=dtype) if (device or dtype) else adapter
