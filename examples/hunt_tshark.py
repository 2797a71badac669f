#!/usr/bin/env python3
"""Threat hunting with tshark, live: ``pktstream receiver -w - | tshark -r -``.

What it shows: a receiver writing one pcap stream on its stdout (logs stay on stderr), fed
into tshark, which dissects every packet the sensors send and prints the ones matching a
Wireshark display filter as they arrive (``-l``: one flushed line per packet). By default it
prints DNS queries, HTTP requests and TLS server names (SNI), i.e. who talks to what::

    head -c 32 /dev/urandom | base64 > key && chmod 600 key    # copied to each sensor host
    python examples/hunt_tshark.py --listen 0.0.0.0:8081 --receiver-arg=--auth-key-file=key
    pktstream sensor --receiver HUNTER:8081 -i eth0 --auth-key-file key   # on each monitored host

The same pipeline as one shell line (what this script runs)::

    pktstream receiver --listen 0.0.0.0:8081 --auth-key-file key -w - \\
        | tshark -r - -l -n -Y 'dns.flags.response == 0 or http.request'

A pcap stream has one link type: sensors should capture Ethernet interfaces (packets of
another link type are dropped and counted by the receiver, see docs/guide-threat-hunting.md).
The stdout output gates acknowledgements, so a tshark that falls behind slows the sensors
(their send windows fill, then they count drops) instead of losing packets silently.
Stop with Ctrl-C: the receiver flushes, tshark reads to the end, both exit.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys

DEFAULT_FILTER = "dns.flags.response == 0 or http.request or tls.handshake.extensions_server_name"
DEFAULT_FIELDS = ["frame.time_epoch", "ip.src", "ip.dst", "_ws.col.Protocol", "dns.qry.name",
                  "http.request.method", "http.host", "http.request.uri", "tls.handshake.extensions_server_name"]


def tshark_command(display_filter: str | None, fields: list[str] | None) -> list[str]:
    cmd = ["tshark", "-r", "-", "-l", "-n"]
    if display_filter:
        cmd += ["-Y", display_filter]
    if fields:
        cmd += ["-T", "fields", "-E", "separator=\t"]
        for f in fields:
            cmd += ["-e", f]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:8081", help="receiver address (default 127.0.0.1:8081)")
    p.add_argument("-Y", "--display-filter", default=DEFAULT_FILTER,
                   help=f"Wireshark display filter ('' for every packet; default {DEFAULT_FILTER!r})")
    p.add_argument("--fields", action="store_true",
                   help="tab-separated fields instead of tshark's one-line summaries: " + ",".join(DEFAULT_FIELDS))
    p.add_argument("-e", "--field", action="append", help="a field to print (repeat; implies --fields)")
    p.add_argument("--receiver-arg", action="append", default=[],
                   help="extra argument for 'pktstream receiver' (repeat), e.g. --receiver-arg=--auth-key-file=KEY")
    args = p.parse_args(argv)
    if not shutil.which("tshark"):
        print("hunt_tshark: tshark is not installed (apt-get install tshark)", file=sys.stderr)
        return 1
    fields = args.field or (DEFAULT_FIELDS if args.fields else None)
    receiver = subprocess.Popen([sys.executable, "-m", "pktstream", "receiver", "--listen", args.listen,
                                 "-w", "-", *args.receiver_arg], stdout=subprocess.PIPE,
                                process_group=0)  # Ctrl-C reaches this script only: it stops them in order
    tshark = subprocess.Popen(tshark_command(args.display_filter or None, fields), stdin=receiver.stdout,
                              process_group=0)
    receiver.stdout.close()  # tshark owns the pipe now: if it dies, the receiver sees EPIPE

    def stop(*_):
        if receiver.poll() is None:
            receiver.send_signal(signal.SIGTERM)  # flushes, then closes the pipe: tshark ends at EOF

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    rc = tshark.wait()
    stop()
    receiver.wait()
    return rc or receiver.returncode


if __name__ == "__main__":
    sys.exit(main())
