"""pcapng writer: one Section Header Block, one Interface Description Block per distinct
``(interface name, link type, snap length)``, Enhanced Packet Blocks with nanosecond stamps.

Blocks are little-endian. EPBs are built for a whole batch in one C pass
(``pktstream._records.records_to_epb``; ``records_to_epb_ids`` where a batch's packets come
from interleaved interfaces); a packet with a comment gets its own EPB with an ``opt_comment``
option.
"""
from __future__ import annotations

import os
import platform
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeAlias

from pktstream._capture import PacketBatch
from pktstream._records import records_to_epb, records_to_epb_ids
from pktstream.exceptions import ClosedError
from pktstream.formats._common import PCAPNG_BOM, PCAPNG_SHB, dlt_to_linktype
from pktstream.formats.pcap import FileTarget

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["PcapngWriter", "section_header_block", "interface_block", "PacketInterfaces"]


class _Interface(Protocol):
    @property
    def name(self) -> str | None: ...
    @property
    def link_type(self) -> int: ...
    @property
    def snaplen(self) -> int: ...


#: ``(ids, interfaces)``: packet ``k`` of a batch was captured on ``interfaces[ids[k]]``
PacketInterfaces: TypeAlias = "tuple[Any, Sequence[_Interface]]"


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
        return self._iface_of(batch.interface, batch.link_type, batch.snaplen)

    def _iface_of(self, interface: str | None, link_type: int, snaplen: int) -> int:
        # (interfaces that share a name but not the snap length stay apart: one IDB's snap
        # length must cover all of its packets)
        key = (interface, link_type, snaplen)
        idx = self.interfaces.get(key)
        if idx is None:
            idx = self.interfaces[key] = len(self.interfaces)
            idb = self._idb(interface, link_type, snaplen)
            self._file.write(idb)
            self.idb_positions.append((self.file_bytes, len(idb)))
            self.file_bytes += len(idb)
        return idx

    def _idb(self, interface: str | None, link_type: int, snaplen: int) -> bytes:
        name = None if interface is None else str(interface)
        desc = f"{self.hostname}:{name}" if self.hostname and name else None
        return interface_block(link_type, snaplen, name=name, description=desc)

    def new_idb_bytes(self, batch: PacketBatch, interfaces: PacketInterfaces | None = None) -> int:
        """Bytes of the IDBs writing ``batch`` (with ``interfaces``) would add to this file."""
        if interfaces is None:
            keys = {(batch.interface, batch.link_type, batch.snaplen)}
        else:
            import numpy as np
            infos = interfaces[1]
            keys = {(infos[u].name, infos[u].link_type, infos[u].snaplen)
                    for u in np.unique(np.asarray(interfaces[0])).tolist() if 0 <= u < len(infos)}
        return sum(len(self._idb(*k)) for k in keys if k not in self.interfaces)

    def _ids_of(self, batch: PacketBatch, interfaces: PacketInterfaces | None) -> Any:
        """The output interface of each packet (uint32 array), or one index for them all."""
        if interfaces is None:
            return self._iface(batch)
        import numpy as np
        ids, infos = interfaces
        ids = np.asarray(ids)
        if len(ids) != len(batch):
            raise ValueError(f"{len(ids)} interface ids for a batch of {len(batch)} packets")
        lut = np.zeros(len(infos), dtype=np.uint32)
        for u in np.unique(ids).tolist():
            if not 0 <= u < len(infos):
                raise ValueError(f"interface id {u} not among the {len(infos)} interfaces given")
            i = infos[u]
            lut[u] = self._iface_of(i.name, i.link_type, i.snaplen)
        return lut[ids]

    def encoded_size(self, batch: PacketBatch) -> int:
        """Bytes of the EPBs ``write(batch)`` adds (IDB and comments excluded)."""
        cap = batch.caplen
        return int(32 * len(cap) + ((cap.astype("int64") + 3) & ~3).sum())

    def write(self, batch: PacketBatch, comments: dict[int, str] | None = None, *,
              interfaces: PacketInterfaces | None = None,
              offsets_out: npt.NDArray[np.int64] | None = None) -> None:
        """Append ``batch``; ``comments`` maps packet indexes of the batch to comment text;
        ``interfaces``: ``(ids, infos)``, packet ``k`` was captured on ``infos[ids[k]]`` (an
        object with ``name``, ``link_type`` and ``snaplen``, e.g. a reader's
        :class:`InterfaceInfo`), for a batch of interleaved interfaces written in one pass
        (``CaptureReader.batch_interfaces``, a merge); default: every packet on the batch's
        interface. ``offsets_out``: an int64 array of ``len(batch)`` entries that receives
        ``batch.offset`` (each packet's data offset in the batch), found by the conversion's own
        pass over the records, for a writer's observer that would walk them again. A batch whose
        count is wrong is still written whole (every record in its buffer), and -1 in
        ``offsets_out`` says so: past the records found, or first when there are more."""
        if self._closed:
            raise ClosedError("PcapngWriter is closed")
        n = len(batch)
        if n == 0:
            return
        idx = self._ids_of(batch, interfaces)
        data: bytes | bytearray
        if not comments:
            data = self._epbs(memoryview(batch), batch.nbytes, idx, 0, n, offsets_out)
            self._file.write(data)
            self.file_bytes += len(data)
        else:
            mv = memoryview(batch)
            offs, caps = batch.offset.tolist(), batch.caplen.tolist()
            if offsets_out is not None:
                offsets_out[:n] = batch.offset
                offsets_out[n:] = -1
                if offs[-1] + caps[-1] != batch.nbytes:  # (more records than its count: as _epbs)
                    offsets_out[0] = -1
            start = 0
            for i in sorted(k for k in comments if 0 <= k < n):
                lo, hi = offs[start] - 16 if start < i else 0, offs[i] - 16
                if start < i:
                    data = self._epbs(mv[lo:hi], hi - lo, idx, start, i)
                    self._file.write(data)
                    self.file_bytes += len(data)
                one = idx if isinstance(idx, int) else int(idx[i])
                data = _epb_with_comment(bytes(mv[hi:offs[i] + caps[i]]), one, comments[i])
                self._file.write(data)
                self.file_bytes += len(data)
                start = i + 1
            if start < n:
                lo = offs[start] - 16
                data = self._epbs(mv[lo:], batch.nbytes - lo, idx, start, n)
                self._file.write(data)
                self.file_bytes += len(data)
        self.packets += n
        self.bytes += batch.nbytes - 16 * n

    @staticmethod
    def _epbs(mv: memoryview, length: int, idx: Any, start: int, stop: int, offsets: Any = None) -> bytearray:
        """EPBs of packets ``start:stop`` (their records: ``mv[:length]``); ``offsets``: see
        :meth:`write`."""
        if isinstance(idx, int):
            return records_to_epb(mv, length, idx, offsets)
        return records_to_epb_ids(mv, length, idx[start:stop], offsets)

    def close(self) -> None:
        """Flush, optionally fsync, and give the file its final name. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finish()

    def __enter__(self) -> PcapngWriter:
        return self
