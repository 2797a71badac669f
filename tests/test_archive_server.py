"""``pktstream serve``: queries answered by a resident server equal direct queries; the client
loads neither numpy nor pyarrow; stale sockets, bad requests and malformed replies each get a
one-line error and harm nothing else. No root: Unix sockets under tmp_path."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pktstream.archive import Archive, wire
from test_archive import CHUNK, T0, brute, make_archive

PKTSTREAM = [sys.executable, "-m", "pktstream"]


class Serve:
    """A ``pktstream serve`` process, started and waited for (its 'answering' line)."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.p = subprocess.Popen([*PKTSTREAM, "serve", str(root), *extra], stderr=subprocess.PIPE, text=True)
        self.first_line = self.p.stderr.readline()  # printed once the socket accepts queries (or the error)

    def exit_code(self) -> int:
        """The exit status of a server expected to fail at start (waits, sends nothing)."""
        rc = self.p.wait(timeout=60)
        self.p.stderr.close()
        return rc

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        rc = self.p.wait(timeout=60)
        self.p.stderr.close()
        return rc


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = make_archive(tmp_path_factory.mktemp("srv") / "a")
    assert Archive(str(r)).index(chunk_bytes=CHUNK)["damaged"] == 0
    return r


@pytest.fixture()
def served(root):
    s = Serve(root)
    assert "answering queries" in s.first_line, s.first_line
    yield s
    assert s.stop() == 0
    assert not (root / wire.SOCKET_NAME).exists()  # removed on a clean stop


def query(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*PKTSTREAM, "query", str(root), *args], capture_output=True, timeout=120, **kw)


