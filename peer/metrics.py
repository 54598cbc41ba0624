"""The Prometheus endpoint: `peer status` figures under conventional metric names.

Off unless `metrics-port` is set (`--metrics-port`; 0 picks a free port, which `peer status`
reports as `metrics_port`); bound to 127.0.0.1 unless `metrics-host` says otherwise, since the
figures describe the volunteer's machine.

The daemon hands `Exporter.update` its status at every heartbeat, on the event loop; scrapes run
in prometheus-client's HTTP thread and only read the last status handed over (one reference,
replaced whole, never mutated), so a scrape never touches the daemon's live state.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

# status key -> (metric name, help); counters end in _total on the wire
COUNTERS = {
    "samples": ("peer_samples", "Training samples this peer has processed."),
    "bytes_sent": ("peer_gossip_sent_bytes", "Gossip bytes sent."),
    "bytes_received": ("peer_gossip_received_bytes", "Gossip bytes received."),
    "serves": ("peer_serves", "Pull requests served."),
    "serve_refused": ("peer_serve_refused", "Pull requests refused (busy, banned, not admitted)."),
}
GAUGES = {
    "step": ("peer_step", "The run's step as this peer counts it."),
    "samples_per_s": ("peer_samples_per_second", "Training throughput."),
    "loss": ("peer_train_loss", "Loss of the last training batch."),
    "test_loss": ("peer_test_loss", "Held-out loss at the last evaluation."),
    "accuracy": ("peer_test_accuracy", "Held-out accuracy at the last evaluation (0-1)."),
    "bits_per_byte": ("peer_bits_per_byte", "Held-out bits per byte (language-model tasks)."),
    "outer_step": ("peer_outer_step", "Outer rounds taken (low-communication gossip)."),
    "uptime_s": ("peer_uptime_seconds", "Seconds since the daemon started."),
}
TRAFFIC = {
    "upload_mbps": ("peer_upload_mbps", "Gossip upload over the last heartbeats, Mbit/s."),
    "download_mbps": ("peer_download_mbps", "Gossip download over the last heartbeats, Mbit/s."),
    "utilisation": ("peer_training_utilisation", "Fraction of wall time spent in training steps."),
}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class StatusCollector:
    """A prometheus-client collector over the last status dict it was given."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def update(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        st = self.status
        if st is None:
            return
        labels = {"run_id": str(st.get("run_id", "")), "task": str(st.get("task", ""))}
        names, values = list(labels), list(labels.values())

        def gauge(name: str, doc: str, value: Any) -> Iterator[Any]:
            if (v := _number(value)) is not None:
                g = GaugeMetricFamily(name, doc, labels=names)
                g.add_metric(values, v)
                yield g

        for key, (name, doc) in COUNTERS.items():
            if (v := _number(st.get(key))) is not None:
                c = CounterMetricFamily(name, doc, labels=names)
                c.add_metric(values, v)
                yield c
        for key, (name, doc) in GAUGES.items():
            yield from gauge(name, doc, st.get(key))
        for key, (name, doc) in TRAFFIC.items():
            yield from gauge(name, doc, (st.get("traffic") or {}).get(key))
        yield from gauge("peer_live_peers", "Peers of the run this peer sees live in the DHT.", len(st.get("live_peers") or []))
        rounds = CounterMetricFamily("peer_rounds", "Gossip rounds by result.", labels=[*names, "result"])
        for result in ("ok", "failed", "no_partner"):
            if (v := _number(st.get(f"rounds_{result}"))) is not None:
                rounds.add_metric([*values, result], v)
        yield rounds
        for key, name, doc in (("rejected", "peer_rejected", "Pulled payloads refused, by reason."),
                               ("pull_failed", "peer_pull_failed", "Pulls that failed, by reason.")):
            fam = CounterMetricFamily(name, doc, labels=[*names, "reason"])
            for reason, count in sorted((st.get(key) or {}).items()):
                if (v := _number(count)) is not None:
                    fam.add_metric([*values, str(reason)], v)
            yield fam
        dht = CounterMetricFamily("peer_dht_rpc", "DHT RPCs other peers sent this one, by RPC and outcome "
                                  "(requests, served, refused, timed_out, malformed, failed, disconnected).",
                                  labels=[*names, "rpc", "outcome"])
        for rpc, counts in sorted(((st.get("dht_rpcs") or {}).get("rpcs") or {}).items()):
            for outcome, count in sorted((counts or {}).items()):
                if (v := _number(count)) is not None:
                    dht.add_metric([*values, str(rpc), str(outcome)], v)
        yield dht
        relay = st.get("relay") or {}
        yield from gauge("peer_relayed_addresses", "Addresses of this peer through a relay (/p2p-circuit).",
                         len(relay.get("relayed_addrs") or []))
        served = relay.get("service")
        if served:  # --relay-service: the relay this peer runs for others (protocols/relay.py)
            yield from gauge("peer_relay_reservations", "Reservations other peers hold on this relay now.", served.get("reservations"))
            yield from gauge("peer_relay_circuits", "Relayed connections open through this peer now.", served.get("circuits"))
            events = CounterMetricFamily("peer_relay_events", "What this relay did with requests, by event "
                                         "(reservations_granted, circuits_opened, refusals and failures by reason).",
                                         labels=[*names, "event"])
            for event, count in sorted(served.items()):
                if event not in ("reservations", "circuits") and (v := _number(count)) is not None:
                    events.add_metric([*values, str(event)], v)
            yield events


class Exporter:
    """The HTTP endpoint. `start` binds (port 0: a free one) and returns the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.collector = StatusCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server = None

    def start(self) -> int:
        from prometheus_client import start_http_server

        self._server, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def update(self, status: dict[str, Any]) -> None:
        self.collector.update(status)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
