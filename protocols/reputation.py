"""Peer reputation: misbehaviour lowers a peer's score; below a threshold it is banned for a while.

Pure logic driven by events and `now` (no I/O), like `PartnerPicker`. The two differ in purpose:
the picker's back-off spaces out retries to a peer that failed once (it may just be busy); the
reputation remembers a pattern and cuts a peer off entirely, both as a partner and as a client of
our model server, until a cool-down passes.

Scores start at 1.0 (`INITIAL`). Each event subtracts its penalty; a partner the aggregation rule
mixed adds a little back (`PeerCore.mixed`; a pull that merely validated earns nothing, so a
partner the rule refuses on every round only loses score).
Scores recover linearly toward 1.0 with time, so an honest peer that timed out a few times during
a bad minute is forgiven, while a peer that keeps sending garbage stays under the threshold. A ban
lasts `ban_s`, doubling for each repeat ban up to `max_ban_s`. The table is bounded: when it is
full, the tenth closest to a clean record is forgotten in one pass, so a flood of fresh
identities cannot push a banned peer out of memory (unless every entry is banned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

INITIAL = 1.0

# What each event costs. Network trouble costs little (it may be ours); malformed or rejected data
# costs a lot (an honest peer running our code never sends it).
PENALTIES: dict[str, float] = {
    "timeout": 0.1,
    "unreachable": 0.1,
    "disconnected": 0.1,
    "busy": 0.0,  # a peer at its serving limit is behaving correctly
    "malformed": 0.35,  # undecodable bytes, bad header, wrong schema, truncated protocol message
    "rejected_update": 0.35,  # non-finite, wrong shape, norm far off
    "distrusted": 0.05,  # the robust rule refused its model this round (may be an honest outlier)
    "bad_record": 0.35,  # a DHT record that fails validation, attributed to its signing key
    "flood": 0.2,  # requests beyond the per-peer concurrency limit
}
SUCCESS_BONUS = 0.05


@dataclass
class _Entry:
    score: float = INITIAL
    updated: float = 0.0
    banned_until: float = 0.0
    bans: int = 0
    last_reason: str = ""
    events: int = 0


@dataclass
class Reputation:
    threshold: float = 0.0  # a score at or below this bans the peer
    recovery_per_s: float = 1.0 / 300  # full recovery from 0 in five minutes
    ban_s: float = 60.0
    max_ban_s: float = 3600.0
    max_entries: int = 10_000
    _peers: dict[str, _Entry] = field(default_factory=dict)
    bans_total: int = 0

    def _entry(self, peer: str, now: float) -> _Entry:
        e = self._peers.get(peer)
        if e is None:
            if len(self._peers) >= self.max_entries:
                self._forget_some(now)
            e = self._peers[peer] = _Entry(updated=now)
        else:
            e.score = min(INITIAL, e.score + max(0.0, now - e.updated) * self.recovery_per_s)
            e.updated = max(now, e.updated)
        return e

    def _forget_some(self, now: float) -> None:
        """Forget the tenth least worth remembering (not banned, highest score, oldest) in one
        sorting pass, so a flood of identities costs O(log n) per newcomer, not O(n)."""
        order = sorted(self._peers, key=lambda p: (self._peers[p].banned_until <= now, self._peers[p].score, -self._peers[p].updated),
                       reverse=True)
        for p in order[: max(1, len(order) // 10)]:
            if self._peers[p].banned_until > now:
                break  # never forget a banned peer to make room
            del self._peers[p]
        if len(self._peers) >= self.max_entries:  # all banned: the oldest ban goes
            del self._peers[min(self._peers, key=lambda p: self._peers[p].banned_until)]

    def penalise(self, peer: str, reason: str, now: float) -> bool:
        """Record misbehaviour (`reason` is a PENALTIES key or a protocol error code); True if now banned."""
        e = self._entry(peer, now)
        e.events += 1
        e.last_reason = reason
        e.score -= PENALTIES.get(reason, PENALTIES["malformed"])
        if e.score <= self.threshold and e.banned_until <= now:
            e.bans += 1
            self.bans_total += 1
            e.banned_until = now + min(self.max_ban_s, self.ban_s * 2 ** (e.bans - 1))
            e.score = INITIAL / 2  # after the cool-down it gets another chance, but not a clean slate
            e.updated = e.banned_until  # and its score starts recovering only then
            return True
        return e.banned_until > now

    def reward(self, peer: str, now: float) -> None:
        if peer in self._peers:
            e = self._entry(peer, now)
            e.score = min(INITIAL, e.score + SUCCESS_BONUS)

    def banned(self, peer: str, now: float) -> bool:
        e = self._peers.get(peer)
        return e is not None and e.banned_until > now

    def score(self, peer: str, now: float) -> float:
        e = self._peers.get(peer)
        if e is None:
            return INITIAL
        return min(INITIAL, e.score + max(0.0, now - e.updated) * self.recovery_per_s)

    def banned_peers(self, now: float) -> dict[str, float]:
        """Banned peer id -> seconds left."""
        return {p: round(e.banned_until - now, 1) for p, e in self._peers.items() if e.banned_until > now}

    def summary(self, now: float, limit: int = 32) -> dict[str, dict]:
        """The lowest-scored peers (what `peer status` shows)."""
        worst = sorted(self._peers, key=lambda p: self.score(p, now))[:limit]
        return {p: {"score": round(self.score(p, now), 3), "banned_s": round(max(0.0, self._peers[p].banned_until - now), 1),
                    "bans": self._peers[p].bans, "last": self._peers[p].last_reason} for p in worst}
