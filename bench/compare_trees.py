#!/usr/bin/env python3
"""Compare two checkouts of pktstream on one archive: ``pktstream query`` end to end, and the
memory of iterating ``Archive.packets()`` (bench/README.md, "Seekable zstd, the lazy merge and
`pktstream query` start-up").

Each tree runs its own ``.venv/bin/python``. ``query``: the runs alternate between the trees;
the first run of each fills its bytecode cache (kept under /tmp, not in the trees) and is not
counted; CPU is the child's user+sys from ``getrusage``. ``packets``: one child per tree
iterates ``Archive(ARCHIVE).packets(BPF)`` and reports its max RSS, CPU and, where the tree has
it, ``QueryStats.peak_packets_held``.

Usage: bench/compare_trees.py query|packets ARCHIVE BPF --before TREE --after TREE [--runs N]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

PACKETS = """
import resource, sys, time
from pktstream.archive import Archive
a = Archive(sys.argv[1]); t = time.perf_counter(); c0 = time.process_time(); n = 0
for b in a.packets(sys.argv[2] or None):
    n += len(b)
st = a.last_stats
print(f"{n} packets, {time.perf_counter() - t:.2f} s wall, {time.process_time() - c0:.2f} s CPU, "
      f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB, "
      f"peak packets held {getattr(st, 'peak_packets_held', 'n/a')}, files {st.files_read}")
"""


def env_for(tree: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=f"/tmp/pktstream-pyc/{os.path.basename(os.path.abspath(tree))}")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("query", "packets"))
    ap.add_argument("archive")
    ap.add_argument("bpf")
    ap.add_argument("--before", required=True, help="checkout to compare against (e.g. /work/main)")
    ap.add_argument("--after", required=True)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    trees = {"before": args.before, "after": args.after}
    if args.what == "packets":
        for name, tree in trees.items():
            r = subprocess.run([f"{tree}/.venv/bin/python", "-c", PACKETS, args.archive, args.bpf], cwd=tree,
                               capture_output=True, text=True, env=env_for(tree))
            print(f"{name} ({tree}): {r.stdout.strip() or r.stderr[-2000:]}")
        print(f"load average {os.getloadavg()}")
        return 0
    res: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in trees}
    out = f"/tmp/pktstream-compare-{os.getpid()}.pcapng"
    for i in range(args.runs):
        for name, tree in trees.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run([f"{tree}/.venv/bin/python", "-m", "pktstream", "query", args.archive,
                            *args.bpf.split(), "-w", out], cwd=tree, check=True, capture_output=True,
                           env=env_for(tree))
            wall = time.perf_counter() - t
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if i:
                res[name][0].append(wall)
                res[name][1].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    os.unlink(out)
    print(f"load average {os.getloadavg()}")
    for name, (w, c) in res.items():
        print(f"{name} ({trees[name]}): wall median {statistics.median(w):.3f} s (min {min(w):.3f}), "
              f"CPU median {statistics.median(c):.3f} s (min {min(c):.3f}), n={len(w)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
