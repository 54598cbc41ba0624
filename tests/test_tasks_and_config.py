"""Tasks (shards, plugins, MNIST-1D side effects) and configuration precedence."""

from __future__ import annotations

import random

import numpy as np
import pytest

from peer.config import resolve
from peer.tasks import load_task, shard_indices


def test_iid_shards_partition_the_data():
    labels = np.arange(1000) % 10
    shards = [shard_indices(labels, i, 4, "iid", seed=3) for i in range(4)]
    allidx = np.concatenate(shards)
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000
    assert all(240 <= len(s) <= 260 for s in shards)


def test_dirichlet_shards_are_disjoint_skewed_and_reproducible():
    labels = np.repeat(np.arange(10), 100)
    shards = [shard_indices(labels, i, 5, "dirichlet", alpha=0.1, seed=0) for i in range(5)]
    assert len(np.unique(np.concatenate(shards))) == 1000
    again = shard_indices(labels, 2, 5, "dirichlet", alpha=0.1, seed=0)
    assert np.array_equal(shards[2], again)
    # with alpha=0.1 a shard is dominated by few classes
    top = max(np.bincount(labels[s], minlength=10).max() / max(len(s), 1) for s in shards)
    assert top > 0.3


def test_bad_shard_arguments():
    with pytest.raises(ValueError):
        shard_indices(np.zeros(10), 4, 4)
    with pytest.raises(ValueError):
        shard_indices(np.zeros(10), 0, 4, split="weird")


def test_mnist1d_task_leaves_global_random_alone():
    """mnist1d reseeds global RNGs; left alone, every peer drew identical DHT node ids."""
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    task = load_task("mnist1d-cnn", shard=1, num_shards=4)
    assert random.random() == expected
    assert task.x_train.shape[1:] == (1, 40) and len(task.y_train) == 1000
    assert sum(p.numel() for p in task.make_model().parameters()) < 10_000


def test_user_task_plugin(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(
        "from peer.tasks import digits_mlp\n"
        "def build(**opts):\n"
        "    t = digits_mlp(**opts)\n"
        "    t.batch_size = 7\n"
        "    return t\n"
        "def wrong(**opts):\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("mytask:build", shard=0, num_shards=2)
    assert task.name == "mytask:build" and task.batch_size == 7
    with pytest.raises(TypeError):
        load_task("mytask:wrong")
    with pytest.raises(ValueError):
        load_task("no-such-task")


def test_config_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "peer").mkdir(parents=True)
    (tmp_path / "xdg" / "peer" / "config.toml").write_text('run-id = "from-xdg"\ntask = "from-xdg"\npartners = 5\n')
    (tmp_path / "c.toml").write_text('run-id = "from-file"\ntask = "from-file"\n')
    cfg = resolve({"task": "from-flag", "run_id": None, "initial_peers": []}, tmp_path / "c.toml")
    assert cfg.task == "from-flag"          # flag (or env, which typer folds into the flag) wins
    assert cfg.run_id == "from-file"        # then --config
    assert cfg.partners == 5                # then the XDG file
    assert cfg.heartbeat_s == 2.0           # then defaults
    (tmp_path / "bad.toml").write_text("nonsense = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        resolve({}, tmp_path / "bad.toml")
