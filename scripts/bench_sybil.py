#!/usr/bin/env python3
"""Time SybilWall's scoring (the default rule's first layer) against the size of the swarm view.

Each round the default rule (`sybilwall+scc`) scores this round's partners with FoolsGold over
the history sketches of *every* live peer in the view (reported in their records, up to
MAX_VIEW_PEERS = 1024) and over the deviations it observed of every partner it ever pulled (up
to 1024): an n x n cosine matrix of 512-value sketches, FoolsGold's pardoning on it, and a
coordinate-wise median of the others' sketches per peer. This times `SybilWallWeights.weights`
with random sketches for n peers in the view (and min(n, 1024) observed), 4 partners, one
thread: the median of `--repeats` calls, in milliseconds, one JSON line per size.

    .venv/bin/python scripts/bench_sybil.py --views 25 100 300 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, nargs="+", default=[25, 100, 300, 1000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    from peer.aggregation.rules import RoundContext, SybilWallWeights

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for n in args.views:
        rule = SybilWallWeights()
        sketches = {f"p{i}": torch.randn(512, generator=g) for i in range(n)}
        for i in range(min(n, rule.max_tracked)):
            rule.observed[f"p{i}"] = torch.randn(512, generator=g)
        ctx = RoundContext(self_id="p0", partner_ids=["p1", "p2", "p3", "p4"], sketches=sketches)
        rule.weights(ctx)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rule.weights(ctx)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"view": n, "weights_ms": round(1e3 * statistics.median(times), 2)}), flush=True)


if __name__ == "__main__":
    main()
