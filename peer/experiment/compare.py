"""Real runs and simulations of one scenario, side by side (docs/experiments.md, "Real daemons
and the simulator").

Every run directory, real (`scripts/experiment.py`) or simulated (`scripts/simulate.py`, which
leaves a `sim.json` beside the summary), is summarised again here by `collect.summarize` with a
real run's time windows, so both kinds are measured by one ruler: a simulation's own
summary.json uses windows scaled to its length. Pure functions of the files; the command line is
scripts/compare_runs.py.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from peer.experiment import collect

CHECKPOINTS_S = (30, 60, 90, 120)  # seconds after the start: the honest mean on the way there


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_figures(root: Path) -> dict[str, Any]:
    """One run's figures: honest final accuracy mean/min, steps and rounds per honest peer, and
    the honest mean at `CHECKPOINTS_S`."""
    root = Path(root)
    peer_lines, events, scenario = collect.load_run(root)
    s = collect.summarize(peer_lines, events, scenario)
    honest = [p for p in s["peers"] if p["role"] == "honest" and p["at_end"]]
    timeline = dict(s["honest_mean_timeline"])
    at = {}
    for t in CHECKPOINTS_S:
        near = [v for k, v in timeline.items() if abs(k - t) <= collect.GRID_S / 2 and v is not None]
        at[t] = near[0] if near else None
    steps = [p["final_step"] for p in honest if p["final_step"] is not None]
    return {
        "dir": str(root),
        "kind": "simulation" if (root / "sim.json").exists() else "real",
        "seconds": s["seconds"],
        "honest_accuracy_mean": s["honest_accuracy_mean"],
        "honest_accuracy_min": s["honest_accuracy_min"],
        "honest_at_end": len(honest),
        "median_steps": _median(steps),
        "median_steps_per_s": round(_median(steps) / s["seconds"], 1) if steps and s["seconds"] else None,
        "median_rounds_ok": _median([p["rounds_ok"] for p in honest]),
        "honest_mean_at": at,
        "time_to_accuracy": s["time_to_accuracy"],
        "target_accuracy": s["target_accuracy"],
    }


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of each kind, and how far the simulations' median honest final
    accuracy is from the real runs' (points: percent of accuracy)."""
    out: dict[str, Any] = {}
    for kind in ("real", "simulation"):
        mine = [r for r in runs if r["kind"] == kind]
        accs = [r["honest_accuracy_mean"] for r in mine if r["honest_accuracy_mean"] is not None]
        out[kind] = {"runs": len(mine), "honest_accuracy_median": _median(accs),
                     "honest_accuracy_range": [min(accs), max(accs)] if accs else None,
                     "median_steps": _median([r["median_steps"] for r in mine if r["median_steps"] is not None]),
                     "median_rounds_ok": _median([r["median_rounds_ok"] for r in mine if r["median_rounds_ok"] is not None])}
    real, sim = out["real"]["honest_accuracy_median"], out["simulation"]["honest_accuracy_median"]
    out["sim_minus_real_points"] = round(100 * (sim - real), 1) if real is not None and sim is not None else None
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def markdown(runs: list[dict[str, Any]], cmp: dict[str, Any]) -> str:
    cols = " | ".join(f"at {t} s" for t in CHECKPOINTS_S)
    lines = [f"| run | kind | honest final accuracy mean (min) | {cols} | median steps per honest peer (per s) | median rounds ok |",
             "| --- " * (5 + len(CHECKPOINTS_S)) + "|"]
    for r in runs:
        at = " | ".join(_pct(r["honest_mean_at"][t]) for t in CHECKPOINTS_S)
        steps = "-" if r["median_steps"] is None else f"{r['median_steps']:.0f} ({r['median_steps_per_s']})"
        rounds = "-" if r["median_rounds_ok"] is None else f"{r['median_rounds_ok']:.0f}"
        lines.append(f"| `{Path(r['dir']).name}` | {r['kind']} | {_pct(r['honest_accuracy_mean'])} ({_pct(r['honest_accuracy_min'])}) "
                     f"| {at} | {steps} | {rounds} |")
    real, sim = cmp["real"], cmp["simulation"]
    gap = cmp["sim_minus_real_points"]
    lines.append("")
    lines.append(f"median honest final accuracy: real {_pct(real['honest_accuracy_median'])} over {real['runs']} run(s), "
                 f"simulated {_pct(sim['honest_accuracy_median'])} over {sim['runs']} run(s): "
                 + ("-" if gap is None else f"{gap:+.1f} points"))
    return "\n".join(lines) + "\n"
