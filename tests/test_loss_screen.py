"""The loss screen: partners' models evaluated on our own data, and the weights that follow.

The screen is what stops a label flipper (honest training on poisoned labels, reported truthfully),
so the tests check that a flipped-label model really scores worse than an honest one on real
data, that the factors follow the documented ramp, and that the daemon measures and passes them.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from peer.aggregation import RoundContext, make_aggregator
from peer.aggregation.loss import FULL_UP_TO, ZERO_FROM, LossScreen
from peer.daemon import PeerDaemon
from peer.loss_probe import LossProbe
from peer.tasks import load_task
from peer.trainer import Trainer
from protocols import gossip
from protocols.transport.memory import MemoryNetwork
from tests.conftest import fast_config


def test_screen_ramp_relative_to_the_median_of_recent_deltas():
    s = LossScreen()
    assert s.factors([2.0, 2.0, 2.0]) == [1.0, 1.0, 1.0]  # fewer than 4 deltas known: nothing screened
    f = s.factors([2.0, 2.0 * FULL_UP_TO, 2.0 * 2.0, 2.0 * ZERO_FROM, 50.0, None, math.inf, math.nan])
    # recent finite deltas 2, 2, 2, 2, 3, 4, 5, 50: lower median 2
    assert f[0] == 1.0 and f[1] == 1.0
    assert f[2] == pytest.approx((ZERO_FROM - 2.0) / (ZERO_FROM - FULL_UP_TO))
    assert f[3] == 0.0 and f[4] == 0.0
    assert f[5] == 1.0  # not measured: passes
    assert f[6] == 0.0 and f[7] == 0.0  # the model blew up on our data


def test_screen_passes_everyone_when_partners_do_no_worse_than_we_do():
    s = LossScreen()
    assert s.factors([-0.5, -0.2, 0.0, -1.0, 3.0]) == [1.0] * 5


def test_screen_spares_partners_that_agree_with_us_within_noise():
    """IID partners after mixing: deltas are noise around 0, tiny next to the task's loss scale (an
    untrained model's loss). Against their median alone, a +0.05 would be 5x a +0.01 median and cut
    (a 4-peer swarm stalled so)."""
    s = LossScreen()
    for _ in range(20):
        f = s.factors([0.01, -0.02, 0.05, 0.02], untrained_loss=2.3)
    assert f == [1.0] * 4
    assert s.factors([0.01, 2.0, 0.0, 0.02], untrained_loss=2.3)[1] == 0.0  # a partner far worse still is cut


def test_screen_spares_honest_partners_of_a_swarm_that_memorised_its_data():
    """IID peers after many epochs: own loss ~1e-4, recent deltas ~1e-3, so every ratio is large.
    Against an untrained model's loss (the task's scale) a partner 0.3 nat worse is noise; one that
    is 5 nats worse (a label flipper) is still cut."""
    s = LossScreen()
    for _ in range(20):
        s.factors([0.001, 0.002, 0.001], untrained_loss=2.3)
    assert s.factors([0.3, 0.002, 5.0], untrained_loss=2.3) == [1.0, 1.0, 0.0]
    assert s.factors([0.3, 0.002, 5.0])[0] == 0.0  # without the floor: cut


def test_screen_remembers_a_bounded_window():
    s = LossScreen(window=8)
    for _ in range(100):
        s.factors([1.0, 2.0, 3.0, 4.0])
    assert len(s.recent) == 8


def _train(trainer: Trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step()


def test_probe_scores_a_flipped_label_model_far_worse_than_an_honest_one():
    own_task = load_task("mnist1d-cnn", shard=0, num_shards=4, split="iid", seed=0)
    base = Trainer(load_task("mnist1d-cnn", shard=1, num_shards=4, split="iid", seed=0), seed=0)
    _train(base, 150)  # a shared starting point, as gossip gives every peer
    start = base.snapshot()

    def partner(shard: int, flip: bool) -> torch.Tensor:
        task = load_task("mnist1d-cnn", shard=shard, num_shards=4, split="iid", seed=0)
        if flip:
            task.y_train = 9 - task.y_train
        t = Trainer(task, seed=shard)
        t.apply_delta(start - t.snapshot())
        _train(t, 25)  # a round's worth of local steps from the shared model
        return t.snapshot()

    own = start.clone()
    honest, flipped = partner(2, False), partner(3, True)
    kept = [own.clone(), honest.clone(), flipped.clone()]
    probe = LossProbe(own_task, samples=256)
    own_loss, (d_honest, d_flipped) = probe.measure(own, [honest, flipped])
    assert own_loss == pytest.approx(probe.loss(own)) and own_loss > 0
    assert math.isfinite(d_honest) and d_flipped > d_honest + 1.0
    assert all(torch.equal(a, b) for a, b in zip(kept, (own, honest, flipped)))  # inputs untouched
    assert len(probe.y) == 256
    assert probe.measure(own, [torch.full_like(own, float("nan"))])[1] == [math.inf]
    broken = torch.full_like(own, float("nan"))  # our own model broke: nothing to compare with
    assert probe.measure(broken, [honest, flipped]) == (math.inf, [None, None])
    assert LossScreen().factors([None, None], untrained_loss=math.inf) == [1.0, 1.0]
    assert probe.untrained_loss == pytest.approx(math.log(10), rel=0.3)  # the task's loss scale

    def broken_loss(*args):
        raise RuntimeError("this task's loss cannot run on the probe batch")

    own_task.loss_fn = broken_loss  # a probe that cannot measure must not stop the daemon's start
    assert LossProbe(own_task).untrained_loss == 0.0


def test_loss_probe_scores_in_place_and_keeps_no_scored_model_alive():
    """The probe scores a model through views of its buffer (no copy), and lets go of the buffer
    afterwards: a probe that kept the last scored model alive costs a model copy per peer."""
    task = load_task("mnist1d-cnn")
    probe = LossProbe(task, samples=64)
    assert sum(p.untyped_storage().nbytes() for p in probe.model.parameters()) <= 4 * len(probe.shapes)
    reference = task.make_model().eval()
    model = torch.nn.utils.parameters_to_vector(reference.parameters()).detach().clone()
    with torch.no_grad():
        expected = float(task.loss_fn(reference(probe.x), probe.y))
    assert probe.loss(model) == pytest.approx(expected, rel=1e-6)
    storages = {p.untyped_storage().data_ptr() for p in probe.model.parameters()}
    assert model.untyped_storage().data_ptr() not in storages  # nothing points into the scored buffer
    assert sum(p.untyped_storage().nbytes() for p in probe.model.parameters()) <= 4 * len(probe.shapes)


def test_default_rule_gives_a_screened_partner_weight_zero_and_refuses_bad_lengths():
    rule = make_aggregator("sybilwall+scc")
    own = torch.zeros(64)
    others = [torch.full((64,), 0.1 * (j + 1)) for j in range(4)]
    hist = {f"p{j}": torch.randn(512, generator=torch.Generator().manual_seed(j)) for j in range(4)}
    ctx = RoundContext(self_id="me", partner_ids=[f"p{j}" for j in range(4)], sketches=hist,
                       loss_deltas=[1.0, 1.0, 1.0, 9.0])
    r = rule(own, others, ctx)
    assert r.weights[3] == 0.0 and r.refused == {"p3": "loss"} and "p3" not in r.distrusted
    with pytest.raises(ValueError, match="loss deltas"):
        rule(own, others, RoundContext(self_id="me", partner_ids=ctx.partner_ids, sketches=hist, loss_deltas=[1.0]))


def test_screen_never_cuts_the_closest_partner():
    """A whole swarm changing phase at once (post-local SGD's switch to many local steps between
    mixes): every delta jumps far past a window of old, tiny ones. Cutting them all left peers
    training alone; the closest partner keeps full weight and those near it keep some."""
    s = LossScreen()
    for _ in range(20):
        s.factors([0.01, 0.02, 0.01], untrained_loss=2.3)
    f = s.factors([0.9, 1.2, 3.0], untrained_loss=2.3)
    # scale 0.9 / FULL_UP_TO = 0.6 (the window's median is still ~0.01): 1.2 is 2x it, 3.0 is 5x
    assert f[0] == 1.0 and f[1] == pytest.approx((ZERO_FROM - 2.0) / (ZERO_FROM - FULL_UP_TO)) and f[2] == 0.0


def test_usual_deltas_are_judged_by_the_window_before_the_round():
    """What exempts a far partner from the distance check: the window before this round (at least
    the floor), never this round's closest partner, and nothing before 4 remembered deltas."""
    s = LossScreen()
    s.factors([0.1, 0.1, 0.1, 0.1], untrained_loss=2.3)
    assert not s.usual(0.1)  # a first round of 4 already screens, but there was no window before it
    s.factors([0.1], untrained_loss=2.3)
    assert s.usual(0.8) and not s.usual(0.9)  # scale max(0.1, 0.25 x 2.3) = 0.575, x 1.5 = 0.86
    assert not s.usual(None) and not s.usual(math.nan)
    assert s.factors([3.0, 3.5], untrained_loss=2.3)[0] == 1.0  # full weight via the closest term...
    assert not s.usual(3.0)  # ...but not usual


