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
import concurrent.futures
import functools
import ipaddress
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

from pktstream.stream import legacy
from pktstream.stream import protocol as P
from pktstream._capture import PacketBatch
from pktstream.exceptions import ConfigError, FrameError
from pktstream.stream.sensor import parse_hostport
from pktstream.sinks.base import Sink, Source
from pktstream.sinks.callback import IteratorSink

log = logging.getLogger("pktstream.stream.receiver")

STATE_FILE = "receiver-state.json"
SENSOR_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


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
    instance: str = ""        # the connected sensor process (its reconnects take over its session)
    last_rx: float = 0.0      # monotonic time of the last frame on the live session
    legacy: bool = False      # a PacketStreamer sensor (stream/legacy.py): nothing is acknowledged
    legacy_open: int = 0      # its open connections


def _numeric_stats(obj: dict[str, Any]) -> dict[str, Any]:
    """A sensor's STATS with only non-negative integer counters (and per-interface dicts of
    them, at most 256): nothing else from the network reaches logs or /metrics."""
    def ints(d: Any) -> dict[str, int]:
        return {str(k)[:64]: v for k, v in d.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0} \
            if isinstance(d, dict) else {}
    out: dict[str, Any] = ints(obj)
    itfs = obj.get("interfaces")
    if isinstance(itfs, dict):
        out["interfaces"] = {str(k)[:64]: ints(v) for k, v in list(itfs.items())[:256]}
    return out


def _loopback(host: str) -> bool:
    """Whether a listening address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cert_names(cert: dict | None) -> set[str]:
    """Common name and subjectAltName DNS/URI entries of a verified peer certificate."""
    if not cert:
        return set()
    names = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    names |= {v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "URI")}
    return names


def check_seq(seq: int) -> None:
    """Refuse sequence numbers no honest sensor makes: they start at its clock in µs and grow by
    one per block, so one more than a day ahead of this receiver's clock is a wrong clock or a
    forged stream (accepting it would make the real sensor's frames look like duplicates)."""
    if seq >= P.MAX_SEQ or seq > time.time_ns() // 1000 + P.SEQ_AHEAD_US:
        raise FrameError(f"sequence number {seq} is more than a day ahead of this receiver's clock "
                         "(the sensor's clock is wrong, or the stream is forged)")


class _Accept(asyncio.Protocol):
    """Holds a new connection paused until Receiver._accept has checked limits and set up TLS
    (no byte is read before the TLS layer takes over)."""

    def __init__(self, receiver: "Receiver") -> None:
        self.receiver = receiver

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()
        self.task = asyncio.ensure_future(self.receiver._accept(transport))


class _SinkRunner:
    """A sink, its bounded queue and its thread."""

    def __init__(self, sink: Sink, receiver: "Receiver", maxsize: int) -> None:
        self.sink = sink
        self.gate = sink.gate
        self.receiver = receiver
        self.queue: queue.Queue = queue.Queue(0 if self.gate else maxsize)
        self.committed = 0
        self.states: collections.deque = collections.deque()  # (index, state) per flush
        self.counters = collections.Counter()
        self.failing = False
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)

    def submit(self, index: int, source: Source, batch: PacketBatch) -> None:
        try:
            self.queue.put_nowait((index, source, batch))
        except queue.Full:  # only non-gating sinks are bounded here
            self.counters["dropped_batches"] += 1
            self.counters["dropped_packets"] += len(batch)

    def _write_group(self, items: list) -> dict[str, Any] | None:
        """Write and flush items; raises on the first failure."""
        for index, source, batch in items:
            self.sink.write(source, batch)
        return self.sink.flush()

    def _write_with_retry(self, items: list) -> tuple[bool, dict[str, Any] | None]:
        """(written, state). A gating output retries every second until it works (nothing is
        acknowledged meanwhile, so the sensors buffer); a best-effort one drops and counts."""
        while True:
            try:
                state = self._write_group(items)
                if self.failing:
                    log.warning("output %s works again", self.sink.name)
                    self.failing = False
                return True, state
            except Exception as exc:
                self.counters["failures"] += 1
                if not self.failing:
                    log.error("output %s failed: %s", self.sink.name, exc)
                self.failing = True
                try:
                    self.sink.reset()  # back to the last flush; the whole group is written again
                except Exception as reset_exc:
                    log.error("output %s: reset failed: %s", self.sink.name, reset_exc)
                if not self.gate or self.receiver._closing.is_set():
                    key = "dropped" if not self.gate else "unwritten_at_shutdown"
                    self.counters[f"{key}_batches"] += len(items)
                    self.counters[f"{key}_packets"] += sum(len(b) for _, _, b in items)
                    return False, None
                time.sleep(1.0)

    def _run(self) -> None:
        done = False
        while not done:
            try:
                items = [self.queue.get(timeout=1.0)]
            except queue.Empty:
                self._idle()
                continue
            while len(items) < 512:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if None in items:
                done = True
                items = [it for it in items if it is not None]
            if not items:
                continue
            ok, state = self._write_with_retry(items)
            if ok:
                self.counters["batches"] += len(items)
                self.counters["packets"] += sum(len(b) for _, _, b in items)
            if ok or not self.gate:
                # a gating output that could not write keeps its items unacknowledged
                self.receiver._from_thread(self._flushed, items[-1][0], state)
        try:
            self.sink.close()
        except Exception as exc:
            log.error("closing output %s failed: %s", self.sink.name, exc)

    def _idle(self) -> None:
        """Nothing to write for a second: let the output do its timed work (rotation)."""
        if self.failing:
            return  # a failing output is being retried by the write path
        try:
            self.sink.tick()
        except Exception as exc:
            self.counters["failures"] += 1
            log.error("output %s: %s", self.sink.name, exc)

    def _flushed(self, index: int, state: dict[str, Any] | None) -> None:
        self.committed = max(self.committed, index)
        if state is not None:
            self.states.append((index, state))
        self.receiver._commit()

    def state_at(self, committed: int) -> dict[str, Any] | None:
        """The newest flushed state whose data is all at or below ``committed`` (another gating
        output may be behind: persisting a later state would keep unacknowledged data)."""
        best = None
        while self.states and self.states[0][0] <= committed:
            best = self.states.popleft()
        if best is not None:
            self.states.appendleft(best)  # still the newest usable one
            return best[1]
        return None


