"""Query planning and execution: which files and parts to read, reading them, merging.

Plan per capture file: no catalog row or a stale one → *scan* (read the whole file); else the
catalog row prunes by time range, sensor and address/port summary, then the file's flow
records prune by the BPF subset :mod:`pktstream.archive.prune` understands, time and sensor,
leaving a set of chunks (ranges of the decompressed stream). Those ranges, with the pcapng
header blocks (SHB, IDBs) outside them, form a valid capture stream that the ordinary reader
parses; every packet read then passes the time bounds and the real BPF (libpcap).

Merging: each file's packets are put in time order as they are read (:class:`SortedFile`, which
holds a packet only until no later packet of its file can sort before it, from the chunks'
first time stamps) and files are merged k-way (:func:`merge_files`), opened only when the merge
reaches their first time stamp: memory is bounded by the files overlapping in time, not by the
size of the result.

Reading ranges: uncompressed files are read with seeks (ranged GETs on S3); compressed files
(one zstd frame, or gzip) are decompressed from the start and stop after the last range
(bounded decompression; docs/ARCHIVE.md explains the layout choice).
"""
from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import numpy as np

from pktstream.archive.index import sensor_of

_GAP_MERGE = 64 << 10  # ranges closer than this are read in one request


@dataclass
class FilePlan:
    """What to read of one file: ``segments`` (stream ranges, None = everything) and why."""
    path: str
    mode: str                     # "index" | "scan"
    segments: list[tuple[int, int]] | None
    compression: str | None = None
    reason: str = ""
    size: int = 0
    chunk_packets: list[int] | None = None    # packets of the chunks read, in file order (None: unknown)
    chunk_first_ts: list[int] | None = None   # their first time stamps (ns)

    @property
    def first_ts_ns(self) -> int | None:
        """No packet read from the file is older than this (None: unknown)."""
        return min(self.chunk_first_ts) if self.chunk_first_ts else None


@dataclass
class QueryStats:
    """What a query read and wrote."""
    files_total: int = 0
    files_read: int = 0
    files_scanned: int = 0
    flow_files_read: int = 0      # flow record (Parquet) files read to choose chunks: the catalog pruned the rest
    bytes_read: int = 0
    packets_read: int = 0
    packets: int = 0
    seconds: float = 0.0
    packets_held: int = 0         # matched packets read and not yet merged out, now
    peak_packets_held: int = 0    # ... at most (memory of a query: bounded by files, not by results)
    skipped: list[str] = field(default_factory=list)  # "path: why", a file with a link type the BPF cannot match
    scanned: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"read {self.files_read} of {self.files_total} files ({self.files_scanned} scanned without "
                f"a usable index; flow records of {self.flow_files_read} read), {self.bytes_read} bytes, "
                f"{self.packets_read} packets; "
                f"{self.packets} packets matched; {self.seconds:.3f} s")
        if self.skipped:
            text += f"; {len(self.skipped)} file(s) of a link type the filter cannot match"
        if self.problems:
            text += f"; {len(self.problems)} file(s) with problems"
        return text


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def segments_for(row: dict[str, Any], chunk_ids: list[int]) -> list[tuple[int, int]] | None:
    """Stream ranges to read for the chosen chunks of a file: file header + chunks + the
    pcapng header blocks outside them; None when the file must be read whole."""
    chunks = row["chunks"]
    if row["format"] == "pcapng" and (row.get("sections") or 1) > 1:
        return None
    ranges = merge_ranges([(chunks[c]["start"], chunks[c]["end"]) for c in chunk_ids])
    if row["format"] == "pcap":
        head = [(0, 24)]
    else:
        head = [(b["offset"], b["offset"] + b["length"]) for b in row["header_blocks"] or ()]
        if not head:
            return None
    segs = list(ranges)
    for hs, he in head:
        if not any(s <= hs and he <= e for s, e in ranges):
            segs.append((hs, he))
    segs.sort()
    for (_s1, e1), (s2, _e2) in zip(segs, segs[1:], strict=False):
        if s2 < e1:  # a header block overlapping a range boundary: not a layout we made
            return None
    return segs


