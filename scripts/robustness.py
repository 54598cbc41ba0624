#!/usr/bin/env python3
"""Robust aggregation under attack: 20 honest + 5 Byzantine peers, one (aggregator, attack) per run.

Every run is a lock-step swarm (`peer/experiment/robustness.py`): each round every peer takes
`--local-steps` training steps, publishes its record, then all peers run one gossip round.
MNIST-1D, Dirichlet shards. `--engine sim` (the default) runs it on the simulator
(`peer/sim/lockstep.py`: the daemon's own decisions, trainer, loss probe and attacks, no
transport); `--engine daemons` runs real `PeerDaemon`s over the in-memory transport on a
simulated clock. Both make the same decisions from the same seed (docs/simulation.md);
`--outer` and `--compression` need `--engine daemons` (the simulator has no outer steps).

    scripts/robustness.py --quick            # default vs mean vs scc, every attack (< 10 min, 2 cores)
    scripts/robustness.py --json             # the full table as one JSON object
    scripts/robustness.py --aggregators mean,median --attacks none,alie
    scripts/robustness.py --attacks ipm --peer-setting loss_probe_samples=0   # a daemon setting for every peer
    scripts/robustness.py --quick --engine daemons                            # the same on real daemons
    scripts/robustness.py --quick --engine daemons --outer --compression topk-int8:0.05   # outer steps, compressed
    scripts/robustness.py --grid --json      # Byzantine 20/30 % x alpha 0.1/0.5 x partners 2/4 x early/late x 3 seeds
    scripts/robustness.py --grid --fractions 0.3 --alphas 0.1 --partners-list 2 --phases early --seeds 1

`--grid` runs, for each aggregator (default: the default rule and `mean`), every cell of
Byzantine fraction (of `--peers`, default 20) x Dirichlet alpha x honest partners per round x
phase (early: 40 rounds, late: 100) x seed, under every attack and without one, with the same
defence settings in every cell, and reports each cell's worst case over attacks (honest mean
accuracy drop against the cell's clean run, and the largest drop of one honest peer against its
own clean accuracy), medians over seeds, as ByzFL reports a defence; `--json` adds
`worst_case_drop` per aggregator and cell.

`--outer` makes every round an outer round (peer/outer.py: the `--local-steps` inner steps of the
round are the pseudo-gradient; an anchor-mixing round every `--peer-setting outer_sync_every=N`);
`--compression` sets what outer rounds send (protocols/compression.py).

Accuracy is the honest peers' mean test accuracy, averaged over the last 3 rounds. The targeted
attack's success rate is the fraction of honest predictions on test examples of class 0 (1) that
say 1 (0), the two classes the Sybils swap.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from peer.experiment.robustness import ALL_ATTACKS, ENGINES, PHASES, grid_cells, grid_jobs, run, summarise_grid


QUICK_AGGREGATORS = ["mean", "scc", "sybilwall+scc"]


def _job(args: tuple) -> dict:
    aggregator, attack, kw = args
    return run(aggregator, attack, **kw)


def _floats(text: str, name: str, ap) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"{name} takes comma-separated numbers, got {text!r}")


def run_grid(args, aggregators: list[str], attacks: list[str], overrides: dict | None, ap) -> None:
    """`--grid`: every cell x seed x aggregator x attack (and each cell's clean run), then the
    worst case over attacks per aggregator and cell."""
    fractions = _floats(args.fractions, "--fractions", ap)
    alphas = _floats(args.alphas, "--alphas", ap)
    partners_list = _floats(args.partners_list, "--partners-list", ap)
    if any(k != int(k) for k in partners_list):
        ap.error(f"--partners-list takes whole numbers, got {args.partners_list!r}")
    partners_list = [int(k) for k in partners_list]
    phases = args.phases.split(",")
    for frac in fractions:
        if not 0 < frac < 0.5:
            ap.error(f"--fractions: each Byzantine fraction must be in (0, 0.5), got {frac}")
    for a in alphas:
        if not a > 0:
            ap.error(f"--alphas: each Dirichlet alpha must be > 0, got {a}")
    for k in partners_list:
        if k < 1:
            ap.error(f"--partners-list: each partner count must be >= 1, got {k}")
    for ph in phases:
        if ph not in PHASES:
            ap.error(f"--phases: unknown phase {ph!r}; choose from {', '.join(PHASES)}")
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    cells = grid_cells(fractions, alphas, partners_list, phases, args.peers)
    for c in cells:
        if c["byzantine"] < 1 or c["honest"] < 2:
            ap.error(f"--peers {args.peers} gives cell {c['key']} {c['honest']} honest + {c['byzantine']} Byzantine peers; use more peers")
    attacks = ["none", *[a for a in attacks if a != "none"]]
    jobs = grid_jobs(cells, range(args.seed, args.seed + args.seeds), aggregators, attacks,
                     rounds=args.rounds, local_steps=args.local_steps, overrides=overrides, engine=args.engine)
    peer_rounds = sum(j[2]["rounds"] * (j[2]["honest"] + (j[2]["byzantine"] if j[1] != "none" else 0)) for j in jobs)
    print(f"grid: {len(cells)} cells x {args.seeds} seeds x {len(aggregators)} aggregators x {len(attacks)} runs "
          f"(clean + {len(attacks) - 1} attacks) = {len(jobs)} runs, {peer_rounds} peer-rounds", file=sys.stderr, flush=True)
    results = []
    t0 = time.monotonic()
    if args.log:  # a logged run counts only if it ran with this run's settings
        def ident(g, a, t):
            return json.dumps([g, a, t["cell"], t["seed"], t["rounds"], t["local_steps"], t["peer_settings"]])

        done = {ident(r["aggregator"], r["attack"], r): r for r in (_read_log(args.log, ap) if Path(args.log).exists() else [])
                if {"cell", "seed", "rounds", "local_steps", "peer_settings"} <= set(r)}
        results = [done[ident(g, a, t)] for g, a, _, t in jobs if ident(g, a, t) in done]
        jobs = [(g, a, kw, t) for g, a, kw, t in jobs if ident(g, a, t) not in done]
        if results:
            print(f"grid: {len(results)} runs taken from {args.log}, {len(jobs)} to run", file=sys.stderr, flush=True)
    total = len(results) + len(jobs)
    with mp.get_context("spawn").Pool(max(1, min(args.workers, len(jobs) or 1))) as pool:
        for res in pool.imap_unordered(_grid_job, jobs):
            results.append(res)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(res) + "\n")
            print(f"[{len(results)}/{total} {time.monotonic() - t0:5.0f}s] {res['cell']} seed {res['seed']} "
                  f"{res['aggregator']:>14} {res['attack']:>14}: accuracy {100 * res['accuracy']:5.1f}%  "
                  f"worst peer {100 * min(res['peer_accuracy']):5.1f}%  ({res['seconds']}s)", file=sys.stderr, flush=True)
    summary = summarise_grid(results, aggregators, attacks, cells)
    if args.json:
        print(json.dumps({
            "default": _default_aggregator(), "grid": summary,
            "worst_case_drop": {g: {k: v["worst_case_drop"] for k, v in cells_.items()} for g, cells_ in summary.items()},
            "worst_case_peer_drop": {g: {k: v["worst_case_peer_drop"] for k, v in cells_.items()} for g, cells_ in summary.items()},
            "settings": {"engine": args.engine, "peers": args.peers, "local_steps": args.local_steps, "seeds": list(range(args.seed, args.seed + args.seeds)),
                         "attacker_partners": 6, "peer_settings": {k: str(v) for k, v in (overrides or {}).items()}},
            "runs": results, "seconds": round(time.monotonic() - t0, 1)}))
        return
    for g in aggregators:
        print(f"\n{g}{'  (default)' if g == _default_aggregator() else ''}: honest mean accuracy drop vs the cell's clean run "
              f"(points, median over seeds), worst over attacks")
        print(f"{'cell':<34}{'clean %':>8}{'worst drop':>11}  {'attack':<13}{'worst peer':>11}  {'attack':<13}")
        for key, v in summary[g].items():
            print(f"{key:<34}{100 * v['clean_accuracy']:8.1f}{100 * v['worst_case_drop']:11.1f}  {v['worst_attack']:<13}"
                  f"{100 * v['worst_case_peer_drop']:11.1f}  {v['worst_peer_attack']:<13}")
        if summary[g]:
            hostile = [a for a in attacks if a != "none"]
            print(f"\n{'cell':<34}" + "".join(f"{a[:10]:>11}" for a in hostile))
            for key, v in summary[g].items():
                print(f"{key:<34}" + "".join(f"{100 * v['drop'][a]:11.1f}" if a in v["drop"] else f"{'-':>11}" for a in hostile))


def _read_log(path: str, ap) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        ap.error(f"--log {path}: cannot read it as one JSON run per line ({e}); give a new file name")


def _grid_job(args: tuple) -> dict:
    aggregator, attack, kw, tags = args
    return {**run(aggregator, attack, **kw), **tags}


def _default_aggregator() -> str:
    from peer.aggregation import DEFAULT_AGGREGATOR

    return DEFAULT_AGGREGATOR


def main() -> None:
    from peer.aggregation import AGGREGATORS, DEFAULT_AGGREGATOR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"aggregators {', '.join(QUICK_AGGREGATORS)} only")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--aggregators", help="comma-separated registry names (default: all, or the quick set)")
    ap.add_argument("--attacks", help=f"comma-separated (default: all): {', '.join(ALL_ATTACKS)}")
    ap.add_argument("--rounds", type=int, default=None,
                    help="gossip rounds (default 100; 40 with --quick; with --grid, replaces every phase's rounds: smoke tests)")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--partners", type=int, default=None, help="partners per round (default: the daemon's)")
    ap.add_argument("--honest", type=int, default=20)
    ap.add_argument("--byzantine", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="a PeerConfig setting for every peer, e.g. loss_probe_samples=0 (repeatable)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engine", choices=ENGINES, default=None,
                    help="sim: the lock-step simulator (default); daemons: real PeerDaemons on the in-memory "
                         "transport (the default with --outer or --compression, which only it runs)")
    ap.add_argument("--outer", action="store_true", help="outer rounds on pseudo-gradients (H = --local-steps)")
    ap.add_argument("--compression", default=None, help="what outer rounds send, e.g. int8 or topk-int8:0.05 (implies --outer)")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the honest shards (default 0.5)")
    grid = ap.add_argument_group("grid", "--grid: Byzantine fraction x alpha x partners x phase x seeds, worst case over attacks")
    grid.add_argument("--grid", action="store_true", help="run the grid (default aggregators: the default rule and mean)")
    grid.add_argument("--peers", type=int, default=20, help="peers per grid run, honest + Byzantine (default 20)")
    grid.add_argument("--fractions", default="0.2,0.3", help="Byzantine fractions (default 0.2,0.3)")
    grid.add_argument("--alphas", default="0.1,0.5", help="Dirichlet alphas (default 0.1,0.5)")
    grid.add_argument("--partners-list", default="2,4", help="honest partners per round (default 2,4)")
    grid.add_argument("--phases", default="early,late", help="early (40 rounds), late (100 rounds) (default both)")
    grid.add_argument("--seeds", type=int, default=3, help="seeds per cell, from --seed on (default 3)")
    grid.add_argument("--log", metavar="FILE", help="append each finished run to FILE (one JSON per line); runs "
                      "already in it are not run again, so a cut-short grid resumes where it stopped")
    args = ap.parse_args()
    if args.outer or args.compression:
        if args.engine == "sim":
            ap.error("--outer and --compression need --engine daemons: the simulator has no outer steps")
        args.engine = "daemons"
        args.peer_setting = [f"outer_every_steps={args.local_steps}", *args.peer_setting]
        if args.compression:
            args.peer_setting.append(f"compression={args.compression}")
    args.engine = args.engine or "sim"

    default_set = [DEFAULT_AGGREGATOR, "mean"] if args.grid else QUICK_AGGREGATORS if args.quick else list(AGGREGATORS)
    aggregators = args.aggregators.split(",") if args.aggregators else default_set
    attacks = args.attacks.split(",") if args.attacks else ALL_ATTACKS
    for a in aggregators:
        if a not in AGGREGATORS:
            ap.error(f"unknown aggregator {a!r}")
    for a in attacks:
        if a not in ALL_ATTACKS:
            ap.error(f"unknown attack {a!r}")
    from peer.config import settings_by_field
    try:
        overrides = settings_by_field(dict(item.partition("=")[::2] for item in args.peer_setting), "--peer-setting")
    except ValueError as e:
        ap.error(str(e))
    if args.engine == "sim" and overrides.get("outer_every_steps"):
        ap.error("outer steps (outer_every_steps) need --engine daemons: the simulator has no outer steps")
    if args.grid:
        run_grid(args, aggregators, attacks, overrides, ap)
        return
    if not args.alpha > 0:
        ap.error(f"--alpha must be > 0, got {args.alpha}")
    # outside the grid only: there, no --rounds means each phase's own rounds
    args.rounds = args.rounds or (40 if args.quick else 100)
    kw = dict(rounds=args.rounds, local_steps=args.local_steps, partners=args.partners, honest=args.honest,
              byzantine=args.byzantine, alpha=args.alpha, seed=args.seed, peer_settings=overrides or None,
              engine=args.engine)
    jobs = [(g, a, kw) for g in aggregators for a in attacks]
    results = []
    t0 = time.monotonic()
    with mp.get_context("spawn").Pool(max(1, min(args.workers, len(jobs)))) as pool:
        for res in pool.imap_unordered(_job, jobs):
            results.append(res)
            print(f"[{len(results)}/{len(jobs)} {time.monotonic() - t0:5.0f}s] {res['aggregator']:>16} {res['attack']:>14}: "
                  f"accuracy {100 * res['accuracy']:5.1f}%  targeted-hit {100 * res['attack_success_rate']:5.1f}%  "
                  f"({res['seconds']}s)", file=sys.stderr, flush=True)
    acc = {g: {} for g in aggregators}
    asr_all = {g: {} for g in aggregators}
    for res in results:
        acc[res["aggregator"]][res["attack"]] = round(res["accuracy"], 4)
        asr_all[res["aggregator"]][res["attack"]] = round(res["attack_success_rate"], 4)
    targeted = [a for a in ("targeted", "adaptive-sybil") if a in attacks]
    asr = {g: (max(asr_all[g][a] for a in targeted) if targeted else None) for g in aggregators}
    if args.json:
        print(json.dumps({"default": DEFAULT_AGGREGATOR, "accuracy": acc, "attack_success_rate": asr,
                          "attack_success_rate_by_attack": asr_all,
                          "settings": {**kw, "peer_settings": {k: str(v) for k, v in (overrides or {}).items()}},
                          "seconds": round(time.monotonic() - t0, 1)}))
        return
    width = max(len(g) for g in aggregators) + 2
    print(f"honest mean test accuracy (%), {args.honest} honest + {args.byzantine} Byzantine, "
          f"{args.rounds} rounds x {args.local_steps} local steps, MNIST-1D Dirichlet {args.alpha:g}")
    print("aggregator".ljust(width) + "".join(f"{a[:11]:>12}" for a in attacks) + f"{'targeted ASR':>14}")
    for g in aggregators:
        row = "".join(f"{100 * acc[g][a]:12.1f}" for a in attacks)
        rate = f"{100 * asr[g]:13.1f}%" if asr[g] is not None else " " * 14
        print(g.ljust(width) + row + rate + ("   <- default" if g == DEFAULT_AGGREGATOR else ""))


if __name__ == "__main__":
    main()
