"""`peer swarm`: the run's records read by py-libp2p without a daemon.

Unit tests check the record verification and the lookup with hand-made, really signed records
(no network). The real test starts 3 `peer join` daemons and runs `peer swarm --json` as a
subprocess: every daemon must be listed with a verified record, and the command must not start
a p2pd (py-libp2p and hivemind cannot share a process once hivemind is loaded, so everything
that imports py-libp2p runs in a subprocess here).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.launcher import start_swarm, stop_all
from protocols.discovery import PeerRecord, run_key

REPO = Path(__file__).resolve().parents[1]
RUN = "swarmtest"


# --- hand-made records, signed as a daemon's DHT node signs them ---------------------------------

class Signer:
    """One RSA identity writing its slot of the run key, as HivemindTransport.publish does."""

    def __init__(self):
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.utils.crypto import RSAPrivateKey

        from protocols.transport.hivemind import _owner_peer_id

        self.validator = RSASignatureValidator(RSAPrivateKey())
        self.subkey = self.validator.local_public_key
        self.peer_id = _owner_peer_id(self.subkey)

    def record(self, step: int = 5, t: float | None = None, state: str = "up", **kw) -> PeerRecord:
        fields = dict(peer_id=self.peer_id, addrs=(f"/ip4/127.0.0.1/tcp/{1000 + step}/p2p/{self.peer_id}",), task="digits-mlp",
                      step=step, samples_per_s=100.0, version=step, time=time.time() if t is None else t, state=state,
                      loss=0.5, accuracy=0.9)
        fields.update(kw)
        return PeerRecord(**fields)

    def entry(self, rec: PeerRecord | dict, expiration: float) -> tuple[bytes, bytes, float]:
        """(subkey, signed value bytes, expiration) as they sit in a DHT node's storage."""
        from hivemind.dht.routing import DHTID
        from hivemind.dht.validation import DHTRecord
        from hivemind.utils import MSGPackSerializer

        wire = rec.to_wire() if isinstance(rec, PeerRecord) else rec
        key_id = DHTID.generate(source=run_key(RUN)).to_bytes()
        unsigned = DHTRecord(key_id, MSGPackSerializer.dumps(self.subkey), MSGPackSerializer.dumps(wire), expiration)
        return self.subkey, self.validator.sign_value(unsigned), expiration


def find_result(entries, nearest: list[tuple[int, str]] = ()):
    """A FindResult for the run key, as hivemind's rpc_find builds it from its storage."""
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils import MSGPackSerializer

    if not entries:
        result = dht_pb2.FindResult(type=dht_pb2.NOT_FOUND)
    else:
        d = DictionaryDHTValue()
        for subkey, value, exp in entries:
            d.store(subkey, value, exp)
        result = dht_pb2.FindResult(type=dht_pb2.FOUND_DICTIONARY, value=MSGPackSerializer.dumps(d),
                                    expiration_time=max(e[2] for e in entries))
    for node_id, pid in nearest:
        result.nearest_node_ids.append(node_id.to_bytes(20, "big"))
        result.nearest_peer_ids.append(PeerID.from_base58(pid).to_bytes())
    return result


@pytest.fixture(scope="module")
def signers():
    return [Signer() for _ in range(3)]


def test_verified_records_pass_and_a_bad_signature_is_dropped(signers):
    from protocols.lightdht import RecordChecker

    a, b, c = signers
    exp = time.time() + 30
    good = a.entry(a.record(), exp)
    subkey, value, _ = b.entry(b.record(step=7), exp)
    forged = (subkey, value.replace(b"\x07", b"\x08", 1), exp)  # step 7 -> 8 after signing
    assert forged[1] != value
    impostor = c.entry(c.record(peer_id=a.peer_id), exp)  # c signs a record that claims to be a
    checker = RecordChecker(RUN)
    found = checker.check_reply(find_result([good, forged, impostor]))
    assert [(v.owner, v.record.step) for v in found] == [(a.peer_id, 5)]
    assert found[0].record.accuracy == 0.9 and found[0].record.loss == 0.5
    assert checker.rejected == {"bad_signature": 1, "record_owner_mismatch": 1}


def test_records_without_metrics_still_parse_and_non_finite_metrics_are_refused(signers):
    from protocols.lightdht import RecordChecker

    a = signers[0]
    wire = a.record().to_wire()
    del wire["loss"], wire["accuracy"]  # a peer of an older release
    assert PeerRecord.from_wire(wire).accuracy is None
    checker = RecordChecker(RUN)
    assert checker.check_reply(find_result([a.entry(wire, time.time() + 30)]))[0].record.loss is None
    with pytest.raises(ValueError, match="accuracy"):
        PeerRecord.from_wire({**a.record().to_wire(), "accuracy": float("nan")})


