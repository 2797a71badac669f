"""Shared fixtures: root check, veth pairs in test-created namespaces, tcpdump, free ports.

Every live test needs root (CAP_NET_RAW/CAP_NET_ADMIN). There is no skip: without root the
tests fail, because CI runs as root and must run everything.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pktstream import traffic as trafficgen
from pktstream.netns import Veth

PKTSTREAM = [sys.executable, "-m", "pktstream"]


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@pytest.fixture(scope="session", autouse=True)
def _require_root_and_tools():
    if os.geteuid() != 0:
        pytest.fail("pktstream's tests need root (network namespaces, live capture); CI runs as root")
    missing = [t for t in ("ip", "tcpdump", "tshark", "capinfos", "tcpreplay") if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing tools {missing}: run the README's test command, which installs them")


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory, monkeypatch):
    """Each test's sensors keep their default spool (and other local state) in a directory of
    their own, not in /var/lib/pktstream: no test sees another's leftovers."""
    monkeypatch.setenv("PKTSTREAM_STATE_DIR", str(tmp_path_factory.mktemp("state")))


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

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr:
                return
            if self.p.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"{self.cmd[:3]} exited {self.p.returncode} before {text!r}:\n{self.stderr}")
            time.sleep(0.02)
        raise AssertionError(f"timeout waiting for {text!r} from {self.cmd[:3]}:\n{self.stderr}")

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


def start_tcpdump(start, iface: str, path: Path, bpf: str = "", ns_cmd: list[str] | None = None) -> Proc:
    """tcpdump with nanosecond stamps and a large buffer, ready when it says it is listening."""
    cmd = [*(ns_cmd or []), "tcpdump", "-i", iface, "-n", "-B", "65536", "--immediate-mode", "--time-stamp-precision=nano",
           "-U", "-w", str(path)]
    if bpf:
        cmd.append(bpf)
    p = start(cmd)
    p.wait_for("listening on")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_pcap_dpkt(path: str | Path) -> list[tuple[int, int, bytes]]:
    """(ts_ns, wirelen, data) per packet of a classic pcap file, parsed here with struct
    (independent of pktstream's readers; both byte orders, µs and ns magic)."""
    import struct
    data = Path(path).read_bytes()
    magic = data[:4]
    order, scale = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
                    b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}[magic]
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, frac, caplen, wirelen = struct.unpack_from(order + "IIII", data, pos)
        out.append((sec * 10**9 + frac * scale, wirelen, data[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    assert pos == len(data), f"{path}: trailing bytes"
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
