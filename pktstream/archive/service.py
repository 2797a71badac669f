"""The query server: ``pktstream serve ARCHIVE`` answers ``pktstream query`` from a resident process.

A query run by a fresh process pays Python, numpy and pyarrow start-up and the catalog's first
read (~0.3 s here) before it reads a packet; a resident server pays them once. Protocol and
client: :mod:`pktstream.archive.wire`. Each query runs in its own thread on its own
:class:`~pktstream.archive.Archive` (no state shared between queries; the archive is read as a
direct query reads it, so files a receiver adds are seen by the next query).

Lifetime: :meth:`QueryServer.start` binds the socket (replacing a stale one, refusing when a
live server answers on it) and loads what a query needs; :meth:`serve_forever` answers until
:meth:`stop` (from another thread or a signal handler); :meth:`close` removes the socket.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import socketserver
import stat
import threading
from typing import Any

from pktstream.archive import wire

log = logging.getLogger(__name__)


class _FrameWriter(io.RawIOBase):
    """A binary file whose writes go to a connection as ``D`` frames (buffer it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        for i in range(0, len(data), wire.MAX_FRAME_BYTES):
            self.sock.sendall(wire.frame(wire.DATA, data[i:i + wire.MAX_FRAME_BYTES]))
        return len(data)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            req = wire.decode_request(self.rfile.readline(wire.MAX_REQUEST_BYTES + 1))
        except wire.ProtocolError as exc:
            self._send(wire.ERROR, f"bad request: {exc}")
            return
        except OSError:
            return
        out = io.BufferedWriter(_FrameWriter(sock), buffer_size=256 << 10)
        try:
            stats = self.server.run_query(req, out, lambda m: sock.sendall(wire.frame(wire.WARNING, m.encode())))
            out.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("query client went away")
            return
        except Exception as exc:
            from pktstream.cli import error_line
            if not isinstance(exc, (ValueError, OSError, ImportError)) and not _is_pktstream_error(exc):
                log.exception("query failed")
            self._send(wire.ERROR, error_line(exc))
            return
        import json
        self._send(wire.SUMMARY, json.dumps({"summary": stats.summary(), "scanned": stats.scanned}))

    def _send(self, kind: bytes, text: str) -> None:
        try:
            self.request.sendall(wire.frame(kind, text.encode()))
        except OSError:
            pass  # the client went away: nothing to tell


def _is_pktstream_error(exc: BaseException) -> bool:
    from pktstream.exceptions import PktstreamError
    return isinstance(exc, PktstreamError)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    archive_root: str

    def run_query(self, req: dict[str, Any], out, warn):
        from pktstream.archive.archive import Archive
        if req.get("archive") is not None and req["archive"] != wire.archive_id(self.archive_root):
            raise ValueError(f"this query server answers for {self.archive_root}, not {req['archive']}")
        return Archive(self.archive_root).write(out, req.get("bpf"), since=req.get("since"),
                                                until=req.get("until"), sensor=req.get("sensor") or None,
                                                warn=warn, format=req.get("format") or "pcapng")


class QueryServer:
    """Answers queries of one archive on a Unix socket (thread-safe: one thread per query)."""

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
        """Check the archive, bind the socket, load what a query needs (numpy, pyarrow, the
        reader, the catalog's snapshot into the page cache)."""
        from pktstream.archive.archive import Archive
        if not self.archive.startswith("s3://") and not os.path.isdir(self.archive):
            raise FileNotFoundError(2, "no such archive directory", self.archive)
        archive = Archive(self.archive)
        archive.write(io.BytesIO(), "host 192.0.2.1", warn=lambda m: None)  # (TEST-NET-1: loads the
        # modules, the reader and the writer, reads the catalog)
        self._replace_stale_socket()
        old = os.umask(0o777 & ~self.socket_mode)
        try:
            server = _Server(self.socket_path, _Handler, bind_and_activate=False)
            try:
                server.server_bind()
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
        os.chmod(self.socket_path, self.socket_mode)
        st = os.stat(self.socket_path)
        self._inode = (st.st_dev, st.st_ino)
        server.archive_root = self.archive
        self._server = server

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

    def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        self._server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (safe from a signal handler: does not wait)."""
        if self._server is not None:
            threading.Thread(target=self._server.shutdown, daemon=True).start()

    def close(self) -> None:
        """Stop listening and remove the socket (if it is still the one this server made)."""
        if self._server is None:
            return
        self._server.server_close()
        self._server = None
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
