"""Peers remembered in the data dir (peer/known_peers.py), and the line a joiner of the wrong task gets."""

from __future__ import annotations

import asyncio
import json
import logging

from peer.daemon import PeerDaemon
from peer.known_peers import MAX_ADDRS, MAX_AGE_S, MAX_PEERS, KnownPeers, peers_file
from peer.tasks import load_task
from tests.conftest import fast_config, wait_until

A = "QmXNdG3PnW7nDz9vq8oRvP7bWBh3r1jn5xQwKjXQdJQv2a"
B = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def test_remembers_live_peers_and_dials_them_back(tmp_path):
    k = KnownPeers(tmp_path, "run/1", self_id=A)
    assert k.dial_addrs() == [] and not k.path.exists()
    assert k.note([(B, [f"/ip4/10.0.0.2/tcp/5/p2p/{B}", "/ip4/0.0.0.0/tcp/5"]), (A, ["/ip4/10.0.0.1/tcp/5"])], now=1000.0)
    assert not k.note([(B, [f"/ip4/10.0.0.2/tcp/5/p2p/{B}"])], now=1001.0)  # nothing new: no write
    again = KnownPeers(tmp_path, "run/1", self_id=A)
    assert again.dial_addrs() == []  # 1000.0 is long ago in wall time: expired on load
    k2 = KnownPeers(tmp_path, "run/1")
    k2.note([(B, [f"/ip4/10.0.0.2/tcp/5/p2p/{B}"])])
    assert KnownPeers(tmp_path, "run/1").dial_addrs() == [f"/ip4/10.0.0.2/tcp/5/p2p/{B}"]
    assert peers_file(tmp_path, "run/1") != peers_file(tmp_path, "run_1")  # one file per run id


def test_bounded_and_old_entries_dropped(tmp_path):
    k = KnownPeers(tmp_path, "r")
    now = 1e9
    k.note([(f"Qm{i:044d}", [f"/ip4/10.0.{i}.{j}/tcp/5" for j in range(20)]) for i in range(100)], now=now)
    data = json.loads(k.path.read_text())["peers"]
    assert len(data) == MAX_PEERS and all(len(e["addrs"]) == MAX_ADDRS for e in data.values())
    k.note([(B, ["/ip4/10.9.9.9/tcp/5"])], now=now + MAX_AGE_S + 1)
    assert list(json.loads(k.path.read_text())["peers"]) == [B]


def test_corrupt_file_warns_once_and_is_kept_until_a_good_one(tmp_path, caplog):
    path = peers_file(tmp_path, "r")
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="peer.known_peers"):
        k = KnownPeers(tmp_path, "r")
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and k.dial_addrs() == []
    assert not k.note([]) and path.read_text() == "{not json"  # no peers yet: left alone
    assert k.note([(B, ["/ip4/10.0.0.2/tcp/5"])])
    assert B in json.loads(path.read_text())["peers"]


async def test_joiner_of_another_task_says_which_task_the_run_trains(memory_swarm, caplog):
    caplog.set_level(logging.INFO, logger="peer")
    await memory_swarm.add("a")  # run "test", task digits-mlp
    task = load_task("digits-mlp")
    task.name = "my-other-task"
    cfg = fast_config(memory_swarm.root / "b")
    b = PeerDaemon(cfg, memory_swarm.net.transport("b"), task=task)
    memory_swarm.daemons["b"] = b
    memory_swarm.runs["b"] = asyncio.create_task(b.run())
    expected = "run test trains task digits-mlp, you asked for my-other-task"
    await wait_until(lambda: any(expected in r.getMessage() for r in caplog.records), 20, "the wrong-task line")
    assert not any(expected in r.getMessage() and r.name != "peer.core" for r in caplog.records)


async def test_daemon_writes_the_peers_it_sees(memory_swarm):
    a = await memory_swarm.add("a")
    b = await memory_swarm.add("b")
    await wait_until(lambda: peers_file(a.data_dir, "test").exists() and b.peer_id in peers_file(a.data_dir, "test").read_text(),
                     20, "a's peers file to name b")
