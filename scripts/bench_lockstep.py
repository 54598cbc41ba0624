#!/usr/bin/env python3
"""Convergence in lock step: how many samples 4 peers need to 88 % when every peer mixes at the same instant.

The diagnosis behind the gossip cadence (docs/benchmarks.md, convergence): the lock-step simulator
(`peer.sim.lockstep.LockstepSwarm`: the daemon's own core, rule and validation and the real
`Trainer`; a pull hands the served tensor over without the wire), IID shards i/N of MNIST-1D: every peer takes H local steps, then all run one
gossip round at once; the lowest peer's test accuracy is checked after every step. It makes the
decisions a lock-step swarm of `PeerDaemon`s makes from the same seeds (tests/test_lockstep.py).
Prints one JSON line per (H, seed) with the samples (sum over peers) at the first step where
every peer is at the threshold, or null.

    flock /tmp/peer-heavy.lock .venv/bin/python scripts/bench_lockstep.py --local-steps 1 5 20 60 --seeds 2

Compare with `scripts/bench.py convergence`, where real processes mix whenever their own cadence
says: the gap between the two is what asynchronous mixing costs.
"""

from __future__ import annotations

import argparse
import json
import time



def run(local_steps: int, aggregator: str, seed: int, peers: int = 4, threshold: float = 0.88,
        max_steps: int = 3000) -> dict:
    import torch

    from peer.config import PeerConfig
    from peer.sim.lockstep import LockstepPeer, LockstepSwarm

    torch.set_num_threads(1)
    swarm = LockstepSwarm([LockstepPeer(f"p{i}", PeerConfig(run_id="lockstep", task="mnist1d-cnn", aggregator=aggregator,
                                                            shard=f"{i}/{peers}", heartbeat_s=1.0))
                           for i in range(peers)], local_steps)
    for i, p in enumerate(swarm.peers):
        p.learner.seed_batches(seed * 100 + i)  # each peer its own batch order
    x, y = swarm.peers[0].learner.task.x_test, swarm.peers[0].learner.task.y_test

    def lowest() -> float:
        accs = []
        for p in swarm.peers:
            model = p.learner.model
            with torch.no_grad():
                model.eval()
                accs.append(float((model(x).argmax(1) == y).float().mean()))
                model.train()
        return min(accs)

    step, hit = 0, None
    while step < max_steps and hit is None:
        for _ in range(local_steps):
            for p in swarm.peers:
                p.learner.train_step()
            step += 1
            if lowest() >= threshold:
                hit = step
                break
        if hit is None:  # a round without its training part (`LockstepSwarm.round` = train + this)
            swarm.now += 1.0
            for p in swarm.peers:
                swarm.heartbeat(p)
            swarm.gossip()
            if lowest() >= threshold:
                hit = step
    batch = swarm.peers[0].learner.task.batch_size
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
            r = run(h, args.aggregator, seed, max_steps=args.max_steps)
            r["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
