"""Lock-step rounds: every peer takes H local steps, then the whole swarm gossips at one instant.

The setting of `scripts/robustness.py`: equal step time, no start jitter, zero latency, unlimited
bandwidth, no churn. Each peer is a `SimPeer` with the daemon's own parts, built in the daemon's
order (task and shard as `PeerDaemon`, the behaviour's data poisoning, the real `Trainer`, a
`PeerCore`, the loss probe when its rule reads loss deltas), so that a lock-step swarm of
`PeerDaemon`s over the in-memory transport (`peer.experiment.robustness.run_swarm`) and this one
make the same decisions from the same seeds. A round (`LockstepSwarm.round`):

1. every peer takes `local_steps` training steps; the clock moves 1 s;
2. every peer, in order, publishes its record (3 heartbeats' TTL) and looks the run up, as the
   daemons' heartbeats run one after the other (the first peer's first lookup sees only itself);
3. every peer chooses its partners and snapshots its model; then every pull reaches its server
   at once (in peer order, then partner order), so a server takes at most its serving caps'
   worth (`max_concurrent_serves`) and answers the rest "busy", as concurrent daemon rounds do;
   every pull is served the model its server has *before* this round's mix; then each peer
   validates what it got and mixes with its rule.

Nothing here sleeps, opens a socket or starts a thread: a run is a function of its inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from peer.aggregation import check_byzantine_fraction
from peer.aggregation.sybil import Sketcher
from peer.behaviour import Behaviour
from peer.config import PeerConfig
from peer.core import PeerCore, adopted_step
from peer.sim.dht import RecordStore
from peer.sim.swarm import SimPeer
from peer.tasks import Task, load_task
from protocols.discovery import SKETCH_DIM, PeerRecord


@dataclasses.dataclass
class LockstepPeer:
    """Who one peer of a lock-step run is: its id, its settings, what it does (honest or not)."""

    peer_id: str
    config: PeerConfig
    behaviour: Behaviour = dataclasses.field(default_factory=Behaviour)


class LockstepSwarm:
    """A lock-step swarm: `round()` runs one round of every peer and says what each mixed. The
    peers' parts are built as `PeerDaemon` builds its own, in its order, so the same seeds give
    the same models, partners and weights as the daemons (tests/test_lockstep.py)."""

    def __init__(self, peers: Sequence[LockstepPeer], local_steps: int, start: float = 1_000_000.0):
        from peer.daemon import shard_for
        from peer.loss_probe import LossProbe
        from peer.trainer import Trainer

        self.local_steps = local_steps
        self.now = start
        self.store = RecordStore()
        self.peers: list[SimPeer] = []
        self._tasks: dict[tuple, Task] = {}
        for slot, spec in enumerate(peers):
            cfg = spec.config
            check_byzantine_fraction(cfg.byzantine_fraction)
            p = SimPeer(slot, "honest" if spec.behaviour.honest else "attacker", f"p{slot}")
            p.peer_id, p.behaviour, p.up = spec.peer_id, spec.behaviour, True
            shard = shard_for(cfg, spec.peer_id)
            key = (cfg.task, *shard, cfg.split, cfg.alpha, cfg.data_seed)
            if key not in self._tasks:
                self._tasks[key] = load_task(cfg.task, shard=shard[0], num_shards=shard[1], split=cfg.split,
                                             alpha=cfg.alpha, seed=cfg.data_seed)
            task = dataclasses.replace(self._tasks[key])  # its own Task object; a poisoner swaps its tensors
            outer = cfg.outer_every_steps if cfg.outer_every_steps is not None else task.outer_every_steps
            if outer:
                raise ValueError(f"task {task.name} gossips with outer steps (outer_every_steps {outer}), which the "
                                 "lock-step simulator does not model; use the daemon engine or outer_every_steps=0")
            if not p.behaviour.honest:
                p.behaviour.poison(task)
            # the daemon's order: Trainer seeds torch's global RNG, the loss probe's model draws from it next
            p.learner = Trainer(task, seed=cfg.data_seed, eval_every_s=cfg.eval_every_s)
            if p.behaviour.data_seed is not None:
                p.learner.seed_batches(p.behaviour.data_seed)
            p.core = PeerCore(p.peer_id, cfg, task.name, p.behaviour.aggregator)
            p.core.view.check = self.store.check  # one parse per published record for the whole swarm
            n = task.loss_probe_samples if cfg.loss_probe_samples is None else cfg.loss_probe_samples
            p.probe = LossProbe(task, n) if n > 0 and p.core.aggregator.uses_loss_deltas else None
            self.peers.append(p)
        self.by_id = {p.peer_id: p for p in self.peers}
        # every record carries its history sketch, as a daemon's does, whatever the rules read:
        # a hostile behaviour may read the others' (framers copy them), whichever rule it faces
        self.sketcher = Sketcher(self.peers[0].learner.flat.numel(), SKETCH_DIM) if self.peers else None

    # --- one round ---------------------------------------------------------------------------
    def round(self) -> dict[str, dict[str, Any] | None]:
        """Train, heartbeat, gossip; returns each peer's round report (`PeerCore.mixed`), None
        for a peer that mixed nothing this round."""
        for p in self.peers:
            for _ in range(self.local_steps):
                p.learner.train_step()
        self.now += 1.0
        for p in self.peers:
            self.heartbeat(p)
        return self.gossip()

    def record(self, p: SimPeer) -> PeerRecord:
        """The record `PeerDaemon._record` publishes."""
        now, t = self.now, p.learner
        others = None if p.behaviour.honest else p.core.reported_sketches(now)
        history = p.behaviour.report_history(self.sketcher(t.history()), others).to(torch.float16).numpy().tobytes()
        loss, acc = t.last_loss, t.metrics.get("accuracy")
        return PeerRecord(peer_id=p.peer_id, addrs=(f"/memory/{p.peer_id}/p2p/{p.peer_id}",), task=t.task.name,
                          step=t.step, samples_per_s=round(getattr(t, "samples_per_s", 0.0), 1), version=t.step,
                          time=now, state="up", history=history,
                          loss=loss if loss is not None and math.isfinite(loss) else None,
                          accuracy=round(acc, 3) if acc is not None and math.isfinite(acc) else None)

    def heartbeat(self, p: SimPeer) -> None:
        self.store.publish(p.peer_id, self.record(p).to_wire(), self.now + 3 * p.core.config.heartbeat_s)
        p.core.records(self.store.lookup(self.now), self.now)

    def admit(self, server_id: str, requester: SimPeer) -> SimPeer | str:
        """The server that takes `requester`'s pull now (its serve slot held until `release`), or why not."""
        s = self.by_id.get(server_id)
        if s is None or not s.up:
            return "unreachable"
        if s.core.admit(requester.peer_id, self.now) is not None:
            return "remote_error"  # answered with an error header
        s.core.serve_started(requester.peer_id)
        return s

    def serve(self, s: SimPeer, requester: SimPeer) -> tuple[int, torch.Tensor]:
        """(step, model) that `s` serves `requester`: its own model, or what its behaviour crafts."""
        model = s.learner.snapshot()
        if not s.behaviour.honest:
            model = s.behaviour.serve(requester.peer_id, model).contiguous()
        s.core.stats.counters["serves"] += 1
        s.core.stats.served_bytes["models"] += 4 * model.numel()
        return s.learner.step, model

    def gossip(self) -> dict[str, dict[str, Any] | None]:
        now = self.now
        reports: dict[str, dict[str, Any] | None] = {p.peer_id: None for p in self.peers}
        rounds = []
        for p in self.peers:
            _, partners = p.core.choose_partners(now, p.behaviour.avoid)
            if not partners:
                p.core.stats.counters["rounds_no_partner"] += 1
                continue
            own = p.learner.snapshot()
            p.behaviour.round_start(own, p.learner.history())
            rounds.append((p, own, partners))
        # every pull of the round is asked at one instant, in peer order and each peer's partner
        # order: a server takes as many at once as its serving caps allow and answers the rest
        # "busy" (as the daemons' concurrent rounds do); every pull is served before anyone mixes
        admitted = [[(q, self.admit(q, p)) for q in partners] for p, _, partners in rounds]
        served = [[(q, s if isinstance(s, str) else self.serve(s, p)) for q, s in pulls]
                  for (p, _, _), pulls in zip(rounds, admitted)]
        for (p, _, _), pulls in zip(rounds, admitted):
            for _, s in pulls:
                if not isinstance(s, str):
                    s.core.serve_ended(p.peer_id)
        for (p, own, _), pulls in zip(rounds, served):
            got = []
            for q, answer in pulls:
                if isinstance(answer, str):
                    p.core.pull_failed(q, answer, now)
                elif p.core.accept(q, own, answer[1], now):
                    got.append((q, *answer))
            p.rounds_total += 1
            if not got:
                p.core.stats.counters["rounds_failed"] += 1
                continue
            ids, steps, models = [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]
            p.behaviour.observe(ids, models)
            ctx = p.core.round_context(ids, now)
            mix, p.probe = p.core.aggregate(own, models, ctx, p.probe)
            report = p.core.mixed(mix, ctx, now)
            p.learner.apply_delta(mix.model - own)
            p.core.last_round = reports[p.peer_id] = report
            before = p.learner.step
            target = adopted_step(before, steps, mix.weights)
            if target is not None and p.learner.advance_step(target):
                p.core.stats.counters["steps_adopted"] += target - before
        return reports
