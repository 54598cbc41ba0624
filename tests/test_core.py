"""PeerCore driven by hand: records, pulls, mixes and serves in, decisions out; a fake clock,
no daemon, no transport, no model beyond a few-coordinate vector."""

from __future__ import annotations

import torch

from peer.aggregation.rules import Mix
from peer.config import PeerConfig
from peer.core import PeerCore, adopted_step
from protocols.discovery import PeerRecord
from protocols.transport.base import StoredRecord

TASK = "digits-mlp"


def core(tmp_path, **settings) -> PeerCore:
    cfg = PeerConfig(data_dir=tmp_path, run_id="run", task=TASK, **settings)
    return PeerCore("me", cfg, TASK)


def stored(peer: str, now: float, task: str = TASK, **fields) -> StoredRecord:
    rec = PeerRecord(peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), task=task, step=fields.pop("step", 1),
                     samples_per_s=1.0, version=1, time=now, **fields)
    return StoredRecord(owner=peer, value=rec.to_wire(), expiration=now + 30)


def test_records_make_the_view_and_a_forged_record_costs_its_signer(tmp_path):
    c = core(tmp_path)
    now = 1000.0
    forged = StoredRecord(owner="liar", value=PeerRecord("someone-else", (), TASK, 1, 1.0, 1, now).to_wire(),
                          expiration=now + 30)
    live = c.records([stored("a", now), stored("b", now), stored("other", now, task="mnist1d-cnn"), forged], now)
    assert sorted(i.record.peer_id for i in live) == ["a", "b"]
    assert c.view.rejected == {"record_wrong_task": 1, "record_owner_mismatch": 1}
    assert c.reputation.score("liar", now) < c.reputation.score("other", now) == 1.0  # a wrong task is a setting
    assert c.records([], now + 100) == []  # records expire with the clock


def test_partners_come_from_the_live_unbanned_peers_not_avoided(tmp_path):
    c = core(tmp_path, partners=3)
    now = 1000.0
    c.records([stored(p, now) for p in "abcd"], now)
    live, partners = c.choose_partners(now, avoid=frozenset({"d"}))
    assert set(live) == {"a", "b", "c"} and sorted(partners) == ["a", "b", "c"]
    for _ in range(5):  # malformed payloads until banned
        c.pull_failed("a", "bad_header", now)
    assert c.reputation.banned("a", now) and c.stats.rejected["bad_header"] == 5
    _, partners = c.choose_partners(now + 1)
    assert "a" not in partners


def test_a_pull_failure_is_counted_by_kind_and_backed_off(tmp_path):
    c = core(tmp_path)
    now = 1000.0
    delay = c.pull_failed("a", "timeout", now)
    assert delay > 0 and c.stats.pull_failed == {"timeout": 1} and not c.stats.rejected
    assert "a" in c.picker.backing_off(now)
    c.nothing_new("b", "not_newer", now)  # nothing new is no failure: no reputation cost
    assert c.stats.pull_skipped == {"not_newer": 1} and c.reputation.score("b", now) == 1.0


def test_accept_refuses_a_non_finite_model_and_rewards_a_good_one(tmp_path):
    c = core(tmp_path)
    now = 1000.0
    own = torch.zeros(8)
    assert not c.accept("bad", own, torch.full((8,), float("nan")), now)
    assert c.stats.rejected == {"non_finite": 1} and c.reputation.score("bad", now) < 1.0
    assert c.accept("good", own, torch.ones(8), now)


def test_a_partner_the_rule_refuses_every_round_is_banned_though_each_pull_validates(tmp_path):
    """A valid pull earns nothing by itself: only a mixed partner is rewarded. Otherwise the
    reward for each valid pull cancels each refusal's penalty and a partner refused on every
    round is never banned; one mixed every other round keeps its standing."""
    c = core(tmp_path)
    now, own = 1000.0, torch.zeros(4)
    for r in range(40):
        now += 1.0
        for p in ("always", "sometimes"):
            assert c.accept(p, own, torch.ones(4), now)
        refused = {"always": "sybil"} | ({"sometimes": "sybil"} if r % 2 else {})
        result = Mix(torch.zeros(4), weights=[0.0 if p in refused else 0.5 for p in ("always", "sometimes")],
                     refused=refused, distrusted=list(refused), radius=1.0)
        c.mixed(result, c.round_context(["always", "sometimes"], now), now)
    assert c.reputation.banned("always", now) and not c.reputation.banned("sometimes", now)
    assert c.reputation.score("sometimes", now) > 0.5


