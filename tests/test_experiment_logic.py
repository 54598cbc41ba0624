"""The experiment runner's pure parts: scenario files, the churn schedule, the summary numbers,
and the daemon's metrics lines (join/leave events, rotation). No real processes here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peer.experiment.collect import collect, load_run, markdown, read_peer_dir, summarize
from peer.experiment.scenario import ScenarioError, churn_schedule, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((REPO / "scripts" / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_parse(path):
    sc = load_scenario(path)
    assert sc.peers >= 1 and sc.duration_s > 0
    churn_schedule(sc)  # draws without error


def test_bad_scenarios_say_what_is_wrong_in_one_line(tmp_path):
    cases = {
        'peers = 4\nbogus = 1\n': "unknown key(s) bogus",
        'peers = 4\n[attack]\ncount = 2\nname = "nope"\n': "unknown attack 'nope'",
        'peers = 4\n[churn]\nkill_fraction = 2\n': "kill_fraction",
        'peers = 4\n[churn]\nevents = [{at = 1, action = "explode", peer = 1}]\n': "action must be one of",
        'peers = 4\n[churn]\nevents = [{at = 1, action = "kill", peer = 9}]\n': "not an honest peer slot",
        'peers = 4\n[peer]\nno-such-setting = 1\n': "unknown setting",
        'peers = [\n': "not valid TOML",
    }
    for text, expected in cases.items():
        f = tmp_path / "s.toml"
        f.write_text(text)
        with pytest.raises(ScenarioError) as e:
            load_scenario(f)
        assert expected in str(e.value) and "\n" not in str(e.value).strip(), (text, str(e.value))


def churny(**kw):
    churn = {"leave_per_min": 0.3, "rejoin_per_min": 2.0, "kill_fraction": 0.5, "start_s": 20, "min_up": 3, **kw}
    return parse_scenario({"name": "c", "peers": 8, "duration_s": 3600, "seed": 7, "churn": churn})


def test_churn_schedule_is_seeded_and_consistent():
    sc = churny()
    a, b = churn_schedule(sc), churn_schedule(sc)
    assert a == b
    sc.seed = 8
    assert churn_schedule(sc) != a
    # per peer the actions alternate leave/kill -> join, never two leaves in a row; protected slot 0 never churns
    state = {p: "up" for p in range(8)}
    up = 8
    for e in a:
        assert e.peer != 0
        assert 20 <= e.at < 3600
        if e.action == "join":
            assert state[e.peer] == "down"
            state[e.peer], up = "up", up + 1
        else:
            assert state[e.peer] == "up"
            state[e.peer], up = "down", up - 1
            assert up >= 3
    assert all(s == "up" for s in state.values()), "everyone is back before the end"


def test_churn_schedule_follows_the_rates():
    sc = churny(min_up=0)
    events = churn_schedule(sc)
    c = Counter(e.action for e in events)
    leaves = c["kill"] + c["leave"]
    # 7 eligible peers, up a share 2/(2+0.3) of the time, leaving at 0.3/min over ~58 minutes
    expected = 7 * 0.3 * (2 / 2.3) * (3600 - 60 - 20) / 60
    assert 0.8 * expected < leaves < 1.2 * expected, (leaves, expected)
    assert 0.35 < c["kill"] / leaves < 0.65
    assert c["join"] == leaves


def test_explicit_events_replace_the_random_schedule():
    sc = parse_scenario({"name": "x", "peers": 4, "churn": {"leave_per_min": 5, "events": [
        {"at": 20, "action": "join", "peer": 2}, {"at": 10, "action": "kill", "peer": 2}]}})
    assert [(e.at, e.action, e.peer) for e in churn_schedule(sc)] == [(10, "kill", 2), (20, "join", 2)]


# --- the summary ---------------------------------------------------------------------------------

def metrics(t, acc, **kw):
    return {"time": t, "event": "metrics", "accuracy": acc, "step": int(t), "bytes_sent": int(1000 * t), "rounds_ok": int(t), **kw}


def honest_peer(t0, t1, acc=0.9, left=True):
    lines = [{"time": t0, "event": "join", "peer_id": "Qm" + str(t0), "attack": None}]
    lines += [metrics(t, acc) for t in range(t0 + 1, t1)]
    if left:
        lines.append({**metrics(t1, acc), "event": "leave", "exit_code": 0})
    return lines


def test_summary_counts_kills_joins_crashes_and_catchup():
    p0 = honest_peer(0, 100)
    # p1: killed at 30.5 (no leave line), relaunched at 40, rejoins at 42, climbs 0.5 -> 0.9 by t = 50
    p1 = honest_peer(0, 30, left=False)
    p1 += [{"time": 42, "event": "join", "peer_id": "Qm0", "attack": None}]
    p1 += [metrics(t, 0.5 + 0.05 * (t - 42)) for t in range(43, 50)] + honest_peer(49, 100)[1:]
    # p2: ends without a leave line and nobody killed it: a crash
    p2 = honest_peer(0, 60, left=False)
    # p3: an attacker (its join line says so); not in the honest numbers
    p3 = [{"time": 0, "event": "join", "peer_id": "Qmbad", "attack": "ipm"}] + [metrics(t, 0.1) for t in range(1, 100)]
    p3.append({**metrics(100, 0.1), "event": "leave", "exit_code": 0})
    events = [{"time": 0, "action": "run_start"}, {"time": 30.5, "action": "kill", "peer": "p1"},
              {"time": 40, "action": "start", "peer": "p1"}, {"time": 95, "action": "stop"}, {"time": 100, "action": "run_end"}]
    s = summarize({"p0": p0, "p1": p1, "p2": p2, "p3": p3}, events, {"name": "t", "target_accuracy": 0.85, "catchup_tolerance": 0.02})
    peers = {p["id"]: p for p in s["peers"]}
    assert [peers[n]["role"] for n in ("p0", "p1", "p2", "p3")] == ["honest", "honest", "honest", "attacker"]
    assert (peers["p1"]["joins"], peers["p1"]["kills"], peers["p1"]["crashed"]) == (2, 1, False)
    assert peers["p2"]["crashed"] and not peers["p0"]["crashed"] and not peers["p3"]["crashed"]
    assert peers["p0"]["leaves"] == 0, "the end-of-run stop is not a churn leave"
    assert s["honest_crashed"] == 1
    assert peers["p0"]["final_accuracy"] == pytest.approx(0.9)
    assert s["honest_accuracy_mean"] == pytest.approx(0.9)  # p3's 10 % does not count
    # a data dir whose last life ended before the stop (a fresh rejoin leaves one behind) is not in the mean
    gone = honest_peer(0, 40, acc=0.5)
    s2 = summarize({"p0": p0, "gone": gone}, events, {"name": "t"})
    assert [p["at_end"] for p in s2["peers"]] == [False, True] and s2["honest_accuracy_mean"] == pytest.approx(0.9)
    # the swarm (p0 and p2) was at 0.9 when p1 was relaunched at t = 40 (its runner `start` event,
    # not its join line at 42); p1 reads 0.85 at t = 49 and 0.9 at t = 50, the first >= 0.88
    assert s["join_catchup_seconds"] == [10.0]
    assert s["join_catchup_median"] == 10.0 and s["join_catchup_worst"] == 10.0
    assert s["joins_detail"][0]["startup_s"] == 2.0 and s["join_catchup_after_startup_worst"] == 8.0
    assert s["join_catchup_own_eval_worst"] == 10.0  # p1 had no restored reading: the same figure
    # a returner whose first heartbeat reports its checkpoint's 0.9 counts at once (target figure),
    # but the stricter own-evaluations view waits for a reading after its first local step (t = 46)
    p1r = honest_peer(0, 30, left=False) + [{"time": 42, "event": "join", "peer_id": "Qm0", "attack": None},
                                            {**metrics(42, 0.9), "step": 29}, {**metrics(43, 0.8), "step": 29}]
    p1r += [metrics(t, 0.8 if t < 46 else 0.9) for t in range(44, 50)] + honest_peer(49, 100)[1:]
    r = summarize({"p0": p0, "p1": p1r, "p2": p2}, events, {"name": "t", "catchup_tolerance": 0.02})
    assert r["join_catchup_seconds"] == [2.0] and r["join_catchup_own_eval_worst"] == 6.0
    assert "own evaluations only" in markdown(r)
    assert s["time_to_accuracy"] == 2.0  # the first grid point (2 s) with an honest reading >= 0.85
    # bytes are summed over p1's two lives (the counter restarts with each process)
    assert peers["p1"]["bytes_sent"] == 29000 + 100000


def test_collect_reads_rotated_files_torn_lines_and_gathered_dirs(tmp_path):
    d = tmp_path / "gathered" / "pod-a"
    d.mkdir(parents=True)
    lines = honest_peer(0, 50)
    (d / "metrics.jsonl.2").write_text("".join(json.dumps(r) + "\n" for r in lines[:10]))
    (d / "metrics.jsonl.1").write_text("".join(json.dumps(r) + "\n" for r in lines[10:30]))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[30:]) + '{"time": 99, "event": "metr')
    assert [r["time"] for r in read_peer_dir(d)] == [r["time"] for r in lines]
    e = tmp_path / "gathered" / "pod-b"
    e.mkdir()
    (e / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in honest_peer(0, 50, acc=0.8)))
    peers, events, scenario = load_run(tmp_path / "gathered")
    assert set(peers) == {"pod-a", "pod-b"} and events == [] and scenario is None
    s = collect(tmp_path / "gathered", plots=True)
    assert s["honest_accuracy_mean"] == pytest.approx(0.85)
    assert s["honest_crashed"] == 0
    assert (tmp_path / "gathered" / "summary.md").read_text().count("| pod-") == 2
    assert (tmp_path / "gathered" / "accuracy.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_run(tmp_path / "nothing-here")


def test_collect_refuses_a_dir_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        load_run(tmp_path)


# --- the daemon's own lines ------------------------------------------------------------------------

async def test_daemon_writes_join_and_leave_lines_and_rotates_metrics(memory_swarm):
    d = await memory_swarm.add("a", heartbeat_s=0.05)
    d.metrics_log.rotate_bytes = 600  # a few lines per file
    path = d.data_dir / "metrics.jsonl"
    import asyncio

    deadline = asyncio.get_running_loop().time() + 20
    while not (d.data_dir / "metrics.jsonl.3").exists():
        assert asyncio.get_running_loop().time() < deadline, "metrics.jsonl was never rotated three times"
        await asyncio.sleep(0.05)
    assert await memory_swarm.stop("a") == 0
    assert not (d.data_dir / "metrics.jsonl.4").exists(), "only `keep` old files are kept"
    assert path.stat().st_size < 2 * 600
    lines = read_peer_dir(d.data_dir)
    assert lines[-1]["event"] == "leave" and lines[-1]["exit_code"] == 0
    assert [r["time"] for r in lines] == sorted(r["time"] for r in lines)


def test_heterogeneous_runs_are_grouped_by_throttle():
    scenario = {"name": "h", "step_delay_s": 0.0, "heterogeneity": [
        {"peers": [0, 1], "step_delay_s": 0.01}, {"peers": [2], "step_delay_s": 0.07}, {"peers": [1], "step_delay_s": 0.03}]}
    lines = {"p0": honest_peer(0, 60, acc=0.9), "p1": honest_peer(0, 60, acc=0.8), "p2": honest_peer(0, 60, acc=0.7),
             "p3": honest_peer(0, 60, acc=0.6)}
    g = summarize(lines, [], scenario)["by_step_delay"]
    assert list(g) == ["0", "0.01", "0.03", "0.07"]
    assert g["0.01"]["peers"] == ["p0"] and g["0.03"]["peers"] == ["p1"], "the last group naming a slot wins"
    assert g["0.07"]["final_accuracy_mean"] == pytest.approx(0.7) and g["0"]["final_accuracy_mean"] == pytest.approx(0.6)
    assert summarize(lines, [], {"name": "plain"})["by_step_delay"] is None
