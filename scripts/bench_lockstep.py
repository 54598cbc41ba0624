#!/usr/bin/env python3
"""Convergence in lock step: how many samples 4 peers need to 88 % when every peer mixes at the same instant.

The diagnosis behind the gossip cadence (docs/benchmarks.md, convergence): real `PeerDaemon`s
(default rule, real codec and validation) on the in-memory transport, IID shards i/N of MNIST-1D,
driven in lock step: every peer takes H local steps, then all run one gossip round at once; the
lowest peer's test accuracy is checked after every step. Prints one JSON line per (H, seed) with
the samples (sum over peers) at the first step where every peer is at the threshold, or null.

    flock /tmp/peer-heavy.lock .venv/bin/python scripts/bench_lockstep.py --local-steps 1 5 20 60 --seeds 2

Compare with `scripts/bench.py convergence`, where real processes mix whenever their own cadence
says: the gap between the two is what asynchronous mixing costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path



class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def run(local_steps: int, aggregator: str, seed: int, peers: int = 4, threshold: float = 0.88,
              max_steps: int = 3000) -> dict:
    import torch

    from peer.config import PeerConfig
    from peer.daemon import PeerDaemon
    from protocols import gossip
    from protocols.transport.memory import MemoryNetwork

    torch.set_num_threads(1)
    clock = Clock()
    net = MemoryNetwork(clock=clock)
    with tempfile.TemporaryDirectory(prefix="bench-lockstep-") as tmp:
        daemons = []
        for i in range(peers):
            cfg = PeerConfig(data_dir=Path(tmp) / f"p{i}", run_id="lockstep", task="mnist1d-cnn", aggregator=aggregator,
                             shard=f"{i}/{peers}", heartbeat_s=1.0)
            cfg.data_dir.mkdir(parents=True)
            d = PeerDaemon(cfg, net.transport(f"p{i}"))
            d.trainer.seed_batches(seed * 100 + i)  # each peer its own batch order
            daemons.append(d)
        for d in daemons:
            await d.transport.start()
            d.addrs = await d.transport.addrs()
            await d.transport.set_handler(gossip.PROTOCOL, d._serve_model)
        x, y = daemons[0].task.x_test, daemons[0].task.y_test

        def lowest() -> float:
            accs = []
            for d in daemons:
                with torch.no_grad():
                    d.trainer.model.eval()
                    accs.append(float((d.trainer.model(x).argmax(1) == y).float().mean()))
                    d.trainer.model.train()
            return min(accs)

        step, hit = 0, None
        while step < max_steps and hit is None:
            for _ in range(local_steps):
                for d in daemons:
                    d.trainer.train_step()
                step += 1
                if lowest() >= threshold:
                    hit = step
                    break
            if hit is None:
                clock.t += 1.0
                for d in daemons:
                    await d._heartbeat_once()
                await asyncio.gather(*(d.gossip_round() for d in daemons))
                if lowest() >= threshold:
                    hit = step
        for d in daemons:
            await d.transport.stop()
    batch = daemons[0].task.batch_size
    return {"local_steps": local_steps, "aggregator": aggregator, "seed": seed, "steps": hit,
            "samples": None if hit is None else hit * batch * peers}


def main() -> None:
    from peer.aggregation import DEFAULT_AGGREGATOR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local-steps", type=int, nargs="+", default=[1, 5, 20, 60], help="local steps between mixes")
    ap.add_argument("--aggregator", default=DEFAULT_AGGREGATOR)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=3000, help="give up after this many steps per peer")
    args = ap.parse_args()
    for h in args.local_steps:
        for seed in range(args.seeds):
            started = time.monotonic()
            r = asyncio.run(run(h, args.aggregator, seed, max_steps=args.max_steps))
            r["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
