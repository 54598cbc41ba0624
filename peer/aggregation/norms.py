"""Norms and distances of flat vectors, accurate at any length.

`torch.norm` and BLAS `dot` on float32 keep running float32 sums: at d = 1e7 the norm is off by
about 3e-4 relative (1e-3 when every coordinate is alike), enough to move a clipping radius or a
distance screen. Here each slice of CHUNK coordinates is widened to float64 and the slices' sums
are added in float64, so no float64 copy of a whole model (800 MB at 10^8 coordinates) is made.
"""

from __future__ import annotations

import math

import torch

# float32 coordinates per slice: the slice's float64 copy (2 MiB) stays in cache
CHUNK = 1 << 18


def sq_norm(x: torch.Tensor) -> float:
    """||x||^2, summed in float64."""
    x = x.reshape(-1)
    total = 0.0
    for lo in range(0, x.numel(), CHUNK):
        s = x[lo:lo + CHUNK].double()
        total += float(torch.dot(s, s))
    return total


def norm(x: torch.Tensor) -> float:
    """||x||, summed in float64."""
    return math.sqrt(sq_norm(x))


def sq_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||^2, with the differences taken and squared in float64 (exact for float32 inputs)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"distance between a {a.numel()}-vector and a {b.numel()}-vector")
    total = 0.0
    for lo in range(0, a.numel(), CHUNK):
        s = a[lo:lo + CHUNK].to(torch.float64, copy=True).sub_(b[lo:lo + CHUNK])
        total += float(torch.dot(s, s))
    return total


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||, as `sq_distance`."""
    return math.sqrt(sq_distance(a, b))
