"""The query server: ``pktstream serve ARCHIVE`` answers ``pktstream query`` from a resident process.

A query run by a fresh process pays Python, numpy and pyarrow start-up and the catalog's first
read (~0.3 s here) before it reads a packet; a resident server pays them once. Protocol and
client: :mod:`pktstream.archive.wire`. Each query runs in its own thread on its own
:class:`~pktstream.archive.Archive` (the archive is read as a direct query reads it, so files a
receiver adds are seen by the next query; truncated files are reported per query through the
reader's callback, not the process-wide warnings module). At most :data:`MAX_QUERIES` run at
once (more: a busy reply, after which the client queries directly), and a client has
:data:`REQUEST_TIMEOUT_S` to send its request. A client that asks for them gets a heartbeat
every :data:`HEARTBEAT_S` while its query runs (:mod:`~pktstream.archive.wire`).

Lifetime: :meth:`QueryServer.start` checks the socket (replacing a stale one, refusing when a
live server answers on it), loads what a query needs and binds; :meth:`serve_until` answers
until an event is set (e.g. by a signal handler: setting an event is all it does), then stops
accepting, removes the socket and gives running queries up to ``grace_s`` to finish.
Thread safety: ``start`` and ``serve_until`` from one thread; queries run in their own threads.
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from pktstream.archive import wire

log = logging.getLogger(__name__)

MAX_QUERIES = 8          # running at once; a query is CPU-bound, the machine has a few cores
REQUEST_TIMEOUT_S = 10.0  # to send the request line after connecting
HEARTBEAT_S = wire.HEARTBEAT_S  # a K frame this often while a query runs (clients that ask for them)


class _Conn:
    """The frames of one reply: sent whole and in order from the query's thread and its
    heartbeat thread. Once :attr:`aborted`, data and warnings are dropped: nothing may follow an
    ``E`` frame. Lifetime: one query."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.aborted = False
        self.gone = False  # the heartbeat found the client gone: the query stops at its next frame

    def send(self, kind: bytes, payload: bytes) -> None:
        with self.lock:
            if self.aborted:
                return  # (e.g. the rest of the output buffer, flushed when it is collected)
            if self.gone:
                raise BrokenPipeError(32, "the query client went away")
            self.sock.sendall(wire.frame(kind, payload))

    def beat(self, done: threading.Event, interval_s: float, sent: Callable[[], None]) -> None:
        """A ``K`` frame every ``interval_s`` until ``done`` (a heartbeat thread's body); skipped
        while the query's thread is sending (the link is alive then)."""
        while not done.wait(interval_s):
            if not self.lock.acquire(blocking=False):
                continue
            try:
                if done.is_set():
                    return
                self.sock.sendall(wire.frame(wire.KEEPALIVE, b""))
                sent()
            except OSError:
                self.gone = True  # the client went away: the query's thread stops at its next send
                return
            finally:
                self.lock.release()


