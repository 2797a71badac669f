"""Capture-file readers: pcap (µs/ns, both byte orders), pcapng, zstd- and gzip-compressed.

The format is detected from the magic bytes, never from the file name. Every reader yields
:class:`~pktstream.PacketBatch` objects in pktstream's block layout (LE records, ns stamps):

* by default a little-endian nanosecond pcap file is read (``readinto``) into a buffer of
  ``batch_bytes`` and wrapped without a further copy; other pcap files and every pcapng file
  are converted in C (``pktstream._records``), one buffer of ``batch_bytes`` at a time. A file
  truncated while it is read (or while batches of it are held) ends the reading with a
  :class:`TruncatedFileWarning`; batches already delivered keep their bytes;
* ``memory_map=True`` (opt-in): an uncompressed regular file opened by path (not a ``*.part``
  file, which a writer is still growing) is memory-mapped read-only up to its size at open. LE
  ns pcap batches are views into the mapping (no copy: 10-30 % less CPU than read(),
  bench/README.md), other formats are converted straight out of it. Before every batch the
  size is checked (``fstat``) and the window is populated (``MADV_POPULATE_READ``, which fails
  instead of a SIGBUS on pages a truncation cut off); a file that grew or shrank is read on
  with ``read()`` from there. Residual risk, why it is not the default: a file truncated by
  someone else while batches of it are held, or an I/O error on it, kills the process with
  SIGBUS when those pages are touched. Only for files nobody truncates or overwrites while
  they are read (deleting or renaming them is harmless);
* a pcapng batch holds packets of one interface (``batch.interface`` is the IDB's
  ``if_name``, else ``"if<N>"`` with N the interface's index in the file).

Lengths from the file are checked before anything is allocated (``MAX_CAPLEN``,
``MAX_BLOCK``); a file that ends inside a record gives a :class:`TruncatedFileWarning` (or
:class:`~pktstream.FileFormatError` with ``truncated="error"``) naming the byte offset, after
every complete packet before it has been delivered.
"""
from __future__ import annotations

import errno
import gzip
import io
import mmap
import os
import stat
import struct
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pktstream._capture import PacketBatch
from pktstream._records import STATUS, buffer_exported, new_buffer, pcap_walk, pcapng_walk, take_mask, take_records
from pktstream.exceptions import FileFormatError
from pktstream.formats._common import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_SNAPLEN,
    GZIP_MAGIC,
    MAX_BLOCK,
    MAX_CAPLEN,
    PCAP_MAGIC_NS,
    PCAP_MAGIC_US,
    PCAPNG_BOM,
    PCAPNG_SHB,
    linktype_to_dlt,
    starts_zstd,
    warn_truncated,
)

W_MORE, W_BLOCK, W_BAD_LENGTH, W_BAD_IFACE, W_OPTIONS, W_FULL, W_BAD_TIME, W_CUT = (
    STATUS[k] for k in ("more", "block", "bad_length", "bad_iface", "options", "full", "bad_time", "cut"))

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+ (Python 3.13 names it)

# pcapng option codes
OPT_COMMENT = 1
_SHB_OPTS = {2: "shb_hardware", 3: "shb_os", 4: "shb_userappl"}
_IDB_OPTS = {2: "if_name", 3: "if_description", 8: "if_speed", 9: "if_tsresol", 11: "if_filter",
             12: "if_os", 13: "if_fcslen", 14: "if_tsoffset", 15: "if_hardware"}
_TEXT_OPTS = {"shb_hardware", "shb_os", "shb_userappl", "if_name", "if_description", "if_os",
              "if_hardware"}


@dataclass
class InterfaceInfo:
    """One interface of a capture file (pcapng IDB, or the single link of a pcap file)."""
    index: int                 # position among all interfaces of the file (all sections)
    link_type: int             # DLT value, as libpcap and PacketBatch use it (NULL of a big-endian file: LOOP)
    snaplen: int
    name: str                  # if_name, or "if<index>"
    section: int = 0
    tsresol: int = 9           # if_tsresol byte (bit 7 set: power of 2), 6 for µs pcap
    tsoffset: int = 0
    description: str | None = None
    options: dict = field(default_factory=dict)
    block_offset: int = -1     # pcapng: the IDB's offset in the (decompressed) stream
    block_length: int = 0


@dataclass
class SectionInfo:
    """A pcapng section header: byte order, version and options (shb_hardware, shb_os, ...)."""
    byte_order: str
    version: tuple[int, int]
    options: dict = field(default_factory=dict)
    block_offset: int = -1     # the SHB's offset in the (decompressed) stream
    block_length: int = 0


def _open_stream(source) -> tuple[Any, bool, str | None, str | None]:
    """(binary stream, we_own_it, compression, path): the file, or a reader over it (readinto, close)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        f = open(path, "rb", buffering=0)
        owns = True
    else:
        path = getattr(source, "name", None)
        path = path if isinstance(path, str) else None
        f = source
        owns = False
    head = _peek(f, 4)
    if starts_zstd(head):
        return _Closing(_ZstdBlocks(_Prefixed(f, head), path or "<stream>"), f if owns else None), True, "zstd", path
    if head.startswith(GZIP_MAGIC):
        g = _Gunzip(gzip.GzipFile(fileobj=_Prefixed(f, head), mode="rb"), path or "<stream>")
        return _Closing(g, f if owns else None), True, "gzip", path
    if f.seekable():
        f.seek(-len(head), io.SEEK_CUR)
        return f, owns, None, path
    if owns:  # a pipe or FIFO opened by path: closing the reader closes it
        return _Closing(_Prefixed(f, head), f), True, None, path
    return _Prefixed(f, head), owns, None, path


def _peek(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front."""

    def __init__(self, f, prefix: bytes) -> None:
        self._f = f
        self._prefix = prefix

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        if hasattr(self._f, "readinto"):
            return self._f.readinto(b)
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


