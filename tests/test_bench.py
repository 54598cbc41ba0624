"""scripts/bench.py runs every benchmark end to end at a tiny size and reports what it promises.

No timing assertion (speed targets live in the script's output, not in tests): the test checks
that each benchmark ran its real parts (real p2pd peers, real `peer join` processes, hivemind's
Optimizer), that the JSON carries the ratio the issue names, and that every figure is sane.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench.py"


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_bench_all_tiny_json_has_every_ratio_and_sane_figures():
    # about 90 s alone; `comms` alone took 275 s at load 5 on 2 cores (its two real swarms and the
    # in-process references), past the 120 s each benchmark had: `--tiny` gives each 240 s
    proc = subprocess.run([sys.executable, str(SCRIPT), "all", "--tiny", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=640)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"bench.py all printed no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    # each failed benchmark says why in its own entry; name them, not the tail of the whole report
    errors = {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v}
    assert proc.returncode == 0 and not errors, errors
    assert report["machine"]["cores"] >= 1

    t = report["transfer"]
    assert [r["size_mb"] for r in t["results"]] == [0.1, 1.0]
    for r in t["results"]:
        assert positive(r["ours_mb_s"]) and positive(r["bare_mb_s"])
        assert r["transfer_ratio"] == pytest.approx(r["ours_mb_s"] / r["bare_mb_s"])
        # the puller really received the model: its Python side grew by about the model's size
        assert r["ours_peak_extra_mb_client_python"] is None or r["ours_peak_extra_mb_client_python"] >= 0
    assert t["transfer_ratio"] == min(r["transfer_ratio"] for r in t["results"])

    a = report["aggregate"]
    assert a["rule"] == "sybilwall+scc" and len(a["results"]) == 1
    assert positive(a["aggregate_ratio"]) and a["aggregate_ratio"] == a["results"][0]["ratio"]

    c = report["convergence"]
    assert c["peers"] == 2 and c["total_batch"] == 2 * c["local_batch"]
    # digits-mlp reaches 50 % within seconds both centrally and in the swarm
    assert c["ours"]["reached"] and c["central"]["reached"], c
    assert 0.5 <= c["ours"]["best_min_accuracy"] <= 1 and 0.5 <= c["central"]["best_min_accuracy"] <= 1
    assert c["samples_ratio_vs_central"] == pytest.approx(c["ours"]["samples"] / c["central"]["samples"])
    hm = c["hivemind_configs"]["sync-400"]
    assert "error" not in hm, hm
    # hivemind's peers trained and were evaluated (it needs not reach the threshold in 6 s)
    assert hm["best_min_accuracy"] is not None and 0 < hm["best_min_accuracy"] <= 1
    assert "time_ratio_vs_hivemind" in c

    o = report["overhead"]
    assert positive(o["on_samples_per_s"]) and positive(o["off_samples_per_s"])
    assert o["overhead_ratio"] == pytest.approx(o["on_samples_per_s"] / o["off_samples_per_s"])
    # gossip really was on in the "on" windows and off in the "off" ones
    assert all(w["rounds_ok"] > 0 and w["bytes_received"] > 0 for w in o["on"])
    assert all(w["rounds_ok"] == 0 and w["serves"] == 0 for w in o["off"])

    m = report["comms"]
    assert m["peers"] == 2 and m["task"] == "lm-tiny"
    ours, per_step = m["results"]["(a) ours"], m["results"]["(b) per-step gossip"]
    # both swarms trained every step and gossiped; outer rounds sent compressed pseudo-gradients
    assert all(p["steps"] >= m["steps"] and p["rounds_ok"] + p["rounds_no_partner"] > 0 for p in ours["peers"] + per_step["peers"])
    assert all(p["outer"] and p["outer"]["outer_step"] > 0 for p in ours["peers"])
    assert m["bytes_reduction"] == pytest.approx(per_step["bytes_sent_per_step"] / ours["bytes_sent_per_step"], rel=0.01)
    assert m["bytes_reduction"] > 1
    assert m["loss_gap_vs_central"] == pytest.approx(ours["final_loss"] / m["results"]["(d) central"]["final_loss"] - 1, abs=1e-3)

    assert set(report["ratios"]) == {"transfer_ratio", "peak_extra_over_model", "aggregate_ratio",
                                     "samples_ratio_vs_central", "time_ratio_vs_hivemind", "overhead_ratio",
                                     "bytes_reduction", "loss_gap_vs_central", "utilisation_capped"}


def test_bench_rejects_an_unknown_benchmark_and_hivemind_config():
    bad = subprocess.run([sys.executable, str(SCRIPT), "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "convergence", "--hivemind", "no-such"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no-such" in bad.stderr


class _TrickleStream:
    """Offers `read_into` and hands out at most 7 bytes per call, as a slow socket would."""

    remote_peer = "trickle"

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    async def read_into(self, view: memoryview) -> int:
        n = min(7, len(view), len(self.data) - self.pos)
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    async def read_exactly(self, n: int) -> bytes:  # pragma: no cover - read_payload must prefer read_into
        raise AssertionError("read_into was available")


async def test_read_payload_fills_straight_from_read_into_and_refuses_a_short_stream():
    """Payloads are read into the destination array in whatever pieces arrive."""
    import numpy as np

    from protocols.codec import Limits, TensorSpec, read_payload

    spec = [TensorSpec("flat", "float32", (25,))]
    values = np.arange(25, dtype="<f4")
    (got,) = await read_payload(_TrickleStream(values.tobytes()), spec, Limits(chunk_bytes=16))
    assert got.dtype == np.dtype("<f4") and np.array_equal(got, values)
    with pytest.raises(EOFError):  # counted as "disconnected" by the daemon
        await read_payload(_TrickleStream(values.tobytes()[:-1]), spec, Limits(chunk_bytes=16))


def test_bench_counts_training_samples_only_not_the_loss_screens_probe(tmp_path, monkeypatch):
    """The convergence benchmark's samples are what peers trained on. The loss screen's probe calls
    the task's loss too (256 examples per model per round); counting those would inflate the
    samples to 88 % by up to 3x at a round every 3 steps."""
    from peer.bench import probe
    from peer.loss_probe import LossProbe
    from peer.trainer import Trainer

    (tmp_path / "gate").write_text("")
    monkeypatch.setenv("PEER_BENCH_GATE", str(tmp_path / "gate"))
    monkeypatch.setenv("PEER_BENCH_LOG", str(tmp_path / "eval.jsonl"))
    task = probe.mnist1d(shard=0, num_shards=4, split="iid", seed=0)
    trainer = Trainer(task, seed=0)
    for _ in range(3):
        trainer.train_step()
    assert task.trained == 3 * task.batch_size
    own = trainer.snapshot()
    LossProbe(task, samples=256).measure(own, [own.clone(), own.clone()])
    assert task.trained == 3 * task.batch_size


def test_convergence_bench_reads_only_whole_lines_of_a_log_being_written(tmp_path):
    """A peer appends its evaluation log while the bench polls it: a half-written last line is not
    read yet (parsing it would end the whole run with a JSONDecodeError)."""
    from peer.bench.eval_log import read_logs

    (tmp_path / "a").write_text('{"t": 1, "samples": 2, "accuracy": 0.5}\n{"t": 2, "sam')
    assert read_logs([tmp_path / "a", tmp_path / "missing"]) == [[{"t": 1, "samples": 2, "accuracy": 0.5}], []]


def test_convergence_timeline_is_the_lowest_peer_and_the_summed_samples():
    """The swarm reaches a threshold when its *lowest* peer does (a peer not yet evaluated counts
    as 0); its samples are the sum of each peer's latest count; written lines read back whole."""
    from peer.bench.eval_log import entry, summarize, timeline

    line = json.loads(entry(7, 0.25, epoch=3))
    assert line["samples"] == 7 and line["accuracy"] == 0.25 and line["epoch"] == 3 and line["t"] > 0
    a = [{"t": 101.0, "samples": 10, "accuracy": 0.9}, {"t": 104.0, "samples": 30, "accuracy": 0.95}]
    b = [{"t": 102.0, "samples": 20, "accuracy": 0.5}, {"t": 103.0, "samples": 40, "accuracy": 0.92}]
    tl = timeline([a, b], t0=100.0)
    assert [(p["t"], p["samples"], p["min_accuracy"]) for p in tl] == [
        (1.0, 10, 0.0), (2.0, 30, 0.5), (3.0, 50, 0.9), (4.0, 70, 0.92)]
    assert tl[0]["mean_accuracy"] == 0.45
    s = summarize(tl, threshold=0.6, at=[2.5, 0.5])
    assert s["reached"] and s["time_s"] == 3.0 and s["samples"] == 50
    assert s["mean_time_s"] == 2.0 and s["mean_samples"] == 30  # the peers' mean passes 0.6 first
    assert s["accuracy_at"] == {"2.5": 0.5, "0.5": None}
    assert s["best_min_accuracy"] == 0.92 and s["final_t"] == 4.0
    assert not summarize(tl, threshold=0.95, at=[])["reached"]
