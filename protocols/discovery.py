"""Peer records and the swarm view: which peers of a run are alive, without I/O.

Each peer publishes a `PeerRecord` under the run's DHT key in its own signed slot every
heartbeat, with an expiration of a few heartbeats. `SwarmView` is fed what a lookup returned and
the current time, and answers who is live. A peer that stops heartbeating disappears once its
record expires; a peer that leaves publishes a record with `state="left"` and disappears at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from protocols.transport.base import StoredRecord

RECORD_VERSION = 1
MAX_ADDRS = 16
MAX_STR = 512
HISTORY_DIM = 512
HISTORY_BYTES = 2 * HISTORY_DIM


def run_key(run_id: str) -> str:
    return f"peer/run/{run_id}/peers"


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    addrs: tuple[str, ...]
    task: str
    step: int
    samples_per_s: float
    version: int
    time: float
    state: str = "up"  # "up" or "left"
    # sketch of the sum of this peer's local updates (float16 bytes, HISTORY_DIM values, or empty):
    # what SybilWall compares; the record's DHT signature binds it to the peer's key
    history: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["addrs"] = list(self.addrs)
        d["v"] = RECORD_VERSION
        return d

    @classmethod
    def from_wire(cls, raw: Any) -> "PeerRecord":
        """Parse a record from the DHT; raise ValueError with a short reason if it is malformed."""
        if not isinstance(raw, dict):
            raise ValueError("record is not a map")
        if raw.get("v") != RECORD_VERSION:
            raise ValueError(f"record version {raw.get('v')!r}")
        addrs = raw.get("addrs")
        if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
            raise ValueError("addrs")
        if not all(isinstance(a, str) and len(a) <= MAX_STR for a in addrs):
            raise ValueError("addrs")
        fields = {
            "peer_id": str, "task": str, "state": str,
            "step": int, "version": int, "samples_per_s": (int, float), "time": (int, float),
        }
        for name, types in fields.items():
            value = raw.get(name)
            if not isinstance(value, types) or isinstance(value, bool):
                raise ValueError(name)
            if isinstance(value, str) and len(value) > MAX_STR:
                raise ValueError(name)
        if raw["state"] not in ("up", "left"):
            raise ValueError("state")
        history = raw.get("history", b"")
        if not isinstance(history, bytes) or len(history) not in (0, HISTORY_BYTES):
            raise ValueError("history")
        if history and not np.isfinite(np.frombuffer(history, dtype="<f2")).all():
            raise ValueError("history")
        return cls(
            peer_id=raw["peer_id"], addrs=tuple(addrs), task=raw["task"], step=raw["step"],
            samples_per_s=float(raw["samples_per_s"]), version=raw["version"], time=float(raw["time"]),
            state=raw["state"], history=history,
        )


@dataclass
class PeerInfo:
    record: PeerRecord
    expiration: float
    last_seen: float  # local time we last saw this record change


@dataclass
class SwarmView:
    """Live peers of one run as seen from `self_id`, fed by DHT lookups."""

    self_id: str
    task: str
    peers: dict[str, PeerInfo] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def update(self, stored: Iterable[StoredRecord], now: float) -> None:
        for item in stored:
            try:
                rec = PeerRecord.from_wire(item.value)
            except ValueError as e:
                self._reject(f"malformed_record:{e}")
                continue
            if rec.peer_id != item.owner:
                self._reject("record_owner_mismatch")  # signed by one key, claims another peer
                continue
            if rec.peer_id == self.self_id:
                continue
            if rec.task != self.task:
                self._reject("record_wrong_task")
                continue
            old = self.peers.get(rec.peer_id)
            if old is not None and old.record.time > rec.time:
                continue  # an older record never replaces a newer one
            changed = old is None or old.record != rec
            self.peers[rec.peer_id] = PeerInfo(rec, item.expiration, now if changed else old.last_seen)
        self.prune(now)

    def prune(self, now: float) -> None:
        for pid in [p for p, info in self.peers.items() if info.expiration <= now]:
            del self.peers[pid]

    def live(self, now: float) -> list[PeerInfo]:
        return [i for i in self.peers.values() if i.expiration > now and i.record.state == "up"]

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
