"""Whole daemons over the in-memory transport: convergence, joining, and partners that misbehave."""

from __future__ import annotations

import pytest
import asyncio

import numpy as np
import torch

from protocols import gossip
from protocols.codec import TensorSpec, read_header, write_header, write_payload
from protocols.discovery import PeerRecord, run_key
from tests.conftest import wait_until


def relative_spread(daemons) -> float:
    models = torch.stack([d.trainer.snapshot() for d in daemons])
    mean = models.mean(0)
    return float(max((m - mean).norm() for m in models) / mean.norm())


async def test_eight_peer_swarm_converges(memory_swarm):
    daemons = [await memory_swarm.add(f"p{i}", shard=f"{i}/8", max_steps=300) for i in range(8)]
    await wait_until(lambda: all(d.trainer.done for d in daemons), 120, "every peer to finish its local steps")
    # training has stopped; gossip alone must now pull the models together
    await wait_until(lambda: relative_spread(daemons) < 0.01, 60, "models to agree within 1%")
    accs = [d.trainer.evaluate()["accuracy"] for d in daemons]
    assert min(accs) > 0.88, accs
    for d in daemons:
        assert d.counters["rounds_ok"] > 0 and d.counters["rounds_failed"] == 0
        assert len(d.core.view.live(d.transport.now())) == 7
    # gossip moved real bytes both ways
    assert all(d.counters["bytes_received"] > 0 and d.counters["bytes_sent"] > 0 for d in daemons)


async def test_late_joiner_takes_the_swarm_model_from_several_peers(memory_swarm):
    olds = [await memory_swarm.add(f"p{i}", shard=f"{i}/4", max_steps=300) for i in range(3)]
    await wait_until(lambda: all(d.trainer.done for d in olds), 120, "the swarm to train")
    await wait_until(lambda: relative_spread(olds) < 0.01, 60, "the swarm to agree")
    swarm_acc = np.mean([d.trainer.evaluate()["accuracy"] for d in olds])
    joiner = await memory_swarm.add("late", shard="3/4", max_steps=0, initial_peers=["memory"])
    # it trained no step itself: its accuracy is the synced model's
    acc = joiner.trainer.evaluate()["accuracy"]
    assert joiner.trainer.samples == 0 and joiner.trainer.step == 300  # adopted the swarm step
    assert acc >= swarm_acc - 0.02, (acc, swarm_acc)
    assert sum(joiner.counters.get(k, 0) for k in ("bytes_received",)) >= 3 * joiner.specs[0].nbytes


async def test_stopped_peer_disappears_and_survivors_keep_gossiping(memory_swarm):
    a = await memory_swarm.add("a", shard="0/3")
    await memory_swarm.add("b", shard="1/3")
    await memory_swarm.add("c", shard="2/3")
    await wait_until(lambda: len(a.core.view.live(a.transport.now())) == 2, 10, "a to see b and c")
    assert await memory_swarm.stop("c") == 0
    # graceful leave publishes a 'left' record: gone from the view at the next heartbeat
    stored = await a.transport.lookup(run_key(a.config.run_id))
    assert [PeerRecord.from_wire(r.value).state for r in stored if r.owner == "c"] == ["left"]
    await wait_until(lambda: [i.record.peer_id for i in a.core.view.live(a.transport.now())] == ["b"], 5, "c to disappear")
    before = a.counters["rounds_ok"]
    await wait_until(lambda: a.counters["rounds_ok"] > before + 3, 10, "a to keep mixing with b")


class HostilePeer:
    """A fake peer on the memory network that answers gossip pulls with one kind of bad reply."""

    def __init__(self, swarm, name: str, behaviour: str, numel: int):
        self.t = swarm.net.transport(name)
        self.behaviour, self.numel = behaviour, numel
        self.served = asyncio.Event()

    async def start(self):
        await self.t.start()
        await self.t.set_handler(gossip.PROTOCOL, self.handle)
        rec = PeerRecord(self.t.peer_id, (f"/memory/{self.t.peer_id}",), "digits-mlp", 1, 1.0, 1, self.t.now())
        await self.t.publish(run_key("test"), rec.to_wire(), self.t.now() + 60)  # within MAX_RECORD_TTL_S

    async def handle(self, stream):
        await read_header(stream)
        self.served.set()
        spec = [TensorSpec("flat", "float32", (self.numel,))]
        b = self.behaviour
        if b == "garbage":
                await stream.write(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
        elif b == "huge":
            await write_header(stream, gossip.model_header(1, [TensorSpec("flat", "float32", (10**9,))]))
        elif b == "nan":
            await write_header(stream, gossip.model_header(1, spec))
            await write_payload(stream, [np.full(self.numel, np.nan, dtype=np.float32)])
        elif b == "truncated":
            await write_header(stream, gossip.model_header(1, spec))
            await write_payload(stream, [np.zeros(self.numel // 2, dtype=np.float32)])
        elif b == "stall":
            await write_header(stream, gossip.model_header(1, spec))
            await asyncio.Event().wait()


@pytest.mark.slow
async def test_misbehaving_partners_are_skipped_counted_and_survived(memory_swarm):
    honest = await memory_swarm.add("honest", shard="0/2", pull_timeout_s=1.0, partners=6)
    numel = honest.specs[0].numel
    hostiles = {b: HostilePeer(memory_swarm, f"bad-{b}", b, numel) for b in ("garbage", "huge", "nan", "truncated", "stall")}
    for h in hostiles.values():
        await h.start()
    other = await memory_swarm.add("other", shard="1/2")
    for h in hostiles.values():
        await asyncio.wait_for(h.served.wait(), 20)
    await wait_until(lambda: honest.stats.pull_failed.get("timeout", 0) >= 1, 20, "the stalled pull to time out")
    assert honest.stats.rejected.get("bad_header", 0) >= 1        # garbage msgpack
    assert honest.stats.rejected.get("too_large", 0) >= 1         # 10^9 elements, refused before allocating
    assert honest.stats.rejected.get("non_finite", 0) >= 1        # NaN model
    assert honest.stats.pull_failed.get("disconnected", 0) >= 1   # stream ended mid-payload
    # the daemon is fine: still training, still mixing with the honest peer, model finite
    step = honest.trainer.step
    ok = honest.counters["rounds_ok"]
    await wait_until(lambda: honest.trainer.step > step and honest.counters["rounds_ok"] > ok, 20, "training and gossip to go on")
    assert bool(torch.isfinite(honest.trainer.snapshot()).all())
    assert honest.phase == "training" and other.phase == "training"
    # failed peers are backed off rather than hammered every round
    assert set(honest.core.picker.backing_off(honest.transport.now())) & {f"bad-{b}" for b in hostiles}
