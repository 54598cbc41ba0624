"""Turn an experiment's data dirs into summary.json, summary.md and PNG plots.

Input is only files, so it works the same on a run of `scripts/experiment.py` and on data dirs
gathered from many machines (docs/experiments.md):

- every `metrics.jsonl` (and its rotated `metrics.jsonl.N`) under the directory: one per peer
  data dir, written by the daemon itself: a `join` line when a process starts (with its peer id
  and attack, if any), a `metrics` line every heartbeat, a `leave` line on a graceful exit;
- optionally `events.jsonl` at the top: what the runner (or a churn job) did and saw, one JSON
  object per line with `time`, `action` (`run_start`, `start`, `kill`, `leave`, `crash`, `stop`,
  `attack_start`, `run_end`) and `peer` (the data dir's name);
- optionally `scenario.toml` at the top: the scenario the run used.

`summarize` is pure (records in, dict out) so the numbers are unit-tested without processes.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRID_S = 2.0           # resolution of the swarm-mean timeline
STALE_S = 6.0          # a peer with no metrics line for this long is not counted as up
FINAL_WINDOW_S = 20.0  # final accuracy: mean of a peer's readings over its last 20 s (single readings swing by points)
LATE_JOIN_S = 30.0     # a first start later than this after the run start counts as a join to catch up


@dataclass
class Session:
    """One process lifetime of a peer: from its `join` line to its `leave` line (or silence)."""
    start: float
    peer_id: str | None = None
    attack: str | None = None
    lines: list[dict] = field(default_factory=list)  # metrics lines, time-ordered
    left: dict | None = None                         # the `leave` line, if it left gracefully

    @property
    def end(self) -> float:
        return (self.left or (self.lines[-1] if self.lines else {"time": self.start}))["time"]


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines of a file; a torn last line (a killed writer) is skipped, not fatal."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("time"), (int, float)):
                out.append(obj)
    return out


def read_peer_dir(d: Path) -> list[dict]:
    files = sorted(d.glob("metrics.jsonl.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    lines: list[dict] = []
    for f in [*files, d / "metrics.jsonl"]:
        if f.exists():
            lines += read_jsonl(f)
    return sorted(lines, key=lambda r: r["time"])


def load_run(root: Path) -> tuple[dict[str, list[dict]], list[dict], dict | None]:
    """(metrics lines per peer dir name, runner events, scenario dict or None) under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    peers: dict[str, list[dict]] = {}
    for m in sorted(root.rglob("metrics.jsonl")):
        name = str(m.parent.relative_to(root)).replace("peers/", "", 1) if m.parent != root else root.name
        peers[name] = read_peer_dir(m.parent)
    if not peers:
        raise FileNotFoundError(f"{root}: no metrics.jsonl under it (is this a run or data dir?)")
    events = read_jsonl(root / "events.jsonl") if (root / "events.jsonl").exists() else []
    # the scenario as run (with --duration/--seed applied) is in the runner's run_start event
    scenario = next((e.get("scenario") for e in events if e.get("action") == "run_start" and e.get("scenario")), None)
    if scenario is None and (root / "scenario.toml").exists():
        with open(root / "scenario.toml", "rb") as f:
            scenario = tomllib.load(f)
    return peers, events, scenario


def sessions_of(lines: list[dict]) -> list[Session]:
    out: list[Session] = []
    for r in lines:
        ev = r.get("event", "metrics")
        if ev == "join" or not out:
            out.append(Session(start=r["time"], peer_id=r.get("peer_id"), attack=r.get("attack")))
            if ev == "join":
                continue
        s = out[-1]
        if ev == "leave":
            s.left = r
        if ev in ("metrics", "leave"):
            s.lines.append(r)
    return out


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 1) if xs else None


