"""Checkpoints on disk: one per run and task, written atomically, never overwritten by another run.

Write to a temp file in the same directory, fsync it, rename over the old file, fsync the
directory. A reader therefore sees either the previous complete checkpoint or the new complete
one, never a torn file; a write that fails (a full disk) leaves the previous one as it was.
Loading uses `weights_only=True`: a checkpoint is data, never code.

The data dir is shared by every run a user joins, so each run and task has its own file
(`checkpoint_name`): joining a second run never touches the first run's checkpoint. A checkpoint
that cannot be used (unreadable, another model's shape, another run's under our name) is renamed
aside (`set_aside`), never deleted.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("peer.state")

LEGACY_NAME = "checkpoint.pt"  # the single checkpoint of every run, before one per run
FORMAT = 1


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


def checkpoint_name(run_id: str, task: str) -> str:
    """The file name of a run's checkpoint for one task: readable where the names are, and told
    apart by a hash of both (names are shortened and reduced to safe characters)."""
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:40]

    digest = hashlib.sha256(f"{run_id}\0{task}".encode()).hexdigest()[:8]
    return f"checkpoint-{safe(run_id)}-{safe(task)}-{digest}.pt"


def checkpoint_path(data_dir: Path, run_id: str, task: str) -> Path:
    return Path(data_dir) / checkpoint_name(run_id, task)


class _RecordingWriter:
    """Passes writes to `f` and keeps the first OSError: torch.save swallows it and raises
    `[enforce fail at inline_container.cc:...] unexpected pos` instead, which says nothing of a
    full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace the checkpoint at `path`; CheckpointWriteError (one line) if it fails."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save({"format": FORMAT, **state}, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if not isinstance(e, Exception):
            raise
        raise _write_error(path, (writer.error if writer is not None else None) or e) from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# a write that failed without saying why, on a file system with less than this free, failed
# because the disk is full (torch's own writer reports only `unexpected pos`)
NEARLY_FULL_BYTES = 16 << 20


def _write_error(path: Path, e: BaseException) -> CheckpointWriteError:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or (
            not isinstance(e, OSError) and _free_bytes(path.parent) < NEARLY_FULL_BYTES):
        return CheckpointWriteError(f"no space left on device while saving checkpoint {path}")
    if isinstance(e, OSError):
        return CheckpointWriteError(f"cannot save checkpoint {path}: {e.strerror or e}")
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    return CheckpointWriteError(f"cannot save checkpoint {path}: {type(e).__name__}: {first_line}")


def _free_bytes(directory: Path) -> float:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return math.inf


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none. Raises ValueError if it is unusable.
    `mmap`: tensors stay on disk until touched (checking a large checkpoint costs no memory)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {(str(e).strip().splitlines() or [''])[0][:200]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has an unknown format")
    return state


def set_aside(path: Path, why: str) -> Path:
    """Rename `path` to `<stem>.<why>-<unix time>` next to it (never over another file); the new path."""
    path = Path(path)
    stamp = int(time.time())
    target = path.with_suffix(f".{why}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_suffix(f".{why}-{stamp}-{n}")
        n += 1
    os.rename(path, target)
    return target


def adopt_legacy_checkpoint(data_dir: Path) -> None:
    """Give a single `checkpoint.pt` (one file for every run) the name of the run and task it
    belongs to, so no run's save can overwrite it; an unreadable one is set aside. One log line."""
    legacy = Path(data_dir) / LEGACY_NAME
    if not legacy.exists():
        return
    try:
        state = load_checkpoint(legacy)
    except ValueError as e:
        log.error("%s; moved to %s", e, set_aside(legacy, "bad").name)
        return
    run_id, task = state.get("run_id"), state.get("task")
    if not isinstance(run_id, str) or not isinstance(task, str):
        log.warning("%s names no run and task; moved to %s", LEGACY_NAME, set_aside(legacy, "unknown").name)
        return
    target = checkpoint_path(data_dir, run_id, task)
    if target.exists():  # that run has saved under its own name since: keep both
        log.warning("%s (run %r, task %r) is older than %s; moved to %s", LEGACY_NAME, run_id, task,
                    target.name, set_aside(legacy, "old").name)
        return
    os.rename(legacy, target)
    log.info("%s (run %r, task %r) is now %s", LEGACY_NAME, run_id, task, target.name)


def remove_stale_temp_files(directory: Path) -> int:
    """Temp files left by a write that was killed; they are never valid checkpoints."""
    removed = 0
    for p in Path(directory).glob(".checkpoint-*.tmp"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
