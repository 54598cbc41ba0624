#!/usr/bin/env python3
"""Communication benchmark: low-communication gossip against per-step gossip, synchronous DiLoCo
and central training, side by side in one run on a language-model task (`scripts/bench.py comms`).

    (a) ours:     N real `peer join` daemons with the task's default outer steps and compression
    (b) per-step: the same daemons exchanging whole float32 models on the per-step cadence
                  (`--outer-every-steps 0 --compression fp32`)
    (c) DiLoCo:   N replicas in this process; every H inner steps their pseudo-gradients are
                  averaged exactly and one Nesterov outer step is taken (the synchronous anchor;
                  `--diloco-only --every H --compression SPEC` runs it alone with other settings)
    (d) central:  one model on the union of the data, batch N x the task's, the same inner
                  optimizer: the same samples per step as the N peers together
    (a') capped:  (a) again with every peer in its own network namespace capped at
                  `--cap-mbit` both ways (tc tbf), for the utilisation figure

Every peer stops training after `--steps` inner steps. Figures:

    bytes_reduction       bytes sent per peer per inner step, (b) / (a)
    loss_gap_vs_central   (a)'s final held-out loss (mean over peers) / (d)'s - 1, same samples
    utilisation_capped    the worst peer's fraction of wall time in training steps in (a')

Loss against wall time and against bytes sent go to the JSON (`curves`) and to a PNG.
`--compare [SPEC...]` runs only (a), with the task's default compression and with each SPEC, side
by side (final loss, bytes per step, utilisation), to choose a default; `--compare-flags 'FLAGS'`
adds runs with other `peer join` flags (e.g. `'--outer-lr 1.0'`); with `--capped`, each of them
as (a'), in the capped namespaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_swarm(root: Path, task: str, n: int, steps: int, extra: list[str], netns=None, cap_mbit: float = 0,
              timeout_s: float = 1800) -> dict:
    """Start n daemons (shards i/n), poll until every one has trained `steps` inner steps, stop them.
    Returns the curve (t, mean held-out loss, mean bytes sent per peer) and per-peer figures."""
    from peer.launcher import LocalPeer, stop_all

    from hivemind import DHT

    # Every peer starts at once from the same initial model (no join sync): a plain DHT node in
    # this process is the bootstrap, so no peer trains alone while the others start.
    root.mkdir(parents=True)
    (root / "peer.toml").write_text("join-sync-timeout-s = 0\n")
    boot = DHT(start=True, host_maddrs=[f"/ip4/{'10.231.0.1' if netns is not None else '127.0.0.1'}/tcp/0"])
    args = ["--task", task, "--run-id", f"comms-{root.name}", "--max-steps", str(steps), "--config", str(root / "peer.toml"),
            *(a for m in boot.get_visible_maddrs() for a in ("--initial-peer", str(m))), *extra]
    peers: list[LocalPeer] = []
    try:
        for i in range(n):
            prefix, addr = ([], "127.0.0.1")
            if netns is not None:
                prefix, addr = netns.add(i, rate_mbit=cap_mbit)
            p = LocalPeer(root / f"p{i}", [*args, "--shard", f"{i}/{n}"], listen=f"/ip4/{addr}/tcp/0", prefix=prefix)
            peers.append(p.start())
        for p in peers:
            p.wait_ready(180)
        t0 = time.monotonic()
        curve, first, done = [], {}, {}
        staleness: dict[tuple[int, int], list[int]] = {}  # (peer, its outer step) -> partners' staleness
        while len(done) < n:
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"peers did not finish {steps} steps within {timeout_s:.0f}s")
            for p in peers:
                if not p.alive:
                    raise RuntimeError(f"peer {p.data_dir.name} died:\n{p.log_tail()}")
            now = time.monotonic() - t0
            sts = [p.status() for p in peers]
            live = [s for s in sts if s]
            for i, s in enumerate(sts):
                if not s:
                    continue
                first.setdefault(i, (now, s["traffic"]["train_seconds"]))
                last = s.get("last_round") or {}
                if last.get("staleness") is not None and last.get("outer_step") is not None:
                    staleness[(i, last["outer_step"])] = last["staleness"]
                if i not in done and s["step"] >= steps and s.get("test_loss") is not None:
                    done[i] = (now, s)
            losses = [s["test_loss"] for s in live if s.get("test_loss") is not None]
            if losses:
                curve.append({"t": round(now, 2), "loss": sum(losses) / len(losses),
                              "bytes_per_peer": sum(s["bytes_sent"] for s in live) / len(live),
                              "step": min(s["step"] for s in live)})
            time.sleep(0.5)
        per_peer = []
        for i in range(n):
            t_end, s = done[i]
            t_start, busy0 = first[i]
            per_peer.append({
                "peer": i, "steps": s["step"], "test_loss": s["test_loss"], "bits_per_byte": s.get("bits_per_byte"),
                "bytes_sent": s["bytes_sent"], "bytes_received": s["bytes_received"],
                "bytes_sent_per_step": s["bytes_sent"] / max(s["step"], 1),
                "utilisation": round((s["traffic"]["train_seconds"] - busy0) / max(t_end - t_start, 1e-9), 4),
                "rounds_ok": s["rounds_ok"], "rounds_failed": s["rounds_failed"], "rounds_no_partner": s.get("rounds_no_partner"),
                "pull_failed": s["pull_failed"], "rejected": s["rejected"], "outer": s.get("outer"),
                "served_bytes": s["traffic"].get("served_bytes"),
                "wall_s": round(t_end, 1),
            })
        seen = [x for v in staleness.values() for x in v]
        return {"curve": curve, "peers": per_peer,
                "staleness": {str(k): seen.count(k) for k in sorted(set(seen))},  # outer steps behind -> partners
                "final_loss": sum(p["test_loss"] for p in per_peer) / n,
                "bytes_sent_per_step": sum(p["bytes_sent_per_step"] for p in per_peer) / n,
                "utilisation_worst": min(p["utilisation"] for p in per_peer),
                "wall_s": round(max(p["wall_s"] for p in per_peer), 1)}
    finally:
        stop_all(peers)
        boot.shutdown()


def run_diloco(task_name: str, n: int, steps: int, eval_every: int, every: int | None = None,
               lr: float | None = None, momentum: float | None = None, compression: str = "fp32") -> dict:
    """Synchronous DiLoCo in this process: exact mean of the n pseudo-gradients every H steps
    (the task's H, outer lr and momentum unless given). With `compression`, each replica's
    pseudo-gradient is compressed and what was left out stays in its model, as in `OuterLoop`."""
    import torch

    from peer.outer import NesterovOuter
    from peer.tasks import load_task
    from peer.trainer import Trainer
    from protocols.compression import CompressionSpec, compress, decompress

    torch.set_num_threads(1)
    trainers = [Trainer(load_task(task_name, shard=i, num_shards=n), seed=0) for i in range(n)]
    task = trainers[0].task
    h = every or task.outer_every_steps or 50
    anchor = trainers[0].flat.clone()
    outer = NesterovOuter(task.outer_lr if lr is None else lr, task.outer_momentum if momentum is None else momentum)
    spec = CompressionSpec.parse(compression)
    d = anchor.numel()
    curve, busy, sent = [], 0.0, 0.0
    for step in range(1, steps + 1):
        t = time.perf_counter()
        for tr in trainers:
            tr.train_step()
        if step % h == 0 or step == steps:
            deltas = []
            for tr in trainers:
                c = compress(anchor - tr.snapshot(), spec)
                deltas.append(decompress(c.header, c.parts, d))
            before = anchor.clone()
            outer.step(anchor, torch.stack(deltas).mean(0))
            for tr, delta in zip(trainers, deltas):
                tr.apply_delta(anchor - before + delta)  # to the new anchor, keeping what was not sent
            sent += 2 * (n - 1) / n * c.nbytes  # a ring all-reduce's share per peer
        busy += (time.perf_counter() - t) / n  # as if the n replicas ran in parallel
        if step % eval_every == 0 or step == steps:
            loss = trainers[0].evaluate()["test_loss"]
            curve.append({"t": round(busy, 2), "loss": loss, "bytes_per_peer": sent, "step": step})
    return {"curve": curve, "final_loss": curve[-1]["loss"], "bytes_sent_per_step": sent / steps, "every_steps": h,
            "compression": spec.describe()}


def run_central(task_name: str, n: int, steps: int, eval_every: int) -> dict:
    """One model on the union of the shards, batch n x the task's: the samples of n peers per step."""
    import torch

    from peer.tasks import load_task
    from peer.trainer import Trainer

    torch.set_num_threads(1)
    task = load_task(task_name, shard=0, num_shards=1)
    tr = Trainer(dataclasses.replace(task, batch_size=n * task.batch_size), seed=0)
    curve, busy = [], 0.0
    for step in range(1, steps + 1):
        t = time.perf_counter()
        tr.train_step()
        busy += time.perf_counter() - t
        if step % eval_every == 0 or step == steps:
            curve.append({"t": round(busy, 2), "loss": tr.evaluate()["test_loss"], "bytes_per_peer": 0.0, "step": step})
    return {"curve": curve, "final_loss": curve[-1]["loss"], "bytes_sent_per_step": 0.0}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        c = r.get("curve") or []
        if not c:
            continue
        ax1.plot([p["t"] for p in c], [p["loss"] for p in c], label=name)
        if any(p["bytes_per_peer"] for p in c):
            ax2.plot([max(p["bytes_per_peer"], 1) / 1e6 for p in c], [p["loss"] for p in c], label=name)
    ax1.set_xlabel("wall time (s; (c) and (d): training time)")
    ax1.set_ylabel("held-out loss (nats/byte)")
    ax2.set_xlabel("MB sent per peer")
    ax2.set_xscale("log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(task: str = "lm-tiny", peers: int = 4, steps: int = 600, cap_mbit: float = 20.0, out: Path | None = None,
        capped: bool = True, per_step: bool = True, ours_args: tuple[str, ...] = ()) -> dict:
    """`ours_args`: extra `peer join` flags for (a) and (a'), e.g. a shorter `--outer-every-steps`."""
    from peer.experiment import network

    tmp = Path(tempfile.mkdtemp(prefix="bench-comms-"))
    results: dict[str, dict] = {}
    eval_every = max(steps // 30, 1)
    try:
        results["(a) ours"] = run_swarm(tmp / "a", task, peers, steps, list(ours_args))
        if per_step:
            results["(b) per-step gossip"] = run_swarm(tmp / "b", task, peers, steps, ["--outer-every-steps", "0", "--compression", "fp32"])
        results["(c) sync DiLoCo"] = run_diloco(task, peers, steps, eval_every)
        results["(d) central"] = run_central(task, peers, steps, eval_every)
        capped_note = None
        if capped:
            capped_note = network.probe(need_netem=False)
            if capped_note is None:
                with network.Namespaces() as ns:
                    results[f"(a') ours, {cap_mbit:g} Mbit/s"] = run_swarm(tmp / "cap", task, peers, steps, list(ours_args),
                                                                          netns=ns, cap_mbit=cap_mbit)
            else:
                print(f"capped run skipped: {capped_note}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, d = results["(a) ours"], results["(d) central"]
    b = results.get("(b) per-step gossip")
    cap = next((r for k, r in results.items() if k.startswith("(a')")), None)
    summary = {
        "task": task, "peers": peers, "steps": steps, "cap_mbit": cap_mbit,
        "bytes_reduction": round(b["bytes_sent_per_step"] / max(a["bytes_sent_per_step"], 1e-9), 1) if b else None,
        "loss_gap_vs_central": round(a["final_loss"] / d["final_loss"] - 1, 4),
        "utilisation_capped": cap["utilisation_worst"] if cap else None,
        "capped_skipped": capped_note,
        "final_loss": {k: round(r["final_loss"], 4) for k, r in results.items()},
        "bytes_sent_per_step": {k: round(r["bytes_sent_per_step"], 1) for k, r in results.items()},
        "results": results,
    }
    if out is not None:
        plot(results, out)
        summary["plot"] = str(out)
    return summary


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="lm-tiny")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--cap-mbit", type=float, default=20.0)
    ap.add_argument("--no-capped", action="store_true")
    ap.add_argument("--plot", type=Path, default=Path("runs/bench/comms.png"))
    ap.add_argument("--diloco-only", action="store_true",
                    help="only (c), synchronous DiLoCo, with the settings below (and (d) with --central)")
    ap.add_argument("--every", type=int, default=None, help="--diloco-only: H (default: the task's)")
    ap.add_argument("--outer-lr", type=float, default=None)
    ap.add_argument("--outer-momentum", type=float, default=None)
    ap.add_argument("--compression", default="fp32", help="--diloco-only: e.g. int8, topk-int8:0.0156")
    ap.add_argument("--central", action="store_true", help="--diloco-only: also (d)")
    ap.add_argument("--compare", nargs="*", metavar="SPEC", default=None,
                    help="only (a), side by side: the task's default compression, then (a) with each SPEC "
                         "(`peer join --compression SPEC`), in this order; --reverse runs them the other way")
    ap.add_argument("--reverse", action="store_true", help="--compare: the SPECs first, the default last")
    ap.add_argument("--capped", action="store_true", help="--compare: every run as (a'), capped at --cap-mbit")
    ap.add_argument("--compare-flags", nargs="+", metavar="FLAGS", default=(),
                    help="--compare: also runs with these `peer join` flags, each one quoted string")
    args = ap.parse_args()
    if args.compare is not None:
        from peer.experiment import network

        tmp = Path(tempfile.mkdtemp(prefix="bench-comms-compare-"))
        runs = ([("default", [])] + [(spec, ["--compression", spec]) for spec in args.compare]
                + [(flags, shlex.split(flags)) for flags in args.compare_flags])
        out = {}
        if args.capped and (why := network.probe(need_netem=False)) is not None:
            sys.exit(f"--capped needs network namespaces with tc tbf: {why}")
        try:
            for name, extra in (runs[::-1] if args.reverse else runs):
                with network.Namespaces() if args.capped else contextlib.nullcontext() as ns:
                    r = run_swarm(tmp / f"run{len(out)}", args.task, args.peers, args.steps, extra,
                                  netns=ns, cap_mbit=args.cap_mbit if ns is not None else 0)
                out[name] = {"final_loss": round(r["final_loss"], 4), "bytes_sent_per_step": round(r["bytes_sent_per_step"], 1),
                             "utilisation_worst": r["utilisation_worst"], "wall_s": r["wall_s"]}
                print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"task": args.task, "peers": args.peers, "steps": args.steps,
                          "cap_mbit": args.cap_mbit if args.capped else None, "runs": out}))
        sys.exit(0)
    if args.diloco_only:
        ev = max(args.steps // 6, 1)
        out = {"diloco": run_diloco(args.task, args.peers, args.steps, ev, args.every, args.outer_lr, args.outer_momentum,
                                    args.compression)}
        if args.central:
            out["central"] = run_central(args.task, args.peers, args.steps, ev)
        print(json.dumps({k: {"final_loss": round(v["final_loss"], 4), **{x: v[x] for x in ("every_steps", "compression") if x in v},
                              "curve": [(p["step"], round(p["loss"], 3)) for p in v["curve"]]} for k, v in out.items()}))
        sys.exit(0)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    res = run(args.task, args.peers, args.steps, args.cap_mbit, args.plot, capped=not args.no_capped)
    print(json.dumps(res))
