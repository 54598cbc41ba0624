"""Process entry for `peer join`: logging, the event loop (uvloop), signals, the join line."""

from __future__ import annotations

import asyncio
import json
import os
import logging
import signal
import sys
import time

from peer.config import PeerConfig


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


def join_line(cfg: PeerConfig, addrs: list[str]) -> str:
    """The exact command another volunteer pastes to join this peer's run."""
    public = [a for a in addrs if "/127.0.0.1/" not in a and "/::1/" not in a]
    best = (public or addrs)[0]
    return f"peer join --run-id {cfg.run_id} --task {cfg.task} --initial-peer {best}"


def run_daemon(cfg: PeerConfig, threads: int = 1) -> int:
    import torch
    import uvloop

    from peer.config import load_allowed_peers
    from peer.daemon import PeerDaemon, StartError
    from peer.datadir import LocalStateError, prepare_data_dir
    from protocols.discovery import run_key
    from protocols.transport.hivemind import HivemindTransport

    setup_logging(cfg)
    if threads > 0:
        torch.set_num_threads(threads)
    log = logging.getLogger("peer")

    async def main() -> int:
        try:
            prepare_data_dir(cfg.data_dir, cfg.socket_path.name)  # before the identity key is read or made
            allowed = load_allowed_peers(cfg.allow_peers)
            transport = HivemindTransport(str(cfg.identity_path), cfg.listen, cfg.announce, cfg.initial_peers,
                                          run_key=run_key(cfg.run_id), allowed=allowed)
            daemon = PeerDaemon(cfg, transport)
        except ValueError as e:  # a bad setting (aggregator, attack, shard, task...): one line, exit 2
            log.error("cannot start: %s", e)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)

        async def announce() -> None:
            while not daemon.addrs and daemon.phase == "starting":
                await asyncio.sleep(0.05)
            if daemon.addrs:
                print(f"peer {daemon.peer_id} listening on:", *daemon.addrs, sep="\n  ", flush=True)
                print("To join this run from another machine:\n  " + join_line(cfg, daemon.addrs), flush=True)

        announcer = asyncio.create_task(announce())
        try:
            return await daemon.run()
        except (StartError, LocalStateError) as e:
            log.error("cannot start: %s", e)
            return 2
        finally:
            announcer.cancel()

    started = time.monotonic()
    code = uvloop.run(main())
    log.info("exit %d after %.0fs", code, time.monotonic() - started)
    return code