@pytest.mark.parametrize("args", [
    ["host", "203.0.113.7", "and", "port", "4444"],
    ["tcp", "--since", "2024-11-27T12:00:00.5Z", "--until", str(T0 // 10**9 + 2)],
    ["udp", "--sensor", "web-1"],
    [],
])
def test_query_by_server_equals_direct_query(root, served, tmp_path, args):
    for name in ("q.pcapng", "q.pcapng.zst"):
        by_server = query(root, *args, "-w", str(tmp_path / f"s-{name}"))
        direct = query(root, *args, "--no-server", "-w", str(tmp_path / f"d-{name}"))
        assert by_server.returncode == 0 and direct.returncode == 0, (by_server.stderr, direct.stderr)
        assert b"(by the query server)" in by_server.stderr and b"by the query server" not in direct.stderr
        assert (tmp_path / f"s-{name}").read_bytes() == (tmp_path / f"d-{name}").read_bytes()
        assert not list(tmp_path.glob("*.part"))
    piped = query(root, *args, "-w", "-")
    assert piped.returncode == 0 and piped.stdout == (tmp_path / "d-q.pcapng").read_bytes()
    if not args:  # and the direct query equals brute force over the files (test_archive.py)
        import pktstream
        pk = sorted((int(b.ts_ns[i]), bytes(b[i])) for b in pktstream.read(tmp_path / "s-q.pcapng")
                    for i in range(len(b)))
        assert pk == sorted(brute(root))


def test_client_loads_neither_numpy_nor_pyarrow(root, served, tmp_path):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pktstream", "query", str(root), "port", "53",
                        "-w", str(tmp_path / "o.pcapng")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "(by the query server)" in r.stderr, r.stderr[-500:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "pktstream.archive.wire" in imported
    assert not {m for m in imported if m.split(".")[0] in ("numpy", "pyarrow")}


def test_server_errors_are_one_line_and_the_server_goes_on(root, served, tmp_path):
    out = tmp_path / "o.pcapng"
    for args in (["tcp", "and", "("], ["--since", "yesterday-ish"]):
        r = query(root, *args, "-w", str(out), text=True)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("pktstream query: ") and not out.exists() and not list(tmp_path.iterdir())
    sock = str(root / wire.SOCKET_NAME)
    bad = [b"not json\n", b'{"v": 9}\n', b'{"v": 1, "bpf": 7}\n', b'{"v": 1, "sensor": "x"}\n',
           b'{"v": 1, "format": "pcap"}\n', b"x" * (wire.MAX_REQUEST_BYTES + 10) + b"\n", b"no newline"]
    for req in bad:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(sock)
            s.sendall(req)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        kind, n = wire.FRAME_HEADER.unpack(reply[:5])
        assert kind == wire.ERROR and reply[5:5 + n].startswith(b"bad request: ") and len(reply) == 5 + n, reply
    with socket.socket(socket.AF_UNIX) as s:  # a client that leaves in the middle of a reply
        s.connect(sock)
        s.sendall(wire.encode_request(None, None, None, None, "pcapng"))
        s.recv(10)
    r = query(root, "port", "53", "-w", str(out))
    assert r.returncode == 0 and b"(by the query server)" in r.stderr and out.stat().st_size > 0


def test_stale_socket_second_server_and_socket_mode(root, tmp_path):
    sock = root / wire.SOCKET_NAME
    s = Serve(root)
    assert "answering" in s.first_line
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    second = Serve(root)  # the socket is live: refused, the first server untouched
    assert second.exit_code() == 1 and "already answers" in second.first_line
    s.stop(signal.SIGKILL)  # leaves its socket behind
    assert sock.exists()
    r = query(root, "port", "53", "-w", str(tmp_path / "a.pcapng"), text=True)
    assert r.returncode == 0 and "querying directly" in r.stderr and "by the query server" not in r.stderr
    r2 = query(root, "port", "53", "--server", str(tmp_path / "none.sock"), "-w", str(tmp_path / "b.pcapng"),
               text=True)
    other = tmp_path / "other"
    other.mkdir()
    assert r2.returncode == 1 and len(r2.stderr.strip().splitlines()) == 1 and "none.sock" in r2.stderr
    s = Serve(root, "--socket-mode", "660")  # replaces the stale socket
    try:
        assert "answering" in s.first_line and stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        r = query(root, "port", "53", "-w", str(tmp_path / "c.pcapng"))
        assert b"(by the query server)" in r.stderr
        assert (tmp_path / "c.pcapng").read_bytes() == (tmp_path / "a.pcapng").read_bytes()
        r = query(other, "port", "53", "--server", str(sock), "-w", str(tmp_path / "d.pcapng"), text=True)
        assert r.returncode == 1 and "answers for" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "d.pcapng").exists()
    finally:
        assert s.stop() == 0
    for bad in (["--socket-mode", "999"], ["--socket", str(tmp_path / ("x" * 120))]):
        p = Serve(root, *bad)
        assert p.exit_code() == 1 and p.first_line.startswith("pktstream serve: "), p.first_line
    p = Serve(tmp_path / "nope")
    assert p.exit_code() == 1 and "nope" in p.first_line


def _fake_server(path: str, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            c, _ = srv.accept()
            with c:
                c.recv(65536)
                c.sendall(reply)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("reply, message", [
    (wire.FRAME_HEADER.pack(b"D", wire.MAX_FRAME_BYTES + 1), "at most"),
    (wire.FRAME_HEADER.pack(b"D", 100) + b"x" * 10, "inside a reply"),
    (wire.frame(b"D", b"abc"), "inside a reply"),  # ends without S or E
    (wire.frame(b"Q", b""), "unknown type"),
    (wire.frame(b"S", b"[1, 2"), "malformed summary"),
    (wire.frame(b"E", b"boom"), "boom"),
])
def test_malformed_replies_are_one_line_errors_and_leave_no_file(tmp_path, reply, message):
    sock = str(tmp_path / "fake.sock")
    t = _fake_server(sock, reply)
    out = tmp_path / "o.pcapng"
    r = query(tmp_path, "--server", sock, "-w", str(out), text=True)
    t.join(timeout=30)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists() and not (tmp_path / "o.pcapng.part").exists()


def test_wire_output_format_matches_archive_write():
    from pktstream.formats.writer import FORMATS, format_from_name
    for name in ["a.pcapng", "a.pcapng.zst", "a.pcap.zst", "a.pcap", "a.zst", "-", "a"]:
        direct = "pcapng.zst" if (format_from_name(name) or "").endswith(".zst") else "pcapng"
        assert wire.output_format(name) == direct, name
    assert {e for e in FORMATS if e.endswith(".zst")} == {".pcap.zst", ".pcapng.zst"}
    assert json.loads(wire.encode_request("tcp", None, "1", ["s"], "pcapng"))["v"] == wire.VERSION
