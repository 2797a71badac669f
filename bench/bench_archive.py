#!/usr/bin/env python3
"""The indexed archive (issue 13, item 6): indexing cost, index size, queries against brute force.

Builds an archive the way a receiver does (``FileSink``: per-sensor rotated files, several
sensors, ``.pcap.zst`` and ``.pcapng``), from seeded synthetic traffic: many short flows between
a large host pool, incompressible payloads (like encrypted traffic), one rare flow
(``198.51.100.77:4444``) in the middle of one sensor's day. Then, in one run:

* writing CPU (process CPU seconds) with and without ``index=True``, and ``pktstream index``
  over the same files offline;
* index size against the raw packet bytes;
* queries -- single flow, single host, a time window -- through ``Archive.write`` (cold and
  warm) and the ``pktstream query`` command (end to end, start-up included), against brute force:
  ``tcpdump -r FILE -w - BPF`` over every file (``zstd -dc`` in front of compressed ones) and
  ``pktstream convert FILE OUT BPF`` over every file; results checked equal (packet counts).

``--ref COMMIT`` also writes the archive with the index code (``pktstream/archive/index.py``) of
that commit loaded in this process: indexing cost before/after in one run.

Usage: bench/bench_archive.py [--raw-mb 600] [--sensors 4] [--file-mb 8] [--ref COMMIT] [--dir DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pktstream
from pktstream.archive import Archive
from pktstream.sinks import FileSink
from pktstream.sinks.base import Source

T0 = 1_732_708_800 * 10**9
RARE = ("198.51.100.77", 4444)
PY = [sys.executable, "-m", "pktstream"]
# `pktstream query` timed as installed: with its bytecode cache (a PYTHONDONTWRITEBYTECODE
# environment would recompile pktstream's modules at every start: +0.25 s CPU here)
CLI_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _ip(n: int) -> bytes:
    return bytes((10, (n >> 16) & 255, (n >> 8) & 255, n & 255))


def make_batches(seed: int, raw_bytes: int, start_ns: int, span_ns: int, *, rare_at: float | None = None,
                 per_batch: int = 400):
    """Batches of Ethernet/IPv4 TCP+UDP packets: short flows (2-40 packets) from a pool of
    65,536 hosts, incompressible payloads; ``rare_at``: fraction of the span where the rare
    flow's 6 packets are put."""
    rng = random.Random(seed)
    # payloads from a pool larger than zstd's window: incompressible, like encrypted traffic
    noise = np.random.default_rng(seed).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    est = raw_bytes // 640
    step = max(span_ns // max(est, 1), 1)
    ts = start_ns
    flows: list[list] = []
    made = 0
    rare_done = rare_at is None
    while made < raw_bytes:
        recs = bytearray()
        n = 0
        while n < per_batch:
            if len(flows) < 64 or rng.random() < 0.05:
                flows.append([rng.randrange(1 << 16), rng.randrange(1 << 16), rng.randrange(1024, 65535),
                              rng.choice((80, 443, 53, 22, 8080, 3306)), rng.choice((6, 17)), rng.randrange(2, 40)])
            i = rng.randrange(len(flows))
            f = flows[i]
            size = rng.choice((0, 40, 200, 600, 1200, 1400))
            off = rng.randrange(len(noise) - size)
            l4 = (struct.pack("!HHIIBBHHH", f[2], f[3], 1, 1, 0x50, 0x18, 65535, 0, 0) if f[4] == 6
                  else struct.pack("!HHHH", f[2], f[3], 8 + size, 0)) + noise[off:off + size]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, f[4], 0, _ip(f[0]), _ip(f[1])) + l4
            frame = b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip
            ts += rng.randrange(1, 2 * step)
            recs += struct.pack("<IIII", ts // 10**9, ts % 10**9, len(frame), len(frame)) + frame
            n += 1
            f[5] -= 1
            if f[5] <= 0:
                flows.pop(i)
            if not rare_done and ts >= start_ns + rare_at * span_ns:
                rare_done = True
                for k in range(6):
                    l4 = struct.pack("!HHIIBBHHH", 51000, RARE[1], k, 1, 0x50, 0x18, 65535, 0, 0) + b"evil" * 10
                    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, 6, 0, _ip(7),
                                     bytes(map(int, RARE[0].split(".")))) + l4
                    frame = b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip
                    recs += struct.pack("<IIII", ts // 10**9, ts % 10**9 + k, len(frame), len(frame)) + frame
                    n += 1
        made += len(recs)
        yield pktstream.PacketBatch.from_records(bytes(recs), link_type=1)


def write_archive(root: Path, batches_by_sensor: dict, *, index: bool, file_bytes: int,
                  zstd_frame_bytes: int | None = None) -> float:
    """Write like a receiver (two outputs: per-sensor .pcap.zst and per-sensor .pcapng in a
    second directory); returns the process CPU seconds spent in the sinks. ``zstd_frame_bytes``:
    the .pcap.zst files in the seekable layout."""
    root.mkdir(parents=True)
    sinks = [FileSink(directory=str(root / "zst"), format="pcap.zst", rotate_bytes=file_bytes // 3, index=index,
                      zstd_frame_bytes=zstd_frame_bytes),
             FileSink(directory=str(root / "ng"), format="pcapng", rotate_bytes=file_bytes, index=index)]
    cpu = 0.0
    for sensor, batches in batches_by_sensor.items():
        src = Source(sensor, sensor, "eth0", 1, 262144)
        for i, b in enumerate(batches):
            sink = sinks[i % 2]  # half of each sensor's traffic in each output
            c0 = time.process_time()
            sink.write(src, b)
            sink.flush()
            cpu += time.process_time() - c0
    c0 = time.process_time()
    for s in sinks:
        s.close()
    return cpu + time.process_time() - c0


def write_archive_ref(work: Path, ref: str, batches_by_sensor: dict, file_bytes: int) -> float:
    """write_archive(index=True) with the FileIndexBuilder of git commit ``ref``."""
    import importlib.util

    import pktstream.archive.live as live
    src = subprocess.run(["git", "show", f"{ref}:pktstream/archive/index.py"], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parent).stdout
    (work / "ref_index.py").write_text(src)
    spec = importlib.util.spec_from_file_location("pktstream_ref_index", work / "ref_index.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    current = live.FileIndexBuilder
    live.FileIndexBuilder = mod.FileIndexBuilder
    try:
        return write_archive(work / "indexed-ref", batches_by_sensor, index=True, file_bytes=file_bytes)
    finally:
        live.FileIndexBuilder = current


def index_files(root: Path) -> list[Path]:
    """Every file of the archive's indexes (flow records, catalog rows, snapshots)."""
    return [p for p in root.rglob("*") if p.is_file() and "_index" in p.parts]


def du(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def brute_tcpdump(files: list[Path], bpf: str) -> int:
    n = 0
    for f in files:
        cmd = ["tcpdump", "-r", "-" if f.name.endswith(".zst") else str(f), "-w", "-", bpf]
        if f.name.endswith(".zst"):
            z = subprocess.Popen(["zstd", "-dc", str(f)], stdout=subprocess.PIPE)
            out = subprocess.run(cmd, stdin=z.stdout, capture_output=True).stdout
            z.stdout.close()
            z.wait()
        else:
            out = subprocess.run(cmd, capture_output=True).stdout
        n += sum(len(b) for b in pktstream.read(__import__("io").BytesIO(out))) if len(out) > 24 else 0
    return n


def brute_convert(files: list[Path], bpf: str, tmp: Path) -> int:
    n = 0
    for f in files:
        out = tmp / "conv.pcap"
        subprocess.run([*PY, "convert", str(f), str(out), *bpf.split()], check=True, capture_output=True)
        n += sum(len(b) for b in pktstream.read(out))
    return n


def random_access(root: Path, cat: list[dict], kinds=("pcapng", "pcap.zst")) -> dict:
    """Reading the first and the last chunk of the largest .pcapng and .pcap.zst file: seek
    (uncompressed) against bounded decompression (one zstd frame: decompressed up to the
    chunk's end) or, for a seekable .zst, the frames holding the chunk."""
    from pktstream.archive.query import FilePlan, QueryStats, read_plan, segments_for
    from pktstream.archive.store import LocalStore
    out = {}
    store = LocalStore(str(root))
    for kind in kinds:
        rows = [r for r in cat if r["path"].endswith("." + kind) and r["chunks"]]
        row = max(rows, key=lambda r: r["chunks"][-1]["end"])
        for which, c in (("first", 0), ("last", len(row["chunks"]) - 1)):
            segs = segments_for(row, [c])
            best = best_cpu = None
            for _ in range(5):  # best of 5: the machine is shared
                st = QueryStats()
                t, c0 = time.perf_counter(), time.process_time()
                read_plan(store, FilePlan(row["path"], "index", segs, row["compression"], size=row["size"]),
                          bpf=None, since=None, until=None, sensors=None, stats=st, warn=lambda m: None)
                wall, cpu = time.perf_counter() - t, time.process_time() - c0
                best = wall if best is None else min(best, wall)
                best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
            out[f"{kind} {which} chunk"] = {"seconds": round(best, 4), "cpu_s": round(best_cpu, 4),
                                            "file_bytes": row["size"],
                                            "stream_bytes": row["chunks"][-1]["end"], "bytes_read": st.bytes_read,
                                            "chunks": len(row["chunks"])}
    return out


def frame_size_cost(path: Path, frame_sizes: list[int]) -> dict:
    """Compressed size of one file's stream as one zstd frame and as the seekable layout with
    each frame size (level 3, as the receiver writes), and the CPU seconds of compressing it."""
    import io

    import zstandard

    from pktstream.formats.writer import ZstdFileWriter
    data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True).read()
    out = {"stream_bytes": len(data)}
    for fb in [None, None, *frame_sizes]:  # the first run warms up
        buf = io.BytesIO()
        c0 = time.process_time()
        z = ZstdFileWriter(buf, 3, fb)
        for i in range(0, len(data), 256 << 10):  # like batches
            z.write(data[i:i + (256 << 10)])
            z.flush()
        z.finish()
        cpu = time.process_time() - c0
        key = "single frame" if fb is None else f"{fb >> 10} KiB frames"
        out[key] = {"bytes": buf.tell(), "ratio": round(len(data) / buf.tell(), 4), "cpu_s": round(cpu, 3)}
    return out


def timed(fn, repeat: int = 1):
    best, val = None, None
    for _ in range(repeat):
        t = time.perf_counter()
        val = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, val


def timed_cli(cmd: list[str], repeat: int = 5, expect: str | None = None) -> tuple[float, float]:
    """(best wall seconds, best user+sys CPU seconds) of a command over ``repeat`` runs."""
    import resource
    walls, cpus = [], []
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=CLI_ENV)
        walls.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        assert expect is None or expect in r.stderr, r.stderr
    return min(walls), min(cpus)


class QueryServer:
    """``pktstream serve ROOT`` for the duration of a ``with`` (waits for its 'answering' line)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> QueryServer:
        self.p = subprocess.Popen([*PY, "serve", str(self.root)], stderr=subprocess.PIPE, text=True, env=CLI_ENV)
        line = self.p.stderr.readline()
        if "answering" not in line:
            self.__exit__()
            raise RuntimeError(f"pktstream serve did not start: {line}")
        return self

    def __exit__(self, *exc) -> None:
        self.p.terminate()
        self.p.wait(timeout=60)
        self.p.stderr.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-mb", type=int, default=600, help="raw packet bytes to write, in MB (issue: 5000)")
    ap.add_argument("--sensors", type=int, default=4)
    ap.add_argument("--file-mb", type=float, default=8, help="rotation size of the .pcapng files (MB)")
    ap.add_argument("--ref", help="also index with pktstream/archive/index.py of this git commit (before/after)")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--zstd-frame-kib", type=int, default=1024,
                    help="frame size of the seekable .pcap.zst copy (KiB; 0: no seekable copy)")
    ap.add_argument("--no-convert", action="store_true", help="skip the `pktstream convert` brute force (slow)")
    ap.add_argument("--reuse", action="store_true",
                    help="use the archives already in --dir (no writing); `pktstream index` brings their index up "
                         "to date (timed: reindex_s) instead of the offline index of the unindexed copy")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = args.raw_mb * 1_000_000
    span = 3600 * 10**9
    res: dict = {"raw_mb": args.raw_mb, "sensors": args.sensors, "machine": os.uname().nodename,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    try:
        print(f"generating {args.raw_mb} MB of packets for {args.sensors} sensors ...", file=sys.stderr)
        def data():  # regenerated for each archive (seeded: identical), not held in memory
            return {f"sensor-{k}": make_batches(k, raw // args.sensors, T0, span, rare_at=0.5 if k == 1 else None)
                    for k in range(args.sensors)}
        fb = int(args.file_mb * 1_000_000)
        import pyarrow as pa  # a receiver imports these once, at its first completed file: not per file
        import pyarrow.parquet  # noqa: F401
        pa.table({"a": [1]}).to_pylist()
        cpu_plain = cpu_index = cpu_seek = 0.0
        if args.reuse:
            args.zstd_frame_kib = args.zstd_frame_kib if (work / "seekable").is_dir() else 0
        else:
            cpu_plain = write_archive(work / "plain", data(), index=False, file_bytes=fb)
            cpu_index = write_archive(work / "indexed", data(), index=True, file_bytes=fb)
        if args.zstd_frame_kib and not args.reuse:  # the same archive with seekable .pcap.zst files
            cpu_seek = write_archive(work / "seekable", data(), index=True, file_bytes=fb,
                                     zstd_frame_bytes=args.zstd_frame_kib << 10)
        if args.ref:
            cpu_ref = write_archive_ref(work, args.ref, data(), fb)
            res.update(write_cpu_s_indexed_ref=round(cpu_ref, 2),
                       indexing_cpu_overhead_pct_ref=round(100 * (cpu_ref - cpu_plain) / cpu_plain, 1))
        root = work / "indexed"
        files = sorted(p for p in root.rglob("*") if p.is_file() and "_index" not in p.parts)
        idx = index_files(root)
        cat = Archive(str(root)).catalog().to_pylist()
        res["packets"] = sum(r["packets"] for r in cat)
        res["raw_bytes"] = sum(r["chunks"][-1]["end"] for r in cat if r["chunks"])  # uncompressed stream bytes
        if args.reuse:  # bring the existing index up to date (e.g. rows of an older index format)
            for name in ("indexed", "seekable") if args.zstd_frame_kib else ("indexed",):
                t = time.perf_counter()
                r = subprocess.run([*PY, "index", str(work / name)], capture_output=True, text=True)
                res[f"reindex_s_{name}"] = round(time.perf_counter() - t, 2)
                res[f"reindex_out_{name}"] = r.stdout.strip() + r.stderr.strip()[-300:]
                assert r.returncode == 0, r.stderr
            idx = index_files(root)
            cat = Archive(str(root)).catalog().to_pylist()
        res.update(files=len(files), capture_bytes=du(files), index_bytes=du(idx))
        if not args.reuse:
            res.update(write_cpu_s_plain=round(cpu_plain, 2), write_cpu_s_indexed=round(cpu_index, 2),
                       indexing_cpu_overhead_pct=round(100 * (cpu_index - cpu_plain) / cpu_plain, 1))
        res["index_pct_of_raw"] = round(100 * res["index_bytes"] / res["raw_bytes"], 3)
        res["index_bytes_per_packet"] = round(res["index_bytes"] / res["packets"], 2)
        if not args.reuse:  # offline indexing of the unindexed copy
            t = time.perf_counter()
            r = subprocess.run([*PY, "index", str(work / "plain")], capture_output=True, text=True)
            res["offline_index_s"] = round(time.perf_counter() - t, 2)
            assert r.returncode == 0, r.stderr
        a = Archive(str(root))
        flow_row = a.flows(f"host {RARE[0]}").to_pylist()
        rare_ts = flow_row[0]["first_ts_ns"]
        queries = {
            "single flow": f"host {RARE[0]} and tcp port {RARE[1]}",
            "single host": "host 10.0.1.1",
            "time window (60 s, tcp port 22)": "tcp port 22",
        }
        res["queries"] = {}
        for name, bpf in queries.items():
            kw = {"since": rare_ts - 30 * 10**9, "until": rare_ts + 30 * 10**9} if name.startswith("time") else {}
            out = work / "q.pcapng"
            def run_api(out=out, bpf=bpf, kw=kw):
                return Archive(str(root)).write(out, bpf, **kw)
            cold, st = timed(run_api)
            warm, st = timed(run_api, repeat=3)
            extra = []
            if kw:
                extra = [f"--since={kw['since'] // 10**9}.{kw['since'] % 10**9:09d}",
                         f"--until={kw['until'] // 10**9}.{kw['until'] % 10**9:09d}"]
            cli, cli_cpu = timed_cli([*PY, "query", str(root), *bpf.split(), "-w", str(out), *extra, "--no-server"])
            with QueryServer(root):
                served, served_cpu = timed_cli([*PY, "query", str(root), *bpf.split(), "-w", str(out), *extra],
                                               expect="(by the query server)")
            if args.zstd_frame_kib:
                sr = str(work / "seekable")
                s_warm, s_st = timed(lambda bpf=bpf, kw=kw, sr=sr, out=out: Archive(sr).write(out, bpf, **kw),
                                     repeat=3)
                assert s_st.packets == st.packets, (name, s_st.packets, st.packets)
                s_cli, _ = timed_cli([*PY, "query", sr, *bpf.split(), "-w", str(out), *extra, "--no-server"])
            q = {"bpf": bpf, "packets": st.packets, "files_read": st.files_read, "bytes_read": st.bytes_read,
                 "archive_cold_s": round(cold, 4), "archive_warm_s": round(warm, 4), "cli_s": round(cli, 3),
                 "cli_cpu_s": round(cli_cpu, 3), "cli_server_s": round(served, 3),
                 "cli_server_client_cpu_s": round(served_cpu, 3)}
            if args.zstd_frame_kib:
                q.update(seekable_bytes_read=s_st.bytes_read, seekable_archive_warm_s=round(s_warm, 4),
                         seekable_cli_s=round(s_cli, 3))
            if not kw:
                td, n_td = timed(lambda bpf=bpf: brute_tcpdump(files, bpf))
                assert n_td == st.packets, (name, n_td, st.packets)
                q.update(tcpdump_s=round(td, 2), speedup_vs_tcpdump_warm=round(td / warm, 1),
                         speedup_vs_tcpdump_cli=round(td / cli, 1), speedup_vs_tcpdump_cli_server=round(td / served, 1))
                if name == "single flow" and not args.no_convert:  # one process per file: slow, so once
                    cv, n_cv = timed(lambda bpf=bpf: brute_convert(files, bpf, work))
                    assert n_cv == st.packets
                    q.update(convert_s=round(cv, 2), speedup_vs_convert_warm=round(cv / warm, 1))
            res["queries"][name] = q
            print(name, q, file=sys.stderr)
        res["random_access"] = random_access(root, cat)
        if args.zstd_frame_kib:
            seek_root = work / "seekable"
            s_cat = Archive(str(seek_root)).catalog().to_pylist()
            res["seekable"] = {
                "frame_kib": args.zstd_frame_kib, "write_cpu_s_indexed": round(cpu_seek, 2),
                "zst_bytes_single_frame": du((root / "zst").glob("*.zst")),
                "zst_bytes_seekable": du((seek_root / "zst").glob("*.zst")),
                "random_access": random_access(seek_root, s_cat, kinds=("pcap.zst",)),
            }
            big = max((root / "zst").glob("*.zst"), key=lambda p: p.stat().st_size)
            res["seekable"]["frame_size_cost"] = frame_size_cost(big, [256 << 10, 1 << 20, 4 << 20])
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
