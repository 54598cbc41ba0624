"""A swarm of simulated peers on a virtual clock, driven by a scenario file.

Each peer is a `PeerCore` (peer/core.py: the daemon's own decisions: swarm view, partners,
reputation, validation, the aggregation rule, serve admission), a learner (`peer.sim.learners`),
a `Behaviour` (honest, or a hostile policy of `peer.experiment.attacks`) and a link
(`peer.sim.links`). The daemon's loops become events on one `EventLoop`:

- a training step every `step_s` of the peer (its compute speed); after each, the gossip cadence
  (`peer.cadence.StepCadence`) may make a round due; a round also starts `gossip_every_s` after
  the last one ended;
- a round: choose partners, pull each (latency, bandwidth shares, the model the partner has when
  the request reaches it, or whatever its behaviour serves), validate each arrival, then mix
  with the rule and apply `mixed - snapshot`, so that steps taken during the round are kept;
- a heartbeat every `heartbeat_s`: publish the record (3 heartbeats' TTL) to the shared store
  (`peer.sim.dht.RecordStore`), look the run up, feed the view;
- an evaluation and a metrics line every `sample_every_s`; a checkpoint every
  `checkpoint_every_s` (what a killed peer that keeps its identity comes back with);
- churn from the scenario's schedule (`peer.experiment.scenario.churn_schedule`): kill (no
  goodbye: its record expires), leave (a "left" record, a final checkpoint), join (after
  `startup_s`, from its checkpoint, or fresh and synced from the coordinate median of up to 3
  live peers' models, as `PeerDaemon._sync_from_swarm`); attackers join at `attack.start_s`.

The run writes what a real run writes (per-peer metrics lines, runner events) so that
`peer.experiment.collect` summarises both alike. Nothing sleeps and nothing runs in threads: a
run is a function of the scenario and its seed.
"""

from __future__ import annotations

import gc
import math
import random
import resource
import statistics
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch

from peer.aggregation import RoundContext
from peer.aggregation.baselines import coordinate_median
from peer.aggregation.sybil import Sketcher
from peer.behaviour import Behaviour
from peer.cadence import StepCadence
from peer.config import PeerConfig, settings_by_field
from peer.core import PeerCore, adopted_step
from peer.experiment.attacks import TARGETED, behaviour_for
from peer.experiment.scenario import Scenario, ScenarioError, churn_schedule
from peer.sim.dht import RecordStore
from peer.sim.events import EventLoop
from peer.sim.learners import LinearLearner, LinearLossProbe
from peer.sim.links import Link, transfer_seconds
from peer.tasks import Task, load_task
from protocols.discovery import SKETCH_DIM, PeerRecord

LINEAR_TASK = "mnist1d-linear"


@dataclass
class SimSettings:
    """The scenario's `[sim]` table: what the simulator needs that a real run measures instead."""

    step_s: float = 0.01  # seconds per training step of a peer (its compute speed)
    step_s_spread: float = 0.0  # per-peer speeds drawn log-normally around step_s with this sigma
    latency_s: float = 0.025  # each peer's share of a round trip (a path's is the sum of both ends')
    up_bytes_s: float = 1e6
    down_bytes_s: float = 1e7
    startup_s: float = 0.0  # from a join to the first heartbeat (process start-up)
    shards: int = 0  # distinct data shards (0: one per honest peer, as the real runner, at most one per example)
    sample_every_s: float = 0.0  # evaluation and metrics line interval (0: the duration / --samples)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> SimSettings:
        known = {f.name for f in fields(cls)}
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ScenarioError(f"[sim]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ScenarioError(f"[sim]: {k} must be a number >= 0, got {v!r}")
        s = cls(**raw)
        if s.step_s <= 0 or s.up_bytes_s <= 0 or s.down_bytes_s <= 0:
            raise ScenarioError("[sim]: step_s, up_bytes_s and down_bytes_s must be > 0")
        s.shards = int(s.shards)
        return s


@dataclass
class Round:
    seq: int
    own: torch.Tensor
    partners: list[str]
    sync: bool = False  # a joiner's sync: the median of what arrives replaces its model
    pending: int = 0
    got: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)


