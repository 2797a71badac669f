"""The sensor's send window: unacknowledged frames in memory, then in a bounded spool directory.

Payloads are ``bytes`` (zstd frames, frames read back from the spool), ring blocks
(``PacketBatch``: stored blocks sent without a copy, released on acknowledgement) or pooled
copies of ring blocks (``memoryview`` from :class:`CopyPool`, taken when too much of a ring is
held). Every payload leaves memory through :func:`release_payload`.
"""
from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

from pktstream import protocol as P
from pktstream._capture import PacketBatch
from pktstream.exceptions import FrameError

log = logging.getLogger("pktstream.sensor")


class CopyPool:
    """Buffers for stored blocks copied out of the ring (when too much of it is held), reused
    once their frame is acknowledged: a fresh 1 MiB allocation per block costs page faults and
    page clearing, more than the copy itself. At most ``keep`` idle buffers per size."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._idle: dict[int, list[bytearray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def copy(self, batch: PacketBatch, size: int) -> memoryview:
        """The records of ``batch`` in a buffer of ``size`` bytes (>= batch.nbytes)."""
        with self._lock:
            idle = self._idle[size]
            buf = idle.pop() if idle else None
        if buf is None:
            buf = bytearray(size)
        view = memoryview(buf)[:batch.nbytes]
        view[:] = batch
        return view

    def give_back(self, view: memoryview) -> None:
        """Only for a copy whose frame nobody will send again (acknowledged, spooled)."""
        buf = view.obj
        with self._lock:
            idle = self._idle[len(buf)]
            if len(idle) < self.keep and not any(b is buf for b in idle):
                idle.append(buf)


COPIES = CopyPool()


def payload_size(payload) -> int:
    """Size of a frame payload: bytes, a pooled copy (memoryview) or a ring block (PacketBatch)."""
    return payload.nbytes if isinstance(payload, (PacketBatch, memoryview)) else len(payload)


def release_payload(payload) -> None:
    """A payload leaves the window: a ring block goes back to its ring, a copy to the pool."""
    if isinstance(payload, PacketBatch):
        try:
            payload.release()
        except BufferError:  # a view is still out: the block goes back when the batch is freed
            pass
    elif isinstance(payload, memoryview):
        COPIES.give_back(payload)


@dataclass
class _Entry:
    seq: int
    size: int
    data: tuple[bytes, bytes] | None  # (header, payload); None: on disk in the spool
    packets: int
    local: bool = True   # made by this process (False: found in the spool at start)
    sent: bool = False   # handed to a connection at least once


class FrameStore:
    """Unacknowledged frames in sequence order: in memory up to ``window_bytes``, then in
    ``spool_dir`` up to ``spool_bytes``; beyond that new blocks are dropped and counted.

    Thread safety: all methods may be called from any thread.
    """

    def __init__(self, *, window_bytes: int, spool_dir: str | None = None, spool_bytes: int = 0,
                 first_seq: int | None = None) -> None:
        self.window_bytes = window_bytes
        self.spool_dir = spool_dir
        self.spool_bytes = spool_bytes if spool_dir else 0
        self._lock = threading.Lock()
        self._entries: collections.deque[_Entry] = collections.deque()
        self.mem_used = 0
        self.spool_used = 0
        self.dropped_blocks = 0
        self.dropped_packets = 0
        self.spooled_blocks = 0
        self.spool_errors = 0
        self.acked_seq = 0
        self._listeners: list = []
        if spool_dir:
            os.makedirs(spool_dir, mode=0o700, exist_ok=True)
            self._load_spool()
        last = self._entries[-1].seq if self._entries else 0
        # Sequence numbers keep increasing across restarts without local state: start at the
        # current time in microseconds (far above any block count a previous run reached).
        self.next_seq = max(first_seq or time.time_ns() // 1000, last + 1)

    def _spool_path(self, seq: int) -> str:
        return os.path.join(self.spool_dir or "", f"{seq:020d}.frame")

    def _load_spool(self) -> None:
        for name in sorted(os.listdir(self.spool_dir)):
            if not name.endswith(".frame"):
                continue
            path = os.path.join(self.spool_dir, name)
            size = os.path.getsize(path)
            try:
                with open(path, "rb") as f:
                    head = P.decode_header(f.read(P.HEADER_LEN), max_payload=1 << 30, max_raw=1 << 30)
                if size != P.HEADER_LEN + head.payload_len:
                    raise FrameError(f"{size} bytes, the header says {P.HEADER_LEN + head.payload_len}")
            except (FrameError, OSError) as exc:  # e.g. cut short by a power loss: never resend it
                log.warning("spool: removing unreadable %s (%s); %s", path, exc, "its packets are lost")
                self.dropped_blocks += 1
                os.unlink(path)
                continue
            self._entries.append(_Entry(int(name[:20]), size, None, head.count, local=False))
            self.spool_used += size
        if self._entries:
            log.info("spool: %d frames (%d bytes) from a previous run will be sent first",
                     len(self._entries), self.spool_used)

    def on_new_frame(self, callback) -> None:
        self._listeners.append(callback)

    def put(self, make_frame, packets: int, size_hint: int) -> int | None:
        """Append a frame built by ``make_frame(seq) -> (header, payload)`` (kept apart so the
        payload is never copied again); returns its seq, or None if dropped (the payload is
        then still the caller's)."""
        with self._lock:
            if self.mem_used + size_hint <= self.window_bytes:
                seq = self.next_seq
                data = make_frame(seq)
                size = len(data[0]) + payload_size(data[1])
                self._entries.append(_Entry(seq, size, data, packets))
                self.mem_used += size
            elif self.spool_used + size_hint <= self.spool_bytes:
                seq = self.next_seq
                header, payload = make_frame(seq)
                tmp = self._spool_path(seq) + ".tmp"
                try:
                    with open(tmp, "wb") as f:
                        f.write(header)
                        f.write(payload)
                    os.replace(tmp, self._spool_path(seq))
                except OSError as exc:  # spool disk full or gone: a counted drop, capture goes on
                    log.error("spool: cannot write %s: %s", tmp, exc)
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                    self.spool_errors += 1
                    self.dropped_blocks += 1
                    self.dropped_packets += packets
                    return None  # the caller releases the payload of a dropped block
                release_payload(payload)  # on disk now
                size = len(header) + payload_size(payload)
                self._entries.append(_Entry(seq, size, None, packets))
                self.spool_used += size
                self.spooled_blocks += 1
            else:
                self.dropped_blocks += 1
                self.dropped_packets += packets
                return None
            self.next_seq = seq + 1
        for cb in self._listeners:
            cb()
        return seq

    def ack(self, seq: int) -> None:
        """Forget every frame with sequence <= seq."""
        with self._lock:
            self.acked_seq = max(self.acked_seq, seq)
            while self._entries and self._entries[0].seq <= seq:
                e = self._entries.popleft()
                if e.data is None:
                    self.spool_used -= e.size
                    try:
                        os.unlink(self._spool_path(e.seq))
                    except FileNotFoundError:
                        pass
                else:
                    self.mem_used -= e.size
                    release_payload(e.data[1])

    def detach(self, interface: str) -> int:
        """Give every frame whose payload is a ring block of ``interface``'s capture a copy of
        its own; the block goes back when the sender, if it holds it right now, lets go of it.
        Returns how many were copied."""
        moved = 0
        with self._lock:
            for e in self._entries:
                payload = e.data[1] if e.data is not None else None
                if isinstance(payload, PacketBatch) and payload.interface == interface:
                    e.data = (e.data[0], bytes(payload))
                    moved += 1
        return moved

    def after(self, seq: int) -> tuple[int, tuple[bytes, bytes]] | None:
        """The first frame with sequence > seq as (seq, (header, payload)), or None."""
        with self._lock:
            for e in self._entries:
                if e.seq > seq:
                    break
            else:
                return None
            data = e.data
            e.sent = True
        if data is None:
            with open(self._spool_path(e.seq), "rb") as f:
                raw = f.read()
            data = (raw[:P.HEADER_LEN], raw[P.HEADER_LEN:])
        return e.seq, data

    def spill(self) -> int:
        """At exit: move unacknowledged in-memory blocks to the spool (within its bound), so the
        next run sends them. Returns how many were moved."""
        if not self.spool_dir:
            return 0
        moved = 0
        with self._lock:
            for e in self._entries:
                if e.data is None or self.spool_used + e.size > self.spool_bytes:
                    continue
                tmp = self._spool_path(e.seq) + ".tmp"
                try:
                    with open(tmp, "wb") as f:
                        f.write(e.data[0])
                        f.write(e.data[1])
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self._spool_path(e.seq))
                except OSError as exc:
                    log.error("spool: cannot keep block %d: %s", e.seq, exc)
                    continue
                self.mem_used -= e.size
                self.spool_used += e.size
                release_payload(e.data[1])
                e.data = None
                moved += 1
        return moved

    def pending(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), self.mem_used + self.spool_used

    def resume(self, last_seq: int) -> None:
        """A receiver says it has everything up to ``last_seq``: forget what it has, and give
        blocks of this process that were never sent but carry a number <= last_seq (this host's
        clock was behind the one that numbered earlier blocks) new numbers above it, instead of
        letting them pass for acknowledged."""
        with self._lock:
            unsent = [e for e in self._entries if e.local and not e.sent]
            if unsent and unsent[0].seq <= last_seq:
                seq = last_seq
                for e in unsent:
                    seq += 1
                    self._renumber(e, seq)
                log.warning("%d unsent blocks renumbered after seq %d (clock behind the receiver's data)",
                            len(unsent), last_seq)
            self.next_seq = max(self.next_seq, last_seq + 1, (self._entries[-1].seq + 1) if self._entries else 0)
        self.ack(last_seq)

    def _renumber(self, e: _Entry, seq: int) -> None:
        if e.data is not None:
            header = bytearray(e.data[0])
            struct.pack_into("<Q", header, 12, seq)
            e.data = (bytes(header), e.data[1])
        else:
            old, new = self._spool_path(e.seq), self._spool_path(seq)
            with open(old, "r+b") as f:
                f.seek(12)
                f.write(struct.pack("<Q", seq))
            os.replace(old, new)
        e.seq = seq
