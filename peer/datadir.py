"""The data dir a daemon keeps its state in, checked before anything in it is touched.

Invariants: the directory is private to its owner (0700: logs, metrics and the control socket
say what this peer does), writable (a checkpoint or the identity key can be saved), and nothing
in it is ever overwritten or deleted to make a start possible. Whatever stands in the way is
reported as one `LocalStateError` line; the daemon then exits with code 2.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("peer.datadir")


class LocalStateError(ValueError):
    """Local state (data dir, identity key, control socket) the daemon cannot start with."""


def check_data_dir(path: Path, socket_name: str = "control.sock") -> None:
    """Create the data dir 0700 if missing; refuse one that is not a writable directory or holds
    something other than a socket where the control socket goes. Changes nothing that exists
    (`peer join` runs this before logging is set up)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise LocalStateError(f"cannot create data dir {path}: {e.strerror or e}; pick a folder this user can write") from None
    if not path.is_dir():
        raise LocalStateError(f"data dir {path} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LocalStateError(f"data dir {path} is not writable ({e.strerror or e}); nothing in it was changed") from None
    check_control_path(path / socket_name)


def prepare_data_dir(path: Path, socket_name: str = "control.sock") -> None:
    """`check_data_dir`, then make an existing data dir private (0700) with one log line."""
    path = Path(path)
    check_data_dir(path, socket_name)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            raise LocalStateError(f"data dir {path} is mode {mode:04o}, readable by other users, and cannot be "
                                  f"made 0700 ({e.strerror or e})") from None
        log.warning("data dir %s was mode %04o, readable by other users; set to 0700", path, mode)


def check_control_path(path: Path) -> None:
    """Where the control socket goes there may be nothing, a socket or a symlink (left by a killed
    daemon: replaced at start), never anything else (that would be someone's file or directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "regular file" if stat.S_ISREG(st.st_mode) else "special file"
        raise LocalStateError(f"{path} is a {kind}, not a control socket; move it away (it was left as it is)")