def summarize(peer_lines: dict[str, list[dict]], events: list[dict], scenario: dict | None = None, *,
              grid_s: float = GRID_S, stale_s: float = STALE_S, final_window_s: float = FINAL_WINDOW_S) -> dict[str, Any]:
    """The numbers of one run. See docs/experiments.md for each field's exact meaning. The time
    constants default to a real run's (readings every few seconds); the simulator passes ones
    scaled to its runs, which may last seconds of virtual time."""
    scenario = scenario or {}
    target = float(scenario.get("target_accuracy", 0.85))
    tol = float(scenario.get("catchup_tolerance", 0.02))
    sessions = {name: sessions_of(lines) for name, lines in peer_lines.items()}
    starts = [s.start for ss in sessions.values() for s in ss]
    run_start = next((e["time"] for e in events if e.get("action") == "run_start"), min(starts) if starts else 0.0)
    ends = [s.end for ss in sessions.values() for s in ss]
    run_end = next((e["time"] for e in events if e.get("action") == "run_end"), max(ends) if ends else run_start)
    stop_at = next((e["time"] for e in events if e.get("action") == "stop"), None)
    by_peer: dict[str, list[dict]] = {}
    for e in events:
        if e.get("peer") is not None:
            by_peer.setdefault(str(e["peer"]), []).append(e)

    def role(name: str) -> str:
        if any(s.attack for s in sessions[name]):
            return "attacker"
        return "attacker" if any(e.get("role") == "attacker" for e in by_peer.get(name, [])) else "honest"

    roles = {name: role(name) for name in sessions}

    # --- the swarm's honest mean accuracy over time (grid), from each up peer's latest reading
    def reading(name: str, t: float) -> float | None:
        for s in sessions[name]:
            if s.start <= t <= s.end + 0.5:
                prior = [r for r in s.lines if r["time"] <= t and r.get("accuracy") is not None]
                if prior and t - prior[-1]["time"] <= stale_s:
                    return prior[-1]["accuracy"]
        return None

    def honest_mean(t: float, exclude: str | None = None) -> float | None:
        vals = [a for n in sessions if roles[n] == "honest" and n != exclude for a in [reading(n, t)] if a is not None]
        return sum(vals) / len(vals) if vals else None

    timeline = []
    t = run_start
    while t <= run_end + 1e-9:
        m = honest_mean(t)
        timeline.append((round(t - run_start, 1), None if m is None else round(m, 4)))
        t += grid_s
    tta = next((t for t, m in timeline if m is not None and m >= target), None)

    # --- per peer
    peers = []
    catchups = []
    for name in sorted(sessions, key=_natural):
        ss = sessions[name]
        pe = by_peer.get(name, [])
        kills = sum(e.get("action") == "kill" for e in pe)
        leaves = sum(1 for s in ss if s.left is not None and (stop_at is None or s.left["time"] < stop_at))
        crashed = any(e.get("action") == "crash" for e in pe)
        for i, s in enumerate(ss):
            nxt = ss[i + 1].start if i + 1 < len(ss) else float("inf")
            if s.left is not None:
                crashed |= s.left.get("exit_code", 0) not in (0, None)
            elif not any(e.get("action") == "kill" and s.start - 1 <= e["time"] <= nxt for e in pe):
                crashed = True  # ended without a goodbye and nobody killed it
        last = ss[-1].lines if ss else []
        accs = [r["accuracy"] for r in last if r.get("accuracy") is not None and r["time"] >= (last[-1]["time"] - final_window_s if last else 0)]
        final = round(sum(accs) / len(accs), 4) if accs else None
        bytes_sent = sum(s.lines[-1].get("bytes_sent", 0) for s in ss if s.lines)
        # still in the swarm when the run ended (a data dir left behind by a fresh rejoin is not)
        at_end = bool(ss) and ss[-1].end >= (stop_at if stop_at is not None else run_end) - 2 * stale_s
        peers.append({
            "id": name, "peer_ids": sorted({s.peer_id for s in ss if s.peer_id}), "role": roles[name],
            "attack": next((s.attack for s in ss if s.attack), None),
            "final_accuracy": final, "final_step": last[-1].get("step") if last else None,
            "crashed": crashed, "at_end": at_end, "joins": len(ss), "leaves": leaves, "kills": kills,
            "bytes_sent": bytes_sent, "rounds_ok": sum(s.lines[-1].get("rounds_ok", 0) for s in ss if s.lines),
            "rejected": _sum_dicts(s.lines[-1].get("rejected") or {} for s in ss if s.lines),
        })
        if roles[name] != "honest":
            continue
        for i, s in enumerate(ss):
            if i == 0 and s.start - run_start < LATE_JOIN_S:
                continue  # the initial start: nothing to catch up with
            started = _launch_time(pe, s.start)
            swarm = honest_mean(started, exclude=name)
            if swarm is None:
                continue
            hit = next((r["time"] for r in s.lines if r.get("accuracy") is not None and r["accuracy"] >= swarm - tol), None)
            # stricter extra view: only accuracies this process measured itself. A returner's first
            # heartbeat reports the accuracy stored in its checkpoint (of the very weights it resumes
            # with); readings before its first local step are skipped here.
            first_step = next((r.get("step") for r in s.lines if r.get("event", "metrics") == "metrics"), None)
            hit_own = next((r["time"] for r in s.lines if r.get("accuracy") is not None and r.get("step") != first_step
                            and r["accuracy"] >= swarm - tol), None)
            catchups.append({"peer": name, "at": round(started - run_start, 1), "swarm_accuracy": round(swarm, 4),
                             "seconds": None if hit is None else round(hit - started, 1),
                             # of which process start-up: launch -> the daemon's first heartbeat (its join line)
                             "startup_s": round(s.start - started, 1),
                             "after_startup_s": None if hit is None else round(hit - s.start, 1),
                             "own_eval_s": None if hit_own is None else round(hit_own - started, 1)})

    honest = [p for p in peers if p["role"] == "honest"]
    finals = [p["final_accuracy"] for p in honest if p["final_accuracy"] is not None and p["at_end"]]
    by_speed = _by_speed(scenario, honest)
    secs = [c["seconds"] for c in catchups]
    done = [x for x in secs if x is not None]
    return {
        "scenario": scenario,
        "seconds": round(run_end - run_start, 1),
        "peers": peers,
        "honest_accuracy_mean": round(sum(finals) / len(finals), 4) if finals else None,
        "honest_accuracy_min": min(finals) if finals else None,
        "honest_crashed": sum(p["crashed"] for p in honest),
        "target_accuracy": target,
        "time_to_accuracy": tta,
        "join_catchup_seconds": secs,
        "join_catchup_median": _median(done),
        "join_catchup_worst": (None if None in secs else max(done)) if secs else None,
        "join_startup_median": _median([c["startup_s"] for c in catchups]),
        "join_catchup_after_startup_median": _median([c["after_startup_s"] for c in catchups if c["after_startup_s"] is not None]),
        "join_catchup_after_startup_worst": (None if None in secs else max(c["after_startup_s"] for c in catchups)) if secs else None,
        "join_catchup_own_eval_median": _median([c["own_eval_s"] for c in catchups if c["own_eval_s"] is not None]),
        "join_catchup_own_eval_worst": (None if any(c["own_eval_s"] is None for c in catchups) else max(c["own_eval_s"] for c in catchups)) if catchups else None,
        "joins_detail": catchups,
        "by_step_delay": by_speed,
        "churn_events": [{"t": round(e["time"] - run_start, 1), "action": e["action"], "peer": e.get("peer")}
                         for e in events if e.get("action") in ("kill", "leave", "start", "crash", "attack_start")
                         and not (e["action"] == "start" and e["time"] < run_start)],  # the initial starts are not churn
        "honest_mean_timeline": timeline,
        "runner": next((e for e in events if e.get("action") == "run_start"), {}),
        "load_at_stop": next((e.get("load") for e in events if e.get("action") == "stop"), None),
    }


