"""hivemind's DHT RPCs served under bounds (protocols/dht_guard.py), and p2pd's relay hop withdrawn.

The policy is tested alone with explicit clocks; then a real `HivemindTransport` (p2pd, DHTNode)
on 127.0.0.1 is attacked by a second, plain hivemind P2P in this process that opens raw streams
to `DHTProtocol.rpc_*` and writes what it likes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dht_guard import BUSY, MALFORMED, OUTCOMES, RpcLimits, RpcPolicy
from tests.conftest import wait_until
from protocols import varint

FIND, PING = "DHTProtocol.rpc_find", "DHTProtocol.rpc_ping"


# ---------------------------------------------------------------- the policy, no I/O


def test_policy_caps_streams_per_peer_and_in_total_and_frees_them_on_release():
    policy = RpcPolicy(RpcLimits(max_streams_per_peer=2, max_streams=3, read_deadline_s=1.5, reply_deadline_s=4.0))
    a1 = policy.admit("A", now=100.0)
    assert a1 is not None and a1.read_by == 101.5 and a1.reply_by == 105.5
    assert policy.admit("A", now=100.0) is not None
    assert policy.admit("A", now=100.0) is None  # A's third stream
    assert policy.admit("B", now=100.0) is not None  # another peer is not held back by A
    assert policy.admit("C", now=100.0) is None  # all 3 taken
    policy.release("A")
    assert policy.admit("C", now=101.0) is not None
    for peer in ("A", "B", "C"):
        policy.release(peer)
    assert policy.active == 0 and policy.active_by_peer == {}  # no state left for gone peers
    with pytest.raises(RuntimeError):
        policy.release("A")  # a double release would hand out a slot that does not exist


def test_policy_counts_only_known_outcomes_per_rpc():
    policy = RpcPolicy()
    policy.count("rpc_find", "refused")
    policy.count("rpc_find", "requests")
    with pytest.raises(ValueError):
        policy.count("rpc_find", "Error parsing message")  # a peer's text never becomes a counter
    summary = policy.summary()
    assert summary["rpcs"]["rpc_find"] == {**dict.fromkeys(OUTCOMES, 0), "refused": 1, "requests": 1}
    assert summary["active"] == 0


@pytest.mark.parametrize("bad", [{"max_streams_per_peer": 0}, {"max_streams": True}, {"read_deadline_s": 0},
                                 {"reply_deadline_s": float("nan")}, {"max_request_bytes": -1}])
def test_limits_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        RpcLimits(**bad)


# ---------------------------------------------------------------- real p2pd


def call_message(proto: str, data: bytes) -> bytes:
    from hivemind.proto import p2pd_pb2

    return p2pd_pb2.PersistentConnectionRequest(
        callId=uuid.uuid4().bytes, callUnary=p2pd_pb2.CallUnaryRequest(peer=b"", proto=proto, data=data)).SerializeToString()


def envelope(proto: str, data: bytes) -> bytes:
    """What a caller's p2pd writes for a unary call: the message after its varint length."""
    msg = call_message(proto, data)
    return varint.encode(len(msg)) + msg


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda data, proto: call_message(proto, data), st.binary(max_size=200),
                           st.sampled_from([FIND, PING, "", "DHTProtocol.rpc_find\x00"]))))
def test_parse_request_refuses_any_bytes_with_malformed_only(raw):
    from hivemind.proto import dht_pb2

    from protocols.dht_guard import Malformed, parse_request

    try:
        call_id, request = parse_request(raw, FIND, dht_pb2.FindRequest)
    except Malformed:
        return
    assert isinstance(request, dht_pb2.FindRequest) and isinstance(call_id, bytes)


async def read_reply(reader: asyncio.StreamReader):
    """The unaryResponse the victim wrote, or None if the stream ended without one."""
    from hivemind.proto import p2pd_pb2

    n = shift = 0
    while True:
        b = await reader.read(1)
        if not b:
            return None
        n |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    return p2pd_pb2.PersistentConnectionRequest.FromString(await reader.readexactly(n)).unaryResponse


