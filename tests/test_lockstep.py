"""Lock-step robustness runs on the simulator (peer/sim/lockstep.py) and on real daemons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.aggregation import DEFAULT_AGGREGATOR
from peer.experiment import robustness

ROOT = Path(__file__).resolve().parents[1]


def _lockstep(n: int, task: str = "mnist1d-linear", aggregator: str = "mean", **settings):
    from peer.config import PeerConfig
    from peer.sim.lockstep import LockstepPeer, LockstepSwarm

    return LockstepSwarm([LockstepPeer(f"honest{i:02d}", PeerConfig(run_id="t", task=task, aggregator=aggregator,
                                                                      shard=f"{i}/{n}", partners=2, heartbeat_s=1.0,
                                                                      **settings))
                          for i in range(n)], local_steps=2)


def test_lockstep_pulls_of_a_round_arrive_at_once_and_fill_the_serving_caps():
    """With one serving slot, the server that the first requester holds answers the next one busy
    (the daemons' rounds overlap the same way); the other partner still serves."""
    swarm = _lockstep(3, max_concurrent_serves=1)
    reports = swarm.round()  # first lookups: honest01 sees honest00; honest02 sees both
    p1, p2 = swarm.peers[1], swarm.peers[2]
    assert reports["honest01"]["partners"] == ["honest00"]
    assert reports["honest02"]["partners"] == ["honest01"]
    assert dict(p2.core.stats.pull_failed) == {"remote_error": 1} and not p1.core.stats.pull_failed
    assert swarm.peers[0].core.stats.counters["serve_refused"] == 1
    assert all(p.core.serving == 0 for p in swarm.peers)  # every slot given back at the round's end


def test_lockstep_heartbeats_run_in_order_and_every_serve_precedes_every_mix():
    """The first peer's first lookup sees only itself (no partner); the last sees everyone before
    it. Every model a partner serves is its model from before this round's mix: with `mean`, a
    peer's new model is the plain average of its own and its partners' models as they stood."""
    swarm = _lockstep(4)
    before = {}
    real_gossip = swarm.gossip

    def gossip():
        before.update({p.peer_id: p.learner.snapshot() for p in swarm.peers})
        return real_gossip()

    swarm.gossip = gossip
    reports = swarm.round()
    first, last = swarm.peers[0], swarm.peers[-1]
    assert reports[first.peer_id] is None and first.core.stats.counters["rounds_no_partner"] == 1
    assert set(reports[last.peer_id]["partners"]) <= {p.peer_id for p in swarm.peers[:-1]}
    for _ in range(2):  # a later round: everyone sees everyone
        reports = swarm.round()
    assert all(r is not None and len(r["partners"]) == 2 for r in reports.values())
    for p in swarm.peers:
        partners = reports[p.peer_id]["partners"]
        expected = torch.stack([before[p.peer_id], *(before[q] for q in partners)]).mean(0)
        torch.testing.assert_close(p.learner.flat, expected)


def test_test_predictions_count_what_evaluate_counts():
    from peer.sim.learners import LinearLearner, test_predictions

    swarm = _lockstep(2)
    trainer = swarm.peers[0].learner
    for _ in range(20):
        trainer.train_step()
    linear = LinearLearner(trainer.task, trainer.flat.clone())
    for learner in (trainer, linear):
        pred = test_predictions(learner)
        acc = float((pred == learner.task.y_test).float().mean())
        assert abs(acc - learner.evaluate()["accuracy"]) < 1e-6
        assert learner is linear or learner.model.training  # left in train mode


@pytest.mark.parametrize("aggregator,attack", [(DEFAULT_AGGREGATOR, "dissensus"), ("mean", "framing")])
def test_the_two_engines_make_the_same_decisions(aggregator, attack):
    """A tiny lock-step run with attackers on both engines: every honest peer picks the same
    partners and gives them the same weights every round, and ends with the same accuracy.
    (Framers copy honest peers' reported histories, which records carry whatever the rule.)"""
    kw = dict(honest=5, byzantine=2, rounds=4, local_steps=2, partners=2, alpha=0.5, seed=1,
              peer_settings={"task": "mnist1d-linear"}, trace_rounds=4)
    sim = robustness.run(aggregator, attack, engine="sim", **kw)
    real = robustness.run(aggregator, attack, engine="daemons", **kw)
    assert sim["engine"] == "sim" and real["engine"] == "daemons"
    assert sim["trace"] == real["trace"]
    later = [t for t in sim["trace"][1:] for v in t.values() if v is not None]
    assert later and any(p.startswith("byz") for t in sim["trace"] for v in t.values() if v for p in v[0])
    assert sim["peer_accuracy"] == real["peer_accuracy"]
    assert abs(sim["accuracy"] - real["accuracy"]) < 1e-9
    assert sim["mix"] == real["mix"] and sim["refused"] == real["refused"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sim", "daemons"])
def test_tiny_grid_reports_worst_case_drop(engine):
    """The grid end to end on either engine: 6 honest + 2 framers, 3 rounds, one cell, one seed."""
    r = subprocess.run([sys.executable, "scripts/robustness.py", "--grid", "--json", "--peers", "8", "--fractions", "0.25",
                        "--alphas", "0.5", "--partners-list", "2", "--phases", "early", "--seeds", "1", "--rounds", "3",
                        "--attacks", "framing", "--aggregators", DEFAULT_AGGREGATOR, "--workers", "1", "--engine", engine],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["settings"]["engine"] == engine
    key = "byz25-alpha0.5-partners2-early"
    cell = out["grid"][DEFAULT_AGGREGATOR][key]
    assert out["worst_case_drop"][DEFAULT_AGGREGATOR][key] == cell["worst_case_drop"] == cell["drop"]["framing"]
    runs = {r["attack"]: r for r in out["runs"]}
    assert set(runs) == {"none", "framing"} and len(runs["none"]["peer_accuracy"]) == 6
    assert {r["engine"] for r in runs.values()} == {engine}
    assert abs(cell["drop"]["framing"] - round(runs["none"]["accuracy"] - runs["framing"]["accuracy"], 4)) < 1e-4
    for r in runs.values():
        assert {"attack_success_rate", "worst_peer_accuracy", "rejected", "pull_failed", "refused", "mix"} <= set(r)
        assert 0.0 <= r["attack_success_rate"] <= 1.0 and 0.0 < r["worst_peer_accuracy"] <= 1.0