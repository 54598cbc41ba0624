"""Robust aggregation inside the daemon: histories, signed sketches, hostile policies across the protocol."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.aggregation import AGGREGATORS, DEFAULT_AGGREGATOR, DESCRIPTIONS
from peer.config import PeerConfig
from peer.experiment import robustness
from peer.experiment.attacks import ATTACKS, HostilePolicy, alie_z
from peer.tasks import load_task
from peer.trainer import Trainer
from protocols.discovery import SKETCH_BYTES, PeerRecord, SwarmView
from protocols.transport.base import StoredRecord

ROOT = Path(__file__).resolve().parent.parent


def test_history_counts_local_updates_only():
    t = Trainer(load_task("digits-mlp"), seed=0)
    start = t.snapshot()
    for _ in range(5):
        t.train_step()
    local = t.snapshot() - start
    torch.testing.assert_close(t.history(), local)
    t.apply_delta(torch.full_like(start, 0.5))       # gossip moves the model...
    t.load_flat(t.snapshot() + 1.0)                  # ...and so does a join sync
    torch.testing.assert_close(t.history(), local)   # neither is this peer's own update
    t.train_step()
    assert float((t.history() - local).norm()) > 0
    # a checkpoint keeps it
    again = Trainer(load_task("digits-mlp"), seed=0)
    again.load_state_dict(t.state_dict())
    torch.testing.assert_close(again.history(), t.history())


def test_record_history_is_size_checked():
    rec = PeerRecord("a", ("/x",), "t", 1, 1.0, 1, 5.0, history=b"\x00" * SKETCH_BYTES)
    assert PeerRecord.from_wire(rec.to_wire()).history == rec.history
    for bad in (b"\x00" * 10, "text", b"\x00" * (SKETCH_BYTES + 2)):
        wire = rec.to_wire()
        wire["history"] = bad
        with pytest.raises(ValueError, match="history"):
            PeerRecord.from_wire(wire)
    view = SwarmView("me", "t")
    wire = rec.to_wire()
    wire["history"] = b"\x00" * 3
    view.update([StoredRecord("a", wire, 100.0)], now=1.0)
    assert view.rejected == {"malformed_record:history": 1} and not view.peers


def test_registry_names_cli_and_config_agree():
    assert set(AGGREGATORS) == set(DESCRIPTIONS)
    assert PeerConfig().aggregator == DEFAULT_AGGREGATOR == "sybilwall+scc"
    out = subprocess.run([sys.executable, "-m", "cli.main", "join", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"}).stdout
    for name in AGGREGATORS:
        assert name in out
    assert "--experiment-attack" not in out  # experiments-only flag stays out of the user's help


def test_hostile_policy_forms():
    own = torch.ones(4)
    p = HostilePolicy("signflip100")
    p.round_start(own, torch.zeros(4))
    p.round_start(own + 0.1, torch.full((4,), 0.1))  # it trained: update 0.1
    torch.testing.assert_close(p.serve("x", own + 0.1), own - 10.0)
    a = HostilePolicy("alie")
    a.observe(["h1", "h2"], [torch.zeros(4), torch.full((4,), 2.0)])
    torch.testing.assert_close(a.serve("x", own), torch.full((4,), 1.0 - alie_z(25, 5)))
    assert abs(alie_z(25, 5) - 0.2533) < 1e-3
    s = HostilePolicy("adaptive-sybil")
    h = torch.ones(512)
    assert float(torch.nn.functional.cosine_similarity(s.report_history(h), h, dim=0)) < 0.6
    liar = HostilePolicy("signflip-liar")
    torch.testing.assert_close(liar.report_history(h), -h)  # reports what it serves, not what it trains
    with pytest.raises(ValueError):
        HostilePolicy("nonsense")
    assert {"signflip", "signflip-liar", "signflip100", "gaussian", "labelflip", "targeted", "adaptive-sybil", "alie", "ipm",
            "dissensus", "replacement", "spectral", "sleeper", "hugger", "framing", "poisoning"} == set(ATTACKS)


def test_alie_z_follows_the_run():
    """ALIE's z comes from the run's n and f (30 %: 14 honest + 6), not the 25/5 default."""
    from peer.experiment.attacks import behaviour_for

    assert abs(alie_z(20, 6) - 0.3661) < 1e-3
    assert behaviour_for("alie", "p", n=20, f=6).z == alie_z(20, 6)
    assert behaviour_for("alie", "p").z == alie_z(25, 5)


def test_spectral_pushes_each_side_of_the_main_split_apart():
    """Honest models split in two groups along one direction: a requester on either side is
    pushed further out along that direction, by the median honest distance from it."""
    w = torch.zeros(6)
    w[2] = 1.0
    models = {f"h{i}": (1.0 if i < 3 else -1.0) * w + 0.01 * i * torch.ones(6) for i in range(6)}
    p = HostilePolicy("spectral")
    p.round_start(torch.zeros(6), torch.zeros(6))
    p.observe(list(models), list(models.values()))
    for r in ("h0", "h4"):
        x_r = models[r]
        out = p.serve(r, x_r.clone())
        step = out - x_r
        others = sorted(float((m - x_r).norm()) for q, m in models.items() if q != r)
        assert abs(float(step.norm()) - others[(len(others) - 1) // 2]) < 1e-5
        side = 1.0 if r == "h0" else -1.0
        assert float(torch.dot(step, w)) * side > 0.99 * float(step.norm())  # along the split, outwards


def test_sleeper_is_honest_then_alie():
    own = torch.full((4,), 3.0)
    p = HostilePolicy("sleeper", n=20, f=6, sleep_rounds=2)
    honest = [torch.zeros(4), torch.full((4,), 2.0)]
    for rnd in range(1, 4):
        p.round_start(own, torch.ones(4))
        p.observe(["h1", "h2"], honest)
        served = p.serve("x", own)
        if rnd <= 2:
            torch.testing.assert_close(served, own)  # builds history and reputation
        else:
            torch.testing.assert_close(served, torch.full((4,), 1.0 - alie_z(20, 6)))
    torch.testing.assert_close(p.report_history(torch.ones(4)), torch.ones(4))  # its record stays honest


def test_hugger_stays_under_the_distance_and_loss_screens():
    from peer.aggregation.loss import FULL_UP_TO, UNTRAINED_FRACTION
    from peer.aggregation.rules import WeightedGossip
    from peer.experiment.attacks import HUG_CONSISTENCY, HUG_MARGIN

    task = load_task("mnist1d-cnn")
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.utils.parameters_to_vector(task.make_model().parameters()).detach()
    honest = {f"h{i}": base + 0.05 * torch.randn(base.shape, generator=gen) for i in range(5)}
    history = torch.randn(base.shape, generator=gen)
    p = HostilePolicy("hugger")
    p.poison(task)  # keeps a loss probe on its own data, changes no label
    p.round_start(base, history)
    p.observe(list(honest), list(honest.values()))
    x_r = honest["h0"]
    out = p.serve("h0", x_r.clone())
    step = out - x_r
    dists = sorted(float((m - x_r).norm()) for q, m in honest.items() if q != "h0")
    d_med = dists[(len(dists) - 1) // 2]
    assert 0 < float(step.norm()) <= HUG_MARGIN * WeightedGossip.OUTLIER_FACTOR * d_med + 1e-4
    cos = float(torch.nn.functional.cosine_similarity(step, history, dim=0))
    assert abs(cos - HUG_CONSISTENCY) < 1e-3  # consistent with its (honest) reported history
    own_loss = p.probe.loss(x_r.clone())
    rises = sorted(p.probe.loss(m.clone()) - own_loss for q, m in honest.items() if q != "h0")
    scale = max(rises[(len(rises) - 1) // 2], UNTRAINED_FRACTION * p.probe.untrained_loss)
    assert p.probe.loss(out.clone()) - own_loss <= HUG_MARGIN * FULL_UP_TO * scale + 1e-6
    # a loss that rises fast with distance: the loss screen binds, and the step found sits just under it
    class QuadraticLoss:
        untrained_loss = 0.01

        def loss(self, flat):
            return float(((flat - x_r) ** 2).sum())

    p.probe = QuadraticLoss()
    p.observe(list(honest), list(honest.values()))
    out = p.serve("h0", x_r.clone())
    limit = HUG_MARGIN * FULL_UP_TO * d_med ** 2  # the median honest rise is d_med^2
    rise = p.probe.loss(out)
    assert 0.98 * limit <= rise <= limit * (1 + 1e-5), (rise, limit)
    assert torch.equal(task.y_train, load_task("mnist1d-cnn").y_train)


def test_framing_copies_an_honest_record_and_serves_its_model():
    """Each framer reports one honest peer's sketch bit for bit (distinct targets), and serves that
    peer's model, so both channels of FoolsGold see a clone pair."""
    sketches = {f"h{i}": torch.randn(512) for i in range(4)}
    framers = ["b0", "b1"]
    targets = []
    for me in framers:
        p = HostilePolicy("framing", peer_id=me)
        p.colluders = set(framers) - {me}
        own = torch.randn(512)
        live = {**sketches, "b0": own, "b1": own}  # its fellow framers' records are live too
        copied = p.report_history(own, live)
        assert p.target in sketches and torch.equal(copied, sketches[p.target])
        targets.append(p.target)
        model = torch.randn(8)
        p.round_start(torch.zeros(8), torch.zeros(8))
        p.observe([p.target, "h9"], [model, torch.zeros(8)])
        torch.testing.assert_close(p.serve("h9", torch.ones(8)), model)
    assert len(set(targets)) == 2
    from peer.behaviour import Behaviour

    h = torch.ones(4)
    assert Behaviour().report_history(h, {"a": -h}) is h  # the honest default ignores the others