def _by_speed(scenario: dict, honest: list[dict]) -> dict[str, dict] | None:
    """Honest peers grouped by their training throttle (the scenario's step_delay_s per slot
    `pK`): mean final accuracy and steps per group, for heterogeneous runs."""
    groups = scenario.get("heterogeneity") or []
    if not groups:
        return None
    delay = {}
    for g in groups:  # the last group naming a slot wins, as in the runner
        for k in g.get("peers", []):
            delay[k] = float(g.get("step_delay_s", 0.0))
    out: dict[str, dict] = {}
    for p in honest:
        head = p["id"].split(".")[0]
        if not (head.startswith("p") and head[1:].isdigit()):
            continue
        d = delay.get(int(head[1:]), float(scenario.get("step_delay_s", 0.0)))
        g = out.setdefault(f"{d:g}", {"peers": [], "accuracies": [], "steps": []})
        g["peers"].append(p["id"])
        if p["final_accuracy"] is not None:
            g["accuracies"].append(p["final_accuracy"])
        if p["final_step"] is not None:
            g["steps"].append(p["final_step"])
    for g in out.values():
        acc, steps = g.pop("accuracies"), g.pop("steps")
        g["final_accuracy_mean"] = round(sum(acc) / len(acc), 4) if acc else None
        g["final_step_mean"] = round(sum(steps) / len(steps)) if steps else None
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def _launch_time(peer_events: list[dict], session_start: float) -> float:
    """When the runner launched the process of this session (its `start` event just before the
    daemon's `join` line), else the join line itself (gathered data without runner events)."""
    before = [e["time"] for e in peer_events if e.get("action") == "start" and session_start - 60 <= e["time"] <= session_start]
    return max(before) if before else session_start