class _FrameWriter(io.RawIOBase):
    """A binary file whose writes go to a connection as ``D`` frames (buffer it)."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        for i in range(0, len(data), wire.MAX_FRAME_BYTES):
            self.conn.send(wire.DATA, data[i:i + wire.MAX_FRAME_BYTES])
        return len(data)


def _text(message: str) -> bytes:
    return message.encode("utf-8", "backslashreplace")  # (file names need not be UTF-8)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        # the request first, then a slot: a client that trickles its request (or never sends
        # it) holds its own thread for REQUEST_TIMEOUT_S at most, never one of the query slots
        line = self._request_line()
        if line is None:
            return
        if not self.server.slots.acquire(blocking=False):
            try:
                kind = wire.BUSY if wire.decode_request(line).get("keepalive") else wire.ERROR
            except wire.ProtocolError:
                kind = wire.ERROR
            # a client that knows B queries directly; an older one reports the error
            self._send(kind, f"the query server is busy ({MAX_QUERIES} queries running); try again")
            self._linger()
            return
        try:
            self._answer(sock, line)
        finally:
            self.server.slots.release()

    def _request_line(self) -> bytes | None:
        """The request line (up to its newline, or MAX_REQUEST_BYTES + 1 bytes, or what came
        before the client closed), read within REQUEST_TIMEOUT_S in all -- not per read, which a
        byte every few seconds would renew; None if that time passed or the client went away."""
        sock: socket.socket = self.request
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        buf = bytearray()
        try:
            while b"\n" not in buf and len(buf) <= wire.MAX_REQUEST_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            return None
        end = buf.find(b"\n")
        return bytes(buf[:end + 1] if end >= 0 else buf[:wire.MAX_REQUEST_BYTES + 1])

    def _answer(self, sock: socket.socket, line: bytes) -> None:
        try:
            req = wire.decode_request(line)
        except wire.ProtocolError as exc:
            self._send(wire.ERROR, f"bad request: {exc}")
            self._linger()
            return
        sock.settimeout(None)  # (a client may pause reading, e.g. a pager: it holds only its own thread)
        conn = _Conn(sock)
        out = io.BufferedWriter(_FrameWriter(conn), buffer_size=256 << 10)
        done = threading.Event()
        beat: threading.Thread | None = None
        try:
            try:
                if req.get("keepalive"):
                    conn.send(wire.KEEPALIVE, b"")  # (says: heartbeats follow)
                    t = threading.Thread(target=conn.beat, args=(done, HEARTBEAT_S, self.server.count_heartbeat),
                                         daemon=True, name="pktstream-serve-heartbeat")
                    t.start()
                    beat = t
                stats = self.server.run_query(req, out, lambda m: conn.send(wire.WARNING, _text(m)))
                out.flush()
            finally:
                done.set()
                if beat is not None:
                    beat.join()
        except (BrokenPipeError, ConnectionResetError):
            conn.aborted = True
            log.debug("query client went away")
            return
        except Exception as exc:
            conn.aborted = True  # (the buffer's rest is dropped, not sent after the error)
            from pktstream.cli import error_line
            from pktstream.exceptions import PktstreamError
            if not isinstance(exc, (ValueError, OSError, ImportError, PktstreamError)):
                log.exception("query failed")
            self._send(wire.ERROR, error_line(exc))
            return
        self._send(wire.SUMMARY, json.dumps({"summary": stats.summary(), "scanned": stats.scanned}))

    def _linger(self) -> None:
        """After an error reply to a request not read whole: read (up to 1 MiB, 1 s) until the
        client closes, so that closing with unread bytes does not reset the connection before
        the client has read the reply."""
        sock: socket.socket = self.request
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            left = 1 << 20
            while left > 0 and (chunk := sock.recv(min(left, 65536))):
                left -= len(chunk)
        except OSError:
            pass

    def _send(self, kind: bytes, text: str) -> None:
        try:
            self.request.sendall(wire.frame(kind, _text(text)))
        except OSError:
            pass  # the client went away: nothing to tell


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True     # close() waits for running queries, up to a bound
    block_on_close = False
    request_queue_size = 64

    def __init__(self, path: str, archive: str, client: Any) -> None:
        super().__init__(path, _Handler, bind_and_activate=False)
        self.archive_root = archive
        self.client = client  # one S3 client for every query (boto3 clients are thread-safe)
        self.slots = threading.BoundedSemaphore(MAX_QUERIES)
        self.running = 0
        self.idle = threading.Condition()
        self.heartbeats = 0  # K frames sent (all queries; a counter for tests and debugging)

    def process_request_thread(self, request, client_address) -> None:
        with self.idle:
            self.running += 1
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.idle:
                self.running -= 1
                self.idle.notify_all()

    def count_heartbeat(self) -> None:
        with self.idle:
            self.heartbeats += 1

    def run_query(self, req: dict[str, Any], out, warn):
        from pktstream.archive.archive import Archive
        if req.get("archive") is not None and req["archive"] != wire.archive_id(self.archive_root):
            raise ValueError(f"this query server answers for {self.archive_root}, not {req['archive']}")
        return Archive(self.archive_root, client=self.client).write(
            out, req.get("bpf"), since=req.get("since"), until=req.get("until"), sensor=req.get("sensor") or None,
            warn=warn, format=req.get("format") or "pcapng")


class QueryServer:
    """Answers queries of one archive on a Unix socket (see the module for threads and lifetime)."""

    def __init__(self, archive: str, socket_path: str | None = None, *, socket_mode: int = 0o600) -> None:
        self.archive = archive
        path = socket_path or wire.default_socket(archive)
        if path is None:
            raise ValueError(f"{archive}: an S3 archive has no default socket: give --socket PATH")
        self.socket_path = path
        self.socket_mode = socket_mode
        self._server: _Server | None = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> None:
        """Check the archive and the socket, load what a query needs (numpy, pyarrow, the reader
        and writer, the catalog into the page cache), then bind and listen."""
        if self._server is not None:
            raise RuntimeError("QueryServer.start() called twice")
        from pktstream.archive.archive import Archive
        from pktstream.formats import open_writer
        if not self.archive.startswith("s3://") and not os.path.isdir(self.archive):
            raise FileNotFoundError(2, "no such archive directory", self.archive)
        self._replace_stale_socket()
        archive = Archive(self.archive)
        archive.plan("host 192.0.2.1")  # (TEST-NET-1: imports, reads the catalog; reads no capture file)
        open_writer(io.BytesIO(), format="pcapng").close()
        server = _Server(self.socket_path, self.archive, getattr(archive.store, "client", None))
        old = os.umask(0o777 & ~self.socket_mode)
        try:
            try:
                server.server_bind()
                os.chmod(self.socket_path, self.socket_mode)  # before listen(): no connection before it
                st = os.lstat(self.socket_path)
                self._inode = (st.st_dev, st.st_ino)
                server.server_activate()
            except BaseException:
                server.server_close()
                raise
        except OSError as exc:
            if "too long" in str(exc):
                raise ValueError(f"{self.socket_path}: a Unix socket path is limited to 107 bytes; "
                                 "give a shorter --socket") from None
            raise
        finally:
            os.umask(old)
        self._server = server

    @property
    def heartbeats(self) -> int:
        """Heartbeat frames sent so far, to every client (0 before :meth:`start`)."""
        server = self._server
        if server is None:
            return 0
        with server.idle:
            return server.heartbeats

    def _replace_stale_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(17, "exists and is not a socket", self.socket_path)
        try:
            wire.connect(self.socket_path, timeout_s=2.0).close()
        except wire.ServerUnavailable:
            os.unlink(self.socket_path)  # left by a server that stopped without removing it
            return
        raise FileExistsError(17, "a query server already answers on this socket", self.socket_path)

    def serve_until(self, stop: threading.Event, grace_s: float = 10.0) -> None:
        """Answer queries until ``stop`` is set; then :meth:`close`."""
        server = self._server
        if server is None:
            raise RuntimeError("QueryServer.start() first")
        loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                name="pktstream-serve", daemon=True)
        loop.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.shutdown()
            loop.join()
            self.close(grace_s)

    def close(self, grace_s: float = 10.0) -> None:
        """Stop listening, remove the socket (if it is still the one this server made), and wait
        up to ``grace_s`` for running queries (those still running then are cut off: their
        clients report an incomplete reply and keep no file)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.server_close()
        try:
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        deadline = time.monotonic() + grace_s
        with server.idle:
            while server.running and time.monotonic() < deadline:
                server.idle.wait(max(0.0, deadline - time.monotonic()))
