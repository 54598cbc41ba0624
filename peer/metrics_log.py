"""DATA_DIR/metrics.jsonl: one JSON line per heartbeat, for the experiment tools.

A "join" line goes before this process's first metrics line and a "leave" line on a graceful exit
(`scripts/experiment.py --collect` and `peer/experiment/collect.py` read them). The file is
renamed to .1 (.1 to .2, up to .KEEP) past `rotate_bytes`, so it never grows without bound. A
write that fails (a full disk, a removed data dir) is logged and dropped: metrics never stop a peer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("peer.metrics")


class MetricsLog:
    def __init__(self, path: Path, rotate_bytes: int = 8 << 20, keep: int = 3):
        self.path, self.rotate_bytes, self.keep = path, rotate_bytes, keep
        self.joined = False

    def write(self, fields: dict[str, Any], event: str = "metrics", join: dict[str, Any] | None = None) -> None:
        """Append one line of `fields` (after the "join" line `join`, the first time)."""
        lines = []
        if not self.joined:
            self.joined = True
            lines.append({"time": time.time(), "event": "join", **(join or {})})
        lines.append({"time": time.time(), "event": event, **fields})
        path = self.path
        try:
            if path.exists() and path.stat().st_size > self.rotate_bytes:
                for i in range(self.keep - 1, 0, -1):
                    old = path.with_name(f"{path.name}.{i}")
                    if old.exists():
                        os.replace(old, path.with_name(f"{path.name}.{i + 1}"))
                os.replace(path, path.with_name(f"{path.name}.1"))
            with open(path, "a") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
        except OSError as e:
            log.warning("metrics not written: %s", e)
