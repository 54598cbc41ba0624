#!/usr/bin/env python3
"""Every libp2p protocol a live peer offers to a stranger, as libp2p identify reports it.

    scripts/list_protocols.py MADDR          (the address `peer join` printed, with /p2p/<id>)
    scripts/list_protocols.py --start        (start a throwaway `peer join` under /tmp and list its own)

Connects from a fresh py-libp2p identity (protocols/transport/light.py) and prints the protocols,
one a line; SECURITY.md's table of the attack surface must name each of them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import protocols.transport.light as light  # before anything imports hivemind


async def identify(maddr: str) -> list[str]:
    import multiaddr
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    pid, dial = light.split_maddr(maddr)
    async with light.LightClient.open() as client:
        await client.host.connect(PeerInfo(ID.from_base58(pid), [multiaddr.Multiaddr(a) for a in dial]))
        with trio.fail_after(10):  # identify fills the peerstore; py-libp2p signals no event for it
            while not (protos := client.host.get_peerstore().get_protocols(ID.from_base58(pid))):  # noqa: ASYNC110
                await trio.sleep(0.05)
    return sorted(str(p) for p in protos)


def main(argv: list[str]) -> int:
    import trio

    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    peer = None
    try:
        if argv[0] == "--start":
            from peer.launcher import LocalPeer

            peer = LocalPeer(Path(tempfile.mkdtemp(prefix="peer-protocols-")), ["--run-id", "list-protocols"]).start()
            status = peer.wait_ready(120)
            maddr = next(a for a in status["addrs"] if light.dialable(a.split("/p2p/")[0]))
        else:
            maddr = argv[0]
        try:
            protos = trio.run(identify, maddr)
        except ValueError as e:
            print(f"list_protocols: {maddr}: {e}", file=sys.stderr)
            return 2
        except Exception as e:
            print(f"list_protocols: cannot identify {maddr} ({type(e).__name__}): is the peer running?", file=sys.stderr)
            return 1
        print(f"{len(protos)} protocols offered by {maddr}:")
        print("\n".join(f"  {p}" for p in protos))
        return 0
    finally:
        if peer is not None:
            from peer.launcher import stop_all

            import shutil

            stop_all([peer])
            shutil.rmtree(peer.data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
