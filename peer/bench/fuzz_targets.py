"""Every decoder and handler a stranger can reach, as fuzz targets (hypothesis tests and scripts/fuzz.py).

Each target takes bytes (or a decoded object) a hostile peer controls and either returns normally
or raises one of the exceptions it is allowed to raise: our own `ProtocolError`/`ValueError`
reasons, or `IncompleteReadError` when the bytes end early (the transport's "disconnected"). Any
other exception is a bug. Targets also check the allocation bound: nothing a peer announces may
make us allocate more than our own model's size.
"""

from __future__ import annotations

import asyncio
import random
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from protocols import gossip
from protocols.codec import DEFAULT_LIMITS, ProtocolError, TensorSpec, decode_header, encode_header, read_header, read_payload
from protocols.discovery import PeerRecord, SwarmView, check_admission, check_record
from protocols.transport.base import StoredRecord

NUMEL = 1000
SPEC = [TensorSpec("flat", "float32", (NUMEL,))]
RUN, TASK = "fuzz", "digits-mlp"


class BytesStream:
    """A stream over fixed bytes; remembers the largest single read and everything written back."""

    def __init__(self, data: bytes = b"", remote_peer: str = "fuzzer"):
        self.data, self.pos, self.sent = data, 0, bytearray()
        self.remote_peer = remote_peer
        self.largest_read = 0

    async def read_exactly(self, n: int) -> bytes:
        self.largest_read = max(self.largest_read, n)
        if self.pos + n > len(self.data):
            raise asyncio.IncompleteReadError(self.data[self.pos :], n)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    async def write(self, data) -> None:
        self.sent += bytes(data)

    async def close(self) -> None:
        pass


ALLOWED = (ProtocolError, asyncio.IncompleteReadError)


# --- seeds: valid messages that mutation starts from -------------------------------------------
def valid_request() -> bytes:
    return encode_header(gossip.model_request(RUN, TASK))


def valid_reply() -> bytes:
    return encode_header(gossip.model_header(7, SPEC)) + np.arange(NUMEL, dtype="<f4").tobytes()


def valid_record(peer: str = "Qmfuzz") -> dict[str, Any]:
    return PeerRecord(peer, (f"/ip4/1.2.3.4/tcp/1/p2p/{peer}",), TASK, 5, 10.0, 5, 100.0,
                      history=np.zeros(512, dtype="<f2").tobytes()).to_wire()


# --- targets ------------------------------------------------------------------------------------
async def reply_decoder(data: bytes) -> None:
    """What a pulling peer does with a partner's reply."""
    stream = BytesStream(data)
    try:
        header = await read_header(stream, DEFAULT_LIMITS)
        gossip.check_model_header(header, SPEC, DEFAULT_LIMITS)
        (arr,) = await read_payload(stream, SPEC, DEFAULT_LIMITS)
        assert arr.nbytes == NUMEL * 4
    finally:
        # one read never asks for more than a chunk or a (bounded) header
        assert stream.largest_read <= max(DEFAULT_LIMITS.chunk_bytes, DEFAULT_LIMITS.max_header_bytes)


async def request_decoder(data: bytes) -> None:
    """What a serving peer does with a request, up to deciding to answer."""
    stream = BytesStream(data)
    header = await read_header(stream, DEFAULT_LIMITS)
    gossip.check_request(header, RUN, TASK)
    assert stream.largest_read <= DEFAULT_LIMITS.max_header_bytes


def header_decoder(data: bytes) -> None:
    decode_header(data, DEFAULT_LIMITS)


