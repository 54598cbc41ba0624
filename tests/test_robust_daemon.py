"""Robust aggregation inside the daemon: histories, signed sketches, hostile policies across the protocol."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.aggregation import AGGREGATORS, DEFAULT_AGGREGATOR, DESCRIPTIONS
from peer.config import PeerConfig
from peer.experiment.attacks import ATTACKS, HostilePolicy, alie_z
from peer.tasks import load_task
from peer.trainer import Trainer
from protocols.discovery import SKETCH_BYTES, PeerRecord, SwarmView
from protocols.transport.base import StoredRecord

ROOT = Path(__file__).resolve().parent.parent


def _robustness():
    spec = importlib.util.spec_from_file_location("robustness", ROOT / "scripts" / "robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
            "dissensus", "replacement"} == set(ATTACKS)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["targeted", "signflip100"])
def test_attacks_cross_the_protocol_and_the_default_resists(attack):
    """A small lock-step swarm of real daemons: the attack hurts plain gossip, the default holds."""
    rob = _robustness()
    kw = dict(honest=8, byzantine=3, rounds=25, local_steps=5, partners=4)
    mean = asyncio.run(rob.run_swarm("mean", attack, **kw))
    default = asyncio.run(rob.run_swarm(DEFAULT_AGGREGATOR, attack, **kw))
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
        result = rule(own, others, RoundContext(self_id="me", partner_ids=ids, histories=dict(hist)))
    assert all(w > 0 for w in result.weights), result.weights
    assert result.distrusted == []
    assert float((result.model - own).norm()) > 0.1


def test_record_with_non_finite_history_is_refused_when_parsed():
    nan = b"\x00\x7e" * (SKETCH_BYTES // 2)  # float16 NaN, little-endian
    wire = PeerRecord("a", ("/x",), "t", 1, 1.0, 1, 5.0, history=nan).to_wire()
    with pytest.raises(ValueError, match="history"):
        PeerRecord.from_wire(wire)
