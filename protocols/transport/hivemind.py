"""Production transport: hivemind's P2P (runs go-libp2p's p2pd) and a DHTNode on it, in-process.

Records live in the DHT under `key` with a subkey holding the owner's RSA public key, so
hivemind's RSASignatureValidator lets only that key write the slot. The signing key *is* the
libp2p identity key (read from the identity file p2pd uses), so a record's owner and the peer id
that serves the model are the same key. A record naming a different peer id than the signing key
is dropped on lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from protocols.dialback import serve as serve_dialback
from protocols.relay import HOP as RELAY_HOP, RelayPolicy, serve as serve_relay
from protocols.transport.base import StoredRecord, StreamHandler, Transport, TransportError
from protocols.transport.nat import NatSettings, p2pd_options

log = logging.getLogger("peer.transport")

# A peer record is about 1.3 KiB (with its 1 KiB history sketch) plus a 256-byte RSA signature.
MAX_RECORD_BYTES = 4096


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


class IdentityError(ValueError):
    """The identity key cannot be read or created; it is never overwritten to fix that."""


def ensure_identity(identity_path: str) -> str:
    """Create the identity key once (mode 0400, never overwritten); return its peer id.

    A new key is written to a temp file and linked into place, so a kill mid-write leaves no
    truncated key and an existing key is never replaced. A key that is there but unreadable or
    corrupt raises IdentityError (one line): the peer's identity, and the reputation other peers
    keep for it, is not silently swapped for a new one."""
    from hivemind.p2p import PeerID

    if not os.path.lexists(identity_path):
        _create_identity(identity_path)
    try:
        with open(identity_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IdentityError(f"identity key {identity_path} is unreadable ({e.strerror or e})") from None
    try:
        return PeerID.from_identity(data).to_base58()
    except Exception as e:  # protobuf or DER parse errors: truncated, corrupt, not a key
        raise IdentityError(f"identity key {identity_path} is corrupt or truncated ({type(e).__name__}); it was left as "
                            "it is: move it away to start with a new identity") from None


def _create_identity(identity_path: str) -> None:
    import tempfile

    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes()).SerializeToString()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".identity-", suffix=".tmp", dir=os.path.dirname(identity_path) or ".")
    except OSError as e:
        raise IdentityError(f"cannot create identity key {identity_path} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o400)
        os.link(tmp, identity_path)  # fails rather than replace a key that appeared meanwhile
    except FileExistsError:
        pass
    except OSError as e:
        raise IdentityError(f"cannot create identity key {identity_path} ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class _ReceiveInto(asyncio.BufferedProtocol):
    """Receives into a caller's buffer in place of a stream's own protocol, for one `read_into`.

    The event loop asks it where to put the next bytes (`get_buffer`: the rest of the view) and
    reads the socket straight into them. `arrived` resolves when the view is full, or at the first
    bytes after `WAKE_S` (a slow peer still shows progress to the per-read deadline, a fast one
    costs a few wake-ups per second, not one per socket read); a full view pauses reading, so
    nothing can overrun it. EOF and loss
    of the connection are passed on to the stream's protocol, so the StreamReader sees them too.
    """

    WAKE_S = 0.05

    def __init__(self, inner: asyncio.BaseProtocol, view: memoryview, transport: asyncio.Transport):
        self.inner, self.view, self.transport = inner, view, transport
        self.pos = 0
        self.paused = False
        self.loop = asyncio.get_running_loop()
        self.wake_at = self.loop.time() + self.WAKE_S
        self.arrived = self.loop.create_future()

    def _wake(self) -> None:
        if not self.arrived.done():
            self.arrived.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos >= len(self.view):
            if not self.paused:
                self.paused = True
                self.transport.pause_reading()
            self._wake()
        elif self.loop.time() >= self.wake_at:
            self._wake()

    def eof_received(self):
        self._wake()
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        self._wake()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _P2PStream:
    def __init__(self, remote_peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.remote_peer = remote_peer
        self.reader, self.writer = reader, writer
        # payloads go out in 16 MiB writes, not the codec's 1 MiB: uvloop sends them without a copy,
        # and each write costs a wake-up of this task once it is flushed (see below)
        self.max_write = 16 << 20
        # write() returns only once everything is in the kernel: uvloop queues what the socket
        # does not take at once *by reference*, and drain() with the default 64 KiB high-water mark
        # would return with the tail still queued, so a caller reusing the buffer (the served
        # model snapshot) would corrupt what is still to be sent
        writer.transport.set_write_buffer_limits(high=0)

    async def read_exactly(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def read_into(self, view: memoryview) -> int:
        """Up to len(view) bytes, whatever has arrived (0 at the end): no waiting for a whole chunk.

        The bytes land in `view` straight from the socket: while this waits, a `_ReceiveInto`
        protocol stands in for the StreamReader's, so there is no bytes object per socket read,
        no StreamReader buffer and no copy out of it (three copies fewer than `reader.read`).
        What the StreamReader already holds is handed over first. This leans on two private
        members of asyncio.StreamReader (`_buffer`, `_maybe_resume_transport`; stable since
        Python 3.7); without them it falls back to `reader.read` and a copy.
        """
        reader, transport = self.reader, self.writer.transport
        buffered = getattr(reader, "_buffer", None)
        if not isinstance(buffered, bytearray) or not hasattr(reader, "_maybe_resume_transport"):
            data = await reader.read(len(view))
            view[: len(data)] = data
            return len(data)
        if reader.exception() is not None:
            raise reader.exception()
        if buffered:
            n = min(len(buffered), len(view))
            view[:n] = memoryview(buffered)[:n]
            del buffered[:n]
            reader._maybe_resume_transport()
            return n
        if reader.at_eof() or transport.is_closing():
            return 0
        inner = transport.get_protocol()
        receiver = _ReceiveInto(inner, view, transport)
        transport.set_protocol(receiver)
        try:
            await receiver.arrived
        finally:
            transport.set_protocol(inner)
            if receiver.paused:
                transport.resume_reading()
        return receiver.pos

    async def write(self, data: bytes | memoryview) -> None:
        """Send `data`; once this returns the stream holds no reference to it (the caller may reuse it)."""
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except Exception:  # the peer may already be gone; closing must never raise
            pass


def p2p_with_flags(base, flags: dict[str, Any]):
    """`base` (hivemind's P2P or a subclass) whose `create` also passes `flags` to p2pd: the ones
    P2P.create has no parameter for (protocols/transport/nat.py)."""
    if not flags:
        return base

    class _WithFlags(base):
        @staticmethod
        def _make_process_args(*args, **kwargs) -> list[str]:
            return base._make_process_args(*args, **kwargs, **flags)

    return _WithFlags


async def withdraw_protocol(p2p, protocol: str) -> None:
    """Stop p2pd offering `protocol`, a service of its own that no flag turns off.

    hivemind's p2pd serves circuit-relay v2 hop (reservations and relayed connections for any
    stranger, 2 min and 128 KiB per circuit) whatever `-relay` and `-relayService` say (measured:
    SECURITY.md). Registering a handler for the protocol replaces p2pd's own (`SetStreamHandler`),
    and removing ours then removes the protocol from the host (`RemoveStreamHandler`), so it is
    neither served nor listed by identify."""

    async def refuse(_info, _reader, writer) -> None:  # only between the two calls below
        writer.close()

    await p2p.add_binary_stream_handler(protocol, refuse)
    await p2p.remove_binary_stream_handler(protocol)


class HivemindTransport(Transport):
    def __init__(
        self,
        identity_path: str,
        listen: list[str],
        announce: list[str] | None = None,
        initial_peers: list[str] | None = None,
        run_key: str | None = None,
        allowed: frozenset[str] | None = None,
        remembered: list[str] | None = None,
        nat: NatSettings | None = None,
        rpc_limits=None,
    ):
        """`remembered`: addresses (with /p2p/<id>) of peers seen before, dialled at start besides
        `initial_peers`; unlike those, none of them has to answer. `nat`: relays, auto-relay, hole
        punching and relay service (protocols/transport/nat.py; None: its defaults). `rpc_limits`:
        bounds on the DHT RPCs other peers send us (protocols/dht_guard.py's RpcLimits; None: its
        defaults)."""
        self.identity_path = identity_path
        self.listen = listen
        self.announce = announce or []
        self.initial_peers = initial_peers or []
        self.run_key = run_key
        self.allowed = allowed
        self.remembered = remembered or []
        self.nat = nat or NatSettings()
        self.relay = None  # RelayPolicy (its counters) while serving as a relay
        from protocols.dht_guard import RpcPolicy

        self.rpc_policy = RpcPolicy(rpc_limits)
        self.p2p = None
        self.dht = None
        self.run_records = None
        self.peer_id = ensure_identity(identity_path)

    async def start(self) -> None:
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.node import DHTNode
        from hivemind.dht.routing import DHTID
        from protocols.dht_guard import guarded_p2p

        options = p2pd_options(self.nat)
        # hivemind's P2P with the DHT RPCs served under self.rpc_policy (protocols/dht_guard.py),
        # and the p2pd flags P2P.create has no parameter for (protocols/transport/nat.py)
        self.p2p = await p2p_with_flags(guarded_p2p(self.rpc_policy), options.extra_flags).create(
            **options.create_kwargs,
            initial_peers=self.initial_peers or None,
            host_maddrs=self.listen,
            announce_maddrs=self.announce or None,
            identity_path=self.identity_path,
            # A restart after kill -9 reuses the key while the old p2pd may still be known to
            # peers; the data-dir lock already guarantees one daemon per identity on this host.
            check_if_identity_free=False,
        )
        if options.serve_relay_hop:  # our hop service replaces p2pd's (protocols/relay.py says why)
            self.relay = RelayPolicy()
            await serve_relay(self.p2p, self.relay)
        else:
            await withdraw_protocol(self.p2p, RELAY_HOP)
        self.validator = RSASignatureValidator(load_identity_key(self.identity_path))
        await serve_dialback(self.p2p)  # other peers' reachability checks (protocols/dialback.py)
        reached = await self._dial(self.remembered)
        validators = [self.validator]
        if self.run_key is not None:
            self.run_records = RunRecordValidator(self.run_key, self.allowed)
            validators.append(self.run_records)
        self.dht = await DHTNode.create(
            p2p=self.p2p,
            # Derived from the peer id, not from the global `random` (which libraries reseed).
            node_id=DHTID.generate(source=self.peer_id.encode()),
            initial_peers=[*self.initial_peers, *reached] or None,
            record_validator=safe_validator(validators, self.run_records),
            ensure_bootstrap_success=False,
        )
        if self.run_records is not None:
            # hivemind's storage and cache are unbounded: a flood of signed records from fresh keys
            # would grow memory and push DHT replies past its 4 MiB message limit.
            self.dht.protocol.storage = bounded_storage(self.run_records)
            self.dht.protocol.cache = bounded_storage(self.run_records)
        assert self.p2p.peer_id.to_base58() == self.peer_id

    DIAL_TIMEOUT_S = 5.0

    async def _dial(self, addrs: list[str]) -> list[str]:
        """Connect to the peers behind `addrs` (concurrently, each within DIAL_TIMEOUT_S); the
        addresses of those that answered."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        by_peer: dict[str, list[str]] = {}
        for a in addrs:
            pid = a.partition("/p2p/")[2]
            if pid and pid != self.peer_id:
                by_peer.setdefault(pid, []).append(a)

        async def dial(pid: str, full: list[str]) -> bool:
            try:
                maddrs = [Multiaddr(a.partition("/p2p/")[0]) for a in full]
                await asyncio.wait_for(self.p2p._client.connect(PeerID.from_base58(pid), maddrs), self.DIAL_TIMEOUT_S)
                return True
            except Exception as e:
                log.debug("remembered peer %s did not answer: %s", pid[:12], e)
                return False

        answered = await asyncio.gather(*(dial(pid, full) for pid, full in by_peer.items()))
        if by_peer:
            log.info("dialled %d remembered peers of the run: %d answered", len(by_peer), sum(answered))
        return [a for ok, full in zip(answered, by_peer.values()) if ok for a in full]

    # hivemind's DHT shutdown asks p2pd to drop its handlers; with p2pd already gone (a signal to
    # the whole process group) that request waited forever and `peer join` never exited (seen after
    # SIGTERM to a benchmark). Each step is bounded; p2pd is killed if it outlives its TERM.
    STOP_TIMEOUT_S = 5.0

    async def stop(self) -> None:
        child = getattr(self.p2p, "_child", None)
        p2pd_gone = child is not None and child.returncode is not None
        if p2pd_gone:  # Ctrl-C in a terminal signals the whole process group, p2pd included
            log.info("p2pd exited already (code %s)", child.returncode)
        if self.dht is not None and not p2pd_gone:  # the DHT's shutdown would wait on p2pd
            try:
                await asyncio.wait_for(self.dht.shutdown(), self.STOP_TIMEOUT_S)
            except Exception as e:  # TimeoutError included
                log.warning("DHT shutdown did not finish (%s); stopping p2pd anyway", type(e).__name__)
        if self.p2p is not None:
            try:
                await asyncio.wait_for(self.p2p.shutdown(), self.STOP_TIMEOUT_S)
            except Exception as e:  # TimeoutError included
                child = getattr(self.p2p, "_child", None)
                log.warning("p2pd did not stop (%s); killing it", type(e).__name__)
                if child is not None and child.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(child.wait(), 2.0)
        self._forget_lost_connection()

    def _forget_lost_connection(self) -> None:
        """Retrieve the error of hivemind's control-connection tasks that ended with p2pd, so
        asyncio does not print it as a traceback at exit ("Task exception was never retrieved")."""
        control = getattr(getattr(self.p2p, "_client", None), "control", None)
        for task in (getattr(control, "_read_task", None), getattr(control, "_write_task", None)):
            if isinstance(task, asyncio.Task) and task.done() and not task.cancelled():
                task.exception()

    async def addrs(self) -> list[str]:
        return [str(a) for a in await self.p2p.get_visible_maddrs(latest=True)]

    def dht_rpcs(self) -> dict[str, Any]:
        return self.rpc_policy.summary()

    def relay_service(self, now: float) -> dict[str, Any] | None:
        return self.relay.summary(now) if self.relay is not None else None

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


