"""Classic pcap files (nanosecond magic by default).

A PacketBatch's bytes are already pcap records with nanosecond timestamps, so writing a batch
to a nanosecond pcap file is one ``write`` of its buffer.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

from pktstream._capture import PacketBatch
from pktstream.exceptions import ClosedError

MAGIC_NS = 0xA1B23C4D
MAGIC_US = 0xA1B2C3D4


def pcap_file_header(link_type: int, snaplen: int = 262144, *, nanosecond: bool = True) -> bytes:
    """The 24-byte little-endian pcap global header."""
    return struct.pack("<IHHiIII", MAGIC_NS if nanosecond else MAGIC_US, 2, 4, 0, 0, snaplen, link_type)


class PcapWriter:
    """Write PacketBatches to a pcap file (or any binary file object).

    With a path, the file is written as ``<path>.part`` and renamed on ``close()``, so a file
    with the final name is always complete. ``fsync=True`` syncs before the rename.
    Lifetime: call ``close()`` (or use ``with``); data in Python buffers is lost otherwise.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, *, link_type: int | None = None,
                 snaplen: int = 262144, nanosecond: bool = True, fsync: bool = False,
                 atomic: bool = True, mode: int = 0o640) -> None:
        self._path: str | None = None
        self._tmp: str | None = None
        self._fsync = fsync
        if isinstance(target, (str, os.PathLike)):
            self._path = os.fspath(target)
            self._tmp = self._path + ".part" if atomic else self._path
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            self._file: BinaryIO = os.fdopen(fd, "wb")
            self._owns = True
        else:
            self._file = target
            self._owns = False
        self._nanosecond = nanosecond
        self._snaplen = snaplen
        self.link_type = link_type
        self.packets = 0
        self.bytes = 0
        self._closed = False
        if link_type is not None:
            self._write_header(link_type)

    def _write_header(self, link_type: int) -> None:
        self.link_type = link_type
        self._file.write(pcap_file_header(link_type, self._snaplen, nanosecond=self._nanosecond))

    def write(self, batch: PacketBatch) -> None:
        """Append every packet of ``batch`` (its link type must match the file's)."""
        if self._closed:
            raise ClosedError("PcapWriter is closed")
        if self.link_type is None:
            self._write_header(batch.link_type)
        elif batch.link_type != self.link_type:
            raise ValueError(f"batch link type {batch.link_type} differs from the file's {self.link_type}; "
                             "use pcapng for mixed link types")
        if self._nanosecond:
            self._file.write(batch)
        else:
            self._file.write(_records_to_us(batch))
        self.packets += len(batch)
        self.bytes += int(batch.caplen.sum())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        """Flush, optionally fsync, and give the file its final name. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.link_type is None:  # nothing written: still a valid empty file
            self._write_header(1)
        self._file.flush()
        if self._owns:
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            if self._tmp != self._path:
                os.replace(self._tmp, self._path)

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _records_to_us(batch: PacketBatch) -> bytes:
    """Records with microsecond timestamps (for the µs pcap variant)."""
    import numpy as np
    out = bytearray(batch)
    offs = batch.offset - 12  # ts_nsec field of each record header
    view = np.frombuffer(out, dtype=np.uint8)
    for off in offs.tolist():
        ns = int.from_bytes(view[off:off + 4], "little")
        view[off:off + 4] = np.frombuffer((ns // 1000).to_bytes(4, "little"), dtype=np.uint8)
    return bytes(out)
