"""Production transport: hivemind's P2P (runs go-libp2p's p2pd) and a DHTNode on it, in-process.

Records live in the DHT under `key` with a subkey holding the owner's RSA public key, so
hivemind's RSASignatureValidator lets only that key write the slot. The signing key *is* the
libp2p identity key (read from the identity file p2pd uses), so a record's owner and the peer id
that serves the model are the same key. A record naming a different peer id than the signing key
is dropped on lookup.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from protocols.transport.base import StoredRecord, StreamHandler, Transport, TransportError

log = logging.getLogger("peer.transport")


def load_identity_key(identity_path: str):
    """The RSA key inside p2pd's identity file (libp2p protobuf), as a hivemind RSAPrivateKey."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    pb = crypto_pb2.PrivateKey()
    with open(identity_path, "rb") as f:
        pb.ParseFromString(f.read())
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = serialization.load_der_private_key(pb.data, password=None)
    return key


def ensure_identity(identity_path: str) -> str:
    """Create the identity key once (mode 0400, never overwritten); return its peer id."""
    from hivemind.p2p import P2P, PeerID

    if not os.path.exists(identity_path):
        P2P.generate_identity(identity_path)
    with open(identity_path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()


class _P2PStream:
    def __init__(self, remote_peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.remote_peer = remote_peer
        self.reader, self.writer = reader, writer

    async def read_exactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def read_into(self, view: memoryview) -> int:
        """Up to len(view) bytes, whatever has arrived (0 at the end): no waiting for a whole chunk."""
        data = await self.reader.read(len(view))
        view[: len(data)] = data
        return len(data)

    async def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except Exception:  # the peer may already be gone; closing must never raise
            pass


class HivemindTransport(Transport):
    def __init__(
        self,
        identity_path: str,
        listen: list[str],
        announce: list[str] | None = None,
        initial_peers: list[str] | None = None,
    ):
        self.identity_path = identity_path
        self.listen = listen
        self.announce = announce or []
        self.initial_peers = initial_peers or []
        self.p2p = None
        self.dht = None
        self.peer_id = ensure_identity(identity_path)

    async def start(self) -> None:
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.node import DHTNode
        from hivemind.dht.routing import DHTID
        from hivemind.p2p import P2P

        self.p2p = await P2P.create(
            initial_peers=self.initial_peers or None,
            host_maddrs=self.listen,
            announce_maddrs=self.announce or None,
            identity_path=self.identity_path,
            # A restart after kill -9 reuses the key while the old p2pd may still be known to
            # peers; the data-dir lock already guarantees one daemon per identity on this host.
            check_if_identity_free=False,
        )
        self.validator = RSASignatureValidator(load_identity_key(self.identity_path))
        self.dht = await DHTNode.create(
            p2p=self.p2p,
            # Derived from the peer id, not from the global `random` (which libraries reseed).
            node_id=DHTID.generate(source=self.peer_id.encode()),
            initial_peers=self.initial_peers or None,
            record_validator=self.validator,
            ensure_bootstrap_success=False,
        )
        assert self.p2p.peer_id.to_base58() == self.peer_id

    async def stop(self) -> None:
        if self.dht is not None:
            await self.dht.shutdown()
        if self.p2p is not None:
            await self.p2p.shutdown()

    async def addrs(self) -> list[str]:
        return [str(a) for a in await self.p2p.get_visible_maddrs(latest=True)]

    async def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def adapter(info, reader, writer) -> None:
            stream = _P2PStream(info.peer_id.to_base58(), reader, writer)
            try:
                await handler(stream)
            finally:
                await stream.close()

        await self.p2p.add_binary_stream_handler(protocol, adapter)

    async def open(self, peer_id: str, protocol: str, addrs: list[str] | None = None) -> _P2PStream:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr  # hivemind's vendored copy: no extra dependency

        try:
            pid = PeerID.from_base58(peer_id)
        except Exception as e:
            raise TransportError(f"bad peer id {peer_id!r}") from e
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(pid, protocol)
        except Exception as first:
            if not addrs:
                raise TransportError(f"cannot open {protocol} to {peer_id[:12]}: {first}") from None
            # p2pd may not know where the peer is yet: tell it the addresses from its record.
            try:
                maddrs = [Multiaddr(a).decapsulate(Multiaddr(f"/p2p/{peer_id}")) for a in addrs]
                await self.p2p._client.connect(pid, maddrs)
                _, reader, writer = await self.p2p.call_binary_stream_handler(pid, protocol)
            except Exception as e:
                raise TransportError(f"cannot open {protocol} to {peer_id[:12]}: {e}") from None
        return _P2PStream(peer_id, reader, writer)

    def _subkey(self) -> bytes:
        return self.validator.local_public_key

    async def publish(self, key: str, value: Any, expiration: float) -> bool:
        return bool(await self.dht.store(key, value, expiration, subkey=self._subkey()))

    async def lookup(self, key: str) -> list[StoredRecord]:
        found = await self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        out = []
        now = self.now()
        for subkey, item in found.value.items():
            owner = _owner_peer_id(subkey)
            if owner is None or item.expiration_time <= now:
                continue
            out.append(StoredRecord(owner, item.value, item.expiration_time))
        return out

    def now(self) -> float:
        from hivemind.utils.timed_storage import get_dht_time

        return get_dht_time()


_owner_cache: dict[bytes, str | None] = {}


def _owner_peer_id(subkey: Any) -> str | None:
    """Peer id of the RSA key in an '[owner:ssh-rsa ...]' subkey (the validator checked the signature)."""
    if not isinstance(subkey, bytes):
        return None
    if subkey in _owner_cache:
        return _owner_cache[subkey]
    result = None
    try:
        from cryptography.hazmat.primitives import serialization
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.p2p import PeerID
        from hivemind.proto import crypto_pb2
        import hashlib

        m = RSASignatureValidator._PUBLIC_KEY_RE.fullmatch(subkey)
        if m:
            pub = serialization.load_ssh_public_key(m.group(1))
            der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            pb = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
            # libp2p peer id of an RSA key: the sha2-256 multihash (code 0x12, length 32) of the key
            result = PeerID(b"\x12\x20" + hashlib.sha256(pb).digest()).to_base58()
    except Exception as e:
        log.debug("unparseable record owner: %s", e)
    if len(_owner_cache) < 10_000:
        _owner_cache[subkey] = result
    return result
