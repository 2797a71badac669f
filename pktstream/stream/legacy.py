"""Deepfence PacketStreamer sensors on a pktstream receiver (legacy, unacknowledged).

An unmodified PacketStreamer sensor connects to the receiver's usual port (plain or TLS) and
is told apart from a pktstream sensor by its first 4 bytes, ``DE EF EC E0``. Its stream:

* optional auth hello (when the sensor has ``auth.enable``): 64 bytes ``DE EF EC E0 | u16 LE key
  length L | key | zero padding``, answered ``DE EF EC E0 00`` when accepted;
* frames ``DE EF EC E0 | u32 LE length N | N bytes of one S2 block``, each block a run of classic
  pcap records with microsecond timestamps (no file header), captured on Ethernet.

Each block is S2-decoded (``pktstream._s2``, bounded by the receiver's ``max_raw``), turned into
pktstream's nanosecond records and handed to ``Ingest.ingest`` (receiver/ingest.py) as a STORED DATA frame of
interface 0 (``packetstreamer``, Ethernet) of a sensor whose id is the peer address, or the id
configured for it. Nothing is acknowledged (upstream has no sequence numbers, resume or loss
counts); sequence numbers are made up here (this receiver's clock in µs, growing by at least
one per block) only to go through the same path; an id a pktstream sensor has used is
refused. The sensor's entry in ``stats()`` says ``legacy: unacknowledged``.

Auth: with a key on the receiver (``auth.key``, or ``auth.keyfile`` looked up by the mapped
sensor id) the sensor must send the hello with that key (compared in constant time); a wrong or
missing key closes the connection. Without a key the hello is accepted as it comes. The key
travels in cleartext: use TLS. All of this runs on the receiver's event loop thread; the
receiver's server (receiver/server.py) calls :func:`intake` for every new connection.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import struct
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pktstream import _s2
from pktstream.exceptions import FrameError
from pktstream.stream import protocol as P

if TYPE_CHECKING:
    from pktstream.stream.receiver.server import Server

log = logging.getLogger("pktstream.stream.receiver")

MAGIC = b"\xde\xef\xec\xe0"
AUTH_HELLO_LEN = 64
AUTH_KEY_MAX = AUTH_HELLO_LEN - 6     # longer keys are truncated by upstream's sensor
AUTH_OK = MAGIC + b"\x00"
IFACE = 0
IFACE_NAME = "packetstreamer"
LINKTYPE_ETHERNET = 1
SOFTWARE = "PacketStreamer (legacy: unacknowledged)"

# per receiver (its Ingest), per sensor id: one frame at a time through ingest (two connections
# from one address share the id, and a frame overtaken by a later sequence number would be a
# duplicate), and the writers of its open connections (the sensor is connected while any is open)
_locks: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()
_open: weakref.WeakKeyDictionary[Any, dict[str, list[asyncio.StreamWriter]]] = weakref.WeakKeyDictionary()


LARGE_FRAME = 256 << 10  # frames above this are decoded in a worker thread


def _decode(payload: bytes, max_raw: int) -> tuple[bytearray, int]:
    """S2 block → nanosecond records and their count (ValueError if malformed). Thread-safe."""
    raw = _s2.decode_block(payload, max_raw)
    return raw, _s2.usec_records_to_nsec(raw)


def max_frame_len(max_raw: int) -> int:
    """Largest S2 block for a decoded size of ``max_raw`` (S2's worst-case expansion)."""
    return 32 + max_raw + max_raw // 6


@dataclass
class PacketStreamerSettings:
    """``legacy:`` in the receiver config.

    :param enabled: accept PacketStreamer sensors (``legacy.packetstreamer``).
    :param sensors: peer address → sensor id (``legacy.sensors``); others are named by address.
    :param snaplen: largest record accepted from them (the receiver's ``inputPacketLen``).
    :param first_bytes_timeout: how long a new connection may stay silent. A PacketStreamer
        sensor sends nothing until its first block (``gatherMaxWaitSec`` after its first captured
        packet); 60 s is its own receiver's read deadline. While the switch is off, the
        receiver's handshake timeout applies instead.
    """
    enabled: bool = True
    sensors: dict[str, str] = field(default_factory=dict)
    snaplen: int = 262144
    first_bytes_timeout: float = 60.0

    def __post_init__(self) -> None:
        # addresses as the lookup sees them (lower case, compressed IPv6, IPv4-mapped as IPv4)
        self.sensors = {_canonical(k.strip()): v for k, v in self.sensors.items()}


class Prepended:
    """A StreamReader whose first bytes were already read (``readexactly`` only, as
    protocol.read_frame needs). Same lifetime and thread as the reader it wraps."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._head, self._reader = head, reader

    async def readexactly(self, n: int) -> bytes:
        if not self._head:
            return await self._reader.readexactly(n)
        take, self._head = self._head[:n], self._head[n:]
        return take + (await self._reader.readexactly(n - len(take)) if n > len(take) else b"")


def _canonical(host: str) -> str:
    """An address as text, IPv4-mapped IPv6 shown as IPv4 (a dual-stack listener's view)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


async def intake(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str, peer: str) -> Prepended | None:
    """The receiver's hook for a new connection: read its first 4 bytes (the first one within
    ``first_bytes_timeout`` while PacketStreamer sensors are accepted, else within the handshake
    timeout; the other three within the handshake timeout). A PacketStreamer sensor is served
    here until it disconnects (returns None); anything else gets a reader that still yields
    those bytes, for the pktstream handshake. FrameError / PermissionError as the handshake
    raises them."""
    settings: PacketStreamerSettings | None = server.legacy
    timeout = server.limits.handshake_timeout
    if settings is not None and not settings.enabled:
        settings = None
    # only the first byte may take long (a PacketStreamer sensor's first block); after a byte that
    # cannot start its magic, a peer is held to the handshake timeout as before
    wait = max(timeout, settings.first_bytes_timeout) if settings is not None else timeout
    if server.awaiting_first_byte >= max(1, server.limits.max_connections // 4):
        wait = timeout  # many silent connections already: no more long waits (slot exhaustion)
    server.awaiting_first_byte += 1
    try:
        head = await asyncio.wait_for(reader.readexactly(1), wait)
    finally:
        server.awaiting_first_byte -= 1
    head += await asyncio.wait_for(reader.readexactly(3), timeout)
    if head != MAGIC:
        return Prepended(head, reader)
    if settings is None:
        raise FrameError("a PacketStreamer sensor: refused, this receiver has legacy.packetstreamer off")
    try:
        await LegacySession(server, settings, reader, writer, host, peer).run()
    except TimeoutError:
        raise TimeoutError("PacketStreamer session") from None  # (not "handshake": it had none)
    return None


class LegacySession:
    """One PacketStreamer connection. Event-loop thread only; lives until the peer leaves."""

    def __init__(self, server: Server, settings: PacketStreamerSettings, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, host: str, peer: str) -> None:
        self.server, self.settings = server, settings
        self.ingest = server.ingest
        self.timeout = server.limits.handshake_timeout
        self.reader, self.writer, self.peer = reader, writer, peer
        self.host = _canonical(host)
        self.sensor_id = settings.sensors.get(self.host, self.host)
        self.max_raw = self.ingest.max_raw
        self.max_frame = max_frame_len(self.max_raw)
        self.iface: dict[str, Any] = {"index": IFACE, "name": IFACE_NAME, "link_type": LINKTYPE_ETHERNET,
                                      "snaplen": settings.snaplen}

    def _key(self) -> bytes | None:
        """The key this sensor must send (None: no key required; b"": none can be right)."""
        sec = self.server.security
        key = sec.key_for(self.sensor_id)
        return b"" if key is None and sec.auth_keys is not None else key

    async def _auth(self, rest: bytes, key: bytes | None) -> None:
        """The 64-byte hello after the magic (``rest`` = its next 4 bytes, already read)."""
        hello = MAGIC + rest + await asyncio.wait_for(self.reader.readexactly(AUTH_HELLO_LEN - 8), self.timeout)
        klen = struct.unpack_from("<H", hello, 4)[0]
        if klen > AUTH_KEY_MAX:  # not a hello upstream can send: a protocol error
            raise FrameError(f"not a PacketStreamer auth hello (key length {klen} > {AUTH_KEY_MAX}): this receiver "
                             "has a key, so the sensor needs auth.enable and that auth.key")
        given = hello[6:6 + klen]
        if key is not None and not key:
            raise PermissionError(f"PacketStreamer sensor {self.sensor_id!r} has no key here (auth.keyfile)")
        if key is not None and not hmac.compare_digest(given, key):
            raise PermissionError(f"PacketStreamer sensor {self.sensor_id!r}: wrong auth key (or none: its "
                                  "auth.enable and auth.key must be set)")
        self.writer.write(AUTH_OK)
        await self.writer.drain()

    async def run(self) -> None:
        from pktstream.stream.receiver.server import cert_names
        key = self._key()
        head = await asyncio.wait_for(self.reader.readexactly(4), self.timeout)
        length = struct.unpack("<I", head)[0]
        first: bytes | None = head  # the first frame's length field, unless it was the auth hello
        if key is not None or length > self.max_frame:  # a key is expected, or it is the hello
            await self._auth(head, key)
            first = None
        if self.server.security.cert_identity and \
                self.sensor_id not in cert_names(self.writer.get_extra_info("peercert")):
            raise PermissionError(f"PacketStreamer sensor id {self.sensor_id!r} is not named in its certificate")
        sock = self.writer.get_extra_info("socket")
        if sock is not None:  # no idle timeout (upstream sensors go silent when idle): find dead peers
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        sensor = self.ingest.sensor_state(self.sensor_id)
        if not sensor.legacy and (sensor.writer is not None or sensor.last_accepted > 0):
            # a pktstream sensor has (or had) this id: one sequence space, one kind of sensor
            raise PermissionError(f"sensor id {self.sensor_id!r} belongs to a pktstream sensor (from "
                                  f"{sensor.peer or 'an earlier run'}): give the PacketStreamer sensor another id "
                                  "(legacy.sensors)")
        sensor.instance = ""  # no pktstream process may pass the duplicate-id check as this one
        sensor.hostname, sensor.software, sensor.peer = self.host, SOFTWARE, self.peer
        sensor.legacy = True  # the ingest path sends no ACK to it and keeps it out of the state file
        sensor.counters["connections"] += 1
        sensor.interfaces[IFACE] = dict(self.iface)
        writers = _open.setdefault(self.ingest, {}).setdefault(self.sensor_id, [])
        writers.append(self.writer)
        sensor.writer = self.writer  # connected (and closed by the server at shutdown)
        log.info("PacketStreamer sensor %s connected from %s (legacy: unacknowledged)", self.sensor_id, self.peer)
        try:
            await self._frames(sensor, first)
        finally:
            writers.remove(self.writer)
            if sensor.writer is self.writer:
                sensor.writer = writers[-1] if writers else None
            log.info("PacketStreamer sensor %s (%s) disconnected", self.sensor_id, self.peer)

    async def _frames(self, sensor: Any, first: bytes | None) -> None:
        while True:
            try:
                if first is None:
                    # idle between frames as long as it likes (upstream sends nothing when idle);
                    # once a frame has begun, the rest must come within the handshake timeout
                    # (plus a second per MB): a stalled peer cannot hold a slot and its buffer
                    head = await self.reader.readexactly(1)
                    head += await asyncio.wait_for(self.reader.readexactly(7), self.timeout)
                    if head[:4] != MAGIC:
                        raise FrameError(f"PacketStreamer frame: bad magic {head[:4].hex()}")
                    length = struct.unpack_from("<I", head, 4)[0]
                else:
                    length, first = struct.unpack("<I", first)[0], None
                if not 0 < length <= self.max_frame:
                    raise FrameError(f"PacketStreamer frame: length {length} outside 1..{self.max_frame}")
                payload = await asyncio.wait_for(self.reader.readexactly(length), self.timeout + length / 1e6)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                log.info("%s: PacketStreamer connection closed (%s)", self.peer, type(exc).__name__)
                return
            if not sensor.legacy:  # a pktstream sensor took this id over: this connection is done
                return
            sensor.last_rx = time.monotonic()
            try:
                if length > LARGE_FRAME:  # decoded off the event loop (the decoder releases the GIL)
                    raw, count = await asyncio.get_running_loop().run_in_executor(None, _decode, payload, self.max_raw)
                else:
                    raw, count = _decode(payload, self.max_raw)
            except ValueError as exc:
                raise FrameError(f"PacketStreamer frame: {exc}") from None
            if not raw:
                continue
            lock = _locks.setdefault(self.ingest, {}).setdefault(self.sensor_id, asyncio.Lock())
            async with lock:
                # made-up numbers like a pktstream sensor's: this receiver's clock in µs, growing
                # by at least one per block. Not a counter from 1: this receiver's outputs may feed
                # another receiver (Kafka) that remembers them across this one's restarts, and would
                # take a restarted counter's blocks for duplicates. A pktstream sensor taking the id
                # over later numbers above them (its clock; WELCOME renumbers what it has not sent)
                if not sensor.legacy:
                    return
                seq = max(sensor.last_accepted + 1, time.time_ns() // 1000)
                frame = P.Frame(P.FrameType.DATA, P.Flags.STORED, seq, IFACE, count, len(raw), bytes(raw))
                await self.ingest.ingest(sensor, frame, self.iface, wire_bytes=length + 8)


def close_sessions(ingest: Any, sensor_id: str) -> None:
    """Close every PacketStreamer connection of ``sensor_id`` (a pktstream sensor took the id
    over: one stream per id). Event-loop thread."""
    for w in list(_open.get(ingest, {}).get(sensor_id, ())):
        w.close()
