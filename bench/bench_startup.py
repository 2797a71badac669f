#!/usr/bin/env python3
"""Start-up benchmark (issue 16, item 2): ``pktstream --version``, ``import pktstream`` and a
sensor's time from start to its first packet at a receiver.

* ``--version``: wall-clock and CPU seconds (user+sys of the child, from ``getrusage``), best
  of ``--repeat`` runs of ``VENV/bin/pktstream --version``.
* ``import pktstream``: ``python -X importtime -c 'import pktstream'``, the cumulative time of
  the package (best of ``--repeat``), and whether numpy, asyncio or importlib.metadata came in.
* first packet (root only): a receiver ``-w -`` is started and ready; then ``pktstream sensor -i lo``
  is started while this script sends a UDP datagram to 127.0.0.1 every 2 ms; the time from
  starting the sensor process to the first packet read from the receiver's stdout (Python
  start-up, imports, interface open, connect, handshake, the first block's sealing).

Run:  .venv/bin/python bench/bench_startup.py [--venv .venv --venv /other/.venv] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

HEAVY = ("numpy", "asyncio", "importlib.metadata")
NEUTRAL = "/"  # the children's working directory: never a source tree (python -c / -m put it first on sys.path)


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def version_cost(venv: str, repeat: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeat):
        c0, t0 = child_cpu(), time.perf_counter()
        subprocess.run([os.path.join(venv, "bin", "pktstream"), "--version"], check=True, capture_output=True,
                       cwd=NEUTRAL)
        walls.append(time.perf_counter() - t0)
        cpus.append(child_cpu() - c0)
    return {"wall_s": min(walls), "cpu_s": min(cpus)}


def import_cost(venv: str, repeat: int) -> dict:
    best, heavy = None, []
    for _ in range(repeat):
        out = subprocess.run([os.path.join(venv, "bin", "python"), "-X", "importtime", "-c", "import pktstream"],
                             check=True, capture_output=True, text=True, cwd=NEUTRAL)
        names, total = set(), 0
        for line in out.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
            if m:
                names.add(m.group(3))
                if m.group(3) == "pktstream":
                    total = int(m.group(1))
        best = total if best is None else min(best, total)
        heavy = sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))
    tops = [h for h in HEAVY if any(n == h or n.startswith(h + ".") for n in heavy)]
    return {"import_pktstream_ms": (best or 0) / 1000, "heavy_modules": tops}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_packet(venv: str) -> dict:
    """Seconds from starting ``pktstream sensor`` to its first packet on the receiver's stdout."""
    py = os.path.join(venv, "bin", "python")
    port, target = free_port(), free_port()
    rx = subprocess.Popen([py, "-m", "pktstream", "receiver", "--listen", f"127.0.0.1:{port}", "-w", "-"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=NEUTRAL)
    sx = None
    stop = threading.Event()
    try:
        for line in rx.stderr:  # ready when it says so
            if b"listening on" in line:
                break
        threading.Thread(target=lambda: [None for _ in iter(rx.stderr.readline, b"")], daemon=True).start()

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                while not stop.is_set():
                    s.sendto(b"x" * 64, ("127.0.0.1", target))
                    time.sleep(0.002)
        threading.Thread(target=send, daemon=True).start()
        t0 = time.perf_counter()
        sx = subprocess.Popen([py, "-m", "pktstream", "sensor", "--receiver", f"127.0.0.1:{port}", "-i", "lo",
                               "--spool-dir", "", f"udp and dst port {target}"], stderr=subprocess.DEVNULL,
                              cwd=NEUTRAL)
        head = rx.stdout.read(24 + 16)  # pcap header, first record header
        elapsed = time.perf_counter() - t0
        assert len(head) == 40, head
        return {"first_packet_s": elapsed}
    finally:
        stop.set()
        for p in (sx, rx):
            if p is not None:
                p.terminate()
                p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", action="append", help="a venv with pktstream installed (repeatable; default .venv)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    venvs = args.venv or [os.path.dirname(os.path.dirname(sys.executable))]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for venv in venvs:
        v = version_cost(venv, args.repeat)
        i = import_cost(venv, args.repeat)
        line = (f"{venv}: pktstream --version best of {args.repeat}: {v['wall_s'] * 1000:.0f} ms wall, "
                f"{v['cpu_s'] * 1000:.0f} ms CPU | import pktstream {i['import_pktstream_ms']:.0f} ms "
                f"(importtime), heavy modules: {', '.join(i['heavy_modules']) or 'none'}")
        if os.geteuid() == 0:
            fp = [first_packet(venv)["first_packet_s"] for _ in range(args.repeat)]
            line += f" | sensor start → first packet at the receiver: best {min(fp):.2f} s, worst {max(fp):.2f} s"
        print(line, flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
