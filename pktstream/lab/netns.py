"""Network namespaces and veth pairs for the demo, the tests and the benchmarks (needs root)."""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

_counter = itertools.count()
# held while a subnet is chosen and assigned, so concurrent runs (tests, demo, benchmarks of
# several users) never pick the same 198.18.<k>.0/24
_LOCK = "/run/pktstream-netns.lock" if os.path.isdir("/run") else "/tmp/pktstream-netns.lock"
# (under the lock) when each subnet was last taken or given back: the least recently used free
# one is taken, so a subnet is used again only after the others -- the root namespace may still
# send to a removed pair's addresses for a while (a closed TCP socket's FIN retries, up to
# ~2 min), and those frames (and the ARP requests before them) would appear on a new pair of
# the same subnet, in another test's captures
_RECENT = _LOCK + ".recent"


def _recent() -> dict[int, float]:
    try:
        with open(_RECENT) as fh:
            data = json.load(fh)
        return {int(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _note_used(subnet: int) -> None:
    """(Under the lock.) Subnet ``subnet`` was taken or given back now."""
    recent = _recent()
    recent[subnet] = time.time()
    tmp = f"{_RECENT}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(recent, fh)
        os.replace(tmp, _RECENT)
    except OSError:  # (only an order of preference: without it, the first free subnet is taken)
        pass


def _subnets_in_use() -> set[int]:
    """Third octets of every 198.18.<k>.x address in the root namespace (where outer ends live)."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], check=True, capture_output=True, text=True).stdout
    used = set()
    for itf in json.loads(out or "[]"):
        for a in itf.get("addr_info", []):
            parts = a.get("local", "").split(".")
            if parts[:2] == ["198", "18"] and len(parts) == 4:
                used.add(int(parts[2]))
    return used


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def wait_link_up(dev: str, ns: str | None = None, timeout_s: float = 30.0) -> None:
    """Wait until ``dev`` (in namespace ``ns``) is operationally up (carrier on).

    ``ip link set DEV up`` returns before the kernel has the link carry frames: link watch
    turns the operational state up and activates the transmit queues later, in a work item
    that waits for the RTNL lock (busy while other namespaces are created or removed), and until
    then a frame sent on it is dropped before any capture sees it, counted nowhere a test looks.
    """
    cmd = ["ip", *(("-n", ns) if ns else ()), "-o", "link", "show", "dev", dev]
    deadline = time.monotonic() + timeout_s
    pause_s = 0.001
    while True:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        if " state UP " in out and "NO-CARRIER" not in out:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dev} not up after {timeout_s:g} s: {out.strip()}")
        time.sleep(pause_s)  # (polling the link's state: there is no event to wait on)
        pause_s = min(pause_s * 2, 0.05)


class Veth:
    """A veth pair: ``outer`` in the root namespace, ``inner`` in namespace ``ns``.

    IPv6 is disabled on both ends so nothing but the test's traffic crosses the link.
    ``offloads=False`` (default :attr:`OFFLOADS`) turns segmentation/receive offloads off with
    ethtool: frames are wire-sized, and a tcpdump oracle's ring holds far more of them.
    outer has 198.18.<k>.1/24, inner 198.18.<k>.2/24, with <k> in 18..217 not used by any other
    address in the root namespace (chosen under a file lock: concurrent runs never share one).
    Both ends are up, carrier on, when the constructor returns (:func:`wait_link_up`).
    """

    OFFLOADS = True  # the default of ``offloads`` (the test suite sets False)

    def __init__(self, prefix: str = "ps", *, offloads: bool | None = None) -> None:
        k = next(_counter)
        tag = f"{os.getpid() % 100000}n{k}"  # "n": pid 12, k 345 and pid 123, k 45 differ
        self.ns = f"{prefix}t{tag}"
        self.outer = f"{prefix}a{tag}"[:15]
        self.inner = f"{prefix}b{tag}"[:15]
        _sh("ip", "netns", "add", self.ns)
        try:
            _sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            _sh("ip", "link", "set", self.inner, "netns", self.ns)
            for dev, run in ((self.outer, ()), (self.inner, ("ip", "netns", "exec", self.ns))):
                _sh(*run, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
            with open(_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, also if this process dies
                used = _subnets_in_use()
                start = (os.getpid() + k) % 200
                free = [18 + (start + i) % 200 for i in range(200) if 18 + (start + i) % 200 not in used]
                if not free:
                    raise RuntimeError("no free 198.18.<k>.0/24 subnet for a veth pair (200 in use)")
                recent = _recent()
                self.subnet = min(free, key=lambda n: recent.get(n, 0.0))  # (the first of equals)
                _note_used(self.subnet)
                self.outer_ip = f"198.18.{self.subnet}.1"
                self.inner_ip = f"198.18.{self.subnet}.2"
                _sh("ip", "addr", "add", f"{self.outer_ip}/24", "dev", self.outer)
            _sh("ip", "-n", self.ns, "addr", "add", f"{self.inner_ip}/24", "dev", self.inner)
            if not (self.OFFLOADS if offloads is None else offloads):
                # no segmentation/receive offloads: frames on the link are what a wire carries
                # (no 64 KiB TSO/GSO aggregates), and libpcap sizes an immediate-mode ring's
                # slots by the MTU instead of 64 KiB: a tcpdump oracle on these ends holds
                # ~30x more packets when the machine stalls it (measured: 909 of a 5,000-packet
                # burst dropped by a stopped tcpdump -B 262144 --immediate-mode, 0 with these off)
                if not shutil.which("ethtool"):
                    raise RuntimeError("ethtool not found (apt-get install ethtool; ./run setup installs it)")
                for dev, run in ((self.outer, ()), (self.inner, ("ip", "netns", "exec", self.ns))):
                    _sh(*run, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off")
            _sh("ip", "link", "set", self.outer, "up")
            _sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            _sh("ip", "-n", self.ns, "link", "set", self.inner, "up")
            wait_link_up(self.outer)
            wait_link_up(self.inner, self.ns)
        except Exception:
            self.remove()
            raise

    def in_ns(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def replay(self, pcap: str | Path, *, pps: int | None = None, loop: int = 1,
               topspeed: bool = False) -> str:
        """Replay a pcap from the inner end (so it arrives on ``outer``); returns tcpreplay's output."""
        rate = ["--topspeed"] if topspeed else [f"--pps={pps or 10000}"]
        out = subprocess.run(self.in_ns("tcpreplay", "-q", "-i", self.inner, *rate,
                                        f"--loop={loop}", str(pcap)),
                             check=True, capture_output=True, text=True)
        return out.stdout + out.stderr

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subnet = getattr(self, "subnet", None)
        if subnet is not None:
            with open(_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                _note_used(subnet)


    def __enter__(self) -> Veth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
