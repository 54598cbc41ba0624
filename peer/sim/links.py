"""Simulated links: per-peer upload and download rates (bytes/s) and latency, and transfer times.

A pull of B bytes requested at t reaches the server half a latency later; the server serves the
model it has at that instant, and the bytes arrive at

    t + latency + B / min(server upload / its uploads in flight, client download / its pulls in flight)

Shares are taken when the transfer starts and kept (no re-sharing when another transfer starts
or ends midway): a first-order model of TCP fair sharing, exact when transfers do not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Link:
    up_bytes_s: float
    down_bytes_s: float
    latency_s: float  # round trip: the request's way there plus the reply's first byte back
    uploads: int = 0  # transfers this peer is sending now
    downloads: int = 0  # transfers this peer is receiving now

    def __post_init__(self) -> None:
        if not (self.up_bytes_s > 0 and self.down_bytes_s > 0 and self.latency_s >= 0):
            raise ValueError(f"a link needs rates > 0 and latency >= 0, got up {self.up_bytes_s}, "
                             f"down {self.down_bytes_s}, latency {self.latency_s}")


def transfer_seconds(nbytes: int, server: Link, client: Link) -> float:
    """Seconds to move `nbytes` from `server` to `client` once the transfer starts, counting it
    among both ends' transfers in flight (the caller increments them when it starts)."""
    rate = min(server.up_bytes_s / max(1, server.uploads), client.down_bytes_s / max(1, client.downloads))
    return nbytes / rate
