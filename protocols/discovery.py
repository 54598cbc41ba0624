"""Peer records and the swarm view: which peers of a run are alive, without I/O.

Each peer publishes a `PeerRecord` under the run's DHT key in its own signed slot every
heartbeat, with an expiration of a few heartbeats. `SwarmView` is fed what a lookup returned and
the current time, and answers who is live. A peer that stops heartbeating disappears once its
record expires; a peer that leaves publishes a record with `state="left"` and disappears at once.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from protocols.transport.base import StoredRecord

RECORD_VERSION = 1
MAX_ADDRS = 16
MAX_STR = 512
# a record carries a sketch of its peer's history (the sum of its local updates): this many
# float16 values, the same random projection on every peer (peer/aggregation/sybil.py Sketcher)
SKETCH_DIM = 512
SKETCH_BYTES = 2 * SKETCH_DIM
# A record lives a few heartbeats; one that claims to live longer is refused (it could otherwise sit
# in every DHT node's storage for years, and a replayed old record would never expire).
MAX_RECORD_TTL_S = 600.0  # records are published for 3 heartbeats
# Bounds on what one node keeps of a run (memory, and DHT replies below hivemind's 4 MiB limit).
MAX_VIEW_PEERS = 1024
MAX_NEW_PER_HOST = 64  # peers not yet proven (no model pulled from them) advertising one host


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
    # sketch of the sum of this peer's local updates (float16 bytes, SKETCH_DIM values, or empty):
    # what SybilWall compares; the record's DHT signature binds it to the peer's key
    history: bytes = b""
    # what an observer of the run shows (`peer swarm`): the last training loss and held-out
    # accuracy, finite or None; records without them (older peers) parse with None
    loss: float | None = None
    accuracy: float | None = None

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["addrs"] = list(self.addrs)
        d["v"] = RECORD_VERSION
        return d

    @classmethod
    def from_wire(cls, raw: Any) -> PeerRecord:
        """Parse a record from the DHT; raise ValueError with a short reason if it is malformed."""
        if not isinstance(raw, dict):
            raise ValueError("record is not a map")
        if raw.get("v") != RECORD_VERSION:
            raise ValueError("version")  # never echo peer-chosen values into counter names
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
        if not isinstance(history, bytes) or len(history) not in (0, SKETCH_BYTES):
            raise ValueError("history")
        if history and not np.isfinite(np.frombuffer(history, dtype="<f2")).all():
            raise ValueError("history")
        metrics = {}
        for name in ("loss", "accuracy"):
            value = raw.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
                raise ValueError(name)
            metrics[name] = None if value is None else float(value)
        return cls(
            peer_id=raw["peer_id"], addrs=tuple(addrs), task=raw["task"], step=raw["step"],
            samples_per_s=float(raw["samples_per_s"]), version=raw["version"], time=float(raw["time"]),
            state=raw["state"], history=history, **metrics,
        )


def check_record(owner: str | None, raw: Any) -> tuple[PeerRecord | None, str | None]:
    """What every node can check about a record, whatever its clock and settings: (record, None)
    or (None, reason). The DHT checked the signature (only the owner's key can write its slot);
    here: the record speaks for the key that signed it, and its schema and sizes are right.

    This is all a DHT node may apply to records a lookup *returns*: hivemind drops a node's whole
    reply when one record in it fails, so anything that depends on the local clock or local
    settings (lifetime, a closed run's admissions) would let one record hide every peer.
    """
    if owner is None:
        return None, "unsigned_record"
    try:
        rec = PeerRecord.from_wire(raw)
    except ValueError as e:
        return None, f"malformed_record:{e}"
    if rec.peer_id != owner:
        return None, "record_owner_mismatch"  # signed by one key, claims another peer
    return rec, None


def check_admission(owner: str | None, expiration: float, now: float, allowed: frozenset[str] | None = None) -> str | None:
    """The local checks, applied where one record can be refused alone (a store, the view): None or a reason."""
    if allowed is not None and owner not in allowed:
        return "not_admitted"
    if expiration > now + MAX_RECORD_TTL_S:
        return "record_ttl_too_long"
    return None


@functools.lru_cache(maxsize=8192)  # every heartbeat re-reads every record's addrs: parse each once
def public_host(addr: str) -> str | None:
    """The host of a multiaddr if it is a public address ('/ip4/1.2.3.4/tcp/1/p2p/X' -> '1.2.3.4').

    Loopback, private and link-local addresses are None: every peer lists some (p2pd reports all
    interfaces), so grouping by them would put every newcomer in one group that fakes can fill.
    A relayed address (`.../p2p/<relay>/p2p-circuit/...`) is None too: its host is the relay's,
    which every peer behind NAT that reserved there shares.
    """
    import ipaddress

    parts = addr.split("/")
    if len(parts) < 3 or "p2p-circuit" in parts:
        return None
    if parts[1] in ("dns", "dns4", "dns6"):
        return parts[2].lower()
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return None
    return None if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified) else str(ip)


@functools.lru_cache(maxsize=8192)  # a record's addrs are read on every heartbeat of every view
def public_hosts(addrs: tuple[str, ...]) -> frozenset[str]:
    """The public hosts among a record's addrs (`public_host` of each, None dropped)."""
    return frozenset(h for h in map(public_host, addrs) if h is not None)


@dataclass
class PeerInfo:
    record: PeerRecord
    expiration: float
    last_seen: float  # local time we last saw this record change
    proven: bool = False  # we pulled a valid model from it at least once


@dataclass
class SwarmView:
    """Live peers of one run as seen from `self_id`, fed by DHT lookups.

    Bounded, so a flood of fake records cannot evict real peers: a peer already in the view is
    only ever removed by its own expiry or leave record, a newcomer is admitted only while there is
    room (`max_peers`), and newcomers that advertise one public host share `max_new_per_host`
    places until a pulled model proves them real. A lookup is processed known peers first and at
    most `max_per_update` records, so a huge merged reply cannot starve them or stall the loop.
    Newcomers are taken in an order drawn by this view (a keyed hash of their ids, the key secret
    to this process): in a run larger than `max_peers`, views fill with different peers, instead
    of every view holding the same first publishers (the simulator showed it at 1,000 peers,
    docs/simulation.md), and no identity can be ground to rank first in anyone's view.
    Records that claim to live longer than MAX_RECORD_TTL_S are kept only that long. `banned`
    keeps out peers the reputation table cut off. `update` returns (owner, reason) for each record
    it refused, so the caller can hold the signing key responsible.
    """

    self_id: str
    task: str
    allowed: frozenset[str] | None = None  # closed run: only these peer ids
    max_peers: int = MAX_VIEW_PEERS
    max_new_per_host: int = MAX_NEW_PER_HOST
    max_per_update: int = 4 * MAX_VIEW_PEERS
    peers: dict[str, PeerInfo] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    other_tasks: dict[str, str] = field(default_factory=dict)  # owner -> the task its record names
    order_key: bytes = field(default_factory=lambda: os.urandom(16), repr=False)  # newcomers' admission order
    # how a stored record is parsed and checked: `check_record`, or anything that returns what it
    # returns for the same (owner, value) (the simulator shares one parse per published record)
    check: Callable[[str | None, Any], tuple[PeerRecord | None, str | None]] = field(default=check_record, repr=False)
    # `live` as of `_live_span[0]`, valid until the first of its entries expires (`_live_span[1]`)
    # or the view changes: rounds read it far more often than lookups change it
    _live: list[PeerInfo] | None = field(default=None, init=False, repr=False, compare=False)
    _live_span: tuple[float, float] = field(default=(math.inf, -math.inf), init=False, repr=False, compare=False)
    _live_by_id: dict[str, PeerInfo] | None = field(default=None, init=False, repr=False, compare=False)

    def update(self, stored: Iterable[StoredRecord], now: float, banned: frozenset[str] = frozenset()) -> list[tuple[str | None, str]]:
        refused: list[tuple[str | None, str]] = []
        self.prune(now)
        self._live = None
        peers = self.peers
        # known peers first (in the lookup's order), then newcomers in our own order
        stored = list(stored)
        known = [r for r in stored if r.owner in peers]
        if len(known) < len(stored):
            newcomers = [r for r in stored if r.owner not in peers]
            newcomers.sort(key=self._newcomer_order)
            stored = known + newcomers
        if len(stored) > self.max_per_update:
            self.rejected["lookup_truncated"] = self.rejected.get("lookup_truncated", 0) + len(stored) - self.max_per_update
            stored = stored[: self.max_per_update]
        unproven_by_host: dict[str, int] = {}
        for info in peers.values():
            if not info.proven:
                for h in public_hosts(info.record.addrs):
                    unproven_by_host[h] = unproven_by_host.get(h, 0) + 1
        check, allowed, task = self.check, self.allowed, self.task
        for item in stored:
            if allowed is not None and item.owner not in allowed:
                reason, rec = "not_admitted", None
            else:
                rec, reason = check(item.owner, item.value)
            if reason is None and rec.task != task:
                reason = "record_wrong_task"
                if item.owner in self.other_tasks or len(self.other_tasks) < 64:  # bounded: names only
                    self.other_tasks[item.owner] = rec.task[:80]
            if reason is not None:
                self._reject(reason)
                refused.append((item.owner, reason))
                continue
            if rec.peer_id == self.self_id or rec.peer_id in banned:
                continue
            old = peers.get(rec.peer_id)
            if old is not None and old.record.time > rec.time:
                continue  # an older (replayed) record never replaces a newer one
            if old is None:
                hosts = public_hosts(rec.addrs)
                if len(peers) >= self.max_peers or any(unproven_by_host.get(h, 0) >= self.max_new_per_host for h in hosts):
                    self._reject("view_full")
                    continue
                for h in hosts:
                    unproven_by_host[h] = unproven_by_host.get(h, 0) + 1
            changed = old is None or (old.record is not rec and old.record != rec)
            expiration = min(item.expiration, now + MAX_RECORD_TTL_S)  # a long-lived claim is cut short
            peers[rec.peer_id] = PeerInfo(rec, expiration, now if changed else old.last_seen,
                                          proven=old is not None and old.proven)
        self.prune(now)
        return refused

    def _newcomer_order(self, r: StoredRecord) -> bytes:
        owner = r.owner if isinstance(r.owner, str) else repr(r.owner)
        return hashlib.blake2b(owner.encode(), key=self.order_key, digest_size=8).digest()

    def mark_proven(self, peer_id: str) -> None:
        info = self.peers.get(peer_id)
        if info is not None:
            info.proven = True

    def drop(self, peer_id: str) -> None:
        if self.peers.pop(peer_id, None) is not None:
            self._live = None

    def prune(self, now: float) -> None:
        dead = [p for p, info in self.peers.items() if info.expiration <= now]
        for pid in dead:
            del self.peers[pid]
        if dead:
            self._live = None

    def live(self, now: float) -> list[PeerInfo]:
        """The peers that are up and unexpired at `now` (a new list each call)."""
        return list(self._live_at(now))

    def _live_at(self, now: float) -> list[PeerInfo]:
        start, until = self._live_span
        if self._live is None or not start <= now < until:
            self._live = [i for i in self.peers.values() if i.expiration > now and i.record.state == "up"]
            self._live_span = (now, min((i.expiration for i in self._live), default=math.inf))
            self._live_by_id = None
        return self._live

    def live_by_id(self, now: float) -> dict[str, PeerInfo]:
        """`live`, as peer id -> entry in peer id order (a new dict each call)."""
        self._live_at(now)
        if self._live_by_id is None:
            self._live_by_id = {i.record.peer_id: i for i in sorted(self._live, key=lambda i: i.record.peer_id)}
        return dict(self._live_by_id)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def swarm_totals(peers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals over peers described as `{"samples_per_s", "accuracy"}` (accuracy may be None):
    how many, their summed throughput, and the best, median and worst accuracy (None if no peer
    has evaluated yet). `peer status` and `peer swarm` both show these."""
    peers = list(peers)
    acc = sorted(p["accuracy"] for p in peers if p.get("accuracy") is not None)
    spread = None
    if acc:
        mid = len(acc) // 2
        median = acc[mid] if len(acc) % 2 else (acc[mid - 1] + acc[mid]) / 2
        spread = {"best": acc[-1], "median": round(median, 4), "worst": acc[0]}
    return {"peers": len(peers), "samples_per_s": round(sum(p["samples_per_s"] or 0.0 for p in peers), 1), "accuracy": spread}
