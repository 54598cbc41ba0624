"""The gossip cadence: a round every `gossip_every_steps` local steps, and at least every `gossip_every_s`.

Mixing keyed to local steps is what keeps fast peers from drifting apart between mixes (see
docs/benchmarks.md, convergence). The time interval in these tests is an hour, so any round that
happens was started by the steps (or, in the last test, the other way round).
"""

from __future__ import annotations

from tests.conftest import wait_until

HOUR = 3600.0


def sees(d, n: int) -> bool:
    return len(d.view.live(d.transport.now())) >= n


async def test_local_steps_start_rounds_when_the_time_interval_is_far_away(memory_swarm):
    a = await memory_swarm.add("a", shard="0/2", gossip_every_s=HOUR, gossip_every_steps=5)
    b = await memory_swarm.add("b", shard="1/2", gossip_every_s=HOUR, gossip_every_steps=5)
    await wait_until(lambda: a.counters["rounds_ok"] >= 3 and b.counters["rounds_ok"] >= 3, 60,
                     "step-driven rounds on both peers")
    assert a.counters["rounds_failed"] == 0 and b.counters["rounds_failed"] == 0
    # rounds never overlap and come no more often than every 5 local steps
    assert a.counters["rounds_ok"] <= a.trainer.local_steps // 5 + 1


async def test_no_step_rounds_when_the_step_cadence_is_off(memory_swarm):
    a = await memory_swarm.add("a", shard="0/2", gossip_every_s=HOUR, gossip_every_steps=0)
    b = await memory_swarm.add("b", shard="1/2", gossip_every_s=HOUR, gossip_every_steps=0)
    await wait_until(lambda: sees(a, 1) and sees(b, 1) and min(a.trainer.local_steps, b.trainer.local_steps) >= 100, 60,
                     "both peers to see each other and train 100 steps")
    assert a.counters["rounds_ok"] + a.counters["rounds_failed"] == 0
    assert b.counters["rounds_ok"] + b.counters["rounds_failed"] == 0


async def test_a_peer_that_stopped_training_still_gossips_on_time(memory_swarm):
    a = await memory_swarm.add("a", shard="0/2", gossip_every_s=0.1, gossip_every_steps=5, max_steps=0)
    b = await memory_swarm.add("b", shard="1/2", gossip_every_s=0.1, gossip_every_steps=5, max_steps=0)
    await wait_until(lambda: a.counters["rounds_ok"] >= 3 and b.counters["rounds_ok"] >= 3, 30, "time-driven rounds")
    assert a.trainer.local_steps == 0 and b.trainer.local_steps == 0