def test_mixed_counts_refusals_and_penalises_only_the_distrusted(tmp_path):
    c = core(tmp_path)
    now = 1000.0
    ctx = c.round_context(["a", "b", "c"], now)
    result = Mix(torch.zeros(4), weights=[0.5, 0.0, 0.0], refused={"b": "loss", "c": "outlier"}, distrusted=["c"], radius=2.0)
    c.last_round = c.mixed(result, ctx, now)  # the caller stores it once the round is over
    assert c.stats.refused == {"loss": 1, "outlier": 1} and c.distrusted == {"c": 1}
    assert c.picker.backing_off(now) == [] and c.reputation.score("b", now) == 1.0 > c.reputation.score("c", now)
    # only the distrusted partner is drawn less; the loss screen's cut is not held against it
    assert c.picker.refusals("c") == 1 and c.picker.refusals("b") == 0 == c.picker.refusals("a")
    status = c.status(now)
    assert status["last_round"]["partners"] == ["a", "b", "c"] and status["last_round"]["clip_radius"] == 2.0
    assert status["refused"] == {"loss": 1, "outlier": 1} and c.stats.counters["rounds_ok"] == 1


def test_aggregate_runs_the_configured_rule_and_drops_a_probe_that_fails(tmp_path):
    c = core(tmp_path, aggregator="mean")
    own, others = torch.zeros(4), [torch.ones(4), 3 * torch.ones(4)]

    class Broken:
        untrained_loss = 1.0

        def measure(self, own, models):
            raise RuntimeError("no probe batch for this task")

    result, probe = c.aggregate(own, others, c.round_context(["a", "b"], 0.0), probe=Broken())
    assert probe is None and torch.equal(result.model, torch.full((4,), 4 / 3))


def test_serving_admits_within_the_limits_and_refuses_floods_and_bans(tmp_path):
    c = core(tmp_path, max_serves_per_peer=1, max_concurrent_serves=2)
    now = 1000.0
    assert c.admit("a", now) is None
    c.serve_started("a")
    assert c.admit("a", now) == "busy"  # a second stream from the same peer: a flood, penalised
    assert c.reputation.score("a", now) < 1.0
    assert c.admit("b", now) is None
    c.serve_started("b")
    assert c.admit("c", now) == "busy"  # every slot taken
    c.serve_ended("a")
    c.serve_ended("b")
    assert c.serving == 0 and not c.serving_by_peer
    c.serve_failed("d", "timeout", now)  # our own slow uplink may be the cause: no cost
    assert c.reputation.score("d", now) == 1.0 and c.stats.serve_errors["timeout"] == 1
    assert c.stats.serve_errors["refused_busy"] == 2 and c.stats.counters["serve_refused"] == 2


def test_closed_run_refuses_strangers(tmp_path):
    cfg = PeerConfig(data_dir=tmp_path, run_id="run", task=TASK)
    c = PeerCore("me", cfg, TASK, allowed=frozenset({"friend"}))
    assert c.admit("stranger", 0.0) == "not_admitted" and c.admit("friend", 0.0) is None
    assert c.status(0.0)["closed_run"] is True


def test_adopted_step_is_the_lower_median_of_ours_and_the_mixed_partners():
    assert adopted_step(100, [10**9], [0.3]) is None  # one partner alone is not the swarm
    assert adopted_step(100, [500, 10**9], [0.3, 0.0]) is None  # the rule refused the second
    assert adopted_step(100, [500, 10**9], [0.3, 0.3]) == 500
    assert adopted_step(500, [200, 300], [0.3, 0.3]) is None  # never backwards
    assert adopted_step(100, [500, 600], []) == 500  # a server-style rule weighs nobody: all count


def test_progress_toward_max_steps_and_its_eta():
    from peer.core import progress

    assert progress(50, None, 10.0) is None  # no target, nothing to show
    assert progress(50, 200, 10.0) == {"target_steps": 200, "done": 0.25, "eta_s": 15.0}  # 150 steps at 10/s
    assert progress(50, 200, 0.0)["eta_s"] is None  # no rate yet
    assert progress(250, 200, 0.0) == {"target_steps": 200, "done": 1.0, "eta_s": 0.0}


def test_samples_per_second_is_smoothed_across_windows():
    from peer.trainer import RATE_SMOOTHING, smoothed_rate

    assert smoothed_rate(0.0, 500.0) == 500.0  # the first window as is
    rate = 500.0
    for _ in range(3):  # one slow window (an evaluation took the CPU) moves the figure by a share only
        rate = smoothed_rate(rate, 100.0 if _ == 0 else 500.0)
    assert abs(rate - (500 - 400 * RATE_SMOOTHING * (1 - RATE_SMOOTHING) ** 2)) < 1e-9
    assert smoothed_rate(500.0, 100.0) > 300.0