def test_poisoning_pulls_everyone_and_serves_alie():
    p = HostilePolicy("poisoning", n=20, f=6)
    assert p.fanout is not None and p.fanout >= 100
    p.observe(["h1", "h2"], [torch.zeros(4), torch.full((4,), 2.0)])
    torch.testing.assert_close(p.serve("x", torch.ones(4)), torch.full((4,), 1.0 - alie_z(20, 6)))
    assert HostilePolicy("alie").fanout is None


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["targeted", "signflip100"])
def test_attacks_cross_the_protocol_and_the_default_resists(attack):
    """A small lock-step swarm of real daemons: the attack hurts plain gossip, the default holds."""
    kw = dict(honest=8, byzantine=3, rounds=25, local_steps=5, partners=4)
    mean = asyncio.run(robustness.run_swarm("mean", attack, **kw))
    default = asyncio.run(robustness.run_swarm(DEFAULT_AGGREGATOR, attack, **kw))
    if attack == "targeted":
        assert mean["attack_success_rate"] > 2 * default["attack_success_rate"] + 0.05, (mean, default)
    else:
        assert default["accuracy"] > mean["accuracy"] + 0.2, (mean, default)


def test_unknown_aggregator_or_attack_is_one_line_and_exit_2(tmp_path):
    for flag, value in (("--aggregator", "bogus"), ("--experiment-attack", "bogus")):
        r = subprocess.run([sys.executable, "-m", "cli.main", "join", "--data-dir", str(tmp_path / value / flag[2:]),
                            flag, value, "--listen", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("cannot start: ") and "unknown" in r.stderr and "bogus" in r.stderr
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_swarm_wide_drift_does_not_isolate_a_peer():
    """Regression: when every partner's distance jumps (early training, a burst of local steps),
    the outlier screen compared them with the recent median only, dropped them all, and the peer
    stopped mixing for good (seen in a 3-peer real swarm stuck below 85 %)."""
    from peer.aggregation import RoundContext, make_aggregator

    rule = make_aggregator(DEFAULT_AGGREGATOR)
    gen = torch.Generator().manual_seed(0)
    own = torch.zeros(1000)
    ids = ["a", "b", "c"]
    # each partner trains its own way and reports it truthfully (served models follow the history)
    way = {p: torch.randn(1000, generator=gen) for p in ids}
    hist = {p: rule.sybil.sketch(way[p]) for p in ids}
    for scale in [0.01] * 20 + [1.0] * 3:
        others = [own + scale * (way[p] + 0.5 * torch.randn(1000, generator=gen)) for p in ids]
        result = rule(own, others, RoundContext(self_id="me", partner_ids=ids, sketches=dict(hist)))
    assert all(w > 0 for w in result.weights), result.weights
    assert result.distrusted == []
    assert float((result.model - own).norm()) > 0.1


def test_record_with_non_finite_history_is_refused_when_parsed():
    nan = b"\x00\x7e" * (SKETCH_BYTES // 2)  # float16 NaN, little-endian
    wire = PeerRecord("a", ("/x",), "t", 1, 1.0, 1, 5.0, history=nan).to_wire()
    with pytest.raises(ValueError, match="history"):
        PeerRecord.from_wire(wire)


def test_grid_worst_case_is_the_median_over_seeds_then_the_worst_attack():
    cells = robustness.grid_cells([0.3], [0.1], [2], ["early"], peers=20)
    assert [(c["key"], c["honest"], c["byzantine"], c["rounds"]) for c in cells] == [("byz30-alpha0.1-partners2-early", 14, 6, 40)]
    key = cells[0]["key"]

    def run(attack, seed, acc, peers):
        return {"aggregator": "g", "attack": attack, "seed": seed, "cell": key, "accuracy": acc, "peer_accuracy": peers}

    results = [run("none", 0, 0.80, [0.8, 0.8]), run("none", 1, 0.70, [0.7, 0.7]), run("none", 2, 0.90, [0.9, 0.9]),
               # a: drops 0.10, 0.05, 0.50 -> median 0.10; one peer loses 0.2, 0.1, 0.6 -> median 0.2
               run("a", 0, 0.70, [0.6, 0.8]), run("a", 1, 0.65, [0.6, 0.7]), run("a", 2, 0.40, [0.3, 0.5]),
               # b: drops 0.20, 0.20, 0.00 -> median 0.20 (worse than a's median, though a's worst seed is worse)
               run("b", 0, 0.60, [0.6, 0.6]), run("b", 1, 0.50, [0.5, 0.5]), run("b", 2, 0.90, [0.9, 0.9])]
    out = robustness.summarise_grid(results, ["g"], ["none", "a", "b"], cells)["g"][key]
    assert out["drop"] == {"a": 0.1, "b": 0.2} and out["worst_attack"] == "b" and out["worst_case_drop"] == 0.2
    assert out["worst_peer_drop"] == {"a": 0.2, "b": 0.2} and out["worst_case_peer_drop"] == 0.2
    assert out["clean_accuracy"] == 0.8 and out["seeds"] == 3


def test_grid_runs_each_phase_for_its_own_rounds_unless_told():
    cells = robustness.grid_cells([0.3], [0.1], [2], ["early", "late"], peers=20)
    jobs = robustness.grid_jobs(cells, [0], ["g"], ["none", "a"], rounds=None, local_steps=5, overrides=None)
    assert sorted({(t["cell"], kw["rounds"], t["rounds"]) for _, _, kw, t in jobs}) == [
        ("byz30-alpha0.1-partners2-early", 40, 40), ("byz30-alpha0.1-partners2-late", 100, 100)]
    smoke = robustness.grid_jobs(cells, [0], ["g"], ["none"], rounds=3, local_steps=5, overrides=None)
    assert {kw["rounds"] for _, _, kw, _ in smoke} == {3}
