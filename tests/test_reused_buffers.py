"""Buffers reused across pulls and rounds: the served model snapshot, the receive buffers and the rule's output.

Reuse saves page faults (see docs/benchmarks.md); the ways it can go wrong are serving a stale
model, overwriting a snapshot still being sent, and a model aliasing a buffer the next round
overwrites. Each test here breaks on one of those.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from peer.aggregation import AGGREGATORS, RoundContext, make_aggregator
from peer.daemon import PeerDaemon
from peer.snapshots import ServedSnapshots
from peer.tasks import load_task
from peer.trainer import Trainer
from protocols import gossip
from protocols.codec import DEFAULT_LIMITS, read_header, write_header
from protocols.transport.memory import MemoryNetwork
from tests.conftest import fast_config


# --- the snapshot pool on its own ---

def test_unchanged_model_shares_one_snapshot_and_a_change_never_overwrites_a_leased_one():
    t = Trainer(load_task("digits-mlp"), seed=0)
    snaps = ServedSnapshots(t)
    with snaps.lease() as (step0, a):
        with snaps.lease() as (_, b):
            assert a.data_ptr() == b.data_ptr() and snaps.copies == 1  # unchanged: shared, no copy
        before = a.clone()
        t.train_step()  # the model changes while `a` is being sent
        with snaps.lease() as (step1, c):
            assert c.data_ptr() != a.data_ptr()  # a fresh buffer, not the leased one
            assert torch.equal(c, t.flat) and step1 == step0 + 1
        assert torch.equal(a, before)  # the leased snapshot is intact
    # nobody reads either buffer now: the next change is copied into the current one, no allocation
    t.train_step()
    allocations = snaps.allocations
    with snaps.lease() as (_, d):
        assert torch.equal(d, t.flat) and d.data_ptr() == c.data_ptr()
    assert snaps.allocations == allocations == 2


def test_a_lease_that_ended_in_an_error_is_never_reused():
    t = Trainer(load_task("digits-mlp"), seed=0)
    snaps = ServedSnapshots(t)
    with pytest.raises(ConnectionError):
        with snaps.lease() as (_, a):
            kept = a  # a transport may still hold (and send) bytes of `a` after a failed send
            raise ConnectionError("peer went away mid-send")
    before = kept.clone()
    with snaps.lease() as (_, b):  # same model version, but the abandoned snapshot is not handed out
        assert b.data_ptr() != kept.data_ptr()
    t.train_step()
    with snaps.lease() as (_, c):
        assert c.data_ptr() != kept.data_ptr() and torch.equal(c, t.flat)
    assert torch.equal(kept, before)


# --- through the daemon's serve path, with a reader that stalls mid-payload ---

async def _pair(tmp_path, pipe_capacity: int):
    net = MemoryNetwork(pipe_capacity=pipe_capacity)
    daemons = []
    for name in ("server", "puller"):
        d = PeerDaemon(fast_config(tmp_path / name), net.transport(name))
        await d.transport.start()
        await d.transport.set_handler(gossip.PROTOCOL, d._serve_model)
        daemons.append(d)
    return daemons


async def _open_pull(puller: PeerDaemon):
    """Request the server's model; returns the stream (positioned at the payload) and the header."""
    stream = await puller.transport.open("server", gossip.PROTOCOL)
    await write_header(stream, gossip.model_request(puller.config.run_id, puller.task.name))
    return stream, await read_header(stream, DEFAULT_LIMITS)


async def _read(stream, n: int) -> bytes:
    """n payload bytes in pieces smaller than the 1 KiB pipe (so the server blocks on a stalled reader)."""
    got = bytearray()
    while len(got) < n:
        got += await stream.read_exactly(min(512, n - len(got)))
    return bytes(got)


