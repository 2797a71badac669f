"""Wire protocol between sensor and receiver (byte layout in docs/PROTOCOL.md).

Every frame starts with a fixed 36-byte little-endian header::

    magic u32 'PKST' | version u8 | type u8 | flags u16 | header_len u16 | reserved u16 |
    seq u64 | iface u32 | count u32 | raw_len u32 | payload_len u32

DATA payloads are one zstd frame (content size + checksum) of pcap records, or the records
themselves when flag STORED is set. Control payloads (HELLO, CHALLENGE, AUTH, WELCOME, STATS,
BYE, ERROR) are UTF-8 JSON objects of at most ``MAX_CONTROL_BYTES``. Every length is checked
against the negotiated bounds before anything is allocated.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from pktstream._capture import PacketBatch
from pktstream.exceptions import FrameError

MAGIC = 0x54534B50  # b"PKST" little-endian
VERSION = 1
HEADER = struct.Struct("<IBBHHHQIIII")
HEADER_LEN = HEADER.size  # 36
MAX_CONTROL_BYTES = 64 * 1024
DEFAULT_MAX_RAW_BYTES = 8 * 1024 * 1024     # largest decompressed block a receiver accepts
NONCE_BYTES = 32
MAX_SEQ = 1 << 63                   # sequence numbers stay below this (they start at a clock in µs)
SEQ_AHEAD_US = 86_400 * 1_000_000   # a receiver refuses sequence numbers more than a day ahead of its clock


class FrameType(enum.IntEnum):
    HELLO = 1       # sensor -> receiver: identity, interfaces, nonce
    CHALLENGE = 2   # receiver -> sensor: nonce, receiver proof
    AUTH = 3        # sensor -> receiver: sensor proof
    WELCOME = 4     # receiver -> sensor: last committed seq, limits
    DATA = 5        # sensor -> receiver: one block
    ACK = 6         # receiver -> sensor: every seq <= header.seq is committed
    HEARTBEAT = 7   # both ways, when idle
    STATS = 8       # sensor -> receiver: counters (JSON)
    BYE = 9         # either way: orderly close (receiver answers after flushing)
    ERROR = 10      # receiver -> sensor: why the connection is being closed (JSON)


class Flags(enum.IntFlag):
    NONE = 0
    STORED = 1      # DATA payload is raw records, not zstd


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame header plus its payload bytes."""
    type: FrameType
    flags: int = 0
    seq: int = 0
    iface: int = 0
    count: int = 0
    raw_len: int = 0
    payload: bytes = b""

    def json(self) -> dict[str, Any]:
        """The payload of a control frame as a dict (FrameError if it is not a JSON object)."""
        try:
            obj = json.loads(self.payload)
        except (ValueError, RecursionError) as exc:  # (not UTF-8, not JSON, a 5000-digit number, 60,000 '['s)
            raise FrameError(f"{self.type.name} payload is not usable JSON: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise FrameError(f"{self.type.name} payload is not a JSON object")
        try:  # a lone surrogate ("\\ud800") is valid JSON but no text: every later .encode() would raise
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise FrameError(f"{self.type.name} payload has a string that is not Unicode text (a lone "
                             "surrogate)") from None
        return obj


def encode_header(ftype: FrameType, payload_len: int, *, flags: int = 0, seq: int = 0, iface: int = 0,
                  count: int = 0, raw_len: int = 0) -> bytes:
    """The 36-byte header of a frame whose payload is sent separately (no copy of it)."""
    return HEADER.pack(MAGIC, VERSION, ftype, flags, HEADER_LEN, 0, seq, iface, count, raw_len, payload_len)


def encode(ftype: FrameType, payload: bytes = b"", *, flags: int = 0, seq: int = 0, iface: int = 0,
           count: int = 0, raw_len: int = 0) -> bytes:
    """Header + payload of one frame."""
    return encode_header(ftype, len(payload), flags=flags, seq=seq, iface=iface, count=count,
                         raw_len=raw_len) + payload


def encode_json(ftype: FrameType, obj: dict[str, Any], **kw: int) -> bytes:
    return encode(ftype, json.dumps(obj, separators=(",", ":")).encode(), **kw)


@dataclass(frozen=True, slots=True)
class Header:
    type: FrameType
    flags: int
    seq: int
    iface: int
    count: int
    raw_len: int
    payload_len: int
    header_len: int


def decode_header(data: bytes, *, max_payload: int, max_raw: int) -> Header:
    """Parse and bound-check a header; raises FrameError with the reason."""
    if len(data) < HEADER_LEN:
        raise FrameError(f"short header ({len(data)} bytes)")
    magic, version, ftype, flags, hlen, _res, seq, iface, count, raw_len, plen = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic 0x{magic:08x} (not a pktstream peer?)")
    if version != VERSION:
        raise FrameError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    try:
        t = FrameType(ftype)
    except ValueError:
        raise FrameError(f"unknown frame type {ftype}") from None
    if hlen < HEADER_LEN or hlen > 1024:
        raise FrameError(f"bad header length {hlen}")
    if t == FrameType.DATA:
        if raw_len > max_raw:
            raise FrameError(f"DATA raw length {raw_len} exceeds the limit {max_raw}")
        if plen > max_payload:
            raise FrameError(f"DATA payload {plen} exceeds the limit {max_payload}")
        if flags & Flags.STORED and plen != raw_len:
            raise FrameError(f"stored DATA payload {plen} != raw length {raw_len}")
        if count * 16 > raw_len:
            raise FrameError(f"DATA count {count} cannot fit in {raw_len} bytes")
    elif plen > MAX_CONTROL_BYTES:
        raise FrameError(f"{t.name} payload {plen} exceeds {MAX_CONTROL_BYTES}")
    elif flags:
        raise FrameError(f"flags 0x{flags:x} on a {t.name} frame")
    return Header(t, flags, seq, iface, count, raw_len, plen, hlen)


class ByteReader(Protocol):
    """What read_frame needs of a stream (asyncio.StreamReader, or one with bytes put back)."""

    async def readexactly(self, n: int) -> bytes: ...


async def read_frame(reader: ByteReader, *, max_payload: int = DEFAULT_MAX_RAW_BYTES + 65536,
                     max_raw: int = DEFAULT_MAX_RAW_BYTES) -> Frame:
    """Read one frame; FrameError on a protocol violation, IncompleteReadError on EOF."""
    head = await reader.readexactly(HEADER_LEN)
    h = decode_header(head, max_payload=max_payload, max_raw=max_raw)
    if h.header_len > HEADER_LEN:
        await reader.readexactly(h.header_len - HEADER_LEN)  # bounded to 1 KiB above
    payload = await reader.readexactly(h.payload_len) if h.payload_len else b""
    return Frame(h.type, h.flags, h.seq, h.iface, h.count, h.raw_len, payload)


# -- DATA payloads -----------------------------------------------------------------------------

_local = threading.local()  # a ZstdDecompressor is not thread-safe: one per thread


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def decode_data(frame: Frame, *, link_type: int, snaplen: int, interface: str | None,
                max_raw: int = DEFAULT_MAX_RAW_BYTES) -> PacketBatch:
    """Decompress (bounded) and validate a DATA frame into a PacketBatch.

    The zstd frame must announce exactly ``raw_len`` bytes (so no bomb can allocate more),
    its checksum must match, and every record header is walked and checked (caplen <=
    snaplen, inside the block) before the batch reaches an output. Thread-safe.
    """
    if frame.raw_len > max_raw:
        raise FrameError(f"DATA seq {frame.seq}: a block of {frame.raw_len} bytes, above the {max_raw} "
                         "this receiver takes (max_block_bytes)")
    if frame.flags & Flags.STORED:
        raw = frame.payload
    else:
        try:
            params = zstandard.get_frame_parameters(frame.payload)
        except zstandard.ZstdError as exc:
            raise FrameError(f"DATA seq {frame.seq}: not a zstd frame ({exc})") from None
        if not params.has_checksum:
            raise FrameError(f"DATA seq {frame.seq}: zstd frame without a content checksum")
        if params.content_size != frame.raw_len:
            raise FrameError(f"DATA seq {frame.seq}: zstd content size {params.content_size} "
                             f"!= announced raw length {frame.raw_len}")
        try:
            raw = _dctx().decompress(frame.payload, max_output_size=frame.raw_len)
        except zstandard.ZstdError as exc:
            raise FrameError(f"DATA seq {frame.seq}: corrupt zstd frame ({exc})") from None
        if len(raw) != frame.raw_len:
            raise FrameError(f"DATA seq {frame.seq}: decompressed {len(raw)} bytes, announced {frame.raw_len}")
    try:
        batch = PacketBatch.from_records(raw, link_type=link_type, snaplen=snaplen, interface=interface)
    except ValueError as exc:
        raise FrameError(f"DATA seq {frame.seq}: {exc}") from None
    if len(batch) != frame.count:
        n = len(batch)
        batch.release()
        raise FrameError(f"DATA seq {frame.seq}: {n} records, header says {frame.count}")
    return batch


def sibling(batch: PacketBatch) -> PacketBatch:
    """Another batch over the same (already validated) records, so that each output can
    release its own without touching the others'. No copy."""
    return PacketBatch.from_records(batch.buffer_owner, link_type=batch.link_type, snaplen=batch.snaplen,
                                    interface=batch.interface, validate=False, count=len(batch))


# -- authentication ----------------------------------------------------------------------------

def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def parse_nonce(value: object) -> bytes:
    """A peer's nonce (hex text) as bytes; FrameError unless it is exactly NONCE_BYTES long."""
    try:
        nonce = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raise FrameError("bad nonce (not hex)") from None
    if len(nonce) != NONCE_BYTES:
        raise FrameError("bad nonce length")
    return nonce


def proof(key: bytes, role: str, first_nonce: bytes, second_nonce: bytes, sensor_id: str) -> str:
    """HMAC-SHA256 over the role, both nonces and the sensor id (hex). The role label keeps a
    receiver proof from ever being valid as a sensor proof (no reflection)."""
    msg = b"pktstream-v1|" + role.encode() + b"|" + first_nonce + b"|" + second_nonce + b"|" + sensor_id.encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


#: a sensor id: 1-128 printable ASCII characters, no spaces (both ends check it; ``\Z``: "$"
#: also matched before a final newline)
SENSOR_ID = re.compile(r"\A[\x21-\x7e]{1,128}\Z")


def printable(text: str) -> str:
    """A peer's text as it goes into logs, file metadata and headers: control characters (a
    newline would forge a log line) shown as ``?``."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def check_proof(expected: str, given: object) -> bool:
    """Whether the peer's proof ``given`` (any JSON value) is ``expected``, in constant time."""
    return isinstance(given, str) and given.isascii() and hmac.compare_digest(expected, given)


#: The port sensors connect to and receivers listen on (PacketStreamer's default too).
DEFAULT_PORT = 8081


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
