"""Local state never loses data and never ends in a traceback: one checkpoint per run, unusable
files renamed aside (bytes unchanged), one log line per case, exit code 2 where a start is impossible."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer import state as ckpt
from peer.config import PeerConfig
from peer.datadir import LocalStateError, prepare_data_dir
from tests.conftest import fast_config, wait_until

REPO = Path(__file__).resolve().parents[1]
TASK = "digits-mlp"


def lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def fake_checkpoint(path: Path, run_id: str, task: str = TASK, numel: int = 10, step: int = 7) -> bytes:
    ckpt.save_checkpoint(path, {"flat": torch.arange(numel, dtype=torch.float32), "step": step, "samples": 1,
                                "optimizer": {"state": {}, "param_groups": []}, "run_id": run_id, "task": task})
    return path.read_bytes()


# --- run_daemon in this process: the path `peer join` takes, up to the point it gives up -------------

@pytest.fixture
def start(capsys):
    """run_daemon(cfg) -> (exit code, its stderr lines), a StartError said as `peer join` says it
    (cli/main.py); the 'peer' logger is restored afterwards."""
    from peer.main import run_daemon
    from peer.preflight import StartError

    logger = logging.getLogger("peer")
    saved = (logger.handlers[:], logger.propagate, logger.level)

    def run(cfg: PeerConfig) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = run_daemon(cfg)
        except StartError as e:
            print(f"cannot start: {e}", file=sys.stderr)
            code = 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        return code, [line for line in err if " exit " not in line]  # run_daemon's closing "exit N after Ns"

    yield run
    for h in logger.handlers[:]:
        if h not in saved[0]:
            h.close()
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


def join_config(data_dir: Path) -> PeerConfig:
    return PeerConfig(data_dir=data_dir, run_id="test", task=TASK, listen=["/ip4/127.0.0.1/tcp/0"])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (but daemon.log, which start-up appends to) and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "daemon.log"}


def valid_key(tmp_path: Path) -> bytes:
    from protocols.transport.hivemind import ensure_identity

    (tmp_path / "keys").mkdir(exist_ok=True)
    ensure_identity(str(tmp_path / "keys" / "identity.key"))
    return (tmp_path / "keys" / "identity.key").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_identity_key_stops_the_start_in_one_line(tmp_path, start, damage):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    key = valid_key(tmp_path)
    bad = {"truncated": key[: len(key) // 2], "empty": b"", "garbage": os.urandom(300)}[damage]
    (data_dir / "identity.key").write_bytes(bad)
    os.chmod(data_dir / "identity.key", 0o400)
    fake_checkpoint(data_dir / ckpt.checkpoint_name("test", TASK), "test")
    before = snapshot(data_dir)
    code, err = start(join_config(data_dir))
    assert code == 2
    assert len(err) == 1 and "cannot start: identity key" in err[0] and "corrupt or truncated" in err[0], err
    assert snapshot(data_dir) == before


def test_peer_identity_with_a_corrupt_key_says_so_in_one_line(tmp_path):
    (tmp_path / "identity.key").write_bytes(b"\x08\x00\x12\x05trunc")
    out = subprocess.run([sys.executable, "-m", "cli.main", "identity", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "corrupt or truncated" in out.stderr
    assert (tmp_path / "identity.key").read_bytes() == b"\x08\x00\x12\x05trunc"


def test_identity_key_is_created_once_whole_and_read_only(tmp_path):
    from protocols.transport.hivemind import ensure_identity, load_identity_key

    path = str(tmp_path / "identity.key")
    peer_id = ensure_identity(path)
    assert ensure_identity(path) == peer_id
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    assert load_identity_key(path) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["identity.key"]  # no temp file left


def _read_only(monkeypatch):
    """As root nothing is read-only by mode, so the write probe is made to fail as EROFS would."""
    import peer.datadir

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(peer.datadir.tempfile, "mkstemp", refuse)


def test_read_only_data_dir_stops_the_start_in_one_line(tmp_path, start, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "identity.key").write_bytes(valid_key(tmp_path))
    fake_checkpoint(data_dir / ckpt.checkpoint_name("test", TASK), "test")
    before = snapshot(data_dir)
    _read_only(monkeypatch)
    code, err = start(join_config(data_dir))
    assert code == 2
    assert len(err) == 1 and "cannot start: data dir" in err[0] and "is not writable (Read-only file system)" in err[0], err
    assert snapshot(data_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0500 directory")
def test_data_dir_without_write_permission_stops_the_start_in_one_line(tmp_path, start):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    fake_checkpoint(data_dir / ckpt.checkpoint_name("test", TASK), "test")
    before = snapshot(data_dir)
    os.chmod(data_dir, 0o500)
    try:
        code, err = start(join_config(data_dir))
    finally:
        os.chmod(data_dir, 0o700)
    assert code == 2 and len(err) == 1 and "is not writable" in err[0], err
    assert snapshot(data_dir) == before


def test_control_socket_path_that_is_a_directory_stops_the_start_in_one_line(tmp_path, start):
    data_dir = tmp_path / "data"
    (data_dir / "control.sock").mkdir(parents=True)
    (data_dir / "control.sock" / "notes.txt").write_text("mine")
    os.chmod(data_dir, 0o700)
    code, err = start(join_config(data_dir))
    assert code == 2
    assert len(err) == 1 and "cannot start:" in err[0] and "control.sock is a directory, not a control socket" in err[0], err
    assert (data_dir / "control.sock" / "notes.txt").read_text() == "mine"


async def test_daemon_refuses_a_control_socket_path_that_is_a_file(tmp_path):
    from peer.daemon import PeerDaemon
    from protocols.transport.memory import MemoryNetwork

    (tmp_path / "a").mkdir(mode=0o700)
    (tmp_path / "a" / "control.sock").write_text("someone's file")
    d = PeerDaemon(fast_config(tmp_path / "a", shard="0/1"), MemoryNetwork().transport("a"))
    with pytest.raises(LocalStateError, match="is a regular file, not a control socket"):
        await d.run()
    assert (tmp_path / "a" / "control.sock").read_text() == "someone's file"
    assert not list((tmp_path / "a").glob("checkpoint*"))  # a start that failed saves nothing


def test_data_dir_readable_by_others_is_made_private_with_one_line(tmp_path, caplog):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chmod(data_dir, 0o755)
    (data_dir / "metrics.jsonl").write_text("{}\n")
    with caplog.at_level(logging.INFO, logger="peer"):
        prepare_data_dir(data_dir)
        prepare_data_dir(data_dir)  # already private: nothing to say
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert lines(caplog, "data dir") == [f"data dir {data_dir} was mode 0755, readable by other users; set to 0700"]
    assert (data_dir / "metrics.jsonl").read_text() == "{}\n"
    fresh = tmp_path / "new" / "data"
    prepare_data_dir(fresh)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


# --- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_names_are_per_run_and_task_and_safe():
    a = ckpt.checkpoint_name("default", "mnist1d-cnn")
    assert a.startswith("checkpoint-default-mnist1d-cnn-") and a.endswith(".pt")
    assert len({a, ckpt.checkpoint_name("default", "lm-tiny"), ckpt.checkpoint_name("other", "mnist1d-cnn"),
                ckpt.checkpoint_name("a-b", "c"), ckpt.checkpoint_name("a", "b-c")}) == 5
    weird = ckpt.checkpoint_name("../../etc/passwd", "x/y")
    assert "/" not in weird and weird.startswith("checkpoint-")


async def test_checkpoints_of_other_runs_are_never_overwritten(memory_swarm, tmp_path, caplog):
    data_dir = tmp_path / "a"
    data_dir.mkdir(mode=0o700)
    legacy = fake_checkpoint(data_dir / "checkpoint.pt", "first-run", step=11)  # the legacy layout: one file for every run
    third_path = data_dir / ckpt.checkpoint_name("third-run", "mnist1d-cnn")
    third = fake_checkpoint(third_path, "third-run", task="mnist1d-cnn", step=13)
    with caplog.at_level(logging.INFO, logger="peer"):
        d = await memory_swarm.add("a", shard="0/1")
        await wait_until(lambda: d.trainer.step > 20, 20, "some training")
        assert await memory_swarm.stop("a") == 0
    moved = data_dir / ckpt.checkpoint_name("first-run", TASK)
    assert moved.read_bytes() == legacy and not (data_dir / "checkpoint.pt").exists()
    assert third_path.read_bytes() == third
    ours = ckpt.load_checkpoint(d.checkpoint_path)
    assert ours["run_id"] == "test" and ours["step"] == d.trainer.step
    assert lines(caplog, "checkpoint.pt") == [f"checkpoint.pt (run 'first-run', task '{TASK}') is now {moved.name}"]


async def test_legacy_checkpoint_of_this_run_is_resumed(memory_swarm, tmp_path):
    d = await memory_swarm.add("a", shard="0/1")
    await wait_until(lambda: d.trainer.step > 20, 20, "some training")
    await memory_swarm.stop("a")
    os.rename(d.checkpoint_path, tmp_path / "a" / "checkpoint.pt")  # as an older version saved it
    again = await memory_swarm.add("a", shard="0/1")
    assert again.trainer.step >= d.trainer.step
    assert again.checkpoint_path.exists() and not (tmp_path / "a" / "checkpoint.pt").exists()


async def test_checkpoint_of_another_model_shape_is_moved_aside_and_the_peer_syncs(memory_swarm, tmp_path, caplog):
    swarm = await memory_swarm.add("b", shard="1/2")
    await wait_until(lambda: swarm.trainer.step > 30, 20, "the swarm to train")
    data_dir = tmp_path / "a"
    data_dir.mkdir(mode=0o700)
    path = data_dir / ckpt.checkpoint_name("test", TASK)
    wrong = fake_checkpoint(path, "test", numel=1234, step=99)  # right run and task, another model
    with caplog.at_level(logging.INFO, logger="peer"):
        a = await memory_swarm.add("a", shard="0/2", initial_peers=["memory"])
    assert a.phase == "training"
    aside = [p for p in data_dir.iterdir() if p.name.startswith(path.stem + ".mismatch-")]
    assert len(aside) == 1 and aside[0].read_bytes() == wrong
    said = lines(caplog, "is for another model")
    assert len(said) == 1 and "its model is torch.float32 (1234,)" in said[0] and aside[0].name in said[0], said
    assert lines(caplog, "synced model")  # started from the swarm, as a joiner does
    assert a.trainer.step >= 30


def _full_disk_after(nbytes: int, monkeypatch):
    """Files opened by save_checkpoint take `nbytes` bytes, then fail as a full disk does."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.left = f, nbytes

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))


