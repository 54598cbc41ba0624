"""What `peer join` checks before torch and p2pd load: settings, multiaddrs, ports, the task's module.

Every problem found here, and every start failure the daemon meets later (peer/main.py), is a
`StartError`; the CLI prints it as one line, `cannot start: <reason and fix>`, and exits 2. This
module must stay torch-free and hivemind-free: it runs in the first fraction of a second.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import ipaddress
import math
import socket
from pathlib import Path
from typing import Any

from peer.aggregation import DESCRIPTIONS as AGGREGATORS
from peer.config import PeerConfig, load_allowed_peers, resolve

# peer.tasks.BUILTIN's names (that module imports torch; tests check the two agree)
BUILTIN_TASKS = ("mnist1d-cnn", "mnist1d-linear", "digits-mlp", "lm-tiny", "lm", "lm-large")


class StartError(Exception):
    """A reason `peer join` cannot start, worded for the volunteer, with the fix."""


# --- multiaddrs ------------------------------------------------------------------------------
# The subset of multiaddr protocols a peer's addresses use; anything else is refused here rather
# than by p2pd after torch has loaded.
_WITH_VALUE = {"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr", "tcp", "udp", "p2p", "ipfs", "ip6zone", "sni", "certhash"}
_FLAGS = {"quic", "quic-v1", "ws", "wss", "tls", "noise", "webtransport", "webrtc", "webrtc-direct", "p2p-circuit", "http", "https"}
_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr")
_BASE58 = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def is_placeholder(peer_id: str) -> bool:
    return "..." in peer_id or "…" in peer_id or peer_id.startswith("<") or peer_id.upper() in {"ID", "PEER_ID", "PEERID", "QM"}


def parse_multiaddr(text: str) -> list[tuple[str, str | None]]:
    """[(protocol, value or None)] of a multiaddr in text form; ValueError says what is wrong."""
    if not text.startswith("/"):
        raise ValueError("a multiaddr starts with '/', e.g. /ip4/203.0.113.5/tcp/31337")
    parts = text[1:].split("/")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash is harmless
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(parts):
        name = parts[i]
        if name in _FLAGS:
            out.append((name, None))
            i += 1
            continue
        if name not in _WITH_VALUE:
            raise ValueError(f"unknown protocol {name!r}" if name else "empty part ('//')")
        if i + 1 >= len(parts) or parts[i + 1] == "":
            raise ValueError(f"/{name} needs a value")
        value = parts[i + 1]
        if name == "ip4":
            _ip(value, ipaddress.IPv4Address, "IPv4")
        elif name == "ip6":
            _ip(value, ipaddress.IPv6Address, "IPv6")
        elif name in ("tcp", "udp"):
            if not value.isdigit() or int(value) > 65535:
                raise ValueError(f"/{name}/{value}: a port is a number from 0 to 65535")
        elif name in ("p2p", "ipfs"):
            if is_placeholder(value):
                raise ValueError(f"{value!r} is a placeholder, not a peer id: paste the whole address the other "
                                 "peer printed at start (under 'To join this run')")
            if not set(value) <= _BASE58 or not 40 <= len(value) <= 100:
                raise ValueError(f"/p2p/{value[:60]}: not a peer id (a peer id looks like Qm... with 46 letters and digits)")
        elif name.startswith("dns") and not all(c.isalnum() or c in "-." for c in value):
            raise ValueError(f"/{name}/{value}: not a host name")
        out.append((name, value))
        i += 2
    if not out:
        raise ValueError("empty address")
    return out


def _ip(value: str, kind, label: str) -> None:
    try:
        kind(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an {label} address") from None


def _field(parts: list[tuple[str, str | None]], *names: str) -> tuple[str, str | None] | None:
    return next(((n, v) for n, v in parts if n in names), None)


def has_peer_id(addr: str) -> bool:
    try:
        return _field(parse_multiaddr(addr), "p2p", "ipfs") is not None
    except ValueError:
        return False


def check_initial_peer(addr: str) -> None:
    """An address with /p2p/<id>, or a plain TCP one (HOST/tcp/PORT) whose peer id `peer join`
    learns from whoever answers there (protocols/transport/peer_id_lookup.py)."""
    from protocols.transport.peer_id_lookup import lookup_target

    flag = "--initial-peer"
    parts = _parsed(flag, addr)
    _need_host_and_port(flag, addr, parts)
    if _field(parts, "p2p", "ipfs") is None and lookup_target(addr) is None:
        raise StartError(f"{flag} {addr}: without /p2p/<peer id> only HOST/tcp/PORT can be looked up (e.g. "
                         f"/dns4/boot.example.org/tcp/31337): use that, or the whole address the peer printed, e.g. {EXAMPLE}")


def check_relay(addr: str) -> None:
    """A `--relay` is a peer's direct address with its id: the relay must be dialled directly."""
    parts = _parsed("--relay", addr)
    if _field(parts, "p2p-circuit") is not None:
        raise StartError(f"--relay {addr}: a relay is dialled directly: give its own address (the line it printed "
                         "at start), not a /p2p-circuit one")
    if _field(parts, "p2p", "ipfs") is None:
        raise StartError(f"--relay {addr}: no /p2p/<peer id> at the end: use the whole address the relay peer "
                         "printed at start (it runs with --relay-service), e.g. " + EXAMPLE)
    _need_host_and_port("--relay", addr, parts)


