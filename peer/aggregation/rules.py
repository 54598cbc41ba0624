"""The aggregation rules a daemon runs, built from the pure functions of this package.

The building blocks are pure functions on flat float32 tensors (`baselines`, `clipping`,
`sybil`); the rules below wire them into what a gossip round needs. A rule is called as
`rule(own, others, ctx)` and returns a `Mix`: the peer's new model and what the rule decided
(each partner's weight, whom it refused and why, the clipping radius, each Sybil check's factor).
`rule(own, others, ctx, out=buf)` writes the model into `buf` (and `Mix.model` is `buf`), so a
daemon that reuses one buffer across rounds pays no page faults for a fresh d-sized result every
round. `out` must not overlap `own` or `others`.
Stateful rules (centred clipping's
centre, SybilWall's observed histories, the radius memory) keep their state in the rule object,
one per daemon.

`AGGREGATORS` (re-exported by `peer.aggregation`) maps every name of `peer.aggregation.DESCRIPTIONS`
to a factory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from peer.aggregation import baselines
from peer.aggregation.clipping import SLICE, CenteredClipping, RadiusCap, adaptive_radius, clip_factors, mix
from peer.aggregation.loss import LossScreen
from peer.aggregation.norms import distance, norm
from peer.aggregation import DESCRIPTIONS, check_byzantine_fraction
from peer.aggregation.sybil import Sketcher, alignment_factors, consistency_factors, foolsgold_weights, shared_sketcher, similarity


# a peer votes on whether the consistency check is measuring us (sybil.consistency_factors) only
# if FoolsGold and alignment give it at least this factor
VOTER_AT = 0.5



@dataclass
class RoundContext:
    """What a rule may know besides the vectors: who the partners are and the swarm's reported history sketches."""

    self_id: str = "self"
    partner_ids: Sequence[str] = ()
    # reported history sketches (peer id -> sybil.SKETCH_DIM vector), learned through the DHT
    sketches: dict[str, torch.Tensor] = field(default_factory=dict)
    # fraction of a round's partners assumed Byzantine (sets f and the clipping budget)
    byzantine_fraction: float = 0.25
    # per partner: its model's loss minus ours on a batch of our own data (peer/loss_probe.py),
    # or None where the daemon did not measure it
    loss_deltas: Sequence[float] | None = None
    own_loss: float = 0.0  # our model's loss on that batch (reported in `peer status`)
    untrained_loss: float = 0.0  # an untrained model's loss on that batch (the task's loss scale)

    def __post_init__(self):
        check_byzantine_fraction(self.byzantine_fraction)

    def f(self, n_inputs: int) -> int:
        """Inputs assumed faulty among n (own model included, which is never faulty to us)."""
        return max(1, int(self.byzantine_fraction * n_inputs)) if n_inputs >= 3 else 0


@dataclass
class Mix:
    """What one call of a rule produced: the new model and the decisions behind it.

    Per-partner lists follow `ctx.partner_ids`. Server-style rules (median, Krum, ...) weigh
    coordinates or inputs, not partners: their `weights` is empty and they refuse nobody."""

    model: torch.Tensor
    weights: list[float] = field(default_factory=list)  # each partner's mixing weight (0: not mixed)
    refused: dict[str, str] = field(default_factory=dict)  # unmixed partner -> outlier | loss | probation | sybil
    distrusted: list[str] = field(default_factory=list)  # refused partners the daemon should pull less
    radius: float = math.inf  # the clipping radius tau (inf: nothing clipped)
    checks: dict[str, dict[str, float]] = field(default_factory=dict)  # partner -> each Sybil check's factor


class Aggregator(Protocol):
    name: str
    uses_sketches: bool  # reads `RoundContext.sketches` (the daemon decodes them only then)
    uses_loss_deltas: bool  # reads `RoundContext.loss_deltas` (the daemon probes partners' losses only then)

    def __call__(self, own: torch.Tensor, others: Sequence[torch.Tensor], ctx: RoundContext | None = None,
                 out: torch.Tensor | None = None) -> Mix: ...


