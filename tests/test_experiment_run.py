"""The experiment runner end to end: real `peer join` daemons and p2pd on 127.0.0.1, a scheduled
SIGKILL and rejoin, then the summary it writes (scripts/scenarios/smoke.toml, ~75 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smoke_scenario_kill_and_rejoin_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "scripts/experiment.py", "scripts/scenarios/smoke.toml", "--out", str(out), "--quiet"],
                       cwd=REPO, capture_output=True, text=True, timeout=220)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["scenario"]["name"] == "smoke" and s["scenario"]["peers"] == 4
    peers = {p["id"]: p for p in s["peers"]}
    assert sorted(peers) == ["p0", "p1", "p2", "p3"]
    assert all(p["role"] == "honest" and not p["crashed"] for p in peers.values()), s["peers"]
    assert (peers["p2"]["kills"], peers["p2"]["joins"]) == (1, 2)
    assert all((peers[n]["kills"], peers[n]["joins"]) == (0, 1) for n in ("p0", "p1", "p3"))
    assert len(peers["p2"]["peer_ids"]) == 1, "keep_identity: the rejoin reuses the data dir and its key"
    # real training happened and the rejoiner caught up with the swarm during the run
    assert s["honest_accuracy_mean"] > 0.7, s["honest_accuracy_mean"]
    assert s["time_to_accuracy"] is not None
    assert len(s["join_catchup_seconds"]) == 1 and s["join_catchup_seconds"][0] is not None
    assert 0 < s["join_catchup_seconds"][0] < 40
    assert [(e["action"], e["peer"]) for e in s["churn_events"]] == [("kill", "p2"), ("start", "p2")]
    assert 9 < s["churn_events"][0]["t"] < 14
    assert (out / "summary.md").read_text().count("| p") >= 4
    assert (out / "accuracy.png").stat().st_size > 10_000 and (out / "bytes.png").stat().st_size > 10_000
    # every process the runner started is gone
    pids = [e["pid"] for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e.get("pid")]
    assert len(pids) == 5 and not any(alive(p) for p in pids)
    # --collect on the same directory gives the same numbers (what a gathered run goes through)
    again = subprocess.run([sys.executable, "scripts/experiment.py", "--collect", str(out), "--no-plots"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["honest_accuracy_mean"] == s["honest_accuracy_mean"]


def test_bad_scenario_is_one_line_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('peers = 4\n[attack]\ncount = 1\nname = "nope"\n')
    r = subprocess.run([sys.executable, "scripts/experiment.py", str(bad), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown attack 'nope'" in r.stderr
    assert not (tmp_path / "o").exists()
