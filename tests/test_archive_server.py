"""``pktstream serve``: queries answered by a resident server equal direct queries; the client
loads neither numpy nor pyarrow; stale sockets, bad requests and malformed replies each get a
one-line error and harm nothing else. No root: Unix sockets under tmp_path."""
from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pktstream.archive import Archive, wire
from test_archive import CHUNK, T0, brute, make_archive

PKTSTREAM = [sys.executable, "-m", "pktstream"]


_STARTED: list[Serve] = []


class Serve:
    """A ``pktstream serve`` process, waited for until it prints its first line ('answering'
    once the socket accepts queries, or its error); its stderr is drained from then on."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.p = subprocess.Popen([*PKTSTREAM, "serve", str(root), *extra], stderr=subprocess.PIPE, text=True)
        _STARTED.append(self)
        self.lines: list[str] = []
        first = threading.Event()

        def drain() -> None:
            for line in self.p.stderr:
                self.lines.append(line)
                first.set()
            first.set()
        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        assert first.wait(120), "pktstream serve printed nothing in 120 s"
        self.first_line = self.lines[0] if self.lines else ""

    def exit_code(self) -> int:
        """The exit status of a server expected to fail at start (waits, sends nothing)."""
        rc = self.p.wait(timeout=60)
        self._drain.join(timeout=60)
        self.p.stderr.close()
        return rc

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        return self.exit_code()


@pytest.fixture(autouse=True)
def _no_server_left():
    """A server a failed test started is stopped (the archive is shared by the module)."""
    yield
    while _STARTED:
        s = _STARTED.pop()
        if s.p.poll() is None:
            s.p.kill()
        s.exit_code()


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
    assert s.stop() == 0, s.lines
    assert not (root / wire.SOCKET_NAME).exists()  # removed on a clean stop
    assert not [x for x in s.lines[1:] if "Traceback" in x or "Exception" in x], s.lines


def query(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*PKTSTREAM, "query", str(root), *args], capture_output=True, timeout=120, **kw)


def _notes(stderr: bytes | str) -> list[str]:
    """A query's stderr lines other than its summary (warnings, scanned files)."""
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return [x for x in text.splitlines() if not x.startswith("pktstream query: read ")]


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
        assert _notes(by_server.stderr) == _notes(direct.stderr)  # warnings and "scanned" lines
        assert not list(tmp_path.glob("*.part"))
    piped = query(root, *args, "-w", "-")
    assert piped.returncode == 0 and piped.stdout == (tmp_path / "d-q.pcapng").read_bytes()
    if not args:  # and the direct query equals brute force over the files (test_archive.py)
        import pktstream
        pk = sorted((int(b.ts_ns[i]), bytes(b[i])) for b in pktstream.read(tmp_path / "s-q.pcapng")
                    for i in range(len(b)))
        assert pk == sorted(brute(root))


def test_strftime_output_names_are_expanded_by_server_and_direct_query_alike(root, served, tmp_path):
    by_server = query(root, "udp", "-w", str(tmp_path / "s-%Y.pcapng"))
    direct = query(root, "udp", "--no-server", "-w", str(tmp_path / "d-%Y.pcapng"))
    assert by_server.returncode == 0 and b"(by the query server)" in by_server.stderr, by_server.stderr
    assert direct.returncode == 0, direct.stderr
    [s], [d] = tmp_path.glob("s-*.pcapng"), tmp_path.glob("d-*.pcapng")
    assert re.fullmatch(r"s-20\d\d\.pcapng", s.name) and re.fullmatch(r"d-20\d\d\.pcapng", d.name)
    assert s.read_bytes() == d.read_bytes()


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
           b'{"v": 1, "format": "pcap"}\n', b'{"v": true}\n', b"[" * 60000 + b"\n",
           b"x" * (wire.MAX_REQUEST_BYTES + 10) + b"\n", b"no newline"]
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


