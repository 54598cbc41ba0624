#!/usr/bin/env python3
"""Resident memory of a real peer with outer steps, in model copies, at 25M and 100M parameters.

    flock /tmp/peer-heavy.lock .venv/bin/python scripts/bench_memory.py [--sizes 25 100] [--json]

Two real `peer join` daemons (p2pd on 127.0.0.1) train an MLP of the given size (a user task,
`scripts/bench_memory.py:build`, random data) with outer steps every 2 inner steps and a
consensus round every 2nd round, until each has done 4 outer rounds (pseudo-gradient and anchor
rounds both), and one checkpoint. The figure is each daemon's peak resident memory (`VmHWM` of
the Python process; p2pd's separately), divided by one float32 copy of the model (4 bytes x
parameters). Two peers of 100M peaked at 6.9 and 6.4 GB (docs/benchmarks.md).

What holds model-sized memory (read from the code, and measured stage by stage): between rounds
the flat parameters, the gradient, two Adam moments, the update history's base (`Trainer`), the
evaluation copy, the sketch signs (one vector, shared by the heartbeat's history sketch and the
rule), the outer anchor and momentum (9), and the round buffers reused every round: one receive
buffer per partner and the rule's output (11 with one partner). The loss probe scores models
through views of them and holds none. During a round: our candidate model (`OuterRound.own_model`), and in a consensus
round the outer step's difference; every other temporary of a round (top-k selection,
int8 (de)quantisation, the rule, the history sketch) works in slices of a few MB. During a
checkpoint: copies of the model, the history and the optimizer's moments handed to the writer
thread (it reads the live anchor and momentum, with rounds held off until it is done). The task's optimizer step adds
its own temporaries (Adam: about one copy of the largest parameter, 0.8 of the model here).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(shard: int = 0, num_shards: int = 1, split: str = "iid", alpha: float = 0.5, seed: int = 0, size_m: int = 25):
    """An MLP with about `size_m` million parameters on 512 random examples (a user task)."""
    import torch
    from torch import nn

    from peer.tasks import Task

    width = {25: 4500, 100: 9500}.get(size_m) or int((size_m * 1e6) ** 0.5)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 1024, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    return Task(
        name=f"mlp{size_m}m", make_model=lambda: nn.Sequential(nn.Linear(1024, width), nn.ReLU(), nn.Linear(width, width),
                                                            nn.ReLU(), nn.Linear(width, 10)),
        make_optimizer=lambda params: torch.optim.Adam(params, lr=1e-4),
        x_train=x, y_train=y, x_test=x[:64], y_test=y[:64], batch_size=16, loss_probe_samples=16,
    )


def build25(**kw):
    return build(size_m=25, **kw)


def build100(**kw):
    return build(size_m=100, **kw)


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _p2pd_pids(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "p2pd" in (p / "comm").read_text():
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def run_size(size_m: int, root: Path) -> dict:
    from peer.launcher import LocalPeer, stop_all

    config = root / "peer.toml"
    config.write_text("heartbeat-s = 2.0\neval-every-s = 30.0\ncheckpoint-every-s = 5.0\nouter-sync-every = 2\n"
                      "pull-timeout-s = 120.0\n")
    task = f"bench_memory:build{size_m}"
    env = {"PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT}"}
    common = ["--run-id", f"mem{size_m}", "--task", task, "--config", str(config), "--outer-every-steps", "2",
              "--compression", "topk-int8:0.0156"]
    p0 = LocalPeer(root / "p0", [*common, "--shard", "0/2"], env=env).start()
    peers = [p0]
    started = time.monotonic()
    try:
        p0.wait_ready(600)
        p1 = LocalPeer(root / "p1", [*common, "--shard", "1/2", "--initial-peer", p0.addrs[0]], env=env).start()
        peers.append(p1)
        p1.wait_ready(600)
        p2pd = {p.proc.pid: _p2pd_pids(p.proc.pid) for p in peers}
        while True:
            sts = [p.status() for p in peers]
            if all(s and (s.get("outer") or {}).get("outer_step", 0) >= 4 and s["rounds_ok"] >= 2
                   and s["checkpoint"]["step"] for s in sts):
                break
            for p in peers:
                if not p.alive:
                    raise RuntimeError(f"{p.data_dir.name} died:\n{p.log_tail()}")
            if time.monotonic() - started > 1500:
                raise RuntimeError("timed out")
            time.sleep(1.0)
        py = [_hwm_mb(p.proc.pid) for p in peers]
        pd = [max((_hwm_mb(q) or 0) for q in p2pd[p.proc.pid]) if p2pd[p.proc.pid] else None for p in peers]
    finally:
        stop_all(peers)
    t = build(size_m=size_m)
    numel = sum(x.numel() for x in t.make_model().parameters())
    model_mb = 4 * numel / 2**20
    return {"size_m": size_m, "params": numel, "model_mb": round(model_mb, 1),
            "python_peak_mb": [round(v, 0) for v in py], "p2pd_peak_mb": pd,
            "copies": [round(v / model_mb, 1) for v in py], "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            r = run_size(size, Path(tmp))
        out.append(r)
        if not args.json:
            print(f"{r['params'] / 1e6:.1f}M parameters ({r['model_mb']} MB): peak RSS per peer {r['python_peak_mb']} MB "
                  f"= {r['copies']} model copies; p2pd {r['p2pd_peak_mb']} MB ({r['wall_s']} s)", flush=True)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