def _sum_dicts(ds) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _natural(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --- outputs ---------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(summary: dict[str, Any]) -> str:
    sc = summary["scenario"] or {}
    lines = [f"# experiment: {sc.get('name', '?')}", ""]
    lines.append(f"- ran {summary['seconds']:.0f} s; honest final accuracy mean {_pct(summary['honest_accuracy_mean'])} "
                 f"(min {_pct(summary['honest_accuracy_min'])}); honest peers crashed: {summary['honest_crashed']}")
    tta = summary["time_to_accuracy"]
    lines.append(f"- time to {_pct(summary['target_accuracy'])} honest mean: {'never' if tta is None else f'{tta:.0f} s'}")
    secs = summary["join_catchup_seconds"]
    if secs:
        lines.append(f"- joins to catch up: {len(secs)}; catch-up median {summary['join_catchup_median']} s, "
                     f"worst {summary['join_catchup_worst'] if summary['join_catchup_worst'] is not None else 'never caught up'} s "
                     f"from launch; process start-up median {summary['join_startup_median']} s; after start-up median "
                     f"{summary['join_catchup_after_startup_median']} s, worst {summary['join_catchup_after_startup_worst']} s; "
                     f"counting only its own evaluations: median {summary.get('join_catchup_own_eval_median')} s, "
                     f"worst {summary.get('join_catchup_own_eval_worst')} s")
    r = summary.get("runner") or {}
    if r.get("load"):
        lines.append(f"- machine load (1/5/15 min) at start {r['load']}, at the end {summary.get('load_at_stop')}; "
                     f"{r.get('cpus', '?')} CPUs; network conditions: {r.get('network')}")
    lines += ["", "| peer | role | final accuracy | final step | joins | leaves | kills | crashed | MB sent | rejected |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in summary["peers"]:
        role = p["role"] + (f" ({p['attack']})" if p["attack"] else "")
        rej = ", ".join(f"{k} {v}" for k, v in sorted(p["rejected"].items())) or "-"
        lines.append(f"| {p['id']} | {role} | {_pct(p['final_accuracy'])} | {p['final_step']} | {p['joins']} | {p['leaves']} | "
                     f"{p['kills']} | {'YES' if p['crashed'] else 'no'} | {p['bytes_sent'] / 1e6:.1f} | {rej} |")
    if summary.get("by_step_delay"):
        lines += ["", "| step delay (s) | peers | final accuracy mean | final step mean |", "| --- | --- | --- | --- |"]
        for d, g in summary["by_step_delay"].items():
            lines.append(f"| {d} | {', '.join(g['peers'])} | {_pct(g['final_accuracy_mean'])} | {g['final_step_mean']} |")
    if summary["joins_detail"]:
        lines += ["", "| join of | launched at (s) | swarm accuracy then | caught up after (s) | of which start-up (s) | own evaluations only (s) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in summary["joins_detail"]:
            own = c.get("own_eval_s")
            lines.append(f"| {c['peer']} | {c['at']} | {_pct(c['swarm_accuracy'])} | {'never' if c['seconds'] is None else c['seconds']} "
                         f"| {c['startup_s']} | {'never' if own is None else own} |")
    return "\n".join(lines) + "\n"


def plot(peer_lines: dict[str, list[dict]], summary: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png (per peer, churn and attack events marked) and bytes.png (cumulative MB sent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = summary["runner"].get("time") or min((r["time"] for ls in peer_lines.values() for r in ls), default=0.0)
    roles = {p["id"]: p["role"] for p in summary["peers"]}
    fig, ax = plt.subplots(figsize=(10, 5))
    for idx, name in enumerate(sorted(peer_lines, key=_natural)):
        for k, s in enumerate(sessions_of(peer_lines[name])):
            pts = [(r["time"] - t0, 100 * r["accuracy"]) for r in s.lines if r.get("accuracy") is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, lw=0.8, ls="--" if roles.get(name) == "attacker" else "-",
                        color=f"C{idx % 10}",
                        label=name if k == 0 else None)
    tl = [(t, 100 * m) for t, m in summary["honest_mean_timeline"] if m is not None]
    if tl:
        ax.plot(*zip(*tl), color="black", lw=2.2, label="honest mean")
    marks = {"kill": ("red", ":"), "leave": ("orange", ":"), "start": ("green", ":"), "crash": ("black", "-"), "attack_start": ("purple", "-.")}
    seen = set()
    for e in summary["churn_events"]:
        color, ls = marks[e["action"]]
        label = {"start": "join"}.get(e["action"], e["action"])
        ax.axvline(e["t"], color=color, ls=ls, lw=1, label=None if label in seen else label)
        seen.add(label)
    ax.axhline(100 * summary["target_accuracy"], color="grey", lw=0.6)
    ax.set(xlabel="seconds since start", ylabel="test accuracy (%)", ylim=(0, 100),
           title=f"{(summary['scenario'] or {}).get('name', '')}: accuracy per peer (dashed: attackers)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    paths = [out / "accuracy.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    for name in sorted(peer_lines, key=_natural):
        base, xs, ys = 0, [], []
        for s in sessions_of(peer_lines[name]):
            for r in s.lines:
                xs.append(r["time"] - t0)
                ys.append((base + r.get("bytes_sent", 0)) / 1e6)
            base += s.lines[-1].get("bytes_sent", 0) if s.lines else 0
        if xs:
            ax.plot(xs, ys, lw=0.9, ls="--" if roles.get(name) == "attacker" else "-", label=name)
    ax.set(xlabel="seconds since start", ylabel="MB sent (cumulative)", title="bytes sent per peer")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "bytes.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def collect(root: Path, plots: bool = True) -> dict[str, Any]:
    """Read `root`, write summary.json, summary.md and (if matplotlib is there) the plots."""
    root = Path(root)
    peer_lines, events, scenario = load_run(root)
    summary = summarize(peer_lines, events, scenario)
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (root / "summary.md").write_text(markdown(summary))
    if plots:
        plot(peer_lines, summary, root)
    return summary
