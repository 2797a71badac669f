#!/usr/bin/env python3
"""End-to-end streaming benchmark: sensor → receiver → file on one machine, next to tcpdump.

For each kind of traffic and replay rate (tcpreplay from a namespace onto a veth pair):
  * tcpdump -w alone on the interface (the local baseline);
  * pktstream sensor (CLI) on the interface → pktstream receiver (CLI, 127.0.0.1) → pcap file;
  * with --packetstreamer BIN: Deepfence PacketStreamer's sensor → its receiver → pcap file,
    in a namespace of their own that holds only the capture end of a second veth pair (its
    sensor captures every up interface; it cannot be pointed at one).
Reported: packets offered (tcpreplay), packets in each file, the ratio to tcpdump, the sensor's
CPU seconds per million packets (user+sys from /proc), kernel drops, bytes on the wire vs raw.
Then the receiver's ingest rate with many concurrent (simulated) sensors that replay
pre-recorded DATA frames as fast as the receiver acknowledges them: the same volume of records
(--ingest-mb) for every sensor count, reported as MB/s and as MB per receiver CPU-second
(user+sys from /proc: steadier than wall-clock rates on a shared machine); and the receiver's
memory with --idle-sensors connected, authenticated sensors that only send heartbeats (RSS
before and after, per connection).

Run as root:  .venv/bin/python bench/bench_stream.py [--packets N] [--rates 100000,200000,0]
[--kinds random1514,mixed,udp64] [--packetstreamer /path/to/packetstreamer] [--sensor-args FLAGS ...]
(rate 0 = tcpreplay --topspeed). Prints a table; --json FILE writes the numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

import zstandard

from pktstream.lab import traffic
from pktstream.lab.netns import Veth, wait_link_up
from pktstream.stream import protocol as P

PY = [sys.executable, "-m", "pktstream"]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """user+sys CPU of a process and its threads so far."""
    return sum(user_sys_seconds(pid))


def user_sys_seconds(pid: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of a process and its threads so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, KiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_log(path: str, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in open(path, errors="replace").read():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[:4]}: no {text!r}: {open(path).read()[-2000:]}")


def count_pcap(path: str) -> int:
    import pktstream
    return sum(len(b) for b in pktstream.read(path))


def replay(veth: Veth, pcap: str, rate: int, loops: int) -> tuple[int, float]:
    out = veth.replay(pcap, topspeed=rate == 0, pps=rate or None, loop=loops)
    sent = int(next(line.split()[1] for line in out.splitlines() if line.startswith("Actual:")))
    pps = float(next(line.split()[-2] for line in out.splitlines() if line.strip().startswith("Rated:")))
    return sent, pps


def run_tcpdump(veth: Veth, pcap: str, rate: int, loops: int, work: str) -> dict:
    path = os.path.join(work, "tcpdump.pcap")
    log = os.path.join(work, "tcpdump.log")
    td = subprocess.Popen(["tcpdump", "-i", veth.outer, "-B", "32768", "-w", path], stderr=open(log, "w"))
    wait_log(log, "listening on", td)
    t0 = cpu_seconds(td.pid)
    sent, pps = replay(veth, pcap, rate, loops)
    time.sleep(1.5)
    cpu = cpu_seconds(td.pid) - t0
    td.terminate()
    td.wait()
    text = open(log).read()
    kdrop = int(next((ln.split()[0] for ln in text.splitlines() if "dropped by kernel" in ln), "0"))
    n = count_pcap(path)
    os.unlink(path)
    return {"sent": sent, "pps": pps, "captured": n, "kernel_dropped": kdrop, "cpu_s": cpu}


class SensorNamespace:
    """The outer end of a veth pair moved into a namespace of its own (with only ``lo``), for
    a sensor that captures on every up interface: there it sees nothing but the replay."""

    def __init__(self, veth: Veth) -> None:
        self.veth, self.ns = veth, veth.ns + "s"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        for cmd in (["ip", "link", "set", veth.outer, "netns", self.ns],
                    ["ip", "-n", self.ns, "addr", "add", f"{veth.outer_ip}/24", "dev", veth.outer],
                    ["ip", "-n", self.ns, "link", "set", "lo", "up"],
                    ["ip", "-n", self.ns, "link", "set", veth.outer, "up"]):
            subprocess.run(cmd, check=True)
        wait_link_up(veth.outer, self.ns)
        wait_link_up(veth.inner, veth.ns)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def __enter__(self) -> SensorNamespace:
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)  # the veth goes with it


def run_packetstreamer(binary: str, sns: SensorNamespace, pcap: str, rate: int, loops: int, work: str) -> dict:
    """PacketStreamer's own receiver and sensor, configured as in its README (file output, all
    interfaces, default block size), inside the sensor namespace."""
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
        time.sleep(2.0)  # no readiness message to wait for: give it time to open the interface
        if sx.poll() is not None or rx.poll() is not None:
            raise RuntimeError(f"PacketStreamer exited: {open(slog).read()[-1000:]} {open(rlog).read()[-1000:]}")
        s0, r0 = cpu_seconds(sx.pid), cpu_seconds(rx.pid)
        sent, pps = replay(sns.veth, pcap, rate, loops)
        time.sleep(1.5)
        s_cpu, r_cpu = cpu_seconds(sx.pid) - s0, cpu_seconds(rx.pid) - r0
        time.sleep(5.0)  # gatherMaxWaitSec: its last partial block leaves after 5 s
    finally:
        for p in (sx, rx):
            if p is not None:
                p.terminate()
                p.wait(60)
    n = count_pcap(out)
    os.unlink(out)
    text = open(slog, errors="replace").read() + open(rlog, errors="replace").read()
    return {"sent": sent, "pps": pps, "captured": n, "sensor_cpu_s": s_cpu, "receiver_cpu_s": r_cpu,
            "discard_messages": text.count("Discarding")}


def run_pktstream(veth: Veth, pcap: str, rate: int, loops: int, work: str, extra: str = "") -> dict:
    port = free_port()
    out = os.path.join(work, "rx.pcap")
    rlog, slog = os.path.join(work, "rx.log"), os.path.join(work, "sx.log")
    rjson, sjson = os.path.join(work, "rx.json"), os.path.join(work, "sx.json")
    rx = subprocess.Popen([*PY, "receiver", "--listen", f"127.0.0.1:{port}", "-w", out, "--stats-json", rjson],
                          stderr=open(rlog, "w"))
    wait_log(rlog, "listening on", rx)
    sx = subprocess.Popen([*PY, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer,
                           "--stats-json", sjson, "--spool-dir", os.path.join(work, "spool"), *shlex.split(extra)],
                          stderr=open(slog, "w"))
    try:
        wait_log(slog, "connected to receiver", sx)
        s0, r0 = cpu_seconds(sx.pid), cpu_seconds(rx.pid)
        sent, pps = replay(veth, pcap, rate, loops)
        time.sleep(1.5)
        s_cpu, r_cpu = cpu_seconds(sx.pid) - s0, cpu_seconds(rx.pid) - r0
    finally:
        for p in (sx, rx):
            p.terminate()
            p.wait(60)
    st = json.load(open(sjson))
    rs = json.load(open(rjson))["sensors"][st["sensor_id"]]
    n = count_pcap(out)
    os.unlink(out)
    return {"sent": sent, "pps": pps, "captured": n, "sensor_packets": st["packets"],
            "kernel_dropped": st["kernel_dropped"], "ring_drops": st["ring_drops"],
            "window_dropped": st["window_dropped_packets"], "zstd_level_end": st["zstd_level"],
            "copied_blocks": st.get("copied_blocks"), "connection_failures": st.get("connection_failures"),
            "raw_bytes": rs["raw_bytes"], "wire_bytes": rs["wire_bytes"],
            "sensor_cpu_s": s_cpu, "receiver_cpu_s": r_cpu}


# -- the floor: loopback TCP alone --------------------------------------------------------------

def tcp_floor(gigabytes: float = 1.5) -> dict:
    """CPU of the sending process for ``sendall`` of 1 MiB buffers to a process that only reads:
    what any sensor pays on this machine to move the bytes over loopback TCP."""
    block = memoryview(os.urandom(1 << 20))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        pid = os.fork()
        if pid == 0:  # the reader
            conn, _ = srv.accept()
            buf = memoryview(bytearray(1 << 20))
            while conn.recv_into(buf):
                pass
            os._exit(0)
        with socket.create_connection(srv.getsockname()) as s:
            n = int(gigabytes * 1e9) >> 20
            t0 = time.process_time()
            for _ in range(n):
                s.sendall(block)
            cpu = time.process_time() - t0
        os.waitpid(pid, 0)
    per_gb = cpu / (n * (1 << 20) / 1e9)
    return {"cpu_s_per_GB": per_gb, "cpu_s_per_Mpkt_1514": per_gb * 1.530}


# -- receiver ingest with many simulated sensors -------------------------------------------------

def recorded_frames(pcap: str, block: int = 1 << 20, level: int = 1) -> list[tuple[bytes, int, int]]:
    """(zstd payload, count, raw_len) per 1 MiB block of a real capture."""
    import pktstream
    frames = []
    c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    for batch in pktstream.read(pcap, batch_bytes=block):
        frames.append((c.compress(batch), len(batch), batch.nbytes))
    return frames


async def handshake(port: int, sid: str, key: bytes | None = None):
    """Connect and authenticate as sensor ``sid`` (HMAC proof with ``key`` when given);
    (reader, writer, last_seq)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    snonce = os.urandom(P.NONCE_BYTES)
    w.write(P.encode_json(P.FrameType.HELLO, {"sensor_id": sid, "hostname": sid, "nonce": snonce.hex(),
                                              "interfaces": [{"index": 0, "name": "eth0", "link_type": 1,
                                                              "snaplen": 262144}]}))
    challenge = (await P.read_frame(r)).json()
    rnonce = bytes.fromhex(challenge["nonce"])
    if key is not None:
        assert P.check_proof(P.proof(key, "receiver", snonce, rnonce, sid), challenge["proof"])
    w.write(P.encode_json(P.FrameType.AUTH, {"proof": P.proof(key, "sensor", rnonce, snonce, sid) if key else ""}))
    welcome = await P.read_frame(r)
    assert welcome.type == P.FrameType.WELCOME, welcome.type
    return r, w, welcome.json()["last_seq"]