def _unpack_plain(data: bytes) -> Any:
    """msgpack without extension types (hivemind's serializer has some; our records use none)."""
    import msgpack

    def refuse(code: int, _data: bytes) -> Any:
        raise ValueError(f"extension type {code}")

    return msgpack.unpackb(data, raw=False, ext_hook=refuse, strict_map_key=False,
                           max_bin_len=MAX_RECORD_BYTES, max_str_len=MAX_RECORD_BYTES)


def _make_run_record_validator():
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord, RecordValidatorBase

    from protocols.discovery import MAX_VIEW_PEERS, check_record
    from protocols.loglimit import LogLimiter

    class _RunRecordValidator(RecordValidatorBase):
        """After the signature check: this node accepts only well-formed records of its own run.

        Applied by hivemind to every record another node asks us to store *and* to every record a
        lookup returns; in the second case one refusal drops the other node's whole reply. So it
        checks only what every node agrees on whatever its clock and settings: the run key, the
        size, plain msgpack, the schema, and that the record speaks for its signer. Lifetime and
        closed-run admission are checked when storing (`bounded_storage`) and in the swarm view,
        where a refusal costs only that record. Refusals are counted in `rejected` by reason.
        """

        def __init__(self, run_key: str, allowed: frozenset[str] | None = None):
            self.key_id = DHTID.generate(source=run_key).to_bytes()
            self.allowed = allowed
            self.max_records = MAX_VIEW_PEERS
            self.rejected: dict[str, int] = {}
            self.log = LogLimiter(log)

        def _refuse(self, reason: str) -> bool:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            self.log.info((reason,), "refused DHT record: %s", reason)
            return False

        def validate(self, record: DHTRecord) -> bool:
            if record.key != self.key_id:
                return self._refuse("foreign_key")
            if len(record.value) > MAX_RECORD_BYTES:
                return self._refuse("record_too_large")
            try:
                subkey = _unpack_plain(record.subkey)
                value = _unpack_plain(record.value)
            except Exception:
                return self._refuse("malformed_record:msgpack")
            _, reason = check_record(_owner_peer_id(subkey), value)
            return True if reason is None else self._refuse(reason)

        @property
        def priority(self) -> int:
            return 0  # after RSASignatureValidator (10), which strips the signature first

    return _RunRecordValidator


