"""`peer doctor`: checks this machine's setup for a run and says, one line each, what is wrong
and how to fix it (`peer/doctor.py` holds the checks). Exit 0 when nothing failed, 1 otherwise;
`--json` prints one object. It starts no daemon and changes nothing in the data dir."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer



def command(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="PEER_DATA_DIR", metavar="DIR", show_default="$XDG_DATA_HOME/peer", help="The data dir to check (peer join's)."),
    initial_peer: Optional[list[str]] = typer.Option(None, "--initial-peer", envvar="PEER_INITIAL_PEER", metavar="MADDR", show_default="the daemon's and the data dir's known peers", help="A peer of the run to test reachability and clock against, with /p2p/<id>. Repeatable."),
    run_id: Optional[str] = typer.Option(None, "--run", "--run-id", envvar="PEER_RUN_ID", metavar="NAME", show_default="default", help="The run whose checkpoint and peers to check."),
    listen: Optional[list[str]] = typer.Option(None, "--listen", envvar="PEER_LISTEN", metavar="MADDR", show_default="/ip4/0.0.0.0/tcp/0", help="The listen address peer join would use. Repeatable."),
    announce: Optional[list[str]] = typer.Option(None, "--announce", envvar="PEER_ANNOUNCE", metavar="MADDR", show_default="none", help="The addresses peer join would announce. Repeatable."),
    config: Optional[Path] = typer.Option(None, "--config", envvar="PEER_CONFIG", metavar="FILE", show_default="$XDG_CONFIG_HOME/peer/config.toml if present", help="TOML settings, as for peer join."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="One JSON object on stdout: {ok, checks: [...]}."),
    debug: bool = typer.Option(False, "--debug", metavar="", envvar="PEER_DEBUG", help="Show the traceback of a check that fails unexpectedly."),
) -> None:
    """Check the install, data dir, identity, checkpoint, disk, listen port, reachability and clock."""
    raise typer.Exit(run(data_dir, initial_peer or [], run_id, listen or [], announce or [], config, as_json, debug))


def run(data_dir: Path | None, initial_peers: list[str], run_id: str | None, listen: list[str], announce: list[str],
        config: Path | None, as_json: bool, debug: bool) -> int:
    from peer.config import PeerConfig
    from peer.doctor import exit_code, run_checks
    from peer.preflight import StartError, check_initial_peer, load_config

    explicit = {"data_dir": data_dir, "run_id": run_id, "initial_peers": initial_peers, "listen": listen, "announce": announce}
    error = None
    try:
        for addr in initial_peers:
            check_initial_peer(addr)
        cfg = load_config(explicit, config)
    except StartError as e:
        error = str(e)
        cfg = PeerConfig(**{k: v for k, v in explicit.items() if v and k != "initial_peers"},
                         initial_peers=[a for a in initial_peers if _valid(a)])
    checks = run_checks(cfg, error, debug)
    code = exit_code(checks)
    if as_json:
        print(json.dumps({"ok": code == 0, "data_dir": str(cfg.data_dir), "run_id": cfg.run_id,
                          "checks": [c.to_json() for c in checks]}))
    else:
        for c in checks:
            print(c.line())
        fails = sum(c.level == "fail" for c in checks)
        warns = sum(c.level == "warn" for c in checks)
        print(f"{len(checks)} checks: {fails} failed, {warns} warning{'' if warns == 1 else 's'}", file=sys.stderr)
    return code


def _valid(addr: str) -> bool:
    from peer.preflight import StartError, check_initial_peer

    try:
        check_initial_peer(addr)
    except StartError:
        return False
    return True
