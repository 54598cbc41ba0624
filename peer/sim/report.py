"""A simulation's files, in the layout of a real run so `scripts/experiment.py --collect` reads them.

DIR/peers/<name>/metrics.jsonl (one per peer data dir, the daemon's lines), DIR/events.jsonl (the
runner's), DIR/summary.json and summary.md (`peer.experiment.collect.summarize` with time
constants scaled to the run), DIR/accuracy.png and bytes.png, and DIR/sim.json: the simulator's
own figures (wall time, memory, view sizes, partner sampling, where the wall time went).
Times are virtual seconds from the run's start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peer.experiment import collect

PLOTTED_PEERS = 40  # a plot of more lines shows nothing; the summary counts every peer


def windows(duration_s: float, sample_s: float) -> dict[str, float]:
    """collect's time constants for a run of `duration_s` with a reading every `sample_s`: the
    real ones, or shorter where the run is short (a 10 s virtual run has no 20 s final window)."""
    return {"grid_s": min(collect.GRID_S, max(sample_s, duration_s / 100)),
            "stale_s": min(collect.STALE_S, 3 * sample_s),
            "final_window_s": min(collect.FINAL_WINDOW_S, max(duration_s / 10, 2 * sample_s))}


def summarize(sim, result: dict[str, Any]) -> dict[str, Any]:
    """collect's summary of the simulation, from memory (no files needed)."""
    return collect.summarize(sim.peer_lines(), sim.events, sim.sc.to_dict(), **windows(sim.sc.duration_s, sim.sample_s))


def write(out: Path, sim, result: dict[str, Any], summary: dict[str, Any], scenario_text: str, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenario.toml").write_text(scenario_text)
    for name, lines in sim.peer_lines().items():
        d = out / "peers" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in sim.events))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(collect.markdown(summary))
    (out / "sim.json").write_text(json.dumps(result, indent=1) + "\n")
    if plots:
        lines = sim.peer_lines()
        shown = dict(sorted(lines.items(), key=lambda kv: collect._natural(kv[0]))[:PLOTTED_PEERS])
        collect.plot(shown, summary, out)
