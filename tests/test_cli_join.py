"""`peer join` with bad input: one `cannot start:` line and exit 2, checked before torch loads;
`--help`, `-h`, `--version`; Ctrl-C at start; the join line's addresses."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from peer.config import PeerConfig
from peer.main import join_line, shareable_addrs
from peer.preflight import BUILTIN_TASKS, StartError, check_initial_peer, parse_multiaddr

REPO = Path(__file__).resolve().parents[1]
PID = "QmXNdG3PnW7nDz9vq8oRvP7bWBh3r1jn5xQwKjXQdJQv2a"
# `peer` with torch and hivemind made unimportable: what runs here must not need them
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['hivemind'] = None; "
            "sys.argv[0] = 'peer'; from cli.main import main; main()")


def peer(*args: str, torch_free: bool = True, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NO_TORCH] if torch_free else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def assert_cannot_start(out: subprocess.CompletedProcess, *phrases: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert 1 <= len(lines) <= 3, out.stderr
    assert lines[-1].startswith("cannot start: "), out.stderr
    assert "Traceback" not in out.stderr
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr


def readme_placeholder() -> str:
    found = re.search(r"--initial-peer (/\S+/p2p/Qm\.\.\.)", (REPO / "README.md").read_text())
    assert found, "README's join example"
    return found.group(1)


BAD_FLAGS = {
    "readme-placeholder": (["--initial-peer", readme_placeholder()], "placeholder"),
    "initial-peer-without-p2p-not-tcp": (["--initial-peer", "/ip4/203.0.113.5/udp/31337/quic"], "without /p2p/<peer id> only HOST/tcp/PORT"),
    "initial-peer-garbage": (["--initial-peer", "garbage"], "not a multiaddr"),
    "initial-peer-bad-ip": (["--initial-peer", f"/ip4/300.1.2.3/tcp/1/p2p/{PID}"], "not an IPv4 address"),
    "initial-peer-port-0": (["--initial-peer", f"/ip4/1.2.3.4/tcp/0/p2p/{PID}"], "real port"),
    "listen-garbage": (["--listen", "garbage"], "--listen garbage"),
    "listen-unknown-protocol": (["--listen", "/ip4/0.0.0.0/sctp/1"], "unknown protocol"),
    "listen-dns": (["--listen", "/dns/example.org/tcp/1"], "IP address of this machine"),
    "announce-port-0": (["--announce", "/ip4/203.0.113.5/tcp/0"], "real port"),
    "negative-max-steps": (["--max-steps", "-3"], "--max-steps -3"),
    "max-steps-not-a-number": (["--max-steps", "many"], "--max-steps"),
    "shard-out-of-range": (["--shard", "4/4"], "--shard 4/4"),
    "shard-garbage": (["--shard", "half"], "i/n"),
    "split": (["--split", "random"], "iid or dirichlet"),
    "aggregator": (["--aggregator", "medain"], "did you mean median"),
    "task": (["--task", "mnist"], "did you mean mnist1d-cnn"),
    "task-module-missing": (["--task", "no_such_module_here:build"], "no module 'no_such_module_here'"),
    "task-malformed": (["--task", "a b:c"], "module:function"),
    "byzantine-fraction": (["--byzantine-fraction", "0.5"], "< 0.5"),
    "threads": (["--threads", "-1"], "--threads"),
    "unknown-flag": (["--initial-peers", "x"], "No such option"),
    "allow-peers-missing": (["--allow-peers", "/nonexistent/allowed.txt"], "--allow-peers"),
    "log-format": (["--log-format", "xml"], "text or json"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_is_one_line_before_torch(case, tmp_path):
    args, phrase = BAD_FLAGS[case]
    assert_cannot_start(peer("join", "--data-dir", str(tmp_path / "d"), *args), phrase)


BAD_CONFIGS = {
    "bad-toml": ("heartbeat-s = = 1\n", "not valid TOML"),
    "wrong-type": ('heartbeat-s = "fast"\n', "heartbeat-s"),
    "wrong-type-string": ("task = 3\n", "expected a string"),
    "not-whole": ("max-steps = 1.5\n", "whole number"),
    "not-a-bool": ('relay-service = "yes"\n', "relay-service = 'yes': expected true or false"),
    "unknown-key": ("heartbeat = 1.0\n", "did you mean 'heartbeat-s'"),
    "bad-value": ("heartbeat-s = -1\n", "heartbeat-s"),
    "bad-address": ('initial-peers = ["/ip4/1.2.3.4/tcp/5/ws"]\n', "/p2p/"),
    "bad-wait": ("initial-peer-wait-s = -1\n", "initial-peer-wait-s"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_file_is_one_line_before_torch(case, tmp_path):
    text, phrase = BAD_CONFIGS[case]
    (tmp_path / "peer.toml").write_text(text)
    assert_cannot_start(peer("join", "--data-dir", str(tmp_path / "d"), "--config", str(tmp_path / "peer.toml")), phrase)


def test_missing_config_file_and_bad_user_config(tmp_path):
    assert_cannot_start(peer("join", "--data-dir", str(tmp_path / "d"), "--config", str(tmp_path / "nope.toml")), "no such file")
    (tmp_path / "xdg" / "peer").mkdir(parents=True)
    (tmp_path / "xdg" / "peer" / "config.toml").write_text("[[[\n")
    env_out = subprocess.run([sys.executable, "-c", NO_TORCH, "join", "--data-dir", str(tmp_path / "d")], capture_output=True,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert_cannot_start(env_out, "config.toml: not valid TOML")


def test_listen_port_in_use_is_one_line_before_torch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = peer("join", "--data-dir", str(tmp_path / "d"), "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert_cannot_start(out, f"port {port} is in use")


def test_debug_shows_the_traceback(tmp_path):
    out = peer("join", "--debug", "--data-dir", str(tmp_path / "d"), "--split", "random")
    assert out.returncode == 2 and "Traceback" in out.stderr and out.stderr.strip().splitlines()[-1].startswith("cannot start: ")


@pytest.mark.parametrize("body, phrase", [
    ("def build(**kw):\n    raise RuntimeError('boom')\n", "build() raised RuntimeError: boom"),
    ("def other(**kw):\n    pass\n", "has no function 'build'"),
    ("raise ImportError('needs a package you lack')\n", "importing my_task failed"),
])
def test_task_module_errors_are_one_line(tmp_path, body, phrase):
    (tmp_path / "my_task.py").write_text(body)
    out = peer("join", "--data-dir", str(tmp_path / "d"), "--listen", "/ip4/127.0.0.1/tcp/0", "--task", "my_task:build",
               torch_free=False, cwd=tmp_path)
    assert_cannot_start(out, phrase)


@pytest.mark.slow  # over 4 s: the full suite runs it, the fast tier does not
def test_data_dir_in_use_is_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running daemon holds it
        out = peer("join", "--data-dir", str(tmp_path / "d"), "--listen", "/ip4/127.0.0.1/tcp/0", torch_free=False)
    finally:
        os.close(fd)
    assert_cannot_start(out, "another peer daemon is running", "peer leave")


@pytest.mark.timeout(120)
@pytest.mark.slow  # over 4 s: the full suite runs it, the fast tier does not
def test_unreachable_initial_peer_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = peer("join", "--data-dir", str(tmp_path / "d"), "--listen", "/ip4/127.0.0.1/tcp/0",
               "--initial-peer", f"/ip4/127.0.0.1/tcp/{port}/p2p/{PID}", torch_free=False)
    assert_cannot_start(out, "no --initial-peer answered")


def _start(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "join", "--data-dir", str(tmp_path / "d"), "--listen",
                             "/ip4/127.0.0.1/tcp/0", "--run-id", "sigint"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_sigint_default)


def _sigint_default() -> None:
    """Ctrl-C as a terminal delivers it: a test run started in the background (`cmd &` in a
    script) ignores SIGINT, the child would inherit that, and Python installs no handler then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["loading", pytest.param("started", marks=pytest.mark.slow)])  # started: over 5 s
