"""The convergence benchmark's evaluation logs: one JSON line per evaluation, merged into a timeline.

Each benchmarked peer (a `peer join` process running `peer.bench.probe`, or a hivemind peer of
`scripts/bench_hivemind_peer.py`) appends `{"t", "samples", "accuracy", ...}` to its own file:
wall-clock time, samples this peer has trained on, test accuracy. `read_logs` reads the files
while they are still being written, `timeline` merges them into the swarm's view over time, and
`summarize` reads off when the swarm reached a threshold.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def entry(samples: int, accuracy: float, **extra) -> str:
    """One evaluation as a log line (newline included), stamped with the wall clock now."""
    return json.dumps({"t": time.time(), "samples": samples, "accuracy": accuracy, **extra}) + "\n"


def read_logs(paths: list[Path]) -> list[list[dict]]:
    """Each file's evaluations, in order; a missing file is a peer that has not evaluated yet."""
    logs = []
    for p in paths:
        text = p.read_text() if p.exists() else ""
        # a peer may be writing its last line right now: only whole lines count
        logs.append([json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines() if x.strip()])
    return logs


def timeline(logs: list[list[dict]], t0: float) -> list[dict]:
    """Merge per-peer evaluation logs into [{t, samples, min_accuracy, mean_accuracy}] after every event.

    At time t (seconds since t0) the swarm's accuracy is the *lowest* of the peers' latest
    evaluations (a peer that has not evaluated counts as 0) and its samples are the sum of what
    each peer had trained on at its latest evaluation."""
    events = sorted((e["t"] - t0, i, e) for i, log in enumerate(logs) for e in log)
    latest: dict[int, dict] = {}
    out = []
    for t, i, e in events:
        latest[i] = e
        accs = [latest[j]["accuracy"] if j in latest else 0.0 for j in range(len(logs))]
        out.append({"t": t, "samples": sum(x["samples"] for x in latest.values()),
                    "min_accuracy": min(accs), "mean_accuracy": sum(accs) / len(accs)})
    return out


def summarize(tl: list[dict], threshold: float, at: list[float]) -> dict:
    """Time and samples when the lowest peer first reaches `threshold`; accuracies at the times `at`."""
    hit = next((p for p in tl if p["min_accuracy"] >= threshold), None)
    mean_hit = next((p for p in tl if p["mean_accuracy"] >= threshold), None)
    acc_at = {}
    for t in at:
        before = [p for p in tl if p["t"] <= t]
        acc_at[f"{t:g}"] = before[-1]["min_accuracy"] if before else None
    return {
        "reached": hit is not None,
        "time_s": None if hit is None else round(hit["t"], 2),
        "samples": None if hit is None else hit["samples"],
        # the same for the peers' mean accuracy (a looser reading of "the swarm reached it")
        "mean_time_s": None if mean_hit is None else round(mean_hit["t"], 2),
        "mean_samples": None if mean_hit is None else mean_hit["samples"],
        "best_min_accuracy": max((p["min_accuracy"] for p in tl), default=None),
        "final_min_accuracy": tl[-1]["min_accuracy"] if tl else None,
        "final_t": round(tl[-1]["t"], 2) if tl else None,
        "accuracy_at": acc_at,
    }
