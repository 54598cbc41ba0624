"""One simulated peer's decisions, made by the daemon's own decision objects.

`Decisions` is the seam between the simulator and the peer's policy: the swarm view
(`protocols.discovery.SwarmView`), partner choice (`protocols.gossip.PartnerPicker`),
reputation (`protocols.reputation.Reputation`), validation (`peer.validation.reject_reason`)
and the aggregation rule (`peer.aggregation`), wired the way `peer/daemon.py` wires them. Its
methods are the planned `PeerCore` API (`records`, `choose_partners`, `accept`,
`pull_failed`, `mix`, `adopt_step`, `admit`), so that `make_decisions` is the one place that
changes when the daemon's core is importable on its own. Everything takes `now`; nothing here
does I/O or keeps time.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Iterable, Sequence

import torch

from peer.aggregation import RoundContext, make_aggregator
from peer.aggregation.rules import Mix
from peer.config import PeerConfig
from peer.validation import reject_reason
from protocols.discovery import PeerInfo, SwarmView
from protocols.gossip import PartnerPicker
from protocols.reputation import Reputation
from protocols.transport.base import StoredRecord

NETWORK_FAILURES = ("timeout", "unreachable", "disconnected")


class Decisions:
    def __init__(self, peer_id: str, config: PeerConfig, task_name: str, aggregator: str,
                 allowed: frozenset[str] | None = None):
        self.peer_id, self.config = peer_id, config
        self.view = SwarmView(peer_id, task_name, allowed=allowed)
        self.reputation = Reputation()
        self.picker = PartnerPicker(config.partners, rng=random.Random(peer_id))
        self.aggregator = make_aggregator(aggregator)
        self.stats: Counter[str] = Counter()  # rounds, rejected:<reason>, pull_failed:<reason>, refused:<why>

    @property
    def uses_histories(self) -> bool:
        """Whether the rule reads the swarm's history sketches (SybilWall does)."""
        return getattr(self.aggregator, "sybil", None) is not None

    @property
    def uses_loss(self) -> bool:
        return getattr(self.aggregator, "loss_screen", None) is not None

    def records(self, stored: Iterable[StoredRecord], now: float) -> None:
        """A DHT lookup's result into the view; a record that fails validation costs its signer."""
        refused = self.view.update(stored, now, banned=frozenset(self.reputation.banned_peers(now)))
        for owner, reason in refused:
            if owner is not None and owner != self.peer_id and reason.startswith(("malformed_record", "record_owner_mismatch")):
                self._penalise(owner, "bad_record", now)

    def choose_partners(self, now: float, exclude: Iterable[str] = ()) -> tuple[dict[str, PeerInfo], list[str]]:
        """The live, unbanned peers (id -> view entry) and this round's partners among them."""
        skip = set(exclude) | set(self.reputation.banned_peers(now))  # few: the table's banned entries
        live = {i.record.peer_id: i for i in self.view.live(now) if i.record.peer_id not in skip}
        return live, self.picker.pick(list(live), now)

    def accept(self, peer: str, own: torch.Tensor, model: torch.Tensor, now: float) -> bool:
        reason = reject_reason(own, model)
        if reason is not None:
            self.stats[f"rejected:{reason}"] += 1
            self.picker.failed(peer, now)
            self._penalise(peer, "rejected_update", now)
            return False
        self.view.mark_proven(peer)
        self.reputation.reward(peer, now)
        return True

    def pull_failed(self, peer: str, reason: str, now: float) -> None:
        """A pull that failed on the network (`NETWORK_FAILURES`) or with a refusal ("busy", "banned")."""
        self.stats[f"pull_failed:{reason}"] += 1
        self.picker.failed(peer, now)
        self._penalise(peer, reason if reason in NETWORK_FAILURES else "busy", now)

    def mix(self, own: torch.Tensor, ids: Sequence[str], models: Sequence[torch.Tensor], now: float,
            histories: dict[str, torch.Tensor], loss: tuple[float, list[float | None], float] | None = None) -> Mix:
        """Run the rule on our model and the partners'; back off and penalise whom it distrusted.
        `loss`: (own loss, each partner's loss delta, an untrained model's loss) from the probe."""
        ctx = RoundContext(self_id=self.peer_id, partner_ids=list(ids), histories=histories,
                           byzantine_fraction=self.config.byzantine_fraction)
        if loss is not None:
            ctx.own_loss, ctx.loss_deltas, ctx.untrained_loss = loss
        result = self.aggregator(own, list(models), ctx)
        for why in result.refused.values():
            self.stats[f"refused:{why}"] += 1
        distrusted = set(result.distrusted)
        for p in ids:
            if p in distrusted:
                self.picker.failed(p, now)
                self._penalise(p, "distrusted", now)
            else:
                self.picker.succeeded(p)
        self.stats["rounds_ok"] += 1
        return result

    @staticmethod
    def adopt_step(own_step: int, steps: Sequence[int], weights: Sequence[float]) -> int | None:
        """The swarm's step to take after a mix (the lower median of ours and the mixed
        partners'), or None to keep ours: PeerDaemon._adopt_swarm_step's rule."""
        if len(weights) == len(steps):
            steps = [s for s, w in zip(steps, weights) if w > 0]
        if not steps:
            return None
        values = sorted([own_step, *steps])
        target = values[(len(values) - 1) // 2]
        return target if target > own_step else None

    def admit(self, remote: str, now: float) -> str | None:
        """Why a request from `remote` is refused ("banned"), or None to serve it."""
        return "banned" if self.reputation.banned(remote, now) else None

    def _penalise(self, peer: str, event: str, now: float) -> None:
        if self.reputation.penalise(peer, event, now):
            self.view.drop(peer)


def make_decisions(peer_id: str, config: PeerConfig, task_name: str, aggregator: str) -> Decisions:
    return Decisions(peer_id, config, task_name, aggregator)


def reported_histories(view: SwarmView, now: float, decode) -> dict[str, torch.Tensor]:
    """History sketches of every live peer in the view whose record carries one (as the daemon's
    `_reported_histories`); `decode(owner, bytes)` turns a record's bytes into a tensor."""
    return {i.record.peer_id: decode(i.record.peer_id, i.record.history) for i in view.live(now) if i.record.history}



