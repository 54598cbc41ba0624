"""Checkpoints on disk: written atomically, so a kill -9 at any instant leaves the last good one.

Write to a temp file in the same directory, fsync it, rename over the old file, fsync the
directory. A reader therefore sees either the previous complete checkpoint or the new complete
one, never a torn file. Loading uses `weights_only=True`: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none. Raises ValueError if it is unusable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has an unknown format")
    return state


def remove_stale_temp_files(directory: Path) -> int:
    """Temp files left by a write that was killed; they are never valid checkpoints."""
    removed = 0
    for p in Path(directory).glob(".checkpoint-*.tmp"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