def test_screen_still_cuts_a_lone_partner_and_a_round_of_flippers_only():
    """The closest-partner term needs two partners (a lone one would never be screened) and stops
    at an untrained model's loss (a round whose partners are all label flippers is still cut)."""
    s = LossScreen()
    for _ in range(20):
        s.factors([0.1, 0.2, 0.1], untrained_loss=2.3)
    assert s.factors([6.0], untrained_loss=2.3) == [0.0]
    assert s.factors([5.0, 6.0], untrained_loss=2.3)[1] == 0.0  # scale 2.3, not 5.0 / 1.5


def test_default_rule_mixes_no_screened_partner_but_backs_none_off():
    """The screen judges one model at one moment, not the peer: a screened partner gets weight 0
    but is not distrusted (backed off, penalised), or the window would only see the partners still
    pulled. Other refusals (Sybil weight 0, distance outliers) still are."""
    own = torch.zeros(64)
    others = [torch.full((64,), 0.1 * (j + 1)) for j in range(3)]
    hist = {f"p{j}": torch.randn(512, generator=torch.Generator().manual_seed(j)) for j in range(3)}
    ids = [f"p{j}" for j in range(3)]
    rule = make_aggregator("sybilwall+scc")
    for _ in range(10):  # a window where partners do about as well as we do
        rule.loss_screen.factors([0.1, 0.1, 0.1])
    r = rule(own, others, RoundContext(self_id="me", partner_ids=ids, sketches=hist, loss_deltas=[0.1, 0.1, 5.0], own_loss=0.1))
    assert r.weights[2] == 0.0 and r.refused == {"p2": "loss"} and r.distrusted == []
    far = [others[0], others[1], torch.full((64,), 1e3)]  # a distance outlier is still distrusted
    rule = make_aggregator("sybilwall+scc")  # (no window of deltas yet: the screen judged nobody)
    r = rule(own, far, RoundContext(self_id="me", partner_ids=ids, sketches=hist, loss_deltas=[0.1, 0.1, 0.1], own_loss=0.1))
    assert r.refused == {"p2": "outlier"} and r.distrusted == ["p2"]
    rule = make_aggregator("sybilwall+scc")  # far, but the screen judged it as good as the others: clipped, mixed
    for _ in range(10):
        rule.loss_screen.factors([0.1, 0.1, 0.1])
    r = rule(own, far, RoundContext(self_id="me", partner_ids=ids, sketches=hist, loss_deltas=[0.1, 0.1, 0.1], own_loss=0.1))
    if r.checks["p2"] and min(r.checks["p2"].values()) >= 1.0:
        assert r.refused == {} and r.weights[2] > 0 and r.distrusted == []
        dists = [float((x - own).norm()) for x in far]  # clipped to the radius
        assert float((r.model - own).norm()) <= sum(w * min(d, r.radius) for w, d in zip(r.weights, dists)) * (1 + 1e-5)
        assert r.radius < 0.1 * dists[2]
    else:
        pytest.fail(f"the far partner must pass the Sybil checks at full weight here: {r.checks}")
    # ...but not while the consistency check is suspended, nor below full Sybil weight
    for setup in ("suspended", "weak"):
        rule = make_aggregator("sybilwall+scc")
        for _ in range(10):
            rule.loss_screen.factors([0.1, 0.1, 0.1])
        weights = rule.sybil.weights
        def forced(ctx, setup=setup, weights=weights, rule=rule):
            s = weights(ctx)
            if setup == "suspended":
                rule.sybil.consistency_suspended = True
                return s
            return dataclasses.replace(s, weights=[*s.weights[:2], 0.9])
        rule.sybil.weights = forced
        r = rule(own, far, RoundContext(self_id="me", partner_ids=ids, sketches=hist, loss_deltas=[0.1, 0.1, 0.1], own_loss=0.1))
        assert r.refused.get("p2") == "outlier", setup
    # ...nor when its delta is usual only thanks to the closest-partner term, or unmeasured
    for deltas in ([3.0, 3.0, 3.0], [0.1, 0.1, None]):
        rule = make_aggregator("sybilwall+scc")
        for _ in range(10):
            rule.loss_screen.factors([0.1, 0.1, 0.1])
        r = rule(own, far, RoundContext(self_id="me", partner_ids=ids, sketches=hist, loss_deltas=deltas, own_loss=0.1))
        assert r.refused.get("p2") == "outlier", deltas
    rule = make_aggregator("sybilwall+scc")  # far away *and* bad on our data: still an outlier, backed off
    for _ in range(10):
        rule.loss_screen.factors([0.1, 0.1, 0.1])
    r = rule(own, far, RoundContext(self_id="me", partner_ids=ids, sketches=hist, loss_deltas=[0.1, 0.1, 50.0], own_loss=0.1))
    assert r.refused == {"p2": "outlier"} and r.distrusted == ["p2"]


