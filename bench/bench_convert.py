"""Converting a pcapng whose interfaces interleave packet by packet (what `dumpcap -i eth0 -i
eth1` writes on busy links): `pktstream convert` against editcap and tshark; and merging two
captures whose packets alternate one by one (two sensors' captures of the same minutes):
`pktstream merge` against mergecap; optionally an older pktstream beside them.

The input is written here block by block (not by pktstream): three Ethernet interfaces, eth0
and eth1 alternating and every tenth packet on eth2, 60-110-byte frames, a comment on every
1000th packet. Each command converts it to pcapng (and pktstream also to .pcapng.zst and pcap);
wall seconds and CPU seconds (the child's user+sys) are measured around each run,
one run each, page cache warm (the files are read once first). Outputs are checked: same packet
count as the input (capinfos). The merge inputs: two nanosecond pcap files of half the packets
each, 78-byte frames, stamps alternating between them every microsecond.

    .venv/bin/python bench/bench_convert.py [--packets 1000000] [--baseline-python OLD/.venv/bin/python]
        [--json FILE]

``--baseline-python``: a Python whose ``pktstream`` is an older one, e.g. the venv of a clean
clone of the commit before the change (``./run test`` there builds it). (Not PYTHONPATH: an
editable install's import hook comes before it.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time


def write_input(path: str, packets: int) -> None:
    def block(btype: int, body: bytes) -> bytes:
        return struct.pack("<II", btype, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))

    def opt(code: int, value: bytes) -> bytes:
        return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)
    rng = random.Random(1)
    with open(path, "wb") as f:
        f.write(block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)))
        for k in range(3):
            f.write(block(1, struct.pack("<HHI", 1, 0, 65535) + opt(2, f"eth{k}".encode())
                          + opt(9, b"\x09") + opt(0, b"")))
        out = []
        for j in range(packets):
            frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + j.to_bytes(4, "big") + rng.randbytes(40 + j % 50)
            ts = 1_732_708_800_000_000_000 + 1000 * j
            body = (struct.pack("<IIIII", j % 2 if j % 10 else 2, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame))
                    + frame + bytes(-len(frame) % 4))
            if j % 1000 == 7:
                body += opt(1, f"note {j}".encode()) + opt(0, b"")
            out.append(block(6, body))
            if len(out) >= 10_000:
                f.write(b"".join(out))
                out.clear()
        f.write(b"".join(out))


def write_merge_inputs(paths: list[str], packets: int) -> None:
    for k, path in enumerate(paths):
        with open(path, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))
            out = []
            for j in range(packets // 2):
                t = 1_732_708_800_000_000_000 + (2 * j + k) * 1000
                frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + j.to_bytes(4, "big") + bytes(60)
                out.append(struct.pack("<IIII", t // 10**9, t % 10**9, len(frame), len(frame)) + frame)
                if len(out) >= 10_000:
                    f.write(b"".join(out))
                    out.clear()
            f.write(b"".join(out))


def timed(cmd: list[str], cwd: str, env: dict | None = None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=cwd)  # (cwd: python -m imports from it)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(wall, 3),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 3)}


def count(path: str) -> int:
    out = subprocess.run(["capinfos", "-c", "-M", path], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1].split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--baseline-python", help="a Python running an older pktstream, to run too")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as d:
        src = os.path.join(d, "interleaved.pcapng")
        write_input(src, args.packets)
        halves = [os.path.join(d, "sensor-a.pcap"), os.path.join(d, "sensor-b.pcap")]
        write_merge_inputs(halves, args.packets)
        for path in (src, *halves):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        cases: list[tuple[str, list[str], str, dict | None]] = []
        env_new = dict(os.environ, PYTHONPATH=here)
        for ext in ("pcapng", "pcapng.zst", "pcap"):
            cases.append((f"pktstream convert → {ext}", [sys.executable, "-m", "pktstream", "convert", src,
                                                         os.path.join(d, f"new.{ext}")], f"new.{ext}", env_new))
        if args.baseline_python:
            for ext in ("pcapng", "pcapng.zst", "pcap"):
                cases.append((f"pktstream (baseline) convert → {ext}",
                              [args.baseline_python, "-m", "pktstream", "convert", src, os.path.join(d, f"old.{ext}")],
                              f"old.{ext}", None))
        merged = os.path.join(d, "merged.pcapng")
        cases.append(("pktstream merge → pcapng", [sys.executable, "-m", "pktstream", "merge", merged, *halves],
                      "merged.pcapng", env_new))
        if args.baseline_python:
            cases.append(("pktstream (baseline) merge → pcapng", [args.baseline_python, "-m", "pktstream", "merge",
                                                              os.path.join(d, "old-merged.pcapng"), *halves],
                          "old-merged.pcapng", None))
        cases.append(("mergecap → pcapng", ["mergecap", "-w", os.path.join(d, "mergecap.pcapng"), *halves],
                      "mergecap.pcapng", None))
        cases.append(("editcap → pcapng", ["editcap", "-F", "pcapng", src, os.path.join(d, "editcap.pcapng")],
                      "editcap.pcapng", None))
        cases.append(("tshark -r -w → pcapng", ["tshark", "-r", src, "-w", os.path.join(d, "tshark.pcapng")],
                      "tshark.pcapng", None))
        results = []
        for name, cmd, out, env in cases:
            r = timed(cmd, d, env)
            n = count(os.path.join(d, out))
            expect = args.packets // 2 * 2 if "merge" in name else args.packets
            assert n == expect, f"{name}: {n} packets, not {expect}"
            r.update(case=name, packets=n, out_bytes=os.path.getsize(os.path.join(d, out)))
            results.append(r)
            os.unlink(os.path.join(d, out))
            print(f"{name:40s} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} CPU-s  {r['out_bytes'] / 1e6:8.1f} MB")
        info = {"packets": args.packets, "input_bytes": os.path.getsize(src), "loadavg": os.getloadavg(),
                "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
