"""Overhead benchmark: one peer's training samples/s with gossip on versus off, interleaved in one run.

A few partner peers (real `peer join` processes, training and gossiping as usual) form a run.
The measured peer is then started alternately:

- gossip on: in the partners' run, so every round it pulls and mixes their models (default
  rule) and they pull its model;
- gossip off: alone in a run of its own, so there is nobody to pull from and nobody pulls it;
  everything else (heartbeats to the DHT, evaluation, checkpoints) is the same, and so is the
background: the partners train and gossip among themselves in both phases, so on 2 cores the
measured peer gets the same share of the CPU either way. (Partners that stop training, tried
first, drift away from the measured peer's model; the default rule then distrusts them and backs
off, so only about one round in ten happened and the "on" phase hardly gossiped.)

Rate = training samples over a fixed window read from the daemon's own status (its `samples`
counter), after a settling period. The ratio is median(on) / median(off).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def _wait(pred, timeout: float, what: str, peer) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = peer.status()
        if s is not None and pred(s):
            return s
        if not peer.alive:
            raise RuntimeError(f"{peer.data_dir.name} died:\n{peer.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}: {s and {k: s.get(k) for k in ('step', 'rounds_ok', 'serves')}}")
        time.sleep(0.1)


def _rate(peer, settle_s: float, window_s: float, gossip: bool, partners: int) -> dict:
    if gossip:  # measure only once it is really gossiping: it sees the partners and has mixed them
        _wait(lambda s: len(s["live_peers"]) >= partners and s["rounds_ok"] >= 1, 60, "gossip to start", peer)
    time.sleep(settle_s)
    a, ta = peer.status(), time.monotonic()
    time.sleep(window_s)
    b, tb = peer.status(), time.monotonic()
    return {"samples_per_s": (b["samples"] - a["samples"]) / (tb - ta),
            "rounds_ok": b["rounds_ok"] - a["rounds_ok"], "serves": b["serves"] - a["serves"],
            "bytes_received": b["bytes_received"] - a["bytes_received"], "bytes_sent": b["bytes_sent"] - a["bytes_sent"]}


def run(task: str = "mnist1d-cnn", partners: int = 3, repeats: int = 3, settle_s: float = 3.0, window_s: float = 10.0) -> dict:
    from peer.launcher import LocalPeer, stop_all

    on, off = [], []
    with tempfile.TemporaryDirectory(prefix="peer-bench-overhead-") as tmp:
        root = Path(tmp)
        common = ["--task", task]
        started: list[LocalPeer] = []
        try:
            first = LocalPeer(root / "partner0", [*common, "--run-id", "bench-on"]).start()
            started.append(first)
            first.wait_ready(120)
            for i in range(1, partners):
                started.append(LocalPeer(root / f"partner{i}", [*common, "--run-id", "bench-on",
                                                                "--initial-peer", first.addrs[0]]).start())
            for p in started[1:]:
                p.wait_ready(120)
            for r in range(repeats):
                order = [True, False] if r % 2 == 0 else [False, True]
                for gossip in order:
                    name = f"measured-{'on' if gossip else 'off'}-{r}"
                    if gossip:
                        args = [*common, "--run-id", "bench-on", "--initial-peer", first.addrs[0]]
                    else:
                        args = [*common, "--run-id", f"bench-off-{r}"]
                    peer = LocalPeer(root / name, args).start()
                    started.append(peer)
                    peer.wait_ready(120)
                    (on if gossip else off).append(_rate(peer, settle_s, window_s, gossip, partners))
                    peer.leave(60)
                    started.remove(peer)
        finally:
            stop_all(started)
    med_on = statistics.median(x["samples_per_s"] for x in on)
    med_off = statistics.median(x["samples_per_s"] for x in off)
    return {"task": task, "partners": partners, "repeats": repeats, "window_s": window_s,
            "on_samples_per_s": med_on, "off_samples_per_s": med_off,
            "overhead_ratio": med_on / med_off if med_off > 0 else None, "on": on, "off": off}
