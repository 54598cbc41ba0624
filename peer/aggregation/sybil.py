"""Sybil resistance: FoolsGold scores over update histories, as SybilWall uses them.

A Sybil cluster (one attacker, many identities) pushes the model the same way from every
identity, so the *histories* of its members (the sum of each one's local updates) point the same
way, while honest peers with different data drift apart. FoolsGold turns "too similar to someone
else" into a low weight.

Histories travel as sketches, not vectors: `Sketcher` maps a d-dimensional vector to k numbers
with a fixed random sign per coordinate and a sum over k contiguous blocks. It is linear and
preserves inner products in expectation (E<Sa, Sb> = <a, b>), so cosines of sketches estimate
cosines of histories, to about 1/sqrt(k), at the cost of one pass over the vector.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

from protocols.discovery import SKETCH_DIM  # what a record carries
# Coordinates per slice when a pass over long vectors goes slice by slice: a few slices of this
# size stay in cache, and no temporary as long as the model is allocated.
CHUNK = 1 << 18


class Sketcher:
    """Linear sketch d -> k, identical on every peer of a run (signs drawn from `seed`)."""

    def __init__(self, dim: int, k: int = SKETCH_DIM, seed: int = 0):
        self.dim, self.k = dim, k
        self.block = math.ceil(dim / k)
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.block * k,), generator=g, dtype=torch.int8).mul_(2).sub_(1)
        signs[dim:] = 0  # padding contributes nothing
        self.signs = signs.to(torch.float32)  # read only: one sketcher may serve several users

    def slices(self, chunk: int = CHUNK):
        """(lo, hi, first block, blocks) covering [0, dim) in slices of whole blocks, about `chunk` long."""
        step = self.block * max(1, chunk // self.block)
        for lo in range(0, self.dim, step):
            hi = min(lo + step, self.dim)
            yield lo, hi, lo // self.block, -(-(hi - lo) // self.block)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.dim:
            raise ValueError(f"sketch of a {x.numel()}-vector with a {self.dim}-sketcher")
        x = x.reshape(-1)
        return self._sketch(lambda lo, hi, out: torch.mul(x[lo:hi], self.signs[lo:hi], out=out), x.dtype)

    def of_difference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The sketch of a - b, bit for bit `self(a - b)`, without the d-sized difference: each
        slice of it is formed in a slice buffer."""
        if not a.numel() == b.numel() == self.dim:
            raise ValueError(f"sketch of {a.numel()}- and {b.numel()}-vectors with a {self.dim}-sketcher")
        a, b = a.reshape(-1), b.reshape(-1)

        def fill(lo: int, hi: int, out: torch.Tensor) -> None:
            torch.sub(a[lo:hi], b[lo:hi], out=out).mul_(self.signs[lo:hi])

        return self._sketch(fill, torch.promote_types(a.dtype, b.dtype))

    def _sketch(self, fill, dtype: torch.dtype) -> torch.Tensor:
        """Block sums of x * signs, where `fill(lo, hi, out)` writes x[lo:hi] * signs[lo:hi] into `out`."""
        out = torch.empty(self.k, dtype=torch.promote_types(dtype, self.signs.dtype))
        out[-(-self.dim // self.block):] = 0  # blocks wholly in the padding
        buf = torch.zeros(min(self.block * max(1, CHUNK // self.block), self.block * self.k), dtype=out.dtype)
        for lo, hi, first, blocks in self.slices():
            s = buf[:blocks * self.block]
            s[hi - lo:].zero_()  # the padding contributes nothing
            fill(lo, hi, s[:hi - lo])
            torch.sum(s.view(blocks, self.block), 1, out=out[first:first + blocks])
        return out


# sketchers alive, by (dim, k, seed): their signs are one float32 vector as long as the model,
# so the daemon's history sketches and its rule's observed sketches share one
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_sketcher(dim: int, k: int = SKETCH_DIM, seed: int = 0) -> Sketcher:
    """The `Sketcher(dim, k, seed)` every caller in this process shares while one is alive."""
    key = (dim, k, seed)
    sketcher = _SHARED.get(key)
    if sketcher is None:
        sketcher = _SHARED[key] = Sketcher(dim, k, seed)
    return sketcher


def cosine_matrix(h: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of rows (a zero row is similar to nothing)."""
    h = h.double()
    norms = h.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, h / norms.clamp_min(1e-300), torch.zeros_like(h))
    return unit @ unit.T


# Histories whose cosine is within this of 1 are clones. The cosine of two identical vectors
# computes to 1 - 2e-16 about a quarter of the time; FoolsGold then divides that residue by
# itself (max or median normalisation over clones) and the clones got full weight. Honest
# histories are never this close (an angle under 1.5 mrad); float16 rounding of a copied sketch
# moves the cosine by about 1e-9.
CLONE_GAP = 1e-6


def foolsgold_weights(cs: torch.Tensor, normalise: str = "max") -> torch.Tensor:
    """FoolsGold (Fung et al.) from a similarity matrix: weights in [0, 1], one per row.

    cs_pp = 0; v_p = max_q cs_pq; pardoning: cs_pq *= v_p / v_q where v_p < v_q;
    a_p = clip(1 - max_q cs_pq, 0, 1); a /= max a; a[a == 1] = 0.99; a = clip(logit(a) + 0.5, 0, 1).
    Identical histories (cosine within CLONE_GAP of 1) give weight 0; a peer with nobody to
    compare to gets weight 1.

    `normalise="median"` divides by the median of a instead of its max (then caps at 0.99). The
    max assumes honest peers are mutually dissimilar; early in a gossip run every honest history
    points along the same descent direction, and max-normalisation then gives all the weight to
    the most dissimilar peer, which is often an attacker (measured: honest partners at weight 0,
    a sign-flipper at 0.5). The median assumes only an honest majority, as every rule here does.
    """
    cs = cs.double().clone()
    n = cs.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    cs.fill_diagonal_(0.0)
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    cs = torch.where(cs >= 1.0 - CLONE_GAP, 1.0, cs)  # a clone pair scores exactly 0 below
    v = cs.max(1).values
    pardon = (v[:, None] < v[None, :]) & (v[None, :] > 0)
    cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp_min(1e-300), cs)
    cs.fill_diagonal_(-math.inf)
    a = (1.0 - cs.max(1).values).clamp(0.0, 1.0)
    top = float(a.max()) if normalise == "max" else float(a.median())
    if top <= 0:
        top = float(a.max())
        if top <= 0:
            return torch.zeros(n, dtype=torch.float64)
    a = (a / top).clamp(max=1.0)
    a[a == 1.0] = 0.99
    with torch.no_grad():
        logit = torch.log(a / (1.0 - a)) + 0.5  # a = 0 gives -inf, clipped to 0 below
    return logit.clamp(0.0, 1.0).nan_to_num(0.0)


def similarity(reported: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], ids: Sequence[str]) -> torch.Tensor:
    """Pairwise similarity over `ids`: the larger of the cosines of reported and observed histories.

    Reported histories are self-reported (signed, but a liar can add noise); observed ones are
    built from the models this peer actually received, so a peer must look dissimilar in both.
    """
    n = len(ids)
    cs = torch.full((n, n), -1.0, dtype=torch.float64)
    for source in (reported, observed):
        have = [i for i, p in enumerate(ids) if p in source]
        if len(have) < 2:
            continue
        m = cosine_matrix(torch.stack([source[ids[i]] for i in have]))
        if len(have) == n:  # everyone has one: no scatter needed
            cs = torch.maximum(cs, m)
            continue
        idx = torch.tensor(have)
        cs[idx[:, None], idx[None, :]] = torch.maximum(cs[idx[:, None], idx[None, :]], m)
    return cs


# A partner's served models must move the way its reported history says it trained: the cosine
# of what we observed (its deviations from our mix, summed) with what it reports. Honest peers
# score about +0.8 (never below +0.25 measured); a sign flipper that reports its real training
# scores about -0.8. At or below 0 the weight is 0, full weight from CONSISTENT_AT on.
CONSISTENT_AT = 0.2
# our own offset from the swarm is one vector added to every partner's observed sum: when it is
# what fails them, their sums point the same way (measured cosine ~1 when it dominates)
SHARED_OFFSET_AT = 0.5
# A reported history must point roughly where the run's histories point: its cosine with the
# coordinate-wise median of the others', relative to the median peer's. Measured over 100 rounds
# (20 honest Dirichlet(0.5) peers + 5 label flippers): honest peers score +0.13..+0.26 (falling
# as histories drift apart), label flippers +0.04..+0.09, a third to a half of the median; but
# the lowest honest peers (rare classes) score +0.02. Weight 0 at or below ALIGNED_ZERO x the
# median score, full from ALIGNED_FULL x, linear between. A steeper ramp (0.4x..0.8x) left the
# label-flip accuracy where it was and cost 1.3 points with no attack (3 seeds).
ALIGNED_ZERO, ALIGNED_FULL = 0.0, 0.5


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """cos(a_i, b_i) for every row i, in float64 (0 where a row is zero): one call for all peers,
    not a few small torch calls per peer (those cost ~0.1 ms per round per peer)."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb)
    return torch.where((na > 0) & (nb > 0), cos, 0.0).tolist()


def consistency_factors(reported: dict[str, torch.Tensor], observed: dict[str, torch.Tensor],
                        voters: set[str] | None = None) -> tuple[dict[str, float], bool]:
    """Weight factor in [0, 1] per peer with both histories: does what it serves follow what it reports?

    Catches a peer that trains honestly and reports it, but serves something else (sign flip). A
    peer that lies in its report to pass this check moves its reported history away from what it
    trains, which `alignment_factors` or FoolsGold on the observed channel then see instead.

    Observed deviations are measured from *our* mixed model, so they also carry our own offset
    from the swarm. When our model is the odd one out (it memorised its shard while the others
    converged together), that offset dominates every partner's sum, every partner fails, we never
    mix, and the offset grows (a 3-peer real swarm stuck at 84 %, docs/robustness.md). So the check
    is suspended for the round (every factor 1; the second value returned is True) when it
    measures us rather than them: more than half of the two or more `voters` (the judged peers
    the other Sybil checks give at least half weight; default: all) get weight 0 from it, *and*
    the observed sums of those that fail point one way (median pairwise cosine >=
    SHARED_OFFSET_AT), as one common offset makes them. Sign flippers in an honest majority
    cannot trigger it, nor can identities that each serve something unrelated (the second test)
    or near-clones in a minority (FoolsGold takes their vote). Coordinated identities that
    outnumber the honest voters can (9 coordinated identities against 8 honest voters do); so can a majority
    against alignment and FoolsGold's median normalisation. Clipping still bounds each partner.
    """
    ids = [p for p in reported if p in observed]
    if not ids:
        return {}, False
    cos = _row_cosines(torch.stack([observed[p] for p in ids]), torch.stack([reported[p] for p in ids]))
    factors = {p: min(1.0, max(0.0, c / CONSISTENT_AT)) for p, c in zip(ids, cos)}
    judged = [p for p in ids if voters is None or p in voters]
    failing = [p for p in judged if factors[p] == 0.0]
    if len(judged) < 2 or 2 * len(failing) <= len(judged):
        return factors, False
    m = cosine_matrix(torch.stack([observed[p] for p in failing]))
    pairs = m[torch.triu_indices(len(failing), len(failing), 1).unbind()]
    return factors, float(pairs.median()) >= SHARED_OFFSET_AT


def alignment_factors(reported: dict[str, torch.Tensor]) -> dict[str, float]:
    """Weight factor in [0, 1] per reported history: does it point where the run's histories point?

    Catches poisoned training that is reported truthfully (label flip): y -> 9 - y pushes the
    model against what every honest peer's data teaches, so its history turns away from the
    coordinate-wise median of all histories (robust while fewer than half of the peers lie). Needs
    at least 4 histories. Relative to the median score, so a run whose histories all scatter
    (very non-IID data, late training) does not lose its honest peers.
    """
    ids = list(reported)
    if len(ids) < 4:
        return {p: 1.0 for p in ids}
    h = torch.stack([reported[p] for p in ids]).double()
    score = dict(zip(ids, _row_cosines(h, _medians_of_others(h))))
    median = sorted(score.values())[(len(ids) - 1) // 2]
    if median <= 0:
        return {p: 1.0 for p in ids}
    return {p: min(1.0, max(0.0, (s / median - ALIGNED_ZERO) / (ALIGNED_FULL - ALIGNED_ZERO))) for p, s in score.items()}


def _medians_of_others(h: torch.Tensor) -> torch.Tensor:
    """Row i: the coordinate-wise (lower) median of every row but i, as `torch.median` gives it.

    One sort per coordinate instead of n medians: with a and b the values of sorted rank m and
    m + 1, m = (n - 2) // 2, removing a value above a leaves the lower median at a, removing
    any other leaves it at b (a value equal to a either sits at rank <= m, or a == b). So a
    round costs O(n log n) per coordinate however many records Sybils publish. Sorted along
    contiguous rows (the transpose): sorting down the columns in place is 5-10x slower.
    """
    n = h.shape[0]
    m = (n - 2) // 2
    values = h.T.contiguous().sort(dim=1).values
    a, b = values[:, m], values[:, m + 1]
    return torch.where(h > a, a, b)
