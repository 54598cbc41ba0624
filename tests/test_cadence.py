"""The post-local SGD step cadence as a pure function: which local steps start a gossip round."""

from __future__ import annotations

import pytest

from peer.cadence import RoundBacklog, StepCadence
from peer.tasks import load_task
from peer.trainer import Trainer
from tests.conftest import wait_until


def rounds_started(cadence: StepCadence, first_step: int, steps: int) -> list[int]:
    """The local steps (1-based) after which a round is due, for a trainer whose run step starts at
    `first_step` (0 for a fresh run, the swarm's or checkpoint's step otherwise) and takes `steps`."""
    return [n for n in range(1, steps + 1) if cadence.due(first_step + n, n)]


def test_a_fresh_run_mixes_every_n_steps_then_stops_at_the_switch():
    due = rounds_started(StepCadence(every_steps=10, until_step=100), first_step=0, steps=300)
    assert due == [10, 20, 30, 40, 50, 60, 70, 80, 90]  # step 100 is the first of the late phase


def test_until_zero_keeps_the_step_cadence_for_the_whole_run():
    due = rounds_started(StepCadence(every_steps=10, until_step=0), first_step=0, steps=10_000)
    assert len(due) == 1000 and due[-1] == 10_000


def test_every_zero_is_time_only():
    c = StepCadence(every_steps=0, until_step=1000)
    assert rounds_started(c, 0, 2000) == []
    assert not c.active(0)
    assert c.describe(0) == "time only"


def test_a_peer_joining_a_late_run_goes_straight_to_the_late_phase():
    # it adopted the swarm's step 5000 (Trainer.set_step): its own first steps start no rounds
    assert rounds_started(StepCadence(10, 1000), first_step=5000, steps=500) == []


def test_a_joiner_before_the_switch_mixes_often_until_the_run_reaches_it():
    # joined at run step 950 with its own step counter at 0: rounds after its 10th, 20th ... local
    # step, and none once the run's step (950 + n) reaches 1000
    assert rounds_started(StepCadence(10, 1000), first_step=950, steps=200) == [10, 20, 30, 40]


def test_describe_says_which_phase_the_peer_is_in():
    c = StepCadence(10, 1000)
    assert "(now)" in c.describe(999) and "(done)" in c.describe(1000)
    assert StepCadence(10, 0).describe(123456) == "every 10 steps"


@pytest.mark.parametrize("every,until", [(-1, 0), (10, -5)])
def test_negative_settings_are_refused(every, until):
    with pytest.raises(ValueError, match="gossip cadence"):
        StepCadence(every, until)


def test_a_backlog_of_one_lets_training_run_one_round_ahead():
    b = RoundBacklog(max_unfinished=1)
    assert b.may_step()
    b.due = 1  # round 1 runs beside training
    assert b.may_step()
    b.due = 2  # H more steps and round 1 still unfinished: wait
    assert not b.may_step()
    b.finished = 1
    assert b.may_step()
    assert b.owed()  # round 2 was asked for and has not run: the round loop runs it
    b.finished = 2
    assert not b.owed()  # a late wake-up now runs no round
    with pytest.raises(ValueError, match="max_unfinished"):
        RoundBacklog(max_unfinished=0)


async def test_the_trainer_waits_for_rounds_and_a_stop_wakes_it():
    """Rounds due every 5 steps, none finished: the trainer takes 10 steps (round 1 running, round
    2 due) and waits; each finished round lets it take 5 more; stop() ends the wait."""
    trainer = Trainer(load_task("digits-mlp"), seed=0)
    trainer.step_cadence = StepCadence(every_steps=5, until_step=0)
    trainer.on_steps = lambda: None
    trainer.round_backlog = RoundBacklog(max_unfinished=1)
    trainer.start()
    try:
        await wait_until(lambda: trainer.waiting_for_round, 30, "the trainer to wait for round 1")
        assert trainer.step == 10 and trainer.round_backlog.due == 2
        trainer.round_finished()
        await wait_until(lambda: trainer.step == 15 and trainer.waiting_for_round, 30, "5 more steps")
        assert trainer.step == 15 and trainer.round_wait_seconds > 0
    finally:
        trainer.stop()  # returns only once the thread ended: the stop woke the wait
    assert not trainer.waiting_for_round and trainer.step == 15
