"""The p2pd stream's zero-copy receive (`_P2PStream.read_into`) over two real p2pd daemons.

read_into swaps the StreamReader's protocol for one that receives into the caller's array and
back again; a mistake there loses bytes the StreamReader had buffered, overruns the array into
the next message, or hangs at EOF. Each assertion below breaks on one of those.
"""

from __future__ import annotations

import asyncio

import contextlib

import numpy as np
import pytest
import uvloop

from protocols.codec import _fill
from protocols.transport.hivemind import HivemindTransport

PROTOCOL = "/peer/test-read-into/1"
N = 700_001  # float32: 2.8 MB, not a multiple of any chunk size


@contextlib.asynccontextmanager
async def two_transports(tmp_path):
    ts = [HivemindTransport(str(tmp_path / f"{n}.key"), ["/ip4/127.0.0.1/tcp/0"]) for n in ("server", "puller")]
    started = []
    try:
        for t in ts:
            await t.start()
            started.append(t)
        yield ts
    finally:
        for t in started:
            await t.stop()


# the daemon runs uvloop (peer/main.py); asyncio's own loop takes the other code path of set_protocol
LOOPS = {"uvloop": uvloop.run, "asyncio": asyncio.run}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_payload_lands_intact_between_two_messages_in_odd_pieces(tmp_path, loop):
    LOOPS[loop](_payload_between_messages(tmp_path))


async def _payload_between_messages(tmp_path):
    async with two_transports(tmp_path) as (server, puller):
        payload = np.arange(N, dtype="<f4")
        raw = memoryview(payload).cast("B")

        async def handler(stream):
            await stream.write(b"HEAD" + bytes(raw[:5]))  # part of the payload travels with the header
            pos = 5
            for size in (1, 7, 65_539, 1 << 20):  # odd pieces, then 1 MiB ones
                while pos < len(raw):
                    await stream.write(raw[pos : pos + size])
                    pos += size
                    if size < 1 << 20:
                        break
            await stream.write(b"TAIL")
            await stream.read_exactly(1)  # the puller has everything: closing now cannot cut the tail

        await server.set_handler(PROTOCOL, handler)
        stream = await puller.open(server.peer_id, PROTOCOL, await server.addrs())
        try:
            assert await asyncio.wait_for(stream.read_exactly(4), 30) == b"HEAD"
            got = np.empty(N, dtype="<f4")
            await asyncio.wait_for(_fill(stream, memoryview(got).cast("B"), 1 << 20), 60)
            assert np.array_equal(got, payload)
            # the reader is back on the StreamReader and nothing of the next message was swallowed
            assert await asyncio.wait_for(stream.read_exactly(4), 30) == b"TAIL"
            await stream.write(b"k")
        finally:
            await stream.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_stream_that_ends_mid_payload_raises_instead_of_hanging(tmp_path, loop):
    LOOPS[loop](_ends_mid_payload(tmp_path))


async def _ends_mid_payload(tmp_path):
    async with two_transports(tmp_path) as (server, puller):

        async def handler(stream):
            await stream.write(b"\x01" * 100_000)  # then the handler returns and the stream closes

        await server.set_handler(PROTOCOL, handler)
        stream = await puller.open(server.peer_id, PROTOCOL, await server.addrs())
        try:
            got = np.empty(N, dtype="<f4")
            with pytest.raises(EOFError, match="100000 of"):
                await asyncio.wait_for(_fill(stream, memoryview(got).cast("B"), 1 << 20), 30)
            assert (memoryview(got).cast("B")[:100_000] == b"\x01" * 100_000)
        finally:
            await stream.close()
