"""Process entry for `peer join`: logging, the event loop (uvloop), signals, the join line, and
the start failures that become one `cannot start:` line (StartError)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace

from peer.config import PeerConfig
from peer.preflight import StartError, has_peer_id, parse_multiaddr


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": record.created, "level": record.levelname, "logger": record.name, "message": record.getMessage()})


def setup_logging(cfg: PeerConfig) -> None:
    fmt = _JsonFormatter() if cfg.log_format == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("peer")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    try:  # a data dir that cannot be created or written is reported by prepare_data_dir, in one line
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handlers.append(logging.FileHandler(cfg.data_dir / "daemon.log"))
    except OSError:
        pass
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False
    logging.getLogger("hivemind").setLevel(os.environ.get("PEER_HIVEMIND_LOGLEVEL", "WARNING"))


def shareable_addrs(announced: list[str], addrs: list[str], peer_id: str) -> tuple[list[str], bool]:
    """Addresses another machine could dial, with /p2p/<peer_id>: announced first, then public,
    then private, then relayed; never 0.0.0.0 or an IPv6 link-local one; loopback only when
    nothing else is left. The flag is True when the list is loopback only."""
    ranked: dict[str, float] = {}
    for rank_hint, addr in [(0, a) for a in announced] + [(None, a) for a in addrs]:
        try:
            parts = parse_multiaddr(addr)
        except ValueError:
            continue
        host = next(((n, v) for n, v in parts if n in ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr")), None)
        if host is None:
            continue
        rank = rank_hint
        if "/p2p-circuit" in addr:  # through a relay (protocols/transport/nat.py): after the direct ones
            rank = 2.5 if rank is None else rank
            full = addr if addr.endswith(f"/p2p/{peer_id}") else addr + f"/p2p/{peer_id}"
            ranked[full] = min(rank, ranked.get(full, rank))
            continue
        if rank is None:
            if host[0].startswith("dns"):
                rank = 1
            else:
                ip = ipaddress.ip_address(host[1])
                if ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
                    continue
                rank = 3 if ip.is_loopback else 1 if ip.is_global else 2
        full = addr.split("/p2p/", 1)[0] + f"/p2p/{peer_id}"
        ranked[full] = min(rank, ranked.get(full, rank))
    ordered = sorted(ranked, key=lambda a: ranked[a])  # stable: the daemon's order within a rank
    reachable = [a for a in ordered if ranked[a] < 3]
    return (reachable, False) if reachable else (ordered, bool(ordered))


def join_line(cfg: PeerConfig, addrs: list[str], peer_id: str) -> str:
    """What another volunteer pastes to join this peer's run: every address they could use, each
    as an `--initial-peer` (any one that answers is enough), with a header saying from where."""
    usable, loopback_only = shareable_addrs(cfg.announce, addrs, peer_id)
    command = f"peer join --run-id {cfg.run_id} --task {cfg.task}" + "".join(f" --initial-peer {a}" for a in usable)
    if loopback_only:
        return ("To join this run from this machine only (it listens on loopback alone; for other machines "
                "use --listen /ip4/0.0.0.0/tcp/PORT):\n  " + command)
    return "To join this run from another machine:\n  " + command


def resolve_initial_peers(addrs: list[str], wait_s: float, remembered: list[str] = (), lookup=None) -> tuple[list[str], list[str]]:
    """(the addresses to dial, each ending in /p2p/<id>; one line per address given without an id
    that nothing answered). An address without /p2p/ gets the id proven by whoever answers there
    (protocols/transport/peer_id_lookup.py). Raises StartError when nothing is left to dial: no
    initial peer and no peer `remembered` from earlier runs (peer/known_peers.py), which let a
    restarted peer rejoin while its bootstrap peer is away."""
    if lookup is None:
        from protocols.transport.peer_id_lookup import learn_peer_ids as lookup
    bare = [a for a in addrs if not has_peer_id(a)]
    learned = lookup(bare, wait_s) if bare else {}
    dial, failed = [], []
    for addr in addrs:
        if addr not in learned:
            dial.append(addr)
        elif isinstance(learned[addr], str):
            dial.append(f"{addr.rstrip('/')}/p2p/{learned[addr]}")
        else:
            failed.append(f"--initial-peer {addr}: {learned[addr]}")
    if failed and not dial and not remembered:
        raise StartError(f"{failed[0]} (or paste the whole address with /p2p/<id> that the peer printed at start)")
    return dial, failed


def start_failure(e: BaseException, cfg: PeerConfig) -> StartError | None:
    """A StartError for what p2pd or the daemon reports when it cannot start; None if unknown."""
    text = str(e)
    if "failed to connect to bootstrap peers" in text or (cfg.initial_peers and "failed to start in" in text):
        return StartError(f"no --initial-peer answered ({', '.join(cfg.initial_peers)}): check the peer is "
                          "running, the address is the one it printed now (ports change on restart), and "
                          "that this machine can reach it (firewall, NAT)")
    if "address already in use" in text:
        return StartError(f"--listen {' '.join(cfg.listen)}: the port is in use (another peer daemon?): pick "
                          "another port, or tcp/0 for any free one")
    if "cannot assign requested address" in text:
        return StartError(f"--listen {' '.join(cfg.listen)}: not an address of this machine: use one of its "
                          "addresses, or 0.0.0.0 for all")
    if type(e).__name__ in ("P2PDaemonError", "P2PHandlerError"):
        return StartError(f"the p2p daemon (p2pd) failed: {text.splitlines()[-1] if text else type(e).__name__}")
    return None


def run_daemon(cfg: PeerConfig, threads: int = 1) -> int:
    """Run a daemon until it leaves; its exit code. A failed start raises StartError."""
    setup_logging(cfg)
    log = logging.getLogger("peer")
    if cfg.initial_peers:  # before torch loads: a wrong address is said in seconds
        from peer.known_peers import KnownPeers

        dial, failed = resolve_initial_peers(cfg.initial_peers, cfg.initial_peer_wait_s,
                                             KnownPeers(cfg.data_dir, cfg.run_id).dial_addrs())
        for line in failed:
            log.warning("%s; joining through the %s", line, "other initial peers" if dial else "peers seen in earlier runs")
        for addr in (a for a in dial if a not in cfg.initial_peers):
            log.info("initial peer %s (the id is the one that answered there)", addr)
        cfg = replace(cfg, initial_peers=dial)

    import torch
    import uvloop

    from peer.config import load_allowed_peers
    from peer.daemon import DataDirLocked, PeerDaemon
    from peer.datadir import LocalStateError, prepare_data_dir
    from peer.known_peers import KnownPeers
    from protocols.discovery import run_key
    from protocols.transport.hivemind import HivemindTransport
    from protocols.transport.nat import NatSettings

    if threads > 0:
        torch.set_num_threads(threads)

    async def main() -> int:
        try:
            prepare_data_dir(cfg.data_dir, cfg.socket_path.name)  # before the identity key is read or made
            allowed = load_allowed_peers(cfg.allow_peers)
            known = KnownPeers(cfg.data_dir, cfg.run_id)
            nat = NatSettings(cfg.relays, cfg.auto_relay, cfg.hole_punching, cfg.relay_service)
            transport = HivemindTransport(str(cfg.identity_path), cfg.listen, cfg.announce, cfg.initial_peers,
                                          run_key=run_key(cfg.run_id), allowed=allowed, remembered=known.dial_addrs(),
                                          nat=nat)
            known.self_id = transport.peer_id
            behaviour = None
            if cfg.experiment_attack:  # EXPERIMENTS ONLY: an attacker's behaviour (peer/experiment/attacks.py)
                from peer.experiment.attacks import behaviour_for

                behaviour = behaviour_for(cfg.experiment_attack, transport.peer_id)
            daemon = PeerDaemon(cfg, transport, known_peers=known, behaviour=behaviour)
        except (ValueError, TypeError) as e:  # a bad setting or task (peer.tasks.load_task words it)
            raise StartError(str(e)) from e
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)

        async def announce() -> None:
            await daemon.listening.wait()
            if daemon.addrs:
                print(f"peer {daemon.peer_id} listening on:", *daemon.addrs, sep="\n  ", flush=True)
                print(join_line(cfg, daemon.addrs, daemon.peer_id), flush=True)
                from peer.reachability import NOBODY_YET, check_at_start, recheck_once_connected

                first = await check_at_start(transport.p2p, daemon.addrs, cfg.announce)  # dial-back through a peer
                print(first.line(), flush=True)
                if NOBODY_YET in first.what:  # the first peer of a run: ask the first peer that connects
                    again = await recheck_once_connected(transport.p2p, lambda: daemon.addrs, cfg.announce)
                    if again is not None:
                        print(again.line().replace("reachability:", "reachability (asked once a peer connected):", 1), flush=True)

        announcer = asyncio.create_task(announce())
        try:
            return await daemon.run()
        except DataDirLocked as e:
            raise StartError(f"{e}: stop it (peer leave --data-dir {cfg.data_dir}) or use another --data-dir") from e
        except StartError:
            raise
        except LocalStateError as e:
            raise StartError(str(e)) from e
        except Exception as e:
            if daemon.phase != "starting":
                raise
            if daemon.stop_requested:  # Ctrl-C while p2pd was starting (and got the signal too)
                log.info("interrupted while starting")
                return 130
            failure = start_failure(e, cfg)
            if failure is None:
                raise
            raise failure from e
        finally:
            announcer.cancel()

    started = time.monotonic()
    code = uvloop.run(main())
    log.info("exit %d after %.0fs", code, time.monotonic() - started)
    return code
