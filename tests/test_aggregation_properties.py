"""Properties of the aggregation building blocks and rules (hypothesis; derandomized, so CI-stable)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.aggregation import AGGREGATORS, DESCRIPTIONS, RoundContext, make_aggregator
from peer.aggregation import baselines
from peer.aggregation.clipping import CenteredClipping, RadiusCap, adaptive_radius, clip, self_centred_clip
from peer.aggregation.sybil import (SKETCH_DIM, Sketcher, alignment_factors, consistency_factors, cosine_matrix, shared_sketcher,
                                   foolsgold_weights, similarity)

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@st.composite
def stacks(draw, min_n=1, max_n=12, max_d=16):
    """(n, d) float32 inputs at a random scale, sometimes with an exact duplicate and an outlier."""
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(0, scale, (n, d))
    if n >= 3 and draw(st.booleans()):
        x[-1] = x[0]
    if n >= 3 and draw(st.booleans()):
        x[1] *= 1e3
    return torch.from_numpy(x.astype(np.float32))


def close(a, b, scale, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(scale, 1e-30))


def scale_of(x) -> float:
    return float(x.abs().max())


# ------------------------------------------------------------- permutation invariance


@FAST
@given(data=st.data())
def test_mean_median_trimmed_mean_geomed_ignore_order(data):
    x = data.draw(stacks())
    n = len(x)
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    f = data.draw(st.integers(0, (n - 1) // 2))
    s = scale_of(x)
    close(baselines.mean(x[perm]), baselines.mean(x), s)
    assert torch.equal(baselines.coordinate_median(x[perm]), baselines.coordinate_median(x))
    if f:  # the same sorted values: exactly equal (f = 0 is the plain mean, equal up to rounding)
        assert torch.equal(baselines.trimmed_mean(x[perm], f), baselines.trimmed_mean(x, f))
    close(baselines.trimmed_mean(x[perm], f), baselines.trimmed_mean(x, f), s)
    close(baselines.geometric_median(x[perm], iters=5), baselines.geometric_median(x, iters=5), s)


@FAST
@given(data=st.data())
def test_krum_scores_and_choices_ignore_order(data):
    x = data.draw(stacks(min_n=2))
    n = len(x)
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    f = data.draw(st.integers(0, n - 1))
    m = data.draw(st.integers(1, n))
    scores = baselines.krum_scores(x, f)
    # same distances summed in the same coordinate order: exactly equal, not just close
    assert torch.equal(baselines.krum_scores(x[perm], f), scores[perm])
    # Krum returns a minimiser of the score (which one, on an exact tie, follows input order)
    best = baselines.krum(x[perm], f)
    winners = [i for i in range(n) if scores[i] == scores.min()]
    assert any(torch.equal(best, x[i]) for i in winners)
    # Multi-Krum's chosen set is order-free whenever the m-th and (m+1)-th scores differ
    s = scores.sort().values
    if m == n or s[m - 1] < s[m]:
        close(baselines.multi_krum(x[perm], f, m), baselines.multi_krum(x, f, m), scale_of(x))


def _ids(k):
    return [f"p{j}" for j in range(k)]


@pytest.mark.parametrize("name", ["mean", "scc", "cs+rg", "median", "trimmed-mean", "geomed", "cc"])
@FAST
@given(data=st.data())
def test_registry_rules_ignore_partner_order(name, data):
    """Same rounds, partners listed in another order each round (ids move with their vectors)."""
    rule_a, rule_b = AGGREGATORS[name](), AGGREGATORS[name]()
    for _ in range(3):
        x = data.draw(stacks(min_n=2, max_n=9))
        own, others = x[0], list(x[1:])
        k = len(others)
        perm = data.draw(st.permutations(range(k)))
        ids = _ids(k)
        out_a = rule_a(own, others, RoundContext(self_id="me", partner_ids=ids)).model
        out_b = rule_b(own, [others[j] for j in perm], RoundContext(self_id="me", partner_ids=[ids[j] for j in perm])).model
        close(out_b, out_a, scale_of(x), rtol=1e-4)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_sybilwall_weights_follow_ids_not_positions(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k = data.draw(st.integers(2, 7))
    d = data.draw(st.integers(1, 40))
    ids = _ids(k)
    # reported histories for some partners and a few non-partners; the others start on probation
    reported = {p: torch.from_numpy(rng.normal(size=SKETCH_DIM).astype(np.float32))
                for p in ids + ["q0", "q1"] if rng.random() < 0.6}
    if "p0" in reported and k > 1:
        reported["p1"] = reported["p0"].clone()  # a Sybil pair
    a, b = AGGREGATORS["sybilwall"](), AGGREGATORS["sybilwall"]()
    for _ in range(3):
        own = torch.from_numpy(rng.normal(size=d).astype(np.float32))
        others = [torch.from_numpy(rng.normal(size=d).astype(np.float32)) for _ in range(k)]
        perm = data.draw(st.permutations(range(k)))
        wa = a(own, others, RoundContext(self_id="me", partner_ids=ids, sketches=reported)).weights
        wb = b(own, [others[j] for j in perm],
               RoundContext(self_id="me", partner_ids=[ids[j] for j in perm], sketches=reported)).weights
        torch.testing.assert_close(torch.tensor(wb, dtype=torch.float64),
                                   torch.tensor([wa[j] for j in perm], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- clipping


@FAST
@given(x=stacks(min_n=2, max_n=8), data=st.data())
def test_self_centred_clip_with_infinite_radius_is_weighted_gossip(x, data):
    own, others = x[0], list(x[1:])
    w = [data.draw(st.floats(0.0, 1.0)) / len(others) for _ in others]
    expected = own.double() + sum(wj * (xj.double() - own.double()) for wj, xj in zip(w, others))
    close(self_centred_clip(own, others, w, math.inf), expected.float(), scale_of(x))
    # and the registry's plain gossip is the uniform case: the mean of own and partners
    close(AGGREGATORS["mean"]()(own, others).model, x.double().mean(0).float(), scale_of(x))


@FAST
@given(x=stacks(), iters=st.integers(1, 4))
def test_centred_clipping_with_huge_radius_is_the_mean(x, iters):
    # one clipped step from v = 0 with nothing clipped lands on the mean; later steps stay there
    close(CenteredClipping(tau=1e30, iters=iters)(x), x.double().mean(0).float(), scale_of(x))


@FAST
@given(own=stacks(min_n=1, max_n=1, max_d=30), direction=stacks(min_n=1, max_n=1, max_d=30),
       dist=st.floats(1e-3, 1e7), w=st.floats(0.01, 1.0), tau=st.floats(1e-2, 1e3))
def test_self_centred_clip_moves_own_by_at_most_w_tau(own, direction, dist, w, tau):
    own = own[0].double()
    u = torch.ones_like(own) if direction.shape[1] != own.shape[0] else direction[0].double()
    if float(u.norm()) == 0:
        u = torch.ones_like(own)
    partner = own + dist * u / u.norm()
    out = self_centred_clip(own, [partner], [w], tau)
    moved = float((out - own).norm())
    assert moved <= w * tau * (1 + 1e-9) + 1e-12
    if dist <= tau:  # inside the radius: no clipping, a plain step of w
        assert math.isclose(moved, w * dist, rel_tol=1e-9)
    else:  # outside: exactly w * tau, towards the partner
        assert math.isclose(moved, w * tau, rel_tol=1e-9)


def test_self_centred_clip_total_move_is_bounded_by_the_weights():
    torch.manual_seed(0)
    own = torch.zeros(20, dtype=torch.float64)
    others = [torch.randn(20, dtype=torch.float64) * 10 ** e for e in range(-2, 6)]
    w = [0.1] * len(others)
    for tau in (0.01, 1.0, 50.0):
        assert float(self_centred_clip(own, others, w, tau).norm()) <= sum(w) * tau + 1e-12
    assert float(clip(torch.tensor([3.0, 4.0]), 1.0).norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["scc", "cs+rg", "sybilwall+scc"])
@FAST
@given(x=stacks(min_n=2, max_n=9))
def test_clipped_gossip_moves_own_by_at_most_sum_w_tau(name, x):
    rule = AGGREGATORS[name]()
    own, others = x[0], list(x[1:])
    ids = _ids(len(others))
    hist = {p: torch.randn(SKETCH_DIM, generator=torch.Generator().manual_seed(j)) for j, p in enumerate(ids)}
    for _ in range(6):  # past RadiusCap's warmup too
        result = rule(own, others, RoundContext(self_id="me", partner_ids=ids, sketches=hist))
        out = result.model
        if math.isfinite(result.radius):
            bound = sum(result.weights) * result.radius
            assert float((out.double() - own.double()).norm()) <= bound * (1 + 1e-5) + 1e-6 * scale_of(x)


@pytest.mark.parametrize("name", ["scc", "cs+rg", "sybilwall+scc"])
@pytest.mark.parametrize("distance", [3.5, 1e6])
def test_a_round_where_every_partner_is_far_moves_own_little(name, distance):
    """After honest rounds (partners at distance ~1), a round whose partners are all at `distance`
    moves own by at most sum(w) x (cap factor x the recent median distance), not by ~distance:
    the radius is capped by the partners' history (and far ones may be dropped outright)."""
    rng = np.random.default_rng(11)
    d, k = 30, 4
    own = torch.zeros(d)
    ids = _ids(k)
    ctx = RoundContext(self_id="me", partner_ids=ids,
                       sketches={p: torch.from_numpy(rng.normal(size=SKETCH_DIM).astype(np.float32)) for p in ids})
    rule = AGGREGATORS[name]()

    def unit():
        u = rng.normal(size=d)
        return torch.from_numpy((u / np.linalg.norm(u)).astype(np.float32))

    for _ in range(5):
        rule(own, [unit() * float(rng.uniform(0.8, 1.2)) for _ in ids], ctx)
    result = rule(own, [unit() * distance for _ in ids], ctx)
    moved = float(result.model.norm())
    assert 0.8 <= rule.cap.median() <= 1.2  # 20 honest distances, 4 far ones
    if sum(result.weights) > 0:
        assert result.radius <= rule.cap.factor * rule.cap.median()
        assert moved <= sum(result.weights) * result.radius * (1 + 1e-5)
    else:
        assert moved == 0.0
    assert moved <= 2.0