@pytest.fixture
async def victim_and_attacker(tmp_path, request):
    from hivemind.p2p import P2P

    from protocols.transport.hivemind import HivemindTransport

    limits = getattr(request, "param", RpcLimits(max_streams_per_peer=3, max_streams=16, read_deadline_s=30.0))
    victim = HivemindTransport(str(tmp_path / "victim.key"), ["/ip4/127.0.0.1/tcp/0"], run_key="guard", rpc_limits=limits)
    await victim.start()
    attacker = None
    try:
        addr = [a for a in await victim.addrs() if "/tcp/" in a and "127.0.0.1" in a][0]
        attacker = await P2P.create(initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        yield victim, attacker
    finally:
        if attacker is not None:
            await attacker.shutdown()
        await victim.stop()


async def open_stream(attacker, victim, name: str):
    from hivemind.p2p import PeerID

    _, reader, writer = await attacker.call_binary_stream_handler(PeerID.from_base58(victim.peer_id), name)
    return reader, writer


def counts(victim, rpc: str) -> dict:
    return victim.dht_rpcs()["rpcs"].get(rpc, {})


async def test_a_well_formed_request_is_served_and_hivemind_nodes_still_talk_to_us(victim_and_attacker):
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2

    victim, attacker = victim_and_attacker
    reader, writer = await open_stream(attacker, victim, PING)
    writer.write(envelope(PING, dht_pb2.PingRequest(peer=dht_pb2.NodeInfo()).SerializeToString()))
    reply = await read_reply(reader)
    writer.close()
    assert reply is not None and reply.WhichOneof("result") == "response"
    assert dht_pb2.PingResponse.FromString(reply.response).peer.node_id == victim.dht.node_id.to_bytes()
    # an unmodified hivemind DHT node (unary calls through its own p2pd) is served as before
    node = await DHTNode.create(p2p=attacker, initial_peers=[], client_mode=True)
    try:
        assert await node.protocol.call_ping(PeerID.from_base58(victim.peer_id)) == victim.dht.node_id
    finally:
        await node.shutdown()
    await wait_until(lambda: counts(victim, "rpc_ping").get("served") == 2, 5, "two pings served")
    assert victim.dht_rpcs()["active"] == 0


async def test_streams_past_the_per_peer_cap_are_refused_and_counted(victim_and_attacker):
    victim, attacker = victim_and_attacker
    cap = victim.rpc_policy.limits.max_streams_per_peer
    holders = [await open_stream(attacker, victim, FIND) for _ in range(cap)]  # send nothing: hold a slot
    await wait_until(lambda: victim.dht_rpcs()["active"] == cap, 10, "the holders admitted")
    extra = 12
    flood = await asyncio.gather(*(open_stream(attacker, victim, FIND) for _ in range(extra)))
    started = time.monotonic()
    replies = await asyncio.wait_for(asyncio.gather(*(read_reply(r) for r, _ in flood)), 10)
    # refused at once (not held until the 30 s read deadline), each with the bare word or a closed stream
    assert time.monotonic() - started < 5
    assert all(r is None or r.error.decode() == BUSY for r in replies), replies
    await wait_until(lambda: counts(victim, "rpc_find").get("refused") == extra, 5, "refusals counted")
    c = counts(victim, "rpc_find")
    assert c["requests"] == cap + extra and c["served"] == 0
    assert victim.dht_rpcs()["active"] == cap  # the flood took no slot
    for _, w in [*holders, *flood]:
        w.close()
    await wait_until(lambda: victim.dht_rpcs()["active"] == 0, 10, "the holders' slots released")
    assert counts(victim, "rpc_find")["disconnected"] == cap


@pytest.mark.parametrize("victim_and_attacker", [RpcLimits(read_deadline_s=0.5)], indirect=True)
async def test_a_slow_loris_stream_is_closed_at_the_read_deadline(victim_and_attacker):
    victim, attacker = victim_and_attacker
    silent_reader, silent_writer = await open_stream(attacker, victim, FIND)  # sends nothing
    partial_reader, partial_writer = await open_stream(attacker, victim, FIND)
    partial_writer.write(varint.encode(100) + b"x" * 10)  # announces 100 bytes, sends 10, then stalls
    started = time.monotonic()
    ends = await asyncio.wait_for(asyncio.gather(silent_reader.read(), partial_reader.read()), 10)
    elapsed = time.monotonic() - started
    assert ends == [b"", b""]  # closed by the victim, with no reply
    assert elapsed < 3.0, elapsed  # the deadline is 0.5 s; p2pd's own hold was 30 s
    await wait_until(lambda: counts(victim, "rpc_find").get("timed_out") == 2, 5, "timeouts counted")
    assert victim.dht_rpcs()["active"] == 0
    for w in (silent_writer, partial_writer):
        w.close()


async def test_a_malformed_request_gets_a_fixed_word_and_no_parser_message(victim_and_attacker):
    victim, attacker = victim_and_attacker
    cases = [
        envelope(FIND, b"\xff\xff\xff\xff not a FindRequest"),  # the RPC's own request does not parse
        varint.encode(12) + b"\x0a\xff\xff\xff\xff\xff garbage",  # the envelope does not parse
        envelope(PING, b""),  # a ping inside a find stream: hivemind's dispatch would trust the field
    ]
    for raw in cases:
        reader, writer = await open_stream(attacker, victim, FIND)
        writer.write(raw)
        reply = await asyncio.wait_for(read_reply(reader), 10)
        writer.close()
        assert reply is not None and reply.WhichOneof("result") == "error"
        assert reply.error.decode() == MALFORMED  # not "DecodeError('Error parsing message ...')"
    await wait_until(lambda: counts(victim, "rpc_find").get("malformed") == len(cases), 5, "malformed counted")
    # one over the size limit is refused on its length prefix alone
    reader, writer = await open_stream(attacker, victim, FIND)
    writer.write(varint.encode(victim.rpc_policy.limits.max_request_bytes + 1))
    assert (await asyncio.wait_for(read_reply(reader), 10)).error.decode() == MALFORMED
    writer.close()
    await wait_until(lambda: counts(victim, "rpc_find").get("malformed") == len(cases) + 1, 5, "oversize counted")


IDENTIFY = r"""
import json, sys
import protocols.transport.light as light
import multiaddr, trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

async def main():
    async with light.LightClient.open() as c:
        pid, dial = light.split_maddr(sys.argv[1])
        await c.host.connect(PeerInfo(ID.from_base58(pid), [multiaddr.Multiaddr(a) for a in dial]))
        with trio.fail_after(10):
            while not (protos := c.host.get_peerstore().get_protocols(ID.from_base58(pid))):
                await trio.sleep(0.05)
        print(json.dumps(sorted(protos)))
trio.run(main)
"""


@pytest.mark.parametrize("relay_service", [False, True])
async def test_relay_hop_is_offered_only_when_asked_for(tmp_path, relay_service):
    """identify (py-libp2p, in a subprocess: it must load before hivemind) lists every protocol."""
    from hivemind.p2p import P2P, PeerID

    from protocols.transport.hivemind import RELAY_HOP, HivemindTransport
    from protocols.transport.nat import NatSettings

    t = HivemindTransport(str(tmp_path / "k.key"), ["/ip4/127.0.0.1/tcp/0"], run_key="hop",
                          nat=NatSettings(relay_service=relay_service))
    await t.start()
    other = None
    try:
        addr = [a for a in await t.addrs() if "/tcp/" in a and "127.0.0.1" in a][0]
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", IDENTIFY, addr], capture_output=True,
                                      text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        protos = json.loads(out.stdout)
        assert {"DHTProtocol.rpc_find", "DHTProtocol.rpc_ping", "DHTProtocol.rpc_store", "/ipfs/kad/1.0.0"} <= set(protos)
        assert (RELAY_HOP in protos) == relay_service, protos
        # and a stranger cannot use it either: go-libp2p may open a stream before the protocol is
        # agreed, so "served" means the stream is still open, waiting for a HopMessage, 1 s later
        other = await P2P.create(initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            _, r, w = await other.call_binary_stream_handler(PeerID.from_base58(t.peer_id), RELAY_HOP)
            try:
                served = await asyncio.wait_for(r.read(1), 1.0) != b""
            except TimeoutError:
                served = True
            except Exception:
                served = False
            w.close()
        except Exception:
            served = False
        assert served == relay_service
    finally:
        if other is not None:
            await other.shutdown()
        await t.stop()