def record_decoder(data: bytes) -> str:
    """A DHT record value, as msgpack bytes, through the same check every node applies; returns the verdict."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except Exception:
        return "undecodable"  # never reaches the record check (the DHT validator refuses it)
    reason = check_admission("Qmfuzz", 150.0, 100.0)  # what a node checks before storing it
    rec, reason = (None, reason) if reason else check_record("Qmfuzz", raw)
    assert (rec is None) != (reason is None)
    assert reason is None or len(reason) <= 40  # reasons are our own codes, never echoed input
    view = SwarmView("me", TASK)
    view.update([StoredRecord("Qmfuzz", raw, 150.0)], now=100.0)
    assert len(view.peers) <= 1
    return reason or "accepted"


def _refuse_ext(code, data):
    raise ValueError("ext")


class DaemonHarness:
    """One real `PeerDaemon` (in-memory transport, never started) whose serving and control handlers are fuzzed."""

    def __init__(self):
        from peer.config import PeerConfig
        from peer.daemon import PeerDaemon
        from protocols.transport.memory import MemoryNetwork

        self._tmp = tempfile.TemporaryDirectory()
        cfg = PeerConfig(data_dir=Path(self._tmp.name), run_id=RUN, task=TASK, read_timeout_s=1.0)
        self.daemon = PeerDaemon(cfg, MemoryNetwork().transport("me"))

    async def serve(self, data: bytes, peer: str = "fuzzer") -> bytes:
        """The model server's handler on a stream carrying `data`: must never raise."""
        stream = BytesStream(data, remote_peer=peer)
        await self.daemon._serve_model(stream)
        return bytes(stream.sent)

    async def control(self, request: Any) -> dict:
        reply = await self.daemon._control(request) if isinstance(request, dict) else {"ok": False}
        assert isinstance(reply, dict) and "ok" in reply
        return reply

    def close(self) -> None:
        self._tmp.cleanup()


class ValidatorHarness:
    """Our DHT node's real record validator (RSA signature, then `RunRecordValidator`), fed
    records whose key, subkey, value and expiry a stranger controls."""

    RUN_KEY = "peer/run/fuzz/peers"

    def __init__(self):
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.routing import DHTID
        from hivemind.dht.validation import DHTRecord
        from hivemind.utils.crypto import RSAPrivateKey
        from hivemind.utils.serializer import MSGPackSerializer

        from protocols.transport.hivemind import RunRecordValidator, _owner_peer_id, safe_validator

        self.DHTRecord = DHTRecord
        self.signer = RSASignatureValidator(RSAPrivateKey())
        self.run = RunRecordValidator(self.RUN_KEY)
        self.node = safe_validator([RSASignatureValidator(RSAPrivateKey()), self.run], self.run)
        self.key = DHTID.generate(source=self.RUN_KEY).to_bytes()
        self.subkey = MSGPackSerializer.dumps(self.signer.local_public_key)
        value = MSGPackSerializer.dumps(valid_record(_owner_peer_id(self.signer.local_public_key)))
        self.valid = DHTRecord(self.key, self.subkey, value, 1e12)
        self.valid = DHTRecord(self.key, self.subkey, self.signer.sign_value(self.valid), 1e12)
        assert self.node.validate(self.valid)

    def validate(self, key: bytes, subkey: bytes, value: bytes, expiration: float) -> bool:
        verdict = self.node.validate(self.DHTRecord(key, subkey, value, expiration))
        assert isinstance(verdict, bool)
        return verdict


# --- mutation -----------------------------------------------------------------------------------
def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random edits of a valid message: flips, inserts, deletes, truncation, length tampering."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[rng.randrange(len(b) + 1):0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        elif op == 3:
            del b[rng.randrange(len(b) + 1):]
        elif op == 4 and len(b) >= 4:
            b[0:4] = struct.pack(">I", rng.choice([0, 1, 2**16, 2**31, 2**32 - 1, rng.randrange(2**32)]))
        elif op == 5 and b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0x00, 0x7F, 0x80, 0xC1, 0xC7, 0xD4, 0xDD, 0xDF, 0xFF])  # msgpack edge markers
    return bytes(b)


def record_variants(rng: random.Random) -> bytes:
    """A record with one field replaced by something of the wrong type or size, as msgpack."""
    rec = valid_record()
    field = rng.choice(list(rec))
    rec[field] = rng.choice([None, -1, 2**63, 1.5, float("nan"), "x" * 600, b"\xff" * 1024, [], {}, ["a"] * 20, True])
    return msgpack.packb(rec, use_bin_type=True)


TARGETS: dict[str, Callable] = {
    "header": header_decoder,
    "reply": reply_decoder,
    "request": request_decoder,
    "record": record_decoder,
}
