"""`peer doctor`'s checks: install, data dir, identity, checkpoint, disk, daemon, listen
addresses, reachability from a peer of the run, clock skew.

Each check is a plain function returning a `Check` (ok, warn or fail, what was found, and the
fix); `run_checks` runs them in order and is all the CLI (`cli/doctor.py`) needs. What must stay
true: the checks change nothing (no data dir, key or lock file is created; the data-dir lock is
taken for an instant only to see whether a daemon holds it), start no p2pd, and work while a
daemon runs on the same data dir (its control socket then supplies the addresses and peers).
The network checks use py-libp2p (`protocols/transport/light.py`), which must be imported before
hivemind: `run_checks` imports it first, and only `check_identity` imports hivemind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peer.config import PeerConfig

MIN_PYTHON = (3, 11)
# a checkpoint write needs room for the new file beside the old one (temp file, then rename)
UNSIZED_CHECKPOINT_BYTES = 256 << 20  # asked of a data dir that has no checkpoint to size one from
MAX_PROBED_PEERS = 4  # asked at once, each within PROBE_TIMEOUT_S
PROBE_TIMEOUT_S = 10.0
PING = "DHTProtocol.rpc_ping"  # hivemind's handler: its reply carries the peer's clock (dht_time)


@dataclass
class Check:
    name: str
    level: str  # "ok", "warn" or "fail"
    what: str
    fix: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.level:<4}  {self.name}: {self.what}" + (f" — {self.fix}" if self.fix else "")

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "level": self.level, "what": self.what, "fix": self.fix, **self.detail}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# --- install ---------------------------------------------------------------------------------
def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if tuple(version[:2]) < MIN_PYTHON:
        return Check("python", "fail", f"Python {text}", f"install Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    return Check("python", "ok", f"Python {text} ({sys.executable})")


def check_torch() -> Check:
    try:
        import torch
    except Exception as e:
        return Check("torch", "fail", f"cannot import torch ({type(e).__name__}: {e})",
                     "reinstall peer's dependencies (pip install -e . in the repository)")
    return Check("torch", "ok", f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def p2pd_path() -> Path | None:
    """Where hivemind keeps its p2pd binary, found without importing hivemind."""
    import importlib.util

    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "hivemind_cli" / "p2pd"


def check_p2pd(path: Path | None = None, run: bool = True) -> Check:
    """The binary is there, executable, and runs on this machine (`p2pd -h` prints its usage:
    it starts no daemon)."""
    import subprocess

    path = path or p2pd_path()
    fix = "reinstall hivemind (pip install --force-reinstall hivemind)"
    if path is None:
        return Check("p2pd", "fail", "hivemind is not installed", fix)
    if not path.is_file():
        return Check("p2pd", "fail", f"no p2pd binary at {path}", fix)
    if not os.access(path, os.X_OK):
        return Check("p2pd", "fail", f"{path} is not executable (mode {stat.S_IMODE(path.stat().st_mode):04o})",
                     f"chmod +x {path}")
    if run:
        try:
            out = subprocess.run([str(path), "-h"], capture_output=True, timeout=10)
        except OSError as e:
            return Check("p2pd", "fail", f"{path} does not run here ({e.strerror or e})", fix)
        except subprocess.TimeoutExpired:
            return Check("p2pd", "fail", f"{path} -h did not answer within 10 s", fix)
        if b"Usage of" not in out.stdout + out.stderr:
            return Check("p2pd", "fail", f"{path} -h did not print p2pd's usage (exit {out.returncode})", fix)
    return Check("p2pd", "ok", f"{path}")


def check_libp2p() -> Check:
    """py-libp2p imports (for `peer swarm` and the network checks here). Imports the light client,
    which has to come before hivemind in a process."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import protocols.transport.light  # noqa: F401
    except Exception as e:
        return Check("libp2p", "fail", f"cannot import py-libp2p ({type(e).__name__}: {e})",
                     "pip install 'libp2p>=0.8,<0.9' (peer swarm and peer doctor's network checks need it)")
    try:
        v = version("libp2p")
    except PackageNotFoundError:
        v = "unknown version"
    return Check("libp2p", "ok", f"py-libp2p {v}")