class SimPeer:
    """One peer slot across its lives (a life: one process, from a join to a kill or leave)."""

    def __init__(self, slot: int, role: str, dir_name: str):
        self.slot, self.role, self.dir_name = slot, role, dir_name
        self.peer_id = ""
        self.life = 0
        self.lives = 0
        self.up = False
        self.learner: Any = None
        self.probe: Any = None
        self.core: PeerCore | None = None
        self.behaviour: Behaviour | None = None
        self.link: Link | None = None
        self.step_s = 0.0
        self.checkpoint: dict[str, Any] | None = None
        self.round: Round | None = None
        self.round_seq = 0
        self.round_due = False
        self.starting = False
        self.rounds_total = 0
        self.lines: dict[str, list[dict]] = {}  # data dir name -> its metrics lines


class Simulation:
    def __init__(self, sc: Scenario, rounds: int | None = None, progress: Callable[[float, Simulation], None] | None = None,
                 samples: int = 80):
        self.sc = sc
        self.sim = SimSettings.parse(sc.sim)
        try:
            self.config = PeerConfig(**settings_by_field(sc.peer_settings, "[peer]"))
        except (ValueError, TypeError) as e:
            raise ScenarioError(str(e)) from None
        self.aggregator = sc.aggregator or self.config.aggregator
        self.cadence = StepCadence(self.config.gossip_every_steps, self.config.gossip_steps_until)
        self.rng = random.Random(sc.seed)
        self.progress = progress
        self.loop = EventLoop()
        self.store = RecordStore()
        self.events: list[dict] = []
        self._tasks: dict[tuple[int, int, str], Task] = {}
        self._examples: int | None = None  # training examples of the whole task (the shard bound)
        self._probes: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray]] = {}
        self.timing: Counter[str] = Counter()  # wall seconds by what the simulator spent them on
        self.calls: Counter[str] = Counter()  # how many of each (per-call costs in the result)
        self.serves: Counter[str] = Counter()  # peer id -> pulls it served (partner sampling)
        self.view_sizes: list[int] = []
        self.peers = [SimPeer(i, sc.role(i), f"p{i}") for i in range(sc.total_peers)]
        self.by_id: dict[str, SimPeer] = {}
        self.attacker_ids = {self._peer_id(p) for p in self.peers if p.role == "attacker"}
        probe_task = self._task(0)
        outer = self.config.outer_every_steps if self.config.outer_every_steps is not None else probe_task.outer_every_steps
        if outer:
            raise ScenarioError(f"task {sc.task} gossips with outer steps (outer_every_steps {outer}), which the simulator "
                                "does not model; set outer-every-steps = 0 in [peer] or pick another task")
        self.uses_sketches = PeerCore("probe", self.config, probe_task.name, self.aggregator).aggregator.uses_sketches
        self.payload_bytes = 0
        self._init_flat: torch.Tensor | None = None
        # --rounds R: run until the honest peers have completed R rounds on average, within twice
        # the time R rounds of a nominal peer take (churn, start-up and slower peers stretch it)
        self.target_rounds = rounds
        if rounds is not None:
            sc.duration_s = 2 * rounds * self.nominal_round_s(probe_task)
        self.sample_s = self.sim.sample_every_s or sc.duration_s / samples

    # --- set-up --------------------------------------------------------------------------
    def nominal_round_s(self, task: Task) -> float:
        """A round of a peer at the nominal speed and link: its cadence's steps or its pulls,
        whichever takes longer (training goes on during a round). `--rounds` sets the
        duration from it; the summary reports the rounds peers actually completed."""
        d = sum(p.numel() for p in task.make_model().parameters())
        pull = 2 * self.sim.latency_s + 4 * d * self.config.partners / self.sim.down_bytes_s + 4 * d / self.sim.up_bytes_s
        steps = (self.cadence.every_steps or 1) * self.sim.step_s
        return max(steps, pull) if self.cadence.every_steps else max(self.config.gossip_every_s, pull)

    def _peer_id(self, p: SimPeer) -> str:
        fresh = p.lives and not self.sc.churn.keep_identity
        return f"sim{p.slot:05d}" + (f"x{p.lives}" if fresh else "")

    def _shard(self, slot: int) -> tuple[int, int, str]:
        sc = self.sc
        if slot >= sc.peers:  # attackers, as scripts/experiment.py starts them
            return (0, 1, "iid") if sc.attack.name in TARGETED else self._shard(slot % sc.peers)
        # one shard per honest peer, as the real runner, but never more shards than training
        # examples: an empty shard has nothing to train on (10,000 peers on MNIST-1D's 4,000)
        n = self.sim.shards or min(sc.peers, self._train_size())
        return slot % n, n, sc.split

    def _train_size(self) -> int:
        if self._examples is None:
            self._examples = len(load_task(self.sc.task, shard=0, num_shards=1, seed=self.config.data_seed).y_train)
        return self._examples

    def _task(self, slot: int) -> Task:
        """The shard's task, built once and shared (tensors included) by every peer of that shard."""
        key = self._shard(slot)
        if key not in self._tasks:
            i, n, split = key
            self._tasks[key] = load_task(self.sc.task, shard=i, num_shards=n, split=split, alpha=self.sc.alpha,
                                         seed=self.config.data_seed)
        return self._tasks[key]

    def _new_learner(self, p: SimPeer) -> None:
        import dataclasses

        task = dataclasses.replace(self._task(p.slot))  # this peer's own Task object, the shard's tensors
        p.behaviour = behaviour_for(self.sc.attack.name if p.role == "attacker" else None, p.peer_id)
        if not p.behaviour.honest:
            p.behaviour.colluders = self.attacker_ids - {p.peer_id}
            p.behaviour.poison(task)  # a data attack swaps in its own (relabelled) tensors
        seed = (self.sc.seed * 1_000_003 + zlib.crc32(p.peer_id.encode())) % 2**32
        batch_seed = p.behaviour.data_seed if p.behaviour.data_seed is not None else seed
        probe_n = task.loss_probe_samples if self.config.loss_probe_samples is None else self.config.loss_probe_samples
        if self.sc.task == LINEAR_TASK:
            if self._init_flat is None:
                torch.manual_seed(self.config.data_seed)  # every peer of a run starts from the same weights
                model = task.make_model()
                self._init_flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
            p.learner = LinearLearner(task, self._init_flat, seed=batch_seed)
            p.probe = LinearLossProbe(p.learner, probe_n) if probe_n > 0 else None
        else:
            from peer.loss_probe import LossProbe
            from peer.trainer import Trainer

            p.learner = Trainer(task, seed=self.config.data_seed, eval_every_s=self.config.eval_every_s)
            p.learner._gen.manual_seed(batch_seed)  # as PeerDaemon does for Sybils; others: their own order
            p.probe = LossProbe(task, probe_n) if probe_n > 0 else None
        self.payload_bytes = 4 * p.learner.flat.numel()

    # --- lives -----------------------------------------------------------------------------
    def start(self, p: SimPeer, fresh_start: bool) -> None:
        """A (re)join: a process starts; after `startup_s` it heartbeats and trains (a joiner
        that resumes nothing syncs from the swarm first)."""
        now = self.loop.now
        if p.up or p.starting:
            return
        p.starting = True
        keep = self.sc.churn.keep_identity and p.lives > 0
        if p.lives and not self.sc.churn.keep_identity:
            p.dir_name = f"p{p.slot}.{p.lives}"
        p.peer_id = self._peer_id(p)
        p.lives += 1
        self.log("start", p)
        if fresh_start and p.role == "honest":
            self.events[-1]["time"] = -1e-3  # before the run's start, as the real runner's first starts
        life = p.life

        def begin() -> None:
            if p.life != life:
                return
            p.starting = False
            p.up = True
            self.by_id[p.peer_id] = p
            resumed = keep and p.checkpoint is not None
            self._new_learner(p)  # a new process: a fresh trainer and behaviour
            if resumed:
                p.learner.load_state_dict(p.checkpoint)  # its data dir's checkpoint
            else:
                p.checkpoint = None
            p.core = PeerCore(p.peer_id, self.config, p.learner.task.name, p.behaviour.aggregator or self.aggregator)
            p.core.view.check = self.store.check  # one parse per published record for the whole swarm
            speed = math.exp(self.rng.gauss(0.0, self.sim.step_s_spread)) if self.sim.step_s_spread else 1.0
            g = self.sc.settings_for(p.slot)
            p.step_s = self.sim.step_s * speed + g.step_delay_s
            rate = g.rate_mbit * 125_000
            p.link = Link(min(self.sim.up_bytes_s, rate or math.inf), min(self.sim.down_bytes_s, rate or math.inf),
                          self.sim.latency_s + g.delay_ms / 1000)
            p.lines.setdefault(p.dir_name, []).append({"time": self.loop.now, "event": "join", "peer_id": p.peer_id,
                                                       "attack": self.sc.attack.name if p.role == "attacker" else None})
            self.heartbeat(p)
            live = p.core.view.live(self.loop.now)
            if not resumed and not fresh_start and live:
                chosen = random.Random(p.peer_id).sample(sorted(i.record.peer_id for i in live), min(3, len(live)))
                self.start_round(p, chosen, sync=True)
            else:
                self._run(p)

        self.loop.at(now + (0.0 if fresh_start else self.sim.startup_s), begin)

    def _run(self, p: SimPeer) -> None:
        """Start a life's periodic work: steps, heartbeats, samples, checkpoints, the round timer."""
        life = p.life
        jitter = self.rng.random()
        self.loop.after(p.step_s * jitter, lambda: self.step(p, life))
        self.every(p, life, self.config.heartbeat_s, self.heartbeat, jitter)
        self.every(p, life, self.sample_s, self.sample, jitter)
        self.every(p, life, self.config.checkpoint_every_s, self.save_checkpoint, jitter)
        self.sample(p)
        self.arm_timer(p)

    def every(self, p: SimPeer, life: int, period: float, fn: Callable[[SimPeer], None], phase: float) -> None:
        def tick() -> None:
            if p.life == life and p.up:
                fn(p)
                self.loop.after(period, tick)

        self.loop.after(period * phase, tick)

    def stop(self, p: SimPeer, action: str) -> None:
        """kill: gone without a word (its record expires); leave: a last checkpoint and a "left"
        record, as `peer leave` does."""
        if p.starting and not p.up:
            p.starting = False
            p.life += 1
            self.log(action, p)
            return
        if not p.up:
            self.log("skipped", p, wanted=action)
            return
        now = self.loop.now
        if action == "leave":
            p.checkpoint = p.learner.state_dict()
            self.store.publish(p.peer_id, self.record(p, "left").to_wire(), now + 3 * self.config.heartbeat_s)
            self.sample(p, event="leave")
        self.log(action, p)
        p.up = False
        p.life += 1
        p.round = None
        self.by_id.pop(p.peer_id, None)

    def save_checkpoint(self, p: SimPeer) -> None:
        p.checkpoint = p.learner.state_dict()

    # --- training and gossip ---------------------------------------------------------------
    def step(self, p: SimPeer, life: int) -> None:
        if p.life != life or not p.up:
            return
        t0 = time.perf_counter()
        p.learner.train_step()
        self.timing["train"] += time.perf_counter() - t0
        if self.cadence.due(p.learner.step, p.learner.local_steps):
            p.round_due = True
            if p.round is None:
                self.start_round(p)
        self.loop.after(p.step_s, lambda: self.step(p, life))

    def arm_timer(self, p: SimPeer) -> None:
        """A round `gossip_every_s` after the last one ended, unless steps start one first."""
        life, seq = p.life, p.round_seq

        def fire() -> None:
            if p.life == life and p.up and p.round is None and p.round_seq == seq:
                self.start_round(p)

        self.loop.after(self.config.gossip_every_s, fire)

    def start_round(self, p: SimPeer, partners: list[str] | None = None, sync: bool = False) -> None:
        now = self.loop.now
        p.round_due = False
        p.round_seq += 1
        if partners is None:
            _, partners = p.core.choose_partners(now, p.behaviour.avoid)
        if not partners:
            p.core.stats.counters["rounds_no_partner"] += 1
            self.arm_timer(p)
            return
        own = p.learner.snapshot()
        if not sync and not p.behaviour.honest:  # an honest peer's round_start reads nothing
            p.behaviour.round_start(own, p.learner.history())
        rnd = p.round = Round(p.round_seq, own, list(partners), sync=sync, pending=len(partners))
        for q in partners:
            self.pull(p, q, rnd)

    def pull(self, p: SimPeer, server_id: str, rnd: Round) -> None:
        life = p.life
        server = self.by_id.get(server_id)
        rtt = p.link.latency_s + (server.link.latency_s if server is not None else self.sim.latency_s)

        def serve() -> None:
            s = self.by_id.get(server_id)
            if s is None or not s.up:
                return self.loop.after(rtt / 2, lambda: self.arrived(p, life, rnd, server_id, None, "unreachable"))
            if s.core.admit(p.peer_id, self.loop.now) is not None:  # answered with an error header
                return self.loop.after(rtt / 2, lambda: self.arrived(p, life, rnd, server_id, None, "remote_error"))
            s.core.serve_started(p.peer_id)
            model = s.learner.snapshot()
            if not s.behaviour.honest:
                model = s.behaviour.serve(p.peer_id, model).contiguous()
            got = (s.learner.step, model, s, s.life)
            s.link.uploads += 1
            p.link.downloads += 1
            dt = transfer_seconds(self.payload_bytes, s.link, p.link)
            s.core.stats.counters["bytes_sent"] += self.payload_bytes
            s.core.stats.served_bytes["models"] += self.payload_bytes
            self.serves[server_id] += 1
            self.loop.after(rtt / 2 + dt, lambda: self.arrived(p, life, rnd, server_id, got, None))

        self.loop.after(rtt / 2, serve)

    def arrived(self, p: SimPeer, life: int, rnd: Round, server_id: str, got, failure: str | None) -> None:
        if got is not None:
            _, _, s, _ = got
            s.link.uploads -= 1
            p.link.downloads -= 1
            if s.life == got[3]:
                s.core.serve_ended(p.peer_id)
                s.core.stats.counters["serves"] += 1
            else:
                got, failure = None, "disconnected"  # the server went away mid-transfer
        if p.life != life or p.round is not rnd:
            return  # we went away ourselves
        now = self.loop.now
        if got is None:
            p.core.pull_failed(server_id, failure, now)
        else:
            p.core.stats.counters["bytes_received"] += self.payload_bytes
            step, model = got[0], got[1]
            if p.core.accept(server_id, rnd.own, model, now):
                rnd.got.append((server_id, step, model))
        rnd.pending -= 1
        if rnd.pending == 0:
            self.finish_round(p, rnd)

    def finish_round(self, p: SimPeer, rnd: Round) -> None:
        now = self.loop.now
        p.round = None
        if rnd.sync:
            if rnd.got:
                p.learner.load_flat(coordinate_median([m for _, _, m in rnd.got]))
                p.learner.set_step(sorted(s for _, s, _ in rnd.got)[len(rnd.got) // 2])
            self._run(p)
            return
        p.rounds_total += 1
        if not rnd.got:
            p.core.stats.counters["rounds_failed"] += 1
        else:
            ids, steps, models = [g[0] for g in rnd.got], [g[1] for g in rnd.got], [g[2] for g in rnd.got]
            p.behaviour.observe(ids, models)
            t0 = time.perf_counter()
            ctx = self.round_context(p, ids, now)
            t1 = time.perf_counter()
            mix, p.probe = p.core.aggregate(rnd.own, models, ctx, p.probe)
            t2 = time.perf_counter()
            p.core.last_round = p.core.mixed(mix, ctx, now)
            self.timing["context"] += t1 - t0
            self.timing["mix"] += t2 - t1
            self.calls["mix"] += 1
            p.learner.apply_delta(mix.model - rnd.own)
            target = adopted_step(p.learner.step, steps, mix.weights)
            if target is not None:
                p.learner.advance_step(target)
        if p.round_due:
            self.start_round(p)
        else:
            self.arm_timer(p)

    def round_context(self, p: SimPeer, ids: list[str], now: float) -> RoundContext:
        """`PeerCore.round_context`, with each record's history sketch decoded once for the whole
        swarm (`RecordStore.sketch`) instead of once per reader per round, and none decoded for
        a rule that reads none."""
        sketches = {}
        if self.uses_sketches:
            sketches = {i.record.peer_id: self.store.sketch(i.record.peer_id, i.record.history)
                         for i in p.core.view.live(now) if i.record.history}
        return RoundContext(self_id=p.peer_id, partner_ids=ids, sketches=sketches,
                            byzantine_fraction=self.config.byzantine_fraction)

    # --- discovery -------------------------------------------------------------------------
    def record(self, p: SimPeer, state: str = "up") -> PeerRecord:
        history = b""
        if self.uses_sketches:
            if not hasattr(self, "_sketcher"):
                self._sketcher = Sketcher(p.learner.flat.numel(), SKETCH_DIM)
            sketch = p.behaviour.report_history(self._sketcher(p.learner.history()))
            history = sketch.to(torch.float16).numpy().tobytes()
        loss, acc = p.learner.last_loss, p.learner.metrics.get("accuracy")
        return PeerRecord(peer_id=p.peer_id, addrs=(f"/sim/{p.peer_id}",), task=p.learner.task.name, step=p.learner.step,
                          samples_per_s=round(p.learner.task.batch_size / p.step_s, 1), version=p.learner.step,
                          time=self.loop.now, state=state, history=history,
                          loss=loss if loss is not None and math.isfinite(loss) else None,
                          accuracy=acc if acc is not None and math.isfinite(acc) else None)

    def heartbeat(self, p: SimPeer) -> None:
        now = self.loop.now
        t0 = time.perf_counter()
        self.store.publish(p.peer_id, self.record(p).to_wire(), now + 3 * self.config.heartbeat_s)
        p.core.records(self.store.lookup(now), now)
        self.timing["view"] += time.perf_counter() - t0
        self.calls["view"] += 1

    # --- measurement -----------------------------------------------------------------------
    def sample(self, p: SimPeer, event: str = "metrics") -> None:
        t0 = time.perf_counter()
        m = p.learner.evaluate()
        self.timing["eval"] += time.perf_counter() - t0
        live = len(p.core.view.live(self.loop.now))
        if p.role == "honest":
            self.view_sizes.append(live)
        stats = p.core.stats
        p.lines[p.dir_name].append({
            "time": self.loop.now, "event": event, "step": p.learner.step, "samples": p.learner.samples,
            "loss": p.learner.last_loss, "accuracy": m.get("accuracy"), "test_loss": m.get("test_loss"),
            "samples_per_s": round(p.learner.task.batch_size / p.step_s, 1),
            **{k: stats.counters[k] for k in ("rounds_ok", "rounds_failed", "rounds_no_partner", "bytes_sent", "bytes_received")},
            "rejected": dict(stats.rejected), "pull_failed": dict(stats.pull_failed),
            "view": live, **({"exit_code": 0} if event == "leave" else {}),
        })

    def log(self, action: str, p: SimPeer | None = None, **kw) -> None:
        line = {"time": self.loop.now, "t": round(self.loop.now, 3), "action": action, **kw}
        if p is not None:
            line.update(peer=p.dir_name, slot=p.slot, role=p.role)
        self.events.append(line)

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        # The swarm holds millions of long-lived objects (an entry per peer per view) and allocates
        # about a thousand per heartbeat; with the default gen-0 threshold (700) the cyclic
        # collector scanned them thousands of times (a fifth of a 1,000-peer run). Collections
        # only free cycles, so collecting less often changes no result.
        thresholds = gc.get_threshold()
        gc.set_threshold(100_000, *thresholds[1:])
        try:
            return self._simulate()
        finally:
            gc.set_threshold(*thresholds)

    def _simulate(self) -> dict[str, Any]:
        sc = self.sc
        wall0 = time.monotonic()
        schedule = churn_schedule(sc)
        self.log("run_start", scenario=sc.to_dict(), schedule=[{"at": e.at, "action": e.action, "peer": e.peer} for e in schedule])
        honest = [p for p in self.peers if p.role == "honest"]
        attackers = [p for p in self.peers if p.role == "attacker"]
        for p in honest:
            self.start(p, fresh_start=True)

        def attack() -> None:
            self.log("attack_start", attack=sc.attack.name, count=len(attackers))
            for p in attackers:
                self.start(p, fresh_start=sc.attack.start_s <= 0)

        if attackers:
            self.loop.at(max(0.0, sc.attack.start_s), attack)
        for ev in schedule:
            p = self.peers[ev.peer]
            self.loop.at(ev.at, (lambda p=p, a=ev.action: self.start(p, fresh_start=False)) if ev.action == "join"
                         else (lambda p=p, a=ev.action: self.stop(p, a)))
        def tick(now: float) -> None:
            if self.progress is not None:
                self.progress(now, self)
            if self.target_rounds is not None and self.mean_rounds() >= self.target_rounds:
                self.loop.stop()

        self.loop.run(sc.duration_s, on_tick=tick, tick_s=max(sc.duration_s / 400, 1e-3))
        sc.duration_s = self.loop.now  # where the run ended (earlier with --rounds)
        self.log("stop")
        for p in self.peers:
            if p.up:
                self.stop(p, "leave")
        self.events = [e for e in self.events if not (e["action"] == "leave" and e["time"] >= sc.duration_s)] + \
            [{"time": sc.duration_s, "t": sc.duration_s, "action": "run_end"}]
        return self.result(time.monotonic() - wall0)

    def mean_rounds(self) -> float:
        """Rounds completed per honest peer slot, on average (over all its lives)."""
        return sum(p.rounds_total for p in self.peers if p.role == "honest") / max(1, self.sc.peers)

    def peer_lines(self) -> dict[str, list[dict]]:
        return {name: lines for p in self.peers for name, lines in p.lines.items()}

    def result(self, wall_s: float) -> dict[str, Any]:
        """The simulator's own figures (the scenario summary comes from peer.experiment.collect)."""
        honest_final = []
        for p in self.peers:
            if p.role != "honest":
                continue
            last = p.lines.get(p.dir_name) or []
            metric = [r for r in last if r.get("accuracy") is not None]
            if metric:
                honest_final.append(metric[-1]["accuracy"])
        served = sorted(self.serves.values())
        ever = {p.peer_id for p in self.peers if p.peer_id}
        spread = None
        if honest_final:
            q = statistics.quantiles(honest_final, n=10) if len(honest_final) >= 2 else [honest_final[0]] * 9
            spread = {"min": round(min(honest_final), 4), "p10": round(q[0], 4), "median": round(statistics.median(honest_final), 4),
                      "p90": round(q[-1], 4), "max": round(max(honest_final), 4)}
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "peers": len(self.peers), "honest": self.sc.peers, "attackers": self.sc.attack.count,
            "rounds": round(self.mean_rounds(), 1), "target_rounds": self.target_rounds,
            "virtual_s": round(self.sc.duration_s, 3), "wall_s": round(wall_s, 1), "peak_rss_mb": round(rss_mb, 1),
            "honest_final_accuracy": spread,
            "events": self.loop.processed,
            "view_live_mean": round(statistics.mean(self.view_sizes), 1) if self.view_sizes else 0,
            "view_live_max": max(self.view_sizes, default=0),
            "served_per_peer": ({"min": served[0], "median": served[len(served) // 2], "max": served[-1],
                                 "never_pulled": len(ever - set(self.serves))} if served else None),
            "wall_by_part_s": {k: round(v, 1) for k, v in sorted(self.timing.items())},
            # the rule's cost per round (SybilWall's scoring grows with the histories in the view)
            # and a heartbeat's (publish, lookup, view update: grows with the records of the run)
            "mix_ms_per_round": round(1e3 * self.timing["mix"] / max(1, self.calls["mix"]), 3),
            "view_ms_per_heartbeat": round(1e3 * self.timing["view"] / max(1, self.calls["view"]), 3),
            "aggregator": self.aggregator, "task": self.sc.task,
        }
