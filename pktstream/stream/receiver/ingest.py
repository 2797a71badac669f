"""Ingest and commit: the one path every frame takes inside a receiver, whatever carried it
(a TCP session, the Kafka input, a PacketStreamer session).

validate (bounded decompress, seq check) → drop duplicates by (sensor id, seq) → count → hand a
batch to every output → once every *gating* output has written and flushed it, persist the state
(last seq per sensor, open files and their committed sizes) and acknowledge (ACK frames, commit
hooks). While too many bytes wait for the gating outputs, ``ingest()`` waits, and so do the
sessions calling it: backpressure reaches the sensors.

Lifetime: one :class:`Ingest` per receiver run. Thread-safety: event-loop thread only, except
where a method says otherwise.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pktstream._capture import PacketBatch
from pktstream.exceptions import ConfigError, FrameError
from pktstream.formats._common import fsync_dir
from pktstream.sinks.base import Sink, Source
from pktstream.stream import protocol as P
from pktstream.stream.receiver.outputs import Outputs

log = logging.getLogger("pktstream.stream.receiver")

STATE_FILE = "receiver-state.json"
STATE_RETRY_S = 1.0        # a failed save of the state is tried again this often (one timer at a time)
STATE_ERROR_LOG_S = 60.0   # the same failure is logged again at most this often
SENSOR_ID = P.SENSOR_ID  # (re-exported: the receiver's checks)
KAFKA_SILENT_S = 30.0      # a Kafka sensor with no message for this long is shown not connected
MAX_INSTANCES = 8          # sensor processes remembered per sensor id (SensorState.instances)


@dataclass
class SensorState:
    """What the receiver knows about one sensor id: its interfaces, the last accepted and last
    committed seq, counters, what it reported (STATS), and its live session's writer (None when
    not connected). Event-loop thread only."""
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
    legacy: bool = False      # a PacketStreamer sensor: no seq, no ACK, no loss counts
    # Kafka: the sensor processes whose blocks were accepted (header ``instance``) -> the highest
    # seq accepted from each, the 8 most recent (kept in the state file)
    instances: dict[str, int] = field(default_factory=dict)
    # Kafka: (topic, partition, offset) of the newest message of this sensor handled (kept in
    # the state file; may be ahead of what is committed: it only tells a block read again from a
    # second process's, never decides what is written)
    position: tuple[str, int, int] | None = None
    # Kafka: monotonic time of its last message on a partition assigned here (connected while
    # recent); None: its partition is another receiver's (or none was read yet since the start)
    kafka_rx: float | None = None

    def accepted_from(self, instance: str, seq: int) -> None:
        """Record that ``instance`` (a sensor process) had block ``seq`` accepted."""
        self.instances.pop(instance, None)
        self.instances[instance] = seq
        while len(self.instances) > MAX_INSTANCES:
            del self.instances[next(iter(self.instances))]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc <malloc.h>


def tune_malloc(keep_bytes: int) -> bool:
    """glibc: take allocations up to 4 MiB (decompressed blocks, pcapng conversions) from the
    heap and keep up to ``keep_bytes`` freed bytes for reuse (``mallopt``; process-wide). Returns
    whether malloc was tuned (not with ``keep_bytes`` 0 or another C library)."""
    if keep_bytes <= 0:
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):
        return False
    import ctypes
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, min(keep_bytes, 0x7FFFFFFF)) == 1 and ok


def check_seq(seq: int) -> None:
    """Refuse sequence numbers no honest sensor makes: they start at its clock in µs and grow by
    one per block, so one more than a day ahead of this receiver's clock is a wrong clock or a
    forged stream (accepting it would make the real sensor's frames look like duplicates)."""
    if seq >= P.MAX_SEQ or seq > time.time_ns() // 1000 + P.SEQ_AHEAD_US:
        raise FrameError(f"sequence number {seq} is more than a day ahead of this receiver's clock "
                         "(the sensor's clock is wrong, or the stream is forged)")


def check_interface(d: Any) -> dict[str, Any]:
    """An interface descriptor from a sensor, checked (index, link type, snaplen, name)."""
    if not isinstance(d, dict):
        raise FrameError("interface descriptor is not an object")
    out: dict[str, Any] = {}
    for key, lo, hi in (("index", 0, 1 << 20), ("link_type", 0, 1 << 16), ("snaplen", 1, 1 << 18)):
        v = d.get(key)
        if not isinstance(v, int) or not lo <= v <= hi:
            raise FrameError(f"interface descriptor: bad {key} {v!r}")
        out[key] = v
    name = d.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise FrameError("interface descriptor: bad name")
    out["name"] = P.printable(name)
    return out


def numeric_stats(obj: dict[str, Any]) -> dict[str, Any]:
    """A sensor's STATS with only 64-bit non-negative integer counters (and per-interface dicts
    of them, at most 256): nothing else from the network reaches logs or /metrics (a 400-digit
    number made every scrape fail)."""
    def ints(d: Any) -> dict[str, int]:
        return {str(k)[:64]: v for k, v in d.items()
                if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64} \
            if isinstance(d, dict) else {}
    out: dict[str, Any] = ints(obj)
    itfs = obj.get("interfaces")
    if isinstance(itfs, dict):
        out["interfaces"] = {str(k)[:64]: ints(v) for k, v in list(itfs.items())[:256]}
    return out


#: ACK bytes a sensor may leave unread before its connection is cut off: a sensor reads ACKs as
#: they come, and the receiver's memory would otherwise grow with what a peer never reads
ACK_BACKLOG_BYTES = 1 << 20


def send_ack(sensor: SensorState, counters: collections.Counter) -> None:
    """Acknowledge ``sensor.last_committed`` on its connection (the event loop's thread); a
    peer with more than ``ACK_BACKLOG_BYTES`` unread is cut off (counted in ``timeouts``)."""
    w = sensor.writer
    if w is None or w.is_closing():
        return
    w.write(P.encode(P.FrameType.ACK, seq=sensor.last_committed))
    queued = w.transport.get_write_buffer_size()
    if queued > ACK_BACKLOG_BYTES:
        counters["timeouts"] += 1
        log.warning("sensor %s (%s): closing: it leaves its acknowledgements unread (%d bytes queued)",
                    sensor.sensor_id, sensor.peer, queued)
        w.transport.abort()


class StateFile:
    """``<state dir>/receiver-state.json``: the last committed seq per sensor and each output's
    newest flushed state, written atomically (any thread; one writer at a time). The directory
    must be writable at start (:class:`~pktstream.exceptions.ConfigError` otherwise); removed
    while the receiver runs, it is made again by the next write (every state written is whole)
    -- only itself, in its parent, and only on the filesystem it was on at start: a save never
    goes to another (the state's volume unmounted: a later start would find the old state)."""

    def __init__(self, state_dir: str | None, *, fsync: bool = False) -> None:
        self.path = os.path.join(state_dir, STATE_FILE) if state_dir else None
        self.fsync = fsync
        if state_dir:
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
                # (as root, permissions never refuse: only a write tells a read-only mount)
                probe = os.path.join(state_dir, f".{STATE_FILE}.{os.getpid()}-{secrets.token_hex(4)}.probe")
                with open(probe, "w"):
                    pass
                os.unlink(probe)
                self._dev = os.stat(state_dir).st_dev
            except OSError as exc:
                raise ConfigError(f"cannot write the receiver state directory {state_dir}: "
                                  f"{(exc.strerror or str(exc)).lower()}") from None

    def load(self) -> dict[str, Any]:
        if self.path is None or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"receiver state {self.path} is unreadable ({exc}); move it away to start fresh") from None

    def write(self, state: dict | None) -> None:
        """Save ``state`` atomically; an OSError names the state file (nothing else changes)."""
        if self.path is None or state is None:
            return
        d = os.path.dirname(self.path)
        try:
            try:
                dev = os.stat(d).st_dev
            except FileNotFoundError:
                os.mkdir(d, 0o700)  # (only the directory itself: its parent must be there)
                dev = os.stat(d).st_dev
                if dev != self._dev:
                    os.rmdir(d)
                else:
                    if self.fsync:
                        fsync_dir(os.path.dirname(d))
                    log.warning("state: the directory %s was removed: made again", d)
            if dev != self._dev:
                raise OSError(errno.EXDEV, f"{d} is not on the filesystem it was on at start (unmounted?)")
            self._write(state)
        except OSError as exc:
            msg = f"cannot save the receiver state {self.path}: {exc.strerror.lower() if exc.strerror else exc}"
            raise (OSError(exc.errno, msg) if exc.errno is not None else OSError(msg)) from exc

    def _write(self, state: dict) -> None:
        assert self.path is not None
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):  # (a disk full leaves no empty temporary behind)
                os.unlink(tmp)
            raise
        if self.fsync:  # the rename itself must survive a power loss
            fsync_dir(os.path.dirname(self.path))