@pytest.mark.parametrize("name", ["scc", "cs+rg"])
def test_clipped_gossip_ignores_a_far_partner_when_the_others_agree(name):
    """Three partners equal to own model, one far away: the radius is 0 and own does not move."""
    own = torch.randn(50)
    far = own + 1e6
    for k, others in enumerate(([own.clone(), own.clone(), far, own.clone()], [far, own.clone(), own.clone(), own.clone()])):
        out = AGGREGATORS[name]()(own, others).model
        assert torch.equal(out, own), (name, k, float((out - own).norm()))


@FAST
@given(c=st.floats(1e-3, 1e3), k=st.integers(2, 12), data=st.data())
def test_adaptive_radius_with_equal_distances(c, k, data):
    w = 1.0 / (k + 1)
    q = data.draw(st.integers(0, k - 2))
    budget = (q + 0.5) * w  # drops q whole partners and half of one (all tied): k - q - 0.5 kept
    tau = adaptive_radius([c] * k, [w] * k, budget)
    assert math.isclose(tau, c * math.sqrt((k - q - 0.5) * w / budget), rel_tol=1e-9)
    assert adaptive_radius([c] * k, [w] * k, 0.0) == math.inf
    assert adaptive_radius([c] * k, [w] * k, 2.0) == 0.0  # the budget covers everyone


