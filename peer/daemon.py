"""The peer daemon: the asyncio shell around `PeerCore` (peer/core.py).

It does the I/O and forwards to the core with `now=transport.now()`: heartbeats publish our record
and feed lookups to the core's view; a gossip round asks the core for partners, pulls each one's
model concurrently with a deadline, lets the core judge and mix them (the rule runs in a worker
thread), and adds `mix - snapshot` to the live model, so local steps taken during the round are
kept; with outer steps a round is an outer round instead (`OuterRounds`, peer/outer_rounds.py).
Serving asks the core whether to admit a requester. It also owns the trainer thread, the timers,
the data-dir lock, checkpoints, the metrics file and the control socket; it owns every background
task (nothing else starts tasks). The daemon never crashes on a peer's behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from peer import state as ckpt
from peer.aggregation import check_byzantine_fraction, coordinate_median
from peer.aggregation.rules import Mix
from peer.behaviour import Behaviour
from peer.aggregation.sybil import shared_sketcher
from peer.cadence import RoundBacklog, StepCadence
from peer.config import PeerConfig, load_allowed_peers
from peer.control import serve_control
from peer.core import QUIET_REPLIES, PeerCore, adopted_step, progress
from peer.datadir import prepare_data_dir
from peer.known_peers import KnownPeers
from peer.loss_probe import LossProbe
from peer.metrics import Exporter
from peer.metrics_log import MetricsLog
from peer.outer_rounds import OuterRounds
from peer.transfers import Transfers
from peer.preflight import StartError
from peer.snapshots import ServedSnapshots
from peer.tasks import Task, load_task
from peer.trainer import Trainer
from protocols import gossip
from protocols.compression import compress
from protocols.codec import DEFAULT_LIMITS, ProtocolError, TensorSpec, read_header, write_header
from protocols.discovery import SKETCH_DIM, MAX_RECORD_TTL_S, PeerRecord, run_key, swarm_totals
from protocols.loglimit import LogLimiter
from protocols.transport.base import Transport, TransportError
from protocols.transport.nat import relay_news

log = logging.getLogger("peer.daemon")


class DataDirLocked(StartError):
    pass


def shard_for(config: PeerConfig, peer_id: str) -> tuple[int, int]:
    """This peer's data shard: `--shard i/n` if given, else a stable hash of the peer id."""
    if config.shard:
        i, n = config.shard.split("/")
        return int(i), int(n)
    n = config.num_shards
    return int(hashlib.sha256(peer_id.encode()).hexdigest(), 16) % n, n


def pull_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return exc.reason
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, TransportError):
        return "unreachable"
    if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError, EOFError)):
        return "disconnected"
    return f"error_{type(exc).__name__}"


def _finite(x: float | None) -> float | None:
    """A number for status JSON: rounded, and None where it is not finite (JSON has no inf/nan)."""
    return round(x, 3) if x is not None and math.isfinite(x) else None


