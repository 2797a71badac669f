"""``open_writer``: pcap / pcapng / pcap.zst / pcapng.zst files with rotation, written safely.

* Format from the extension (``.pcap``, ``.pcapng``, ``.pcap.zst``, ``.pcapng.zst``) or
  ``format=``. Compressed files are ONE zstd frame written by a streaming compressor and
  flushed (``FLUSH_BLOCK``) after every batch, so a reader of the growing ``.part`` file gets
  every whole batch (Wireshark 4.0 reads only the first two frames of multi-frame files).
  Opt-in ``zstd_frame_bytes``: the seekable layout (independent frames + a seek table in a
  trailing skippable frame) that lets a query decompress only the frames it needs.
* Every file is written as ``NAME.part`` and renamed to ``NAME`` when complete (rotation or
  close); ``fsync=True`` fsyncs the file before and its directory after the rename.
* Rotation like tcpdump: ``rotate_bytes`` (-C: a new file before the size would exceed the
  limit; batches are split at packet boundaries; compressed files rotate once their
  compressed size reaches it), ``rotate_seconds`` (-G: a new file when a write or flush
  comes that many seconds after the file was opened; ``rotate_if_due()`` completes a due file
  while nothing is written — the receiver calls it every second when idle), ``max_files`` (-W: keep at most that
  many completed files, deleting the oldest). Rotated names: ``NAME`` with strftime
  patterns (``%Y%m%d-%H%M%S``) expanded at the file's opening, in local time like tcpdump,
  then a 6-digit sequence number before the extension: ``cap.000000.pcap``, ``cap.000001.pcap``.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from pktstream._capture import PacketBatch
from pktstream.exceptions import ClosedError
from pktstream.formats._common import fsync_dir
from pktstream.formats.pcap import PcapWriter
from pktstream.formats.pcapng import PacketInterfaces, PcapngWriter

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

FORMATS = {".pcap": "pcap", ".pcapng": "pcapng", ".pcap.zst": "pcap.zst", ".pcapng.zst": "pcapng.zst"}


def format_from_name(path: str) -> str | None:
    """``"pcap"``, ``"pcapng"``, ``"pcap.zst"`` or ``"pcapng.zst"`` from a file name, else None."""
    for ext in sorted(FORMATS, key=len, reverse=True):
        if path.endswith(ext):
            return FORMATS[ext]
    return None


def split_ext(path: str) -> tuple[str, str]:
    """(stem, capture extension) of a file name: ("a/cap", ".pcapng.zst")."""
    for ext in sorted(FORMATS, key=len, reverse=True):
        if path.endswith(ext):
            return path[:-len(ext)], ext
    return path, ""


def rotated_name_re(pattern: str) -> re.Pattern[str]:
    """The names a rotating writer of ``pattern`` gives its files (``NAME.000042.pcap``, the
    sequence number in group 1), as a regex over the base name: a strftime field matches a run
    of characters without ``.`` or ``/`` (so ``cap-%Y.pcap`` never matches another writer's
    ``cap-2026.LINUX_SLL.000003.pcap``)."""
    stem, ext = split_ext(os.path.basename(pattern))
    literal = "".join("%" if piece == "%%" else "[^./]*" if piece.startswith("%") and len(piece) == 2
                      else re.escape(piece) for piece in re.split(r"(%.)", stem) if piece)
    return re.compile(rf"{literal}\.(\d{{6,}}){re.escape(ext)}")


def rotated_files(pattern: str, directory: str, *, parts: bool = False) -> list[tuple[int, str]]:
    """(sequence number, path) of the files a rotating writer of ``pattern`` has in
    ``directory`` (completed ones; with ``parts`` also ``.part`` ones); [] if it cannot be listed."""
    name_re = rotated_name_re(pattern)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for n in names:
        m = name_re.fullmatch(n[:-len(".part")] if parts and n.endswith(".part") else n)
        if m is not None:
            out.append((int(m.group(1)), os.path.join(directory, n)))
    return out


SEEKABLE_MAGIC = 0x8F92EAB1       # last 4 bytes of a file with a seek table (zstd contrib seekable format)
SKIPPABLE_SEEK_TABLE = 0x184D2A5E  # the skippable frame holding it
MAX_ZSTD_FRAME_BYTES = 1 << 30      # frame sizes in the seek table are 32-bit; a batch may overshoot


def seek_table_frame(frames: list[tuple[int, int]]) -> bytes:
    """The seek table of the zstd seekable format as a skippable frame: one entry
    (compressed size, decompressed size) per frame, no checksums (each frame carries its
    own), then the footer (frame count, descriptor, magic)."""
    import struct
    body = b"".join(struct.pack("<II", c, d) for c, d in frames)
    body += struct.pack("<IBI", len(frames), 0, SEEKABLE_MAGIC)
    return struct.pack("<II", SKIPPABLE_SEEK_TABLE, len(body)) + body


class ZstdFileWriter:
    """Binary file wrapper compressing into zstd frames (checksummed).

    ``frame_bytes`` None: ONE frame for the whole file. Else the seekable layout: a new
    independent frame once the current one holds ``frame_bytes`` uncompressed bytes (cut
    between writes, so at a record boundary), and at :meth:`finish` a seek table in a
    skippable frame (docs/ARCHIVE.md). Not thread-safe."""

    def __init__(self, f: BinaryIO, level: int, frame_bytes: int | None = None) -> None:
        import zstandard
        self._zstd = zstandard
        self._f = f
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._c = self._cctx.compressobj()
        self._frame_bytes = frame_bytes
        self._frame_in = 0    # uncompressed bytes in the current frame
        self._frame_out = 0   # compressed bytes of the current frame written
        self.frames: list[tuple[int, int]] = []  # completed frames: (compressed, uncompressed) bytes
        self.written = 0  # compressed bytes handed to the file

    def _out(self, data: bytes) -> None:
        if data:
            self._f.write(data)
            self.written += len(data)
            self._frame_out += len(data)

    def _end_frame(self) -> None:
        self._out(self._c.flush(self._zstd.COMPRESSOBJ_FLUSH_FINISH))
        self.frames.append((self._frame_out, self._frame_in))
        self._c = self._cctx.compressobj()
        self._frame_in = self._frame_out = 0

    def write(self, data) -> None:
        if self._frame_bytes is not None and self._frame_in >= self._frame_bytes:
            self._end_frame()
        self._frame_in += memoryview(data).nbytes  # a batch may come as a view of wider items
        self._out(self._c.compress(data))
        return None

    def flush(self) -> None:
        if self._frame_bytes is not None and self._frame_in >= self._frame_bytes:
            self._end_frame()
        else:
            self._out(self._c.flush(self._zstd.COMPRESSOBJ_FLUSH_BLOCK))
        self._f.flush()

    def finish(self) -> None:
        if self._frame_bytes is None or self._frame_in or not self.frames:
            self._end_frame()
        if self._frame_bytes is not None:
            table = seek_table_frame(self.frames)
            self._f.write(table)
            self.written += len(table)
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()


class WriteObserver(Protocol):
    """Told what a :class:`CaptureWriter` does to its files (e.g. to index them as written):
    ``opened(path, format, header_block)``, ``wrote(path, batch, start, end, idb_positions,
    offsets=None)`` (the batch's records occupy stream bytes ``[start, end)`` of the uncompressed
    file; pcapng IDBs written just before them at ``(offset, length)``; ``offsets``, given only
    to an observer whose ``wrote`` names it (checked once, when the writer is made): the batch's
    ``offset`` array as the pcapng writer's conversion found it, with -1 where the records found
    and ``len(batch)`` differ (a batch whose count is wrong: see ``PcapngWriter.write``) -- valid
    during the call only, the writer reuses it), ``completed(path)`` (renamed to its
    final name), ``removed(path)`` (deleted by ``max_files``), ``discarded(path)`` (abandoned
    or aborted). Called from the writer's thread."""

    def opened(self, path: str, format: str, header_block: tuple[int, int] | None) -> None: ...
    def wrote(self, path: str, batch: PacketBatch, start: int, end: int,
              idb_positions: list[tuple[int, int]], offsets: npt.NDArray[np.int64] | None = None) -> None: ...
    def completed(self, path: str) -> None: ...
    def removed(self, path: str) -> None: ...
    def discarded(self, path: str) -> None: ...