def test_radius_cap_is_factor_times_the_recent_median_distance():
    cap = RadiusCap(factor=2.0, window=5)
    assert cap(1e9) == 1e9  # no distance seen yet: nothing to cap with
    cap.observe([1.0, 3.0, 2.0])
    assert cap.median() == 2.0 and cap(math.inf) == 2.0 * 2.0
    cap.observe([5.0])
    assert cap(0.5) == 0.5  # under the cap: unchanged
    assert cap(1e9) == 2.0 * 2.0  # (1, 2, 3, 5): the lower of the two middle distances
    # inf distances are ignored: (1, 3, 2, 5, 4) -> median 3 (kept, the window would hold 5, inf x 3, 4)
    cap.observe([math.inf, math.inf, math.inf, 4.0])
    assert cap(1e9) == 2.0 * 3.0
    # only the last `window` distances count: (3, 2, 5, 4, 7) -> median 4 (with the 1 it would be 3)
    cap.observe([7.0])
    assert cap(1e9) == 2.0 * 4.0


# ------------------------------------------------------------- FoolsGold


def _histories(rng, n, d=1000):
    return torch.from_numpy(rng.normal(size=(n, d)))


NORMALISE = ["max", "median"]  # "median" is what SybilWall uses


@pytest.mark.parametrize("normalise", NORMALISE)
def test_foolsgold_identical_histories_get_zero_and_a_lone_peer_one(normalise):
    rng = np.random.default_rng(0)
    h = _histories(rng, 6)
    h[4] = h[1]
    h[5] = h[1] * 3.0  # same direction, other length: cosine 1
    wts = foolsgold_weights(cosine_matrix(h), normalise=normalise)
    assert wts[1] == wts[4] == wts[5] == 0.0
    assert (wts[[0, 2, 3]] > 0.5).all()
    assert foolsgold_weights(torch.zeros(1, 1), normalise=normalise).tolist() == [1.0]
    assert foolsgold_weights(torch.zeros(0, 0), normalise=normalise).numel() == 0
    # everyone identical: nobody is trusted
    assert foolsgold_weights(cosine_matrix(h[[1, 4, 5]]), normalise=normalise).tolist() == [0.0, 0.0, 0.0]