def check_listen(addr: str) -> None:
    parts = _parsed("--listen", addr)
    host = _field(parts, *_HOSTS)
    if host is None or host[0] not in ("ip4", "ip6"):
        raise StartError(f"--listen {addr}: listen on an IP address of this machine, e.g. /ip4/0.0.0.0/tcp/31337 (0: any free port)")
    if _field(parts, "tcp", "udp") is None:
        raise StartError(f"--listen {addr}: no port: add /tcp/PORT, e.g. /ip4/0.0.0.0/tcp/31337 (0: any free port)")
    if _field(parts, "p2p", "ipfs") is not None:
        raise StartError(f"--listen {addr}: leave out /p2p/...: a daemon listens under its own peer id")
    check_port_free(addr, parts)


def check_announce(addr: str) -> None:
    parts = _parsed("--announce", addr)
    _need_host_and_port("--announce", addr, parts)
    if _field(parts, "p2p", "ipfs") is not None:
        raise StartError(f"--announce {addr}: leave out /p2p/...: the daemon adds its own peer id")


def _parsed(flag: str, addr: str) -> list[tuple[str, str | None]]:
    try:
        return parse_multiaddr(addr)
    except ValueError as e:
        what = "" if "placeholder" in str(e) else "not a multiaddr: "
        raise StartError(f"{flag} {addr}: {what}{e}") from None


def _need_host_and_port(flag: str, addr: str, parts: list[tuple[str, str | None]]) -> None:
    if _field(parts, *_HOSTS) is None:
        raise StartError(f"{flag} {addr}: no host: an address starts with /ip4/, /ip6/ or /dns/, e.g. {EXAMPLE}")
    port = _field(parts, "tcp", "udp")
    if port is None or port[1] == "0":
        raise StartError(f"{flag} {addr}: needs a real port (/tcp/PORT, not 0), e.g. {EXAMPLE}")


def check_port_free(addr: str, parts: list[tuple[str, str | None]]) -> None:
    """A fixed TCP listen port that another program holds is refused now, not by p2pd later."""
    host, port = _field(parts, "ip4", "ip6"), _field(parts, "tcp")
    if host is None or port is None or port[1] == "0":
        return
    family = socket.AF_INET if host[0] == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for p2pd too
        try:
            s.bind((host[1], int(port[1])))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartError(f"--listen {addr}: port {port[1]} is in use (another peer daemon?): pick another "
                                 "port, or tcp/0 for any free one") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise StartError(f"--listen {addr}: {host[1]} is not an address of this machine: use one of its "
                                 "addresses, or 0.0.0.0 for all") from None
            if e.errno == errno.EACCES:
                raise StartError(f"--listen {addr}: ports below 1024 need root: pick a port from 1024 up") from None
            raise StartError(f"--listen {addr}: cannot listen there: {e.strerror or e}") from None


# --- settings --------------------------------------------------------------------------------
def load_config(explicit: dict[str, Any], config_file: Path | None) -> PeerConfig:
    """`peer.config.resolve`, with every problem of the TOML files as a StartError."""
    if config_file is not None and not Path(config_file).is_file():
        raise StartError(f"--config {config_file}: no such file")
    try:
        return resolve(explicit, config_file)
    except OSError as e:
        raise StartError(f"{e.filename or config_file}: {e.strerror or e}") from None
    except ValueError as e:  # not TOML, an unknown setting, a value of the wrong kind (peer.config words it)
        raise StartError(str(e)) from None


