#!/usr/bin/env python3
"""How long may a default sensor's process be stopped before the kernel drops packets?

A sensor (defaults, or the options given after ``--``) captures a veth pair while 30,000 mixed
packets are replayed at ``--pps``; 3 s in, the whole sensor process is stopped (SIGSTOP) for each
duration in turn, then continued (SIGCONT). Reported: the kernel drops of each run. At low rates
libpcap's kernel buffer covers ``bufferSize / 256 KiB x kernelTimeout`` of a stalled capture
thread (0.32 s at the defaults), not its size in bytes. Root (namespaces, capture).

Usage: bench/bench_stall.py [--pps 3000] [--stops 0.2,0.3,0.4,0.6,1.0] [-- SENSOR OPTIONS]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pktstream.lab import traffic  # noqa: E402
from pktstream.lab.netns import Veth  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pps", type=int, default=3000)
    ap.add_argument("--stops", default="0.2,0.3,0.4,0.6,1.0", help="seconds the sensor is stopped, one run each")
    ap.add_argument("sensor_options", nargs="*", help="after --: extra sensor options (e.g. --buffer-size 32MiB)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, Veth(prefix="st") as v:
        src = f"{tmp}/mix.pcap"
        traffic.write_pcap(src, 30000)
        for stop_s in (float(x) for x in args.stops.split(",")):
            sj = f"{tmp}/sx.json"
            # no receiver (port 1): the window holds the blocks; only the capture side is measured
            p = subprocess.Popen([sys.executable, "-m", "pktstream", "sensor", "--receiver", "127.0.0.1:1",
                                  "-i", v.outer, "--sensor-id", "stall", "--no-spool", "--stats-json", sj,
                                  *args.sensor_options], stderr=subprocess.PIPE, text=True)
            assert p.stderr is not None
            while "capturing on" not in p.stderr.readline():
                pass
            t = threading.Thread(target=v.replay, args=(src,), kwargs={"pps": args.pps})
            t.start()
            time.sleep(3)  # traffic flowing (a duration by nature, as the stop itself)
            os.kill(p.pid, signal.SIGSTOP)
            time.sleep(stop_s)
            os.kill(p.pid, signal.SIGCONT)
            t.join()
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=60)
            st = json.loads(Path(sj).read_text())
            results.append({"stopped_s": stop_s, "kernel_dropped": st["kernel_dropped"], "packets": st["packets"]})
            print(f"stopped {stop_s:.2f} s at {args.pps} pps: kernel_dropped {st['kernel_dropped']}, "
                  f"captured {st['packets']}", flush=True)
    print(json.dumps({"pps": args.pps, "sensor_options": args.sensor_options, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
