"""A hostile peer against live daemons over real p2pd on 127.0.0.1.

Two honest `peer join` processes train together. In this test process, two hostile libp2p peers
(hivemind's P2P, real p2pd) attack the first one:
- `mallory` is in the swarm: it publishes a record, and serves every pull a bad reply (a 1-byte-
  per-second slow-loris, a truncated stream, garbage, a shape claiming 10^9 elements, NaN/Inf);
  it writes fake records from 20 fresh keys, a record for p1 signed with its own key (forged),
  records that live too long, are malformed, or are too large, and replays an older record.
- `trudy` attacks p0's model server: garbage bytes, a truncated request, an oversized header, a
  1-byte-per-second slow-loris, and 200 concurrent requests.
Throughout, p0 must keep training, its RSS must grow by less than 100 MB, its checkpoint must stay
loadable; every rejection must be counted in `peer status` and logged; both attackers end up
banned; and the honest peers still see each other.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from peer.launcher import LocalPeer, stop_all
from peer.state import checkpoint_path, load_checkpoint
from protocols import gossip
from protocols.codec import TensorSpec, encode_header
from protocols.discovery import PeerRecord, run_key

RUN, TASK = "hostile", "mnist1d-cnn"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def status(peer: LocalPeer) -> dict:
    s = await asyncio.to_thread(peer.status)
    assert s is not None and peer.alive, f"{peer.data_dir.name} stopped answering:\n{peer.log_tail()}"
    return s


async def poll(peer: LocalPeer, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = await status(peer)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; status: { {k: s.get(k) for k in ('step', 'rejected', 'pull_failed', 'serve_errors', 'dht_rejects', 'record_rejects', 'banned')} }")
        await asyncio.sleep(0.5)


class Signer:
    """An RSA identity that signs DHT records the way hivemind's validator checks them."""

    def __init__(self, key=None):
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.utils.crypto import RSAPrivateKey

        from protocols.transport.hivemind import _owner_peer_id

        self.v = RSASignatureValidator(key or RSAPrivateKey())
        self.peer_id = _owner_peer_id(self.v.local_public_key)

    def signed(self, key_id, value: dict | bytes, expiration: float) -> bytes:
        from hivemind.dht.validation import DHTRecord
        from hivemind.utils.serializer import MSGPackSerializer

        raw = value if isinstance(value, bytes) else MSGPackSerializer.dumps(value)
        rec = DHTRecord(key_id.to_bytes(), MSGPackSerializer.dumps(self.v.local_public_key), raw, expiration)
        return self.v.sign_value(rec)


def record(peer_id: str, step: int, addrs: list[str], now: float) -> dict:
    return PeerRecord(peer_id, tuple(addrs), TASK, step, 100.0, step, now).to_wire()


