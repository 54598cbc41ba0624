#!/usr/bin/env python3
"""Diagnostic (not a benchmark of record): where the comms benchmark's loss gap comes from.

One process simulates N peers on an LM task with the shards, batch sizes and inner steps of
`scripts/bench_comms.py`, built from the daemon's own pieces, so what it measures is what the
daemon does: `peer.outer.OuterLoop` (anchor, Nesterov outer step, error feedback kept in the live
model), `protocols.compression` (what partners decode is exactly what was sent), the rule from
`peer.aggregation.make_aggregator` run on candidate models `anchor − Δ_j` centred on our own
(as `OuterRounds._outer_round` in peer/outer_rounds.py does), the loss probe on the peer's own data, SybilWall's reported
history sketches, and consensus rounds that mix int8 anchors. Rounds are simultaneous (lock-step),
so asynchrony enters only through the modelled staleness:

    --stale P      each partner's newest pseudo-gradient is one outer step old with probability P
                   (the comms bench measured 94 of 229 mixed one behind: P ~ 0.41); a payload
                   already mixed is not mixed again (the daemon's `since`)
    --partners K   partners pulled per round (the daemon asks up to 4: with 4 peers, all 3 others)
    --consensus models
                   a consensus round mixes the peers' live models instead of their anchors: a
                   change the daemon does not have (it serves anchors), simulated to measure it

Every variant trains the same number of samples. Prints one JSON line per run: the final
held-out loss of each peer's live model (mean and range), the gap to central training at the same
samples when `--central` is given, and the bytes each peer would serve per inner step (each
payload counted once per partner that pulled it).

    flock /tmp/peer-heavy.lock .venv/bin/python scripts/diag_loss_gap.py --steps 600 --variant sync
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch

from peer.aggregation import make_aggregator
from peer.aggregation.rules import RoundContext
from peer.aggregation.sybil import Sketcher
from peer.loss_probe import LossProbe
from peer.outer import OuterLoop, OuterSettings
from peer.tasks import load_task
from peer.trainer import Trainer
from protocols.compression import CompressionSpec, compress, decompress
from protocols.discovery import SKETCH_DIM

# (rule, compression, stale, partners, sync_every) of each named step of the ablation; `None`
# means "the task's default" for compression and sync_every
VARIANTS = {
    "sync": dict(rule="mean", compression="fp32", stale=0.0, partners=3, sync_every=0),
    "topk": dict(rule="mean", compression=None, stale=0.0, partners=3, sync_every=0),
    "robust": dict(rule="sybilwall+scc", compression=None, stale=0.0, partners=3, sync_every=0),
    "stale": dict(rule="sybilwall+scc", compression=None, stale=0.41, partners=3, sync_every=0),
    "gossip2": dict(rule="sybilwall+scc", compression=None, stale=0.41, partners=2, sync_every=0),
    "ours": dict(rule="sybilwall+scc", compression=None, stale=0.41, partners=3, sync_every=None),
}


@dataclasses.dataclass
class Peer:
    id: str
    trainer: Trainer
    outer: OuterLoop
    rule: object
    probe: LossProbe | None
    published: dict[int, object] = dataclasses.field(default_factory=dict)  # outer step -> payload
    served_anchor: object = None
    seen: dict[str, int] = dataclasses.field(default_factory=dict)  # partner -> outer step mixed last


def simulate(task_name: str, n: int, steps: int, every: int, lr: float, momentum: float, compression: str,
             rule: str, stale: float, partners: int, sync_every: int, dense_rounds: int = 0,
             dense_compression: str = "int8", anchor_compression: str = "int8", consensus: str = "anchors",
             seed: int = 0) -> dict:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    spec, dense_spec = CompressionSpec.parse(compression), CompressionSpec.parse(dense_compression)
    anchor_spec = CompressionSpec.parse(anchor_compression)
    settings = OuterSettings(every, lr, momentum, sync_every)
    peers = []
    for i in range(n):
        tr = Trainer(load_task(task_name, shard=i, num_shards=n), seed=0)
        probe = LossProbe(tr.task, tr.task.loss_probe_samples, seed=i) if rule.startswith("sybilwall") else None
        outer = OuterLoop(settings, spec, tr.flat)
        peers.append(Peer(f"p{i}", tr, outer, make_aggregator(rule), probe,
                          served_anchor=compress(outer.anchor, anchor_spec)))
    d = peers[0].trainer.flat.numel()
    sketcher = Sketcher(d, SKETCH_DIM)
    served = [0] * n  # bytes each peer served
    staleness: dict[int, int] = {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for p in peers:
            p.trainer.train_step()
        if step % every and step != steps:
            continue
        sketches = {p.id: sketcher(p.trainer.history()).half().float() for p in peers}
        rounds = []
        for p in peers:  # every peer publishes first: the rounds are simultaneous
            p.outer.compression = dense_spec if p.outer.outer_step < dense_rounds else spec
            rnd = p.outer.begin(p.trainer.snapshot(), p.trainer.step)
            p.published[rnd.outer_step] = rnd.payload
            p.published.pop(rnd.outer_step - 2, None)
            rounds.append(rnd)
        anchors_before = [p.served_anchor for p in peers]
        lives_before = [p.trainer.snapshot() for p in peers] if consensus == "models" else None
        for i, (p, rnd) in enumerate(zip(peers, rounds)):
            others = [j for j in range(n) if j != i]
            chosen = others if partners >= len(others) else rng.sample(others, partners)
            own_model = rnd.own_model
            sync = p.outer.sync_due(rnd.outer_step)
            ids, models = [], []
            if sync and consensus == "models":
                # consensus on live models: every peer's whole progress (anchor minus what it has
                # not sent yet) is averaged, then anchor and model both become the mix
                live = lives_before[i]
                for j in chosen:
                    a = compress(lives_before[j], anchor_spec)
                    models.append(decompress(a.header, a.parts, d))
                    ids.append(peers[j].id)
                    served[j] += a.nbytes
                p.outer.step(own_model)  # keeps the outer momentum's bookkeeping as in an anchor round
                mixed = run_rule(p, live, ids, models, sketches) if ids else live
                p.outer.adopt(mixed)
                change = mixed - live
            elif sync:
                p.outer.step(own_model)
                for j in chosen:
                    a = anchors_before[j]  # partners' anchors as served before this round
                    models.append(decompress(a.header, a.parts, d))
                    ids.append(peers[j].id)
                    served[j] += a.nbytes
                if ids:
                    mixed = run_rule(p, p.outer.anchor, ids, models, sketches)
                    p.outer.adopt(mixed)
                change = p.outer.change(rnd, own_model)
            else:
                for j in chosen:
                    q = peers[j]
                    theirs = rnd.outer_step - (1 if rng.random() < stale else 0)
                    payload = q.published.get(theirs)
                    if payload is None or p.seen.get(q.id, -1) >= theirs:
                        continue  # nothing newer than what we mixed: the daemon's quiet reply
                    p.seen[q.id] = theirs
                    served[j] += payload.nbytes
                    staleness[rnd.outer_step - theirs] = staleness.get(rnd.outer_step - theirs, 0) + 1
                    models.append(p.outer.as_model(decompress(payload.header, payload.parts, d)))
                    ids.append(q.id)
                mixed = run_rule(p, own_model, ids, models, sketches) if ids else own_model
                change = p.outer.finish(rnd, mixed)
            p.trainer.apply_delta(change)
        for p in peers:
            p.served_anchor = compress(p.outer.anchor, anchor_spec)
    losses = [p.trainer.evaluate()["test_loss"] for p in peers]
    anchor_losses = [evaluate_flat(p.trainer.task, p.outer.anchor) for p in peers]
    return {"final_loss": round(sum(losses) / n, 4), "peer_losses": [round(x, 4) for x in losses],
            "anchor_loss": round(sum(anchor_losses) / n, 4),
            "bytes_served_per_step": round(sum(served) / n / steps, 1), "staleness": staleness,
            "anchor_spread": round(max(float((p.outer.anchor - peers[0].outer.anchor).norm()) for p in peers), 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def run_rule(p: Peer, own: torch.Tensor, ids: list[str], models: list[torch.Tensor], sketches) -> torch.Tensor:
    """The daemon's `_mix`: the loss probe on our own data, then the rule (PeerCore.aggregate)."""
    ctx = RoundContext(self_id=p.id, partner_ids=ids, sketches=sketches)
    if p.probe is not None:
        ctx.own_loss, ctx.loss_deltas = p.probe.measure(own, models)
        ctx.untrained_loss = p.probe.untrained_loss
    return p.rule(own, models, ctx).model.clone()


