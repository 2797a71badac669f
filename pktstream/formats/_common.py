"""Constants shared by the capture-file readers and writers."""
from __future__ import annotations

import os
import warnings

from pktstream.exceptions import PcapWarning

#: Default size of the record buffer behind one batch read from a file: 1 MiB (the size of a
#: streamed block) keeps a buffer in the L2 cache between the read and the passes over its
#: record headers; 4 MiB read the 1M-packet benchmark file ~1.5x slower (bench/README.md).
DEFAULT_BATCH_BYTES = 1024 * 1024
#: Largest packet (caplen) accepted from a file; libpcap's own limit is 256 KiB for most
#: link types, D-Bus allows 128 MiB, we accept up to 16 MiB and reject anything larger.
MAX_CAPLEN = 16 * 1024 * 1024
#: Largest pcapng block accepted (Wireshark's limit is 16 MiB too).
MAX_BLOCK = MAX_CAPLEN + 64 * 1024
#: Snaplen used when a file says 0 ("no limit").
DEFAULT_SNAPLEN = 262144

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def starts_zstd(head: bytes) -> bool:
    """Whether data starting with ``head`` (4+ bytes) is zstd: a zstd frame, or a skippable
    frame (magic 0x184D2A50-0x184D2A5F, e.g. metadata some tools write first)."""
    return head[:4] == ZSTD_MAGIC or (len(head) >= 4 and 0x184D2A50 <= int.from_bytes(head[:4], "little") <= 0x184D2A5F)
GZIP_MAGIC = b"\x1f\x8b"

# LINKTYPE_ values written in files whose DLT_ value (what libpcap and PacketBatch use on
# Linux) differs; every other value is the same in both spaces.
_LINKTYPE_TO_DLT = {101: 12, 100: 11}
_DLT_TO_LINKTYPE = {v: k for k, v in _LINKTYPE_TO_DLT.items()}


def linktype_to_dlt(linktype: int) -> int:
    """A file's LINKTYPE_ value as the DLT_ value libpcap and PacketBatch use (101 -> 12)."""
    return _LINKTYPE_TO_DLT.get(linktype, linktype)


def dlt_to_linktype(dlt: int) -> int:
    """A DLT_ value as the LINKTYPE_ value files hold (12 -> 101)."""
    return _DLT_TO_LINKTYPE.get(dlt, dlt)


class TruncatedFileWarning(PcapWarning):
    """A capture file ends in the middle of a record or block (e.g. copied while written).
    ``offset`` is the byte offset (in the decompressed stream) where the partial record starts."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def warn_truncated(message: str, offset: int) -> None:
    warnings.warn(TruncatedFileWarning(message, offset), stacklevel=3)


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (a rename or a new file in it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
