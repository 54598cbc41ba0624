"""The peer daemon: wires transport, trainer, gossip, model serving, checkpoints and control.

It owns every background task (nothing else starts tasks). One round of gossip: pick partners
from the live peers the DHT shows, pull each one's model concurrently with a deadline, validate,
aggregate off the event loop, and add `aggregate - snapshot` to the live model, so local steps
taken during the round are kept. Any partner failure is logged in one line, counted by reason
and skipped; the daemon never crashes on a peer's behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from peer import state as ckpt
from peer.aggregation import RoundContext, coordinate_median, make_aggregator
from peer.aggregation.sybil import Sketcher
from peer.cadence import StepCadence
from peer.config import PeerConfig, load_allowed_peers
from peer.control import serve_control
from peer.loss_probe import LossProbe
from peer.snapshots import ServedSnapshots
from peer.tasks import Task, load_task
from peer.trainer import Trainer
from peer.validation import reject_reason
from protocols import gossip
from protocols.codec import DEFAULT_LIMITS, ProtocolError, TensorSpec, read_header, read_payload, write_header, write_payload
from protocols.discovery import HISTORY_DIM, MAX_RECORD_TTL_S, PeerRecord, SwarmView, run_key
from protocols.loglimit import LogLimiter
from protocols.reputation import Reputation
from protocols.transport.base import CountingStream, Transport, TransportError

log = logging.getLogger("peer.daemon")


class DataDirLocked(Exception):
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


# Reasons that mean the partner sent something wrong (counted as rejected updates), as opposed
# to a network failure (counted as failed pulls).
NETWORK_FAILURES = {"timeout", "unreachable", "disconnected", "remote_error"}


def reputation_event(reason: str) -> str:
    """The reputation event for a counted failure reason (network trouble costs less than garbage)."""
    if reason in ("timeout", "unreachable", "disconnected"):
        return reason
    if reason == "remote_error":
        return "busy"  # it answered, politely, that it will not serve us now
    return "malformed"


def _finite(x: float | None) -> float | None:
    """A number for status JSON: rounded, and None where it is not finite (JSON has no inf/nan)."""
    return round(x, 3) if x is not None and math.isfinite(x) else None


class PeerDaemon:
    def __init__(self, config: PeerConfig, transport: Transport, task: Task | None = None):
        self.config = config
        self.transport = transport
        self.peer_id = transport.peer_id
        self.data_dir = Path(config.data_dir)
        self.shard = shard_for(config, self.peer_id)
        self.task = task or load_task(
            config.task, shard=self.shard[0], num_shards=self.shard[1],
            split=config.split, alpha=config.alpha, seed=config.data_seed,
        )
        # EXPERIMENTS ONLY: a hostile policy turns this daemon into an attacker (peer/hostile.py)
        self.hostile = None
        if config.experiment_attack:
            from peer.hostile import HostilePolicy

            self.hostile = HostilePolicy(config.experiment_attack, seed=zlib.crc32(self.peer_id.encode()))
            self.hostile.poison(self.task)
            log.warning("EXPERIMENT: running as an attacker (%s)", config.experiment_attack)
        self.trainer = Trainer(
            self.task, seed=config.data_seed, eval_every_s=config.eval_every_s,
            max_steps=config.max_steps, step_delay_s=config.step_delay_s, nice=config.train_nice,
        )
        if self.hostile is not None and self.hostile.data_seed_override is not None:
            self.trainer._gen.manual_seed(self.hostile.data_seed_override)
        self.snapshots = ServedSnapshots(self.trainer)  # what partners pull
        self.specs = [TensorSpec("flat", "float32", (self.trainer.flat.numel(),))]
        self.aggregator = make_aggregator("mean" if self.hostile else config.aggregator)
        # the default rule's loss screen needs each partner's loss on our own data
        self.loss_probe = (LossProbe(self.task, config.loss_probe_samples)
                           if config.loss_probe_samples > 0 and getattr(self.aggregator, "loss_screen", None) is not None
                           else None)
        self.sketcher = Sketcher(self.trainer.flat.numel(), HISTORY_DIM)
        if 3 * config.heartbeat_s > MAX_RECORD_TTL_S:
            raise ValueError(f"heartbeat_s {config.heartbeat_s} too long: records live 3 heartbeats, at most {MAX_RECORD_TTL_S:.0f}s")
        self.cadence = StepCadence(config.gossip_every_steps, config.gossip_steps_until)  # checked here: bad values stop the start
        self.allowed = load_allowed_peers(config.allow_peers)  # None: an open run
        self.view = SwarmView(self.peer_id, config.task, allowed=self.allowed)
        self.reputation = Reputation()
        self.peer_log = LogLimiter(log)  # lines about peers' misbehaviour, at most 1/min per peer and reason
        self.picker = gossip.PartnerPicker(config.partners, rng=random.Random(self.peer_id))
        self.counters: dict[str, Any] = {
            "rounds_ok": 0, "rounds_failed": 0, "bytes_sent": 0, "bytes_received": 0,
            "serves": 0, "serve_refused": 0, "checkpoints": 0, "checkpoint_errors": 0,
        }
        self.rejected: dict[str, int] = {}
        self.pull_failed: dict[str, int] = {}
        self.serve_errors: dict[str, int] = {}
        self.addrs: list[str] = []
        self.phase = "starting"
        self.started = time.time()
        self.last_checkpoint: tuple[int, float] | None = None
        self._serving = 0
        self._serving_by_peer: dict[str, int] = {}
        self._metrics_joined = False  # the "join" line goes before this process's first metrics
        self.last_round: dict[str, Any] = {}
        self.distrusted: dict[str, int] = {}  # peer id -> rounds the rule refused its model
        self.refused: dict[str, int] = {}  # why the rule left partners unmixed (sybil, probation, loss, outlier) -> count
        self._mix_buffer: torch.Tensor | None = None  # the aggregation rule's output, reused every round
        self._receive_buffers: list[torch.Tensor] = []  # partners' models land here, reused every round
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self.exit_code = 0

    # --- lifecycle -------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        self._lock_data_dir()
        try:
            await self._run()
        finally:
            self._unlock_data_dir()
        return self.exit_code

    async def _run(self) -> None:
        ckpt.remove_stale_temp_files(self.data_dir)
        resumed = self._resume()
        await self.transport.start()
        control = None
        try:
            self.addrs = await self.transport.addrs()
            await self.transport.set_handler(gossip.PROTOCOL, self._serve_model)
            control = await serve_control(self.config.socket_path, self._control)
            self.phase = "syncing"
            await self._heartbeat_once()
            if not resumed and self.config.initial_peers:
                await self._sync_from_swarm()
            self.trainer.start()
            self.phase = "training"
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
            await self._checkpoint()
            self._write_metrics("leave")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._withdraw(), timeout=5)
            if control is not None:
                control.close()
                with contextlib.suppress(FileNotFoundError):
                    self.config.socket_path.unlink()
            await self.transport.stop()
            log.info("left the swarm at step %d", self.trainer.step)

    def _lock_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        try:
            state = ckpt.load_checkpoint(self.config.checkpoint_path)
        except ValueError as e:
            # Never overwrite evidence: move it aside and start from the swarm instead.
            bad = self.config.checkpoint_path.with_suffix(f".bad-{int(time.time())}")
            os.replace(self.config.checkpoint_path, bad)
            log.error("%s; moved to %s", e, bad.name)
            return False
        if state is None:
            return False
        if state.get("task") != self.task.name or state.get("run_id") != self.config.run_id:
            log.error("checkpoint is for run %r task %r, not this one; ignoring it", state.get("run_id"), state.get("task"))
            return False
        self.trainer.load_state_dict(state)
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
        run's step 1000 (docs/benchmarks.md, convergence). The default (3 / 1000) since the
        two rule fixes that let a 3-peer churn test pass with it (peer/config.py).
        The trainer asks
        `StepCadence.due` after each step, so the switch costs nothing here. Rounds never
        overlap: steps taken during a round make the next one due.
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
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                step_due = asyncio.ensure_future(due.wait())
                await asyncio.wait((stop, step_due), timeout=self.config.gossip_every_s, return_when=asyncio.FIRST_COMPLETED)
                step_due.cancel()
                if self._stop.is_set():
                    return
                due.clear()
                try:
                    await self.gossip_round()
                except Exception:  # a bug in one round is logged, the daemon keeps going
                    log.exception("gossip_round failed")
        finally:
            stop.cancel()
            self.trainer.on_steps = None

    async def _watch_trainer(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.5)
            if self.trainer.error is not None:
                log.error("trainer failed: %r; stopping", self.trainer.error)
                self.exit_code = 1
                self.request_stop()

    # --- discovery -------------------------------------------------------------------------
    def _record(self, state: str = "up") -> PeerRecord:
        return PeerRecord(
            peer_id=self.peer_id, addrs=tuple(self.addrs[:16]), task=self.task.name,
            step=self.trainer.step, samples_per_s=round(self.trainer.samples_per_s, 1),
            version=self.trainer.step, time=self.transport.now(), state=state,
            history=self._history_sketch().to(torch.float16).numpy().tobytes(),
        )

    def _history_sketch(self) -> torch.Tensor:
        sketch = self.sketcher(self.trainer.history())
        return self.hostile.report_history(sketch) if self.hostile else sketch

    def _reported_histories(self, now: float) -> dict[str, torch.Tensor]:
        """History sketches of every live peer whose record carries one (checked when parsed)."""
        return {i.record.peer_id: torch.frombuffer(bytearray(i.record.history), dtype=torch.float16).float()
                for i in self.view.live(now) if i.record.history}

    async def _heartbeat_once(self) -> None:
        key = run_key(self.config.run_id)
        try:
            now = self.transport.now()
            await self.transport.publish(key, self._record().to_wire(), now + 3 * self.config.heartbeat_s)
            now = self.transport.now()
            refused = self.view.update(await self.transport.lookup(key), now, banned=frozenset(self.reputation.banned_peers(now)))
            for owner, reason in refused:
                # only what an honest peer running our code never publishes costs reputation
                # (not a wrong task or a closed run's admissions: those are settings, not lies)
                if owner is not None and owner != self.peer_id and reason.startswith(("malformed_record", "record_owner_mismatch")):
                    self._penalise(owner, "bad_record", reason, now)
        except Exception as e:
            log.warning("heartbeat failed: %s", e)
        self._write_metrics()

    async def _withdraw(self) -> None:
        now = self.transport.now()
        await self.transport.publish(run_key(self.config.run_id), self._record("left").to_wire(), now + 3 * self.config.heartbeat_s)

    # --- gossip ----------------------------------------------------------------------------
    async def pull_model(self, peer_id: str, addrs: list[str] | None = None,
                         into: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """(step, model) of a partner; received into `into` (returned) if given, else a new tensor."""
        stream = CountingStream(await self.transport.open(peer_id, gossip.PROTOCOL, addrs), self.counters, self.config.read_timeout_s)
        try:
            await write_header(stream, gossip.model_request(self.config.run_id, self.task.name))
            header = await read_header(stream, DEFAULT_LIMITS)
            step = gossip.check_model_header(header, self.specs, DEFAULT_LIMITS)
            (arr,) = await read_payload(stream, self.specs, DEFAULT_LIMITS, None if into is None else [into.numpy()])
        finally:
            await stream.close()
        return step, (into if into is not None else torch.from_numpy(arr))

    async def _pull_checked(self, peer_id: str, addrs: list[str], own: torch.Tensor,
                            into: torch.Tensor | None = None) -> tuple[int, torch.Tensor] | None:
        """(step, model) of a partner if it arrived and passed validation; otherwise count and log why not."""
        try:
            step, model = await asyncio.wait_for(self.pull_model(peer_id, addrs, into), timeout=self.config.pull_timeout_s)
        except Exception as e:  # every way a partner can fail us ends here, as a counted reason
            reason = pull_failure_reason(e)
            bucket = self.pull_failed if reason in NETWORK_FAILURES else self.rejected
            bucket[reason] = bucket.get(reason, 0) + 1
            now = self.transport.now()
            delay = self.picker.failed(peer_id, now)
            self._penalise(peer_id, reputation_event(reason), reason, now)
            log.info("pull from %s failed: %s (%s); skipping it for %.0fs", peer_id[:12], reason, str(e)[:80], delay)
            return None
        reason = reject_reason(own, model)
        if reason is not None:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            now = self.transport.now()
            self.picker.failed(peer_id, now)
            self._penalise(peer_id, "rejected_update", reason, now)
            log.info("rejected model from %s: %s", peer_id[:12], reason)
            return None
        self.view.mark_proven(peer_id)
        self.reputation.reward(peer_id, self.transport.now())
        return step, model

    def _penalise(self, peer_id: str, event: str, reason: str, now: float) -> None:
        """Lower a peer's reputation; a banned peer leaves our view and is refused service."""
        before = self.reputation.bans_total
        if self.reputation.penalise(peer_id, event, now):
            self.view.drop(peer_id)
            if self.reputation.bans_total > before:
                log.warning("banned %s for %.0fs (last: %s)", peer_id[:12], self.reputation.banned_peers(now).get(peer_id, 0), reason)

    async def gossip_round(self) -> bool | None:
        """One round; True if at least one partner was mixed in, None if there was nobody to ask."""
        now = self.transport.now()
        live = {i.record.peer_id: i for i in self.view.live(now) if not self.reputation.banned(i.record.peer_id, now)}
        if self.hostile is not None:
            live = {p: i for p, i in live.items() if p not in self.hostile.colluders}
        partners = self.picker.pick(list(live), now)
        if not partners:
            return None
        own = self.trainer.snapshot()
        if self.hostile is not None:
            self.hostile.round_start(own, self.trainer.history())
        # partners' models land in receive buffers reused every round (fresh memory for a large
        # model costs more in page faults than the transfer); nothing keeps them past the round
        # (the rule copies what it needs, apply_delta copies the result). An attacker keeps what
        # it pulled, so it gets fresh tensors.
        if self.hostile is None:
            while len(self._receive_buffers) < len(partners):
                self._receive_buffers.append(torch.empty_like(own))
            into = self._receive_buffers[:len(partners)]
        else:
            into = [None] * len(partners)
        pulled = await asyncio.gather(*(self._pull_checked(p, list(live[p].record.addrs), own, buf)
                                        for p, buf in zip(partners, into)))
        got = [(p, r[1]) for p, r in zip(partners, pulled) if r is not None]
        if not got:
            self.counters["rounds_failed"] += 1
            return False
        ids, models = [p for p, _ in got], [m for _, m in got]
        if self.hostile is not None:
            self.hostile.observe(ids, models)
        ctx = RoundContext(self_id=self.peer_id, partner_ids=ids, histories=self._reported_histories(now),
                           byzantine_fraction=self.config.byzantine_fraction)
        # the rule writes into one buffer reused every round (no fresh d-sized result to fault in);
        # apply_delta copies it into the model, so nothing keeps a reference to it past this round
        if self._mix_buffer is None or self._mix_buffer.shape != own.shape:
            self._mix_buffer = torch.empty_like(own)
        mixed = await asyncio.to_thread(self._probe_and_aggregate, own, models, ctx)
        self.trainer.apply_delta(mixed.sub_(own))
        distrusted = set(getattr(self.aggregator, "last_distrusted", ()))
        for why in getattr(self.aggregator, "last_refused", {}).values():
            self.refused[why] = self.refused.get(why, 0) + 1
        for p in ids:
            if p in distrusted:
                if p not in self.distrusted and len(self.distrusted) >= 1024:
                    self.distrusted.pop(min(self.distrusted, key=self.distrusted.get))  # bounded
                self.distrusted[p] = self.distrusted.get(p, 0) + 1
                self.picker.failed(p, now)
                self._penalise(p, "distrusted", "refused by the aggregation rule", now)
            else:
                self.picker.succeeded(p)
        self.counters["rounds_ok"] += 1
        self.last_round = {"partners": ids, "weights": [round(w, 3) for w in getattr(self.aggregator, "last_weights", [])],
                           "tau": getattr(self.aggregator, "last_tau", None)}
        sybil = getattr(self.aggregator, "sybil", None)
        if sybil is not None:
            self.last_round["sybil_checks"] = {p[:12]: {k: _finite(v) for k, v in f.items()} for p, f in sybil.last_parts.items()}
        if ctx.loss_deltas is not None:
            self.last_round["loss_deltas"] = [_finite(d) for d in ctx.loss_deltas]
            self.last_round["own_loss"] = _finite(ctx.own_loss)
        return True

    def _probe_and_aggregate(self, own: torch.Tensor, models: list[torch.Tensor], ctx: RoundContext) -> torch.Tensor:
        """The round's CPU work, in a worker thread: the loss probe's forward passes, then the rule.

        A task whose model or loss cannot run on the probe batch (a user task, say) turns the
        screen off with one logged line, rather than failing every round."""
        if self.loss_probe is not None:
            try:
                ctx.own_loss, ctx.loss_deltas = self.loss_probe.measure(own, models)
                ctx.untrained_loss = self.loss_probe.untrained_loss
            except Exception as e:
                log.warning("loss probe failed (%s: %s); mixing without the loss screen from now on", type(e).__name__, str(e)[:120])
                self.loss_probe = None
        return self.aggregator(own, models, ctx, out=self._mix_buffer)

    async def _sync_from_swarm(self) -> None:
        """A joiner takes the coordinate median of several live peers' models, not one donor's."""
        deadline = time.monotonic() + self.config.join_sync_timeout_s
        own = self.trainer.snapshot()
        while time.monotonic() < deadline and not self._stop.is_set():
            live = self.view.live(self.transport.now())
            if live:
                chosen = random.Random(self.peer_id).sample(live, min(3, len(live)))
                pulled = await asyncio.gather(*(self._pull_checked(i.record.peer_id, list(i.record.addrs), own) for i in chosen))
                got = [r for r in pulled if r is not None]
                for info, r in zip(chosen, pulled):
                    if r is not None:
                        self.picker.succeeded(info.record.peer_id)
                if got:
                    self.trainer.load_flat(coordinate_median([m for _, m in got]))
                    self.trainer.set_step(sorted(s for s, _ in got)[len(got) // 2])
                    log.info("synced model (step %d) from %d of %d live peers", self.trainer.step, len(got), len(live))
                    return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.5)
            await self._heartbeat_once()
        log.warning("no live peer answered within %.0fs; starting from a fresh model", self.config.join_sync_timeout_s)

    async def _serve_model(self, raw_stream) -> None:
        stream = CountingStream(raw_stream, self.counters, self.config.read_timeout_s)
        remote, now = stream.remote_peer, self.transport.now()
        refusal = None
        if self.allowed is not None and remote not in self.allowed:
            refusal = "not_admitted"
        elif self.reputation.banned(remote, now):
            refusal = "banned"
        elif self._serving_by_peer.get(remote, 0) >= self.config.max_serves_per_peer:
            refusal = "busy"
            self._penalise(remote, "flood", "too many concurrent requests", now)
        elif self._serving >= self.config.max_concurrent_serves:
            refusal = "busy"
        if refusal is not None:  # answered without reading the request: refusing costs us nothing
            self.counters["serve_refused"] += 1
            self.serve_errors[f"refused_{refusal}"] = self.serve_errors.get(f"refused_{refusal}", 0) + 1
            self.peer_log.info((remote, refusal), "refused request from %s: %s", remote[:12], refusal)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(write_header(stream, gossip.error_header(refusal)), timeout=2)
            return
        self._serving += 1
        self._serving_by_peer[remote] = self._serving_by_peer.get(remote, 0) + 1
        try:
            header = await asyncio.wait_for(read_header(stream, DEFAULT_LIMITS), timeout=10)
            gossip.check_request(header, self.config.run_id, self.task.name)
            if self.hostile is None:
                lease = self.snapshots.lease()  # shared while unchanged, never overwritten while sent
            else:
                snap = self.hostile.craft(stream.remote_peer, self.trainer.snapshot()).contiguous()
                lease = contextlib.nullcontext((self.trainer.step, snap))
            with lease as (step, snap):
                await write_header(stream, gossip.model_header(step, self.specs))
                await asyncio.wait_for(write_payload(stream, [snap.numpy()], DEFAULT_LIMITS), timeout=self.config.pull_timeout_s)
            self.counters["serves"] += 1
        except ProtocolError as e:
            self.serve_errors[e.reason] = self.serve_errors.get(e.reason, 0) + 1
            self._penalise(remote, "malformed", e.reason, self.transport.now())
            self.peer_log.info((remote, e.reason), "refused request from %s: %s", remote[:12], e)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(write_header(stream, gossip.error_header(e.reason)), timeout=2)
        except Exception as e:
            reason = pull_failure_reason(e)
            self.serve_errors[reason] = self.serve_errors.get(reason, 0) + 1
            self._penalise(remote, reputation_event(reason), reason, self.transport.now())
            self.peer_log.info((remote, reason), "serving %s failed: %s", remote[:12], reason)
        finally:
            self._serving -= 1
            left = self._serving_by_peer.get(remote, 1) - 1
            if left > 0:
                self._serving_by_peer[remote] = left
            else:
                self._serving_by_peer.pop(remote, None)

    # --- persistence -----------------------------------------------------------------------
    async def _checkpoint(self) -> None:
        state = self.trainer.state_dict()
        state.update(run_id=self.config.run_id, task=self.task.name, peer_id=self.peer_id)
        try:
            await asyncio.to_thread(ckpt.save_checkpoint, self.config.checkpoint_path, state)
        except Exception as e:  # a full disk must not kill training; the old checkpoint stays intact
            self.counters["checkpoint_errors"] += 1
            log.error("checkpoint failed, keeping the previous one: %s", e)
            return
        self.counters["checkpoints"] += 1
        self.last_checkpoint = (state["step"], time.time())

    METRICS_ROTATE_BYTES = 8 << 20  # metrics.jsonl is renamed to .1 (.1 to .2, .2 to .3) past this size
    METRICS_KEEP = 3

    def _write_metrics(self, event: str = "metrics") -> None:
        """Append one JSON line to DATA_DIR/metrics.jsonl: a "join" event before the first
        heartbeat's metrics of this process, "leave" on a graceful exit (the experiment runner and
        `scripts/experiment.py --collect` read these); rotated so it never grows without bound."""
        path = self.data_dir / "metrics.jsonl"
        lines = []
        if not self._metrics_joined:
            self._metrics_joined = True
            lines.append({"time": time.time(), "event": "join", "peer_id": self.peer_id, "pid": os.getpid(),
                          "attack": self.config.experiment_attack or None})
        extra = {"exit_code": self.exit_code} if event == "leave" else {}
        lines.append({"time": time.time(), "event": event, **self._metrics(), **extra})
        try:
            if path.exists() and path.stat().st_size > self.METRICS_ROTATE_BYTES:
                for i in range(self.METRICS_KEEP - 1, 0, -1):
                    old = path.with_name(f"metrics.jsonl.{i}")
                    if old.exists():
                        os.replace(old, path.with_name(f"metrics.jsonl.{i + 1}"))
                os.replace(path, path.with_name("metrics.jsonl.1"))
            with open(path, "a") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
        except OSError as e:
            log.warning("metrics not written: %s", e)

    # --- status / control ------------------------------------------------------------------
    def _metrics(self) -> dict[str, Any]:
        m = self.trainer.metrics
        return {
            "step": self.trainer.step, "samples": self.trainer.samples, "loss": self.trainer.last_loss,
            "accuracy": m.get("accuracy"), "test_loss": m.get("test_loss"),
            "samples_per_s": round(self.trainer.samples_per_s, 1),
            **{k: self.counters[k] for k in ("rounds_ok", "rounds_failed", "bytes_sent", "bytes_received")},
            "rejected": dict(self.rejected), "pull_failed": dict(self.pull_failed),
        }

    def status(self) -> dict[str, Any]:
        now = self.transport.now()
        live = sorted(self.view.live(now), key=lambda i: i.record.peer_id)
        return {
            "peer_id": self.peer_id, "addrs": self.addrs, "run_id": self.config.run_id,
            "task": self.task.name, "shard": f"{self.shard[0]}/{self.shard[1]}",
            "aggregator": self.config.aggregator, "phase": self.phase, "pid": os.getpid(),
            "gossip_cadence": f"{self.cadence.describe(self.trainer.step)}; at least every {self.config.gossip_every_s:g} s",
            "uptime_s": round(time.time() - self.started, 1), "train_nice": self.trainer.nice,
            **self._metrics(),
            "live_peers": [
                {"peer_id": i.record.peer_id, "step": i.record.step, "samples_per_s": i.record.samples_per_s,
                 "last_seen_s": round(now - i.last_seen, 1), "addrs": list(i.record.addrs)}
                for i in live
            ],
            "backing_off": self.picker.backing_off(now),
            "serves": self.counters["serves"], "serve_refused": self.counters["serve_refused"],
            "serve_errors": dict(self.serve_errors),
            "record_rejects": dict(self.view.rejected),
            "dht_rejects": dict(getattr(getattr(self.transport, "run_records", None), "rejected", None) or {}),
            "reputation": self.reputation.summary(now),
            "banned": self.reputation.banned_peers(now),
            "closed_run": self.allowed is not None,
            "last_round": self._last_round_status(),
            "distrusted": dict(sorted(self.distrusted.items(), key=lambda kv: -kv[1])[:32]),
            "refused": dict(self.refused),
            "checkpoint": {
                "step": self.last_checkpoint[0] if self.last_checkpoint else None,
                "age_s": round(time.time() - self.last_checkpoint[1], 1) if self.last_checkpoint else None,
                "errors": self.counters["checkpoint_errors"],
            },
        }

    def _last_round_status(self) -> dict[str, Any]:
        r = self.last_round
        tau = r.get("tau")
        return {"partners": r.get("partners", []), "weights": r.get("weights", []),
                "clip_radius": None if tau is None or tau == float("inf") else round(float(tau), 4),
                "loss_deltas": r.get("loss_deltas"), "own_loss": r.get("own_loss"), "sybil_checks": r.get("sybil_checks")}

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "leave":
            self.request_stop()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {str(cmd)[:32]!r}"}
