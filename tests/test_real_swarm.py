"""Real `peer join` processes, real p2pd on 127.0.0.1: train, leave, crash and restart, join late."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.launcher import LocalPeer, stop_all
from peer.state import checkpoint_path, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def wait_for(peers: list[LocalPeer], predicate, timeout: float, what: str) -> list[dict]:
    """Poll the daemons' status over their control sockets until `predicate(statuses)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = [p.status() for p in peers]
        if all(statuses) and predicate(statuses):
            return statuses
        for p in peers:
            if not p.alive:
                raise AssertionError(f"{p.data_dir.name} died:\n{p.log_tail()}")
        if time.monotonic() > deadline:
            state = [(s or {}).get(k) if k != "live_peers" else len((s or {}).get(k) or ()) for s in statuses for k in ("step", "accuracy", "live_peers", "rounds_ok", "rounds_failed", "pull_failed")]
            raise AssertionError(f"timed out waiting for {what}: step, accuracy, live peers, rounds ok/failed, pull failures per peer: {state}")
        time.sleep(0.5)


def _thread_nices(pid: int) -> dict[int, int]:
    """Niceness of every thread of a process, from /proc (field 19 of each task's stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        out[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_real_swarm_with_leave_crash_restart_and_late_join(tmp_path):
    config = tmp_path / "peer.toml"
    config.write_text("heartbeat-s = 1.0\ngossip-every-s = 0.5\ncheckpoint-every-s = 3.0\neval-every-s = 1.0\n")
    common = ["--run-id", "itest", "--task", "mnist1d-cnn", "--config", str(config)]
    p0 = LocalPeer(tmp_path / "p0", [*common, "--shard", "0/4"]).start()
    peers = [p0]
    try:
        p0.wait_ready(90)
        boot = ["--initial-peer", p0.addrs[0]]
        p1 = LocalPeer(tmp_path / "p1", [*common, "--shard", "1/4", *boot]).start()
        p2 = LocalPeer(tmp_path / "p2", [*common, "--shard", "2/4", *boot]).start()
        peers += [p1, p2]
        for p in (p1, p2):
            p.wait_ready(90)
        statuses = wait_for(peers, lambda ss: all(len(s["live_peers"]) == 2 and s["rounds_ok"] > 0 for s in ss), 60, "3 peers gossiping")
        if sys.platform.startswith("linux"):  # training runs niced (train_nice = 10), the rest of the daemon does not
            assert all(s["train_nice"] == max(10, os.nice(0)) for s in statuses)
            nices = _thread_nices(statuses[0]["pid"])
            assert nices[statuses[0]["pid"]] == os.nice(0)  # the main thread: the event loop
            assert max(10, os.nice(0)) in nices.values()  # the trainer thread

        # 1. graceful leave through the CLI: final checkpoint, exit 0, gone from the others' view
        left = cli("leave", "--data-dir", str(p2.data_dir))
        assert left.returncode == 0, left.stderr
        assert p2.wait_exit(30) == 0
        assert load_checkpoint(checkpoint_path(p2.data_dir, "itest", "mnist1d-cnn"))["step"] > 0
        peers.remove(p2)
        wait_for(peers, lambda ss: all(p2.peer_id not in [q["peer_id"] for q in s["live_peers"]] for s in ss), 15, "p2 to vanish")

        # 2. SIGKILL, then restart from the same data dir: same identity, resumes from the checkpoint
        wait_for([p1], lambda ss: ss[0]["checkpoint"]["step"] is not None, 30, "p1's first checkpoint")
        old_id = p1.peer_id
        p1.kill()
        saved_step = load_checkpoint(checkpoint_path(p1.data_dir, "itest", "mnist1d-cnn"))["step"]
        p1.start()
        s1 = p1.wait_ready(90)
        assert s1["peer_id"] == old_id
        assert s1["step"] >= saved_step > 0

        # 3. a fourth peer joins late and catches up with the swarm within 30 s
        swarm_acc = min(s["accuracy"] for s in wait_for(peers, lambda ss: all(s["accuracy"] for s in ss), 30, "accuracy"))
        p3 = LocalPeer(tmp_path / "p3", [*common, "--shard", "3/4", *boot]).start()
        peers.append(p3)
        p3.wait_ready(90)
        joined = time.monotonic()
        wait_for([p3], lambda ss: (ss[0]["accuracy"] or 0) >= swarm_acc - 0.02, 30, "the late joiner to catch up")
        catchup = time.monotonic() - joined
        print(f"late joiner caught up with swarm accuracy {swarm_acc:.3f} in {catchup:.1f}s")

        # 4. `peer status --json` on every live peer shows >= 85% and lists exactly the others.
        # Per-peer accuracy fluctuates by a few points between gossip rounds (see docs), so poll
        # the CLI until all peers satisfy this at the same moment.
        ids = {p.peer_id for p in peers}
        deadline = time.monotonic() + 150
        while True:
            outs = [cli("status", "--json", "--data-dir", str(p.data_dir)) for p in peers]
            assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
            ss = [json.loads(o.stdout) for o in outs]
            views_ok = all({q["peer_id"] for q in s["live_peers"]} == ids - {s["peer_id"]} for s in ss)
            if views_ok and all(s["accuracy"] >= 0.85 for s in ss):
                print(f"all peers >= 85% after {150 - (deadline - time.monotonic()):.0f}s of polling: {[round(s['accuracy'], 3) for s in ss]}")
                break
            assert time.monotonic() < deadline, [(s["accuracy"], len(s["live_peers"]), s.get("last_round")) for s in ss]
            time.sleep(1)
        assert all(p2.peer_id not in {q["peer_id"] for q in s["live_peers"]} for s in ss)
    finally:
        stop_all(peers)
    assert all(p.proc.returncode == 0 for p in peers), [p.log_tail() for p in peers]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_peers_with_outer_steps_compression_and_a_bandwidth_cap(tmp_path):
    """Two real daemons (p2pd on 127.0.0.1) exchanging int8 pseudo-gradients every 5 inner steps
    under a 2 Mbit/s cap both ways, enforced by the daemons themselves."""
    config = tmp_path / "peer.toml"
    config.write_text("heartbeat-s = 1.0\neval-every-s = 1.0\nstep-delay-s = 0.02\n")
    common = ["--run-id", "captest", "--task", "digits-mlp", "--config", str(config), "--outer-every-steps", "5",
              "--compression", "int8", "--max-upload-mbps", "2", "--max-download-mbps", "2"]
    p0 = LocalPeer(tmp_path / "p0", [*common, "--shard", "0/2"]).start()
    peers = [p0]
    try:
        p0.wait_ready(90)
        p1 = LocalPeer(tmp_path / "p1", [*common, "--shard", "1/2", "--initial-peer", p0.addrs[0]]).start()
        peers.append(p1)
        p1.wait_ready(90)
        statuses = wait_for(peers, lambda ss: all(s["rounds_ok"] >= 3 and s["outer"]["outer_step"] >= 3 for s in ss),
                            120, "both peers to mix pseudo-gradients")
        for s in statuses:
            assert s["traffic"]["max_upload_mbps"] == 2 and s["traffic"]["max_download_mbps"] == 2
            assert s["outer"]["compression"] == "int8" and s["outer"]["compression_ratio"] > 3
            assert s["bytes_received"] > 0 and not s["pull_failed"] and not s["rejected"]
            assert s["last_round"]["seconds"]["transfer"] >= 0
    finally:
        stop_all(peers)
    assert all(p.proc.returncode == 0 for p in peers)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restarted_first_peer_finds_its_run_again(tmp_path):
    """The first peer of a run has no --initial-peer; restarted, it dials the peers its data dir
    remembers (peers-<run>.json) and sees its old partner again within 30 s."""
    config = tmp_path / "peer.toml"
    config.write_text("heartbeat-s = 1.0\ngossip-every-s = 0.5\ncheckpoint-every-s = 3.0\neval-every-s = 1.0\n")
    common = ["--run-id", "remember", "--task", "digits-mlp", "--config", str(config)]
    a = LocalPeer(tmp_path / "a", [*common, "--shard", "0/2"]).start()
    peers = [a]
    try:
        a.wait_ready(90)
        b = LocalPeer(tmp_path / "b", [*common, "--shard", "1/2", "--initial-peer", a.addrs[0]]).start()
        peers.append(b)
        b.wait_ready(90)
        wait_for(peers, lambda ss: all(len(s["live_peers"]) == 1 for s in ss), 60, "a and b to see each other")
        remembered = tmp_path / "a" / "peers-remember.json"
        deadline = time.monotonic() + 30
        while not (remembered.exists() and b.peer_id in json.loads(remembered.read_text())["peers"]):
            assert time.monotonic() < deadline, "a's data dir never remembered b"
            time.sleep(0.2)
        assert a.leave(60) == 0
        a.start()  # the same data dir and arguments: still no --initial-peer
        a.wait_ready(90)
        wait_for(peers, lambda ss: [q["peer_id"] for q in ss[0]["live_peers"]] == [b.peer_id]
                 and [q["peer_id"] for q in ss[1]["live_peers"]] == [a.peer_id], 30, "the restarted first peer and b to meet again")
    finally:
        stop_all(peers)
    assert all(p.proc.returncode == 0 for p in peers), [p.log_tail() for p in peers]
