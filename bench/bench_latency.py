#!/usr/bin/env python3
"""Latency benchmark: from the wire to the receiver's output, at 10 pps, 1 kpps and 100 kpps.

A real pipeline on one machine: tcpreplay sends small UDP frames from a namespace over a veth
pair; ``pktstream sensor -i <outer end>`` streams them to ``pktstream receiver -w -`` on
127.0.0.1, whose pcap stream on stdout this script reads. For every packet read it takes
arrival (``time.time_ns()`` when the chunk holding it was read) minus the packet's capture
timestamp (the kernel's, CLOCK_REALTIME, taken when the veth delivered it, i.e. when it was
sent): the time a packet spends between the wire and the receiver's output.

Next to it, with ``--tcpdump``: ``tcpdump -U -w -`` on the same interface (packet-buffered
pcap on stdout), the same measure for a local capturer. Also reported: CPU seconds (user+sys,
from /proc, 10 ms ticks) of the sensor, the receiver and tcpdump during each case, and over
``--idle`` seconds with no traffic (there also ``perf stat -e task-clock``, exact, when perf is
installed); RSS after the idle period and the peak RSS (VmHWM) at the end.

Run as root:  .venv/bin/python bench/bench_latency.py [--rates 10,1000,100000]
[--seconds 15,5,3] [--idle 10] [--tcpdump] [--sensor-args '--max-wait 0.2'] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bench_stream import cpu_seconds, free_port  # the same helpers (bench/ is on sys.path when run)

from pktstream.lab import traffic
from pktstream.lab.netns import Veth

PY = [sys.executable, "-m", "pktstream"]


def wait_log(path: str, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in open(path, errors="replace").read():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args[:4]}: no {text!r}: {open(path).read()[-2000:]}")


class PcapReader(threading.Thread):
    """Reads a pcap stream from a pipe; records arrival − capture timestamp per packet."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.lat_ns: list[int] = []
        self.count = 0
        self.nano = True
        self.cond = threading.Condition()

    def run(self) -> None:
        buf = b""
        header = False
        while True:
            chunk = os.read(self.fd, 1 << 20)
            now = time.time_ns()
            if not chunk:
                return
            buf += chunk
            pos = 0
            if not header:
                if len(buf) < 24:
                    continue
                magic = struct.unpack_from("<I", buf)[0]
                self.nano = magic == 0xA1B23C4D
                header, pos = True, 24
            lat = []
            mult = 1 if self.nano else 1000
            while len(buf) - pos >= 16:
                sec, frac, caplen, _ = struct.unpack_from("<IIII", buf, pos)
                if len(buf) - pos < 16 + caplen:
                    break
                lat.append(now - (sec * 1_000_000_000 + frac * mult))
                pos += 16 + caplen
            buf = buf[pos:]
            with self.cond:
                self.lat_ns.extend(lat)
                self.count += len(lat)
                self.cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while self.count < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def take(self) -> list[int]:
        with self.cond:
            out, self.lat_ns = self.lat_ns, []
        return out


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of a process, MiB (/proc/PID/status)."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def perf_task_clock(pid: int, seconds: float) -> subprocess.Popen:
    """``perf stat -e task-clock`` on a running process for ``seconds`` (started now)."""
    return subprocess.Popen(["perf", "stat", "-e", "task-clock", "-p", str(pid), "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def task_clock_ms(proc: subprocess.Popen) -> float:
    """The task-clock milliseconds a perf_task_clock() run reported (0 when not counted: the
    process never ran)."""
    m = re.search(r"([\d.,]+)\s+msec task-clock", proc.communicate()[1])
    return float(m.group(1).replace(",", "")) if m else 0.0


def percentiles(values_ns: list[int]) -> dict:
    if not values_ns:
        return {}
    v = sorted(values_ns)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))] / 1e6  # noqa: E731
    return {"n": len(v), "p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99), "max_ms": v[-1] / 1e6}


def replay(veth: Veth, pcap: str, rate: int, loops: int) -> int:
    out = veth.replay(pcap, pps=rate, loop=loops)
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("Actual:")))


def run_cases(veth: Veth, pcaps: dict[int, tuple[str, int]], rates: list[int], seconds: list[float],
              reader: PcapReader, pids: dict[str, int], idle: float) -> dict:
    results: dict = {}
    if idle > 0:
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        perfs = {k: perf_task_clock(p, idle) for k, p in pids.items()} if shutil.which("perf") else {}
        time.sleep(idle)
        results["idle"] = {"seconds": idle, **{f"{k}_cpu_s": cpu_seconds(p) - c0[k] for k, p in pids.items()}}
        for k, proc in perfs.items():  # task-clock: exact, where /proc counts 10 ms ticks
            results["idle"][f"{k}_task_clock_ms"] = task_clock_ms(proc)
        results["idle"]["memory_mib"] = {k: memory_mib(p) for k, p in pids.items()}
    total = reader.count
    for rate, secs in zip(rates, seconds):
        pcap, per_file = pcaps[rate]
        loops = max(1, round(rate * secs / per_file))
        reader.take()
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.monotonic()
        sent = replay(veth, pcap, rate, loops)
        total += sent
        ok = reader.wait_for(total, 30)
        cpu = {k: cpu_seconds(p) - c0[k] for k, p in pids.items()}
        wall = time.monotonic() - t0
        lat = reader.take()
        total = reader.count  # what was read (also anything the kernel dropped is not waited for)
        key = str(rate) if str(rate) not in results else f"{rate}#{len(results)}"  # a rate given twice
        results[key] = {"rate": rate, "sent": sent, "received": len(lat), "complete": ok,
                              "seconds": wall, **percentiles(lat), **{f"{k}_cpu_s": v for k, v in cpu.items()},
                              **{f"{k}_cpu_s_per_mpkt": v / max(sent, 1) * 1e6 for k, v in cpu.items()}}
        time.sleep(1.0)  # idle between cases
    results["memory_mib_after"] = {k: memory_mib(p) for k, p in pids.items()}  # VmHWM: the peak
    return results


