"""Outer rounds over the network: the part of the daemon that runs DiLoCo-style outer steps.

Every H inner steps a round publishes our compressed pseudo-gradient (partners pull it with
`get_delta`), pulls the partners' newest ones, mixes the candidate models `anchor − Δ_j` with the
robust rule and takes the Nesterov outer step; every `sync_every`-th round is a consensus round
that mixes partners' anchors instead. The decisions are `peer/outer.py`'s (`OuterLoop`) and the
core's; this file only moves bytes and runs the heavy tensor work in worker threads. Design and
figures: docs/architecture.md, "Outer steps, compression and capped links".

`OuterRounds` is a part of `PeerDaemon` (peer/daemon.py), kept in its own file because it is a
role of its own; it uses the daemon's trainer, core, transfers, behaviour, transport, counters
and its pull and mix helpers (`_pulled`, `_pull_checked`, `_receive_into`, `_mix`,
`_adopt_swarm_step`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from peer.config import PeerConfig
from peer.outer import OuterLoop, OuterSettings, Published
from protocols import gossip
from protocols.codec import write_header
from protocols.compression import CompressionSpec, compress


class OuterRounds:
    """The outer-round half of `PeerDaemon`: its state (`outer`, `published`, `served_anchor`)
    is None or unused when the task gossips whole models (`outer_every_steps` 0)."""

    def _setup_outer(self, config: PeerConfig) -> None:
        # settings checked here, so bad values stop the start
        every = config.outer_every_steps if config.outer_every_steps is not None else self.task.outer_every_steps
        self.outer_settings = OuterSettings(
            every, self.task.outer_lr if config.outer_lr is None else config.outer_lr,
            self.task.outer_momentum if config.outer_momentum is None else config.outer_momentum,
            self.task.outer_sync_every if config.outer_sync_every is None else config.outer_sync_every)
        self.compression = CompressionSpec.parse(config.compression or self.task.compression)
        self.outer = OuterLoop(self.outer_settings, self.compression, self.trainer.flat) if self.outer_settings.enabled else None
        self.published: Published | None = None  # what partners pull from us with outer steps
        # (step, anchor) served to `get_model` with outer steps: consensus rounds and joiners
        self.anchor_compression = CompressionSpec.parse(config.outer_anchor_compression)
        if self.anchor_compression.method.startswith("topk"):
            raise ValueError(f"outer-anchor-compression {config.outer_anchor_compression!r}: anchors need a dense method (fp32, fp16, bf16, int8)")
        self.served_anchor = (0, compress(self.outer.anchor, self.anchor_compression)) if self.outer is not None else None

    async def outer_round(self) -> bool | None:
        """One outer round: publish our compressed pseudo-gradient, pull the partners' newest ones,
        mix them robustly, take the outer step. True if a partner was mixed in, None if there was
        nobody to ask, False if nobody delivered. With no partner the outer step uses our own
        pseudo-gradient alone (DiLoCo with one worker)."""
        async with self._round_lock:
            outer = self.outer
            started = time.monotonic()
            # every stage that changes outer state runs in a worker thread, which a cancellation
            # cannot stop: each is shielded, and a failed or cancelled round waits for it
            # the snapshot too: it waits for the trainer's step in progress, which the event loop must not
            beginning = asyncio.ensure_future(asyncio.to_thread(lambda: outer.begin(self.trainer.snapshot(), self.trainer.step)))
            try:
                rnd = await asyncio.shield(beginning)
            except asyncio.CancelledError:
                rnd = await beginning
                self.trainer.apply_delta(outer.finish(rnd, rnd.own_model))
                raise
            self.published = rnd.published()
            own_model = rnd.own_model  # anchor − sent: our candidate, the rule's centre
            try:
                return await self._outer_round(rnd, own_model, started)
            except BaseException:
                await self._settle(rnd, own_model)
                raise

    async def _settle(self, rnd, own_model: torch.Tensor) -> None:
        """Complete a round that failed or was cancelled part way, so that the live model and the
        anchor stay consistent (a final checkpoint saves them): the outer step on our own
        pseudo-gradient alone, unless the round's step was already taken."""
        outer = self.outer
        if rnd.finishing is not None:
            if not rnd.applied:
                self.trainer.apply_delta(await rnd.finishing)
                rnd.applied = True
            return
        if rnd.stepping is not None:  # a consensus round: our own step is taken (or being taken)
            await rnd.stepping
            self.trainer.apply_delta(outer.change(rnd, own_model))
        else:
            self.trainer.apply_delta(outer.finish(rnd, own_model))
        rnd.applied = True

    async def _outer_round(self, rnd, own_model: torch.Tensor, started: float) -> bool | None:
        outer = self.outer
        sync = outer.sync_due(rnd.outer_step)
        if not self.behaviour.honest:
            self.behaviour.round_start(own_model.clone(), self.trainer.history())
            self._round_base = (outer.anchor.clone(), own_model.clone())
        if sync:  # a consensus round: our own pseudo-gradient alone, then the anchors are mixed
            rnd.stepping = asyncio.ensure_future(asyncio.to_thread(outer.step, own_model))
            await asyncio.shield(rnd.stepping)
        computed = time.monotonic()
        now = self.transport.now()
        live, partners = self.core.choose_partners(now, self.behaviour.avoid)
        ids: list[str] = []
        steps: list[int] = []  # each mixed partner's (inner) step
        weights: list[float] = []  # the rule's weight for each
        models: list[torch.Tensor] = []
        staleness: list[int] = []
        if not partners:
            self.counters["rounds_no_partner"] += 1
        elif sync:
            into = self._receive_into(own_model, len(partners))
            pulled = await asyncio.gather(*(self._pull_checked(p, list(live[p].record.addrs), outer.anchor, buf, len(partners))
                                            for p, buf in zip(partners, into)))
            for p, got in zip(partners, pulled):
                if got is not None:
                    ids.append(p)
                    steps.append(got[0])
                    models.append(got[1])
        else:
            into = self._receive_into(own_model, len(partners))
            pulled = await asyncio.gather(*(
                self._pulled(p, self.transfers.pull_delta(p, list(live[p].record.addrs), self.core.outer_seen.get(p, -1), buf, len(partners)),
                             quiet_ok=True)
                for p, buf in zip(partners, into)))
            for p, got in zip(partners, pulled):
                if got is None:
                    continue
                their_outer, their_step, delta = got
                self.core.remember_outer(p, their_outer)
                model = outer.as_model(delta)
                if self.core.accept(p, own_model, model, self.transport.now()):
                    ids.append(p)
                    steps.append(their_step)
                    models.append(model)
                    staleness.append(rnd.outer_step - their_outer)
        if partners and not ids:
            self.counters["rounds_failed"] += 1
        transferred = time.monotonic()
        if ids:
            self.behaviour.observe(ids, models)
        report: dict[str, Any] = {"partners": [], "weights": [], "tau": None}
        if sync:
            if ids:
                result, report = await self._mix(outer.anchor, ids, models, now)
                weights = result.weights
                outer.adopt(result.model)
            rnd.finishing = asyncio.ensure_future(asyncio.to_thread(outer.change, rnd, own_model))
        else:
            mixed = own_model
            if ids:
                result, report = await self._mix(own_model, ids, models, now)
                weights, mixed = result.weights, result.model
            rnd.finishing = asyncio.ensure_future(asyncio.to_thread(outer.finish, rnd, mixed))
        change = await asyncio.shield(rnd.finishing)
        self.trainer.apply_delta(change)
        rnd.applied = True
        self.served_anchor = (self.trainer.step, await asyncio.to_thread(compress, outer.anchor, self.anchor_compression))
        done = time.monotonic()
        self.core.last_round = {**report, "outer_step": rnd.outer_step, "kind": "anchors" if sync else "pseudo-gradients",
                                "staleness": staleness, "seconds": {
            "compute": round(computed - started, 3), "transfer": round(transferred - computed, 3),
            "aggregate": round(done - transferred, 3)}}
        if ids:  # last: a step adopted here may end training (max_steps), and the round is complete
            self._adopt_swarm_step(steps, weights)
        return bool(ids) if partners else None

    async def _serve_delta(self, stream, header: dict[str, Any]) -> None:
        """Send our newest published pseudo-gradient, or say there is none newer than `since`."""
        if self.outer is None:  # a settings mismatch, not a transient state: not a quiet reply
            await write_header(stream, gossip.error_header("no_outer_steps"))
            return
        published = self.published
        if published is None:
            await write_header(stream, gossip.error_header("not_ready"))
            return
        # `since` is the outer step of ours the requester mixed last; one above ours means we
        # restarted from an older checkpoint, and what we have is new to it
        if published.outer_step == header["since"]:
            await write_header(stream, gossip.error_header("not_newer"))
            return
        payload = published.payload
        if not self.behaviour.honest and self._round_base is not None:
            anchor, base = self._round_base
            crafted = self.behaviour.serve(stream.remote_peer, base.clone())
            payload = await asyncio.to_thread(compress, anchor - crafted, self.outer.compression)
        await write_header(stream, gossip.delta_header(published.outer_step, published.step, payload.header, payload.specs))
        await self.transfers.send_sized(stream, payload.parts, payload.nbytes, self.core.serving)
        self.stats.served_bytes["pseudo_gradients"] += payload.nbytes

    def _outer_status(self) -> dict[str, Any] | None:
        """Outer-step settings and what the last published pseudo-gradient cost on the wire."""
        if self.outer is None:
            return None
        published = self.published
        numel = self.specs[0].numel
        return {"every_steps": self.outer_settings.every_steps, "lr": self.outer_settings.lr,
                "momentum": self.outer_settings.momentum, "outer_step": self.outer.outer_step,
                "compression": self.compression.describe(),
                "wait_for_round": self.config.outer_wait_for_round,
                "round_wait_s": round(self.trainer.round_wait_seconds, 1),
                "payload_bytes": published.payload.nbytes if published else None,
                "compression_ratio": round(4 * numel / max(published.payload.nbytes, 1), 1) if published else None}
