"""peer/experiment/compare.py and scripts/compare_runs.py: real runs and simulations measured alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peer.experiment.compare import compare, markdown, run_figures

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path, accs: dict[str, list[float]], sim: bool = False) -> Path:
    """A run dir: one reading a second per peer from t = 1, a graceful leave at the end."""
    root.mkdir(parents=True)
    end = max(len(a) for a in accs.values())
    for name, series in accs.items():
        d = root / "peers" / name
        d.mkdir(parents=True)
        lines = [{"time": 0, "event": "join", "peer_id": "Qm" + name, "attack": None}]
        lines += [{"time": t, "event": "metrics", "accuracy": a, "step": 10 * t, "rounds_ok": t}
                  for t, a in enumerate(series, start=1)]
        lines.append({**lines[-1], "event": "leave", "exit_code": 0})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    events = [{"time": 0, "action": "run_start", "scenario": {"name": "t", "target_accuracy": 0.85}},
              {"time": end, "action": "stop"}, {"time": end, "action": "run_end"}]
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if sim:
        (root / "sim.json").write_text("{}")
    return root


def test_both_kinds_are_measured_with_a_real_runs_window_and_compared(tmp_path):
    # 100 s; a real run's 20 s window over the simulated peers' readings (t = 80..100 and the leave
    # line's repeat) holds 5 at 0.8 and 17 at 0.9: 0.877, where a simulation's own 15 s window gives 0.9
    sim_acc = [0.5] * 30 + [0.8] * 54 + [0.9] * 16
    real1 = write_run(tmp_path / "real-1", {"p0": [0.9] * 100, "p1": [0.8] * 100})
    real2 = write_run(tmp_path / "real-2", {"p0": [0.86] * 100, "p1": [0.86] * 100})
    sim = write_run(tmp_path / "sim-1", {"p0": sim_acc, "p1": sim_acc}, sim=True)
    runs = [run_figures(d) for d in (real1, real2, sim)]
    assert [r["kind"] for r in runs] == ["real", "real", "simulation"]
    assert runs[0]["honest_accuracy_mean"] == pytest.approx(0.85) and runs[0]["honest_accuracy_min"] == pytest.approx(0.8)
    assert runs[2]["honest_accuracy_mean"] == pytest.approx((5 * 0.8 + 17 * 0.9) / 22, abs=1e-4)
    assert runs[2]["honest_mean_at"][30] == pytest.approx(0.5) and runs[2]["honest_mean_at"][60] == pytest.approx(0.8)
    assert runs[0]["median_steps"] == 1000 and runs[0]["median_steps_per_s"] == 10.0 and runs[0]["median_rounds_ok"] == 100
    c = compare(runs)
    assert c["real"]["runs"] == 2 and c["real"]["honest_accuracy_median"] == pytest.approx(0.855)
    assert c["real"]["honest_accuracy_range"] == [pytest.approx(0.85), pytest.approx(0.86)]
    assert c["sim_minus_real_points"] == pytest.approx(round(100 * ((5 * 0.8 + 17 * 0.9) / 22 - 0.855), 1))
    text = markdown(runs, c)
    assert text.count("| `real-") == 2 and "| `sim-1` | simulation | 87.7 %" in text
    assert "real 85.5 % over 2 run(s)" in text


def test_a_missing_kind_gives_no_gap(tmp_path):
    runs = [run_figures(write_run(tmp_path / "r", {"p0": [0.9] * 30}))]
    c = compare(runs)
    assert c["simulation"]["runs"] == 0 and c["sim_minus_real_points"] is None
    assert markdown(runs, c).rstrip().endswith(": -")


def test_the_command_names_a_bad_directory_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "nope: not a directory" in p.stderr and "Traceback" not in p.stderr
