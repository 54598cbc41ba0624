"""What the daemon needs from a network: named stream protocols and a signed record store.

Two implementations: `hivemind` (real p2pd + DHTNode, production) and `memory` (one process,
for tests and simulation). The daemon only ever sees this interface.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from protocols.codec import Stream

StreamHandler = Callable[[Stream], Awaitable[None]]


class TransportError(Exception):
    """Could not reach a peer or open a stream (the peer is gone, unreachable or refused)."""


@dataclass(frozen=True)
class StoredRecord:
    """One record under a DHT key: who wrote it (verified by the store), its value, its expiry."""

    owner: str
    value: Any
    expiration: float


class Transport(abc.ABC):
    peer_id: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) other peers can use to reach us."""

    @abc.abstractmethod
    async def set_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    @abc.abstractmethod
    async def open(self, peer_id: str, protocol: str, addrs: list[str] | None = None) -> Stream:
        """Open a stream to `peer_id` speaking `protocol`; raise TransportError if impossible."""

    @abc.abstractmethod
    async def publish(self, key: str, value: Any, expiration: float) -> bool:
        """Store `value` under `key` in our own signed slot (only our key can overwrite it)."""

    @abc.abstractmethod
    async def lookup(self, key: str) -> list[StoredRecord]:
        """All unexpired records under `key`, one per owner."""

    @abc.abstractmethod
    def now(self) -> float:
        """The clock records expire by (DHT time for hivemind, a virtual clock in memory)."""

    def dht_rpcs(self) -> dict[str, Any]:
        """What became of the DHT RPCs other peers sent us (protocols/dht_guard.py); empty where
        the transport serves none."""
        return {}

    def relay_service(self, now: float) -> dict[str, Any] | None:
        """The relay we serve for others (`--relay-service`, protocols/relay.py): reservations held
        at `now` (unix s), circuits open, and its counters; None where we serve none."""
        return None


class CountingStream:
    """Wraps a stream: adds the bytes it moves to a stats dict (bytes_sent / bytes_received), and
    bounds each read by `read_timeout` seconds, so a peer that stops sending (or sends one byte a
    second) cannot hold a transfer open past one read's deadline without moving data."""

    def __init__(self, inner: Stream, counters: dict[str, int], read_timeout: float | None = None):
        self.inner = inner
        self.remote_peer = inner.remote_peer
        self.counters = counters
        self.read_timeout = read_timeout

    async def read_exactly(self, n: int) -> bytes:
        if self.read_timeout is None:
            data = await self.inner.read_exactly(n)
        else:
            data = await asyncio.wait_for(self.inner.read_exactly(n), timeout=self.read_timeout)
        self.counters["bytes_received"] = self.counters.get("bytes_received", 0) + len(data)
        return data

    def __getattr__(self, name: str):
        if name == "max_write":
            return getattr(self.inner, "max_write", None)
        if name != "read_into" or not hasattr(self.inner, "read_into"):
            raise AttributeError(name)

        async def read_into(view: memoryview) -> int:
            if self.read_timeout is None:
                n = await self.inner.read_into(view)
            else:  # the same per-read deadline as read_exactly: a trickling peer cannot stall us
                n = await asyncio.wait_for(self.inner.read_into(view), timeout=self.read_timeout)
            self.counters["bytes_received"] = self.counters.get("bytes_received", 0) + n
            return n

        return read_into

    async def write(self, data: bytes | memoryview) -> None:
        await self.inner.write(data)
        self.counters["bytes_sent"] = self.counters.get("bytes_sent", 0) + len(data)

    async def close(self) -> None:
        await self.inner.close()
