#!/usr/bin/env python3
"""Transfer benchmark: one peer pulls another's model through `/peer/gossip/1`, next to a bare p2pd stream.

Two processes, each with its own real p2pd on 127.0.0.1 (hivemind's `P2P`, as `peer join` runs it):
this one (the puller) and a server child (`--serve`, driven by JSON lines on its stdin). Both
build a real `PeerDaemon` around a synthetic one-tensor model of the asked size, so the pull goes
through the daemon's own `pull_model` and `_serve_model` (header, limits, snapshot, chunked
payload). The bare anchor moves the same bytes (the server model's flat buffer) through a p2pd
stream handler that writes them in one call, and a reader that discards them: the physical limit
of a p2pd stream seen from Python. Ours and bare alternate in one run.

Ours is timed twice: `ours` pulls a model that changed since the previous pull (the server
mixes a zero delta into every coordinate before each, untimed, as a training peer's model
changes between any two pulls), so the serve copies a fresh snapshot; `ours_idle` pulls an
unchanged model, which the serve sends from the snapshot it already holds (`peer/snapshots.py`).
`transfer_ratio` is ours / bare, the changed-model case; `transfer_ratio_idle` the other.
The puller receives into one buffer reused across pulls, as the daemon's gossip rounds do.

Peak RSS: before every transfer both Python processes and both p2pd children reset their peak
(`/proc/PID/clear_refs`), after it the peak minus the RSS just before is that side's extra.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


RAW_PROTOCOL = "/bench/raw/1"
MB = 10**6


# --- memory, from /proc (torch's and the event loop's buffers are invisible to tracemalloc) ---

def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def hwm_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (needs the same rights as ptrace; fine for our own children)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Free what is garbage and give the heap back, so RSS before a transfer is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak RSS of this process and of its p2pd child, relative to just before a transfer."""

    def __init__(self, p2pd_pid: int | None):
        self.pids = {"python": "self", "p2pd": p2pd_pid}
        self.before: dict[str, int | None] = {}

    def reset(self) -> dict[str, int | None]:
        trim()
        self.before = {}
        for name, pid in self.pids.items():
            ok = pid is not None and reset_peak(pid)
            self.before[name] = rss_bytes(pid) if ok else None
        return self.before

    def peak_extra(self) -> dict[str, int | None]:
        return {name: None if self.before.get(name) is None else max(0, hwm_bytes(pid) - self.before[name])
                for name, pid in self.pids.items()}


# --- a peer daemon around a synthetic model of a given size ---

def synthetic_task(numel: int):
    """A one-tensor model of `numel` float32 (what travels is the flat parameter vector)."""
    import torch
    from torch import nn

    from peer.tasks import Task

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(numel))

        def forward(self, x):
            return x

    one = torch.zeros(1, 1)
    return Task(name=f"bench-flat-{numel}", make_model=Flat, make_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
                x_train=one, y_train=torch.zeros(1, dtype=torch.long), x_test=one, y_test=torch.zeros(1, dtype=torch.long))


def make_daemon(transport, numel: int, data_dir: Path):
    """A PeerDaemon that is never `run()`: only its pull/serve methods are used, over a started transport."""
    from peer.config import PeerConfig
    from peer.daemon import PeerDaemon

    cfg = PeerConfig(data_dir=data_dir, run_id="bench-transfer", pull_timeout_s=600.0)
    daemon = PeerDaemon(cfg, transport, task=synthetic_task(numel))
    daemon.trainer.flat.uniform_(-1, 1)  # touch every page: a trained model is resident, not lazily zero
    return daemon


async def start_transport(root: Path):
    from protocols.transport.hivemind import HivemindTransport

    transport = HivemindTransport(str(root / "identity.key"), ["/ip4/127.0.0.1/tcp/0"])
    await transport.start()
    child = getattr(transport.p2p, "_child", None)  # hivemind's handle on the p2pd process
    return transport, getattr(child, "pid", None)


# --- the server process ---

async def serve(root: Path) -> None:
    """Serve our protocol and the bare one; obey JSON commands on stdin, answer JSON lines on stdout."""
    transport, p2pd_pid = await start_transport(root)
    probe = MemoryProbe(p2pd_pid)
    state: dict = {"daemon": None}

    async def gossip_handler(stream) -> None:
        await state["daemon"]._serve_model(stream)

    async def raw_handler(_info, reader, writer) -> None:
        try:
            n = int.from_bytes(await reader.readexactly(8), "big")
            flat = state["daemon"].trainer.flat.numpy()
            writer.write(memoryview(flat).cast("B")[:n])
            await writer.drain()
            await reader.read(1)  # the puller closes once it has everything: closing first could cut the tail
        finally:
            writer.close()

    from protocols import gossip

    await transport.set_handler(gossip.PROTOCOL, gossip_handler)
    await transport.p2p.add_binary_stream_handler(RAW_PROTOCOL, raw_handler)

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"peer_id": transport.peer_id, "addrs": await transport.addrs()})
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "load":
                state["daemon"] = None
                trim()
                state["daemon"] = make_daemon(transport, int(cmd["numel"]), root)
                reply({"ok": True})
            elif cmd["cmd"] == "change":  # the model changes, as a training step would (every coordinate)
                import torch

                state["daemon"].trainer.apply_delta(torch.zeros(()))
                reply({"version": state["daemon"].trainer.version})
            elif cmd["cmd"] == "reset":
                reply({"before": probe.reset()})
            elif cmd["cmd"] == "peak":
                reply({"peak_extra": probe.peak_extra()})
            elif cmd["cmd"] == "quit":
                break
    finally:
        await transport.stop()


