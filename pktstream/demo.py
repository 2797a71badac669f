"""``pktstream demo``: real traffic on a veth pair in a namespace it creates, captured locally."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import pktstream
from pktstream import traffic
from pktstream.formats.pcap import PcapWriter
from pktstream.netns import Veth


def run(args: argparse.Namespace) -> int:
    out = args.write or os.path.abspath("pktstream-demo.pcap")
    with Veth(prefix="pd") as veth, tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "traffic.pcap")
        traffic.write_pcap(src, args.packets)
        cap = pktstream.Capture(veth.outer, max_wait=0.1)
        writer = PcapWriter(out, link_type=cap.link_type, snaplen=cap.snaplen)

        def consume() -> None:
            for batch in cap:
                writer.write(batch)
                batch.release()

        t = threading.Thread(target=consume)
        t.start()
        print(f"demo: replaying {args.packets} packets into {veth.outer} (namespace {veth.ns})",
              file=sys.stderr)
        veth.replay(src, pps=args.pps)
        time.sleep(0.3)
        cap.stop()
        t.join()
        stats = cap.stats()
        cap.close()
        writer.close()
    print(f"capture file: {out}\npackets sent: {args.packets}\npackets captured: {stats['packets']}\n"
          f"kernel drops: {stats['kernel_dropped']}\nring drops: {stats['ring_drops']}")
    return 0 if stats["packets"] == args.packets else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the local demo (needs root)")
    p.add_argument("-w", "--write", help="output capture file (default ./pktstream-demo.pcap)")
    p.add_argument("--packets", type=int, default=20000)
    p.add_argument("--pps", type=int, default=20000)
    p.set_defaults(func=run)
