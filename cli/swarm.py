"""`peer swarm`: a run seen from any machine, without a daemon.

A py-libp2p client (`protocols/transport/light.py`, no p2pd) looks the run key up in the run's
DHT (`protocols/lightdht.py`), keeps the records whose signatures and contents verify, and shows
each live peer and the swarm's totals: a rich table, one JSON object (`--json`), or either
refreshed (`--watch`; JSON lines with `--json`). Any failure to reach the swarm is one line on
stderr, `cannot reach the swarm: <reason and fix>`, and exit code 2.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any, Optional

import typer

EXIT_UNREACHABLE = 2
FIX = ("give the address of a running peer of the run, reachable from this machine, as its `peer join` "
       "prints it (/ip4/ADDRESS/tcp/PORT/p2p/PEER_ID; without /p2p/ the peer answering there is trusted)")


class Unreachable(Exception):
    """No node of the swarm answered; the message says why and what to do."""


def reachability(addrs: list[str]) -> str:
    """What a record's addresses say about reaching the peer: 'public' (some address is public),
    'private' (LAN addresses only), 'loopback' (this machine only) or 'unknown' (none parse)."""
    from protocols.discovery import public_host

    if any(public_host(a) for a in addrs):
        return "public"
    kinds = set()
    for a in addrs:
        parts = a.split("/")
        try:
            kinds.add("loopback" if ipaddress.ip_address(parts[2]).is_loopback else "private")
        except (IndexError, ValueError):
            continue
    return "private" if "private" in kinds else "loopback" if kinds else "unknown"


def summarise(snapshot, now: float) -> dict[str, Any]:
    """The JSON object `peer swarm --json` prints for one lookup."""
    from protocols.discovery import swarm_totals
    from protocols.lightdht import latest_by_peer

    live = latest_by_peer(snapshot.records, now)
    peers = [
        {"peer_id": v.owner, "verified": True, "task": v.record.task, "reachability": reachability(list(v.record.addrs)),
         "addrs": list(v.record.addrs), "step": v.record.step, "samples_per_s": v.record.samples_per_s,
         "loss": v.record.loss, "accuracy": v.record.accuracy,
         "last_seen_s": round(max(0.0, now - v.record.time), 1), "expires_in_s": round(v.expiration - now, 1)}
        for v in live
    ]
    return {
        "run_id": snapshot.run_id,
        "tasks": sorted({p["task"] for p in peers}),
        "live_peers": peers,
        "totals": swarm_totals(peers),
        "rejected": snapshot.rejected,
        "dht": {"asked": len(snapshot.asked), "answered": len(snapshot.answered), "failed": snapshot.failed},
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render(summary: dict[str, Any]):
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = summary["totals"]
    dht = summary["dht"]
    head = (f"run {summary['run_id']} ({', '.join(summary['tasks']) or 'no task'}): {t['peers']} live peer{'' if t['peers'] == 1 else 's'}, "
            f"{t['samples_per_s']:.0f} samples/s in total")
    if t["accuracy"]:
        a = t["accuracy"]
        head += f"; accuracy best {_pct(a['best'])}, median {_pct(a['median'])}, worst {_pct(a['worst'])}"
    note = f"{dht['answered']} of {dht['asked']} DHT nodes answered; every record shown carries a verified signature"
    if summary["rejected"]:
        note += "; rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["rejected"].items()))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("peer", "step", "samples/s", "loss", "accuracy", "seen", "reach"):
        table.add_column(name, justify="left" if name in ("peer", "reach") else "right", no_wrap=True)
    table.add_column("address", overflow="fold")
    for p in summary["live_peers"]:
        addrs = [a.split("/p2p/")[0] for a in p["addrs"]]
        addr = (addrs[0] + (f" (+{len(addrs) - 1})" if len(addrs) > 1 else "")) if addrs else "-"
        table.add_row(p["peer_id"][:12] + "…", str(p["step"]), f"{p['samples_per_s']:.0f}",
                      "-" if p["loss"] is None else f"{p['loss']:.3g}", _pct(p["accuracy"]),
                      f"{p['last_seen_s']:.0f}s ago", p["reachability"], addr)
    return Group(Text(head, style="bold"), Text(note, style="dim"), table)


def parse_initial_peers(maddrs: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(peer id -> transport addresses, TCP addresses given without /p2p/<id>, whose id the
    Noise handshake tells: `learn_ids`); Unreachable with the reason for a bad one."""
    from protocols.transport.light import split_maddr
    from protocols.transport.peer_id_lookup import lookup_target

    if not maddrs:
        raise Unreachable(f"no --initial-peer given; {FIX}")
    out: dict[str, list[str]] = {}
    bare: list[str] = []
    for m in maddrs:
        try:
            pid, addrs = split_maddr(m)
        except ValueError as e:
            if "no /p2p/" in str(e) and lookup_target(m) is not None:
                bare.append(m.rstrip("/"))
                continue
            raise Unreachable(f"--initial-peer {m}: {e}; {FIX}") from None
        out.setdefault(pid, []).extend(a for a in addrs if a not in out.get(pid, []))
    return out, bare


