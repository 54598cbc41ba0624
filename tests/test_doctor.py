"""`peer doctor` and the reachability verdict.

Unit tests feed each check hand-made inputs (tmp dirs, bad modes, a corrupt key, a bound port,
fake probes). The dial-back service is tested over two real p2pd daemons; the end-to-end test
runs `peer doctor --json` as a subprocess against a real two-peer run (py-libp2p and hivemind
cannot share a process once hivemind is loaded, so the light client runs only in subprocesses).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer import doctor
from peer.doctor import Check, Probe
from peer.reachability import DialBack, verdict
from protocols import dialback

REPO = Path(__file__).resolve().parents[1]
PID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_line_format_and_exit_code():
    checks = [Check("disk", "warn", "1 GiB free", "free space"), Check("python", "ok", "Python 3.11")]
    assert checks[0].line() == "warn  disk: 1 GiB free — free space"
    assert checks[1].line() == "ok    python: Python 3.11"
    assert doctor.exit_code(checks) == 0
    assert doctor.exit_code([*checks, Check("identity", "fail", "corrupt")]) == 1


def test_python_and_p2pd_checks(tmp_path):
    assert doctor.check_python((3, 10, 4)).level == "fail"
    assert doctor.check_python((3, 11, 0)).level == "ok"
    assert doctor.check_p2pd().level == "ok"  # the installed binary runs `-h`
    missing = doctor.check_p2pd(tmp_path / "p2pd")
    assert missing.level == "fail" and "no p2pd binary" in missing.what
    not_exec = tmp_path / "p2pd"
    not_exec.write_bytes(b"\x7fELF")
    not_exec.chmod(0o644)
    check = doctor.check_p2pd(not_exec)
    assert check.level == "fail" and "not executable" in check.what and f"chmod +x {not_exec}" == check.fix
    not_exec.write_text("#!/bin/sh\necho hello\n")
    not_exec.chmod(0o755)
    assert "did not print p2pd's usage" in doctor.check_p2pd(not_exec).what


def test_data_dir_missing_is_not_created_and_modes_are_reported(tmp_path):
    missing = tmp_path / "a" / "b"
    check = doctor.check_data_dir(missing)
    assert check.level == "ok" and "does not exist yet" in check.what and not missing.exists()
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    assert doctor.check_data_dir(d).level == "ok"
    d.chmod(0o755)
    check = doctor.check_data_dir(d)
    assert check.level == "warn" and check.fix.startswith(f"chmod 700 {d}")
    assert oct(d.stat().st_mode & 0o777) == "0o755"  # reported, not changed
    f = tmp_path / "file"
    f.write_text("x")
    assert doctor.check_data_dir(f).level == "fail"
    sock_place = tmp_path / "s"
    (sock_place / "control.sock").mkdir(parents=True, mode=0o700)
    sock_place.chmod(0o700)
    check = doctor.check_data_dir(sock_place)
    assert check.level == "fail" and "not a control socket" in check.what


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0500 directory")
def test_unwritable_data_dir_fails(tmp_path):
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    try:
        assert doctor.check_data_dir(d).level == "fail"
        assert doctor.check_data_dir(d / "sub").level == "fail"  # cannot be created either
    finally:
        d.chmod(0o700)


def test_identity_missing_corrupt_valid_and_readable_by_others(tmp_path):
    from protocols.transport.hivemind import ensure_identity

    key = tmp_path / "identity.key"
    assert doctor.check_identity(key).level == "ok" and not key.exists()  # never created here
    key.write_bytes(b"not a key")
    check = doctor.check_identity(key)
    assert check.level == "fail" and "corrupt" in check.what and "move" in check.fix
    assert key.read_bytes() == b"not a key"  # left as it was
    key.unlink()
    peer_id = ensure_identity(str(key))
    check = doctor.check_identity(key)
    assert check.level == "ok" and check.detail["peer_id"] == peer_id
    key.chmod(0o644)
    check = doctor.check_identity(key)
    assert check.level == "warn" and check.fix == f"chmod 400 {key}"


def test_checkpoint_readable_corrupt_and_other_runs(tmp_path):
    from peer.state import checkpoint_path, save_checkpoint

    assert "none for run r" in doctor.check_checkpoint(tmp_path, "r").what
    save_checkpoint(checkpoint_path(tmp_path, "r-b", "digits-mlp"), {"run_id": "r-b", "task": "digits-mlp", "step": 3})
    assert "none for run r" in doctor.check_checkpoint(tmp_path, "r").what  # run r-b's, though its name starts alike
    good = checkpoint_path(tmp_path, "r", "digits-mlp")
    save_checkpoint(good, {"run_id": "r", "task": "digits-mlp", "step": 42})
    check = doctor.check_checkpoint(tmp_path, "r")
    assert check.level == "ok" and "step 42" in check.what and good.name in check.what
    bad = checkpoint_path(tmp_path, "r", "lm-tiny")
    bad.write_bytes(b"\x00" * 100)
    check = doctor.check_checkpoint(tmp_path, "r")
    assert check.level == "warn" and "unreadable" in check.what and bad.name in check.what
    assert bad.read_bytes() == b"\x00" * 100


def test_disk_needs_room_for_one_more_checkpoint(tmp_path):
    from peer.state import NEARLY_FULL_BYTES, checkpoint_path

    check = doctor.check_disk(tmp_path, "r", free_bytes=10 << 30)
    assert check.level == "ok" and check.detail["need_bytes"] == doctor.UNSIZED_CHECKPOINT_BYTES
    assert doctor.check_disk(tmp_path, "r", free_bytes=100 << 20).level == "warn"
    checkpoint_path(tmp_path, "r", "t").write_bytes(b"\x00" * (1 << 20))
    check = doctor.check_disk(tmp_path, "r", free_bytes=100 << 20)  # sized from the checkpoint now
    assert check.level == "ok" and check.detail["need_bytes"] == (1 << 20) + NEARLY_FULL_BYTES
    assert doctor.check_disk(tmp_path, "r", free_bytes=(1 << 20) + NEARLY_FULL_BYTES - 1).level == "warn"
    check = doctor.check_disk(tmp_path, "r", free_bytes=NEARLY_FULL_BYTES - 1)
    assert check.level == "fail" and "cannot be saved" in check.what
    assert doctor.check_disk(tmp_path / "not" / "yet", "r").level == "ok"  # measured where it will be


def test_listen_bound_port_fails_free_port_passes_daemon_addrs_win():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        check = doctor.check_listen([f"/ip4/127.0.0.1/tcp/{port}"], None)
        assert check.level == "fail" and f"port {port} is in use" in check.what and check.fix.startswith("pick another port")
        running = doctor.check_listen([f"/ip4/127.0.0.1/tcp/{port}"], [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PID}"])
        assert running.level == "ok" and f"/ip4/127.0.0.1/tcp/{port}" in running.what
    assert doctor.check_listen([f"/ip4/127.0.0.1/tcp/{port}"], None).level == "ok"  # released
    assert doctor.check_listen(["/ip4/203.0.113.9/tcp/4000"], None).level == "fail"  # not this machine's
    assert doctor.check_listen(["garbage"], None).level == "fail"


def test_daemon_not_running_stale_lock_and_held_lock(tmp_path):
    check, status = doctor.check_daemon(tmp_path)
    assert check.level == "ok" and status is None and not (tmp_path / "lock").exists()
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert doctor.check_daemon(tmp_path)[0].level == "ok"  # a lock file nobody holds
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a starting daemon holds it
        check, _ = doctor.check_daemon(tmp_path)
        assert check.level == "warn" and "does not answer" in check.what
    finally:
        os.close(fd)


def test_peers_to_ask_prefers_initial_then_live_then_remembered(tmp_path):
    from peer.known_peers import KnownPeers

    other = "QmS2vxMgRDsnUfM44Vczjp4Ak1ASz1NUXUJB6k9mZPVD62"
    remembered = "QmfFBV8cy9YyDLRCP6LQvGp3GjnWz3mnsheopYu8oe5Y2h"
    KnownPeers(tmp_path, "r").note([(remembered, ["/ip4/10.0.0.3/tcp/3"])])
    status = {"peer_id": "self", "live_peers": [{"peer_id": other, "addrs": [f"/ip4/10.0.0.2/tcp/2/p2p/{other}"]}]}
    peers = doctor.peers_to_ask([f"/ip4/10.0.0.1/tcp/1/p2p/{PID}"], status, tmp_path, "r")
    assert list(peers.items()) == [(PID, ["/ip4/10.0.0.1/tcp/1"]), (other, ["/ip4/10.0.0.2/tcp/2"]),
                                   (remembered, ["/ip4/10.0.0.3/tcp/3"])]


def _probe(offset: float = 0.0, rtt: float = 0.02, dialled=None, error=None) -> Probe:
    sent = 1000.0
    db = None if dialled is None else DialBack(PID, dialled, ["127.0.0.1"])
    return Probe(PID, ["/ip4/127.0.0.1/tcp/1"], error=error, ping=None if error else (sent, sent + rtt / 2 + offset, sent + rtt), dialback=db)


def test_clock_skew_levels_follow_record_lifetime():
    assert doctor.check_clock([_probe(0.1)], heartbeat_s=2.0).level == "ok"
    warn = doctor.check_clock([_probe(0.1), _probe(-3.0)], heartbeat_s=2.0)
    assert warn.level == "warn" and "3.00 s ahead of" in warn.what  # the worst peer counts
    fail = doctor.check_clock([_probe(10.0)], heartbeat_s=2.0)
    assert fail.level == "fail" and "behind" in fail.what and "timedatectl" in fail.fix
    assert doctor.check_clock([_probe(7.0, rtt=4.0)], heartbeat_s=2.0).level == "warn"  # ±2 s: not proven
    assert doctor.check_clock([], heartbeat_s=2.0).level == "warn"


def test_reachability_check_from_probes(tmp_path):
    addrs = [f"/ip4/127.0.0.1/tcp/4000/p2p/{PID}"]
    assert doctor.check_reachability([], addrs, [], tmp_path).level == "warn"
    down = doctor.check_reachability([_probe(error="cannot connect")], addrs, [], tmp_path)
    assert down.level == "fail" and down.detail["dial_out"] is False
    no_daemon = doctor.check_reachability([_probe()], None, [], tmp_path)
    assert no_daemon.level == "ok" and no_daemon.detail["reachable"] is None and "no daemon runs" in no_daemon.what
    ok = doctor.check_reachability([_probe(dialled={"/ip4/127.0.0.1/tcp/4000": "ok"})], addrs, [], tmp_path)
    assert ok.level == "ok" and ok.detail["reachable"] is True
    refused = doctor.check_reachability([_probe(dialled={"/ip4/127.0.0.1/tcp/4000": "connection refused"})], addrs, [], tmp_path)
    assert refused.level == "fail" and refused.detail["reachable"] is False


def test_verdict_names_the_fix():
    public = [f"/ip4/8.8.8.8/tcp/31337/p2p/{PID}"]
    private = [f"/ip4/192.168.1.5/tcp/0/p2p/{PID}"]
    v = verdict(public, [], DialBack(PID, {"/ip4/8.8.8.8/tcp/31337": "ok"}, ["8.8.8.8"]))
    assert (v.level, v.reachable) == ("ok", True) and "reachable from outside" in v.what
    v = verdict(["/ip4/192.168.1.5/tcp/4001"], [], DialBack(PID, {"/ip4/9.9.9.9/tcp/4001": "no answer"}, ["9.9.9.9"]))
    assert (v.level, v.reachable) == ("fail", False)
    assert "forward TCP port 4001" in v.fix and "--announce /ip4/9.9.9.9/tcp/4001" in v.fix and "relay" in v.fix
    v = verdict(private, [], DialBack(PID, {"/ip4/9.9.9.9/tcp/0": "refused"}, ["9.9.9.9"]))
    assert v.fix.startswith("listen on a fixed port")
    v = verdict(private, [], DialBack(error="no other peer of the run is connected yet"))
    assert (v.level, v.reachable) == ("warn", None) and "not tested (no other peer" in v.what
    assert verdict(private, ["/ip4/8.8.8.8/tcp/31337"], DialBack(error="none")).level == "ok"
    v = verdict([f"/ip4/127.0.0.1/tcp/5/p2p/{PID}"], [], None)
    assert "loopback only" in v.what and "--listen /ip4/0.0.0.0" in v.fix
    assert v.line().startswith("reachability: not tested")


def test_dialback_plan_dials_only_the_askers_host():
    requested = ["/ip4/192.168.1.5/tcp/4001/p2p/X", "/ip4/198.51.100.7/tcp/4002", "/ip6/::1/tcp/4003", "/dns/x.org/tcp/9"]
    assert dialback.plan(requested, ["198.51.100.7"]) == [("198.51.100.7", 4002), ("198.51.100.7", 4001), ("198.51.100.7", 4003)]
    assert dialback.plan(requested, []) == []  # nobody to dial: never the hosts the asker names
    assert dialback.plan(requested, ["0.0.0.0", "not-an-ip"]) == []
    many = [f"/ip4/10.0.0.1/tcp/{p}" for p in range(1000, 1010)]
    assert len(dialback.plan(many, ["10.0.0.1"])) == dialback.MAX_TARGETS
    with pytest.raises(dialback.DialBackError):
        dialback.decode_request(b"\xc1")
    assert dialback.decode_request(dialback.encode_request(["/ip4/1.2.3.4/tcp/5"] * 40)) == ["/ip4/1.2.3.4/tcp/5"] * 16


def test_dialback_limiter_one_question_per_interval():
    lim = dialback.Limiter(interval=10.0, max_askers=2)
    assert lim.allow("a", 0.0) and not lim.allow("a", 9.9) and lim.allow("a", 10.0)
    assert lim.allow("b", 10.0) and lim.allow("c", 10.0) and set(lim.last) == {"b", "c"}  # bounded


def test_dialback_over_real_p2pd(tmp_path):
    """A real peer dials the asker's real address (ok) and a closed port (refused), answers one
    question per interval, and the start verdict of the other side says reachable. The service
    sits under the DHT RPCs' stream bounds (protocols/dht_guard.py): with one stream per peer, a
    DHT stream the asker holds open makes its question `busy`; garbage is counted malformed."""
    from hivemind.p2p import PeerID

    from peer.reachability import check_at_start
    from protocols.dht_guard import RpcLimits
    from protocols.transport.hivemind import HivemindTransport
    from tests.conftest import wait_until

    async def main():
        a = HivemindTransport(str(tmp_path / "a.key"), ["/ip4/127.0.0.1/tcp/0"], rpc_limits=RpcLimits(max_streams_per_peer=1))
        await a.start()
        b = None
        try:
            b = HivemindTransport(str(tmp_path / "b.key"), ["/ip4/127.0.0.1/tcp/0"], initial_peers=(await a.addrs())[:1])
            await b.start()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                closed = s.getsockname()[1]
            own = (await b.addrs())[0].split("/p2p/")[0]
            _, _, held = await b.p2p.call_binary_stream_handler(PeerID.from_base58(a.peer_id), "DHTProtocol.rpc_ping")
            await wait_until(lambda: a.rpc_policy.active == 1, 5, "the held DHT stream to be admitted")
            # refused before anything is read: the word `busy` is written and the stream closed at
            # once, so p2pd may reset it before the word is forwarded (seen under load); the
            # refusal itself is asserted by the counters below
            with pytest.raises(dialback.DialBackError, match="busy|stream reset"):
                await dialback.ask(b.p2p, a.peer_id, [own])
            held.close()
            await wait_until(lambda: a.rpc_policy.active == 0, 10, "the held stream's slot to be released")
            with pytest.raises(Exception, match="^malformed request$"):  # not msgpack: no question at all
                await b.p2p._client.call_unary_handler(PeerID.from_base58(a.peer_id), dialback.PROTOCOL, b"\xc1")
            reply = await dialback.ask(b.p2p, a.peer_id, [own, f"/ip4/127.0.0.1/tcp/{closed}", "/ip4/198.51.100.7/tcp/53"])
            assert reply.observed == ["127.0.0.1"]
            assert reply.dialled[own] == "ok"
            assert reply.dialled[f"/ip4/127.0.0.1/tcp/{closed}"].startswith("connection refused")
            assert not any("198.51.100.7" in t for t in reply.dialled)  # never a host the asker only names
            with pytest.raises(dialback.DialBackError, match="the peer refused: asked again within 10 s"):
                await dialback.ask(b.p2p, a.peer_id, [own])
            counted = a.dht_rpcs()["rpcs"][dialback.PROTOCOL]
            assert {k: counted[k] for k in ("requests", "served", "refused", "malformed")} == \
                {"requests": 4, "served": 1, "refused": 2, "malformed": 1}
            v = await check_at_start(a.p2p, await a.addrs(), [])
            assert (v.level, v.reachable) == ("ok", True) and b.peer_id[:12] in v.what
        finally:
            if b is not None:
                await b.stop()
            await a.stop()

    asyncio.run(main())


def _doctor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "doctor", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "XDG_CONFIG_HOME": "/nonexistent"})


@pytest.mark.slow  # over 4 s: the full suite runs it, the fast tier does not
def test_bad_initial_peer_is_one_fail_line_and_the_rest_still_runs(tmp_path):
    out = _doctor("--data-dir", str(tmp_path / "d"), "--initial-peer", "garbage")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("fail  settings: --initial-peer garbage: not a multiaddr")
    assert any(line.startswith("ok    data dir:") for line in lines) and not (tmp_path / "d").exists()


@pytest.mark.slow  # real processes, over 5 s: the full suite runs it, the fast tier does not
def test_doctor_json_against_a_real_run(tmp_path):
    from peer.launcher import start_swarm, stop_all
    from tests.test_swarm_light import _p2pd_descendants

    config = tmp_path / "fast.toml"
    config.write_text("heartbeat-s = 0.5\n")
    peers = start_swarm(tmp_path, 2, ["--run-id", "doc", "--task", "digits-mlp", "--config", str(config)])
    try:
        b = peers[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}/p2p/{PID}"  # a stale address: must not spoil the rest
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "doctor", "--json", "--data-dir", str(b.data_dir),
                                 "--run", "doc", "--initial-peer", dead],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        daemons = set()  # p2pd started as a daemon; `p2pd -h` (the install check) only prints its usage
        while proc.poll() is None:
            for pid in _p2pd_descendants(proc.pid):
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] != [b"-h"]:
                        daemons.add(pid)
                except OSError:
                    continue
            time.sleep(0.05)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        assert not daemons, "peer doctor started a p2pd daemon"
        result = json.loads(out)
        checks = {c["check"]: c for c in result["checks"]}
        assert result["ok"] is True and all(c["level"] != "fail" for c in checks.values())
        own = b.addrs[0].split("/p2p/")[0]
        assert checks["daemon"]["running"] is True and checks["daemon"]["peer_id"] == b.peer_id
        assert checks["listen"]["level"] == "ok" and checks["listen"]["addrs"] == b.addrs  # held by the daemon: not a fail
        reach = checks["reachability"]
        assert reach["level"] == "ok" and reach["reachable"] is True and reach["peer"] == peers[0].peer_id
        assert "1 of 2 peers of the run answer" in reach["what"]
        assert reach["dialled"][own] == "ok"
        assert checks["clock"]["level"] == "ok" and abs(checks["clock"]["max_offset_s"]) < 1.0
        assert checks["identity"]["peer_id"] == b.peer_id
        # the verdict `peer join` printed at start: b asked a, the first peer had nobody to ask
        assert f"reachability: reachable on this machine: peer {peers[0].peer_id[:12]}" in (b.data_dir / "stdout.log").read_text()
        first = peers[0].data_dir / "stdout.log"
        assert "reachability: not tested (no other peer" in first.read_text()
        # and asked again once b connected (polled every 2 s)
        deadline = time.monotonic() + 60
        while "reachability (asked once a peer connected): reachable on this machine" not in first.read_text():
            assert time.monotonic() < deadline, first.read_text()
            time.sleep(0.5)
    finally:
        stop_all(peers)
