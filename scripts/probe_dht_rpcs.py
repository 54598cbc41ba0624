#!/usr/bin/env python3
"""What a stranger's abuse of hivemind's DHT RPCs does to a node: stock hivemind against ours.

    scripts/probe_dht_rpcs.py [--streams 300] [--json]

Starts two victims on 127.0.0.1, each a real p2pd with a hivemind DHTNode: `stock` (hivemind's
own P2P, unary handlers) and `guarded` (protocols/transport/hivemind.py: protocols/dht_guard.py's
defaults). From a third p2pd, for each victim it:
  - times 100 pings of hivemind's own client one after another (what an honest caller pays);
  - sends `DHTProtocol.rpc_find` a request that does not parse, and prints the error it gets back;
  - opens one stream that sends nothing, and times how long the victim keeps it open (cut at 60 s);
  - opens `--streams` such streams at once from one peer, and counts how many the victim still
    holds open 2 s later and how many it refused or closed;
  - prints the victim's counters (the stock node keeps none).
Figures go in SECURITY.md, with this command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from protocols import varint


FIND = "DHTProtocol.rpc_find"
HOLD_CAP_S = 60.0


async def _reply_error(reader: asyncio.StreamReader) -> str | None:
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
    reply = p2pd_pb2.PersistentConnectionRequest.FromString(await reader.readexactly(n)).unaryResponse
    return reply.error.decode(errors="replace") if reply.WhichOneof("result") == "error" else "(a response)"


async def _until_closed(reader: asyncio.StreamReader, cap: float) -> float | None:
    started = time.monotonic()
    try:
        await asyncio.wait_for(reader.read(), cap)
    except TimeoutError:
        return None
    return time.monotonic() - started


async def ping_ms(client, victim_id, n: int = 100) -> float:
    """Median round trip of hivemind's own `call_ping` (an honest caller), in ms."""
    import statistics

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert await client.protocol.call_ping(victim_id) is not None
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


async def probe(attacker, victim_id, streams: int) -> dict:
    from hivemind.proto import p2pd_pb2

    async def open_():
        _, r, w = await attacker.call_binary_stream_handler(victim_id, FIND)
        return r, w

    out: dict = {}
    r, w = await open_()
    msg = p2pd_pb2.PersistentConnectionRequest(callId=uuid.uuid4().bytes, callUnary=p2pd_pb2.CallUnaryRequest(
        peer=b"", proto=FIND, data=b"\xff\xff\xff\xff not a FindRequest")).SerializeToString()
    w.write(varint.encode(len(msg)) + msg)
    out["malformed_reply"] = await asyncio.wait_for(_reply_error(r), 30)
    w.close()

    r, w = await open_()
    held = await _until_closed(r, HOLD_CAP_S)
    out["silent_stream_held_s"] = round(held, 1) if held is not None else f">{HOLD_CAP_S:g}"
    w.close()

    opened = await asyncio.gather(*(open_() for _ in range(streams)), return_exceptions=True)
    ok = [x for x in opened if not isinstance(x, BaseException)]
    # what is still open 2 s later is held by the victim (a refusal is a short reply and the end)
    ends = await asyncio.gather(*(_until_closed(r, 2.0) for r, _ in ok))
    still_open = sum(1 for e in ends if e is None)
    out["concurrent"] = {"asked": streams, "opened": len(ok), "held_after_2s": still_open,
                         "refused_or_closed": len(ok) - still_open}
    for _, w in ok:
        w.close()
    return out


async def main(args) -> dict:
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    from protocols.transport.hivemind import HivemindTransport

    results = {}
    with tempfile.TemporaryDirectory(prefix="probe-dht-") as tmp:
        stock_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        stock = await DHTNode.create(p2p=stock_p2p)
        guarded = HivemindTransport(str(Path(tmp) / "g.key"), ["/ip4/127.0.0.1/tcp/0"], run_key="probe")
        await guarded.start()
        attacker = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await DHTNode.create(p2p=attacker, client_mode=True)
        try:
            for name, p2p in (("stock", stock_p2p), ("guarded", guarded.p2p)):
                addrs = [Multiaddr(str(a).split("/p2p/")[0]) for a in await p2p.get_visible_maddrs()]
                await attacker._client.connect(p2p.peer_id, addrs)
                victim_id = PeerID.from_base58(p2p.peer_id.to_base58())
                results[name] = {"honest_ping_median_ms": await ping_ms(client, victim_id)}
                results[name].update(await probe(attacker, victim_id, args.streams))
            results["guarded"]["counters"] = guarded.dht_rpcs()
        finally:
            await client.shutdown()
            await attacker.shutdown()
            await guarded.stop()
            await stock.shutdown()
            await stock_p2p.shutdown()
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = asyncio.run(main(args))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for name, r in res.items():
            print(f"{name}:")
            for k, v in r.items():
                print(f"  {k}: {v}")
