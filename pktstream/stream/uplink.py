"""The sensor's connection to a receiver: one blocking socket (TCP or TLS) used by one thread."""
from __future__ import annotations

import collections
import select
import socket
import ssl
import time

from pktstream.stream import protocol as P
from pktstream.stream.sendwindow import payload_size

_TLS_SLICE = 64 * 1024  # TLS sends in slices of this, each with the full send timeout


class Waker:
    """Wakes a thread blocked in poll/select on a socket pair: signal-safe (no lock; stop() may
    run in a signal handler on the very thread it wakes), at most one pending byte per wait."""

    def __init__(self) -> None:
        self._recv, self._send = socket.socketpair()
        self._recv.setblocking(False)
        self._send.setblocking(False)
        self.pending = False

    def fileno(self) -> int:
        return self._recv.fileno()

    def wake(self) -> None:
        """Wake the waiting thread (any thread)."""
        if not self.pending:
            self.pending = True
            try:
                self._send.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (waiter gone)
                pass

    def drain(self) -> None:
        """Consume the pending bytes (the waiting thread)."""
        try:
            self._recv.recv(4096)
        except OSError:
            pass

    def rearm(self) -> None:
        """Let the next wake() send again (the waiting thread, before it looks for work)."""
        self.pending = False

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds or until woken."""
        select.select([self._recv], [], [], timeout)
        self.drain()
        self.rearm()

    def close(self) -> None:
        self._recv.close()
        self._send.close()


class Link:
    """A blocking connection to the receiver, used by the sender thread only.

    Frames go out whole with ``sendmsg`` (header and payload without joining them; the GIL is
    released while the kernel copies), so the data path costs one system call per block; TLS
    sockets use ``sendall`` per 64 KiB slice. Incoming frames (ACK, HEARTBEAT, BYE, ERROR) are read
    without blocking when ``poll`` says bytes are there, and parsed once complete, bounded like
    every control frame.
    """

    def __init__(self, sock: socket.socket, wake: Waker | None = None) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._ssl = sock if isinstance(sock, ssl.SSLSocket) else None  # for pending()
        self._buf = bytearray()
        self._frames: collections.deque[P.Frame] = collections.deque()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._wake = wake
        if wake is not None:
            self._poll.register(wake.fileno(), select.POLLIN)
        self.last_rx = time.monotonic()  # when the last byte came in

    def send(self, parts, timeout: float) -> None:
        """Send every part in order; ``timeout``: longest wait for the peer to take any byte
        (TLS: to take a 64 KiB slice)."""
        self.sock.settimeout(timeout)
        if self.tls:  # an SSL write's timeout covers the whole call: slices keep it per progress
            for part in parts:
                view = memoryview(part).cast("B")
                for off in range(0, len(view), _TLS_SLICE):
                    self.sock.sendall(view[off:off + _TLS_SLICE])
            return
        views = [memoryview(p).cast("B") for p in parts if payload_size(p)]
        while views:
            n = self.sock.sendmsg(views)
            while n:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0

    def receive(self, timeout: float) -> list[P.Frame]:
        """Frames received so far; when there are none, wait up to ``timeout`` seconds for bytes
        (or for the sender to be woken up)."""
        if not self._frames and (self._ssl is not None and self._ssl.pending() or self._wait(timeout)):
            self._read()
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def next_frame(self, timeout: float) -> P.Frame:
        """The next frame, waiting at most ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the receiver in {timeout:.0f} s")
            if self._ssl is not None and self._ssl.pending() or self._wait(left):
                self._read()
        return self._frames.popleft()

    def _wait(self, timeout: float) -> bool:
        """Whether the socket became readable within ``timeout`` (a wake-up ends the wait)."""
        readable = False
        for fd, _ in self._poll.poll(timeout * 1000):
            if self._wake is not None and fd == self._wake.fileno():
                self._wake.drain()
            else:
                readable = True
        return readable

    def _read(self) -> None:
        self.sock.settimeout(0.0)
        data = b""
        try:
            data = self.sock.recv(65536)
            while self._ssl is not None and data and self._ssl.pending():
                data += self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):  # part of a TLS record
            if not data:
                return
        if not data:
            raise ConnectionResetError("the receiver closed the connection")
        self.last_rx = time.monotonic()
        buf = self._buf
        buf += data
        while len(buf) >= P.HEADER_LEN:
            h = P.decode_header(bytes(buf[:P.HEADER_LEN]), max_payload=P.MAX_CONTROL_BYTES, max_raw=0)
            end = h.header_len + h.payload_len
            if len(buf) < end:
                break
            self._frames.append(P.Frame(h.type, h.flags, h.seq, h.iface, h.count, h.raw_len,
                                        bytes(buf[h.header_len:end])))
            del buf[:end]
