"""Reading a run's peer records from hivemind's DHT as an outsider: the lookup and the checks.

`peer swarm` is not a member of the DHT: it asks nodes for the run key with hivemind's `rpc_find`
(over py-libp2p, `protocols/transport/light.py`) and never stores anything or enters a routing
table. This module is what it does with the replies, with no network code of its own:

- `RecordChecker` verifies every record of a reply with the validators the daemon's DHT node uses
  (`protocols/transport/hivemind.py`: hivemind's RSA signature check, then the run's schema and
  owner checks), one record at a time, so one bad record costs only itself.
- `Lookup` is a Kademlia-style iterative lookup without I/O: ask the initial peers, then the
  nodes closest to the key (XOR distance of hivemind's DHTIDs) that replies name, a few at a
  time, until the closest nodes we can dial have all been asked.
- `read_run` drives both over any `find(peer_id, addrs) -> FindResponse` coroutine (trio).

hivemind's `rpc_find` names neighbours by node id and peer id only; their addresses live in
p2pd's peer store, which we do not have. The nodes of a run's DHT are the run's peers, and each
peer's verified record lists its addresses, so those are the addresses we dial. Addresses from a
record that failed verification are never dialled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from protocols.discovery import MAX_RECORD_TTL_S, PeerRecord, check_record, run_key

BUCKET_SIZE = 20  # hivemind's default bucket size: how many nodes a reply names, and how many we aim to ask
PARALLEL = 3  # Kademlia's alpha: queries in flight at once
MAX_QUERIES = 64  # however large the swarm, a lookup asks at most this many nodes
QUERY_TIMEOUT_S = 5.0


class QueryError(Exception):
    """A node could not be asked, or its answer was unusable; the message says why, as a sentence."""


@dataclass(frozen=True)
class VerifiedRecord:
    owner: str  # peer id of the key that signed the record (the record names the same peer id)
    record: PeerRecord
    expiration: float


class RecordChecker:
    """The daemon's DHT validators, applied to each record of a run-key reply on its own."""

    def __init__(self, run_id: str):
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.routing import DHTID

        from protocols.transport.hivemind import RunRecordValidator, safe_validator

        self.key = run_key(run_id)
        self.key_id = DHTID.generate(source=self.key).to_bytes()
        self.run_records = RunRecordValidator(self.key)
        # RSASignatureValidator needs a private key only to sign, which we never do
        self.validator = safe_validator([RSASignatureValidator(), self.run_records], self.run_records)
        self.rejected: dict[str, int] = {}

    def check(self, subkey: Any, value: bytes, expiration: float) -> VerifiedRecord | None:
        """The record if its signature and contents check out; else None, counted in `rejected`."""
        from hivemind.dht.validation import DHTRecord
        from hivemind.utils import MSGPackSerializer

        from protocols.transport.hivemind import _owner_peer_id, _unpack_plain

        record = DHTRecord(self.key_id, MSGPackSerializer.dumps(subkey), value, expiration)
        before = dict(self.run_records.rejected)
        if not self.validator.validate(record):
            # the run validator counts its refusals by reason; an uncounted one is a signature that does not verify
            reasons = [r for r, n in self.run_records.rejected.items() if n != before.get(r, 0)]
            self._reject(reasons[0] if reasons else "bad_signature")
            return None
        owner = _owner_peer_id(subkey)
        rec, reason = check_record(owner, _unpack_plain(self.validator.strip_value(record)))
        if reason is not None:  # the validator ran the same check: only a bug gets here
            self._reject(reason)
            return None
        return VerifiedRecord(owner, rec, expiration)

    def check_reply(self, result: Any) -> list[VerifiedRecord]:
        """Verified records from one `FindResult` for the run key (none if it holds no dictionary)."""
        from hivemind.proto import dht_pb2
        from hivemind.utils import MSGPackSerializer

        if result.type == dht_pb2.NOT_FOUND:
            return []
        if result.type != dht_pb2.FOUND_DICTIONARY:
            self._reject("not_a_dictionary")
            return []
        try:
            entries = MSGPackSerializer.loads(result.value)
            items = [(subkey, item.value, item.expiration_time) for subkey, item in entries.items()]
        except Exception:
            self._reject("malformed_reply")
            return []
        return [v for v in (self.check(*item) for item in items) if v is not None]

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass
class Lookup:
    """Kademlia-style iterative lookup of one DHT key, without I/O.

    `next_queries` says whom to ask next (the initial peers first, then the nodes closest to the key
    that have addresses and were not asked yet, at most `parallel` in flight); the caller reports
    each outcome with `on_reply` or `on_failure`. The lookup is done when nothing is in flight and
    `next_queries` has no one left: the `k` closest dialable nodes were all asked, or `max_queries`.
    """

    key_id: int
    initial: list[str]  # peer ids, asked first whatever their distance
    k: int = BUCKET_SIZE
    parallel: int = PARALLEL
    max_queries: int = MAX_QUERIES
    addrs: dict[str, list[str]] = field(default_factory=dict)  # peer id -> addresses we may dial
    node_ids: dict[str, int] = field(default_factory=dict)  # peer id -> DHT node id, as replies name them
    asked: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # peer id -> why it could not be asked

    def learn_addrs(self, peer_id: str, addrs: list[str]) -> None:
        if addrs and peer_id not in self.addrs:
            self.addrs[peer_id] = list(addrs)

    def _distance(self, peer_id: str) -> int:
        node_id = self.node_ids.get(peer_id)
        # a peer known only from its record (no reply named its node id) ranks behind every known one
        return 1 << 160 if node_id is None else node_id ^ self.key_id

    def next_queries(self) -> list[str]:
        room = min(self.parallel - len(self.in_flight), self.max_queries - len(self.asked))
        if room <= 0:
            return []
        fresh = [p for p in self.initial if p not in self.asked]
        if not fresh:
            closest = sorted((p for p in self.addrs if p not in self.failed), key=self._distance)[: self.k]
            fresh = [p for p in closest if p not in self.asked]
        chosen = fresh[:room]
        self.asked.update(chosen)
        self.in_flight.update(chosen)
        return chosen

    def on_reply(self, peer_id: str, node_id: int | None, neighbours: list[tuple[int, str]]) -> None:
        self.in_flight.discard(peer_id)
        self.answered.add(peer_id)
        if node_id is not None:
            self.node_ids[peer_id] = node_id
        for nid, pid in neighbours:
            self.node_ids.setdefault(pid, nid)

    def on_failure(self, peer_id: str, reason: str) -> None:
        self.in_flight.discard(peer_id)
        self.failed[peer_id] = reason


