"""Sensor: capture on interfaces, compress each block into one frame, stream to a receiver.

Threads: one capture thread per interface (capture → compress → FrameStore), one rescan
thread (interfaces that appear later), and the thread of ``run()``, which runs the transport
(:class:`~pktstream.stream.tcp.TcpTransport`: connect, handshake, resend unacknowledged frames,
heartbeats, STATS; or :class:`~pktstream.stream.kafka.KafkaTransport`).
Nothing blocks a capture thread: when the send window and the spool are full, the block is
dropped and counted.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from pktstream._capture import Capture, PacketBatch, list_interfaces
from pktstream.exceptions import FilterError, PcapError
from pktstream.stream import protocol as P
from pktstream.stream.sendwindow import (
    COPIES,
    FrameStore,
    default_spool_bytes,
    default_spool_dir,
    payload_size,
    release_payload,
)
from pktstream.stream.tcp import TcpTransport
from pktstream.stream.transport import Transport

log = logging.getLogger("pktstream.stream.sensor")

DROP_LOG_S = 60.0     # a capture's new kernel or ring drops are logged at most this often, per interface
KERNEL_BLOCK_BYTES = 256 << 10  # libpcap's TPACKET_V3 block (its MAXIMUM_SNAPLEN), retired every timeout_ms
_STORE_ABOVE = 0.90   # compressed/raw above this: send the block stored
_STORED_RUN = 32      # blocks sent stored before compression is tried again ...
_STORED_RUN_MAX = 512  # ... doubling after each failed try, up to this


# -- capture filter (PacketStreamer pcapMode semantics, done as its docs promise) ------------------

def _ports_expr(ports: Iterable[int]) -> str:
    return " or ".join(f"port {int(p)}" for p in sorted(set(ports)))


def build_filter(*, pcap_mode: str = "all", ports: Iterable[int] = (), ignore_ports: Iterable[int] = (),
                 bpf: str | None = None, exclude: Iterable[tuple[str, int]] = ()) -> str:
    """BPF for one interface: mode/ports, ignored ports, the user's expression, and the
    sensor's own connection to the receiver excluded in both directions."""
    parts = []
    ports = list(ports)
    if pcap_mode == "allow" and ports:
        parts.append(f"({_ports_expr(ports)})")
    elif pcap_mode == "deny" and ports:
        parts.append(f"not ({_ports_expr(ports)})")
    if ignore_ports:
        parts.append(f"not ({_ports_expr(ignore_ports)})")
    if bpf:
        parts.append(f"({bpf})")
    for host, port in exclude:
        parts.append(f"not (host {host} and tcp port {port})")
    return " and ".join(parts)


# -- compression that adapts instead of dropping -----------------------------------------------------

class AdaptiveCompressor:
    """zstd at ``level``; faster levels while compression is the bottleneck (busy > 60 % of the
    time), back up when idle. A block that shrinks by less than 10 % (encrypted or random
    payloads) is sent stored, and so are the next 32: a few percent of bandwidth is not worth
    ~2 ms of CPU per MiB. Compression is tried again after that run; each try that fails again
    doubles the run (up to 512 blocks), a try that succeeds resets it to 32."""

    LEVELS = (-7, -3, -1, 1, 3, 6, 9)

    def __init__(self, level: int = -1) -> None:
        self.max_level = level
        self.level = level
        self._ctx: dict[int, zstandard.ZstdCompressor] = {}
        self._store_left = 0
        self._stored_run = _STORED_RUN
        self._busy = 0.0
        self._last_end = time.monotonic()
        self.stored_blocks = 0
        self.compressed_blocks = 0

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = self._ctx.get(self.level)
        if c is None:
            c = self._ctx[self.level] = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True)
        return c

    def compress(self, records):
        """(payload, flags); a stored payload is ``records`` itself (not copied)."""
        start = time.monotonic()
        if self._store_left > 0:
            self._store_left -= 1
            self.stored_blocks += 1
            payload, flags = records, P.Flags.STORED
        else:
            payload = self._compressor().compress(records)
            flags = P.Flags.NONE
            if len(payload) > _STORE_ABOVE * len(memoryview(records)):
                self._store_left = self._stored_run
                self._stored_run = min(_STORED_RUN_MAX, 2 * self._stored_run)
                self.stored_blocks += 1
                payload, flags = records, P.Flags.STORED
            else:
                self.compressed_blocks += 1
                self._stored_run = _STORED_RUN
        end = time.monotonic()
        period = max(end - self._last_end, 1e-6)
        self._busy = 0.8 * self._busy + 0.2 * min(1.0, (end - start) / period)
        self._last_end = end
        if flags == P.Flags.NONE:
            self._adapt()
        return payload, int(flags)

    def _adapt(self) -> None:
        levels = sorted({lv for lv in self.LEVELS if lv < self.max_level} | {self.max_level})
        i = levels.index(self.level) if self.level in levels else len(levels) - 1
        if self._busy > 0.6 and i > 0:
            self.level = levels[i - 1]
            log.info("compression is the bottleneck: zstd level %d", self.level)
        elif self._busy < 0.2 and i < len(levels) - 1:
            self.level = levels[i + 1]


