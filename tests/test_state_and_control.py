"""Checkpoints survive kill -9 and full disks; the control socket is private; status without a daemon."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peer import state as ckpt
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from peer.state import save_checkpoint
    path = Path(sys.argv[1])
    for i in range(1, 10**6):
        # 8 MB per checkpoint so the kill often lands mid-write
        save_checkpoint(path, {"step": i, "flat": torch.full((2_000_000,), float(i))})
        print(i, flush=True)
""")


@pytest.mark.slow  # real processes, over 5 s: the full suite runs it, the fast tier does not
def test_checkpoint_survives_kill_minus_9_at_random_moments(tmp_path):
    path = tmp_path / "checkpoint.pt"
    rng = random.Random(0)
    for _trial in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        target = rng.randint(2, 6)
        for line in proc.stdout:  # the writer says when each checkpoint is complete
            if int(line) >= target:
                break
        # let it get partway into the next write, then kill it without warning
        os.sched_yield()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        state = ckpt.load_checkpoint(path)
        assert state is not None and state["step"] >= target
        assert torch.all(state["flat"] == float(state["step"])), "checkpoint is torn"
        ckpt.remove_stale_temp_files(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"step": 1, "flat": torch.ones(10)})

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"step": 2, "flat": torch.zeros(10)})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind




async def test_daemon_resumes_and_sets_aside_corrupt_checkpoints(memory_swarm, tmp_path):
    d = await memory_swarm.add("a", shard="0/1")
    await wait_until(lambda: d.trainer.step > 50, 20, "some training")
    assert await memory_swarm.stop("a") == 0
    saved = ckpt.load_checkpoint(d.checkpoint_path)
    assert saved["step"] == d.trainer.step and saved["run_id"] == "test"

    again = await memory_swarm.add("a", shard="0/1")
    assert again.trainer.step >= saved["step"]  # resumed, not restarted
    assert torch.equal(again.trainer.snapshot(), saved["flat"]) or again.trainer.step > saved["step"]
    await memory_swarm.stop("a")

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    b = await memory_swarm.add("b", shard="0/1")
    assert b.phase == "training"
    assert any(p.name.startswith("checkpoint.bad-") for p in (tmp_path / "b").iterdir())


async def test_full_disk_does_not_stop_the_daemon(memory_swarm, monkeypatch):
    d = await memory_swarm.add("a", shard="0/1")
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full")))
    await d._checkpoint()
    assert d.counters["checkpoint_errors"] == 1 and d.phase == "training"
    monkeypatch.undo()


async def test_control_socket_is_private_and_answers_the_cli(memory_swarm, tmp_path):
    d = await memory_swarm.add("a", shard="0/2")
    await memory_swarm.add("b", shard="1/2")
    sock = tmp_path / "a" / "control.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    await wait_until(lambda: len(d.core.view.live(d.transport.now())) == 1, 10, "a to see b")
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cli.main", "status", "--json", "--data-dir", str(tmp_path / "a")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    for key in ("peer_id", "addrs", "run_id", "step", "accuracy", "live_peers", "rounds_ok", "rounds_failed"):
        assert key in s
    assert s["peer_id"] == "a" and [p["peer_id"] for p in s["live_peers"]] == ["b"]
    human = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cli.main", "status", "--data-dir", str(tmp_path / "a")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert human.returncode == 0 and "live peers in run test: 1" in human.stdout
    assert s["swarm"]["peers"] == 2 and "swarm" in human.stdout and "2 peers with this one" in human.stdout


def test_swarm_totals_spread_and_sum():
    from protocols.discovery import swarm_totals

    got = swarm_totals([{"samples_per_s": 10.0, "accuracy": 0.5}, {"samples_per_s": 2.5, "accuracy": None},
                        {"samples_per_s": 1.0, "accuracy": 0.9}, {"samples_per_s": 0.0, "accuracy": 0.6}])
    assert got == {"peers": 4, "samples_per_s": 13.5, "accuracy": {"best": 0.9, "median": 0.6, "worst": 0.5}}
    assert swarm_totals([{"samples_per_s": 1.0, "accuracy": None}])["accuracy"] is None
    assert swarm_totals([{"samples_per_s": 1.0, "accuracy": 0.2}, {"samples_per_s": 1.0, "accuracy": 0.4}])["accuracy"]["median"] == 0.3


def test_status_without_daemon_says_so_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cli.main", "status", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode != 0
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    assert "no peer daemon running" in out.stderr
    # a stale socket file left by a killed daemon is reported the same way
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "control.sock"))
    s.close()
    out = subprocess.run([sys.executable, "-m", "cli.main", "status", "--json", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    # under --json the error is JSON too, on stdout, for the scripts that read it
    assert out.returncode == 1 and out.stderr == ""
    assert "no peer daemon running" in json.loads(out.stdout)["error"]


async def test_status_watch_json_streams_one_line_per_refresh(memory_swarm, tmp_path):
    import signal

    d = await memory_swarm.add("a", shard="0/1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "status", "--json", "--watch", "--interval", "0.2",
        "--data-dir", str(tmp_path / "a"), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0 and b"Traceback" not in err, err
    assert all(obj["peer_id"] == d.peer_id for obj in lines)
    assert lines[0]["step"] <= lines[-1]["step"]


async def test_second_daemon_on_same_data_dir_is_refused(memory_swarm, tmp_path):
    from peer.daemon import DataDirLocked, PeerDaemon
    from tests.conftest import fast_config

    await memory_swarm.add("a", shard="0/1")
    twin = PeerDaemon(fast_config(tmp_path / "a", shard="0/1"), memory_swarm.net.transport("a2"))
    with pytest.raises(DataDirLocked):
        await twin.run()