async def learn_ids(initial: dict[str, list[str]], bare: list[str]) -> dict[str, list[str]]:
    """`initial` with each bare address under the id proven by whoever answers there (trust in the
    address, as `peer join --initial-peer HOST:PORT`; protocols/transport/peer_id_lookup.py)."""
    from protocols.transport.peer_id_lookup import LookupFailed, handshake_peer_id

    out = {pid: list(addrs) for pid, addrs in initial.items()}
    for addr in bare:
        try:
            pid = await handshake_peer_id(addr)
        except LookupFailed as e:
            raise Unreachable(f"--initial-peer {addr}: {e}; {FIX}") from None
        out.setdefault(pid, []).append(addr)
    return out


async def _observe(client, run_id: str, initial: dict[str, list[str]], checker):
    from protocols.lightdht import read_run

    async def find(peer_id: str, addrs: list[str]):
        return await client.find(peer_id, addrs, [checker.key_id])

    snapshot = await read_run(find, run_id, initial, checker)
    if not snapshot.answered:
        reasons = "; ".join(f"{pid[:12]}…: {why}" for pid, why in snapshot.failed.items())
        raise Unreachable(f"no initial peer answered ({reasons}); {FIX}")
    return snapshot


def run(initial_peers: list[str], run_id: str, as_json: bool, watch: bool, interval: float) -> int:
    """The command: 0 after the last view, EXIT_UNREACHABLE when the swarm cannot be reached."""
    import logging
    import time

    try:
        known, bare = parse_initial_peers(initial_peers)
    except Unreachable as e:
        return _fail(e)
    # py-libp2p logs every failed dial and background protocol hiccup; the outcome is reported here
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    try:
        import trio

        from protocols.transport.light import LightClient  # before hivemind (see light.py)
    except ImportError as e:
        return _fail(Unreachable(f"py-libp2p is missing ({e}); install this package's dependencies "
                                 "(pip install 'libp2p>=0.8,<0.9')"))
    from protocols.lightdht import RecordChecker

    checker = RecordChecker(run_id)

    async def main() -> str | None:
        """`view`, ended quietly by Ctrl-C: the signal cancels the view rather than raising
        KeyboardInterrupt wherever it lands, and if py-libp2p's shutdown then hangs the process
        exits 0 anyway after 2 s."""
        import os
        import signal
        import threading

        result = None
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def interrupted() -> None:
                    async for _ in signals:
                        timer = threading.Timer(2.0, os._exit, (0,))
                        timer.daemon = True
                        timer.start()
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(interrupted)
                result = await view()
                nursery.cancel_scope.cancel()
        return result

    async def view() -> str | None:
        """None when done, or why the swarm could not be reached (returned, not raised: an
        exception leaving py-libp2p's nurseries arrives wrapped in exception groups)."""
        live = None  # the rich live view of --watch without --json
        try:
            async with LightClient.open() as client:
                for refresh in range(sys.maxsize if watch else 1):
                    if refresh:
                        await trio.sleep(interval)
                    try:
                        if bare:  # addresses without /p2p/<id>: asked once who answers there
                            known.update(await learn_ids(known, bare))
                            bare.clear()
                        summary = summarise(await _observe(client, run_id, known, checker), time.time())
                    except Unreachable as e:
                        if not refresh:
                            return str(e)
                        print(f"cannot reach the swarm: {e} (retrying in {interval:g} s)", file=sys.stderr)
                        continue
                    if as_json:
                        print(json.dumps(summary), flush=True)
                    elif not watch:
                        from rich.console import Console

                        Console().print(render(summary))
                    elif live is None:
                        from rich.live import Live

                        live = Live(render(summary), refresh_per_second=4)
                        live.start()
                    else:
                        live.update(render(summary))
        finally:
            if live is not None:
                live.stop()
        return None

    try:
        error = trio.run(main)
    except BaseException as e:  # anything on the way to the swarm is still one line, never a traceback
        e = _innermost(e)
        if isinstance(e, KeyboardInterrupt):
            return 0
        if not isinstance(e, Exception):
            raise
        error = f"{type(e).__name__}: {e}; {FIX}"
    return 0 if error is None else _fail(Unreachable(error))


def _innermost(e: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _fail(e: Exception) -> int:
    print(f"cannot reach the swarm: {e}", file=sys.stderr)
    return EXIT_UNREACHABLE


def command(
    initial_peer: Optional[list[str]] = typer.Option(None, "--initial-peer", envvar="PEER_INITIAL_PEER", metavar="MADDR", help="Multiaddr of a peer of the run, /ip4/ADDRESS/tcp/PORT/p2p/ID (without /p2p/: whoever answers there). Repeatable."),
    run_id: str = typer.Option("default", "--run-id", envvar="PEER_RUN_ID", metavar="ID", help="Name of the run to show."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout (JSON lines with --watch)."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until interrupted."),
    interval: float = typer.Option(2.0, "--interval", metavar="SECONDS", help="Seconds between refreshes with --watch."),
) -> None:
    """Show a run's live peers from any machine, without a daemon: reads their signed records from the DHT."""
    raise typer.Exit(run(initial_peer or [], run_id, as_json, watch, interval))
