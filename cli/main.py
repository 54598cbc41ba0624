"""The `peer` command: join a run, look at the local daemon and the swarm it sees, leave.

`status` and `leave` only talk to the local daemon over its Unix socket; they never import torch
or hivemind, so they answer in a fraction of a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from peer.aggregation import DEFAULT_AGGREGATOR
from peer.aggregation import help_text as aggregation_help
from peer.config import default_data_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Peer-to-peer volunteer training daemon.")

DataDir = typer.Option(None, "--data-dir", envvar="PEER_DATA_DIR", help="Identity key, checkpoints, control socket, logs. [default: $XDG_DATA_HOME/peer]")


def _data_dir(value: Optional[Path]) -> Path:
    return Path(value) if value else default_data_dir()


@app.command()
def join(
    data_dir: Optional[Path] = DataDir,
    run_id: Optional[str] = typer.Option(None, "--run-id", envvar="PEER_RUN_ID", help="Name of the run to join. [default: default]"),
    task: Optional[str] = typer.Option(None, "--task", envvar="PEER_TASK", help="mnist1d-cnn, digits-mlp, lm-tiny, lm, lm-large, or module:function. [default: mnist1d-cnn]"),
    initial_peer: Optional[List[str]] = typer.Option(None, "--initial-peer", envvar="PEER_INITIAL_PEER", help="Multiaddr of a peer already in the run, with /p2p/<id>. Repeatable."),
    listen: Optional[List[str]] = typer.Option(None, "--listen", envvar="PEER_LISTEN", help="Multiaddr to listen on. Repeatable. [default: /ip4/0.0.0.0/tcp/0]"),
    announce: Optional[List[str]] = typer.Option(None, "--announce", envvar="PEER_ANNOUNCE", help="Multiaddr to announce to others (e.g. a public address). Repeatable."),
    aggregator: Optional[str] = typer.Option(None, "--aggregator", envvar="PEER_AGGREGATOR", help=f"Aggregation rule, one of: {aggregation_help()}. [default: {DEFAULT_AGGREGATOR}]"),
    byzantine_fraction: Optional[float] = typer.Option(None, "--byzantine-fraction", envvar="PEER_BYZANTINE_FRACTION", help="Fraction of a round's partners the robust rules assume Byzantine. [default: 0.25]"),
    experiment_attack: Optional[str] = typer.Option(None, "--experiment-attack", hidden=True, help="EXPERIMENTS ONLY: run as an attacker (peer/hostile.py)."),
    shard: Optional[str] = typer.Option(None, "--shard", envvar="PEER_SHARD", help="This peer's data shard i/n. [default: from the peer id]"),
    split: Optional[str] = typer.Option(None, "--split", envvar="PEER_SPLIT", help="iid or dirichlet. [default: iid]"),
    alpha: Optional[float] = typer.Option(None, "--alpha", envvar="PEER_ALPHA", help="Dirichlet concentration for --split dirichlet. [default: 0.5]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", envvar="PEER_MAX_STEPS", help="Stop training (keep gossiping and serving) after this many steps."),
    threads: int = typer.Option(1, "--threads", envvar="PEER_THREADS", help="Torch threads for training (0: torch's default)."),
    config: Optional[Path] = typer.Option(None, "--config", envvar="PEER_CONFIG", help="TOML file with any of these settings (flags and PEER_* win)."),
    allow_peers: Optional[Path] = typer.Option(None, "--allow-peers", envvar="PEER_ALLOW_PEERS", help="Closed run: file of admitted peer ids, one per line; records and requests of any other peer are dropped. [default: open run]"),
    log_format: Optional[str] = typer.Option(None, "--log-format", envvar="PEER_LOG_FORMAT", help="text or json. [default: text]"),
    outer_every_steps: Optional[int] = typer.Option(None, "--outer-every-steps", envvar="PEER_OUTER_EVERY_STEPS", help="Inner steps per outer round (compressed pseudo-gradients, Nesterov outer step); 0: whole models every few steps. [default: the task's]"),
    outer_lr: Optional[float] = typer.Option(None, "--outer-lr", envvar="PEER_OUTER_LR", help="Outer learning rate. [default: the task's]"),
    outer_momentum: Optional[float] = typer.Option(None, "--outer-momentum", envvar="PEER_OUTER_MOMENTUM", help="Outer Nesterov momentum. [default: the task's]"),
    compression: Optional[str] = typer.Option(None, "--compression", envvar="PEER_COMPRESSION", help="What outer rounds send: fp32, fp16, bf16, int8, topk[:FRACTION], topk-int8[:FRACTION]. [default: the task's]"),
    max_upload_mbps: Optional[float] = typer.Option(None, "--max-upload-mbps", envvar="PEER_MAX_UPLOAD_MBPS", help="Cap on gossip upload in Mbit/s, enforced by the daemon (0: none). [default: 0]"),
    max_download_mbps: Optional[float] = typer.Option(None, "--max-download-mbps", envvar="PEER_MAX_DOWNLOAD_MBPS", help="Cap on gossip download in Mbit/s (0: none). [default: 0]"),
) -> None:
    """Start a peer daemon in the foreground and join (or start) a training run."""
    from peer.config import resolve
    from peer.main import run_daemon

    cfg = resolve(
        {
            "data_dir": data_dir, "run_id": run_id, "task": task, "initial_peers": initial_peer,
            "listen": listen, "announce": announce, "aggregator": aggregator, "shard": shard,
            "split": split, "alpha": alpha, "max_steps": max_steps, "log_format": log_format,
            "byzantine_fraction": byzantine_fraction, "experiment_attack": experiment_attack,
            "allow_peers": str(allow_peers) if allow_peers else None,
            "outer_every_steps": outer_every_steps, "outer_lr": outer_lr, "outer_momentum": outer_momentum,
            "compression": compression, "max_upload_mbps": max_upload_mbps, "max_download_mbps": max_download_mbps,
        },
        config,
    )
    raise typer.Exit(run_daemon(cfg, threads=threads))


def _request(data_dir: Optional[Path], cmd: str) -> dict:
    from peer.control import NoDaemon, request

    path = _data_dir(data_dir) / "control.sock"
    try:
        reply = request(path, cmd)
    except NoDaemon as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1)
    except OSError as e:
        typer.echo(f"cannot reach the daemon at {path}: {e}", err=True)
        raise typer.Exit(1)
    if not reply.get("ok"):
        typer.echo(f"daemon refused: {reply.get('error')}", err=True)
        raise typer.Exit(1)
    return reply


@app.command()
def status(
    data_dir: Optional[Path] = DataDir,
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until interrupted."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes with --watch."),
) -> None:
    """Show the local daemon and the swarm it sees."""
    if as_json:
        typer.echo(json.dumps(_request(data_dir, "status")["status"]))
        return
    from cli.render import render_status

    if not watch:
        from rich.console import Console

        Console().print(render_status(_request(data_dir, "status")["status"]))
        return
    from rich.live import Live

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
    from protocols.transport.hivemind import ensure_identity

    d = _data_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    typer.echo(ensure_identity(str(d / "identity.key")))


from cli.swarm import command as swarm  # noqa: E402  (peer swarm: cli/swarm.py)

app.command("swarm")(swarm)


if __name__ == "__main__":
    app()
