"""The receiver's TCP server: accept (connection limits, per-address rate), TLS, the
handshake (sensor id, mutual key proof, duplicate-id check) and the session loop that hands
DATA frames to :class:`~pktstream.stream.receiver.ingest.Ingest`.

Lifetime: one :class:`Server` per receiver run, started and closed by the receiver.
Thread-safety: event-loop thread only.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import ssl
import time
from typing import Any

from pktstream.exceptions import FrameError
from pktstream.stream import legacy, protocol as P
from pktstream.stream.receiver.ingest import SENSOR_ID, Ingest, SensorState, check_interface, numeric_stats, send_ack

log = logging.getLogger("pktstream.stream.receiver")

#: interfaces a sensor may describe in its HELLO, and announce later on one connection
MAX_INTERFACES = 4096


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cert_names(cert: dict | None) -> set[str]:
    """Common name and subjectAltName DNS/URI entries of a verified peer certificate."""
    if not cert:
        return set()
    names = {v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    names |= {v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "URI")}
    return names


class _Accept(asyncio.Protocol):
    """Holds a new connection paused until Server.accept has checked limits and set up TLS
    (no byte is read before the TLS layer takes over)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.task = asyncio.ensure_future(self.server.accept(transport))


class Server:
    """Accepts sensors on ``listen`` and runs their sessions.

    :param ingest: where DATA frames go.
    :param security: keys, TLS context, certificate identity (a ``Security``).
    :param limits: connection limits and timeouts (a ``Limits``).
    :param counters: the receiver-level counters (shared with ingest).
    :param legacy: PacketStreamer sensors (``stream.legacy.PacketStreamerSettings``; None: refused).
    """

    def __init__(self, listen: tuple[str, int], ingest: Ingest, *, security: Any, limits: Any,
                 counters: collections.Counter, legacy: Any = None) -> None:
        self.listen = listen
        self.legacy = legacy
        self.ingest = ingest
        self.security = security
        self.limits = limits
        self.counters = counters
        self.connections = 0
        self.awaiting_first_byte = 0   # connections not yet past their first byte (legacy.intake)
        self.address: tuple[str, int] | None = None
        self._buckets: dict[str, tuple[float, float]] = {}
        self._log_limit: dict[tuple[str, str], float] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # Connections are accepted paused; limits are checked, then TLS is started by accept(),
        # so a failed TLS handshake is logged and counted like any other refusal (asyncio's own
        # TLS server drops those silently).
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accept(self), self.listen[0] or None, self.listen[1])
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info("receiver listening on %s:%d%s", *self.address, " (TLS)" if self.security.ssl_context else "")
        if not self.security.authenticated and not is_loopback(self.listen[0]):
            log.warning("no authentication (auth.key / client certificates): anyone who can reach "
                        "%s:%d can write into the outputs", *self.listen)

    def close(self) -> None:
        """Stop accepting and close every sensor's connection."""
        if self._server is not None:
            self._server.close()
        for s in list(self.ingest.sensors.values()):
            if s.writer is not None:
                s.writer.close()

    def _allow_connection(self, host: str) -> bool:
        """Token bucket per peer address: ``connection_rate`` = (burst, seconds to refill it)."""
        burst, period = self.limits.connection_rate
        now = time.monotonic()
        tokens, last = self._buckets.get(host, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * burst / period)
        if len(self._buckets) > 10000:  # bound the table itself
            self._buckets.clear()
        if tokens < 1.0:
            self._buckets[host] = (tokens, now)
            return False
        self._buckets[host] = (tokens - 1.0, now)
        return True

    def warn(self, kind: str, peer_host: str, msg: str, *args: Any) -> None:
        """Log a peer's failure at most once per 10 s per (kind, address); counters count all."""
        now = time.monotonic()
        key = (kind, peer_host)
        if now - self._log_limit.get(key, -1e9) >= 10.0:
            if len(self._log_limit) > 10000:
                self._log_limit.clear()
            self._log_limit[key] = now
            log.warning(msg, *args)

    async def accept(self, transport: asyncio.Transport) -> None:
        """Limits, then TLS, then the stream reader/writer pair for _handle."""
        peername = transport.get_extra_info("peername") or ("?", 0)
        host = str(peername[0])
        peer = f"{peername[0]}:{peername[1]}" if len(peername) >= 2 else str(peername[0])
        if self.connections >= self.limits.max_connections:
            self.counters["rejected_connections"] += 1
            self.warn("max", host, "%s: refused, %d connections already (maxConnections)", peer, self.connections)
            transport.close()
            return
        if not self._allow_connection(host):
            self.counters["rate_limited_connections"] += 1
            self.warn("rate", host, "%s: refused, more than %d connections in %.0f s from this address",
                      peer, *self.limits.connection_rate)
            transport.close()
            return
        self.connections += 1
        ctx = self.security.ssl_context
        try:
            reader = asyncio.StreamReader(limit=1 << 20)
            protocol = asyncio.StreamReaderProtocol(reader)
            loop = asyncio.get_running_loop()
            if ctx is not None:
                try:
                    tls = await loop.start_tls(transport, protocol, ctx, server_side=True,
                                               ssl_handshake_timeout=self.limits.handshake_timeout)
                    assert isinstance(tls, asyncio.Transport)
                    transport = tls
                except (TimeoutError, ssl.SSLError, OSError) as exc:
                    self.counters["tls_failures"] += 1
                    self.warn("tls", host, "%s: TLS handshake failed: %s", peer,
                              exc or "timeout (peer silent or not speaking TLS)")
                    transport.close()
                    return
            else:
                transport.set_protocol(protocol)
            protocol.connection_made(transport)
            if ctx is None:
                transport.resume_reading()
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._handle(reader, writer, host, peer)
        finally:
            self.connections -= 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                      peer: str) -> None:
        sensor: SensorState | None = None
        try:
            # legacy hook: a PacketStreamer sensor (first bytes DE EF EC E0) is served by stream/legacy.py
            stream = await legacy.intake(self, reader, writer, host, peer)
            if stream is None:
                return
            sensor = await asyncio.wait_for(self._handshake(stream, writer, peer), self.limits.handshake_timeout)
            await self._session(sensor, stream, writer)
        except TimeoutError as exc:
            self.counters["timeouts"] += 1
            self.warn("timeout", host, "%s: %s timed out", peer, str(exc) or ("session" if sensor else "handshake"))
        except FrameError as exc:
            self.counters["protocol_errors"] += 1
            self.warn("protocol", host, "%s: closing: %s", peer, exc)
            self._send_error(writer, str(exc))
        except PermissionError as exc:
            self.counters["auth_failures"] += 1
            self.warn("auth", host, "%s: refused: %s", peer, exc)
            if "refused this receiver" not in str(exc):
                self._send_error(writer, str(exc))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            if sensor is None:
                self.counters["aborted_handshakes"] += 1
            log.info("%s: connection closed (%s)", peer, type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one peer's connection; never a traceback per peer
            self.counters["protocol_errors"] += 1
            self.warn("unexpected", host, "%s: closing after an unexpected %s: %s", peer, type(exc).__name__,
                      str(exc)[:200])
            self._send_error(writer, "internal error")
        finally:
            if sensor is not None and sensor.writer is writer:
                sensor.writer = None
                log.info("sensor %s (%s) disconnected", sensor.sensor_id, peer)
            writer.close()

    def _send_error(self, writer: asyncio.StreamWriter, reason: str) -> None:
        if not writer.is_closing():
            writer.write(P.encode_json(P.FrameType.ERROR, {"reason": reason[:500]}))

    async def _handshake(self, reader: P.ByteReader, writer: asyncio.StreamWriter, peer: str) -> SensorState:
        hello = await P.read_frame(reader, max_payload=0, max_raw=0)
        if hello.type != P.FrameType.HELLO:
            raise FrameError(f"expected HELLO, got {hello.type.name}")
        h = hello.json()
        sid = h.get("sensor_id")
        if not isinstance(sid, str) or not SENSOR_ID.match(sid):
            raise FrameError("bad sensor_id (1-128 printable ASCII characters)")
        snonce = P.parse_nonce(h.get("nonce"))
        ifaces = h.get("interfaces")
        if not isinstance(ifaces, list) or len(ifaces) > MAX_INTERFACES:
            raise FrameError("bad interface list")
        descs = [check_interface(d) for d in ifaces]
        sec = self.security
        if sec.cert_identity:
            names = cert_names(writer.get_extra_info("peercert"))
            if sid not in names:
                raise PermissionError(f"sensor id {sid!r} is not named in its client certificate {sorted(names)}")
        key = sec.key_for(sid)
        if sec.auth_keys is not None and key is None:
            raise PermissionError(f"authentication failed: sensor {sid!r} has no key here (revoked or unknown)")
        if key is not None and h.get("auth") is False:
            raise PermissionError(f"authentication failed: sensor {sid!r} has no key, and this receiver "
                                  "requires one (give the sensor --auth-key-file)")
        rnonce = P.new_nonce()
        writer.write(P.encode_json(P.FrameType.CHALLENGE, {
            "nonce": rnonce.hex(), "auth": key is not None,
            "proof": P.proof(key, "receiver", snonce, rnonce, sid) if key else ""}))
        await writer.drain()
        auth = await P.read_frame(reader, max_payload=0, max_raw=0)
        if auth.type == P.FrameType.ERROR:  # the sensor refused us (keys differ, no key ...)
            raise PermissionError(f"authentication failed: sensor {sid!r} refused this receiver: "
                                  f"{str(auth.json().get('reason'))[:200]}")
        if auth.type != P.FrameType.AUTH:
            raise FrameError(f"expected AUTH, got {auth.type.name}")
        if key is not None and not P.check_proof(P.proof(key, "sensor", rnonce, snonce, sid),
                                                 auth.json().get("proof")):
            raise PermissionError(f"authentication failed: sensor {sid!r} used another key (wrong key)")
        instance = h.get("instance")
        instance = instance[:64] if isinstance(instance, str) else ""
        sensor = self.ingest.sensor_state(sid)
        if sensor.writer is not None:
            # alive: heard from recently and not saying goodbye (a BYE session is only
            # waiting for its outputs; the sensor that sent it may be restarting)
            live = time.monotonic() - sensor.last_rx <= 2 * self.limits.heartbeat + 1 and sensor.bye is None
            if live and not (instance and instance == sensor.instance):
                # another process with the same id while the first one is alive: two hosts would
                # interleave one stream; the first keeps it, the second is told why
                self.counters["duplicate_id_refusals"] += 1
                sensor.counters["duplicate_id_refusals"] += 1
                raise PermissionError(f"sensor id {sid!r} is already connected from {sensor.peer} (host "
                                      f"{sensor.hostname!r}): two sensors with one id? give each its own "
                                      "--sensor-id")
            log.warning("sensor %s reconnected from %s: closing its old connection from %s", sid, peer, sensor.peer)
            sensor.writer.close()
        sensor.instance = instance
        if sensor.legacy:  # a pktstream sensor taking over a PacketStreamer sensor's id (stream/legacy.py)
            legacy.close_sessions(self.ingest, sid)
            sensor.legacy = False
        sensor.last_rx = time.monotonic()
        for d in descs:
            sensor.interfaces[d["index"]] = d
        hostname, software = h.get("hostname"), h.get("software")
        sensor.hostname = P.printable(hostname[:255]) if isinstance(hostname, str) else ""
        sensor.software = P.printable(software[:255]) if isinstance(software, str) else ""
        sensor.writer, sensor.peer = writer, peer
        sensor.counters["connections"] += 1
        writer.write(P.encode_json(P.FrameType.WELCOME, {"last_seq": sensor.last_committed,
                                                         "accepted_seq": sensor.last_accepted,
                                                         "max_raw": self.ingest.max_raw,
                                                         "heartbeat": self.limits.heartbeat}))
        await writer.drain()
        log.info("sensor %s (%s, %s) connected from %s, %d interfaces, resuming after seq %d",
                 sid, sensor.hostname, sensor.software, peer, len(sensor.interfaces), sensor.last_committed)
        return sensor

    async def _session(self, sensor: SensorState, reader: P.ByteReader, writer: asyncio.StreamWriter) -> None:
        idle = 3 * self.limits.heartbeat + 1  # the sensor sends a heartbeat every `heartbeat` s when idle
        max_raw = self.ingest.max_raw
        c = sensor.counters
        announced = 0
        while True:
            # asyncio.timeout, not wait_for: wait_for makes a task per frame (Python 3.11)
            async with asyncio.timeout(idle):
                frame = await P.read_frame(reader, max_payload=max_raw + 1024, max_raw=max_raw)
            sensor.last_rx = time.monotonic()
            t = frame.type
            if t == P.FrameType.DATA:
                await self._data(sensor, frame)
            elif t == P.FrameType.HEARTBEAT:
                writer.write(P.encode(P.FrameType.HEARTBEAT))
                await asyncio.wait_for(writer.drain(), idle)  # a peer that never reads is cut off
            elif t == P.FrameType.STATS:
                sensor.reported = numeric_stats(frame.json())
                c["stats_frames"] += 1
            elif t == P.FrameType.HELLO:  # an interface that appeared later
                d = check_interface(frame.json().get("interface"))
                announced += 1  # (per connection: a sensor's interfaces come and go over its life)
                if announced > MAX_INTERFACES:
                    raise FrameError(f"more than {MAX_INTERFACES} interfaces announced on one connection")
                sensor.interfaces[d["index"]] = d
                log.info("sensor %s: new interface %s", sensor.sensor_id, d["name"])
            elif t == P.FrameType.BYE:
                sensor.bye = asyncio.Event()
                try:
                    if sensor.last_committed < sensor.last_accepted:
                        await asyncio.wait_for(sensor.bye.wait(), 60)
                finally:
                    sensor.bye = None  # (also after a timeout: the duplicate-id check is back on)
                writer.write(P.encode(P.FrameType.ACK, seq=sensor.last_committed))
                writer.write(P.encode_json(P.FrameType.BYE, {"reason": "bye"}))
                await writer.drain()
                log.info("sensor %s said goodbye", sensor.sensor_id)
                return
            else:
                raise FrameError(f"unexpected {t.name} frame from a sensor")

    async def _data(self, sensor: SensorState, frame: P.Frame) -> None:
        iface = sensor.interfaces.get(frame.iface)  # (None: rejected and counted by the ingest)
        if not await self.ingest.ingest(sensor, frame, iface, wire_bytes=len(frame.payload) + P.HEADER_LEN) \
                and frame.seq <= sensor.last_committed:
            send_ack(sensor, self.counters)
