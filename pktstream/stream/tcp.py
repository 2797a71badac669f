"""The sensor's TCP/TLS transport: connect to the receiver, handshake (mutual key proofs),
stream the FrameStore's frames, take ACKs, reconnect with a back-off, drain on stop.

Lifetime: one :class:`TcpTransport` per Sensor; ``run()`` is the sensor's sender thread and
returns when the sensor stopped and everything was acknowledged (or the drain deadline passed).
Thread-safety: ``run()`` and everything it calls run on that one thread; the sensor wakes it
through a :class:`~pktstream.stream.uplink.Waker` (signal-safe).
"""
from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from typing import Any

import pktstream
from pktstream.exceptions import AuthenticationError, ConfigError, FrameError
from pktstream.stream import protocol as P
from pktstream.stream.protocol import parse_hostport
from pktstream.stream.uplink import Link, Waker

log = logging.getLogger("pktstream.stream.sensor")


def resolve_all(host: str, port: int) -> list[str]:
    """Every address of the receiver (so self-exclusion covers all of them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({str(i[4][0]) for i in infos})


def _reason(frame: P.Frame) -> str:
    """The ``reason`` of a receiver's ERROR/BYE as it goes into the log: text, bounded, control
    characters shown as ``?`` (a newline would forge a log line)."""
    reason = frame.json().get("reason")
    return P.printable(str(reason)[:500] if reason is not None else "no reason given")

class TcpTransport:
    """Streams a sensor's frames to a pktstream receiver over TCP (TLS with ``ssl_context``).

    :param receiver: ``host:port``; the name is resolved again before every connection.
    :param auth_key: the key to prove (and to require the receiver to prove).
    :param ssl_context: a client TLS context; ``server_hostname``: the name to verify.
    :param reconnect_min, reconnect_max: back-off in s between attempts (doubling, jittered).
    :param refused_backoff_max: longest back-off in s when the receiver refuses this sensor.
    """

    def __init__(self, receiver: str, *, auth_key: bytes | str | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 reconnect_min: float = 0.2, reconnect_max: float = 2.0, refused_backoff_max: float = 30.0) -> None:
        self.address = parse_hostport(receiver)
        self.auth_key = auth_key.encode() if isinstance(auth_key, str) else auth_key
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.refused_backoff_max = refused_backoff_max
        self.sensor: Any = None
        self._waker: Waker | None = None  # one per run()
        self._drain_timeout = 10.0
        self._handshaken = False     # the current connection completed its handshake
        self._receiver_max_raw: int | None = None  # the largest block the receiver accepts (WELCOME)
        self._acked = False          # ... and got an ACK
        self._refused = False        # ... and the receiver ended it with an ERROR frame
        self._connect_done = False   # the current attempt got a TCP connection
        self._session_heartbeat = 5.0

    def describe(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def exclude(self) -> list[tuple[str, int]]:
        """Every address the receiver's name resolves to, with its port."""
        host, port = self.address
        return [(a, port) for a in resolve_all(host, port)]

    def _io_timeout(self, seconds: float) -> float:
        """A connect/handshake timeout, cut to what is left of the drain once stopping (an
        attempt that starts late must not outlive the drain, or a supervisor's kill)."""
        if not self.sensor.stopping:
            return seconds
        return max(0.5, min(seconds, self._drain_deadline() - time.monotonic()))

    def _drain_deadline(self) -> float:
        """When a stopping sensor gives up sending (``drain_timeout`` after stop(), over all
        sessions together)."""
        return (self.sensor.stopped_at or time.monotonic()) + self._drain_timeout

    def run(self, sensor: Any, drain_timeout: float) -> None:
        """Connect, stream, reconnect: forever until stop(), then until everything is
        acknowledged or the drain deadline. Back-off: ``reconnect_min`` doubling to
        ``reconnect_max`` (jittered), back to the minimum after every successful handshake, so a
        restarted receiver is found within about a second; a receiver that refuses this sensor
        (key, certificate, identity, not a pktstream receiver) is retried more slowly, up to
        ``refused_backoff_max``. The back-off holds while draining too (no storm on stop)."""
        self.sensor = sensor
        self._drain_timeout = drain_timeout
        self._waker = waker = Waker()
        sensor.set_waker(waker.wake)
        delay = self.reconnect_min
        refused_delay = min(2.0, self.refused_backoff_max)
        where = self.describe()
        failures, last_log = 0, 0.0
        try:
            while True:
                if self.sensor.stopping:
                    if not self.sensor.capturing() and self.sensor.store.pending()[0] == 0:
                        break
                    if time.monotonic() >= self._drain_deadline():
                        log.warning("stopping with %d unacknowledged frames (receiver unreachable)",
                                    self.sensor.store.pending()[0])
                        break
                self._handshaken = self._acked = self._refused = False
                wait = failure = None
                try:
                    self._session()
                except ConfigError as exc:
                    log.error("receiver %s: %s", where, exc)
                    sensor.fail(exc)  # run() raises it: the sensor exits non-zero
                    break
                except AuthenticationError as exc:
                    self.sensor.count("auth_failures")
                    wait = refused_delay * (0.5 + random.random())
                    refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                    log.error("receiver %s: %s; retrying in %.0f s", where, exc, wait)
                except ssl.SSLCertVerificationError as exc:
                    self.sensor.count("connection_failures")
                    wait = refused_delay * (0.5 + random.random())
                    refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                    reason = str(exc.verify_message or exc)
                    hint = ("the certificate does not name the address connected to: use that name in "
                            "--receiver or give it with --tls-server-name (tls.serverName)" if "mismatch" in reason
                            else "the receiver's certificate is not trusted: give the CA that signed it, or a "
                            "self-signed certificate itself, with --tls-ca PEM (tls.cafile)")
                    log.error("receiver %s: TLS verification failed: %s -- %s; retrying in %.0f s",
                              where, reason, hint, wait)
                except (OSError, FrameError) as exc:  # includes timeouts, resets and TLS errors
                    self.sensor.count("connection_failures")
                    in_handshake = not self._handshaken and self._connect_done and not isinstance(
                        exc, (ConnectionRefusedError, socket.timeout, socket.gaierror))
                    if in_handshake and (isinstance(exc, FrameError) or (
                            isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError))):
                        # it answered, but not in pktstream's protocol (or TLS failed): refused
                        wait = refused_delay * (0.5 + random.random())
                        refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                        log.error("receiver %s: %s during the handshake: is it a pktstream receiver "
                                  "(and does it accept this sensor? see its log); retrying in %.0f s",
                                  where, exc or type(exc).__name__, wait)
                    elif in_handshake:
                        # closed before the handshake ended: its connection limits, a restart, or
                        # not a pktstream receiver; an ordinary (quick) retry, with the hint
                        failure = (f"{exc or type(exc).__name__} during the handshake (is it a pktstream "
                                   "receiver? connection limits? see its log)")
                    else:
                        failure = str(exc) or type(exc).__name__
                finally:
                    sensor.set_connected(False)
                # a session that worked: the next outage starts from the minimum; one the receiver
                # ended with an ERROR before acknowledging anything (the same refusal for every
                # session) backs off like a refusal instead of reconnecting at once, for ever
                if self._handshaken and not (self._refused and not self._acked):
                    delay = self.reconnect_min
                    refused_delay = min(2.0, self.refused_backoff_max)
                    failures = 0
                elif self._handshaken and wait is None:
                    wait = refused_delay * (0.5 + random.random())
                    refused_delay = min(self.refused_backoff_max, refused_delay * 2)
                    failures += 1
                    if failures == 1 or time.monotonic() - last_log >= 60:
                        last_log = time.monotonic()
                        log.warning("receiver %s: %s right after the handshake; retrying in %.0f s "
                                    "(%d attempts so far)", where, failure, wait, failures)
                if self.sensor.stopping and self.sensor.store.pending()[0] == 0 and not self.sensor.capturing():
                    break
                if wait is None:
                    wait = delay * (0.5 + random.random())
                    delay = min(self.reconnect_max, delay * 2)
                    if failure is not None:
                        failures += 1
                        # the first failure of an outage, then one line a minute (all are counted)
                        if failures == 1 or time.monotonic() - last_log >= 60:
                            last_log = time.monotonic()
                            log.warning("receiver %s: %s; retrying with a back-off of up to %.1f s, jittered "
                                        "(%d attempts so far)", where, failure, self.reconnect_max, failures)
                self._sleep(wait)
        finally:
            sensor.set_waker(None)
            waker.close()


    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` between connection attempts. A stop() that arrives meanwhile ends
        the wait (one more attempt drains at once); while already stopping the back-off holds,
        cut short only by the drain deadline. Woken through the wake socket, not an Event:
        stop() may run in a signal handler on this very thread."""
        end = time.monotonic() + seconds
        stopping = self.sensor.stopping
        while True:
            if self.sensor.stopping:
                if not stopping:
                    return
                end = min(end, self._drain_deadline())
            left = end - time.monotonic()
            if left <= 0:
                return
            assert self._waker is not None
            self._waker.wait(left)


    def _session(self) -> None:
        host, port = self.address
        self._connect_done = False
        addresses = resolve_all(host, port)  # again for every connection: the receiver may move
        if not addresses:
            raise OSError(f"cannot resolve the receiver's host name {host!r}")
        self.sensor.update_exclusions((a, port) for a in addresses)  # before our own packets flow
        sock = socket.create_connection((host, port), timeout=self._io_timeout(10))
        self._connect_done = True
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname or host)
            link = Link(sock, self._waker)
            last_seq, accepted_seq = self._handshake(link)
            self._handshaken = True
            self.sensor.set_connected(True)
            self.sensor.store.resume(last_seq, accepted_seq)
            if self._receiver_max_raw is not None:  # (after resume: what the receiver has is gone)
                self.sensor.store.drop_larger(self._receiver_max_raw)
            log.info("connected to receiver %s:%d (it has everything up to seq %d)", host, port, last_seq)
            try:
                self._stream(link, last_seq)
            except OSError:
                self._read_what_is_left(link)
                raise
        finally:
            sock.close()

    def _expect(self, link: Link, ftype: P.FrameType, refused: type[Exception]) -> P.Frame:
        """The next frame, which must be ``ftype``; an ERROR from the receiver raises ``refused``."""
        frame = link.next_frame(self._io_timeout(15))
        if frame.type == P.FrameType.ERROR:
            raise refused(f"the receiver refused this sensor: {_reason(frame)}")
        if frame.type != ftype:
            raise FrameError(f"expected {ftype.name}, got {frame.type.name}")
        return frame

    def _handshake(self, link: Link) -> tuple[int, int]:
        """HELLO … WELCOME; returns the receiver's committed and accepted seq for this sensor."""
        nonce = P.new_nonce()
        descs = self.sensor.hello_interfaces()  # queued announcements of these are dropped
        link.send([P.encode_json(P.FrameType.HELLO, {
            "protocol": P.VERSION, "sensor_id": self.sensor.sensor_id, "hostname": self.sensor.hostname,
            "software": f"pktstream {pktstream.__version__}", "interfaces": descs,
            "nonce": nonce.hex(), "max_raw": self.sensor.max_raw, "auth": self.auth_key is not None,
            "instance": self.sensor.instance})], 15)
        body = self._expect(link, P.FrameType.CHALLENGE, AuthenticationError).json()
        rnonce = P.parse_nonce(body.get("nonce"))
        my_proof = ""

        def refuse(reason: str, message: str) -> None:
            """Tell the receiver why (it logs it) and fail this attempt."""
            try:
                link.send([P.encode_json(P.FrameType.ERROR, {"reason": reason})], 5)
            except OSError:
                pass
            raise AuthenticationError(message)

        if self.auth_key is None and body.get("auth"):
            refuse("the sensor has no key", "the receiver requires a key: give this sensor the same key "
                   "as the receiver (--auth-key-file FILE or auth.key)")
        if self.auth_key is not None:
            if not body.get("auth"):
                refuse("the sensor requires authentication and the receiver has no key",
                       "the receiver does not check keys (anyone could pose as it): give it the same key "
                       "(--auth-key-file or auth.key), or remove this sensor's key")
            expected = P.proof(self.auth_key, "receiver", nonce, rnonce, self.sensor.sensor_id)
            if not P.check_proof(expected, body.get("proof")):
                refuse("the keys differ", f"authentication failed: this sensor's key differs from the "
                       f"receiver's key for sensor id {self.sensor.sensor_id!r} (check --auth-key-file on both sides)")
            my_proof = P.proof(self.auth_key, "sensor", rnonce, nonce, self.sensor.sensor_id)
        link.send([P.encode_json(P.FrameType.AUTH, {"proof": my_proof})], 15)
        welcome = self._expect(link, P.FrameType.WELCOME, AuthenticationError).json()
        last = welcome.get("last_seq", 0)
        if not isinstance(last, int) or not 0 <= last < P.MAX_SEQ:
            raise FrameError("bad last_seq in WELCOME")
        max_raw = welcome.get("max_raw")
        if isinstance(max_raw, int) and max_raw < self.sensor.max_raw:
            raise ConfigError(f"the receiver accepts blocks of at most {max_raw} bytes but this sensor "
                              f"makes blocks of {self.sensor.max_raw}: lower the sensor's blockSize or raise "
                              f"the receiver's compressBlockSize")
        self._receiver_max_raw = max_raw if isinstance(max_raw, int) else None
        hb = welcome.get("heartbeat")
        # heartbeat at the faster of both sides' settings, so neither side's idle timeout fires
        self._session_heartbeat = min(self.sensor.heartbeat, hb) if isinstance(hb, (int, float)) and hb > 0.05 \
            else self.sensor.heartbeat
        accepted = welcome.get("accepted_seq", last)  # (a receiver before it: its last_seq)
        return last, accepted if isinstance(accepted, int) and last <= accepted < P.MAX_SEQ else last

    def _read_what_is_left(self, link: Link) -> None:
        """A send failed (the receiver closed with frames of ours unread, so the kernel reset
        the connection): the ACKs and the ERROR it sent before closing may still be readable --
        the ERROR tells a refusal from a receiver that went away."""
        try:
            for f in link.receive(0):
                self._take(f)
        except (OSError, FrameError):
            pass

    def _take(self, f: P.Frame) -> None:
        """A frame from the receiver in a session: an ACK is taken, an ERROR noted (a refusal)."""
        if f.type == P.FrameType.ACK:
            self.sensor.store.ack(f.seq)
            self._acked = True
        elif f.type == P.FrameType.ERROR:
            self._refused = True

    def _stream(self, link: Link, last_seq: int) -> None:
        """Send every frame after ``last_seq`` as it comes, take ACKs, keep the session alive;
        returns when the receiver says BYE (after ours, when stopping)."""
        sent = last_seq
        hb = self._session_heartbeat
        silent = 3 * hb + 1  # longer without a byte from the receiver (or a send): it is gone
        last_rx = last_tx = last_stats = time.monotonic()
        bye_sent = False
        while True:
            assert self._waker is not None
            self._waker.rearm()  # before looking at the store: a later put() wakes us
            now = time.monotonic()
            if now - last_rx > silent:
                raise TimeoutError(f"receiver silent for {now - last_rx:.0f} s")
            if self.sensor.stopping and now > self._drain_deadline():
                raise TimeoutError("stopping: the receiver did not acknowledge in time")
            nxt = self.sensor.store.after(sent)
            # control frames first, taken after the store: the HELLO of a new interface is
            # queued before its capture starts, so it always precedes that interface's data
            out = []
            out += self.sensor.take_control_frames()
            if now - last_stats >= self.sensor.stats_interval:
                out.append(P.encode_json(P.FrameType.STATS, self.sensor.stats()))
                last_stats = last_tx = now
            elif now - last_tx >= hb:
                out.append(P.encode(P.FrameType.HEARTBEAT))
                last_tx = now
            if nxt is not None:
                seq, (header, payload) = nxt
                out += (header, payload)
            elif self.sensor.stopping and not bye_sent and not self.sensor.capturing() \
                    and self.sensor.store.pending()[0] == 0:
                out += (P.encode_json(P.FrameType.STATS, self.sensor.stats()),
                        P.encode_json(P.FrameType.BYE, {"reason": "sensor stopping"}))
                bye_sent = True
            if out:
                # one sendmsg for everything; a peer that takes nothing for `silent` seconds
                # (stopped reading without a reset) raises a timeout
                link.send(out, silent)
                last_tx = time.monotonic()
            if nxt is not None:
                sent = seq
                self.sensor.count("frames_sent")
            # ACKs that arrived; sleep only when idle: until a frame, an ACK, a control frame or
            # stop() wakes us (Sensor.wake), or the next heartbeat/STATS/silence deadline is due
            # (no periodic tick: an idle sensor wakes once per heartbeat); while stopping, every
            # 0.2 s (the end of capture does not wake us)
            if nxt is not None:
                wait = 0.0
            elif self.sensor.stopping:
                wait = min(0.2, hb)
            else:
                due = min(last_tx + hb, last_stats + self.sensor.stats_interval, last_rx + silent)
                wait = min(max(due - time.monotonic(), 0.0) + 0.005, hb)
            for f in link.receive(wait):
                self._take(f)
                if f.type == P.FrameType.BYE:
                    return
                if f.type == P.FrameType.ERROR:
                    raise FrameError(f"receiver closed the session: {_reason(f)}")
            last_rx = max(last_rx, link.last_rx)