def _fake_server(path: str, reply: bytes, hold: threading.Event | None = None) -> threading.Thread:
    """A server on ``path`` answering one query with ``reply`` (then, with ``hold``, keeping the
    connection open until it is set)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            c, _ = srv.accept()
            with c:
                c.recv(65536)
                c.sendall(reply)
                if hold is not None:
                    hold.wait(120)
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


def test_wire_output_format_is_what_archive_write_writes(root, tmp_path):
    magic = {"pcapng": b"\x0a\x0d\x0d\x0a", "pcapng.zst": b"\x28\xb5\x2f\xfd"}
    for name in ["a.pcapng", "a.pcapng.zst", "a.pcap.zst", "a.pcap", "a.zst", "a"]:
        Archive(str(root)).write(tmp_path / name, "port 53")
        assert (tmp_path / name).read_bytes()[:4] == magic[wire.output_format(name)], name
    assert json.loads(wire.encode_request("tcp", None, "1", ["s"], "pcapng"))["v"] == wire.VERSION


def _truncated_archive(root: Path) -> tuple[Path, str]:
    """Two files, indexed; then one is cut inside a record (stale: scanned, truncated)."""
    from archive_data import batches
    from pktstream.formats import open_writer
    root.mkdir()
    for k, name in enumerate(("s1.pcap", "s2.pcap")):
        with open_writer(root / name) as w:
            for b in batches(k, 400, T0 + k):
                w.write(b)
    Archive(str(root)).index(chunk_bytes=CHUNK)
    data = (root / "s2.pcap").read_bytes()
    (root / "s2.pcap").write_bytes(data[:len(data) * 2 // 3 + 7])
    return root, "s2.pcap"


def test_concurrent_queries_each_report_their_own_truncated_file(tmp_path):
    root, cut = _truncated_archive(tmp_path / "t")
    bpfs = [["tcp"], ["udp"], ["port", "53"], [], ["host", "203.0.113.7"], ["not", "tcp"]]
    direct = {i: query(root, *b, "--no-server", "-w", str(tmp_path / f"d{i}.pcapng"), text=True)
              for i, b in enumerate(bpfs)}
    assert all(any(cut in x and "truncated" in x for x in _notes(r.stderr)) for r in direct.values())
    s = Serve(root)
    assert "answering" in s.first_line
    results: dict[int, subprocess.CompletedProcess] = {}

    def one(i: int) -> None:
        results[i] = query(root, *bpfs[i], "-w", str(tmp_path / f"s{i}.pcapng"), text=True)
    for _round in range(3):  # all at once, three times
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bpfs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in results.items():
            assert r.returncode == 0 and "(by the query server)" in r.stderr, r.stderr
            assert _notes(r.stderr) == _notes(direct[i].stderr), (i, r.stderr, direct[i].stderr)
            assert (tmp_path / f"s{i}.pcapng").read_bytes() == (tmp_path / f"d{i}.pcapng").read_bytes()
    assert s.stop() == 0, s.lines


def test_interrupted_client_leaves_no_part_file(tmp_path):
    sock = str(tmp_path / "slow.sock")
    release = threading.Event()
    t = _fake_server(sock, wire.frame(wire.DATA, b"x" * 1000), hold=release)  # data, then nothing
    out = tmp_path / "o.pcapng"
    # Ctrl-C as on a terminal: a test run started in the background by a non-interactive shell
    # inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler
    restore = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    p = subprocess.Popen([sys.executable, "-c", restore + "from pktstream.cli import main; sys.exit(main())",
                          "query", str(tmp_path), "--server", sock, "-w", str(out)],
                         stderr=subprocess.PIPE, text=True)
    try:
        part = tmp_path / "o.pcapng.part"
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size == 1000):  # the client got the data frame
            assert time.monotonic() < deadline and p.poll() is None, "the client never wrote its data"
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130
        assert not part.exists() and not out.exists()
    finally:
        release.set()
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)
        p.stderr.close()
        t.join(timeout=60)


def test_a_server_closing_without_reply_is_no_server(tmp_path):
    root, _ = _truncated_archive(tmp_path / "c")
    sock = root / wire.SOCKET_NAME
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock))
    srv.listen(4)

    def run() -> None:
        with srv:
            for _ in range(2):
                c, _ = srv.accept()
                c.close()  # accepted, closed without a reply (a server stopping)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        r = query(root, "tcp", "-w", str(tmp_path / "a.pcapng"), text=True)
        assert r.returncode == 0 and "without replying; querying directly" in r.stderr, r.stderr
        d = query(root, "tcp", "--no-server", "-w", str(tmp_path / "d.pcapng"))
        assert (tmp_path / "a.pcapng").read_bytes() == (tmp_path / "d.pcapng").read_bytes()
        r = query(root, "tcp", "--server", str(sock), "-w", str(tmp_path / "b.pcapng"), text=True)
        assert r.returncode == 1 and "without replying" in r.stderr and not (tmp_path / "b.pcapng").exists()
        assert d.returncode == 0
    finally:
        t.join(timeout=60)
        sock.unlink()


def test_request_timeout_and_busy_server_in_process(root, tmp_path, monkeypatch):
    """A client has REQUEST_TIMEOUT_S in all to send its request (a byte every few seconds does
    not renew it), and holds no query slot until it has; a query finding every slot taken by
    running queries is told the server is busy."""
    from pktstream.archive import service
    monkeypatch.setattr(service, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(service, "MAX_QUERIES", 1)
    answer, entered, gate = service._Handler._answer, threading.Event(), threading.Event()

    def held(self, sock, line):  # a query that runs until the test lets it go
        if b'"hold"' in line:
            entered.set()
            gate.wait(60)
        return answer(self, sock, line)
    monkeypatch.setattr(service._Handler, "_answer", held)
    srv = service.QueryServer(str(root), str(tmp_path / "q.sock"))
    srv.start()
    stop = threading.Event()
    loop = threading.Thread(target=srv.serve_until, args=(stop,), daemon=True)
    loop.start()
    try:
        with wire.connect(srv.socket_path) as idle:  # sends nothing: cut off after the request timeout
            idle.settimeout(60)
            assert idle.recv(10) == b""
        with wire.connect(srv.socket_path) as trickle:  # a byte every 0.1 s: cut off all the same
            trickle.settimeout(60)
            cut = False
            for ch in b'{"v": 1, "bpf": "' + b" " * 200:
                try:
                    trickle.sendall(bytes([ch]))
                except (BrokenPipeError, ConnectionResetError):
                    cut = True
                    break
                time.sleep(0.1)
            assert cut, "a client trickling its request was never cut off"
        monkeypatch.setattr(service, "REQUEST_TIMEOUT_S", 60.0)
        with wire.connect(srv.socket_path):  # connected, sends nothing: holds no slot
            reply = wire.query(srv.socket_path, io.BytesIO(), bpf="port 53")
            assert "packets matched" in reply.summary
        deadline = time.monotonic() + 120
        while True:  # a running query holds the only slot (once the last query's thread gave it back:
            holder = wire.connect(srv.socket_path)  # until then the server answers "busy" at once)
            holder.sendall(json.dumps({"v": 1, "bpf": "hold", "keepalive": True}).encode() + b"\n")
            while not entered.is_set() and not select.select([holder], [], [], 0.05)[0]:
                assert time.monotonic() < deadline
            if entered.is_set():
                break
            holder.close()  # it was told the server is busy
        with holder:
            with pytest.raises(wire.ServerBusy, match="busy"):  # (the command line then queries directly)
                wire.query(srv.socket_path, io.BytesIO(), bpf="port 53")
            # a client that does not ask for heartbeats (one from before) gets the busy error as E
            with wire.connect(srv.socket_path) as c:
                c.sendall(json.dumps({"v": 1, "bpf": "port 53"}).encode() + b"\n")
                c.settimeout(60)
                kind, n = wire.FRAME_HEADER.unpack(c.makefile("rb").read(wire.FRAME_HEADER.size))
                assert kind == wire.ERROR
            gate.set()
        deadline = time.monotonic() + 120
        while True:  # the holder gone, its slot is given back (once its thread sees the end)
            try:
                reply = wire.query(srv.socket_path, io.BytesIO(), bpf="port 53")
                break
            except wire.ServerBusy as exc:
                assert "busy" in str(exc) and time.monotonic() < deadline
        assert "packets matched" in reply.summary
    finally:
        gate.set()
        stop.set()
        loop.join(timeout=60)
    assert not loop.is_alive() and not os.path.exists(srv.socket_path)


def test_heartbeats_keep_a_long_query_alive_in_process(root, tmp_path, monkeypatch):
    """A query that runs longer than the client's idle timeout is not given up on: the server
    sends a heartbeat (K frame) every HEARTBEAT_S while it runs. A client that does not ask for
    heartbeats gets none (its protocol stays as it was)."""
    from pktstream.archive import service
    monkeypatch.setattr(service, "HEARTBEAT_S", 0.05)
    from pktstream.archive import archive as archive_module
    srv = service.QueryServer(str(root), str(tmp_path / "q.sock"))
    srv.start()
    real = archive_module.Archive.write

    def slow(self, *args, **kw):  # runs until 80 heartbeats (>= 4 s, twice the client's timeout) went out
        deadline = time.monotonic() + 120
        while srv.heartbeats < 80 and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(self, *args, **kw)
    monkeypatch.setattr(archive_module.Archive, "write", slow)
    stop = threading.Event()
    loop = threading.Thread(target=srv.serve_until, args=(stop,), daemon=True)
    loop.start()
    try:
        out = io.BytesIO()
        reply = wire.query(srv.socket_path, out, bpf="port 53", idle_timeout_s=2.0)
        assert srv.heartbeats >= 80 and "packets matched" in reply.summary
        monkeypatch.setattr(archive_module.Archive, "write", real)
        direct = io.BytesIO()
        Archive(str(root)).write(direct, "port 53")
        assert out.getvalue() == direct.getvalue()
        # a client of before heartbeats: no K frame in its reply
        before = srv.heartbeats
        with wire.connect(srv.socket_path) as c:
            c.sendall(json.dumps({"v": 1, "bpf": "port 53", "format": "pcapng"}).encode() + b"\n")
            c.settimeout(60)
            kinds = []
            reply_bytes = c.makefile("rb")
            while True:
                kind, n = wire.FRAME_HEADER.unpack(reply_bytes.read(wire.FRAME_HEADER.size))
                assert len(reply_bytes.read(n)) == n
                kinds.append(kind)
                if kind in (wire.SUMMARY, wire.ERROR):
                    break
        assert kinds[-1] == wire.SUMMARY and wire.KEEPALIVE not in kinds and srv.heartbeats == before
    finally:
        stop.set()
        loop.join(timeout=60)


@pytest.mark.parametrize("reply, message", [
    (b"", "did not answer for 2 s"),                                          # hung before replying
    (wire.frame(b"K", b""), "stopped answering for 2 s before any output"),  # hung after its first heartbeat
    (wire.frame(b"K", b"") + wire.frame(b"D", b"abc"), "sent nothing for 2 s inside a reply"),
    (wire.frame(b"K", b"") + wire.frame(b"B", b"busy (8 queries running)"), "busy (8 queries running)"),
    (wire.frame(b"K", b"") + b"close", "closed the connection before any output"),  # died after its heartbeat
])
def test_a_hung_or_busy_server_is_given_up_on(tmp_path, reply, message):
    """A server that stops sending (SIGSTOP, a deadlock) is given up on after --server-timeout,
    a busy one at once: with --server, a one-line error and no file; before any output, a query
    at the archive's default socket runs directly instead."""
    closes = reply.endswith(b"close")
    reply = reply.removesuffix(b"close")
    sock = str(tmp_path / "fake.sock")
    hold = None if closes else threading.Event()
    t = _fake_server(sock, reply, hold)
    out = tmp_path / "o.pcapng"
    try:
        r = query(tmp_path, "--server", sock, "--server-timeout", "2", "-w", str(out), text=True)
    finally:
        if hold is not None:
            hold.set()
        t.join(timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists() and not (tmp_path / "o.pcapng.part").exists()
    if reply.endswith(wire.frame(b"D", b"abc")):
        return
    root, _ = _truncated_archive(tmp_path / "c")
    hold = None if closes else threading.Event()
    t = _fake_server(str(root / wire.SOCKET_NAME), reply, hold)
    try:
        r = query(root, "tcp", "--server-timeout", "2", "-w", str(tmp_path / "a.pcapng"), text=True)
    finally:
        if hold is not None:
            hold.set()
        t.join(timeout=60)
        (root / wire.SOCKET_NAME).unlink()
    assert r.returncode == 0 and f"{message.split(' for')[0]}" in r.stderr and "querying directly" in r.stderr, r.stderr
    d = query(root, "tcp", "--no-server", "-w", str(tmp_path / "d.pcapng"))
    assert d.returncode == 0 and (tmp_path / "a.pcapng").read_bytes() == (tmp_path / "d.pcapng").read_bytes()


def test_warnings_of_a_server_given_up_on_are_not_printed_twice(tmp_path):
    """A server that sent a warning and then hung: the direct query that takes over prints the
    same warning once (it is the same archive), not a second time."""
    root, _ = _truncated_archive(tmp_path / "c")
    direct = query(root, "tcp", "--no-server", "-w", str(tmp_path / "d.pcapng"), text=True)
    warnings = [x for x in direct.stderr.splitlines() if ": warning: " in x]
    assert direct.returncode == 0 and warnings, direct.stderr
    sent = warnings[0].split(": warning: ", 1)[1]
    hold = threading.Event()
    t = _fake_server(str(root / wire.SOCKET_NAME), wire.frame(b"K", b"") + wire.frame(b"W", sent.encode()), hold)
    try:
        r = query(root, "tcp", "--server-timeout", "2", "-w", str(tmp_path / "a.pcapng"), text=True)
    finally:
        hold.set()
        t.join(timeout=60)
        (root / wire.SOCKET_NAME).unlink()
    assert r.returncode == 0 and "querying directly" in r.stderr, r.stderr
    assert r.stderr.count(sent) == 1 and [x for x in r.stderr.splitlines() if ": warning: " in x
                                          and "querying directly" not in x] == warnings, r.stderr
