"""The gossip cadence: a round every `gossip_every_steps` local steps while the run is before step
`gossip_steps_until` (post-local SGD), and at least every `gossip_every_s`.

Mixing keyed to local steps is what keeps fast peers from drifting apart between mixes (see
docs/benchmarks.md, convergence). The time interval in these tests is an hour, so any round that
happens was started by the steps (or, in the last test, the other way round).
"""

from __future__ import annotations

from tests.conftest import wait_until

HOUR = 3600.0


def sees(d, n: int) -> bool:
    return len(d.core.view.live(d.transport.now())) >= n


async def test_local_steps_start_rounds_when_the_time_interval_is_far_away(memory_swarm):
    a = await memory_swarm.add("a", shard="0/2", gossip_every_s=HOUR, gossip_every_steps=5, gossip_steps_until=0)
    b = await memory_swarm.add("b", shard="1/2", gossip_every_s=HOUR, gossip_every_steps=5, gossip_steps_until=0)
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


async def test_step_rounds_stop_once_the_run_passes_the_switch(memory_swarm):
    # no training until both see each other, so the early phase is not spent alone
    a = await memory_swarm.add("a", shard="0/2", gossip_every_s=HOUR, gossip_every_steps=5, gossip_steps_until=40,
                               max_steps=0, step_delay_s=0.003)
    b = await memory_swarm.add("b", shard="1/2", gossip_every_s=HOUR, gossip_every_steps=5, gossip_steps_until=40,
                               max_steps=0, step_delay_s=0.003)
    await wait_until(lambda: sees(a, 1) and sees(b, 1), 30, "both peers to see each other")
    a.trainer.max_steps = b.trainer.max_steps = 400  # read by the training loop before every step
    await wait_until(lambda: a.trainer.done and b.trainer.done and a.counters["rounds_ok"] >= 1
                     and b.counters["rounds_ok"] >= 1, 60, "400 steps and early rounds on both peers")
    for d in (a, b):
        # steps 5, 10, ..., 35 may start a round (fewer if rounds overlapped steps); the 360 steps
        # after the switch start none (kept up for the whole run, 5 steps would start ~70 more)
        assert d.counters["rounds_ok"] + d.counters["rounds_failed"] <= 7, d.counters
        assert "(done)" in d.status()["gossip_cadence"]


async def test_a_peer_joining_a_late_run_skips_the_frequent_phase(memory_swarm):
    late = dict(gossip_every_s=HOUR, gossip_every_steps=5, gossip_steps_until=40, step_delay_s=0.001)
    a = await memory_swarm.add("a", shard="0/2", max_steps=100, **late)
    await wait_until(lambda: a.trainer.done, 60, "the first peer to train past the switch")
    b = await memory_swarm.add("b", shard="1/2", initial_peers=["memory"], **late)  # syncs from a on joining
    assert b.trainer.step >= 100  # adopted the run's step when it synced from a
    await wait_until(lambda: b.trainer.local_steps >= 100 and sees(b, 1), 60, "the joiner to train 100 steps")
    # its own first 100 steps would have started rounds if the phase counted from its own start
    assert b.counters["rounds_ok"] + b.counters["rounds_failed"] == 0, b.counters
    assert a.counters["rounds_ok"] + a.counters["rounds_failed"] == 0, a.counters
