#!/usr/bin/env python3
"""A heartbeat's view update against the size of the run, and which peers bounded views hold.

For each N, N records are published to the simulator's record store (peer/sim/dht.py: every
unexpired record, in first-publication order), then 10 peers spread over the run each feed one
lookup into a fresh `SwarmView`, as a joining daemon does. Printed per N: the median update
time (what every heartbeat costs each peer: every record of the run is parsed and checked), how
many distinct peers appear in any of the 10 views, and whether the last publisher is in one.
Above `MAX_VIEW_PEERS` (1,024) each view admits newcomers in its own drawn order, so the views
are different samples of the run and together cover most of it.

    .venv/bin/python scripts/bench_view.py --peers 100 1000 5000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[100, 1000, 5000])
    args = ap.parse_args()
    from peer.sim.dht import RecordStore
    from protocols.discovery import MAX_VIEW_PEERS, SKETCH_BYTES, PeerRecord, SwarmView

    history = bytes(SKETCH_BYTES)  # records carry a sketch, as the default rule's peers publish
    for n in args.peers:
        store = RecordStore()
        ids = [f"sim{i:05d}" for i in range(n)]
        for pid in ids:
            store.publish(pid, PeerRecord(pid, (f"/sim/{pid}",), "t", 1, 1.0, 1, 0.0, history=history).to_wire(), 6.0)
        seen, times = set(), []
        for viewer in ids[:: max(1, n // 10)][:10]:
            view = SwarmView(viewer, "t")
            t0 = time.perf_counter()
            view.update(store.lookup(1.0), 1.0)
            times.append(time.perf_counter() - t0)
            seen |= set(view.peers)
        print(json.dumps({"peers": n, "update_ms": round(1e3 * statistics.median(times), 1), "view_bound": MAX_VIEW_PEERS,
                          "in_some_view": len(seen), "last_publisher_seen": ids[-1] in seen}), flush=True)


if __name__ == "__main__":
    main()
