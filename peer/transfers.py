"""Transfers: one peer's gossip streams, with deadlines from the payload's size and the link.

Every stream is capped by `--max-upload-mbps` / `--max-download-mbps` (one shared budget per
direction, handed out in small chunks, so concurrent transfers share it fairly), counted into
the peer's stats, and every read is bounded by `read_timeout_s`. A payload's deadline follows its
size and the goodput measured on earlier transfers (`protocols.ratelimit.LinkEstimator`), at most
`max_pull_s`: a 400 MB model over a home link is not judged by a 20 s timeout, and a stalled one
is not waited on for ever. Pulls return what arrived; every failure raises, and the daemon turns
it into a counted reason (`peer.core.PeerCore.pull_failed`).
"""

from __future__ import annotations

import asyncio
import math
import time

import torch

from peer.config import PeerConfig
from protocols import gossip
from protocols.codec import DEFAULT_LIMITS, TensorSpec, read_header, read_payload, write_header, write_payload
from protocols.compression import decompress
from protocols.ratelimit import LinkEstimator, RateLimitedStream, RateLimiter
from protocols.transport.base import CountingStream, Transport


class Transfers:
    def __init__(self, config: PeerConfig, transport: Transport, counters: dict[str, int], numel: int, task_name: str):
        for name in ("max_upload_mbps", "max_download_mbps"):
            if not (math.isfinite(getattr(config, name)) and getattr(config, name) >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be a number of Mbit/s >= 0 (0: no cap), got {getattr(config, name)}")
        self.config, self.transport, self.counters, self.task_name = config, transport, counters, task_name
        self.specs = [TensorSpec("flat", "float32", (numel,))]
        self.upload_cap = RateLimiter(config.max_upload_mbps * 125_000) if config.max_upload_mbps else None
        self.download_cap = RateLimiter(config.max_download_mbps * 125_000) if config.max_download_mbps else None
        # before any measurement: the slowest home link we plan for, or a lower cap (a cap is a
        # ceiling, not a rate), never below the estimator's own floor of 10 kB/s
        prior = max(10_000.0, min([1e6, *(c * 125_000 for c in (config.max_upload_mbps, config.max_download_mbps) if c)]))
        self.link = LinkEstimator(prior_rate_bytes_per_s=prior)  # what we receive
        self.upload_link = LinkEstimator(prior_rate_bytes_per_s=prior)  # what we serve

    def stream(self, raw) -> CountingStream:
        """A gossip stream, capped, counted, and with every read bounded."""
        if self.upload_cap is not None or self.download_cap is not None:
            raw = RateLimitedStream(raw, self.upload_cap, self.download_cap)
        return CountingStream(raw, self.counters, self.config.read_timeout_s)

    async def open(self, peer_id: str, addrs: list[str] | None) -> CountingStream:
        raw = await asyncio.wait_for(self.transport.open(peer_id, gossip.PROTOCOL, addrs), timeout=self.config.pull_timeout_s)
        return self.stream(raw)

    def payload_deadline(self, nbytes: int, concurrent: int = 1) -> float:
        """Seconds allowed for `nbytes` while `concurrent` transfers share our link: from the
        measured goodput (or the configured cap before any measurement), at most `max_pull_s`."""
        return min(self.config.max_pull_s, self.link.deadline(nbytes, time.monotonic(), concurrent))

    async def read_sized(self, stream, specs: list[TensorSpec], concurrent: int, into: list | None = None) -> list:
        """A reply's payload (specs already checked against limits), with a deadline from its size;
        a finished transfer teaches the link estimate."""
        nbytes = sum(s.nbytes for s in specs)
        started = time.monotonic()
        deadline = self.payload_deadline(nbytes, concurrent)
        try:
            parts = await asyncio.wait_for(read_payload(stream, specs, DEFAULT_LIMITS, into), timeout=deadline)
        except TimeoutError:
            # The payload deadline itself ran out: the link is slower than we thought. Learn it
            # (as if the rest would take as long again), or every later pull of this size would
            # time out the same way. A stalled read (read_timeout_s, a partner that stops
            # sending) teaches nothing: it says nothing about the link, and counting its
            # announced size as moved would teach a faster link than we have.
            elapsed = time.monotonic() - started
            if elapsed >= 0.99 * deadline:
                self.link.observe(nbytes, 2 * elapsed, time.monotonic(), concurrent)
            raise
        self.link.observe(nbytes, time.monotonic() - started, time.monotonic(), concurrent)
        return parts

    async def send_sized(self, stream, parts: list, nbytes: int, concurrent: int) -> None:
        """Serve a payload with a deadline from its size, our upload cap and the goodput our
        earlier serves measured (not our download rate: home links are asymmetric)."""
        now, concurrent = time.monotonic(), max(1, concurrent)
        deadline = self.upload_link.deadline(nbytes, now, concurrent)
        if self.upload_cap is not None and not self.upload_cap.unlimited:
            deadline = max(deadline, self.upload_link.base_s + nbytes * concurrent / (0.5 * self.upload_cap.rate))
        await asyncio.wait_for(write_payload(stream, parts, DEFAULT_LIMITS), timeout=min(self.config.max_pull_s, deadline))
        self.upload_link.observe(nbytes, time.monotonic() - now, time.monotonic(), concurrent)

    async def pull_model(self, peer_id: str, addrs: list[str] | None = None,
                         into: torch.Tensor | None = None, concurrent: int = 1) -> tuple[int, torch.Tensor]:
        """(step, model) of a partner; received into `into` (returned) if given, else a new tensor."""
        stream = await self.open(peer_id, addrs)
        try:
            await write_header(stream, gossip.model_request(self.config.run_id, self.task_name))
            header = await asyncio.wait_for(read_header(stream, DEFAULT_LIMITS), timeout=self.config.pull_timeout_s)
            step, comp, specs = gossip.check_model_reply(header, self.specs, DEFAULT_LIMITS)
            if comp is None:
                (arr,) = await self.read_sized(stream, specs, concurrent, None if into is None else [into.numpy()])
            else:  # a compressed anchor (outer steps)
                parts = await self.read_sized(stream, specs, concurrent)
        finally:
            await stream.close()
        if comp is not None:
            return step, await asyncio.to_thread(decompress, comp, parts, self.specs[0].numel, into)
        return step, (into if into is not None else torch.from_numpy(arr))

    async def pull_delta(self, peer_id: str, addrs: list[str] | None, since: int = -1,
                         into: torch.Tensor | None = None, concurrent: int = 1) -> tuple[int, int, torch.Tensor]:
        """(outer step, step, pseudo-gradient) a partner published last, decoded into `into` if
        given. Raises ProtocolError("remote_error", "not_newer") when it has nothing after `since`."""
        stream = await self.open(peer_id, addrs)
        numel = self.specs[0].numel
        try:
            await write_header(stream, gossip.delta_request(self.config.run_id, self.task_name, since))
            header = await asyncio.wait_for(read_header(stream, DEFAULT_LIMITS), timeout=self.config.pull_timeout_s)
            outer_step, step, comp, specs = gossip.check_delta_header(header, numel, DEFAULT_LIMITS)
            parts = await self.read_sized(stream, specs, concurrent)
        finally:
            await stream.close()
        delta = await asyncio.to_thread(decompress, comp, parts, numel, into)
        return outer_step, step, delta
