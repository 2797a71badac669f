#!/usr/bin/env python3
"""Indexing cost with the whole receiver as the denominator (issue 13, item 6: indexing
<= 15 % extra receiver CPU).

A real ``pktstream receiver`` (CLI process, 127.0.0.1, per-sensor rotated files in
``--output-dir``, or with ``--merged`` one rotated file of every sensor, ``-w``) is fed by
simulated sensors that replay recorded DATA frames (zstd level 1, ~400 packets each, as a
sensor sends them) of bench_archive.py's synthetic traffic (short TCP/UDP flows among 65,536
hosts, incompressible payloads), as fast as the receiver acknowledges them. Each format is run
with ``--no-index``, with ``--index``, with it and pyarrow's
one-time start-up (import, first Parquet file) done before the receiver listens ("index-warm":
the steady-state cost), the same with the indexing's own CPU time measured on its thread
("index-timed": the numerator measured directly), and, with ``--ref COMMIT``,
with the index code (``pktstream/archive/index.py``) of that commit loaded into the same
receiver, pandas allowed as it was then (before/after in one run). Reported: receiver CPU
seconds (user+sys of the process, from the moment it listens until it has exited:
decompression, validation, writing, rotation, the last files' indexes), packets in the files
(checked), and the extra CPU of indexing.

Usage (root not needed): bench/bench_index.py [--raw-mb 300] [--sensors 4] [--merged] [--formats pcapng,pcap.zst]
[--rotate 16MB] [--repeat 1] [--variants index-timed] [--ref ac1c6ca] [--json OUT]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from bench_archive import T0, make_batches  # noqa: E402
from bench_stream import fake_sensor, free_port, user_sys_seconds  # noqa: E402

import pktstream  # noqa: E402

PY = [sys.executable, "-m", "pktstream"]
# the receiver with pyarrow's one-time start-up (import, first Parquet file) done before it listens:
# the steady-state cost of indexing (a receiver pays the start-up once, at its first completed file)
WARM_WRAPPER = """import io, sys
from pktstream.archive.live import refuse_pandas
refuse_pandas()
import pyarrow as pa, pyarrow.parquet as pq
pq.write_table(pa.table({"a": pa.array([1])}), io.BytesIO(), compression="zstd")
from pktstream.cli import main
sys.exit(main())
"""
# index-warm, plus the CPU time of the indexing itself, measured on the thread that does it
# (FileIndexBuilder.add/finish and write_index/write_snapshot): a direct measure of the numerator,
# where the difference of two whole-receiver runs is noisy on a shared machine
# The thread's CPU time comes from CLOCK_THREAD_CPUTIME_ID (time.thread_time_ns: exact to the
# nanosecond); getrusage(RUSAGE_THREAD) only splits it into user and system time: its figures
# advance at scheduler ticks (4 ms here), so a call of a few ms read 0 or 4 ms, and the kernel
# scales the split over the thread's whole life without letting either part go back, so the
# system time of the capture-file writes between the calls shows up inside them (in a receiver,
# add() read ~90 % system time with one page fault): the "user" figures derived from it
# (indexing_thread_sys_s, indexing_user_pct_...) are not the indexing's own -- compare CPU time
TIMED_WRAPPER = WARM_WRAPPER.replace("from pktstream.cli import main", """import atexit, resource, time
import pktstream.archive.index as ix, pktstream.archive.live as live
spent = {}
def timed(obj, name):
    f = getattr(obj, name)
    def w(*a, **k):
        c = resource.getrusage(resource.RUSAGE_THREAD)
        t = time.thread_time_ns()
        try:
            return f(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + (time.thread_time_ns() - t) / 1e9
            e = resource.getrusage(resource.RUSAGE_THREAD)
            spent["sys"] = spent.get("sys", 0.0) + e.ru_stime - c.ru_stime
            # thread switches in the call (waits for the GIL among them)
            spent["csw_" + name] = spent.get("csw_" + name, 0) + e.ru_nvcsw - c.ru_nvcsw + e.ru_nivcsw - c.ru_nivcsw
            spent["flt_" + name] = spent.get("flt_" + name, 0) + e.ru_minflt - c.ru_minflt
    setattr(obj, name, w)
for obj, name in ((ix.FileIndexBuilder, "add"), (ix.FileIndexBuilder, "finish"), (live, "write_index"),
                  (live, "write_snapshot")):
    timed(obj, name)
CALLS = ("add", "finish", "write_index", "write_snapshot")
atexit.register(lambda: print(f"INDEXING_CPU_S {sum(spent.get(k, 0.0) for k in CALLS):.4f} "
                              + json.dumps({k: round(v, 4) for k, v in spent.items()}), file=sys.stderr))
import json
from pktstream.cli import main""")


# index-timed with the index code (pktstream/archive/index.py) of another commit: before/after in
# one run, both warm and measured on the indexing thread (braces doubled: str.format)
REF_SWAP = """import importlib.util
spec = importlib.util.spec_from_file_location("pktstream_ref_index", {path!r})
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
import pktstream.archive.catalog as catalog
class RefBuilder(ref.FileIndexBuilder):
    # the current LiveIndexer's interface (memory bound, counters) on the old builder
    def __init__(self, rel_path, *, max_chunk=0, max_flows=0, spill_dir=None):
        super().__init__(rel_path, max_chunk=max_chunk)
        self.spills = self.peak_flows_held = self.peak_table_bytes = 0
    def close(self):
        pass
    def add(self, batch, start, end, *, interface=None, offsets=None):
        # (an old builder walks the records itself: offsets from the writer are dropped)
        return super().add(batch, start, end, interface=interface)
import pktstream.archive.live as live
live.FileIndexBuilder = catalog.FileIndexBuilder = RefBuilder
"""
REF_WRAPPER = TIMED_WRAPPER.replace("{", "{{").replace("}", "}}").replace(
    "import pktstream.archive.index as ix, pktstream.archive.live as live",
    REF_SWAP + "ix = type('ix', (), {{'FileIndexBuilder': RefBuilder}})")


def recorded(seed: int, raw_bytes: int) -> list[tuple[bytes, int, int]]:
    """(zstd payload, packets, raw bytes) per DATA frame of one sensor's traffic."""
    c = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    return [(c.compress(b), len(b), b.nbytes) for b in make_batches(seed, raw_bytes, T0, 3600 * 10**9)]


def run_receiver(work: Path, fmt: str, variant: str, frames_by_sensor: dict, rotate: str,
                 merged: bool = False) -> dict:
    out = work / f"{fmt}-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    if merged:
        out.mkdir(parents=True)
    output = ["-w", str(out / f"all.{fmt}")] if merged else ["--output-dir", str(out), "--format", fmt]
    log = work / f"{fmt}-{variant}.log"
    port = free_port()
    cfg = work / "rx.yaml"
    cfg.write_text("connectionRate:\n  burst: 10000\n  seconds: 1\n")
    wrapper = {"index-ref": work / "ref_receiver.py", "index-warm": work / "warm_receiver.py",
               "index-timed": work / "timed_receiver.py"}.get(variant)
    head = [sys.executable, str(wrapper)] if wrapper else PY
    cmd = [*head, "receiver", "--config", str(cfg), "--listen", f"127.0.0.1:{port}", *output,
           "-C", rotate, "--index" if variant != "plain" else "--no-index"]
    rx = subprocess.Popen(cmd, stderr=open(log, "w"))
    end = time.monotonic() + 60
    while "listening on" not in log.read_text(errors="replace"):
        if rx.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"receiver did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    u0, s0 = user_sys_seconds(rx.pid)
    t0 = time.perf_counter()

    async def all_sensors():
        return await asyncio.gather(*(fake_sensor(port, sid, fr, 1) for sid, fr in frames_by_sensor.items()))
    try:
        sent = sum(asyncio.run(all_sensors()))
    finally:
        rx.terminate()
    _, status, ru = os.wait4(rx.pid, 0)
    rx.returncode = status
    wall = time.perf_counter() - t0
    cpu = ru.ru_utime + ru.ru_stime - u0 - s0
    sys_s = ru.ru_stime - s0
    files = sorted(p for p in out.rglob("*") if p.is_file() and "_index" not in p.parts)
    in_files = sum(len(b) for f in files for b in pktstream.read(f))
    assert in_files == sent, (fmt, variant, in_files, sent)
    res = {"receiver_cpu_s": round(cpu, 2), "receiver_sys_s": round(sys_s, 2),
           "wall_s": round(wall, 2), "packets": sent, "files": len(files),
           "capture_bytes": sum(f.stat().st_size for f in files)}
    if variant != "plain":
        from pktstream.archive import Archive
        cat = Archive(str(out)).catalog().to_pylist()
        assert len(cat) == len(files) and sum(r["packets"] for r in cat) == sent, (len(cat), len(files))
        res["flows"] = sum(r["flows"] for r in cat)
        timed = [line for line in log.read_text().splitlines() if line.startswith("INDEXING_CPU_S ")]
        if timed:
            res["indexing_thread_cpu_s"] = float(timed[-1].split()[1])
            res["indexing_cpu_s_by_call"] = by_call = json.loads(timed[-1].split(None, 2)[2])
            res["indexing_thread_sys_s"] = by_call.pop("sys", None)  # (of the total: kernel time)
            res["indexing_thread_switches_by_call"] = {k[4:]: by_call.pop(k) for k in list(by_call)
                                                       if k.startswith("csw_")}
            # minor page faults per call (exact counts; the kernel time is not given per call: the
            # kernel splits a thread's exact CPU time into user and system time in proportion to
            # its tick samples over its whole life and never lets either go back, so the
            # capture-file writes' system time between two calls shows up in the next call)
            res["indexing_thread_page_faults_by_call"] = {k[4:]: by_call.pop(k) for k in list(by_call)
                                                          if k.startswith("flt_")}
        res["index_bytes"] = sum(p.stat().st_size for p in (out / "_index").rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-mb", type=int, default=300, help="raw packet bytes, all sensors together (MB)")
    ap.add_argument("--sensors", type=int, default=4)
    ap.add_argument("--merged", action="store_true", help="one merged output (-w) instead of a file per sensor")
    ap.add_argument("--formats", default="pcapng,pcap.zst")
    ap.add_argument("--rotate", default="16MB", help="receiver -C")
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant (interleaved); the least CPU counts")
    ap.add_argument("--variants", help="only these variants (comma-separated; plain always runs)")
    ap.add_argument("--ref", help="also run the index code of this git commit (before/after)")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"raw_mb": args.raw_mb, "sensors": args.sensors, "merged": args.merged, "rotate": args.rotate,
                 "ref": args.ref,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                 "loadavg_start": open("/proc/loadavg").read().split()[:3], "runs": {}}
    (work / "warm_receiver.py").write_text(WARM_WRAPPER)
    (work / "timed_receiver.py").write_text(TIMED_WRAPPER)
    try:
        if args.ref:
            src = subprocess.run(["git", "show", f"{args.ref}:pktstream/archive/index.py"], check=True,
                                 capture_output=True, text=True, cwd=Path(__file__).parent).stdout
            (work / "ref_index.py").write_text(src)
            (work / "ref_receiver.py").write_text(REF_WRAPPER.format(path=str(work / "ref_index.py")))
        print(f"recording {args.raw_mb} MB of frames for {args.sensors} sensors ...", file=sys.stderr)
        frames = {f"sensor-{k}": recorded(k, args.raw_mb * 1_000_000 // args.sensors) for k in range(args.sensors)}
        variants = ["plain", "index", "index-warm", "index-timed", *(["index-ref"] if args.ref else [])]
        if args.variants:
            variants = [v for v in variants if v in args.variants.split(",") or v == "plain"]
        c_self = resource.getrusage(resource.RUSAGE_SELF)
        plain_all: dict[str, list[tuple[float, float]]] = {}  # (CPU s, of which sys) of every repeat
        timed_all: dict[str, list[tuple[float, float]]] = {}
        for fmt in args.formats.split(","):
            runs = res["runs"][fmt] = {}
            for _ in range(args.repeat):
                for v in variants:
                    r = run_receiver(work, fmt, v, frames, args.rotate, args.merged)
                    print(fmt, v, r, file=sys.stderr)
                    if v == "plain":
                        plain_all.setdefault(fmt, []).append((r["receiver_cpu_s"], r["receiver_sys_s"]))
                    elif v == "index-timed":
                        timed_all.setdefault(fmt, []).append((r["indexing_thread_cpu_s"], r["indexing_thread_sys_s"]))
                    cpus = runs.get(v, {}).get("receiver_cpu_s_all", []) + [r["receiver_cpu_s"]]
                    if v not in runs or r["receiver_cpu_s"] < runs[v]["receiver_cpu_s"]:
                        runs[v] = r
                    runs[v]["receiver_cpu_s_all"] = cpus
            base = runs["plain"]["receiver_cpu_s"]
            if "index-timed" in runs:
                t = runs["index-timed"]["indexing_thread_cpu_s"]
                runs["index-timed"]["indexing_pct_of_plain_receiver"] = round(100 * t / base, 1)
                runs["index-timed"]["indexing_ns_per_packet"] = round(1e9 * t / runs["index-timed"]["packets"])
                # every repeat: the median of the numerator over the median of the denominator
                # (the least of each is what the line above divides: it favours neither, but a
                # single slow run of the numerator decides it), and the same for user time only
                ts, plains = timed_all[fmt], plain_all[fmt]
                runs["index-timed"]["indexing_thread_cpu_s_all"] = [round(x[0], 4) for x in ts]
                runs["index-timed"]["indexing_thread_sys_s_all"] = [round(x[1], 4) for x in ts]
                runs["plain"]["receiver_sys_s_all"] = [round(x[1], 2) for x in plains]
                med_t = statistics.median(x[0] for x in ts)
                med_p = statistics.median(x[0] for x in plains)
                runs["index-timed"]["indexing_pct_of_plain_receiver_median"] = round(100 * med_t / med_p, 1)
                med_tu = statistics.median(x[0] - x[1] for x in ts)
                med_pu = statistics.median(x[0] - x[1] for x in plains)
                runs["index-timed"]["indexing_user_pct_of_plain_receiver_user_median"] = round(100 * med_tu / med_pu, 1)
            for v in variants[1:]:
                runs[v]["extra_cpu_pct"] = round(100 * (runs[v]["receiver_cpu_s"] - base) / base, 1)
                runs[v]["ns_per_packet"] = round(1e9 * (runs[v]["receiver_cpu_s"] - base) / runs[v]["packets"])
        c_end = resource.getrusage(resource.RUSAGE_SELF)
        res["bench_process_cpu_s"] = round(c_end.ru_utime + c_end.ru_stime - c_self.ru_utime - c_self.ru_stime, 2)
        res["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
