#!/usr/bin/env python3
"""Debugging: show the HTTP requests a local server on a given port handled, and its answers.

What it shows: a :class:`pktstream.stream.sensor.Sensor` with a port filter (BPF ``tcp port N``)
streaming to an in-process :class:`pktstream.stream.receiver.Receiver`, whose ``batches()`` iterator
hands each ``(Source, PacketBatch)`` to this script; TCP payloads are located with
``pktstream.decode`` (numpy columns: ports, sequence numbers, payload offsets), put back in
order per connection, and parsed as HTTP/1.x. One line per request (time, client address,
method, target, Host header) and one per response (status, time taken), printed as they
happen, e.g. when the server's logs do not say enough::

    python examples/debug_http.py --port 8080              # a server on this machine (lo)
    python examples/debug_http.py --port 80 -i eth0 --json # JSON lines, for jq or a test

It captures on one interface (``lo`` by default: a client on the same machine; use the
server's external interface for remote clients). Plain HTTP only: TLS payloads cannot be read
(capture before the TLS terminator, e.g. between a proxy and the application). Needs
CAP_NET_RAW (root). The sensor could as well run on the server's host and the receiver
elsewhere: this script keeps both in one process for convenience.
"""
from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import pktstream
from pktstream.stream.receiver import Receiver
from pktstream.stream.sensor import CaptureOptions, DeliveryOptions, Sensor

MAX_BUFFER = 1 << 20  # bytes kept per direction while waiting for the end of a header


@dataclass
class _Stream:
    """One direction of a TCP connection, reassembled in sequence order."""
    next_seq: int | None = None
    data: bytearray = field(default_factory=bytearray)
    pending: dict[int, bytes] = field(default_factory=dict)
    body_left: int = 0          # body bytes of the current message still to skip
    until_close: bool = False   # body delimited by the end of the connection (HTTP/1.0)

    def add(self, seq: int, payload: bytes) -> None:
        if self.next_seq is None:
            self.next_seq = seq
        delta = (seq - self.next_seq) & 0xFFFFFFFF
        if delta >= 0x80000000:  # starts before what we have: a retransmission or an overlap
            skip = (self.next_seq - seq) & 0xFFFFFFFF
            if skip >= len(payload):
                return
            payload, seq = payload[skip:], self.next_seq
        elif delta:
            self.pending[seq] = payload  # a gap: wait for the missing segment
            return
        self.data += payload
        self.next_seq = (seq + len(payload)) & 0xFFFFFFFF
        while self.next_seq in self.pending:
            self.add(self.next_seq, self.pending.pop(self.next_seq))
        if len(self.data) > MAX_BUFFER:
            del self.data[:]


@dataclass
class _Conn:
    client: tuple[str, int]
    server: tuple[str, int]
    up: _Stream = field(default_factory=_Stream)     # client → server
    down: _Stream = field(default_factory=_Stream)   # server → client
    requests: collections.deque = field(default_factory=collections.deque)  # awaiting a response


def _headers(block: bytes) -> tuple[list[str], dict[str, str]]:
    lines = block.decode("iso-8859-1").split("\r\n")
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            hdrs.setdefault(name.strip().lower(), value.strip())
    return lines[0].split(" ", 2), hdrs


def _skip_body(s: _Stream) -> bool:
    """Consume the body still owed by the current message; False while more is needed."""
    if s.until_close:
        del s.data[:]
        return False
    if s.body_left:
        n = min(s.body_left, len(s.data))
        del s.data[:n]
        s.body_left -= n
        return s.body_left == 0
    return True


def _body_length(s: _Stream, hdrs: dict[str, str], *, response: bool, no_body: bool) -> None:
    if no_body:
        return
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        end = s.data.find(b"\r\n0\r\n\r\n")  # last chunk (trailers are not handled)
        s.body_left = end + 7 if end >= 0 else 0
        s.until_close = end < 0 and response
    elif "content-length" in hdrs:
        try:
            s.body_left = max(int(hdrs["content-length"]), 0)
        except ValueError:
            s.until_close = response
    elif response:
        s.until_close = True