class _ZstdBlocks:
    """zstd frames decompressed one whole block at a time (readinto), for files being written.

    Only whole blocks are handed to the decompressor, so each call yields at most one block's
    content (<= 128 KiB, whatever the compression ratio), and everything decoded is delivered:
    ``zstandard``'s stream_reader loses the decoded rest of the last block when its output
    buffer fills just as the input runs out, which is exactly the state of a growing or
    interrupted ``.part`` file (flushed blocks, no frame end) -- a reader then saw only the
    first bytes. A block or frame header cut by the end of the file ends the stream there (the
    whole blocks before it are delivered); corrupt data raises FileFormatError."""

    _CHUNK = 1 << 17

    def __init__(self, f, name: str) -> None:
        import zstandard
        self._zstd = zstandard
        self._f = f
        self._name = name
        self._in = bytearray()   # compressed bytes read, not yet fed
        self._out = b""          # decompressed bytes not yet delivered
        self._out_pos = 0
        self._eof = False
        self._d: Any = None      # decompressobj of the current frame
        self._state = "frame"    # frame | block | checksum
        self._checksum = False
        self._fed = 0            # compressed bytes fed (offsets in errors)

    def _need(self, n: int) -> bool:
        while len(self._in) < n and not self._eof:
            chunk = self._f.read(max(self._CHUNK, n - len(self._in)))
            if not chunk:
                self._eof = True
            else:
                self._in += chunk
        return len(self._in) >= n

    def _skip(self, n: int) -> bool:
        """Consume ``n`` bytes without keeping them (bounded memory whatever ``n`` a file
        claims); False if the data ends first."""
        while True:
            k = min(n, len(self._in))
            del self._in[:k]
            self._fed += k
            n -= k
            if n == 0:
                return True
            if self._eof:
                return False
            chunk = self._f.read(self._CHUNK)
            if not chunk:
                self._eof = True
            else:
                self._in += chunk

    def _take(self, n: int) -> bytes:
        unit = bytes(self._in[:n])
        del self._in[:n]
        self._fed += n
        return unit

    def _bad(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self._name}: {what} at compressed byte {self._fed}",
                               path=None if self._name == "<stream>" else self._name, offset=self._fed)

    def _feed(self, unit: bytes) -> bytes:
        try:
            return self._d.decompress(unit)
        except self._zstd.ZstdError as exc:
            raise self._bad(f"corrupt zstd data ({exc})") from None

    def _next_output(self) -> bytes:
        """Decompress the next unit (a frame header + first block, a block, a checksum);
        b"" at the end of the data."""
        while True:
            if self._state == "frame":
                if not self._need(4):
                    return b""  # the end (or a few bytes of a frame cut off)
                magic = int.from_bytes(self._in[:4], "little")
                if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                    if not self._need(8):
                        return b""
                    size = int.from_bytes(self._in[4:8], "little")
                    if not self._skip(8 + size):  # up to 4 GiB: skipped as it is read, never held
                        return b""
                    continue
                if magic != 0xFD2FB528:
                    raise self._bad(f"not a zstd frame (magic {bytes(self._in[:4]).hex()})")
                if not self._need(5):
                    return b""
                fhd = self._in[4]
                single = fhd >> 5 & 1
                fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
                hsize = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
                if not self._need(hsize):
                    return b""
                self._checksum = bool(fhd >> 2 & 1)
                self._d = self._zstd.ZstdDecompressor().decompressobj()
                out = self._feed(self._take(hsize))
                self._state = "block"
                if out:
                    return out
                continue
            if self._state == "block":
                if not self._need(3):
                    return b""
                h = int.from_bytes(self._in[:3], "little")
                last, btype, bsize = h & 1, h >> 1 & 3, h >> 3
                if btype == 3:
                    raise self._bad("reserved zstd block type")
                clen = 1 if btype == 1 else bsize
                if bsize > 1 << 17:
                    raise self._bad(f"zstd block of {bsize} bytes (more than 128 KiB)")
                if not self._need(3 + clen + (4 if last and self._checksum else 0)):
                    return b""  # the block (or the frame's checksum) is not all there yet
                out = self._feed(self._take(3 + clen + (4 if last and self._checksum else 0)))
                if last:
                    self._state, self._d = "frame", None
                if out:
                    return out
                continue

    def readinto(self, b) -> int:
        while self._out_pos >= len(self._out):
            self._out = self._next_output()
            self._out_pos = 0
            if not self._out:
                return 0
        n = min(len(b), len(self._out) - self._out_pos)
        b[:n] = self._out[self._out_pos:self._out_pos + n]
        self._out_pos += n
        return n

    def close(self) -> None:
        self._d = None

    @property
    def complete(self) -> bool:
        """Everything was read and it ended after a whole frame (not inside one)."""
        return self._eof and self._state == "frame" and not self._in

    @property
    def cut_at(self) -> int | None:
        """At the end of the data: the compressed offset where it ends inside a frame (a file
        cut short, or still being written); None if it ended after a whole frame."""
        return None if self.complete else self._fed


ZstdBlockReader = _ZstdBlocks  # public name (pktstream.archive decompresses file ranges with it)


#: libpcap's max_snaplen_for_dlt: the longest record it takes (others: 262144)
_MAX_SNAPLEN_FOR_DLT = {231: 128 << 20, 279: 8 << 20, 249: 1 << 20}   # DBUS, EBHSCR, USBPCAP


def _link_type(linktype: int, big_endian: bool) -> int:
    """The DLT of a file's (or section's) LINKTYPE value. NULL (BSD loopback) carries the
    address family in the writer's byte order: in a big-endian file that is LOOP (108, the
    family in network byte order), so it reads as LOOP -- what libpcap's filter tests for a
    byte-swapped savefile, and what outputs (little-endian) must say for tcpdump to read them
    the same way. The packet bytes are unchanged."""
    dlt = linktype_to_dlt(linktype)
    return 108 if dlt == 0 and big_endian else dlt


class _Gunzip:
    """A gzip reader whose corrupt data raises :class:`FileFormatError` (gzip raises
    ``BadGzipFile``, an ``OSError`` like a failed read, or ``zlib.error``); a file cut short
    ends the data (``cut_at``: the reader reports it as a truncated file)."""

    def __init__(self, g: gzip.GzipFile, name: str) -> None:
        self._g = g
        self._name = name
        self.cut_at: int | None = None  # the data ended inside the gzip stream (compressed offset)

    def readinto(self, b) -> int:
        if self.cut_at is not None:
            return 0
        try:
            # one read at a time: a readinto filling the whole buffer loses what it had read
            # when the end of a cut file raises EOFError
            return self._g.readinto1(b)
        except EOFError:  # cut short: what was decompressed is delivered, the end is reported
            self.cut_at = 0  # (the compressed offset is not known here)
            return 0
        except (gzip.BadGzipFile, zlib.error) as exc:
            named = self._name != "<stream>"
            raise FileFormatError(f"{self._name + ': ' if named else ''}corrupt gzip data ({exc})",
                                  path=self._name if named else None) from None

    def close(self) -> None:
        self._g.close()


