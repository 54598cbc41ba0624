"""Robust aggregation under attack, in lock step: the runs behind `scripts/robustness.py`.

Every peer is a real `PeerDaemon` (real codec, validation, aggregation rule, DHT records with
history sketches, hostile behaviours from `attacks.py`) on the in-memory transport, driven in lock
step on a simulated clock so that runs are reproducible and use the CPU for training rather than
for waiting: each round every peer takes `local_steps` training steps, publishes its record, then
all peers run one gossip round concurrently. MNIST-1D, Dirichlet(alpha) shards.

    run_swarm        one (aggregator, attack) run: honest accuracy, attack success, what the rule did
    grid_cells       the grid's cells (Byzantine fraction x alpha x partners x phase)
    grid_jobs        every run of a grid
    summarise_grid   per aggregator and cell, the worst case over attacks (ByzFL's report)
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

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