def _check_out(out: torch.Tensor | None, own: torch.Tensor, others: Sequence[torch.Tensor]) -> None:
    """Refuse an output buffer that the rule would read while writing it (a silently wrong mix)."""
    if out is None:
        return
    if out.shape != own.shape or out.dtype != own.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {own.dtype} tensor of shape {tuple(own.shape)}")
    for x in (own, *others):
        if x.numel() and out.numel() and x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise ValueError("out shares memory with an input of the rule")


def _into(out: torch.Tensor | None, result: torch.Tensor) -> Mix:
    return Mix(result if out is None else out.copy_(result))


def _ctx(ctx: RoundContext | None, others: Sequence[torch.Tensor]) -> RoundContext:
    if ctx is None:
        return RoundContext(partner_ids=[f"partner{j}" for j in range(len(others))])
    return ctx


class ServerRule:
    """A server-style rule applied to own model plus partners (n = k + 1 inputs), optional NNM first."""

    uses_sketches = uses_loss_deltas = False

    def __init__(self, name: str, fn: Callable[[torch.Tensor, int], torch.Tensor], nnm: bool = False):
        self.name, self.fn, self.nnm = name, fn, nnm

    def __call__(self, own, others, ctx=None, out=None):
        _check_out(out, own, others)
        if not others:
            return _into(out, own.clone())
        ctx = _ctx(ctx, others)
        x = torch.stack([own, *others])
        f = ctx.f(len(x))
        if self.nnm and f:
            x = baselines.nnm(x, f)
        return _into(out, self.fn(x, f))


class CenteredClippingRule:
    """Server-style centred clipping over own + partners; the centre carries over between rounds."""

    uses_sketches = uses_loss_deltas = False

    def __init__(self, name: str = "cc", tau: float = 10.0, iters: int = 3, nnm: bool = False):
        self.name, self.nnm = name, nnm
        self.cc = CenteredClipping(tau=tau, iters=iters, start="mean")

    def __call__(self, own, others, ctx=None, out=None):
        _check_out(out, own, others)
        if not others:
            return _into(out, own.clone())
        ctx = _ctx(ctx, others)
        x = torch.stack([own, *others])
        if self.nnm:
            x = baselines.nnm(x, ctx.f(len(x)))
        return _into(out, self.cc(x))


@dataclass
class SybilScores:
    """SybilWall's verdict on one round's partners."""

    weights: list[float]  # per partner, in [0, 1]
    checks: dict[str, dict[str, float]]  # partner -> each check's factor (for `peer status`)
    on_probation: set[str]  # partners with no history at all: weight 0 this round