class ServerProcess:
    """The serving peer, a child process; commands go in as JSON lines and answers come back."""

    def __init__(self, root: Path):
        self.root = root

    async def start(self) -> dict:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", str(self.root),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=open(self.root / "server.log", "wb"), env=  # noqa: ASYNC230 (a local log file)
            {**os.environ, "PYTHONUNBUFFERED": "1"})
        return await self._answer(timeout=120)

    async def _answer(self, timeout: float) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"transfer server exited:\n{log}")
        return json.loads(line)

    async def ask(self, cmd: str, timeout: float = 300, **kw) -> dict:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._answer(timeout)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                await self.proc.stdin.drain()
                await asyncio.wait_for(self.proc.wait(), 30)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()


# --- the puller (this process) ---

async def bare_pull(transport, peer_id: str, nbytes: int, chunk: int = 1 << 20) -> int:
    """Read `nbytes` from the bare handler and drop them: nothing but the p2pd stream."""
    from hivemind.p2p import PeerID

    _, reader, writer = await transport.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), RAW_PROTOCOL)
    try:
        writer.write(nbytes.to_bytes(8, "big"))
        await writer.drain()
        got = 0
        while got < nbytes:
            data = await reader.read(chunk)
            if not data:
                raise ConnectionError(f"bare stream ended after {got} of {nbytes} bytes")
            got += len(data)
        return got
    finally:
        writer.close()


async def measure(sizes_mb: list[float], repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)  # as `peer join` (default --threads 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="peer-bench-transfer-") as tmp:
        root = Path(tmp)
        (root / "server").mkdir()
        (root / "client").mkdir()
        server = ServerProcess(root / "server")
        hello = await server.start()
        transport = None
        try:
            transport, p2pd_pid = await start_transport(root / "client")
            probe = MemoryProbe(p2pd_pid)
            peer_id, addrs = hello["peer_id"], hello["addrs"]
            for size_mb in sizes_mb:
                numel = max(1, int(size_mb * MB) // 4)
                nbytes = numel * 4
                daemon = None
                trim()
                await server.ask("load", numel=numel)
                daemon = make_daemon(transport, numel, root / "client")

                # the daemon receives partners' models into buffers it reuses every round
                receive = torch.empty(numel)

                async def ours_idle(daemon=daemon, receive=receive) -> None:
                    step, model = await daemon.pull_model(peer_id, addrs, into=receive)
                    assert model is receive
                    del model

                ours = ours_idle  # timed after the server's model changed (see `before` below)

                async def bare(nbytes=nbytes) -> None:
                    assert await bare_pull(transport, peer_id, nbytes) == nbytes

                await ours()  # warm-up: connection, first allocations
                await bare()
                names = ("ours", "ours_idle", "bare")
                fns = {"ours": ours, "ours_idle": ours_idle, "bare": bare}
                times = {n: [] for n in names}
                peaks = {n: [] for n in names}
                for r in range(repeats):
                    order = names[r % 3:] + names[:r % 3]  # each goes first once in 3 repeats
                    for name in order:
                        fn = fns[name]
                        if name == "ours":
                            await server.ask("change")  # untimed: the model the serve snapshots is new
                        await server.ask("reset")
                        probe.reset()
                        t0 = time.perf_counter()
                        await fn()
                        times[name].append(time.perf_counter() - t0)
                        server_peak = (await server.ask("peak"))["peak_extra"]
                        client_peak = probe.peak_extra()
                        peaks[name].append({"client_python": client_peak["python"], "client_p2pd": client_peak["p2pd"],
                                            "server_python": server_peak["python"], "server_p2pd": server_peak["p2pd"]})
                row = {"size_mb": nbytes / MB, "bytes": nbytes, "repeats": repeats}
                for name in names:
                    row[f"{name}_s"] = statistics.median(times[name])
                    row[f"{name}_mb_s"] = nbytes / MB / row[f"{name}_s"]
                    row[f"{name}_s_all"] = times[name]
                    for side in ("client_python", "client_p2pd", "server_python", "server_p2pd"):
                        vals = [p[side] for p in peaks[name] if p[side] is not None]
                        row[f"{name}_peak_extra_mb_{side}"] = max(vals) / MB if vals else None
                row["transfer_ratio"] = row["ours_mb_s"] / row["bare_mb_s"]
                row["transfer_ratio_idle"] = row["ours_idle_mb_s"] / row["bare_mb_s"]
                # goal: each Python peer's peak above its idle RSS stays under 2x the model size
                worst = max((row[f"{o}_peak_extra_mb_{s}"] or 0) for s in ("client_python", "server_python")
                            for o in ("ours", "ours_idle"))
                row["peak_extra_over_model"] = worst / (nbytes / MB)
                results.append(row)
                daemon = receive = ours = ours_idle = fns = None  # freed before the next size loads
            return {"results": results}
        finally:
            if transport is not None:
                await transport.stop()
            await server.stop()


def run(sizes_mb: list[float], repeats: int) -> dict:
    import uvloop  # the daemon's event loop

    return uvloop.run(measure(sizes_mb, repeats))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        import torch
        import uvloop

        torch.set_num_threads(1)
        uvloop.run(serve(Path(sys.argv[2])))
    else:
        sizes = [float(s) for s in sys.argv[1:]] or [1, 40, 400]
        print(json.dumps(run(sizes, repeats=3), indent=1))
