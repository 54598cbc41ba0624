"""The Prometheus endpoint (peer/metrics.py): the text format, the names, the port choice."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.daemon import StartError
from peer.metrics import Exporter
from tests.conftest import wait_until


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels) -> float:
    samples = [s for f in families.values() for s in f if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(samples) == 1, (name, labels, samples)
    return samples[0].value


def test_exporter_serves_the_last_status_in_the_text_format():
    exporter = Exporter("127.0.0.1", 0)
    port = exporter.start()
    try:
        assert port > 0
        assert scrape(port) == {}  # nothing before the first heartbeat
        exporter.update({"run_id": "r", "task": "t", "step": 12, "samples": 1200, "samples_per_s": 3.5,
                         "accuracy": 0.5, "test_loss": None, "rounds_ok": 4, "rounds_failed": 1,
                         "rounds_no_partner": 2, "bytes_sent": 10, "bytes_received": 20,
                         "rejected": {"nan": 3}, "pull_failed": {}, "live_peers": [{}, {}],
                         "traffic": {"upload_mbps": 1.5, "utilisation": 0.9},
                         "dht_rpcs": {"rpcs": {"rpc_find": {"requests": 9, "refused": 2, "malformed": 1}}},
                         "relay": {"relayed_addrs": [], "service": {"reservations": 2, "circuits": 1, "circuits_opened": 5,
                                                                    "circuits_no_reservation": 1}}})
        got = scrape(port)
        assert value(got, "peer_step", run_id="r", task="t") == 12
        assert value(got, "peer_samples_total") == 1200
        assert value(got, "peer_gossip_sent_bytes_total") == 10
        assert value(got, "peer_rounds_total", result="failed") == 1
        assert value(got, "peer_rounds_total", result="no_partner") == 2
        assert value(got, "peer_rejected_total", reason="nan") == 3
        assert value(got, "peer_live_peers") == 2
        assert value(got, "peer_upload_mbps") == 1.5
        assert value(got, "peer_dht_rpc_total", rpc="rpc_find", outcome="refused") == 2
        assert value(got, "peer_dht_rpc_total", rpc="rpc_find", outcome="malformed") == 1
        assert "peer_test_loss" not in got  # no evaluation yet: absent, not 0
        assert value(got, "peer_relayed_addresses") == 0 and value(got, "peer_relay_reservations") == 2
        assert value(got, "peer_relay_circuits") == 1
        assert value(got, "peer_relay_events_total", event="circuits_opened") == 5
        assert value(got, "peer_relay_events_total", event="circuits_no_reservation") == 1
    finally:
        exporter.stop()


def test_a_taken_port_stops_the_start_with_one_line(tmp_path):
    from peer.daemon import PeerDaemon
    from protocols.transport.memory import MemoryNetwork
    from tests.conftest import fast_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        d = PeerDaemon(fast_config(tmp_path / "a", metrics_port=taken), MemoryNetwork().transport("a"))
        with pytest.raises(StartError) as e:
            asyncio.run(d.run())
    assert f":{taken}" in str(e.value) and "--metrics-port" in str(e.value) and "\n" not in str(e.value)


async def test_daemon_reports_its_metrics_port_and_serves_its_status(memory_swarm):
    d = await memory_swarm.add("a", metrics_port=0, max_steps=20)
    await wait_until(lambda: d.status()["metrics_port"] and d.trainer.step >= 20, 30, "training")
    port = d.status()["metrics_port"]
    await wait_until(lambda: d.exporter.collector.status is not None
                     and d.exporter.collector.status["step"] >= 20, 30, "a heartbeat after training")
    got = await asyncio.to_thread(scrape, port)
    assert value(got, "peer_step", run_id=d.config.run_id) >= 20
    assert value(got, "peer_samples_total") > 0
    await memory_swarm.stop("a")
    with pytest.raises(OSError):  # the endpoint closes with the daemon
        await asyncio.to_thread(scrape, port)