def test_latest_record_per_peer_wins_and_left_or_expired_peers_are_not_live(signers):
    from protocols.lightdht import VerifiedRecord, latest_by_peer

    a, b, c = signers
    now = time.time()
    records = [
        VerifiedRecord(a.peer_id, a.record(step=9, t=now - 1), now + 10),
        VerifiedRecord(a.peer_id, a.record(step=3, t=now - 5), now + 20),  # older, a replay: loses
        VerifiedRecord(b.peer_id, b.record(t=now - 1, state="left"), now + 10),
        VerifiedRecord(c.peer_id, c.record(t=now - 9), now - 1),  # expired
    ]
    live = latest_by_peer(records, now)
    assert [(v.owner, v.record.step) for v in live] == [(a.peer_id, 9)]


def test_lookup_asks_the_initial_peer_then_the_closest_dialable_nodes(signers):
    """read_run over a fake network: the initial node names three neighbours; the two whose
    records (verified) give addresses are asked, the one without is not; a dead one is reported."""
    import trio
    from hivemind.proto import dht_pb2

    from protocols.lightdht import read_run

    a, b, c = signers
    d = Signer()  # named as a neighbour, but no record gives its address
    now = time.time()
    entries = [s.entry(s.record(), now + 30) for s in (a, b, c)]
    replies = {
        a.peer_id: (1, find_result(entries, [(2, b.peer_id), (3, c.peer_id), (4, d.peer_id)])),
        b.peer_id: (2, find_result(entries[1:], [(1, a.peer_id), (3, c.peer_id)])),
    }
    calls = []

    async def find(peer_id, addrs):
        calls.append((peer_id, tuple(addrs)))
        if peer_id not in replies:
            raise ConnectionRefusedError("refused")
        node_id, result = replies[peer_id]
        return dht_pb2.FindResponse(results=[result], peer=dht_pb2.NodeInfo(node_id=node_id.to_bytes(20, "big")))

    snap = trio.run(read_run, find, RUN, {a.peer_id: ["/ip4/127.0.0.1/tcp/1"]})
    assert calls[0] == (a.peer_id, ("/ip4/127.0.0.1/tcp/1",))
    assert {pid for pid, _ in calls} == {a.peer_id, b.peer_id, c.peer_id}
    assert dict(calls)[c.peer_id] == (f"/ip4/127.0.0.1/tcp/1005/p2p/{c.peer_id}",)  # from c's verified record
    assert snap.answered == sorted([a.peer_id, b.peer_id]) and list(snap.failed) == [c.peer_id]
    assert {v.owner for v in snap.records} == {a.peer_id, b.peer_id, c.peer_id}
    assert snap.rejected == {}