class SegmentStream(io.RawIOBase):
    """The selected stream ranges of a capture file, concatenated, as a readable raw file.

    Uncompressed: each range is read where it is (seek or ranged GET). zstd with a seek table
    (the seekable layout; ``size``: the file's size, to find it): only the frames holding the
    ranges are read and decompressed. Other compressed files: decompressed from the start, gaps
    discarded; reading stops at the last range.
    ``compressed_read``: bytes taken from the file or object. Single use; not thread-safe.
    """

    def __init__(self, store, path: str, segments: list[tuple[int, int]], compression: str | None,
                 size: int = 0) -> None:
        self._segs = segments
        self._store = store
        self._path = path
        self._comp = compression
        self._i = 0
        self._pos = segments[0][0] if segments else 0
        self._buf = b""
        self._bpos = 0
        self.compressed_read = 0
        self._file: BinaryIO | None = None
        self._dec: Any = None
        self._dpos = 0  # decompressed stream position
        self._counter = None
        self._frames: SeekTable | None = None
        self._frame_k = -1          # the frame being decompressed into _frame_data
        self._frame_data = bytearray()  # frame bytes from _frame_off (frame-relative) on
        self._frame_off = 0
        self._frame_range: _Range | None = None
        self._frame_reader: Any = None
        if compression is None and hasattr(store, "root"):
            self._file = store.open(path)
        elif compression == "zstd" and size and segments:
            if hasattr(store, "root"):
                self._file = store.open(path)
            self._frames = read_seek_table(store, path, size, self._file)
            if self._frames is None and self._file is not None:
                self._file.close()
                self._file = None
        if self._frames is not None:
            pass
        elif compression is not None:
            raw = store.open(path)
            self._counter = _Counting(raw)
            if compression == "zstd":
                # whole zstd blocks at a time: everything before a damaged block is delivered
                from pktstream.formats.reader import ZstdBlockReader
                self._dec = _Reading(ZstdBlockReader(self._counter, path))
            else:
                import gzip
                self._dec = gzip.GzipFile(fileobj=self._counter)

    def readable(self) -> bool:
        return True

    def _fetch(self) -> bytes:
        """The next piece of the current segment (b"" at the end of all segments)."""
        while self._i < len(self._segs):
            s, e = self._segs[self._i]
            if self._pos >= e:
                self._i += 1
                if self._i < len(self._segs):
                    self._pos = self._segs[self._i][0]
                continue
            want = min(e - self._pos, 1 << 20)
            if self._frames is not None:
                data = self._frame_piece(self._pos + want)
            elif self._dec is None:
                if self._file is not None:
                    data = self._store.read_range(self._path, self._pos, self._pos + want, self._file)
                else:
                    data = self._store.read_range(self._path, self._pos, self._pos + want)
                self.compressed_read += len(data)
            else:
                while self._dpos < self._pos:  # skip the gap
                    skip = self._dec.read(min(self._pos - self._dpos, 1 << 20))
                    if not skip:
                        return b""
                    self._dpos += len(skip)
                data = self._dec.read(want)
                self._dpos += len(data)
                self.compressed_read = self._counter.count if self._counter is not None else 0
            if not data:
                return b""
            self._pos += len(data)
            return data
        return b""

    def _frame_piece(self, end: int) -> bytes:
        """Stream bytes from ``_pos`` to at most ``end`` out of the frame holding ``_pos``. A
        frame is decompressed from its start only as far as needed (whole zstd blocks, 128 KiB
        of compressed data read at a time), so a pcap header costs one read, not a frame."""
        t = self._frames
        assert t is not None
        k = t.frame_of(self._pos)
        if k < 0:
            return b""  # past the end of the data (an index of another file version)
        if k != self._frame_k or self._pos - t.decompressed[k] < self._frame_off:  # (backwards: from the start)
            from pktstream.formats.reader import ZstdBlockReader
            self._frame_range = _Range(self._store, self._path, t.compressed[k], t.compressed[k + 1], self._file)
            self._frame_reader = ZstdBlockReader(self._frame_range, f"{self._path} frame {k}")
            self._frame_k, self._frame_data, self._frame_off = k, bytearray(), 0
        base, fend = t.decompressed[k], t.decompressed[k + 1]
        need = min(end, fend) - base  # frame-relative end of what is asked
        data = self._frame_data
        # segments are read in ascending order: bytes before _pos are never needed again, so
        # at most one piece (<= 1 MiB + a zstd block) is held, whatever the frame size
        drop = min(self._pos - base - self._frame_off, len(data))
        if drop > 0:
            del data[:drop]
            self._frame_off += drop
        rng = self._frame_range
        assert rng is not None
        if self._frame_off + len(data) < need:
            before = rng.count
            buf = bytearray(1 << 17)
            while self._frame_off + len(data) < need:
                n = self._frame_reader.readinto(buf)
                if not n:
                    raise ValueError(f"frame {k} at compressed byte {t.compressed[k]}: "
                                     f"{self._frame_off + len(data)} bytes, the seek table says {fend - base}")
                skip = max(0, self._pos - base - self._frame_off - len(data))  # a gap: not kept
                data += buf[min(skip, n):n]
                self._frame_off += min(skip, n)
                if self._frame_off + len(data) > fend - base:
                    raise ValueError(f"frame {k} at compressed byte {t.compressed[k]}: more data than the seek "
                                     f"table says ({fend - base} bytes)")
            self.compressed_read += rng.count - before
        return bytes(data[self._pos - base - self._frame_off:need - self._frame_off])

    def readinto(self, b) -> int:
        if self._bpos >= len(self._buf):
            self._buf = self._fetch()
            self._bpos = 0
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf) - self._bpos)
        b[:n] = self._buf[self._bpos:self._bpos + n]
        self._bpos += n
        return n

    def close(self) -> None:
        for f in (self._dec, self._counter, self._file):
            if f is not None:
                try:
                    f.close()
                except Exception:
                    pass
        super().close()


