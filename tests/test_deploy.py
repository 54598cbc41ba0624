"""deploy/: what cannot run here (no container engine, no cluster) must still be valid.

The Kubernetes manifests are checked against the API's JSON schemas that `kubernetes-validate`
ships (offline, strict: unknown fields fail), then against each other (names, selectors,
references). The churn job's script runs for real against a stand-in `kubectl`, and its output
goes through the same collection code as a local run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUBE_VERSION = "1.30.0"


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def test_every_manifest_matches_the_kubernetes_schema():
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {"Service", "StatefulSet", "ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"}
    for name, d in docs:
        try:
            kv.validate(d, KUBE_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {d['kind']} {d['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_validator_can_fail():
    bad = dict(by_kind("StatefulSet")["peer"])
    bad = json.loads(json.dumps(bad))
    bad["spec"]["replicas"] = "eight"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSION, strict=True)
    bad["spec"]["replicas"] = 8
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo strict mode refuses
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSION, strict=True)


def test_manifests_refer_to_each_other_consistently():
    services, sets, maps = by_kind("Service"), by_kind("StatefulSet"), by_kind("ConfigMap")
    for name, s in sets.items():
        labels = s["spec"]["template"]["metadata"]["labels"]
        assert s["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert s["spec"]["serviceName"] in services, name
        pod = s["spec"]["template"]["spec"]
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"] for v in pod.get("volumes", [])} | {t["metadata"]["name"] for t in s["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= volumes, (name, mounts - volumes)
        for v in pod.get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] != "peer-churn-schedule":
                assert v["configMap"]["name"] in maps, (name, v)
        assert pod["terminationGracePeriodSeconds"] >= 30, "SIGTERM must leave time for a graceful leave"
    # the bootstrap Service selects the bootstrap pod, and the run's initial peer names that Service
    boot = services["peer-bootstrap"]
    assert boot["spec"]["selector"].items() <= sets["peer-bootstrap"]["spec"]["template"]["metadata"]["labels"].items()
    assert re.fullmatch(r"/dns4/peer-bootstrap/tcp/31337/p2p/\S+", maps["peer-run"]["data"]["initial-peer"])
    # the churn job may delete pods, and its pod prefix is the peers' StatefulSet name
    role = by_kind("Role")["peer-churn"]
    assert any("pods" in r["resources"] and "delete" in r["verbs"] for r in role["rules"])
    job = by_kind("Job")["peer-churn"]["spec"]["template"]["spec"]
    assert job["serviceAccountName"] in by_kind("ServiceAccount")
    env = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    assert env["PEER_POD_PREFIX"] == "peer-" and "peer" in sets


def test_peer_settings_in_the_run_config_are_real_settings():
    import tomllib

    from peer.config import _FIELDS

    conf = tomllib.loads(by_kind("ConfigMap")["peer-run"]["data"]["config.toml"])
    assert all(k.replace("-", "_") in _FIELDS for k in conf), conf


def test_dockerfile_copies_what_exists():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    assert 'ENTRYPOINT ["peer", "join"]' in text
    assert "torch==2.13.0" in text


def test_churn_script_deletes_pods_on_schedule_and_logs_what_collect_reads(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "kubectl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("# a comment\n0.2 kill 3\n0.4 leave 5\n0.6 join 3\n")
    r = subprocess.run(["bash", str(K8S / "churn.sh"), str(schedule)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "KUBECTL": str(fake)})
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines() == [
        "delete pod peer-3 --grace-period=0 --force --wait=false",
        "delete pod peer-5 --wait=false",
    ]
    (tmp_path / "events.jsonl").write_text(r.stdout)
    from peer.experiment.collect import read_jsonl

    events = read_jsonl(tmp_path / "events.jsonl")
    assert [(e["action"], e.get("peer")) for e in events] == [
        ("run_start", None), ("kill", "peer-3"), ("leave", "peer-5"), ("join", "peer-3"), ("schedule_done", None)]
    assert events[2]["time"] - events[0]["time"] >= 0.35, "events wait for their time"

    bad = tmp_path / "bad.txt"
    bad.write_text("0 explode 1\n")
    r = subprocess.run(["bash", str(K8S / "churn.sh"), str(bad)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "KUBECTL": str(fake)})
    assert r.returncode == 2 and "unknown action 'explode'" in r.stderr


def test_print_schedule_feeds_the_churn_script():
    r = subprocess.run([os.sys.executable, "scripts/experiment.py", "scripts/scenarios/churn.toml", "--print-schedule"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if not line.startswith("#")]
    assert rows and all(len(x) == 3 and x[1] in ("kill", "leave", "join") for x in rows)
    assert [float(x[0]) for x in rows] == sorted(float(x[0]) for x in rows)
