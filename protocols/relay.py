"""Circuit relay v2 hop, served by this process for `--relay-service` in place of p2pd's.

Why not p2pd's own: hivemind's p2pd starts two relays. One with go-libp2p's default limits (128 KiB
each way and 2 minutes per relayed connection) starts whatever its flags say; the one with its
configurable limits starts only when AutoNAT finds the peer public, or at once with reachability
forced public, and then the two race for the hop protocol (whichever registers last serves it).
Measured in tests/test_nat_traversal.py's namespaces: the default one served, and every relayed
connection was reset after 131072 bytes, inside the first pull of a 300 KB model. So the daemon
registers this handler for the hop protocol (which replaces p2pd's) and starts p2pd with
`-relayService=0`, so that no relay of p2pd's takes the protocol back later.

The protocol (libp2p specs, relay/circuit-v2.md; its messages built by `messages()`): a peer
behind NAT sends RESERVE and gets a slot for `reservation_ttl_s`; a peer that wants to reach it
sends CONNECT naming it; the relay opens a STOP stream to the reserved peer over the connection
that peer keeps open, and once both answered OK it copies bytes between the two streams. Both
ends' libp2p then run their own encrypted connection over it: the relay sees only ciphertext.

Bounds (`RelayLimits`), decided by `RelayPolicy` (no I/O): reservations in total; relayed
connections in total and per peer (either end); bytes each way and lifetime per relayed
connection (told to both ends as the circuit's limit); each request must arrive within
`request_timeout_s` and be at most `max_message_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from protocols import varint

log = logging.getLogger("peer.relay")

HOP = "/libp2p/circuit/relay/0.2.0/hop"
STOP = "/libp2p/circuit/relay/0.2.0/stop"


@dataclass(frozen=True)
class RelayLimits:
    max_reservations: int = 128
    reservation_ttl_s: int = 3600
    max_circuits: int = 16
    max_circuits_per_peer: int = 4
    circuit_bytes: int = 1 << 30  # each way, per relayed connection
    circuit_s: int = 1800
    request_timeout_s: float = 10.0
    max_message_bytes: int = 4096


@dataclass
class RelayPolicy:
    """Who may reserve and whose connections may be relayed, from counts and the time `now`."""

    limits: RelayLimits = field(default_factory=RelayLimits)
    reservations: dict[str, float] = field(default_factory=dict)  # peer id -> expiry (unix s)
    circuits: Counter = field(default_factory=Counter)  # peer id -> relayed connections it is an end of
    counters: Counter = field(default_factory=Counter)

    def reserve(self, peer: str, now: float) -> tuple[str, int]:
        """('OK', expiry) or (the refusal's status name, 0)."""
        for p in [p for p, t in self.reservations.items() if t <= now]:
            del self.reservations[p]
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            self.counters["reservations_refused"] += 1
            return "RESERVATION_REFUSED", 0
        expiry = int(now) + self.limits.reservation_ttl_s
        self.reservations[peer] = expiry
        self.counters["reservations_granted"] += 1
        return "OK", expiry

    def open_circuit(self, src: str, dst: str, now: float) -> str:
        """'OK' (counted until `close_circuit`) or the refusal's status name."""
        if self.reservations.get(dst, 0) <= now:
            self.counters["circuits_no_reservation"] += 1
            return "NO_RESERVATION"
        per_peer = self.limits.max_circuits_per_peer
        if (sum(self.circuits.values()) // 2 >= self.limits.max_circuits or self.circuits[src] >= per_peer
                or self.circuits[dst] >= per_peer):
            self.counters["circuits_refused"] += 1
            return "RESOURCE_LIMIT_EXCEEDED"
        self.circuits[src] += 1
        self.circuits[dst] += 1
        self.counters["circuits_opened"] += 1
        return "OK"

    def close_circuit(self, src: str, dst: str) -> None:
        for p in (src, dst):
            self.circuits[p] -= 1
            if self.circuits[p] <= 0:
                del self.circuits[p]

    def summary(self, now: float) -> dict:
        return {"reservations": sum(1 for t in self.reservations.values() if t > now),
                "circuits": sum(self.circuits.values()) // 2, **self.counters}


# --- wire: unsigned-varint-delimited protobuf messages -------------------------------------------
_MESSAGES = None


def messages():
    """The circuit v2 messages (circuit.proto of the libp2p specs: the same names, field numbers and
    types), as protobuf classes in a pool of their own. py-libp2p ships them generated, but
    importing py-libp2p here fails: its crypto.proto clashes with hivemind's in protobuf's default
    pool (`duplicate symbol 'crypto.pb.KeyType'`)."""
    global _MESSAGES
    if _MESSAGES is not None:
        return _MESSAGES
    from types import SimpleNamespace

    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="peer_circuit_v2.proto", package="circuit.pb", syntax="proto2")
    status = f.enum_type.add(name="Status")
    for name, number in (("UNUSED", 0), ("OK", 100), ("RESERVATION_REFUSED", 200), ("RESOURCE_LIMIT_EXCEEDED", 201),
                         ("PERMISSION_DENIED", 202), ("CONNECTION_FAILED", 203), ("NO_RESERVATION", 204),
                         ("MALFORMED_MESSAGE", 400), ("UNEXPECTED_MESSAGE", 401)):
        status.value.add(name=name, number=number)

    def message(name: str, fields: list[tuple], enums: dict[str, list[str]] | None = None) -> None:
        m = f.message_type.add(name=name)
        for enum, values in (enums or {}).items():
            e = m.enum_type.add(name=enum)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for fname, number, ftype, type_name, repeated in fields:
            field = m.field.add(name=fname, number=number, type=ftype,
                                label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name

    message("HopMessage", [("type", 1, F.TYPE_ENUM, ".circuit.pb.HopMessage.Type", False),
                           ("peer", 2, F.TYPE_MESSAGE, ".circuit.pb.Peer", False),
                           ("reservation", 3, F.TYPE_MESSAGE, ".circuit.pb.Reservation", False),
                           ("limit", 4, F.TYPE_MESSAGE, ".circuit.pb.Limit", False),
                           ("status", 5, F.TYPE_ENUM, ".circuit.pb.Status", False)],
            {"Type": ["RESERVE", "CONNECT", "STATUS"]})
    message("StopMessage", [("type", 1, F.TYPE_ENUM, ".circuit.pb.StopMessage.Type", False),
                            ("peer", 2, F.TYPE_MESSAGE, ".circuit.pb.Peer", False),
                            ("limit", 3, F.TYPE_MESSAGE, ".circuit.pb.Limit", False),
                            ("status", 4, F.TYPE_ENUM, ".circuit.pb.Status", False)],
            {"Type": ["CONNECT", "STATUS"]})
    message("Peer", [("id", 1, F.TYPE_BYTES, None, False), ("addrs", 2, F.TYPE_BYTES, None, True)])
    message("Reservation", [("expire", 1, F.TYPE_UINT64, None, False), ("addrs", 2, F.TYPE_BYTES, None, True),
                            ("voucher", 3, F.TYPE_BYTES, None, False)])
    message("Limit", [("duration", 1, F.TYPE_UINT32, None, False), ("data", 2, F.TYPE_UINT64, None, False)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"circuit.pb.{name}"))
               for name in ("HopMessage", "StopMessage", "Peer", "Reservation", "Limit")}
    statuses = {v.name: v.number for v in pool.FindEnumTypeByName("circuit.pb.Status").values}
    _MESSAGES = SimpleNamespace(**classes, status=statuses)
    return _MESSAGES

async def read_message(reader: asyncio.StreamReader, cls, max_bytes: int):
    size = await varint.read(reader)
    if size > max_bytes:
        raise ValueError(f"message of {size} bytes")
    msg = cls()
    msg.ParseFromString(await reader.readexactly(size))
    return msg


async def write_message(writer: asyncio.StreamWriter, msg) -> None:
    data = msg.SerializeToString()
    writer.write(varint.encode(len(data)) + data)
    await writer.drain()


# --- the hop service over p2pd -------------------------------------------------------------------
async def serve(p2p, policy: RelayPolicy) -> None:
    """Serve the hop protocol through hivemind's `p2p` (replacing p2pd's handler for it)."""
    from hivemind.p2p import PeerID

    pb = messages()
    limits = policy.limits

    def limit():
        return pb.Limit(duration=limits.circuit_s, data=limits.circuit_bytes)

    async def reply(writer, status: str, **fields) -> None:
        await write_message(writer, pb.HopMessage(type=pb.HopMessage.STATUS, status=pb.status[status], **fields))

    async def reserve(src: str, writer) -> None:
        status, expiry = policy.reserve(src, time.time())
        if status != "OK":
            await reply(writer, status)
            return
        addrs = [a.to_bytes() for a in await p2p.get_visible_maddrs(latest=True) if "/ip4/127." not in str(a)]
        await reply(writer, "OK", reservation=pb.Reservation(expire=expiry, addrs=addrs), limit=limit())

    async def connect(src: str, msg, reader, writer) -> None:
        try:
            dst = PeerID(msg.peer.id).to_base58()
        except Exception:
            await reply(writer, "MALFORMED_MESSAGE")
            return
        status = policy.open_circuit(src, dst, time.time())
        if status != "OK":
            await reply(writer, status)
            return
        w2 = None
        try:
            try:
                _, r2, w2 = await asyncio.wait_for(p2p.call_binary_stream_handler(PeerID(msg.peer.id), STOP),
                                                   limits.request_timeout_s)
                await write_message(w2, pb.StopMessage(type=pb.StopMessage.CONNECT, peer=pb.Peer(id=PeerID.from_base58(src).to_bytes()),
                                                       limit=limit()))
                answer = await asyncio.wait_for(read_message(r2, pb.StopMessage, limits.max_message_bytes), limits.request_timeout_s)
                ok = answer.type == pb.StopMessage.STATUS and answer.status == pb.status["OK"]
            except Exception as e:
                log.debug("relay: %s… unreachable for %s…: %s", dst[:12], src[:12], e)
                ok = False
            if not ok:
                policy.counters["circuits_failed"] += 1
                await reply(writer, "CONNECTION_FAILED")
                return
            await reply(writer, "OK", limit=limit())
            await asyncio.wait_for(_splice(reader, writer, r2, w2, limits.circuit_bytes), limits.circuit_s)
        except TimeoutError:
            policy.counters["circuits_timed_out"] += 1
        finally:
            policy.close_circuit(src, dst)
            if w2 is not None:
                w2.close()

    async def handle(info, reader, writer) -> None:
        src = info.peer_id.to_base58()
        try:
            msg = await asyncio.wait_for(read_message(reader, pb.HopMessage, limits.max_message_bytes), limits.request_timeout_s)
            if msg.type == pb.HopMessage.RESERVE:
                await reserve(src, writer)
            elif msg.type == pb.HopMessage.CONNECT:
                await connect(src, msg, reader, writer)
            else:
                await reply(writer, "UNEXPECTED_MESSAGE")
        except Exception as e:  # a stranger's bytes: never a traceback, counted
            policy.counters["requests_failed"] += 1
            log.debug("relay request from %s… failed: %s: %s", src[:12], type(e).__name__, e)
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(HOP, handle)


async def _splice(r1, w1, r2, w2, max_bytes: int) -> None:
    """Copy both ways until either side ends or `max_bytes` went one way."""

    async def pump(reader, writer) -> None:
        sent = 0
        with contextlib.suppress(Exception):
            while sent < max_bytes:
                data = await reader.read(min(1 << 16, max_bytes - sent))
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                sent += len(data)
        with contextlib.suppress(Exception):
            writer.write_eof() if writer.can_write_eof() else writer.close()

    tasks = [asyncio.ensure_future(pump(r1, w2)), asyncio.ensure_future(pump(r2, w1))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait(tasks, timeout=5)  # the other direction's last bytes
    finally:
        for t in tasks:
            t.cancel()
