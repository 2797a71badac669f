#!/usr/bin/env python3
"""The live index's per-packet step alone: ``FlowTable.add`` over a receiver-like stream of
batches, with the records walked by the table (a chain of dependent loads: each record's length
says where the next starts) against offsets handed in (what a pcapng writer's EPB conversion
finds by its own pass, independent loads), over records out of the CPU caches and over one
batch repeated (in the caches). Issue 13: `add` was the largest per-packet part of indexing.

    .venv/bin/python bench/bench_flowtable.py [--mb 24] [--repeat 7] [--json OUT]

Each figure is the least of ``--repeat`` timings (thread CPU time), the variants alternated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_archive import T0, make_batches  # noqa: E402

from pktstream._flowtable import FlowTable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=24, help="MB of records (more than the L3 cache: cold)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = list(make_batches(1, args.mb * 1_000_000, T0, 600 * 10**9))
    packets = sum(len(b) for b in batches)
    offsets = [b.offset.copy() for b in batches]  # (computed once, outside the timings)
    hot = batches[0]

    def cold(with_offsets: bool) -> None:
        t = FlowTable()
        for i, b in enumerate(batches):
            t.add(b, len(b), 1, 0, i, offsets[i] if with_offsets else None)

    def warm(with_offsets: bool) -> None:
        t = FlowTable()
        for i in range(len(batches)):
            t.add(hot, len(hot), 1, 0, i, offsets[0] if with_offsets else None)

    variants = {"cold, walked": (cold, False), "cold, offsets given": (cold, True),
                "in cache, walked": (warm, False), "in cache, offsets given": (warm, True)}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeat):
        for name, (f, with_offsets) in variants.items():
            t0 = time.thread_time_ns()
            f(with_offsets)
            best[name] = min(best[name], (time.thread_time_ns() - t0) / packets)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeat": args.repeat,
           "loadavg": os.getloadavg(), "batches": len(batches), "packets": packets, "records_mb": args.mb,
           "ns_per_packet": {k: round(v, 1) for k, v in best.items()}}
    for k, v in res["ns_per_packet"].items():
        print(f"{k:26s} {v:6.1f} ns per packet")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