def evaluate_flat(task, flat: torch.Tensor) -> float:
    """The task's held-out loss of the model whose flat parameters are `flat`."""
    model = task.make_model()
    torch.nn.utils.vector_to_parameters(flat, list(model.parameters()))
    return task.evaluate(model)["test_loss"]


def energy_split(task_name: str, n: int, every: int, texts: list[str]) -> dict:
    """One pseudo-gradient (shard 0 of n, `every` inner steps from the start): the share of its
    squared norm that each compression keeps, and which parameters its kept coordinates are in."""
    torch.set_num_threads(1)
    tr = Trainer(load_task(task_name, shard=0, num_shards=n), seed=0)
    start = tr.snapshot()
    for _ in range(every):
        tr.train_step()
    delta = start - tr.snapshot()
    energy = delta.pow(2)
    names = [name for name, p in tr.model.named_parameters() for _ in range(p.numel())]
    out = {}
    for text in texts:
        payload = compress(delta, CompressionSpec.parse(text))
        kept = decompress(payload.header, payload.parts, delta.numel()) != 0
        where: dict[str, int] = {}
        for i in torch.nonzero(kept).flatten().tolist():
            key = names[i].split(".")[0] if not names[i].startswith("blocks") else "blocks"
            where[key] = where.get(key, 0) + 1
        sent = decompress(payload.header, payload.parts, delta.numel())
        out[text] = {"bytes": payload.nbytes, "energy_kept": round(float(energy[kept].sum() / energy.sum()), 3),
                     # what the receivers' vector leaves of the pseudo-gradient (values quantised too)
                     "error": round(float((delta - sent).pow(2).sum() / energy.sum()), 3),
                     "kept_in": {k: round(v / int(kept.sum()), 3) for k, v in where.items()}}
    return out