def test_lookup_core_asks_closest_first_and_stops():
    from protocols.lightdht import Lookup

    lk = Lookup(key_id=0, initial=["boot"], parallel=1, k=2)
    lk.learn_addrs("boot", ["/ip4/10.0.0.1/tcp/1"])
    assert lk.next_queries() == ["boot"] and lk.next_queries() == []  # one in flight at a time
    for pid in ("far", "near", "unnamed"):
        lk.learn_addrs(pid, [f"/ip4/10.0.0.2/tcp/{len(pid)}"])
    lk.on_reply("boot", 7, [(5, "far"), (1, "near"), (2, "no-address")])
    assert lk.next_queries() == ["near"]
    lk.on_failure("near", "refused")
    assert lk.next_queries() == ["far"]  # the 2 closest dialable nodes: far (5), boot (7, asked)
    lk.on_reply("far", 5, [])
    assert lk.next_queries() == []  # the k closest dialable nodes were asked: "unnamed" ranks last
    assert lk.answered == {"boot", "far"} and lk.failed == {"near": "refused"}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("args, says", [
    ([], "no --initial-peer given"),
    (["--initial-peer", "garbage"], "not a multiaddr"),
    (["--initial-peer", "/ip4/127.0.0.1/udp/1"], "no /p2p/<peer id> part"),
    (["--initial-peer", "/ip4/127.0.0.1/tcp/1"], "connection refused"),  # no /p2p/: asks who answers there
    (["--initial-peer", "/ip4/127.0.0.1/tcp/1/p2p/QmaVPaGxabWTEHgmj4E1GepTQCc5Y9rSSi3mGfrK7EqgQc"], "no initial peer answered"),
])
def test_unreachable_swarm_is_one_line_and_exit_2(args, says):
    r = cli("swarm", *args, "--run-id", RUN, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot reach the swarm: ") and says in lines[0], r.stderr
    assert "/ip4/ADDRESS/tcp/PORT/p2p/PEER_ID" in lines[0]  # the fix


# --- real daemons ------------------------------------------------------------------------------

def _children() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def _p2pd_descendants(root: int) -> set[int]:
    parents = _children()
    found = set()
    for pid in parents:
        p, chain = pid, 0
        while p in parents and p != root and chain < 64:
            p, chain = parents[p], chain + 1
        if p == root and pid != root:
            try:
                if "p2pd" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"):
                    found.add(pid)
            except OSError:
                continue
    return found


def swarm_json(initial: str) -> tuple[dict | None, str, set[int]]:
    """Run `peer swarm --json` and watch its process tree while it runs: (object, stderr, p2pd pids seen)."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "swarm", "--initial-peer", initial, "--run-id", RUN, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _p2pd_descendants(proc.pid)
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return json.loads(out), err, seen


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches the process tree through /proc")
@pytest.mark.timeout(300)
def test_swarm_lists_three_real_daemons_with_verified_records_and_starts_no_p2pd(tmp_path):
    config = tmp_path / "peer.toml"
    config.write_text("heartbeat-s = 1.0\neval-every-s = 1.0\n")
    peers = start_swarm(tmp_path, 3, ["--run-id", RUN, "--task", "digits-mlp", "--config", str(config)])
    try:
        ids = {p.peer_id for p in peers}
        daemons_p2pd = {pid for p in peers for pid in _p2pd_descendants(p.proc.pid)}
        assert len(daemons_p2pd) == 3  # the check below would see a p2pd (each daemon runs one)
        deadline = time.monotonic() + 90
        while True:  # records spread through the DHT at each heartbeat; accuracy follows the first evaluation
            summary, err, p2pd = swarm_json(peers[-1].addrs[0])
            assert not p2pd, f"peer swarm started p2pd: {p2pd}"
            live = {p["peer_id"]: p for p in summary["live_peers"]}
            if ids <= set(live) and all(live[i]["accuracy"] is not None for i in ids):
                break
            assert time.monotonic() < deadline, f"not all 3 peers listed with accuracy: {summary}\n{err}"
            time.sleep(1)
        assert all(live[i]["verified"] is True for i in ids)
        assert all(live[i]["step"] > 0 and live[i]["samples_per_s"] > 0 and live[i]["reachability"] == "loopback" for i in ids)
        assert {a for i in ids for a in live[i]["addrs"]} >= {p.addrs[0] for p in peers}
        totals = summary["totals"]
        assert totals["peers"] == len(live) >= 3
        assert totals["samples_per_s"] == pytest.approx(sum(p["samples_per_s"] for p in live.values()), abs=0.2)
        acc = totals["accuracy"]
        assert acc["worst"] <= acc["median"] <= acc["best"]
        assert summary["dht"]["answered"] >= 1 and summary["rejected"] == {}
        # an address without /p2p/<id>: the peer answering there tells its id in the Noise handshake
        bare, _, _ = swarm_json(peers[0].addrs[0].split("/p2p/")[0])
        assert ids <= {p["peer_id"] for p in bare["live_peers"]}
        human = cli("swarm", "--initial-peer", peers[0].addrs[0], "--run-id", RUN)
        assert human.returncode == 0, human.stderr
        assert all(i[:12] in human.stdout for i in ids) and "live peers" in human.stdout

        # --watch --json: one JSON line per refresh; Ctrl-C ends it quietly with exit 0
        watch = subprocess.Popen([sys.executable, "-m", "cli.main", "swarm", "--initial-peer", peers[1].addrs[0],
                                  "--run-id", RUN, "--json", "--watch", "--interval", "0.5"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                 # as from a terminal: a backgrounded test run ignores SIGINT, and children inherit it
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines = []
        while len(lines) < 2:
            line = watch.stdout.readline()
            assert line, watch.communicate()[1]
            lines.append(json.loads(line))
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 0 and "Traceback" not in err, err
        assert all(ids <= {p["peer_id"] for p in obj["live_peers"]} for obj in lines)
    finally:
        stop_all(peers)
