"""The whole exception tree of pktstream.

Every error pktstream raises derives from :class:`PktstreamError`. libpcap failures are
:class:`PcapError` (also an :class:`OSError`), mapped from libpcap's status codes by
:data:`PCAP_ERROR_CLASSES`; messages name the operation and the device or file.
"""
from __future__ import annotations


class PktstreamError(Exception):
    """Base class of every pktstream error."""


class PcapError(PktstreamError, OSError):
    """A libpcap call failed. ``code`` is libpcap's status, ``device`` the interface or file."""

    def __init__(self, message: str, *, code: int = -1, device: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.device = device

    def __str__(self) -> str:  # OSError's __str__ would show the errno tuple
        return str(self.args[0]) if self.args else ""


class NoSuchDevice(PcapError):
    """The interface does not exist."""


class CapturePermissionError(PcapError, PermissionError):
    """Capturing needs CAP_NET_RAW (and CAP_NET_ADMIN for some settings), e.g. run as root."""


class InterfaceNotUp(PcapError):
    """The interface exists but is down."""


class CaptureNotSupported(PcapError):
    """The device or libpcap does not support the requested setting (e.g. monitor mode)."""


class FilterError(PktstreamError, ValueError):
    """A BPF filter expression did not compile; the message is libpcap's."""


class FileFormatError(PktstreamError, ValueError):
    """A capture file (or a block of records) is malformed: bad magic, truncated, hostile lengths."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class ClosedError(PktstreamError, ValueError):
    """An operation on a closed Capture, a released PacketBatch or a closed writer."""


class FrameError(PktstreamError, ValueError):
    """A wire-protocol frame is malformed or violates a bound."""


class ConfigError(PktstreamError, ValueError):
    """Invalid configuration; the message names the key path and the reason."""


class AuthenticationError(PktstreamError):
    """The peer failed authentication (wrong key, bad certificate, replay)."""


class PcapWarning(UserWarning):
    """libpcap activated the handle but reported a warning (e.g. promiscuous mode not supported)."""


# libpcap status codes (pcap/pcap.h) -> exception class. Unknown codes map to PcapError.
PCAP_ERROR_CLASSES: dict[int, type[PcapError]] = {
    -5: NoSuchDevice,            # PCAP_ERROR_NO_SUCH_DEVICE
    -8: CapturePermissionError,  # PCAP_ERROR_PERM_DENIED
    -9: InterfaceNotUp,          # PCAP_ERROR_IFACE_NOT_UP
    -6: CaptureNotSupported,     # PCAP_ERROR_RFMON_NOTSUP
    -12: CaptureNotSupported,    # PCAP_ERROR_TSTAMP_PRECISION_NOTSUP
    -11: CapturePermissionError,  # PCAP_ERROR_PROMISC_PERM_DENIED
}


def pcap_error(message: str, code: int, device: str | None) -> PcapError:
    """Build the exception for a libpcap status code."""
    cls = PCAP_ERROR_CLASSES.get(code, PcapError)
    return cls(message, code=code, device=device)