class PeerDaemon(OuterRounds):
    """The asyncio shell around a `PeerCore`: transport, trainer thread, timers, files."""

    def __init__(self, config: PeerConfig, transport: Transport, task: Task | None = None,
                 known_peers: KnownPeers | None = None, behaviour: Behaviour | None = None):
        check_byzantine_fraction(config.byzantine_fraction)  # every round's RoundContext needs it
        self.config = config
        self.transport = transport
        self.peer_id = transport.peer_id
        self.data_dir = Path(config.data_dir)
        self.shard = shard_for(config, self.peer_id)
        self.task = task or load_task(
            config.task, shard=self.shard[0], num_shards=self.shard[1],
            split=config.split, alpha=config.alpha, seed=config.data_seed,
        )
        self.behaviour = behaviour or Behaviour()
        if not self.behaviour.honest:
            self.behaviour.poison(self.task)
            log.warning("EXPERIMENT: running as an attacker (%s)", self.behaviour.name)
        self.trainer = Trainer(
            self.task, seed=config.data_seed, eval_every_s=config.eval_every_s,
            max_steps=config.max_steps, step_delay_s=config.step_delay_s, nice=config.train_nice,
        )
        if self.behaviour.data_seed is not None:
            self.trainer.seed_batches(self.behaviour.data_seed)
        # one checkpoint per run and task: the data dir is shared by every run this user joins
        self.checkpoint_path = ckpt.checkpoint_path(self.data_dir, config.run_id, self.task.name)
        self.snapshots = ServedSnapshots(self.trainer)  # what partners pull
        self.specs = [TensorSpec("flat", "float32", (self.trainer.flat.numel(),))]
        self.allowed = load_allowed_peers(config.allow_peers)  # None: an open run
        self.core = PeerCore(self.peer_id, config, self.task.name, self.behaviour.aggregator, self.allowed)
        # the default rule's loss screen needs each partner's loss on our own data
        probe = self.task.loss_probe_samples if config.loss_probe_samples is None else config.loss_probe_samples
        self.loss_probe = (LossProbe(self.task, probe)
                           if probe > 0 and self.core.aggregator.uses_loss_deltas else None)
        self.sketcher = shared_sketcher(self.trainer.flat.numel(), SKETCH_DIM)  # the rule's too
        if 3 * config.heartbeat_s > MAX_RECORD_TTL_S:
            raise ValueError(f"heartbeat_s {config.heartbeat_s} too long: records live 3 heartbeats, at most {MAX_RECORD_TTL_S:.0f}s")
        self._setup_outer(config)  # peer/outer_rounds.py
        self._round_lock = asyncio.Lock()  # a checkpoint never sees an outer round half done
        # (anchor, model) at the last outer round's start: what a dishonest behaviour crafts from
        self._round_base: tuple[torch.Tensor, torch.Tensor] | None = None
        # with outer steps a round is due every H inner steps, and only then
        self.cadence = (StepCadence(self.outer_settings.every_steps, 0) if self.outer is not None
                        else StepCadence(config.gossip_every_steps, config.gossip_steps_until))
        # peers of the run seen live, remembered in the data dir for the next start (peer/known_peers.py)
        self.known_peers = known_peers or KnownPeers(self.data_dir, config.run_id, self.peer_id)
        self.peer_log = LogLimiter(log)  # lines about peers' misbehaviour, at most 1/min per peer and reason
        self.stats = self.core.stats
        self.counters = self.stats.counters  # (the same dict: CountingStream adds the bytes to it)
        self.transfers = Transfers(config, transport, self.counters, self.trainer.flat.numel(), self.task.name)
        # (monotonic time, bytes sent, bytes received, training seconds) at the last heartbeats:
        # status's rates and utilisation
        self._traffic_samples: collections.deque[tuple[float, int, int, float]] = collections.deque(maxlen=6)
        self.addrs: list[str] = []
        self.phase = "starting"
        self.started = time.time()
        self.last_checkpoint: tuple[int, float] | None = None
        self.metrics_log = MetricsLog(self.data_dir / "metrics.jsonl")
        self._mix_buffer: torch.Tensor | None = None  # the aggregation rule's output, reused every round
        self._receive_buffers: list[torch.Tensor] = []  # partners' models land here, reused every round
        self._stop = asyncio.Event()
        # set once the daemon can be joined: `addrs` known, gossip handler and control socket up.
        # The join line waits for it, so a Ctrl-C after the line finds a started daemon
        # (it leaves cleanly) and never a p2pd control call half done.
        self.listening = asyncio.Event()
        self._lock_fd: int | None = None
        self.exit_code = 0
        self.exporter: Exporter | None = None  # the Prometheus endpoint, when metrics_port is set
        self.metrics_port: int | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> int:
        self._lock_data_dir()
        try:
            self._start_metrics()
            await self._run()
        finally:
            if self.exporter is not None:
                self.exporter.stop()
            self._unlock_data_dir()
        return self.exit_code

    def _start_metrics(self) -> None:
        if self.config.metrics_port is None:
            return
        exporter = Exporter(self.config.metrics_host, self.config.metrics_port)
        try:
            self.metrics_port = exporter.start()
        except OSError as e:
            raise StartError(f"metrics endpoint {self.config.metrics_host}:{self.config.metrics_port}: {e.strerror or e}; "
                             "choose another --metrics-port (0 picks a free one)") from None
        self.exporter = exporter
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)

    async def _run(self) -> None:
        ckpt.remove_stale_temp_files(self.data_dir)
        ckpt.adopt_legacy_checkpoint(self.data_dir)
        resumed = self._resume()
        await self.transport.start()
        control = None
        started = False  # a start that failed saves no checkpoint: it has nothing new to save
        try:
            self.addrs = await self.transport.addrs()
            await self.transport.set_handler(gossip.PROTOCOL, self._serve_model)
            control = await serve_control(self.config.socket_path, self._control)
            self.phase = "syncing"
            self.listening.set()
            await self._heartbeat_once()
            if not resumed and self.config.initial_peers:
                await self._sync_from_swarm()
            self.trainer.start()
            self.phase = "training"
            started = True
            log.info("training %s as %s (shard %d/%d, aggregator %s)", self.task.name, self.peer_id, *self.shard, self.config.aggregator)
            loops = [self._every(self.config.heartbeat_s, self._heartbeat_once),
                     self._gossip_loop(),
                     self._every(self.config.checkpoint_every_s, self._checkpoint),
                     self._watch_trainer()]
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c) for c in loops]
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            self.phase = "leaving"
            self.trainer.stop()
            if started:
                await self._checkpoint()
            self._write_metrics("leave")
            try:  # without it, partners drop us when the last record expires (3 heartbeats)
                await asyncio.wait_for(self._withdraw(), timeout=5)
            except Exception as e:
                log.warning("could not tell the swarm this peer left (%s); its record expires in %.0f s",
                            str(e) or type(e).__name__, 3 * self.config.heartbeat_s)
            if control is not None:
                control.close()
                with contextlib.suppress(FileNotFoundError):
                    self.config.socket_path.unlink()
            await self.transport.stop()
            log.info("left the swarm at step %d", self.trainer.step)

    def _lock_data_dir(self) -> None:
        prepare_data_dir(self.data_dir, self.config.socket_path.name)  # LocalStateError: one line
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLocked(f"another peer daemon is running on {self.data_dir}") from None
        self._lock_fd = fd

    def _unlock_data_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _resume(self) -> bool:
        """Resume from this run's checkpoint, if there is a usable one. One that cannot be used is
        renamed aside with one log line (never deleted, and never overwritten by our next save),
        and the peer starts as a joiner does: from the swarm's models."""
        path = self.checkpoint_path
        try:
            state = ckpt.load_checkpoint(path)
        except ValueError as e:
            log.error("%s; moved to %s", e, ckpt.set_aside(path, "bad").name)
            return False
        if state is None:
            return False
        if state.get("task") != self.task.name or state.get("run_id") != self.config.run_id:
            log.error("checkpoint %s is for run %r task %r, not this one; moved to %s", path.name,
                      state.get("run_id"), state.get("task"), ckpt.set_aside(path, "other").name)
            return False
        try:
            self.trainer.load_state_dict(state)
        except ValueError as e:  # checked before anything was loaded: the trainer is unchanged
            log.error("checkpoint %s is for another model: %s; moved to %s", path.name, e, ckpt.set_aside(path, "mismatch").name)
            return False
        if self.outer is not None:
            try:
                self.outer.load_state_dict(state["outer"])
            except (KeyError, ValueError, TypeError) as e:  # saved without outer steps, or another shape
                self.outer.reset(self.trainer.snapshot())
                log.info("checkpoint has no usable outer-step state (%s); outer steps start from its model", e)
            self.served_anchor = (self.trainer.step, compress(self.outer.anchor, self.anchor_compression))
        self.last_checkpoint = (self.trainer.step, time.time())
        log.info("resumed from checkpoint at step %d", self.trainer.step)
        return True

    async def _every(self, period: float, fn) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=period)
            if not self._stop.is_set():
                try:
                    await fn()
                except Exception:  # a bug in one iteration is logged, the daemon keeps going
                    log.exception("%s failed", getattr(fn, "__name__", fn))

    async def _gossip_loop(self) -> None:
        """A gossip round every `gossip_every_s`, and every `gossip_every_steps` local steps while
        the run is before step `gossip_steps_until` (post-local SGD, peer/cadence.py).

        How far peers drift apart between two mixes grows with the local steps taken, not with
        seconds: mixing every 3 steps cut the samples to 88 % on MNIST-1D from 3-8x to 1.6-1.7x
        those of central training, and a step cadence kept up for the whole run plateaus like
        central batch-400 training (below quickstart's 90 %), so rounds are time-only from the
        run's step 1000 (docs/benchmarks.md, convergence; the defaults, 3 / 1000, are in
        peer/config.py). The trainer asks `StepCadence.due` after each step, so the switch costs nothing here. Rounds never
        overlap: steps taken during a round make the next one due. With outer steps
        (`outer_every_steps` H > 0) a round is due after every H inner steps and at no other time.
        """
        due = asyncio.Event()
        cadence = self.cadence
        if cadence.every_steps > 0:
            loop = asyncio.get_running_loop()

            def steps_taken() -> None:  # in the training thread
                with contextlib.suppress(RuntimeError):  # the loop closed under a stopping trainer
                    loop.call_soon_threadsafe(due.set)

            self.trainer.step_cadence = cadence
            self.trainer.on_steps = steps_taken
            if self.outer is not None and self.config.outer_wait_for_round:
                self.trainer.round_backlog = RoundBacklog(max_unfinished=1)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                step_due = asyncio.ensure_future(due.wait())
                # with outer steps a round comes every H inner steps only: a timer would take outer
                # steps on pseudo-gradients of a few inner steps
                timeout = None if self.outer is not None else self.config.gossip_every_s
                await asyncio.wait((stop, step_due), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                step_due.cancel()
                if self._stop.is_set():
                    return
                due.clear()
                backlog = self.trainer.round_backlog
                if backlog is not None and not backlog.owed():
                    continue  # a late wake-up for a round already run
                try:
                    await self.gossip_round()
                except Exception:  # a bug in one round is logged, the daemon keeps going
                    log.exception("gossip_round failed")
                finally:
                    self.trainer.round_finished()
                if backlog is not None and backlog.owed():
                    # two rounds asked for before this loop woke set `due` once: each must still run,
                    # or the trainer's last round is never run and a waiting trainer lags one forever
                    due.set()
        finally:
            stop.cancel()
            self.trainer.on_steps = None
            self.trainer.round_backlog = None
            self.trainer.round_finished()  # wakes a trainer waiting on a backlog that no longer exists

    async def _watch_trainer(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.5)
            if self.trainer.error is not None:
                log.error("trainer failed: %r; stopping", self.trainer.error)
                self.exit_code = 1
                self.request_stop()

    # --- discovery -------------------------------------------------------------------------
    async def _record(self, state: str = "up") -> PeerRecord:
        history = await self._history_sketch()
        loss = self.trainer.last_loss  # unrounded: a small training loss would round to 0
        return PeerRecord(
            peer_id=self.peer_id, addrs=tuple(self.addrs[:16]), task=self.task.name,
            step=self.trainer.step, samples_per_s=round(self.trainer.samples_per_s, 1),
            version=self.trainer.step, time=self.transport.now(), state=state,
            history=history.to(torch.float16).numpy().tobytes(),
            loss=loss if loss is not None and math.isfinite(loss) else None,
            accuracy=_finite(self.trainer.metrics.get("accuracy")),
        )

    async def _history_sketch(self) -> torch.Tensor:
        # a hostile behaviour sees the live peers' reported sketches (framing copies one); an
        # honest peer skips the lookup
        others = None if self.behaviour.honest else self.core.reported_sketches(self.transport.now())
        # in a thread: it waits for the trainer's lock (up to one training step) and reads the
        # whole model, neither of which the event loop may do
        own = await asyncio.to_thread(self.trainer.sketch_history, self.sketcher)
        return self.behaviour.report_history(own, others)

    async def _heartbeat_once(self) -> None:
        key = run_key(self.config.run_id)
        try:
            # re-read: p2pd adds a relayed address once a relay grants a reservation (auto-relay)
            before, self.addrs = self.addrs, await self.transport.addrs() or self.addrs
            news = relay_news(before, self.addrs, self.peer_id)
            if news is not None:  # at most one a minute: a reservation that flickers is not a flood
                self.peer_log.info(("relayed addresses",), "%s", news)
            record = await self._record()
            now = self.transport.now()
            await self.transport.publish(key, record.to_wire(), now + 3 * self.config.heartbeat_s)
            live = self.core.records(await self.transport.lookup(key), self.transport.now())
            self.known_peers.note((i.record.peer_id, i.record.addrs) for i in live)
        except Exception as e:
            log.warning("heartbeat failed: %s", e)
        self._traffic_samples.append((time.monotonic(), self.counters["bytes_sent"], self.counters["bytes_received"],
                                      self.trainer.train_seconds))
        self._write_metrics()
        if self.exporter is not None:
            self.exporter.update(self.status())

    async def _withdraw(self) -> None:
        record = await self._record("left")
        now = self.transport.now()
        await self.transport.publish(run_key(self.config.run_id), record.to_wire(), now + 3 * self.config.heartbeat_s)

    # --- gossip ----------------------------------------------------------------------------
    def pull_model(self, peer_id: str, addrs: list[str] | None = None,
                   into: torch.Tensor | None = None, concurrent: int = 1):
        """(step, model) of a partner (`Transfers.pull_model`); a coroutine."""
        return self.transfers.pull_model(peer_id, addrs, into, concurrent)

    async def _pulled(self, peer_id: str, pull, quiet_ok: bool = False) -> Any:
        """Await one pull; every way a partner can fail us ends here, as a counted reason (None).
        With `quiet_ok` (pseudo-gradient pulls), "not_newer" / "not_ready" are a partner with
        nothing new for us (`PeerCore.nothing_new`)."""
        try:
            return await pull
        except ProtocolError as e:
            if quiet_ok and e.reason == "remote_error" and e.detail in QUIET_REPLIES:
                self.core.nothing_new(peer_id, e.detail, self.transport.now())
                return None
            failure: Exception = e
        except Exception as e:
            failure = e
        reason = pull_failure_reason(failure)
        delay = self.core.pull_failed(peer_id, reason, self.transport.now())
        log.info("pull from %s failed: %s (%s); skipping it for %.0fs", peer_id[:12], reason, str(failure)[:80], delay)
        return None

    async def _pull_checked(self, peer_id: str, addrs: list[str], own: torch.Tensor,
                            into: torch.Tensor | None = None, concurrent: int = 1) -> tuple[int, torch.Tensor] | None:
        """(step, model) of a partner if it arrived and passed validation; otherwise count and log why not."""
        got = await self._pulled(peer_id, self.pull_model(peer_id, addrs, into, concurrent))
        if got is None or not self.core.accept(peer_id, own, got[1], self.transport.now()):
            return None
        return got

    def _receive_into(self, like: torch.Tensor, n: int) -> list[torch.Tensor | None]:
        """n receive buffers reused every round (fresh memory for a large model costs more in page
        faults than the transfer); nothing keeps them past the round (the rule copies what it
        needs, apply_delta copies the result). An attacker keeps what it pulled: fresh tensors."""
        if not self.behaviour.honest:
            return [None] * n
        while len(self._receive_buffers) < n:
            self._receive_buffers.append(torch.empty_like(like))
        return list(self._receive_buffers[:n])

    async def gossip_round(self) -> bool | None:
        """One round; True if at least one partner was mixed in, None if there was nobody to ask."""
        if self.outer is not None:
            return await self.outer_round()
        now = self.transport.now()
        live, partners = self.core.choose_partners(now, self.behaviour.avoid)
        if not partners:
            self.counters["rounds_no_partner"] += 1
            return None
        own = self.trainer.snapshot()
        self.behaviour.round_start(own, self.trainer.history())
        into = self._receive_into(own, len(partners))
        pulled = await asyncio.gather(*(self._pull_checked(p, list(live[p].record.addrs), own, buf, len(partners))
                                        for p, buf in zip(partners, into)))
        got = [(p, r[0], r[1]) for p, r in zip(partners, pulled) if r is not None]
        if not got:
            self.counters["rounds_failed"] += 1
            return False
        ids, steps, models = [p for p, _, _ in got], [s for _, s, _ in got], [m for _, _, m in got]
        self.behaviour.observe(ids, models)
        result, report = await self._mix(own, ids, models, now)
        self.trainer.apply_delta(result.model.sub_(own))
        self.core.last_round = report
        self._adopt_swarm_step(steps, result.weights)
        return True

    def _adopt_swarm_step(self, steps: list[int], weights: list[float]) -> None:
        """Take the swarm's step when most partners the rule mixed are ahead (`core.adopted_step`)."""
        before = self.trainer.step
        target = adopted_step(before, steps, weights)
        if target is not None and self.trainer.advance_step(target):
            if self.counters["steps_adopted"] == 0:
                log.info("the swarm is ahead: step %d adopted from partners (ours was %d)", target, before)
            self.counters["steps_adopted"] += target - before

    async def _mix(self, own: torch.Tensor, ids: list[str], models: list[torch.Tensor], now: float) -> tuple[Mix, dict[str, Any]]:
        """Run the loss probe and the rule on our model and the partners' off the event loop, then
        let the core learn from the result; returns it and the round's report (`core.mixed`). Its
        model is a buffer reused every round (the caller copies what it needs out of it before the next)."""
        ctx = self.core.round_context(ids, now)
        if self._mix_buffer is None or self._mix_buffer.shape != own.shape:
            self._mix_buffer = torch.empty_like(own)
        result, self.loss_probe = await asyncio.to_thread(self.core.aggregate, own, models, ctx, self.loss_probe, self._mix_buffer)
        return result, self.core.mixed(result, ctx, now)

    async def _sync_from_swarm(self) -> None:
        """A joiner takes the coordinate median of several live peers' models, not one donor's."""
        deadline = time.monotonic() + self.config.join_sync_timeout_s
        own = self.trainer.snapshot()
        while time.monotonic() < deadline and not self._stop.is_set():
            live = self.core.view.live(self.transport.now())
            if live:
                chosen = random.Random(self.peer_id).sample(live, min(3, len(live)))
                pulled = await asyncio.gather(*(self._pull_checked(i.record.peer_id, list(i.record.addrs), own) for i in chosen))
                got = [r for r in pulled if r is not None]
                for info, r in zip(chosen, pulled):
                    if r is not None:
                        self.core.picker.succeeded(info.record.peer_id)
                if got:
                    step, count = sorted(s for s, _ in got)[len(got) // 2], len(got)
                    # into the first pulled model (a fresh tensor): at most 1 + len(got) copies
                    median = coordinate_median([m for _, m in got], out=got[0][1])
                    del pulled, got, own
                    self.trainer.load_flat(median)
                    del median
                    if self.outer is not None:
                        self.outer.reset(self.trainer.snapshot())
                        self.served_anchor = (step, compress(self.outer.anchor, self.anchor_compression))
                    self.trainer.set_step(step)
                    log.info("synced model (step %d) from %d of %d live peers", self.trainer.step, count, len(live))
                    return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.5)
            await self._heartbeat_once()
        log.warning("no live peer answered within %.0fs; starting from a fresh model", self.config.join_sync_timeout_s)

    async def _serve_model(self, raw_stream) -> None:
        stream = self.transfers.stream(raw_stream)
        remote = stream.remote_peer
        refusal = self.core.admit(remote, self.transport.now())
        if refusal is not None:  # answered without reading the request: refusing costs us nothing
            self.peer_log.info((remote, refusal), "refused request from %s: %s", remote[:12], refusal)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(write_header(stream, gossip.error_header(refusal)), timeout=2)
            return
        self.core.serve_started(remote)
        try:
            header = await asyncio.wait_for(read_header(stream, DEFAULT_LIMITS), timeout=10)
            if gossip.check_request(header, self.config.run_id, self.task.name) == "get_delta":
                await self._serve_delta(stream, header)
                self.counters["serves"] += 1
                return
            if self.outer is not None and self.behaviour.honest:
                # with outer steps partners and joiners mix anchors, the point every peer's
                # inner steps start from: a compressed payload replaced, never written, after each round
                step, payload = self.served_anchor
                await write_header(stream, gossip.model_header(step, payload.specs, payload.header))
                await self.transfers.send_sized(stream, payload.parts, payload.nbytes, self.core.serving)
                self.stats.served_bytes["anchors"] += payload.nbytes
                self.counters["serves"] += 1
                return
            if self.behaviour.honest:
                lease = self.snapshots.lease()  # shared while unchanged, never overwritten while sent
            else:
                snap = self.behaviour.serve(remote, self.trainer.snapshot()).contiguous()
                lease = contextlib.nullcontext((self.trainer.step, snap))
            with lease as (step, snap):
                await write_header(stream, gossip.model_header(step, self.specs))
                await self.transfers.send_sized(stream, [snap.numpy()], self.specs[0].nbytes, self.core.serving)
            self.stats.served_bytes["models"] += self.specs[0].nbytes
            self.counters["serves"] += 1
        except ProtocolError as e:
            self.core.serve_failed(remote, e.reason, self.transport.now(), malformed=True)
            self.peer_log.info((remote, e.reason), "refused request from %s: %s", remote[:12], e)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(write_header(stream, gossip.error_header(e.reason)), timeout=2)
        except Exception as e:
            reason = pull_failure_reason(e)
            self.core.serve_failed(remote, reason, self.transport.now())
            self.peer_log.info((remote, reason), "serving %s failed: %s", remote[:12], reason)
        finally:
            self.core.serve_ended(remote)

    # --- persistence -----------------------------------------------------------------------
    async def _checkpoint(self) -> None:
        # The lock is held until the writer thread is done, even if this task is cancelled:
        # outer state changes only in rounds, so the writer reads the live anchor and momentum
        # (no copies), and the state's copies (model, history) never meet an outer round's
        # temporaries. Training goes on meanwhile; only the next outer round waits.
        async with self._round_lock:  # model and outer state from between two outer rounds
            state = await asyncio.to_thread(self.trainer.state_dict)  # waits for a step; copies the model
            if self.outer is not None:
                state["outer"] = self.outer.state_dict(copy=False)
            state.update(run_id=self.config.run_id, task=self.task.name, peer_id=self.peer_id)
            writing = asyncio.ensure_future(asyncio.to_thread(ckpt.save_checkpoint, self.checkpoint_path, state))
            try:
                try:
                    await asyncio.shield(writing)
                except asyncio.CancelledError:
                    await asyncio.gather(writing, return_exceptions=True)  # the thread cannot be stopped
                    raise
            except Exception as e:  # a full disk must not stop training; the previous checkpoint is intact
                self.counters["checkpoint_errors"] += 1
                kept = f"step {self.last_checkpoint[0]}" if self.last_checkpoint else "none yet"
                log.error("%s; the previous checkpoint (%s) is kept", e, kept)
                return
        self.counters["checkpoints"] += 1
        self.last_checkpoint = (state["step"], time.time())

    def _write_metrics(self, event: str = "metrics") -> None:
        extra = {"exit_code": self.exit_code} if event == "leave" else {}
        self.metrics_log.write({**self._metrics(), **extra}, event, join={
            "peer_id": self.peer_id, "pid": os.getpid(), "attack": None if self.behaviour.honest else self.behaviour.name})

    # --- status / control ------------------------------------------------------------------
    def _metrics(self) -> dict[str, Any]:
        m = self.trainer.metrics
        return {
            "step": self.trainer.step, "samples": self.trainer.samples, "loss": self.trainer.last_loss,
            "accuracy": m.get("accuracy"), "test_loss": m.get("test_loss"), "bits_per_byte": m.get("bits_per_byte"),
            "samples_per_s": round(self.trainer.samples_per_s, 1),
            **{k: self.counters[k] for k in ("rounds_ok", "rounds_failed", "rounds_no_partner", "bytes_sent", "bytes_received")},
            "outer_step": self.outer.outer_step if self.outer is not None else None,
            "rejected": dict(self.stats.rejected), "pull_failed": dict(self.stats.pull_failed),
        }

    def status(self) -> dict[str, Any]:
        now = self.transport.now()
        live = sorted(self.core.view.live(now), key=lambda i: i.record.peer_id)
        core = self.core.status(now)
        return {
            "peer_id": self.peer_id, "addrs": self.addrs, "run_id": self.config.run_id,
            "task": self.task.name, "shard": f"{self.shard[0]}/{self.shard[1]}",
            "aggregator": self.config.aggregator, "phase": self.phase, "pid": os.getpid(),
            "gossip_cadence": f"{self.cadence.describe(self.trainer.step)}; at least every {self.config.gossip_every_s:g} s",
            "uptime_s": round(time.time() - self.started, 1), "train_nice": self.trainer.nice,
            **self._metrics(),
            "steps_adopted": self.counters["steps_adopted"],
            "progress": progress(self.trainer.step, self.config.max_steps, self.trainer.steps_per_s),
            "live_peers": [
                {"peer_id": i.record.peer_id, "step": i.record.step, "samples_per_s": i.record.samples_per_s,
                 "accuracy": i.record.accuracy, "loss": i.record.loss,
                 "last_seen_s": round(now - i.last_seen, 1), "addrs": list(i.record.addrs)}
                for i in live
            ],
            # this peer and every live peer it sees, from their records
            "swarm": swarm_totals([{"samples_per_s": self.trainer.samples_per_s, "accuracy": self.trainer.metrics.get("accuracy")},
                                   *({"samples_per_s": i.record.samples_per_s, "accuracy": i.record.accuracy} for i in live)]),
            **core,
            "dht_rejects": dict(getattr(getattr(self.transport, "run_records", None), "rejected", None) or {}),
            "dht_rpcs": self.transport.dht_rpcs(),  # DHT RPCs other peers sent us (protocols/dht_guard.py)
            "relay": {"relayed_addrs": [a for a in self.addrs if "/p2p-circuit" in a],  # reachable through a relay
                      "service": self.transport.relay_service(time.time())},  # the relay we serve, if any
            "metrics_port": self.metrics_port,
            "outer": self._outer_status(),
            "traffic": self._traffic_status(),
            "checkpoint": {
                "step": self.last_checkpoint[0] if self.last_checkpoint else None,
                "age_s": round(time.time() - self.last_checkpoint[1], 1) if self.last_checkpoint else None,
                "errors": self.counters["checkpoint_errors"],
            },
        }

    def _traffic_status(self) -> dict[str, Any]:
        """Gossip traffic: totals, rates over the last heartbeats, caps and the link estimate."""
        samples = self._traffic_samples
        up = down = busy = None
        if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
            dt = samples[-1][0] - samples[0][0]
            up = (samples[-1][1] - samples[0][1]) * 8 / dt / 1e6
            down = (samples[-1][2] - samples[0][2]) * 8 / dt / 1e6
            busy = (samples[-1][3] - samples[0][3]) / dt
        rate = self.transfers.link.rate(time.monotonic())
        return {"upload_mbps": _finite(up), "download_mbps": _finite(down), "utilisation": _finite(busy),
                "train_seconds": round(self.trainer.train_seconds, 1), "served_bytes": dict(self.stats.served_bytes),
                "max_upload_mbps": self.config.max_upload_mbps or None, "max_download_mbps": self.config.max_download_mbps or None,
                "link_estimate_mbps": _finite(rate * 8 / 1e6) if rate else None}

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "leave":
            self.request_stop()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {str(cmd)[:32]!r}"}
