#!/usr/bin/env python3
"""Run every ``bench/bench_*.py`` script, one after another, with its default arguments.

``./run bench`` calls this. Each script is standalone (argparse) and writes its own results
into ``bench/results/``; this runner only discovers, runs and summarises them.

    bench/run_all.py              # all of them
    bench/run_all.py capture read # only bench_capture.py and bench_read.py
    bench/run_all.py --list       # what would run
    bench/run_all.py --preset issue16 --out DIR [--packetstreamer BIN]
                                  # every issue-16 figure in one run: latency (10 pps, 1 kpps,
                                  # 100 kpps, idle; tcpdump), streaming CPU per packet and ingest
                                  # (tcpdump, PacketStreamer, TCP floor), memory, reading, start-up
    bench/run_all.py --preset issue13 --out DIR
                                  # the indexed archive in one run: indexing cost, a 5 GB archive's
                                  # index size and queries (tcpdump -r, convert, pktstream serve),
                                  # Stenographer side by side (root)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: preset -> [(script name, arguments)]; "{out}" is the output directory, "{ps}" the
#: PacketStreamer arguments (empty without --packetstreamer)
PRESETS: dict[str, list[tuple[str, list[str]]]] = {
    "issue16": [
        ("startup", []),
        ("read", []),
        ("latency", ["--rates", "10,1000,100000", "--tcpdump", "--json", "{out}/latency.json"]),
        ("memory", ["{ps}", "--json", "{out}/memory.json"]),
        ("stream", ["{ps}", "--json", "{out}/stream.json"]),
    ],
    # the indexed archive (issue 13, item 6): indexing cost (receiver thread CPU), a 5 GB archive
    # (index size, queries against tcpdump -r and pktstream convert, direct and by pktstream serve),
    # Stenographer on the same traffic (root, Debian's stenographer)
    "issue13": [
        ("index", ["--raw-mb", "600", "--rotate", "128MB", "--repeat", "3", "--json", "{out}/index.json"]),
        ("index", ["--rotate", "16MB", "--repeat", "3", "--json", "{out}/index-16mb.json"]),  # per-file costs
        ("archive", ["--raw-mb", "5000", "--dir", "{out}/archive", "--json", "{out}/archive.json"]),
        ("steno_side_by_side.py", []),
    ],
}


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
    ap.add_argument("--preset", choices=sorted(PRESETS), help="run these scripts with these arguments, in one run")
    ap.add_argument("--out", help="--preset: directory for each script's output (NAME.log) and JSON")
    ap.add_argument("--packetstreamer", metavar="BIN", help="--preset: also run PacketStreamer built from its source")
    args = ap.parse_args(argv)
    if args.preset:
        return run_preset(args.preset, args.out, args.packetstreamer)
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


def run_preset(name: str, out: str | None, packetstreamer: str | None) -> int:
    """Run a preset's scripts back to back; each one's output is printed and kept in OUT/NAME.log."""
    if not out:
        sys.exit("run_all: --preset needs --out DIR")
    Path(out).mkdir(parents=True, exist_ok=True)
    ps = ["--packetstreamer", packetstreamer] if packetstreamer else []
    summary = []
    for script, raw in PRESETS[name]:
        argv: list[str] = []
        for a in raw:
            argv += ps if a == "{ps}" else [a.replace("{out}", out)]
        cmd = [sys.executable, str(HERE / (script if script.endswith(".py") else f"bench_{script}.py")), *argv]
        print(f"=== {' '.join(cmd[1:])} ===", flush=True)
        t0 = time.monotonic()
        with open(Path(out) / f"{Path(script).stem}.log", "a") as log:  # (a script may run twice)
            proc = subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        summary.append((script, rc, time.monotonic() - t0))
    print("=== summary ===")
    for script, rc, secs in summary:
        name = script if script.endswith(".py") else f"bench_{script}.py"
        print(f"{name:28} {'ok' if rc == 0 else f'FAILED (exit {rc})':16} {secs:7.1f} s")
    return 1 if any(rc for _, rc, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
