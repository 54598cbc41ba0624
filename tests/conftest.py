from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from peer.config import PeerConfig
from peer.daemon import PeerDaemon
from protocols.transport.memory import MemoryNetwork

torch.set_num_threads(1)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition", poll: float = 0.05) -> None:
    """Wait for a condition on live daemons (their state changes in threads and tasks we don't own)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


def fast_config(data_dir: Path, **overrides) -> PeerConfig:
    """Short intervals so in-memory swarms do many rounds per second."""
    base = dict(
        data_dir=data_dir, run_id="test", task="digits-mlp", heartbeat_s=0.2, gossip_every_s=0.1,
        eval_every_s=0.2, checkpoint_every_s=5.0, pull_timeout_s=5.0, join_sync_timeout_s=5.0,
    )
    base.update(overrides)
    return PeerConfig(**base)


class MemorySwarm:
    """Daemons sharing one in-memory network inside the test's event loop."""

    def __init__(self, root: Path):
        self.root = root
        self.net = MemoryNetwork()
        self.daemons: dict[str, PeerDaemon] = {}
        self.runs: dict[str, asyncio.Task] = {}

    async def add(self, name: str, **overrides) -> PeerDaemon:
        cfg = fast_config(self.root / name, **overrides)
        d = PeerDaemon(cfg, self.net.transport(name))
        self.daemons[name] = d
        self.runs[name] = asyncio.create_task(d.run())
        await wait_until(lambda: d.phase == "training" or self.runs[name].done(), 30, f"{name} to start")
        if self.runs[name].done():
            self.runs[name].result()
        return d

    async def stop(self, name: str) -> int:
        self.daemons[name].request_stop()
        return await self.runs.pop(name)

    async def close(self) -> None:
        for name in list(self.runs):
            await self.stop(name)


@pytest.fixture
async def memory_swarm(tmp_path):
    swarm = MemorySwarm(tmp_path)
    try:
        yield swarm
    finally:
        await swarm.close()
