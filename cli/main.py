"""The `peer` command: join a run, look at the local daemon and the swarm it sees, leave.

`status` and `leave` only talk to the local daemon over its Unix socket; they never import torch
or hivemind, so they answer in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer

from peer.aggregation import DEFAULT_AGGREGATOR
from peer.aggregation import help_text as aggregation_help
from peer.config import default_data_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Peer-to-peer volunteer training daemon.",
                  context_settings={"help_option_names": ["-h", "--help"]})

NET, TRAIN, ROBUST, FILES = "Network", "Training", "Robustness", "Files and other"

DataDir = typer.Option(None, "--data-dir", envvar="PEER_DATA_DIR", metavar="DIR", show_default="$XDG_DATA_HOME/peer",
                       rich_help_panel=FILES, help="Identity key, checkpoints, control socket, logs.")


def _data_dir(value: Optional[Path]) -> Path:
    return Path(value) if value else default_data_dir()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"peer {version('peer')}")
        except PackageNotFoundError:
            typer.echo("peer (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Peer-to-peer volunteer training daemon."""


@app.command()
def join(
    # network
    run_id: Optional[str] = typer.Option(None, "--run-id", envvar="PEER_RUN_ID", metavar="NAME", show_default="default", rich_help_panel=NET, help="Name of the run to join."),
    initial_peer: Optional[list[str]] = typer.Option(None, "--initial-peer", envvar="PEER_INITIAL_PEER", metavar="MADDR", show_default="none: start a run", rich_help_panel=NET, help="A peer already in the run: the address it printed at start (with /p2p/<id>), or HOST/tcp/PORT to take the id of whoever answers there (e.g. /dns4/boot.example.org/tcp/31337). Repeatable."),
    listen: Optional[list[str]] = typer.Option(None, "--listen", envvar="PEER_LISTEN", metavar="MADDR", show_default="/ip4/0.0.0.0/tcp/0", rich_help_panel=NET, help="Address to listen on. Repeatable."),
    announce: Optional[list[str]] = typer.Option(None, "--announce", envvar="PEER_ANNOUNCE", metavar="MADDR", show_default="none", rich_help_panel=NET, help="Address to announce to others (e.g. a public IP and fixed port). Repeatable."),
    relay: Optional[list[str]] = typer.Option(None, "--relay", envvar="PEER_RELAY", metavar="MADDR", show_default="none: find one", rich_help_panel=NET, help="Relay peer (started with --relay-service) to be reached through when this peer is behind NAT; its address with /p2p/<id>. Repeatable."),
    auto_relay: Optional[bool] = typer.Option(None, "--auto-relay/--no-auto-relay", metavar="", envvar="PEER_AUTO_RELAY", show_default="on", rich_help_panel=NET, help="Behind NAT, find a relay among the run's peers by itself (up to 3 minutes; --relay is faster)."),
    hole_punching: Optional[bool] = typer.Option(None, "--hole-punching/--no-hole-punching", metavar="", envvar="PEER_HOLE_PUNCHING", show_default="on", rich_help_panel=NET, help="Turn relayed connections into direct ones where both NATs allow (DCUtR; also answers others' AutoNAT checks)."),
    relay_service: Optional[bool] = typer.Option(None, "--relay-service/--no-relay-service", metavar="", envvar="PEER_RELAY_SERVICE", show_default="off", rich_help_panel=NET, help="Relay connections between other peers (circuit relay v2). Costs your bandwidth; SECURITY.md."),
    max_upload_mbps: Optional[float] = typer.Option(None, "--max-upload-mbps", envvar="PEER_MAX_UPLOAD_MBPS", metavar="MBIT", show_default="0: none", rich_help_panel=NET, help="Cap on gossip upload in Mbit/s, enforced by the daemon."),
    max_download_mbps: Optional[float] = typer.Option(None, "--max-download-mbps", envvar="PEER_MAX_DOWNLOAD_MBPS", metavar="MBIT", show_default="0: none", rich_help_panel=NET, help="Cap on gossip download in Mbit/s."),
    # training
    task: Optional[str] = typer.Option(None, "--task", envvar="PEER_TASK", metavar="NAME", show_default="mnist1d-cnn", rich_help_panel=TRAIN, help="mnist1d-cnn, mnist1d-linear, digits-mlp, lm-tiny, lm, lm-large, or module:function."),
    shard: Optional[str] = typer.Option(None, "--shard", envvar="PEER_SHARD", metavar="I/N", show_default="from the peer id", rich_help_panel=TRAIN, help="This peer's data shard."),
    split: Optional[str] = typer.Option(None, "--split", envvar="PEER_SPLIT", metavar="iid|dirichlet", show_default="iid", rich_help_panel=TRAIN, help="How shards are drawn."),
    alpha: Optional[float] = typer.Option(None, "--alpha", envvar="PEER_ALPHA", metavar="A", show_default="0.5", rich_help_panel=TRAIN, help="Dirichlet concentration for --split dirichlet."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", envvar="PEER_MAX_STEPS", metavar="N", show_default="no limit", rich_help_panel=TRAIN, help="Stop training (keep gossiping and serving) after this many steps."),
    threads: int = typer.Option(1, "--threads", envvar="PEER_THREADS", metavar="N", rich_help_panel=TRAIN, help="Torch threads for training (0: torch's default)."),
    outer_every_steps: Optional[int] = typer.Option(None, "--outer-every-steps", envvar="PEER_OUTER_EVERY_STEPS", metavar="H", show_default="the task's", rich_help_panel=TRAIN, help="Inner steps per outer round (compressed pseudo-gradients, Nesterov outer step); 0: whole models every few steps."),
    outer_lr: Optional[float] = typer.Option(None, "--outer-lr", envvar="PEER_OUTER_LR", metavar="LR", show_default="the task's", rich_help_panel=TRAIN, help="Outer learning rate."),
    outer_momentum: Optional[float] = typer.Option(None, "--outer-momentum", envvar="PEER_OUTER_MOMENTUM", metavar="M", show_default="the task's", rich_help_panel=TRAIN, help="Outer Nesterov momentum."),
    outer_wait_for_round: Optional[bool] = typer.Option(None, "--outer-wait-for-round/--no-outer-wait-for-round", metavar="", envvar="PEER_OUTER_WAIT_FOR_ROUND", show_default="off", rich_help_panel=TRAIN, help="Pause training while an outer round is still unfinished H inner steps after it was due, so every H steps make one outer step however slow the link."),
    compression: Optional[str] = typer.Option(None, "--compression", envvar="PEER_COMPRESSION", metavar="SPEC", show_default="the task's", rich_help_panel=TRAIN, help="What outer rounds send: fp32, fp16, bf16, int8, topk[:FRACTION[:CHUNK]], topk-int8[:FRACTION[:CHUNK]] (CHUNK: k chosen per chunk of that many coordinates)."),
    # robustness
    aggregator: Optional[str] = typer.Option(None, "--aggregator", envvar="PEER_AGGREGATOR", metavar="NAME", show_default=DEFAULT_AGGREGATOR, rich_help_panel=ROBUST, help=f"Aggregation rule, one of: {aggregation_help()}."),
    byzantine_fraction: Optional[float] = typer.Option(None, "--byzantine-fraction", envvar="PEER_BYZANTINE_FRACTION", metavar="F", show_default="0.25", rich_help_panel=ROBUST, help="Fraction of a round's partners the robust rules assume Byzantine."),
    allow_peers: Optional[Path] = typer.Option(None, "--allow-peers", envvar="PEER_ALLOW_PEERS", metavar="FILE", show_default="open run", rich_help_panel=ROBUST, help="Closed run: file of admitted peer ids, one per line; records and requests of any other peer are dropped."),
    experiment_attack: Optional[str] = typer.Option(None, "--experiment-attack", hidden=True, help="EXPERIMENTS ONLY: run as an attacker (peer/experiment/attacks.py)."),
    # files and other
    data_dir: Optional[Path] = DataDir,
    config: Optional[Path] = typer.Option(None, "--config", envvar="PEER_CONFIG", metavar="FILE", show_default="$XDG_CONFIG_HOME/peer/config.toml if present", rich_help_panel=FILES, help="TOML file with any of these settings (flags and PEER_* win)."),
    log_format: Optional[str] = typer.Option(None, "--log-format", envvar="PEER_LOG_FORMAT", metavar="text|json", show_default="text", rich_help_panel=FILES, help="Log line format on stderr and in daemon.log."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", envvar="PEER_METRICS_PORT", metavar="PORT", show_default="off", rich_help_panel=FILES, help="Serve Prometheus metrics on 127.0.0.1:PORT (0: a free port; peer status says which)."),
    metrics_host: Optional[str] = typer.Option(None, "--metrics-host", envvar="PEER_METRICS_HOST", metavar="IP", show_default="127.0.0.1", rich_help_panel=FILES, help="Address the metrics endpoint binds (0.0.0.0 in a container, for Prometheus)."),
    debug: bool = typer.Option(False, "--debug", metavar="", envvar="PEER_DEBUG", rich_help_panel=FILES, help="Show the traceback behind a 'cannot start' line."),
) -> None:
    """Start a peer daemon in the foreground and join (or start) a training run.

    A bad setting or a failed start prints one line, 'cannot start: <reason and fix>', and exits 2.
    """
    from peer.preflight import StartError, check_config, load_config

    try:
        cfg = load_config(
            {
                "data_dir": data_dir, "run_id": run_id, "task": task, "initial_peers": initial_peer,
                "listen": listen, "announce": announce, "aggregator": aggregator, "shard": shard,
                "split": split, "alpha": alpha, "max_steps": max_steps, "log_format": log_format,
                "byzantine_fraction": byzantine_fraction, "experiment_attack": experiment_attack,
                "allow_peers": str(allow_peers) if allow_peers else None,
                "outer_every_steps": outer_every_steps, "outer_lr": outer_lr, "outer_momentum": outer_momentum,
                "outer_wait_for_round": outer_wait_for_round,
                "compression": compression, "max_upload_mbps": max_upload_mbps, "max_download_mbps": max_download_mbps,
                "metrics_port": metrics_port, "metrics_host": metrics_host, "relays": relay, "auto_relay": auto_relay,
                "hole_punching": hole_punching, "relay_service": relay_service,
            },
            config,
        )
        if ":" in cfg.task and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # `--task my_module:build` from the folder holding my_module.py
        check_config(cfg, threads)
        from peer.main import run_daemon

        code = run_daemon(cfg, threads=threads)
    except StartError as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"cannot start: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _request(data_dir: Optional[Path], cmd: str, as_json: bool = False) -> dict:
    """The daemon's reply; a failure is one line on stderr (with --json, one JSON object
    `{"error": ...}` on stdout) and exit 1."""
    from peer.control import NoDaemon, request

    path = _data_dir(data_dir) / "control.sock"
    try:
        reply = request(path, cmd)
    except NoDaemon as e:
        error = str(e)
    except OSError as e:
        error = f"cannot reach the daemon at {path}: {e}"
    else:
        if reply.get("ok"):
            return reply
        error = f"daemon refused: {reply.get('error')}"
    if as_json:
        typer.echo(json.dumps({"error": error}))
    else:
        typer.echo(error, err=True)
    raise typer.Exit(1)


@app.command()
def status(
    data_dir: Optional[Path] = DataDir,
    as_json: bool = typer.Option(False, "--json", metavar="", help="One JSON object on stdout (with --watch: one line per refresh)."),
    watch: bool = typer.Option(False, "--watch", metavar="", help="Refresh until interrupted."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes with --watch."),
) -> None:
    """Show the local daemon and the swarm it sees."""
    if as_json:
        if signal.getsignal(signal.SIGINT) is _interrupted:  # Ctrl-C ends the stream with exit 0
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                typer.echo(json.dumps(_request(data_dir, "status", as_json=True)["status"]))
                if not watch:
                    return
                sys.stdout.flush()
                time.sleep(interval)
        except KeyboardInterrupt:
            return
    from cli.render import render_status

    if not watch:
        from rich.console import Console

        Console().print(render_status(_request(data_dir, "status")["status"]))
        return
    from rich.live import Live

    if signal.getsignal(signal.SIGINT) is _interrupted:  # Ctrl-C ends the live view cleanly, exit 0
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with Live(render_status(_request(data_dir, "status")["status"]), refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render_status(_request(data_dir, "status")["status"]))
        except KeyboardInterrupt:
            pass


@app.command()
def leave(
    data_dir: Optional[Path] = DataDir,
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the daemon to finish."),
) -> None:
    """Ask the local daemon to checkpoint, withdraw from the swarm and exit."""
    path = _data_dir(data_dir) / "control.sock"
    _request(data_dir, "leave")
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if path.exists():
        typer.echo(f"the daemon did not exit within {timeout:.0f}s", err=True)
        raise typer.Exit(1)
    typer.echo("left")


@app.command()
def identity(data_dir: Optional[Path] = DataDir) -> None:
    """Print this data dir's peer id (creating the identity key if there is none)."""
    from peer.datadir import prepare_data_dir
    from protocols.transport.hivemind import ensure_identity

    d = _data_dir(data_dir)
    try:
        prepare_data_dir(d)
        peer_id = ensure_identity(str(d / "identity.key"))
    except ValueError as e:  # LocalStateError, IdentityError: one line, nothing overwritten
        typer.echo(f"cannot read the identity: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(peer_id)


def _interrupted(signum, frame) -> None:
    """Ctrl-C before a command has its own handling (the daemon's event loop, `peer swarm`'s
    trio, `peer status --watch`): nothing has started that needs stopping, so exit 130 at once,
    rather than a KeyboardInterrupt traceback from whatever import it landed in."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """The `peer` command. A usage error (unknown flag, a value of the wrong kind) is one line too."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the caller ignores it
        signal.signal(signal.SIGINT, _interrupted)
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # typer before it vendored click
        from click.exceptions import ClickException
    try:
        code = typer.main.get_command(app).main(prog_name="peer", standalone_mode=False)
    except ClickException as e:
        ctx = getattr(e, "ctx", None)
        name = ctx.info_name if ctx is not None and ctx.info_name != "peer" else ""
        prefix = "cannot start" if name == "join" else "peer"
        if e.format_message():  # empty when the help was printed instead (`peer` alone)
            typer.echo(f"{prefix}: {e.format_message()} (see peer {name + ' ' if name else ''}--help)", err=True)
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)


from cli.swarm import command as swarm  # noqa: E402  (peer swarm: cli/swarm.py)

app.command("swarm")(swarm)

from cli.doctor import command as doctor  # noqa: E402  (peer doctor: cli/doctor.py, checks in peer/doctor.py)

app.command("doctor")(doctor)


if __name__ == "__main__":
    main()
