"""Shared fixtures: root check, veth pairs in test-created namespaces, tcpdump, free ports,
and waits on real conditions (``wait_until``, ``Proc.wait_for``, ``wait_received``, ``wait_pcap_count``).

Tests marked ``live`` need root (CAP_NET_RAW/CAP_NET_ADMIN, network namespaces) and the capture
tools (tcpdump, tshark, tcpreplay). There is no skip: without them a live test fails, because CI
runs as root and must run everything. Unit, fuzz, deploy and file tests are not marked and run
as any user without those tools: ``pytest -m "not live"``.

Synchronisation: never a fixed sleep. Wait for the condition itself (a log line, a counter, a
file's packet count, a port accepting) with ``wait_until``; its timeout only bounds a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pktstream.lab import traffic as trafficgen
from pktstream.lab.netns import Veth
from servers import free_port  # noqa: F401  (the tests import it from here)

PKTSTREAM = [sys.executable, "-m", "pktstream"]


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# the suite's veths carry wire-sized frames (and its tcpdump oracles' rings hold ~100,000
# of them): segmentation/receive offloads off (Veth docstring)
Veth.OFFLOADS = False
LIVE_TOOLS = ("ip", "ethtool", "tcpdump", "tshark", "capinfos", "editcap", "mergecap", "tcpreplay")
# fixtures that need root and the capture tools: a test using one must be marked ``live``
LIVE_FIXTURES = {"veth", "procs", "caps", "tansu", "moto", "servers"}


def pytest_collection_modifyitems(config, items):
    """A test that uses a live fixture but is not marked ``live`` would break ``-m "not live"``
    for unprivileged runs: refuse it at collection."""
    for item in items:
        used = LIVE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker("live") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)} but is not marked live")


def pytest_runtest_setup(item):
    """A live test fails (never skips) without root or the capture tools; checked before any
    of its fixtures (module-scoped captures included) is set up."""
    if item.get_closest_marker("live") is None:
        return
    if os.geteuid() != 0:
        pytest.fail("live tests need root (network namespaces, live capture); CI runs as root. "
                    "Run the others with: pytest -m 'not live'")
    missing = [t for t in LIVE_TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing tools {missing}: run the README's test command, which installs them")


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory, monkeypatch):
    """Each test's sensors keep their default spool (and other local state) in a directory of
    their own, not in /var/lib/pktstream: no test sees another's leftovers."""
    monkeypatch.setenv("PKTSTREAM_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after
    ``timeout`` s. The timeout only bounds a failure: it is never what a test waits for."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout ({timeout} s) waiting for {what}")
        time.sleep(interval)


def pcap_count(path: str | Path) -> int:
    """Complete records in a classic pcap file that may still be growing (0 if absent)."""
    import struct
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 24:
        return 0
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    n, pos = 0, 24
    while pos + 16 <= len(data):
        caplen = struct.unpack_from(order + "I", data, pos + 8)[0]
        if pos + 16 + caplen > len(data):
            break
        n, pos = n + 1, pos + 16 + caplen
    return n


def wait_pcap_count(path: str | Path, n: int, timeout: float = 30.0) -> None:
    """Wait until a growing pcap file (tcpdump -U) holds at least ``n`` packets."""
    wait_until(lambda: pcap_count(path) >= n, timeout, f"{n} packets in {path} (has {pcap_count(path)})")


_RX_STATS = re.compile(r"sensor (\S+): (\d+) packets, ")