# --- data dir ---------------------------------------------------------------------------------
def check_data_dir(path: Path) -> Check:
    from peer.datadir import LocalStateError, check_data_dir as check

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return Check("data dir", "fail", f"{path} does not exist and {parent} is not writable",
                         "pick a folder this user can write (--data-dir DIR)")
        return Check("data dir", "ok", f"{path} does not exist yet; peer join creates it (mode 0700)")
    try:
        check(path)  # changes nothing that exists: a probe file is written and removed
    except LocalStateError as e:
        return Check("data dir", "fail", str(e), "pick another --data-dir, or fix this one's owner and mode")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("data dir", "warn", f"{path} is mode {mode:04o}: other users can read its logs and metrics",
                     f"chmod 700 {path} (peer join also does it at start)", {"mode": f"{mode:04o}"})
    return Check("data dir", "ok", f"{path}: writable, mode {mode:04o}", detail={"mode": f"{mode:04o}"})


def check_identity(path: Path) -> Check:
    """The identity key (the peer id other peers know this one by): readable, a valid key, private."""
    path = Path(path)
    if not os.path.lexists(path):
        return Check("identity", "ok", f"no key yet at {path}: the first peer join (or peer identity) creates one")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return Check("identity", "fail", f"identity key {path} is unreadable ({e.strerror or e})",
                     f"give it back to this user (chown $USER {path}; chmod 400 {path})")
    from protocols.transport.hivemind import IdentityError, ensure_identity

    try:
        peer_id = ensure_identity(str(path))  # reads an existing key, never writes one
    except IdentityError as e:
        return Check("identity", "fail", str(e).split("; ")[0],
                     f"move {path} away to start with a new identity (other peers then see a new peer)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("identity", "warn", f"{path} is mode {mode:04o}: other users can read this peer's private key",
                     f"chmod 400 {path}", {"peer_id": peer_id})
    return Check("identity", "ok", f"peer id {peer_id}", detail={"peer_id": peer_id})


