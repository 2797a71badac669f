"""Reading a large real capture: pktstream vs a C pcap_next_ex loop, tcpdump, pcapy-ng, dpkt, scapy.

Usage (root: the capture is made on a veth pair):  .venv/bin/python bench/bench_read.py [--packets N]

1. Capture: tcpreplay replays pktstream.lab.traffic's multi-protocol frames (--topspeed, looped)
   on a veth pair; tcpdump --time-stamp-precision=nano writes them (>= 1M packets).
2. Read into timestamps + lengths (numpy int64/uint32 arrays, or Python lists for per-packet
   libraries): pktstream.read (memory_map=True: batches are views of the mapped file, and the
   default read() path), C loop over pcap_next_ex (gcc -O2 -lpcap, stores ts/len
   into malloc'ed arrays), tcpdump -r F -w /dev/null, pcapy-ng, dpkt, scapy (RawPcapReader on
   the first 100k packets, extrapolated).
3. Decode 5-tuples (src, dst, sport, dport, proto): pktstream.decode vs dpkt on the first
   200k packets (extrapolated).
Every number comes from the same run; the file is read once before timing (page cache warm).
``--json PATH`` also writes the numbers (and the load average) there.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pktstream  # noqa: E402
from pktstream.lab import traffic  # noqa: E402
from pktstream.lab.netns import Veth  # noqa: E402

C_LOOP = r"""
#include <pcap/pcap.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
int main(int argc, char **argv) {
    char err[PCAP_ERRBUF_SIZE];
    pcap_t *p = pcap_open_offline_with_tstamp_precision(argv[1], PCAP_TSTAMP_PRECISION_NANO, err);
    if (!p) { fprintf(stderr, "%s\n", err); return 1; }
    size_t cap = 1 << 20, n = 0;
    int64_t *ts = malloc(cap * 8); uint32_t *len = malloc(cap * 4);
    struct pcap_pkthdr *h; const u_char *d;
    while (pcap_next_ex(p, &h, &d) == 1) {
        if (n == cap) { cap *= 2; ts = realloc(ts, cap * 8); len = realloc(len, cap * 4); }
        ts[n] = (int64_t)h->ts.tv_sec * 1000000000 + h->ts.tv_usec; len[n++] = h->caplen;
    }
    printf("%zu\n", n); pcap_close(p); return 0;
}
"""


def make_capture(path: Path, packets: int) -> int:
    frames = path.parent / "frames.pcap"
    traffic.write_pcap(str(frames), 2000)
    loops = packets // 2000 + 5
    with Veth("pb") as v:
        td = subprocess.Popen(["tcpdump", "-i", v.outer, "-n", "-B", "262144", "--time-stamp-precision=nano",
                               "-w", str(path)], stderr=subprocess.PIPE)
        while b"listening on" not in td.stderr.readline():
            pass
        v.replay(frames, topspeed=True, loop=loops)
        time.sleep(1)
        td.terminate()
        err = td.communicate()[1].decode()
    print(err.strip(), file=sys.stderr)
    return sum(len(b) for b in pktstream.read(path))


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def best_of(fn, runs: int, who: int = resource.RUSAGE_SELF) -> tuple[float, float, int]:
    """(best wall seconds, best user+sys CPU seconds, result) over ``runs`` runs: on a machine
    shared with other work the best run is the one least disturbed."""
    walls, cpus = [], []
    for _ in range(runs):
        c = cpu_seconds(who)
        t, n = timed(fn)
        walls.append(t)
        cpus.append(cpu_seconds(who) - c)
    return min(walls), min(cpus), n


def run_pktstream(path, memory_map=False):
    ts, cl = [], []
    for b in pktstream.read(path, memory_map=memory_map):
        ts.append(b.ts_ns)
        cl.append(b.caplen)
    ts, cl = np.concatenate(ts), np.concatenate(cl)
    return len(ts)


def run_c(binary, path):
    return int(subprocess.run([binary, str(path)], capture_output=True, text=True, check=True).stdout)


def run_tcpdump(path):
    subprocess.run(["tcpdump", "-r", str(path), "-w", "/dev/null"], capture_output=True, check=True)
    return -1


def run_pcapy(path):
    import pcapy
    r = pcapy.open_offline(str(path))
    ts, cl = [], []
    while True:
        h, _ = r.next()
        if h is None:
            break
        s, us = h.getts()
        ts.append(s * 10**9 + us * 1000)
        cl.append(h.getcaplen())
    return len(ts)


def run_dpkt(path):
    import dpkt
    ts, cl = [], []
    with open(path, "rb") as f:
        for t, buf in dpkt.pcap.Reader(f):
            ts.append(t)
            cl.append(len(buf))
    return len(ts)


def run_scapy(path, limit):
    from scapy.utils import RawPcapReader
    ts, cl = [], []
    for i, (_, meta) in enumerate(RawPcapReader(str(path))):
        if i >= limit:
            break
        ts.append(meta.sec * 10**9 + meta.usec)
        cl.append(meta.caplen)
    return len(ts)


def decode_pktstream(path):
    n = 0
    for b in pktstream.read(path):
        d = pktstream.decode(b)
        n += len(d.src) + 0 * len(d.dport)
    return n


def decode_dpkt(path, limit):
    import dpkt
    out = []
    with open(path, "rb") as f:
        for i, (_, buf) in enumerate(dpkt.pcap.Reader(f)):
            if i >= limit:
                break
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
                l4 = ip.data
                sp = getattr(l4, "sport", 0) if isinstance(l4, (dpkt.tcp.TCP, dpkt.udp.UDP)) else 0
                dp = getattr(l4, "dport", 0) if isinstance(l4, (dpkt.tcp.TCP, dpkt.udp.UDP)) else 0
                out.append((ip.src, ip.dst, sp, dp, ip.p if isinstance(ip, dpkt.ip.IP) else ip.nxt))
            else:
                out.append(None)
    return len(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--file", help="use this capture instead of making one")
    ap.add_argument("--runs", type=int, default=5, help="runs of pktstream.read and the C loop (best is shown)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_read."))
    path = Path(args.file) if args.file else tmp / "big.pcap"
    if not args.file:
        n = make_capture(path, args.packets)
    else:
        n = sum(len(b) for b in pktstream.read(path))
    size = path.stat().st_size
    print(f"file: {n} packets, {size / 1e6:.0f} MB (tcpdump, nanosecond pcap)")
    cbin = tmp / "pcap_loop"
    (tmp / "loop.c").write_text(C_LOOP)
    subprocess.run(["gcc", "-O2", "-o", str(cbin), str(tmp / "loop.c"), "-lpcap"], check=True)
    path.read_bytes()  # warm the page cache
    rows = []
    t_ps, cpu_ps, n_ps = best_of(lambda: run_pktstream(path, memory_map=True), args.runs)
    assert n_ps == n
    rows.append((f"pktstream.read(memory_map=True) -> ts_ns/caplen (best of {args.runs})", t_ps, n))
    t_rd, cpu_rd, n_rd = best_of(lambda: run_pktstream(path, memory_map=False), args.runs)
    assert n_rd == n
    rows.append((f"pktstream.read (default read() path, best of {args.runs})", t_rd, n))
    t_c, cpu_c, k = best_of(lambda: run_c(cbin, path), args.runs, resource.RUSAGE_CHILDREN)
    assert k == n
    rows.append((f"C pcap_next_ex loop (gcc -O2, best of {args.runs})", t_c, n))
    t, _ = timed(lambda: run_tcpdump(path))
    rows.append(("tcpdump -r F -w /dev/null", t, n))
    t, k = timed(lambda: run_pcapy(path))
    rows.append(("pcapy-ng next() loop", t, k))
    t, k = timed(lambda: run_dpkt(path))
    rows.append(("dpkt.pcap.Reader loop", t, k))
    lim = 100_000
    t, k = timed(lambda: run_scapy(path, lim))
    rows.append((f"scapy RawPcapReader (first {lim // 1000}k, extrapolated)", t * n / k, n))
    print(f"\nRead into timestamps + lengths ({n} packets)")
    print(f"{'reader':<52} {'seconds':>8} {'Mpkt/s':>8} {'x slower than pktstream':>24}")
    for name, t, _ in rows:
        print(f"{name:<52} {t:8.3f} {n / t / 1e6:8.2f} {t / t_ps:24.1f}")
    load_read = os.getloadavg()[0]
    print(f"CPU seconds (user+sys, best of {args.runs}): pktstream.read {cpu_ps:.3f} (memory_map=False "
          f"{cpu_rd:.3f}), C loop {cpu_c:.3f} (process start included) = {cpu_c / cpu_ps:.2f}x "
          f"({cpu_c / cpu_rd:.2f}x); wall {t_c / t_ps:.2f}x ({t_c / t_rd:.2f}x); load average {load_read:.2f}")
    t_dec, k = timed(lambda: decode_pktstream(path))
    lim = 200_000
    t_dp, k2 = timed(lambda: decode_dpkt(path, lim))
    t_dp = t_dp * n / k2
    print(f"\nDecode 5-tuples ({n} packets; read included)")
    print(f"{'pktstream.read + pktstream.decode':<52} {t_dec:8.3f} {n / t_dec / 1e6:8.2f} {1.0:24.1f}")
    print(f"{'dpkt Reader + Ethernet/IP/TCP/UDP (first 200k, extrap.)':<52} {t_dp:8.3f} {n / t_dp / 1e6:8.2f} "
          f"{t_dp / t_dec:24.1f}")
    if args.json:
        out = {"time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "packets": n, "file_bytes": size,
               "runs": args.runs, "load_average": load_read,
               "read": [{"reader": name, "seconds": t} for name, t, _ in rows],
               "cpu_seconds": {"pktstream_mmap": cpu_ps, "pktstream_read": cpu_rd, "c_loop": cpu_c},
               "c_loop_over_pktstream": {"wall_mmap": t_c / t_ps, "cpu_mmap": cpu_c / cpu_ps,
                                         "wall_read": t_c / t_rd, "cpu_read": cpu_c / cpu_rd},
               "decode": {"pktstream": t_dec, "dpkt_extrapolated": t_dp}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not args.file:
        path.unlink()


if __name__ == "__main__":
    main()
