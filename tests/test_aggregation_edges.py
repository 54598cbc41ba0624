"""Numeric and parameter edges of the aggregation rules: bad parameters fail with one clear
ValueError, clones never get FoolsGold weight from rounding, norms stay accurate at 10^7."""

from __future__ import annotations

import math

import pytest
import torch

from peer.aggregation import RoundContext, baselines, check_byzantine_fraction
from peer.aggregation.clipping import CenteredClipping, RadiusCap, adaptive_radius, clip, self_centred_clip
from peer.aggregation.norms import distance, norm, sq_distance, sq_norm
from peer.aggregation.rules import _deviations
from peer.aggregation.sybil import foolsgold_weights, similarity

BAD_FRACTIONS = [math.nan, -0.1, 0.5, 0.7, math.inf, "0.2", True]


@pytest.mark.parametrize("value", BAD_FRACTIONS)
def test_byzantine_fraction_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="byzantine-fraction must be a number with 0 <= f < 0.5"):
        check_byzantine_fraction(value)
    with pytest.raises(ValueError, match="byzantine-fraction"):
        RoundContext(byzantine_fraction=value)


@pytest.mark.parametrize("value", [0, 0.0, 0.25, 0.49])
def test_byzantine_fraction_in_range_is_kept(value):
    assert check_byzantine_fraction(value) == value
    assert RoundContext(byzantine_fraction=value).byzantine_fraction == value


def test_bad_byzantine_fraction_stops_the_daemon_before_it_starts(tmp_path):
    from peer.daemon import PeerDaemon
    from protocols.transport.memory import MemoryNetwork
    from tests.conftest import fast_config

    with pytest.raises(ValueError, match="byzantine-fraction"):
        PeerDaemon(fast_config(tmp_path, byzantine_fraction=math.nan), MemoryNetwork().transport("a"))


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("f", [-1, 5, 9, 1.5, math.nan, True])
@pytest.mark.parametrize("rule", ["krum", "multi_krum", "trimmed_mean", "nnm"])
def test_krum_family_refuses_an_f_outside_0_to_n(rule, f):
    with pytest.raises(ValueError, match=r"needs an integer f with 0 <= f < n \(n=5"):
        getattr(baselines, rule)(X, f)


@pytest.mark.parametrize("nu", [0, 0.0, -1e-3, math.nan])
def test_geometric_median_refuses_nu_at_or_below_zero(nu):
    with pytest.raises(ValueError, match="geometric median needs a smoothing nu > 0"):
        baselines.geometric_median(X, nu=nu)


@pytest.mark.parametrize("tau", [-1.0, -1e-9, math.nan])
def test_clipping_refuses_a_negative_or_nan_radius(tau):
    z = torch.ones(4)
    with pytest.raises(ValueError, match="clipping radius must be a number >= 0"):
        clip(z, tau)
    with pytest.raises(ValueError, match="clipping radius must be a number >= 0"):
        self_centred_clip(z, [z * 2], [0.5], tau)
    with pytest.raises(ValueError, match="clipping radius"):
        CenteredClipping(tau=tau)
    with pytest.raises(ValueError):
        RadiusCap(factor=tau)


def test_clipping_accepts_zero_and_infinite_radii():
    z = torch.ones(4)
    assert torch.equal(clip(z, 0.0), torch.zeros(4))
    assert torch.equal(clip(z, math.inf), z)
    with pytest.raises(ValueError, match="tau > 0"):
        CenteredClipping(tau=0.0)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        adaptive_radius([1.0, 2.0], [0.5, 0.5], -0.1)
    assert adaptive_radius([1.0, 2.0], [0.5, 0.5], 0.0) == math.inf


def test_exact_clone_pair_never_gets_foolsgold_weight_from_rounding():
    # a float cosine of identical pairs can come out as 1 - 2e-16 (about a quarter of them): still clones
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        h = torch.randn(512, generator=g).to(torch.float16)
        for normalise in ("max", "median"):
            w = foolsgold_weights(similarity({"a": h, "b": h.clone()}, {}, ["a", "b"]), normalise=normalise)
            assert w.tolist() == [0.0, 0.0]


def test_clones_up_to_float_noise_score_as_clones_among_honest_peers():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(512, generator=g, dtype=torch.float64)
    honest = {f"h{i}": torch.randn(512, generator=g) for i in range(3)}
    # four copies of one history, each but the first with float32 round-off noise on it: with the
    # median normaliser the clones are the majority, so weights must not follow their rounding residue
    clones = {f"s{i}": (h * (1 + 1e-7 * i * torch.randn(512, generator=g, dtype=torch.float64))).float() for i in range(4)}
    src = {**honest, **clones}
    ids = sorted(src)
    w = dict(zip(ids, foolsgold_weights(similarity(src, {}, ids), normalise="median").tolist()))
    assert all(w[p] == 0.0 for p in clones), w
    assert all(w[p] == 1.0 for p in honest), w


def test_norms_at_ten_million_coordinates_match_float64():
    d = 10_000_000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(d, generator=g).mul_(0.01).add_(0.001)
    y = torch.full((d,), 0.001)  # every coordinate alike: the worst case for a running float32 sum
    for v in (x, y):
        ref = float(v.double().norm())
        assert abs(float(v.norm()) - ref) / ref > 1e-5  # what torch's float32 norm gives
        assert abs(norm(v) - ref) / ref < 1e-6
        assert abs(sq_norm(v) - ref ** 2) / ref ** 2 < 1e-6
    ref = float((x.double() - y.double()).norm())
    assert abs(distance(x, y) - ref) / ref < 1e-6
    assert abs(sq_distance(x, y) - ref ** 2) / ref ** 2 < 1e-6
    # the rules' one pass over the partners' models (clipping radius, distance screen)
    own = torch.zeros(d)
    dists, _, _ = _deviations(own, [x, y], [0.0, 0.0], None)
    for got, v in zip(dists, (x, y)):
        ref = float(v.double().norm())
        assert abs(got - ref) / ref < 1e-6


def test_float64_inputs_are_not_modified_by_distance():
    a, b = torch.arange(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    before = a.clone()
    assert distance(a, b) == pytest.approx(float((a - b).norm()))
    assert torch.equal(a, before)
