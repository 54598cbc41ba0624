"""Start-up speed mechanisms: the training thread runs niced, and MNIST-1D comes from a checked cache."""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import numpy as np
import pytest

import peer.tasks as tasks
from peer.tasks import load_task
from peer.trainer import Trainer

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux-only")


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@linux_only
@pytest.mark.parametrize("requested", [7, 0])
def test_training_thread_is_niced_and_nothing_else(requested):
    base = _nice_of(threading.get_native_id())
    trainer = Trainer(load_task("digits-mlp"), nice=requested, eval_every_s=60)
    trainer.start()
    try:
        _wait(lambda: trainer.step > 0, 30, "training steps")
        tid = trainer._thread.native_id
        expected = max(base, requested)
        assert _nice_of(tid) == expected
        assert trainer.nice == (expected if requested else None)
        assert _nice_of(threading.get_native_id()) == base  # the caller (the event loop's thread) keeps its priority
        # a thread started afterwards by anyone else is not niced either
        seen = []
        t = threading.Thread(target=lambda: seen.append(_nice_of(threading.get_native_id())))
        t.start()
        t.join()
        assert seen == [base]
    finally:
        trainer.stop()


def _fake_mnist1d(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(4000, 40)), "y": rng.integers(0, 10, 4000),
            "x_test": rng.normal(size=(1000, 40)), "y_test": rng.integers(0, 10, 1000)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache dir, a counting stand-in for the (slow) generator, no in-memory copy."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def generate():
        calls.append(1)
        return _fake_mnist1d(len(calls))

    monkeypatch.setattr(tasks, "_generate_mnist1d", generate)
    tasks._mnist1d_data.cache_clear()
    yield tmp_path / "peer", calls
    tasks._mnist1d_data.cache_clear()


def _cache_file(d):
    files = list(d.glob("mnist1d-*.npz"))
    assert len(files) == 1, files
    return files[0]


def test_dataset_is_generated_once_then_read_from_the_cache(cache):
    d, calls = cache
    first = tasks._mnist1d_data()
    assert calls == [1]
    path = _cache_file(d)
    assert not list(d.glob("*.tmp"))  # written through a temp file, renamed into place
    tasks._mnist1d_data.cache_clear()
    second = tasks._mnist1d_data()
    assert calls == [1]  # not generated again
    assert all((a == b).all() for a, b in zip(first, second))
    assert first[0].shape == (4000, 1, 40) and first[1].shape == (4000,)
    assert path == _cache_file(d)


def test_truncated_cache_is_regenerated_not_trusted(cache):
    d, calls = cache
    tasks._mnist1d_data()
    path = _cache_file(d)
    path.write_bytes(path.read_bytes()[:1000])
    tasks._mnist1d_data.cache_clear()
    x, y, xt, yt = tasks._mnist1d_data()
    assert calls == [1, 1]
    expected = _fake_mnist1d(2)
    assert np.allclose(x.squeeze(1).numpy(), expected["x"]) and (y.numpy() == expected["y"]).all()
    tasks._mnist1d_data.cache_clear()
    tasks._mnist1d_data()
    assert calls == [1, 1]  # the rewritten file is whole again


def test_cache_with_altered_values_fails_its_checksum_and_is_regenerated(cache):
    d, calls = cache
    tasks._mnist1d_data()
    path = _cache_file(d)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y"] = arrays["y"].copy()
    arrays["y"][0] = (arrays["y"][0] + 1) % 10  # one flipped label, a perfectly readable file
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    tasks._mnist1d_data.cache_clear()
    _, y, _, _ = tasks._mnist1d_data()
    assert calls == [1, 1]
    assert (y.numpy() == _fake_mnist1d(2)["y"]).all()


def test_unwritable_cache_dir_still_gives_the_data(cache, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file, not a dir: mkdir fails
    x, *_ = tasks._mnist1d_data()
    assert x.shape == (4000, 1, 40)


def test_real_generation_matches_what_the_cache_gives(tmp_path, monkeypatch):
    """The cached arrays are the generated ones exactly, and generating leaves global RNGs alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls, real = [], tasks._generate_mnist1d
    monkeypatch.setattr(tasks, "_generate_mnist1d", lambda: calls.append(1) or real())
    tasks._mnist1d_data.cache_clear()
    try:
        random.seed(1234)
        expected = random.random()
        random.seed(1234)
        generated = tasks._mnist1d_data()
        assert random.random() == expected
        tasks._mnist1d_data.cache_clear()
        cached = tasks._mnist1d_data()
        assert calls == [1]
        assert all((a == b).all() for a, b in zip(generated, cached))
        assert list((tmp_path / "peer").glob("mnist1d-*.npz"))
    finally:
        tasks._mnist1d_data.cache_clear()