class Ingest:
    """The sensor table, the ingest path and the commit path of one receiver.

    :param outputs: the sinks (their runner threads are owned by :class:`Outputs`).
    :param counters: the receiver-level counters (shared with the server).
    :param closing: set when the receiver stops (waiting ingests give up waiting for space).
    """

    def __init__(self, sinks: list[Sink], *, counters: collections.Counter, closing: threading.Event,
                 state_dir: str | None = None, fsync_state: bool = False, max_raw_bytes: int = P.DEFAULT_MAX_RAW_BYTES,
                 max_inflight_bytes: int = 64 << 20, sink_queue: int = 256) -> None:
        self.sinks = sinks
        self.counters = counters
        self.closing = closing
        self.max_raw = max_raw_bytes
        self.max_inflight = max_inflight_bytes
        self.sink_queue = sink_queue
        self.state = StateFile(state_dir, fsync=fsync_state)
        self.sensors: dict[str, SensorState] = {}
        self._outputs: Outputs | None = None
        self.index = 0                 # batches handed to the outputs so far
        self.inflight = 0              # their bytes not yet committed
        self._pending: collections.deque = collections.deque()  # (index, sensor_id, seq, nbytes)
        self._commit_hooks: list[Callable[[int], None]] = []
        self._decoder = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="decode")
        self._state_writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state")
        self._finished = False         # finish() made its last commit: no more
        self._commit_busy = False      # a state write is in flight (commits are serialised)
        self._commit_again = False     # more was committed meanwhile
        self._commit_idle = asyncio.Event()   # (asyncio primitives bind to the loop on first use)
        # a failed save of the state: its error (until a save succeeds), the one retry timer,
        # failures since the last save, when the failure was last logged
        self._unsaved: BaseException | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._failures = 0
        self._failure_logged = 0.0
        # set by finish() when the state could not be saved at the stop: the error line
        # (the receiver's exit status says so to service managers)
        self.unsaved_at_stop: str | None = None
        self._commit_idle.set()
        self._space = asyncio.Condition()
        self._space_waiters = 0        # dispatches waiting for space (no notify task without them)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load()
        for sink in sinks:  # after recovery: gating outputs may now hold files back until acknowledged
            if sink.gate:    # (a best-effort one is not waited for: nothing it holds is resent)
                sink.use_acknowledgements()

    def _load(self) -> None:
        state = self.state.load()
        kept_id = state.get("id")  # (a random id, kept with the state: part of the outputs' owner below)
        self.state_id = kept_id if isinstance(kept_id, str) and kept_id else secrets.token_hex(8)
        for sid, s in state.get("sensors", {}).items():
            st = self.sensors[sid] = SensorState(sid, hostname=s.get("hostname", ""))
            st.last_accepted = st.last_committed = int(s.get("last_seq", 0))
            st.interfaces = {int(k): v for k, v in s.get("interfaces", {}).items()}
            pos = s.get("kafka_position")
            if (isinstance(pos, list) and len(pos) == 3 and isinstance(pos[0], str)
                    and type(pos[1]) is int and type(pos[2]) is int):
                st.position = (pos[0], pos[1], pos[2])
            inst = s.get("instances")
            if isinstance(inst, dict):
                for k, v in list(inst.items())[-MAX_INSTANCES:]:
                    if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool):
                        st.instances[k[:64]] = v
        by_name = {s.name: s for s in self.sinks}
        recovered: dict[str, Any] = {}

        def persist(name: str, sink_state: dict[str, Any]) -> None:
            """Before anything else runs (file by file): a crash now, or a failure in the next
            file's recovery, must not recover from the old sizes."""
            recovered[name] = sink_state
            self.state.write({**state, "sinks": {**state["sinks"], **recovered}})
        for name, sink_state in state.get("sinks", {}).items():
            sink = by_name.get(name)
            if sink is not None and sink_state:
                after = type(sink).recover(sink_state, functools.partial(persist, name))
                if after is not None and after != recovered.get(name, sink_state):
                    persist(name, after)
                sink.resume(after if after is not None else recovered.get(name, sink_state))
        # the state's owner: its file and a random id kept in it (two receivers' state files of
        # the same path -- failover partners on two hosts -- are told apart in a shared directory)
        owner = None if self.state.path is None else f"{os.path.realpath(self.state.path)}#{self.state_id}"
        # (a state without an id was written by a version that named it by its file only: the
        # markers that run left are this receiver's)
        earlier = None if self.state.path is None or kept_id else os.path.realpath(self.state.path)
        for sink in self.sinks:
            sink.set_owner(owner)
        for sink in self.sinks:
            # files of outputs no persisted state named (a sensor first seen after the last
            # acknowledged flush): only what the sensors resend. Without a state dir nothing
            # is resent exactly once: no markers; an earlier run's are discarded (files kept)
            if sink.gate:
                sink.recover_unacknowledged(recovered.get(sink.name, state.get("sinks", {}).get(sink.name)), owner,
                                            earlier_owner=earlier)
        if self.state.path is not None and kept_id != self.state_id:
            # saved before any output writes, and only after the recovery above: a start that
            # dies before it ends finds the state as it was (its markers still this receiver's)
            self.state.write({"sensors": {}, **state, "sinks": {**state.get("sinks", {}), **recovered},
                              "id": self.state_id})
        if state:
            log.info("state: resuming %d sensors from %s", len(self.sensors), self.state.path)

    # -- lifecycle (the receiver's event loop) ---------------------------------------------------
    def start(self) -> None:
        """Start the output threads (in the receiver's event loop)."""
        self._loop = asyncio.get_running_loop()
        self._outputs = Outputs(self.sinks, maxsize=self.sink_queue, closing=self.closing,
                               on_flushed=self._flushed_from_thread)
        self.outputs.start()

    async def finish(self) -> None:
        """At shutdown, after the sessions and inputs stopped: drain the outputs, commit and
        persist the state (acknowledging what they wrote), then close them (files completed,
        S3 uploads of what is now acknowledged) and persist the final state."""
        await self.outputs.drain()
        await asyncio.sleep(0)  # run the final flushed callbacks
        while self._commit_busy:  # a state write in flight lands first (a timer may start one)
            await self._commit_idle.wait()
        self.commit(sync=True)
        # nothing is committed after this one: a retry of a failed one would run after outputs
        # closed and forgot their states, acknowledging data that no saved state describes
        self._finished = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        await self.outputs.close()  # (an output closed without error forgets its open files: complete)
        if self._unsaved is not None:
            # the files just completed hold what was not acknowledged: a state saved now (their
            # outputs forgotten, the sensors' last seqs as before) would have the next start
            # keep them whole while the sensors resend it -- packets twice. The state saved
            # last still names them: the next start cuts them back to it
            self.unsaved_at_stop = (f"receiver state not saved at stop ({_state_error(self._unsaved)}): "
                                    f"{len(self._pending)} frames not acknowledged; the next start recovers the "
                                    "files from the state saved last and the sensors send them again")
            log.error("%s", self.unsaved_at_stop)
            return
        try:
            self.state.write(self._snapshot())
        except OSError as exc:  # (the state saved by the commit above describes the files: recovery completes them)
            self.counters["state_write_failures"] += 1
            self.unsaved_at_stop = f"{_state_error(exc)} (at stop: the next start recovers from the state saved last)"
            log.error("%s", self.unsaved_at_stop)

    def shutdown(self) -> None:
        """Last step of a receiver's stop, after its inputs closed (they may still ingest)."""
        self._decoder.shutdown(wait=False)
        self._state_writer.shutdown(wait=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The receiver's event loop (after start())."""
        assert self._loop is not None, "Ingest.start() has not run"
        return self._loop

    @property
    def outputs(self) -> Outputs:
        """The output runners (after start())."""
        assert self._outputs is not None, "Ingest.start() has not run"
        return self._outputs

    def output_stats(self) -> dict[str, dict[str, Any]]:
        """Per-output counters ({} before start; any thread)."""
        return self._outputs.stats() if self._outputs is not None else {}

    # -- the ingest API (TCP sessions, the Kafka input, PacketStreamer sessions) -----------------
    def sensor_state(self, sensor_id: str) -> SensorState:
        """The per-sensor table entry (created on first use)."""
        sensor = self.sensors.get(sensor_id)
        if sensor is None:
            sensor = self.sensors[sensor_id] = SensorState(sensor_id)
        return sensor

    async def ingest(self, sensor: SensorState, frame: P.Frame, iface: dict[str, Any] | None, *,
                     wire_bytes: int, acknowledged: bool = True) -> bool:
        """One DATA frame from any transport: drop it if already accepted (same sensor, seq not
        above the last accepted), refuse an impossible seq, decompress and validate (bounded),
        count, hand to the outputs. Returns False for a duplicate; raises FrameError for an
        impossible seq (the session is not to be trusted). A frame whose content is bad (``iface``
        None: an interface the sensor never announced) is rejected: see :meth:`reject`
        (``acknowledged``: whether the sender waits for an ACK of it)."""
        c = sensor.counters
        if frame.seq <= sensor.last_accepted:
            return self._duplicate(sensor, frame)
        check_seq(frame.seq)
        if iface is None:
            return await self.reject(sensor, frame, f"DATA for unknown interface index {frame.iface}",
                                     acknowledged=acknowledged)
        decode = functools.partial(P.decode_data, frame, link_type=iface["link_type"], snaplen=iface["snaplen"],
                                   interface=f"{sensor.sensor_id}/{iface['name']}", max_raw=self.max_raw)
        # large blocks are decompressed and validated off the event loop (zstd releases the
        # GIL); small ones cost less than the hand-over
        batch: PacketBatch | None = None
        why = ""
        try:
            batch = await self.loop.run_in_executor(self._decoder, decode) if len(frame.payload) > 65536 \
                else decode()
        except FrameError as exc:
            why = str(exc)
        if frame.seq <= sensor.last_accepted:  # accepted from another session meanwhile
            if batch is not None:
                batch.release()
            return self._duplicate(sensor, frame)
        if batch is None:
            return await self.reject(sensor, frame, why, acknowledged=acknowledged)
        source = Source(sensor.sensor_id, sensor.hostname, iface["name"], iface["link_type"], iface["snaplen"],
                        seq=frame.seq)
        sensor.last_accepted = frame.seq
        c["frames"] += 1
        c["packets"] += frame.count
        c["raw_bytes"] += frame.raw_len
        c["wire_bytes"] += wire_bytes
        await self.dispatch(sensor, frame.seq, source, batch)
        return True

    @staticmethod
    def _duplicate(sensor: SensorState, frame: P.Frame) -> bool:
        """A frame at or below the last accepted seq: counted and dropped (returns False)."""
        sensor.counters["duplicate_frames"] += 1
        sensor.counters["duplicate_packets"] += frame.count
        return False

    async def reject(self, sensor: SensorState, frame: P.Frame, why: str, *, acknowledged: bool = True) -> bool:
        """A well-framed DATA frame whose content cannot be written (corrupt or oversized zstd,
        records that do not validate, an interface index with no descriptor): its packets are
        counted as rejected (``rejected_frames``/``rejected_packets`` per sensor, logged) and its
        seq is acknowledged in order with the frames before it. Closing the session instead
        would have the sensor resend the same frame after every reconnect and deliver nothing
        behind it (e.g. a spooled frame longer than the snap length a restarted sensor announces).
        ``acknowledged=False`` (Kafka: no sensor waits for an ACK) leaves the sensor's last
        accepted seq as it was: one bad message (a foreign or forged one, with a seq far ahead)
        must not turn every later block of that sensor into a "duplicate" (the Kafka input moves
        it itself for a rejected block that continues a known process's blocks). Event-loop thread."""
        c = sensor.counters
        c["rejected_frames"] += 1
        c["rejected_packets"] += frame.count
        n = c["rejected_frames"]
        if n <= 10 or n % 1000 == 0:  # (bounded logging: a broken sensor may send many)
            log.error("sensor %s: DATA seq %d rejected, %d packets lost (%d frames rejected so far): %s",
                      sensor.sensor_id, frame.seq, frame.count, n, why)
        if not acknowledged:
            return True
        sensor.last_accepted = frame.seq
        await self._wait_for_space()  # (behind frames queued for space: acknowledged after them)
        self._pending.append((self.index, sensor.sensor_id, frame.seq, 0))  # acknowledged after what came before
        self.commit()  # (now, if everything before it is committed: an idle receiver flushes nothing)
        return True

    async def dispatch(self, sensor: SensorState, seq: int, source: Source, batch: PacketBatch) -> None:
        """Hand a validated batch to every output (waits while too many bytes are in flight).
        ``seq`` is what gets acknowledged to ``sensor`` once it is committed."""
        nbytes = batch.nbytes
        await self._wait_for_space()
        self.index += 1
        self.inflight += nbytes
        self._pending.append((self.index, sensor.sensor_id, seq, nbytes))
        self.outputs.submit(self.index, source, batch)
        if not self.outputs.gating:
            self.commit()

    async def _wait_for_space(self) -> None:
        """While too many bytes are in flight (or others are queued first, to keep the order):
        wait for a commit to free space."""
        if self._space_waiters or (self.inflight >= self.max_inflight and not self.closing.is_set()):
            self._space_waiters += 1
            try:
                async with self._space:
                    await self._space.wait_for(lambda: self.inflight < self.max_inflight or self.closing.is_set())
            finally:
                self._space_waiters -= 1

    def add_commit_hook(self, hook: Callable[[int], None]) -> None:
        """``hook(index)`` runs on the event loop after every commit: everything up to ``index``
        is written by all gating outputs and the state is saved."""
        self._commit_hooks.append(hook)

    # -- commit path -----------------------------------------------------------------------------
    def _flushed_from_thread(self, runner: Any, index: int, state: dict[str, Any] | None) -> None:
        """An output thread flushed up to ``index`` (any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._flushed, runner, index, state)
            except RuntimeError:
                pass

    def _flushed(self, runner: Any, index: int, state: dict[str, Any] | None) -> None:
        runner.flushed(index, state)
        self.commit()

    def _snapshot(self, acks: dict[str, int] | None = None, committed: int | None = None) -> dict | None:
        """The state to persist (it reads the live tables): the last committed seq per sensor
        (``acks`` about to be committed) and, per output, the newest flushed state that contains
        nothing beyond ``committed``. None without a state dir."""
        if self.state.path is None:
            return None
        acks = acks or {}
        return {"id": self.state_id,
                "sensors": {sid: {"last_seq": max(s.last_committed, acks.get(sid, 0)), "hostname": s.hostname,
                                  "interfaces": {str(k): dict(v) for k, v in s.interfaces.items()},
                                  **({"instances": dict(s.instances)} if s.instances else {}),
                                  **({"kafka_position": list(s.position)} if s.position else {})}
                            for sid, s in self.sensors.items() if not s.legacy},
                "sinks": self.outputs.states_to_persist(self.index if committed is None else committed)}

    def commit(self, *, sync: bool = False) -> None:
        """Acknowledge what every gating output has written: persist the state (in the state
        writer thread, off the event loop; one write at a time, later commits coalesce), then
        ACK each sensor's newest committed seq. ``sync``: write on this thread (shutdown)."""
        if self._finished:
            return
        if self._commit_busy:
            self._commit_again = True
            return
        if self._retry is not None and not sync:
            return  # (a save failed: its timer tries again, with everything committed by then)
        committed = self.outputs.committed(self.index)
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
        snapshot = self._snapshot(acks, committed)
        if snapshot is None or sync:
            try:
                self._write_state(snapshot)
            except OSError as exc:
                self._state_failed(exc)
                return
            self._acknowledge(acks, n, freed, committed)
            return
        self._commit_busy = True
        self._commit_idle.clear()
        fut = self.loop.run_in_executor(self._state_writer, self._write_state, snapshot)
        fut.add_done_callback(functools.partial(self._state_written, acks, n, freed, committed))

    def _write_state(self, snapshot: dict[str, Any] | None) -> None:
        """Persist ``snapshot`` (the state writer thread, or shutdown's), then tell each output
        the state now saved for it (``persisted``: FileSink removes the markers of the outputs
        it names) -- before anything it covers is acknowledged. An OSError of either is a
        failed save: nothing is acknowledged, the commit is retried."""
        self.state.write(snapshot)
        if snapshot is not None:
            for sink in self.sinks:
                if sink.gate:
                    sink.persisted(snapshot.get("sinks", {}).get(sink.name))

    def _state_written(self, acks: dict[str, int], n: int, freed: int, committed: int, fut) -> None:
        self._commit_busy = False
        exc = fut.exception()
        if exc is not None:
            self._state_failed(exc)
        else:
            self._acknowledge(acks, n, freed, committed)
        if self._commit_again and not self._commit_busy:
            self._commit_again = False
            self.commit()
        if not self._commit_busy:
            self._commit_idle.set()

    def _state_failed(self, exc: BaseException) -> None:
        """Nothing is acknowledged: the same entries and the ones committed meanwhile are
        saved again by one timer, every STATE_RETRY_S (flushes do not try on their own: one
        failing write per flush loaded the state thread and flooded the log). The error is
        logged when it first happens or changes, and then every STATE_ERROR_LOG_S."""
        self.counters["state_write_failures"] += 1
        self._failures += 1
        now = time.monotonic()
        if (self._unsaved is None or str(exc) != str(self._unsaved)
                or now - self._failure_logged >= STATE_ERROR_LOG_S):
            log.error("%s: nothing is acknowledged until it is saved (tried again every %g s; %d failures so far)",
                      _state_error(exc), STATE_RETRY_S, self._failures)
            self._failure_logged = now
        self._unsaved = exc
        if self._retry is None and not self._finished:
            self._retry = self.loop.call_later(STATE_RETRY_S, self._retry_commit)

    def _retry_commit(self) -> None:
        self._retry = None
        self.commit()

    def _acknowledge(self, acks: dict[str, int], n: int, freed: int, committed: int) -> None:
        if self._unsaved is not None:
            log.warning("state: saved again after %d failures; acknowledging", self._failures)
            self._unsaved, self._failures = None, 0
        for _ in range(n):
            self._pending.popleft()
        for sid, seq in acks.items():
            s = self.sensors[sid]
            s.last_committed = max(s.last_committed, seq)
        for sid in acks:
            s = self.sensors[sid]
            if not s.legacy:
                send_ack(s, self.counters)
            if s.bye is not None and s.last_committed >= s.last_accepted:
                s.bye.set()
        self.inflight -= freed
        self.outputs.acknowledged(committed)
        self._run_commit_hooks(committed)
        if self._space_waiters:
            asyncio.ensure_future(self._notify_space())

    def _run_commit_hooks(self, committed: int) -> None:
        for hook in self._commit_hooks:
            hook(committed)

    async def _notify_space(self) -> None:
        async with self._space:
            self._space.notify_all()

    # -- counters ----------------------------------------------------------------------------------
    def log_stats(self) -> None:
        """One log line per sensor (any thread)."""
        for sid, s in list(self.sensors.items()):
            c, r = s.counters, s.reported
            log.info("sensor %s: %d packets, %d bytes, ratio %.2f, duplicates %d, rejected %d, sensor drops: "
                     "kernel %d, ring %d, window %d", sid, c["packets"], c["raw_bytes"],
                     (c["raw_bytes"] / c["wire_bytes"]) if c["wire_bytes"] else 0.0, c["duplicate_frames"],
                     c["rejected_packets"],
                     r.get("kernel_dropped", 0), r.get("ring_drops", 0), r.get("window_dropped_packets", 0))

    def sensor_stats(self) -> dict[str, dict[str, Any]]:
        """Per-sensor counters (any thread)."""
        sensors = {}
        now = time.monotonic()
        for sid, s in list(self.sensors.items()):
            c, r = s.counters, s.reported
            sensors[sid] = {
                "hostname": s.hostname, "peer": s.peer,
                # (a Kafka sensor has no session: connected while its messages keep coming -- it
                # sends its counters every statsInterval, 5 s by default; None on a receiver whose
                # partitions do not hold it: its owner says)
                "connected": True if s.writer is not None else _kafka_connected(s, now),
                "last_seq": s.last_committed, "frames": c["frames"], "packets": c["packets"],
                "raw_bytes": c["raw_bytes"], "wire_bytes": c["wire_bytes"],
                "compression_ratio": round(c["raw_bytes"] / c["wire_bytes"], 3) if c["wire_bytes"] else None,
                "duplicate_frames": c["duplicate_frames"], "connections": c["connections"],
                "rejected_frames": c["rejected_frames"], "rejected_packets": c["rejected_packets"],
                "conflict_frames": c["conflict_frames"], "conflict_packets": c["conflict_packets"],
                "seq_gaps": c["seq_gaps"],
                "sensor_packets": r.get("packets", 0),
                "kernel_dropped": r.get("kernel_dropped", 0),
                "interface_dropped": r.get("interface_dropped", 0),
                "ring_drops": r.get("ring_drops", 0),
                "window_dropped_packets": r.get("window_dropped_packets", 0),
                "unacked_frames": r.get("unacked_frames", 0),
                "interfaces": r.get("interfaces", {}),
            }
            if s.legacy:
                sensors[sid]["legacy"] = "unacknowledged"
        return sensors


def _kafka_connected(s: SensorState, now: float) -> bool | None:
    """Whether a sensor without a session is connected: False for a TCP sensor, for a Kafka
    one whether its last message came less than ``KAFKA_SILENT_S`` ago, None when its partition
    is not read here (another receiver of the group answers for it)."""
    if s.position is None:
        return False
    return None if s.kafka_rx is None else now - s.kafka_rx < KAFKA_SILENT_S


def _state_error(exc: BaseException) -> str:
    """A failed save's one-line message: StateFile's errors name the file (their strerror),
    an output's (its markers' removal, ``persisted``) say their own."""
    if isinstance(exc, OSError) and (exc.strerror or str(exc)).startswith("cannot save"):
        return " ".join((exc.strerror or str(exc)).split())
    return f"cannot save the receiver state: {' '.join(str(exc).split())}"