def test_foolsgold_pardons_an_honest_peer_that_merely_resembles_a_sybil():
    """h resembles the Sybil pair (cosine 0.7) but is not one: its similarity is scaled by
    v_h / v_s = 0.7 (pardoning), so a_h = 1 - 0.49 and w_h = ln(0.51 / 0.49) + 0.5."""
    cs = torch.tensor([
        [1.0, 0.7, 0.7, 0.0],  # h
        [0.7, 1.0, 1.0, 0.0],  # sybil 1
        [0.7, 1.0, 1.0, 0.0],  # sybil 2
        [0.0, 0.0, 0.0, 1.0],  # d, unlike anyone
    ], dtype=torch.float64)
    w = foolsgold_weights(cs)
    expected = torch.tensor([math.log(0.51 / 0.49) + 0.5, 0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(w, expected)


@FAST
@given(n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["histories", "any"]),
       normalise=st.sampled_from(NORMALISE))
def test_foolsgold_weights_lie_in_unit_interval(n, seed, mode, normalise):
    rng = np.random.default_rng(seed)
    if mode == "histories":
        h = _histories(rng, n, d=int(rng.integers(1, 50)))
        if n > 2:
            h[-1] = h[0]
        cs = cosine_matrix(h)
    else:  # any similarity matrix in [-1, 1], even asymmetric
        cs = torch.from_numpy(rng.uniform(-1, 1, (n, n)))
    w = foolsgold_weights(cs, normalise=normalise)
    assert w.shape == (n,) and torch.isfinite(w).all()
    assert ((w >= 0) & (w <= 1)).all()
    if w.max() > 0:  # the least similar peer is fully trusted
        assert w.max() == 1.0


@pytest.mark.parametrize("normalise", NORMALISE)
def test_foolsgold_sybil_cluster_gets_zero_and_diverse_peers_keep_weight(normalise):
    rng = np.random.default_rng(1)
    diverse = _histories(rng, 10)
    base = torch.from_numpy(rng.normal(size=1000))
    cluster = torch.stack([base + 0.01 * torch.from_numpy(rng.normal(size=1000)) for _ in range(5)])
    h = torch.cat([diverse, cluster])[torch.from_numpy(rng.permutation(15))]
    is_sybil = torch.tensor([bool((row == cluster).all(1).any()) for row in h])
    w = foolsgold_weights(cosine_matrix(h), normalise=normalise)
    assert (w[is_sybil] < 0.01).all(), w
    assert (w[~is_sybil] > 0.5).all(), w


def test_similarity_takes_the_larger_of_reported_and_observed():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    cs = similarity({"x": a, "y": b}, {"x": a, "y": a}, ["x", "y", "z"])
    assert cs[0, 1] == pytest.approx(1.0)  # observed says identical, reported says orthogonal
    assert cs[2, 0] == -1.0 and cs[0, 2] == -1.0  # no history: similar to nothing


def test_consistency_zeroes_a_peer_whose_served_models_move_against_its_report():
    g = torch.Generator().manual_seed(1)
    h = {p: torch.randn(64, generator=g) for p in "abc"}
    observed = {"a": h["a"] + 0.3 * torch.randn(64, generator=g),   # serves what it trains
                "b": -h["b"] + 0.3 * torch.randn(64, generator=g),  # sign flip of what it reports
                "c": torch.randn(64, generator=g)}                   # unrelated to its report
    f, suspended = consistency_factors(h, observed)
    assert f["a"] == 1.0 and f["b"] == 0.0
    assert f["c"] < 1.0
    assert not suspended  # one of three fails: the check stands
    assert consistency_factors(h, {}) == ({}, False)  # nothing observed yet: nothing to check


def test_consistency_is_suspended_when_most_peers_fail_it():
    """Our own model off the swarm: every partner's deviation from our mix points back at the
    swarm, against its report, so the check measures us; it must not refuse everyone."""
    g = torch.Generator().manual_seed(3)
    h = {p: torch.randn(64, generator=g) for p in "abc"}
    offset = -10 * (h["a"] + h["b"] + h["c"])  # our model far along where the others trained
    observed = {p: h[p] + offset for p in "abc"}
    f, suspended = consistency_factors(h, observed)
    assert all(v == 0.0 for v in f.values()) and suspended
    # two of three at weight 0: still a majority
    observed["c"] = h["c"].clone()
    f, suspended = consistency_factors(h, observed)
    assert f["c"] == 1.0 and suspended
    # one of three: a minority of liars, checked as usual
    observed["b"] = h["b"].clone()
    assert consistency_factors(h, observed) == ({"a": 0.0, "b": 1.0, "c": 1.0}, False)
    # a single peer cannot be told from our own offset: checked
    assert consistency_factors({"a": h["a"]}, {"a": observed["a"]}) == ({"a": 0.0}, False)


def test_consistency_suspension_needs_a_shared_offset_and_a_majority_of_voters():
    """Identities that report the opposite of what they serve must not switch the check off for
    a sign flipper: their failures do not point one way, as our own offset's do; half is no
    majority; peers another check zeroed do not vote."""
    g = torch.Generator().manual_seed(5)
    h = {p: torch.randn(64, generator=g) for p in ["h0", "h1", "h2", "flip", "s0", "s1", "s2", "s3"]}
    observed = {p: h[p] + 0.3 * torch.randn(64, generator=g) for p in ("h0", "h1", "h2")}
    observed["flip"] = -h["flip"]
    for p in ("s0", "s1", "s2", "s3"):  # each serves something of its own, reports its negation
        observed[p] = torch.randn(64, generator=g)
        h[p] = -observed[p]
    f, suspended = consistency_factors(h, observed)
    assert sum(v == 0.0 for v in f.values()) == 5 and not suspended and f["flip"] == 0.0
    # 5 coordinated identities failing along one shared direction: what our own offset looks
    # like, so suspended; only the voter filter (the rule passes those the other checks trust)
    # stops them
    offset = 20 * torch.randn(64, generator=g)
    shifted = {p: (observed[p] if p.startswith("h") else h[p] - offset) for p in observed}
    reported = {p: (h[p] if p.startswith("h") else offset + 0.1 * h[p]) for p in h}
    f, suspended = consistency_factors(reported, shifted)
    assert sum(v == 0.0 for v in f.values()) == 5 and suspended
    assert not consistency_factors(reported, shifted, voters={"h0", "h1", "h2", "flip"})[1]
    # two of four at weight 0 along one offset: half is not a majority
    two = {p: shifted[p] for p in ("h0", "h1", "s0", "s1")}
    assert not consistency_factors({p: reported[p] for p in two}, two)[1]


def test_alignment_zeroes_a_history_turned_against_the_run_and_spares_scattered_runs():
    g = torch.Generator().manual_seed(2)
    common = torch.randn(64, generator=g)
    h = {f"h{i}": common + 1.5 * torch.randn(64, generator=g) for i in range(8)}  # non-IID but one task
    h["flip"] = -common + 1.5 * torch.randn(64, generator=g)
    f = alignment_factors(h)
    assert f["flip"] == 0.0
    assert sorted(f[f"h{i}"] for i in range(8))[1] > 0.5  # at most one honest peer is down-weighted
    scattered = {f"s{i}": torch.randn(64, generator=g) for i in range(8)}
    assert min(alignment_factors(scattered).values()) >= 0.0
    assert alignment_factors({p: h[p] for p in ["h0", "h1", "flip"]}) == {"h0": 1.0, "h1": 1.0, "flip": 1.0}


@FAST
@given(n=st.integers(2, 30), seed=st.integers(0, 1000), ties=st.booleans())
def test_medians_of_others_equal_leave_one_out_medians(n, seed, ties):
    from peer.aggregation.sybil import _medians_of_others

    h = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if ties:
        h = h.round()
    slow = torch.stack([torch.cat([h[:i], h[i + 1:]]).median(0).values for i in range(n)])
    assert torch.equal(_medians_of_others(h), slow)


def test_default_rule_stops_mixing_a_sign_flipper_that_reports_its_real_training():
    """The plain sign flip sits inside the honest spread, so distance rules pass it; its served
    model moving against its own reported history gives it away."""
    from peer.aggregation import make_aggregator

    rule = make_aggregator("sybilwall+scc")
    g = torch.Generator().manual_seed(3)
    d, ids = 2000, ["h1", "h2", "h3", "flip"]
    way = {p: torch.randn(d, generator=g) for p in ids}
    history = {p: torch.zeros(d) for p in ids}
    own = torch.zeros(d)
    for _ in range(6):
        for p in ids:
            history[p] += way[p]
        served = [own + (-1 if p == "flip" else 1) * 0.1 * way[p] + 0.02 * torch.randn(d, generator=g) for p in ids]
        ctx = RoundContext(self_id="me", partner_ids=ids, sketches={p: rule.sybil.sketch(history[p]) for p in ids})
        result = rule(own, served, ctx)
    assert result.weights[-1] == 0.0 and "flip" in result.distrusted
    assert all(w > 0 for w in result.weights[:-1])


# ------------------------------------------------------------- sketches


@FAST
@given(d=st.integers(1, 3000), k=st.integers(1, 600), seed=st.integers(0, 1000), data=st.data())
def test_sketch_is_linear(d, k, seed, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a, b = (torch.from_numpy(rng.normal(size=d)) for _ in range(2))
    s = Sketcher(d, k=k, seed=seed)
    assert s(a).shape == (k,)
    c = data.draw(st.floats(-1e3, 1e3))
    torch.testing.assert_close(s(a + b), s(a) + s(b))
    torch.testing.assert_close(s(c * a), c * s(a))
    # the same seed gives the same sketch on every peer
    torch.testing.assert_close(Sketcher(d, k=k, seed=seed)(a), s(a))


@pytest.mark.parametrize("d,k,dtype", [(1, 512, torch.float32), (1000, 512, torch.float32), (3001, 7, torch.float64),
                                       (600_001, SKETCH_DIM, torch.float32)])
def test_sketch_of_a_difference_is_the_sketch_of_the_difference_bit_for_bit(d, k, dtype):
    """`of_difference(a, b)` forms a - b slice by slice (no d-sized temporary, several slices at
    600k) and gives exactly `s(a - b)`; shared sketchers are one object per (dim, k, seed) while
    one is alive."""
    gen = torch.Generator().manual_seed(d)
    a, b = (torch.randn(d, generator=gen, dtype=dtype) for _ in range(2))
    s = Sketcher(d, k=k)
    want = s(a - b)
    got = s.of_difference(a, b)
    assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError):
        s.of_difference(a, b[:-1] if d > 1 else torch.zeros(2))
    shared = shared_sketcher(d, k)
    assert shared_sketcher(d, k) is shared and shared_sketcher(d, k, seed=1) is not shared
    assert torch.equal(shared.signs, s.signs)


def test_sketch_padding_and_seed():
    s = Sketcher(1000, k=512, seed=0)  # 1000 is no multiple of 512: 24 padding slots
    assert int((s.signs != 0).sum()) == 1000 and set(s.signs[:1000].unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(1000)
    assert not torch.allclose(Sketcher(1000, seed=1)(x), s(x))
    # a sketch keeps the norm in expectation: E||Sx||^2 = ||x||^2
    norms = [float(Sketcher(1000, seed=i)(x).norm() ** 2) for i in range(200)]
    assert np.mean(norms) == pytest.approx(float(x.norm() ** 2), rel=0.05)
    with pytest.raises(ValueError):
        s(torch.zeros(999))


def test_sketch_cosines_approximate_vector_cosines():
    rng = np.random.default_rng(3)
    d = 10_000
    s = Sketcher(d)
    errors = []
    for rho in np.linspace(-1, 1, 41):
        a = rng.normal(size=d)
        b = rho * a + math.sqrt(max(0.0, 1 - rho**2)) * rng.normal(size=d)
        h = torch.from_numpy(np.stack([a, b]))
        true = float(cosine_matrix(h)[0, 1])
        est = float(cosine_matrix(torch.stack([s(h[0]), s(h[1])]))[0, 1])
        errors.append(abs(est - true))
    assert max(errors) < 0.15, max(errors)
    assert np.mean(errors) < 0.05, np.mean(errors)


# ------------------------------------------------------------- every registry rule


def test_registry_names_match_the_descriptions():
    assert set(AGGREGATORS) == set(DESCRIPTIONS)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_rule_returns_a_finite_vector(name):
    rng = np.random.default_rng(7)
    d = 37
    rule = AGGREGATORS[name]()
    assert torch.equal(rule(torch.ones(d), []).model, torch.ones(d))  # nobody to mix with
    for rnd in range(2):
        for k in (1, 2, 5):
            own = torch.from_numpy(rng.normal(size=d).astype(np.float32))
            others = [torch.from_numpy(rng.normal(size=d).astype(np.float32)) for _ in range(k)]
            if k == 5:
                others[3] = others[2].clone()  # a duplicate
                others[4] = own.clone()  # a partner at distance 0
            ids = _ids(k)
            hist = {p: torch.from_numpy(rng.normal(size=SKETCH_DIM).astype(np.float32)) for p in ids[: k - 1]}
            for ctx in (None, RoundContext(self_id="me", partner_ids=ids, sketches=hist)):
                out = rule(own, others, ctx).model
                assert out.shape == (d,) and out.dtype == torch.float32, (name, k, ctx)
                assert torch.isfinite(out).all(), (name, k, ctx, rnd)
                assert out.data_ptr() != own.data_ptr()  # never an alias of the caller's model


def test_a_peer_off_the_swarm_still_mixes_with_partners_whose_deviations_point_back():
    """The 3-peer real swarm that stuck at 84 %: our model ran far along a direction the partners'
    reports also trained along, so their deviations from our mix point against their reports.
    Before the check was relative, every partner got weight 0 and we stayed where we were."""
    g = torch.Generator().manual_seed(4)
    d = 4096
    centre, v = torch.randn(d, generator=g), torch.randn(d, generator=g)
    own = centre + 5 * v
    partners = {p: centre + 0.05 * torch.randn(d, generator=g) for p in ("a", "b")}
    rule = make_aggregator("sybilwall+scc")
    histories = {p: rule.sybil.sketch(v + 0.1 * torch.randn(d, generator=g)) for p in partners}
    ctx = RoundContext(self_id="me", partner_ids=list(partners), sketches=histories)
    for _ in range(3):  # the first round is probation
        result = rule(own, list(partners.values()), ctx)
    assert all(w > 0 for w in result.weights), result.refused
    assert (result.model - centre).norm() < 0.9 * (own - centre).norm()
    assert rule.sybil.consistency_suspended  # and `peer status` shows what the check would have given
    assert all(result.checks[p]["consistency_suspended"] == 0.0 for p in partners)


def test_rule_takes_no_vote_from_partners_the_other_checks_distrust():
    """Through the rule: a group failing consistency along one direction suspends it only if
    FoolsGold and alignment give its members at least half weight. Near-clone reports (a minority
    of the reported channel, a majority of the peers the check judges) lose their vote."""
    g = torch.Generator().manual_seed(6)
    rule = make_aggregator("sybilwall+scc")
    d = rule.sybil.sketcher_for(4096).k
    offset = 20 * torch.randn(d, generator=g)
    base = torch.randn(d, generator=g)
    honest = {f"h{i}": torch.randn(d, generator=g) for i in range(5)}  # 2 of them observed
    clones = {f"c{i}": base + 1e-3 * torch.randn(d, generator=g) for i in range(3)}  # one report, 3 ids
    reported = {**honest, **clones}
    rule.sybil.observed = {**{p: honest[p] + 0.1 * torch.randn(d, generator=g) for p in ("h0", "h1")},
                           **{p: -offset + 0.1 * torch.randn(d, generator=g) for p in clones}}
    for p in clones:  # the clones' reports point where they serve against: they fail consistency
        reported[p] = offset + 0.05 * clones[p]
    scores = rule.sybil.weights(RoundContext(self_id="me", partner_ids=list(reported), sketches=reported))
    assert not rule.sybil.consistency_suspended
    assert all(scores.checks[p]["reported"] < 0.5 for p in clones)
    # the same failing group with reports of their own (as honest peers have) keeps its vote:
    # here they are all the peers the check judges, as when our own offset fails everyone
    for p in clones:
        reported[p] = 0.025 * offset + torch.randn(d, generator=g)
    for p in ("h0", "h1"):
        del rule.sybil.observed[p]
    scores = rule.sybil.weights(RoundContext(self_id="me", partner_ids=list(reported), sketches=reported))
    assert all(min(scores.checks[p]["reported"], scores.checks[p]["observed"]) >= 0.5 for p in clones)
    assert rule.sybil.consistency_suspended


def test_radius_cap_also_bounds_by_our_own_recent_movement():
    off = RadiusCap(factor=2.0)  # the default: no movement cap
    off.observe([10.0], 0.5)
    assert off.movement() == math.inf and off(1e9) == 20.0
    cap = RadiusCap(factor=2.0, window=5, movement_factor=3.0)
    cap.observe([10.0, 10.0])
    assert cap(1e9) == 20.0  # no movement known yet: the distance cap alone
    for moved in (None, 0.0, math.inf, math.nan):  # says nothing: not kept
        cap.observe([], moved)
    assert cap.movement() == math.inf and cap(1e9) == 20.0
    cap.observe([10.0], 1.0)
    cap.observe([10.0], 3.0)
    cap.observe([10.0], 2.0)
    assert cap.movement() == 2.0 and cap(1e9) == 3.0 * 2.0  # the smaller of the two caps
    assert cap(5.0) == 5.0
    with pytest.raises(ValueError, match="movement factor"):
        RadiusCap(movement_factor=0.0)


def test_partners_that_widen_the_spread_do_not_widen_a_movement_capped_radius():
    """Our model moves ~1 a round (local training) while the partners' distances double every
    round, as when attackers push honest models apart: the distance median follows them, the
    movement-capped radius does not (it stays within movement_factor x our own movement); the
    default rule's radius does."""
    rng = np.random.default_rng(5)
    d, k = 40, 3
    ids = _ids(k)
    ctx = RoundContext(self_id="me", partner_ids=ids,
                       sketches={p: torch.from_numpy(rng.normal(size=SKETCH_DIM).astype(np.float32)) for p in ids})
    radii = {}
    for name in ("sybilwall+scc+movecap", "sybilwall+scc"):
        rule = AGGREGATORS[name]()
        rng = np.random.default_rng(5)

        def unit(rng=rng):
            u = rng.normal(size=d)
            return torch.from_numpy((u / np.linalg.norm(u)).astype(np.float32))

        model = torch.zeros(d)
        spread = 1.0
        for _ in range(12):
            own = model + unit()  # a round of local training moves us by exactly 1
            result = rule(own, [own + unit() * spread * float(rng.uniform(0.9, 1.1)) for _ in ids], ctx)
            model = result.model
            spread *= 2
        radii[name] = result.radius
        if name == "sybilwall+scc+movecap":
            cap = rule.cap
            assert cap.median() > 10 * cap.movement_factor  # the partners' spread grew far past our movement
            assert cap.movement() == pytest.approx(1.0, rel=0.3)  # mixing moves us a little too
            assert result.radius <= cap.movement_factor * cap.movement()
            assert float((result.model - own).norm()) <= sum(result.weights) * result.radius * (1 + 1e-5)
    assert radii["sybilwall+scc"] > 10 * radii["sybilwall+scc+movecap"]


def test_a_round_with_no_local_step_is_not_a_movement():
    """Timed rounds may follow no training step: our model is then the last mix's output up to
    rounding (how the daemon carries steps taken during aggregation over). That is not a movement
    of ~0, which would cap the radius at ~0 and stop consensus."""
    rule = AGGREGATORS["sybilwall+scc+movecap"]()
    ids = _ids(2)
    gen = torch.Generator().manual_seed(3)
    ctx = RoundContext(self_id="me", partner_ids=ids, sketches={p: torch.randn(SKETCH_DIM, generator=gen) for p in ids})
    model = torch.randn(100, generator=gen)
    for _ in range(4):  # the last output plus rounding only
        own = model + 1e-9 * torch.randn(100, generator=gen)
        model = rule(own, [own + torch.randn(100, generator=gen) for _ in ids], ctx).model
    assert rule.cap.movement() == math.inf
    own = model + 0.5 * torch.randn(100, generator=gen) / 10  # a real step: ~0.5 of movement
    rule(own, [own + torch.randn(100, generator=gen) for _ in ids], ctx)
    assert 0.2 < rule.cap.movement() < 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sliced_median_equals_the_whole_sort_and_may_write_into_an_input(n, monkeypatch):
    """The median is computed slice by slice (no stack of whole models): every slice boundary,
    and writing the result into the first input, give the same bits as one sort of the stack."""
    monkeypatch.setattr(baselines, "MEDIAN_SLICE", 7)
    xs = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    s = torch.stack(xs).sort(0).values
    whole = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    assert torch.equal(baselines.coordinate_median(xs), whole)
    first = xs[0]
    assert baselines.coordinate_median(xs, out=first) is first and torch.equal(first, whole)