async def test_pulls_see_every_change_and_a_stalled_pull_gets_its_snapshot_intact(tmp_path):
    server, puller = await _pair(tmp_path, pipe_capacity=1024)
    t = server.trainer
    nbytes = t.flat.numel() * 4

    async def pull() -> tuple[int, torch.Tensor]:
        stream, header = await _open_pull(puller)
        data = await asyncio.wait_for(_read(stream, nbytes), 10)
        await stream.close()
        return header["step"], torch.frombuffer(bytearray(data), dtype=torch.float32)

    step, m = await pull()
    assert torch.equal(m, t.flat) and step == t.step
    await pull()
    assert server.snapshots.copies == 1  # unchanged model: served from the same snapshot
    # every way the model changes is seen by the next pull (a missed version bump serves a stale model)
    state = t.state_dict()
    changes = [t.train_step, lambda: t.apply_delta(torch.full_like(t.flat, 0.25)),
               lambda: t.load_flat(t.flat * 0.5), lambda: t.set_step(t.step + 7), lambda: t.load_state_dict(state)]
    for change in changes:
        change()
        step, m = await pull()
        assert torch.equal(m, t.flat) and step == t.step

    # a pull stalls after 100 payload bytes (the server blocks writing into the full pipe)
    stalled, header = await _open_pull(puller)
    old_step, old = header["step"], t.snapshot()
    first = await _read(stalled, 100)
    t.apply_delta(torch.ones_like(t.flat))  # the model changes mid-send...
    step, m = await pull()  # ...another pull gets the new model meanwhile
    assert torch.equal(m, t.flat) and not torch.equal(m, old)
    rest = await asyncio.wait_for(_read(stalled, nbytes - 100), 10)
    await stalled.close()
    got = torch.frombuffer(bytearray(first + rest), dtype=torch.float32)
    assert torch.equal(got, old) and old_step == t.step  # the stalled pull's snapshot was never overwritten
    # both leases are over: the next change is copied into a buffer already there
    allocations = server.snapshots.allocations
    t.train_step()
    step, m = await pull()
    assert torch.equal(m, t.flat) and server.snapshots.allocations == allocations
    for d in (server, puller):
        await d.transport.stop()


# --- the rule's output buffer ---

@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_rule_into_a_reused_buffer_equals_a_fresh_result_round_after_round(name):
    g = torch.Generator().manual_seed(1)
    fresh, reused = make_aggregator(name), make_aggregator(name)
    buf = torch.full((300,), float("nan"))
    ids = [f"p{j}" for j in range(5)]
    for round_ in range(3):
        own = torch.randn(300, generator=g)
        others = [own + 0.1 * torch.randn(300, generator=g) for _ in ids]
        others[-1] = own + 50.0 * torch.randn(300, generator=g)  # an outlier: the clipped second pass too
        ctx = RoundContext(partner_ids=ids, sketches={p: torch.randn(512, generator=g) for p in ids})
        want = fresh(own.clone(), [x.clone() for x in others], ctx).model
        got = reused(own, others, ctx, out=buf).model
        assert got is buf
        torch.testing.assert_close(got, want, msg=f"{name} round {round_}")


def test_rule_refuses_an_output_buffer_that_is_one_of_its_inputs():
    own, others = torch.zeros(10), [torch.ones(10), torch.ones(10)]
    rule = make_aggregator("sybilwall+scc")
    for bad in (own, others[1], own[:]):
        with pytest.raises(ValueError, match="shares memory"):
            rule(own, others, out=bad)


async def test_daemon_model_never_aliases_the_reused_round_buffer(tmp_path):
    server, puller = await _pair(tmp_path, pipe_capacity=1 << 20)
    for d in (server, puller):
        d.addrs = await d.transport.addrs()
    for d in (server, puller, server, puller):  # each sees the other's record
        await d._heartbeat_once()
    server.trainer.apply_delta(torch.full_like(server.trainer.flat, 0.01))
    assert await puller.gossip_round() is True
    buf = puller._mix_buffer
    assert buf is not None and buf.untyped_storage().data_ptr() != puller.trainer.flat.untyped_storage().data_ptr()
    assert len(puller._receive_buffers) == 1
    assert torch.equal(puller._receive_buffers[0], server.trainer.flat)  # the partner's model landed there
    model = puller.trainer.snapshot()
    # what the next round's pulls and rule write into the buffers must not reach the model
    for b in (buf, *puller._receive_buffers):
        b.fill_(float("nan"))
    assert torch.equal(puller.trainer.flat, model)
    server.trainer.apply_delta(torch.full_like(server.trainer.flat, 0.01))
    receive = puller._receive_buffers[0]
    assert await puller.gossip_round() is True and puller._mix_buffer is buf  # reused, not reallocated
    assert puller._receive_buffers == [receive] and torch.equal(receive, server.trainer.flat)
    assert bool(torch.isfinite(puller.trainer.flat).all())
    for d in (server, puller):
        await d.transport.stop()


# --- the sketch signs and the history sketch ---