class CaptureWriter:
    """The object :func:`open_writer` returns.

    ``write(batch, comments=None)`` appends a batch (interface identity from
    ``batch.interface``/``link_type``/``snaplen``, or each packet's from ``interfaces=``;
    ``comments`` only for pcapng),
    ``flush()`` pushes everything written so far to the OS (a compressed file gets a whole
    zstd block) and applies time rotation, ``close()`` completes the current file.
    ``paths``: completed files still on disk, oldest first; ``removed``: files deleted by
    ``max_files``; ``packets``/``bytes``: totals. Not thread-safe: use from one thread.
    """

    def __init__(self, target, *, format: str | None = None, hostname: str | None = None,
                 rotate_bytes: int | None = None, rotate_seconds: float | None = None,
                 max_files: int | None = None, fsync: bool = False, mode: int = 0o640,
                 nanosecond: bool = True, level: int = 3,
                 on_complete: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time, in_place: bool = False,
                 observer: WriteObserver | None = None, zstd_frame_bytes: int | None = None,
                 first_seq: int = 0, on_open: Callable[[str], None] | None = None) -> None:
        is_path = isinstance(target, (str, os.PathLike))
        if is_path:
            target = os.fspath(target)
        fmt = format or (format_from_name(target) if is_path else None) or "pcap"
        if fmt not in FORMATS.values():
            raise ValueError(f"unknown capture format {fmt!r}; one of {sorted(FORMATS.values())}")
        if not is_path and (rotate_bytes or rotate_seconds or max_files):
            raise ValueError("rotation needs a path, not a file object")
        for name, v in (("rotate_bytes", rotate_bytes), ("rotate_seconds", rotate_seconds),
                        ("max_files", max_files)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive")
        if zstd_frame_bytes is not None and not 0 < zstd_frame_bytes <= MAX_ZSTD_FRAME_BYTES:
            raise ValueError(f"zstd_frame_bytes must be 1..{MAX_ZSTD_FRAME_BYTES} (the seek table has 32-bit sizes)")
        if in_place and (not is_path or rotate_bytes or rotate_seconds or max_files):
            raise ValueError("in_place needs a path and no rotation")
        self.in_place = in_place  # write NAME itself (no NAME.part, no rename), like PacketStreamer
        self.format = fmt
        self._base = fmt.split(".")[0]
        self._zstd = fmt.endswith(".zst")
        self._target = target
        self._is_path = is_path
        self._hostname = hostname
        self._rotate_bytes = rotate_bytes
        self._rotate_seconds = rotate_seconds
        self._max_files = max_files
        self._rotating = bool(rotate_bytes or rotate_seconds or max_files)
        self._fsync = fsync
        self._mode = mode
        self._nanosecond = nanosecond
        self._level = level
        self.zstd_frame_bytes = zstd_frame_bytes if self._zstd else None
        self._on_complete = on_complete
        self._on_open = on_open  # called with a file's final name before its first byte (paths only)
        self._observer = observer if is_path else None
        # whether the observer takes the packets' offsets (``wrote(..., offsets=)``: observers
        # written before it existed get the five arguments they know)
        self._observer_offsets = self._observer is not None and _takes_offsets(self._observer)
        self._offsets: npt.NDArray[np.int64] | None = None  # (_offsets_for)
        self._clock = clock
        if first_seq < 0:
            raise ValueError("first_seq must be >= 0")
        # rotating: the next file's number at least (files of the pattern found in a directory
        # push it higher); a caller passes the numbers it must not reuse (FileSink.resume)
        self._seq = first_seq
        self._seq_scanned: set[str] = set()  # directories scanned for the numbers already used
        self._cur: PcapWriter | PcapngWriter | None = None
        self._zfile: ZstdFileWriter | None = None
        self._raw: Any = None   # the OS file under the current writer (paths only)
        self._cur_path: str | None = None
        # rotating: (path, seq, size, stream bytes) of the file completed last
        self._last_done: tuple[str, int, int, int] | None = None
        self._opened_at = 0.0
        self._link_type: int | None = None
        self.paths: list[str] = []
        # max_files: the completed files retention counts, oldest first -- this writer's and
        # those of its pattern that earlier writers (a reset, an earlier run) left in each
        # directory it writes to
        self._retained: list[str] = []
        self.removed: list[str] = []
        self.packets = 0
        self.bytes = 0
        self._closed = False

    # -- files -------------------------------------------------------------------------------
    def _next_path(self) -> str:
        name = self._target
        if "%" in name:
            name = time.strftime(name, time.localtime(self._clock()))
        if not self._rotating:
            return name
        stem, ext = split_ext(name)
        d = os.path.dirname(name) or "."
        if d not in self._seq_scanned:
            # number after every file of this pattern already in the directory (completed or
            # .part): a file with a higher number than the one open at a flush is then always
            # newer (crash recovery removes those: FileSink.recover), and names of earlier runs
            # are never reused; each directory a strftime pattern leads to is scanned on first use
            self._seq_scanned.add(d)
            found = rotated_files(self._target, d, parts=True)
            for seq, _path in found:
                self._seq = max(self._seq, seq + 1)
            if self._max_files:
                self._retained[:0] = [p for _seq, p in sorted(found) if not p.endswith(".part")]
        while True:
            path = f"{stem}.{self._seq:06d}{ext}"
            self._seq += 1
            if not os.path.exists(path) and not os.path.exists(path + ".part"):
                return path

    def _open(self) -> None:
        sink: Any
        if self._is_path:
            path = self._next_path()
            if self._on_open is not None:
                self._on_open(path)  # (an error stops the open: no file its caller does not know of)
            try:
                fd = os.open(self.data_path_of(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                             self._mode)
            except OSError as exc:  # (name the file asked for, not the .part it is written as)
                d = os.path.dirname(path) or "."
                if isinstance(exc, FileNotFoundError) and not os.path.isdir(d):
                    raise FileNotFoundError(exc.errno, f"directory {d} does not exist", path) from None
                raise type(exc)(exc.errno, exc.strerror, path) from None
            self._raw = os.fdopen(fd, "wb")
            self._cur_path = path
            sink = self._raw
        else:
            sink = self._target
        if self._zstd:
            self._zfile = ZstdFileWriter(sink, self._level, self.zstd_frame_bytes)
            sink = self._zfile
        if self._base == "pcap":
            self._cur = PcapWriter(sink, nanosecond=self._nanosecond, atomic=False)
        else:
            self._cur = PcapngWriter(sink, hostname=self._hostname, atomic=False)
        self._opened_at = self._clock()
        if self._observer is not None:
            head = (0, self._cur.file_bytes) if self._base == "pcapng" else None
            self._observer.opened(cast(str, self._cur_path), self.format, head)

    def _complete(self) -> None:
        """Finish the current file and rename it to its final name."""
        w = self._cur
        if w is None:
            return
        self._cur = None
        w.close()  # writes an empty pcap header if nothing was written; flushes
        if self._zfile is not None:
            self._zfile.finish()
            self._zfile = None
        if not self._is_path:
            self._target.flush()
            return
        raw, path = self._raw, self._cur_path
        assert raw is not None and path is not None  # a path target has a current file
        raw.flush()
        if self._fsync:
            os.fsync(raw.fileno())
        size = os.fstat(raw.fileno()).st_size
        raw.close()
        if not self.in_place:
            os.replace(path + ".part", path)
        self._raw = None  # (only now: a failure above leaves the file to abandon(), whose caller cuts it back)
        if self._rotating:
            self._last_done = (path, self._seq - 1, size, w.file_bytes)
        self.paths.append(path)
        if self._observer is not None:
            self._observer.completed(path)
        if self._max_files:
            self._retained.append(path)
            while len(self._retained) > self._max_files:
                old = self._retained.pop(0)
                if old in self.paths:
                    self.paths.remove(old)
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass
                self.removed.append(old)
                if self._observer is not None:
                    self._observer.removed(old)
        if self._on_complete is not None:
            self._on_complete(path)
        if self._fsync:  # (last: a failure leaves a file its caller knows of -- paths, on_complete --
            fsync_dir(os.path.dirname(os.path.abspath(path)))  # so its reset cuts or removes it)

    def _size(self) -> int:
        if self._cur is None:
            return 0
        if self._zfile is not None:
            return self._zfile.written
        return self._cur.file_bytes

    def _time_due(self) -> bool:
        return bool(self._rotate_seconds and self._cur is not None
                    and self._clock() - self._opened_at >= self._rotate_seconds)

    # -- public ------------------------------------------------------------------------------
    def data_path_of(self, path: str) -> str:
        """Where the data of the file to be named ``path`` is while it is written."""
        return path if self.in_place else path + ".part"

    @property
    def name_pattern(self) -> str | None:
        """The target path as given (strftime patterns unexpanded); None for a file object."""
        return self._target if self._is_path else None

    @property
    def current_seq(self) -> int | None:
        """Rotating writers: the sequence number in the current file's name (``NAME.000042.pcap``:
        42); later files of this writer get higher numbers. None when not rotating or no file is open."""
        return self._seq - 1 if self._rotating and self._cur is not None else None  # (_next_path's last)

    @property
    def last_completed(self) -> tuple[str, int, int, int] | None:
        """Rotating writers while no file is open (time rotation completed it at a flush or
        ``rotate_if_due``): the file completed last as (final name, sequence number, size in
        bytes, uncompressed stream bytes) -- crash recovery removes the files numbered after
        it. None otherwise."""
        return self._last_done if self._cur is None else None

    @property
    def stream_bytes(self) -> int:
        """Uncompressed bytes of the current file so far (its pcap/pcapng stream: equal to its
        size unless it is a ``.zst`` file); 0 when no file is open. After :meth:`flush` a
        ``.zst`` file decodes to exactly these bytes, whole records (crash recovery keeps that
        many, whatever the file's encoding)."""
        return self._cur.file_bytes if self._cur is not None else 0

    @property
    def next_seq(self) -> int:
        """Rotating writers: no file this writer opens from now on gets a lower number."""
        return self._seq

    @property
    def numbered(self) -> bool:
        """Rotating writers: whether :attr:`next_seq` is past every file of the pattern in the
        directory (it has opened a file, after scanning the directory); until then it is only
        the number the writer was given to start from."""
        return bool(self._seq_scanned)

    @property
    def current_path(self) -> str | None:
        """Final name of the file being written (its data is in ``current_path + '.part'``)."""
        return self._cur_path if self._cur is not None else None

    def fileno(self) -> int:
        if self._raw is not None:
            return self._raw.fileno()
        if not self._is_path:
            return self._target.fileno()
        raise ValueError("no file open")

    def write(self, batch: PacketBatch, comments: dict[int, str] | None = None, *, flush: bool = True,
              interfaces: PacketInterfaces | None = None) -> None:
        """Append every packet of ``batch`` (rotating first when a limit is reached) and push it
        to the OS (a compressed file ends a zstd block); ``flush=False``: left buffered (for many
        small batches: the next flush, rotation or close pushes them). ``interfaces``: the
        packets' own interfaces, as :meth:`PcapngWriter.write` takes them (a reader's
        ``batch_interfaces``; a pcap file has no interfaces and ignores them)."""
        if self._closed:
            raise ClosedError("CaptureWriter is closed")
        n = len(batch)
        if n == 0:
            return
        if interfaces is not None and self._base == "pcapng" and self._observer is not None:
            # an observer (the index) attributes a batch to its interface: one run at a time
            from pktstream.formats.reader import interface_runs
            for run, _, run_comments in interface_runs(batch, interfaces, comments):
                self.write(run, run_comments, flush=False)
            if flush:
                self._flush_current()
            return
        if interfaces is not None and self._base == "pcap":
            import numpy as np
            infos = interfaces[1]
            used = np.unique(np.asarray(interfaces[0])).tolist()
            if used and not 0 <= used[0] <= used[-1] < len(infos):
                raise ValueError(f"interface ids {used[0]}..{used[-1]} not among the {len(infos)} given")
            types = {infos[u].link_type for u in used}
            if len(types) > 1 or self._link_type is not None and types != {self._link_type}:
                known = {self._link_type} if self._link_type is not None else set()
                raise ValueError(mixed_link_types(types | known))
            interfaces = None  # (pcap has no interfaces)
        if self._base == "pcap":
            if self._link_type is None:
                self._link_type = batch.link_type
            elif batch.link_type != self._link_type:
                raise ValueError(mixed_link_types({self._link_type, batch.link_type}))
        if self._time_due():
            self._complete()
        if self._rotate_bytes and not self._zstd:
            self._write_split(batch, comments, interfaces)
        else:
            if self._rotate_bytes and self._cur is not None and self._size() >= self._rotate_bytes:
                self._complete()
            self._write_one(batch, comments, interfaces)
        self.packets += n
        self.bytes += batch.nbytes - 16 * n
        if flush:
            self._flush_current()

    def _write_one(self, batch: PacketBatch, comments, interfaces: PacketInterfaces | None = None) -> None:
        if self._cur is None:
            self._open()
        assert self._cur is not None
        before = self._cur.file_bytes
        if self._cur.file_bytes == 0 and self._base == "pcap":
            before = 24  # the header is written with the first batch
        nidb = len(getattr(self._cur, "idb_positions", ()))
        offsets = None
        if isinstance(self._cur, PcapngWriter):
            if self._observer_offsets and not batch.has_arrays:
                # the packets' offsets, found by the EPB conversion's own pass: the observer (the
                # index) then does not walk the records again, long out of the CPU caches by then
                offsets = self._offsets_for(len(batch))
            self._cur.write(batch, comments or None, interfaces=interfaces, offsets_out=offsets)
        else:
            self._cur.write(batch)
        if self._observer is not None:
            idbs = getattr(self._cur, "idb_positions", [])[nidb:]
            if idbs:
                before = idbs[-1][0] + idbs[-1][1]
            path = cast(str, self._cur_path)
            if offsets is None:
                self._observer.wrote(path, batch, before, self._cur.file_bytes, idbs)
            else:
                self._observer.wrote(path, batch, before, self._cur.file_bytes, idbs, offsets=offsets)

    def _offsets_for(self, n: int) -> npt.NDArray[np.int64]:
        """An int64 array of ``n`` entries for the EPB conversion to fill (one buffer, grown as
        needed, reused: the observer gets it for the duration of one call)."""
        import numpy as np
        buf = self._offsets
        if buf is None or len(buf) < n:
            buf = self._offsets = np.empty(max(n, 2 * len(buf) if buf is not None else 0, 1024), dtype=np.int64)
        return buf[:n]

    def _write_split(self, batch: PacketBatch, comments, interfaces: PacketInterfaces | None = None) -> None:
        """Uncompressed with rotate_bytes: cut the batch so no file exceeds the limit."""
        import numpy as np
        limit = self._rotate_bytes
        assert limit is not None  # only with rotate_bytes
        n = len(batch)
        cap = batch.caplen.astype(np.int64)
        per = 32 + ((cap + 3) & ~3) if self._base == "pcapng" else 16 + cap
        ends = np.cumsum(per)
        start = 0
        while start < n:
            if self._cur is None:
                self._open()
                # header (and an IDB the first packet of this interface may need)
            assert self._cur is not None
            room = limit - self._size()
            if isinstance(self._cur, PcapngWriter):  # the IDBs the rest may still need here
                rest = None if interfaces is None else (interfaces[0][start:], interfaces[1])
                room -= self._cur.new_idb_bytes(batch, rest)
            done = int(ends[start - 1]) if start else 0
            j = int(np.searchsorted(ends, done + room, side="right"))
            if j <= start:
                if self._cur.packets == 0:
                    j = start + 1  # a single packet larger than the limit gets its own file
                else:
                    self._complete()
                    continue
            part = slice_batch(batch, start, j)
            sub = {k - start: v for k, v in comments.items() if start <= k < j} if comments else None
            self._write_one(part, sub, None if interfaces is None else (interfaces[0][start:j], interfaces[1]))
            start = j
            if start < n:
                self._complete()

    def _flush_current(self) -> None:
        if self._cur is None:
            return
        if self._zfile is not None:
            self._zfile.flush()
        elif self._raw is not None:
            self._raw.flush()
        else:
            self._cur.flush()

    def rotate_if_due(self) -> bool:
        """Complete the current file if ``rotate_seconds`` have passed since it was opened, for
        callers that want time rotation while nothing is written; True if it did. The next
        write opens the next file."""
        if self._closed or not self._time_due():
            return False
        self._complete()
        return True

    def flush(self) -> None:
        """Hand all data written so far to the OS (whole zstd blocks); apply time rotation."""
        if self._closed:
            raise ClosedError("CaptureWriter is closed")
        if self._time_due():
            self._complete()
        else:
            self._flush_current()

    def close(self) -> None:
        """Complete the current file (an empty but valid file if nothing was ever written)."""
        if self._closed:
            return
        if self._cur is None and not self.paths and not self.removed:
            self._open()
        self._closed = True
        self._complete()

    def abort(self) -> None:
        """Stop without completing the current file: its ``.part`` file is removed
        (files already completed stay)."""
        if self._closed:
            return
        self._closed = True
        if self._cur is not None and self._is_path:
            self._cur = None
            self._zfile = None
            self._raw.close()
            self._raw = None
            try:
                os.unlink(self.data_path_of(cast(str, self._cur_path)))
            except FileNotFoundError:
                pass
            if self._observer is not None:
                self._observer.discarded(cast(str, self._cur_path))

    def abandon(self) -> str | None:
        """After a write error: drop the current file's state without writing anything more
        and return its final name (its data is in ``NAME.part``, possibly with a partial
        record at the end; the caller cuts it back). The writer opens a new file on the
        next write."""
        if self._raw is None or not self._is_path:  # (_raw: also a file whose completion failed)
            return None
        path = self._cur_path
        self._cur = None
        self._zfile = None
        if self._observer is not None:
            self._observer.discarded(cast(str, path))
        raw, self._raw = self._raw, None
        try:
            raw.close()  # may flush buffered bytes or fail again: both are cut back by the caller
        except OSError:
            pass
        return path

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _takes_offsets(observer: WriteObserver) -> bool:
    """Whether ``observer.wrote`` names an ``offsets`` parameter that can be passed by keyword
    (not ``**kwargs``: a forwarding proxy takes any keyword, the observer behind it may not)."""
    import inspect
    try:
        param = inspect.signature(observer.wrote).parameters.get("offsets")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def slice_batch(batch: PacketBatch, i: int, j: int) -> PacketBatch:
    """Packets i..j-1 of a batch, zero-copy."""
    off, cap = batch.offset, batch.caplen
    lo, hi = int(off[i]) - 16, int(off[j - 1]) + int(cap[j - 1])
    return PacketBatch.from_records(memoryview(batch)[lo:hi], link_type=batch.link_type,
                                    snaplen=batch.snaplen, interface=batch.interface,
                                    validate=False, count=j - i)


def mixed_link_types(types) -> str:
    """The one-line error for packets of several link types bound for one pcap file."""
    from pktstream._capture import link_type_name
    names = ", ".join(f"{link_type_name(t)} ({t})" for t in sorted(types))
    return f"link types {names} in one pcap file: a pcap file has one; write pcapng (-F pcapng or a .pcapng name)"


def open_writer(path: str | os.PathLike | BinaryIO, *, format: str | None = None,
                hostname: str | None = None, rotate_bytes: int | None = None,
                rotate_seconds: float | None = None, max_files: int | None = None,
                fsync: bool = False, mode: int = 0o640, nanosecond: bool = True, level: int = 3,
                on_complete: Callable[[str], None] | None = None,
                zstd_frame_bytes: int | None = None) -> CaptureWriter:
    """Open a capture file for writing; see :class:`CaptureWriter` and the module doc.

    :param path: file name, or a binary file object (stdout pipe; no rotation, format
        defaults to pcap).
    :param format: ``"pcap"``, ``"pcapng"``, ``"pcap.zst"`` or ``"pcapng.zst"``; default from
        the extension (unknown extension: pcap).
    :param hostname: host the packets come from, written in pcapng section/interface metadata.
    :param rotate_bytes: / :param rotate_seconds: / :param max_files: tcpdump -C / -G / -W.
    :param fsync: fsync each completed file and its directory.
    :param mode: permission bits of created files.
    :param nanosecond: pcap only: False writes the classic microsecond format.
    :param level: zstd level for the ``.zst`` formats.
    :param on_complete: called with the final path of each completed file.
    :param zstd_frame_bytes: ``.zst`` formats: None (default) writes one zstd frame per file;
        a size writes the seekable layout (independent frames of about that many uncompressed
        bytes plus a seek table; docs/ARCHIVE.md), which Wireshark 4.0 cannot open
        (``pktstream convert`` exports a single frame).
    """
    return CaptureWriter(path, format=format, hostname=hostname, rotate_bytes=rotate_bytes,
                         rotate_seconds=rotate_seconds, max_files=max_files, fsync=fsync, mode=mode,
                         nanosecond=nanosecond, level=level, on_complete=on_complete,
                         zstd_frame_bytes=zstd_frame_bytes)