async def fake_sensor(port: int, sid: str, frames, repeat: int) -> int:
    r, w, seq = await handshake(port, sid)
    packets = 0
    acked = seq
    window = 16
    for _ in range(repeat):
        for payload, count, raw in frames:
            seq += 1
            w.write(P.encode(P.FrameType.DATA, payload, seq=seq, iface=0, count=count, raw_len=raw))
            packets += count
            while seq - acked > window:
                f = await P.read_frame(r, max_payload=1 << 16, max_raw=0)
                if f.type == P.FrameType.ACK:
                    acked = f.seq
            await w.drain()
    while acked < seq:
        f = await P.read_frame(r, max_payload=1 << 16, max_raw=0)
        if f.type == P.FrameType.ACK:
            acked = f.seq
    w.close()
    return packets


def run_ingest(pcap: str, sensors: int, megabytes: float, work: str) -> dict:
    """``sensors`` simulated sensors send ``megabytes`` of records in all (each its share)."""
    frames = recorded_frames(pcap)
    per_pass = sum(r for _, _, r in frames)
    repeat = max(1, round(megabytes * 1e6 / (per_pass * sensors)))
    port = free_port()
    out = os.path.join(work, "ingest.pcapng")
    log = os.path.join(work, "ingest.log")
    cfg = os.path.join(work, "ingest.yaml")
    with open(cfg, "w") as f:  # all simulated sensors connect from 127.0.0.1 at once
        f.write("connectionRate:\n  burst: 10000\n  seconds: 1\n")
    rx = subprocess.Popen([*PY, "receiver", "--config", cfg, "--listen", f"127.0.0.1:{port}", "-w", out,
                           "--max-connections", "1000"], stderr=open(log, "w"))
    wait_log(log, "listening on", rx)

    async def all_sensors():
        return await asyncio.gather(*(fake_sensor(port, f"sim-{i}", frames, repeat) for i in range(sensors)))

    try:
        u0, s0 = user_sys_seconds(rx.pid)
        t0 = time.perf_counter()
        packets = sum(asyncio.run(all_sensors()))
        dt = time.perf_counter() - t0
        u1, s1 = user_sys_seconds(rx.pid)
        cpu = u1 + s1 - u0 - s0
        rss = rss_kib(rx.pid)
    finally:  # stop the receiver we started, also when a simulated sensor failed
        rx.terminate()
        rx.wait(60)
    raw = sum(r for _, _, r in frames) * repeat * sensors
    size = os.path.getsize(out)
    n = count_pcap(out)
    os.unlink(out)
    return {"sensors": sensors, "packets": packets, "in_file": n, "seconds": dt, "pps": packets / dt,
            "MBps_raw": raw / dt / 1e6, "receiver_cpu_s": cpu, "receiver_user_s": u1 - u0,
            "receiver_sys_s": s1 - s0, "MB_per_cpu_s": raw / 1e6 / cpu if cpu else float("nan"),
            "raw_MB": raw / 1e6, "receiver_rss_kib": rss, "file_bytes": size}