def check_config(cfg: PeerConfig, threads: int = 1) -> None:
    """Every setting that can be checked without torch; raises StartError for the first bad one."""
    if not cfg.run_id or len(cfg.run_id) > 128 or any(c.isspace() for c in cfg.run_id):
        raise StartError(f"--run-id {cfg.run_id!r}: a run id is 1-128 characters without spaces")
    check_task(cfg.task)
    if cfg.aggregator not in AGGREGATORS:
        close = difflib.get_close_matches(cfg.aggregator, list(AGGREGATORS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise StartError(f"--aggregator {cfg.aggregator!r} is unknown: {hint}one of {', '.join(AGGREGATORS)}")
    if cfg.shard:
        check_shard(cfg.shard)
    if cfg.split not in ("iid", "dirichlet"):
        raise StartError(f"--split {cfg.split!r}: use iid or dirichlet")
    if cfg.log_format not in ("text", "json"):
        raise StartError(f"--log-format {cfg.log_format!r}: use text or json")
    _number("--alpha", cfg.alpha, low=0.0, low_open=True)
    _number("--byzantine-fraction", cfg.byzantine_fraction, low=0.0, high=0.5, high_open=True)
    if cfg.max_steps is not None:
        _number("--max-steps", cfg.max_steps, low=0)
    _number("--threads", threads, low=0)
    if cfg.outer_every_steps is not None:
        _number("--outer-every-steps", cfg.outer_every_steps, low=0)
    if cfg.outer_lr is not None:
        _number("--outer-lr", cfg.outer_lr, low=0.0, low_open=True)
    if cfg.outer_momentum is not None:
        _number("--outer-momentum", cfg.outer_momentum, low=0.0, high=1.0, high_open=True)
    # join-sync-timeout-s 0: start from the run's initial model without syncing (benchmarks
    # whose peers all start together)
    for name in ("max_upload_mbps", "max_download_mbps", "step_delay_s", "join_sync_timeout_s", "initial_peer_wait_s"):
        _number(_flag(name), getattr(cfg, name), low=0.0)
    for name in ("heartbeat_s", "gossip_every_s", "pull_timeout_s", "max_pull_s", "checkpoint_every_s",
                 "eval_every_s", "read_timeout_s"):
        _number(_flag(name), getattr(cfg, name), low=0.0, low_open=True)
    for name in ("partners", "num_shards", "max_concurrent_serves", "max_serves_per_peer"):
        _number(_flag(name), getattr(cfg, name), low=1)
    for name in ("gossip_every_steps", "gossip_steps_until", "outer_sync_every"):
        if getattr(cfg, name) is not None:
            _number(_flag(name), getattr(cfg, name), low=0)
    _number("train-nice", cfg.train_nice, low=0, high=19)
    if cfg.metrics_port is not None:
        _number("metrics-port", cfg.metrics_port, low=0, high=65535)
    try:
        load_allowed_peers(cfg.allow_peers)
    except ValueError as e:
        raise StartError(f"{e}: one peer id per line ('#' starts a comment)") from None
    for addr in cfg.initial_peers:
        check_initial_peer(addr)
    if not cfg.listen:
        raise StartError("--listen: no address to listen on, e.g. /ip4/0.0.0.0/tcp/0")
    for addr in cfg.relays:
        check_relay(addr)
    for addr in cfg.listen:
        check_listen(addr)
    for addr in cfg.announce:
        check_announce(addr)
    check_data_dir(Path(cfg.data_dir))


def _flag(name: str) -> str:
    return ("--" if name in ("max_upload_mbps", "max_download_mbps") else "") + name.replace("_", "-")


def _number(flag: str, value: float, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise StartError(f"{flag} {value}: must be a number {' and '.join(x for x in (lo, hi) if x)}")


def check_shard(shard: str) -> None:
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise StartError(f"--shard {shard!r}: write it i/n, e.g. 0/4 for the first of 4 shards") from None
    if not (n >= 1 and 0 <= i < n):
        raise StartError(f"--shard {shard}: needs 0 <= i < n, e.g. 0/4 ... 3/4")


def check_task(task: str) -> None:
    if task in BUILTIN_TASKS:
        return
    if ":" not in task:
        close = difflib.get_close_matches(task, BUILTIN_TASKS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise StartError(f"--task {task!r} is unknown: {hint}built-in are {', '.join(BUILTIN_TASKS)}, or module:function for your own")
    module, func = task.split(":", 1)
    if not module or not func.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise StartError(f"--task {task!r}: a task of your own is module:function, e.g. my_task:build")
    try:
        found = importlib.util.find_spec(module)
    except Exception as e:  # a parent package that fails to import
        raise StartError(f"--task {task}: cannot import {module}: {type(e).__name__}: {e}") from None
    if found is None:
        raise StartError(f"--task {task}: no module {module!r} on the Python path: start from its folder or set PYTHONPATH")


def check_data_dir(path: Path) -> None:
    from peer.datadir import LocalStateError, check_data_dir as check

    try:
        check(path)
    except LocalStateError as e:
        raise StartError(str(e)) from None
