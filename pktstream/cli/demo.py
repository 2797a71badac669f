"""``pktstream demo``: a receiver and a sensor on this machine, real traffic, a file, a summary.

It creates a network namespace joined to this one by a veth pair, starts
``pktstream receiver`` (on 127.0.0.1) and ``pktstream sensor`` (on the veth) as separate
processes, drives real traffic across the veth (tcpreplay of a varied packet mix, plus HTTP
requests from this namespace to a web server in the other one), stops the sensor (it flushes
and says goodbye), then the receiver, and prints what happened at every stage. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import cast

from pktstream.lab import traffic
from pktstream.lab.netns import Veth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(proc: subprocess.Popen, log_path: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            if text in f.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log_path, errors="replace") as f:
        raise RuntimeError(f"{cast(list[str], proc.args)[2]} did not report {text!r}:\n{f.read()}")


def _http_traffic(veth: Veth, requests: int) -> int:
    """A real web server in the namespace, real HTTP requests to it; returns requests served."""
    server = subprocess.Popen(veth.in_ns(sys.executable, "-m", "http.server", "8080", "--bind", veth.inner_ip),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    ok = 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((veth.inner_ip, 8080), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        for i in range(requests):
            with urllib.request.urlopen(f"http://{veth.inner_ip}:8080/?demo={i}", timeout=5) as r:
                r.read()
                ok += 1
    finally:
        server.terminate()
        server.wait()
    return ok


def run(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.write or "pktstream-demo.pcapng")
    if os.path.exists(out):
        os.unlink(out)
    py = [sys.executable, "-m", "pktstream"]
    work = tempfile.mkdtemp(prefix="pktstream-demo-")
    port = _free_port()
    procs: list[subprocess.Popen] = []
    try:
        with Veth(prefix="pd") as veth:
            rx_log, sx_log = os.path.join(work, "receiver.log"), os.path.join(work, "sensor.log")
            rx = subprocess.Popen([*py, "receiver", "--listen", f"127.0.0.1:{port}", "-w", out,
                                   "--state-dir", os.path.join(work, "state"),
                                   "--stats-json", os.path.join(work, "receiver.json")],
                                  stdout=subprocess.DEVNULL, stderr=open(rx_log, "w"))
            procs.append(rx)
            _wait_for(rx, rx_log, "listening on")
            sx = subprocess.Popen([*py, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer,
                                   "--sensor-id", "demo-sensor", "--stats-json", os.path.join(work, "sensor.json"),
                                   "--spool-dir", os.path.join(work, "spool")],  # (removed with the work directory)
                                  stdout=subprocess.DEVNULL, stderr=open(sx_log, "w"))
            procs.append(sx)
            _wait_for(sx, sx_log, "connected to receiver")
            print(f"demo: receiver on 127.0.0.1:{port} writing {out}; sensor on {veth.outer} "
                  f"(peer {veth.inner} in namespace {veth.ns})", file=sys.stderr)
            src = os.path.join(work, "mix.pcap")
            traffic.write_pcap(src, args.packets)
            print(f"demo: replaying {args.packets} packets (tcpreplay, {args.pps} pps) and "
                  f"{args.requests} HTTP requests", file=sys.stderr)
            replayed = veth.replay(src, pps=args.pps)
            os.unlink(src)  # the bulk of the work directory
            served = _http_traffic(veth, args.requests)
            time.sleep(0.5)
            sx.terminate()
            sx.wait(60)
            rx.terminate()
            rx.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    sst = json.load(open(os.path.join(work, "sensor.json")))
    rst = json.load(open(os.path.join(work, "receiver.json")))["sensors"].get("demo-sensor", {})
    in_file = _count_packets(out)
    sent = next((line.split()[1] for line in replayed.splitlines() if line.startswith("Actual:")), "?")
    ratio = rst.get("compression_ratio") or 0
    print(f"""
pktstream demo summary
  traffic:   {sent} packets replayed + {served} HTTP requests served (real TCP)
  sensor:    {sst['packets']} packets captured on {veth.outer}
             dropped: kernel {sst['kernel_dropped']}, interface {sst['interface_dropped']}, ring {sst['ring_drops']}, send window {sst['window_dropped_packets']}
  network:   {rst.get('raw_bytes', 0)} bytes of records sent as {rst.get('wire_bytes', 0)} bytes (compression ratio {ratio:.2f})
  receiver:  {rst.get('packets', 0)} packets received, {rst.get('duplicate_frames', 0)} duplicate frames dropped
  file:      {out}: {in_file} packets
  logs:      {work}/receiver.log, {work}/sensor.log (removed when the result is OK)""")
    if shutil.which("capinfos"):
        info = subprocess.run(["capinfos", "-t", "-E", "-c", "-M", out], capture_output=True, text=True)
        print("\n" + info.stdout.strip())
    good = sst["packets"] == rst.get("packets") == in_file and sst["window_dropped_packets"] == 0
    print("\nresult: " + ("OK, every captured packet is in the file" if good else "MISMATCH (see the counters)"))
    if good:  # nothing to look at: leave no work directory behind (a failed run keeps its logs)
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}", file=sys.stderr)
    return 0 if good else 1


def _count_packets(path: str) -> int:
    try:
        import pktstream
        reader = getattr(pktstream, "read", None)
        if reader is not None:
            return sum(len(b) for b in reader(path))
    except Exception:
        pass
    r = subprocess.run(["capinfos", "-M", "-c", "-T", path], capture_output=True, text=True)
    return int(r.stdout.strip().splitlines()[-1].split("\t")[-1]) if r.returncode == 0 else -1


def register(sub) -> None:
    from pktstream.cli import subparser
    p = subparser(sub, "demo", help="receiver + sensor + real traffic on this machine (needs root)",
                  epilog="examples:\n  pktstream demo\n  pktstream demo -w /tmp/demo.pcap --packets 5000")
    p.add_argument("-w", "--write", help="output file (default ./pktstream-demo.pcapng; .pcap also works)")
    p.add_argument("--packets", type=int, default=20000, help="packets to replay (default 20000)")
    p.add_argument("--pps", type=int, default=20000, help="replay rate (default 20000)")
    p.add_argument("--requests", type=int, default=20, help="HTTP requests (default 20)")
    p.set_defaults(func=run)
