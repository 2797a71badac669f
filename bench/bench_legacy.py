#!/usr/bin/env python3
"""PacketStreamer sensors on a pktstream receiver (issue 17).

* Always: S2 block decode speed (``pktstream._s2``) on the frames a real PacketStreamer sensor
  sent (tests/data/packetstreamer/*.stream) and on real-encoder blocks (tests/data/s2/), against
  the speed of writing the records they produce to a pcap file (``FileSink``). The decoder must
  be the faster of the two.
* With ``--packetstreamer BIN`` (root): the acceptance run. An unmodified PacketStreamer sensor
  (BIN, built as bench/README.md says) and a pktstream sensor capture the same veth end in a
  namespace of their own and stream into one pktstream receiver (CLI, ``--output-dir``);
  tcpdump on that interface is the reference. Every packet tcpdump saw must be in each sensor's
  file (PacketStreamer: same bytes and its µs timestamps within 1 ms of tcpdump's).

    .venv/bin/python bench/bench_legacy.py [--packetstreamer /tmp/psbuild/packetstreamer] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from pktstream import _s2
from pktstream._capture import PacketBatch
from pktstream.sinks import FileSink
from pktstream.sinks.base import Source

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def blocks() -> dict[str, list[bytes]]:
    """Named sets of S2 blocks: recorded PacketStreamer frames, real-encoder vectors."""
    frames = []
    for path in sorted((DATA / "packetstreamer").glob("*.stream")):
        data, pos = path.read_bytes(), (64 if path.stem == "auth" else 0)
        while pos < len(data):
            n = struct.unpack_from("<I", data, pos + 4)[0]
            frames.append(data[pos + 8:pos + 8 + n])
            pos += 8 + n
    text = zstandard.ZstdDecompressor().decompress((DATA / "s2" / "vectors.jsonl.zst").read_bytes())
    vec = [json.loads(line) for line in text.splitlines()]
    return {"packetstreamer-frames": frames,
            "packets-encode": [bytes.fromhex(v["block_hex"]) for v in vec
                               if v["name"].startswith("packets") and v["mode"] == "encode"],
            "http-best": [bytes.fromhex(v["block_hex"]) for v in vec
                          if v["name"].startswith("http") and v["mode"] == "best"]}


def decode_speed(name: str, bs: list[bytes], seconds: float, work: str) -> dict:
    raw_total = sum(len(_s2.decode_block(b, 1 << 20)) for b in bs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in bs:
            _s2.decode_block(b, 1 << 20)
        n += 1
    dt = time.perf_counter() - t0
    out = {"set": name, "blocks": len(bs), "decoded_MBps": raw_total * n / dt / 1e6,
           "compressed_MBps": sum(map(len, bs)) * n / dt / 1e6}
    if name == "packetstreamer-frames":  # what the decoded records cost to write as a pcap file
        recs = []
        for b in bs:
            raw = _s2.decode_block(b, 1 << 20)
            _s2.usec_records_to_nsec(raw)
            recs.append(bytes(raw))
        path = os.path.join(work, "w.pcap")
        sink = FileSink(path)
        src = Source("ps", "ps", "packetstreamer", 1, 262144)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for r in recs:
                batch = PacketBatch.from_records(r, link_type=1, snaplen=262144)
                sink.write(src, batch)
                batch.release()
            sink.flush()
            n += 1
        dt = time.perf_counter() - t0
        sink.close()
        out["write_MBps"] = sum(map(len, recs)) * n / dt / 1e6
        os.unlink(path)
    return out


def count_pcap(path: Path) -> list[tuple[int, int, bytes]]:
    data, pos, out = path.read_bytes(), 24, []
    scale = 1 if data[:4] == b"\x4d\x3c\xb2\xa1" else 1000
    while pos + 16 <= len(data):
        sec, frac, caplen, wire = struct.unpack_from("<IIII", data, pos)
        out.append((sec * 10**9 + frac * scale, wire, data[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    return out


def live(binary: str, frames: int, rate: int, work: str, tls: bool = False) -> dict:
    """PacketStreamer + pktstream sensors → one pktstream receiver, tcpdump as the reference;
    ``tls``: the receiver serves TLS (a self-signed certificate), both sensors use it."""
    from pktstream.lab import traffic
    from pktstream.lab.netns import Veth, wait_link_up
    pcap = os.path.join(work, "mixed.pcap")
    traffic.write_pcap(pcap, frames)
    veth = Veth("bl")
    sns = veth.ns + "s"
    procs: list[subprocess.Popen] = []
    ns = ["ip", "netns", "exec", sns]
    try:
        subprocess.run(["ip", "netns", "add", sns], check=True)
        for cmd in ([*ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                    [*ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
                    ["ip", "link", "set", veth.outer, "netns", sns],
                    ["ip", "-n", sns, "link", "set", "lo", "up"], ["ip", "-n", sns, "link", "set", veth.outer, "up"]):
            subprocess.run(cmd, check=True)
        wait_link_up(veth.outer, sns)
        wait_link_up(veth.inner, veth.ns)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out, ref = Path(work) / "out", Path(work) / "ref.pcap"
        rlog = open(os.path.join(work, "rx.log"), "w+")
        rx_tls: list[str] = []
        ps_tls = sx_tls = ""
        if tls:  # upstream's sensor wants a certificate and key of its own too (never checked)
            cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                            "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                           check=True, capture_output=True)
            rx_tls = ["--tls-cert", cert, "--tls-key", key]
            ps_tls = f"tls:\n  enable: true\n  certfile: {cert}\n  keyfile: {key}\n"
            sx_tls = cert
        rx = subprocess.Popen([*ns, sys.executable, "-m", "pktstream", "receiver", "--listen", f"127.0.0.1:{port}",
                               *rx_tls,
                               "--output-dir", str(out), "--format", "pcap", "--stats-interval", "0.2",
                               "--packetstreamer-id", "127.0.0.1=packetstreamer-1"], stderr=rlog)
        procs.append(rx)

        def log_has(text: str, what: str, timeout: float = 60) -> None:
            end = time.monotonic() + timeout
            while text not in open(rlog.name).read():
                if time.monotonic() > end or rx.poll() is not None:
                    raise RuntimeError(f"receiver: no {what}: {open(rlog.name).read()[-2000:]}")
                time.sleep(0.1)
        log_has("listening on", "listening")
        td = subprocess.Popen([*ns, "tcpdump", "-i", veth.outer, "-B", "32768", "--immediate-mode", "-U", "-w",
                               str(ref)], stderr=subprocess.PIPE, text=True)
        procs.append(td)
        assert "listening on" in td.stderr.readline()
        cfg = os.path.join(work, "ps-sensor.yaml")
        with open(cfg, "w") as f:
            f.write(f"output:\n  server:\n    address: 127.0.0.1\n    port: {port}\npcapMode: all\n{ps_tls}")
        ps = subprocess.Popen([*ns, binary, "sensor", "--config", cfg], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(work, "ps.log"), "w"))
        procs.append(ps)
        # (a PacketStreamer sensor says nothing, on the wire or in its log, until its first block)
        sx = subprocess.Popen([*ns, sys.executable, "-m", "pktstream", "sensor", "--receiver", f"127.0.0.1:{port}",
                               "-i", veth.outer, "--max-wait", "0.1", "--sensor-id", "pktstream-1",
                               "--spool-dir", os.path.join(work, "spool"),
                               *(["--tls", "--tls-ca", sx_tls] if tls else [])],
                              stderr=open(os.path.join(work, "sx.log"), "w"))
        procs.append(sx)
        log_has("sensor pktstream-1", "pktstream sensor")
        time.sleep(2)  # PacketStreamer prints nothing when its capture is open
        veth.replay(pcap, pps=rate)
        want = frames
        end = time.monotonic() + 30
        while len(count_pcap(ref)) < want and time.monotonic() < end:
            time.sleep(0.1)
        td.send_signal(signal.SIGINT)
        td.wait(10)
        reference = count_pcap(ref)

        def counts() -> dict[str, int]:  # the receiver's periodic "sensor ID: N packets, ..." lines
            return {m.group(1): int(m.group(2))
                    for m in re.finditer(r"sensor (\S+): (\d+) packets, ", open(rlog.name).read())}
        end = time.monotonic() + 30  # PacketStreamer's last block leaves after gatherMaxWaitSec (5 s)
        while time.monotonic() < end and not all(counts().get(s, 0) >= len(reference)
                                                  for s in ("packetstreamer-1", "pktstream-1")):
            time.sleep(0.2)
        for p in (ps, sx):
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        rx.send_signal(signal.SIGTERM)
        rx.wait(60)
        files = {s: [p for p in out.rglob("*.pcap") if s in str(p)] for s in ("packetstreamer-1", "pktstream-1")}
        got = {s: [pkt for f in sorted(fs) for pkt in count_pcap(f)] for s, fs in files.items()}
        ps_ok = [g[1:] for g in got["packetstreamer-1"]] == [r[1:] for r in reference] and all(
            abs(g[0] - r[0]) <= 1_000_000 for g, r in zip(got["packetstreamer-1"], reference))
        px_ok = [g[2] for g in got["pktstream-1"]] == [r[2] for r in reference]
        return {"offered": frames, "rate": rate, "tcpdump": len(reference),
                "packetstreamer_in_file": len(got["packetstreamer-1"]), "packetstreamer_identical": ps_ok,
                "pktstream_in_file": len(got["pktstream-1"]), "pktstream_identical": px_ok}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        subprocess.run(["ip", "netns", "del", sns], capture_output=True)
        veth.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="per decode measurement")
    ap.add_argument("--packetstreamer", metavar="BIN", default=os.environ.get("PKTSTREAM_PACKETSTREAMER"),
                    help="also run the live acceptance check with this binary (default: $PKTSTREAM_PACKETSTREAMER)")
    ap.add_argument("--frames", type=int, default=5000, help="live: frames replayed")
    ap.add_argument("--rate", type=int, default=5000, help="live: pps")
    ap.add_argument("--tls", action="store_true", help="live: over TLS (the receiver's self-signed certificate)")
    ap.add_argument("--json", help="write results here (default bench/results/legacy.json)")
    args = ap.parse_args()
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(), "decode": []}
    ok = True
    with tempfile.TemporaryDirectory() as work:
        for name, bs in blocks().items():
            r = decode_speed(name, bs, args.seconds, work)
            results["decode"].append(r)
            extra = ""
            if "write_MBps" in r:
                extra = f" | writing those records to a pcap file: {r['write_MBps']:.0f} MB/s"
                ok &= r["decoded_MBps"] > r["write_MBps"]
            print(f"S2 decode {name:22} {r['blocks']:3} blocks: {r['decoded_MBps']:7.0f} MB/s decoded "
                  f"({r['compressed_MBps']:.0f} MB/s compressed in){extra}", flush=True)
        if args.packetstreamer:
            r = results["live"] = live(os.path.abspath(args.packetstreamer), args.frames, args.rate, work, args.tls)
            tls = " (TLS)" if args.tls else ""
            print(f"live{tls}: {r['offered']} frames at {r['rate']} pps; tcpdump {r['tcpdump']}; PacketStreamer sensor "
                  f"→ pktstream receiver {r['packetstreamer_in_file']} (identical: {r['packetstreamer_identical']}); "
                  f"pktstream sensor {r['pktstream_in_file']} (identical: {r['pktstream_identical']})", flush=True)
            ok &= r["packetstreamer_identical"] and r["pktstream_identical"] and r["tcpdump"] == r["offered"]
    results["load_after"] = os.getloadavg()
    path = args.json or str(ROOT / "bench" / "results" / "legacy.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
