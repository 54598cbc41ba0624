#!/usr/bin/env python3
"""Benchmarks, each side by side with its anchor in one run: transfer, aggregate, convergence, overhead.

    .venv/bin/python scripts/bench.py transfer      # our gossip pull vs a bare p2pd stream, 1/40/400 MB
    .venv/bin/python scripts/bench.py aggregate     # default rule vs a memory copy, n 8/16/32 x d 1M/10M
    .venv/bin/python scripts/bench.py convergence   # 4 peers vs central vs hivemind.Optimizer to 88 %
    .venv/bin/python scripts/bench.py overhead      # samples/s with gossip on vs off
    .venv/bin/python scripts/bench.py comms         # LM task: ours vs per-step gossip vs sync DiLoCo vs central
    .venv/bin/python scripts/bench.py all --json    # everything, one JSON object
    .venv/bin/python scripts/bench.py all --tiny    # small sizes, to check the plumbing (~1 min)

Each benchmark runs in a fresh child process of this script (so one's memory and threads do not
disturb the next) and prints a table, or with `--json` one JSON object whose figures include the
ratio the issue names: transfer_ratio, aggregate_ratio, samples_ratio_vs_central,
time_ratio_vs_hivemind, overhead_ratio. Run it under `flock /tmp/peer-heavy.lock` on a shared box.
The helpers live beside it (Python puts a script's own folder first on sys.path, so they import
from any working directory): bench_transfer.py, bench_aggregate.py, bench_convergence.py (with
bench_hivemind_peer.py, and `peer.bench` for the instrumented task and its evaluation logs),
bench_overhead.py, bench_comms.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCHES = ("transfer", "aggregate", "convergence", "overhead", "comms")

# Goals from the issue: (figure, comparison, bound)
GOALS = {
    "transfer_ratio": (">=", 0.8),  # at 40 MB and above
    "peak_extra_over_model": ("<", 2.0),
    "aggregate_ratio": ("<=", 3.0),
    "samples_ratio_vs_central": ("<=", 2.0),
    "time_ratio_vs_hivemind": ("<", 1.0),
    "overhead_ratio": (">=", 0.9),
    "bytes_reduction": (">=", 400.0),
    "loss_gap_vs_central": ("<=", 0.02),
    "utilisation_capped": (">=", 0.95),
}


# --- the benchmarks (each returns a JSON-able dict) ------------------------------------------

def bench_transfer(args) -> dict:
    import bench_transfer

    sizes = [0.1, 1.0] if args.tiny else args.sizes_mb
    out = bench_transfer.run(sizes, repeats=1 if args.tiny else args.repeats)
    big = [r for r in out["results"] if r["size_mb"] >= 40]
    # the figure the goal names: the worst ratio at 40 MB and above (all sizes in a tiny run)
    out["transfer_ratio"] = min(r["transfer_ratio"] for r in (big or out["results"]))
    out["transfer_ratio_idle"] = min(r["transfer_ratio_idle"] for r in (big or out["results"]))
    out["peak_extra_over_model"] = max(r["peak_extra_over_model"] for r in (big or out["results"]))
    return out


def bench_aggregate(args) -> dict:
    import torch

    import bench_aggregate
    from peer.aggregation import DEFAULT_AGGREGATOR

    torch.set_num_threads(1)  # as the daemon
    sizes = [(4, 1000)] if args.tiny else [(n, d) for d in (1_000_000, 10_000_000) for n in (8, 16, 32)]
    results = []
    for n, d in sizes:
        # a 1M-coordinate call takes ~10 ms, so one preemption on a loaded box moves its median:
        # take 5x the repeats there (still well under a second), the median of those
        repeats = 1 if args.tiny else args.repeats * (5 if d <= 1_000_000 else 1)
        r = bench_aggregate.bench_size(DEFAULT_AGGREGATOR, n, d, repeats=repeats, warmup=1)
        results.append(r)
    return {"rule": DEFAULT_AGGREGATOR, "threads": torch.get_num_threads(), "results": results,
            "aggregate_ratio": max(r["ratio"] for r in results)}


def bench_convergence(args) -> dict:
    import bench_convergence

    if args.tiny:
        return bench_convergence.run(peers=2, threshold=0.5, min_s=0.0, max_s=20.0, hivemind_configs=["sync-400"],
                                     hivemind_max_s=6.0, tiny=True)
    return bench_convergence.run(peers=4, threshold=0.88, min_s=args.min_seconds, max_s=args.max_seconds,
                                 hivemind_configs=args.hivemind, hivemind_max_s=args.hivemind_max_seconds,
                                 ours_settings=dict(args.ours_setting or []))


def bench_overhead(args) -> dict:
    import bench_overhead

    if args.tiny:
        return bench_overhead.run(task="digits-mlp", partners=1, repeats=1, settle_s=0.5, window_s=2.0)
    return bench_overhead.run(repeats=args.repeats)


def bench_comms(args) -> dict:
    import bench_comms

    if args.tiny:
        return bench_comms.run(task="lm-tiny", peers=2, steps=40, capped=False, out=None, ours_args=("--outer-every-steps", "10"))
    args.comms_plot.parent.mkdir(parents=True, exist_ok=True)
    return bench_comms.run(task=args.comms_task, peers=args.comms_peers, steps=args.comms_steps,
                           cap_mbit=args.cap_mbit, out=args.comms_plot)


# --- presentation -----------------------------------------------------------------------------

def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def table(name: str, r: dict) -> str:
    lines = []
    if "error" in r:
        return f"{name}: FAILED: {r['error']}"
    if name == "transfer":
        lines.append(f"{'size':>8} {'ours MB/s':>10} {'bare MB/s':>10} {'ratio':>6} {'idle MB/s':>10} {'ratio':>6}   "
                     f"peak RSS above idle, MB (ours: puller py/p2pd, server py/p2pd | bare: puller py, server py)")
        for x in r["results"]:
            lines.append(f"{x['size_mb']:>6g}MB {x['ours_mb_s']:>10.0f} {x['bare_mb_s']:>10.0f} {x['transfer_ratio']:>6.2f} "
                         f"{x['ours_idle_mb_s']:>10.0f} {x['transfer_ratio_idle']:>6.2f}   "
                         f"{_f(x['ours_peak_extra_mb_client_python'], '.0f')}/{_f(x['ours_peak_extra_mb_client_p2pd'], '.0f')}, "
                         f"{_f(x['ours_peak_extra_mb_server_python'], '.0f')}/{_f(x['ours_peak_extra_mb_server_p2pd'], '.0f')} | "
                         f"{_f(x['bare_peak_extra_mb_client_python'], '.0f')}, {_f(x['bare_peak_extra_mb_server_python'], '.0f')}")
        lines.append("ours: the served model changed since the last pull (a fresh snapshot); "
                     "idle: unchanged (served from the snapshot already taken)")
        lines.append(f"transfer_ratio (worst at >= 40 MB) {r['transfer_ratio']:.2f}, idle server {r['transfer_ratio_idle']:.2f}; "
                     f"peak extra / model size (worst Python side) {r['peak_extra_over_model']:.2f}")
    elif name == "aggregate":
        lines.append(f"rule {r['rule']}, {r['threads']} thread(s)")
        lines.append(f"{'n':>4} {'d':>10} {'rule s':>9} {'copy s':>9} {'ratio':>6} {'peak extra MB':>14}")
        for x in r["results"]:
            lines.append(f"{x['n']:>4} {x['d']:>10} {x['rule_s']:>9.4f} {x['copy_s']:>9.4f} {x['ratio']:>6.2f} "
                         f"{_f(x['peak_extra_mb'], '.0f'):>14}")
        lines.append(f"aggregate_ratio (worst) {r['aggregate_ratio']:.2f}")
    elif name == "convergence":
        at = sorted({k for c in [r["ours"], r["central"], *r["hivemind_configs"].values()] for k in c.get("accuracy_at", {})}, key=float)
        lines.append(f"{r['peers']} peers, {r['task']}, threshold {r['threshold']:.0%} for the lowest peer; "
                     f"total batch {r['total_batch']}")
        head = f"{'system':<22} {'reached':>7} {'time s':>7} {'samples':>8} {'best':>6}" + "".join(f" {'acc@' + a + 's':>9}" for a in at)
        lines.append(head)
        rows = [("ours", r["ours"]), ("central", r["central"])] + [(f"hivemind {n}", c) for n, c in r["hivemind_configs"].items()]
        for label, c in rows:
            if "error" in c:
                lines.append(f"{label:<22} error: {c['error'][-120:]}")
                continue
            lines.append(f"{label:<22} {'yes' if c['reached'] else 'no':>7} {_f(c['time_s'], '.1f'):>7} {_f(c['samples'], 'd'):>8} "
                         f"{_f(c['best_min_accuracy'], '.3f'):>6}" + "".join(f" {_f(c['accuracy_at'].get(a), '.3f'):>9}" for a in at))
        lines.append("peers' mean accuracy first >= threshold: " + "; ".join(
            f"{label} {_f(c.get('mean_time_s'), '.1f')} s / {_f(c.get('mean_samples'), 'd')} samples"
            for label, c in rows if "error" not in c))
        lines.append(f"samples_ratio_vs_central {_f(r['samples_ratio_vs_central'])}; time_ratio_vs_hivemind "
                     f"{_f(r['time_ratio_vs_hivemind'])} (best hivemind: {r['hivemind_best']}, reached: {r['hivemind_reached']})")
    elif name == "overhead":
        lines.append(f"{r['task']}, {r['partners']} partners, {r['repeats']} x {r['window_s']:g} s windows each")
        lines.append(f"gossip on  {r['on_samples_per_s']:>9.0f} samples/s   (per window: "
                     + ", ".join(f"{x['samples_per_s']:.0f}" for x in r["on"]) + ")")
        lines.append(f"gossip off {r['off_samples_per_s']:>9.0f} samples/s   (per window: "
                     + ", ".join(f"{x['samples_per_s']:.0f}" for x in r["off"]) + ")")
        lines.append(f"overhead_ratio {_f(r['overhead_ratio'])}")
    elif name == "comms":
        lines.append(f"{r['peers']} peers, {r['task']}, {r['steps']} inner steps each; capped run at {r['cap_mbit']:g} Mbit/s")
        lines.append(f"{'system':<28} {'final held-out loss':>20} {'bytes sent/peer/step':>21} {'utilisation (worst)':>20}")
        for k, res in r["results"].items():
            lines.append(f"{k:<28} {res['final_loss']:>20.4f} {res['bytes_sent_per_step']:>21.0f} "
                         f"{_f(res.get('utilisation_worst'), '.3f'):>20}")
        lines.append(f"bytes_reduction {_f(r['bytes_reduction'], '.1f')}; loss_gap_vs_central {_f(r['loss_gap_vs_central'], '.4f')}; "
                     f"utilisation_capped {_f(r['utilisation_capped'], '.3f')}" + (f" (skipped: {r['capped_skipped']})" if r.get("capped_skipped") else ""))
        if r.get("plot"):
            lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = round(int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "load_avg_at_start": os.getloadavg()}


def run_child(name: str, argv: list[str], timeout: float) -> dict:
    """One benchmark in a fresh process of this script; its JSON, or {'error': ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), name, "--json", *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:500]}
    return json.loads(proc.stdout)


