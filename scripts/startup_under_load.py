#!/usr/bin/env python3
"""How long a `peer join` takes to start while a swarm of training peers keeps the CPU busy.

Starts N real peers (mnist1d-cnn, training as usual) with the training thread at `--train-nice`,
then starts extra peers one at a time, alternating "dataset cache warm" and "cache cold" (an empty
XDG_CACHE_HOME: the joiner generates MNIST-1D itself, as every peer did before the cache), and
measures launch -> the daemon's first heartbeat (its `join` line in metrics.jsonl: what
`join_catchup_seconds` counts as start-up). Prints the medians side by side.

    flock /tmp/peer-heavy.lock .venv/bin/python scripts/startup_under_load.py --train-nice 10
    flock /tmp/peer-heavy.lock .venv/bin/python scripts/startup_under_load.py --train-nice 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


from peer.launcher import LocalPeer, start_swarm, stop_all  # noqa: E402


def first_heartbeat(peer: LocalPeer, launched: float, timeout: float = 120.0) -> float:
    """Seconds from launch until the daemon wrote its `join` line (polled: another process)."""
    path = peer.data_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not peer.alive:
            raise RuntimeError(f"joiner died:\n{peer.log_tail()}")
        if path.exists() and any(json.loads(line).get("event") == "join" for line in path.read_text().splitlines() if line.strip()):
            return time.monotonic() - launched
        time.sleep(0.05)
    raise RuntimeError(f"joiner not up after {timeout:.0f}s:\n{peer.log_tail()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--train-nice", type=int, default=10)
    ap.add_argument("--joins", type=int, default=3, help="joins per cache state")
    ap.add_argument("--settle-s", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peer-startup-") as tmp:
        root = Path(tmp)
        (root / "peer.toml").write_text(f"train-nice = {args.train_nice}\nheartbeat-s = 1.0\neval-every-s = 1.0\n")
        common = ["--run-id", "startup", "--task", "mnist1d-cnn", "--config", str(root / "peer.toml")]
        swarm = start_swarm(root, args.peers, common)
        joiners: list[LocalPeer] = []
        times: dict[str, list[float]] = {"warm": [], "cold": []}
        try:
            time.sleep(args.settle_s)
            load_start = os.getloadavg()[0]
            for k in range(2 * args.joins):
                state = ("warm", "cold")[k % 2]
                env = {"XDG_CACHE_HOME": str(root / f"cold-cache-{k}")} if state == "cold" else None
                p = LocalPeer(root / f"joiner{k}", [*common, "--shard", f"0/{args.peers}"], env=env)
                launched = time.monotonic()
                p.start(["--initial-peer", swarm[0].addrs[0]])
                joiners.append(p)
                secs = first_heartbeat(p, launched)
                times[state].append(secs)
                print(f"join {k}: cache {state}, start-up {secs:.1f} s", flush=True)
                p.leave()
                time.sleep(2.0)
            load_end = os.getloadavg()[0]
        finally:
            stop_all(joiners + swarm)
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    print(json.dumps({"peers": args.peers, "train_nice": args.train_nice, "startup_s": times, "median_s": med,
                      "load_1min": [load_start, load_end]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