class SybilWallWeights:
    """SybilWall: FoolsGold weights over the update histories of partners and every peer learned
    through the swarm; own model weight 1; normalised over the partners actually mixed.

    Two kinds of history feed the similarity: the sketches peers report in their signed records,
    and sketches this peer observes itself: the deviation of each received model from this peer's
    mixed result, summed over rounds. Independent noise a liar adds to what it serves averages
    out in that sum, while a Sybil's common push adds up. A partner with no history at all is on
    probation for one round (weight 0, observed), so a fresh identity buys no influence.
    """

    def __init__(self, max_tracked: int = 1024):
        self.observed: dict[str, torch.Tensor] = {}
        self.consistency_suspended = False  # most peers failed the consistency check last round
        self.sketcher: Sketcher | None = None
        self.max_tracked = max_tracked

    def sketcher_for(self, dim: int) -> Sketcher:
        if self.sketcher is None or self.sketcher.dim != dim:
            self.sketcher = shared_sketcher(dim)
        return self.sketcher

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        return self.sketcher_for(x.numel())(x)

    def weights(self, ctx: RoundContext) -> SybilScores:
        """FoolsGold weights for this round's partners: the smaller of the reported-history and the
        observed-history scores, each computed over every peer that channel knows.

        Scored separately because the channels see different things: reported histories (sums of
        local updates) of honest peers all share the descent direction, so every pair looks alike
        there and only a true clone stands out; observed deviations of honest peers scatter around
        our mixed model, while attackers who push the same way (sign flip, ALIE, IPM, dissensus,
        label flip, Sybils) line up. A peer must look independent in both.
        """
        reported = {p: h for p, h in ctx.sketches.items() if p != ctx.self_id and float(h.norm()) > 0}
        known = set(reported) | set(self.observed)
        score = {p: 1.0 for p in known}
        parts: dict[str, dict[str, float]] = {p: {} for p in known}  # each check's factor, for `peer status`
        for name, source in (("reported", reported), ("observed", self.observed)):
            ids = sorted(set(source) - {ctx.self_id})
            if len(ids) < 2:
                continue
            ws = foolsgold_weights(similarity(source, {}, ids), normalise="median")
            for p, w in zip(ids, ws):
                score[p] = min(score[p], float(w))
                parts[p][name] = float(w)
        # what can be checked of a self-reported history: that served models follow it, and that
        # it points where the run's histories point
        alignment = alignment_factors(reported)
        # who votes on whether the consistency check measures us: peers the other checks give at
        # least half weight (a near-clone in a minority still gets 0.08-0.11 from FoolsGold)
        voters = {p for p in known if score[p] >= VOTER_AT and alignment.get(p, 1.0) >= VOTER_AT}
        consistency, self.consistency_suspended = consistency_factors(reported, self.observed, voters)
        for p, f in consistency.items():
            if self.consistency_suspended:
                parts[p]["consistency_suspended"] = f  # what it would have given
                f = 1.0
            score[p] *= f
            parts[p]["consistency"] = f
        for p, f in alignment.items():
            score[p] *= f
            parts[p]["alignment"] = f
        return SybilScores(weights=[score[p] if p in known else 0.0 for p in ctx.partner_ids],
                           checks={p: parts[p] for p in ctx.partner_ids if p in parts},
                           on_probation={p for p in ctx.partner_ids if p not in known})

    def observe(self, ctx: RoundContext, diff_sketches: Sequence[torch.Tensor], mixed_sketch: torch.Tensor) -> None:
        """Record each partner's deviation from our mixed model (sketches of x_j - own and mixed - own)."""
        for p, s in zip(ctx.partner_ids, diff_sketches):
            dev = s - mixed_sketch
            self.observed[p] = self.observed[p] + dev if p in self.observed else dev
            self.observed[p] = self.observed.pop(p)  # most recently seen last
        while len(self.observed) > self.max_tracked:
            self.observed.pop(next(iter(self.observed)))


# a movement between rounds at most this fraction of the model's norm is float rounding, not a step
MOVEMENT_NOISE = 1e-6


