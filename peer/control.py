"""Local control API for the CLI: JSON lines over a Unix socket in the data dir, mode 0600.

Only the user who owns the data dir can connect (file mode plus the 0700 data dir); nothing of
this API listens on the network. Requests: {"cmd": "status"} and {"cmd": "leave"}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

from peer.datadir import check_control_path

MAX_LINE = 64 * 1024


class NoDaemon(Exception):
    """No daemon answers on this data dir's control socket."""


async def serve_control(path: Path, handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> asyncio.AbstractServer:
    path = Path(path)
    check_control_path(path)  # a directory or file there is someone's: refused, never removed
    if path.exists() or path.is_symlink():
        path.unlink()  # left by a killed daemon; the data-dir lock proves no live one owns it

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            try:
                request = json.loads(line) if len(line) <= MAX_LINE else None
            except ValueError:
                request = None
            if not isinstance(request, dict):
                reply = {"ok": False, "error": "bad request"}
            else:
                reply = await handle(request)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_LINE)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Blocking client used by the CLI (no event loop, no heavy imports)."""
    path = Path(path)
    if not path.exists():
        raise NoDaemon(f"no peer daemon running (no control socket at {path})")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        raise NoDaemon(f"no peer daemon running (stale control socket at {path})") from None
    try:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data:
        raise NoDaemon(f"the daemon at {path} closed the connection without answering")
    return json.loads(data)
