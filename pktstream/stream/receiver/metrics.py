"""The receiver's Prometheus endpoint (prometheus_client): a collector that reads the receiver's
counters when scraped, served by prometheus_client's HTTP server thread.

Counters carry the ``_total`` suffix (OpenMetrics convention), gauges do not. Lifetime: started
and closed with the receiver. Thread-safety: ``collect()`` runs on the HTTP server's threads and
only reads the counters (``Receiver.stats()`` may be called from any thread).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pktstream.stream.kafka import INPUT_COUNTERS

#: per-sensor counters (label ``sensor``)
SENSOR_COUNTERS = ("packets", "raw_bytes", "wire_bytes", "frames", "duplicate_frames", "rejected_frames",
                   "rejected_packets", "conflict_frames", "conflict_packets", "seq_gaps", "kernel_dropped",
                   "interface_dropped", "ring_drops", "window_dropped_packets")
#: per-output counters (label ``output``)
OUTPUT_COUNTERS = ("packets", "dropped_packets", "failures",
                   # the S3 and Kafka outputs' own (0 for other outputs)
                   "uploaded_files", "upload_failures", "staging_full", "left_staged", "delivery_failures",
                   "producer_resets", "rejected_frames", "rejected_packets")
#: per-output gauges (the S3 output's staging)
OUTPUT_GAUGES = ("staged_bytes", "waiting_files")
# per-input counters: INPUT_COUNTERS (stream/kafka.py), label ``input`` (``kafka://brokers/topic (group g)``)
#: per-input gauges
INPUT_GAUGES = ("uncommitted_messages",)
#: receiver-level counters
RECEIVER_COUNTERS = ("protocol_errors", "auth_failures", "tls_failures", "timeouts", "rejected_connections",
                     "rate_limited_connections", "aborted_handshakes", "duplicate_id_refusals",
                     "state_write_failures")


class ReceiverCollector(Collector):
    """Turns ``stats()`` (a Receiver's) into metric families on every scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self.stats()
        sensors = st["sensors"]
        for key in SENSOR_COUNTERS:
            fam = CounterMetricFamily(f"pktstream_sensor_{key}", f"sensor {key.replace('_', ' ')}", labels=["sensor"])
            for sid, s in sensors.items():
                fam.add_metric([sid], s[key])
            yield fam
        unacked = GaugeMetricFamily("pktstream_sensor_unacked_frames",
                                    "frames the sensor holds unacknowledged (its last STATS)", labels=["sensor"])
        connected = GaugeMetricFamily("pktstream_sensor_connected", "1 while the sensor is connected",
                                      labels=["sensor"])
        legacy = GaugeMetricFamily("pktstream_sensor_legacy",
                                   "1 for a PacketStreamer sensor (unacknowledged: no resume, no loss counts)",
                                   labels=["sensor"])
        for sid, s in sensors.items():
            unacked.add_metric([sid], s["unacked_frames"])
            if s["connected"] is not None:  # (None: a Kafka sensor another receiver of the group reads)
                connected.add_metric([sid], int(s["connected"]))
            legacy.add_metric([sid], int(bool(s.get("legacy"))))
        yield unacked
        yield connected
        yield legacy
        for key in OUTPUT_COUNTERS:
            fam = CounterMetricFamily(f"pktstream_output_{key}", f"output {key.replace('_', ' ')}", labels=["output"])
            for name, o in st["outputs"].items():
                fam.add_metric([name], o.get(key, 0))
            yield fam
        for key in OUTPUT_GAUGES:
            gauge = GaugeMetricFamily(f"pktstream_output_{key}", f"output {key.replace('_', ' ')}", labels=["output"])
            for name, o in st["outputs"].items():
                if key in o:
                    gauge.add_metric([name], o[key])
            yield gauge
        yield GaugeMetricFamily("pktstream_receiver_connections", "open sensor connections",
                                value=st["connections"])
        yield GaugeMetricFamily("pktstream_receiver_inflight_bytes", "bytes waiting for the gating outputs",
                                value=st["inflight_bytes"])
        for key in INPUT_COUNTERS:
            fam = CounterMetricFamily(f"pktstream_input_{key}", f"input {key.replace('_', ' ')}", labels=["input"])
            for inp in st.get("inputs", []):
                fam.add_metric([inp.get("input", "?")], inp.get(key, 0))
            yield fam
        for key in INPUT_GAUGES:
            gauge = GaugeMetricFamily(f"pktstream_input_{key}", f"input {key.replace('_', ' ')}", labels=["input"])
            for inp in st.get("inputs", []):
                gauge.add_metric([inp.get("input", "?")], inp.get(key, 0))
            yield gauge
        for key in RECEIVER_COUNTERS:
            yield CounterMetricFamily(f"pktstream_receiver_{key}", key.replace("_", " "), value=st.get(key, 0))


class MetricsServer:
    """``/metrics`` on ``host:port`` (port 0 picks one: see ``address``)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ReceiverCollector(stats))
        self.address: tuple[str, int] | None = None
        self._server: Any = None

    def render(self) -> str:
        """The metrics in Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry).decode()

    def start(self, host: str, port: int) -> None:
        self._server, _thread = start_http_server(port, host or "0.0.0.0", registry=self.registry)
        self.address = self._server.server_address[:2]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
