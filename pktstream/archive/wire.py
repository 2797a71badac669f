"""The query server's protocol and its client (``pktstream serve`` / ``pktstream query``).

A query server (:mod:`pktstream.archive.service`) keeps Python, numpy and pyarrow loaded and
the archive's catalog in the page cache, so a ``pktstream query`` it answers pays neither
their start-up (~0.2 s of the command's ~0.35 s) nor the catalog's first read: the client
below imports the standard library only. The same division as Stenographer's ``stenoread``
(client) and ``stenod`` (server).

Transport: a Unix stream socket, by default ``ARCHIVE/.pktstream-query.sock``; who may query
is who may connect to it (mode 0600 unless ``serve --socket-mode`` says otherwise). One query
per connection:

* request: one line of JSON (at most :data:`MAX_REQUEST_BYTES`), ``{"v": 1, "archive": str|null,
  "bpf": str|null, "since": str|null, "until": str|null, "sensor": [str]|null,
  "format": "pcapng"|"pcapng.zst", "keepalive": bool}`` (times as the command line takes them;
  ``archive``: the archive the client means, :func:`archive_id`, refused by a server of another
  one; ``keepalive`` optional);
* reply: frames of one type byte, a 4-byte big-endian length and that many bytes:
  ``D`` output bytes, ``W`` a warning line, ``K`` (empty; only when the request asked for
  ``keepalive``: one at once, then one every :data:`HEARTBEAT_S` while the query runs), then
  exactly one of ``S`` (success: JSON ``{"summary": str, "scanned": [str]}``) or ``E`` (an error
  line); the server then closes. A server running its most queries at once answers ``B`` (busy,
  a line; ``E`` to a client that did not ask for ``keepalive``) instead of any of these.

Heartbeats let a client tell a long query from a server process that is stopped (SIGSTOP) or
frozen (a deadlock holding the interpreter): :func:`query` gives up after ``idle_timeout_s``
without a frame (falling back to a direct query when no output came yet). They come from their
own thread, so they say the process is alive, not that the query moves: a query blocked in a
read (a dead NFS mount, a hung S3 request) keeps its client waiting, as a direct query would
wait. A server from before heartbeats sends no ``K``: the client waits ``idle_timeout_s`` for its
first frame (then falls back, the old server still running the query -- restart ``pktstream
serve`` after upgrading), and as long as it takes once that frame came.

Every length is checked (a frame above :data:`MAX_FRAME_BYTES` or a reply ending early is an
error of the query, never a short file passed off as complete).

Thread safety: :func:`query` uses its own connection; nothing is shared.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

VERSION = 1
SOCKET_NAME = ".pktstream-query.sock"
MAX_REQUEST_BYTES = 64 << 10
MAX_FRAME_BYTES = 16 << 20
FRAME_HEADER = struct.Struct(">cI")
DATA, WARNING, SUMMARY, ERROR, KEEPALIVE, BUSY = b"D", b"W", b"S", b"E", b"K", b"B"
HEARTBEAT_S = 1.0      # the server's heartbeat while a query runs
IDLE_TIMEOUT_S = 30.0  # the client's default wait for a frame
MIN_IDLE_TIMEOUT_S = 2 * HEARTBEAT_S  # shorter: a query would be given up on between two heartbeats
FORMATS = ("pcapng", "pcapng.zst")


class ServerUnavailable(OSError):
    """No query server answers on the socket (none started, or it stopped): query directly."""


class ServerBusy(ServerUnavailable):
    """The query server runs as many queries as it may: query directly (or try again)."""


class ProtocolError(ValueError):
    """The server's reply or the client's request is malformed."""


def default_socket(archive: str) -> str | None:
    """The socket a server of a local archive directory listens on (None for S3)."""
    if archive.startswith("s3://"):
        return None
    return os.path.join(archive, SOCKET_NAME)


def frame(kind: bytes, payload: bytes) -> bytes:
    """One reply frame."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes (at most {MAX_FRAME_BYTES})")
    return FRAME_HEADER.pack(kind, len(payload)) + payload


def archive_id(archive: str) -> str:
    """How client and server name an archive to compare: its real path, or the S3 URL."""
    return archive.rstrip("/") if archive.startswith("s3://") else os.path.realpath(archive)