def received_counts(rx: Proc) -> dict[str, int]:
    """Packets accepted per sensor, from the receiver's latest periodic stats lines
    (``--stats-interval``)."""
    out: dict[str, int] = {}
    for line in rx.err:
        m = _RX_STATS.search(line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def wait_received(rx: Proc, n: int, sensor: str | None = None, timeout: float = 30.0,
                  also: tuple[Proc, ...] = ()) -> None:
    """Wait until a CLI receiver has accepted ``n`` packets (from ``sensor``, or in total);
    ``also``: processes whose output a failure shows too (the sensors)."""
    def count() -> int:
        c = received_counts(rx)
        return c.get(sensor, 0) if sensor is not None else sum(c.values())
    try:
        wait_until(lambda: count() >= n, timeout, f"receiver to accept {n} packets (has {received_counts(rx)})")
    except AssertionError as exc:
        shown = "".join(f"\n--- {' '.join(p.cmd[:4])} ...:\n{p.stderr[-4000:]}" for p in (rx, *also))
        raise AssertionError(f"{exc}{shown}") from None


@pytest.fixture
def veth():
    v = Veth()
    yield v
    v.remove()


class Proc:
    """A subprocess whose stderr is collected; ``wait_for(text)`` waits until it appears."""

    def __init__(self, cmd: list[str], *, stdout=subprocess.DEVNULL, env=None, cwd=None) -> None:
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=cwd)
        self.err: list[str] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        for line in iter(self.p.stderr.readline, b""):
            self.err.append(line.decode(errors="replace"))
        self.p.stderr.close()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text: str, timeout: float = 30, count: int = 1) -> None:
        """Wait until ``text`` has appeared ``count`` times on stderr."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stderr.count(text) >= count:
                return
            if self.p.poll() is not None:
                self._t.join(5)  # the whole of stderr, then a last look
                if self.stderr.count(text) >= count:
                    return
                raise AssertionError(f"{self.cmd[:3]} exited {self.p.returncode} before {text!r}:\n{self.stderr}")
            time.sleep(0.02)
        raise AssertionError(f"timeout waiting for {text!r} x{count} from {self.cmd[:3]}:\n{self.stderr}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._t.join(5)
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def procs():
    """Collects Proc objects; kills any still running at teardown."""
    started: list[Proc] = []

    def start(cmd: list[str], **kw) -> Proc:
        p = Proc(cmd, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def start_tcpdump(start, iface: str, path: Path, bpf: str = "", ns_cmd: list[str] | None = None, *,
                  immediate: bool = True) -> Proc:
    """tcpdump with nanosecond stamps and a large buffer, ready when it says it is listening.

    The buffer: in immediate mode libpcap uses a TPACKET_V2 ring whose slots are 64-256 KiB
    on interfaces with segmentation offloads, as veths have by default, so 64 MiB held only
    256-1024 packets and the oracle itself dropped packets when suites loaded the machine; on
    the tests' veths (:class:`~pktstream.lab.netns.Veth`) the offloads are off, so the slots
    are MTU-sized and 256 MiB holds ~100,000 packets. ``immediate=False`` for an oracle read only after it stops:
    TPACKET_V3 blocks pack the packets, so the same 256 MiB holds ~1 M of them (written within
    tcpdump's 1 s block timeout)."""
    cmd = [*(ns_cmd or []), "tcpdump", "-i", iface, "-n", "-B", "262144",
           *(["--immediate-mode"] if immediate else []),
           "--time-stamp-precision=nano", "-U", "-w", str(path)]
    if bpf:
        cmd.append(bpf)
    p = start(cmd)
    p.wait_for("listening on")
    return p


def read_pcap_dpkt(path: str | Path, partial: bool = False) -> list[tuple[int, int, bytes]]:
    """(ts_ns, wirelen, data) per packet of a classic pcap file, parsed here with struct
    (independent of pktstream's readers; both byte orders, µs and ns magic). ``partial``:
    the file may still be growing (a trailing incomplete record is ignored)."""
    import struct
    data = Path(path).read_bytes()
    if partial and len(data) < 24:
        return []
    magic = data[:4]
    order, scale = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
                    b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}[magic]
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, frac, caplen, wirelen = struct.unpack_from(order + "IIII", data, pos)
        if partial and pos + 16 + caplen > len(data):
            break
        out.append((sec * 10**9 + frac * scale, wirelen, data[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    assert partial or pos == len(data), f"{path}: trailing bytes"
    return out


def tshark_fields(path: str | Path, *fields: str, bpf: str | None = None) -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    if bpf:
        cmd += ["-Y", bpf]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def packet_bytes_tshark(path: str | Path) -> list[tuple[str, int, int, bytes]]:
    """(epoch time text, frame.len, cap_len, raw bytes) per packet, as tshark reads them."""
    rows = tshark_fields(path, "frame.time_epoch", "frame.len", "frame.cap_len", "frame.protocols")
    import dpkt  # noqa: F401  (raw bytes come from the -x dump below)
    raw = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x", "-e", "frame.len"],
                         check=True, capture_output=True, text=True).stdout
    import json
    frames = [bytes.fromhex(p["_source"]["layers"]["frame_raw"][0]) for p in json.loads(raw)]
    return [(r[0], int(r[1]), int(r[2]), fb) for r, fb in zip(rows, frames)]


@pytest.fixture(scope="session")
def mixed_pcap(tmp_path_factory) -> Path:
    """2000 varied frames for tcpreplay."""
    path = tmp_path_factory.mktemp("traffic") / "mixed.pcap"
    trafficgen.write_pcap(str(path), 2000)
    return path


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is a failing test here: CI runs as root and must run everything."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"FAILED: {skipped} test(s) skipped; every test must run", red=True)
        session.exitstatus = 1
