#!/usr/bin/env python3
"""A live threat detector embedded in a pktstream Receiver: port scans and DNS tunnelling.

What it shows:

- embedding a :class:`pktstream.stream.receiver.Receiver` in a Python program, with a
  :class:`pktstream.sinks.CallbackSink` that gets every ``(Source, PacketBatch)`` as it arrives
  from the sensors (``gate=False``: a slow detector drops and counts batches, it never slows
  the sensors or the monitored hosts);
- working on numpy columns of a whole batch (``pktstream.decode``) instead of per-packet
  Python objects, and reading payload bytes straight out of the batch buffer (DNS names);
- two heuristics, printed as ``ALERT`` lines on stdout while traffic flows:

  * **port scan**: one source sends TCP SYNs (or UDP datagrams) to more than ``--scan-targets``
    distinct (destination, port) pairs within ``--window`` seconds;
  * **DNS tunnelling**: DNS queries whose name is long (``--max-name``), has a long label
    (``--max-label``) or a high-entropy random-looking subdomain, or many distinct subdomains
    of one domain from one source within the window (``--unique-subdomains``).

Run it, then point sensors at it::

    head -c 32 /dev/urandom | base64 > key && chmod 600 key        # copied to each sensor host
    python examples/detector.py --listen 0.0.0.0:8081 --auth-key-file key
    pktstream sensor --receiver DETECTOR_HOST:8081 -i eth0 --auth-key-file key   # on each monitored host

or, for a single machine, let it start a sensor itself: ``python examples/detector.py -i eth0``.
It also keeps a copy of the traffic with ``-w FILE`` (any pktstream output format). Stop it
with Ctrl-C (or ``--duration``): it prints the receiver's counters, including batches it had to
drop because the detector fell behind.
"""
from __future__ import annotations

import argparse
import collections
import math
import signal
import sys
import threading
import time

import numpy as np

import pktstream
from pktstream.exceptions import ConfigError
from pktstream.sinks import CallbackSink, FileSink, Source
from pktstream.stream.receiver import Receiver, Security

TCP, UDP = 6, 17
SYN, ACK = 0x02, 0x10


