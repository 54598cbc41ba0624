"""The DHT as one shared record store: every peer's signed slot under the run's key, with expiry.

What a real lookup returns (`Transport.lookup`): every unexpired record under the key, one per
owner, as `StoredRecord`s whose value is the record's wire form. Owners are verified by the store
(in the real DHT, by signatures), so the simulator's peers cannot write each other's slots.
Records come back in the order their owners first published (as a dict keeps them): the view
(`protocols.discovery.SwarmView`) then admits the first `MAX_VIEW_PEERS` it has room for.

History sketches are decoded once per published record and shared by every peer that reads it
(`sketch`): decoding a 512-value float16 sketch per view entry per round would dominate a
simulation of 1,000 peers, and the values are the same for every reader.
"""

from __future__ import annotations

from typing import Any

import torch

from protocols.transport.base import StoredRecord


class RecordStore:
    def __init__(self) -> None:
        self._records: dict[str, StoredRecord] = {}
        # owner -> its last few (history bytes, decoded sketch): views lag a heartbeat behind
        self._sketches: dict[str, list[tuple[bytes, torch.Tensor]]] = {}
        self.publishes = 0
        self.lookups = 0

    def publish(self, owner: str, wire: dict[str, Any], expiration: float) -> None:
        self._records[owner] = StoredRecord(owner, wire, expiration)
        self.publishes += 1

    def lookup(self, now: float) -> list[StoredRecord]:
        """Every unexpired record; expired ones are dropped from the store as they are met."""
        self.lookups += 1
        dead = [o for o, r in self._records.items() if r.expiration <= now]
        for o in dead:
            del self._records[o]
            self._sketches.pop(o, None)
        return list(self._records.values())

    def sketch(self, owner: str, history: bytes) -> torch.Tensor:
        """The float32 history sketch of `owner`'s record whose `history` bytes are these."""
        kept = self._sketches.setdefault(owner, [])
        for raw, t in kept:
            if raw is history:
                return t
        t = torch.frombuffer(bytearray(history), dtype=torch.float16).float()
        kept.append((history, t))
        del kept[:-3]
        return t

    def __len__(self) -> int:
        return len(self._records)