async def test_daemon_and_its_rule_share_one_sketcher_and_the_history_sketch_needs_no_history(tmp_path):
    """The sign vector (one float32 per parameter) exists once: the heartbeat's history sketch
    and the rule's observed sketches use the same Sketcher object. The history sketch, taken
    slice by slice, is bit for bit the sketch of `history()`."""
    server, puller = await _pair(tmp_path, pipe_capacity=1 << 20)
    for d in (server, puller):
        d.addrs = await d.transport.addrs()
    for d in (server, puller, server, puller):
        await d._heartbeat_once()
    server.trainer.apply_delta(torch.full_like(server.trainer.flat, 0.01))
    for _ in range(3):
        puller.trainer.train_step()
    assert await puller.gossip_round() is True
    numel = puller.trainer.flat.numel()
    assert puller.core.aggregator.sybil.sketcher_for(numel) is puller.sketcher is server.sketcher
    t = puller.trainer
    assert not torch.equal(t.history(), torch.zeros(numel))  # trained and mixed: a real history
    assert torch.equal(t.sketch_history(puller.sketcher).view(torch.int32), puller.sketcher(t.history()).view(torch.int32))
    assert torch.equal(t.history(), t.flat - t.base)
    for d in (server, puller):
        await d.transport.stop()


# --- checkpoints read the live outer state ---

async def test_checkpoint_writes_the_live_outer_state_and_keeps_rounds_out_until_written(tmp_path, monkeypatch):
    """The checkpoint hands the writer thread the live anchor and momentum (no copies), so the
    round lock must stay held until the thread is done, even when the checkpoint task is
    cancelled (a thread cannot be stopped): otherwise a round could step them mid-write."""
    import threading

    import peer.state as ckpt

    d = PeerDaemon(fast_config(tmp_path / "p", outer_every_steps=2, compression="int8"), MemoryNetwork().transport("p"))
    d.outer.step(d.trainer.snapshot() - 0.1)  # a momentum buffer exists
    started, release, seen = threading.Event(), threading.Event(), {}

    def slow_save(path, state):
        seen.update(state)
        started.set()
        release.wait(10)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    task = asyncio.create_task(d._checkpoint())
    assert await asyncio.to_thread(started.wait, 10)
    assert seen["outer"]["anchor"] is d.outer.anchor
    assert seen["outer"]["optimizer"]["momentum_buffer"] is d.outer.optimizer.buf
    assert seen["flat"] is not d.trainer.flat  # the model trains on: a copy
    task.cancel()
    await asyncio.sleep(0.1)
    assert d._round_lock.locked() and not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not d._round_lock.locked()


def test_trainer_state_is_a_copy_that_later_steps_cannot_tear():
    """A checkpoint is written from a thread while training steps on. Every tensor of the state
    (model, history and the optimizer's moments) must be the values of the one step boundary at
    which it was taken, so a step after `state_dict()` changes none of them."""
    t = Trainer(load_task("digits-mlp"), seed=0)
    for _ in range(3):
        t.train_step()
    state = t.state_dict()
    moments = [v for entry in state["optimizer"]["state"].values() for v in entry.values() if isinstance(v, torch.Tensor)]
    assert len(moments) >= 2 * len(state["optimizer"]["state"])  # Adam: exp_avg, exp_avg_sq (and step)
    frozen = [v.clone() for v in moments]
    flat, history = state["flat"].clone(), state["history"].clone()
    for _ in range(3):
        t.train_step()
    assert all(torch.equal(a, b) for a, b in zip(moments, frozen))
    assert torch.equal(state["flat"], flat) and torch.equal(state["history"], history)
    live = [v for entry in t.optimizer.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    assert not any(torch.equal(a, b) for a, b in zip(live, frozen) if a.dim() > 0)  # the steps did move them


def test_trainer_lock_is_granted_in_order_so_a_busy_trainer_cannot_starve_a_waiter():
    """The trainer takes its lock for every step and asks again at once. A thread that asked
    while a step held it (the event loop's heartbeat, a round's snapshot) must get it before
    the trainer's next step (`threading.Lock` promises no order: the releasing thread may win
    again and again)."""
    import threading

    from peer.trainer import FairLock

    lock, order = FairLock(), []
    lock.acquire()  # a training step in progress

    def waiter(name: str) -> None:
        with lock:
            order.append(name)

    threads = []
    for name in ("heartbeat", "round"):
        queued = lock.queued()
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while lock.queued() == queued and time.monotonic() < deadline:  # until it has its ticket
            time.sleep(0.001)
        assert lock.queued() == queued + 1
    lock.release()
    with lock:  # the trainer's next step asks again at once, and comes after both waiters
        order.append("next step")
    for t in threads:
        t.join(10)
    assert order == ["heartbeat", "round", "next step"] and lock.queued() == 0
    assert isinstance(Trainer(load_task("digits-mlp"), seed=0).lock, FairLock)
