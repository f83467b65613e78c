"""Standard errors of the judge's accuracy (benchmarks/learning.py): every prompt of a split is judged with
m samples (different noise), so a seed's accuracy is a mean of per-prompt pass rates, and before / after are
compared on the same prompts and the same noise (paired).

For per-prompt pass counts k_i of m samples, i = 1..P, with y_i = k_i / m and A = mean_i y_i:

- `se` (the reported one): cluster-robust over prompts, SE^2 = sum_i (y_i - A)^2 / (P (P - 1)). The m samples
  of one prompt are one cluster (they share the prompt, so they are not independent draws); this counts the
  within-prompt binomial spread and the spread between prompts, i.e. the error of A as an estimate of the
  accuracy on prompts like these. It is the conservative one and the one the bars (SE <= 1.5 points) use.
- `se_binomial`: the naive binomial, sqrt(A (1 - A) / (m P)), as if the m P images were independent.
- `se_fixed_prompts`: the sampling error for THIS set of prompts (a census: only the noise is random),
  SE^2 = sum_i y_i (1 - y_i) / ((m - 1) P^2) (the unbiased within-prompt variance).

Paired difference after - before (same prompts, same noise): d_i = y_i(after) - y_i(before),
SE^2 = sum_i (d_i - mean d)^2 / (P (P - 1)) (cluster-robust; the pairing's correlation is inside d_i).

Over seeds s = 1..n (each with its own noise; the prompts are the same): the mean of the per-seed figures,
`se` = sqrt(sum_s se_s^2) / n (evaluation error of the mean, given the trained models) and `seed_sd`, the
standard deviation of the per-seed figures (training and evaluation noise together).
"""

from __future__ import annotations

import math


def _check(k: list[int], m: int, name: str) -> None:
    if m < 1:
        raise ValueError(f"{name}: samples per prompt `m` must be >= 1, got {m}")
    if not k:
        raise ValueError(f"{name}: `k` (per-prompt pass counts) is empty")
    bad = [x for x in k if not (isinstance(x, int) and 0 <= x <= m)]
    if bad:
        raise ValueError(f"{name}: `k` must hold integers in [0, m={m}], got {bad[:5]}")


def _cluster_se(y: list[float]) -> float | None:
    P = len(y)
    if P < 2:
        return None
    a = sum(y) / P
    return math.sqrt(sum((v - a) ** 2 for v in y) / (P * (P - 1)))


def accuracy(k: list[int], m: int) -> dict:
    """Per-prompt pass counts k (P,) of m samples each -> {"mean", "se", "se_binomial", "se_fixed_prompts",
    "prompts", "samples_per_prompt"} (fractions in [0, 1]; see the module docstring)."""
    _check(k, m, "stats.accuracy")
    P = len(k)
    y = [x / m for x in k]
    a = sum(y) / P
    fixed = math.sqrt(sum(v * (1 - v) for v in y) / ((m - 1) * P * P)) if m > 1 else None
    return {
        "mean": a,
        "se": _cluster_se(y),
        "se_binomial": math.sqrt(a * (1 - a) / (m * P)),
        "se_fixed_prompts": fixed,
        "prompts": P,
        "samples_per_prompt": m,
    }


def paired(k_after: list[int], k_before: list[int], m: int) -> dict:
    """The paired difference after - before of two evaluations of the same prompts with the same noise ->
    {"diff", "se", "prompts"} (fractions)."""
    _check(k_after, m, "stats.paired")
    _check(k_before, m, "stats.paired")
    if len(k_after) != len(k_before):
        raise ValueError(
            f"stats.paired: `k_after` has {len(k_after)} prompts but `k_before` has {len(k_before)}"
        )
    d = [(a - b) / m for a, b in zip(k_after, k_before, strict=True)]
    return {"diff": sum(d) / len(d), "se": _cluster_se(d), "prompts": len(d)}


def over_seeds(values: list[float], ses: list[float | None]) -> dict:
    """Per-seed figures and their SEs -> {"mean", "se", "seed_sd", "n_seeds"}."""
    if not values or len(values) != len(ses):
        raise ValueError(f"stats.over_seeds: need as many `ses` as `values`, got {len(ses)} and {len(values)}")
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum(s * s for s in ses)) / n if all(s is not None for s in ses) else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "se": se, "seed_sd": sd, "n_seeds": n}
