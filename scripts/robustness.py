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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUICK_AGGREGATORS = ["mean", "scc", "sybilwall+scc"]
ALL_ATTACKS = ["none", "signflip", "signflip-liar", "signflip100", "gaussian", "labelflip", "targeted", "adaptive-sybil",
               "alie", "ipm", "dissensus", "replacement"]


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
        extra = {} if partners is None else {"partners": partners}
        if bad:
            extra.update(experiment_attack=attack, partners=6)
            if attack in TARGETED:
                extra.update(shard="0/1", split="iid")  # all Sybils alike: the classes 0 and 1 of the whole set, swapped
        settings = dict(
            data_dir=Path(tmp.name) / f"p{i}", run_id="robustness", task="mnist1d-cnn", aggregator=aggregator,
            shard=f"{i}/{honest + byzantine}", split="dirichlet", alpha=alpha, data_seed=seed,
            heartbeat_s=1.0, pull_timeout_s=30.0,
        )
        cfg = PeerConfig(**{**settings, **(peer_settings or {}), **extra})
        cfg.data_dir.mkdir(parents=True)
        transport = net.transport(f"{'byz' if bad else 'honest'}{i:02d}")
        daemons.append(PeerDaemon(cfg, transport, behaviour=behaviour_for(cfg.experiment_attack, transport.peer_id)))
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

    def evaluate():
        acc, asr = [], []
        for d in good:
            with torch.no_grad():
                d.trainer.model.eval()
                pred = d.trainer.model(x_test).argmax(1)
                d.trainer.model.train()
            acc.append(float((pred == y_test).float().mean()))
            a, b = SOURCE_CLASSES
            hits = int(((pred == b) & src[0]).sum() + ((pred == a) & src[1]).sum())
            asr.append(hits / int(src[0].sum() + src[1].sum()))
        return sum(acc) / len(acc), sum(asr) / len(asr), min(acc)

    started = time.monotonic()
    for r in range(rounds):
        for d in daemons:
            for _ in range(local_steps):
                d.trainer.train_step()
        clock.t += 1.0
        for d in daemons:
            await d._heartbeat_once()
        await asyncio.gather(*(d.gossip_round() for d in daemons))
        if r >= rounds - 3:
            acc, asr, worst = evaluate()
            accs.append(acc)
            asrs.append(asr)
    for d in daemons:
        await d.transport.stop()
    tmp.cleanup()
    rejected: dict[str, int] = {}
    for d in good:
        for k, v in d.stats.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
    return {
        "aggregator": aggregator, "attack": attack, "accuracy": sum(accs) / len(accs),
        "attack_success_rate": sum(asrs) / len(asrs), "worst_peer_accuracy": worst,
        "rejected": rejected, "seconds": round(time.monotonic() - started, 1),
    }


def _job(args: tuple) -> dict:
    aggregator, attack, kw = args
    return asyncio.run(run_swarm(aggregator, attack, **kw))


def main() -> None:
    from peer.aggregation import AGGREGATORS, DEFAULT_AGGREGATOR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"aggregators {', '.join(QUICK_AGGREGATORS)} only")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--aggregators", help="comma-separated registry names (default: all, or the quick set)")
    ap.add_argument("--attacks", help=f"comma-separated (default: all): {', '.join(ALL_ATTACKS)}")
    ap.add_argument("--rounds", type=int, default=None, help="gossip rounds (default 100; 40 with --quick)")
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
    args = ap.parse_args()
    if args.outer or args.compression:
        args.peer_setting = [f"outer_every_steps={args.local_steps}", *args.peer_setting]
        if args.compression:
            args.peer_setting.append(f"compression={args.compression}")

    aggregators = args.aggregators.split(",") if args.aggregators else (QUICK_AGGREGATORS if args.quick else list(AGGREGATORS))
    attacks = args.attacks.split(",") if args.attacks else ALL_ATTACKS
    for a in aggregators:
        if a not in AGGREGATORS:
            ap.error(f"unknown aggregator {a!r}")
    for a in attacks:
        if a not in ALL_ATTACKS:
            ap.error(f"unknown attack {a!r}")
    args.rounds = args.rounds or (40 if args.quick else 100)
    from peer.config import settings_by_field
    try:
        overrides = settings_by_field(dict(item.partition("=")[::2] for item in args.peer_setting), "--peer-setting")
    except ValueError as e:
        ap.error(str(e))
    kw = dict(rounds=args.rounds, local_steps=args.local_steps, partners=args.partners, honest=args.honest,
              byzantine=args.byzantine, seed=args.seed, peer_settings=overrides or None)
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
                          "settings": {**kw, "alpha": 0.5, "peer_settings": {k: str(v) for k, v in (overrides or {}).items()}},
                          "seconds": round(time.monotonic() - t0, 1)}))
        return
    width = max(len(g) for g in aggregators) + 2
    print(f"honest mean test accuracy (%), {args.honest} honest + {args.byzantine} Byzantine, "
          f"{args.rounds} rounds x {args.local_steps} local steps, MNIST-1D Dirichlet 0.5")
    print("aggregator".ljust(width) + "".join(f"{a[:11]:>12}" for a in attacks) + f"{'targeted ASR':>14}")
    for g in aggregators:
        row = "".join(f"{100 * acc[g][a]:12.1f}" for a in attacks)
        rate = f"{100 * asr[g]:13.1f}%" if asr[g] is not None else " " * 14
        print(g.ljust(width) + row + rate + ("   <- default" if g == DEFAULT_AGGREGATOR else ""))


if __name__ == "__main__":
    main()
