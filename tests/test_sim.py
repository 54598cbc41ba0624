"""The simulator (peer/sim): its clock, its learner, its links, and a small run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.experiment.scenario import ScenarioError, parse_scenario
from peer.sim.events import EventLoop
from peer.sim.links import Link, transfer_seconds

ROOT = Path(__file__).resolve().parents[1]


def test_events_run_in_time_order_and_ties_in_scheduling_order():
    loop, seen = EventLoop(), []
    loop.at(2.0, lambda: seen.append("b"))
    loop.at(1.0, lambda: seen.append("a"))
    loop.at(2.0, lambda: seen.append("c"))  # same instant as b, scheduled later: runs after it
    cancelled = loop.at(1.5, lambda: seen.append("never"))
    cancelled.cancel()
    loop.at(1.0, lambda: loop.after(0.5, lambda: seen.append(f"nested@{loop.now}")))
    loop.at(5.0, lambda: seen.append("later"))
    loop.run(until=3.0)
    assert seen == ["a", "nested@1.5", "b", "c"]
    assert loop.now == 3.0 and len(loop) == 1  # the event at 5.0 waits for the next run
    with pytest.raises(ValueError):
        loop.at(2.9, lambda: None)  # the past cannot be scheduled


def test_transfer_shares_the_slower_end():
    server, client = Link(1e6, 1e7, 0.02), Link(1e6, 4e5, 0.03)
    server.uploads, client.downloads = 1, 1
    assert transfer_seconds(1_000_000, server, client) == pytest.approx(2.5)  # the client's 400 kB/s
    server.uploads = 4  # four transfers share the server's 1 MB/s: 250 kB/s each
    assert transfer_seconds(1_000_000, server, client) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        Link(0, 1, 0)


def test_linear_learner_step_equals_the_torch_task_step():
    """The NumPy twin trains mnist1d-linear exactly as Trainer does with the task's torch model
    and Adam (warm-up included): same batch, same result to float32 rounding."""
    from peer.sim.learners import LinearLearner
    from peer.tasks import load_task
    from peer.trainer import Trainer

    task = load_task("mnist1d-linear", shard=0, num_shards=8)
    trainer = Trainer(task, seed=0)
    learner = LinearLearner(task, trainer.flat.clone(), seed=0)
    rng = np.random.default_rng(3)
    for _ in range(5):
        idx = rng.integers(0, len(task.y_train), 32)
        with trainer.lock:
            trainer._set_lr(trainer.local_steps)
            loss = task.loss_fn(trainer.model(task.x_train[torch.from_numpy(idx)]), task.y_train[torch.from_numpy(idx)])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
        trainer.local_steps += 1
        learner.train_step(idx)
        assert learner.last_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(learner.flat, trainer.flat, atol=1e-6)
    assert learner.evaluate()["accuracy"] == pytest.approx(task.evaluate(trainer.model)["accuracy"])


def _scenario(**over):
    raw = {
        "name": "t", "peers": 6, "task": "mnist1d-linear", "duration_s": 3.0, "seed": 2,
        "peer": {"heartbeat-s": 0.2, "checkpoint-every-s": 0.5},
        "churn": {"events": [{"at": 1.0, "action": "kill", "peer": 1}, {"at": 1.2, "action": "leave", "peer": 2},
                             {"at": 2.0, "action": "join", "peer": 1}, {"at": 2.1, "action": "join", "peer": 2}]},
        "sim": {"step_s": 0.01, "startup_s": 0.1},
    }
    raw.update(over)
    return parse_scenario(raw)


def test_churn_follows_the_schedule_and_views_forget_the_departed():
    """A fake scenario: the kill and the leave happen at their times, the killed peer stays in
    the others' views until its record expires (3 heartbeats), the leaver disappears at its
    next lookup, and both come back after their start-up time."""
    from peer.sim.swarm import Simulation

    torch.set_num_threads(1)
    sim = Simulation(_scenario())
    seen: dict[float, set[str]] = {}

    def look(t):
        observer = sim.peers[0]
        seen[t] = {i.record.peer_id for i in observer.core.view.live(sim.loop.now)}

    for t in (0.9, 1.1, 1.45, 1.9, 2.5):
        sim.loop.at(t, lambda t=t: look(t))
    sim.run()
    actions = [(e["action"], e.get("slot")) for e in sim.events if e["action"] in ("kill", "leave", "start")]
    assert actions[:6] == [("start", i) for i in range(6)]
    assert actions[6:] == [("kill", 1), ("leave", 2), ("start", 1), ("start", 2)]
    killed, left = sim.peers[1].peer_id, sim.peers[2].peer_id
    assert {killed, left} <= seen[0.9]
    assert killed in seen[1.1]  # its record lives on: nobody told the swarm
    assert left not in seen[1.45]  # its "left" record removes it at the next lookup (every 0.2 s)
    assert killed not in seen[1.9]  # 3 heartbeats (0.6 s) after its last, it expired
    assert {killed, left} <= seen[2.5]  # both back (identity kept), after 0.1 s of start-up
    joins = [r for r in sim.peer_lines()["p1"] if r["event"] == "join"]
    assert [r["time"] for r in joins] == [0.0, pytest.approx(2.1)]


def test_bad_sim_table_is_one_clear_error():
    from peer.sim.swarm import SimSettings

    with pytest.raises(ScenarioError, match=r"\[sim\]: unknown key\(s\) step_ms"):
        SimSettings.parse({"step_ms": 3})
    with pytest.raises(ScenarioError, match="latency_s must be a number >= 0"):
        SimSettings.parse({"latency_s": -1})


def test_simulate_small_swarm_with_churn_and_an_attacker(tmp_path):
    """scripts/simulate.py end to end: 12 honest peers and a sign-flipper, 10 rounds, a kill and
    a leave; the JSON has the promised fields, the honest peers learned, the files are there."""
    scenario = tmp_path / "small.toml"
    scenario.write_text("""