class Mallory:
    """A swarm member that serves only bad replies and pollutes the DHT."""

    BEHAVIOURS = ["slowloris", "truncated", "garbage", "huge", "nan_inf"]

    def __init__(self, numel: int):
        self.numel = numel
        self.served: dict[str, list[str]] = {}

    async def start(self, bootstrap: str, identity: Path) -> None:
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.node import DHTNode
        from hivemind.p2p import P2P

        from protocols.transport.hivemind import ensure_identity, load_identity_key

        ensure_identity(str(identity))  # the key mallory signs records with is its libp2p identity
        self.signer = Signer(load_identity_key(str(identity)))
        self.p2p = await P2P.create(initial_peers=[bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(identity))
        self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=[bootstrap], record_validator=RSASignatureValidator())
        self.peer_id = self.p2p.peer_id.to_base58()
        assert self.peer_id == self.signer.peer_id
        await self.p2p.add_binary_stream_handler(gossip.PROTOCOL, self.handle)

    async def handle(self, info, reader, writer) -> None:
        asker = info.peer_id.to_base58()
        done = self.served.setdefault(asker, [])
        b = self.BEHAVIOURS[len(done) % len(self.BEHAVIOURS)]
        done.append(b)
        spec = [TensorSpec("flat", "float32", (self.numel,))]
        try:
            await reader.readexactly(4)
            if b == "slowloris":
                for byte in encode_header(gossip.model_header(1, spec)):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1.0)
            elif b == "truncated":
                writer.write(encode_header(gossip.model_header(1, spec)) + b"\0" * (self.numel * 2))
            elif b == "garbage":
                writer.write(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
            elif b == "huge":
                writer.write(encode_header(gossip.model_header(1, [TensorSpec("flat", "float32", (10**9,))])))
            elif b == "nan_inf":
                bad = np.zeros(self.numel, dtype="<f4")
                bad[::2], bad[1::2] = np.nan, np.inf
                writer.write(encode_header(gossip.model_header(1, spec)) + bad.tobytes())
            await writer.drain()
        except Exception:
            pass  # the victim hung up on us, as it should
        finally:
            writer.close()

    async def pollute(self, victims: list[str], p1_id: str, own_addrs: list[str]) -> dict[str, bool]:
        """Store records straight into the victims' DHT nodes; returns what each store got back."""
        from hivemind.dht.routing import DHTID
        from hivemind.p2p import PeerID
        from hivemind.utils.timed_storage import get_dht_time

        key = DHTID.generate(source=run_key(RUN))
        now = get_dht_time()
        me = self.signer
        fakes = [Signer() for _ in range(20)]
        replayed = fakes[0]
        items = [("own", me, record(me.peer_id, 5, own_addrs, now), now + 90)]
        items += [(f"fake{i}", f, record(f.peer_id, 1, [f"/ip4/127.0.0.1/tcp/9/p2p/{f.peer_id}"], now), now + 90) for i, f in enumerate(fakes)]
        items += [
            ("forged", me, record(p1_id, 10**6, own_addrs, now), now + 90),  # speaks for p1, signed by mallory
            ("ttl", me, record(me.peer_id, 6, own_addrs, now), now + 10**6),
            ("malformed", me, {"v": 1, "peer_id": me.peer_id, "addrs": "nope"}, now + 90),
            ("large", me, {**record(me.peer_id, 7, own_addrs, now), "task": "x" * 8000}, now + 90),
            ("ext", me, msgpack.packb(msgpack.ExtType(42, b"boom")), now + 90),
            ("newer", replayed, record(replayed.peer_id, 2, [f"/ip4/127.0.0.1/tcp/9/p2p/{replayed.peer_id}"], now + 1), now + 95),
            ("replay", replayed, record(replayed.peer_id, 1, [f"/ip4/127.0.0.1/tcp/9/p2p/{replayed.peer_id}"], now), now + 90),
        ]
        results: dict[str, bool] = {}
        for victim in victims:
            pid = PeerID.from_base58(victim)
            for name, signer, value, exp in items:
                ok = await self.dht.protocol.call_store(pid, [key], [signer.signed(key, value, exp)], [exp], subkeys=[signer.v.local_public_key])
                results[f"{name}@{victim[:6]}"] = bool(ok and ok[0])
        self.replayed_id = replayed.peer_id
        return results

    async def stop(self) -> None:
        await self.dht.shutdown()
        await self.p2p.shutdown()


async def trudy_attacks(p2p, victim: str, run_id: str, flood_from=None) -> dict[str, int]:
    """Attack the victim's model server: malformed and slow requests, or (`flood_from` set)
    200 concurrent valid requests, whose answers are returned by kind."""
    from hivemind.p2p import PeerID

    pid = PeerID.from_base58(victim)

    async def exchange(payload: bytes, *, trickle: float = 0.0, close_early: bool = False) -> bytes:
        _, reader, writer = await p2p.call_binary_stream_handler(pid, gossip.PROTOCOL)
        try:
            if trickle:
                for byte in payload:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(trickle)
            else:
                writer.write(payload)
                await writer.drain()
            if close_early:
                writer.write_eof()
            return await asyncio.wait_for(reader.read(-1), timeout=30)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return b""
        finally:
            writer.close()

    valid = encode_header(gossip.model_request(run_id, TASK))
    if flood_from is None:
        await exchange(valid, trickle=1.0)  # slow-loris first: one byte a second
        await exchange(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # garbage msgpack
        await exchange(valid[:10], close_early=True)  # truncated request
        await exchange(struct.pack(">I", 2**31) + b"\x80")  # oversized header claim
        await exchange(os.urandom(1000))  # random bytes (by now trudy is banned: answered unread)
        return {}
    replies = await asyncio.gather(*(exchange(valid) for _ in range(200)), return_exceptions=True)
    answers: dict[str, int] = {}
    for r in replies:
        kind = "exception" if isinstance(r, BaseException) else _answer(r)
        answers[kind] = answers.get(kind, 0) + 1
    return answers


def _answer(reply: bytes) -> str:
    if len(reply) < 4:
        return "nothing"
    header = msgpack.unpackb(reply[4 : 4 + struct.unpack(">I", reply[:4])[0]])
    return header.get("reason", header.get("type"))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_hostile_peer_against_live_daemons(tmp_path):
    from hivemind.p2p import P2P

    config = tmp_path / "peer.toml"
    config.write_text("heartbeat-s = 1.0\ngossip-every-s = 0.5\ncheckpoint-every-s = 2.0\neval-every-s = 1.0\n"
                      "pull-timeout-s = 8.0\nread-timeout-s = 3.0\n")
    common = ["--run-id", RUN, "--task", TASK, "--config", str(config)]
    p0 = LocalPeer(tmp_path / "p0", [*common, "--shard", "0/2"]).start()
    peers = [p0]
    mallory = trudy = flooder = None
    try:
        await asyncio.to_thread(p0.wait_ready, 90)
        p1 = LocalPeer(tmp_path / "p1", [*common, "--shard", "1/2", "--initial-peer", p0.addrs[0]]).start()
        peers.append(p1)
        await asyncio.to_thread(p1.wait_ready, 90)
        await poll(p0, lambda s: len(s["live_peers"]) == 1 and s["rounds_ok"] > 2 and s["checkpoint"]["step"], 60, "p0 and p1 to gossip")
        rss0 = rss_mb(p0.proc.pid)
        step0 = (await status(p0))["step"]

        mallory = Mallory(numel=int(load_checkpoint(checkpoint_path(p0.data_dir, RUN, TASK))["flat"].numel()))
        await mallory.start(p0.addrs[0], tmp_path / "mallory.key")
        stores = await mallory.pollute([p0.peer_id, p1.peer_id], p1.peer_id, [str(a) for a in await mallory.p2p.get_visible_maddrs()])
        trudy = await P2P.create(initial_peers=[p0.addrs[0]], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        trudy_id = trudy.peer_id.to_base58()
        flooder = await P2P.create(initial_peers=[p0.addrs[0]], host_maddrs=["/ip4/127.0.0.1/tcp/0"])

        async def attacks():
            await trudy_attacks(trudy, p0.peer_id, RUN)
            return await trudy_attacks(flooder, p0.peer_id, RUN, flood_from=True)

        answers, s = await asyncio.gather(
            attacks(),
            poll(p0, lambda s: {"non_finite", "too_large", "bad_header"} <= set(s["rejected"]) and mallory.peer_id in s["banned"],
                 120, "p0 to meet every bad reply and ban mallory"),
        )
        assert trudy_id in s["banned"] and flooder.peer_id.to_base58() in s["banned"], s["banned"]
        rss1 = max(rss0, rss_mb(p0.proc.pid))

        # the DHT nodes refused what they could check, counted by reason; the rest was stored (at p1
        # some valid ones were already there: p0's lookups replicate what they find to nearby nodes)
        assert stores[f"own@{p0.peer_id[:6]}"] and stores[f"fake3@{p0.peer_id[:6]}"] and stores[f"newer@{p0.peer_id[:6]}"], stores
        for v in (p0.peer_id[:6], p1.peer_id[:6]):
            for bad in ("forged", "ttl", "malformed", "large", "ext", "replay"):
                assert not stores[f"{bad}@{v}"], (bad, v)
        assert {"record_owner_mismatch", "record_ttl_too_long", "malformed_record:addrs", "record_too_large",
                "malformed_record:msgpack"} <= set(s["dht_rejects"]), s["dht_rejects"]
        # mallory's stores reached p0 through the bounded DHT RPC server, and were counted there
        stored = s["dht_rpcs"]["rpcs"]["rpc_store"]
        assert stored["served"] >= 1 and stored["requests"] >= stored["served"], s["dht_rpcs"]
        # the replayed older record did not replace the newer one
        replayed = [q for q in s["live_peers"] if q["peer_id"] == mallory.replayed_id]
        assert [q["step"] for q in replayed] == [2], replayed
        # every bad reply p0 pulled was refused and counted, and mallory was banned for it
        assert s["pull_failed"].get("timeout", 0) >= 1 and s["pull_failed"].get("disconnected", 0) >= 1, s["pull_failed"]
        assert mallory.served.get(p0.peer_id, [])[:5] == Mallory.BEHAVIOURS
        # every attack on the model server was refused and counted
        assert {"bad_header", "disconnected", "header_too_large", "timeout"} <= set(s["serve_errors"]), s["serve_errors"]
        # of the 200 concurrent requests only the per-peer limit's worth were served; the rest were
        # refused (a refusal written just before the server closes its end may be lost by p2pd's
        # stream reset: the client then sees the stream end with nothing, "nothing")
        assert answers.get("model", 0) <= 10 and sum(answers.values()) == 200 and not answers.get("exception"), answers
        assert s["serve_errors"].get("refused_busy", 0) >= 1 and s["serve_errors"].get("refused_banned", 0) >= 1, s["serve_errors"]
        # ...and logged, one line each, with a reason
        log = (p0.data_dir / "daemon.log").read_text()
        for line in ("refused DHT record: record_owner_mismatch", "rejected model from", "non_finite", "banned "):
            assert line in log, line

        # p0 trained through all of it, within its memory bound, and the honest peers still see each other
        s = await poll(p0, lambda s: s["step"] > step0 + 200, 60, "p0 to keep training")
        assert p1.peer_id in {q["peer_id"] for q in s["live_peers"]}
        s1 = await poll(p1, lambda s: p0.peer_id in {q["peer_id"] for q in s["live_peers"]}, 30, "p1 to see p0")
        assert p1.peer_id not in s1["banned"] and p0.peer_id not in s["banned"]
        growth = max(rss1, rss_mb(p0.proc.pid)) - rss0
        print(f"p0 RSS {rss0:.0f} MB -> +{growth:.0f} MB; 200 concurrent requests answered {answers}; "
              f"dht_rejects {s['dht_rejects']}; serve_errors {s['serve_errors']}; rejected {s['rejected']}")
        assert growth < 100, growth
        assert load_checkpoint(checkpoint_path(p0.data_dir, RUN, TASK))["step"] > 0
    finally:
        for p2p in (trudy, flooder):
            if p2p is not None:
                await p2p.shutdown()
        if mallory is not None:
            await mallory.stop()
        await asyncio.to_thread(stop_all, peers)
    assert all(p.proc.returncode == 0 for p in peers), [p.log_tail() for p in peers]
    assert load_checkpoint(checkpoint_path(p0.data_dir, RUN, TASK))["step"] > step0