def run_pktstream(veth: Veth, pcaps: dict, args, work: str) -> dict:
    port = free_port()
    rlog, slog = os.path.join(work, "rx.log"), os.path.join(work, "sx.log")
    sjson = os.path.join(work, "sx.json")
    rx = subprocess.Popen([*PY, "receiver", "--listen", f"127.0.0.1:{port}", "-w", "-"],
                          stdout=subprocess.PIPE, stderr=open(rlog, "w"))
    sx = None
    try:
        wait_log(rlog, "listening on", rx)
        reader = PcapReader(rx.stdout.fileno())
        reader.start()
        sx = subprocess.Popen([*PY, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer,
                               "--stats-json", sjson, "--spool-dir", os.path.join(work, "spool"),
                               *shlex.split(args.sensor_args)], stderr=open(slog, "w"))
        wait_log(slog, "connected to receiver", sx)
        time.sleep(1.0)  # past the start-up work (first imports, handshake)
        res = run_cases(veth, pcaps, args.rate_list, args.seconds_list, reader,
                        {"sensor": sx.pid, "receiver": rx.pid}, args.idle)
    finally:
        for p in (sx, rx):
            if p is not None:
                p.terminate()
                p.wait(60)
    st = json.load(open(sjson))
    res["sensor_stats"] = {k: st.get(k) for k in ("packets", "kernel_dropped", "ring_drops",
                                                  "window_dropped_packets", "blocks", "frames_sent")}
    return res


def run_tcpdump(veth: Veth, pcaps: dict, args, work: str) -> dict:
    log = os.path.join(work, "td.log")
    td = subprocess.Popen(["tcpdump", "-i", veth.outer, "-B", "32768", "-n", "-U", "-w", "-", "udp"],
                          stdout=subprocess.PIPE, stderr=open(log, "w"))
    try:
        wait_log(log, "listening on", td)
        reader = PcapReader(td.stdout.fileno())
        reader.start()
        time.sleep(0.5)
        res = run_cases(veth, pcaps, args.rate_list, args.seconds_list, reader,
                        {"tcpdump": td.pid}, args.idle)
    finally:
        td.terminate()
        td.wait(60)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="10,1000,100000", help="packets per second, one case each")
    ap.add_argument("--seconds", default="15,5,3", help="seconds of traffic per case (one per rate)")
    ap.add_argument("--size", type=int, default=128, help="frame size in bytes")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds with no traffic, CPU measured (0 = skip)")
    ap.add_argument("--tcpdump", action="store_true", help="also measure tcpdump -U -w - the same way")
    ap.add_argument("--sensor-args", default="", help="extra sensor flags, e.g. '--max-wait 0.2'")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_latency.py needs root (network namespaces, live capture)")
    args.rate_list = [int(r) for r in args.rates.split(",")]
    args.seconds_list = [float(s) for s in args.seconds.split(",")]
    if len(args.seconds_list) != len(args.rate_list):
        sys.exit("--seconds needs one value per rate")
    out: dict = {"args": {k: v for k, v in vars(args).items()}, "load_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="pslat") as work, Veth("lt") as veth:
        pcaps = {}
        for rate, secs in zip(args.rate_list, args.seconds_list):
            n = max(1, min(1000, round(rate * secs)))
            pcaps[rate] = (os.path.join(work, f"udp{rate}.pcap"), n)
            traffic.write_udp_pcap(pcaps[rate][0], n, size=args.size)
        for rep in range(args.repeat):
            runs = {"pktstream": run_pktstream(veth, pcaps, args, work)}
            if args.tcpdump:
                runs["tcpdump"] = run_tcpdump(veth, pcaps, args, work)
            out["runs"].append(runs)
            for name, res in runs.items():
                if "idle" in res:
                    idle = res["idle"]
                    print(f"[{rep}] {name:9} idle {idle['seconds']:.0f} s: " + ", ".join(
                        f"{k[:-6]} {v:.3f} CPU-s" for k, v in idle.items() if k.endswith("_cpu_s")) + "; perf: " +
                        ", ".join(f"{k[:-14]} {v:.1f} ms" for k, v in idle.items() if k.endswith("_task_clock_ms")))
                for who, mem in res.get("idle", {}).get("memory_mib", {}).items():
                    print(f"[{rep}] {name:9} {who} idle RSS {mem['VmRSS']:.0f} MiB (anon {mem['RssAnon']:.0f}, "
                          f"file {mem['RssFile']:.0f})")
                for who, mem in res.get("memory_mib_after", {}).items():
                    print(f"[{rep}] {name:9} {who} peak RSS (VmHWM) {mem['VmHWM']:.0f} MiB")
                for key in [k for k in res if k.split("#")[0].isdigit()]:
                    r, rate = res[key], res[key]["rate"]
                    cpu = ", ".join(f"{k[:-15]} {v:.2f} CPU-s/Mpkt ({r[k[:-9]] / r['seconds'] * 1000:.2f} ms/s)"
                                    for k, v in r.items() if k.endswith("_cpu_s_per_mpkt"))
                    print(f"[{rep}] {name:9} {rate:>7} pps: {r['received']}/{r['sent']} read, latency ms "
                          f"p50 {r.get('p50_ms', float('nan')):.1f} p90 {r.get('p90_ms', float('nan')):.1f} "
                          f"p99 {r.get('p99_ms', float('nan')):.1f} max {r.get('max_ms', float('nan')):.1f}; "
                          f"CPU: {cpu}", flush=True)
    out["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
