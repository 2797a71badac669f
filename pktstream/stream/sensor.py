"""Sensor: capture on interfaces, compress each block into one frame, stream to a receiver.

Threads: one capture thread per interface (capture → compress → FrameStore), one rescan
thread (interfaces that appear later), and the thread of ``run()`` as the sender over one
blocking connection (connect, handshake, resend unacknowledged frames, heartbeats, STATS).
Nothing blocks a capture thread: when the send window and the spool are full, the block is
dropped and counted.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import zstandard

import pktstream
from pktstream.stream import protocol as P
from pktstream._capture import Capture, PacketBatch, list_interfaces
from pktstream.exceptions import AuthenticationError, ConfigError, FilterError, FrameError, PcapError
from pktstream.stream.sendwindow import (COPIES, FrameStore, default_spool_bytes, default_spool_dir, payload_size,
                                  release_payload)
from pktstream.stream.uplink import Link

log = logging.getLogger("pktstream.stream.sensor")

DEFAULT_PORT = 8081
_STORE_ABOVE = 0.90   # compressed/raw above this: send the block stored
_STORED_RUN = 32      # blocks sent stored before compression is tried again ...
_STORED_RUN_MAX = 512  # ... doubling after each failed try, up to this


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None


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


def resolve_all(host: str, port: int) -> list[str]:
    """Every address of the receiver (so self-exclusion covers all of them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({i[4][0] for i in infos})


# -- compression that adapts instead of dropping -----------------------------------------------------

class AdaptiveCompressor:
    """zstd at ``level``; faster levels while compression is the bottleneck (busy > 60 % of the
    time), back up when idle. A block that shrinks by less than 10 % (encrypted or random
    payloads) is sent stored, and so are the next 32: a few percent of bandwidth is not worth
    ~2 ms of CPU per MiB. Compression is tried again after that run; each try that fails again
    doubles the run (up to 512 blocks), a try that succeeds resets it to 32."""

    LEVELS = (-7, -3, -1, 1, 3, 6, 9)

    def __init__(self, level: int = 1) -> None:
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

    def descriptor(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "link_type": self.link_type,
                "snaplen": self.snaplen, "tsresol": 9}


class Sensor:
    """Capture on interfaces and stream blocks to a receiver, losing nothing silently.

    Keyword-only options mirror libpcap terms (see docs/CONFIGURATION.md for each default).
    ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT when ``handle_signals``); ``start()``
    runs it in a background thread. ``stats()`` is callable from any thread.
    """

    def __init__(self, *, receiver: str | None = None, interfaces: list[str] | None = None,
                 include_loopback: bool = False, bpf: str | None = None, pcap_mode: str = "all",
                 capture_ports: Iterable[int] = (), capture_interfaces_ports: dict[str, list[int]] | None = None,
                 ignore_ports: Iterable[int] = (), snaplen: int = 262144, promisc: bool = False,
                 immediate: bool = False, buffer_bytes: int = 32 << 20, block_bytes: int = 1 << 20,
                 max_wait: float = 0.2, ring_blocks: int = 32, compression_level: int = 1,
                 window_bytes: int = 64 << 20, spool_dir: str | None = "auto", spool_bytes: int | None = None,
                 sensor_id: str | None = None, auth_key: bytes | str | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 heartbeat: float = 5.0, stats_interval: float = 5.0, rescan_interval: float = 5.0,
                 reconnect_min: float = 0.2, reconnect_max: float = 2.0, refused_backoff_max: float = 30.0,
                 user: str | None = None,
                 group: str | None = None, transport=None) -> None:
        if pcap_mode not in ("all", "allow", "deny"):
            raise ValueError(f"pcap_mode must be all, allow or deny, not {pcap_mode!r}")
        # transport: None = TCP to ``receiver``; else an object with run(sensor, drain_timeout)
        # and exclude() (e.g. pktstream.stream.kafka.KafkaTransport)
        if (receiver is None) == (transport is None):
            raise ValueError("Sensor needs exactly one of receiver and transport")
        self.transport = transport
        self.receiver = parse_hostport(receiver) if receiver else None
        self.interfaces_wanted = list(interfaces) if interfaces else None
        self.include_loopback = include_loopback
        self.bpf = bpf
        self.pcap_mode = pcap_mode
        self.capture_ports = [int(p) for p in capture_ports]
        self.capture_interfaces_ports = {k: [int(p) for p in v] for k, v in (capture_interfaces_ports or {}).items()}
        self.ignore_ports = [int(p) for p in ignore_ports]
        if pcap_mode == "all" and (self.capture_ports or self.capture_interfaces_ports):
            log.warning("pcapMode 'all' captures every port: capturePorts/captureInterfacesPorts are ignored")
        self.capture_options = dict(snaplen=snaplen, promisc=promisc, immediate=immediate,
                                    buffer_bytes=buffer_bytes, block_bytes=max(block_bytes, snaplen + 16),
                                    max_wait=max_wait, ring_blocks=ring_blocks)
        self.compression_level = compression_level
        self.sensor_id = sensor_id or socket.gethostname()
        if not re.match(r"^[\x21-\x7e]{1,128}$", self.sensor_id):
            raise ValueError(f"sensor id {self.sensor_id!r}: 1-128 printable ASCII characters, no spaces")
        self.hostname = socket.gethostname()
        self.auth_key = auth_key.encode() if isinstance(auth_key, str) else auth_key
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.heartbeat = heartbeat
        self.stats_interval = stats_interval
        self.rescan_interval = rescan_interval
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.refused_backoff_max = refused_backoff_max
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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_recv: socket.socket | None = None  # wakes the sender thread (see _notify)
        self._wake_send: socket.socket | None = None
        self._wake_pending = False
        self._stopped_at: float | None = None  # when stop() was first called
        self._connected = False
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.counters = collections.Counter()
        self._control: collections.deque[bytes] = collections.deque()  # control frames to send
        self._drain_timeout = 10.0
        self._handshaken = False     # the current connection completed its handshake
        self._connect_done = False   # the current attempt got a TCP connection
        self.exit_report: dict[str, Any] | None = None  # set when run() returns: what was left
        # the receiver's (or brokers') addresses, kept out of every capture filter; resolved
        # again before each connection (update_exclusions re-installs the filters on a change)
        self._exclude = self._resolve_exclusions()
        self.store.on_new_frame(self._notify)

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
                itf = self._ifaces[name] = _Iface(self._index_for(name), name)
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
            itf = self._ifaces.get(name)
            if itf is not None and (itf.capture is not None or (itf.thread is not None and itf.thread.is_alive())):
                continue
            try:
                self._open(name, ports)
            except Exception as exc:  # noqa: BLE001 - one interface's failure must not stop the others
                if first and (self.interfaces_wanted or (isinstance(exc, FilterError) and self.bpf)):
                    raise  # an interface the user named (or the user's filter) must work at start
                if itf is None or itf.error != f"cannot reopen: {exc}":
                    log.warning("cannot capture on %s: %s (retrying)", name, exc)
                if itf is not None:
                    itf.error = f"cannot reopen: {exc}"
            else:
                if itf is not None and itf.failures:
                    log.warning("capture on %s resumed", name)

    def _rescan_loop(self) -> None:
        """New interfaces every ``rescan_interval`` (all-interfaces mode); failed ones every
        second until they come back."""
        next_full = time.monotonic() + self.rescan_interval
        while not self._stop.wait(1.0):
            failed = any(i.capture is None and i.error is not None for i in list(self._ifaces.values()))
            if failed or (not self.interfaces_wanted and time.monotonic() >= next_full):
                next_full = time.monotonic() + self.rescan_interval
                try:
                    self._rescan()
                except Exception as exc:  # noqa: BLE001 - this thread reopens interfaces: it must live
                    log.error("interface scan failed: %s", exc)

    # -- the receiver's addresses, out of every capture ----------------------------------------
    def _resolve_exclusions(self) -> list[tuple[str, int]]:
        if self.transport is not None:
            return sorted(set(self.transport.exclude()))
        host, port = self.receiver
        return [(a, port) for a in resolve_all(host, port)]

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
            final = cap.stats()
            itf.last_stats = {k: v + itf.past.get(k, 0) for k, v in final.items()}
            if itf.error is not None:  # a reopened capture counts on from here
                itf.past = dict(itf.last_stats)
            with self._lock:
                self.counters["stored_blocks"] += compressor.stored_blocks
                self.counters["compressed_blocks"] += compressor.compressed_blocks
            cap.close()
            itf.capture = None

    def _ship(self, itf: _Iface, batch: PacketBatch, compressor: AdaptiveCompressor, ring) -> None:
        n, raw_len = len(batch), batch.nbytes
        payload, flags = compressor.compress(batch)
        # Stored: the ring block itself waits in the send window until acknowledged (no copy),
        # as long as more than half the ring stays free for capture; under pressure (receiver
        # slow or away) the block is copied out and the ring freed.
        copied = payload is batch and ring.free_blocks * 2 <= self.capture_options["ring_blocks"]
        if copied:
            payload = COPIES.copy(batch, self.max_raw)
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
        self._notify()

    # -- counters ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters: per interface (kernel and ring drops), blocks, window/spool use and drops."""
        ifaces = {}
        with self._lock:
            items = list(self._ifaces.values())
            c = dict(self.counters)
        for itf in items:
            cap = itf.capture
            try:
                s = {k: v + itf.past.get(k, 0) for k, v in cap.stats().items()} if cap is not None \
                    else itf.last_stats
            except Exception:
                s = itf.last_stats
            ifaces[itf.name] = {"index": itf.index, "link_type": itf.link_type, **s,
                                "error": itf.error, "capturing": cap is not None,
                                "failures": itf.failures}
        frames, pending_bytes = self.store.pending()
        return {"sensor_id": self.sensor_id, "connected": self._connected, "interfaces": ifaces,
                "batches": c.get("batches", 0), "packets": c.get("packets", 0),
                "raw_bytes": c.get("raw_bytes", 0), "wire_bytes": c.get("wire_bytes", 0),
                "window_dropped_batches": self.store.dropped_blocks,
                "window_dropped_packets": self.store.dropped_packets,
                "spooled_batches": self.store.spooled_blocks, "unacked_frames": frames,
                "unacked_bytes": pending_bytes, "acked_seq": self.store.acked_seq,
                "zstd_level": c.get("zstd_level", self.compression_level),
                "copied_blocks": c.get("copied_blocks", 0),
                "connection_failures": c.get("connection_failures", 0),
                "auth_failures": c.get("auth_failures", 0),
                "kernel_dropped": sum(i.get("kernel_dropped", 0) for i in ifaces.values()),
                "interface_dropped": sum(i.get("interface_dropped", 0) for i in ifaces.values()),
                "ring_drops": sum(i.get("ring_drops", 0) for i in ifaces.values())}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Sensor":
        """Run in a background thread (for scripts and notebooks)."""
        self._thread = threading.Thread(target=self.run, name="pktstream-sensor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop capturing, send what was captured, say BYE (from any thread, and from a signal
        handler: no lock is taken here that the interrupted thread may hold)."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._stop.set()
        self._notify()
        for itf in list(self._ifaces.values()):
            if itf.capture is not None:
                itf.capture.stop()

    def join(self, timeout: float | None = None) -> None:
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
            from pktstream.privileges import chown_for, drop_privileges
            if self.spool_dir:
                chown_for(self.spool_dir, self.user, self.group)
            drop_privileges(self.user, self.group)
        rescan = threading.Thread(target=self._rescan_loop, name="rescan", daemon=True)
        rescan.start()
        try:
            if self.transport is not None:
                self.transport.run(self, drain_timeout)
            else:
                self._sender(drain_timeout)
        finally:
            self.stop()
            for itf in list(self._ifaces.values()):
                if itf.thread is not None:
                    itf.thread.join(5)
            rescan.join(5)
            spilled = self.store.spill()
            frames, _ = self.store.pending()
            self.exit_report = {"unacked_frames": frames, "spooled_frames": self.store.spooled_frames(),
                                "failed_interfaces": sorted(i.name for i in self._ifaces.values()
                                                            if i.error is not None)}
            if spilled:
                log.info("spool: %d unacknowledged blocks kept for the next run", spilled)
            self.store.close()
        if self._fatal is not None:
            raise self._fatal

    def _index_for(self, name: str) -> int:
        """Interface index, stable across restarts when spooling: spooled blocks carry it."""
        path = os.path.join(self.spool_dir, "interfaces.json") if self.spool_dir else None
        known: dict[str, int] = {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    known = {str(k): int(v) for k, v in json.load(f).items()}
            except (OSError, ValueError, TypeError, AttributeError):
                known = {}
        used = {i.index for i in self._ifaces.values()}
        index = known.get(name)
        if index is None or index in used:
            index = max([*known.values(), *used, -1]) + 1
        known[name] = index
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(known, f)
            os.replace(tmp, path)
        return index

    # -- what a transport needs (TCP in this module, Kafka in pktstream.stream.kafka) ----------------
    @property
    def stopping(self) -> bool:
        """Whether stop() was called (a transport then drains and returns)."""
        return self._stop.is_set()

    def capturing(self) -> bool:
        """Whether any capture thread still runs (more frames may come)."""
        return self._capturing()

    def interface_by_index(self, index: int) -> dict[str, Any] | None:
        """The descriptor (index, name, link_type, snaplen, tsresol) of an interface index."""
        with self._lock:
            for itf in self._ifaces.values():
                if itf.index == index:
                    return itf.descriptor()
        return None

    def set_connected(self, connected: bool) -> None:
        """A transport reports whether its destination is reachable (``stats()["connected"]``)."""
        self._connected = connected

    def wake(self) -> None:
        """Wake the sender thread (thread-safe)."""
        self._notify()

    # -- sender ------------------------------------------------------------------------------
    def _notify(self) -> None:
        """Wake the sender (a new frame, an ACK, a control frame); one byte per sleep at most."""
        wake = self._wake_send
        if wake is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                wake.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (sender gone)
                pass

    def _sender(self, drain_timeout: float) -> None:
        """Connect, stream, reconnect: forever until stop(), then until everything is
        acknowledged or the drain deadline. Back-off: ``reconnect_min`` doubling to
        ``reconnect_max`` (jittered), back to the minimum after every successful handshake, so a
        restarted receiver is found within about a second; a receiver that refuses this sensor
        (key, certificate, identity, not a pktstream receiver) is retried more slowly, up to
        ``refused_backoff_max``. The back-off holds while draining too (no storm on stop)."""
        self._drain_timeout = drain_timeout
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        delay = self.reconnect_min
        refused_delay = min(2.0, self.refused_backoff_max)
        where = "%s:%d" % self.receiver
        failures, last_log = 0, 0.0
        try:
            while True:
                if self._stop.is_set():
                    if not self._capturing() and self.store.pending()[0] == 0:
                        break
                    if time.monotonic() >= self._drain_deadline():
                        log.warning("stopping with %d unacknowledged frames (receiver unreachable)",
                                    self.store.pending()[0])
                        break
                self._handshaken = False
                wait = failure = None
                try:
                    self._session()
                except ConfigError as exc:
                    log.error("receiver %s: %s", where, exc)
                    self._fatal = exc  # run() raises it: the sensor exits non-zero
                    self.stop()
                    break
                except AuthenticationError as exc:
                    self._count("auth_failures")
                    wait = refused_delay * (0.5 + random.random())
                    refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                    log.error("receiver %s: %s; retrying in %.0f s", where, exc, wait)
                except ssl.SSLCertVerificationError as exc:
                    self._count("connection_failures")
                    wait = refused_delay * (0.5 + random.random())
                    refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                    reason = str(exc.verify_message or exc)
                    hint = ("the certificate does not name the address connected to: use that name in "
                            "--receiver or give it with --tls-server-name (tls.serverName)" if "mismatch" in reason
                            else "the receiver's certificate is not trusted: give the CA that signed it, or a "
                            "self-signed certificate itself, with --tls-ca PEM (tls.cafile)")
                    log.error("receiver %s: TLS verification failed: %s -- %s; retrying in %.0f s",
                              where, reason, hint, wait)
                except (OSError, FrameError) as exc:  # includes timeouts, resets and TLS errors
                    self._count("connection_failures")
                    in_handshake = not self._handshaken and self._connect_done and not isinstance(
                        exc, (ConnectionRefusedError, socket.timeout, socket.gaierror))
                    if in_handshake and (isinstance(exc, FrameError) or (
                            isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError))):
                        # it answered, but not in pktstream's protocol (or TLS failed): refused
                        wait = refused_delay * (0.5 + random.random())
                        refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                        log.error("receiver %s: %s during the handshake: is it a pktstream receiver "
                                  "(and does it accept this sensor? see its log); retrying in %.0f s",
                                  where, exc or type(exc).__name__, wait)
                    elif in_handshake:
                        # closed before the handshake ended: its connection limits, a restart, or
                        # not a pktstream receiver; an ordinary (quick) retry, with the hint
                        failure = (f"{exc or type(exc).__name__} during the handshake (is it a pktstream "
                                   "receiver? connection limits? see its log)")
                    else:
                        failure = str(exc) or type(exc).__name__
                finally:
                    self._connected = False
                if self._handshaken:  # a session worked: the next outage starts from the minimum
                    delay = self.reconnect_min
                    refused_delay = min(2.0, self.refused_backoff_max)
                    failures = 0
                if self._stop.is_set() and self.store.pending()[0] == 0 and not self._capturing():
                    break
                if wait is None:
                    wait = delay * (0.5 + random.random())
                    delay = min(self.reconnect_max, delay * 2)
                    if failure is not None:
                        failures += 1
                        # the first failure of an outage, then one line a minute (all are counted)
                        if failures == 1 or time.monotonic() - last_log >= 60:
                            last_log = time.monotonic()
                            log.warning("receiver %s: %s; retrying with a back-off of up to %.1f s, jittered (%d attempts so far)",
                                        where, failure, self.reconnect_max, failures)
                self._sleep(wait)
        finally:
            wake = (self._wake_recv, self._wake_send)
            self._wake_recv = self._wake_send = None
            for sock in wake:
                sock.close()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _io_timeout(self, seconds: float) -> float:
        """A connect/handshake timeout, cut to what is left of the drain once stopping (an
        attempt that starts late must not outlive the drain, or a supervisor's kill)."""
        if not self._stop.is_set():
            return seconds
        return max(0.5, min(seconds, self._drain_deadline() - time.monotonic()))

    def _drain_deadline(self) -> float:
        """When a stopping sensor gives up sending (``drain_timeout`` after stop(), over all
        sessions together)."""
        return (self._stopped_at or time.monotonic()) + self._drain_timeout

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` between connection attempts. A stop() that arrives meanwhile ends
        the wait (one more attempt drains at once); while already stopping the back-off holds,
        cut short only by the drain deadline. Woken through the wake socket, not an Event:
        stop() may run in a signal handler on this very thread."""
        end = time.monotonic() + seconds
        stopping = self._stop.is_set()
        while True:
            if self._stop.is_set():
                if not stopping:
                    return
                end = min(end, self._drain_deadline())
            left = end - time.monotonic()
            if left <= 0:
                return
            select.select([self._wake_recv], [], [], left)
            try:
                self._wake_recv.recv(4096)
            except OSError:
                pass
            self._wake_pending = False

    def _capturing(self) -> bool:
        return any(i.thread is not None and i.thread.is_alive() for i in list(self._ifaces.values()))

    def _session(self) -> None:
        host, port = self.receiver
        self._connect_done = False
        addresses = resolve_all(host, port)  # again for every connection: the receiver may move
        if not addresses:
            raise OSError(f"cannot resolve the receiver's host name {host!r}")
        self.update_exclusions((a, port) for a in addresses)  # before our own packets flow
        sock = socket.create_connection((host, port), timeout=self._io_timeout(10))
        self._connect_done = True
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname or host)
            link = Link(sock, self._wake_recv)
            last_seq = self._handshake(link)
            self._handshaken = self._connected = True
            self.store.resume(last_seq)
            log.info("connected to receiver %s:%d (it has everything up to seq %d)", host, port, last_seq)
            self._stream(link, last_seq)
        finally:
            sock.close()

    def _expect(self, link: Link, ftype: P.FrameType, refused: type[Exception]) -> P.Frame:
        """The next frame, which must be ``ftype``; an ERROR from the receiver raises ``refused``."""
        frame = link.next_frame(self._io_timeout(15))
        if frame.type == P.FrameType.ERROR:
            raise refused(f"the receiver refused this sensor: {frame.json().get('reason')}")
        if frame.type != ftype:
            raise FrameError(f"expected {ftype.name}, got {frame.type.name}")
        return frame

    def _handshake(self, link: Link) -> int:
        nonce = P.new_nonce()
        with self._lock:  # every interface registered so far is listed; later ones are queued
            self._control.clear()
            descs = [i.descriptor() for i in sorted(self._ifaces.values(), key=lambda i: i.index)]
        link.send([P.encode_json(P.FrameType.HELLO, {
            "protocol": P.VERSION, "sensor_id": self.sensor_id, "hostname": self.hostname,
            "software": f"pktstream {pktstream.__version__}", "interfaces": descs,
            "nonce": nonce.hex(), "max_raw": self.max_raw, "auth": self.auth_key is not None,
            "instance": self.instance})], 15)
        body = self._expect(link, P.FrameType.CHALLENGE, AuthenticationError).json()
        rnonce = P.parse_nonce(body.get("nonce"))
        my_proof = ""

        def refuse(reason: str, message: str) -> None:
            """Tell the receiver why (it logs it) and fail this attempt."""
            try:
                link.send([P.encode_json(P.FrameType.ERROR, {"reason": reason})], 5)
            except OSError:
                pass
            raise AuthenticationError(message)

        if self.auth_key is None and body.get("auth"):
            refuse("the sensor has no key", "the receiver requires a key: give this sensor the same key "
                   "as the receiver (--auth-key-file FILE or auth.key)")
        if self.auth_key is not None:
            if not body.get("auth"):
                refuse("the sensor requires authentication and the receiver has no key",
                       "the receiver does not check keys (anyone could pose as it): give it the same key "
                       "(--auth-key-file or auth.key), or remove this sensor's key")
            expected = P.proof(self.auth_key, "receiver", nonce, rnonce, self.sensor_id)
            if not P.check_proof(expected, body.get("proof")):
                refuse("the keys differ", f"authentication failed: this sensor's key differs from the "
                       f"receiver's key for sensor id {self.sensor_id!r} (check --auth-key-file on both sides)")
            my_proof = P.proof(self.auth_key, "sensor", rnonce, nonce, self.sensor_id)
        link.send([P.encode_json(P.FrameType.AUTH, {"proof": my_proof})], 15)
        welcome = self._expect(link, P.FrameType.WELCOME, AuthenticationError).json()
        last = welcome.get("last_seq", 0)
        if not isinstance(last, int) or not 0 <= last < P.MAX_SEQ:
            raise FrameError("bad last_seq in WELCOME")
        max_raw = welcome.get("max_raw")
        if isinstance(max_raw, int) and max_raw < self.max_raw:
            raise ConfigError(f"the receiver accepts blocks of at most {max_raw} bytes but this sensor "
                              f"makes blocks of {self.max_raw}: lower the sensor's blockSize or raise "
                              f"the receiver's compressBlockSize")
        hb = welcome.get("heartbeat")
        # heartbeat at the faster of both sides' settings, so neither side's idle timeout fires
        self._session_heartbeat = min(self.heartbeat, hb) if isinstance(hb, (int, float)) and hb > 0.05 \
            else self.heartbeat
        return last

    def _stream(self, link: Link, last_seq: int) -> None:
        """Send every frame after ``last_seq`` as it comes, take ACKs, keep the session alive;
        returns when the receiver says BYE (after ours, when stopping)."""
        sent = last_seq
        hb = self._session_heartbeat
        silent = 3 * hb + 1  # longer without a byte from the receiver (or a send): it is gone
        last_rx = last_tx = last_stats = time.monotonic()
        bye_sent = False
        while True:
            self._wake_pending = False  # before looking at the store: a later put() wakes us
            now = time.monotonic()
            if now - last_rx > silent:
                raise TimeoutError(f"receiver silent for {now - last_rx:.0f} s")
            if self._stop.is_set() and now > self._drain_deadline():
                raise TimeoutError("stopping: the receiver did not acknowledge in time")
            nxt = self.store.after(sent)
            # control frames first, taken after the store: the HELLO of a new interface is
            # queued before its capture starts, so it always precedes that interface's data
            out = []
            while self._control:
                out.append(self._control.popleft())
            if now - last_stats >= self.stats_interval:
                out.append(P.encode_json(P.FrameType.STATS, self.stats()))
                last_stats = last_tx = now
            elif now - last_tx >= hb:
                out.append(P.encode(P.FrameType.HEARTBEAT))
                last_tx = now
            if nxt is not None:
                seq, (header, payload) = nxt
                out += (header, payload)
            elif self._stop.is_set() and not bye_sent and not self._capturing() \
                    and self.store.pending()[0] == 0:
                out += (P.encode_json(P.FrameType.STATS, self.stats()),
                        P.encode_json(P.FrameType.BYE, {"reason": "sensor stopping"}))
                bye_sent = True
            if out:
                # one sendmsg for everything; a peer that takes nothing for `silent` seconds
                # (stopped reading without a reset) raises a timeout
                link.send(out, silent)
                last_tx = time.monotonic()
            if nxt is not None:
                sent = seq
                self._count("frames_sent")
            # ACKs that arrived; sleep (until a frame, an ACK or the next tick) only when idle
            for f in link.receive(0 if nxt is not None else min(0.2, hb)):
                if f.type == P.FrameType.ACK:
                    self.store.ack(f.seq)
                elif f.type == P.FrameType.BYE:
                    return
                elif f.type == P.FrameType.ERROR:
                    raise FrameError(f"receiver closed the session: {f.json().get('reason')}")
            last_rx = max(last_rx, link.last_rx)
