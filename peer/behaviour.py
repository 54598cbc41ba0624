"""Behaviour: what a peer serves, reports and trains on. The honest default changes nothing.

The daemon and the simulator ask a `Behaviour` at the few points where a peer could lie: the
model it serves, the history sketch it reports, the data it trains on, the peers it never pulls
(its own colluders), and the rule it mixes with. Production peers run `Behaviour()`; experiments
inject hostile ones (`peer/experiment/attacks.py`), so nothing in the daemon or the core names an
attack.
"""

from __future__ import annotations

import torch


class Behaviour:
    """An honest peer."""

    honest = True
    name = "honest"
    aggregator: str | None = None  # the rule this peer mixes with; None: the configured one
    data_seed: int | None = None  # a batch-order seed to train with instead of the configured one

    def __init__(self) -> None:
        self.avoid: frozenset[str] = frozenset()  # peers never pulled

    def poison(self, task) -> None:
        """Change the task's training data before training starts."""

    def round_start(self, model: torch.Tensor, history: torch.Tensor) -> None:
        """A gossip round begins: the peer's model and its local-update history."""

    def observe(self, partner_ids: list[str], models: list[torch.Tensor]) -> None:
        """The models this round's partners served."""

    def serve(self, requester: str, model: torch.Tensor) -> torch.Tensor:
        """The model served to `requester`: this peer's own, for an honest peer."""
        return model

    def report_history(self, sketch: torch.Tensor, others: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The history sketch published in this peer's record. `others`: the live peers' reported
        sketches (peer id -> sketch), which the daemon passes to hostile behaviours only."""
        return sketch
