"""pcapng writer: one Section Header Block, one Interface Description Block per distinct
``(batch.interface, batch.link_type)``, Enhanced Packet Blocks with nanosecond stamps.

Blocks are little-endian. EPBs are built for a whole batch in one C pass
(``pktstream._records.records_to_epb``); a packet with a comment gets its own EPB with an
``opt_comment`` option.
"""
from __future__ import annotations

import os
import platform
import struct
from collections.abc import Sequence
from typing import BinaryIO

from pktstream._capture import PacketBatch
from pktstream._records import records_to_epb
from pktstream.exceptions import ClosedError
from pktstream.formats._common import PCAPNG_BOM, PCAPNG_SHB, dlt_to_linktype
from pktstream.formats.pcap import FileTarget

__all__ = ["PcapngWriter", "section_header_block", "interface_block"]


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def _options(opts: list[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    return b"".join(_option(c, v) for c, v in opts) + _option(0, b"")


def section_header_block(*, hardware: str | None = None, os_name: str | None = None,
                         userappl: str | None = None, comments: Sequence[str] = ()) -> bytes:
    opts = [(1, c.encode()) for c in comments]
    for code, text in ((2, hardware), (3, os_name), (4, userappl)):
        if text:
            opts.append((code, text.encode()))
    body = struct.pack("<IHHq", PCAPNG_BOM, 1, 0, -1) + _options(opts)
    return _block(PCAPNG_SHB, body)


def interface_block(link_type: int, snaplen: int, *, name: str | None = None,
                    description: str | None = None, tsresol: int = 9) -> bytes:
    opts = []
    if name:
        opts.append((2, name.encode()))
    if description:
        opts.append((3, description.encode()))
    opts.append((9, bytes([tsresol])))
    body = struct.pack("<HHI", dlt_to_linktype(link_type), 0, snaplen) + _options(opts)
    return _block(1, body)


def _epb_with_comment(record: bytes, iface: int, comment: str) -> bytes:
    sec, nsec, caplen, wirelen = struct.unpack_from("<IIII", record)
    ts = sec * 1_000_000_000 + nsec
    data = record[16:16 + caplen]
    body = (struct.pack("<IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, caplen, wirelen) + data
            + b"\0" * (-caplen % 4) + _options([(1, comment.encode())]))
    return _block(6, body)


class PcapngWriter(FileTarget):
    """Write PacketBatches to a pcapng file (or binary file object).

    :param hostname: the host the packets were captured on (e.g. a sensor's): written as a
        section comment ``host <name>`` and in each interface's ``if_description``
        (``<host>:<interface>``). Without it the SHB describes this machine
        (``shb_hardware``, ``shb_os``).
    :param comment: a section comment.
    Same ``.part``/rename/fsync behaviour as :class:`~pktstream.formats.pcap.PcapWriter`.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, *, hostname: str | None = None,
                 comment: str | None = None, fsync: bool = False, atomic: bool = True,
                 mode: int = 0o640) -> None:
        super().__init__(target, fsync=fsync, atomic=atomic, mode=mode)
        from pktstream import __version__
        self.hostname = hostname
        comments = ([f"host {hostname}"] if hostname else []) + ([comment] if comment else [])
        if hostname:
            shb = section_header_block(userappl=f"pktstream {__version__}", comments=comments)
        else:
            u = platform.uname()
            shb = section_header_block(hardware=u.machine, os_name=f"{u.system} {u.release}",
                                       userappl=f"pktstream {__version__}", comments=comments)
        self._file.write(shb)
        self.file_bytes = len(shb)
        self.interfaces: dict[tuple, int] = {}
        self.idb_positions: list[tuple[int, int]] = []  # (offset, length) of each IDB written
        self.packets = 0
        self.bytes = 0

    def _iface(self, batch: PacketBatch) -> int:
        key = (batch.interface, batch.link_type)
        idx = self.interfaces.get(key)
        if idx is None:
            idx = self.interfaces[key] = len(self.interfaces)
            name = None if batch.interface is None else str(batch.interface)
            desc = f"{self.hostname}:{name}" if self.hostname and name else None
            idb = interface_block(batch.link_type, batch.snaplen, name=name, description=desc)
            self._file.write(idb)
            self.idb_positions.append((self.file_bytes, len(idb)))
            self.file_bytes += len(idb)
        return idx

    def encoded_size(self, batch: PacketBatch) -> int:
        """Bytes of the EPBs ``write(batch)`` adds (IDB and comments excluded)."""
        cap = batch.caplen
        return int(32 * len(cap) + ((cap.astype("int64") + 3) & ~3).sum())

    def write(self, batch: PacketBatch, comments: dict[int, str] | None = None) -> None:
        """Append ``batch``; ``comments`` maps packet indexes of the batch to comment text."""
        if self._closed:
            raise ClosedError("PcapngWriter is closed")
        n = len(batch)
        if n == 0:
            return
        idx = self._iface(batch)
        data: bytes | bytearray
        if not comments:
            data = records_to_epb(memoryview(batch), batch.nbytes, idx)
            self._file.write(data)
            self.file_bytes += len(data)
        else:
            mv = memoryview(batch)
            offs, caps = batch.offset.tolist(), batch.caplen.tolist()
            start = 0
            for i in sorted(k for k in comments if 0 <= k < n):
                lo, hi = offs[start] - 16 if start < i else 0, offs[i] - 16
                if start < i:
                    data = records_to_epb(mv[lo:hi], hi - lo, idx)
                    self._file.write(data)
                    self.file_bytes += len(data)
                data = _epb_with_comment(bytes(mv[hi:offs[i] + caps[i]]), idx, comments[i])
                self._file.write(data)
                self.file_bytes += len(data)
                start = i + 1
            if start < n:
                lo = offs[start] - 16
                data = records_to_epb(mv[lo:], batch.nbytes - lo, idx)
                self._file.write(data)
                self.file_bytes += len(data)
        self.packets += n
        self.bytes += batch.nbytes - 16 * n

    def close(self) -> None:
        """Flush, optionally fsync, and give the file its final name. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finish()

    def __enter__(self) -> PcapngWriter:
        return self
