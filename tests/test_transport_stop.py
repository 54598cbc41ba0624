"""A daemon whose p2pd died first still stops: `HivemindTransport.stop` is bounded.

hivemind's DHT shutdown asks p2pd to remove its handlers; with p2pd already gone (a signal to the
whole process group, an OOM kill) the request waited forever, so `peer join` never exited after
SIGTERM (seen when a benchmark was interrupted). Real p2pd, killed under the transport.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from protocols.transport.hivemind import HivemindTransport


def test_stop_returns_when_p2pd_died_first(tmp_path):
    async def main() -> float:
        t = HivemindTransport(str(tmp_path / "k.key"), ["/ip4/127.0.0.1/tcp/0"])
        await t.start()
        child = t.p2p._child
        child.send_signal(signal.SIGKILL)
        await child.wait()
        start = time.monotonic()
        await asyncio.wait_for(t.stop(), 4 * t.STOP_TIMEOUT_S)  # hivemind's DHT shutdown alone waits forever on a dead p2pd
        return time.monotonic() - start

    took = asyncio.run(main())
    assert took < 3 * HivemindTransport.STOP_TIMEOUT_S


@pytest.mark.slow  # real processes, over 5 s: the full suite runs it, the fast tier does not
def test_stop_kills_a_p2pd_that_does_not_exit(tmp_path):
    """A p2pd that ignores its TERM (stopped here with SIGSTOP) is killed, and reaped, by stop()."""
    async def main() -> int | None:
        t = HivemindTransport(str(tmp_path / "k.key"), ["/ip4/127.0.0.1/tcp/0"])
        await t.start()
        child = t.p2p._child
        child.send_signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(t.stop(), 6 * t.STOP_TIMEOUT_S)
        finally:
            if child.returncode is None:  # never leave a stopped p2pd behind, whatever happened
                child.send_signal(signal.SIGKILL)
                await child.wait()
        return child.returncode

    assert asyncio.run(main()) == -signal.SIGKILL
