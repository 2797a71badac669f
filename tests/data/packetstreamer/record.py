"""Record what an unmodified PacketStreamer sensor sends, and the same traffic seen by tcpdump.

Run as root from the repository root:  .venv/bin/python tests/data/packetstreamer/record.py BIN
(BIN: a PacketStreamer binary built as bench/README.md says). Writes, next to this file,
``<name>.stream`` (the raw TCP byte stream the sensor sent, from its first byte) and
``<name>.pcap.zst`` (tcpdump on the same interface, zstd-compressed: the oracle) for each recording below.

How: a veth pair; one end alone in a namespace of its own (with ``lo``), where the sensor
captures every up interface (so only that end), a recorder listens on 127.0.0.1 (loopback is
not captured) and tcpdump writes the oracle; the other end replays pktstream.lab.traffic frames
with tcpreplay. The sensor is stopped once the recorder holds every packet tcpdump saw.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import zstandard

from pktstream import _s2
from pktstream.lab import traffic
from pktstream.lab.netns import Veth

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "legacy-test-key"
# name: (frames, kind, sensor YAML extra)
RECORDINGS = {
    "plain": (300, "mixed", ""),
    "auth": (200, "mixed", f"auth:\n  enable: true\n  key: {KEY}\n"),
    "large": (150, "udp1514", ""),   # 1514-byte frames: blocks reach compressBlockSize (65 KiB)
}

RECORDER = r'''
import signal, socket, struct, sys
port, out, auth = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(1)
print("listening", flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
conn, _ = srv.accept()
with open(out, "wb", buffering=0) as f:
    if auth:
        hello = b""
        while len(hello) < 64:
            hello += conn.recv(64 - len(hello))
        f.write(hello)
        conn.sendall(b"\xde\xef\xec\xe0\x00")
    while True:
        b = conn.recv(65536)
        if not b:
            break
        f.write(b)
'''


def count_stream(path: str, auth: bool) -> int:
    """Records in the complete frames of a recorded stream."""
    data = open(path, "rb").read()
    pos, n = (64 if auth else 0), 0
    while len(data) - pos >= 8:
        length = struct.unpack_from("<I", data, pos + 4)[0]
        if len(data) - pos - 8 < length:
            break
        n += _s2.usec_records_to_nsec(_s2.decode_block(data[pos + 8:pos + 8 + length], 1 << 24))
        pos += 8 + length
    return n


def count_pcap(path: str) -> int:
    data, pos, n = open(path, "rb").read(), 24, 0
    while len(data) - pos >= 16:
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
        n += 1
    return n


def record(binary: str, name: str, nframes: int, kind: str, extra: str, work: str) -> None:
    pcap = os.path.join(work, f"{name}-traffic.pcap")
    if kind == "mixed":
        traffic.write_pcap(pcap, nframes, seed=17)
    else:
        traffic.write_udp_pcap(pcap, nframes, size=1514)
    stream, oracle = os.path.join(HERE, f"{name}.stream"), os.path.join(work, f"{name}.pcap")
    veth = Veth("pr")
    sns = veth.ns + "s"
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "netns", "add", sns], check=True)
        for cmd in (["ip", "netns", "exec", sns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                    ["ip", "netns", "exec", sns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
                    ["ip", "link", "set", veth.outer, "netns", sns],
                    ["ip", "-n", sns, "link", "set", "lo", "up"],
                    ["ip", "-n", sns, "link", "set", veth.outer, "up"]):
            subprocess.run(cmd, check=True)
        ns = ["ip", "netns", "exec", sns]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rec = subprocess.Popen([*ns, sys.executable, "-c", RECORDER, str(port), stream, "1" if extra else "0"],
                               stdout=subprocess.PIPE, text=True)
        procs.append(rec)
        assert rec.stdout.readline().strip() == "listening"
        dump = subprocess.Popen([*ns, "tcpdump", "-i", veth.outer, "-w", oracle, "-U", "--immediate-mode",
                                 "-s", "65535"],
                                stderr=subprocess.PIPE, text=True)
        procs.append(dump)
        assert "listening on" in dump.stderr.readline()
        cfg = os.path.join(work, f"{name}.yaml")
        with open(cfg, "w") as f:
            f.write(f"output:\n  server:\n    address: 127.0.0.1\n    port: {port}\npcapMode: all\n{extra}")
        log = open(os.path.join(work, f"{name}-sensor.log"), "w")
        sensor = subprocess.Popen([*ns, binary, "sensor", "--config", cfg], stdout=log, stderr=subprocess.STDOUT)
        procs.append(sensor)
        time.sleep(3)  # no readiness message: let it open the interface
        veth.replay(pcap, pps=2000)
        deadline = time.monotonic() + 30
        while count_pcap(oracle) < nframes:  # tcpdump has written every replayed frame
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: tcpdump has {count_pcap(oracle)} of {nframes} packets")
            time.sleep(0.1)
        dump.send_signal(2)
        dump.wait(10)
        want = count_pcap(oracle)
        deadline = time.monotonic() + 30
        while count_stream(stream, bool(extra)) != want:  # its last block leaves after gatherMaxWaitSec
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: recorder has {count_stream(stream, bool(extra))} of {want} packets")
            time.sleep(0.2)
        with open(oracle, "rb") as f, open(os.path.join(HERE, f"{name}.pcap.zst"), "wb") as out:
            out.write(zstandard.ZstdCompressor(level=19).compress(f.read()))
        print(json.dumps({"name": name, "packets": want, "stream_bytes": os.path.getsize(stream)}))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        subprocess.run(["ip", "netns", "del", sns], capture_output=True)
        veth.remove()


def main() -> None:
    binary = os.path.abspath(sys.argv[1])
    names = sys.argv[2:] or list(RECORDINGS)
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            record(binary, name, *RECORDINGS[name], work)


if __name__ == "__main__":
    main()
