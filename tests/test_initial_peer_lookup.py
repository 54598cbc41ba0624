"""`--initial-peer HOST/tcp/PORT` without /p2p/<id>: the id is learned from whoever answers there
(protocols/transport/peer_id_lookup.py), so a Service DNS name is enough to join (deploy/k8s/).

The real tests start `peer join` daemons on 127.0.0.1; the container's HEALTHCHECK command is run
against them as Docker would run it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peer.main import resolve_initial_peers
from peer.preflight import StartError
from protocols.transport.peer_id_lookup import LookupFailed, lookup_target, retry_delay

REPO = Path(__file__).resolve().parents[1]
PID = "QmXNdG3PnW7nDz9vq8oRvP7bWBh3r1jn5xQwKjXQdJQv2a"
BIN = Path(sys.executable).parent  # where `peer` is installed next to this interpreter


# --- the decisions ----------------------------------------------------------------------------
def test_lookup_target_takes_plain_tcp_addresses_only():
    assert lookup_target("/dns4/peer-bootstrap/tcp/31337") == ("peer-bootstrap", 31337, socket.AF_INET)
    assert lookup_target("/ip6/::1/tcp/5/") == ("::1", 5, socket.AF_INET6)
    assert lookup_target("/dns/example.org/tcp/1")[2] == socket.AF_UNSPEC
    for addr in ("/ip4/1.2.3.4/tcp/5/p2p/" + PID, "/ip4/1.2.3.4/udp/5/quic", "/ip4/1.2.3.4/tcp/5/ws",
                 "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/70000", "/sctp/1.2.3.4/tcp/5", "ip4/1.2.3.4/tcp/5"):
        assert lookup_target(addr) is None, addr


def test_retry_delay_doubles_and_stops_at_the_deadline():
    assert retry_delay(0, started=100.0, now=100.0, wait_s=0.0) is None  # 0: one try only
    assert [retry_delay(k, 100.0, 101.0, 60.0) for k in range(5)] == [0.5, 1.0, 2.0, 4.0, 5.0]
    assert retry_delay(3, started=100.0, now=159.5, wait_s=60.0) == 0.5  # never past the end
    assert retry_delay(0, started=100.0, now=160.0, wait_s=60.0) is None


def test_resolve_keeps_given_ids_and_appends_learned_ones():
    asked = []

    def lookup(addrs, wait_s):
        asked.append((addrs, wait_s))
        return {"/dns4/boot/tcp/1": "QmBoot", "/ip4/10.0.0.9/tcp/2": LookupFailed("connection refused")}

    full = f"/ip4/10.0.0.1/tcp/3/p2p/{PID}"
    dial, failed = resolve_initial_peers(["/dns4/boot/tcp/1", full, "/ip4/10.0.0.9/tcp/2"], 30.0, lookup=lookup)
    assert asked == [(["/dns4/boot/tcp/1", "/ip4/10.0.0.9/tcp/2"], 30.0)]  # the full address is not dialled
    assert dial == ["/dns4/boot/tcp/1/p2p/QmBoot", full]
    assert failed == ["--initial-peer /ip4/10.0.0.9/tcp/2: connection refused"]
    assert resolve_initial_peers([full], 0.0, lookup=lambda *a: pytest.fail("nothing to look up")) == ([full], [])
    with pytest.raises(StartError, match=r"--initial-peer /ip4/10.0.0.9/tcp/2: connection refused \(or paste"):
        resolve_initial_peers(["/ip4/10.0.0.9/tcp/2"], 0.0, lookup=lookup)
    # a restarted pod whose bootstrap is away still starts: it dials the peers it saw last time
    assert resolve_initial_peers(["/ip4/10.0.0.9/tcp/2"], 0.0, [full], lookup=lookup) == (
        [], ["--initial-peer /ip4/10.0.0.9/tcp/2: connection refused"])


# --- real daemons ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_cmd(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=kw.pop("timeout", 120))


class Daemon:
    """`peer join` in its own process group; stderr is read by a thread so lines can be awaited."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.done = False
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "join", "--data-dir", str(data_dir),
                                      "--run-id", "lookup", *args],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.done:
                    pytest.fail(f"no {pattern!r} within {timeout}s:\n{''.join(self.lines)[-3000:]}")
                self.changed.wait(min(left, 1.0))

    def status(self) -> dict:
        out = peer_cmd("status", "--json", "--data-dir", str(self.data_dir), timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def healthcheck(data_dir: Path) -> int:
    """The Dockerfile's HEALTHCHECK command (exec form), run with the image's PEER_DATA_DIR set."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    command = json.loads(re.search(r"^HEALTHCHECK .*? CMD (\[.+\])$", text, re.M).group(1))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PEER_DATA_DIR": str(data_dir),
           "PYTHONPATH": str(REPO)}
    return subprocess.run(command, env=env, capture_output=True, timeout=60).returncode


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow  # real processes, over 5 s: the full suite runs it, the fast tier does not
@pytest.mark.timeout(240)
def test_a_peer_joins_by_host_and_port_before_the_first_peer_is_up(tmp_path):
    """B is started first with `/dns4/localhost/tcp/PORT` and initial-peer-wait-s (as the manifests
    start every pod at once); A comes up on PORT; B learns A's id, joins, and each sees the other."""
    port = free_port()
    (tmp_path / "a.toml").write_text("heartbeat-s = 0.5\n")
    (tmp_path / "b.toml").write_text("initial-peer-wait-s = 120\nheartbeat-s = 0.5\n")
    b = Daemon(tmp_path / "b", "--listen", "/ip4/127.0.0.1/tcp/0", "--initial-peer", f"/dns4/localhost/tcp/{port}",
               "--config", str(tmp_path / "b.toml"))
    a = None
    try:
        b.wait_for(rf"waiting up to 120 s for /dns4/localhost/tcp/{port} to answer \(connection refused", 60)
        assert healthcheck(tmp_path / "b") != 0, "a daemon that has not started is not healthy"
        a = Daemon(tmp_path / "a", "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--config", str(tmp_path / "a.toml"))
        a_id = a.wait_for(r"training \S+ as (\w+)", 120).group(1)
        b.wait_for(rf"initial peer /dns4/localhost/tcp/{port}/p2p/{a_id} ", 60)
        b_id = b.wait_for(r"training \S+ as (\w+)", 120).group(1)
        wait_until(lambda: a_id in {p["peer_id"] for p in b.status().get("live_peers", [])}, 60, "B to see A")
        wait_until(lambda: b_id in {p["peer_id"] for p in a.status().get("live_peers", [])}, 60, "A to see B")
        assert healthcheck(tmp_path / "a") == 0 and healthcheck(tmp_path / "b") == 0
        assert a.stop() == 0
        assert healthcheck(tmp_path / "a") != 0, "a stopped daemon is not healthy"
    finally:
        b.stop()
        if a is not None:
            a.stop()


def test_healthcheck_fails_without_a_live_daemon(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    assert healthcheck(empty) == 1
    stale = tmp_path / "stale"
    stale.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on (a killed daemon's)
        s.bind(str(stale / "control.sock"))
    assert healthcheck(stale) == 1


def test_nothing_at_the_address_is_one_line(tmp_path):
    port = free_port()
    out = peer_cmd("join", "--data-dir", str(tmp_path / "d"), "--listen", "/ip4/127.0.0.1/tcp/0",
                   "--initial-peer", f"/ip4/127.0.0.1/tcp/{port}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"cannot start: --initial-peer /ip4/127.0.0.1/tcp/{port}: connection refused: is the peer running, on that "
        "port? (or paste the whole address with /p2p/<id> that the peer printed at start)")


def test_something_else_at_the_address_is_one_line(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer_like_a_web_server():
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_like_a_web_server, daemon=True).start()
        out = peer_cmd("join", "--data-dir", str(tmp_path / "d"), "--listen", "/ip4/127.0.0.1/tcp/0",
                       "--initial-peer", f"/ip4/127.0.0.1/tcp/{server.getsockname()[1]}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "it answered, but not as a libp2p peer" in out.stderr.strip().splitlines()[-1], out.stderr
