#!/usr/bin/env python3
"""Robust aggregation under attack: 20 honest + 5 Byzantine peers, one (aggregator, attack) per run.

Every peer is a real `PeerDaemon` (real codec, validation, aggregation rule, DHT records with
history sketches, hostile behaviours from `peer/experiment/attacks.py`) on the in-memory transport, driven in
lock step on a simulated clock so that runs are reproducible and use the CPU for training rather
than for waiting: each round every peer takes `--local-steps` training steps, publishes its
record, then all peers run one gossip round concurrently. MNIST-1D, Dirichlet(alpha=0.5) shards.

    scripts/robustness.py --quick            # default vs mean vs scc, every attack (< 10 min, 2 cores)
    scripts/robustness.py --json             # the full table as one JSON object
    scripts/robustness.py --aggregators mean,median --attacks none,alie
    scripts/robustness.py --attacks ipm --peer-setting loss_probe_samples=0   # a daemon setting for every peer
    scripts/robustness.py --quick --outer --compression topk-int8:0.05        # outer steps, compressed
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
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path


QUICK_AGGREGATORS = ["mean", "scc", "sybilwall+scc"]
ALL_ATTACKS = ["none", "signflip", "signflip-liar", "signflip100", "gaussian", "labelflip", "targeted", "adaptive-sybil",
               "alie", "ipm", "dissensus", "replacement", "spectral", "sleeper", "hugger", "framing", "poisoning"]
PHASES = {"early": 40, "late": 100}  # rounds of the grid's phases


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def run_swarm(aggregator: str, attack: str, *, honest: int = 20, byzantine: int = 5, rounds: int = 50,
                    local_steps: int = 5, partners: int | None = None, alpha: float = 0.5, seed: int = 0,
                    peer_settings: dict | None = None) -> dict:
    import torch

    from peer.config import PeerConfig
    from peer.daemon import PeerDaemon
    from peer.experiment.attacks import SOURCE_CLASSES, TARGETED, behaviour_for
    from protocols import gossip
    from protocols.transport.memory import MemoryNetwork

    torch.set_num_threads(1)
    clock = Clock()
    net = MemoryNetwork(clock=clock)
    n = honest + (byzantine if attack != "none" else 0)
    tmp = tempfile.TemporaryDirectory(prefix="robustness-")
    daemons = []
    for i in range(n):
        bad = i >= honest
        transport = net.transport(f"{'byz' if bad else 'honest'}{i:02d}")
        # ALIE's z follows this run's n and f
        behaviour = behaviour_for(attack if bad else None, transport.peer_id, n=honest + byzantine, f=byzantine)
        extra = {} if partners is None else {"partners": partners}
        if bad:
            extra.update(experiment_attack=attack, partners=getattr(behaviour, "fanout", None) or 6)
            if attack in TARGETED:
                extra.update(shard="0/1", split="iid")  # all Sybils alike: the classes 0 and 1 of the whole set, swapped
        settings = dict(
            data_dir=Path(tmp.name) / f"p{i}", run_id="robustness", task="mnist1d-cnn", aggregator=aggregator,
            shard=f"{i}/{honest + byzantine}", split="dirichlet", alpha=alpha, data_seed=seed,
            heartbeat_s=1.0, pull_timeout_s=30.0,
        )
        cfg = PeerConfig(**{**settings, **(peer_settings or {}), **extra})
        cfg.data_dir.mkdir(parents=True)
        daemons.append(PeerDaemon(cfg, transport, behaviour=behaviour))
    byz_ids = {d.peer_id for d in daemons[honest:]}
    for d in daemons:
        await d.transport.start()
        d.addrs = await d.transport.addrs()
        await d.transport.set_handler(gossip.PROTOCOL, d._serve_model)
        if not d.behaviour.honest:
            d.behaviour.colluders = byz_ids - {d.peer_id}
    good = daemons[:honest]
    accs, asrs = [], []
    x_test, y_test = good[0].task.x_test, good[0].task.y_test
    src = [(y_test == a) for a in SOURCE_CLASSES]

    per_peer = [0.0] * honest  # each honest peer's accuracy, summed over the last 3 rounds

    def evaluate():
        acc, asr = [], []
        for d in good:
            with torch.no_grad():
                d.trainer.model.eval()
                pred = d.trainer.model(x_test).argmax(1)
                d.trainer.model.train()
            acc.append(float((pred == y_test).float().mean()))
            per_peer[len(acc) - 1] += acc[-1]
            a, b = SOURCE_CLASSES
            hits = int(((pred == b) & src[0]).sum() + ((pred == a) & src[1]).sum())
            asr.append(hits / int(src[0].sum() + src[1].sum()))
        return sum(acc) / len(acc), sum(asr) / len(asr), min(acc)

    mix_stats = dict.fromkeys(("pulls", "byzantine_pulls", "weight", "byzantine_weight", "honest_unmixed"), 0.0)
    started = time.monotonic()
    for r in range(rounds):
        for d in daemons:
            for _ in range(local_steps):
                d.trainer.train_step()
        clock.t += 1.0
        for d in daemons:
            await d._heartbeat_once()
        mixed = await asyncio.gather(*(d.gossip_round() for d in daemons))
        for d, ok in zip(good, mixed):  # what the honest peers' rule did with whom (`peer status`'s last round)
            if ok:
                last = d.core.status(clock.t)["last_round"]
                for p, w in zip(last["partners"], last["weights"]):
                    hostile = p in byz_ids
                    mix_stats["pulls"] += 1
                    mix_stats["byzantine_pulls"] += hostile
                    mix_stats["weight"] += w
                    mix_stats["byzantine_weight"] += w if hostile else 0.0
                    mix_stats["honest_unmixed"] += (not hostile) and w == 0
        if r >= rounds - 3:
            acc, asr, worst = evaluate()
            accs.append(acc)
            asrs.append(asr)
    for d in daemons:
        await d.transport.stop()
    tmp.cleanup()
    rejected: dict[str, int] = {}
    pull_failed: dict[str, int] = {}
    refused: dict[str, int] = {}
    for d in good:
        for k, v in d.stats.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
        for k, v in d.stats.pull_failed.items():
            pull_failed[k] = pull_failed.get(k, 0) + v
        for k, v in d.stats.refused.items():  # partners the rule left unmixed, by why
            refused[k] = refused.get(k, 0) + v
    return {
        "aggregator": aggregator, "attack": attack, "accuracy": sum(accs) / len(accs),
        "attack_success_rate": sum(asrs) / len(asrs), "worst_peer_accuracy": worst,
        "peer_accuracy": [round(a / len(accs), 4) for a in per_peer],  # per honest peer, last 3 rounds
        "rejected": rejected, "pull_failed": pull_failed, "refused": refused, "seconds": round(time.monotonic() - started, 1),
        # of the honest peers' mixed pulls: the share from attackers, the attackers' share of the
        # partner weight, the share of honest partners the rule left unmixed
        "mix": {"pulls_to_byzantine": round(mix_stats["byzantine_pulls"] / max(mix_stats["pulls"], 1), 4),
                "weight_on_byzantine": round(mix_stats["byzantine_weight"] / max(mix_stats["weight"], 1e-12), 4),
                "honest_unmixed": round(mix_stats["honest_unmixed"] / max(mix_stats["pulls"] - mix_stats["byzantine_pulls"], 1), 4)},
    }


def _job(args: tuple) -> dict:
    aggregator, attack, kw = args
    return asyncio.run(run_swarm(aggregator, attack, **kw))


def grid_cells(fractions, alphas, partners_list, phases, peers: int) -> list[dict]:
    """One dict per grid cell: its key, the honest and Byzantine counts, alpha, partners, rounds."""
    cells = []
    for frac in fractions:
        byz = round(frac * peers)
        for alpha in alphas:
            for k in partners_list:
                for phase in phases:
                    cells.append({"key": f"byz{round(100 * frac)}-alpha{alpha:g}-partners{k}-{phase}",
                                  "honest": peers - byz, "byzantine": byz, "alpha": alpha, "partners": k,
                                  "rounds": PHASES[phase], "phase": phase})
    return cells


def grid_jobs(cells: list[dict], seeds, aggregators: list[str], attacks: list[str], *, rounds: int | None,
              local_steps: int, overrides: dict | None) -> list[tuple]:
    """(aggregator, attack, run_swarm kwargs, tags) per run: every cell x seed, attack by attack,
    each for every aggregator (a run cut short has whole columns). `rounds` replaces every cell's
    phase rounds (smoke tests); None keeps them."""
    jobs = []
    for c in cells:
        for seed in seeds:
            kw = dict(rounds=rounds or c["rounds"], local_steps=local_steps, partners=c["partners"], honest=c["honest"],
                      byzantine=c["byzantine"], alpha=c["alpha"], seed=seed, peer_settings=overrides or None)
            tags = {"cell": c["key"], "seed": seed, "rounds": kw["rounds"], "local_steps": local_steps,
                    "peer_settings": {k: str(v) for k, v in (overrides or {}).items()}}
            jobs += [(g, a, kw, tags) for a in attacks for g in aggregators]
    return jobs


def summarise_grid(results: list[dict], aggregators: list[str], attacks: list[str], cells: list[dict]) -> dict:
    """Per aggregator and cell, as ByzFL reports a defence: each attack's drop against the same
    cell's clean run (honest mean accuracy; the worst honest peer: the largest drop of one peer's
    accuracy against its own clean accuracy), the median over seeds, then the worst over attacks."""
    from statistics import median

    by = {}
    for r in results:
        by[(r["aggregator"], r["cell"], r["seed"], r["attack"])] = r
    seeds = sorted({r["seed"] for r in results})
    hostile = [a for a in attacks if a != "none"]
    out: dict = {}
    for g in aggregators:
        out[g] = {}
        for c in cells:
            drops: dict[str, list[float]] = {a: [] for a in hostile}
            peer_drops: dict[str, list[float]] = {a: [] for a in hostile}
            clean, accs = [], {a: [] for a in hostile}
            for seed in seeds:
                base = by.get((g, c["key"], seed, "none"))
                if base is None:
                    continue
                clean.append(base["accuracy"])
                for a in hostile:
                    r = by.get((g, c["key"], seed, a))
                    if r is None:
                        continue
                    accs[a].append(r["accuracy"])
                    drops[a].append(base["accuracy"] - r["accuracy"])
                    peer_drops[a].append(max(b - x for b, x in zip(base["peer_accuracy"], r["peer_accuracy"])))
            ran = [a for a in hostile if drops[a]]
            if not clean or not ran:
                continue
            drop = {a: round(median(drops[a]), 4) for a in ran}
            peer = {a: round(median(peer_drops[a]), 4) for a in ran}
            worst = max(ran, key=lambda a: drop[a])
            worst_peer = max(ran, key=lambda a: peer[a])
            out[g][c["key"]] = {
                "clean_accuracy": round(median(clean), 4), "seeds": len(clean),
                "accuracy": {a: round(median(accs[a]), 4) for a in ran}, "drop": drop, "worst_peer_drop": peer,
                "worst_case_drop": drop[worst], "worst_attack": worst,
                "worst_case_peer_drop": peer[worst_peer], "worst_peer_attack": worst_peer,
            }
    return out


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
                     rounds=args.rounds, local_steps=args.local_steps, overrides=overrides)
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
            "settings": {"peers": args.peers, "local_steps": args.local_steps, "seeds": list(range(args.seed, args.seed + args.seeds)),
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
    return {**asyncio.run(run_swarm(aggregator, attack, **kw)), **tags}


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
        args.peer_setting = [f"outer_every_steps={args.local_steps}", *args.peer_setting]
        if args.compression:
            args.peer_setting.append(f"compression={args.compression}")

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
    if args.grid:
        run_grid(args, aggregators, attacks, overrides, ap)
        return
    if not args.alpha > 0:
        ap.error(f"--alpha must be > 0, got {args.alpha}")
    # outside the grid only: there, no --rounds means each phase's own rounds
    args.rounds = args.rounds or (40 if args.quick else 100)
    kw = dict(rounds=args.rounds, local_steps=args.local_steps, partners=args.partners, honest=args.honest,
              byzantine=args.byzantine, alpha=args.alpha, seed=args.seed, peer_settings=overrides or None)
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
