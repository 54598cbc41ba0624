"""Unsigned LEB128 varints: the length prefix of p2pd's control messages and of libp2p's
protobuf streams (circuit relay, hivemind's unary calls). No imports beyond asyncio, so the
py-libp2p light client may use it before hivemind loads."""

from __future__ import annotations

import asyncio

MAX_BYTES = 5  # a 32-bit length; a longer prefix is refused before it is read whole


def encode(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def read(reader: asyncio.StreamReader) -> int:
    """One varint from `reader`; ValueError for a prefix longer than MAX_BYTES bytes,
    IncompleteReadError if the stream ends inside it."""
    n = shift = 0
    for _ in range(MAX_BYTES):
        (byte,) = await reader.readexactly(1)
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n
    raise ValueError("varint length prefix too long")