@dataclass
class RunSnapshot:
    """What one lookup found: every verified record (all of them, several per peer when nodes hold
    different versions), the rejections by reason, and which nodes answered or failed."""

    run_id: str
    records: list[VerifiedRecord]
    rejected: dict[str, int]
    asked: list[str]
    answered: list[str]
    failed: dict[str, str]


FindFn = Callable[[str, list[str]], Awaitable[Any]]  # (peer id, addresses) -> dht_pb2.FindResponse


async def read_run(find: FindFn, run_id: str, initial: dict[str, list[str]], checker: RecordChecker | None = None,
                   timeout: float = QUERY_TIMEOUT_S) -> RunSnapshot:
    """Look the run key up through `find`, starting from `initial` (peer id -> addresses)."""
    import trio
    from hivemind.p2p import PeerID

    checker = checker or RecordChecker(run_id)
    checker.rejected = {}  # counts of this lookup only
    lookup = Lookup(int.from_bytes(checker.key_id, "big"), list(initial))
    for pid, addrs in initial.items():
        lookup.learn_addrs(pid, addrs)
    records: list[VerifiedRecord] = []

    async def ask(peer_id: str) -> None:
        try:
            with trio.fail_after(timeout):
                response = await find(peer_id, lookup.addrs[peer_id])
            (result,) = response.results  # one key asked, one result
        except trio.TooSlowError:
            lookup.on_failure(peer_id, f"no answer within {timeout:g} s")
            return
        except Exception as e:  # any failure of one node is that node's; the lookup goes on
            lookup.on_failure(peer_id, _reason(e))
            return
        found = checker.check_reply(result)
        records.extend(found)
        for v in found:
            lookup.learn_addrs(v.owner, list(v.record.addrs))
        node_id = int.from_bytes(response.peer.node_id, "big") if response.peer.node_id else None
        neighbours = []
        for nid, pid in zip(result.nearest_node_ids, result.nearest_peer_ids):
            try:
                neighbours.append((int.from_bytes(nid, "big"), PeerID(pid).to_base58()))
            except Exception:
                checker._reject("malformed_neighbour")
        lookup.on_reply(peer_id, node_id, neighbours)

    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run_one(pid: str) -> None:
            await ask(pid)
            schedule()

        def schedule() -> None:
            for pid in lookup.next_queries():
                nursery.start_soon(run_one, pid)
            if not lookup.in_flight:
                done.set()

        schedule()
        await done.wait()
    return RunSnapshot(run_id, records, dict(checker.rejected), sorted(lookup.asked), sorted(lookup.answered),
                       dict(lookup.failed))


def _reason(e: Exception) -> str:
    if isinstance(e, QueryError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def latest_by_peer(records: list[VerifiedRecord], now: float) -> list[VerifiedRecord]:
    """Each peer's newest record (by the time it was published, a replayed older one never wins)
    that is unexpired and not a leave; a lifetime beyond MAX_RECORD_TTL_S is cut short."""
    newest: dict[str, VerifiedRecord] = {}
    for v in records:
        old = newest.get(v.owner)
        if old is None or (v.record.time, v.expiration) > (old.record.time, old.expiration):
            newest[v.owner] = v
    live = []
    for v in newest.values():
        expiration = min(v.expiration, now + MAX_RECORD_TTL_S)
        if expiration > now and v.record.state == "up":
            live.append(dataclasses.replace(v, expiration=expiration))
    return sorted(live, key=lambda v: v.owner)
