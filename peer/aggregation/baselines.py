"""Classic robust aggregation rules on a list of flat float32 vectors (server-style baselines).

Pure functions: `xs` is a sequence of equal-length 1-D tensors, `f` the number of inputs assumed
faulty. Conventions are pinned (and tested against Flower / ByzFL golden vectors):

- Krum scores each input by the sum of squared distances to its n - f - 2 nearest others
  (Blanchard et al. and Flower; ByzFL uses n - f - 1).
- Trimmed mean drops the f largest and f smallest values per coordinate.
- Geometric median: smoothed Weiszfeld (nu = 0.1), starting at `init` (zeros unless given).
- NNM replaces each input by the mean of its n - f nearest inputs (itself included).
"""

from __future__ import annotations

from typing import Sequence

import torch


def _stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(xs) == 0:
        raise ValueError("no inputs to aggregate")
    return xs if isinstance(xs, torch.Tensor) else torch.stack(list(xs))


def mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return _stack(xs).mean(0)


def coordinate_median(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Median per coordinate; for an even count, the mean of the two middle values (numpy's rule)."""
    x = _stack(xs)
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    s = x.sort(0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(xs: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    x = _stack(xs)
    n = x.shape[0]
    if not 0 <= 2 * f < n:
        raise ValueError(f"trimmed mean needs n > 2f (n={n}, f={f})")
    if f == 0:
        return x.mean(0)
    return x.sort(0).values[f : n - f].mean(0)


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """Exact n x n squared distances (row by row, float64 sums: no Gram-matrix cancellation)."""
    n = x.shape[0]
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        d[i, i + 1 :] = (x[i + 1 :] - x[i]).double().square().sum(1)
    return d + d.T


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    n = x.shape[0]
    k = max(1, n - f - 2)
    d = pairwise_sq_distances(x)
    d.fill_diagonal_(float("inf"))
    return d.sort(1).values[:, : min(k, n - 1)].sum(1) if n > 1 else torch.zeros(1, dtype=torch.float64)


def multi_krum(xs: Sequence[torch.Tensor], f: int, m: int | None = None) -> torch.Tensor:
    """Mean of the m inputs with the lowest Krum scores (m = n - f by default; m = 1 is Krum)."""
    x = _stack(xs)
    n = x.shape[0]
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi-krum needs 1 <= m <= n (m={m}, n={n})")
    # stable: ties go to the earlier input, as numpy's argsort in the reference implementations
    chosen = torch.from_numpy(krum_scores(x, f).numpy().argsort(kind="stable")[:m].copy())
    return x[chosen].mean(0)


def krum(xs: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    return multi_krum(xs, f, m=1)


def geometric_median(xs: Sequence[torch.Tensor], nu: float = 0.1, iters: int = 3,
                     init: torch.Tensor | None = None) -> torch.Tensor:
    """Smoothed Weiszfeld: z <- sum(b_i x_i) / sum(b_i), b_i = 1 / max(nu, ||x_i - z||)."""
    x = _stack(xs)
    z = torch.zeros_like(x[0]) if init is None else init.clone()
    for _ in range(iters):
        dist = (x - z).norm(dim=1).clamp_min(nu)
        b = 1.0 / dist
        z = (b[:, None] * x).sum(0) / b.sum()
    return z


def nnm(xs: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Nearest-neighbour mixing: each input becomes the mean of its n - f nearest (itself included)."""
    x = _stack(xs)
    n = x.shape[0]
    k = n - f
    if k < 1:
        raise ValueError(f"NNM needs n > f (n={n}, f={f})")
    d = pairwise_sq_distances(x)
    idx = torch.from_numpy(d.numpy().argsort(1, kind="stable")[:, :k].copy())
    return torch.stack([x[idx[i]].mean(0) for i in range(n)])
