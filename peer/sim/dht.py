"""The DHT as one shared record store: every peer's signed slot under the run's key, with expiry.

What a real lookup returns (`Transport.lookup`): every unexpired record under the key, one per
owner, as `StoredRecord`s whose value is the record's wire form. Owners are verified by the store
(in the real DHT, by signatures), so the simulator's peers cannot write each other's slots.
Records come back in the order their owners first published (as a dict keeps them); each view
(`protocols.discovery.SwarmView`) admits newcomers in its own order.

Records are parsed and checked once per publication (`check`, every simulated view's
`SwarmView.check`) instead of once per reader per heartbeat, and history sketches are decoded
once per published record (`sketch`): at 1,000 peers, parsing every record for every reader and
decoding a 512-value float16 sketch per view entry per round would dominate the run, and the
results are the same for every reader.
"""

from __future__ import annotations

from typing import Any

import torch

from protocols.discovery import PeerRecord, check_record
from protocols.transport.base import StoredRecord


class RecordStore:
    def __init__(self) -> None:
        self._records: dict[str, StoredRecord] = {}
        # owner -> its last few (history bytes, decoded sketch): views lag a heartbeat behind
        self._sketches: dict[str, list[tuple[bytes, torch.Tensor]]] = {}
        self._checked: dict[str, tuple[Any, tuple[PeerRecord | None, str | None]]] = {}  # owner -> (wire, check_record's result)
        self.publishes = 0
        self.lookups = 0

    def publish(self, owner: str, wire: dict[str, Any], expiration: float) -> None:
        self._records[owner] = StoredRecord(owner, wire, expiration)
        self._checked.pop(owner, None)
        self.publishes += 1

    def check(self, owner: str | None, raw: Any) -> tuple[PeerRecord | None, str | None]:
        """`check_record(owner, raw)`, computed once per published record and shared by every
        view that reads it (`SwarmView.check`); the parsed record is immutable."""
        hit = self._checked.get(owner)
        if hit is not None and hit[0] is raw:
            return hit[1]
        result = check_record(owner, raw)
        stored = self._records.get(owner)
        if stored is not None and stored.value is raw:
            self._checked[owner] = (raw, result)
        return result

    def lookup(self, now: float) -> list[StoredRecord]:
        """Every unexpired record; expired ones are dropped from the store as they are met."""
        self.lookups += 1
        dead = [o for o, r in self._records.items() if r.expiration <= now]
        for o in dead:
            del self._records[o]
            self._sketches.pop(o, None)
            self._checked.pop(o, None)
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
