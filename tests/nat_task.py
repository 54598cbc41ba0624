"""A task for tests/test_nat_traversal.py: the digits MLP made wide enough that one model (about
300 KB in fp32) is more than a relayed connection carries under go-libp2p's default relay limits
(128 KiB each way), so a model that crosses the relay proves those limits are not in force."""

from __future__ import annotations

from torch import nn

from peer.tasks import digits_mlp


def wide_digits(**options):
    task = digits_mlp(**options)
    task.make_model = lambda: nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return task
