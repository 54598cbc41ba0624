"""Robust aggregation under attack, in lock step: the runs behind `scripts/robustness.py`.

Two engines run the same lock-step swarm: each round every peer takes `local_steps` training
steps, publishes its record, then all peers run one gossip round. MNIST-1D, Dirichlet(alpha)
shards, the same peers (`swarm_plan`: ids, shards, settings per role, hostile behaviours from
`attacks.py`) and the same measurements (`Tally`) in both:

- `sim` (`run_swarm_sim`): `peer.sim.lockstep.LockstepSwarm`, the daemon's parts (`PeerCore`,
  `Trainer`, loss probe, behaviours) driven directly: every serve of a round sees its server's
  model from before the round's mix;
- `daemons` (`run_swarm`): real `PeerDaemon`s (real codec, streams, validation) on the in-memory
  transport, stepped on a simulated clock; rounds run concurrently on one event loop.

    run_swarm        one (aggregator, attack) run of real daemons
    run_swarm_sim    the same run on the simulator
    run              either, by engine name
    swarm_plan       every peer of a run: id, settings, behaviour
    Tally            honest accuracy, attack success, what the rule did (both engines)
    grid_cells       the grid's cells (Byzantine fraction x alpha x partners x phase)
    grid_jobs        every run of a grid
    summarise_grid   per aggregator and cell, the worst case over attacks (ByzFL's report)
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

ALL_ATTACKS = ["none", "signflip", "signflip-liar", "signflip100", "gaussian", "labelflip", "targeted", "adaptive-sybil",
               "alie", "ipm", "dissensus", "replacement", "spectral", "sleeper", "hugger", "framing", "poisoning"]
PHASES = {"early": 40, "late": 100}  # rounds of the grid's phases
ENGINES = ("sim", "daemons")
ATTACKER_PARTNERS = 6  # partners an attacker pulls a round (unless its behaviour asks for more)


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclasses.dataclass
class PlannedPeer:
    peer_id: str
    hostile: bool
    settings: dict[str, Any]  # PeerConfig fields, data_dir left to the engine
    behaviour: Any


def swarm_plan(aggregator: str, attack: str, *, honest: int, byzantine: int, partners: int | None, alpha: float,
               seed: int, peer_settings: dict | None) -> list[PlannedPeer]:
    """The peers of one run, the same for both engines: honest peers first (`honestNN`), then the
    attackers (`byzNN`, none in a clean run). Every peer takes shard i of `honest + byzantine`
    (Dirichlet(alpha)); attackers pull ATTACKER_PARTNERS partners (or their behaviour's fanout)
    and know each other; the Sybils of the targeted attacks all train on the whole set (classes
    0 and 1 swapped). Peer ids seed each peer's partner choice, so they must match across engines."""
    from peer.experiment.attacks import TARGETED, behaviour_for

    n = honest + (byzantine if attack != "none" else 0)
    plan = []
    for i in range(n):
        bad = i >= honest
        peer_id = f"{'byz' if bad else 'honest'}{i:02d}"
        # ALIE's z follows this run's n and f
        behaviour = behaviour_for(attack if bad else None, peer_id, n=honest + byzantine, f=byzantine)
        extra: dict[str, Any] = {} if partners is None else {"partners": partners}
        if bad:
            extra.update(experiment_attack=attack, partners=getattr(behaviour, "fanout", None) or ATTACKER_PARTNERS)
            if attack in TARGETED:
                extra.update(shard="0/1", split="iid")  # all Sybils alike: the classes 0 and 1 of the whole set, swapped
        settings = dict(run_id="robustness", task="mnist1d-cnn", aggregator=aggregator,
                        shard=f"{i}/{honest + byzantine}", split="dirichlet", alpha=alpha, data_seed=seed,
                        heartbeat_s=1.0, pull_timeout_s=30.0)
        plan.append(PlannedPeer(peer_id, bad, {**settings, **(peer_settings or {}), **extra}, behaviour))
    byz_ids = {p.peer_id for p in plan if p.hostile}
    for p in plan:
        if p.hostile:
            p.behaviour.colluders = byz_ids - {p.peer_id}
    return plan


class Tally:
    """What a run measures, fed the same way by both engines: each honest peer's round reports
    (`PeerCore.mixed`: partners and weights), its test predictions in the last rounds, and its
    counters at the end."""

    def __init__(self, honest_ids: list[str], byz_ids: set[str], y_test, trace_rounds: int = 0):
        from peer.experiment.attacks import SOURCE_CLASSES

        self.honest_ids, self.byz_ids, self.y_test = honest_ids, byz_ids, y_test
        self.src = [(y_test == a) for a in SOURCE_CLASSES]
        self.accs: list[float] = []
        self.asrs: list[float] = []
        self.worst = 0.0
        self.per_peer = [0.0] * len(honest_ids)  # each honest peer's accuracy, summed over the evaluations
        self.mix = dict.fromkeys(("pulls", "byzantine_pulls", "weight", "byzantine_weight", "honest_unmixed"), 0.0)
        self.trace_rounds = trace_rounds
        self.trace: list[dict[str, Any]] = []  # the first trace_rounds rounds: honest id -> (partners, weights)

    def round(self, reports: dict[str, dict | None]) -> None:
        """One round's reports of the honest peers (None: mixed nothing)."""
        if len(self.trace) < self.trace_rounds:
            self.trace.append({p: None if reports.get(p) is None else [reports[p]["partners"], reports[p]["weights"]]
                               for p in self.honest_ids})
        for pid in self.honest_ids:
            last = reports.get(pid)
            if last is None:
                continue
            for p, w in zip(last["partners"], last["weights"]):
                hostile = p in self.byz_ids
                self.mix["pulls"] += 1
                self.mix["byzantine_pulls"] += hostile
                self.mix["weight"] += w
                self.mix["byzantine_weight"] += w if hostile else 0.0
                self.mix["honest_unmixed"] += (not hostile) and w == 0

    def evaluate(self, predictions: list) -> None:
        """Every honest peer's predicted class per test example (`peer.sim.learners.test_predictions`)."""
        from peer.experiment.attacks import SOURCE_CLASSES

        acc, asr = [], []
        a, b = SOURCE_CLASSES
        for i, pred in enumerate(predictions):
            acc.append(float((pred == self.y_test).float().mean()))
            self.per_peer[i] += acc[-1]
            hits = int(((pred == b) & self.src[0]).sum() + ((pred == a) & self.src[1]).sum())
            asr.append(hits / int(self.src[0].sum() + self.src[1].sum()))
        self.accs.append(sum(acc) / len(acc))
        self.asrs.append(sum(asr) / len(asr))
        self.worst = min(acc)

    def result(self, aggregator: str, attack: str, stats: list, seconds: float, engine: str) -> dict:
        """The run's JSON; `stats`: the honest peers' `peer.core.Stats`."""
        totals: dict[str, dict[str, int]] = {"rejected": {}, "pull_failed": {}, "refused": {}}
        for st in stats:
            # refused: partners the rule left unmixed, by why
            for name, counts in (("rejected", st.rejected), ("pull_failed", st.pull_failed), ("refused", st.refused)):
                for k, v in counts.items():
                    totals[name][k] = totals[name].get(k, 0) + v
        m = self.mix
        out = {
            "aggregator": aggregator, "attack": attack, "engine": engine, "accuracy": sum(self.accs) / len(self.accs),
            "attack_success_rate": sum(self.asrs) / len(self.asrs), "worst_peer_accuracy": self.worst,
            "peer_accuracy": [round(a / len(self.accs), 4) for a in self.per_peer],  # per honest peer, last 3 rounds
            **totals, "seconds": round(seconds, 1),
            # of the honest peers' mixed pulls: the share from attackers, the attackers' share of the
            # partner weight, the share of honest partners the rule left unmixed
            "mix": {"pulls_to_byzantine": round(m["byzantine_pulls"] / max(m["pulls"], 1), 4),
                    "weight_on_byzantine": round(m["byzantine_weight"] / max(m["weight"], 1e-12), 4),
                    "honest_unmixed": round(m["honest_unmixed"] / max(m["pulls"] - m["byzantine_pulls"], 1), 4)},
        }
        if self.trace_rounds:
            out["trace"] = self.trace
        return out


def run(aggregator: str, attack: str, engine: str = "sim", **kw) -> dict:
    """One run on `engine` ("sim" or "daemons"); keyword arguments as `run_swarm`."""
    if engine == "sim":
        return run_swarm_sim(aggregator, attack, **kw)
    if engine == "daemons":
        return asyncio.run(run_swarm(aggregator, attack, **kw))
    raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def run_swarm_sim(aggregator: str, attack: str, *, honest: int = 20, byzantine: int = 5, rounds: int = 50,
                  local_steps: int = 5, partners: int | None = None, alpha: float = 0.5, seed: int = 0,
                  peer_settings: dict | None = None, trace_rounds: int = 0) -> dict:
    import torch

    from peer.config import PeerConfig
    from peer.sim.learners import test_predictions
    from peer.sim.lockstep import LockstepPeer, LockstepSwarm

    torch.set_num_threads(1)
    plan = swarm_plan(aggregator, attack, honest=honest, byzantine=byzantine, partners=partners, alpha=alpha,
                      seed=seed, peer_settings=peer_settings)
    started = time.monotonic()
    swarm = LockstepSwarm([LockstepPeer(p.peer_id, PeerConfig(**p.settings), p.behaviour) for p in plan], local_steps)
    good = swarm.peers[:honest]
    tally = Tally([p.peer_id for p in good], {p.peer_id for p in plan if p.hostile}, good[0].learner.task.y_test,
                  trace_rounds)
    for r in range(rounds):
        tally.round(swarm.round())
        if r >= rounds - 3:
            tally.evaluate([test_predictions(p.learner) for p in good])
    return tally.result(aggregator, attack, [p.core.stats for p in good], time.monotonic() - started, "sim")


async def run_swarm(aggregator: str, attack: str, *, honest: int = 20, byzantine: int = 5, rounds: int = 50,
                    local_steps: int = 5, partners: int | None = None, alpha: float = 0.5, seed: int = 0,
                    peer_settings: dict | None = None, trace_rounds: int = 0) -> dict:
    import torch

    from peer.config import PeerConfig
    from peer.daemon import PeerDaemon
    from peer.sim.learners import test_predictions
    from protocols import gossip
    from protocols.transport.memory import MemoryNetwork

    torch.set_num_threads(1)
    clock = Clock()
    net = MemoryNetwork(clock=clock)
    plan = swarm_plan(aggregator, attack, honest=honest, byzantine=byzantine, partners=partners, alpha=alpha,
                      seed=seed, peer_settings=peer_settings)
    tmp = tempfile.TemporaryDirectory(prefix="robustness-")
    started = time.monotonic()
    daemons = []
    for i, p in enumerate(plan):
        cfg = PeerConfig(data_dir=Path(tmp.name) / f"p{i}", **p.settings)
        cfg.data_dir.mkdir(parents=True)
        daemons.append(PeerDaemon(cfg, net.transport(p.peer_id), behaviour=p.behaviour))
    for d in daemons:
        await d.transport.start()
        d.addrs = await d.transport.addrs()
        await d.transport.set_handler(gossip.PROTOCOL, d._serve_model)
    good = daemons[:honest]
    tally = Tally([d.peer_id for d in good], {p.peer_id for p in plan if p.hostile}, good[0].task.y_test, trace_rounds)
    for r in range(rounds):
        for d in daemons:
            for _ in range(local_steps):
                d.trainer.train_step()
        clock.t += 1.0
        for d in daemons:
            await d._heartbeat_once()
        mixed = await asyncio.gather(*(d.gossip_round() for d in daemons))
        # what the honest peers' rule did with whom (`peer status`'s last round)
        tally.round({d.peer_id: d.core.last_round if ok else None for d, ok in zip(good, mixed)})
        if r >= rounds - 3:
            tally.evaluate([test_predictions(d.trainer) for d in good])
    for d in daemons:
        await d.transport.stop()
    tmp.cleanup()
    return tally.result(aggregator, attack, [d.stats for d in good], time.monotonic() - started, "daemons")


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
              local_steps: int, overrides: dict | None, engine: str = "sim") -> list[tuple]:
    """(aggregator, attack, `run` kwargs, tags) per run: every cell x seed, attack by attack,
    each for every aggregator (a run cut short has whole columns). `rounds` replaces every cell's
    phase rounds (smoke tests); None keeps them."""
    jobs = []
    for c in cells:
        for seed in seeds:
            kw = dict(rounds=rounds or c["rounds"], local_steps=local_steps, partners=c["partners"], honest=c["honest"],
                      byzantine=c["byzantine"], alpha=c["alpha"], seed=seed, peer_settings=overrides or None,
                      engine=engine)
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
