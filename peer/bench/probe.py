"""A built-in task, instrumented for benchmarks: a start gate and an evaluation log.

Loaded by real `peer join` processes as `--task peer.bench.probe:mnist1d` (or `:digits`). Two
environment variables drive it:

- `PEER_BENCH_GATE`: training steps wait until this file exists, so every peer of a swarm starts
  training at one instant, after all of them are up and see each other (a peer that trains while
  the others are still starting would reach the target alone);
- `PEER_BENCH_LOG`: every evaluation appends `{"t", "samples", "accuracy"}` (wall clock, samples
  this peer has trained on, test accuracy; `peer.bench.eval_log`), so time and samples to a
  threshold are exact.

The model, data, optimizer and batch are the built-in task's, unchanged.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import fields

import torch
from torch import nn

from peer.bench import eval_log
from peer.tasks import Task, digits_mlp, mnist1d_cnn


class ProbedTask(Task):
    """Task whose `batch_size` (read by the trainer before each step, outside its lock) waits for the gate."""

    @property
    def batch_size(self) -> int:
        if not self._open.is_set():
            while not os.path.exists(self._gate_path):
                time.sleep(0.005)  # a file from another process: nothing to wait on but the file itself
            self._open.set()
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = value

    def _counting_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # called once per training step, and also by the loss screen's probe (`peer/loss_probe.py`,
        # 256 examples per model per round, under no_grad): only the former is training. Counting
        # both inflated the samples to 88 % by up to 3x with a round every 3 steps.
        if torch.is_grad_enabled():
            self.trained += len(target)
        return nn.functional.cross_entropy(logits, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(self.x_test)
        model.train()
        acc = float((logits.argmax(1) == self.y_test).float().mean())
        if self.trained:
            with open(self._log_path, "a") as f:
                f.write(eval_log.entry(self.trained, acc))
        return {"accuracy": acc, "test_loss": float(nn.functional.cross_entropy(logits, self.y_test))}


def _probed(task: Task) -> ProbedTask:
    probed = ProbedTask(**{f.name: getattr(task, f.name) for f in fields(task)})
    probed._open = threading.Event()
    probed._gate_path = os.environ["PEER_BENCH_GATE"]
    probed._log_path = os.environ["PEER_BENCH_LOG"]
    probed.trained = 0
    probed.loss_fn = probed._counting_loss
    return probed


def mnist1d(**options) -> ProbedTask:
    return _probed(mnist1d_cnn(**options))


def digits(**options) -> ProbedTask:
    return _probed(digits_mlp(**options))