def entropy(text: str) -> float:
    """Shannon entropy of a string in bits per character."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(text).values())


def dns_qname(buf: memoryview, start: int, end: int) -> str | None:
    """The first question name of a DNS message in ``buf[start:end]`` (None when malformed)."""
    if end - start < 17:  # 12-byte header + at least a root label and QTYPE/QCLASS
        return None
    if int.from_bytes(buf[start + 4:start + 6], "big") < 1:  # QDCOUNT
        return None
    pos, labels, total = start + 12, [], 0
    while pos < end:
        n = buf[pos]
        if n == 0:
            return ".".join(labels).lower() if labels else "."
        if n > 63 or pos + 1 + n > end:  # compression pointers do not occur in the question
            return None
        total += n + 1
        if total > 255:
            return None
        labels.append(bytes(buf[pos + 1:pos + 1 + n]).decode("ascii", "replace"))
        pos += 1 + n
    return None


def split_domain(name: str) -> tuple[str, str]:
    """(subdomain, registered domain): the last two labels are taken as the domain."""
    labels = name.split(".")
    if len(labels) <= 2:
        return "", name
    return ".".join(labels[:-2]), ".".join(labels[-2:])


class Detector:
    """Keeps a sliding window of what each source did and prints alerts.

    Thread safety: ``on_batch`` is called from the receiver's sink thread only.
    """

    def __init__(self, *, window: float = 10.0, scan_targets: int = 30, max_name: int = 60,
                 max_label: int = 40, min_entropy: float = 3.6, entropy_len: int = 16,
                 unique_subdomains: int = 20, out=sys.stdout) -> None:
        self.window_ns = int(window * 1e9)
        self.scan_targets = scan_targets
        self.max_name, self.max_label = max_name, max_label
        self.min_entropy, self.entropy_len = min_entropy, entropy_len
        self.unique_subdomains = unique_subdomains
        self.out = out
        self.scan: dict[str, dict[tuple[str, int, int], int]] = collections.defaultdict(dict)
        self.subdomains: dict[tuple[str, str], dict[str, int]] = collections.defaultdict(dict)
        self.last_alert: dict[tuple, int] = {}
        self.packets = self.batches = self.dns_queries = self.alerts = 0

    # -- output ----------------------------------------------------------------------------
    def alert(self, kind: str, key: tuple, ts_ns: int, text: str) -> None:
        """Print one alert, at most once per (kind, key) and window."""
        k = (kind, *key)
        last = self.last_alert.get(k)
        if last is not None and ts_ns - last < self.window_ns:
            return
        self.last_alert[k] = ts_ns
        self.alerts += 1
        when = time.strftime("%H:%M:%S", time.localtime(ts_ns // 10**9)) + f".{ts_ns % 10**9 // 10**6:03d}"
        print(f"ALERT {kind} {when} {text}", file=self.out, flush=True)

    # -- per batch -------------------------------------------------------------------------
    def on_batch(self, source: Source, batch: pktstream.PacketBatch) -> None:
        d = pktstream.decode(batch)
        self.batches += 1
        self.packets += len(d)
        if not len(d):
            return
        self._port_scan(source, d)
        self._dns(source, batch, d)

    def _port_scan(self, source: Source, d) -> None:
        # candidates: TCP SYN without ACK (connection attempts) and UDP to anything but DNS
        tcp_syn = (d.proto == TCP) & ((d.tcp_flags & (SYN | ACK)) == SYN)
        udp = (d.proto == UDP) & (d.dport != 53) & (d.sport != 53) & ~d.frag
        idx = np.flatnonzero((tcp_syn | udp) & (d.ip_version > 0) & ~d.truncated)
        if not len(idx):
            return
        # one row per distinct (src, dst, dport, proto) in this batch, with its last timestamp
        key = np.zeros((len(idx), 35), dtype=np.uint8)
        key[:, :16] = d.src[idx]
        key[:, 16:32] = d.dst[idx]
        key[:, 32:34] = d.dport[idx].astype(">u2").view(np.uint8).reshape(-1, 2)
        key[:, 34] = d.proto[idx]
        _, first = np.unique(key.view("V35").ravel(), return_index=True)
        src_text = d.addresses("src")
        dst_text = d.addresses("dst")
        ts = d.ts_ns
        touched = set()
        for j in first.tolist():
            i = int(idx[j])
            src = src_text[i]
            self.scan[src][(dst_text[i], int(d.dport[i]), int(d.proto[i]))] = int(ts[i])
            touched.add(src)
        now = int(ts.max())
        for src in touched:
            targets = self.scan[src]
            for k in [k for k, t in targets.items() if now - t > self.window_ns]:
                del targets[k]
            if len(targets) > self.scan_targets:
                hosts = sorted({k[0] for k in targets})
                ports = sorted({k[1] for k in targets})
                shown = ",".join(map(str, ports[:8])) + (",..." if len(ports) > 8 else "")
                self.alert("port-scan", (src,), now,
                           f"src={src} targets={len(targets)} hosts={len(hosts)} ports={len(ports)} "
                           f"[{shown}] within {self.window_ns / 1e9:g}s (sensor {source.sensor_id})")

    def _dns(self, source: Source, batch, d) -> None:
        q = np.flatnonzero((d.proto == UDP) & (d.dport == 53) & (d.payload_offset >= 0) & ~d.truncated)
        if not len(q):
            return
        buf = memoryview(batch).cast("B")
        src_text = d.addresses("src")
        for i in q.tolist():
            start = int(batch.offset[i]) + int(d.payload_offset[i])
            end = int(batch.offset[i]) + min(int(d.caplen[i]), int(d.payload_offset[i]) + max(int(d.payload_len[i]), 0))
            name = dns_qname(buf, start, end)
            if name is None:
                continue
            self.dns_queries += 1
            src, ts = src_text[i], int(d.ts_ns[i])
            sub, domain = split_domain(name)
            reasons = []
            if len(name) > self.max_name:
                reasons.append(f"name length {len(name)}")
            longest = max((len(x) for x in name.split(".")), default=0)
            if longest > self.max_label:
                reasons.append(f"label length {longest}")
            flat = sub.replace(".", "")
            if len(flat) >= self.entropy_len and entropy(flat) >= self.min_entropy:
                reasons.append(f"subdomain entropy {entropy(flat):.2f} bits/char")
            seen = self.subdomains[(src, domain)]
            if sub:
                seen[sub] = ts
            for k in [k for k, t in seen.items() if ts - t > self.window_ns]:
                del seen[k]
            if len(seen) > self.unique_subdomains:
                reasons.append(f"{len(seen)} distinct subdomains within {self.window_ns / 1e9:g}s")
            if reasons:
                self.alert("dns-tunnel", (src, domain), ts,
                           f"src={src} domain={domain} qname={name[:80]} reason={'; '.join(reasons)} "
                           f"(sensor {source.sensor_id})")
        buf.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:8081", help="receiver address (default 127.0.0.1:8081)")
    p.add_argument("-i", "--interface", action="append",
                   help="also run a sensor in this process on IFACE (repeat); default: only receive")
    p.add_argument("-w", "--write", metavar="FILE", help="also write everything received to FILE")
    p.add_argument("--auth-key-file", metavar="FILE", help="shared key the sensors must prove")
    p.add_argument("--window", type=float, default=10.0, help="sliding window in seconds (default 10)")
    p.add_argument("--scan-targets", type=int, default=30,
                   help="distinct (host, port) pairs from one source that make a scan (default 30)")
    p.add_argument("--max-name", type=int, default=60, help="longest normal DNS name (default 60)")
    p.add_argument("--max-label", type=int, default=40, help="longest normal DNS label (default 40)")
    p.add_argument("--min-entropy", type=float, default=3.6,
                   help="bits/char above which a subdomain of 16+ chars looks random (default 3.6)")
    p.add_argument("--unique-subdomains", type=int, default=20,
                   help="distinct subdomains of one domain from one source per window (default 20)")
    p.add_argument("--report", type=float, default=0, metavar="SEC",
                   help="print the detector's counters on stderr every SEC seconds (default: only at exit)")
    p.add_argument("--duration", type=float, help="stop after SEC seconds (default: until Ctrl-C)")
    args = p.parse_args(argv)

    det = Detector(window=args.window, scan_targets=args.scan_targets, max_name=args.max_name,
                   max_label=args.max_label, min_entropy=args.min_entropy,
                   unique_subdomains=args.unique_subdomains)
    outputs = [CallbackSink(det.on_batch, gate=False)]
    if args.write:
        outputs.append(FileSink(args.write))
    key = None
    if args.auth_key_file:
        with open(args.auth_key_file) as f:
            key = f.read().strip()
    try:
        rx = Receiver(listen=args.listen, outputs=outputs, security=Security(auth_key=key)).start()
    except (ConfigError, OSError) as exc:  # e.g. beyond loopback without --auth-key-file, a port in use
        print(f"detector: {exc}", file=sys.stderr)
        return 1
    host, port = rx.address
    print(f"detector: receiver listening on {host}:{port}", file=sys.stderr, flush=True)
    sensor = None
    if args.interface:
        from pktstream.stream.sensor import CaptureOptions, Sensor, SensorSecurity
        sensor = Sensor(f"127.0.0.1:{port}", args.interface, capture=CaptureOptions(max_wait=0.2),
                        security=SensorSecurity(auth_key=key)).start()
        print(f"detector: sensor on {', '.join(args.interface)}", file=sys.stderr, flush=True)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    if args.report > 0:
        def report() -> None:
            while not done.wait(args.report):
                print(f"detector: packets={det.packets} batches={det.batches} dns_queries={det.dns_queries} "
                      f"alerts={det.alerts}", file=sys.stderr, flush=True)
        threading.Thread(target=report, daemon=True).start()
    done.wait(args.duration)
    done.set()
    if sensor is not None:
        sensor.stop()
        sensor.join(20)
    rx.stop()
    rx.join(20)
    st = rx.stats()
    dropped = sum(o.get("dropped_packets", 0) for o in st["outputs"].values())
    lost = sum(s["kernel_dropped"] + s["ring_drops"] + s["window_dropped_packets"] for s in st["sensors"].values())
    print(f"detector: {det.packets} packets in {det.batches} batches from {len(st['sensors'])} sensors, "
          f"{det.dns_queries} DNS queries, {det.alerts} alerts; dropped: {dropped} by the detector "
          f"(fell behind), {lost} by the sensors", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
