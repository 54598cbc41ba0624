"""Clipping rules: centred clipping (server style, stateful) and self-centred clipping (gossip).

clip(z, tau) = z * min(1, tau / ||z||).

- `CenteredClipping` (Karimireddy, He, Jaggi 2021): the centre v persists across rounds (starts
  at 0, or at the first round's mean when `start="mean"`); each round repeats L times
  `v <- v + (1/n) sum_i clip(x_i - v, tau)`.
- `self_centred_clip` (ClippedGossip, He, Karimireddy, Jaggi 2022):
  `x_i <- x_i + sum_j W_ij clip(x_j - x_i, tau_i)`, centred on the peer's own model, so a
  Byzantine partner can move it at most W_ij * tau_i per round whatever it sends.
- `adaptive_radius`: the practical radius of ClippedGossip. Sort partners by distance, drop the
  farthest until the dropped weight reaches the Byzantine budget delta, then
  `tau = sqrt(sum_kept W_j d_j^2 / delta)`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch

from peer.aggregation.norms import distance, norm

# Coordinates per slice in the passes over the partners' models (`mix`, and the first pass of
# `rules._deviations`). Larger slices mean fewer Python-level torch calls (a few microseconds
# each, n per slice); the passes over a slice are bound by arithmetic, not by the cache, so 2 MB
# slices cost nothing there. Measured best of 128K..1M at 8 and 32 partners x 1M and 10M
# (docs/benchmarks.md, aggregate).
SLICE = 1 << 19


def check_radius(tau: float) -> float:
    """A clipping radius: >= 0 (0 keeps the centre), inf for no clipping; never negative or NaN,
    which would flip or poison every clipped vector."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"a clipping radius must be a number >= 0, got {tau!r}")
    return float(tau)


def clip(z: torch.Tensor, tau: float) -> torch.Tensor:
    tau = check_radius(tau)
    n = norm(z)
    return z * (tau / n) if n > tau else z


class CenteredClipping:
    """Server-style centred clipping; the centre `v` is the state carried across rounds."""

    def __init__(self, tau: float = 10.0, iters: int = 3, start: str = "zero"):
        if not (check_radius(tau) > 0 and isinstance(iters, int) and iters >= 1):
            raise ValueError(f"centred clipping needs tau > 0 and iters >= 1, got tau={tau!r}, iters={iters!r}")
        if start not in ("zero", "mean"):
            raise ValueError(f"centred clipping starts at 'zero' or 'mean', not {start!r}")
        self.tau, self.iters, self.start = tau, iters, start
        self.v: torch.Tensor | None = None

    def __call__(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = xs if isinstance(xs, torch.Tensor) else torch.stack(list(xs))
        if self.v is None or self.v.shape != x[0].shape:
            self.v = torch.zeros_like(x[0]) if self.start == "zero" else x.mean(0)
        v = self.v.clone()
        n = x.shape[0]
        for _ in range(self.iters):
            step = torch.zeros_like(v)
            for xi in x:
                step += clip(xi - v, self.tau)
            v += step / n
        self.v = v
        return v.clone()


def adaptive_radius(dists: Sequence[float], weights: Sequence[float], budget: float) -> float:
    """ClippedGossip's radius from partner distances, their mixing weights and the Byzantine budget.

    The farthest partners are dropped until exactly `budget` weight is gone (the last one only in
    part), then tau = sqrt(sum_kept W_j d_j^2 / budget). Dropping whole partners instead would
    overshoot with few partners: with 2 partners and a budget of a quarter of their weight, the
    farther honest one would always be clipped to the nearer one's distance.
    """
    if not budget >= 0:  # NaN included
        raise ValueError(f"the Byzantine budget must be >= 0, got {budget!r}")
    if budget == 0:
        return math.inf
    order = sorted(range(len(dists)), key=lambda j: dists[j], reverse=True)
    to_drop = budget
    total = 0.0
    for j in order:
        gone = min(weights[j], to_drop)
        to_drop -= gone
        total += (weights[j] - gone) * dists[j] ** 2
    return math.sqrt(total / budget)


def clip_factors(dists: Sequence[float], weights: Sequence[float], tau: float) -> list[float]:
    """The factor each partner's difference x_j - own enters the mix with: w_j, times tau / d_j
    where the partner is farther than tau (clip(z, tau) = z * min(1, tau / ||z||))."""
    tau = check_radius(tau)
    return [w * (tau / d if d > tau else 1.0) for d, w in zip(dists, weights)]


def mix(own: torch.Tensor, others: Sequence[torch.Tensor], factors: Sequence[float],
        out: torch.Tensor | None = None, buffer=None) -> torch.Tensor:
    """own + sum_j factors[j] (x_j - own), on flat tensors, slice by slice (the result's slice stays
    in cache; no d-sized temporary). `buffer(numel, dtype)` may lend the slice-sized work buffer."""
    out = torch.empty_like(own) if out is None else out
    live = [(x, c) for x, c in zip(others, factors) if c]
    d = own.numel()
    width = max(1, min(SLICE, d))
    buf = buffer(width, own.dtype) if buffer is not None else torch.empty(width, dtype=own.dtype)
    for lo in range(0, d, SLICE):
        hi = min(lo + SLICE, d)
        s, o, r = buf[:hi - lo], own[lo:hi], out[lo:hi]
        r.copy_(o)
        for x, c in live:
            torch.sub(x[lo:hi], o, out=s)
            r.add_(s, alpha=c)
    return out


def self_centred_clip(own: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float],
                      tau: float) -> torch.Tensor:
    """own + sum_j w_j clip(x_j - own, tau); `weights` are the partners' mixing weights.

    The gossip rules (`rules.WeightedGossip`) mix with these same two functions, `clip_factors`
    and `mix`, from distances they measure in their own first pass over the models."""
    shape = own.shape
    own_flat, flat = own.reshape(-1), [x.reshape(-1) for x in others]
    factors = clip_factors([distance(x, own_flat) for x in flat], weights, tau)
    return mix(own_flat, flat, factors).view(shape)


class RadiusCap:
    """Remembers recent partner distances; caps a radius at `factor` x their median.

    The adaptive radius comes from this round's partners only: if most partners of a round are
    Byzantine and far away, it is huge. The median over the last `window` partner distances
    (weighted or not) stays an honest distance as long as fewer than half of the pulls were
    Byzantine, and it cannot ratchet itself up the way a median of past radii would.
    """

    def __init__(self, factor: float = 2.0, window: int = 64):
        if not check_radius(factor) > 0:
            raise ValueError(f"the radius cap's factor must be > 0, got {factor!r}")
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, dists: Sequence[float]) -> None:
        self.recent.extend(d for d in dists if math.isfinite(d))

    def median(self) -> float:
        if not self.recent:
            return math.inf
        s = sorted(self.recent)
        return s[(len(s) - 1) // 2]

    def __call__(self, tau: float) -> float:
        return min(tau, self.factor * self.median())