# -- the sensor ------------------------------------------------------------------------------------

def _load_descriptors(store: FrameStore, path: str) -> list[dict[str, Any]]:
    """The descriptors of a spool's ``interfaces.json`` (read through ``store``; ``path``: its
    name in messages) ({"descriptors": [...]}; the first format, {name: index}, gives entries
    without link type and snap length). Entries a receiver would refuse (its bounds:
    docs/PROTOCOL.md) are dropped, with a warning."""
    try:
        raw = store.read_file("interfaces.json")
        if raw is None:
            return []
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("descriptors"), list):
            entries = data["descriptors"]
        elif isinstance(data, dict):
            entries = [{"index": v, "name": k} for k, v in data.items()]
        else:
            entries = []
    except Exception as exc:  # noqa: BLE001 - a damaged file must not keep the sensor from starting
        log.warning("spool: %s unreadable (%s): interface indexes start again", path, exc)
        return []

    def ok(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
    out = [d for d in entries if isinstance(d, dict) and ok(d.get("index"), 0, 1 << 20)
           and isinstance(d.get("name"), str) and 0 < len(d["name"]) <= 64
           and ("link_type" not in d or ok(d["link_type"], 0, 65535))
           and ("snaplen" not in d or ok(d["snaplen"], 1, 1 << 18))]
    if len(out) < len(entries):
        log.warning("spool: %s: %d interface entries ignored (not descriptors a receiver takes)",
                    path, len(entries) - len(out))
    return out


@dataclass
class _Iface:
    index: int
    name: str
    link_type: int = 1
    snaplen: int = 262144
    capture: Capture | None = None
    thread: threading.Thread | None = None
    last_stats: dict = field(default_factory=dict)
    error: str | None = None
    ports: list[int] = field(default_factory=list)
    past: dict = field(default_factory=dict)  # counters of this interface's earlier (failed) captures
    failures: int = 0          # captures of this interface that ended in an error
    # _note_drops: (kernel_dropped, ring_drops, ring_full_ms) at its last scan; kernel drops not
    # yet logged, of scans where the ring was full (consumer behind) and of the others (CPU);
    # ring drops not yet logged; when the last line was logged
    seen: tuple[int, int, int] = (0, 0, 0)
    unsaid_behind: int = 0
    unsaid_cpu: int = 0
    unsaid_ring: int = 0
    said_at: float = float("-inf")

    def descriptor(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "link_type": self.link_type,
                "snaplen": self.snaplen, "tsresol": 9}


@dataclass
class CaptureOptions:
    """What a sensor captures and how (YAML / flag in docs/CONFIGURATION.md, one to one):
    ``interfaces`` (None: every up interface; ``interfaces``/``-i``), ``include_loopback``,
    ``bpf``, ``pcap_mode`` (all/allow/deny) with ``capture_ports``,
    ``capture_interfaces_ports``, ``ignore_ports``; libpcap's ``snaplen`` (``inputPacketLen``),
    ``promisc``, ``immediate``, ``buffer_bytes`` (``bufferSize``); the ring's ``block_bytes``
    (``blockSize``), ``ring_blocks`` and ``max_wait`` (s a partly filled block waits under load,
    ``maxWait``); ``idle_wait`` (adaptive sealing, ``idleWait``: on a quiet link a partly filled
    block goes at once, at most one per ``idle_wait`` s; ``>= max_wait`` turns it off) and
    ``timeout_ms`` (the kernel's block timeout, ``kernelTimeout``; docs/CAPTURE.md);
    ``rescan_interval`` (s between looks for interfaces that came or went)."""
    interfaces: list[str] | None = None
    include_loopback: bool = False
    bpf: str | None = None
    pcap_mode: str = "all"
    capture_ports: Iterable[int] = ()
    capture_interfaces_ports: dict[str, list[int]] | None = None
    ignore_ports: Iterable[int] = ()
    snaplen: int = 262144
    promisc: bool = False
    immediate: bool = False
    buffer_bytes: int = 8 << 20  # kernel buffer, always resident; emptied into the ring by the capture thread
    block_bytes: int = 1 << 20
    ring_blocks: int = 32
    max_wait: float = 0.2
    idle_wait: float = 0.05
    timeout_ms: int = 10
    rescan_interval: float = 5.0


@dataclass
class DeliveryOptions:
    """How a sensor gets blocks to the receiver without losing them: ``compression_level``
    (zstd, ``compressionLevel``), the in-memory ``window_bytes`` (``windowSize``), the disk spool
    (``spool_dir``: "auto" = <state dir>/spool/<sensor id>, None = none; ``spool_bytes``: None =
    1 GiB or half the free space; ``spool.*``), ``heartbeat`` and ``stats_interval`` (s), and the
    reconnect back-off (``reconnect_min`` doubling to ``reconnect_max`` s, jittered;
    ``refused_backoff_max`` s when the receiver refuses this sensor)."""
    compression_level: int = -1  # zstd's fastest level that keeps level 1's ratio on packets (bench/README)
    window_bytes: int = 32 << 20  # beyond it the spool (disk) takes the frames (bench/README.md)
    spool_dir: str | None = "auto"
    spool_bytes: int | None = None
    heartbeat: float = 5.0
    stats_interval: float = 5.0
    reconnect_min: float = 0.2
    reconnect_max: float = 2.0
    refused_backoff_max: float = 30.0


@dataclass
class SensorSecurity:
    """``auth_key`` (``auth.key``: the receiver's shared key or this sensor's own),
    ``ssl_context`` (``tls.*``, see :func:`pktstream.stream.tls.client_context`) and
    ``server_hostname`` (``tls.serverName``: the name to verify instead of the address)."""
    auth_key: bytes | str | None = None
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None


class Sensor:
    """Capture on interfaces and stream blocks to a receiver, losing nothing silently.

    :param receiver: ``host:port`` of the receiver (or ``transport``, e.g. a KafkaTransport).
    :param interfaces: interface names (None: every up interface, rescanned).
    :param capture: :class:`CaptureOptions`; ``delivery``: :class:`DeliveryOptions`;
        ``security``: :class:`SensorSecurity` (docs/CONFIGURATION.md maps each to YAML and flags).
    :param user, group: drop root privileges to these after opening the interfaces.

    Lifetime: ``run()`` blocks until ``stop()``; ``start()`` runs it in a background thread.
    Thread safety: ``stop()`` and ``stats()`` may be called from any thread.
    """

    def __init__(self, receiver: str | None = None, interfaces: list[str] | None = None, *,
                 bpf: str | None = None, sensor_id: str | None = None,
                 capture: CaptureOptions | None = None, delivery: DeliveryOptions | None = None,
                 security: SensorSecurity | None = None, user: str | None = None, group: str | None = None,
                 transport: Transport | None = None) -> None:
        # ``interfaces`` and ``bpf`` given directly override ``capture``'s (the common case:
        # Sensor("host:8081", ["eth0"], bpf="tcp port 80"))
        capture = capture or CaptureOptions()
        delivery = delivery or DeliveryOptions()
        security = security or SensorSecurity()
        interfaces = interfaces if interfaces is not None else capture.interfaces
        bpf = bpf if bpf is not None else capture.bpf
        include_loopback, pcap_mode = capture.include_loopback, capture.pcap_mode
        capture_ports, capture_interfaces_ports = capture.capture_ports, capture.capture_interfaces_ports
        ignore_ports, snaplen = capture.ignore_ports, capture.snaplen
        promisc, immediate = capture.promisc, capture.immediate
        buffer_bytes, block_bytes, max_wait = capture.buffer_bytes, capture.block_bytes, capture.max_wait
        ring_blocks, rescan_interval = capture.ring_blocks, capture.rescan_interval
        compression_level, window_bytes = delivery.compression_level, delivery.window_bytes
        spool_dir, spool_bytes = delivery.spool_dir, delivery.spool_bytes
        heartbeat, stats_interval = delivery.heartbeat, delivery.stats_interval
        reconnect_min, reconnect_max = delivery.reconnect_min, delivery.reconnect_max
        refused_backoff_max = delivery.refused_backoff_max
        auth_key, ssl_context, server_hostname = security.auth_key, security.ssl_context, security.server_hostname
        if pcap_mode not in ("all", "allow", "deny"):
            raise ValueError(f"pcap_mode must be all, allow or deny, not {pcap_mode!r}")
        # transport: TCP to ``receiver`` or another object with run(sensor, drain_timeout),
        # exclude() and describe() (e.g. pktstream.stream.kafka.KafkaTransport)
        if (receiver is None) == (transport is None):
            raise ValueError("Sensor needs exactly one of receiver and transport")
        if transport is None:
            assert receiver is not None
            transport = TcpTransport(receiver, auth_key=auth_key, ssl_context=ssl_context,
                                     server_hostname=server_hostname, reconnect_min=reconnect_min,
                                     reconnect_max=reconnect_max, refused_backoff_max=refused_backoff_max)
        self.transport = transport
        self.interfaces_wanted = list(interfaces) if interfaces else None
        self.include_loopback = include_loopback
        self.bpf = bpf
        self.pcap_mode = pcap_mode
        self.capture_ports = [int(p) for p in capture_ports]
        self.capture_interfaces_ports = {k: [int(p) for p in v] for k, v in (capture_interfaces_ports or {}).items()}
        self.ignore_ports = [int(p) for p in ignore_ports]
        if pcap_mode == "all" and (self.capture_ports or self.capture_interfaces_ports):
            log.warning("pcapMode 'all' captures every port: capturePorts/captureInterfacesPorts are ignored")
        self.capture_options: dict[str, Any] = dict(
            snaplen=snaplen, promisc=promisc, immediate=immediate, buffer_bytes=buffer_bytes,
            block_bytes=max(block_bytes, snaplen + 16), max_wait=max_wait, ring_blocks=ring_blocks,
            idle_wait=capture.idle_wait, timeout_ms=capture.timeout_ms)
        self.compression_level = compression_level
        self.sensor_id = sensor_id or socket.gethostname()
        if not P.SENSOR_ID.match(self.sensor_id):
            raise ValueError(f"sensor id {self.sensor_id!r}: 1-128 printable ASCII characters, no spaces")
        self.hostname = socket.gethostname()
        self.heartbeat = heartbeat
        self.stats_interval = stats_interval
        self.rescan_interval = rescan_interval
        self.user, self.group = user, group
        # the spool: by default <state dir>/spool/<sensor id>, 1 GiB or half the free space;
        # None or "" disables it (then only the in-memory window buffers an outage)
        if spool_dir == "auto":
            spool_dir = default_spool_dir(self.sensor_id)
        spool_dir = spool_dir or None
        if spool_dir and spool_bytes is None:
            spool_bytes = default_spool_bytes(spool_dir)
        self.spool_dir = spool_dir
        self.store = FrameStore(window_bytes=window_bytes, spool_dir=spool_dir, spool_bytes=spool_bytes or 0)
        self.instance = os.urandom(8).hex()  # tells this process's reconnects from another sensor's
        self.max_raw = self.capture_options["block_bytes"]
        self._ifaces: dict[str, _Iface] = {}
        # descriptors no interface has now (one that came back with another link type or snap
        # length got a new index; an earlier run's, from the spool): blocks in the window or
        # the spool may still carry their index, so every handshake announces them too
        self._retired: dict[int, dict[str, Any]] = {}
        # every descriptor an index stood for (the spool's interfaces.json persists it): a
        # descriptor that comes back gets its index again, with or without a spool
        self._descriptors = _load_descriptors(self.store, os.path.join(self.spool_dir, "interfaces.json")) \
            if self.spool_dir else []
        self._load_retired()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_fn: Callable[[], None] | None = None  # the transport's wake-up (set_waker)
        self._stopped_at: float | None = None  # when stop() was first called
        self._connected = False
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._control: collections.deque[bytes] = collections.deque()  # control frames to send
        self.exit_report: dict[str, Any] | None = None  # set when run() returns: what was left
        # the receiver's (or brokers') addresses, kept out of every capture filter; resolved
        # again before each connection (update_exclusions re-installs the filters on a change)
        self._exclude = self._resolve_exclusions()
        self.store.on_new_frame(self.wake)

    # -- interfaces --------------------------------------------------------------------------
    def _selected_interfaces(self) -> dict[str, list[int]]:
        """name → port list for every interface to capture on now."""
        if self.interfaces_wanted:
            return {n: sorted(set(self.capture_ports) | set(self.capture_interfaces_ports.get(n, [])))
                    for n in self.interfaces_wanted}
        named_only = self.pcap_mode == "allow" and not self.capture_ports and self.capture_interfaces_ports
        out: dict[str, list[int]] = {}
        netdevs = set(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else set()
        if not named_only:
            for itf in list_interfaces():
                if not itf.up or itf.name == "any" or (itf.loopback and not self.include_loopback):
                    continue
                if itf.name not in netdevs:
                    continue  # libpcap pseudo devices (nflog, nfqueue, dbus, usbmon ...)
                out[itf.name] = list(self.capture_ports)
        for name, ports in self.capture_interfaces_ports.items():
            out[name] = sorted(set(out.get(name, list(self.capture_ports))) | set(ports))
        return out

    def _filter_for(self, ports: list[int]) -> str:
        return build_filter(pcap_mode=self.pcap_mode, ports=ports, ignore_ports=self.ignore_ports,
                            bpf=self.bpf, exclude=self._exclude)

    def _open(self, name: str, ports: list[int]) -> None:
        with self._lock:
            expr = self._filter_for(ports)
        cap = Capture(name, bpf=expr or None, **self.capture_options)
        with self._lock:
            itf = self._ifaces.get(name)
            if itf is None:
                itf = self._ifaces[name] = _Iface(self._index_for(name, cap.link_type, cap.snaplen), name)
            elif (itf.link_type, itf.snaplen) != (cap.link_type, cap.snaplen):
                # back with another link type or snap length: blocks captured before keep the old
                # descriptor under the old index (read with the new one, Ethernet frames would
                # become "raw IP"); the new captures get a new index
                self._retired[itf.index] = itf.descriptor()
                old = itf.index
                itf.index = self._index_for(name, cap.link_type, cap.snaplen)
                log.warning("%s came back with link type %s, snap length %d (was %d, %d): interface index %d "
                            "(was %d)", name, cap.link_type_name, cap.snaplen, itf.link_type, itf.snaplen,
                            itf.index, old)
            itf.link_type, itf.snaplen, itf.capture, itf.error = cap.link_type, cap.snaplen, cap, None
            itf.ports = list(ports)
            if self._stop.is_set():  # stop() ran meanwhile: it did not see this capture
                cap.stop()
            now_expr = self._filter_for(ports)
        if now_expr != expr:  # the receiver's addresses changed while the handle was opened
            cap.set_filter(now_expr or "")
            expr = now_expr
        log.info("capturing on %s (link type %s, filter %r)", name, cap.link_type_name, expr)
        self._announce(itf)
        itf.thread = threading.Thread(target=self._capture_loop, args=(itf,), name=f"capture-{name}",
                                      daemon=True)
        itf.thread.start()

    def _rescan(self, *, first: bool = False) -> None:
        """Open every selected interface that is not capturing: new ones, and ones whose
        capture failed (an interface that went away and came back). At start (``first``) an
        interface the user named must open; later a failure is retried on the next scan."""
        try:
            wanted = self._selected_interfaces()
        except (PcapError, OSError) as exc:
            log.warning("listing interfaces failed: %s", exc)
            return
        for itf in list(self._ifaces.values()):
            # all-interfaces mode: a failed interface that is no longer listed is gone (a
            # container's veth), not failed: no retries, no failure exit status
            if itf.name not in wanted and itf.error is not None and itf.capture is None:
                log.info("interface %s is gone", itf.name)
                itf.error = None
        for name, ports in wanted.items():
            if self._stop.is_set():
                return
            known = self._ifaces.get(name)
            if known is not None and (known.capture is not None or
                                      (known.thread is not None and known.thread.is_alive())):
                continue
            try:
                self._open(name, ports)
            except Exception as exc:  # noqa: BLE001 - one interface's failure must not stop the others
                if first and (self.interfaces_wanted or (isinstance(exc, FilterError) and self.bpf)):
                    raise  # an interface the user named (or the user's filter) must work at start
                if known is None or known.error != f"cannot reopen: {exc}":
                    log.warning("cannot capture on %s: %s (retrying)", name, exc)
                if known is not None:
                    known.error = f"cannot reopen: {exc}"
            else:
                if known is not None and known.failures:
                    log.warning("capture on %s resumed", name)

    def _rescan_loop(self) -> None:
        """New interfaces every ``rescan_interval`` (all-interfaces mode); failed ones every
        second until they come back. While nothing has failed, it sleeps until the next full
        scan (at most 5 s: a capture that fails meanwhile is retried within 5 s, then every
        second), so an idle sensor wakes rarely."""
        next_full = time.monotonic() + self.rescan_interval
        failed = False
        while not self._stop.wait(1.0 if failed else min(5.0, max(1.0, next_full - time.monotonic()))):
            self._note_drops()
            failed = any(i.capture is None and i.error is not None for i in list(self._ifaces.values()))
            if failed or (not self.interfaces_wanted and time.monotonic() >= next_full):
                next_full = time.monotonic() + self.rescan_interval
                try:
                    self._rescan()
                except Exception as exc:  # noqa: BLE001 - this thread reopens interfaces: it must live
                    log.error("interface scan failed: %s", exc)

    def _counters_of(self, itf: _Iface) -> tuple[dict[str, Any], bool]:
        """An interface's capture counters since the sensor started (its failed captures'
        included) and whether it is capturing: one consistent view, also while
        ``_capture_loop`` hands a capture's counters over (any thread)."""
        with self._lock:
            cap = itf.capture
            if cap is None:
                return dict(itf.last_stats), False
            try:
                return {k: v + itf.past.get(k, 0) for k, v in cap.stats().items()}, True
            except Exception:  # noqa: BLE001 - closed by a failure meanwhile
                return dict(itf.last_stats), True

    def _note_drops(self) -> None:
        """Log a capture's new kernel and ring drops, at most once per ``DROP_LOG_S`` per
        interface (the first at once), with their likely cause: kernel drops of a scan during
        which the capture thread waited for a free ring block come from a consumer behind, the
        others from a capture thread that waited for a CPU. They are counted in :meth:`stats`
        either way; this says what they mean to someone reading the log of a sensor that runs
        for weeks. Rescan thread (every <= 5 s)."""
        now = time.monotonic()
        for itf in list(self._ifaces.values()):
            st, _ = self._counters_of(itf)
            kernel, ring, full_ms = st.get("kernel_dropped", 0), st.get("ring_drops", 0), st.get("ring_full_ms", 0)
            d_kernel, d_ring, d_full = kernel - itf.seen[0], ring - itf.seen[1], full_ms - itf.seen[2]
            itf.seen = (kernel, ring, full_ms)
            if d_kernel > 0 and d_full > 0:
                itf.unsaid_behind += d_kernel
            elif d_kernel > 0:
                itf.unsaid_cpu += d_kernel
            itf.unsaid_ring += max(d_ring, 0)
            if now - itf.said_at < DROP_LOG_S or not (itf.unsaid_behind or itf.unsaid_cpu or itf.unsaid_ring):
                continue
            itf.said_at = now
            o = self.capture_options
            if itf.unsaid_behind:
                log.warning("capture on %s: the kernel dropped %d packets (%d since start): the ring was full of "
                            "blocks waiting to be compressed and sent (the capture thread waited %.1f s in all), "
                            "so the kernel buffer filled", itf.name, itf.unsaid_behind, kernel, full_ms / 1000)
            if itf.unsaid_cpu and o["immediate"]:
                log.warning("capture on %s: the kernel dropped %d packets (%d since start): its buffer filled "
                            "while the capture thread waited for a CPU: raise bufferSize on a busy host",
                            itf.name, itf.unsaid_cpu, kernel)
            elif itf.unsaid_cpu:
                # below ~26 MB/s (a block per timeout) the kernel buffer holds blocks x timeout
                blocks = max(1, -(-o["buffer_bytes"] // KERNEL_BLOCK_BYTES))
                log.warning("capture on %s: the kernel dropped %d packets (%d since start): its buffer filled "
                            "while the capture thread waited for a CPU; at low rates it covers a %.2f s wait "
                            "(bufferSize / 256 KiB x kernelTimeout): raise either on a busy host "
                            "(docs/CONFIGURATION.md)", itf.name, itf.unsaid_cpu, kernel,
                            blocks * o["timeout_ms"] / 1000)
            if itf.unsaid_ring:
                log.warning("capture on %s: %d packets dropped (%d since start): every ring block was held "
                            "(compression or sending behind)", itf.name, itf.unsaid_ring, ring)
            itf.unsaid_behind = itf.unsaid_cpu = itf.unsaid_ring = 0

    # -- the receiver's addresses, out of every capture ----------------------------------------
    def _resolve_exclusions(self) -> list[tuple[str, int]]:
        return sorted(set(self.transport.exclude()))

    def update_exclusions(self, addresses: Iterable[tuple[str, int]]) -> bool:
        """Exclude these (address, TCP port) pairs from capture (the sensor's own traffic to its
        receiver or brokers) and re-install the filter of every running capture if they changed.
        Returns whether they changed. Thread-safe; used by transports that learn more addresses."""
        new = sorted(set(addresses))
        with self._lock:
            if new == self._exclude:
                return False
            self._exclude = new
            live = [(i, i.capture, self._filter_for(i.ports)) for i in self._ifaces.values() if i.capture is not None]
        log.info("own traffic to %s excluded from capture", ", ".join(f"{h}:{p}" for h, p in new) or "nothing")
        for itf, cap, expr in live:
            try:
                cap.set_filter(expr or "")
            except Exception as exc:  # noqa: BLE001 - capture closed meanwhile, or a driver error
                log.error("cannot update the filter on %s: %s", itf.name, exc)
        return True

    def _capture_loop(self, itf: _Iface) -> None:
        cap = itf.capture
        assert cap is not None
        compressor = AdaptiveCompressor(self.compression_level)
        try:
            for batch in cap:
                self._ship(itf, batch, compressor, cap.ring)
        except Exception as exc:  # interface vanished, driver error: reported, reopened by the rescan
            itf.error = str(exc)
            itf.failures += 1
            log.error("capture on %s stopped: %s (reopening when it is back)", itf.name, exc)
        finally:
            # frames still holding blocks of this ring get copies: a ring outlives its capture
            # only as long as someone reads it, not until the receiver acknowledges
            self.store.detach(itf.name)
            with self._lock:  # (one step for _counters_of: never the old counters twice)
                final = cap.stats()
                itf.last_stats = {k: v + itf.past.get(k, 0) for k, v in final.items()}
                if itf.error is not None:  # a reopened capture counts on from here
                    itf.past = dict(itf.last_stats)
                itf.capture = None
                self.counters["stored_blocks"] += compressor.stored_blocks
                self.counters["compressed_blocks"] += compressor.compressed_blocks
            cap.close()

    def _ship(self, itf: _Iface, batch: PacketBatch, compressor: AdaptiveCompressor, ring) -> None:
        n, raw_len = len(batch), batch.nbytes
        payload, flags = compressor.compress(batch)
        # Stored: the ring block itself waits in the send window until acknowledged (no copy),
        # as long as more than half the ring stays free for capture; under pressure (receiver
        # slow or away) the block is copied out and the ring freed.
        copied = payload is batch and ring.free_blocks * 2 <= self.capture_options["ring_blocks"]
        if copied:
            payload = COPIES.copy(batch, int(self.max_raw))
        if payload is not batch:
            batch.release()

        def make(seq: int) -> tuple[bytes, Any]:
            return (P.encode_header(P.FrameType.DATA, size, flags=flags, seq=seq, iface=itf.index,
                                    count=n, raw_len=raw_len), payload)

        size = payload_size(payload)
        seq = self.store.put(make, n, size + P.HEADER_LEN)
        if seq is None:
            release_payload(payload)
        with self._lock:
            c = self.counters
            c["batches"] += 1
            c["packets"] += n
            c["raw_bytes"] += raw_len
            c["copied_blocks"] += copied
            if seq is None:
                c["dropped_batches"] += 1
                c["dropped_packets"] += n
            else:
                c["wire_bytes"] += size + P.HEADER_LEN
            c["zstd_level"] = compressor.level

    def _announce(self, itf: _Iface) -> None:
        """Tell the receiver about an interface opened mid-session (sent between DATA frames).
        Queued also while disconnected or handshaking: the next handshake drops what its HELLO
        lists, so no interface is missed (a duplicate announcement is harmless)."""
        self._control.append(P.encode_json(P.FrameType.HELLO, {"interface": itf.descriptor()}))
        self.wake()

    # -- counters ----------------------------------------------------------------------------
    def count_rejected(self, packets: int) -> None:
        """The destination refused a frame for good (a Kafka broker: too large): its packets
        are lost, and counted here (any thread)."""
        with self._lock:
            self.counters["rejected_frames"] += 1
            self.counters["rejected_packets"] += packets

    def stats(self) -> dict[str, Any]:
        """Counters: per interface (kernel and ring drops), blocks, window/spool use and drops."""
        ifaces = {}
        with self._lock:
            items = list(self._ifaces.values())
            c = dict(self.counters)
        for itf in items:
            s, capturing = self._counters_of(itf)
            ifaces[itf.name] = {"index": itf.index, "link_type": itf.link_type, **s,
                                "error": itf.error, "capturing": capturing,
                                "failures": itf.failures}
        frames, pending_bytes = self.store.pending()
        return {"sensor_id": self.sensor_id, "connected": self._connected, "interfaces": ifaces,
                "batches": c.get("batches", 0), "packets": c.get("packets", 0),
                "raw_bytes": c.get("raw_bytes", 0), "wire_bytes": c.get("wire_bytes", 0),
                "window_dropped_batches": self.store.dropped_blocks,
                "window_dropped_packets": self.store.dropped_packets,
                "rejected_frames": c.get("rejected_frames", 0), "rejected_packets": c.get("rejected_packets", 0),
                "spooled_batches": self.store.spooled_blocks, "spool_errors": self.store.spool_errors,
                "unacked_frames": frames,
                "unacked_bytes": pending_bytes, "acked_seq": self.store.acked_seq,
                "zstd_level": c.get("zstd_level", self.compression_level),
                "copied_blocks": c.get("copied_blocks", 0),
                "connection_failures": c.get("connection_failures", 0),
                "auth_failures": c.get("auth_failures", 0),
                "kernel_dropped": sum(i.get("kernel_dropped", 0) for i in ifaces.values()),
                "interface_dropped": sum(i.get("interface_dropped", 0) for i in ifaces.values()),
                "ring_drops": sum(i.get("ring_drops", 0) for i in ifaces.values()),
                "ring_full_ms": sum(i.get("ring_full_ms", 0) for i in ifaces.values())}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Sensor:
        """Run in a background thread (for scripts and notebooks); :attr:`running` says whether
        it still runs, :attr:`error` what ended it (e.g. no interface could be opened)."""
        self._thread = threading.Thread(target=self._run_in_thread, name="pktstream-sensor", daemon=True)
        self._thread.start()
        return self

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self._error = exc
            log.error("sensor stopped: %s", exc)

    @property
    def running(self) -> bool:
        """Whether the background thread of ``start()`` runs (False before it and after it ended)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the background thread of ``start()`` (None: none, or still running)."""
        return self._error

    def stop(self) -> None:
        """Stop capturing, send what was captured, say BYE (from any thread, and from a signal
        handler: no lock is taken here that the interrupted thread may hold)."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._stop.set()
        self.wake()
        for itf in list(self._ifaces.values()):
            if itf.capture is not None:
                itf.capture.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread of ``start()`` to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, *, drain_timeout: float = 10.0) -> None:
        """Capture and stream until stop(). Raises on unrecoverable local errors (no interface
        can be opened, a named interface fails), so a supervisor can restart the sensor."""
        try:
            self._rescan(first=True)
        except BaseException:
            self.stop()
            self.store.close()
            raise
        if not self._ifaces:
            self.store.close()
            raise PcapError("no interface to capture on (none up, or none matches the config)")
        if self.user:
            from pktstream.privileges import drop_privileges
            if self.spool_dir:  # (by the directory the store opened, never a link in it)
                self.store.chown(self.user, self.group)
            drop_privileges(self.user, self.group)
        rescan = threading.Thread(target=self._rescan_loop, name="rescan", daemon=True)
        rescan.start()
        try:
            self.transport.run(self, drain_timeout)
        finally:
            self.stop()
            for itf in list(self._ifaces.values()):
                if itf.thread is not None:
                    itf.thread.join(5)
            rescan.join(5)
            spilled = self.store.spill()
            frames, _ = self.store.pending()
            lost_frames, lost_packets = self.store.unspooled()
            self.exit_report = {"unacked_frames": frames, "spooled_frames": self.store.spooled_frames(),
                                "lost_frames": lost_frames, "lost_packets": lost_packets,
                                "failed_interfaces": sorted(i.name for i in self._ifaces.values()
                                                            if i.error is not None)}
            if spilled:
                log.info("spool: %d unacknowledged blocks kept for the next run", spilled)
            self.store.close()
        if self._fatal is not None:
            raise self._fatal

    def _index_for(self, name: str, link_type: int, snaplen: int) -> int:
        """Interface index of a descriptor (name, link type, snap length), stable across
        restarts when spooling (spooled blocks carry it, and ``interfaces.json`` in the spool
        keeps every descriptor an index stood for): the same name with another link type or
        snap length gets a new index, never the old one."""
        known = self._descriptors
        used = {i.index for i in self._ifaces.values()}
        index = None
        for d in known:
            same = d["name"] == name and d.get("link_type", link_type) == link_type \
                and d.get("snaplen", snaplen) == snaplen  # (a format-1 entry has only the name)
            if same and d["index"] not in used:
                index = d["index"]
                d.update(link_type=link_type, snaplen=snaplen)
                break
        if index is None:
            index = max([*(d["index"] for d in known), *used, *self._retired, -1]) + 1
            known.append({"index": index, "name": name, "link_type": link_type, "snaplen": snaplen})
        self._retired.pop(index, None)  # (its descriptor is an interface's again)
        if self.spool_dir:  # (in the spool directory opened at start, never one made again at its path)
            try:
                self.store.write_file("interfaces.json", json.dumps({"descriptors": known}).encode())
            except OSError as exc:  # (the capture goes on; a restart may renumber this interface)
                log.warning("spool: cannot save %s: %s", os.path.join(self.spool_dir, "interfaces.json"),
                            exc.strerror or exc)
        return index

    def _load_retired(self) -> None:
        """An earlier run's descriptors (its spooled blocks carry their indexes): announced
        until an interface takes one again."""
        for d in sorted(self._descriptors, key=lambda d: d["index"])[-256:]:  # (a HELLO's size)
            if "link_type" in d and "snaplen" in d:
                self._retired.setdefault(d["index"], {"index": d["index"], "name": d["name"],
                                                      "link_type": d["link_type"], "snaplen": d["snaplen"],
                                                      "tsresol": 9})

    # -- what a transport needs (pktstream.stream.tcp, pktstream.stream.kafka) ---------------------
    @property
    def stopping(self) -> bool:
        """Whether stop() was called (a transport then drains and returns)."""
        return self._stop.is_set()

    @property
    def stopped_at(self) -> float | None:
        """Monotonic time of the first stop() (the drain deadline counts from it)."""
        return self._stopped_at

    def capturing(self) -> bool:
        """Whether any capture thread still runs (more frames may come)."""
        return any(i.thread is not None and i.thread.is_alive() for i in list(self._ifaces.values()))

    def interface_by_index(self, index: int) -> dict[str, Any] | None:
        """The descriptor (index, name, link_type, snaplen, tsresol) of an interface index
        (also of a retired one: blocks may still carry it)."""
        with self._lock:
            for itf in self._ifaces.values():
                if itf.index == index:
                    return itf.descriptor()
            return self._retired.get(index)

    def hello_interfaces(self) -> list[dict[str, Any]]:
        """Descriptors of every interface so far, for a handshake; announcements queued for them
        are dropped (interfaces opened later are queued again: see take_control_frames)."""
        with self._lock:
            self._control.clear()
            return sorted([*(i.descriptor() for i in self._ifaces.values()), *self._retired.values()],
                          key=lambda d: d["index"])

    def take_control_frames(self) -> list[bytes]:
        """Control frames to send before the next DATA frame (HELLO of a new interface)."""
        out = []
        while self._control:
            out.append(self._control.popleft())
        return out

    def set_connected(self, connected: bool) -> None:
        """A transport reports whether its destination is reachable (``stats()["connected"]``)."""
        self._connected = connected

    def set_waker(self, wake: Callable[[], None] | None) -> None:
        """The transport's wake-up (called on a new frame, an ACK, a control frame, stop())."""
        self._wake_fn = wake

    def wake(self) -> None:
        """Wake the transport's thread (thread-safe, signal-safe: takes no lock)."""
        fn = self._wake_fn
        if fn is not None:
            fn()

    def count(self, name: str) -> None:
        """Count a transport event (``connection_failures``, ``auth_failures``, ``frames_sent``)."""
        with self._lock:
            self.counters[name] += 1

    def fail(self, exc: BaseException) -> None:
        """A transport met an error no retry can fix (configuration): stop; run() raises it."""
        self._fatal = exc
        self.stop()
