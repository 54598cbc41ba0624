"""In-process transport: many peers in one event loop, for tests and simulations.

Streams are pairs of bounded in-memory pipes (a writer waits when the reader is behind, so
there are no unbounded queues), and the record store is a dict with expirations on a clock
the test controls. Killing a peer breaks its open streams, as a vanished machine would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from protocols.transport.base import StoredRecord, StreamHandler, Transport, TransportError


class _Pipe:
    def __init__(self, capacity: int):
        self.buf = bytearray()
        self.capacity = capacity
        self.closed = False
        self.cond = asyncio.Condition()

    async def write(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        pos = 0
        async with self.cond:
            while pos < len(data):
                if self.closed:
                    raise ConnectionResetError("stream closed")
                room = self.capacity - len(self.buf)
                if room <= 0:
                    await self.cond.wait()
                    continue
                self.buf += data[pos : pos + room]
                pos += room
                self.cond.notify_all()

    async def read_exactly(self, n: int) -> bytes:
        async with self.cond:
            while len(self.buf) < n:
                if self.closed:
                    raise asyncio.IncompleteReadError(bytes(self.buf), n)
                await self.cond.wait()
            out = bytes(self.buf[:n])
            del self.buf[:n]
            self.cond.notify_all()
            return out

    async def close(self) -> None:
        async with self.cond:
            self.closed = True
            self.cond.notify_all()


class MemoryStream:
    def __init__(self, remote_peer: str, inbound: _Pipe, outbound: _Pipe):
        self.remote_peer = remote_peer
        self._in, self._out = inbound, outbound

    async def read_exactly(self, n: int) -> bytes:
        return await self._in.read_exactly(n)

    async def write(self, data: bytes | memoryview) -> None:
        await self._out.write(data)

    async def close(self) -> None:
        await self._out.close()

    async def abort(self) -> None:
        await self._in.close()
        await self._out.close()


class MemoryNetwork:
    """The shared medium: who is up, their handlers, and the record store."""

    def __init__(self, clock: Callable[[], float] = time.time, pipe_capacity: int = 4 * 1024 * 1024):
        self.clock = clock
        self.pipe_capacity = pipe_capacity
        self.handlers: dict[str, dict[str, StreamHandler]] = {}
        self.records: dict[str, dict[str, StoredRecord]] = {}
        self.open_streams: dict[str, set[MemoryStream]] = {}
        self._tasks: set[asyncio.Task] = set()

    def transport(self, peer_id: str) -> MemoryTransport:
        return MemoryTransport(self, peer_id)

    async def kill(self, peer_id: str) -> None:
        """Make a peer vanish: handlers gone, its open streams broken mid-transfer."""
        self.handlers.pop(peer_id, None)
        for s in list(self.open_streams.pop(peer_id, ())):
            await s.abort()


class MemoryTransport(Transport):
    def __init__(self, network: MemoryNetwork, peer_id: str):
        self.net = network
        self.peer_id = peer_id

    async def start(self) -> None:
        self.net.handlers.setdefault(self.peer_id, {})
        self.net.open_streams.setdefault(self.peer_id, set())

    async def stop(self) -> None:
        await self.net.kill(self.peer_id)

    async def addrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}/p2p/{self.peer_id}"]

    async def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.net.handlers.setdefault(self.peer_id, {})[protocol] = handler

    async def open(self, peer_id: str, protocol: str, addrs: list[str] | None = None) -> MemoryStream:
        handler = self.net.handlers.get(peer_id, {}).get(protocol)
        if handler is None or self.peer_id not in self.net.handlers:
            raise TransportError(f"peer {peer_id} unreachable for {protocol}")
        a, b = _Pipe(self.net.pipe_capacity), _Pipe(self.net.pipe_capacity)
        client, server = MemoryStream(peer_id, a, b), MemoryStream(self.peer_id, b, a)
        for owner, s in ((self.peer_id, client), (peer_id, server)):
            self.net.open_streams.setdefault(owner, set()).add(s)

        async def serve() -> None:
            try:
                await handler(server)
            finally:
                self.net.open_streams.get(peer_id, set()).discard(server)
                await server.close()

        task = asyncio.get_running_loop().create_task(serve())
        self.net._tasks.add(task)
        task.add_done_callback(self.net._tasks.discard)
        return client

    async def publish(self, key: str, value: Any, expiration: float) -> bool:
        slot = self.net.records.setdefault(key, {})
        old = slot.get(self.peer_id)
        if old is not None and old.expiration > expiration:
            return False  # as in the DHT: a record never overwrites a newer one
        slot[self.peer_id] = StoredRecord(self.peer_id, value, expiration)
        return True

    async def lookup(self, key: str) -> list[StoredRecord]:
        now = self.now()
        return [r for r in self.net.records.get(key, {}).values() if r.expiration > now]

    def now(self) -> float:
        return self.net.clock()
