"""Small trainable heads on the critic's patch features: they read fine structure off each patch.

- `DensityHead(in_dim)`: (B, N, D) -> (B, N), the per-patch texture density
  (`uno_engine.targets.density_targets`).
- `StructureHead(in_dim, out_dim=1)`: (B, N, D) -> (B, N) (out_dim = 1: the per-patch Sobel structure,
  `uno_engine.targets.structure_targets`) or (B, N, out_dim) (e.g. out_dim = D to regress the reference
  image's own critic features, with a cosine term).
Both are LayerNorm -> Linear -> GELU -> Linear, computed in the heads' parameter dtype (float32 by default).

How they are trained (jointly with the generator, by the engine's `UNOLoss`), so that their predictions on
generated images mean something:
1. Real side. For each batch with "reference_images", the frozen critic encodes the REFERENCE images
   (`critic.encode_patches`, no gradient: the critic is frozen and the features are detached). The heads
   predict on those features, `head(ref_features)`, and are fitted by regression (e.g. mse / smooth_l1) to
   the reference targets ("density_target", "structure_target" in the batch, or computed from the reference
   images with `uno_engine.targets`). This loss updates the heads' parameters only.
2. Generated side. The critic encodes the GENERATED images (gradient to the generator through the bridge and
   the critic); `head(gen_features, detach_params=True)` is compared with the SAME reference targets. With
   detach_params=True the head is a fixed function for this term: the gradient goes to the features (and
   thence to the generator) only, never to the heads, so the heads learn from real images alone and cannot
   drift toward whatever the generator produces.
3. Both sides are terms of one `uno_engine.ops.fused_regression` call (optionally masked: in editing, the
   structure term covers only the unedited patches, `1 - edit_mask`). The heads' optimizer is the generator's
   (their parameters sit in the same param groups) or a separate one; either way step 1 is what trains them.
Because the heads see only real reference images as training inputs, a head's output on a generated image is
"what this patch's density / structure would be if it were real", and the regression pulls the generated
patch toward the reference's value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PatchMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int | None):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        hidden = hidden or min(max(in_dim // 2, 64), 512)
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def _mlp(self, x: torch.Tensor, detach_params: bool) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"x must have shape (B, N, {self.in_dim}) (last dim in_dim), got {tuple(x.shape)}"
            )

        def p(t):
            return t.detach() if detach_params else t

        x = x.to(self.fc1.weight.dtype)
        h = F.layer_norm(x, (self.in_dim,), p(self.norm.weight), p(self.norm.bias), self.norm.eps)
        h = F.gelu(F.linear(h, p(self.fc1.weight), p(self.fc1.bias)))
        return F.linear(h, p(self.fc2.weight), p(self.fc2.bias))


class DensityHead(_PatchMLP):
    """Per-patch texture density from critic patch features.

    Args:
        in_dim: the critic's vision feature dim D. hidden: MLP width (default min(max(D // 2, 64), 512)).
    forward(x: (B, N, D), *, detach_params=False) -> (B, N). detach_params=True: gradient to x only (use on
    generated images; see the module docstring).
    """

    def __init__(self, in_dim: int, *, hidden: int | None = None):
        super().__init__(in_dim, 1, hidden)

    def forward(self, x: torch.Tensor, *, detach_params: bool = False) -> torch.Tensor:
        return self._mlp(x, detach_params).squeeze(-1)


class StructureHead(_PatchMLP):
    """Per-patch structure (Sobel edge strength, out_dim = 1) or a feature vector (out_dim > 1).

    Args:
        in_dim: the critic's vision feature dim D. out_dim: 1 -> (B, N) output, else (B, N, out_dim).
        hidden: MLP width (default min(max(D // 2, 64), 512)).
    forward(x: (B, N, D), *, detach_params=False) -> (B, N) or (B, N, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int = 1, *, hidden: int | None = None):
        super().__init__(in_dim, out_dim, hidden)

    def forward(self, x: torch.Tensor, *, detach_params: bool = False) -> torch.Tensor:
        y = self._mlp(x, detach_params)
        return y.squeeze(-1) if self.out_dim == 1 else y
