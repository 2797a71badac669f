#!/usr/bin/env python3
"""Stenographer side by side with the pktstream archive on the same traffic (issue 13, item 6).

Needs root and Debian's ``stenographer`` and ``stenographer-client`` (the package makes its
certificates). Writes ~300 MB of bench_archive's traffic (one rare flow) to a pcap, starts
``stenographer`` as its own user with a private config (port 18456; stenotype on the outer end
of a veth pair made here; ``--no_watchdogs``: its watchdog aborts stenotype when traffic
pauses), waits until stenotype's packet socket is bound to the veth (/proc/net/packet), replays
the pcap at 100 kpps, waits until ``stenoread`` returns the rare flow (its files are written
after ``--fileage_sec``), counts what Stenographer kept, then times ``stenoread`` for the rare flow (3 runs),
``tcpdump -r`` over the pcap, and ``pktstream index`` + ``Archive.write`` + ``pktstream query``
(direct and by ``pktstream serve``) on the same pcap, and prints index sizes. Run by
``run_all.py --preset issue13`` (root, Debian packages).
Results: bench/README.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_archive import RARE, T0, make_batches  # noqa: E402

import pktstream  # noqa: E402
from pktstream.formats import open_writer  # noqa: E402
from pktstream.lab.netns import Veth  # noqa: E402

WORK = Path("/tmp/steno")
PORT = 18456


def timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, **kw)
    return time.perf_counter() - t


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def packet_socket_on(ifname: str) -> bool:
    """Whether a packet socket is bound to ``ifname`` (/proc/net/packet: stenotype has started
    capturing; nothing else binds the veth made here)."""
    ifindex = Path(f"/sys/class/net/{ifname}/ifindex").read_text().strip()
    rows = Path("/proc/net/packet").read_text().splitlines()[1:]
    return any(r.split()[4] == ifindex for r in rows if len(r.split()) > 4)


def wait_for(what: str, ready, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``ready()`` every 0.2 s until it holds; exit with a message naming ``what`` when
    ``timeout_s`` passes or ``proc`` ends first (a bound, not a timing: the event is ``ready``)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            sys.exit(f"steno_side_by_side: stenographer exited ({proc.returncode}) before {what}; "
                     f"see {WORK / 'steno.log'}")
        if time.monotonic() > deadline:
            sys.exit(f"steno_side_by_side: no {what} within {timeout_s:.0f} s; see {WORK / 'steno.log'}")
        time.sleep(0.2)


def du(d: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in d.rglob(pattern) if f.is_file())


def ensure_stenographer() -> None:
    """Install Debian's stenographer (and its client) when it is missing (root): the package
    creates its user and certificates."""
    if shutil.which("stenoread") and shutil.which("stenotype"):
        return
    if os.geteuid() != 0:
        sys.exit("steno_side_by_side: needs root and Debian's stenographer (apt-get install stenographer "
                 "stenographer-client)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("installing stenographer (apt-get) ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "stenographer", "stenographer-client"], check=True, env=env)


def main() -> int:
    ensure_stenographer()
    WORK.mkdir(exist_ok=True)
    for x in ("thread0", "arc", "out.pcap", "all.pcap"):
        shutil.rmtree(WORK / x, ignore_errors=True)
    pcap = WORK / "traffic.pcap"
    if not pcap.exists():
        with open_writer(str(pcap)) as w:
            for b in make_batches(1, 300_000_000, T0, 600 * 10**9, rare_at=0.5):
                w.write(b)
    print("pcap bytes", pcap.stat().st_size, flush=True)
    query = f"host {RARE[0]} and port {RARE[1]}"
    with Veth() as v:
        for d in ("thread0", "thread0/packets", "thread0/index"):
            (WORK / d).mkdir(exist_ok=True)
            shutil.chown(WORK / d, "stenographer", "stenographer")
        cfg = {"Threads": [{"PacketsDirectory": str(WORK / "thread0/packets"),
                            "IndexDirectory": str(WORK / "thread0/index"),
                            "MaxDirectoryFiles": 30000, "DiskFreePercentage": 1}],
               "StenotypePath": "/usr/sbin/stenotype", "Interface": v.outer, "Port": PORT, "Host": "127.0.0.1",
               "Flags": ["--fileage_sec=5", "--blockage_sec=1", "--no_watchdogs"],
               "CertPath": "/etc/stenographer/certs"}
        (WORK / "config").write_text(json.dumps(cfg))
        os.chmod(WORK, 0o755)
        os.chmod(WORK / "config", 0o644)
        with open(WORK / "steno.log", "w") as log:
            p = subprocess.Popen(["runuser", "-u", "stenographer", "--", "stenographer", "-config",
                                  str(WORK / "config"), "-syslog=false", "-v", "1"],
                                 stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for("stenotype capturing on " + v.outer, lambda: packet_socket_on(v.outer), 120, p)
                print("replay", v.replay(pcap, pps=100000)[-120:], flush=True)
                env = {**os.environ, "STENOGRAPHER_CONFIG": str(WORK / "config")}
                expect = sum(len(b) for b in pktstream.read(pcap, bpf=query))

                def rare_flow_found() -> bool:  # stenotype writes its files after --fileage_sec
                    r = subprocess.run(["stenoread", query, "-w", str(WORK / "out.pcap")], env=env,
                                       capture_output=True)
                    return r.returncode == 0 and sum(len(b) for b in pktstream.read(WORK / "out.pcap")) == expect

                t = time.monotonic()
                wait_for(f"answer with the rare flow's {expect} packets from stenoread", rare_flow_found, 180, p)
                print(f"stenoread found the rare flow {time.monotonic() - t:.1f} s after the replay", flush=True)
                for i in range(3):
                    dt = timed(["stenoread", query, "-w", str(WORK / "out.pcap")], env=env)
                    n = sum(len(b) for b in pktstream.read(WORK / "out.pcap"))
                    print(f"stenoread run {i}: {dt:.3f} s, {n} packets", flush=True)
                # every replayed packet in stenographer's files? (what it kept, not only the rare flow)
                r = subprocess.run(["stenoread", "after 1h ago", "-w", str(WORK / "all.pcap")], env=env,
                                   capture_output=True)
                kept = sum(len(b) for b in pktstream.read(WORK / "all.pcap")) if r.returncode == 0 else -1
                print(f"stenographer kept {kept} of {sum(len(b) for b in pktstream.read(pcap))} packets", flush=True)
            finally:
                tree = descendants(p.pid)  # stenographer leaves its stenotype running when stopped
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                for pid in tree:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
    print(f"tcpdump -r: {timed(['tcpdump', '-r', str(pcap), '-w', str(WORK / 'td.pcap'), query]):.3f} s")
    print("stenographer packet files", du(WORK / "thread0/packets"), "index", du(WORK / "thread0/index"))
    arc = WORK / "arc"
    arc.mkdir()
    shutil.copy(pcap, arc / "traffic.pcap")
    t = time.perf_counter()
    a = pktstream.Archive(str(arc))
    a.index()
    print(f"pktstream index: {time.perf_counter() - t:.2f} s")
    for _ in range(3):
        t = time.perf_counter()
        st = a.write(str(WORK / "pq.pcapng"), query)
        print(f"Archive.write {time.perf_counter() - t:.3f} s, {st.packets} packets")
    for _ in range(2):
        dt = timed([sys.executable, "-m", "pktstream", "query", str(arc), *query.split(), "-w", str(WORK / "q.pcapng")])
        print(f"pktstream query (CLI) {dt:.3f} s")
    srv = subprocess.Popen([sys.executable, "-m", "pktstream", "serve", str(arc)], stderr=subprocess.PIPE, text=True)
    try:  # like stenoread -> stenod: a client asking a resident server
        assert "answering" in srv.stderr.readline()
        for _ in range(3):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pktstream", "query", str(arc), *query.split(), "-w",
                                str(WORK / "qs.pcapng")], capture_output=True, text=True, check=True)
            dt = time.perf_counter() - t
            assert "(by the query server)" in r.stderr, r.stderr  # (not a direct query after all)
            print(f"pktstream query (CLI, by pktstream serve) {dt:.3f} s")
    finally:
        srv.terminate()
        srv.wait(timeout=60)
    print("pktstream index bytes", du(arc / "_index"), "of", pcap.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
