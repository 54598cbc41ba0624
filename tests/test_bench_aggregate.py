"""scripts/bench_aggregate.py runs end to end on a tiny size and reports what it promises (no timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_aggregate.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_bench_aggregate_json_on_a_tiny_size():
    proc = run_bench("--n", "4", "--d", "1000", "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rule"] == "sybilwall+scc"
    assert isinstance(report["threads"], int) and report["threads"] >= 1
    assert len(report["results"]) == 1
    r = report["results"][0]
    assert (r["n"], r["d"]) == (4, 1000)
    for key in ("rule_s", "copy_s", "ratio"):
        assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
    assert r["ratio"] == r["rule_s"] / r["copy_s"]
    assert r["peak_extra_mb"] is None or r["peak_extra_mb"] >= 0


def test_bench_aggregate_other_rule_and_sizes_as_a_table():
    proc = run_bench("--rule", "median", "--sizes", "3x500,5x1k", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1] == " " and line.split()[0].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("3", "500"), ("5", "1k")]
    assert "rule median" in proc.stdout


def test_bench_aggregate_rejects_an_unknown_rule():
    proc = run_bench("--rule", "no-such-rule", "--n", "2", "--d", "10", "--json")
    assert proc.returncode != 0 and "no-such-rule" in proc.stderr