name = "small"
peers = 12
task = "mnist1d-linear"
seed = 3
[peer]
heartbeat-s = 0.1
[attack]
count = 1
name = "signflip100"
[[churn.events]]
at = 0.2
action = "kill"
peer = 3
[[churn.events]]
at = 0.25
action = "leave"
peer = 4
[[churn.events]]
at = 0.4
action = "join"
peer = 3
[[churn.events]]
at = 0.45
action = "join"
peer = 4
[sim]
step_s = 0.01
startup_s = 0.05
""")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), str(scenario), "--rounds", "10", "--json",
                           "--out", str(out), "--quiet", "--no-plots"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("peers", "rounds", "wall_s", "peak_rss_mb", "honest_accuracy_mean"):
        assert key in result, key
    assert result["peers"] == 13 and result["attackers"] == 1
    assert 10 <= result["rounds"] < 12  # the run stops once honest peers completed 10 rounds on average
    assert result["honest_accuracy_mean"] > 0.15  # chance is 0.10
    assert result["peak_rss_mb"] > 0 and result["wall_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["honest_accuracy_mean"] == result["honest_accuracy_mean"]
    assert {"kill", "leave"} <= {e["action"] for e in summary["churn_events"]}
    assert (out / "peers" / "p12" / "metrics.jsonl").exists()  # the attacker's slot
    assert math.isfinite(summary["peers"][0]["final_accuracy"])

    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), str(scenario), "--out", str(out), "--quiet"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr and "Traceback" not in again.stderr


def test_scenario_sim_table_is_kept_for_the_simulator_and_checked():
    sc = _scenario(sim={"step_s": 0.5})
    assert sc.sim == {"step_s": 0.5} and sc.to_dict()["sim"] == {"step_s": 0.5}
    with pytest.raises(ScenarioError, match=r"\[sim\] are tables"):
        _scenario(sim=3)


def test_simulation_refuses_what_it_does_not_model():
    from peer.sim.swarm import Simulation

    with pytest.raises(ScenarioError, match="outer steps"):
        Simulation(_scenario(peer={"outer-every-steps": 5}))


def test_a_pull_arrives_after_latency_and_transfer_with_the_model_served_when_asked():
    """Two peers, no automatic rounds: peer 0 pulls from peer 1 at t = 1. The request reaches
    peer 1 half a round trip later (0.1 s), which serves its model of that instant; 1,640 bytes
    at peer 1's 1,640 B/s upload arrive 0.1 s + 1 s after that, while peer 1 trains on."""
    from peer.sim.swarm import Simulation

    sc = parse_scenario({"name": "pull", "peers": 2, "task": "mnist1d-linear", "duration_s": 3.0,
                         "peer": {"gossip-every-steps": 0, "gossip-every-s": 1000.0, "heartbeat-s": 0.5},
                         "sim": {"step_s": 0.013, "latency_s": 0.1, "up_bytes_s": 1640, "down_bytes_s": 1e7}})
    sim = Simulation(sc)
    seen: dict[str, object] = {}
    arrived = sim.arrived

    def record(p, life, rnd, server_id, got, failure):
        seen.update(at=sim.loop.now, served_step=got[0], failure=failure, step_then=sim.by_id[server_id].learner.step)
        arrived(p, life, rnd, server_id, got, failure)

    sim.arrived = record
    sim.loop.at(1.1, lambda: seen.update(step_at_serve=sim.peers[1].learner.step))
    sim.loop.at(1.0, lambda: sim.start_round(sim.peers[0], [sim.peers[1].peer_id]))
    sim.run()
    assert sim.payload_bytes == 1640  # 410 float32 parameters
    assert seen["failure"] is None
    assert seen["at"] == pytest.approx(2.2)
    assert seen["served_step"] - seen["step_at_serve"] in (0, 1)  # the model it had when asked
    assert seen["step_then"] > seen["served_step"] + 50  # not the one it has when the bytes land
    assert sim.peers[0].rounds_total == 1 and sim.peers[0].core.stats.counters["rounds_ok"] == 1