class SeekTable:
    """Frame boundaries of a zstd file in the seekable layout: ``compressed[k]`` and
    ``decompressed[k]`` are where frame k starts in the file and in the decompressed stream
    (one more entry each: the ends)."""

    def __init__(self, compressed: list[int], decompressed: list[int]) -> None:
        self.compressed = compressed
        self.decompressed = decompressed

    def frame_of(self, pos: int) -> int:
        """The frame holding decompressed byte ``pos`` (-1: past the end)."""
        import bisect
        k = bisect.bisect_right(self.decompressed, pos) - 1
        return k if 0 <= k < len(self.decompressed) - 1 else -1


MAX_SEEK_FRAMES = 1 << 20   # a table with more entries is not believed (1 Mi frames: an 8-12 MiB table)
MAX_FRAME_BYTES = 1 << 30   # nor a frame decompressing to more (the writer's limit)


def read_seek_table(store, path: str, size: int, f: BinaryIO | None = None) -> SeekTable | None:
    """The seek table at the end of a zstd file of ``size`` bytes, or None when it has none (a
    single frame) or one that does not fit the file (every size is checked against it)."""
    import struct

    from pktstream.formats.writer import SEEKABLE_MAGIC, SKIPPABLE_SEEK_TABLE

    def rng(s: int, e: int) -> bytes:
        return store.read_range(path, s, e, f) if f is not None else store.read_range(path, s, e)

    if size < 17:
        return None
    foot = rng(size - 9, size)
    if len(foot) != 9:
        return None
    n, desc, magic = struct.unpack("<IBI", foot)
    if magic != SEEKABLE_MAGIC or desc & 0x7C or n == 0 or n > MAX_SEEK_FRAMES:
        return None
    entry = 12 if desc & 0x80 else 8
    body = n * entry + 9
    if 8 + body > size or n > (size - 8 - body) // 9:  # n frames of >= 9 bytes must fit before it
        return None
    data = rng(size - 8 - body, size - 9)
    if len(data) != 8 + n * entry:
        return None
    fmagic, flen = struct.unpack_from("<II", data, 0)
    if fmagic != SKIPPABLE_SEEK_TABLE or flen != body:
        return None
    import numpy as np
    cols = np.frombuffer(data, "<u4", offset=8).reshape(n, entry // 4)  # one pass, no per-entry objects
    c, d = cols[:, 0].astype(np.int64), cols[:, 1].astype(np.int64)
    if (c < 9).any() or (d > MAX_FRAME_BYTES).any():  # a zstd frame is at least 9 bytes
        return None
    comp = np.concatenate(([0], np.cumsum(c)))
    if int(comp[-1]) != size - 8 - body:  # the frames and the table must be the whole file
        return None
    return SeekTable(comp.tolist(), np.concatenate(([0], np.cumsum(d))).tolist())


class _Range:
    """``read(n)`` over bytes ``[start, end)`` of a stored file (seeks or ranged GETs);
    ``count``: bytes read."""

    def __init__(self, store, path: str, start: int, end: int, f: BinaryIO | None) -> None:
        self._store, self._path, self._f = store, path, f
        self._pos, self._end = start, end
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        stop = self._end if n < 0 else min(self._end, self._pos + n)
        if stop <= self._pos:
            return b""
        if self._f is not None:
            data = self._store.read_range(self._path, self._pos, stop, self._f)
        else:
            data = self._store.read_range(self._path, self._pos, stop)
        self._pos += len(data)
        self.count += len(data)
        return data


class _Reading:
    """``read(n)`` over an object that only has ``readinto``."""

    def __init__(self, f) -> None:
        self._f = f

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        k = self._f.readinto(buf)
        return bytes(buf[:k])

    def close(self) -> None:
        self._f.close()


class _Counting(io.RawIOBase):
    def __init__(self, f) -> None:
        self._f = f
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        return n

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


class ZstdChecked(io.RawIOBase):
    """A file decompressed whole zstd blocks at a time when it starts with a zstd frame (else
    passed through): ``truncated`` tells afterwards whether the data ended inside a frame."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        from pktstream.formats._common import starts_zstd
        from pktstream.formats.reader import ZstdBlockReader
        self._buf: Any = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(cast(Any, raw), 1 << 17)
        self._z = ZstdBlockReader(self._buf, name) if starts_zstd(self._buf.peek(4)[:4]) else None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._z.readinto(b) if self._z is not None else self._buf.readinto(b)

    @property
    def truncated(self) -> bool:
        return self._z is not None and not self._z.complete

    @property
    def compression(self) -> str | None:
        return "zstd" if self._z is not None else None

    def close(self) -> None:
        try:
            self._buf.close()
        finally:
            super().close()


def iter_plan(store, plan: FilePlan, *, bpf: str | None, since: int | None, until: int | None,
              sensors: set[str] | None, stats: QueryStats,
              warn: Callable[[str], None]) -> Iterator[tuple[Any, int, Any]]:
    """Packets of one planned file passing the bounds and the BPF, as they are read:
    ``(batch or None, done, positions)`` (None: nothing of the last batch read matched);
    ``done``: the first ``done`` packets of the file (in file order) have all been delivered --
    the reader hands out a read buffer's packets per interface, so packets read are not always
    a prefix; ``positions``: the batch's packets' places in the order of the packets read
    (int64, increasing; the tie-break of equal time stamps), None with a None batch.
    A batch's ``interface`` is ``sensor/interface``. Problems are reported through ``warn``;
    the file is closed when the generator ends or is closed."""
    from pktstream._capture import PacketBatch
    from pktstream._records import take_mask
    from pktstream.formats import open_reader
    seg: Any
    checked = None
    if plan.segments is None:  # the whole file, whatever its format (the reader checks the magic)
        seg = _Counting(store.open(plan.path))
        checked = ZstdChecked(seg, plan.path)
        src = io.BufferedReader(checked, 1 << 20)
    else:
        seg = SegmentStream(store, plan.path, plan.segments, plan.compression, plan.size)
        src = io.BufferedReader(seg, 1 << 20)
    failed = False
    notes: list[str] = []
    refused: set[int] = set()  # link types of this file the BPF cannot be compiled for
    n_read = 0
    done = 0          # packets in file order before every packet still to come (all delivered)
    last_range = None
    reader = None
    # a truncated file is noted by the reader's callback, not through the warnings module (whose
    # catch_warnings is process-wide state: wrong with several files read interleaved, or with
    # queries in threads, as pktstream serve runs them)

    try:
        try:
            reader = open_reader(src, truncated=lambda msg, offset: notes.append(msg))
            it = iter(reader)
        except Exception as exc:
            failed = True
            it = iter(())
            _problem(plan, exc, stats, warn)
        while True:
            try:
                batch = next(it, None)
            except Exception as exc:  # damaged file, unreadable object: named, the query goes on
                failed = True
                _problem(plan, exc, stats, warn)
                break
            if batch is None:
                break
            rng = getattr(reader, "last_range", None)
            if rng is None or rng != last_range:  # a new read buffer: everything before it was delivered
                done, last_range = n_read, rng
            n_read += len(batch)
            stats.packets_read += len(batch)
            sensor, itf = sensor_of(batch.interface, plan.path)
            if sensors is not None and sensor not in sensors:
                yield None, done, None
                continue
            mask = None
            if since is not None or until is not None:
                ts = batch.ts_ns
                mask = np.ones(len(batch), bool)
                if since is not None:
                    mask &= ts >= since
                if until is not None:
                    mask &= ts < until
            if bpf:
                m2 = _filter_mask(batch, bpf, plan, refused, stats, warn)
                mask = m2 if mask is None else mask & m2
            name = f"{sensor}/{itf}"
            assert reader is not None  # a batch came from it
            positions = reader.last_positions()
            if mask is None or mask.all():
                b = PacketBatch.from_records(memoryview(batch), link_type=batch.link_type,
                                             snaplen=batch.snaplen, interface=name, validate=False,
                                             count=len(batch))
            elif mask.any():
                positions = positions[mask]
                recs, n = take_mask(memoryview(batch), batch.offset, batch.caplen, mask.view(np.uint8))
                b = PacketBatch.from_records(recs, link_type=batch.link_type, snaplen=batch.snaplen,
                                             interface=name, validate=False, count=n)
            else:
                yield None, done, None
                continue
            yield b, done, positions
    finally:
        stats.bytes_read += seg.count if isinstance(seg, _Counting) else seg.compressed_read
        if reader is not None:
            try:
                reader.close()
            except Exception:
                pass
        src.close()
    if checked is not None and checked.truncated and not failed:
        notes.append("truncated zstd data: the file ends inside its frame")
    if plan.segments is None:
        for note in notes:
            msg = f"{plan.path}: {note}"
            stats.problems.append(msg)
            warn(msg)


# link types (libpcap's DLT numbers, as batches carry them) a filter is tried on, the usual ones
# first, then every other value libpcap may know (~5 ms for a filter none takes): if any takes
# it, the filter is good, and a file whose link type refuses it only cannot match (tcpdump -r
# would print none of its packets) -- Ethernet, SLL2, SLL, raw IP, NULL, IPv4, IPv6, 802.11,
# radiotap, then the rest (pflog's "action pass", SunATM's "vpi", MTP2's "sio", ...)
_PROBE_FIRST = (1, 276, 113, 12, 0, 228, 229, 105, 127)
_PROBE_LINK_TYPES = _PROBE_FIRST + tuple(t for t in range(512) if t not in _PROBE_FIRST)
_GOOD_FILTERS: set[str] = set()  # filters some link type took (a failure is not kept: a host
# name that did not resolve may resolve later)


def check_filter(bpf: str) -> None:
    """Raise :class:`~pktstream.exceptions.FilterError` (libpcap's message for Ethernet) when
    no link type takes ``bpf`` -- a syntax error, before anything is read; a filter some link
    types refuse (``inbound`` on Ethernet, ``action pass`` off pflog) is left to each file."""
    if not _compiles_somewhere(bpf):
        from pktstream._capture import BpfProgram
        BpfProgram(bpf, 1)  # raises, with libpcap's message (or takes it now: a name resolved)


def _compiles_somewhere(bpf: str) -> bool:
    if bpf in _GOOD_FILTERS:
        return True
    from pktstream._capture import BpfProgram
    from pktstream.exceptions import FilterError
    for link_type in _PROBE_LINK_TYPES:
        try:
            BpfProgram(bpf, link_type)
        except FilterError:
            continue
        if len(_GOOD_FILTERS) < 256:
            _GOOD_FILTERS.add(bpf)
        return True
    return False


def _filter_mask(batch, bpf: str, plan: FilePlan, refused: set[int], stats: QueryStats,
                 warn: Callable[[str], None]) -> np.ndarray:
    """``batch.filter(bpf)``; a filter libpcap refuses for this batch's link type only (``ip``
    on raw IPv6, ``ether host`` on raw IP: "expression rejects all packets") matches none of
    its packets, named once per file and link type -- one such file does not fail the query,
    as it would not fail a ``tcpdump -r`` of the other files. A filter no link type takes
    (a syntax error) raises :class:`~pktstream.exceptions.FilterError`."""
    from pktstream.exceptions import FilterError
    if batch.link_type in refused:  # (not compiled again for every batch)
        return np.zeros(len(batch), bool)
    try:
        return batch.filter(bpf)
    except FilterError as exc:
        if not _compiles_somewhere(bpf):
            raise
        reason = str(exc).rsplit(": ", 1)[-1]
        msg = f"{plan.path}: no packet can match the filter (link type {batch.link_type_name}: {reason})"
        if not refused:  # (one entry per file)
            stats.skipped.append(msg)
        refused.add(batch.link_type)
        warn(msg)
        return np.zeros(len(batch), bool)


def _problem(plan: FilePlan, exc: BaseException, stats: QueryStats, warn: Callable[[str], None]) -> None:
    msg = f"{plan.path}: {' '.join(str(exc).split()) or type(exc).__name__}"
    stats.problems.append(msg)
    warn(msg)


def read_plan(store, plan: FilePlan, *, bpf: str | None, since: int | None, until: int | None,
              sensors: set[str] | None, stats: QueryStats, warn: Callable[[str], None]) -> list:
    """Every batch of :func:`iter_plan` in a list (file order)."""
    return [b for b, _, _ in iter_plan(store, plan, bpf=bpf, since=since, until=until, sensors=sensors,
                                    stats=stats, warn=warn) if b is not None]


_NEG = -(1 << 63)
_POS = 1 << 63


def _sorted_runs(batches: list, ts, pick, keys=None) -> list:
    """The packets ``pick`` (indices into the concatenation of ``batches``, whose time stamps
    are ``ts``) in time order, equal time stamps in ``keys`` order (None: in ``pick`` order), as
    zero-copy slices of the batches (runs of consecutive packets of one batch)."""
    from pktstream.formats.writer import slice_batch
    sizes = np.fromiter((len(b) for b in batches), np.int64, len(batches))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if keys is None:
        order = pick[np.argsort(ts[pick], kind="stable")]
    else:
        order = pick[np.lexsort((keys[pick], ts[pick]))]
    w = np.searchsorted(starts, order, side="right") - 1
    k = order - starts[w]
    brk = np.flatnonzero((w[1:] != w[:-1]) | (k[1:] != k[:-1] + 1)) + 1
    rs = np.concatenate([[0], brk]).tolist()
    re_ = np.concatenate([brk, [len(order)]]).tolist()
    out = []
    for s, e in zip(rs, re_):
        b = batches[int(w[s])]
        i, j = int(k[s]), int(k[e - 1]) + 1
        out.append(b if (i == 0 and j == len(b)) else slice_batch(b, i, j))
    return out


class SortedFile:
    """One file's matching packets in time order, equal time stamps in file order, read lazily.

    ``source`` is :func:`iter_plan`'s generator. ``chunk_packets``/``chunk_first_ts``: the
    packets and first time stamps of the file's chunks in the order they are read (None: not
    known, e.g. a file without an index). A packet read is held until no packet still to be
    read can sort before it: all later packets lie in the current or later chunks, so the
    smallest first time stamp of those is a lower bound (known once the reader starts its next
    read buffer); a packet at that bound waits too unless it lies before every packet still to
    be read (one still to come from the current read buffer may precede it in the file). A
    file in time order is thus held about a read buffer (~1 MiB of stream) and a chunk (~256
    KiB) at a time; one whose chunks overlap in time (a merged file of several sensors) a
    little more; a file without chunk information is held whole.
    ``counter.packets_held``/``peak_packets_held`` count the packets held (read, not yet merged).
    Single use; not thread-safe.
    """

    def __init__(self, source: Iterator[tuple[Any, int, Any]], chunk_packets: list[int] | None,
                 chunk_first_ts: list[int] | None, counter: QueryStats) -> None:
        self._src = source
        self._buf: list = []
        self._keys: list = []          # file-order positions of _buf's packets
        self._ready: deque = deque()   # released batches, in time order
        self._counter = counter
        self._done = False
        self._buf_min = _POS     # smallest time stamp held in _buf
        self._ends: np.ndarray | None = None
        if chunk_packets:
            self._ends = np.cumsum(np.asarray(chunk_packets, np.int64))
            first = np.asarray(chunk_first_ts, np.int64)
            self._sufmin = np.minimum.accumulate(first[::-1])[::-1]

    def _bound(self, done: int) -> int:
        if self._ends is None:
            return _NEG
        k = int(np.searchsorted(self._ends, done, side="right"))
        return int(self._sufmin[k]) if k < len(self._sufmin) else _POS

    def _release(self, bound: int, done: int) -> None:
        """Release every held packet that sorts before all packets still to be read: time
        stamp below ``bound``, or at it and among the first ``done`` packets of the file."""
        if not self._buf or bound < self._buf_min:  # nothing releasable: no work per batch read
            return
        if len(self._buf) == 1:
            b = self._buf[0]
            ts = b.ts_ns
            if (len(ts) and (ts[-1] < bound or (ts[-1] == bound and self._keys[0][-1] < done))
                    and (len(ts) < 2 or bool((ts[1:] >= ts[:-1]).all()))):
                self._ready.append(b)  # the common case: in order, all releasable
                self._buf, self._keys, self._buf_min = [], [], _POS
                return
        ts = np.concatenate([b.ts_ns for b in self._buf])
        keys = np.concatenate(self._keys)
        sel = (ts < bound) | ((ts == bound) & (keys < done))
        if not sel.any():
            return
        self._ready.extend(_sorted_runs(self._buf, ts, np.flatnonzero(sel), keys))
        if sel.all():
            self._buf, self._keys, self._buf_min = [], [], _POS
            return
        self._buf_min = int(ts[~sel].min())
        from pktstream._capture import PacketBatch
        from pktstream._records import take_mask
        rest, rest_keys = [], []
        pos = 0
        for b, k in zip(self._buf, self._keys):
            keep = ~sel[pos:pos + len(b)]
            pos += len(b)
            if keep.all():
                rest.append(b)
                rest_keys.append(k)
            elif keep.any():
                recs, n = take_mask(memoryview(b), b.offset, b.caplen, keep.view(np.uint8))
                rest.append(PacketBatch.from_records(recs, link_type=b.link_type, snaplen=b.snaplen,
                                                     interface=b.interface, validate=False, count=n))
                rest_keys.append(k[keep])
        self._buf, self._keys = rest, rest_keys

    def next_batch(self):
        """The next batch in time order, or None at the end."""
        while not self._ready:
            if self._done:
                return None
            item = next(self._src, None)
            if item is None:
                self._done = True
                self._release(_POS, _POS)
                continue
            b, done, positions = item
            if b is not None:
                self._buf.append(b)
                self._keys.append(positions)
                self._buf_min = min(self._buf_min, int(b.ts_ns.min()))
                c = self._counter
                c.packets_held += len(b)
                c.peak_packets_held = max(c.peak_packets_held, c.packets_held)
            self._release(self._bound(done), done)
        return self._ready.popleft()

    def close(self) -> None:
        close = getattr(self._src, "close", None)
        if close is not None:
            close()


class _Open:
    """A file being merged: its sorted source, the batches taken from it not yet merged out."""

    __slots__ = ("i", "f", "bufs", "done")

    def __init__(self, i: int, f: SortedFile) -> None:
        self.i, self.f, self.done = i, f, False
        self.bufs: list[Any] = []

    def pull(self) -> None:
        b = self.f.next_batch()
        if b is None:
            self.done = True
        else:
            self.bufs.append(b)


def merge_files(files: list[tuple[int | None, Callable[[], SortedFile]]], counter: QueryStats) -> Iterator:
    """k-way merge of files' time-ordered packets: ``files`` in tie order, each
    ``(lower bound of its time stamps or None, opener)``. Stable: equal time stamps keep the
    file order, then the order in the file. A file is opened only when the merge reaches its
    lower bound, so only files overlapping in time are open together. Works in rounds: every
    packet older than the newest packet taken from the file that is furthest behind (and than
    the next file's lower bound) can be merged now, in one vectorised stable sort. Yields
    zero-copy slices."""
    from pktstream.formats.writer import slice_batch
    lbs = [_NEG if lb is None else lb for lb, _ in files]
    pending = deque(sorted(range(len(files)), key=lambda i: (lbs[i], i)))
    active: list[_Open] = []
    try:
        while True:
            for o in active:
                if not o.bufs and not o.done:
                    o.pull()
            active = [o for o in active if o.bufs or not o.done]
            head = min((int(o.bufs[0].ts_ns[0]) for o in active), default=None)
            if pending and (head is None or lbs[pending[0]] <= head):
                i = pending.popleft()
                o = _Open(i, files[i][1]())
                active.append(o)
                active.sort(key=lambda x: x.i)
                continue
            if not active:
                break
            # every packet still to come is >= bound
            bound = min((_POS if o.done else int(o.bufs[-1].ts_ns[-1]) for o in active), default=_POS)
            if pending:
                bound = min(bound, lbs[pending[0]])
            pieces = []
            for o in active:
                k = 0
                while k < len(o.bufs):
                    b = o.bufs[k]
                    j = int(np.searchsorted(b.ts_ns, bound, side="left")) if bound < _POS else len(b)
                    if j == len(b):
                        pieces.append(b)
                        k += 1
                        continue
                    if j:
                        pieces.append(slice_batch(b, 0, j))
                        o.bufs[k] = slice_batch(b, j, len(b))
                    break
                del o.bufs[:k]
            if not pieces:  # the files behind have only packets at the bound: take more of them
                for o in active:
                    if not o.done and int(o.bufs[-1].ts_ns[-1]) == bound:
                        o.pull()
                continue
            if len(pieces) == 1:
                runs = pieces
            else:
                ts = np.concatenate([b.ts_ns for b in pieces])
                runs = _sorted_runs(pieces, ts, np.arange(len(ts)))
            for r in runs:
                counter.packets_held -= len(r)
                yield r
    finally:
        for o in active:
            o.f.close()