def run_idle(sensors: int, work: str) -> dict:
    """RSS of a receiver before and after ``sensors`` authenticated sensors connect and idle
    (heartbeats only)."""
    port = free_port()
    log = os.path.join(work, "idle.log")
    cfg = os.path.join(work, "idle.yaml")
    keyfile = os.path.join(work, "idle.key")
    key = os.urandom(24).hex()
    with open(keyfile, "w") as f:
        f.write(key)
    with open(cfg, "w") as f:
        f.write("connectionRate:\n  burst: 100000\n  seconds: 1\n")
    rx = subprocess.Popen([*PY, "receiver", "--config", cfg, "--listen", f"127.0.0.1:{port}", "-w",
                           os.path.join(work, "idle.pcap"), "--auth-key-file", keyfile,
                           "--max-connections", str(sensors + 10)], stderr=open(log, "w"))
    wait_log(log, "listening on", rx)

    async def hold() -> tuple[int, int, float]:
        before = rss_kib(rx.pid)
        conns = []
        t0 = time.perf_counter()
        for i in range(0, sensors, 100):  # 100 handshakes at a time
            conns += await asyncio.gather(*(handshake(port, f"idle-{j}", key.encode())
                                            for j in range(i, min(i + 100, sensors))))
        dt = time.perf_counter() - t0
        for _, w, _ in conns:  # one heartbeat each: every session is past its handshake
            w.write(P.encode(P.FrameType.HEARTBEAT))
        for r, _, _ in conns:
            assert (await P.read_frame(r, max_payload=1 << 16, max_raw=0)).type == P.FrameType.HEARTBEAT
        after = rss_kib(rx.pid)
        for _, w, _ in conns:
            w.close()
        return before, after, dt

    try:
        before, after, dt = asyncio.run(hold())
    finally:
        rx.terminate()
        rx.wait(60)
    return {"sensors": sensors, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection": (after - before) / sensors, "connect_seconds": dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=20000, help="frames in the replayed file (looped)")
    ap.add_argument("--loops", type=int, default=25, help="tcpreplay --loop")
    ap.add_argument("--rates", default="50000,100000,150000,0", help="pps list; 0 = top speed")
    ap.add_argument("--kinds", default="random1514,mixed,udp64",
                    help="traffic: random1514 (incompressible 1514-byte UDP), mixed (pktstream.lab.traffic's "
                         "varied frames), udp64 (identical 64-byte UDP frames)")
    ap.add_argument("--packetstreamer", metavar="BIN",
                    help="also run Deepfence PacketStreamer (a binary built from its source) side by side")
    ap.add_argument("--ingest-sensors", default="1,16,100", help="simulated sensor counts ('' = skip)")
    ap.add_argument("--ingest-warmup", type=int, default=1,
                    help="unmeasured 1-sensor ingest passes first (page cache first touch on a VM)")
    ap.add_argument("--ingest-mb", type=float, default=2000,
                    help="MB of records per ingest case, shared by its sensors (the same for every count)")
    ap.add_argument("--idle-sensors", type=int, default=1000,
                    help="authenticated idle connections for the receiver memory line (0 = skip)")
    ap.add_argument("--tcp-floor", type=int, default=3, metavar="N",
                    help="times to measure loopback TCP alone (sendall of 1 MiB buffers); 0 = skip")
    ap.add_argument("--sensor-args", action="append", default=None, metavar="FLAGS",
                    help="extra sensor flags, e.g. '--level -1'; repeat to run each setting side by side "
                         "(the first also gets the ratio to tcpdump)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(), "cases": []}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory())
        veth = stack.enter_context(Veth(prefix="bs"))
        sns = None
        if args.packetstreamer:
            sns = stack.enter_context(SensorNamespace(stack.enter_context(Veth(prefix="bp"))))
        for kind in [k for k in args.kinds.split(",") if k]:
            pcap = os.path.join(work, f"{kind}.pcap")
            if kind == "random1514":
                traffic.write_random_udp_pcap(pcap, args.packets, size=1514)
            elif kind == "udp64":
                traffic.write_udp_pcap(pcap, args.packets, 64)
            elif kind == "mixed":
                traffic.write_pcap(pcap, args.packets)
            else:
                ap.error(f"unknown traffic kind {kind!r}")
            for rate in [int(r) for r in args.rates.split(",")]:
                td = run_tcpdump(veth, pcap, rate, args.loops, work)
                variants = args.sensor_args or [""]
                ps = run_pktstream(veth, pcap, rate, args.loops, work, variants[0])
                case = {"traffic": kind, "rate": rate or "top", "tcpdump": td, "pktstream": ps}
                if variants[0]:
                    case["sensor_args"] = variants[0]
                for extra in variants[1:]:
                    v = run_pktstream(veth, pcap, rate, args.loops, work, extra)
                    case.setdefault("variants", []).append({"sensor_args": extra, **v})
                    print(f"{kind:10} rate={rate or 'top':>7}  sensor {extra!r}: file {v['captured']:>8} "
                          f"({v['captured'] / v['sent']:.2%}) kdrop {v['kernel_dropped']} | sensor "
                          f"{v['sensor_cpu_s'] / max(v['sensor_packets'], 1) * 1e6:.2f} CPU-s/Mpkt | "
                          f"wire/raw {v['wire_bytes'] / max(v['raw_bytes'], 1):.3f}", flush=True)
                results["cases"].append(case)
                ratio = ps["captured"] / td["captured"] if td["captured"] else float("nan")
                cpu = ps["sensor_cpu_s"] / max(ps["sensor_packets"], 1) * 1e6
                print(f"{kind:10} rate={rate or 'top':>7}  offered {ps['sent']:>8} @ {ps['pps']:>8.0f} pps | "
                      f"tcpdump {td['captured']:>8} ({td['captured'] / td['sent']:.2%}) | "
                      f"pktstream file {ps['captured']:>8} ({ps['captured'] / ps['sent']:.2%}, "
                      f"{ratio:.3f}x tcpdump) kdrop {ps['kernel_dropped']} wdrop {ps['window_dropped']} | "
                      f"sensor {cpu:.2f} CPU-s/Mpkt, "
                      f"tcpdump {td['cpu_s'] / max(td['captured'], 1) * 1e6:.2f} | "
                      f"wire/raw {ps['wire_bytes'] / max(ps['raw_bytes'], 1):.3f}", flush=True)
                if sns is not None:
                    gs = case["packetstreamer"] = run_packetstreamer(args.packetstreamer, sns, pcap, rate,
                                                                     args.loops, work)
                    gcpu = gs["sensor_cpu_s"] / max(gs["sent"], 1) * 1e6  # per packet offered, as in its report
                    print(f"{'':10} PacketStreamer: offered {gs['sent']:>8} @ {gs['pps']:>8.0f} pps | file "
                          f"{gs['captured']:>8} ({gs['captured'] / gs['sent']:.2%}) | sensor {gcpu:.2f} CPU-s/Mpkt "
                          f"offered | pktstream/PacketStreamer CPU per packet "
                          f"{ps['sensor_cpu_s'] / max(ps['sent'], 1) * 1e6 / gcpu if gcpu else float('nan'):.2f}",
                          flush=True)
        pcap = os.path.join(work, "mixed.pcap")
        if not os.path.exists(pcap):
            traffic.write_pcap(pcap, args.packets)
        big = os.path.join(work, "mixed-big.pcap")
        subprocess.run(["tcpdump", "-r", pcap, "-w", big], capture_output=True, check=True)
        counts = [int(x) for x in args.ingest_sensors.split(",") if x]
        for _ in range(args.ingest_warmup if counts else 0):
            # on a VM the first write of GBs into the page cache pays the hypervisor's first
            # touch of guest memory (measured: copy_folio_from_iter 66 % of the receiver, 12 s
            # of sys time for 2 GB); a pass that is not counted makes every case pay the same
            r = run_ingest(big, 1, args.ingest_mb, work)
            print(f"ingest: warm-up pass (not counted): {r['MB_per_cpu_s']:.0f} MB per CPU-s "
                  f"({r['receiver_user_s']:.2f} user + {r['receiver_sys_s']:.2f} sys)", flush=True)
        for n in counts:
            r = run_ingest(big, n, args.ingest_mb, work)
            results.setdefault("ingest", []).append(r)
            print(f"ingest: {n:>3} simulated sensors: {r['packets']} packets ({r['raw_MB']:.0f} MB) in "
                  f"{r['seconds']:.2f} s = {r['pps']:.0f} pps, {r['MBps_raw']:.0f} MB/s of records, receiver "
                  f"{r['receiver_cpu_s']:.2f} CPU-s ({r['receiver_user_s']:.2f} user + {r['receiver_sys_s']:.2f} sys) "
                  f"= {r['MB_per_cpu_s']:.0f} MB per CPU-s, RSS {r['receiver_rss_kib'] / 1024:.0f} MiB, "
                  f"file has {r['in_file']}, load {os.getloadavg()[0]:.2f}", flush=True)
        if args.idle_sensors:
            r = run_idle(args.idle_sensors, work)
            results["idle"] = r
            print(f"idle: {r['sensors']} authenticated sensors connected in {r['connect_seconds']:.2f} s: receiver "
                  f"RSS {r['rss_before_kib'] / 1024:.1f} -> {r['rss_after_kib'] / 1024:.1f} MiB = "
                  f"{r['kib_per_connection']:.1f} KiB per connection", flush=True)
    for _ in range(args.tcp_floor):
        r = tcp_floor()
        results.setdefault("tcp_floor", []).append(r)
        print(f"loopback TCP alone: {r['cpu_s_per_GB']:.2f} CPU-s per GB sent = {r['cpu_s_per_Mpkt_1514']:.2f} "
              f"CPU-s per million 1514-byte records", flush=True)
    results["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
