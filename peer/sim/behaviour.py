"""What a simulated peer serves, reports and trains on: honest, or one of the hostile policies.

The interface is the daemon's planned `Behaviour` (`round_start`, `observe`, `serve`,
`report_history`, `poison`), with the honest default changing nothing. Hostile peers wrap
`peer.hostile.HostilePolicy`, the attacks real daemons run under `--experiment-attack`, so a
simulated attacker crafts exactly what a real one would. `colluders` are fellow attackers (never
pulled); `data_seed` is the batch order every Sybil of a targeted attack shares.
"""

from __future__ import annotations

import zlib

import torch

from peer.tasks import Task


class Behaviour:
    """Honest: serve the model as it is, report the history as it is, train on the shard."""

    colluders: frozenset[str] = frozenset()
    data_seed: int | None = None

    def round_start(self, model: torch.Tensor, history: torch.Tensor) -> None:
        pass

    def observe(self, ids: list[str], models: list[torch.Tensor]) -> None:
        pass

    def serve(self, requester: str, model: torch.Tensor) -> torch.Tensor:
        return model

    def report_history(self, sketch: torch.Tensor) -> torch.Tensor:
        return sketch

    def poison(self, task: Task) -> None:
        pass


class Hostile(Behaviour):
    def __init__(self, attack: str, peer_id: str, colluders: frozenset[str]):
        from peer.hostile import HostilePolicy

        self.policy = HostilePolicy(attack, seed=zlib.crc32(peer_id.encode()))
        self.policy.colluders = set(colluders)
        self.colluders = colluders
        self.data_seed = self.policy.data_seed_override

    def round_start(self, model, history):
        self.policy.round_start(model, history)

    def observe(self, ids, models):
        self.policy.observe(ids, models)

    def serve(self, requester, model):
        return self.policy.craft(requester, model).contiguous()

    def report_history(self, sketch):
        return self.policy.report_history(sketch)

    def poison(self, task):
        self.policy.poison(task)


HONEST = Behaviour()


def behaviour_for(role: str, attack: str, peer_id: str, attacker_ids: set[str]) -> Behaviour:
    if role != "attacker":
        return HONEST
    return Hostile(attack, peer_id, frozenset(attacker_ids - {peer_id}))
