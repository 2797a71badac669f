#!/usr/bin/env python3
"""Live-capture benchmark: tcpdump vs pktstream vs pcapy-ng vs scapy on identical replayed traffic.

Run as root. The script creates its own veth pair (one end in a network namespace it creates,
see ``pktstream.lab.netns.Veth``), replays pcap files with tcpreplay from inside the namespace (so
the frames arrive on the root-namespace end) and, for each traffic case, runs the capturers one
after another on the same traffic:

  tcpdump       ``tcpdump -i IF -B <buffer KiB> -w FILE`` (same kernel buffer as pktstream)
  tcpdump-null  the same with ``-w /dev/null``: tcpdump's capture cost without the file system,
                the fair reference for the capturers that only count
  pktstream-cli ``pktstream capture -i IF -w FILE``        (writes a nanosecond pcap)
  pktstream-api ``for batch in Capture(IF): n += len(batch)`` (count only, no file)
  pcapy         pcapy-ng, ``dispatch(-1, callback)`` with a Python counting callback
  scapy         ``sniff(store=False, prn=count)`` (native AF_PACKET socket; very slow, so it
                only runs in the short ``*-scapy`` cases: 100,000 frames at top speed, and 1,000 pps)

Reported per capturer: packets offered (tcpreplay's count), arrived (rx counter of the capture
interface), captured (records in the output file, or the counter), kernel drops (the tool's own
statistics: tcpdump's summary, pcap_stats, PACKET_STATISTICS for scapy), CPU seconds (user+sys of
the capturer process during the capture phase, so interpreter start-up, imports and teardown
are not counted: the Python capturers -- pktstream-cli included, which runs ``pktstream.cli.main``
in a worker exactly as the console script does -- take CLOCK_PROCESS_CPUTIME_ID and rusage
user/sys themselves from readiness to the end of capture; tcpdump is measured from readiness to
exit with ``perf stat -e task-clock -p PID`` when perf is installed, else with rusage from
``os.wait4`` minus ``/proc/PID/stat`` at readiness), CPU seconds per million captured packets, and
ratios to tcpdump from the same run.

Results: a table on stdout and JSON in ``bench/results/capture-<date>.json``.
``--baseline OLD.json`` prints the change of capture rate and CPU/Mpkt against an earlier run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import mmap
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CAPTURERS = ("tcpdump", "pktstream-cli", "tcpdump-null", "pktstream-api", "pcapy", "scapy")
FILE_WRITERS = ("tcpdump", "pktstream-cli")
# name: (frames kind, rate in pps or None for top speed, packets, capturers)
CASES = {
    "udp1514-top":   ("udp1514", None, 1_000_000, CAPTURERS[:5]),
    "udp1514-150k":  ("udp1514", 150_000, 450_000, CAPTURERS[:5]),
    "udp1514-50k":   ("udp1514", 50_000, 150_000, CAPTURERS[:5]),
    "mixed-top":     ("mixed", None, 1_000_000, CAPTURERS[:5]),
    "mixed-150k":    ("mixed", 150_000, 450_000, CAPTURERS[:5]),
    "mixed-50k":     ("mixed", 50_000, 150_000, CAPTURERS[:5]),
    # scapy cannot keep up with the cases above: short runs that include it
    "udp1514-top-scapy": ("udp1514", None, 100_000, CAPTURERS),
    "mixed-1k-scapy":    ("mixed", 1_000, 10_000, CAPTURERS),
}
DEFAULT_CASES = list(CASES)
FILE_FRAMES = 10_000  # frames per pcap file; tcpreplay loops over it
READY_MARK = "BENCH-READY"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------
# worker mode: the Python capturers run as child processes of this script (``--worker NAME``)
# ------------------------------------------------------------------------------------------------

class _CpuSpan:
    """Process CPU (CLOCK_PROCESS_CPUTIME_ID: precise, all threads) and rusage user/sys between
    readiness and the end of capture, so interpreter start-up and teardown are not counted."""

    def __init__(self) -> None:
        self.t0 = self.u0 = self.s0 = None

    def start(self) -> None:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.t0, self.u0, self.s0 = time.process_time(), ru.ru_utime, ru.ru_stime

    def result(self) -> dict:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_span": time.process_time() - self.t0,
                "cpu_span_user": ru.ru_utime - self.u0, "cpu_span_sys": ru.ru_stime - self.s0}


SPAN = _CpuSpan()


def _ready() -> None:
    SPAN.start()
    print(READY_MARK, file=sys.stderr, flush=True)


def _stop_on_signals(stop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop())


def worker_pktstream_api(iface: str, buffer_bytes: int, out: str) -> None:
    import pktstream
    cap = pktstream.Capture(iface, promisc=True, buffer_bytes=buffer_bytes)
    _stop_on_signals(cap.stop)
    n = 0
    _ready()
    for batch in cap:
        n += len(batch)
        batch.release()
    st = cap.stats()
    cap.close()
    Path(out).write_text(json.dumps({"captured": n, "kernel_received": st["kernel_received"],
                                     "kernel_dropped": st["kernel_dropped"],
                                     "ring_drops": st["ring_drops"], **SPAN.result()}))


def worker_pcapy(iface: str, buffer_bytes: int, out: str) -> None:
    import select

    import pcapy
    p = pcapy.create(iface)
    p.set_snaplen(262144)
    p.set_promisc(1)
    p.set_timeout(1000)
    p.set_buffer_size(buffer_bytes)
    p.activate()
    # non-blocking reads + select: a blocking TPACKET_V3 read can wait forever on an idle link
    p.setnonblock(1)
    fd = p.getfd()
    stop = []
    _stop_on_signals(lambda: stop.append(1))
    n = 0

    def count(hdr, data) -> None:
        nonlocal n
        n += 1

    _ready()
    while not stop:
        try:
            select.select([fd], [], [], 0.1)
        except InterruptedError:
            pass
        p.dispatch(-1, count)
    p.dispatch(-1, count)
    recv, drop, ifdrop = p.stats()
    Path(out).write_text(json.dumps({"captured": n, "kernel_received": recv,
                                     "kernel_dropped": drop, **SPAN.result()}))


def worker_scapy(iface: str, buffer_bytes: int, out: str) -> None:
    from scapy.all import conf, sniff
    sock = conf.L2listen(iface=iface, promisc=True)
    n = 0

    def count(pkt) -> None:
        nonlocal n
        n += 1

    sniff(opened_socket=sock, store=False, prn=count, started_callback=_ready)  # ends on SIGINT
    # struct tpacket_stats {unsigned tp_packets, tp_drops} (SOL_PACKET=263, PACKET_STATISTICS=6)
    received, dropped = struct.unpack("II", sock.ins.getsockopt(263, 6, 8))
    span = SPAN.result()
    sock.close()
    Path(out).write_text(json.dumps({"captured": n, "kernel_received": received,
                                     "kernel_dropped": dropped, **span}))


def worker_pktstream_cli(iface: str, buffer_bytes: int, out: str, pcap: str) -> None:
    """``pktstream capture -i IFACE -B KiB -w FILE``, run in-process as the console script does
    (``pktstream.cli.main``), so its CPU can be taken from "listening on" to the end of the
    command, without the interpreter's start-up and teardown (tcpdump has neither)."""
    import pktstream.cli as cli

    class Tap:  # take the CPU snapshot when the CLI announces it is listening
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if "listening on" in text and SPAN.t0 is None:
                SPAN.start()
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    sys.stderr = Tap(sys.__stderr__)
    rc = cli.main(["capture", "-i", iface, "-B", str(buffer_bytes // 1024), "-w", pcap])
    span = SPAN.result()
    sys.stderr = sys.__stderr__
    print(READY_MARK + "-END", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps({"exit": rc, **span}))


WORKERS = {"pktstream-api": worker_pktstream_api, "pcapy": worker_pcapy, "scapy": worker_scapy,
           "pktstream-cli": worker_pktstream_cli}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def count_pcap_records(path: Path) -> int:
    """Records in a classic pcap file (µs or ns), walking the record headers."""
    size = path.stat().st_size
    if size <= 24:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        magic = m[:4]
        endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        unpack = struct.Struct(endian + "I").unpack_from
        pos, n = 24, 0
        while pos + 16 <= size:
            caplen = unpack(m, pos + 8)[0]
            if pos + 16 + caplen > size:  # truncated last record (killed writer)
                break
            pos += 16 + caplen
            n += 1
        return n


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of a live process (all threads) from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def if_counters(iface: str) -> dict:
    base = Path("/sys/class/net") / iface / "statistics"
    return {k: int((base / k).read_text()) for k in ("rx_packets", "rx_bytes", "rx_dropped")}


def parse_task_clock(path: Path) -> float | None:
    """CPU seconds from ``perf stat -x, -e task-clock`` output (msec), or None."""
    try:
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("task-clock") and fields[0] not in ("", "<not counted>"):
                return float(fields[0]) / 1000.0
    except (FileNotFoundError, ValueError):
        pass
    return None


def parse_summary(text: str) -> dict:
    """tcpdump's (and pktstream capture's) end-of-run summary on stderr."""
    out = {}
    for key, pat in (("captured", r"(\d+) packets? captured"),
                     ("kernel_received", r"(\d+) packets? received by filter"),
                     ("kernel_dropped", r"(\d+) packets? dropped by kernel"),
                     ("ring_drops", r"(\d+) packets? dropped by pktstream")):
        m = re.search(pat, text)
        if m:
            out[key] = int(m.group(1))
    return out


def parse_tcpreplay(text: str) -> dict:
    out = {}
    m = re.search(r"Actual: (\d+) packets \((\d+) bytes\) sent in ([\d.]+) seconds", text)
    if m:
        out.update(sent=int(m.group(1)), sent_bytes=int(m.group(2)), send_seconds=float(m.group(3)))
    m = re.search(r"Rated: [\d.]+ Bps, ([\d.]+) Mbps, ([\d.]+) pps", text)
    if m:
        out.update(mbps=float(m.group(1)), pps=float(m.group(2)))
    m = re.search(r"Failed packets:\s+(\d+)", text)
    if m:
        out["failed"] = int(m.group(1))
    return out


def machine_info() -> dict:
    import pktstream
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    tools = {}
    for name, cmd in (("tcpdump", ["tcpdump", "--version"]), ("tcpreplay", ["tcpreplay", "-V"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            tools[name] = (r.stdout + r.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            tools[name] = None
    for _mod, dist in (("scapy", "scapy"), ("pcapy", "pcapy-ng")):
        try:
            from importlib.metadata import version
            tools[dist] = version(dist)
        except Exception:
            tools[dist] = None
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "libpcap": pktstream.libpcap_version(),
            "pktstream": pktstream.__version__, "tools": tools}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------
# one capture run
# ------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, veth, workdir: Path, traffic: dict[str, Path]):
        self.args = args
        self.veth = veth
        self.workdir = workdir
        self.traffic = traffic
        self.buffer_bytes = args.buffer_kib * 1024

    def command(self, tool: str, outfile: Path, statsfile: Path) -> list[str] | None:
        iface = self.veth.outer
        if tool in ("tcpdump", "tcpdump-null"):
            return ["tcpdump", "-i", iface, "-B", str(self.args.buffer_kib), "-n", "-Z", "root",
                    "-w", str(outfile) if tool == "tcpdump" else "/dev/null"]
        return [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--iface", iface,
                "--buffer-kib", str(self.args.buffer_kib), "--worker-out", str(statsfile),
                "--worker-pcap", str(outfile)]

    def replay(self, kind: str, rate: int | None, packets: int) -> dict:
        loops = max(1, packets // FILE_FRAMES)
        cmd = ["tcpreplay", "-q", "-i", self.veth.inner, f"--loop={loops}", "--preload-pcap"]
        cmd += ["--topspeed"] if rate is None else [f"--pps={rate}"]
        t0 = time.monotonic()
        r = subprocess.run(self.veth.in_ns(*cmd, str(self.traffic[kind])),
                           capture_output=True, text=True)
        wall = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"tcpreplay failed ({r.returncode}): {r.stderr.strip()}")
        info = parse_tcpreplay(r.stdout + r.stderr)
        info["wall"] = round(wall, 3)
        return info

    def run_one(self, tool: str, case: str) -> dict:
        kind, rate, packets = CASES[case][:3]
        outfile = self.workdir / f"{tool}.pcap"
        statsfile = self.workdir / f"{tool}.json"
        errfile = self.workdir / f"{tool}.err"
        perffile = self.workdir / f"{tool}.perf"
        for f in (outfile, statsfile, perffile):
            f.unlink(missing_ok=True)
        cmd = self.command(tool, outfile, statsfile)
        marker = "listening on" if tool in ("tcpdump", "tcpdump-null", "pktstream-cli") else READY_MARK
        rec = {"tool": tool, "case": case, "frames": kind, "rate_pps": rate, "load_before": loadavg()}
        with open(errfile, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=self.workdir)
        try:
            deadline = time.monotonic() + 60
            while marker not in errfile.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tool} did not start: {errfile.read_text()[-2000:]}")
                time.sleep(0.02)
            time.sleep(0.3)  # margin: the tools print their marker right after pcap_activate
            cpu_ready = proc_cpu(proc.pid)
            perf = None
            if self.args.cpu_clock == "perf" and tool not in WORKERS:
                perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "task-clock", "-p", str(proc.pid),
                                         "-o", str(perffile)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                time.sleep(0.1)
            rx0 = if_counters(self.veth.outer)
            t0 = time.monotonic()
            rec["replay"] = self.replay(kind, rate, packets)
            time.sleep(self.args.settle)  # > the 1 s kernel block timeout tcpdump/pcapy use
            rx1 = if_counters(self.veth.outer)
            proc.send_signal(signal.SIGINT)
            _, status, ru = self._wait4(proc, 60)
            if perf is not None:  # perf stat -p ends with its target
                try:
                    perf.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    perf.send_signal(signal.SIGINT)
                    perf.wait(timeout=10)
            rec["wall_capture"] = round(time.monotonic() - t0, 3)
        finally:
            if proc.poll() is None and proc.returncode is None:
                proc.kill()
                try:
                    os.waitpid(proc.pid, 0)
                except ChildProcessError:
                    pass
        err_text = errfile.read_text(errors="replace")
        rec["exit_status"] = status
        if status != 0:
            rec["error"] = err_text[-2000:]
        rec["offered"] = rec["replay"].get("sent")
        rec["arrived"] = rx1["rx_packets"] - rx0["rx_packets"]
        rec["if_rx_dropped"] = rx1["rx_dropped"] - rx0["rx_dropped"]
        # capture phase = whole life (rusage, µs resolution) - start-up (/proc, 1/CLK_TCK s)
        rec["cpu_total_incl_startup"] = round(ru.ru_utime + ru.ru_stime, 3)
        rec["cpu_startup"] = round(sum(cpu_ready), 3)
        rec["cpu_user"] = round(max(0.0, ru.ru_utime - cpu_ready[0]), 3)
        rec["cpu_sys"] = round(max(0.0, ru.ru_stime - cpu_ready[1]), 3)
        rec["cpu"] = round(rec["cpu_user"] + rec["cpu_sys"], 3)
        task_clock = parse_task_clock(perffile)
        if task_clock is not None:
            rec["cpu_rusage"] = rec["cpu"]
            rec["cpu_task_clock"] = round(task_clock, 4)
            rec["cpu"] = rec["cpu_task_clock"]
        rec["minor_faults"] = ru.ru_minflt  # whole process life, start-up included
        rec["ctx_switches"] = {"voluntary": ru.ru_nvcsw, "involuntary": ru.ru_nivcsw}
        span = json.loads(statsfile.read_text()) if statsfile.exists() else {}
        if "cpu_span" in span:  # measured inside the worker, from readiness to end of capture
            rec["cpu_outside"] = rec["cpu"]
            rec["cpu"] = round(span["cpu_span"], 4)
            rec["cpu_user"] = round(span["cpu_span_user"], 3)
            rec["cpu_sys"] = round(span["cpu_span_sys"], 3)
        if tool in WORKERS and tool != "pktstream-cli":
            stats = span
            rec["captured"] = stats.get("captured")
        else:
            stats = parse_summary(err_text)
            rec["tool_reported_captured"] = stats.get("captured")
            if tool in FILE_WRITERS:
                rec["captured"] = count_pcap_records(outfile) if outfile.exists() else None
                rec["file_bytes"] = outfile.stat().st_size if outfile.exists() else None
            else:
                rec["captured"] = stats.get("captured")
        rec["kernel_received"] = stats.get("kernel_received")
        rec["kernel_dropped"] = stats.get("kernel_dropped")
        if "ring_drops" in stats:
            rec["ring_drops"] = stats["ring_drops"]
        if rec["captured"]:
            rec["cpu_per_mpkt"] = round(rec["cpu"] / rec["captured"] * 1e6, 3)
        if rec["captured"] is not None and rec["offered"]:
            rec["captured_pct"] = round(100.0 * rec["captured"] / rec["offered"], 2)
        rec["load_after"] = loadavg()
        outfile.unlink(missing_ok=True)
        return rec

    @staticmethod
    def _wait4(proc: subprocess.Popen, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return pid, proc.returncode, ru
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return pid, proc.returncode, ru
            time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def add_ratios(results: list[dict]) -> None:
    """Ratios to tcpdump -w FILE (and CPU also to tcpdump -w /dev/null) of the same case and repeat."""
    by = {(r["case"], r["repeat"], r["tool"]): r for r in results}
    for r in results:
        for ref, suffix in (("tcpdump", "tcpdump"), ("tcpdump-null", "tcpdump_null")):
            t = by.get((r["case"], r["repeat"], ref))
            if not t:
                continue
            if ref == "tcpdump" and r.get("captured") is not None and t.get("captured"):
                r["captured_vs_tcpdump"] = round(r["captured"] / t["captured"], 3)
            if r.get("cpu_per_mpkt") and t.get("cpu_per_mpkt"):
                r[f"cpu_per_mpkt_vs_{suffix}"] = round(r["cpu_per_mpkt"] / t["cpu_per_mpkt"], 2)


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def table(results: list[dict]) -> str:
    head = ("| case | rep | capturer | offered | sent kpps | captured | captured % | kernel drops "
            "| CPU s (rusage user+sys) | CPU s / Mpkt | captured / tcpdump | CPU per pkt / tcpdump "
            "| CPU per pkt / tcpdump -w /dev/null | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        drops = r.get("kernel_dropped")
        if r.get("ring_drops"):
            drops = f"{drops} (+{r['ring_drops']} ring)"
        lines.append("| " + " | ".join([
            r["case"], str(r["repeat"]), r["tool"], _fmt(r.get("offered"), ","),
            _fmt((r.get("replay") or {}).get("pps", 0) / 1000, ".0f"), _fmt(r.get("captured"), ","),
            _fmt(r.get("captured_pct"), ".2f"), _fmt(drops, ",") if not isinstance(drops, str) else drops,
            f"{r['cpu']:.3f} ({r['cpu_user']:.2f}+{r['cpu_sys']:.2f})",
            _fmt(r.get("cpu_per_mpkt"), ".2f"), _fmt(r.get("captured_vs_tcpdump"), ".3f"),
            _fmt(r.get("cpu_per_mpkt_vs_tcpdump"), ".2f"), _fmt(r.get("cpu_per_mpkt_vs_tcpdump_null"), ".2f"),
            _fmt(r["load_before"][0], ".2f"),
        ]) + " |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """One row per case and capturer over all repeats: range of captured %, mean CPU/Mpkt and
    mean per-repeat ratios to tcpdump."""
    import statistics
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["case"], r["tool"]), []).append(r)
    head = ("| case | capturer | runs | sent kpps | captured % | kernel (+ring) drops | CPU s / Mpkt (rusage user+sys) "
            "| captured / tcpdump | CPU per pkt / tcpdump | CPU per pkt / tcpdump -w /dev/null |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def rng(vals, spec):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        lo, hi = min(vals), max(vals)
        a, b = format(lo, spec), format(hi, spec)
        return a if a == b else f"{a}–{b}"

    def mean(vals, spec):
        vals = [v for v in vals if v is not None]
        return format(statistics.mean(vals), spec) if vals else "-"

    for (case, tool), rs in groups.items():
        drops = [(r.get("kernel_dropped") or 0) + (r.get("ring_drops") or 0) for r in rs]
        ring = sum(r.get("ring_drops") or 0 for r in rs)
        cpu = [r.get("cpu_per_mpkt") for r in rs]
        user = [r["cpu_user"] / r["captured"] * 1e6 for r in rs if r.get("captured")]
        sys_ = [r["cpu_sys"] / r["captured"] * 1e6 for r in rs if r.get("captured")]
        lines.append("| " + " | ".join([
            case, tool, str(len(rs)), rng([(r.get("replay") or {}).get("pps", 0) / 1000 for r in rs], ".0f"),
            rng([r.get("captured_pct") for r in rs], ".1f"),
            rng(drops, ",") + (f" (incl. {ring:,} ring)" if ring else ""),
            f"{mean(cpu, '.2f')} ({mean(user, '.2f')}+{mean(sys_, '.2f')})",
            mean([r.get("captured_vs_tcpdump") for r in rs], ".2f"),
            mean([r.get("cpu_per_mpkt_vs_tcpdump") for r in rs], ".2f"),
            mean([r.get("cpu_per_mpkt_vs_tcpdump_null") for r in rs], ".2f"),
        ]) + " |")
    return "\n".join(lines)


def baseline_diff(results: list[dict], path: Path) -> str:
    old = json.loads(path.read_text())["results"]
    idx = {(r["case"], r["tool"]): r for r in old}
    lines = [f"Against {path}:", "| case | capturer | captured % (old -> new) | CPU s/Mpkt (old -> new) |",
             "|---|---|---|---|"]
    for r in results:
        o = idx.get((r["case"], r["tool"]))
        if o:
            lines.append(f"| {r['case']} | {r['tool']} | {_fmt(o.get('captured_pct'), '.2f')} -> "
                         f"{_fmt(r.get('captured_pct'), '.2f')} | {_fmt(o.get('cpu_per_mpkt'), '.2f')} -> "
                         f"{_fmt(r.get('cpu_per_mpkt'), '.2f')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def available(tool: str) -> str | None:
    """None if the capturer can run here, else why not."""
    if tool.startswith("tcpdump") and not shutil.which("tcpdump"):
        return "tcpdump not installed (apt-get install tcpdump)"
    for t, mod, pkg in (("pcapy", "pcapy", "pcapy-ng"), ("scapy", "scapy", "scapy")):
        if tool == t:
            import importlib.util
            if importlib.util.find_spec(mod) is None:
                return f"{pkg} not installed (.venv/bin/pip install -e '.[bench]')"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma-separated traffic cases (default all: {','.join(DEFAULT_CASES)})")
    ap.add_argument("--tools", default=",".join(CAPTURERS),
                    help="comma-separated capturers to run where a case includes them")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every case (order of capturers reversed on odd repeats)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every case's packet count")
    ap.add_argument("--buffer-kib", type=int, default=32768,
                    help="kernel buffer for every libpcap capturer, KiB (default 32768 = pktstream's default)")
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds between the end of the replay and SIGINT to the capturer")
    ap.add_argument("--cpu-clock", choices=("perf", "rusage"),
                    default="perf" if shutil.which("perf") else "rusage",
                    help="capture-phase CPU from perf stat task-clock (precise; default when perf "
                         "exists) or from rusage minus /proc at readiness (tick-sampled: inflates "
                         "processes that wake often but briefly, i.e. every capturer at low rates)")
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where capture files go while a run lasts (default /dev/shm)")
    ap.add_argument("--out", help="JSON results file (default bench/results/capture-<date>.json)")
    ap.add_argument("--baseline", help="earlier results JSON to compare against")
    ap.add_argument("--render", metavar="RESULTS.json",
                    help="only print the tables of an earlier results file (no capture)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--iface", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-pcap", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        if args.worker == "pktstream-cli":
            worker_pktstream_cli(args.iface, args.buffer_kib * 1024, args.worker_out, args.worker_pcap)
        else:
            WORKERS[args.worker](args.iface, args.buffer_kib * 1024, args.worker_out)
        return 0

    if args.render:
        data = json.loads(Path(args.render).read_text())
        m = data["meta"]
        print(f"# {m['date']}  {m['machine']['cpu_model']} x{m['machine']['nproc']}  kernel "
              f"{m['machine']['kernel']}  {m['machine']['libpcap']}\n# {m['command']}\n"
              f"# before: {m['uptime_before']}\n# after:  {m['uptime_after']}\n")
        print(summary(data["results"]))
        print()
        print(table(data["results"]))
        if args.baseline:
            print()
            print(baseline_diff(data["results"], Path(args.baseline)))
        return 0

    if os.geteuid() != 0:
        print("bench_capture: needs root (network namespaces, live capture)", file=sys.stderr)
        return 1
    for tool in ("ip", "tcpreplay"):
        if not shutil.which(tool):
            print(f"bench_capture: {tool} not found (./run setup installs it)", file=sys.stderr)
            return 1
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"bench_capture: unknown cases {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    wanted = [t for t in args.tools.split(",") if t]
    skipped = {t: why for t in wanted if (why := available(t))}
    for t, why in skipped.items():
        print(f"bench_capture: skipping {t}: {why}", file=sys.stderr)

    from pktstream.lab import traffic as trafficgen
    from pktstream.lab.netns import Veth

    started = _dt.datetime.now().astimezone()
    meta = {"date": started.isoformat(timespec="seconds"), "machine": machine_info(),
            "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "command": " ".join(["python", *sys.argv]),
            "buffer_kib": args.buffer_kib, "cpu_clock": args.cpu_clock, "settle_s": args.settle, "scale": args.scale,
            "skipped": skipped,
            "notes": ["tcpdump runs with -B equal to pktstream's kernel buffer (buffer_kib) and -Z root",
                      "tcpdump and pktstream-cli write the file (workdir); the others only count",
                      "CPU: Python capturers measure CLOCK_PROCESS_CPUTIME_ID from readiness to the end "
                      "of capture themselves; tcpdump: perf stat task-clock from readiness to exit "
                      "(cpu_clock=perf) or rusage minus /proc at readiness; cpu_user/cpu_sys from "
                      "rusage (tick-sampled); softirq work done "
                      "in the sender's context (veth delivery, AF_PACKET ring copy) is not included",
                      "scapy runs only in the short *-scapy cases (it cannot keep up with the others)"]}
    print(f"# {meta['date']}  {meta['machine']['cpu_model']} x{meta['machine']['nproc']}  "
          f"kernel {meta['machine']['kernel']}  {meta['machine']['libpcap']}", flush=True)
    print(f"# {meta['uptime_before']}", flush=True)

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pktstream-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        traffic = {"udp1514": workdir / "udp1514.pcap", "mixed": workdir / "mixed.pcap"}
        trafficgen.write_udp_pcap(str(traffic["udp1514"]), FILE_FRAMES, 1514)
        trafficgen.write_pcap(str(traffic["mixed"]), FILE_FRAMES)
        sizes = {k: (p.stat().st_size - 24) / FILE_FRAMES - 16 for k, p in traffic.items()}
        meta["mean_frame_bytes"] = {k: round(v, 1) for k, v in sizes.items()}
        veth = Veth(prefix="pb")
        try:
            meta["veth"] = {"outer": veth.outer, "inner": veth.inner, "ns": veth.ns}
            bench = Bench(args, veth, workdir, traffic)
            for rep in range(args.repeat):
                for case in cases:
                    kind, rate, packets, tools = CASES[case]
                    CASES[case] = (kind, rate, max(FILE_FRAMES, int(packets * args.scale)), tools)
                    order = [t for t in tools if t in wanted and t not in skipped]
                    if rep % 2:
                        order.reverse()
                    for tool in order:
                        try:
                            rec = bench.run_one(tool, case)
                        except (RuntimeError, OSError, ValueError) as exc:  # record, go on
                            print(f"{case:18} rep {rep} {tool:14} FAILED: {exc}", flush=True)
                            results.append({"tool": tool, "case": case, "repeat": rep,
                                            "error": str(exc), "cpu": 0.0, "cpu_user": 0.0,
                                            "cpu_sys": 0.0, "load_before": loadavg(), "replay": {},
                                            "exit_status": None, "captured": None, "offered": None})
                            continue
                        rec["repeat"] = rep
                        results.append(rec)
                        print(f"{case:18} rep {rep} {tool:14} offered {rec['offered'] or 0:>9,} "
                              f"({(rec['replay'].get('pps') or 0) / 1000:6.1f} kpps) "
                              f"captured {rec['captured'] or 0:>9,} "
                              f"drops {rec.get('kernel_dropped')!s:>8} cpu {rec['cpu']:6.2f} s "
                              f"({rec.get('cpu_per_mpkt') or 0:6.2f} s/Mpkt) load {rec['load_before'][0]}"
                              + (f"  EXIT {rec['exit_status']}" if rec["exit_status"] else ""),
                              flush=True)
                    CASES[case] = (kind, rate, packets, tools)
        finally:
            veth.remove()
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta["duration_s"] = round((_dt.datetime.now().astimezone() - started).total_seconds(), 1)
    add_ratios(results)
    print()
    print(table(results))
    print()
    print(summary(results))
    print(f"\n# {meta['uptime_after']}   ({meta['duration_s']} s)")
    out = Path(args.out) if args.out else HERE / "results" / f"capture-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"# results: {out}")
    if args.baseline:
        print()
        print(baseline_diff(results, Path(args.baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
