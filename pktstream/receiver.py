"""Receiver: an asyncio server for many sensors, fanning batches out to sinks.

Data path: connection → validate/decompress DATA (bounded) → drop duplicates by
(sensor id, seq) → one bounded queue per sink, each drained by its own thread → after every
*gating* sink has written and flushed a frame, the state (last seq per sensor, open files and
their committed sizes) is persisted and the frame is ACKed. While too many bytes wait for the
gating sinks the receiver stops reading from the sockets, so backpressure reaches the sensors.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from pktstream import protocol as P
from pktstream._capture import PacketBatch
from pktstream.exceptions import FrameError
from pktstream.sensor import parse_hostport
from pktstream.sinks.base import Sink, Source
from pktstream.sinks.callback import IteratorSink

log = logging.getLogger("pktstream.receiver")

STATE_FILE = "receiver-state.json"
_SENSOR_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass
class _SensorState:
    sensor_id: str
    hostname: str = ""
    software: str = ""
    interfaces: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_accepted: int = 0
    last_committed: int = 0
    counters: collections.Counter = field(default_factory=collections.Counter)
    reported: dict[str, Any] = field(default_factory=dict)
    writer: asyncio.StreamWriter | None = None
    peer: str = ""
    bye: asyncio.Event | None = None


class _SinkRunner:
    """A sink, its bounded queue and its thread."""

    def __init__(self, sink: Sink, receiver: "Receiver", maxsize: int) -> None:
        self.sink = sink
        self.gate = sink.gate
        self.receiver = receiver
        self.queue: queue.Queue = queue.Queue(0 if self.gate else maxsize)
        self.committed = 0
        self.state: dict[str, Any] | None = None
        self.counters = collections.Counter()
        self.failing = False
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)

    def submit(self, index: int, source: Source, batch: PacketBatch) -> None:
        try:
            self.queue.put_nowait((index, source, batch))
        except queue.Full:  # only non-gating sinks are bounded here
            self.counters["dropped_batches"] += 1
            self.counters["dropped_packets"] += len(batch)

    def _write(self, source: Source, batch: PacketBatch) -> bool:
        while True:
            try:
                self.sink.write(source, batch)
                if self.failing:
                    log.warning("output %s works again", self.sink.name)
                self.failing = False
                self.counters["batches"] += 1
                self.counters["packets"] += len(batch)
                return True
            except Exception as exc:
                self.counters["failures"] += 1
                if not self.failing:
                    log.error("output %s failed: %s", self.sink.name, exc)
                self.failing = True
                if not self.gate:
                    self.counters["dropped_batches"] += 1
                    self.counters["dropped_packets"] += len(batch)
                    return False
                if self.receiver._closing.is_set():
                    self.counters["lost_at_shutdown_packets"] += len(batch)
                    return False
                time.sleep(1.0)  # a gating output keeps the data: retry (nothing is ACKed meanwhile)

    def _run(self) -> None:
        done = False
        while not done:
            item = self.queue.get()
            items = [item]
            while len(items) < 512:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            last = self.committed
            for it in items:
                if it is None:
                    done = True
                    continue
                index, source, batch = it
                self._write(source, batch)
                last = index
            try:
                state = self.sink.flush()
            except Exception as exc:
                self.counters["failures"] += 1
                log.error("output %s flush failed: %s", self.sink.name, exc)
                continue
            self.receiver._from_thread(self._flushed, last, state)
        try:
            self.sink.close()
        except Exception as exc:
            log.error("closing output %s failed: %s", self.sink.name, exc)

    def _flushed(self, index: int, state: dict[str, Any] | None) -> None:
        self.committed = max(self.committed, index)
        self.state = state
        self.receiver._commit()


class Receiver:
    """Accept sensors, write what they send to outputs, account for every drop.

    :param listen: ``host:port`` to listen on (port 0 picks a free one; see ``address``).
    :param outputs: sinks (``FileSink``, ``StdoutSink``, ``CallbackSink`` ...).
    :param state_dir: where the last sequence per sensor and open-file sizes are persisted
        (without it a restart cannot tell resent frames from new ones).
    :param auth_key: shared key (PacketStreamer ``auth.key``); ``auth_keys``: sensor id → key.
    :param ssl_context: server TLS context (see docs/SECURITY.md).
    :param max_inflight_bytes: bytes waiting for gating outputs before reading pauses.

    Thread safety: ``start()``, ``stop()``, ``stats()`` and ``batches()`` may be called from
    any thread; ``run()`` blocks.
    """

    def __init__(self, *, listen: str = "0.0.0.0:8081", outputs: list[Sink] | tuple = (),
                 state_dir: str | None = None, auth_key: bytes | str | None = None,
                 auth_keys: dict[str, bytes | str] | None = None, ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = 256, handshake_timeout: float = 10.0, heartbeat: float = 5.0,
                 max_raw_bytes: int = P.DEFAULT_MAX_RAW_BYTES, max_inflight_bytes: int = 64 << 20,
                 sink_queue: int = 256, stats_interval: float = 60.0, metrics: str | None = None,
                 fsync_state: bool = False) -> None:
        self.listen = parse_hostport(listen)
        self.outputs = list(outputs)
        self.state_dir = state_dir
        self.auth_key = auth_key.encode() if isinstance(auth_key, str) else auth_key
        self.auth_keys = {k: (v.encode() if isinstance(v, str) else v) for k, v in (auth_keys or {}).items()}
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat
        self.max_raw = max_raw_bytes
        self.max_inflight = max_inflight_bytes
        self.sink_queue = sink_queue
        self.stats_interval = stats_interval
        self.metrics = parse_hostport(metrics, 9100) if metrics else None
        self.fsync_state = fsync_state
        self.address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._sensors: dict[str, _SensorState] = {}
        self._runners: list[_SinkRunner] = []
        self._pending: collections.deque = collections.deque()  # (index, sensor_id, seq, nbytes)
        self._index = 0
        self._inflight = 0
        self._connections = 0
        self.counters = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._iterator: IteratorSink | None = None
        self._error: BaseException | None = None
        self._load_state()

    # -- state -------------------------------------------------------------------------------
    def _state_path(self) -> str | None:
        return os.path.join(self.state_dir, STATE_FILE) if self.state_dir else None

    def _load_state(self) -> None:
        path = self._state_path()
        if path is None:
            return
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"receiver state {path} is unreadable ({exc}); move it away to start fresh") from None
        for sid, s in state.get("sensors", {}).items():
            st = self._sensors[sid] = _SensorState(sid, hostname=s.get("hostname", ""))
            st.last_accepted = st.last_committed = int(s.get("last_seq", 0))
            st.interfaces = {int(k): v for k, v in s.get("interfaces", {}).items()}
        by_name = {s.name: s for s in self.outputs}
        for name, sink_state in state.get("sinks", {}).items():
            sink = by_name.get(name)
            if sink is not None and sink_state:
                type(sink).recover(sink_state)
        log.info("state: resuming %d sensors from %s", len(self._sensors), path)

    def _save_state(self) -> None:
        path = self._state_path()
        if path is None:
            return
        state = {"sensors": {sid: {"last_seq": s.last_committed, "hostname": s.hostname,
                                   "interfaces": {str(k): v for k, v in s.interfaces.items()}}
                             for sid, s in self._sensors.items()},
                 "sinks": {r.sink.name: r.state for r in self._runners if r.state}}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            if self.fsync_state:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- embedding API -----------------------------------------------------------------------
    def batches(self, maxsize: int = 64) -> Iterator[tuple[Source, PacketBatch]]:
        """Iterate ``(source, batch)`` as they arrive (call before ``start()``). The iterator
        gates acknowledgements: a slow consumer slows the sensors instead of losing data."""
        if self._iterator is None:
            self._iterator = IteratorSink(maxsize)
            self.outputs.append(self._iterator)
        return iter(self._iterator)

    def start(self) -> "Receiver":
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
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Serve until ``stop()``."""
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def _from_thread(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass

    # -- serving -----------------------------------------------------------------------------
    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._space = asyncio.Condition()
        self._runners = [_SinkRunner(s, self, self.sink_queue) for s in self.outputs]
        for r in self._runners:
            r.thread.start()
        server = await asyncio.start_server(self._handle, self.listen[0] or None, self.listen[1],
                                            ssl=self.ssl_context, limit=1 << 20)
        self.address = server.sockets[0].getsockname()[:2]
        metrics_server = None
        if self.metrics:
            metrics_server = await asyncio.start_server(self._metrics, *self.metrics)
            self.metrics_address = metrics_server.sockets[0].getsockname()[:2]
        log.info("receiver listening on %s:%d%s", *self.address, " (TLS)" if self.ssl_context else "")
        self._ready.set()
        ticker = asyncio.create_task(self._periodic())
        try:
            await self._stop_event.wait()
        finally:
            self._closing.set()
            ticker.cancel()
            server.close()
            if metrics_server:
                metrics_server.close()
            for s in list(self._sensors.values()):
                if s.writer is not None:
                    s.writer.close()
            for r in self._runners:
                r.queue.put(None)
            for r in self._runners:
                await asyncio.to_thread(r.thread.join)
            await asyncio.sleep(0)  # run the final _flushed callbacks
            self._commit()
            self._save_state()
            self.log_stats()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            self.log_stats()

    def log_stats(self) -> None:
        for sid, s in self._sensors.items():
            c, r = s.counters, s.reported
            log.info("sensor %s: %d packets, %d bytes, ratio %.2f, duplicates %d, sensor drops: "
                        "kernel %d, ring %d, window %d", sid, c["packets"], c["raw_bytes"],
                        (c["raw_bytes"] / c["wire_bytes"]) if c["wire_bytes"] else 0.0, c["duplicate_frames"],
                        r.get("kernel_dropped", 0), r.get("ring_drops", 0), r.get("window_dropped_packets", 0))

    # -- commit path -------------------------------------------------------------------------
    async def _dispatch(self, sensor: _SensorState, seq: int, source: Source, batch: PacketBatch) -> None:
        nbytes = batch.nbytes
        async with self._space:
            await self._space.wait_for(lambda: self._inflight < self.max_inflight or self._closing.is_set())
        self._index += 1
        self._inflight += nbytes
        self._pending.append((self._index, sensor.sensor_id, seq, nbytes))
        for r in self._runners:
            r.submit(self._index, source, batch)
        if not any(r.gate for r in self._runners):
            self._commit()

    def _commit(self) -> None:
        gating = [r.committed for r in self._runners if r.gate]
        committed = min(gating) if gating else self._index
        acks: dict[str, int] = {}
        freed = 0
        while self._pending and self._pending[0][0] <= committed:
            _, sid, seq, nbytes = self._pending.popleft()
            acks[sid] = max(acks.get(sid, 0), seq)
            freed += nbytes
        if not acks:
            return
        for sid, seq in acks.items():
            s = self._sensors[sid]
            s.last_committed = max(s.last_committed, seq)
        self._save_state()
        for sid in acks:
            s = self._sensors[sid]
            if s.writer is not None and not s.writer.is_closing():
                s.writer.write(P.encode(P.FrameType.ACK, seq=s.last_committed))
            if s.bye is not None and s.last_committed >= s.last_accepted:
                s.bye.set()
        self._inflight -= freed
        asyncio.ensure_future(self._notify_space())

    async def _notify_space(self) -> None:
        async with self._space:
            self._space.notify_all()

    # -- one connection ----------------------------------------------------------------------
    def _key_for(self, sensor_id: str) -> bytes | None:
        if self.auth_keys:
            return self.auth_keys.get(sensor_id)
        return self.auth_key

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "%s:%s" % writer.get_extra_info("peername")[:2]
        if self._connections >= self.max_connections:
            self.counters["rejected_connections"] += 1
            log.warning("%s: refused, %d connections already", peer, self._connections)
            writer.close()
            return
        self._connections += 1
        sensor: _SensorState | None = None
        try:
            sensor = await asyncio.wait_for(self._handshake(reader, writer, peer), self.handshake_timeout)
            await self._session(sensor, reader, writer)
        except asyncio.TimeoutError:
            self.counters["timeouts"] += 1
            log.warning("%s: %s timed out", peer, "session" if sensor else "handshake")
        except FrameError as exc:
            self.counters["protocol_errors"] += 1
            log.warning("%s: closing: %s", peer, exc)
            self._send_error(writer, str(exc))
        except PermissionError as exc:
            self.counters["auth_failures"] += 1
            log.warning("%s: authentication failed: %s", peer, exc)
            self._send_error(writer, "authentication failed")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            if sensor is None:
                self.counters["aborted_handshakes"] += 1
            log.info("%s: connection closed (%s)", peer, type(exc).__name__)
        finally:
            self._connections -= 1
            if sensor is not None and sensor.writer is writer:
                sensor.writer = None
                log.info("sensor %s (%s) disconnected", sensor.sensor_id, peer)
            writer.close()

    def _send_error(self, writer: asyncio.StreamWriter, reason: str) -> None:
        if not writer.is_closing():
            writer.write(P.encode_json(P.FrameType.ERROR, {"reason": reason[:500]}))

    @staticmethod
    def _check_iface(d: Any) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise FrameError("interface descriptor is not an object")
        out = {}
        for key, lo, hi in (("index", 0, 1 << 20), ("link_type", 0, 1 << 16), ("snaplen", 1, 1 << 18)):
            v = d.get(key)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise FrameError(f"interface descriptor: bad {key} {v!r}")
            out[key] = v
        name = d.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise FrameError("interface descriptor: bad name")
        out["name"] = name
        return out

    async def _handshake(self, reader, writer, peer: str) -> _SensorState:
        hello = await P.read_frame(reader, max_payload=0, max_raw=0)
        if hello.type != P.FrameType.HELLO:
            raise FrameError(f"expected HELLO, got {hello.type.name}")
        h = hello.json()
        sid = h.get("sensor_id")
        if not isinstance(sid, str) or not _SENSOR_ID.match(sid):
            raise FrameError("bad sensor_id (1-128 printable ASCII characters)")
        try:
            snonce = bytes.fromhex(h.get("nonce", ""))
        except (ValueError, TypeError):
            raise FrameError("bad nonce") from None
        if len(snonce) != P.NONCE_BYTES:
            raise FrameError("bad nonce length")
        ifaces = h.get("interfaces")
        if not isinstance(ifaces, list) or len(ifaces) > 4096:
            raise FrameError("bad interface list")
        descs = [self._check_iface(d) for d in ifaces]
        key = self._key_for(sid)
        if self.auth_keys and key is None:
            raise PermissionError(f"sensor {sid!r} has no key (revoked or unknown)")
        rnonce = P.new_nonce()
        writer.write(P.encode_json(P.FrameType.CHALLENGE, {
            "nonce": rnonce.hex(), "auth": key is not None,
            "proof": P.proof(key, "receiver", snonce, rnonce, sid) if key else ""}))
        await writer.drain()
        auth = await P.read_frame(reader, max_payload=0, max_raw=0)
        if auth.type != P.FrameType.AUTH:
            raise FrameError(f"expected AUTH, got {auth.type.name}")
        if key is not None and not P.check_proof(P.proof(key, "sensor", rnonce, snonce, sid),
                                                 auth.json().get("proof")):
            raise PermissionError(f"sensor {sid!r}: wrong key")
        sensor = self._sensors.get(sid)
        if sensor is None:
            sensor = self._sensors[sid] = _SensorState(sid)
        if sensor.writer is not None:
            log.warning("sensor %s reconnected from %s: closing its old connection from %s", sid, peer, sensor.peer)
            sensor.writer.close()
        for d in descs:
            sensor.interfaces[d["index"]] = d
        sensor.hostname = str(h.get("hostname", ""))[:255]
        sensor.software = str(h.get("software", ""))[:255]
        sensor.writer, sensor.peer = writer, peer
        sensor.counters["connections"] += 1
        writer.write(P.encode_json(P.FrameType.WELCOME, {"last_seq": sensor.last_committed,
                                                         "max_raw": self.max_raw,
                                                         "heartbeat": self.heartbeat}))
        await writer.drain()
        log.info("sensor %s (%s, %s) connected from %s, %d interfaces, resuming after seq %d",
                    sid, sensor.hostname, sensor.software, peer, len(sensor.interfaces), sensor.last_committed)
        return sensor

    async def _session(self, sensor: _SensorState, reader, writer) -> None:
        idle = 3 * self.heartbeat + 1  # the sensor sends a heartbeat every `heartbeat` s when idle
        c = sensor.counters
        while True:
            frame = await asyncio.wait_for(
                P.read_frame(reader, max_payload=self.max_raw + 1024, max_raw=self.max_raw), idle)
            t = frame.type
            if t == P.FrameType.DATA:
                await self._data(sensor, frame)
            elif t == P.FrameType.HEARTBEAT:
                writer.write(P.encode(P.FrameType.HEARTBEAT))
            elif t == P.FrameType.STATS:
                sensor.reported = frame.json()
                c["stats_frames"] += 1
            elif t == P.FrameType.HELLO:  # an interface that appeared later
                d = self._check_iface(frame.json().get("interface"))
                sensor.interfaces[d["index"]] = d
                log.info("sensor %s: new interface %s", sensor.sensor_id, d["name"])
            elif t == P.FrameType.BYE:
                sensor.bye = asyncio.Event()
                if sensor.last_committed < sensor.last_accepted:
                    await asyncio.wait_for(sensor.bye.wait(), 60)
                sensor.bye = None
                writer.write(P.encode(P.FrameType.ACK, seq=sensor.last_committed))
                writer.write(P.encode_json(P.FrameType.BYE, {"reason": "bye"}))
                await writer.drain()
                log.info("sensor %s said goodbye", sensor.sensor_id)
                return
            else:
                raise FrameError(f"unexpected {t.name} frame from a sensor")

    async def _data(self, sensor: _SensorState, frame: P.Frame) -> None:
        c = sensor.counters
        iface = sensor.interfaces.get(frame.iface)
        if iface is None:
            raise FrameError(f"DATA for unknown interface index {frame.iface}")
        if frame.seq <= sensor.last_accepted:
            c["duplicate_frames"] += 1
            c["duplicate_packets"] += frame.count
            if frame.seq <= sensor.last_committed and sensor.writer is not None:
                sensor.writer.write(P.encode(P.FrameType.ACK, seq=sensor.last_committed))
            return
        batch = P.decode_data(frame, link_type=iface["link_type"], snaplen=iface["snaplen"],
                              interface=f"{sensor.sensor_id}/{iface['name']}", max_raw=self.max_raw)
        source = Source(sensor.sensor_id, sensor.hostname, iface["name"], iface["link_type"], iface["snaplen"])
        sensor.last_accepted = frame.seq
        c["frames"] += 1
        c["packets"] += frame.count
        c["raw_bytes"] += frame.raw_len
        c["wire_bytes"] += len(frame.payload) + P.HEADER_LEN
        await self._dispatch(sensor, frame.seq, source, batch)

    # -- counters ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-sensor counters (received, duplicates, and every drop counter the sensor
        reported), per-output counters, and connection-level rejections."""
        sensors = {}
        for sid, s in list(self._sensors.items()):
            c, r = s.counters, s.reported
            sensors[sid] = {
                "hostname": s.hostname, "connected": s.writer is not None, "peer": s.peer,
                "last_seq": s.last_committed, "frames": c["frames"], "packets": c["packets"],
                "raw_bytes": c["raw_bytes"], "wire_bytes": c["wire_bytes"],
                "compression_ratio": round(c["raw_bytes"] / c["wire_bytes"], 3) if c["wire_bytes"] else None,
                "duplicate_frames": c["duplicate_frames"], "connections": c["connections"],
                "sensor_packets": r.get("packets", 0),
                "kernel_dropped": r.get("kernel_dropped", 0),
                "interface_dropped": r.get("interface_dropped", 0),
                "ring_drops": r.get("ring_drops", 0),
                "window_dropped_packets": r.get("window_dropped_packets", 0),
                "unacked_frames": r.get("unacked_frames", 0),
                "interfaces": r.get("interfaces", {}),
            }
        outputs = {r.sink.name: {"gate": r.gate, "queued": r.queue.qsize(), **r.counters}
                   for r in self._runners}
        return {"sensors": sensors, "outputs": outputs, "connections": self._connections,
                "inflight_bytes": self._inflight, **self.counters}

    async def _metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = self.prometheus().encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def prometheus(self) -> str:
        """The counters in Prometheus text format."""
        st = self.stats()
        lines = []

        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        per_sensor = ("packets", "raw_bytes", "wire_bytes", "frames", "duplicate_frames", "kernel_dropped",
                      "interface_dropped", "ring_drops", "window_dropped_packets", "unacked_frames")
        for key in per_sensor:
            name = f"pktstream_sensor_{key}"
            lines.append(f"# TYPE {name} {'gauge' if key == 'unacked_frames' else 'counter'}")
            for sid, s in st["sensors"].items():
                lines.append(f'{name}{{sensor="{esc(sid)}"}} {s[key]}')
        lines.append("# TYPE pktstream_sensor_connected gauge")
        for sid, s in st["sensors"].items():
            lines.append(f'pktstream_sensor_connected{{sensor="{esc(sid)}"}} {int(s["connected"])}')
        for key in ("packets", "dropped_packets", "failures"):
            lines.append(f"# TYPE pktstream_output_{key} counter")
            for name, o in st["outputs"].items():
                lines.append(f'pktstream_output_{key}{{output="{esc(name)}"}} {o.get(key, 0)}')
        lines.append("# TYPE pktstream_receiver_connections gauge")
        lines.append(f"pktstream_receiver_connections {st['connections']}")
        for key in ("protocol_errors", "auth_failures", "timeouts", "rejected_connections"):
            lines.append(f"# TYPE pktstream_receiver_{key} counter")
            lines.append(f"pktstream_receiver_{key} {st.get(key, 0)}")
        return "\n".join(lines) + "\n"