def test_ctrl_c_at_start_prints_no_traceback(tmp_path, when):
    """Ctrl-C in a terminal signals the whole process group (p2pd too). Before the daemon is up it
    exits 130; once up, it leaves as on SIGTERM and exits 0. Neither prints a traceback."""
    proc = _start(tmp_path)
    try:
        if when == "started":
            deadline = time.monotonic() + 90
            for line in proc.stdout:  # the join line comes once p2pd listens
                if line.startswith("To join this run") or time.monotonic() > deadline:
                    break
        else:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err and "never retrieved" not in err, err
    if when == "started":
        assert proc.returncode == 0 and "exit 0" in err, err


def test_help_groups_options_and_shows_defaults():
    out = peer("join", "--help")
    assert out.returncode == 0, out.stderr
    for panel in ("Network", "Training", "Robustness", "Files and other"):
        assert panel in out.stdout
    for default in ("mnist1d-cnn", "/ip4/0.0.0.0/tcp/0", "sybilwall+scc", "$XDG_DATA_HOME/peer", "0.25"):
        assert re.search(r"\[default: \(?" + re.escape(default), out.stdout), default
    assert "<list[str]>" not in out.stdout and "MADDR" in out.stdout
    assert peer("join", "-h").stdout == out.stdout
    assert peer("-h").returncode == 0 and "join" in peer("-h").stdout


