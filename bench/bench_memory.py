#!/usr/bin/env python3
"""Sensor memory benchmark (issue 16, item 5): idle RSS and the peak under a top-speed burst.

For each capturer on the same veth pair (tcpreplay sends from a namespace):

* ``pktstream sensor -i <outer end>`` streaming to ``pktstream receiver -w -`` (stdout to
  /dev/null; ``--sensor-args`` adds flags, e.g. ``--buffer-size 32MiB``),
* ``tcpdump -B KiB -w /dev/null`` with the same kernel buffer as the sensor,
* with ``--packetstreamer BIN``: Deepfence PacketStreamer's sensor → its receiver (file), in a
  namespace of its own holding the other veth end (it captures on every interface),

it records /proc/PID/status after ``--idle`` seconds with no traffic (VmRSS, RssAnon, RssFile),
then replays ``--burst`` frames of 1514 bytes (random payload: incompressible) at top speed, and
records the peak (VmHWM) and VmRSS 3 s later and ``--settle`` seconds later (a pktstream ring
gives back blocks unused for 2 s). Loss: the sensor's kernel_dropped, ring_drops and
window_dropped_packets (its --stats-json), tcpdump's "dropped by kernel", PacketStreamer's file.

Run as root:  .venv/bin/python bench/bench_memory.py [--burst 300000] [--idle 10]
[--sensor-args '--buffer-size 8MiB'] [--packetstreamer /tmp/psbuild/packetstreamer]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_latency import memory_mib, wait_log  # noqa: E402
from bench_stream import SensorNamespace, count_pcap, free_port, replay  # noqa: E402

from pktstream.lab import traffic  # noqa: E402
from pktstream.lab.netns import Veth  # noqa: E402

PY = [sys.executable, "-m", "pktstream"]


def measure(pid: int, veth: Veth, pcap: str, loops: int, idle: float, settle: float) -> dict:
    time.sleep(idle)
    out: dict = {"idle": memory_mib(pid)}
    out["sent"], out["pps"] = replay(veth, pcap, 0, loops)
    time.sleep(3.0)
    out["after_3s"] = memory_mib(pid)
    time.sleep(settle)
    out["after_settle"] = memory_mib(pid)
    return out


def run_pktstream(veth: Veth, pcap: str, loops: int, args, work: str, py: list[str] = PY) -> dict:
    port = free_port()
    rlog, slog, sjson = (os.path.join(work, n) for n in ("rx.log", "sx.log", "sx.json"))
    rx = subprocess.Popen([*py, "receiver", "--listen", f"127.0.0.1:{port}", "-w", "-"],
                          stdout=subprocess.DEVNULL, stderr=open(rlog, "w"), cwd="/")
    sx = None
    try:
        wait_log(rlog, "listening on", rx)
        sx = subprocess.Popen([*py, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer,
                               "--stats-json", sjson, "--sensor-id", f"bench-memory-{os.getpid()}",
                               "--spool-dir", os.path.join(work, "spool"), *shlex.split(args.sensor_args)],
                              stderr=open(slog, "w"), cwd="/")  # cwd: never a source tree
        wait_log(slog, "connected to receiver", sx)
        res = measure(sx.pid, veth, pcap, loops, args.idle, args.settle)
        res["receiver_peak"] = memory_mib(rx.pid)["VmHWM"]
    finally:
        for p in (sx, rx):
            if p is not None:
                p.terminate()
                p.wait(60)
    st = json.load(open(sjson))
    res.update({k: st.get(k) for k in ("packets", "kernel_dropped", "ring_drops", "window_dropped_packets")})
    return res


def run_tcpdump(veth: Veth, pcap: str, loops: int, args, work: str) -> dict:
    log = os.path.join(work, "td.log")
    td = subprocess.Popen(["tcpdump", "-i", veth.outer, "-B", str(args.tcpdump_kib), "-n", "-w", "/dev/null"],
                          stderr=open(log, "w"))
    try:
        wait_log(log, "listening on", td)
        res = measure(td.pid, veth, pcap, loops, args.idle, args.settle)
    finally:
        td.terminate()
        td.wait(60)
    text = open(log).read()
    res["packets"] = int(next((ln.split()[0] for ln in text.splitlines() if "packets captured" in ln), "0"))
    res["kernel_dropped"] = int(next((ln.split()[0] for ln in text.splitlines() if "dropped by kernel" in ln), "0"))
    return res


def run_packetstreamer(binary: str, sns: SensorNamespace, pcap: str, loops: int, args, work: str) -> dict:
    port = free_port()
    out = os.path.join(work, "ps.pcap")
    rcfg, scfg = os.path.join(work, "ps-receiver.yaml"), os.path.join(work, "ps-sensor.yaml")
    with open(rcfg, "w") as f:
        f.write(f"input:\n  address: 127.0.0.1\n  port: {port}\noutput:\n  file:\n    path: {out}\n")
    with open(scfg, "w") as f:
        f.write(f"output:\n  server:\n    address: 127.0.0.1\n    port: {port}\npcapMode: all\n")
    rlog, slog = os.path.join(work, "ps-rx.log"), os.path.join(work, "ps-sx.log")
    rx = subprocess.Popen(sns.cmd(binary, "receiver", "--config", rcfg), stdout=open(rlog, "w"),
                          stderr=subprocess.STDOUT)
    sx = None
    try:
        time.sleep(1.0)
        sx = subprocess.Popen(sns.cmd(binary, "sensor", "--config", scfg), stdout=open(slog, "w"),
                              stderr=subprocess.STDOUT)
        time.sleep(2.0)  # no readiness message to wait for
        if sx.poll() is not None or rx.poll() is not None:
            raise RuntimeError(f"PacketStreamer exited: {open(slog).read()[-1000:]} {open(rlog).read()[-1000:]}")
        res = measure(sx.pid, sns.veth, pcap, loops, args.idle, max(args.settle, 5.0))  # its 5 s gather wait
    finally:
        for p in (sx, rx):
            if p is not None:
                p.terminate()
                p.wait(60)
    res["packets"] = count_pcap(out)
    os.unlink(out)
    return res


def show(name: str, r: dict) -> None:
    i, a, s = r["idle"], r["after_3s"], r["after_settle"]
    loss = (f"kernel_dropped {r.get('kernel_dropped')}, ring_drops {r.get('ring_drops', '-')}, "
            f"window_dropped {r.get('window_dropped_packets', '-')}")
    print(f"{name:15} idle RSS {i['VmRSS']:6.1f} MiB (anon {i['RssAnon']:5.1f}, file {i['RssFile']:5.1f}) | "
          f"burst {r['sent']} @ {r['pps']:.0f} pps: peak (VmHWM) {a['VmHWM']:6.1f} MiB, RSS 3 s after "
          f"{a['VmRSS']:6.1f}, {s['VmRSS']:6.1f} later | {r['packets']} packets, {loss}"
          + (f" | receiver peak {r['receiver_peak']:.0f} MiB" if "receiver_peak" in r else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--burst", type=int, default=300000, help="1514-byte frames replayed at top speed")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds without traffic before the idle figure")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after the burst for the last RSS figure")
    ap.add_argument("--sensor-args", action="append", default=None,
                    help="extra sensor flags; repeat for several pktstream cases (e.g. '' and '--buffer-size 32MiB')")
    ap.add_argument("--tcpdump-kib", type=int, default=None, help="tcpdump -B (default: the sensor's default buffer)")
    ap.add_argument("--packetstreamer", metavar="BIN")
    ap.add_argument("--baseline-venv", metavar="VENV",
                    help="also run the sensor of another installation (e.g. the main branch's .venv), default flags")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_memory.py needs root")
    from pktstream.stream.sensor import CaptureOptions
    if args.tcpdump_kib is None:
        args.tcpdump_kib = CaptureOptions().buffer_bytes // 1024
    out: dict = {"load_before": os.getloadavg(), "cases": {}}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in out['load_before'])}", flush=True)
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="psmem"))
        veth = stack.enter_context(Veth(prefix="bm"))
        pcap = os.path.join(work, "random1514.pcap")
        per_file = 20000
        traffic.write_random_udp_pcap(pcap, per_file, size=1514)
        loops = max(1, round(args.burst / per_file))
        for extra in args.sensor_args or [""]:
            args.sensor_args = extra
            name = f"pktstream {extra}".strip()
            out["cases"][name] = r = run_pktstream(veth, pcap, loops, args, work)
            show(name if len(name) < 16 else "pktstream*", r)
            if len(name) >= 16:
                print(f"{'':15} (* = {name})")
        if args.baseline_venv:
            args.sensor_args = ""
            out["cases"]["baseline"] = r = run_pktstream(veth, pcap, loops, args, work,
                                                         [os.path.join(args.baseline_venv, "bin", "python"), "-m",
                                                          "pktstream"])
            show("baseline", r)
            print(f"{'':15} (baseline = the sensor of {args.baseline_venv}, its defaults)")
        out["cases"][f"tcpdump -B {args.tcpdump_kib}"] = r = run_tcpdump(veth, pcap, loops, args, work)
        show(f"tcpdump -B {args.tcpdump_kib}", r)
        if args.packetstreamer:
            sns = stack.enter_context(SensorNamespace(stack.enter_context(Veth(prefix="bq"))))
            out["cases"]["PacketStreamer"] = r = run_packetstreamer(args.packetstreamer, sns, pcap, loops, args, work)
            show("PacketStreamer", r)
    out["load_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in out['load_after'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
