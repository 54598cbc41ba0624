"""Discovery and partner choice driven by hand-made records and a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import random

from protocols.discovery import PeerRecord, SwarmView
from protocols.gossip import PartnerPicker
from protocols.transport.base import StoredRecord


def rec(peer: str, t: float, step: int = 1, state: str = "up", task: str = "t") -> PeerRecord:
    return PeerRecord(peer_id=peer, addrs=(f"/ip4/1.2.3.4/tcp/1/p2p/{peer}",), task=task, step=step,
                      samples_per_s=10.0, version=step, time=t, state=state)


def stored(r: PeerRecord, exp: float, owner: str | None = None) -> StoredRecord:
    return StoredRecord(owner or r.peer_id, r.to_wire(), exp)


def test_live_peers_expire_without_heartbeats():
    view = SwarmView("me", "t")
    view.update([stored(rec("a", 0), 6), stored(rec("b", 0), 6), stored(rec("me", 0), 6)], now=0)
    assert sorted(i.record.peer_id for i in view.live(now=1)) == ["a", "b"]  # never lists itself
    view.update([stored(rec("a", 4), 10)], now=5)  # only a heartbeats again
    assert [i.record.peer_id for i in view.live(now=7)] == ["a"]
    assert view.live(now=11) == []


def test_the_cached_live_view_follows_every_change():
    """`live` is cached between changes: each way the view changes must show in the next call."""
    view = SwarmView("me", "t")
    view.update([stored(rec("a", 0), 6), stored(rec("b", 0), 9)], now=0)
    ids = lambda now: sorted(view.live_by_id(now))  # noqa: E731
    assert ids(1) == ["a", "b"] and ids(2) == ["a", "b"]  # read twice: the cache
    assert ids(6) == ["b"]  # a's record expired between two reads with no update in between
    view.update([stored(rec("c", 6), 20)], now=6)
    assert ids(6.5) == ["b", "c"]  # a newcomer
    view.drop("b")
    assert ids(6.5) == ["c"]  # dropped (banned) peer
    view.update([stored(rec("c", 7, state="left"), 20)], now=7)
    assert ids(7) == [] and view.live(7) == []  # left
    copy = view.live_by_id(7)
    copy["x"] = None  # a caller's copy cannot change the view
    assert ids(7) == []


def test_left_record_removes_peer_at_once():
    view = SwarmView("me", "t")
    view.update([stored(rec("a", 0), 6)], now=0)
    view.update([stored(rec("a", 1, state="left"), 7)], now=1)
    assert view.live(now=1.5) == []


def test_last_seen_tracks_changes_only():
    view = SwarmView("me", "t")
    view.update([stored(rec("a", 0, step=1), 6)], now=0)
    view.update([stored(rec("a", 0, step=1), 6)], now=3)  # the same record again: not a new sign of life
    assert view.peers["a"].last_seen == 0
    view.update([stored(rec("a", 4, step=9), 10)], now=4)
    assert view.peers["a"].last_seen == 4


def test_older_record_never_replaces_newer():
    view = SwarmView("me", "t")
    view.update([stored(rec("a", 5, step=50), 11)], now=5)
    view.update([stored(rec("a", 1, step=10), 12)], now=6)  # replayed old record
    assert view.peers["a"].record.step == 50


def test_records_signed_by_another_key_are_rejected():
    view = SwarmView("me", "t")
    view.update([stored(rec("a", 0), 6, owner="mallory")], now=0)
    assert view.live(now=1) == []
    assert view.rejected == {"record_owner_mismatch": 1}


def test_malformed_and_foreign_records_are_counted_not_raised():
    view = SwarmView("me", "t")
    bad = [StoredRecord("x", "not a map", 6), StoredRecord("y", {"v": 1, "peer_id": "y"}, 6),
           StoredRecord("z", {**rec("z", 0).to_wire(), "step": "many"}, 6), stored(rec("w", 0, task="other"), 6)]
    view.update(bad, now=0)
    assert view.live(now=1) == []
    assert sum(view.rejected.values()) == 4
    assert view.rejected["record_wrong_task"] == 1


def test_picker_takes_k_distinct_and_is_deterministic():
    peers = [f"p{i}" for i in range(10)]
    a = PartnerPicker(3, rng=random.Random(1)).pick(peers, now=0)
    b = PartnerPicker(3, rng=random.Random(1)).pick(list(reversed(peers)), now=0)
    assert a == b and len(set(a)) == 3
    assert PartnerPicker(5).pick(["x", "y"], now=0).__len__() == 2


def test_picker_backs_off_failed_peers_exponentially():
    picker = PartnerPicker(2, base_backoff=2, max_backoff=10)
    assert picker.failed("bad", now=0) == 2
    assert picker.pick(["bad", "good"], now=1) == ["good"]
    assert sorted(picker.pick(["bad", "good"], now=2.5)) == ["bad", "good"]
    assert picker.failed("bad", now=3) == 4
    assert picker.failed("bad", now=3) == 8
    assert picker.failed("bad", now=3) == 10  # capped
    assert picker.backing_off(now=5) == ["bad"]
    picker.succeeded("bad")
    assert picker.backing_off(now=5) == []


def test_picker_draws_refused_partners_less_and_mixed_ones_back_up():
    peers = [f"p{i}" for i in range(10)]
    picker = PartnerPicker(2, rng=random.Random(0))
    for _ in range(3):
        picker.refused("p3", now=0)
    assert picker.backing_off(now=0) == [] and picker.refusals("p3") == 3
    counts = {p: 0 for p in peers}
    for _ in range(4000):
        for p in picker.pick(peers, now=0):
            counts[p] += 1
    # weight 1/8 against 1 for the other 9: about 1/8 of their draws, never none
    others = sum(counts[p] for p in peers if p != "p3") / 9
    assert 0 < counts["p3"] < 0.2 * others, counts
    picker.succeeded("p3")  # a pull that arrived clears a time back-off, not refusals
    assert picker.refusals("p3") == 3
    for _ in range(5):
        picker.mixed("p3")
    assert picker.refusals("p3") == 0 and "p3" not in picker._state


def test_picker_never_leaves_a_small_swarm_without_partners():
    """Every partner refused many times is still drawn: the rule may refuse honest peers of a
    small swarm now and then, and a round with nobody to pull would isolate this peer."""
    picker = PartnerPicker(2, rng=random.Random(0))
    for p in ("a", "b", "c"):
        for _ in range(20):
            picker.refused(p, now=0)
    assert len(picker.pick(["a", "b", "c"], now=0)) == 2


def test_record_owner_is_the_peer_id_of_the_signing_key(tmp_path):
    from hivemind.dht.crypto import RSASignatureValidator

    from protocols.transport.hivemind import _owner_peer_id, ensure_identity, load_identity_key

    peer_id = ensure_identity(str(tmp_path / "id"))
    assert ensure_identity(str(tmp_path / "id")) == peer_id  # never regenerated
    subkey = RSASignatureValidator(load_identity_key(str(tmp_path / "id"))).local_public_key
    assert _owner_peer_id(subkey) == peer_id
    assert _owner_peer_id(b"[owner:garbage]") is None and _owner_peer_id("str") is None


def test_views_of_a_run_larger_than_their_bound_fill_with_different_peers():
    """Every view admits newcomers in its own order: with more publishers than room, two views
    hold different sets (not the same first publishers), and a view's order cannot be predicted
    from the ids alone."""
    from protocols.discovery import PeerRecord, SwarmView
    from protocols.transport.base import StoredRecord

    records = [StoredRecord(f"p{i:03d}", PeerRecord(f"p{i:03d}", (), "t", 1, 1.0, 1, 0.0).to_wire(), 30.0)
               for i in range(300)]
    views = [SwarmView(f"v{j}", "t", max_peers=50) for j in range(2)]
    for v in views:
        v.update(records, now=0.0)
        assert len(v.peers) == 50 and v.rejected["view_full"] == 250
    first = {r.owner for r in records[:50]}
    assert set(views[0].peers) != set(views[1].peers)
    assert set(views[0].peers) != first and set(views[1].peers) != first
    # a peer already in the view keeps its place when the next lookup comes
    kept = set(views[0].peers)
    views[0].update(records, now=1.0)
    assert set(views[0].peers) == kept
