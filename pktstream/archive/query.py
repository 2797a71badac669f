"""Query planning and execution: which files and parts to read, reading them, merging.

Plan per capture file: no catalog row or a stale one → *scan* (read the whole file); else the
catalog row prunes by time range, sensor and address/port summary, then the file's flow
records prune by the BPF subset :mod:`pktstream.archive.prune` understands, time and sensor,
leaving a set of chunks (ranges of the decompressed stream). Those ranges, with the pcapng
header blocks (SHB, IDBs) outside them, form a valid capture stream that the ordinary reader
parses; every packet read then passes the time bounds and the real BPF (libpcap).

Reading ranges: uncompressed files are read with seeks (ranged GETs on S3); compressed files
(one zstd frame, or gzip) are decompressed from the start and stop after the last range
(bounded decompression; docs/ARCHIVE.md explains the layout choice).
"""
from __future__ import annotations

import io
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


@dataclass
class QueryStats:
    """What a query read and wrote."""
    files_total: int = 0
    files_read: int = 0
    files_scanned: int = 0
    bytes_read: int = 0
    packets_read: int = 0
    packets: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    scanned: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"read {self.files_read} of {self.files_total} files ({self.files_scanned} scanned without "
                f"a usable index), {self.bytes_read} bytes, {self.packets_read} packets; "
                f"{self.packets} packets matched; {self.seconds:.3f} s")
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

    Uncompressed: each range is read where it is (seek or ranged GET). Compressed: the file
    is decompressed from its start and gaps are discarded; reading stops at the last range.
    ``compressed_read``: bytes taken from the file or object. Single use; not thread-safe.
    """

    def __init__(self, store, path: str, segments: list[tuple[int, int]], compression: str | None) -> None:
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
        if compression is None and hasattr(store, "root"):
            self._file = store.open(path)
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
            if self._dec is None:
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
        from pktstream.formats.reader import ZstdBlockReader
        self._buf: Any = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(cast(Any, raw), 1 << 17)
        self._z = ZstdBlockReader(self._buf, name) if self._buf.peek(4)[:4] == b"\x28\xb5\x2f\xfd" else None

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


def read_plan(store, plan: FilePlan, *, bpf: str | None, since: int | None, until: int | None,
              sensors: set[str] | None, stats: QueryStats, warn: Callable[[str], None]) -> list:
    """Packets of one planned file passing the bounds and the BPF: a list of
    ``(batch, "sensor/interface")`` in file order. Problems are reported through ``warn``."""
    import warnings

    from pktstream._capture import PacketBatch
    from pktstream._records import take_mask
    from pktstream.formats import TruncatedFileWarning, open_reader
    out = []
    seg: Any
    checked = None
    if plan.segments is None:  # the whole file, whatever its format (the reader checks the magic)
        seg = _Counting(store.open(plan.path))
        checked = ZstdChecked(seg, plan.path)
        src = io.BufferedReader(checked, 1 << 20)
    else:
        seg = SegmentStream(store, plan.path, plan.segments, plan.compression)
        src = io.BufferedReader(seg, 1 << 20)
    failed = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedFileWarning)
        try:
            with open_reader(src) as r:
                for batch in r:
                    stats.packets_read += len(batch)
                    sensor, itf = sensor_of(batch.interface, plan.path)
                    if sensors is not None and sensor not in sensors:
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
                        m2 = batch.filter(bpf)
                        mask = m2 if mask is None else mask & m2
                    name = f"{sensor}/{itf}"
                    if mask is None or mask.all():
                        b = PacketBatch.from_records(memoryview(batch), link_type=batch.link_type,
                                                     snaplen=batch.snaplen, interface=name, validate=False,
                                                     count=len(batch))
                    elif mask.any():
                        recs, n = take_mask(memoryview(batch), batch.offset, batch.caplen, mask.view(np.uint8))
                        b = PacketBatch.from_records(recs, link_type=batch.link_type, snaplen=batch.snaplen,
                                                     interface=name, validate=False, count=n)
                    else:
                        continue
                    out.append(b)
        except Exception as exc:  # damaged file, unreadable object: named, the query goes on
            failed = True
            msg = f"{plan.path}: {' '.join(str(exc).split()) or type(exc).__name__}"
            stats.problems.append(msg)
            warn(msg)
        finally:
            stats.bytes_read += seg.count if isinstance(seg, _Counting) else seg.compressed_read
            src.close()
    notes = [str(w.message) for w in caught if issubclass(w.category, TruncatedFileWarning)]
    if checked is not None and checked.truncated and not failed:
        notes.append("truncated zstd data: the file ends inside its frame")
    if plan.segments is None:
        for note in notes:
            msg = f"{plan.path}: {note}"
            stats.problems.append(msg)
            warn(msg)
    return out


def merge_batches(per_file: list[list]) -> Iterator:
    """Batches of all files merged in time order (ties: earlier file, earlier packet first),
    as zero-copy slices of the input batches."""
    from pktstream.formats.writer import slice_batch
    batches = [b for lst in per_file for b in lst]
    if not batches:
        return
    ts = np.concatenate([b.ts_ns for b in batches])
    which = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in enumerate(batches)])
    idx = np.concatenate([np.arange(len(b), dtype=np.int64) for b in batches])
    order = np.argsort(ts, kind="stable")
    w, k = which[order], idx[order]
    # runs: consecutive packets of one batch
    brk = np.flatnonzero((w[1:] != w[:-1]) | (k[1:] != k[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(order)]])
    for s, e in zip(starts.tolist(), ends.tolist()):
        b = batches[int(w[s])]
        i, j = int(k[s]), int(k[e - 1]) + 1
        yield b if (i == 0 and j == len(b)) else slice_batch(b, i, j)