def safe_validator(validators: list, counters=None):
    """hivemind's CompositeValidator, but a validator that raises refuses the record instead.

    hivemind's RSASignatureValidator raises ValueError on a malformed public key in a subkey
    (scripts/fuzz.py sends one); hivemind would then fail the whole RPC. Here it is a counted
    refusal, like any other bad record.
    """
    from hivemind.dht.validation import CompositeValidator

    class _Safe(CompositeValidator):
        def validate(self, record) -> bool:
            try:
                return super().validate(record)
            except Exception:
                if counters is not None:
                    counters.rejected["bad_signature_format"] = counters.rejected.get("bad_signature_format", 0) + 1
                return False

    return _Safe(validators)


def RunRecordValidator(run_key: str, allowed: frozenset[str] | None = None):
    return _make_run_record_validator()(run_key, allowed)


def bounded_storage(validator) -> Any:
    """A DHT storage that holds at most `validator.max_records` subkeys per key (new ones refused when full),
    and refuses records that claim to live too long or (closed runs) come from peers not admitted.

    Subkeys already stored are still updated, so a flood from fresh keys cannot evict the records
    of peers this node already holds. The bound is per node: a lookup merges several nodes' replies.
    """
    from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
    from hivemind.utils.timed_storage import get_dht_time

    from protocols.discovery import check_admission

    class _Bounded(DHTLocalStorage):
        def store(self, key, value, expiration_time, subkey=None) -> bool:
            if subkey is None:
                return False  # our run only stores dictionaries of per-peer records
            return self.store_subkey(key, subkey, value, expiration_time)

        def store_subkey(self, key, subkey, value, expiration_time) -> bool:
            reason = check_admission(_owner_peer_id(subkey), expiration_time, get_dht_time(), validator.allowed)
            if reason is not None:
                validator.rejected[reason] = validator.rejected.get(reason, 0) + 1
                return False
            current = self.get(key)
            if current is not None and isinstance(current.value, DictionaryDHTValue):
                entries = current.value
                if subkey not in entries.data and len(entries.data) >= validator.max_records:
                    # drop what has expired before deciding the store is over the bound
                    entries.get(subkey)
                    if len(entries.data) >= validator.max_records:
                        validator.rejected["storage_full"] = validator.rejected.get("storage_full", 0) + 1
                        return False
            return super().store_subkey(key, subkey, value, expiration_time)

    return _Bounded()
