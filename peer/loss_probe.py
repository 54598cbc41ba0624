"""How much worse a partner's model does than ours on a fixed batch of our own training data.

Feeds the loss screen of the default rule (`peer/aggregation/loss.py`): the one check that sees
poisoned training reported truthfully (label flip). It runs in the gossip round's worker thread,
on a scratch module of the task's model (never the trainer's), so training is not paused. Cost per
round: one forward pass over `samples` examples per partner, plus one for our own model.
The scratch module holds no model-sized memory: its parameters are views of the model being
scored while it is scored, and between scores views of one float (stride 0), so a scored model's
buffer is never kept alive by the probe.
Only parameters are loaded into the scratch model: a model with buffers (BatchNorm running
statistics) is scored with its initial buffers, the same for every partner and for our own.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from peer.tasks import Task


class LossProbe:
    def __init__(self, task: Task, samples: int = 256, seed: int = 0):
        self.loss_fn = task.loss_fn
        self.model = task.make_model().eval()
        self.params = list(self.model.parameters())
        self.shapes = [p.shape for p in self.params]
        # what each parameter points at between scores: one float seen at its shape (stride 0)
        self._idle = [torch.zeros(1, dtype=p.dtype).expand(p.shape) for p in self.params]
        initial = torch.nn.utils.parameters_to_vector(self.params)
        self._release()
        n = len(task.y_train)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples] if n > samples else torch.arange(n)
        self.x, self.y = task.x_train[idx], task.y_train[idx]
        # the task's loss scale: a freshly initialised model's loss on the batch (ln 10 = 2.3 for
        # a 10-class cross-entropy); the screen never cuts a partner for less than a fraction of it
        try:  # a task whose loss cannot run here is found out (and the screen turned off) by the
            # first round's measure(), with one logged line: construction must not stop the daemon
            self.untrained_loss = self.loss(initial)
        except Exception:
            self.untrained_loss = 0.0
        if not math.isfinite(self.untrained_loss):
            self.untrained_loss = 0.0

    def _release(self) -> None:
        for p, idle in zip(self.params, self._idle):
            p.data = idle

    @torch.no_grad()
    def loss(self, flat: torch.Tensor) -> float:
        """The task's loss of the model whose flat parameters are `flat` (not copied: viewed)."""
        flat = flat.reshape(-1)
        start = 0
        for p, shape in zip(self.params, self.shapes):
            n = shape.numel()
            p.data = flat[start:start + n].view(shape)
            start += n
        try:
            value = float(self.loss_fn(self.model(self.x), self.y))
        finally:
            self._release()
        return value if math.isfinite(value) else math.inf

    def measure(self, own: torch.Tensor, models: Sequence[torch.Tensor]) -> tuple[float, list[float | None]]:
        """loss(own), and loss(partner) - loss(own) for every partner model (None for all of them
        when our own loss is not finite: then there is nothing to compare with, and screening
        every partner out would leave a broken model nothing to recover by)."""
        base = self.loss(own)
        if not math.isfinite(base):
            return base, [None] * len(models)
        return base, [self.loss(m) - base for m in models]