def test_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-x.pt"
    previous = fake_checkpoint(path, "test", numel=1000)
    _full_disk_after(1000, monkeypatch)
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save_checkpoint(path, {"flat": torch.zeros(100_000)})
    # torch itself only says "[enforce fail at inline_container.cc:...] unexpected pos"
    assert str(e.value) == f"no space left on device while saving checkpoint {path}"
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temp file is gone


def test_torch_enforce_failure_on_a_full_disk_says_no_space(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-x.pt"
    previous = fake_checkpoint(path, "test")

    def enforce(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt.torch, "save", enforce)
    monkeypatch.setattr(ckpt, "_free_bytes", lambda directory: 0)  # the disk is full
    with pytest.raises(ckpt.CheckpointWriteError, match="^no space left on device while saving checkpoint"):
        ckpt.save_checkpoint(path, {"flat": torch.zeros(10)})
    assert path.read_bytes() == previous


async def test_full_disk_in_the_daemon_is_one_line_and_training_goes_on(memory_swarm, monkeypatch, caplog):
    d = await memory_swarm.add("a", shard="0/1")
    await d._checkpoint()
    previous = d.checkpoint_path.read_bytes()
    _full_disk_after(1000, monkeypatch)
    with caplog.at_level(logging.INFO, logger="peer"):
        await d._checkpoint()
    monkeypatch.undo()
    said = lines(caplog, "no space left")
    assert said == [f"no space left on device while saving checkpoint {d.checkpoint_path}; the previous checkpoint "
                    f"(step {d.last_checkpoint[0]}) is kept"]
    assert d.checkpoint_path.read_bytes() == previous
    assert d.counters["checkpoint_errors"] == 1 and d.phase == "training"
    step = d.trainer.step
    await wait_until(lambda: d.trainer.step > step, 10, "training to go on")


# --- a restarted peer takes the swarm's progress ------------------------------------------------------

def test_step_is_adopted_from_most_mixed_partners_only(tmp_path):
    from peer.daemon import PeerDaemon
    from protocols.transport.memory import MemoryNetwork

    d = PeerDaemon(fast_config(tmp_path / "a", shard="0/1"), MemoryNetwork().transport("a"))
    d.trainer.step = 100
    d._adopt_swarm_step([10**9], [0.3])  # one partner alone is not the swarm
    assert d.trainer.step == 100
    d._adopt_swarm_step([500, 10**9], [0.3, 0.0])  # the rule refused the second: not counted
    assert d.trainer.step == 100
    d._adopt_swarm_step([500, 10**9], [0.3, 0.3])  # median of (100, 500, 10^9)
    assert d.trainer.step == 500 and d.counters["steps_adopted"] == 400
    d._adopt_swarm_step([200, 300], [0.3, 0.3])  # never backwards
    assert d.trainer.step == 500


async def test_restarted_peer_adopts_the_swarms_step(memory_swarm, caplog):
    a = await memory_swarm.add("a", shard="0/3")
    b = await memory_swarm.add("b", shard="1/3")
    c = await memory_swarm.add("c", shard="2/3")
    await wait_until(lambda: a.trainer.step > 30, 20, "a to train")
    await memory_swarm.stop("a")
    saved = ckpt.load_checkpoint(a.checkpoint_path)["step"]
    await wait_until(lambda: min(b.trainer.step, c.trainer.step) > saved + 300, 60, "the swarm to move on")
    with caplog.at_level(logging.INFO, logger="peer"):
        # 5 steps a second of its own: a step 300 ahead within seconds is the swarm's
        again = await memory_swarm.add("a", shard="0/3", step_delay_s=0.2)
        assert again.trainer.step < saved + 20  # resumed its own, older checkpoint
        await wait_until(lambda: again.trainer.step > saved + 300, 20, "a to take the swarm's step")
    assert again.counters["steps_adopted"] > 300
    assert len(lines(caplog, "the swarm is ahead")) == 1
