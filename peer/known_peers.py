"""Peers of a run seen live recently, remembered in the data dir so a restart can find the run again.

`DATA_DIR/peers-<run_id>.json` holds at most `MAX_PEERS` peers (the most recently seen), each with
at most `MAX_ADDRS` addresses and the wall time it was last seen live; entries older than
`MAX_AGE_S` are dropped. On start the daemon dials these peers as well as `--initial-peer`, so the
first peer of a run, restarted without `--initial-peer`, rejoins its old partners. The file is
written atomically (temp file, fsync, rename), only when a peer is new or its addresses changed,
or at most every `REFRESH_S`. A corrupt file gives one warning and is ignored; it is replaced only
once there is a good one to write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable

log = logging.getLogger("peer.known_peers")

MAX_PEERS = 32
MAX_ADDRS = 8
MAX_AGE_S = 3 * 24 * 3600.0
REFRESH_S = 60.0
MAX_FILE_BYTES = 256 * 1024


def peers_file(data_dir: Path, run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:64]
    if safe != run_id:  # two run ids that clean up alike still get two files
        safe += "-" + hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return Path(data_dir) / f"peers-{safe}.json"


def _base(addr: str) -> str:
    """The address without its /p2p/<id> part."""
    return addr.split("/p2p/", 1)[0]


class KnownPeers:
    def __init__(self, data_dir: Path, run_id: str, self_id: str | None = None):
        self.path = peers_file(data_dir, run_id)
        self.self_id = self_id
        self.entries: dict[str, dict] = {}  # peer id -> {"addrs": [...], "seen": wall time}
        self._written = 0.0
        self._load()

    def _load(self) -> None:
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = json.loads(self.path.read_text())
            peers = data["peers"]
            if not isinstance(peers, dict):
                raise ValueError("'peers' is not a map")
            for pid, e in peers.items():
                addrs, seen = e["addrs"], float(e["seen"])
                if not (isinstance(pid, str) and pid.isalnum() and isinstance(addrs, list) and all(isinstance(a, str) for a in addrs)):
                    raise ValueError(f"bad entry for {str(pid)[:20]!r}")
                self.entries[pid] = {"addrs": addrs[:MAX_ADDRS], "seen": seen}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.entries = {}
            log.warning("ignoring %s (%s: %s); it is replaced once this peer sees live peers", self.path, type(e).__name__, e)
            return
        self._expire(time.time())

    def _expire(self, now: float) -> None:
        fresh = sorted(((e["seen"], pid) for pid, e in self.entries.items() if now - e["seen"] <= MAX_AGE_S), reverse=True)
        self.entries = {pid: self.entries[pid] for _, pid in fresh[:MAX_PEERS] if pid != self.self_id}

    def dial_addrs(self, exclude: Iterable[str] = ()) -> list[str]:
        """Full addresses (with /p2p/<id>) of the remembered peers, most recently seen first."""
        skip = set(exclude)
        return [f"{_base(a)}/p2p/{pid}" for pid, e in self.entries.items() if pid not in skip for a in e["addrs"]]

    def note(self, live: Iterable[tuple[str, Iterable[str]]], now: float | None = None) -> bool:
        """Record (peer id, addresses) of peers live now; write the file if something changed
        (or it is `REFRESH_S` old). True if it was written."""
        now = time.time() if now is None else now
        changed = False
        for pid, addrs in live:
            if pid == self.self_id:
                continue
            kept = list(dict.fromkeys(_base(a) for a in addrs if "/0.0.0.0/" not in a and "/::/" not in a))[:MAX_ADDRS]
            if not kept:
                continue
            old = self.entries.get(pid)
            changed = changed or old is None or old["addrs"] != kept
            self.entries[pid] = {"addrs": kept, "seen": now}
        if not self.entries or not (changed or now - self._written >= REFRESH_S):
            return False
        self._expire(now)
        self._write(now)
        return True

    def _write(self, now: float) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"version": 1, "peers": self.entries}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._written = now
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e.strerror or e)
            self._written = now  # try again after REFRESH_S, not every heartbeat
