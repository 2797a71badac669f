"""pktstream: capture packets with libpcap and stream them, zstd-compressed, to a receiver."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _dist_version

import zstandard as _zstd

from pktstream._capture import (
    BpfProgram, Capture, Interface, InterfaceAddress, PacketBatch, count_records,
    libpcap_version, link_type_name, list_interfaces,
)
from pktstream.exceptions import (
    AuthenticationError, CaptureNotSupported, CapturePermissionError, ClosedError, ConfigError,
    FileFormatError, FilterError, FrameError, InterfaceNotUp, NoSuchDevice, PcapError, PcapWarning,
    PktstreamError,
)

try:
    __version__ = _dist_version("pktstream")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"


def zstd_version() -> str:
    """Version of the zstd library inside the ``zstandard`` package."""
    return _zstd.ZSTD_VERSION if isinstance(_zstd.ZSTD_VERSION, str) else ".".join(map(str, _zstd.ZSTD_VERSION))


def read(source, *, bpf=None, batch_bytes: int | None = None, truncated: str = "warn"):
    """Iterate over a capture file (pcap, pcapng, .zst, .gz; path or file object) as
    :class:`PacketBatch` objects. See :func:`pktstream.formats.read` and docs/FILES.md."""
    from pktstream.formats.reader import DEFAULT_BATCH_BYTES, read as _read
    return _read(source, bpf=bpf, batch_bytes=batch_bytes or DEFAULT_BATCH_BYTES, truncated=truncated)


def decode(batches):
    """Decode headers of a batch (or an iterable of batches) into numpy columns; see
    :mod:`pktstream.headers` and docs/FILES.md."""
    from pktstream.headers import decode as _decode
    return _decode(batches)


def open_offline(path, **kwargs) -> Capture:
    """Read a pcap file through libpcap (see :meth:`Capture.open_offline`)."""
    return Capture.open_offline(path, **kwargs)


__all__ = [
    "AuthenticationError", "BpfProgram", "Capture", "CaptureNotSupported", "CapturePermissionError",
    "ClosedError", "ConfigError", "decode", "FileFormatError", "FilterError", "FrameError", "Interface",
    "InterfaceAddress", "InterfaceNotUp", "NoSuchDevice", "PacketBatch", "PcapError", "PcapWarning",
    "PktstreamError", "__version__", "count_records", "libpcap_version", "link_type_name",
    "list_interfaces", "open_offline", "read", "zstd_version",
]
