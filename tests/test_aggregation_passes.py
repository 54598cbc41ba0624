"""The gossip rules' passes over the models (`rules._deviations`, `clipping.mix`) against plain float64
formulas and the wire-format sketch (`Sketcher`).

The passes work slice by slice in the sketch's signed space with buffers kept between calls
(see `_deviations`); each case here breaks if a slice boundary, the last block's padding, the
signs, a zero weight or a buffer left over from an earlier call of another size is mishandled.
"""

from __future__ import annotations

import math

import pytest
import torch

from peer.aggregation import AGGREGATORS, RoundContext
from peer.aggregation import clipping, rules
from peer.aggregation.sybil import SKETCH_DIM, Sketcher, cosine_matrix, similarity


def _inputs(n: int, d: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(d, generator=g)
    others = [own + torch.randn(d, generator=g) * 10.0 ** float(torch.randint(-3, 2, (), generator=g)) for _ in range(n)]
    w = [0.0 if j % 3 == 1 else (j + 1) / (2 * n + 2) for j in range(n)]  # some partners not mixed
    return own, others, w


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * scale)


# d: one coordinate, fewer than the sketch's blocks, no multiple of the block, several slices
# with a short last one (SLICE + 3 is odd: its last block is mostly padding)
SIZES = [(1, 1), (3, 5), (9, 513), (2, 1000), (4, rules.SLICE + 3)]


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("sketch", [True, False])
def test_deviations_match_float64_and_the_wire_sketch(n, d, sketch):
    scratch = rules._Scratch()
    # a buffer left from a larger call, full of NaN: nothing of it may reach the results
    scratch.get(3 * (rules.SLICE + 4096), torch.float32).fill_(math.nan)
    own, others, w = _inputs(n, d, seed=n * 7919 + d)
    sketcher = Sketcher(d) if sketch else None
    out = torch.full_like(own, math.nan)
    dists, sk, result = rules._deviations(own, others, w, sketcher, out, scratch)
    assert result is out
    diffs = [x.double() - own.double() for x in others]
    scale = max(float(own.abs().max()), max(float(x.abs().max()) for x in others))
    for got, diff in zip(dists, diffs):
        assert math.isclose(got, float(diff.norm()), rel_tol=1e-5)
    _close(out, own.double() + sum(wj * diff for wj, diff in zip(w, diffs)), scale)
    if sketch:
        assert sk.shape == (n, SKETCH_DIM)
        for row, x in zip(sk, others):
            _close(row, sketcher((x - own).double()), math.sqrt(sketcher.block) * scale)
    else:
        assert sk is None


def test_no_partner_mixed_returns_own_exactly_and_mix_follows_its_factors():
    own, others, _ = _inputs(3, rules.SLICE + 3, seed=5)
    sketcher = Sketcher(own.numel())
    _, _, out = rules._deviations(own, others, [0.0, 0.0, 0.0], sketcher, scratch=rules._Scratch())
    assert torch.equal(out, own)
    factors = [0.25, 0.0, 0.125]
    mixed = clipping.mix(own, others, factors, torch.full_like(own, math.nan), rules._Scratch().get)
    _close(mixed, own.double() + sum(c * (x.double() - own.double()) for c, x in zip(factors, others)), 10.0)


@pytest.mark.parametrize("name", ["sybilwall+scc", "scc"])
@pytest.mark.parametrize("n", [1, 4])
def test_rule_result_is_own_plus_clipped_weighted_steps(name, n):
    """Over rounds where one partner is far (clipped, so the second pass runs) and rounds where
    none is, the rule's result is own + sum_j w_j clip(x_j - own, tau), with the weights and the
    radius it reports; its buffers are reused across rounds of two sizes."""
    rule = AGGREGATORS[name]()
    ids = [f"p{j}" for j in range(n)]
    g = torch.Generator().manual_seed(n)
    ctx = RoundContext(self_id="me", partner_ids=ids, sketches={p: torch.randn(SKETCH_DIM, generator=g) for p in ids})
    clipped_rounds = 0
    for rnd in range(8):
        d = 3001 if rnd % 2 else rules.SLICE + 3
        own = torch.randn(d, generator=g)
        others = [own + 0.1 * torch.randn(d, generator=g) for _ in ids]
        if rnd >= 4:
            others[0] = own + 0.6 * torch.randn(d, generator=g)  # farther: clipped, not dropped
        out = torch.full_like(own, math.nan)
        result = rule(own, others, ctx, out=out)
        assert result.model is out
        diffs = [x.double() - own.double() for x in others]
        norms = [float(diff.norm()) for diff in diffs]
        tau = result.radius
        clipped_rounds += any(wj > 0 and nj > tau for wj, nj in zip(result.weights, norms))
        expected = own.double() + sum(wj * min(1.0, tau / nj) * diff
                                      for wj, nj, diff in zip(result.weights, norms, diffs) if wj > 0)
        _close(out, expected, 1.0)
    if n > 1:
        assert clipped_rounds > 0  # the second pass ran


def test_similarity_of_a_complete_source_is_the_cosine_matrix():
    g = torch.Generator().manual_seed(0)
    h = {p: torch.randn(16, generator=g) for p in "abcd"}
    h["e"] = -h["a"]  # cosine -1: kept at -1, not below
    ids = sorted(h)
    expected = cosine_matrix(torch.stack([h[p] for p in ids])).clamp(min=-1.0)
    assert torch.equal(similarity(h, {}, ids), expected)
