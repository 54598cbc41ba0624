"""Hostile network, without sockets: reputation and bans, the bounded swarm view, DHT record checks,
closed runs, and hypothesis fuzzing of every decoder and handler a stranger can reach."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from peer.bench import fuzz_targets as ft
from peer.config import load_allowed_peers
from protocols.codec import ProtocolError
from protocols.discovery import MAX_RECORD_TTL_S, PeerRecord, SwarmView
from protocols.reputation import Reputation
from protocols.transport.base import StoredRecord


def rec(peer: str, t: float = 0.0, host: str = "1.2.3.4", task: str = "t") -> PeerRecord:
    return PeerRecord(peer, (f"/ip4/{host}/tcp/1/p2p/{peer}",), task, 1, 1.0, 1, t)


def stored(r: PeerRecord, exp: float = 10.0, owner: str | None = None) -> StoredRecord:
    return StoredRecord(owner or r.peer_id, r.to_wire(), exp)


# --- reputation ---------------------------------------------------------------------------------
def test_garbage_bans_quickly_network_trouble_slowly():
    rep = Reputation()
    assert [rep.penalise("liar", "malformed", now=0) for _ in range(3)] == [False, False, True]
    assert rep.banned("liar", now=1) and "liar" in rep.banned_peers(now=1)
    # timeouts cost little: an honest peer on a bad link survives many
    assert not any(rep.penalise("slow", "timeout", now=0) for _ in range(9))
    assert not rep.banned("slow", now=0)


def test_ban_expires_and_repeat_bans_grow():
    rep = Reputation(ban_s=60)
    for _ in range(3):
        rep.penalise("p", "malformed", now=0)
    assert rep.banned("p", now=59) and not rep.banned("p", now=61)
    # back after the ban with half a score: two more lies ban it again, for twice as long
    rep.penalise("p", "malformed", now=61)
    assert rep.penalise("p", "malformed", now=61)
    assert rep.banned("p", now=61 + 119) and not rep.banned("p", now=61 + 121)


def test_scores_recover_with_time_and_success():
    rep = Reputation(recovery_per_s=0.01)
    rep.penalise("p", "malformed", now=0)
    assert rep.score("p", now=0) == pytest.approx(0.65)
    assert rep.score("p", now=10) == pytest.approx(0.75)
    assert rep.score("p", now=1000) == 1.0
    rep.penalise("q", "malformed", now=0)
    rep.reward("q", now=0)
    assert rep.score("q", now=0) == pytest.approx(0.70)


def test_flood_of_identities_cannot_push_a_banned_peer_out_of_memory():
    rep = Reputation(max_entries=50)
    for _ in range(3):
        rep.penalise("attacker", "malformed", now=0)
    for i in range(500):
        rep.penalise(f"sybil{i}", "timeout", now=1)
    assert len(rep._peers) <= 50
    assert rep.banned("attacker", now=2)


# --- the swarm view under a flood of records ----------------------------------------------------
def test_fake_records_cannot_evict_real_peers():
    view = SwarmView("me", "t", max_peers=100, max_new_per_host=10)
    view.update([stored(rec("real1", host="10.0.0.1")), stored(rec("real2", host="10.0.0.2"))], now=0)
    # 10,000 fake identities from one host, then from 1,000 hosts
    view.update([stored(rec(f"fake{i}", host="6.6.6.6")) for i in range(10_000)], now=1)
    assert len(view.peers) == 12  # the two real peers plus the per-host bound
    view.update([stored(rec(f"spread{i}", host=f"7.7.{i // 250}.{i % 250}")) for i in range(1_000)], now=2)
    assert len(view.peers) == 100
    assert {"real1", "real2"} <= set(view.peers)
    assert view.rejected["view_full"] >= 900
    # real peers keep heartbeating and stay; their updates are never refused for lack of room
    view.update([stored(rec("real1", t=5, host="10.0.0.1"), exp=20)], now=5)
    assert view.peers["real1"].record.time == 5


def test_proven_peers_do_not_count_against_their_host():
    view = SwarmView("me", "t", max_new_per_host=2)
    view.update([stored(rec("a")), stored(rec("b"))], now=0)
    view.update([stored(rec("c"))], now=0)
    assert "c" not in view.peers
    view.mark_proven("a")
    view.update([stored(rec("c"))], now=0)
    assert "c" in view.peers


def test_replayed_older_record_does_not_overwrite_newer():
    view = SwarmView("me", "t")
    view.update([stored(dataclasses.replace(rec("a", t=10), step=99), exp=20)], now=10)
    view.update([stored(dataclasses.replace(rec("a", t=3), step=1), exp=20)], now=11)
    assert view.peers["a"].record.step == 99


def test_forged_long_lived_and_unadmitted_records_are_refused_and_attributed():
    view = SwarmView("me", "t", allowed=frozenset({"a", "b", "c", "mallory"}))
    refused = view.update([
        stored(rec("a"), owner="mallory"),  # a record for peer a signed by mallory's key
        stored(rec("b"), exp=10 * MAX_RECORD_TTL_S),  # claims to live far too long
        stored(rec("stranger")),  # not admitted to this closed run
        StoredRecord("c", {"v": 1, "peer_id": 5}, 10.0),  # malformed
    ], now=0)
    assert set(view.peers) == {"b"} and view.peers["b"].expiration == MAX_RECORD_TTL_S  # kept, cut short
    # (newcomers are taken in an order each view draws for itself)
    assert sorted(refused) == [("c", "malformed_record:addrs"), ("mallory", "record_owner_mismatch"), ("stranger", "not_admitted")]


def test_newcomers_on_private_addresses_are_not_locked_out_by_fakes():
    # p2pd lists every interface, so honest records carry 127.0.0.1 and private addresses too
    view = SwarmView("me", "t", max_new_per_host=64)
    fakes = [PeerRecord(f"fake{i}", (f"/ip4/127.0.0.1/tcp/9/p2p/fake{i}", f"/ip4/6.6.6.6/tcp/{i}/p2p/fake{i}"), "t", 1, 1.0, 1, 0.0)
             for i in range(64)]
    view.update([stored(r) for r in fakes], now=0)
    honest = PeerRecord("honest", ("/ip4/127.0.0.1/tcp/5/p2p/honest", "/ip4/192.168.1.5/tcp/5/p2p/honest",
                                   "/ip4/203.0.113.9/tcp/5/p2p/honest"), "t", 1, 1.0, 1, 0.0)
    view.update([stored(honest)], now=0)
    assert "honest" in view.peers  # the fakes' shared public host is full, not the honest one's
    more = PeerRecord("fake64", ("/ip4/6.6.6.6/tcp/99/p2p/fake64",), "t", 1, 1.0, 1, 0.0)
    view.update([stored(more)], now=0)
    assert "fake64" not in view.peers


def test_known_peers_are_processed_first_in_a_huge_lookup():
    view = SwarmView("me", "t", max_per_update=100)
    view.update([stored(rec("real", t=0, host="10.0.0.1"))], now=0)
    flood = [stored(rec(f"f{i}", host=f"8.8.{i // 200}.{i % 200}")) for i in range(5000)]
    view.update([*flood, stored(rec("real", t=5, host="10.0.0.1"), exp=20)], now=5)
    assert view.peers["real"].record.time == 5 and view.rejected["lookup_truncated"] == 4901


def test_banned_peers_are_kept_out_of_the_view():
    view = SwarmView("me", "t")
    view.update([stored(rec("a")), stored(rec("b"))], now=0, banned=frozenset({"b"}))
    assert set(view.peers) == {"a"}


def test_allow_peers_file(tmp_path):
    f = tmp_path / "allowed.txt"
    f.write_text("# run owners\nQmAAA\n\nQmBBB  # second\n")
    assert load_allowed_peers(str(f)) == frozenset({"QmAAA", "QmBBB"})
    assert load_allowed_peers("") is None
    f.write_text("not a/peer id\n")
    with pytest.raises(ValueError, match="not a peer id"):
        load_allowed_peers(str(f))
    with pytest.raises(ValueError, match="allow-peers"):
        load_allowed_peers(str(tmp_path / "missing"))


# --- the DHT validator and bounded storage (hivemind, no network) -------------------------------
def _dht_record(signer, run_key: str, record: dict, expiration: float, forge_subkey: bytes | None = None):
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    subkey = MSGPackSerializer.dumps(forge_subkey or signer.local_public_key)
    r = DHTRecord(DHTID.generate(source=run_key).to_bytes(), subkey, MSGPackSerializer.dumps(record), expiration)
    return dataclasses.replace(r, value=signer.sign_value(r))


def test_dht_validator_refuses_forged_malformed_and_foreign_records():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import CompositeValidator
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.timed_storage import get_dht_time

    from protocols.transport.hivemind import RunRecordValidator, _owner_peer_id

    alice, bob = RSASignatureValidator(RSAPrivateKey()), RSASignatureValidator(RSAPrivateKey())
    alice_id = _owner_peer_id(alice.local_public_key)
    bob_id = _owner_peer_id(bob.local_public_key)
    run = RunRecordValidator("peer/run/x/peers")
    node = CompositeValidator([RSASignatureValidator(RSAPrivateKey()), run])
    now = get_dht_time()
    good = _dht_record(alice, "peer/run/x/peers", ft.valid_record(alice_id), now + 6)
    assert node.validate(good)
    # bob signs a record that speaks for alice
    assert not node.validate(_dht_record(bob, "peer/run/x/peers", ft.valid_record(alice_id), now + 6))
    # bob writes into alice's slot: the signature check fails
    assert not node.validate(_dht_record(bob, "peer/run/x/peers", ft.valid_record(bob_id), now + 6, forge_subkey=alice.local_public_key))
    # a tampered value (signature no longer matches)
    assert not node.validate(dataclasses.replace(good, value=good.value.replace(b"digits-mlp", b"digits-mlq")))
    # another key, malformed, oversized
    assert not node.validate(_dht_record(alice, "some/other/key", ft.valid_record(alice_id), now + 6))
    assert not node.validate(_dht_record(alice, "peer/run/x/peers", {"v": 1}, now + 6))
    big = {**ft.valid_record(alice_id), "task": "x" * 5000}
    assert not node.validate(_dht_record(alice, "peer/run/x/peers", big, now + 6))
    assert run.rejected == {"record_owner_mismatch": 1, "foreign_key": 1, "malformed_record:addrs": 1, "record_too_large": 1}


def test_clock_or_settings_dependent_checks_never_drop_a_whole_lookup_reply():
    """hivemind drops another node's whole reply if one record fails validation: a record that
    claims a long life, or comes from a peer our closed run did not admit, must pass validation
    (and be refused only where it is refused alone: when storing, and in the view)."""
    from types import SimpleNamespace

    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import CompositeValidator
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    from protocols.transport.hivemind import RunRecordValidator, _owner_peer_id, bounded_storage

    key = "peer/run/x/peers"
    alice, bob = RSASignatureValidator(RSAPrivateKey()), RSASignatureValidator(RSAPrivateKey())
    alice_id = _owner_peer_id(alice.local_public_key)
    bob_id = _owner_peer_id(bob.local_public_key)
    run = RunRecordValidator(key, allowed=frozenset({alice_id}))
    node = CompositeValidator([RSASignatureValidator(RSAPrivateKey()), run])
    now = get_dht_time()
    reply = DictionaryDHTValue()
    records = {alice: (ft.valid_record(alice_id), now + 6), bob: (ft.valid_record(bob_id), now + 10 * 600)}
    for signer, (value, exp) in records.items():
        reply.store(signer.local_public_key, _dht_record(signer, key, value, exp).value, exp)
    protocol = SimpleNamespace(record_validator=node, serializer=MSGPackSerializer)
    assert DHTProtocol._validate_dictionary(protocol, DHTID.generate(source=key).to_bytes(), reply)
    # storing is where they are refused, one by one
    storage = bounded_storage(run)
    key_id = DHTID.generate(source=key)
    assert storage.store_subkey(key_id, alice.local_public_key, b"v", now + 6)
    assert not storage.store_subkey(key_id, bob.local_public_key, b"v", now + 6)  # not admitted
    assert not storage.store_subkey(key_id, alice.local_public_key, b"v", now + 10 * 600)  # too long-lived
    assert run.rejected == {"not_admitted": 1, "record_ttl_too_long": 1}


def test_bounded_dht_storage_keeps_existing_records_when_full():
    from hivemind.dht.routing import DHTID
    from hivemind.utils.timed_storage import get_dht_time

    from protocols.transport.hivemind import RunRecordValidator, bounded_storage

    v = RunRecordValidator("peer/run/x/peers")
    v.max_records = 5
    storage = bounded_storage(v)
    key, now = DHTID.generate(source="k"), get_dht_time()
    for i in range(5):
        assert storage.store_subkey(key, f"[owner:real{i}]".encode(), b"v", now + 10)
    assert not storage.store_subkey(key, b"[owner:fake]", b"v", now + 10)
    assert storage.store_subkey(key, b"[owner:real0]", b"v2", now + 20)  # existing records still refresh
    assert not storage.store(key, b"plain value", now + 10)  # only per-peer dictionaries are stored
    assert len(storage.get(key).value.data) == 5 and v.rejected["storage_full"] == 1


# --- fuzzing: every decoder and handler ---------------------------------------------------------
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=3000), st.integers(0, 2**31), st.sampled_from(["reply", "request"]))
def test_stream_decoders_raise_only_protocol_errors(data, seed, target):
    seedmsg = ft.valid_reply() if target == "reply" else ft.valid_request()
    for payload in (data, ft.mutate(seedmsg, random.Random(seed))):
        try:
            asyncio.run(ft.TARGETS[target](payload))
        except ft.ALLOWED:
            pass


@FUZZ
@given(st.binary(max_size=3000), st.integers(0, 2**31))
def test_header_and_record_decoders_raise_only_their_errors(data, seed):
    rng = random.Random(seed)
    for payload in (data, ft.mutate(ft.valid_request()[4:], rng)):
        try:
            ft.header_decoder(payload)
        except ProtocolError:
            pass
    for payload in (data, ft.mutate(msgpack.packb(ft.valid_record(), use_bin_type=True), rng), ft.record_variants(rng)):
        ft.record_decoder(payload)  # refusals are return values here; any exception is a bug


@pytest.fixture(scope="module")
def harness():
    h = ft.DaemonHarness()
    yield h
    h.close()


@FUZZ
@given(data=st.binary(max_size=3000), seed=st.integers(0, 2**31))
def test_model_server_handler_never_raises_and_counts_every_refusal(harness, data, seed):
    d = harness.daemon
    before = sum(d.stats.serve_errors.values()) + d.counters["serves"]
    peer = f"fuzzer{seed % 7}"
    for payload in (data, ft.mutate(ft.valid_request(), random.Random(seed))):
        sent = asyncio.run(harness.serve(payload, peer))
        assert len(sent) <= 4 + 64 * 1024 + d.trainer.flat.numel() * 4
    after = sum(d.stats.serve_errors.values()) + d.counters["serves"]
    assert after == before + 2  # every request ends as exactly one serve or one counted error/refusal
    assert d.core.serving == 0 and not d.core.serving_by_peer  # no slot leaks


@pytest.fixture(scope="module")
def validator():
    return ft.ValidatorHarness()


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 2**31), st.sampled_from(["key", "subkey", "value", "raw"]))
def test_dht_record_validator_only_answers_true_or_false(validator, data, seed, part):
    v, rng = validator.valid, random.Random(seed)
    key, subkey, value = v.key, v.subkey, v.value
    if part == "key":
        key = ft.mutate(key, rng)
    elif part == "subkey":
        subkey = ft.mutate(subkey, rng)
    elif part == "value":
        value = ft.mutate(value, rng)
    else:
        subkey, value = data[:300], data[300:]
    verdict = validator.validate(key, subkey, value, v.expiration_time)
    if (key, subkey, value) != (v.key, v.subkey, v.value):
        assert not verdict or part == "value"  # a changed key or subkey breaks the signature


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["cmd", "args", "x"]), json_like | st.sampled_from(["status", "bogus"]), max_size=3))
def test_control_handler_answers_every_request(harness, request):
    reply = asyncio.run(harness.control(request))
    assert reply["ok"] is (request.get("cmd") in ("status", "leave"))


def test_partner_backoff_table_is_bounded():
    from protocols.gossip import PartnerPicker

    picker = PartnerPicker(k=2, max_entries=100)
    for i in range(1000):
        picker.failed(f"sybil{i}", now=float(i))
    assert len(picker._state) <= 100
    assert "sybil999" in picker.backing_off(now=999.5)
    for i in range(1000):
        picker.refused(f"clone{i}", now=2000.0)
    assert len(picker._state) <= 100 and picker.refusals("clone999") == 1


def test_misbehaviour_log_lines_are_rate_limited(caplog):
    import logging

    from protocols.loglimit import LogLimiter

    lim = LogLimiter(logging.getLogger("peer.test"), period=3600)
    with caplog.at_level(logging.INFO, logger="peer.test"):
        written = [lim.info(("p", "bad_header"), "refused %s", "p") for _ in range(1000)]
        lim.info(("q", "bad_header"), "refused %s", "q")
    assert sum(written) == 1 and len(caplog.records) == 2
    lim._last[("p", "bad_header")] -= 7200  # an hour later: one line, saying what was held back
    with caplog.at_level(logging.INFO, logger="peer.test"):
        assert lim.info(("p", "bad_header"), "refused %s", "p")
    assert "+999 like it not logged" in caplog.records[-1].getMessage()


def test_status_view_shows_refusals_bans_and_scores():
    from rich.console import Console

    from cli.render import render_status

    s = {"peer_id": "QmSelf", "addrs": [], "run_id": "r", "task": "t", "shard": "0/2", "aggregator": "a",
         "phase": "training", "uptime_s": 3.0, "step": 5, "loss": 0.5, "accuracy": 0.9, "samples_per_s": 100.0,
         "rounds_ok": 1, "rounds_failed": 0, "bytes_sent": 10, "bytes_received": 10, "rejected": {}, "pull_failed": {},
         "checkpoint": {"step": None, "age_s": None, "errors": 0},
         "live_peers": [{"peer_id": "QmHonest", "step": 3, "samples_per_s": 5.0, "last_seen_s": 1.0, "addrs": []}],
         "serve_errors": {"bad_header": 2}, "record_rejects": {}, "dht_rejects": {"record_owner_mismatch": 1},
         "banned": {"QmMallory": 55.0}, "reputation": {"QmHonest": {"score": 0.65}},
         "dht_rpcs": {"rpcs": {"rpc_find": {"requests": 9, "served": 5, "refused": 3, "timed_out": 1, "malformed": 0}},
                      "active": 0}}
    console = Console(width=160, record=True)
    console.print(render_status(s))
    text = console.export_text()
    assert "bad_header 2, record_owner_mismatch 1" in text and "QmMallory" in text and "0.65" in text
    assert "progress" not in text  # no --max-steps: nothing to be done toward
    s["progress"] = {"target_steps": 1000, "done": 0.25, "eta_s": 3725.0}
    console = Console(width=160, record=True)
    console.print(render_status(s))
    assert "25.0 % of 1000 steps, 1h 2m left at this rate" in console.export_text()
    assert "rpc_find 9, refused 3, timed_out 1" in text  # what was not served; zeros left out


async def test_closed_run_ignores_and_refuses_unadmitted_peers(memory_swarm, tmp_path):
    from tests.conftest import wait_until

    allow = tmp_path / "allowed.txt"
    allow.write_text("a\nb\n")
    a = await memory_swarm.add("a", shard="0/2", allow_peers=str(allow))
    b = await memory_swarm.add("b", shard="1/2", allow_peers=str(allow))
    c = await memory_swarm.add("c", shard="0/2")  # an open-run peer that found the run key
    await wait_until(lambda: a.counters["rounds_ok"] > 2 and c.stats.pull_failed.get("remote_error", 0) >= 1, 20,
                     "a and b to gossip, and c to be turned away")
    now = a.transport.now()
    assert {i.record.peer_id for i in a.core.view.live(now)} == {"b"}
    assert a.core.view.rejected.get("not_admitted", 0) >= 1
    assert a.stats.serve_errors.get("refused_not_admitted", 0) + b.stats.serve_errors.get("refused_not_admitted", 0) >= 1
    assert a.status()["closed_run"] and not c.status()["closed_run"]


async def test_read_timeout_applies_to_the_payload_fast_path():
    """A partner that goes quiet mid-payload is cut off by the per-read deadline (read_into path too)."""
    from protocols.transport.base import CountingStream

    class Quiet:
        remote_peer = "q"

        async def read_exactly(self, n):
            await asyncio.Event().wait()

        async def read_into(self, view):
            await asyncio.Event().wait()

        async def write(self, data):
            pass

        async def close(self):
            pass

    stream = CountingStream(Quiet(), {}, read_timeout=0.05)
    for call in (stream.read_exactly(4), stream.read_into(memoryview(bytearray(8)))):
        with pytest.raises(asyncio.TimeoutError):
            await call


@pytest.mark.slow  # real processes, over 5 s: the full suite runs it, the fast tier does not
def test_fuzz_script_drives_every_target_with_no_failure(tmp_path):
    """scripts/fuzz.py (the long run SECURITY.md quotes) reaches the real server handler and the
    DHT validator through the daemon's public parts; a short run from another folder must reach
    every target, end each serve as one counted refusal or serve, and find nothing."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"
    proc = subprocess.run([sys.executable, str(script), "--cases", "1400", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["failures"] == 0, report["failure_examples"]
    assert set(report["outcomes"]) == {"header", "reply", "request", "record", "serve", "control", "dht"}
    assert all(sum(c.values()) >= 100 for c in report["outcomes"].values()), report["outcomes"]
    counters = report["server_counters"]
    assert counters["serves"] + sum(counters["serve_errors"].values()) == sum(report["outcomes"]["serve"].values())
