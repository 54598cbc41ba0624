"""Tasks: what a run trains. A `Task` bundles model, optimizer, data and evaluation.

    __init__.py     `Task`, the built-in MNIST-1D and digits tasks, the dataset cache, `load_task`
    lm.py           the byte-level language models (`lm-tiny`, `lm`, `lm-large`) and their corpus

Built-in: `mnist1d-cnn` (default), `mnist1d-linear` (softmax regression, 410 parameters: what
simulations of thousands of peers train, peer/sim), `digits-mlp` (tiny, for fast tests), and the byte-level language
models `lm-tiny`, `lm`, `lm-large` (peer/tasks/lm.py). A user's own task is
`--task my_module:build`, where `build(**options)` returns a `Task`.

Every peer of a run must build the same model from the same seed; each trains on its own shard
of the training set. Shards are computed identically on every peer from the run's data seed, so
`--shard i/n` gives disjoint shards without any coordination.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("peer.tasks")


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
    # how a run of this task gossips unless the peer is told otherwise (peer/outer.py): inner
    # steps per outer round (0: whole models on the per-step cadence) and what a round sends
    outer_every_steps: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_sync_every: int = 10  # outer rounds between two consensus rounds that mix anchors (0: never)
    compression: str = "fp32"
    # examples of a peer's own training data on which the default rule's loss screen scores each
    # partner every round (one forward pass each): 256 MNIST-1D signals, a few LM windows
    loss_probe_samples: int = 256

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


def cache_dir() -> Path:
    """Where generated datasets are kept between runs: $XDG_CACHE_HOME/peer (~/.cache/peer)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peer"


MNIST1D_SHAPES = {"x": (4000, 40), "y": (4000,), "x_test": (1000, 40), "y_test": (1000,)}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(MNIST1D_SHAPES):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays if the file is whole and its checksum matches; None otherwise."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in MNIST1D_SHAPES}
            stored = str(f["sha256"])
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated, not a zip, a missing array: regenerate, never trust it
        log.warning("dataset cache %s unreadable (%s); regenerating it", path, str(e)[:80])
        return None
    if any(arrays[n].shape != shape for n, shape in MNIST1D_SHAPES.items()) or _digest(arrays) != stored:
        log.warning("dataset cache %s does not match its checksum; regenerating it", path)
        return None
    return arrays


def _store_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (a temp file renamed into place): concurrent peers never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, sha256=np.array(_digest(arrays)), **arrays)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:  # a read-only home: generate every time, nothing else changes
        log.info("dataset cache not written (%s)", e)


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The standard MNIST-1D benchmark data (mnist1d's default arguments), generated locally."""
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
    return {name: np.asarray(d[name]) for name in MNIST1D_SHAPES}


@functools.lru_cache(maxsize=1)
def _mnist1d_data():
    """MNIST-1D as tensors, generated once per machine and then read from the user cache dir.

    Generating it means importing mnist1d (matplotlib, scipy: ~1.4 s) and ~1 s of work: over half
    of a peer's start-up when alone, and several times that on a loaded machine. The cache file is
    named by the mnist1d version and checked against its own SHA-256 before use. Cached in memory
    too: simulations build many peers in one process. Callers must not modify the tensors.
    """
    path = cache_dir() / f"mnist1d-{importlib.metadata.version('mnist1d')}-v1.npz"
    arrays = _load_cached(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        _store_cached(path, arrays)
    def f(a):
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1)
    return f(arrays["x"]), torch.tensor(arrays["y"]), f(arrays["x_test"]), torch.tensor(arrays["y_test"])


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


def mnist1d_linear(shard: int = 0, num_shards: int = 1, split: str = "iid", alpha: float = 0.5, seed: int = 0, lr: float = 1e-2) -> Task:
    """Softmax regression on MNIST-1D (one Linear(40, 10): weight then bias in the flat vector).

    peer/sim trains it with a NumPy step equal to this task's torch step (tests check the two
    agree), so a simulation of 1,000 peers pays microseconds per step, not a millisecond."""
    x, y, xt, yt = _mnist1d_data()
    x, y = _split(x, y, shard, num_shards, split, alpha, seed)
    return Task(
        name="mnist1d-linear",
        make_model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(40, 10)),
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


def _lm(size: str) -> Callable[..., Task]:
    """A byte-level language-model task (peer/tasks/lm.py), imported only when built: importing
    peer.tasks must not read the corpus."""
    def build(**options) -> Task:
        from peer.tasks.lm import lm_task

        return lm_task(size=size, **options)
    return build


BUILTIN: dict[str, Callable[..., Task]] = {
    "mnist1d-cnn": mnist1d_cnn, "mnist1d-linear": mnist1d_linear, "digits-mlp": digits_mlp,
    "lm-tiny": _lm("tiny"), "lm": _lm("base"), "lm-large": _lm("large"),
}


def load_task(name: str, **options) -> Task:
    """Build a task by built-in name or `module:function` (called with the shard options)."""
    if name in BUILTIN:
        return BUILTIN[name](**options)
    if ":" not in name:
        raise ValueError(f"unknown task {name!r}: built-in are {', '.join(BUILTIN)}, or use module:function")
    module, func = name.split(":", 1)
    try:
        imported = importlib.import_module(module)
    except Exception as e:
        raise ValueError(f"--task {name}: importing {module} failed: {type(e).__name__}: {e}") from e
    build = getattr(imported, func, None)
    if not callable(build):
        raise ValueError(f"--task {name}: {module} has no function {func!r}")
    try:
        task = build(**options)
    except Exception as e:
        raise ValueError(f"--task {name}: {func}() raised {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise TypeError(f"{name} returned {type(task).__name__}, not peer.tasks.Task")
    task.name = name  # peers match tasks by the name they were started with
    return task