def encode_request(bpf: str | None, since: str | None, until: str | None, sensor: list[str] | None,
                   fmt: str, archive: str | None = None, keepalive: bool = False) -> bytes:
    return json.dumps({"v": VERSION, "archive": archive, "bpf": bpf, "since": since, "until": until,
                       "sensor": sensor, "format": fmt, "keepalive": keepalive}).encode() + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    """A request line, checked: every field of the right type (ProtocolError otherwise)."""
    if len(line) > MAX_REQUEST_BYTES or not line.endswith(b"\n"):
        raise ProtocolError(f"request line missing or longer than {MAX_REQUEST_BYTES} bytes")
    try:
        req = json.loads(line)
    except (ValueError, RecursionError) as exc:  # (RecursionError: nesting deeper than the parser's stack)
        raise ProtocolError(f"request is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(req, dict) or type(req.get("v")) is not int or req["v"] != VERSION:
        raise ProtocolError(f"request of an unknown protocol version (this server speaks {VERSION})")
    for key in ("archive", "bpf", "since", "until"):
        if req.get(key) is not None and not isinstance(req[key], str):
            raise ProtocolError(f"request field {key!r} must be a string or null")
    sensor = req.get("sensor")
    if sensor is not None and not (isinstance(sensor, list) and all(isinstance(s, str) for s in sensor)):
        raise ProtocolError("request field 'sensor' must be a list of strings or null")
    if not isinstance(req.get("keepalive", False), bool):
        raise ProtocolError("request field 'keepalive' must be true or false")
    if req.get("format", "pcapng") not in FORMATS:
        raise ProtocolError(f"request field 'format' must be one of {', '.join(FORMATS)}")
    return req


@dataclass
class Reply:
    """What a server said about a query (its output went to the ``out`` of :func:`query`)."""
    summary: str = ""
    scanned: list[str] = field(default_factory=list)
    bytes_written: int = 0  # output bytes received (for a caller's own accounting)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = sock.recv(min(n - got, 1 << 20))
        if not b:
            raise ProtocolError(f"the query server closed the connection inside a reply ({got} of {n} bytes)")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def connect(path: str, timeout_s: float = 5.0) -> socket.socket:
    """A connection to the server on ``path`` (:class:`ServerUnavailable` if none answers)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as exc:
        s.close()
        raise ServerUnavailable(exc.errno or errno.ECONNREFUSED, "no query server answers on it", path) from None
    except PermissionError as exc:
        s.close()
        raise PermissionError(exc.errno, "may not connect to the query server's socket", path) from None
    except BaseException:
        s.close()
        raise
    s.settimeout(None)  # (query() sets its own idle timeout: the server's heartbeats bound it)
    return s


def query(path: str, out: BinaryIO, *, bpf: str | None = None, since: str | None = None,
          until: str | None = None, sensor: list[str] | None = None, fmt: str = "pcapng",
          archive: str | None = None, warn: Callable[[str], None] | None = None,
          idle_timeout_s: float = IDLE_TIMEOUT_S) -> Reply:
    """Run a query on the server listening on ``path``, writing its output to ``out``.

    Raises :class:`ServerUnavailable` before anything is written when no server answers (or one
    accepted and closed, or fell silent for ``idle_timeout_s``, before any output; or it is
    busy: :class:`ServerBusy`),
    ``PermissionError`` when the socket may not be used, :class:`ProtocolError` for a malformed
    reply or a server that fell silent for ``idle_timeout_s`` after some output, and ``ValueError``
    with the server's message when the query failed there (bad BPF, unknown time, unreadable
    archive, ``archive`` not the one the server answers for)."""
    reply = Reply()
    with connect(path) as s:
        s.settimeout(idle_timeout_s)
        try:
            s.sendall(encode_request(bpf, since, until, sensor, fmt,
                                     None if archive is None else archive_id(archive), keepalive=True))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it replied (e.g. busy) and closed before reading: its reply may be here
        except TimeoutError:
            raise ServerUnavailable(errno.ETIMEDOUT, f"the query server took no request for {idle_timeout_s:g} s",
                                    path) from None
        frames = 0  # received so far (the first tells whether heartbeats follow)
        try:
            while True:
                try:
                    header = s.recv(FRAME_HEADER.size)
                except ConnectionResetError:
                    if frames:
                        raise
                    header = b""
                if not header and not reply.bytes_written:  # (a server stopping, dead or cut off)
                    raise ServerUnavailable(errno.ECONNRESET, "the query server closed the connection "
                                            + ("before any output" if frames else "without replying"), path)
                header += _read_exact(s, FRAME_HEADER.size - len(header))
                if not frames and header[:1] != KEEPALIVE:
                    s.settimeout(None)  # a server without heartbeats: as long as it takes
                frames += 1
                kind, n = FRAME_HEADER.unpack(header)
                if n > MAX_FRAME_BYTES:
                    raise ProtocolError(f"the query server sent a frame of {n} bytes (at most {MAX_FRAME_BYTES})")
                payload = _read_exact(s, n)
                if kind == DATA:
                    out.write(payload)
                    reply.bytes_written += n
                elif kind == KEEPALIVE:
                    pass
                elif kind == WARNING:
                    if warn is not None:
                        warn(payload.decode("utf-8", "replace"))
                elif kind == ERROR:
                    raise ValueError(payload.decode("utf-8", "replace"))
                elif kind == BUSY and not reply.bytes_written:
                    raise ServerBusy(errno.EBUSY, payload.decode("utf-8", "replace"), path)
                elif kind == SUMMARY:
                    try:
                        done = json.loads(payload)
                        reply.summary = str(done["summary"])
                        reply.scanned = [str(x) for x in done.get("scanned") or ()]
                    except (ValueError, KeyError, TypeError):
                        raise ProtocolError("the query server sent a malformed summary") from None
                    return reply
                else:
                    raise ProtocolError(f"the query server sent a frame of unknown type {kind!r}")
        except TimeoutError:
            if not frames:
                raise ServerUnavailable(errno.ETIMEDOUT, f"the query server did not answer for {idle_timeout_s:g} s",
                                        path) from None
            if not reply.bytes_written:  # (nothing written yet: the caller may query directly)
                raise ServerUnavailable(errno.ETIMEDOUT, f"the query server stopped answering for "
                                        f"{idle_timeout_s:g} s before any output", path) from None
            raise ProtocolError(f"the query server sent nothing for {idle_timeout_s:g} s inside a reply "
                                "(stopped or hung)") from None


def output_format(name: str) -> str:
    """The format :meth:`~pktstream.archive.Archive.write` gives an output named ``name``
    (the names of ``pktstream.formats.writer.FORMATS`` ending ``.zst`` are compressed)."""
    return "pcapng.zst" if name.endswith((".pcap.zst", ".pcapng.zst")) else "pcapng"