def _setting(text: str) -> tuple[str, object]:
    """NAME=VALUE of a config-file setting; VALUE as TOML would read it (number, bool, string)."""
    import tomllib

    from peer.config import PeerConfig

    name, sep, value = text.partition("=")
    if not sep or name.replace("-", "_") not in PeerConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=VALUE with a `peer join` setting name")
    try:
        return name, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("bench", choices=[*BENCHES, "all"])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--tiny", action="store_true", help="small sizes and short runs: checks the plumbing, not the speed")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per size / windows per mode (median reported)")
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 40, 400], help="transfer model sizes in MB")
    ap.add_argument("--hivemind", nargs="*", default=None, metavar="CONFIG",
                    help="hivemind.Optimizer configurations to run (default: all of bench_convergence.HIVEMIND_CONFIGS)")
    ap.add_argument("--min-seconds", type=float, default=60.0, help="convergence: run ours at least this long")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="convergence: stop ours (and central) after this long")
    ap.add_argument("--ours-setting", action="append", metavar="NAME=VALUE", type=_setting,
                    help="convergence: a `peer join` setting for our peers, e.g. --ours-setting gossip-every-s=0.25 "
                         "(repeatable; default: none, i.e. the default configuration)")
    ap.add_argument("--hivemind-max-seconds", type=float, default=180.0, help="convergence: cap per hivemind configuration")
    ap.add_argument("--comms-task", default="lm-tiny", help="comms: the task (an LM task)")
    ap.add_argument("--comms-peers", type=int, default=4, help="comms: real peers per swarm")
    ap.add_argument("--comms-steps", type=int, default=600, help="comms: inner steps each peer trains")
    ap.add_argument("--cap-mbit", type=float, default=20.0, help="comms: the capped run's link rate, both ways")
    ap.add_argument("--comms-plot", type=Path, default=Path("runs/bench/comms.png"), help="comms: loss vs time and bytes")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.hivemind is not None:
        import bench_convergence

        unknown = [h for h in args.hivemind if h not in bench_convergence.HIVEMIND_CONFIGS]
        if unknown:
            ap.error(f"unknown hivemind configuration {unknown[0]!r}: one of {', '.join(bench_convergence.HIVEMIND_CONFIGS)}")

    if args.bench != "all":
        started = time.monotonic()
        result = globals()[f"bench_{args.bench}"](args)
        result["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result) if args.json else table(args.bench, result))
        return 0

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("all", "--json")]
    report: dict = {"machine": machine()}
    for name in BENCHES:
        if not args.json:
            print(f"== {name}", flush=True)
        report[name] = run_child(name, passthrough, timeout=240 if args.tiny else 1800)
        if not args.json:
            print(table(name, report[name]) + "\n", flush=True)
    report["ratios"] = {k: report[b].get(k) for b, k in (("transfer", "transfer_ratio"), ("transfer", "peak_extra_over_model"),
                                                         ("aggregate", "aggregate_ratio"),
                                                         ("convergence", "samples_ratio_vs_central"),
                                                         ("convergence", "time_ratio_vs_hivemind"),
                                                         ("overhead", "overhead_ratio"),
                                                         ("comms", "bytes_reduction"), ("comms", "loss_gap_vs_central"),
                                                         ("comms", "utilisation_capped"))}
    report["goals"] = {k: f"{op} {bound}" for k, (op, bound) in GOALS.items()}
    if args.json:
        print(json.dumps(report))
    else:
        print("ratios: " + ", ".join(f"{k} {_f(v)} (goal {report['goals'][k]})" for k, v in report["ratios"].items()))
    return 0 if not any("error" in report[b] for b in BENCHES) else 1


if __name__ == "__main__":
    sys.exit(main())