async def test_daemon_measures_partner_losses_each_round_and_reports_them(tmp_path):
    net = MemoryNetwork()
    daemons = []
    for name in ("a", "b"):
        d = PeerDaemon(fast_config(tmp_path / name), net.transport(name))
        await d.transport.start()
        await d.transport.set_handler(gossip.PROTOCOL, d._serve_model)
        d.addrs = await d.transport.addrs()
        daemons.append(d)
    a, b = daemons
    for d in (a, b, a, b):
        await d._heartbeat_once()
    assert a.loss_probe is not None
    b.trainer.apply_delta(torch.full_like(b.trainer.flat, 0.05))
    own = a.trainer.snapshot()
    floors = []
    screen_factors = a.core.aggregator.loss_screen.factors
    a.core.aggregator.loss_screen.factors = lambda deltas, untrained_loss=0.0: floors.append(untrained_loss) or screen_factors(deltas, untrained_loss)
    assert await a.gossip_round() is True
    assert floors == [a.loss_probe.untrained_loss] and floors[0] > 0  # the rule got the task's loss scale
    status = json.loads(json.dumps(a.status(), allow_nan=False))  # strict JSON
    deltas = status["last_round"]["loss_deltas"]
    assert len(deltas) == 1 and deltas[0] == pytest.approx(a.loss_probe.loss(b.trainer.flat) - a.loss_probe.loss(own), abs=1e-3)
    assert status["last_round"]["own_loss"] == pytest.approx(a.loss_probe.loss(own), abs=1e-3)
    assert list(a.core.aggregator.loss_screen.recent) == pytest.approx(deltas, abs=1e-3)  # the rule got them
    assert isinstance(status["refused"], dict)
    checks = status["last_round"]["sybil_checks"]  # why a partner got its Sybil weight, per check
    assert set(checks) <= {b.peer_id[:12]} and all(isinstance(v, dict) for v in checks.values())

    def broken_loss(*args):
        raise RuntimeError("this task's loss cannot run on the probe batch")

    a.loss_probe.loss_fn = broken_loss  # e.g. a user task: the round goes on without the screen
    assert await a.gossip_round() is True and a.loss_probe is None
    assert a.counters["rounds_ok"] == 2
    off = PeerDaemon(fast_config(tmp_path / "off", loss_probe_samples=0), net.transport("off"))
    assert off.loss_probe is None
    for d in daemons:
        await d.transport.stop()
