"""The byte-level language-model tasks (peer/tasks/lm.py): corpus identity, windows and shards,
the GPT, and that it learns."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.loss_probe import LossProbe
from peer.tasks import load_task
from peer.tasks import lm
from peer.trainer import Trainer

TINY = lm.SIZES["tiny"]


@pytest.fixture
def fresh_corpus():
    """Drop the in-process corpus caches before and after, so a monkeypatched reader is seen and
    other tests get the real corpus back."""
    lm.corpus.cache_clear()
    lm._windows.cache_clear()
    yield
    lm.corpus.cache_clear()
    lm._windows.cache_clear()


def test_corpus_is_deterministic_and_names_the_task():
    a, b = lm.build_corpus(), lm.build_corpus()
    assert a.digest == b.digest and a.data == b.data and a.paths == b.paths
    assert 1_000_000 < len(a.data) <= lm.MAX_CORPUS_BYTES
    assert list(a.paths) == sorted(a.paths) and all(p.endswith(".py") for p in a.paths)
    assert {p.split("/")[0] for p in a.paths} == {"distributions", "nn", "optim", "utils"}
    assert a.data.count(lm.SEPARATOR) == len(a.paths)  # the separator never occurs inside a file
    task = load_task("lm-tiny")
    assert task.name == f"lm-tiny@{lm.corpus_digest()[:12]}" == f"lm-tiny@{a.digest[:12]}"


def test_a_different_corpus_gives_a_different_task_name(monkeypatch, fresh_corpus):
    real_name = lm.lm_task("tiny").name
    real_read = lm.read_file
    monkeypatch.setattr(lm, "read_file", lambda root, rel: real_read(root, rel) + (b"#" if rel == "nn/init.py" else b""))
    lm.corpus.cache_clear()
    lm._windows.cache_clear()
    changed_bytes = lm.lm_task("tiny").name
    monkeypatch.setattr(lm, "read_file", real_read)
    real_files = lm.corpus_files
    monkeypatch.setattr(lm, "corpus_files", lambda root=None: [p for p in real_files(root) if p != "nn/init.py"])
    lm.corpus.cache_clear()
    lm._windows.cache_clear()
    fewer_files = lm.lm_task("tiny").name
    assert len({real_name, changed_bytes, fewer_files}) == 3
    assert all(n.startswith("lm-tiny@") for n in (changed_bytes, fewer_files))


def test_a_missing_corpus_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="corpus directory .* is missing"):
        lm.build_corpus(tmp_path)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_shards_partition_the_training_windows_and_never_touch_the_test_set(split):
    windows, labels, held_out = lm._windows(TINY.context)
    count = 4
    shards = [lm.split_windows(TINY.context, i, count, split, alpha=0.5, seed=3)[0] for i in range(count)]
    union = np.concatenate(shards)
    assert len(union) == len(np.unique(union))  # disjoint
    assert set(union.tolist()) == set(range(len(windows))) - set(held_out.tolist())  # and they cover
    assert 0.04 < len(held_out) / len(windows) < 0.06
    assert not np.intersect1d(union, held_out).size
    if split == "dirichlet":  # non-IID: the shards' subpackage mixes differ
        mixes = [np.bincount(labels[s], minlength=len(lm.SUBPACKAGES)) / len(s) for s in shards]
        assert max(np.abs(m - mixes[0]).max() for m in mixes[1:]) > 0.1


def test_targets_are_inputs_shifted_by_one():
    task = lm.lm_task("tiny")
    assert task.x_train.shape[1] == TINY.context and task.x_train.dtype == torch.uint8
    assert torch.equal(task.x_train[:, 1:], task.y_train[:, :-1])
    assert torch.equal(task.x_test[:, 1:], task.y_test[:, :-1])


def test_tiny_model_shape_parameters_and_initial_loss():
    task = lm.lm_task("tiny")
    torch.manual_seed(0)
    model = task.make_model()
    torch.manual_seed(0)
    again = task.make_model()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert 700_000 < sum(p.numel() for p in model.parameters()) < 1_300_000
    x, y = task.x_train[:8], task.y_train[:8]
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (8, TINY.context, 256)
        assert abs(float(task.loss_fn(logits, y)) - math.log(256)) < 0.5
        assert torch.equal(model(x.long()), logits)  # any integer dtype


def test_tiny_model_learns_on_one_shard():
    task = load_task("lm-tiny", shard=0, num_shards=4, seed=0)
    task.batch_size = 8  # half the task's batch: the same drop in half the time (5.4 -> ~3.1 nats)
    trainer = Trainer(task, seed=0, warmup_steps=10)
    x, y = task.x_train[:64], task.y_train[:64]

    def loss() -> float:
        with torch.no_grad():
            return float(task.loss_fn(trainer.model(x), y))

    before = loss()
    for _ in range(40):
        trainer.train_step()
    after = loss()
    assert before > 5.0 and after < before - 1.5, (before, after)


def test_evaluate_reports_bits_per_byte_and_accuracy_and_restores_the_mode():
    task = lm.lm_task("tiny")
    torch.manual_seed(0)
    model = task.make_model()
    m = task.evaluate(model)
    assert set(m) == {"test_loss", "bits_per_byte", "accuracy"}
    assert math.isfinite(m["test_loss"]) and m["bits_per_byte"] == pytest.approx(m["test_loss"] / math.log(2))
    assert 0.0 <= m["accuracy"] <= 1.0
    assert model.training
    model.eval()
    assert task.evaluate(model) == m and not model.training


def test_load_task_with_shard_options_and_the_loss_probe():
    task = load_task("lm-tiny", shard=1, num_shards=4, split="dirichlet", alpha=0.5, seed=0)
    assert task.name.startswith("lm-tiny@") and len(task.y_train) > 0
    probe = LossProbe(task, samples=16)
    assert abs(probe.untrained_loss - math.log(256)) < 0.5
    with pytest.raises(ValueError, match="unknown lm size"):
        lm.lm_task("huge")


def test_importing_peer_tasks_does_not_build_the_corpus():
    code = "import sys, peer.tasks; assert 'peer.tasks.lm' not in sys.modules and 'lm' in peer.tasks.BUILTIN"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
