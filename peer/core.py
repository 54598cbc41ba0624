"""PeerCore: one peer's decisions, without I/O.

Everything the daemon decides lives here, as calls that take inputs and `now` and return results:
what the swarm view is (`records`), whom to pull (`choose_partners`), what a failed, quiet or
malformed pull costs (`pull_failed`, `nothing_new`, `accept`), what the round's models become
(`round_context`, `aggregate`, `mixed`), whether to take the swarm's step (`adopted_step`),
whether to serve a requester (`admit`, `serve_failed`), and what status says about all of it
(`status`). `peer/daemon.py` does the I/O and forwards with `now=transport.now()`; the
simulator (`peer/sim/`) drives many cores on a virtual clock; tests drive one with hand-made
inputs and a fake clock.

Nothing here opens a socket, starts a thread or sleeps. `aggregate` is the one CPU-heavy call
(the loss probe's forward passes and the rule): the daemon runs it in a worker thread, and it
touches nothing the other calls read, so the event loop may go on meanwhile.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from peer.aggregation import RoundContext, make_aggregator
from peer.aggregation.rules import Mix
from peer.config import PeerConfig
from peer.validation import reject_reason
from protocols import gossip
from protocols.discovery import PeerInfo, SwarmView
from protocols.loglimit import LogLimiter
from protocols.reputation import Reputation

log = logging.getLogger("peer.core")

# Reasons that mean the partner sent something wrong (counted as rejected updates), as opposed
# to a network failure (counted as failed pulls).
NETWORK_FAILURES = {"timeout", "unreachable", "disconnected", "remote_error"}
# remote errors that say a partner has nothing new for us: not failures (no back-off, no penalty)
QUIET_REPLIES = ("not_newer", "not_ready")
# peers remembered per bounded table (distrusted counts, outer steps seen): an attacker with many
# identities must not grow them without bound
MAX_TRACKED = 1024


def reputation_event(reason: str) -> str:
    """The reputation event for a counted failure reason (network trouble costs less than garbage)."""
    if reason in ("timeout", "unreachable", "disconnected"):
        return reason
    if reason == "remote_error":
        return "busy"  # it answered, politely, that it will not serve us now
    return "malformed"


def adopted_step(own: int, steps: Sequence[int], weights: Sequence[float]) -> int | None:
    """The swarm's step to take after a mix, or None: the lower median of our step and the steps
    of the partners the rule mixed (`weights`: the rule's weight per partner; empty from a
    server-style rule, which weighs no partner: then all count).

    A peer restarted from an old checkpoint mixes the swarm's model back in within a few rounds,
    but its step, and with it the learning-rate schedule and the cadence's phase, would stay
    behind for good. Our own step counts in the median, so a later step is taken only when most
    partners are ahead, and never beyond what one of them mixed in claims: an attacker announcing
    step 10^9 moves nothing unless it is most of the round."""
    if len(weights) == len(steps):
        steps = [s for s, w in zip(steps, weights) if w > 0]
    if not steps:
        return None
    values = sorted([own, *steps])
    target = values[(len(values) - 1) // 2]
    return target if target > own else None


def progress(step: int, max_steps: int | None, steps_per_s: float) -> dict[str, Any] | None:
    """Progress toward `--max-steps` for `peer status`: the fraction done and the seconds left at
    the current rate (None while the rate is unknown); None with no target."""
    if not max_steps:
        return None
    done = min(1.0, step / max_steps)
    left = max(0, max_steps - step)
    eta = round(left / steps_per_s, 1) if steps_per_s > 0 else (0.0 if left == 0 else None)
    return {"target_steps": max_steps, "done": round(done, 4), "eta_s": eta}


@dataclass
class Stats:
    """Everything a peer counts, by kind; `peer status` and the metrics show it."""

    # rounds, bytes (CountingStream adds to bytes_sent / bytes_received), serves, checkpoints
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys((
        "rounds_ok", "rounds_failed", "rounds_no_partner", "bytes_sent", "bytes_received", "serves",
        "serve_refused", "checkpoints", "checkpoint_errors", "steps_adopted"), 0))
    rejected: Counter = field(default_factory=Counter)  # updates refused by validation or the protocol, by reason
    pull_failed: Counter = field(default_factory=Counter)  # network failures, by reason
    pull_skipped: Counter = field(default_factory=Counter)  # partners with nothing new for us (not failures)
    serve_errors: Counter = field(default_factory=Counter)  # serves refused or failed, by reason
    refused: Counter = field(default_factory=Counter)  # partners the rule left unmixed, by why
    # payload bytes we served, by what they were: where a run's upload goes
    served_bytes: dict[str, int] = field(default_factory=lambda: {"pseudo_gradients": 0, "anchors": 0, "models": 0})


def _finite(x: float | None) -> float | None:
    """A number for status JSON: rounded, and None where it is not finite (JSON has no inf/nan)."""
    return round(x, 3) if x is not None and math.isfinite(x) else None


class PeerCore:
    """One peer's view of the swarm, its partners' standing, and the rule that mixes them."""

    def __init__(self, peer_id: str, config: PeerConfig, task_name: str, aggregator: str | None = None,
                 allowed: frozenset[str] | None = None):
        self.peer_id, self.config, self.task_name = peer_id, config, task_name
        self.aggregator = make_aggregator(aggregator or config.aggregator)
        self.allowed = allowed  # None: an open run
        self.view = SwarmView(peer_id, task_name, allowed=allowed)
        self.reputation = Reputation()
        self.picker = gossip.PartnerPicker(config.partners, rng=random.Random(peer_id))
        self.peer_log = LogLimiter(log)  # lines about peers' misbehaviour, at most 1/min per peer and reason
        self.stats = Stats()
        self.distrusted: dict[str, int] = {}  # peer id -> rounds the rule refused its model
        self.outer_seen: dict[str, int] = {}  # partner -> its outer step we pulled last
        self.last_round: dict[str, Any] = {}
        self.serving = 0
        self.serving_by_peer: dict[str, int] = {}

    # --- the swarm view ------------------------------------------------------------------------
    def records(self, stored: Iterable, now: float) -> list[PeerInfo]:
        """A DHT lookup of the run key, into the view; returns the live peers. Records only a liar
        publishes (malformed, signed by another key) cost their owner reputation; a wrong task or
        a closed run's admission is a setting, not a lie, and costs nothing."""
        refused = self.view.update(stored, now, banned=frozenset(self.reputation.banned_peers(now)))
        for owner, reason in refused:
            if reason == "record_wrong_task" and owner is not None:
                self.peer_log.info((owner, reason), "peer %s of run %s trains task %r, this peer %r: ignoring it "
                                   "(every peer of a run needs the same --task; a task's name carries its data's digest)",
                                   owner[:12], self.config.run_id, self.view.other_tasks.get(owner, "?"), self.task_name)
            if owner is not None and owner != self.peer_id and reason.startswith(("malformed_record", "record_owner_mismatch")):
                self.penalise(owner, "bad_record", reason, now)
        live = self.view.live(now)
        other = sorted({self.view.other_tasks.get(o, "?") for o, r in refused if r == "record_wrong_task"})
        if other and not live:  # every peer of the run trains another task: say so, once a minute
            self.peer_log.info(("wrong_task",), "run %s trains task %s, you asked for %s: no peer here trains "
                               "yours; restart with --task %s to join the run, or pick another --run-id",
                               self.config.run_id, " and ".join(other), self.task_name, other[0])
        return live

    def reported_sketches(self, now: float) -> dict[str, torch.Tensor]:
        """History sketches of every live peer whose record carries one (checked when parsed)."""
        return {i.record.peer_id: torch.frombuffer(bytearray(i.record.history), dtype=torch.float16).float()
                for i in self.view.live(now) if i.record.history}

    def choose_partners(self, now: float, avoid: frozenset[str] = frozenset()) -> tuple[dict[str, PeerInfo], list[str]]:
        """The live, unbanned peers not in `avoid` (id -> view entry) and this round's partners among them."""
        live = self.view.live_by_id(now)  # a round at 1,000 peers: O(banned + avoided) here, not O(view)
        for p in (*self.reputation.banned_peers(now), *avoid):
            live.pop(p, None)
        return live, self.picker.pick(list(live), now)

    # --- pulls ---------------------------------------------------------------------------------
    def penalise(self, peer_id: str, event: str, reason: str, now: float) -> None:
        """Lower a peer's reputation; a banned peer leaves our view and is refused service."""
        before = self.reputation.bans_total
        if self.reputation.penalise(peer_id, event, now):
            self.view.drop(peer_id)
            if self.reputation.bans_total > before:
                log.warning("banned %s for %.0fs (last: %s)", peer_id[:12], self.reputation.banned_peers(now).get(peer_id, 0), reason)

    def pull_failed(self, peer_id: str, reason: str, now: float) -> float:
        """A pull that ended in `reason`: counted, backed off, penalised. Returns the back-off in seconds."""
        (self.stats.pull_failed if reason in NETWORK_FAILURES else self.stats.rejected)[reason] += 1
        delay = self.picker.failed(peer_id, now)
        self.penalise(peer_id, reputation_event(reason), reason, now)
        return delay

    def nothing_new(self, peer_id: str, detail: str, now: float) -> None:
        """A partner with nothing newer for us: no reputation cost, but a back-off like a failure,
        so that a partner that never has anything new does not hold a slot every round."""
        self.stats.pull_skipped[detail] += 1
        self.picker.failed(peer_id, now)

    def accept(self, peer_id: str, own: torch.Tensor, model: torch.Tensor, now: float) -> bool:
        """Whether a received model (or candidate model, with outer steps) may reach the rule."""
        reason = reject_reason(own, model)
        if reason is not None:
            self.stats.rejected[reason] += 1
            self.picker.failed(peer_id, now)
            self.penalise(peer_id, "rejected_update", reason, now)
            log.info("rejected model from %s: %s", peer_id[:12], reason)
            return False
        self.view.mark_proven(peer_id)
        return True  # earns reputation only once the rule mixes it (`mixed`)

    def remember_outer(self, peer_id: str, outer_step: int) -> None:
        """The partner's outer step we pulled last (sent back as `since`); bounded."""
        if peer_id not in self.outer_seen and len(self.outer_seen) >= 4 * MAX_TRACKED:
            self.outer_seen.pop(next(iter(self.outer_seen)))
        self.outer_seen[peer_id] = outer_step

    # --- mixing --------------------------------------------------------------------------------
    def round_context(self, ids: list[str], now: float) -> RoundContext:
        """What the rule may know this round; the swarm's sketches are decoded only for a rule that reads them."""
        sketches = self.reported_sketches(now) if self.aggregator.uses_sketches else {}
        return RoundContext(self_id=self.peer_id, partner_ids=ids, sketches=sketches,
                            byzantine_fraction=self.config.byzantine_fraction)

    def aggregate(self, own: torch.Tensor, models: list[torch.Tensor], ctx: RoundContext, probe=None,
                  out: torch.Tensor | None = None) -> tuple[Mix, Any]:
        """The round's CPU work: the loss probe's forward passes (`probe`, a peer.loss_probe.LossProbe
        or None), then the rule. Returns the rule's result and the probe to use from now on: a
        probe that cannot run on the task (a user task, say) is dropped with one logged line,
        rather than failing every round."""
        if probe is not None:
            try:
                ctx.own_loss, ctx.loss_deltas = probe.measure(own, models)
                ctx.untrained_loss = probe.untrained_loss
            except Exception as e:
                log.warning("loss probe failed (%s: %s); mixing without the loss screen from now on", type(e).__name__, str(e)[:120])
                probe = None
        return self.aggregator(own, models, ctx, out=out), probe

    def mixed(self, result: Mix, ctx: RoundContext, now: float) -> dict[str, Any]:
        """What a finished mix teaches: refusals counted by why, distrusted partners drawn less
        often and penalised, mixed partners drawn more often and rewarded. Returns the round's
        report for `peer status`, which the caller stores in `last_round` once the whole round is
        over (status never shows a round half done)."""
        ids = list(ctx.partner_ids)
        distrusted = set(result.distrusted)
        for why in result.refused.values():
            self.stats.refused[why] += 1
        for p in ids:
            self.picker.succeeded(p)  # the pull arrived
            if p in distrusted:
                if p not in self.distrusted and len(self.distrusted) >= MAX_TRACKED:
                    self.distrusted.pop(min(self.distrusted, key=self.distrusted.get))
                self.distrusted[p] = self.distrusted.get(p, 0) + 1
                self.picker.refused(p, now)  # drawn half as often
                self.penalise(p, "distrusted", "refused by the aggregation rule", now)
            elif p not in result.refused:
                # the reward comes here, not when the pull validated: a partner the rule
                # refuses every round then only loses score and is banned, where a bonus
                # for each valid pull cancelled each refusal's penalty
                self.picker.mixed(p)
                self.reputation.reward(p, now)
        self.stats.counters["rounds_ok"] += 1
        report = {"partners": ids, "weights": [round(w, 3) for w in result.weights], "tau": result.radius,
                  "sybil_checks": {p[:12]: {k: _finite(v) for k, v in f.items()} for p, f in result.checks.items()}}
        if ctx.loss_deltas is not None:
            report["loss_deltas"] = [_finite(d) for d in ctx.loss_deltas]
            report["own_loss"] = _finite(ctx.own_loss)
        return report

    # --- serving -------------------------------------------------------------------------------
    def admit(self, remote: str, now: float) -> str | None:
        """Why a request from `remote` is refused before its request is read, or None to serve it
        (then `serve_started` / `serve_ended` around the serve). Refusing costs us nothing."""
        refusal = None
        if self.allowed is not None and remote not in self.allowed:
            refusal = "not_admitted"
        elif self.reputation.banned(remote, now):
            refusal = "banned"
        elif self.serving_by_peer.get(remote, 0) >= self.config.max_serves_per_peer:
            refusal = "busy"
            self.penalise(remote, "flood", "too many concurrent requests", now)
        elif self.serving >= self.config.max_concurrent_serves:
            refusal = "busy"
        if refusal is not None:
            self.stats.counters["serve_refused"] += 1
            self.stats.serve_errors[f"refused_{refusal}"] += 1
        return refusal

    def serve_started(self, remote: str) -> None:
        self.serving += 1
        self.serving_by_peer[remote] = self.serving_by_peer.get(remote, 0) + 1

    def serve_ended(self, remote: str) -> None:
        self.serving -= 1
        left = self.serving_by_peer.get(remote, 1) - 1
        if left > 0:
            self.serving_by_peer[remote] = left
        else:
            self.serving_by_peer.pop(remote, None)

    def serve_failed(self, remote: str, reason: str, now: float, malformed: bool = False) -> None:
        """A serve that failed: a malformed request costs its sender; a send that timed out may be
        our own slow uplink's doing and costs nobody."""
        self.stats.serve_errors[reason] += 1
        if malformed:
            self.penalise(remote, "malformed", reason, now)
        elif reason != "timeout":
            self.penalise(remote, reputation_event(reason), reason, now)

    # --- status --------------------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        """The decision state `peer status` shows (the daemon adds the trainer's and the link's)."""
        r = self.last_round
        tau = r.get("tau")
        return {
            "backing_off": self.picker.backing_off(now),
            "serves": self.stats.counters["serves"], "serve_refused": self.stats.counters["serve_refused"],
            "serve_errors": dict(self.stats.serve_errors),
            "record_rejects": dict(self.view.rejected),
            "reputation": self.reputation.summary(now),
            "banned": self.reputation.banned_peers(now),
            "closed_run": self.allowed is not None,
            "last_round": {"partners": r.get("partners", []), "weights": r.get("weights", []),
                           "clip_radius": None if tau is None or tau == float("inf") else round(float(tau), 4),
                           "loss_deltas": r.get("loss_deltas"), "own_loss": r.get("own_loss"),
                           "sybil_checks": r.get("sybil_checks"), "outer_step": r.get("outer_step"), "kind": r.get("kind"),
                           "staleness": r.get("staleness"), "seconds": r.get("seconds")},
            "distrusted": dict(sorted(self.distrusted.items(), key=lambda kv: -kv[1])[:32]),
            "refused": dict(self.stats.refused),
            "pull_skipped": dict(self.stats.pull_skipped),
        }