class Receiver:
    """Accept sensors, write what they send to outputs, account for every drop.

    :param listen: ``host:port`` to listen on (port 0 picks a free one; see ``address``).
    :param outputs: sinks (``FileSink``, ``StdoutSink``, ``CallbackSink`` ...).
    :param state_dir: where the last sequence per sensor and open-file sizes are persisted
        (without it a restart cannot tell resent frames from new ones).
    :param auth_key: shared key (PacketStreamer ``auth.key``); ``auth_keys``: sensor id → key.
    :param ssl_context: server TLS context (see docs/SECURITY.md).
    :param max_inflight_bytes: bytes waiting for gating outputs before reading pauses.
    :param packetstreamer: Deepfence PacketStreamer sensors on the same port
        (``stream.legacy.PacketStreamerSettings``; default: accepted, named by address).

    Thread safety: ``start()``, ``stop()``, ``stats()`` and ``batches()`` may be called from
    any thread; ``run()`` blocks.
    """

    def __init__(self, *, listen: str = "0.0.0.0:8081", outputs: list[Sink] | tuple = (),
                 state_dir: str | None = None, auth_key: bytes | str | None = None,
                 auth_keys: dict[str, bytes | str] | None = None, ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = 256, handshake_timeout: float = 10.0, heartbeat: float = 5.0,
                 max_raw_bytes: int = P.DEFAULT_MAX_RAW_BYTES, max_inflight_bytes: int = 64 << 20,
                 sink_queue: int = 256, stats_interval: float = 60.0, metrics: str | None = None,
                 fsync_state: bool = False, connection_rate: tuple[int, float] = (20, 10.0),
                 cert_identity: bool = False, inputs: list | tuple = (),
                 allow_unauthenticated: bool = False,
                 packetstreamer: legacy.PacketStreamerSettings | None = None) -> None:
        # listen=None: no TCP server, only ``inputs`` (e.g. pktstream.stream.kafka.KafkaInput)
        self.listen = parse_hostport(listen) if listen else None
        self.inputs = list(inputs)
        self._commit_hooks: list = []  # fn(committed index), called after state is saved
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
        self.connection_rate = connection_rate  # (connections, per seconds) per peer address
        self.cert_identity = cert_identity      # mTLS: the sensor id must be named in its certificate
        self.allow_unauthenticated = allow_unauthenticated
        # PacketStreamer sensors (stream/legacy.py): on unless settings with enabled=False
        self.packetstreamer = packetstreamer if packetstreamer is not None else legacy.PacketStreamerSettings()
        if self.listen is not None and not self._authenticated() and not _loopback(self.listen[0]) \
                and not allow_unauthenticated:
            raise ConfigError(
                f"refusing to listen on {self.listen[0] or '*'}:{self.listen[1]} without authentication: anyone "
                "who can reach it could write into the outputs. Give a key (--auth-key-file / --auth-keys, "
                "auth.key) or client certificates (--tls-client-certs), listen on 127.0.0.1, or accept the "
                "risk with --allow-unauthenticated")
        self._decoder = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="decode")
        self._state_writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state")
        self._commit_busy = False     # a state write is in flight (commits are serialised)
        self._commit_again = False    # more was committed meanwhile
        self._commit_idle: asyncio.Event | None = None
        self._buckets: dict[str, tuple[float, float]] = {}
        self._log_limit: dict[tuple[str, str], float] = {}
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

    def _authenticated(self) -> bool:
        return bool(self.auth_key or self.auth_keys or (
            self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED))

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

    def _state_snapshot(self, acks: dict[str, int] | None = None, committed: int | None = None) -> dict | None:
        """The state to persist (on the event loop: it reads the live tables): the last
        committed seq per sensor (``acks`` about to be committed) and, per output, the newest
        flushed state that contains nothing beyond ``committed``. None without a state dir."""
        if self._state_path() is None:
            return None
        acks = acks or {}
        return {"sensors": {sid: {"last_seq": max(s.last_committed, acks.get(sid, 0)), "hostname": s.hostname,
                                  "interfaces": {str(k): dict(v) for k, v in s.interfaces.items()}}
                            for sid, s in self._sensors.items()},
                "sinks": {r.sink.name: st for r in self._runners
                          if (st := r.state_at(self._index if committed is None else committed))}}

    def _save_state(self, acks: dict[str, int] | None = None, committed: int | None = None) -> None:
        """Persist the state now (see _state_snapshot)."""
        self._write_state(self._state_snapshot(acks, committed))

    def _write_state(self, state: dict | None) -> None:
        """Write a state snapshot atomically (any thread; the state writer thread in service)."""
        path = self._state_path()
        if path is None or state is None:
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            if self.fsync_state:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync_state:  # the rename itself must survive a power loss
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

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
        self._commit_idle = asyncio.Event()
        self._commit_idle.set()
        self._space = asyncio.Condition()
        self._runners = [_SinkRunner(s, self, self.sink_queue) for s in self.outputs]
        for r in self._runners:
            r.thread.start()
        # Connections are accepted paused; limits are checked, then TLS is started by _accept,
        # so a failed TLS handshake is logged and counted like any other refusal (asyncio's own
        # TLS server drops those silently).
        server = None
        if self.listen is not None:
            server = await self._loop.create_server(lambda: _Accept(self), self.listen[0] or None, self.listen[1])
            self.address = server.sockets[0].getsockname()[:2]
        for inp in self.inputs:
            inp.start(self)
        metrics_server = None
        if self.metrics:
            metrics_server = await asyncio.start_server(self._metrics, *self.metrics)
            self.metrics_address = metrics_server.sockets[0].getsockname()[:2]
        if server is not None:
            log.info("receiver listening on %s:%d%s", *self.address, " (TLS)" if self.ssl_context else "")
        if self.listen is not None and not self._authenticated() and not _loopback(self.listen[0]):
            log.warning("no authentication (auth.key / client certificates): anyone who can reach "
                        "%s:%d can write into the outputs", *self.listen)
        self._ready.set()
        ticker = asyncio.create_task(self._periodic())
        try:
            await self._stop_event.wait()
        finally:
            self._closing.set()
            ticker.cancel()
            for inp in self.inputs:
                inp.stop()
            if server is not None:
                server.close()
            if metrics_server:
                metrics_server.close()
            for s in list(self._sensors.values()):
                if s.writer is not None:
                    s.writer.close()
            for r in self._runners:
                r.sink.interrupt()
                r.queue.put(None)
            for r in self._runners:
                await asyncio.to_thread(r.thread.join)
            await asyncio.sleep(0)  # run the final _flushed callbacks
            while self._commit_busy:  # a state write in flight lands first (a timer may start one)
                await self._commit_idle.wait()
            self._commit(sync=True)
            for r in self._runners:
                r.states.clear()  # the outputs are closed: their files are complete, nothing to repair
            self._save_state()
            for inp in self.inputs:
                await asyncio.to_thread(inp.close)  # commits what the outputs have (input offsets)
            self._decoder.shutdown(wait=False)
            self._state_writer.shutdown(wait=True)
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
        for i, r in enumerate(self._runners):
            # each output gets its own batch object: one releasing it cannot break another
            r.submit(self._index, source, batch if i == 0 else P.sibling(batch))
        if not any(r.gate for r in self._runners):
            self._commit()

    def _commit(self, *, sync: bool = False) -> None:
        """Acknowledge what every gating output has written: persist the state (in the state
        writer thread, off the event loop; one write at a time, later commits coalesce), then
        ACK each sensor's newest committed seq. ``sync``: write on this thread (shutdown)."""
        if self._commit_busy:
            self._commit_again = True
            return
        gating = [r.committed for r in self._runners if r.gate]
        committed = min(gating) if gating else self._index
        acks: dict[str, int] = {}
        freed = n = 0
        for index, sid, seq, nbytes in self._pending:
            if index > committed:
                break
            acks[sid] = max(acks.get(sid, 0), seq)
            freed += nbytes
            n += 1
        if not acks:
            self._run_commit_hooks(committed)
            return
        snapshot = self._state_snapshot(acks, committed)
        if snapshot is None or sync:
            try:
                self._write_state(snapshot)
            except OSError as exc:
                self._state_failed(exc)
                return
            self._acknowledge(acks, n, freed, committed)
            return
        self._commit_busy = True
        if self._commit_idle is not None:
            self._commit_idle.clear()
        fut = self._loop.run_in_executor(self._state_writer, self._write_state, snapshot)
        fut.add_done_callback(functools.partial(self._state_written, acks, n, freed, committed))

    def _state_written(self, acks: dict[str, int], n: int, freed: int, committed: int, fut) -> None:
        self._commit_busy = False
        exc = fut.exception()
        if exc is not None:
            self._state_failed(exc)
        else:
            self._acknowledge(acks, n, freed, committed)
        if self._commit_again and not self._commit_busy:
            self._commit_again = False
            self._commit()
        if not self._commit_busy and self._commit_idle is not None:
            self._commit_idle.set()

    def _state_failed(self, exc: BaseException) -> None:
        # nothing is acknowledged: the same entries are committed again on the next flush
        self.counters["state_write_failures"] += 1
        log.error("cannot save the receiver state (%s): not acknowledging; retrying", exc)
        self._loop.call_later(1.0, self._commit)

    def _acknowledge(self, acks: dict[str, int], n: int, freed: int, committed: int) -> None:
        for _ in range(n):
            self._pending.popleft()
        for sid, seq in acks.items():
            s = self._sensors[sid]
            s.last_committed = max(s.last_committed, seq)
        for sid in acks:
            s = self._sensors[sid]
            if s.writer is not None and not s.writer.is_closing():
                s.writer.write(P.encode(P.FrameType.ACK, seq=s.last_committed))
            if s.bye is not None and s.last_committed >= s.last_accepted:
                s.bye.set()
        self._inflight -= freed
        self._run_commit_hooks(committed)
        asyncio.ensure_future(self._notify_space())

    def _run_commit_hooks(self, committed: int) -> None:
        for hook in self._commit_hooks:
            hook(committed)

    async def _notify_space(self) -> None:
        async with self._space:
            self._space.notify_all()

    # -- one connection ----------------------------------------------------------------------
    def _key_for(self, sensor_id: str) -> bytes | None:
        if self.auth_keys:
            return self.auth_keys.get(sensor_id)
        return self.auth_key

    def _allow_connection(self, host: str) -> bool:
        """Token bucket per peer address: ``connection_rate`` = (burst, seconds to refill it)."""
        burst, period = self.connection_rate
        now = time.monotonic()
        tokens, last = self._buckets.get(host, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * burst / period)
        if len(self._buckets) > 10000:  # bound the table itself
            self._buckets.clear()
        if tokens < 1.0:
            self._buckets[host] = (tokens, now)
            return False
        self._buckets[host] = (tokens - 1.0, now)
        return True

    def _warn(self, kind: str, peer_host: str, msg: str, *args: Any) -> None:
        """Log a peer's failure at most once per 10 s per (kind, address); counters count all."""
        now = time.monotonic()
        key = (kind, peer_host)
        if now - self._log_limit.get(key, -1e9) >= 10.0:
            if len(self._log_limit) > 10000:
                self._log_limit.clear()
            self._log_limit[key] = now
            log.warning(msg, *args)

    async def _accept(self, transport: asyncio.BaseTransport) -> None:
        """Limits, then TLS, then the stream reader/writer pair for _handle."""
        peername = transport.get_extra_info("peername") or ("?", 0)
        host = str(peername[0])
        peer = "%s:%s" % tuple(peername[:2])
        if self._connections >= self.max_connections:
            self.counters["rejected_connections"] += 1
            self._warn("max", host, "%s: refused, %d connections already (maxConnections)", peer, self._connections)
            transport.close()
            return
        if not self._allow_connection(host):
            self.counters["rate_limited_connections"] += 1
            self._warn("rate", host, "%s: refused, more than %d connections in %.0f s from this address",
                       peer, *self.connection_rate)
            transport.close()
            return
        self._connections += 1
        try:
            reader = asyncio.StreamReader(limit=1 << 20)
            protocol = asyncio.StreamReaderProtocol(reader)
            if self.ssl_context is not None:
                try:
                    transport = await self._loop.start_tls(transport, protocol, self.ssl_context, server_side=True,
                                                           ssl_handshake_timeout=self.handshake_timeout)
                except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
                    self.counters["tls_failures"] += 1
                    self._warn("tls", host, "%s: TLS handshake failed: %s", peer,
                               exc or "timeout (peer silent or not speaking TLS)")
                    transport.close()
                    return
            else:
                transport.set_protocol(protocol)
            protocol.connection_made(transport)
            if self.ssl_context is None:
                transport.resume_reading()
            writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
            await self._handle(reader, writer, host, peer)
        finally:
            self._connections -= 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                      peer: str) -> None:
        sensor: _SensorState | None = None
        try:
            # legacy hook: a PacketStreamer sensor (first bytes DE EF EC E0) is served by stream/legacy.py
            reader = await legacy.intake(self, reader, writer, host, peer)
            if reader is None:
                return
            sensor = await asyncio.wait_for(self._handshake(reader, writer, peer), self.handshake_timeout)
            await self._session(sensor, reader, writer)
        except asyncio.TimeoutError:
            self.counters["timeouts"] += 1
            self._warn("timeout", host, "%s: %s timed out", peer, "session" if sensor else "handshake")
        except FrameError as exc:
            self.counters["protocol_errors"] += 1
            self._warn("protocol", host, "%s: closing: %s", peer, exc)
            self._send_error(writer, str(exc))
        except PermissionError as exc:
            self.counters["auth_failures"] += 1
            self._warn("auth", host, "%s: refused: %s", peer, exc)
            if "refused this receiver" not in str(exc):
                self._send_error(writer, str(exc))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            if sensor is None:
                self.counters["aborted_handshakes"] += 1
            log.info("%s: connection closed (%s)", peer, type(exc).__name__)
        finally:
            if sensor is not None and sensor.writer is writer:
                sensor.writer = None
                log.info("sensor %s (%s) disconnected", sensor.sensor_id, peer)
            writer.close()

    def _send_error(self, writer: asyncio.StreamWriter, reason: str) -> None:
        if not writer.is_closing():
            writer.write(P.encode_json(P.FrameType.ERROR, {"reason": reason[:500]}))

    @staticmethod
    def check_interface(d: Any) -> dict[str, Any]:
        """An interface descriptor from a sensor, checked (index, link type, snaplen, name)."""
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
        if not isinstance(sid, str) or not SENSOR_ID.match(sid):
            raise FrameError("bad sensor_id (1-128 printable ASCII characters)")
        snonce = P.parse_nonce(h.get("nonce"))
        ifaces = h.get("interfaces")
        if not isinstance(ifaces, list) or len(ifaces) > 4096:
            raise FrameError("bad interface list")
        descs = [self.check_interface(d) for d in ifaces]
        if self.cert_identity:
            names = _cert_names(writer.get_extra_info("peercert"))
            if sid not in names:
                raise PermissionError(f"sensor id {sid!r} is not named in its client certificate {sorted(names)}")
        key = self._key_for(sid)
        if self.auth_keys and key is None:
            raise PermissionError(f"authentication failed: sensor {sid!r} has no key here (revoked or unknown)")
        if key is not None and h.get("auth") is False:
            raise PermissionError(f"authentication failed: sensor {sid!r} has no key, and this receiver "
                                  "requires one (give the sensor --auth-key-file)")
        rnonce = P.new_nonce()
        writer.write(P.encode_json(P.FrameType.CHALLENGE, {
            "nonce": rnonce.hex(), "auth": key is not None,
            "proof": P.proof(key, "receiver", snonce, rnonce, sid) if key else ""}))
        await writer.drain()
        auth = await P.read_frame(reader, max_payload=0, max_raw=0)
        if auth.type == P.FrameType.ERROR:  # the sensor refused us (keys differ, no key ...)
            raise PermissionError(f"authentication failed: sensor {sid!r} refused this receiver: "
                                  f"{str(auth.json().get('reason'))[:200]}")
        if auth.type != P.FrameType.AUTH:
            raise FrameError(f"expected AUTH, got {auth.type.name}")
        if key is not None and not P.check_proof(P.proof(key, "sensor", rnonce, snonce, sid),
                                                 auth.json().get("proof")):
            raise PermissionError(f"authentication failed: sensor {sid!r} used another key (wrong key)")
        instance = h.get("instance")
        instance = instance[:64] if isinstance(instance, str) else ""
        sensor = self._sensors.get(sid)
        if sensor is None:
            sensor = self._sensors[sid] = _SensorState(sid)
        if sensor.writer is not None:
            # alive: heard from recently and not saying goodbye (a BYE session is only
            # waiting for its outputs; the sensor that sent it may be restarting)
            live = time.monotonic() - sensor.last_rx <= 2 * self.heartbeat + 1 and sensor.bye is None
            if live and not (instance and instance == sensor.instance):
                # another process with the same id while the first one is alive: two hosts would
                # interleave one stream; the first keeps it, the second is told why
                self.counters["duplicate_id_refusals"] += 1
                sensor.counters["duplicate_id_refusals"] += 1
                raise PermissionError(f"sensor id {sid!r} is already connected from {sensor.peer} (host "
                                      f"{sensor.hostname!r}): two sensors with one id? give each its own "
                                      "--sensor-id")
            log.warning("sensor %s reconnected from %s: closing its old connection from %s", sid, peer, sensor.peer)
            sensor.writer.close()
        sensor.instance = instance
        sensor.last_rx = time.monotonic()
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
            sensor.last_rx = time.monotonic()
            t = frame.type
            if t == P.FrameType.DATA:
                await self._data(sensor, frame)
            elif t == P.FrameType.HEARTBEAT:
                writer.write(P.encode(P.FrameType.HEARTBEAT))
                await asyncio.wait_for(writer.drain(), idle)  # a peer that never reads is cut off
            elif t == P.FrameType.STATS:
                sensor.reported = _numeric_stats(frame.json())
                c["stats_frames"] += 1
            elif t == P.FrameType.HELLO:  # an interface that appeared later
                d = self.check_interface(frame.json().get("interface"))
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
        iface = sensor.interfaces.get(frame.iface)
        if iface is None:
            raise FrameError(f"DATA for unknown interface index {frame.iface}")
        if not await self.ingest(sensor, frame, iface, wire_bytes=len(frame.payload) + P.HEADER_LEN) \
                and frame.seq <= sensor.last_committed and sensor.writer is not None:
            sensor.writer.write(P.encode(P.FrameType.ACK, seq=sensor.last_committed))

    def sensor_state(self, sensor_id: str) -> _SensorState:
        """The per-sensor table entry (created on first use). Event-loop thread only."""
        sensor = self._sensors.get(sensor_id)
        if sensor is None:
            sensor = self._sensors[sensor_id] = _SensorState(sensor_id)
        return sensor

    async def ingest(self, sensor: _SensorState, frame: P.Frame, iface: dict[str, Any], *, wire_bytes: int) -> bool:
        """One DATA frame from any transport (TCP session, Kafka input): drop it if already
        accepted (same sensor, seq not above the last accepted), refuse an impossible seq,
        decompress and validate (bounded), count, hand to the outputs. Returns False for a
        duplicate; raises FrameError for a bad frame. Event-loop thread only."""
        c = sensor.counters
        if frame.seq <= sensor.last_accepted:
            c["duplicate_frames"] += 1
            c["duplicate_packets"] += frame.count
            return False
        check_seq(frame.seq)
        decode = functools.partial(P.decode_data, frame, link_type=iface["link_type"], snaplen=iface["snaplen"],
                                   interface=f"{sensor.sensor_id}/{iface['name']}", max_raw=self.max_raw)
        # large blocks are decompressed and validated off the event loop (zstd releases the
        # GIL); small ones cost less than the hand-over
        batch = await self._loop.run_in_executor(self._decoder, decode) if len(frame.payload) > 65536 \
            else decode()
        if frame.seq <= sensor.last_accepted:  # accepted from another session meanwhile
            batch.release()
            c["duplicate_frames"] += 1
            c["duplicate_packets"] += frame.count
            return False
        source = Source(sensor.sensor_id, sensor.hostname, iface["name"], iface["link_type"], iface["snaplen"],
                        seq=frame.seq)
        sensor.last_accepted = frame.seq
        c["frames"] += 1
        c["packets"] += frame.count
        c["raw_bytes"] += frame.raw_len
        c["wire_bytes"] += wire_bytes
        await self._dispatch(sensor, frame.seq, source, batch)
        return True

    @property
    def index(self) -> int:
        """How many batches were handed to the outputs so far (commit hooks get such indexes)."""
        return self._index

    def add_commit_hook(self, hook) -> None:
        """``hook(index)`` runs on the event loop after every commit: everything up to ``index``
        is written by all gating outputs and the state is saved."""
        self._commit_hooks.append(hook)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop serving this receiver (None before run())."""
        return self._loop

    @property
    def closing(self) -> bool:
        """Whether stop() has begun."""
        return self._closing.is_set()

    # -- counters ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-sensor counters (received, duplicates, and every drop counter the sensor
        reported), per-output counters, and connection-level rejections."""
        sensors = {}
        for sid, s in list(self._sensors.items()):
            c, r = s.counters, s.reported
            sensors[sid] = {
                "hostname": s.hostname, "connected": s.writer is not None or s.legacy_open > 0, "peer": s.peer,
                "legacy": "unacknowledged" if s.legacy else None,
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
                "inputs": [inp.stats() for inp in self.inputs],
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
        lines.append("# TYPE pktstream_sensor_legacy gauge")  # 1: PacketStreamer, unacknowledged
        for sid, s in st["sensors"].items():
            lines.append(f'pktstream_sensor_legacy{{sensor="{esc(sid)}"}} {int(bool(s["legacy"]))}')
        lines.append("# TYPE pktstream_sensor_connected gauge")
        for sid, s in st["sensors"].items():
            lines.append(f'pktstream_sensor_connected{{sensor="{esc(sid)}"}} {int(s["connected"])}')
        for key in ("packets", "dropped_packets", "failures"):
            lines.append(f"# TYPE pktstream_output_{key} counter")
            for name, o in st["outputs"].items():
                lines.append(f'pktstream_output_{key}{{output="{esc(name)}"}} {o.get(key, 0)}')
        lines.append("# TYPE pktstream_receiver_connections gauge")
        lines.append(f"pktstream_receiver_connections {st['connections']}")
        for key in ("protocol_errors", "auth_failures", "tls_failures", "timeouts", "rejected_connections",
                    "rate_limited_connections", "aborted_handshakes"):
            lines.append(f"# TYPE pktstream_receiver_{key} counter")
            lines.append(f"pktstream_receiver_{key} {st.get(key, 0)}")
        return "\n".join(lines) + "\n"
