"""The sensor's send window: unacknowledged frames in memory, then in a bounded spool directory.

Payloads are ``bytes`` (zstd frames, frames read back from the spool), ring blocks
(``PacketBatch``: stored blocks sent without a copy, released on acknowledgement) or pooled
copies of ring blocks (``memoryview`` from :class:`CopyPool`, taken when too much of a ring is
held). Every payload leaves memory through :func:`release_payload`.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, cast

from pktstream._capture import PacketBatch
from pktstream.exceptions import ConfigError, FrameError
from pktstream.stream import protocol as P

log = logging.getLogger("pktstream.stream.sensor")

DEFAULT_SPOOL_BYTES = 1 << 30   # the default spool: 1 GiB, at most half the free disk space
STATE_DIR_ENV = "PKTSTREAM_STATE_DIR"
SPOOL_ERROR_LOG_S = 60.0  # a spool error of one kind (write, mark, remove, renumber) is said at most this often


def state_dir() -> str:
    """Where pktstream keeps local state by default: ``$PKTSTREAM_STATE_DIR``, else
    ``/var/lib/pktstream`` for root, else ``$XDG_STATE_HOME/pktstream`` (``~/.local/state``)."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/pktstream"
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "pktstream")


def default_spool_dir(sensor_id: str) -> str:
    """The default spool of a sensor: ``<state dir>/spool/<sensor id>`` (one per sensor id, so
    two sensors on one host need different ids or spools)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sensor_id)[:128] or "sensor"
    if safe in (".", ".."):
        safe = "_" + safe
    return os.path.join(state_dir(), "spool", safe)


def default_spool_bytes(directory: str) -> int:
    """1 GiB, or half the free space of the spool's file system if that is less."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    return int(min(DEFAULT_SPOOL_BYTES, free // 2))