class WeightedGossip:
    """own + sum_j W_j clip(x_j - own, tau) with W_j = w_j / (1 + sum w): the gossip family.

    weighting "uniform" (every partner 1) or "sybilwall"; radius "none" (plain weighted
    gossip), "adaptive" (ClippedGossip's rule) or "csrg" (CS+-RG: the distance at the weighted
    quantile total - 2 * delta). With a radius, partners farther than OUTLIER_FACTOR x the median
    of recent partner distances (or of this round's, if larger) get weight 0 (unless the loss
    screen and every Sybil check vouch for them: then they are only clipped), and the radius is
    capped at 2 x the recent median
    (`RadiusCap`): the per-round radius alone is set by whoever was pulled this round.
    """

    # a partner farther than this many times the recent median distance is not mixed at all,
    # unless the checks vouch for it (see __call__)
    OUTLIER_FACTOR = 4.0

    def __init__(self, name: str, weighting: str = "uniform", radius: str = "none", movement_cap: float | None = None):
        self.name, self.weighting, self.radius = name, weighting, radius
        self.sybil = SybilWallWeights() if weighting == "sybilwall" else None
        self.loss_screen = LossScreen() if weighting == "sybilwall" else None
        self.uses_sketches, self.uses_loss_deltas = self.sybil is not None, self.loss_screen is not None
        self.cap = RadiusCap(movement_factor=movement_cap)
        self.scratch = _Scratch()
        # our model as the last call returned it (with a movement cap only): how far the next
        # call's `own` has moved from it is our own progress between rounds, which caps the radius
        self.previous: torch.Tensor | None = None

    def __call__(self, own, others, ctx=None, out=None):
        _check_out(out, own, others)
        if not others:
            return _into(out, own.clone())
        ctx = _ctx(ctx, others)
        scores = self.sybil.weights(ctx) if self.sybil else None
        raw = list(scores.weights) if scores else [1.0] * len(others)
        unscreened = list(raw)  # the distance screen below judges partners the loss screen cut too
        screened: set[int] = set()  # partners only the loss screen cut
        fine_on_our_data: set[int] = set()  # partners whose loss on our data is what partners usually do
        if self.loss_screen is not None and ctx.loss_deltas is not None:
            if len(ctx.loss_deltas) != len(others):
                raise ValueError(f"{len(ctx.loss_deltas)} loss deltas for {len(others)} partners")
            factors = self.loss_screen.factors(ctx.loss_deltas, ctx.untrained_loss)
            suspended = self.sybil is not None and self.sybil.consistency_suspended
            fine_on_our_data = {j for j, d in enumerate(ctx.loss_deltas)
                                if self.loss_screen.usual(d) and raw[j] >= 1.0 and not suspended}
            screened = {j for j, (r, f) in enumerate(zip(raw, factors)) if r > 0 and f == 0}
            raw = [r * f for r, f in zip(raw, factors)]
        shape, own, others = own.shape, own.reshape(-1), [x.reshape(-1) for x in others]
        flat_out = None if out is None else out.view(-1)
        sketcher = self.sybil.sketcher_for(own.numel()) if self.sybil is not None else None
        total = 1.0 + sum(raw)
        guess = [r / total for r in raw]  # the mixing weights if no partner is dropped or clipped
        dists, sk, mixed_out = _deviations(own, others, guess, sketcher, flat_out, self.scratch)
        dropped: list[int] = []
        if self.radius != "none":
            known = self.previous is not None and self.previous.shape == own.shape
            moved = distance(own, self.previous) if known else None
            if moved is not None and moved <= MOVEMENT_NOISE * norm(own):
                # no local step since the last round: what is left is rounding in how the daemon
                # carries the steps taken during aggregation over (1e-9), which says nothing
                moved = None
            self.cap.observe(dists, moved)
            # relative to the recent median *and* this round's: when the whole swarm drifts apart
            # (early training, a burst of local steps) nobody may become an outlier, or a peer
            # would stop mixing and drift further still
            this_round = sorted(dists)[(len(dists) - 1) // 2]
            far = self.OUTLIER_FACTOR * max(self.cap.median(), this_round)
            # a far partner that passed every Sybil check at full weight and whose model does on
            # our data what partners usually do (by the window before this round) is not dropped,
            # only clipped to the radius: far models from attacks (x100 sign flip, Gaussian,
            # boosted replacement) blow up the loss, while an honest peer that has trained on
            # data we never saw (a late joiner) is far from a pair of peers that mix only with
            # each other. Dropping it (and backing it off) kept such a pair at 82 % for 70 s in
            # tests/test_real_swarm.py (docs/benchmarks.md, convergence)
            dropped = [j for j, d in enumerate(dists) if d > far and unscreened[j] > 0 and j not in fine_on_our_data]
            screened -= set(dropped)  # far away *and* bad on our data: an outlier, distrusted
            raw = [0.0 if j in dropped else r for j, r in enumerate(raw)]
        total = 1.0 + sum(raw)
        w = [r / total for r in raw]
        # partners this rule refused to mix (distance outliers, Sybil weight 0 after probation):
        # the daemon draws them less often, so later rounds spend their pulls on others
        probation = scores.on_probation if scores is not None else set()
        # the loss screen judges one model at one moment (an honest partner's model spikes after
        # a burst of local steps), not the peer: its cuts are not mixed, but not distrusted either.
        # Backing them off fed on itself: the window of deltas then saw only the partners still
        # pulled, and an IID swarm split into groups that cut each other and stalled at 83-86 %
        # (docs/benchmarks.md, convergence)
        distrusted = [ctx.partner_ids[j] for j, r in enumerate(raw)
                      if r == 0 and ctx.partner_ids[j] not in probation and j not in screened]
        # why each unmixed partner was left out (the daemon counts these in `peer status`)
        refused = {ctx.partner_ids[j]: ("outlier" if j in dropped else "loss" if j in screened
                                        else "probation" if ctx.partner_ids[j] in probation else "sybil")
                   for j, r in enumerate(raw) if r == 0}
        tau = self._radius(dists, w, ctx)
        factors = clip_factors(dists, w, tau)
        if factors != guess:
            # a partner was dropped or clipped: mix again, from scratch. Seen in 2-9 % of real
            # rounds, never with the benchmark's inputs. Correcting the first result instead
            # (adding (factor - guess) x (x_j - own) for the changed partners only) would read
            # fewer models but subtract what was added: far partners cancel badly, and a dropped
            # partner's inf or nan could not be taken out again.
            mixed_out = mix(own, others, factors, mixed_out, self.scratch.get)  # overwrites the first pass's result
        if sk is not None:
            self.sybil.observe(ctx, list(sk), torch.tensor(factors, dtype=sk.dtype) @ sk)
        if self.radius != "none" and self.cap.movement_factor is not None:
            if self.previous is None or self.previous.shape != mixed_out.shape:
                self.previous = torch.empty_like(mixed_out)
            self.previous.copy_(mixed_out)
        return Mix(mixed_out.view(shape) if out is None else out, weights=w, refused=refused, distrusted=distrusted,
                   radius=tau, checks=scores.checks if scores is not None else {})

    def _radius(self, dists: list[float], w: list[float], ctx: RoundContext) -> float:
        live = [(d, wj) for d, wj in zip(dists, w) if wj > 0]
        if self.radius == "none" or not live:
            return math.inf
        if len(live) == 1:
            # one weighted partner: no spread to estimate from. Every model we pulled still says
            # where the swarm is, so take the median distance of all of them (weighted or not).
            s = sorted(dists)
            tau = s[(len(s) - 1) // 2] if len(s) > 1 else math.inf
        else:
            budget = ctx.byzantine_fraction * sum(wj for _, wj in live)
            if self.radius == "csrg":
                tau = _csrg_radius([d for d, _ in live], [wj for _, wj in live], budget)
            else:
                tau = adaptive_radius([d for d, _ in live], [wj for _, wj in live], budget)
        return self.cap(tau)


class _Scratch:
    """Slice-sized work buffers kept by a rule between calls, so a round allocates (and page
    faults, and zero-fills) nothing of the models' size or the slices'."""

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < numel or self.buf.dtype != dtype:
            self.buf = torch.empty(numel, dtype=dtype)
        return self.buf[:numel]


def _deviations(own: torch.Tensor, others: Sequence[torch.Tensor], w: Sequence[float],
                sketcher: Sketcher | None, out: torch.Tensor | None = None, scratch: _Scratch | None = None,
                ) -> tuple[list[float], torch.Tensor | None, torch.Tensor]:
    """One pass over the partners' models, slice by slice, returning

    - ||x_j - own|| for every partner,
    - with a sketcher, the sketches of x_j - own, one row per partner,
    - own + sum_j w_j (x_j - own): the result when no partner turns out to need clipping
      (written into `out` if given, else into a fresh tensor).

    No n x d (not even d) temporaries: a fresh 40 MB tensor costs more in page faults than the
    arithmetic on it. Per partner and slice: one op reads x_j and writes the difference, then
    three ops read it (the squared norm, after squaring into a slice buffer; the sketch's block
    sums; the weighted add). Squared norms are exact to 1e-7 relative at any length. With a sketcher
    the difference is taken in the sketch's signed space, e = x_j*s - own*s with signs s = +-1:
    that is bit for bit (x_j - own)*s (a product with +-1 is exact), so the sketch needs no op of
    its own to apply the signs, the squared norm is unchanged, and the weighted sum of the e's,
    times s once per slice, is the sum of the differences.
    """
    n, d = len(others), own.numel()
    out = torch.empty_like(own) if out is None else out
    sq = [0.0] * n
    if sketcher is None:
        sk, b, dtype = None, 1, own.dtype
        slices = [(lo, min(lo + SLICE, d), 0, 0) for lo in range(0, d, SLICE)]
    else:
        b, dtype = sketcher.block, torch.result_type(own, sketcher.signs)
        sk = torch.empty(n, sketcher.k, dtype=dtype)
        sk[:, -(-d // b):] = 0  # blocks wholly in the padding
        slices = list(sketcher.slices(SLICE))
    width = max((blocks * b if sk is not None else hi - lo for lo, hi, _, blocks in slices), default=1)
    e_buf, neg_own_signed, acc_buf, sq_buf = (_Scratch() if scratch is None else scratch).get(4 * width, dtype).split(width)
    for lo, hi, first, blocks in slices:
        m = hi - lo
        o, r, e, acc = own[lo:hi], out[lo:hi], e_buf[:m], acc_buf[:m]
        if sk is not None:
            s, nos = sketcher.signs[lo:hi], neg_own_signed[:m]
            torch.mul(o, s, out=nos).neg_()
            e_buf[m:blocks * b].zero_()  # the padding past the model's end contributes nothing
            e_blocks = e_buf[:blocks * b].view(blocks, b)
        mixed = False
        for j, x in enumerate(others):
            if sk is None:
                torch.sub(x[lo:hi], o, out=e)
            else:
                torch.addcmul(nos, x[lo:hi], s, out=e)  # x*s - own*s == (x - own)*s exactly
                torch.sum(e_blocks, 1, out=sk[j, first:first + blocks])
            # squared norm: torch's float32 sum is pairwise (1e-7 relative at any length), slices
            # add up in float64; a BLAS dot keeps one running float32 sum (4e-5 per slice when the
            # coordinates are alike). A float64 copy of each slice costs 3x as much for nothing more.
            torch.mul(e, e, out=sq_buf[:m])
            sq[j] += float(sq_buf[:m].sum())
            if w[j]:
                if mixed:
                    acc.add_(e, alpha=w[j])
                else:
                    torch.mul(e, w[j], out=acc)
                    mixed = True
        if not mixed:
            r.copy_(o)
        elif sk is None:
            torch.add(o, acc, out=r)
        else:
            torch.addcmul(o, acc, s, out=r)  # s * acc: back from the signed space, exactly
    return [math.sqrt(v) for v in sq], sk, out


def _csrg_radius(dists: list[float], w: list[float], budget: float) -> float:
    """CS+-RG (Gaucher et al. 2025): the distance at the weighted quantile `total - 2 * budget`."""
    order = sorted(range(len(dists)), key=lambda j: dists[j])
    target = sum(w) - 2 * budget
    acc = 0.0
    for j in order:
        acc += w[j]
        if acc >= target:
            return dists[j]
    return dists[order[-1]]


def _server(name: str, fn, nnm: bool = False) -> Callable[[], Aggregator]:
    return lambda: ServerRule(name, fn, nnm)


_SERVER_RULES = {
    "median": lambda x, f: baselines.coordinate_median(x),
    "trimmed-mean": lambda x, f: baselines.trimmed_mean(x, min(f, (len(x) - 1) // 2)),
    "krum": lambda x, f: baselines.krum(x, f),
    "multi-krum": lambda x, f: baselines.multi_krum(x, f),
    "geomed": lambda x, f: baselines.geometric_median(x, iters=8, init=x.mean(0)),
}

AGGREGATORS: dict[str, Callable[[], Aggregator]] = {
    "mean": lambda: WeightedGossip("mean"),
    **{name: _server(name, fn) for name, fn in _SERVER_RULES.items()},
    **{f"nnm+{name}": _server(f"nnm+{name}", fn, nnm=True) for name, fn in _SERVER_RULES.items()},
    "cc": lambda: CenteredClippingRule("cc"),
    "nnm+cc": lambda: CenteredClippingRule("nnm+cc", nnm=True),
    "scc": lambda: WeightedGossip("scc", radius="adaptive"),
    "cs+rg": lambda: WeightedGossip("cs+rg", radius="csrg"),
    "sybilwall": lambda: WeightedGossip("sybilwall", weighting="sybilwall"),
    "sybilwall+scc": lambda: WeightedGossip("sybilwall+scc", weighting="sybilwall", radius="adaptive"),
    "sybilwall+scc+movecap": lambda: WeightedGossip("sybilwall+scc+movecap", weighting="sybilwall", radius="adaptive",
                                                    movement_cap=3.0),
    "sybilwall+cs+rg": lambda: WeightedGossip("sybilwall+cs+rg", weighting="sybilwall", radius="csrg"),
}

def make_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}") from None


assert set(AGGREGATORS) == set(DESCRIPTIONS), "every registry name needs a description and vice versa"
