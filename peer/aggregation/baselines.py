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

from peer.aggregation.norms import distance, sq_distance


def _check_f(rule: str, f: int, n: int) -> None:
    """f, the inputs assumed faulty: an integer with 0 <= f < n (a negative f would widen the set
    of neighbours Krum scores, an f of n or more leaves nothing to trust)."""
    if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < n:
        raise ValueError(f"{rule} needs an integer f with 0 <= f < n (n={n}, f={f!r})")


def _stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(xs) == 0:
        raise ValueError("no inputs to aggregate")
    return xs if isinstance(xs, torch.Tensor) else torch.stack(list(xs))


def mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return _stack(xs).mean(0)


MEDIAN_SLICE = 1 << 18  # coordinates per slice: the sort's temporaries stay a few MB at any model size


def coordinate_median(xs: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Median per coordinate; for an even count, the mean of the two middle values (numpy's rule).

    Worked slice by slice, so the only model-sized memory is the result: a stack and sort of n
    whole models would hold about 4n copies. `out` (a fresh tensor when None) may be one of the
    inputs: each slice is read whole before it is written."""
    if len(xs) == 0:
        raise ValueError("no inputs to aggregate")
    n, d = len(xs), xs[0].shape[0]
    out = torch.empty_like(xs[0]) if out is None else out
    for a in range(0, d, MEDIAN_SLICE):
        b = min(a + MEDIAN_SLICE, d)
        s = torch.stack([x[a:b] for x in xs]).sort(0).values
        out[a:b] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trimmed_mean(xs: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    x = _stack(xs)
    n = x.shape[0]
    _check_f("trimmed mean", f, n)
    if not 2 * f < n:
        raise ValueError(f"trimmed mean needs n > 2f (n={n}, f={f})")
    if f == 0:
        return x.mean(0)
    return x.sort(0).values[f : n - f].mean(0)


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """Exact n x n squared distances, pair by pair in float64 slices (no Gram-matrix cancellation,
    no n x d temporaries)."""
    n = x.shape[0]
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = sq_distance(x[i], x[j])
    return d + d.T


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    n = x.shape[0]
    _check_f("krum", f, n)
    k = max(1, n - f - 2)
    d = pairwise_sq_distances(x)
    d.fill_diagonal_(float("inf"))
    return d.sort(1).values[:, : min(k, n - 1)].sum(1) if n > 1 else torch.zeros(1, dtype=torch.float64)


def multi_krum(xs: Sequence[torch.Tensor], f: int, m: int | None = None) -> torch.Tensor:
    """Mean of the m inputs with the lowest Krum scores (m = n - f by default; m = 1 is Krum)."""
    x = _stack(xs)
    n = x.shape[0]
    _check_f("multi-krum", f, n)
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
    """Smoothed Weiszfeld: z <- sum(b_i x_i) / sum(b_i), b_i = 1 / max(nu, ||x_i - z||).

    nu > 0 bounds every weight (an input equal to z would otherwise get an infinite one)."""
    if isinstance(nu, bool) or not isinstance(nu, (int, float)) or not nu > 0:  # NaN included
        raise ValueError(f"geometric median needs a smoothing nu > 0, got {nu!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"geometric median needs iters >= 0, got {iters!r}")
    x = _stack(xs)
    z = torch.zeros_like(x[0]) if init is None else init.clone()
    for _ in range(iters):
        dist = torch.tensor([distance(xi, z) for xi in x], dtype=torch.float64).clamp_min(nu)
        b = (1.0 / dist).to(x.dtype)
        z = (b[:, None] * x).sum(0) / b.sum()
    return z


def nnm(xs: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Nearest-neighbour mixing: each input becomes the mean of its n - f nearest (itself included)."""
    x = _stack(xs)
    n = x.shape[0]
    _check_f("NNM", f, n)
    k = n - f
    d = pairwise_sq_distances(x)
    idx = torch.from_numpy(d.numpy().argsort(1, kind="stable")[:, :k].copy())
    return torch.stack([x[idx[i]].mean(0) for i in range(n)])
