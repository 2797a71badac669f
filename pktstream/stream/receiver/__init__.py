"""Receiver: accepts sensors (TCP/TLS, Kafka, PacketStreamer), writes what they send to outputs,
acknowledges only what every gating output has written, accounts for every drop.

The parts, in data-path order (docs/ARCHITECTURE.md has the diagram):

* :mod:`.server` — accept, connection limits, TLS, authentication, one session per sensor;
* :mod:`.ingest` — validate, drop duplicates, count, dispatch; commit + state file + ACK;
* :mod:`.outputs` — one thread and queue per sink;
* :mod:`.metrics` — the Prometheus endpoint.

Options come in groups that match the YAML config and the CLI one to one (docs/CONFIGURATION.md):
:class:`Security` (``auth:``, ``tls:``, ``allowUnauthenticated``) and :class:`Limits`
(``maxConnections``, ``connectionRate``, ``handshakeTimeout``, ``heartbeat``, ``compressBlockSize``).
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pktstream._capture import PacketBatch
from pktstream.exceptions import ConfigError
from pktstream.sinks.base import Sink, Source
from pktstream.sinks.callback import IteratorSink
from pktstream.stream import protocol as P
from pktstream.stream.legacy import PacketStreamerSettings
from pktstream.stream.protocol import parse_hostport
from pktstream.stream.receiver.ingest import (
    SENSOR_ID,
    STATE_FILE,
    Ingest,
    SensorState,
    check_interface,
    check_seq,
    tune_malloc,
)
from pktstream.stream.receiver.server import Server, is_loopback
from pktstream.stream.transport import Input

if TYPE_CHECKING:
    from pktstream.stream.receiver.metrics import MetricsServer

__all__ = ["Receiver", "Security", "Limits", "Ingest", "SensorState", "SENSOR_ID", "STATE_FILE",
           "check_interface", "check_seq"]


@dataclass
class Security:
    """Who may send: ``auth:`` (``auth_key`` shared by all sensors, PacketStreamer's
    ``auth.key``; or ``auth_keys``: sensor id → key, ``auth.keyfile``), ``tls:`` (a server
    ``ssl_context``; ``cert_identity``: with client certificates, the sensor id must be named in
    the certificate, ``tls.identityFromCert``) and ``allow_unauthenticated`` (listen beyond
    loopback with neither key nor client certificates, ``allowUnauthenticated``)."""
    auth_key: bytes | str | None = None
    auth_keys: dict[str, bytes | str] | None = None
    ssl_context: ssl.SSLContext | None = None
    cert_identity: bool = False
    allow_unauthenticated: bool = False
    _keys: dict[str, bytes] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.auth_key, str):
            self.auth_key = self.auth_key.encode()
        self._keys = {k: (v.encode() if isinstance(v, str) else v) for k, v in (self.auth_keys or {}).items()}
        empty = sorted(k for k, v in self._keys.items() if not v)
        if empty:  # (a key anyone can compute a proof with; remove the line to revoke a sensor)
            raise ConfigError(f"auth keys: sensor {empty[0]!r} has an empty key; remove its line to revoke it")

    @property
    def authenticated(self) -> bool:
        """Whether every sensor must prove a key or present a verified client certificate
        (per-sensor keys, even none listed: a sensor not listed is refused)."""
        return bool(self.auth_key or self.auth_keys is not None or (
            self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED))

    def key_for(self, sensor_id: str) -> bytes | None:
        """The key ``sensor_id`` must prove (None: no key; with per-sensor keys: refused)."""
        if self.auth_keys is not None:
            return self._keys.get(sensor_id)
        return self.auth_key  # type: ignore[return-value]


@dataclass
class Limits:
    """What one receiver accepts: connections (``maxConnections``), new connections per peer
    address (``connectionRate``: burst, seconds to refill), ``handshakeTimeout``, the heartbeat it
    asks of sensors (``heartbeat``, s), the largest decompressed block (``max_raw_bytes``, from
    ``compressBlockSize``), bytes waiting for gating outputs before reading pauses
    (``max_inflight_bytes``) and a best-effort output's queue (``sink_queue`` batches).

    ``malloc_keep_bytes`` (glibc only; process-wide, set when the receiver starts): blocks up to
    4 MiB come from malloc's heap instead of their own mmap, and up to this many freed bytes stay
    in the process for reuse instead of going back to the kernel. Without it every decompressed
    1 MiB block is a fresh mapping, page-faulted in and unmapped again: 40 % of the receiver's
    CPU was the kernel doing that (bench/README.md, issue 16 item 3). 0 leaves malloc as it is
    (for a receiver embedded in a process that tunes malloc itself)."""
    max_connections: int = 256
    connection_rate: tuple[int, float] = (20, 10.0)
    handshake_timeout: float = 10.0
    heartbeat: float = 5.0
    max_raw_bytes: int = P.DEFAULT_MAX_RAW_BYTES
    max_inflight_bytes: int = 64 << 20
    sink_queue: int = 256
    malloc_keep_bytes: int = 64 << 20


class Receiver:
    """Accept sensors, write what they send to outputs, account for every drop.

    :param listen: ``host:port`` to listen on (port 0 picks a free one; see ``address``); None:
        no TCP server, only ``inputs`` (e.g. :class:`pktstream.stream.kafka.KafkaInput`).
    :param outputs: sinks (``FileSink``, ``StdoutSink``, ``CallbackSink`` ...).
    :param inputs: other sources of sensor frames (Kafka).
    :param state_dir: where the last sequence per sensor and open-file sizes are persisted
        (without it a restart cannot tell resent frames from new ones); ``fsync_state``: fsync it.
    :param security: keys, TLS, unauthenticated listening (:class:`Security`).
    :param limits: connection and memory limits (:class:`Limits`).
    :param metrics: ``host:port`` for the Prometheus endpoint (see ``metrics_address``).
    :param stats_interval: seconds between per-sensor log lines.
    :param legacy: Deepfence PacketStreamer sensors on the same port
        (:class:`pktstream.stream.legacy.PacketStreamerSettings`; default: accepted, named by address).

    Lifetime: ``start()`` (background thread) or ``run()`` (blocks) once, then ``stop()``.
    Thread safety: ``start()``, ``stop()``, ``stats()``, ``prometheus()`` and ``batches()`` may
    be called from any thread.
    """

    def __init__(self, listen: str | None = "0.0.0.0:8081", outputs: list[Sink] | tuple = (), *,
                 inputs: list[Input] | tuple[Input, ...] = (), state_dir: str | None = None, fsync_state: bool = False,
                 security: Security | None = None, limits: Limits | None = None,
                 metrics: str | None = None, stats_interval: float = 60.0,
                 legacy: PacketStreamerSettings | None = None) -> None:
        self.listen = parse_hostport(listen) if listen else None
        self.outputs = list(outputs)
        self.inputs = list(inputs)
        self.security = security or Security()
        self.limits = limits or Limits()
        self.metrics = parse_hostport(metrics, 9100) if metrics else None
        self.stats_interval = stats_interval
        self.legacy = legacy if legacy is not None else PacketStreamerSettings()
        if self.listen is not None and not self.security.authenticated and not is_loopback(self.listen[0]) \
                and not self.security.allow_unauthenticated:
            raise ConfigError(
                f"refusing to listen on {self.listen[0] or '*'}:{self.listen[1]} without authentication: anyone "
                "who can reach it could write into the outputs. Give a key (--auth-key-file / --auth-keys, "
                "auth.key) or client certificates (--tls-client-certs), listen on 127.0.0.1, or accept the "
                "risk with --allow-unauthenticated")
        self.counters: collections.Counter = collections.Counter()  # receiver-level (server, ingest)
        self._closing = threading.Event()
        self.ingest = Ingest(self.outputs, counters=self.counters, closing=self._closing, state_dir=state_dir,
                             fsync_state=fsync_state, max_raw_bytes=self.limits.max_raw_bytes,
                             max_inflight_bytes=self.limits.max_inflight_bytes, sink_queue=self.limits.sink_queue)
        self.server: Server | None = None
        self.metrics_server: MetricsServer | None = None
        self.address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._iterator: IteratorSink | None = None
        self._error: BaseException | None = None

    # -- embedding API -----------------------------------------------------------------------
    def batches(self, maxsize: int = 64) -> Iterator[tuple[Source, PacketBatch]]:
        """Iterate ``(source, batch)`` as they arrive (call before ``start()``). The iterator
        gates acknowledgements: a slow consumer slows the sensors instead of losing data."""
        if self._iterator is None:
            self._iterator = IteratorSink(maxsize)
            self.outputs.append(self._iterator)
        return iter(self._iterator)

    def start(self) -> Receiver:
        """Serve in a background thread; returns once listening (``address`` is set)."""
        self._thread = threading.Thread(target=self.run, name="pktstream-receiver", daemon=True)
        self._thread.start()
        while not self._ready.wait(0.05):
            if not self._thread.is_alive():
                break
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop accepting, flush outputs, persist state (from any thread)."""
        loop, ev = self._loop, self._stop_event
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread of ``start()`` to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the background thread of ``start()`` is serving."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def unsaved_at_stop(self) -> str | None:
        """After the stop: None when the state (``state_dir``) was saved at the stop, or there
        is none; else the error line that was logged (the next start recovers from the state
        saved last, and pktstream sensors send again what was not acknowledged; PacketStreamer
        sensors do not). ``pktstream receiver`` then exits with status 3."""
        return self.ingest.unsaved_at_stop

    def run(self) -> None:
        """Serve until ``stop()``."""
        tune_malloc(self.limits.malloc_keep_bytes)
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self.ingest.start()
        if self.listen is not None:
            self.server = Server(self.listen, self.ingest, security=self.security, limits=self.limits,
                                 counters=self.counters, legacy=self.legacy)
            await self.server.start()
            self.address = self.server.address
        for inp in self.inputs:
            inp.start(self.ingest)
        if self.metrics:
            from pktstream.stream.receiver.metrics import MetricsServer
            self.metrics_server = MetricsServer(self.stats)
            host, port = self.metrics
            await asyncio.to_thread(self.metrics_server.start, host, port)
            self.metrics_address = self.metrics_server.address
        self._ready.set()
        ticker = asyncio.create_task(self._periodic())
        try:
            await self._stop_event.wait()
        finally:
            self._closing.set()
            ticker.cancel()
            for inp in self.inputs:
                inp.stop()
            if self.server is not None:
                self.server.close()
            if self.metrics_server is not None:
                await asyncio.to_thread(self.metrics_server.close)
            await self.ingest.finish()
            for inp in self.inputs:
                await asyncio.to_thread(inp.close)  # commits what the outputs have (input offsets)
            self.ingest.shutdown()
            self.ingest.log_stats()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            self.ingest.log_stats()

    # -- counters ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-sensor counters (received, duplicates, and every drop counter the sensor
        reported), per-output counters, and connection-level rejections (any thread)."""
        return {"sensors": self.ingest.sensor_stats(), "outputs": self.ingest.output_stats(),
                "connections": self.server.connections if self.server is not None else 0,
                "inputs": [inp.stats() for inp in self.inputs],
                "inflight_bytes": self.ingest.inflight, **self.counters}

    def prometheus(self) -> str:
        """The counters in Prometheus text format (as ``/metrics`` serves them)."""
        from pktstream.stream.receiver.metrics import MetricsServer
        return (self.metrics_server or MetricsServer(self.stats)).render()
