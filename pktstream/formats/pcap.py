"""Classic pcap files (nanosecond magic by default, microsecond on request).

A PacketBatch's bytes are already pcap records with nanosecond timestamps, so writing a batch
to a nanosecond pcap file is one ``write`` of its buffer; the microsecond variant is one C
pass over the record headers (``pktstream._records.ns_to_us``).
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

from pktstream._capture import PacketBatch
from pktstream._records import ns_to_us
from pktstream.exceptions import ClosedError
from pktstream.formats._common import PCAP_MAGIC_NS as MAGIC_NS, PCAP_MAGIC_US as MAGIC_US, dlt_to_linktype, fsync_dir

__all__ = ["MAGIC_NS", "MAGIC_US", "PcapWriter", "pcap_file_header"]


def pcap_file_header(link_type: int, snaplen: int = 262144, *, nanosecond: bool = True) -> bytes:
    """The 24-byte little-endian pcap global header (``link_type`` is a DLT value)."""
    return struct.pack("<IHHiIII", MAGIC_NS if nanosecond else MAGIC_US, 2, 4, 0, 0, snaplen,
                       dlt_to_linktype(link_type))


class FileTarget:
    """Shared by the writers: a path (written as ``<path>.part``, renamed on close) or a file object.

    fsync policy: with ``fsync=True`` the file is fsync'ed before the rename and its directory
    after it, so a completed file survives a power cut; with ``fsync=False`` (default) the
    rename still guarantees that a file with its final name was completely written by
    pktstream, but after a crash of the machine (not of the process) its tail may be missing.
    """

    def __init__(self, target, *, fsync: bool, atomic: bool, mode: int) -> None:
        self._path: str | None = None
        self._tmp: str | None = None
        self._fsync = fsync
        if isinstance(target, (str, os.PathLike)):
            self._path = os.fspath(target)
            self._tmp = self._path + ".part" if atomic else self._path
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
            self._file: BinaryIO = os.fdopen(fd, "wb")
            self._owns = True
        else:
            self._file = target
            self._owns = False
        self._closed = False

    @property
    def path(self) -> str | None:
        """Final name of the file (None when writing to a file object)."""
        return self._path

    def fileno(self) -> int:
        return self._file.fileno()

    def flush(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")
        self._file.flush()

    def _finish(self) -> None:
        self._file.flush()
        if self._owns:
            assert self._tmp is not None and self._path is not None  # a path target
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            if self._tmp != self._path:
                os.replace(self._tmp, self._path)
                if self._fsync:
                    fsync_dir(os.path.dirname(os.path.abspath(self._path)))

    def abort(self) -> None:
        """Close without completing: a ``.part`` file is removed."""
        if self._closed:
            return
        self._closed = True
        if self._owns:
            assert self._tmp is not None  # a path target
            self._file.close()
            if self._tmp != self._path:
                try:
                    os.unlink(self._tmp)
                except FileNotFoundError:
                    pass

    def close(self) -> None:  # each writer completes its file its own way
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.close()


class PcapWriter(FileTarget):
    """Write PacketBatches to a pcap file (or any binary file object, e.g. a pipe).

    With a path, the file is written as ``<path>.part`` and renamed on ``close()``, so a file
    with the final name is always complete. ``fsync=True`` syncs before the rename.
    ``nanosecond=False`` writes the classic microsecond format (timestamps truncated).
    A pcap file has one link type: a batch of another link type raises ``ValueError``
    (use pcapng for mixed link types). ``packets``/``bytes`` count what was written.
    Lifetime: call ``close()`` (or use ``with``); data in Python buffers is lost otherwise.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, *, link_type: int | None = None,
                 snaplen: int = 262144, nanosecond: bool = True, fsync: bool = False,
                 atomic: bool = True, mode: int = 0o640) -> None:
        super().__init__(target, fsync=fsync, atomic=atomic, mode=mode)
        self._nanosecond = nanosecond
        self._snaplen = snaplen
        self.link_type = link_type
        self.packets = 0
        self.bytes = 0
        self.file_bytes = 0
        if link_type is not None:
            self._write_header(link_type)

    def _write_header(self, link_type: int) -> None:
        self.link_type = link_type
        hdr = pcap_file_header(link_type, self._snaplen, nanosecond=self._nanosecond)
        self._file.write(hdr)
        self.file_bytes += len(hdr)

    def encoded_size(self, batch: PacketBatch) -> int:
        """Bytes ``write(batch)`` adds to the file (header excluded)."""
        return batch.nbytes

    def write(self, batch: PacketBatch) -> None:
        """Append every packet of ``batch`` (its link type must match the file's)."""
        if self._closed:
            raise ClosedError("PcapWriter is closed")
        if self.link_type is None:
            self._snaplen = max(self._snaplen, batch.snaplen) if self._snaplen else batch.snaplen
            self._write_header(batch.link_type)
        elif batch.link_type != self.link_type:
            raise ValueError(f"batch link type {batch.link_type} differs from the file's {self.link_type}; "
                             "use pcapng for mixed link types")
        if self._nanosecond:
            self._file.write(batch)
        else:
            self._file.write(ns_to_us(memoryview(batch), batch.nbytes))
        self.packets += len(batch)
        self.bytes += batch.nbytes - 16 * len(batch)
        self.file_bytes += batch.nbytes

    def close(self) -> None:
        """Flush, optionally fsync, and give the file its final name. Idempotent."""
        if self._closed:
            return
        if self.link_type is None:  # nothing written: still a valid empty file
            self._write_header(1)
        self._closed = True
        self._finish()

    def __enter__(self) -> PcapWriter:
        return self