class _Closing:
    """A decompressing reader that also closes the file under it; ``delivered``: decompressed
    bytes read so far."""

    def __init__(self, reader, under) -> None:
        self._r = reader
        self._under = under
        self.delivered = 0

    def readinto(self, b) -> int:
        n = self._r.readinto(b)
        self.delivered += n
        return n

    @property
    def cut_at(self) -> int | None:
        """The compressed offset where the data ended inside the compressed stream (None: it
        ended cleanly, or has not ended yet)."""
        return getattr(self._r, "cut_at", None)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._r.close()
        if self._under is not None:
            self._under.close()


def _refill(f, buf: bytearray, have: int) -> tuple[int, bool]:
    """Fill ``buf`` after its first ``have`` bytes; (new fill level, whether the file ended)."""
    got = _read_fully(f, memoryview(buf)[have:])
    return have + got, have + got < len(buf)


def _read_fully(f, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class CaptureReader:
    """Iterator of :class:`PacketBatch` over one capture file or stream.

    Attributes after opening: ``format`` (``"pcap"`` or ``"pcapng"``), ``compression``
    (None, ``"zstd"``, ``"gzip"``), ``interfaces`` (list of :class:`InterfaceInfo`, growing
    as pcapng IDBs are read), ``sections`` (pcapng section headers), ``nanosecond`` and
    ``byte_order`` (pcap). With ``comments=True``, ``comments`` holds ``{packet index:
    text}`` of pcapng packet comments (``opt_comment``) for the batch last yielded.
    ``bytes_read``: bytes consumed from the underlying file (for progress bars).
    ``last_range``: ``(start, end)`` offsets in the (decompressed) stream of the records or
    blocks the batch last yielded came from (several pcapng batches may share one range;
    header blocks inside it are included) -- what an index needs to read that part again.
    :meth:`last_positions`: where the packets of the batch last yielded stand in the file's
    packet order (a pcapng read buffer holding several interfaces is handed out one interface
    at a time, so batches are not always consecutive runs of the file). With
    ``file_order=True`` it is handed out as runs of one interface in file order instead
    (batches in the file's order; more, smaller batches when interfaces interleave finely);
    with ``mixed_interfaces=True`` as well, a buffer whose interfaces interleave but share one
    link type is handed out whole, as one batch (``interface`` None, the largest snap length),
    and ``batch_interfaces`` is then ``(ids, infos)``: packet ``k`` of it was captured on
    ``infos[ids[k]]`` (None for a batch of one interface) -- what
    :meth:`CaptureWriter.write` takes to write such a buffer in one pass.
    ``memory_mapped``: whether the file is being read out of a memory mapping (``memory_map=True``
    and a file that can be mapped; see the module docstring).

    Lifetime: batches stay valid after the reader is closed (a mapping is unmapped when the
    last batch or view of it is gone; until then it also keeps one file descriptor open).
    Thread safety: one thread at a time per reader.
    """

    def __init__(self, source, *, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 truncated: str | Callable[[str, int], None] = "warn",
                 comments: bool = False, memory_map: bool = False, file_order: bool = False,
                 mixed_interfaces: bool = False) -> None:
        if not callable(truncated) and truncated not in ("warn", "error", "ignore"):
            raise ValueError("truncated must be 'warn', 'error', 'ignore' or a function(message, offset)")
        if batch_bytes < 4096:
            raise ValueError("batch_bytes must be at least 4096")
        self.batch_bytes = batch_bytes
        self._truncated = truncated
        self._want_comments = comments
        self._file_order = file_order
        self._mixed = file_order and mixed_interfaces
        self.batch_interfaces: tuple[np.ndarray, list[InterfaceInfo]] | None = None
        self._batch_iface: InterfaceInfo | None = None
        self.comments: dict[int, str] = {}
        self.interfaces: list[InterfaceInfo] = []
        self.sections: list[SectionInfo] = []
        self.nanosecond = True
        self.byte_order = "little"
        self._raw = None
        self._reported_cut = False  # a truncation was reported (a compressed end is not reported again)
        self.last_range = (0, 0)
        self._next_position = 0   # packets of the file (in file order) before the next buffer's
        self._last_positions: tuple[int, int, np.ndarray | None] = (0, 0, None)
        self._map: mmap.mmap | None = None
        self._map_view: memoryview | None = None
        self._map_size = 0
        self._f, self._owns, self.compression, self.path = _open_stream(source)
        self._name = self.path or "<stream>"
        try:
            self._start()
            if memory_map:
                self._map_file()
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------------
    def _start(self) -> None:
        head = bytearray(24)
        n = _read_fully(self._f, memoryview(head))
        self._pos = n  # offset in the (decompressed) stream
        if n < 4:
            if getattr(self._f, "cut_at", None) is not None:
                raise FileFormatError(f"{self._name}: truncated {self.compression} data: it ends before the "
                                      f"capture's first bytes ({n} decompressed)", path=self.path, offset=0)
            raise FileFormatError(f"{self._name}: not a capture file (only {n} bytes)", path=self.path, offset=0)
        magic_le = struct.unpack_from("<I", head)[0]
        magic_be = struct.unpack_from(">I", head)[0]
        if magic_le == PCAPNG_SHB:
            self.format = "pcapng"
            self._head = bytes(head[:n])
            return
        for magic, order in ((magic_le, "<"), (magic_be, ">")):  # noqa: B007 - the match is used below
            if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
                break
        else:
            if magic_le in (0xA1B2CD34, 0x34CDB2A1):
                raise FileFormatError(f"{self._name}: modified (Kuznetzov) pcap is not supported",
                                      path=self.path, offset=0)
            raise FileFormatError(f"{self._name}: not a pcap or pcapng file (magic {bytes(head[:4]).hex()})",
                                  path=self.path, offset=0)
        if n < 24:
            raise FileFormatError(f"{self._name}: truncated pcap file header ({n} of 24 bytes)",
                                  path=self.path, offset=0)
        self.format = "pcap"
        _, vmaj, vmin, _, _, snaplen, linktype = struct.unpack_from(order + "IHHiIII", head)
        self.version = (vmaj, vmin)
        self.byte_order = "little" if order == "<" else "big"
        self.nanosecond = magic == PCAP_MAGIC_NS
        self.snaplen = snaplen or DEFAULT_SNAPLEN
        self.fcs_bits = linktype >> 26 if linktype & 0x04000000 else None
        lt = _link_type(linktype & 0xFFFF, order == ">")
        self.interfaces.append(InterfaceInfo(0, lt, self.snaplen, self.path or "if0",
                                             tsresol=9 if self.nanosecond else 6))
        # a record longer than libpcap's maximum for the link type is refused (as libpcap's
        # "invalid packet capture length" refuses it, whatever the header's snap length says);
        # one longer than the header's snap length is cut to it, as libpcap cuts it
        self._max_caplen = min(_MAX_SNAPLEN_FOR_DLT.get(lt, DEFAULT_SNAPLEN), MAX_CAPLEN)
        self._snapshot = snaplen if 0 < snaplen <= 0x7FFFFFFF else 0xFFFFFFFF

    def _map_file(self) -> None:
        """Map an uncompressed regular file we opened (read-only, its size now); leave anything
        else (and any failure) to the read() path."""
        if not (self._owns and self.compression is None and isinstance(self._f, io.FileIO)):
            return
        if self.path is None or self.path.endswith(".part"):  # a writer is still growing it
            return
        try:
            st = os.fstat(self._f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size < self._pos or st.st_size == 0:
                return
            mm = mmap.mmap(self._f.fileno(), st.st_size, access=mmap.ACCESS_READ)
        except (OSError, ValueError, OverflowError):
            return
        try:  # aggressive readahead for a file not in the page cache (no effect on one that is)
            mm.madvise(mmap.MADV_SEQUENTIAL)
        except OSError:
            pass
        self._map, self._map_view, self._map_size = mm, memoryview(mm), st.st_size

    _populate_ok = True

    def _populate(self, start: int, end: int) -> bool:
        """Map the pages of ``[start, end)`` in one call (MADV_POPULATE_READ, Linux 5.14+)
        instead of a page fault per 64 KiB; False if a page is no longer backed by the file
        (truncated: the call fails instead of a SIGBUS)."""
        if not CaptureReader._populate_ok or self._map is None or end <= start:
            return True
        first = start & ~(mmap.PAGESIZE - 1)
        try:
            self._map.madvise(_MADV_POPULATE_READ, first, end - first)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                CaptureReader._populate_ok = False  # an older kernel (< 5.14): page faults it is
                return True
            return False  # EFAULT (truncated), or ENOMEM/EINTR/...: this reader goes on with read()
        return True

    def _map_changed(self) -> bool:
        """Whether the mapped file's size differs from the mapping's (grown or truncated)."""
        try:
            return os.fstat(self._f.fileno()).st_size != self._map_size
        except (OSError, AttributeError, ValueError):
            return True

    def _leave_map(self, pos: int) -> None:
        """Go on with read() from stream offset ``pos`` (the mapping stays while batches use it)."""
        self._release_map()
        self._f.seek(pos)
        self._pos = pos

    def _release_map(self) -> None:
        """Drop our references to the mapping; unmap now if no batch or view exports it, else
        the last one gone unmaps it (garbage collection)."""
        mm, mv = self._map, self._map_view
        self._map = self._map_view = None
        if mv is not None:
            mv.release()  # slices of it (batches) keep the underlying export alive
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    @property
    def memory_mapped(self) -> bool:
        return self._map is not None

    @property
    def link_types(self) -> list[int]:
        return sorted({i.link_type for i in self.interfaces})

    @property
    def bytes_read(self) -> int:
        if self._map is not None:
            return self._pos
        try:
            raw = self._f if self.compression is None else self._f._under
            return raw.tell() if raw is not None else self._pos
        except (OSError, AttributeError, ValueError):
            return self._pos

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PacketBatch]:
        it = self._iter_pcap() if self.format == "pcap" else self._iter_pcapng()
        return self._ends_checked(it) if self.compression else it

    def _ends_checked(self, it: Iterator[PacketBatch]) -> Iterator[PacketBatch]:
        """A compressed file's batches, then its end: data that ends inside a zstd frame or a
        gzip member (cut short; or a ``.part`` still being written) is a truncated file, also
        when the decompressed bytes end on a record boundary, as a flushed writer leaves them."""
        yield from it
        if self._reported_cut:
            return  # (a record cut in two already said so)
        at = getattr(self._f, "cut_at", None)
        if at is not None:
            offset = getattr(self._f, "delivered", 0)
            where = f" at compressed byte {at}" if at else ""
            self._truncated_end(offset, 0, f"{self.compression} data{where}: the capture", what_ends=True)

    def last_positions(self) -> np.ndarray:
        """The file-order positions (0: the file's first packet; int64, increasing) of the
        packets of the batch last yielded."""
        start, n, sel = self._last_positions
        return np.arange(start, start + n, dtype=np.int64) if sel is None else start + sel

    @property
    def batch_interface(self) -> InterfaceInfo | None:
        """The interface (its :class:`InterfaceInfo`, ``index`` unique in the file) of the
        batch last yielded; None for a batch of several (``batch_interfaces``). Two interfaces
        may share a name: this tells them apart."""
        return self.interfaces[0] if self.format == "pcap" else self._batch_iface

    def _batch(self, buf, n: int, iface: InterfaceInfo) -> PacketBatch:
        self._batch_iface = iface
        self._last_positions = (self._next_position, n, None)
        self._next_position += n
        return PacketBatch.from_records(buf, link_type=iface.link_type,
                                        snaplen=max(iface.snaplen, 1), interface=iface.name,
                                        validate=False, count=n)

    def _bad(self, what: str, offset: int) -> FileFormatError:
        return FileFormatError(f"{self._name}: {what} at byte {offset}", path=self.path, offset=offset)

    def _truncated_end(self, offset: int, have: int, what: str, what_ends: bool = False) -> None:
        self._reported_cut = True
        msg = (f"{self._name}: truncated {what} ends at byte {offset}" if what_ends else
               f"{self._name}: truncated {what} at byte {offset} ({have} bytes present); file ends there")
        if callable(self._truncated):
            self._truncated(msg, offset)
            return
        if self._truncated == "error":
            raise FileFormatError(msg, path=self.path, offset=offset)
        if self._truncated == "warn":
            warn_truncated(msg, offset)

    def _bad_record(self, buf, pos: int, order: str, status: int) -> str:
        """What is wrong with the pcap record header at ``pos`` (a walk status)."""
        _sec, frac, caplen = struct.unpack_from(order + "III", buf, pos)
        if status == W_BAD_TIME:
            unit, top = ("ns", 999_999_999) if self.nanosecond else ("µs", 999_999)
            return f"packet timestamp fraction {frac} {unit} out of range (at most {top})"
        return f"packet length {caplen} larger than {self._max_caplen}"

    def _iter_pcap(self) -> Iterator[PacketBatch]:
        iface = self.interfaces[0]
        swap = self.byte_order == "big"
        usec = not self.nanosecond
        convert = swap or usec
        order = ">" if swap else "<"
        if self._map is not None:
            done = yield from self._iter_pcap_mapped(iface, swap, usec, order)
            if done:
                return
        size = self.batch_bytes
        # buffers are not zeroed (new_buffer): only bytes read into them are ever looked at
        buf = new_buffer(size)
        spares: list[bytearray] = []
        have = 0
        base = self._pos  # stream offset of buf[0]
        eof = False
        while True:
            if not eof:
                have, eof = _refill(self._f, buf, have)
            if have == 0:
                return
            dst = new_buffer(have) if convert else None
            status, pos, n, out = pcap_walk(buf, 0, have, swap, usec, self._max_caplen, dst,
                                            snapshot=self._snapshot)
            if n:
                if convert:
                    assert dst is not None
                    b = self._batch(memoryview(dst)[:out], n, iface)
                else:
                    b = self._batch(memoryview(buf)[:pos], n, iface)
            else:
                b = None
            rest = memoryview(buf)[pos:have]
            if status in (W_BAD_LENGTH, W_BAD_TIME):
                if b is not None:
                    self.last_range = (base, base + pos)
                    yield b
                raise self._bad(self._bad_record(buf, pos, order, status), base + pos)
            if eof and n == 0 and status != W_CUT:
                if have:
                    self._truncated_end(base + pos, have - pos, "pcap record")
                return
            if n == 0 and pos == 0 and status != W_CUT:  # a record bigger than the buffer: grow (bounded)
                size = min(size * 2, self._max_caplen + 16 + self.batch_bytes)
            if not convert or n == 0 or len(buf) != size:
                old, buf = buf, self._spare_buffer(spares, max(size, len(rest) * 2))
                buf[:len(rest)] = rest
                if b is not None and not convert:
                    spares.append(old)  # refilled once the caller has let go of its batch
            else:  # the batch holds dst, not buf: move the rest to the front in place
                buf[:len(rest)] = rest.tobytes()
            have = len(rest)
            rest.release()
            if status == W_CUT:  # a record longer than the snap length: converted (cut) from here on
                convert = True
            if b is not None:
                self.last_range = (base, base + pos)
            base += pos
            self._pos = base
            if b is not None:
                yield b

    def _iter_pcap_mapped(self, iface: InterfaceInfo, swap: bool, usec: bool,
                          order: str) -> Generator[PacketBatch, None, bool]:
        """Batches of about ``batch_bytes`` straight out of the mapping: views of it (LE ns) or
        converted copies. Returns True at the end of the file, False when the file changed
        size (read() goes on from ``self._pos``)."""
        assert self._map_view is not None
        mv, total = self._map_view, self._map_size
        convert = swap or usec
        pos = self._pos
        window = self.batch_bytes
        # index arrays the walk fills (one record per 16 bytes at most), reused for every window
        ts = cl = wl = off = np.empty(0, np.int64)
        while True:
            if self._map_changed():
                self._leave_map(pos)
                return False
            if pos == total:
                return True
            end = min(pos + window, total)
            if not self._populate(pos, end):
                self._leave_map(pos)
                return False
            dst = new_buffer(end - pos) if convert else None
            if len(ts) < (end - pos) // 16 + 1:
                k = (end - pos) // 16 + 1
                ts, cl, wl, off = (np.empty(k, np.int64), np.empty(k, np.uint32), np.empty(k, np.uint32),
                                   np.empty(k, np.int64))
            status, p, n, out = pcap_walk(mv, pos, end, swap, usec, self._max_caplen, dst, -1, ts, cl, wl, off,
                                          self._snapshot)
            if n == 0 and status == W_MORE and end < total:
                # a record longer than the window: grow it as the read() path grows its buffer
                # (same batches either way; bounded by max_caplen)
                window = min(window * 2, self._max_caplen + 16 + self.batch_bytes)
                continue
            if n:
                data = memoryview(dst)[:out] if dst is not None else mv[pos:p]
                # the walk filled the index arrays: the batch takes copies (small, in cache)
                b = PacketBatch.from_records(data, link_type=iface.link_type, snaplen=max(iface.snaplen, 1),
                                             interface=iface.name, validate=False, count=n,
                                             index=(ts[:n], cl[:n], wl[:n], off[:n]))  # (copied by from_records)
                self._last_positions = (self._next_position, n, None)
                self._next_position += n
                self.last_range = (pos, p)
                self._pos = p
                yield b
            if status in (W_BAD_LENGTH, W_BAD_TIME):
                raise self._bad(self._bad_record(mv, p, order, status), p)
            if status == W_CUT:  # a record longer than the snap length: converted (cut) from here on
                convert, pos = True, p
                continue
            if n == 0:  # a record cut by the end of the file
                if self._map_changed():
                    self._leave_map(pos)
                    return False
                self._truncated_end(pos, total - pos, "pcap record")
                return True
            pos = p

    @staticmethod
    def _spare_buffer(spares: list[bytearray], size: int) -> bytearray:
        """A buffer of ``size`` bytes: one whose batches are all gone (reused: no page faults,
        still in the CPU caches), else a new one. At most 4 are kept."""
        for i, buf in enumerate(spares):
            if len(buf) == size and not buffer_exported(buf):
                del spares[i]
                return buf
        if len(spares) >= 4:
            del spares[0]
        return new_buffer(size)

    # -- pcapng ------------------------------------------------------------------------------
    def _iter_pcapng(self) -> Iterator[PacketBatch]:
        size = self.batch_bytes
        mapped = self._map_view is not None
        buf: Any = b""
        have = 0
        if not mapped:
            buf = bytearray(max(size, 24))
            buf[:len(self._head)] = self._head
            have = len(self._head)
        base = 0
        eof = False
        swap = False
        self._if_arrays: tuple[np.ndarray, ...] | None = None
        section_ifaces: list[InterfaceInfo] = []
        while True:
            if mapped and (self._map_changed() or not self._populate(base, min(base + size, self._map_size))):
                # grown or truncated: read() from here on
                self._leave_map(base)
                mapped, eof = False, False
                buf, have = bytearray(max(size, 24)), 0
            if mapped:  # a window of the mapping (blocks are converted straight out of it)
                assert self._map_view is not None
                end = min(base + size, self._map_size)
                buf, have, eof = self._map_view[base:end], end - base, end == self._map_size
            elif not eof:
                have, eof = _refill(self._f, buf, have)
            if have == 0:
                return
            dst = new_buffer(have)  # only the records written into it are ever looked at
            ifaces = np.empty(have // 16 + 1, dtype=np.int32)
            pos, out, count = 0, 0, 0
            comments: dict[int, str] = {}
            pending_error: FileFormatError | None = None
            need_more = False
            while True:
                ups, mult, offs, snaps = self._if_table(section_ifaces)
                status, pos, count, out = pcapng_walk(buf, pos, have, swap, ups, mult, offs, snaps, MAX_BLOCK,
                                                      dst, out, ifaces, count, self._want_comments)
                if status == W_MORE:
                    need_more = True
                    break
                if status == W_BAD_LENGTH:
                    pending_error = self._bad("bad pcapng block length", base + pos)
                    break
                if status == W_BAD_IFACE:
                    pending_error = self._bad("packet block for an undescribed interface", base + pos)
                    break
                if status == W_FULL:
                    break
                if status == W_OPTIONS:
                    blen = struct.unpack_from((">" if swap else "<") + "I", buf, pos + 4)[0]
                    text = self._packet_comment(buf, pos, blen, swap)
                    _, pos2, count2, out = pcapng_walk(buf, pos, pos + blen, swap, ups, mult, offs, snaps,
                                                       MAX_BLOCK, dst, out, ifaces, count, False)
                    if count2 == count:  # could not take it (full): emit and come back
                        break
                    if text is not None:
                        comments[count] = text
                    count, pos = count2, pos2
                    continue
                # a non-packet block
                if have - pos < 12:
                    need_more = True
                    break
                btype = struct.unpack_from((">" if swap else "<") + "I", buf, pos)[0]
                if btype == PCAPNG_SHB:
                    bom = struct.unpack_from("<I", buf, pos + 8)[0]
                    if bom == PCAPNG_BOM:
                        new_swap = False
                    elif bom == 0x4D3C2B1A:
                        new_swap = True
                    else:
                        pending_error = self._bad("bad pcapng byte-order magic", base + pos)
                        break
                    blen = struct.unpack_from((">" if new_swap else "<") + "I", buf, pos + 4)[0]
                else:
                    blen = struct.unpack_from((">" if swap else "<") + "I", buf, pos + 4)[0]
                if blen < 12 or blen % 4 or blen > MAX_BLOCK:
                    pending_error = self._bad(f"bad pcapng block length {blen}", base + pos)
                    break
                if blen > have - pos:
                    need_more = True
                    break
                block = bytes(buf[pos:pos + blen])
                if btype == PCAPNG_SHB:
                    if count:  # interface ids restart with a section: emit what we have first
                        break
                    swap = new_swap
                    section_ifaces = []
                    self._if_arrays = None
                    try:
                        self._parse_shb(block, swap)
                    except FileFormatError as exc:
                        pending_error = self._bad(str(exc), base + pos)
                        break
                    self.sections[-1].block_offset, self.sections[-1].block_length = base + pos, blen
                elif btype == 1:
                    try:
                        section_ifaces.append(self._parse_idb(block, swap))
                    except FileFormatError as exc:
                        pending_error = self._bad(str(exc), base + pos)
                        break
                    section_ifaces[-1].block_offset, section_ifaces[-1].block_length = base + pos, blen
                    self._if_arrays = None
                pos += blen  # other blocks (ISB, NRB, DSB, custom...) are skipped
            self.last_range = (base, base + pos)
            yield from self._emit(dst, out, ifaces, count, section_ifaces, comments)
            if pending_error is not None:
                raise pending_error
            if eof and (need_more or pos == have) and not (mapped and self._map_changed()):
                if have - pos:
                    self._truncated_end(base + pos, have - pos, "pcapng block")
                return
            if need_more and pos == 0:  # a block bigger than the buffer: grow (bounded)
                size = min(size * 2, MAX_BLOCK + self.batch_bytes)
            if mapped:  # the next window starts at pos (a changed file is left at the top)
                base += pos
                self._pos = base
                continue
            rest = buf[pos:have]
            buf = bytearray(max(size, len(rest)))
            buf[:len(rest)] = rest
            have = len(rest)
            base += pos
            self._pos = base

    def _if_table(self, section_ifaces):
        if self._if_arrays is None:
            n = len(section_ifaces)
            ups = np.ones(n, dtype=np.uint64)
            mult = np.zeros(n, dtype=np.uint64)
            offs = np.zeros(n, dtype=np.int64)
            snaps = np.zeros(n, dtype=np.uint32)
            for i, itf in enumerate(section_ifaces):
                r = itf.tsresol
                u = (1 << (r & 0x7F)) if r & 0x80 else 10 ** r
                ups[i] = u
                mult[i] = 10**9 // u if u <= 10**9 and 10**9 % u == 0 else 0
                offs[i] = itf.tsoffset
                snaps[i] = min(itf.snaplen, 0xFFFFFFFF)
            self._if_arrays = (ups, mult, offs, snaps)
        return self._if_arrays

    def _emit(self, dst, out, ifaces, count, section_ifaces, comments) -> Iterator[PacketBatch]:
        self.batch_interfaces = None
        if count == 0:
            return
        ids = ifaces[:count]
        first = int(ids[0])
        if (ids == first).all():
            self.comments = comments
            yield self._batch(memoryview(dst)[:out], count, section_ifaces[first])
            return
        base = self._next_position
        if self._mixed:
            used = [section_ifaces[k] for k in np.unique(ids).tolist()]
            if all(i.link_type == used[0].link_type for i in used):
                self.comments = comments
                b = PacketBatch.from_records(memoryview(dst)[:out], link_type=used[0].link_type,
                                             snaplen=max(max(i.snaplen for i in used), 1), interface=None,
                                             validate=False, count=count)
                self._last_positions = (base, count, None)
                self._next_position = base + count
                self.batch_interfaces = (ids.copy(), list(section_ifaces))
                self._batch_iface = None
                yield b
                self.batch_interfaces = None
                return
        if self._file_order:
            yield from self._emit_runs(dst, out, ids, count, section_ifaces, comments)
            return
        for k in np.unique(ids).tolist():
            recs, n = take_records(dst, out, ids, k)
            sel = np.flatnonzero(ids == k).astype(np.int64)
            if comments:
                where = {int(j): i for i, j in enumerate(sel.tolist())}
                self.comments = {where[j]: t for j, t in comments.items() if j in where}
            else:
                self.comments = {}
            b = self._batch(recs, n, section_ifaces[k])
            self._last_positions = (base, n, sel)
            yield b
        self._next_position = base + count

    def _emit_runs(self, dst, out, ids, count, section_ifaces, comments) -> Iterator[PacketBatch]:
        """A mixed-interface buffer as runs of consecutive packets of one interface, in file
        order: zero-copy views of ``dst`` (its records are in file order), indexed from one
        walk of the whole buffer."""
        base = self._next_position
        whole = PacketBatch.from_records(memoryview(dst)[:out], link_type=1, validate=False, count=count)
        for b, (s, e), sub in interface_runs(whole, (ids, section_ifaces), comments):
            self.comments = sub
            self._batch_iface = section_ifaces[int(ids[s])]
            self._last_positions = (base + s, e - s, None)
            yield b
        self._next_position = base + count

    # -- pcapng block parsing ----------------------------------------------------------------
    @staticmethod
    def _options(block: bytes, start: int, swap: bool) -> list[tuple[int, bytes]]:
        o = ">" if swap else "<"
        end = len(block) - 4
        out = []
        pos = start
        while pos + 4 <= end:
            code, length = struct.unpack_from(o + "HH", block, pos)
            if code == 0:
                break
            if pos + 4 + length > end:
                raise FileFormatError(f"option {code} runs past its block")
            out.append((code, block[pos + 4:pos + 4 + length]))
            pos += 4 + ((length + 3) & ~3)
        return out

    def _parse_shb(self, block: bytes, swap: bool) -> None:
        o = ">" if swap else "<"
        if len(block) < 28:
            raise FileFormatError("section header block too short")
        vmaj, vmin = struct.unpack_from(o + "HH", block, 12)
        if vmaj != 1:
            raise FileFormatError(f"unsupported pcapng version {vmaj}.{vmin}")
        opts: dict = {}
        for code, val in self._options(block, 24, swap):
            if code == OPT_COMMENT:
                opts.setdefault("comments", []).append(val.decode("utf-8", "replace"))
            elif code in _SHB_OPTS:
                opts[_SHB_OPTS[code]] = val.decode("utf-8", "replace")
        self.byte_order = "big" if swap else "little"
        self.sections.append(SectionInfo("big" if swap else "little", (vmaj, vmin), opts))

    def _parse_idb(self, block: bytes, swap: bool) -> InterfaceInfo:
        o = ">" if swap else "<"
        if len(block) < 20:
            raise FileFormatError("interface description block too short")
        linktype, _, snaplen = struct.unpack_from(o + "HHI", block, 8)
        opts: dict = {}
        tsresol, tsoffset = 6, 0
        for code, val in self._options(block, 16, swap):
            name = _IDB_OPTS.get(code)
            if code == OPT_COMMENT:
                opts.setdefault("comments", []).append(val.decode("utf-8", "replace"))
            elif name == "if_tsresol" and len(val) >= 1:
                tsresol = val[0]
                if (tsresol & 0x80 and (tsresol & 0x7F) > 63) or (not tsresol & 0x80 and tsresol > 19):
                    raise FileFormatError(f"unsupported if_tsresol {tsresol}")
            elif name == "if_tsoffset" and len(val) == 8:
                tsoffset = struct.unpack(o + "q", val)[0]
            elif name == "if_speed" and len(val) == 8:
                opts[name] = struct.unpack(o + "Q", val)[0]
            elif name == "if_fcslen" and len(val) >= 1:
                opts[name] = val[0]
            elif name == "if_filter" and val:
                opts[name] = val[1:].decode("utf-8", "replace") if val[0] == 0 else val
            elif name in _TEXT_OPTS:
                opts[name] = val.decode("utf-8", "replace")
        index = len(self.interfaces)
        snap = snaplen if snaplen else DEFAULT_SNAPLEN
        info = InterfaceInfo(index, _link_type(linktype, swap), snap, opts.get("if_name") or f"if{index}",
                             section=len(self.sections) - 1, tsresol=tsresol, tsoffset=tsoffset,
                             description=opts.get("if_description"), options=opts)
        self.interfaces.append(info)
        return info

    def _packet_comment(self, buf, pos: int, blen: int, swap: bool) -> str | None:
        o = ">" if swap else "<"
        block = bytes(buf[pos:pos + blen])
        caplen = struct.unpack_from(o + "I", block, 20)[0]
        try:
            opts = self._options(block, 28 + ((caplen + 3) & ~3), swap)
        except FileFormatError:
            return None
        texts = [v.decode("utf-8", "replace") for c, v in opts if c == OPT_COMMENT]
        return "\n".join(texts) if texts else None

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file. Batches already yielded stay valid (they own their buffers, or keep
        the file's mapping until the last of them is gone)."""
        self._release_map()
        if self._owns and self._f is not None:
            self._f.close()
        self._f = None

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(source, *, batch_bytes: int = DEFAULT_BATCH_BYTES,
                truncated: str | Callable[[str, int], None] = "warn",
                comments: bool = False, memory_map: bool = False, file_order: bool = False,
                mixed_interfaces: bool = False) -> CaptureReader:
    """Open a capture file (path or binary file object) for reading; see :class:`CaptureReader`.
    ``truncated``: ``"warn"``, ``"error"``, ``"ignore"``, or a function called with the message and
    offset (no process-wide warnings state: for threads). ``memory_map=True``: map an uncompressed
    regular file (zero-copy; SIGBUS risk, see the module). ``file_order=True``: batches in the
    file's packet order even where a pcapng interleaves interfaces (runs of one interface;
    with ``mixed_interfaces=True``, interleaved buffers whole: ``batch_interfaces``)."""
    return CaptureReader(source, batch_bytes=batch_bytes, truncated=truncated, comments=comments,
                         memory_map=memory_map, file_order=file_order, mixed_interfaces=mixed_interfaces)


def interface_runs(batch: PacketBatch, interfaces: tuple[Any, Any], comments: dict[int, str] | None = None
                   ) -> Iterator[tuple[PacketBatch, tuple[int, int], dict[int, str]]]:
    """A batch of interleaved interfaces (``interfaces``: ``(ids, infos)``, packet ``k`` on
    ``infos[ids[k]]``) as runs of one interface in order: ``(run, (start, stop), its comments
    renumbered)``, each run a zero-copy batch named after its interface, indexed from the
    batch's own arrays."""
    ids, infos = interfaces
    ids = np.asarray(ids)
    ts, cl, wl, offs = batch.ts_ns, batch.caplen, batch.wirelen, batch.offset
    brk = (np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist()
    keys = np.array(sorted(comments), dtype=np.int64) if comments else None
    mv = memoryview(batch)
    for s, e in zip([0, *brk], [*brk, len(ids)]):
        info = infos[int(ids[s])]
        lo, hi = int(offs[s]) - 16, int(offs[e - 1] + cl[e - 1])
        sub = {}
        if keys is not None and comments:
            i, j = np.searchsorted(keys, (s, e)).tolist()
            sub = {k - s: comments[k] for k in keys[i:j].tolist()}
        run = PacketBatch.from_records(mv[lo:hi], link_type=info.link_type, snaplen=max(info.snaplen, 1),
                                       interface=info.name, validate=False, count=e - s,
                                       index=(ts[s:e], cl[s:e], wl[s:e], offs[s:e] - lo))
        yield run, (s, e), sub


def filter_batch(batch: PacketBatch, bpf: str, comments: dict[int, str] | None = None):
    """A new batch holding the packets of ``batch`` that match the BPF expression; with
    ``comments`` (``{packet index: text}``), ``(batch, the matching packets' comments
    renumbered)``."""
    mask = batch.filter(bpf)
    out, kept = _keep(batch, mask, comments or {})
    return out if comments is None else (out, kept)


def filter_mixed(batch: PacketBatch, bpf: str, comments: dict[int, str] | None,
                 interfaces: tuple[np.ndarray, list[InterfaceInfo]] | None):
    """:func:`filter_batch` for a batch that may hold interleaved interfaces (a reader's
    ``batch_interfaces``, or None): ``(batch, comments, interfaces)`` of the matching packets."""
    mask = batch.filter(bpf)
    out, kept = _keep(batch, mask, comments or {})
    if interfaces is None or out is batch:
        return out, kept, interfaces
    return out, kept, (interfaces[0][mask], interfaces[1])


def _keep(batch: PacketBatch, mask: np.ndarray, comments: dict[int, str]) -> tuple[PacketBatch, dict[int, str]]:
    if mask.all():
        return batch, comments
    recs, n = take_mask(memoryview(batch), batch.offset, batch.caplen, mask.view(np.uint8))
    out = PacketBatch.from_records(recs, link_type=batch.link_type, snaplen=batch.snaplen,
                                   interface=batch.interface, validate=False, count=n)
    new_index = np.cumsum(mask) - 1
    return out, {int(new_index[i]): t for i, t in comments.items() if 0 <= i < len(mask) and mask[i]}


def read(source, *, bpf: str | list[str] | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES,
         truncated: str = "warn", memory_map: bool = False, file_order: bool = False) -> Iterator[PacketBatch]:
    """Iterate over the packets of a capture file as :class:`PacketBatch` objects.

    :param source: path or binary file object (pipes work) of a pcap, pcapng, ``.zst`` or
        ``.gz`` file; the format is found from the magic bytes.
    :param bpf: only packets matching this BPF expression (libpcap's offline filter).
    :param batch_bytes: size of the record buffer behind each batch.
    :param truncated: a file ending inside a record: ``"warn"`` (TruncatedFileWarning),
        ``"error"`` (FileFormatError after the good packets) or ``"ignore"``.
    :param memory_map: map an uncompressed regular file opened by path (zero-copy batches,
        10-30 % less CPU); a file truncated while its batches are held then kills the process with
        SIGBUS (pktstream.formats.reader's docstring), so only for files nobody truncates.
    :param file_order: batches in the file's packet order, as tcpdump reads it, also where a
        pcapng interleaves interfaces (a batch is one interface: such a file gives runs of them,
        down to one packet each -- slower); False (default): a read buffer's packets (~1 MiB)
        grouped per interface, each interface's packets in file order.
    :raises FileFormatError: not a capture file, hostile or inconsistent lengths (with the offset).
    """
    expr = " ".join(bpf) if isinstance(bpf, (list, tuple)) else bpf
    with open_reader(source, batch_bytes=batch_bytes, truncated=truncated, memory_map=memory_map,
                     file_order=file_order) as r:
        for batch in r:
            if expr:
                batch = filter_batch(batch, expr)
                if len(batch) == 0:
                    continue
            yield batch
