#!/usr/bin/env python3
"""Every libp2p protocol a live peer offers to a stranger, as libp2p identify reports it.

    scripts/list_protocols.py [--reserve] MADDR                (the address `peer join` printed)
    scripts/list_protocols.py [--reserve] --start [JOIN FLAGS]  (a throwaway `peer join` under /tmp)

Connects from a fresh py-libp2p identity (protocols/transport/light.py) and prints the protocols,
one a line; SECURITY.md's table of the attack surface must name each of them. `--reserve` also
asks for a circuit-relay reservation, as a stranger wanting to use the peer as a relay would, and
prints what came back. With `--start`, the flags after it go to `peer join` (e.g. `--relay-service`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import protocols.transport.light as light  # before anything imports hivemind

RELAY_HOP = "/libp2p/circuit/relay/0.2.0/hop"


async def identify(maddr: str, reserve: bool) -> tuple[list[str], str | None]:
    """The protocols identify lists, and (with `reserve`) what a relay RESERVE got."""
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    pid, dial = light.split_maddr(maddr)
    peer = ID.from_base58(pid)
    async with light.LightClient.open() as client:
        await client.host.connect(PeerInfo(peer, [multiaddr.Multiaddr(a) for a in dial]))
        with trio.fail_after(10):  # identify fills the peerstore; py-libp2p signals no event for it
            while not (protos := client.host.get_peerstore().get_protocols(peer)):  # noqa: ASYNC110
                await trio.sleep(0.05)
        if not reserve:
            return sorted(str(p) for p in protos), None
        from libp2p.relay.circuit_v2.pb import circuit_pb2 as pb

        try:
            stream = await client.host.new_stream(peer, [TProtocol(RELAY_HOP)])
            msg = pb.HopMessage(type=pb.HopMessage.RESERVE).SerializeToString()
            await stream.write(light._varint(len(msg)) + msg)
            with trio.fail_after(5):
                reply = pb.HopMessage.FromString(await light._read_delimited(stream))
            got = (f"{pb.Status.Name(reply.status)}, {reply.limit.duration} s and {reply.limit.data} bytes "
                   "per relayed connection")
        except Exception as e:
            got = f"refused ({type(e).__name__})"
    return sorted(str(p) for p in protos), got


def main(argv: list[str]) -> int:
    import trio

    reserve = "--reserve" in argv[:1]
    argv = argv[1:] if reserve else argv
    if not argv or argv[0] in ("-h", "--help") or (argv[0] != "--start" and len(argv) != 1):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    peer = None
    try:
        if argv[0] == "--start":
            from peer.launcher import LocalPeer

            peer = LocalPeer(Path(tempfile.mkdtemp(prefix="peer-protocols-")), ["--run-id", "list-protocols", *argv[1:]]).start()
            status = peer.wait_ready(120)
            maddr = next(a for a in status["addrs"] if light.dialable(a.split("/p2p/")[0]))
        else:
            maddr = argv[0]
        try:
            protos, reserved = trio.run(identify, maddr, reserve)
        except ValueError as e:
            print(f"list_protocols: {maddr}: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            print(f"list_protocols: cannot identify {maddr} ({type(e).__name__}): is the peer running?", file=sys.stderr)
            return 1
        print(f"{len(protos)} protocols offered by {maddr}:")
        print("\n".join(f"  {p}" for p in protos))
        if reserved is not None:
            print(f"relay RESERVE: {reserved}")
        return 0
    finally:
        if peer is not None:
            from peer.launcher import stop_all

            stop_all([peer])
            shutil.rmtree(peer.data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
