"""Tasks: what a run trains. A `Task` bundles model, optimizer, data and evaluation.

Built-in: `mnist1d-cnn` (default) and `digits-mlp` (tiny, for fast tests). A user's own task is
`--task my_module:build`, where `build(**options)` returns a `Task`.

Every peer of a run must build the same model from the same seed; each trains on its own shard
of the training set. Shards are computed identically on every peer from the run's data seed, so
`--shard i/n` gives disjoint shards without any coordination.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn


@dataclass
class Task:
    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    batch_size: int = 100
    # learning-rate multiplier by step: peers train forever, so the rate must decay for models to settle
    lr_schedule: Callable[[int], float] = lambda step: 1.0
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(self.x_test)
        model.train()
        return {
            "accuracy": float((logits.argmax(1) == self.y_test).float().mean()),
            "test_loss": float(self.loss_fn(logits, self.y_test)),
        }


def shard_indices(labels: np.ndarray, index: int, count: int, split: str = "iid", alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Indices of shard `index` of `count`: IID (random equal parts) or Dirichlet(alpha) per class."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} out of range")
    rng = np.random.default_rng(seed)
    if split == "iid":
        return np.sort(np.array_split(rng.permutation(len(labels)), count)[index])
    if split != "dirichlet":
        raise ValueError(f"unknown split {split!r} (iid or dirichlet)")
    parts: list[list[int]] = [[] for _ in range(count)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        props = rng.dirichlet([alpha] * count)
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for shard, chunk in enumerate(np.split(idx, cuts)):
            parts[shard].extend(chunk.tolist())
    return np.sort(np.array(parts[index], dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _mnist1d_data():
    """The standard MNIST-1D benchmark data (mnist1d's default arguments), generated locally.

    Cached: simulations build many peers in one process. Callers must not modify the tensors.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the *global* `random` and numpy RNGs; left seeded, every peer would
    # draw the same "random" ids afterwards (hivemind's DHT node ids among them).
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())  # never `get_dataset`, which downloads
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    f = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)
    return f(d["x"]), torch.tensor(d["y"]), f(d["x_test"]), torch.tensor(d["y_test"])


class MNIST1DCNN(nn.Module):
    """The ~8k-parameter 1-D CNN of the MNIST-1D benchmark (three stride-2 convs, 32 channels)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels * 5, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _split(x, y, shard, count, split, alpha, seed):
    idx = torch.from_numpy(shard_indices(y.numpy(), shard, count, split, alpha, seed))
    return x[idx], y[idx]


def mnist1d_cnn(shard: int = 0, num_shards: int = 1, split: str = "iid", alpha: float = 0.5, seed: int = 0, lr: float = 1e-2) -> Task:
    x, y, xt, yt = _mnist1d_data()
    x, y = _split(x, y, shard, num_shards, split, alpha, seed)
    return Task(
        name="mnist1d-cnn",
        make_model=MNIST1DCNN,
        make_optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        x_train=x, y_train=y, x_test=xt, y_test=yt, batch_size=100,
    )


def digits_mlp(shard: int = 0, num_shards: int = 1, split: str = "iid", alpha: float = 0.5, seed: int = 0, lr: float = 1e-2) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()  # ships inside scikit-learn: no download
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(d.target))
    x = torch.tensor(d.data[perm] / 16.0, dtype=torch.float32)
    yy = torch.tensor(d.target[perm])
    n_test = 360
    xt, yt, x, yy = x[:n_test], yy[:n_test], x[n_test:], yy[n_test:]
    x, yy = _split(x, yy, shard, num_shards, split, alpha, seed)
    return Task(
        name="digits-mlp",
        make_model=lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
        make_optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        x_train=x, y_train=yy, x_test=xt, y_test=yt, batch_size=64,
    )


BUILTIN: dict[str, Callable[..., Task]] = {"mnist1d-cnn": mnist1d_cnn, "digits-mlp": digits_mlp}


def load_task(name: str, **options) -> Task:
    """Build a task by built-in name or `module:function` (called with the shard options)."""
    if name in BUILTIN:
        return BUILTIN[name](**options)
    if ":" not in name:
        raise ValueError(f"unknown task {name!r}: built-in are {', '.join(BUILTIN)}, or use module:function")
    module, func = name.split(":", 1)
    task = getattr(importlib.import_module(module), func)(**options)
    if not isinstance(task, Task):
        raise TypeError(f"{name} returned {type(task).__name__}, not peer.tasks.Task")
    task.name = name  # peers match tasks by the name they were started with
    return task
