"""Launch settings shared by the kernels: one helper, a clear error past its limit (pattern: Liger
`ops/utils.py::calculate_settings`)."""

from __future__ import annotations

import triton

MAX_FUSED_SIZE = 65536


def calculate_settings(n: int, *, max_block: int = MAX_FUSED_SIZE) -> tuple[int, int]:
    """Block size (next power of two >= n) and num_warps for a row-wise kernel over rows of length n."""
    block = triton.next_power_of_2(max(int(n), 1))
    if block > max_block:
        raise ValueError(f"row length {n} needs a block of {block} > {max_block}; use a chunked kernel")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps
