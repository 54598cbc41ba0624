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
    """Caps a radius at `factor` x the median of recent partner distances and, once known,
    `movement_factor` x the median of this peer's own recent movement between rounds.

    The adaptive radius comes from this round's partners only: if most partners of a round are
    Byzantine and far away, it is huge. The median over the last `window` partner distances
    (weighted or not) stays an honest distance as long as fewer than half of the pulls were
    Byzantine, and it cannot ratchet itself up the way a median of past radii would.

    Partner distances are still the swarm's spread, which attackers can widen: a partner that
    stays just inside every screen pushes honest models apart, the median distance grows, and so
    does what the next push may be (a threshold-hugger took the honest spread from 1.5 to 6.5 in
    ten rounds; docs/robustness.md). How far our own model moved between rounds (local training,
    measured from the previous mix's output) is set by our own data and optimiser, so the second
    cap bounds a partner's push by our own progress whatever the spread does. In clean runs the
    honest partner distance is about 2.2 x that movement (MNIST-1D, alpha 0.1, 5 local steps), so
    `movement_factor` 3 clips honest partners rarely there. It is off (None) unless asked for: the
    scale holds only when every round follows a similar number of local steps. A daemon's rounds
    are timed, and rounds with no step in between measure float rounding (1e-9), which made the
    radius ~0 and stopped consensus (tests/test_memory_swarm.py).
    """

    def __init__(self, factor: float = 2.0, window: int = 64, movement_factor: float | None = None):
        if not check_radius(factor) > 0:
            raise ValueError(f"the radius cap's factor must be > 0, got {factor!r}")
        if movement_factor is not None and not check_radius(movement_factor) > 0:
            raise ValueError(f"the radius cap's movement factor must be > 0, got {movement_factor!r}")
        self.factor, self.movement_factor = factor, movement_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.movements: deque[float] = deque(maxlen=window)

    def observe(self, dists: Sequence[float], movement: float | None = None) -> None:
        """This round's partner distances and, when known, how far our model moved since the last
        mix's output (a non-finite or zero movement says nothing and is not kept)."""
        self.recent.extend(d for d in dists if math.isfinite(d))
        if self.movement_factor is not None and movement is not None and math.isfinite(movement) and movement > 0:
            self.movements.append(movement)

    def median(self) -> float:
        return _lower_median(self.recent)

    def movement(self) -> float:
        return _lower_median(self.movements)

    def __call__(self, tau: float) -> float:
        by_movement = math.inf if self.movement_factor is None else self.movement_factor * self.movement()
        return min(tau, self.factor * self.median(), by_movement)


def _lower_median(values: Sequence[float]) -> float:
    if not values:
        return math.inf
    s = sorted(values)
    return s[(len(s) - 1) // 2]