def test_version():
    out = peer("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"peer {version('peer')}"


def test_builtin_task_names_match_the_registry():
    from peer.tasks import BUILTIN

    assert tuple(BUILTIN) == BUILTIN_TASKS


def test_multiaddr_parser():
    assert parse_multiaddr(f"/ip4/1.2.3.4/tcp/5/p2p/{PID}") == [("ip4", "1.2.3.4"), ("tcp", "5"), ("p2p", PID)]
    assert parse_multiaddr("/ip6/::1/udp/5/quic-v1") == [("ip6", "::1"), ("udp", "5"), ("quic-v1", None)]
    assert parse_multiaddr("/dns4/example.org/tcp/443/wss/") == [("dns4", "example.org"), ("tcp", "443"), ("wss", None)]
    for bad in ("", "ip4/1.2.3.4", "/ip4/1.2.3.4/tcp", "/ip4/1.2.3.4/tcp/70000", "/ip4//tcp/1", "/foo/1", f"/ip4/1.2.3.4/tcp/1/p2p/{PID[:-5]}!!!!!"):
        with pytest.raises(ValueError):
            parse_multiaddr(bad)
    check_initial_peer(f"/dns/peer.example.org/tcp/31337/p2p/{PID}")
    with pytest.raises(StartError, match="placeholder"):
        check_initial_peer("/ip4/1.2.3.4/tcp/5/p2p/<peer-id>")


def test_join_line_lists_every_usable_address_in_order():
    cfg = PeerConfig(run_id="r", task="t", announce=["/ip4/198.51.100.7/tcp/4001"])
    addrs = [f"/ip4/127.0.0.1/tcp/5/p2p/{PID}", f"/ip4/192.168.1.20/tcp/5/p2p/{PID}", f"/ip4/0.0.0.0/tcp/5/p2p/{PID}",
             f"/ip4/93.184.216.34/tcp/5/p2p/{PID}", f"/ip6/fe80::1/tcp/5/p2p/{PID}", f"/ip4/10.0.0.3/tcp/5/p2p/{PID}",
             f"/ip6/2001:db8::5/tcp/5/p2p/{PID}"]
    usable, loopback_only = shareable_addrs(cfg.announce, addrs, PID)
    assert not loopback_only
    # announced, then public, then private (2001:db8:: is documentation space: not global)
    assert usable == [f"/ip4/198.51.100.7/tcp/4001/p2p/{PID}", f"/ip4/93.184.216.34/tcp/5/p2p/{PID}",
                      f"/ip4/192.168.1.20/tcp/5/p2p/{PID}", f"/ip4/10.0.0.3/tcp/5/p2p/{PID}", f"/ip6/2001:db8::5/tcp/5/p2p/{PID}"]
    text = join_line(cfg, addrs, PID)
    assert text.startswith("To join this run from another machine:")
    assert text.count("--initial-peer") == len(usable) and "0.0.0.0" not in text and "127.0.0.1" not in text


def test_join_line_says_when_only_loopback_is_left():
    cfg = PeerConfig(run_id="r", task="t")
    text = join_line(cfg, [f"/ip4/127.0.0.1/tcp/5/p2p/{PID}", f"/ip4/0.0.0.0/tcp/5/p2p/{PID}"], PID)
    assert "this machine only" in text and f"--initial-peer /ip4/127.0.0.1/tcp/5/p2p/{PID}" in text
    assert text.count("--initial-peer") == 1


def test_join_line_from_two_interfaces_lists_both():
    cfg = PeerConfig(run_id="r", task="t")
    usable, _ = shareable_addrs([], ["/ip4/127.0.0.1/tcp/5", "/ip4/10.1.0.2/tcp/5", "/ip4/172.16.4.2/tcp/5"], PID)
    assert usable == [f"/ip4/10.1.0.2/tcp/5/p2p/{PID}", f"/ip4/172.16.4.2/tcp/5/p2p/{PID}"]
    assert join_line(cfg, ["/ip4/10.1.0.2/tcp/5", "/ip4/172.16.4.2/tcp/5"], PID).count("--initial-peer") == 2


def test_defaults_pass_the_checks(tmp_path):
    from peer.preflight import check_config

    check_config(PeerConfig(data_dir=tmp_path / "d", listen=["/ip4/127.0.0.1/tcp/0"]))