def run_checkpoints(data_dir: Path, run_id: str) -> list[Path]:
    """The checkpoint files that may belong to `run_id` (one per task; names: peer/state.py)."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)[:40]
    return sorted(p for p in Path(data_dir).glob(f"checkpoint-{safe}-*.pt") if p.is_file())


def check_checkpoint(data_dir: Path, run_id: str) -> Check:
    """Every checkpoint of the run loads (memory-mapped: a large one costs no memory)."""
    from peer.state import load_checkpoint

    found, problems = [], []
    for path in run_checkpoints(data_dir, run_id):
        try:
            state = load_checkpoint(path, mmap=True)
        except ValueError as e:
            problems.append(str(e))
            continue
        if state is None or state.get("run_id") != run_id:
            continue  # another run whose name shortens alike
        found.append(f"{path.name} (task {state.get('task')}, step {state.get('step')}, {_size(path.stat().st_size)})")
    if problems:
        return Check("checkpoint", "warn", "; ".join(problems),
                     "peer join moves it aside (.bad-<time>) and starts from the swarm's model; move it away yourself to keep it elsewhere")
    if not found:
        return Check("checkpoint", "ok", f"none for run {run_id} yet (a new peer starts from the swarm's model)")
    return Check("checkpoint", "ok", "readable: " + ", ".join(found))


def check_disk(data_dir: Path, run_id: str, free_bytes: float | None = None) -> Check:
    """Room for one more checkpoint: a save writes the new file before the old one goes."""
    from peer.state import NEARLY_FULL_BYTES

    data_dir = Path(data_dir)
    where = next((p for p in [data_dir, *data_dir.parents] if p.exists()), data_dir)
    if free_bytes is None:
        free_bytes = shutil.disk_usage(where).free
    sizes = [p.stat().st_size for p in (run_checkpoints(data_dir, run_id) or sorted(data_dir.glob("checkpoint-*.pt")))]
    need = max(sizes) + NEARLY_FULL_BYTES if sizes else UNSIZED_CHECKPOINT_BYTES
    sized = (f"a checkpoint of this run needs {_size(need)}" if sizes
             else f"no checkpoint here yet to size one from; asking for {_size(need)}")
    detail = {"free_bytes": int(free_bytes), "need_bytes": int(need)}
    fix = "free space on that disk, or use a --data-dir on another one"
    if free_bytes < NEARLY_FULL_BYTES:
        return Check("disk", "fail", f"{_size(free_bytes)} free in {where}: checkpoints cannot be saved", fix, detail)
    if free_bytes < need:
        return Check("disk", "warn", f"{_size(free_bytes)} free in {where} ({sized})", fix, detail)
    return Check("disk", "ok", f"{_size(free_bytes)} free in {where} ({sized})", detail=detail)


# --- the running daemon and the listen addresses ----------------------------------------------
def lock_held(data_dir: Path) -> bool:
    """Whether a daemon holds the data dir's lock: taken and released at once, never created."""
    try:
        fd = os.open(Path(data_dir) / "lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock
    return False


def check_daemon(data_dir: Path, socket_name: str = "control.sock") -> tuple[Check, dict[str, Any] | None]:
    """(check, the daemon's status or None when no daemon answers)."""
    from peer.control import NoDaemon, request

    path = Path(data_dir) / socket_name
    try:
        reply = request(path, "status", timeout=5)
    except NoDaemon:
        if lock_held(data_dir):
            return Check("daemon", "warn", f"a daemon holds {Path(data_dir) / 'lock'} but does not answer on {path}",
                         "it is starting (wait a few seconds) or hung (stop it: peer leave, or kill its process)"), None
        return Check("daemon", "ok", f"not running on {data_dir}; the checks below use the settings, not a live daemon",
                     detail={"running": False}), None
    except (OSError, ValueError) as e:
        return Check("daemon", "warn", f"the daemon at {path} did not answer ({type(e).__name__}: {e})",
                     "it may be busy: try again, or look at daemon.log in the data dir"), None
    if not reply.get("ok"):
        return Check("daemon", "warn", f"the daemon refused the status request: {reply.get('error')}",
                     "the daemon is another version than this command: restart it"), None
    s = reply["status"]
    what = (f"running (pid {s.get('pid')}, run {s.get('run_id')}, task {s.get('task')}, {s.get('phase')}, "
            f"step {s.get('step')}, {_count(len(s.get('live_peers') or []), 'live peer')})")
    return Check("daemon", "ok", what, detail={"running": True, "peer_id": s.get("peer_id"), "addrs": s.get("addrs", [])}), s


def check_listen(listen: list[str], daemon_addrs: list[str] | None) -> Check:
    """The configured listen addresses can be bound; with a daemon running, what it listens on."""
    from peer.preflight import StartError, check_port_free, parse_multiaddr

    if daemon_addrs is not None:
        if not daemon_addrs:
            return Check("listen", "warn", "the daemon reports no listen address yet", "wait until it has started")
        return Check("listen", "ok", "the daemon listens on " + ", ".join(a.split("/p2p/")[0] for a in daemon_addrs),
                     detail={"addrs": daemon_addrs})
    notes = []
    for addr in listen:
        try:
            parts = parse_multiaddr(addr)
        except ValueError as e:
            return Check("listen", "fail", f"--listen {addr}: not a multiaddr: {e}", "e.g. --listen /ip4/0.0.0.0/tcp/31337")
        try:
            check_port_free(addr, parts)
        except StartError as e:
            what, _, fix = str(e).partition(": pick")
            return Check("listen", "fail", what, ("pick" + fix) if fix else "", {"addrs": listen})
        port = next((v for n, v in parts if n == "tcp"), None)
        notes.append(f"{addr} (any free port: others learn it from the join line)" if port == "0" else f"{addr} is free")
    return Check("listen", "ok", "; ".join(notes), detail={"addrs": listen})


# --- peers of the run: reachability and clock --------------------------------------------------
@dataclass
class Probe:
    """What one peer of the run answered."""

    peer: str
    addrs: list[str]
    error: str | None = None  # why it could not be reached
    ping: tuple[float, float, float] | None = None  # (local time sent, its dht_time, local time received)
    dialback: Any = None  # peer.reachability.DialBack, when a dial-back was asked


def peers_to_ask(initial: list[str], status: dict[str, Any] | None, data_dir: Path, run_id: str) -> dict[str, list[str]]:
    """peer id -> addresses: `--initial-peer` first, then the running daemon's live peers, then the
    peers the data dir remembers for the run (`peer/known_peers.py`)."""
    from peer.known_peers import KnownPeers

    out: dict[str, list[str]] = {}

    def add(full: str) -> None:
        base, _, pid = full.partition("/p2p/")
        if pid and base not in out.setdefault(pid, []):
            out[pid].append(base)

    for a in initial:
        add(a)
    self_id = (status or {}).get("peer_id")
    for p in (status or {}).get("live_peers") or []:
        for a in p.get("addrs", []):
            add(a if "/p2p/" in a else f"{a}/p2p/{p['peer_id']}")
    for a in KnownPeers(data_dir, run_id, self_id).dial_addrs():
        add(a)
    out.pop(self_id, None)
    return out


def probe_peers(peers: dict[str, list[str]], dialback_addrs: list[str] | None, max_tried: int = MAX_PROBED_PEERS,
                timeout: float = PROBE_TIMEOUT_S) -> list[Probe]:
    """Dial the first `max_tried` peers of the run at once with py-libp2p (no p2pd): ping each
    twice (its clock), and ask it to dial `dialback_addrs` back (the daemon's addresses)."""
    import logging

    import trio

    from protocols import dialback
    from protocols.transport.light import LightClient, LightError, transport_addrs

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # every failed dial would be logged
    from hivemind.proto import dht_pb2  # after light.py (see its docstring)

    from peer.reachability import DialBack

    async def probe(client, peer: str, addrs: list[str]) -> Probe:
        result = Probe(peer, addrs)
        if not transport_addrs(addrs):
            result.error = "no TCP address to dial"
            return result
        try:
            with trio.fail_after(timeout):
                for _ in range(2):  # the first ping includes the connection; the faster one counts
                    sent = time.time()
                    reply = dht_pb2.PingResponse.FromString(
                        await client.call_unary(peer, addrs, PING, dht_pb2.PingRequest().SerializeToString()))
                    got = time.time()
                    if result.ping is None or got - sent < result.ping[2] - result.ping[0]:
                        result.ping = (sent, reply.dht_time, got)
        except trio.TooSlowError:
            result.error = f"no answer within {timeout:g} s"
            return result
        except LightError as e:
            result.error = str(e)
            return result
        if dialback_addrs:
            try:
                with trio.fail_after(timeout):
                    raw = await client.call_unary(peer, addrs, dialback.PROTOCOL, dialback.encode_request(dialback_addrs))
                reply = dialback.decode_reply(raw)
                result.dialback = DialBack(peer, reply.dialled, reply.observed)
            except trio.TooSlowError:
                result.dialback = DialBack(peer, error=f"no dial-back answer within {timeout:g} s")
            except (LightError, dialback.DialBackError) as e:
                text = str(e)
                if "does not serve" in text:
                    text = "the peer does not offer dial-back (an older version)"
                result.dialback = DialBack(peer, error=text)
        return result

    async def main() -> list[Probe]:
        chosen = list(peers.items())[:max_tried]
        done: list[Probe | None] = [None] * len(chosen)
        async with LightClient.open() as client:
            async def one(i: int, peer: str, addrs: list[str]) -> None:
                done[i] = await probe(client, peer, addrs)

            async with trio.open_nursery() as nursery:  # together: a dead peer costs `timeout` once
                for i, (peer, addrs) in enumerate(chosen):
                    nursery.start_soon(one, i, peer, addrs)
        return [p for p in done if p is not None]

    return trio.run(main)


def check_reachability(probes: list[Probe], daemon_addrs: list[str] | None, announce: list[str], data_dir: Path) -> Check:
    from peer.reachability import DialBack, verdict

    if not probes:
        return Check("reachability", "warn", "not tested: no peer of the run is known here",
                     "pass --initial-peer MADDR of a running peer of the run (the line its peer join printed)",
                     {"reachable": None})
    answered = [p for p in probes if p.error is None]
    if not answered:
        reasons = "; ".join(f"{p.peer[:12]}…: {p.error}" for p in probes)
        return Check("reachability", "fail", f"no peer of the run answers from here ({reasons})",
                     "check the addresses are current (ports change on restart), the peers run, and this machine "
                     "can reach them (firewall, proxy)", {"reachable": None, "dial_out": False})
    out = f"{len(answered)} of {len(probes)} peers of the run answer from here"
    if daemon_addrs is None:
        return Check("reachability", "ok", f"{out}; dial-back not tested: no daemon runs on {data_dir}",
                     "start peer join, then run peer doctor again to test that peers can reach it",
                     {"reachable": None, "dial_out": True})
    results = [p.dialback for p in answered if p.dialback is not None]
    dialback = next((d for d in results if d.error is None), None)
    if dialback is None:
        dialback = DialBack(error="; ".join(dict.fromkeys(d.error for d in results)) or "no dial-back asked")
    v = verdict(daemon_addrs, announce, dialback)
    return Check("reachability", v.level, f"{out}; {v.what}", v.fix,
                 {"reachable": v.reachable, "dial_out": True, "peer": dialback.peer, "dialled": dialback.dialled,
                  "observed": dialback.observed})


def check_clock(probes: list[Probe], heartbeat_s: float) -> Check:
    """This clock against the peers': records expire by the publisher's clock 3 heartbeats after they
    are published, so peers whose clocks differ by that much drop each other's records."""
    samples = []
    for p in probes:
        if p.ping is None:
            continue
        sent, remote, got = p.ping
        samples.append((remote - (sent + got) / 2, (got - sent) / 2, p.peer))
    if not samples:
        return Check("clock", "warn", "not tested: no peer of the run answered",
                     "pass --initial-peer MADDR of a running peer of the run")
    offset, error, peer = max(samples, key=lambda s: abs(s[0]) - s[1])
    lifetime = 3 * heartbeat_s
    direction = "behind" if offset > 0 else "ahead of"
    what = f"{abs(offset):.2f} s {direction} peer {peer[:12]}… (±{error:.2f} s; {_count(len(samples), 'peer')} asked)"
    detail = {"max_offset_s": round(offset, 3), "uncertainty_s": round(error, 3)}
    fix = "sync this machine's clock (timedatectl set-ntp true, or install chrony)"
    if abs(offset) - error >= lifetime:
        return Check("clock", "fail", f"{what}: records live {lifetime:g} s, so this peer and that one drop each "
                     "other's records", fix, detail)
    if abs(offset) - error >= heartbeat_s:
        return Check("clock", "warn", f"{what}: more than a heartbeat ({heartbeat_s:g} s); records live {lifetime:g} s",
                     fix, detail)
    return Check("clock", "ok", what, detail=detail)


# --- all of them --------------------------------------------------------------------------------
def guarded(name: str, fn: Callable[..., Any], *args: Any, debug: bool = False) -> Any:
    """`fn(*args)`, or a failed Check when the check itself raised (its traceback with --debug)."""
    try:
        return fn(*args)
    except Exception as e:
        if debug:
            traceback.print_exc()
        return Check(name, "fail", f"the check itself failed ({type(e).__name__}: {e})",
                     "rerun with --debug and report the traceback")


def run_checks(cfg: PeerConfig, config_error: str | None = None, debug: bool = False) -> list[Check]:
    """Every check, in the order printed."""
    checks = [] if config_error is None else [Check("settings", "fail", config_error, "fix the flag or file it names")]
    checks.append(guarded("python", check_python, debug=debug))
    checks.append(libp2p := guarded("libp2p", check_libp2p, debug=debug))  # before anything imports hivemind
    checks.append(guarded("torch", check_torch, debug=debug))
    checks.append(guarded("p2pd", check_p2pd, debug=debug))
    data_dir = Path(cfg.data_dir)
    checks.append(guarded("data dir", check_data_dir, data_dir, debug=debug))
    checks.append(guarded("identity", check_identity, cfg.identity_path, debug=debug))
    checks.append(guarded("checkpoint", check_checkpoint, data_dir, cfg.run_id, debug=debug))
    checks.append(guarded("disk", check_disk, data_dir, cfg.run_id, debug=debug))
    daemon = guarded("daemon", check_daemon, data_dir, cfg.socket_path.name, debug=debug)
    daemon_check, status = daemon if isinstance(daemon, tuple) else (daemon, None)
    checks.append(daemon_check)
    daemon_addrs = None if status is None else list(status.get("addrs") or [])
    checks.append(guarded("listen", check_listen, cfg.listen, daemon_addrs, debug=debug))
    if status is not None and status.get("run_id") not in (None, cfg.run_id):
        checks.append(Check("run", "warn", f"the daemon trains run {status.get('run_id')}, not {cfg.run_id}",
                            f"pass --run {status.get('run_id')} to check that run"))
    if libp2p.level == "fail":
        for name in ("reachability", "clock"):
            checks.append(Check(name, "warn", "not tested: py-libp2p is missing", libp2p.fix))
        return checks
    try:
        peers = peers_to_ask(cfg.initial_peers, status, data_dir, cfg.run_id)
        probes = probe_peers(peers, daemon_addrs)
    except Exception as e:
        if debug:
            traceback.print_exc()
        err = Check("reachability", "fail", f"the check itself failed ({type(e).__name__}: {e})",
                    "rerun with --debug and report the traceback")
        return [*checks, err, Check("clock", "warn", "not tested: the peers could not be asked")]
    checks.append(guarded("reachability", check_reachability, probes, daemon_addrs, cfg.announce, data_dir, debug=debug))
    checks.append(guarded("clock", check_clock, probes, cfg.heartbeat_s, debug=debug))
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.level == "fail" for c in checks) else 0