def central(task_name: str, n: int, steps: int) -> float:
    task = load_task(task_name, shard=0, num_shards=1)
    tr = Trainer(dataclasses.replace(task, batch_size=n * task.batch_size), seed=0)
    for _ in range(steps):
        tr.train_step()
    return tr.evaluate()["test_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="lm-tiny")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="ours")
    ap.add_argument("--every", type=int, default=None, help="H (default: the task's)")
    ap.add_argument("--outer-lr", type=float, default=None)
    ap.add_argument("--outer-momentum", type=float, default=None)
    ap.add_argument("--compression", default=None, help="overrides the variant's")
    ap.add_argument("--rule", default=None, help="overrides the variant's")
    ap.add_argument("--stale", type=float, default=None)
    ap.add_argument("--partners", type=int, default=None)
    ap.add_argument("--sync-every", type=int, default=None)
    ap.add_argument("--dense-rounds", type=int, default=0, help="the first N outer rounds send --dense-compression")
    ap.add_argument("--dense-compression", default="int8")
    ap.add_argument("--consensus", choices=["anchors", "models"], default="anchors",
                    help="what a consensus round mixes: anchors (the daemon) or the peers' live models")
    ap.add_argument("--central", action="store_true", help="also central training on the same samples")
    ap.add_argument("--energy", nargs="+", metavar="SPEC", default=None,
                    help="only: what each compression SPEC keeps of one pseudo-gradient (shard 0, H steps)")
    args = ap.parse_args()
    if args.energy:
        print(json.dumps(energy_split(args.task, args.peers, args.every or 50, args.energy)))
        return
    task = load_task(args.task, shard=0, num_shards=args.peers)
    v = dict(VARIANTS[args.variant])
    for k in ("compression", "rule", "stale", "partners", "sync_every"):
        if getattr(args, k) is not None:
            v[k] = getattr(args, k)
    v["compression"] = v["compression"] or task.compression
    v["sync_every"] = task.outer_sync_every if v["sync_every"] is None else v["sync_every"]
    cfg = dict(task_name=args.task, n=args.peers, steps=args.steps, every=args.every or task.outer_every_steps or 50,
               lr=task.outer_lr if args.outer_lr is None else args.outer_lr,
               momentum=task.outer_momentum if args.outer_momentum is None else args.outer_momentum,
               dense_rounds=args.dense_rounds, dense_compression=args.dense_compression, consensus=args.consensus, **v)
    out = {"variant": args.variant, **cfg, **simulate(**cfg)}
    if args.central:
        out["central_loss"] = round(central(args.task, args.peers, args.steps), 4)
        out["gap_vs_central"] = round(out["final_loss"] / out["central_loss"] - 1, 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
