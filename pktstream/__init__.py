"""pktstream: capture packets with libpcap and stream them, zstd-compressed, to a receiver.

Where to start:

* Capture on this host: :class:`Capture` (a libpcap handle; iterate it for :class:`PacketBatch`
  blocks, zero-copy numpy views), ``pktstream capture`` on the command line.
* Files: :func:`read` (pcap, pcapng, .zst, .gz → batches), :func:`open_reader`,
  :func:`open_writer`, :func:`decode` (header columns as numpy arrays).
* Archives of capture files: :class:`Archive` (flow index in Parquet, queries that read only
  what can match; ``pktstream index|query|flows|sql``, docs/ARCHIVE.md).
* Streaming: :class:`Sensor` (capture on interfaces, compress, send with a send window and a disk
  spool) and :class:`Receiver` (accept sensors, write to outputs: :class:`FileSink`,
  :class:`StdoutSink`, :class:`CallbackSink`, S3 and Kafka in ``pktstream.sinks``).

The data path: Capture → ring → PacketBatch → compressor → send window/spool → uplink →
receiver session → ingest (validate, dedupe) → outputs → commit → ACK; docs/PROTOCOL.md and
docs/OPERATIONS.md describe the stream.
Streaming classes are imported on first use, so ``import pktstream`` stays light: it imports
neither numpy (loaded when a batch's index arrays are first used) nor asyncio nor
importlib.metadata (tests/test_startup.py checks it).
"""
from __future__ import annotations

from pktstream._capture import (
    BpfProgram,
    Capture,
    Interface,
    InterfaceAddress,
    PacketBatch,
    count_records,
    libpcap_version,
    link_type_name,
    list_interfaces,
)
from pktstream._version import __version__
from pktstream.exceptions import (
    AuthenticationError,
    CaptureNotSupported,
    CapturePermissionError,
    ClosedError,
    ConfigError,
    FileFormatError,
    FilterError,
    FrameError,
    InterfaceNotUp,
    NoSuchDevice,
    PcapError,
    PcapWarning,
    PktstreamError,
)


def zstd_version() -> str:
    """Version of the zstd library inside the ``zstandard`` package."""
    import zstandard as _zstd
    return _zstd.ZSTD_VERSION if isinstance(_zstd.ZSTD_VERSION, str) else ".".join(map(str, _zstd.ZSTD_VERSION))


def read(source, *, bpf=None, batch_bytes: int | None = None, truncated: str = "warn", memory_map: bool = False,
         file_order: bool = False):
    """Iterate over a capture file (pcap, pcapng, .zst, .gz; path or file object) as
    :class:`PacketBatch` objects (a pcapng read buffer's packets grouped per interface;
    ``file_order=True``: in the file's order also across interleaved interfaces, as runs).
    ``memory_map=True``: zero-copy batches out of a mapped file (SIGBUS if someone truncates it
    while they are held). See
    :func:`pktstream.formats.read` and docs/FILES.md."""
    from pktstream.formats.reader import DEFAULT_BATCH_BYTES, read as _read
    return _read(source, bpf=bpf, batch_bytes=batch_bytes or DEFAULT_BATCH_BYTES, truncated=truncated,
                 memory_map=memory_map, file_order=file_order)


def decode(batches):
    """Decode headers of a batch (or an iterable of batches) into numpy columns; see
    :mod:`pktstream.headers` and docs/FILES.md."""
    from pktstream.headers import decode as _decode
    return _decode(batches)


def open_offline(path, **kwargs) -> Capture:
    """Read a pcap file through libpcap (see :meth:`Capture.open_offline`)."""
    return Capture.open_offline(path, **kwargs)


_LAZY = {
    "Sensor": "pktstream.stream.sensor", "Receiver": "pktstream.stream.receiver",
    "FileSink": "pktstream.sinks", "StdoutSink": "pktstream.sinks", "CallbackSink": "pktstream.sinks",
    "open_reader": "pktstream.formats", "open_writer": "pktstream.formats",
    "Archive": "pktstream.archive",
}


def __getattr__(name: str):
    """Streaming classes, sinks and file openers, imported when first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pktstream' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Archive", "Sensor", "Receiver", "FileSink", "StdoutSink", "CallbackSink", "open_reader", "open_writer",
    "AuthenticationError", "BpfProgram", "Capture", "CaptureNotSupported", "CapturePermissionError",
    "ClosedError", "ConfigError", "decode", "FileFormatError", "FilterError", "FrameError", "Interface",
    "InterfaceAddress", "InterfaceNotUp", "NoSuchDevice", "PacketBatch", "PcapError", "PcapWarning",
    "PktstreamError", "__version__", "count_records", "libpcap_version", "link_type_name",
    "list_interfaces", "open_offline", "read", "zstd_version",
]
