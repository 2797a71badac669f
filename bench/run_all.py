#!/usr/bin/env python3
"""Run every ``bench/bench_*.py`` script, one after another, with its default arguments.

``./run bench`` calls this. Each script is standalone (argparse) and writes its own results
into ``bench/results/``; this runner only discovers, runs and summarises them.

    bench/run_all.py              # all of them
    bench/run_all.py capture read # only bench_capture.py and bench_read.py
    bench/run_all.py --list       # what would run
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(names: list[str]) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in names}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            sys.exit(f"run_all: no bench script for {sorted(unknown)}; have "
                     f"{[s.stem.removeprefix('bench_') for s in scripts]}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    return scripts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="run only these (e.g. capture, read)")
    ap.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = ap.parse_args(argv)
    scripts = discover(args.names)
    if args.list or not scripts:
        for s in scripts:
            print(s.relative_to(HERE.parent))
        if not scripts:
            print("run_all: no bench/bench_*.py scripts found", file=sys.stderr)
        return 0
    summary = []
    for script in scripts:
        print(f"=== {script.relative_to(HERE.parent)} ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        summary.append((script.name, rc, time.monotonic() - t0))
        print(flush=True)
    print("=== summary ===")
    for name, rc, secs in summary:
        print(f"{name:28} {'ok' if rc == 0 else f'FAILED (exit {rc})':16} {secs:7.1f} s")
    return 1 if any(rc for _, rc, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
