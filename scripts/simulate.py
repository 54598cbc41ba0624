#!/usr/bin/env python3
"""Simulate a scenario of scripts/experiment.py with many peers on a virtual clock.

    scripts/simulate.py scripts/scenarios/sim-1000.toml [--peers N] [--rounds R] [--json] [--out DIR]

Every peer makes the daemon's decisions (view, partners, reputation, validation, aggregation
rule) and trains its model; time, links, churn and attackers are simulated (peer/sim). The
scenario's `[sim]` table sets compute speed and links. `--peers` overrides the honest peers,
`--rounds` the duration (R rounds of a nominal peer). A progress bar goes to stderr; DIR gets
the same summary.json, summary.md and plots as a real run, and sim.json. `--json` prints one
JSON object (peers, rounds, wall_s, peak_rss_mb, honest_accuracy_mean, ...) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("scenario", type=Path, help="scenario TOML (scripts/scenarios/*.toml)")
    ap.add_argument("--peers", type=int, help="honest peers (overrides the scenario's)")
    ap.add_argument("--rounds", type=int, help="rounds of a nominal peer (sets the virtual duration)")
    ap.add_argument("--seed", type=int, help="override the scenario's seed")
    ap.add_argument("--samples", type=int, default=80,
                    help="evaluations (metrics lines) per peer over the run, unless [sim] sample_every_s says (default 80)")
    ap.add_argument("--out", type=Path, help="run directory (default runs/simulations/<name>-<time>)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args()
    try:
        return run(args)
    except Exception as e:
        if args.debug:
            raise
        print(f"simulate: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


def run(args) -> int:
    from peer.experiment.scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(args.scenario)
        scenario_text = args.scenario.read_text()  # what was run, copied into DIR
        if args.peers is not None:
            if args.peers < 1:
                raise ScenarioError(f"--peers must be >= 1, got {args.peers}")
            sc.peers = args.peers
        if args.rounds is not None and args.rounds < 1:
            raise ScenarioError(f"--rounds must be >= 1, got {args.rounds}")
        if args.seed is not None:
            sc.seed = args.seed
        if args.samples < 2:
            raise ScenarioError(f"--samples must be >= 2, got {args.samples}")
        out = args.out or Path("runs/simulations") / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if out.exists() and any(out.iterdir()):
            raise ScenarioError(f"{out} exists and is not empty; choose another --out")
        import torch

        torch.set_num_threads(1)  # thousands of tiny tensors: threads cost more than they give
        from peer.sim import report
        from peer.sim.swarm import Simulation

        try:
            sim = Simulation(sc, rounds=args.rounds, samples=args.samples)
        except ScenarioError as e:
            raise ScenarioError(f"{args.scenario}: {e}") from None
        with progress_bar(args.quiet) as bar:
            sim.progress = bar
            result = sim.run()
    except ScenarioError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    summary = report.summarize(sim, result)
    result["honest_accuracy_mean"] = summary["honest_accuracy_mean"]
    result["honest_accuracy_min"] = summary["honest_accuracy_min"]
    result["summary_s"] = round(time.monotonic() - t0, 1)
    report.write(out, sim, result, summary, scenario_text, plots=not args.no_plots)
    result["out"] = str(out)
    if args.json:
        print(json.dumps(result))
    else:
        print((out / "summary.md").read_text())
        print(f"simulated {result['peers']} peers, {result['rounds']} rounds each (mean) in {result['wall_s']} s, "
              f"peak RSS {result['peak_rss_mb']} MB; written: {out}/summary.json, sim.json, plots", file=sys.stderr)
    return 0


def progress_bar(quiet: bool):
    """A rich progress bar over virtual time on stderr; `update(now, sim)` moves it."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def ctx():
        progress = Progress(TextColumn("[bold]simulating"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            console=Console(stderr=True), disable=quiet, transient=False)
        task = [None]

        def update(now: float, sim) -> None:
            rounds = sim.target_rounds
            if task[0] is None:
                task[0] = progress.add_task("sim", total=rounds or sim.sc.duration_s, info="")
            up = sum(p.up for p in sim.peers)
            done = sim.mean_rounds()
            progress.update(task[0], completed=done if rounds else now,
                            info=f"{now:.2f} virtual s  {done:.0f} rounds  up {up}/{len(sim.peers)}")

        with progress:
            yield update

    return ctx()


if __name__ == "__main__":
    sys.exit(main())
