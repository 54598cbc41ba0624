"""When local steps start a gossip round: post-local SGD's two phases.

Lin, Stich, Patel and Jaggi ("Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020) mix often
early in a run, where peers that drift apart between mixes slow convergence, and switch to
local SGD (more local steps between mixes) later, where the drift acts as noise that generalises
better than the large-batch training that frequent mixing amounts to. Here: a round every
`every_steps` local steps while the run is before step `until_step`, then time only (the daemon's
`gossip_every_s`, which bounds the interval in both phases, so a model that takes a second per
step mixes no more often than once a second). Measured on MNIST-1D in docs/benchmarks.md
(convergence).

The phase is read from the trainer's `step`, the run's progress, not from this process's own
steps: a peer joining a late run adopts the swarm's step (`Trainer.set_step`) and a restarted peer
restores its own (and takes the swarm's once most partners it mixes are ahead), so both go
straight to the late phase, as the swarm they mix with has; only a fresh run (or a peer that
found nobody to sync from) mixes often.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepCadence:
    every_steps: int  # 0: no step-driven rounds at all (time only)
    until_step: int  # the step cadence applies while the run's step is below this; 0: always

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.until_step < 0:
            raise ValueError(f"gossip cadence: steps must be >= 0, got every {self.every_steps}, until {self.until_step}")

    def active(self, step: int) -> bool:
        """Whether local steps start rounds at the run's step `step` (the early phase)."""
        return self.every_steps > 0 and (self.until_step == 0 or step < self.until_step)

    def due(self, step: int, local_steps: int) -> bool:
        """Called after each local step: a round is due after every `every_steps` of this
        process's steps (`local_steps`, counted from 1), while the run (`step`) is in the early phase."""
        return self.active(step) and local_steps > 0 and local_steps % self.every_steps == 0

    def describe(self, step: int) -> str:
        if self.every_steps == 0:
            return "time only"
        if self.until_step == 0:
            return f"every {self.every_steps} steps"
        phase = "now" if self.active(step) else "done"
        return f"every {self.every_steps} steps until step {self.until_step} ({phase}), then time only"


@dataclass
class RoundBacklog:
    """How many step-driven rounds may be unfinished while training goes on.

    With outer steps a round is due every H inner steps and runs beside training; a round that
    takes longer than H steps makes the next one cover more steps, and a link slower than the
    inner loop then takes fewer, larger outer steps than H asks for. With a backlog bound the
    trainer waits instead: after `due` rounds were asked for, it takes another step only while at
    most `max_unfinished` of them are unfinished, so every H inner steps make exactly one round,
    however slow the link (DiLoCo's synchronous form with one round overlapping training:
    `max_unfinished = 1`).
    """

    max_unfinished: int = 1
    due: int = 0
    finished: int = 0

    def __post_init__(self) -> None:
        if self.max_unfinished < 1:
            raise ValueError(f"round backlog: max_unfinished must be >= 1, got {self.max_unfinished}")

    def may_step(self) -> bool:
        return self.due - self.finished <= self.max_unfinished

    def owed(self) -> bool:
        """Whether a round asked for has not run yet. The round loop runs one exactly when this
        is true: its wake-ups coalesce (two asks, one wake-up) and can come late (a wake-up for a
        round already run), and either would put this peer's outer steps out of step with H."""
        return self.due > self.finished