class CopyPool:
    """Buffers for stored blocks copied out of the ring (when too much of it is held), reused
    once their frame is acknowledged: a fresh 1 MiB allocation per block costs page faults and
    page clearing, more than the copy itself. At most ``keep`` idle buffers per size."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._idle: dict[int, list[bytearray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def copy(self, batch: PacketBatch, size: int) -> memoryview:
        """The records of ``batch`` in a buffer of ``size`` bytes (>= batch.nbytes) -- or of
        exactly its size when it fills less than half of that (the small blocks of a quiet
        link: a whole pooled buffer each would hold ``size`` bytes of memory per block that the
        send window counts as a few hundred, and grow without bound while the receiver is away)."""
        if batch.nbytes * 2 < size:
            return memoryview(bytearray(batch))  # (not pooled: give_back drops it)
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
        buf = cast(bytearray, view.obj)  # a copy() of this pool
        if len(buf) not in self._idle:
            return  # an exact-size copy of a small block: freed, never pooled
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


def _seq_of(entry: _Entry) -> int:
    return entry.seq


@dataclass
class _Entry:
    seq: int
    size: int
    data: tuple[bytes, bytes] | None  # (header, payload); None: on disk in the spool
    packets: int
    local: bool = True   # made by this process (False: found in the spool at start)
    # handed to a connection at least once (a spooled block's file name says so: SEQ.frame;
    # never handed out: SEQ.new.frame -- also for the next run, which then renumbers it when
    # it is behind the receiver instead of taking it for one the receiver has)
    sent: bool = False
    unmarked: bool = False  # handed out, but its file could not be renamed SEQ.frame (a read-only spool)
    raw_len: int = 0  # a previous run's spooled block: its decompressed size (0: made by this run)
    old_file: str | None = None  # a spooled block moved to memory (_renumber): its file, removed with it


_PASSING_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})


def _count_of(name: str, opener) -> int:
    """The packet count a spool file's header gives when the header is not valid (best effort:
    its magic and version right; 0 otherwise)."""
    try:
        with open(name, "rb", opener=opener) as f:
            raw = f.read(P.HEADER_LEN)
        magic, version, *_rest, count, _raw_len, _plen = P.HEADER.unpack_from(raw)
        return count if magic == P.MAGIC and version == P.VERSION else 0
    except (OSError, struct.error):
        return 0


class FrameStore:
    """Unacknowledged frames in sequence order: in memory up to ``window_bytes``, then in
    ``spool_dir`` up to ``spool_bytes``; beyond that new blocks are dropped and counted.

    The spool is the directory opened and locked at start: every file operation is relative to
    that open directory (``dir_fd``), never to its path again, so a directory removed while the
    sensor runs -- and maybe made again and locked by another sensor process -- is never written
    to, renamed in or removed from. Its removal is noticed (a link count of 0, or a file that
    cannot be created in it: ENOENT) when a block cannot be written to it, renamed or read there,
    or is dropped for want of room (then at most once a second): the blocks spooled there and
    never sent are counted lost together, said in one line, and spooling stops (blocks beyond the
    window are dropped and counted) until a restart; a sent one is counted only if it has to be
    sent again.

    Thread safety: all methods may be called from any thread; :meth:`close` last (after it,
    nothing is read from, written to or removed from the spool).
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
        self.spool_errors = 0  # spool files that could not be written, renamed or removed (causes, not losses)
        self._spool_error_logged: dict[str, float] = {}  # per kind of error: when it was last said (monotonic s)
        self.acked_seq = 0
        self._listeners: list = []
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None  # the spool directory as opened (every file is relative to it)
        self._linked = False  # the spool path was a symbolic link (then never chowned)
        self.spool_gone = False  # the spool directory was removed while this process ran
        self._gone_probed = -1.0  # when a full spool was last probed for its removal (monotonic s)
        if spool_dir:
            self._open_spool(spool_dir)
        last = self._entries[-1].seq if self._entries else 0
        # Sequence numbers keep increasing across restarts: start at the current time in
        # microseconds (far above any block count a previous run reached), and, with a spool,
        # above every number a previous run may have used (its reservation), so a clock that
        # went back cannot make new blocks look like old ones (Kafka has no resume step).
        self._reserved = self._read_reservation()
        self.next_seq = max(first_seq or time.time_ns() // 1000, last + 1, self._reserved + 1)
        #: the first number this process gives a block (below it: a previous run's, spooled)
        self.first_own_seq = self.next_seq
        self._reserve()

    _RESERVE = 1 << 20  # sequence numbers reserved (on disk) at a time

    def _read_reservation(self) -> int:
        if not self.spool_dir:
            return 0
        try:
            with open("seq", opener=self._opener) as f:
                value = int(f.read().strip() or 0)
            # a reservation far ahead of this clock was made by a clock that was wrong: ignored
            # (the receiver refuses numbers more than a day ahead of its own clock)
            ahead = time.time_ns() // 1000 + P.SEQ_AHEAD_US // 2
            return value if 0 <= value <= ahead else 0
        except (OSError, ValueError):
            return 0

    def _reserve(self) -> None:
        """Persist that numbers up to next_seq + _RESERVE may be in use (under the lock, or
        from __init__); written once per million blocks."""
        if not self.spool_dir or self.next_seq <= self._reserved or self.spool_gone:
            return
        reserved = self.next_seq + self._RESERVE
        try:
            with open("seq.tmp", "w", opener=self._creator) as f:
                f.write(str(reserved))
            self._replace("seq.tmp", "seq")
            self._reserved = reserved
        except OSError as exc:
            log.warning("spool: cannot record sequence numbers in %s: %s", self._shown("seq"), exc)
            self._reserved = reserved  # do not retry on every block
            with contextlib.suppress(OSError):
                self._unlink("seq.tmp")

    def _open_spool(self, spool_dir: str) -> None:
        """Create (mode 0700), open and lock the spool: one sensor process per spool directory."""
        spool_dir = spool_dir.rstrip("/") or "/"  # (a trailing slash would follow a link: O_NOFOLLOW below)
        dfd = None
        try:
            os.makedirs(spool_dir, mode=0o700, exist_ok=True)
            try:
                dfd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # (a link: ENOTDIR with O_DIRECTORY)
                    raise
                # (the spool is a symbolic link, e.g. to another disk: used, but never given to the
                # sensor user by chown -- whoever could make the link chose what it points to)
                dfd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._linked = True
            fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600,
                         dir_fd=dfd)
        except OSError as exc:
            if dfd is not None:
                os.close(dfd)
            raise ConfigError(f"spool {spool_dir}: {exc.strerror or exc} (give --spool-dir DIR, "
                              "or --no-spool)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            os.close(dfd)
            if isinstance(exc, BlockingIOError):
                raise ConfigError(f"spool {spool_dir} is in use by another sensor on this host (two sensors "
                                  "with the same id?): give each its own --sensor-id or --spool-dir") from None
            raise ConfigError(f"spool {spool_dir}: cannot lock it: {exc.strerror or exc} (a spool needs a "
                              "local file system with locks; give --spool-dir DIR, or --no-spool)") from None
        self._lock_fd, self._dir_fd = fd, dfd
        self._load_spool()

    def close(self) -> None:
        """Unlock and close the spool (another FrameStore may use it from now on); a block put
        after it is not spooled (a counted drop). Idempotent."""
        with self._lock:
            fds, self._lock_fd, self._dir_fd = (self._lock_fd, self._dir_fd), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    # -- files of the spool: relative to the directory opened at start ------------------------------
    def _dirfd(self) -> int:
        fd = self._dir_fd
        if fd is None:  # (closed: never a path relative to the working directory)
            raise OSError(errno.EBADF, "the spool is closed")
        return fd

    def _opener(self, name: str, flags: int) -> int:
        """``open(name, ..., opener=self._opener)``: an existing file of the spool, only when it
        is a regular file with one link: a sensor that drops root starts as root in a spool its
        user owned, and a symbolic or hard link planted there would have it read or write any
        file, a FIFO would block it (opened non-blocking, then refused)."""
        fd = os.open(name, (flags & ~(os.O_CREAT | os.O_TRUNC)) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=self._dirfd())
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(errno.EINVAL, f"not a file of the spool ({name}: not a regular file with one link)")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _creator(self, name: str, flags: int) -> int:
        """``open(name, "wb", opener=self._creator)``: a new file of the spool (mode 0600), made
        anew -- whatever had the name (a link planted there) is removed first, never written
        through."""
        fd = self._dirfd()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=fd)

    def _replace(self, src: str, dst: str) -> None:
        fd = self._dirfd()
        os.replace(src, dst, src_dir_fd=fd, dst_dir_fd=fd)

    def _unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self._dirfd())

    def _shown(self, name: str) -> str:
        """A spool file's name as said in a log line."""
        return os.path.join(self.spool_dir or "", name)

    def read_file(self, name: str) -> bytes | None:
        """A side file of the spool (None: there is none); raises OSError (ELOOP: a link)."""
        with self._lock:
            try:
                with open(name, "rb", opener=self._opener) as f:
                    return f.read()
            except FileNotFoundError:
                return None

    def write_file(self, name: str, data: bytes) -> None:
        """Write a side file of the spool (e.g. the sensor's ``interfaces.json``) atomically,
        in the directory opened at start; raises OSError (also when the spool was removed)."""
        with self._lock:  # (close() cannot close the directory meanwhile)
            try:
                with open(name + ".tmp", "wb", opener=self._creator) as f:
                    f.write(data)
                self._replace(name + ".tmp", name)
            except OSError:
                with contextlib.suppress(OSError):
                    self._unlink(name + ".tmp")
                raise

    def chown(self, user: str, group: str | None = None) -> None:
        """Give the spool directory and its files to ``user`` (a sensor that drops root), by
        the directory opened at start and never through a symbolic link: a link planted in the
        spool by that user would otherwise hand its target (any file of the host) over."""
        from pktstream.privileges import chown_for
        with self._lock:
            if self._linked:
                log.warning("spool: %s is a symbolic link: not given to user %s (give its target to that user "
                            "yourself)", self.spool_dir, user)
                return
            chown_for(self._dirfd(), user, group)

    def _dead(self, probe: bool = False) -> bool:
        """Whether the spool directory was removed: its link count is 0, or (``probe``) a file
        cannot be created in it (ENOENT: overlayfs keeps a removed directory's link count when
        it came from a lower layer); a stale NFS handle counts as removed."""
        fd = self._dir_fd
        if fd is None:
            return False
        try:
            if os.fstat(fd).st_nlink == 0:
                return True
            if probe:
                try:
                    os.close(os.open(".probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                                     0o600, dir_fd=fd))
                except FileExistsError:
                    pass  # (one left by a kill, or anything by that name: the directory is there)
                os.unlink(".probe", dir_fd=fd)
        except OSError as exc:
            return exc.errno in (errno.ENOENT, errno.ESTALE)
        return False

    def _check_gone(self, *, probe: bool = False, dead: bool = False) -> bool:
        """Whether the spool directory was removed (under the lock; ``dead``: a file could not
        be created in it, ENOENT -- it is; ``probe``: see :meth:`_dead`). The first time: the
        spooled blocks never sent are dropped and counted (their files went with it), said in
        one line, and nothing is spooled any more; sent ones stay until acknowledged (counted
        lost only if they have to be sent again)."""
        if self.spool_gone:
            return True
        if not (dead and self._dir_fd is not None) and not self._dead(probe):
            return False
        self.spool_gone = True
        self.spool_bytes = 0
        # (a block handed out -- by this run, or a previous one: SEQ.frame -- may be acknowledged:
        # it stays until it is, or until a connection needs it again)
        lost = [e for e in self._entries if e.data is None and not e.sent]
        if lost:
            self._entries = collections.deque(e for e in self._entries if e.data is not None or e.sent)
            self.spool_used -= sum(e.size for e in lost)
            self.dropped_blocks += len(lost)
            self.dropped_packets += sum(e.packets for e in lost)
        log.error("spool: %s was removed while the sensor runs: %d spooled blocks (%d packets) went with it "
                  "and are lost (counted); blocks beyond the window are dropped and counted until the sensor "
                  "is restarted", self.spool_dir, len(lost), sum(e.packets for e in lost))
        return True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def _spool_name(seq: int, sent: bool) -> str:
        return f"{seq:020d}.frame" if sent else f"{seq:020d}.new.frame"

    def _file_of(self, e: _Entry) -> str:
        """The file of a spooled block (its name in the spool), by the name it has."""
        return self._spool_name(e.seq, e.sent and not e.unmarked)

    _SPOOL_NAME = re.compile(r"(\d{20})(\.new)?\.frame(\.tmp)?")

    def _load_spool(self) -> None:
        assert self.spool_dir is not None  # called with a spool only
        loaded = []
        for name in os.listdir(self._dirfd()):
            if not name.endswith((".frame", ".frame.tmp")):
                continue
            path = self._shown(name)
            head = None
            try:
                size = os.stat(name, dir_fd=self._dirfd(), follow_symlinks=False).st_size
                with open(name, "rb", opener=self._opener) as f:
                    head = P.decode_header(f.read(P.HEADER_LEN), max_payload=1 << 30, max_raw=1 << 30)
                m = self._SPOOL_NAME.fullmatch(name)
                if m is None:
                    raise FrameError("not a spool file name")
                if m.group(3):  # a spill a kill cut short before its rename
                    raise FrameError("a spill that did not finish")
                if head.type != P.FrameType.DATA or head.header_len != P.HEADER_LEN:
                    # (only DATA frames with this version's header are spooled: a changed byte
                    # would make the receiver take it for another frame -- a HEARTBEAT's seq
                    # acknowledged, its packets lost uncounted -- or close every session on it)
                    raise FrameError(f"a {head.type.name} frame with a {head.header_len}-byte header, "
                                     "not a spooled block")
                if size != P.HEADER_LEN + head.payload_len:
                    raise FrameError(f"{size} bytes, the header says {P.HEADER_LEN + head.payload_len}")
                seq = int(m.group(1))
                if head.seq != seq:  # a renumbering cut short between header and rename: the name
                    with open(name, "r+b", opener=self._opener) as f:  # wins (a never-sent block: renumbered again)
                        f.seek(12)
                        f.write(struct.pack("<Q", seq))
            except (FrameError, OSError) as exc:  # e.g. cut short by a power loss: never resend it
                packets = head.count if head is not None else _count_of(name, self._opener)
                log.warning("spool: removing unreadable %s (%s); its %s packets are lost", path, exc,
                            packets if head is not None else "(unknown number of)")
                self.dropped_blocks += 1
                self.dropped_packets += packets
                try:
                    self._unlink(name)
                except OSError:
                    pass
                continue
            # a block a previous run handed to a connection may be one the receiver has; one it
            # never handed out is not, whatever its number (renumbered by resume when behind)
            loaded.append(_Entry(seq, size, None, head.count, local=False, sent=m.group(2) is None,
                                 raw_len=head.raw_len))
            self.spool_used += size
        loaded.sort(key=_seq_of)
        # blocks go out in order, so never-sent ones follow every handed-out one; a never-sent
        # name before a handed-out one (a power loss reordering renames, a hand edit) is taken
        # as maybe sent: renumbering only a suffix keeps the store in order
        last_sent = max((i for i, e in enumerate(loaded) if e.sent), default=-1)
        for i, e in enumerate(loaded):
            if i < last_sent and not e.sent:
                try:
                    self._replace(self._spool_name(e.seq, False), self._spool_name(e.seq, True))
                except OSError as exc:
                    log.error("spool: block %d: %s; its %d packets are lost", e.seq, exc, e.packets)
                    self.spool_used -= e.size
                    self.dropped_blocks += 1
                    self.dropped_packets += e.packets
                    continue
                e.sent = True
            self._entries.append(e)
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
                tmp = self._spool_name(seq, False) + ".tmp"
                try:
                    with open(tmp, "wb", opener=self._creator) as f:
                        f.write(header)
                        f.write(payload)
                    self._replace(tmp, self._spool_name(seq, False))
                except OSError as exc:  # spool disk full or gone: a counted drop, capture goes on
                    try:
                        self._unlink(tmp)
                    except OSError:
                        pass
                    self.dropped_blocks += 1
                    self.dropped_packets += packets
                    if not self._check_gone(dead=exc.errno == errno.ENOENT):  # (removed: said once, with what went)
                        self._spool_error("write", f"cannot write {self._shown(tmp)}: {exc}; the block's {packets} "
                                                   f"packets are lost ({self.dropped_packets} packets dropped so far)")
                    return None  # the caller releases the payload of a dropped block
                release_payload(payload)  # on disk now
                size = len(header) + payload_size(payload)
                self._entries.append(_Entry(seq, size, None, packets))
                self.spool_used += size
                self.spooled_blocks += 1
            else:
                self.dropped_blocks += 1
                self.dropped_packets += packets
                if self.spool_used:  # a full spool: still there? (removed: its room and blocks are gone)
                    now = time.monotonic()  # (a file made to find out: at most once a second)
                    probe = now - self._gone_probed >= 1.0
                    if probe:
                        self._gone_probed = now
                    self._check_gone(probe=probe)
                return None
            self.next_seq = seq + 1
            if self.next_seq > self._reserved:
                self._reserve()
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
                    if self._dir_fd is None:  # (closed: its file stays, the next run finds it)
                        continue
                    try:
                        self._unlink(self._file_of(e))
                    except FileNotFoundError:
                        pass
                    except OSError as exc:  # (a spool turned read-only, EIO: the session goes on)
                        self._spool_error("remove", f"cannot remove acknowledged block {e.seq}'s file ({exc}): "
                                                    "a restart may deliver what is left there twice")
                else:
                    self.mem_used -= e.size
                    release_payload(e.data[1])
                    if e.old_file is not None:
                        self._remove(e.old_file)

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
        while True:
            f: BinaryIO | None = None
            failed: OSError | None = None
            with self._lock:
                entries = self._entries
                if not entries or entries[-1].seq <= seq:
                    return None
                # sequence order: bisect (a deque is indexed in O(n/64), fine for a window)
                e = entries[bisect.bisect_right(entries, seq, key=_seq_of)]
                data = e.data
                path = None
                if data is None:
                    if self._dir_fd is None:
                        return None  # (closed: what is spooled stays for the next run)
                    path = self._mark_sent(e) if not e.sent else self._file_of(e)
                    if path is None:
                        seq = e.seq  # lost (counted): the next one
                        continue
                    try:  # (opened under the lock, read outside it)
                        f = open(path, "rb", opener=self._opener)  # noqa: SIM115 - closed below
                    except OSError as exc:
                        failed = exc
                e.sent = True
            if data is None:
                assert path is not None
                try:
                    if failed is not None:
                        raise failed
                    assert f is not None
                    with f:
                        raw = f.read()
                except OSError as exc:
                    if exc.errno in _PASSING_ERRNOS:
                        raise  # (the session ends, and the next one reads it again)
                    with self._lock:  # acknowledged (and removed) meanwhile, or lost: the next one
                        if exc.errno in (errno.ENOENT, errno.ESTALE):
                            self._check_gone(probe=True)  # (removed: the never-sent ones at once)
                        if e in self._entries:
                            self._lose(e, exc)
                            self._remove(path)  # (the next run would count it again)
                    seq = e.seq
                    continue
                data = (raw[:P.HEADER_LEN], raw[P.HEADER_LEN:])
            return e.seq, data

    def _mark_sent(self, e: _Entry) -> str | None:
        """A spooled block is about to be handed out for the first time: its file name says so
        first (SEQ.new.frame -> SEQ.frame), so a run after a kill never takes a block the
        receiver may have for a never-sent one. Returns the file to read; None: the file is
        gone (the block is dropped and counted). Under the lock."""
        new, sent = self._spool_name(e.seq, False), self._spool_name(e.seq, True)
        try:
            self._replace(new, sent)
            return sent
        except FileNotFoundError as exc:
            if not self._check_gone(probe=True):  # (removed: every never-sent block counted at once, this one too)
                self._lose(e, exc)
            return None
        except OSError as exc:  # e.g. a read-only spool: sent anyway (a later run may send it twice)
            if exc.errno == errno.ESTALE and self._check_gone(dead=True):
                return None
            # (its file keeps the never-sent name, which ack removes and a resend reads -- before,
            # both looked for SEQ.frame: the block counted lost, and its file left behind)
            self._spool_error("mark", f"block {e.seq}: cannot mark it sent ({exc}): a restart may deliver it "
                                      "twice")
            e.unmarked = True
            return new

    def _spool_error(self, kind: str, what: str) -> None:
        """Count and log a spool error: of each ``kind``, the first, then at most one every
        SPOOL_ERROR_LOG_S (a full or read-only disk fails every block: a line each flooded the
        log). Under the lock."""
        self.spool_errors += 1
        now = time.monotonic()
        if now - self._spool_error_logged.get(kind, -SPOOL_ERROR_LOG_S) >= SPOOL_ERROR_LOG_S:
            self._spool_error_logged[kind] = now
            log.error("spool: %s (%d spool errors so far; said again at most every %g s)", what, self.spool_errors,
                      SPOOL_ERROR_LOG_S)

    def _lose(self, e: _Entry, exc: BaseException) -> None:
        """Drop a spooled block whose file is gone or unusable, counted (under the lock). On a
        removed spool said at most once a minute (every block sent before the removal may come
        here when a connection needs it again)."""
        if self.spool_gone:
            now = time.monotonic()
            if now - self._spool_error_logged.get("gone-lost", -SPOOL_ERROR_LOG_S) >= SPOOL_ERROR_LOG_S:
                self._spool_error_logged["gone-lost"] = now
                log.error("spool: block %d, sent before the spool was removed, cannot be sent again: its %d "
                          "packets are lost (such blocks are counted, and said at most every %g s)",
                          e.seq, e.packets, SPOOL_ERROR_LOG_S)
        else:
            log.error("spool: block %d: %s; its %d packets are lost", e.seq, exc, e.packets)
        self._entries.remove(e)
        if e.data is None:
            self.spool_used -= e.size
        else:  # (a spooled block moved to memory: _renumber's fallback)
            self.mem_used -= e.size
            release_payload(e.data[1])
        self.dropped_blocks += 1
        self.dropped_packets += e.packets

    def _remove(self, name: str) -> None:
        """Remove a dropped block's file (counted if it stays: the next run would count it again)."""
        try:
            self._unlink(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._spool_error("remove", f"cannot remove {self._shown(name)} ({exc})")

    def spill(self) -> int:
        """At exit: move unacknowledged in-memory blocks to the spool (within its bound), so the
        next run sends them. Returns how many were moved."""
        if not self.spool_dir:
            return 0
        moved = failed = 0
        first_error: OSError | None = None
        with self._lock:
            if self._dir_fd is None or self._check_gone(probe=True):  # (closed, or removed: the exit report
                return 0  # counts the blocks in memory as lost)
            for e in self._entries:
                if e.data is None or self.spool_used + e.size > self.spool_bytes:
                    continue
                tmp = self._spool_name(e.seq, e.sent) + ".tmp"
                try:
                    with open(tmp, "wb", opener=self._creator) as f:
                        f.write(e.data[0])
                        f.write(e.data[1])
                        f.flush()
                        os.fsync(f.fileno())
                    self._replace(tmp, self._spool_name(e.seq, e.sent))
                except OSError as exc:  # (a full disk: one line for all, no temporary left to count twice)
                    with contextlib.suppress(OSError):
                        self._unlink(tmp)
                    if exc.errno in (errno.ENOENT, errno.ESTALE) and self._check_gone(dead=True):
                        break
                    self.spool_errors += 1
                    failed += 1
                    first_error = first_error or exc
                    continue
                self.mem_used -= e.size
                self.spool_used += e.size
                release_payload(e.data[1])
                e.data = None
                if e.old_file is not None:  # (its file under the number before _renumber)
                    self._remove(e.old_file)
                    e.old_file = None
                moved += 1
            if moved:
                try:  # the renames too survive a power loss, not only the files' bytes
                    os.fsync(self._dirfd())
                except OSError as exc:
                    log.error("spool: cannot fsync %s: %s", self.spool_dir, exc)
        if failed:
            log.error("spool: cannot keep %d unacknowledged blocks for the next run (%s): they are lost",
                      failed, first_error)
        return moved

    def unspooled(self) -> tuple[int, int]:
        """(frames, packets) unacknowledged and only in memory -- or on a spool that was
        removed: lost at exit after :meth:`spill`."""
        with self._lock:
            mem = [e for e in self._entries if e.data is not None or self.spool_gone]
            return len(mem), sum(e.packets for e in mem)

    def spooled_frames(self) -> int:
        """Unacknowledged frames on disk (kept for the next run; none on a removed spool)."""
        with self._lock:
            return 0 if self.spool_gone else sum(1 for e in self._entries if e.data is None)

    def pending(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), self.mem_used + self.spool_used

    def resume(self, last_seq: int, accepted_seq: int | None = None) -> None:
        """A receiver says it has everything up to ``last_seq`` (committed) and has taken
        frames up to ``accepted_seq`` (>= last_seq; still being written): forget what it has, and
        give blocks that were never sent (this process's, or a previous run's spooled as never
        handed out) but carry a number <= accepted_seq (this host's clock was behind the one
        that numbered earlier blocks) new numbers above it, instead of letting them pass for
        acknowledged or for duplicates.

        The new numbers are above the floor *and* above every number in the store (a spooled
        block's new file name is never one that exists), and are given from the last block
        down: at every step, also after an error or a kill, the blocks stay in order."""
        floor = last_seq if accepted_seq is None else max(last_seq, accepted_seq)
        with self._lock:
            unsent = [e for e in self._entries if not e.sent]  # (a suffix: blocks go out in order)
            if unsent and unsent[0].seq <= floor:
                top = max(floor, self._entries[-1].seq)
                for i in range(len(unsent) - 1, -1, -1):
                    self._renumber(unsent[i], top + 1 + i)
                log.warning("%d unsent blocks renumbered to %d.. (clock behind the receiver's data, seq %d)",
                            len(unsent), top + 1, floor)
            self.next_seq = max(self.next_seq, floor + 1, (self._entries[-1].seq + 1) if self._entries else 0)
            self._reserve()
            # frames of a previous run's spool that it had sent and the receiver committed
            # (their acknowledgement was lost with that run): not sent again, and said so
            earlier = [e for e in self._entries if not e.local and e.sent and e.seq <= last_seq]
        if earlier:
            log.info("spool: %d frames (%d packets) of a previous run were already committed by the "
                     "receiver (seq <= %d): not sent again", len(earlier), sum(e.packets for e in earlier), last_seq)
        self.ack(last_seq)

    def drop_larger(self, max_raw: int) -> int:
        """A receiver accepts blocks of at most ``max_raw`` bytes: drop (counted, logged, their
        files removed) the previous run's spooled blocks larger than that (a larger block size
        then, or a corrupt header) -- the receiver would close every session on the first of
        them, and nothing behind it would ever be delivered. After :meth:`resume` (the blocks
        the receiver has are gone by then, not counted lost). Returns how many."""
        with self._lock:
            big = [e for e in self._entries if e.raw_len > max_raw]
            for e in big:
                path = self._file_of(e) if e.data is None else e.old_file
                self._lose(e, FrameError(f"{e.raw_len} bytes, more than the receiver accepts ({max_raw})"))
                if path is not None:
                    self._remove(path)
        return len(big)

    def _renumber(self, e: _Entry, seq: int) -> None:
        """Give the never-sent block ``e`` the number ``seq`` (free: above every number in the
        store; under the lock). A spooled block: the header first, then the rename (a kill
        between the two: :meth:`_load_spool` puts the name's number back); a block whose file
        is gone or cannot be changed is dropped and counted."""
        if e.data is not None:
            header = bytearray(e.data[0])
            struct.pack_into("<Q", header, 12, seq)
            e.data = (bytes(header), e.data[1])
        else:
            old, new = self._spool_name(e.seq, False), self._spool_name(seq, False)
            try:
                with open(old, "r+b", opener=self._opener) as f:
                    f.seek(12)
                    f.write(struct.pack("<Q", seq))
                self._replace(old, new)
            except FileNotFoundError as exc:
                if not self._check_gone(probe=True):
                    self._lose(e, exc)
                return
            except OSError as exc:  # e.g. a read-only spool: the block goes on from memory
                if exc.errno == errno.ESTALE and self._check_gone(dead=True):
                    return
                try:
                    with open(old, "rb", opener=self._opener) as f:
                        raw = f.read()
                except OSError:
                    self._lose(e, exc)
                    return
                self._spool_error("renumber", f"renumbering block {e.seq}: {exc} (kept in memory; its file "
                                              "is removed when it is acknowledged)")
                header = bytearray(raw[:P.HEADER_LEN])
                struct.pack_into("<Q", header, 12, seq)
                e.data = (bytes(header), raw[P.HEADER_LEN:])
                e.old_file = old
                self.spool_used -= e.size
                self.mem_used += e.size
        e.seq = seq
