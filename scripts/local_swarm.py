#!/usr/bin/env python3
"""Run a small swarm of real `peer join` daemons on 127.0.0.1 and show it train.

Used by scripts/quickstart.sh. Starts N peers (each on its own data shard), shows the first
peer's `peer status` and a swarm table refreshing live, with a progress bar toward the target
accuracy, then stops every peer gracefully and prints each peer's final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.render import render_status
from peer.launcher import start_swarm, stop_all


def swarm_table(peers, statuses, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("peer", "shard", "step", "test accuracy", "loss", "bits/byte", "live peers seen", "rounds ok/failed"):
        t.add_column(col)
    for p, s in zip(peers, statuses):
        if s is None:
            t.add_row(p.data_dir.name, "-", "-", "-", "-", "-", "-", "-")
            continue
        acc = f"{100 * s['accuracy']:.1f}%" if s["accuracy"] is not None else "-"
        loss = f"{s['loss']:.3f}" if s["loss"] is not None else "-"
        bpb = f"{s['bits_per_byte']:.2f}" if s.get("bits_per_byte") is not None else "-"
        t.add_row(s["peer_id"][:16] + "…", s["shard"], str(s["step"]), acc, loss, bpb, str(len(s["live_peers"])),
                  f"{s['rounds_ok']}/{s['rounds_failed']}")
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--task", default="mnist1d-cnn")
    ap.add_argument("--target", type=float, default=None,
                    help="stop once every peer reaches this test accuracy (next-byte accuracy for lm tasks) "
                         "[default: 0.90; 0.30 for lm tasks]")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--min-seconds", type=float, default=20.0)
    ap.add_argument("--root", type=Path, default=Path("runs/quickstart"))
    ap.add_argument("--json", action="store_true", help="print the final per-peer results as JSON")
    args = ap.parse_args()
    if args.target is None:
        args.target = 0.30 if args.task.startswith("lm") else 0.90

    console = Console(stderr=args.json)
    args.root.mkdir(parents=True, exist_ok=True)
    console.print(f"starting {args.peers} peers on 127.0.0.1 (task {args.task}, data dirs under {args.root}) ...")
    t0 = time.monotonic()
    peers = start_swarm(args.root, args.peers, ["--task", args.task, "--run-id", "quickstart"])
    console.print(f"all {args.peers} peers up after {time.monotonic() - t0:.1f}s; join line of the first:")
    console.print(f"  peer join --run-id quickstart --task {args.task} --initial-peer {peers[0].addrs[0]}")

    progress = Progress(TextColumn("lowest peer accuracy"), BarColumn(), TextColumn("{task.completed:.1f}% / {task.total:.0f}%"), TimeElapsedColumn())
    bar = progress.add_task("acc", total=100 * args.target)
    start = time.monotonic()
    statuses = [p.status() for p in peers]
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while True:
                statuses = [p.status() for p in peers]
                accs = [s["accuracy"] if s and s["accuracy"] is not None else 0.0 for s in statuses]
                progress.update(bar, completed=min(100 * min(accs), 100 * args.target))
                head = render_status(statuses[0]) if statuses[0] else "first peer not answering"
                live.update(Group(f"[bold]peer status --data-dir {peers[0].data_dir}[/bold]", head,
                                  swarm_table(peers, statuses, "the swarm"), progress))
                elapsed = time.monotonic() - start
                if (min(accs) >= args.target and elapsed >= args.min_seconds) or elapsed >= args.max_seconds:
                    break
                dead = [p for p in peers if not p.alive]
                if dead:
                    raise SystemExit(f"peer {dead[0].data_dir} died:\n{dead[0].log_tail()}")
                time.sleep(1.0)
    finally:
        console.print("asking every peer to leave (final checkpoint, record withdrawn) ...")
        stop_all(peers)

    elapsed = time.monotonic() - start
    final = [{"peer_id": s["peer_id"], "shard": s["shard"], "step": s["step"], "accuracy": s["accuracy"],
              "bits_per_byte": s.get("bits_per_byte")} if s else None for s in statuses]
    table = Table(title=f"final test accuracy after {elapsed:.0f}s of training", title_justify="left")
    for col in ("peer", "shard", "steps", "test accuracy"):
        table.add_column(col)
    for f in final:
        if f:
            table.add_row(f["peer_id"], f["shard"], str(f["step"]), f"{100 * f['accuracy']:.1f}%")
    console.print(table)
    ok = all(f and f["accuracy"] is not None and f["accuracy"] >= args.target for f in final)
    if args.json:
        print(json.dumps({"seconds": round(elapsed, 1), "target": args.target, "reached": ok, "peers": final}))
    console.print(f"every peer reached {100 * args.target:.0f}%: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
