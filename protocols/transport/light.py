"""A light libp2p client: hivemind's DHT RPC spoken by py-libp2p, with no p2pd process.

hivemind serves its DHT RPCs (`DHTProtocol.rpc_find`, ...) as p2pd *unary handlers*: the caller's
p2pd opens a libp2p stream whose protocol id is the handler name, writes one varint-length-
delimited `p2pd.pb.PersistentConnectionRequest` {callId, callUnary {peer, proto, data}} and reads
one back carrying `unaryResponse` {response | error}; `data` and `response` are the serialized
request and reply protobufs (go-libp2p-daemon's persistent_stream.go; hivemind's
p2p_daemon_bindings/control.py on the serving side). This module does the caller's part itself,
over a py-libp2p host (TCP, Noise, yamux: what go-libp2p accepts), with a fresh ed25519 identity
each run and no listening address. It runs under trio, py-libp2p's event loop.

py-libp2p and hivemind each ship a generated `crypto.pb` protobuf package, and protobuf refuses to
register the second one in a process. Both describe the same messages (libp2p's KeyType enum has
two more values), so importing this module makes hivemind use libp2p's: it must be imported before
anything imports hivemind.
"""

from __future__ import annotations

import sys
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

if "hivemind.proto.crypto_pb2" in sys.modules:
    raise ImportError("protocols.transport.light must be imported before hivemind "
                      "(py-libp2p and hivemind both define the protobuf package crypto.pb)")
import libp2p.crypto.pb.crypto_pb2 as _libp2p_crypto_pb2  # noqa: E402

sys.modules["hivemind.proto.crypto_pb2"] = _libp2p_crypto_pb2

from protocols.lightdht import QueryError  # noqa: E402  (imports no hivemind at import time)
from protocols import varint  # noqa: E402

FIND = "DHTProtocol.rpc_find"  # hivemind's handler name: ServicerBase._get_handle_name(None, "rpc_find")
MAX_MESSAGE_BYTES = 4 << 20  # p2pd's persistentConnMsgMaxSize: no reply can be larger


class LightError(QueryError):
    """A peer could not be dialled, refused the call, or answered something unreadable."""


def split_maddr(maddr: str) -> tuple[str, list[str]]:
    """'/ip4/1.2.3.4/tcp/5/p2p/Qm..' -> ('Qm..', ['/ip4/1.2.3.4/tcp/5']); ValueError with a reason."""
    import multiaddr

    try:
        ma = multiaddr.Multiaddr(maddr)
    except Exception as e:
        raise ValueError(f"not a multiaddr ({e})") from None
    peer_id = ma.get_peer_id()
    if not peer_id:
        raise ValueError("it has no /p2p/<peer id> part")
    transport = ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
    if not dialable(str(transport)):
        raise ValueError("only TCP addresses can be dialled (/ip4, /ip6 or /dns, then /tcp/PORT)")
    return peer_id, [str(transport)]


def dialable(transport_addr: str) -> bool:
    """A TCP address py-libp2p can dial here (a record may also list QUIC or relay addresses)."""
    parts = transport_addr.split("/")
    return len(parts) == 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[3] == "tcp"


def transport_addrs(addrs: list[str]) -> list[str]:
    """The dialable transport parts of full multiaddrs (as a record lists them)."""
    out = []
    for a in addrs:
        head = a.split("/p2p/")[0]
        if dialable(head) and head not in out:
            out.append(head)
    return out


async def _read_exactly(stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.read(n - len(data))
        if not chunk:
            raise LightError("stream closed mid-message")
        data += chunk
    return bytes(data)


async def _read_delimited(stream) -> bytes:
    n, shift = 0, 0
    while True:
        (byte,) = await _read_exactly(stream, 1)
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 35:
            raise LightError("bad length prefix")
    if n > MAX_MESSAGE_BYTES:
        raise LightError(f"reply of {n} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return await _read_exactly(stream, n)


class LightClient:
    """One py-libp2p host that calls hivemind unary handlers on other peers (trio)."""

    def __init__(self, host):
        self.host = host

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[LightClient]:
        from libp2p import new_host
        from libp2p.crypto.ed25519 import create_new_key_pair
        from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
        from libp2p.custom_types import TProtocol
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
        from libp2p.security.noise.transport import Transport as NoiseTransport

        key = create_new_key_pair()  # a throwaway identity: an observer has nothing to prove
        host = new_host(key_pair=key, muxer_preference="YAMUX",
                        sec_opt={TProtocol(NOISE): NoiseTransport(key, noise_privkey=create_noise_key_pair().private_key)})
        async with host.run(listen_addrs=[]):
            yield cls(host)

    async def call_unary(self, peer_id: str, addrs: list[str], proto: str, request: bytes) -> bytes:
        """Call the unary handler `proto` of `peer_id` with serialized `request`; the serialized reply."""
        import multiaddr
        from hivemind.proto import p2pd_pb2
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo

        pid = ID.from_base58(peer_id)
        dial = transport_addrs(addrs)
        if not dial:
            raise LightError("no TCP address to dial")
        try:
            await self.host.connect(PeerInfo(pid, [multiaddr.Multiaddr(a) for a in dial]))
        except Exception as e:
            raise LightError(f"cannot connect to {' or '.join(dial)} (is the peer running and the port open?)") from e
        try:
            stream = await self.host.new_stream(pid, [TProtocol(proto)])
        except Exception as e:
            raise LightError(f"connected, but it does not serve {proto} (not a peer of a run?)") from e
        try:
            call_id = uuid.uuid4().bytes
            # `peer` is required by the schema; the serving p2pd overwrites it with the caller's id
            message = p2pd_pb2.PersistentConnectionRequest(
                callId=call_id, callUnary=p2pd_pb2.CallUnaryRequest(peer=b"", proto=proto, data=request)).SerializeToString()
            await stream.write(varint.encode(len(message)) + message)
            reply = p2pd_pb2.PersistentConnectionRequest.FromString(await _read_delimited(stream))
        finally:
            await stream.close()
        if reply.callId != call_id or reply.WhichOneof("message") != "unaryResponse":
            raise LightError("reply is not the answer to our call")
        result = reply.unaryResponse
        if result.WhichOneof("result") == "error":
            raise LightError(f"the peer's handler failed: {result.error.decode(errors='replace')[:200]}")
        return result.response

    async def find(self, peer_id: str, addrs: list[str], keys: list[bytes]):
        """hivemind's `rpc_find` for DHT key ids `keys`, as a client that no routing table adds:
        an empty NodeInfo, as hivemind's own client mode sends."""
        from hivemind.proto import dht_pb2

        request = dht_pb2.FindRequest(keys=keys, peer=dht_pb2.NodeInfo())
        reply = dht_pb2.FindResponse.FromString(await self.call_unary(peer_id, addrs, FIND, request.SerializeToString()))
        if len(reply.results) != len(keys):
            raise LightError("reply does not match the keys asked")
        return reply
