"""Snapshots of the trainer's model for serving partners: shared while the model is unchanged,
written into reused buffers when it has changed.

Cloning a 400 MB model into fresh memory for every pull costs more in page faults (0.2-0.5 s)
than in copying (0.03 s; docs/benchmarks.md, transfer). So a pull of an unchanged model (same
`Trainer.version`) shares the snapshot already taken, however many serves read it at once; a
pull of a changed model copies it into a buffer no serve is reading (the previous snapshot's,
once its last reader is done), and allocates only when every buffer is being streamed. A buffer
is never overwritten while a lease on it is held, nor ever again after a lease that ended in an
error (a timed-out or cancelled send may leave bytes queued in the transport that still point
into it: that buffer is abandoned to the garbage collector). Between pulls one snapshot stays
resident (1x the model), plus at most `spare` idle buffers.

Used from the event loop; a lock makes it safe from threads too.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from peer.trainer import Trainer


@dataclass(eq=False)
class _Snapshot:
    tensor: torch.Tensor
    version: int
    step: int
    readers: int = 0
    abandoned: bool = False  # a lease on it ended in an error: never reused


class ServedSnapshots:
    def __init__(self, trainer: Trainer, spare: int = 0):
        self.trainer = trainer
        self.spare = spare
        self.current: _Snapshot | None = None  # the newest snapshot taken
        self.idle: list[torch.Tensor] = []  # buffers nobody reads, ready to be overwritten
        self.lock = threading.Lock()
        self.copies = 0  # snapshots taken (a pull of an unchanged model takes none)
        self.allocations = 0  # buffers allocated (the rest were reused)

    @contextlib.contextmanager
    def lease(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(step, snapshot) for one serve; the snapshot is read-only and stays intact until the lease ends."""
        snap = self._acquire()
        try:
            yield snap.step, snap.tensor
        except BaseException:
            self._release(snap, reusable=False)
            raise
        self._release(snap)

    def _acquire(self) -> _Snapshot:
        with self.lock:
            cur = self.current
            if cur is not None and cur.version == self.trainer.version:
                cur.readers += 1
                return cur
            if cur is not None and cur.readers == 0:
                buf = cur.tensor  # the outdated snapshot nobody reads: overwrite it
            elif self.idle:
                buf = self.idle.pop()
            else:
                buf = torch.empty_like(self.trainer.flat)
                self.allocations += 1
            version, step = self.trainer.copy_into(buf)
            self.copies += 1
            self.current = _Snapshot(buf, version, step, readers=1)
            return self.current

    def _release(self, snap: _Snapshot, reusable: bool = True) -> None:
        with self.lock:
            snap.readers -= 1
            if not reusable:
                snap.abandoned = True
                if self.current is snap:
                    self.current = None
            if snap.readers == 0 and snap is not self.current and not snap.abandoned and len(self.idle) < self.spare:
                self.idle.append(snap.tensor)  # otherwise dropped: its memory goes back
