"""Start, watch and stop real `peer join` processes on this machine (quickstart, tests, experiments).

Each `LocalPeer` is one daemon process with its own data dir, listening on 127.0.0.1. Its stdout
and stderr go to files in the data dir, so a failure can be explained from its log tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peer.control import NoDaemon, request


class PeerProcessError(RuntimeError):
    pass


class LocalPeer:
    def __init__(self, data_dir: Path, args: list[str] | None = None, env: dict[str, str] | None = None,
                 listen: str = "/ip4/127.0.0.1/tcp/0", prefix: list[str] | None = None):
        """`prefix` runs the daemon through another command, e.g. `ip netns exec NS` (experiments
        with network conditions, peer/experiment/network.py); `listen` is then that namespace's address."""
        self.data_dir = Path(data_dir)
        self.args = list(args or [])
        self.env = env
        self.listen = listen
        self.prefix = list(prefix or [])
        self.proc: subprocess.Popen | None = None
        self.peer_id: str | None = None
        self.addrs: list[str] = []

    @property
    def socket(self) -> Path:
        return self.data_dir / "control.sock"

    def start(self, extra: list[str] | None = None) -> LocalPeer:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = [*self.prefix, sys.executable, "-m", "cli.main", "join", "--data-dir", str(self.data_dir),
               "--listen", self.listen, *self.args, *(extra or [])]
        out = open(self.data_dir / "stdout.log", "ab")
        err = open(self.data_dir / "stderr.log", "ab")
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        out.close()
        err.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        """The daemon's status, or None while it is not answering."""
        try:
            reply = request(self.socket, "status", timeout=5)
        except (NoDaemon, OSError, ValueError):
            return None
        return reply.get("status") if reply.get("ok") else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.data_dir / "stderr.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll the control socket until the daemon is training (there is no event to wait on
        across processes); raise with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise PeerProcessError(f"peer in {self.data_dir} exited with {self.proc.returncode}:\n{self.log_tail()}")
            s = self.status()
            if s is not None and s["phase"] == "training":
                self.peer_id, self.addrs = s["peer_id"], s["addrs"]
                return s
            time.sleep(0.2)
        raise PeerProcessError(f"peer in {self.data_dir} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def request_leave(self) -> None:
        """Ask for a graceful leave (what `peer leave` does); SIGTERM if the socket is not answering."""
        try:
            request(self.socket, "leave", timeout=5)
        except (NoDaemon, OSError):
            if self.alive:
                self.proc.send_signal(signal.SIGTERM)

    def leave(self, timeout: float = 60.0) -> int:
        """Graceful leave; returns the exit code."""
        self.request_leave()
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL: no checkpoint, no goodbye, as a crashed machine."""
        if self.alive:
            self.proc.kill()
        return self.wait_exit(30)

    def wait_exit(self, timeout: float) -> int:
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise PeerProcessError(f"peer in {self.data_dir} did not exit within {timeout:.0f}s:\n{self.log_tail()}") from None


def start_swarm(root: Path, n: int, args: list[str], first_timeout: float = 90.0) -> list[LocalPeer]:
    """Start `n` peers with shards i/n: the first alone, the rest bootstrapping from it."""
    first = LocalPeer(root / "peer0", [*args, "--shard", f"0/{n}"]).start()
    peers = [first]
    try:
        first.wait_ready(first_timeout)
        for i in range(1, n):
            peers.append(LocalPeer(root / f"peer{i}", [*args, "--shard", f"{i}/{n}", "--initial-peer", first.addrs[0]]).start())
        for p in peers[1:]:
            p.wait_ready(first_timeout)
    except BaseException:
        stop_all(peers)
        raise
    return peers


def stop_all(peers: list[LocalPeer], timeout: float = 60.0) -> None:
    for p in peers:
        if p.alive:
            p.request_leave()
    for p in peers:
        try:
            p.wait_exit(timeout)
        except PeerProcessError:
            pass
