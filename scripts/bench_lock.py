#!/usr/bin/env python3
"""How long the event loop waits for the trainer's lock while a large model trains.

    flock /tmp/peer-heavy.lock .venv/bin/python scripts/bench_lock.py [--size-m 25] [--seconds 20] [--json]

A real `Trainer` trains the 25M-parameter MLP of `scripts/bench_memory.py` in its thread; the
main thread asks for the trainer's lock every 0.5 s (as a heartbeat's history sketch does) and
records how long each request waited. It runs twice, side by side in one process: with
`threading.Lock` and with `peer.trainer.FairLock` (the trainer's lock). Prints the median and
worst wait and the number of steps trained during the worst wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


def measure(lock_kind: str, size_m: int, seconds: float) -> dict:
    from bench_memory import build

    from peer.trainer import FairLock, Trainer

    trainer = Trainer(build(size_m=size_m), seed=0, eval_every_s=1e9, nice=10)  # the daemon's default
    trainer.lock = threading.Lock() if lock_kind == "threading.Lock" else FairLock()
    trainer.start()
    waits, steps_during = [], []
    try:
        while trainer.step < 2:  # past the first step's allocations
            time.sleep(0.05)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            before, asked = trainer.step, time.monotonic()
            with trainer.lock:
                waits.append(time.monotonic() - asked)
                steps_during.append(trainer.step - before)
    finally:
        trainer.stop()
    worst = max(range(len(waits)), key=waits.__getitem__)
    return {"lock": lock_kind, "requests": len(waits), "median_wait_s": round(statistics.median(waits), 3),
            "worst_wait_s": round(waits[worst], 3), "steps_during_worst_wait": steps_during[worst],
            "steps": trainer.step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-m", type=int, default=25)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(kind, args.size_m, args.seconds) for kind in ("threading.Lock", "FairLock")]
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['lock']:>15}: {r['requests']} requests, median wait {r['median_wait_s']:.3f} s, worst "
              f"{r['worst_wait_s']:.3f} s ({r['steps_during_worst_wait']} steps meanwhile), {r['steps']} steps")


if __name__ == "__main__":
    main()
