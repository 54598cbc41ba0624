"""Outer steps without I/O: the outer optimizer against torch's, and one peer's round arithmetic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from peer.outer import NesterovOuter, OuterLoop, OuterSettings
from protocols.compression import CompressionSpec


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.floats(0.05, 1.0), st.sampled_from([0.0, 0.5, 0.9]), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_nesterov_outer_matches_torch_sgd(d, lr, momentum, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(d, generator=gen)
    grads = [torch.randn(d, generator=gen) for _ in range(steps)]
    ref = torch.nn.Parameter(start.clone())
    sgd = torch.optim.SGD([ref], lr=lr, momentum=momentum, nesterov=momentum > 0)
    ours, outer = start.clone(), NesterovOuter(lr, momentum)
    for g in grads:
        ref.grad = g.clone()
        sgd.step()
        outer.step(ours, g)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)


def test_nesterov_state_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen), None
    g1, g2 = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    one = NesterovOuter(0.7, 0.9)
    x = a.clone()
    one.step(x, g1)
    two = NesterovOuter(0.7, 0.9)
    two.load_state_dict(one.state_dict(), 50)
    b = x.clone()
    one.step(x, g2)
    two.step(b, g2)
    torch.testing.assert_close(x, b)
    with pytest.raises(ValueError, match="momentum buffer"):
        NesterovOuter(0.7, 0.9).load_state_dict(one.state_dict(), 51)


@pytest.mark.parametrize("kwargs, match", [
    ({"every_steps": -1}, "outer-every-steps"), ({"lr": 0.0}, "outer-lr"), ({"lr": float("nan")}, "outer-lr"),
    ({"momentum": 1.0}, "outer-momentum"), ({"momentum": -0.1}, "outer-momentum"),
])
def test_bad_settings_are_refused_with_the_setting_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OuterSettings(**kwargs)


def test_a_round_alone_is_diloco_with_one_worker():
    """No partner: the outer step is lr x nesterov of our own pseudo-gradient; the live model's
    change is the anchor's change plus what was sent (everything, uncompressed)."""
    anchor = torch.zeros(8)
    loop = OuterLoop(OuterSettings(every_steps=5, lr=0.5, momentum=0.0), CompressionSpec("fp32"), anchor)
    model = anchor - 1.0  # H inner steps moved every coordinate by -1: pseudo-gradient +1
    rnd = loop.begin(model.clone(), step=5)
    assert rnd.outer_step == 1 and rnd.step == 5
    torch.testing.assert_close(rnd.own_model, model)  # anchor - sent
    change = loop.finish(rnd, rnd.own_model)
    torch.testing.assert_close(loop.anchor, torch.full((8,), -0.5))  # anchor - 0.5 * 1
    torch.testing.assert_close(change, torch.full((8,), 0.5))  # the live model moves to the new anchor
    torch.testing.assert_close(model + change, loop.anchor)


def test_mean_of_pseudo_gradients_is_applied_through_candidate_models():
    """The rule sees partners as `anchor - delta_j`; a plain mean of those models is the anchor
    minus the mean pseudo-gradient, so the outer step moves by lr x the mean."""
    anchor = torch.zeros(4)
    loop = OuterLoop(OuterSettings(every_steps=1, lr=1.0, momentum=0.0), CompressionSpec("fp32"), anchor)
    rnd = loop.begin(torch.tensor([-1.0, -1.0, 0.0, 0.0]), step=1)  # our delta (1, 1, 0, 0)
    partner = loop.as_model(torch.tensor([3.0, 1.0, 2.0, 0.0]))
    mixed = torch.stack([rnd.own_model, partner]).mean(0)
    loop.finish(rnd, mixed)
    torch.testing.assert_close(loop.anchor, -torch.tensor([2.0, 1.0, 1.0, 0.0]))


def test_finish_steps_in_the_mixed_models_buffer_with_the_same_numbers():
    """`finish` forms the outer step's Δ_mix in the mixed model's own buffer (no model-sized
    temporary) and returns the change there: bit for bit what `step` on an untouched copy and
    then `change` give, round after round with momentum."""
    gen = torch.Generator().manual_seed(4)
    d = 10_001
    start = torch.randn(d, generator=gen)
    loops = [OuterLoop(OuterSettings(every_steps=1, lr=0.7, momentum=0.9), CompressionSpec("topk-int8", 0.1), start)
             for _ in range(2)]
    for _ in range(3):
        model = start + 0.01 * torch.randn(d, generator=gen)
        rounds = [loop.begin(model.clone(), step=1) for loop in loops]
        mixed = 0.5 * (rounds[0].own_model + start + 0.01 * torch.randn(d, generator=gen))
        copy = mixed.clone()
        got = loops[0].finish(rounds[0], mixed)
        assert got is mixed
        loops[1].step(copy)
        want = loops[1].change(rounds[1], copy)
        for a, b in ((got, want), (loops[0].anchor, loops[1].anchor), (loops[0].optimizer.buf, loops[1].optimizer.buf)):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_what_compression_leaves_out_stays_in_the_live_model_and_goes_out_later():
    """With top-k a round sends part of the pseudo-gradient; the live model keeps all of its
    progress (its deviation from the new anchor is what was not sent) and the next rounds send
    the rest: four rounds at 25 % with no further training bring the anchor to the model, each
    coordinate exactly once."""
    anchor = torch.zeros(100)
    loop = OuterLoop(OuterSettings(every_steps=1, lr=1.0, momentum=0.0), CompressionSpec("topk", topk_fraction=0.25), anchor)
    target = -torch.arange(1.0, 101.0)  # what H inner steps did: delta = 1..100
    model = target.clone()
    for i in range(4):
        rnd = loop.begin(model.clone(), step=1)
        assert int((loop.anchor - rnd.own_model != 0).sum()) == 25  # what was sent
        model += loop.finish(rnd, rnd.own_model)
        torch.testing.assert_close(model, target)  # the live model never loses progress
        assert int((loop.anchor != target).sum()) == 75 - 25 * i
    torch.testing.assert_close(loop.anchor, target)


def test_state_round_trip_and_reset():
    loop = OuterLoop(OuterSettings(every_steps=3), CompressionSpec("int8"), torch.zeros(10))
    rnd = loop.begin(torch.randn(10), step=3)
    loop.finish(rnd, rnd.own_model)
    state = loop.state_dict()
    other = OuterLoop(OuterSettings(every_steps=3), CompressionSpec("int8"), torch.zeros(10))
    other.load_state_dict(state)
    assert other.outer_step == 1
    torch.testing.assert_close(other.anchor, loop.anchor)
    torch.testing.assert_close(other.optimizer.buf, loop.optimizer.buf)
    with pytest.raises(ValueError, match="anchor"):
        OuterLoop(OuterSettings(every_steps=3), CompressionSpec("int8"), torch.zeros(11)).load_state_dict(state)
    bad = {**state, "optimizer": {"momentum_buffer": torch.zeros(3)}}
    before = other.anchor.clone()
    with pytest.raises(ValueError, match="momentum"):
        other.load_state_dict(bad)
    torch.testing.assert_close(other.anchor, before)  # all or nothing
    model = torch.randn(10)
    other.reset(model)
    torch.testing.assert_close(other.anchor, model)