class HttpTracker:
    """Turn the TCP packets of one server port into HTTP request/response events."""

    def __init__(self, port: int, emit) -> None:
        self.port = port
        self.emit = emit
        self.conns: dict[tuple, _Conn] = {}

    def on_batch(self, batch: pktstream.PacketBatch) -> None:
        d = pktstream.decode(batch)
        sel = np.flatnonzero((d.proto == 6) & ((d.sport == self.port) | (d.dport == self.port))
                             & (d.l4_offset >= 0))
        if not len(sel):
            return
        buf = memoryview(batch).cast("B")
        src, dst = d.addresses("src"), d.addresses("dst")
        try:
            for i in sel.tolist():
                sport, dport = int(d.sport[i]), int(d.dport[i])
                to_server = dport == self.port
                client = (src[i], sport) if to_server else (dst[i], dport)
                server = (dst[i], dport) if to_server else (src[i], sport)
                key = (client, server)
                flags = int(d.tcp_flags[i])
                conn = self.conns.get(key)
                if conn is None:
                    conn = self.conns[key] = _Conn(client, server)
                stream = conn.up if to_server else conn.down
                seq = int(d.tcp_seq[i])
                if flags & 0x02:  # SYN: data starts at seq + 1
                    stream.next_seq = (seq + 1) & 0xFFFFFFFF
                plen = min(max(int(d.payload_len[i]), 0), int(d.caplen[i]) - int(d.payload_offset[i]))
                if plen > 0:
                    start = int(batch.offset[i]) + int(d.payload_offset[i])
                    stream.add(seq, bytes(buf[start:start + plen]))
                    ts = int(d.ts_ns[i])
                    self._requests(conn, ts) if to_server else self._responses(conn, ts)
                if flags & 0x05:  # FIN or RST: the connection is over (for our purposes)
                    self.conns.pop(key, None)
        finally:
            buf.release()

    def _requests(self, conn: _Conn, ts: int) -> None:
        s = conn.up
        while _skip_body(s):
            end = s.data.find(b"\r\n\r\n")
            if end < 0:
                return
            (method, target, version), hdrs = _parse_head(bytes(s.data[:end]))
            del s.data[:end + 4]
            _body_length(s, hdrs, response=False, no_body=False)
            req = {"ts_ns": ts, "client": f"{conn.client[0]}:{conn.client[1]}",
                   "server": f"{conn.server[0]}:{conn.server[1]}", "method": method, "target": target,
                   "version": version, "host": hdrs.get("host"), "user_agent": hdrs.get("user-agent"),
                   "content_length": int(hdrs["content-length"]) if hdrs.get("content-length", "").isdigit() else None}
            conn.requests.append(req)
            self.emit("request", req)

    def _responses(self, conn: _Conn, ts: int) -> None:
        s = conn.down
        while _skip_body(s):
            end = s.data.find(b"\r\n\r\n")
            if end < 0:
                return
            (version, status, reason), hdrs = _parse_head(bytes(s.data[:end]))
            del s.data[:end + 4]
            code = int(status) if status.isdigit() else 0
            req = conn.requests.popleft() if conn.requests and code >= 200 else None
            no_body = code < 200 or code in (204, 304) or (req is not None and req["method"] == "HEAD")
            _body_length(s, hdrs, response=True, no_body=no_body)
            self.emit("response", {"ts_ns": ts, "client": f"{conn.client[0]}:{conn.client[1]}",
                                   "server": f"{conn.server[0]}:{conn.server[1]}", "version": version,
                                   "status": code, "reason": reason,
                                   "method": req["method"] if req else None, "target": req["target"] if req else None,
                                   "elapsed_ms": round((ts - req["ts_ns"]) / 1e6, 3) if req else None})


def _parse_head(block: bytes) -> tuple[list[str], dict[str, str]]:
    """Start line (3 parts: request or status line) and headers of an HTTP message head."""
    first, hdrs = _headers(block)
    return (first + ["", "", ""])[:3], hdrs


def _clock(ts_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts_ns // 10**9)) + f".{ts_ns % 10**9 // 1000:06d}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8080, help="the HTTP server's TCP port (default 8080)")
    p.add_argument("-i", "--interface", default="lo", help="interface to capture on (default lo)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("-c", "--count", type=int, help="stop after COUNT requests")
    p.add_argument("--duration", type=float, help="stop after SEC seconds (default: Ctrl-C)")
    args = p.parse_args(argv)

    requests = 0
    done = threading.Event()

    def emit(kind: str, ev: dict) -> None:
        nonlocal requests
        if args.json:
            print(json.dumps({"event": kind, **ev}), flush=True)
        elif kind == "request":
            extra = f" ({ev['content_length']} body bytes)" if ev["content_length"] else ""
            print(f"{_clock(ev['ts_ns'])} {ev['client']} -> {ev['server']} {ev['method']} {ev['target']} "
                  f"{ev['version']} Host: {ev['host'] or '-'}{extra}", flush=True)
        else:
            took = f" ({ev['elapsed_ms']:.1f} ms)" if ev["elapsed_ms"] is not None else ""
            print(f"{_clock(ev['ts_ns'])} {ev['client']} <- {ev['server']} {ev['status']} {ev['reason']}{took}",
                  flush=True)
        if kind == "request":
            requests += 1
            if args.count and requests >= args.count:
                done.set()

    rx = Receiver(listen="127.0.0.1:0")
    it = rx.batches()
    rx.start()
    sensor = Sensor(f"127.0.0.1:{rx.address[1]}", [args.interface], bpf=f"tcp port {args.port}",
                    capture=CaptureOptions(immediate=True, max_wait=0.05), sensor_id="debug-http",
                    delivery=DeliveryOptions(spool_dir=None)).start()  # in process: no disk spool left behind
    deadline = time.monotonic() + 20
    while not rx.stats()["sensors"].get("debug-http", {}).get("connected"):
        if time.monotonic() > deadline or not sensor.running:
            why = sensor.error or "not connected after 20 s"
            print(f"debug_http: the sensor did not start: {why} (root? interface name?)", file=sys.stderr)
            rx.stop()
            return 1
        time.sleep(0.02)
    print(f"debug_http: capturing tcp port {args.port} on {args.interface}", file=sys.stderr, flush=True)

    tracker = HttpTracker(args.port, emit)

    def consume() -> None:
        for _source, batch in it:
            if not done.is_set():
                tracker.on_batch(batch)
        done.set()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait(args.duration)
    done.set()
    sensor.stop()
    sensor.join(20)
    rx.stop()
    rx.join(20)
    worker.join(20)
    st = rx.stats()["sensors"].get("debug-http", {})
    print(f"debug_http: {requests} requests; {st.get('packets', 0)} packets captured, dropped: kernel "
          f"{st.get('kernel_dropped', 0)}, ring {st.get('ring_drops', 0)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
