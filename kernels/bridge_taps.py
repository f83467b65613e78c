"""Tap tables of the bridge's resampling passes (host side, numpy): the banded Pillow weight matrices as
(start, weights) per output index, for both passes and their transposes, plus the band widths the fused
kernels size their tiles from.

A banded matrix M (n_out, n_in) becomes start (n_out,) int32 and weights (n_out, K) float32 with
    (M @ src)[o] = sum_{k < K} weights[o, k] * src[start[o] + k],
K the widest band (first..last nonzero of a row, interior zeros included, so the taps equal the dense row
exactly). The transposed tables (for the backward's gathers) are the same construction on M^T: for each
source index, the first output index that reads it and the weights.

Reference: Pillow `Resample.c` (`precompute_coeffs`: each output's support is a contiguous source range).
"""

from __future__ import annotations

import numpy as np

TABLES = ("ys", "wy", "xs", "wx", "oys", "wyT", "oxs", "wxT")  # the order of the device tables
SPAN_TILES = tuple(1 << e for e in range(8))  # tile lengths (1..128) whose source band `tap_tables` measures
COUNTS = ("KY", "KX", "KTY", "KTX", *(f"S{a}{n}" for a in ("Y", "X", "TY", "TX") for n in SPAN_TILES))


def _taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of a banded matrix (n_out, n_in) as (start (n_out,) int32, weights (n_out, K) float32, K): row o is
    sum_k weights[o, k] * src[start[o] + k]. The band is the first..last nonzero of each row, interior zeros
    included, so the taps equal the dense row exactly; starts are made non-decreasing. Empty rows (padding) get
    zero weights and the start of the nearest non-empty row."""
    nz = m != 0
    n_out, n_in = m.shape
    any_ = nz.any(1)
    first = np.where(any_, nz.argmax(1), 0)
    last = np.where(any_, n_in - nz[:, ::-1].argmax(1), 0)
    if (
        any_.any()
    ):  # empty rows borrow the nearest start, so a tile's band [min start, max start + K) stays tight
        idx_ne = np.flatnonzero(any_)
        near = idx_ne[np.clip(np.searchsorted(idx_ne, np.arange(n_out)), 0, len(idx_ne) - 1)]
        first = np.where(any_, first, first[near])
        last = np.where(any_, last, first)
        # monotone starts (a row whose leading weights are exactly zero starts no later than the next row):
        # the fused kernels' tile bands run from a tile's first start to its last; the extra taps weigh zero
        first = np.minimum.accumulate(first[::-1])[::-1]
    K = max(int((last - first).max()) if n_out else 0, 1)
    idx = np.minimum(first[:, None] + np.arange(K)[None, :], n_in - 1)
    w = np.where(np.arange(K)[None, :] < (last - first)[:, None], np.take_along_axis(m, idx, 1), 0.0)
    return first.astype(np.int32), np.ascontiguousarray(w, dtype=np.float32), K


def tap_tables(wy: np.ndarray, wx: np.ndarray) -> dict:
    """The tap tables of both passes and of their transposes, from the canvas matrices wy (Hc, H), wx (Wc, W).

    Forward: ys/wy (Hc,), (Hc, KY) and xs/wx (Wc,), (Wc, KX). Backward: for each image row (column), the first
    canvas row (column) that reads it and the weights: oys/wyT (H,), (H, KTY) and oxs/wxT (W,), (W, KTX)."""
    wy = np.asarray(wy, dtype=np.float64)
    wx = np.asarray(wx, dtype=np.float64)
    out = {}
    for name, m in (("y", wy), ("x", wx)):
        s, w, k = _taps(m)
        out[name + "s"], out["w" + name], out["K" + name.upper()] = s, w, k
        out.update(_spans(s, k, name.upper()))
        s, w, k = _taps(np.ascontiguousarray(m.T))
        out["o" + name + "s"], out["w" + name + "T"], out["KT" + name.upper()] = s, w, k
        out.update(_spans(s, k, "T" + name.upper()))
    return out


def _spans(starts: np.ndarray, K: int, axis: str) -> dict:
    """S{axis}{n}: the widest source band of a tile of n consecutive indices (tiles at multiples of n) of a tap
    table with non-decreasing starts, for each n of SPAN_TILES: what the fused kernels' tiles read."""
    out = {}
    N = len(starts)
    s = starts.astype(np.int64)
    for n in SPAN_TILES:
        i0 = np.arange(0, N, n)
        out[f"S{axis}{n}"] = int((s[np.minimum(i0 + n, N) - 1] + K - s[i0]).max()) if N else K
    return out
