"""The archive end to end: real receivers with --index (per-sensor rotated .pcap.zst and a merged
rotated pcapng), four sensors on veth pairs, replayed traffic; ``pktstream query`` over the
archive equals ``tcpdump -r FILE -w - BPF`` over every file, merged in time order (tshark reads
the query's pcapng), also with time bounds at file edges."""
from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest

import pktstream
from conftest import PKTSTREAM, free_port, read_pcap_dpkt, tshark_fields, wait_received
from pktstream.lab.netns import Veth
from test_stream import receiver_cmd, sensor_cmd

pytestmark = pytest.mark.live

BPFS = ["host 198.18.0.1 and udp", "tcp", "not tcp and not udp", "vlan", "ip6", "udp port 53 or icmp",
        "ip[8] = 64 and udp"]


def tcpdump_packets(path: Path, bpf: str | None, *, refused_ok: bool = False) -> list[tuple[int, bytes]]:
    """``tcpdump -r`` (through ``zstd -dc`` for .zst) with the filter, nanosecond pcap out;
    ``refused_ok``: a filter libpcap refuses for the file's link type prints nothing (as
    tcpdump does), instead of failing."""
    path = Path(path)
    cmd = ["tcpdump", "-r", "-" if path.name.endswith(".zst") else str(path), "--time-stamp-precision=nano",
           "-w", "-"] + ([bpf] if bpf else [])
    z = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE) if path.name.endswith(".zst") else None
    r = subprocess.run(cmd, stdin=z.stdout if z else None, capture_output=True)
    if z is not None:
        z.stdout.close()
        assert z.wait() == 0
    if r.returncode != 0 and refused_ok:
        assert any(m in r.stderr for m in (b"rejects all packets", b"supported only on", b"not supported on")), \
            r.stderr
        return []
    assert r.returncode == 0, r.stderr
    import io
    return [(int(b.ts_ns[i]), bytes(b[i])) for b in pktstream.read(io.BytesIO(r.stdout)) for i in range(len(b))]


def capture_files(root: Path) -> list[Path]:
    """The capture files below ``root`` (not the index, not a receiver's markers)."""
    from pktstream.archive.store import CAPTURE_SUFFIXES
    return sorted(p for p in root.rglob("*") if p.is_file() and "_index" not in p.parts
                  and p.name.endswith(tuple(CAPTURE_SUFFIXES)))


def brute(root: Path, bpf, since=None, until=None) -> list[tuple[int, bytes]]:
    files = capture_files(root)
    out = [x for f in files for x in tcpdump_packets(f, bpf)
           if (since is None or x[0] >= since) and (until is None or x[0] < until)]
    out.sort(key=lambda x: x[0])
    return out


def query(root: Path, out: Path, bpf: str | None, *extra: str) -> tuple[list[tuple[int, bytes]], str]:
    r = subprocess.run([*PKTSTREAM, "query", str(root), *(bpf.split() if bpf else []), "-w", str(out), *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # tshark reads the pcapng and writes its packets, in file order, as a nanosecond pcap
    if not tshark_fields(out, "frame.number"):
        return [], r.stderr
    pcap = out.with_suffix(".pcap")
    subprocess.run(["tshark", "-r", str(out), "-F", "nsecpcap", "-w", str(pcap)], check=True, capture_output=True)
    return [(ts, data) for ts, _, data in read_pcap_dpkt(pcap)], r.stderr


def test_query_over_receiver_archives_equals_tcpdump(procs, tmp_path, mixed_pcap):
    root = tmp_path / "archive"
    root.mkdir()
    (root / "merged").mkdir()
    p1, p2 = free_port(), free_port()
    rx1 = procs(receiver_cmd(p1, "--output-dir", str(root / "by-sensor"), "--format", "pcap.zst",
                             "-C", "2KB", "-W", "3", "--index"))
    rx2 = procs(receiver_cmd(p2, "-w", str(root / "merged" / "all.pcapng"), "-C", "150KB", "--index"))
    rx1.wait_for("listening on")
    rx2.wait_for("listening on")
    with Veth() as a, Veth() as b, Veth() as c, Veth() as d:
        small = ("--block-size", "32KiB")  # many blocks: many rotated files
        sensors = [procs(sensor_cmd(p1, a.outer, "--sensor-id", "alpha", *small)),
                   procs(sensor_cmd(p1, b.outer, "--sensor-id", "beta", *small)),
                   procs(sensor_cmd(p2, c.outer, "--sensor-id", "gamma")),
                   procs(sensor_cmd(p2, d.outer, "--sensor-id", "delta"))]
        for s in sensors:
            s.wait_for("connected to receiver")
        threads = [threading.Thread(target=v.replay, args=(mixed_pcap,), kwargs={"pps": 8000}) for v in (a, b, c, d)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for rx, names in ((rx1, ("alpha", "beta")), (rx2, ("gamma", "delta"))):
            for n in names:
                wait_received(rx, 2000, n)
        for s in sensors:
            assert s.stop(signal.SIGTERM) == 0
        assert rx1.stop(signal.SIGTERM) == 0 and rx2.stop(signal.SIGTERM) == 0
        outer = {"gamma": c.outer, "delta": d.outer}
    captures = capture_files(root)
    assert len([p for p in captures if p.parent.name == "by-sensor"]) == 6        # -W 3 per sensor
    assert len([p for p in captures if p.parent.name == "merged"]) >= 3          # rotated
    a = pktstream.Archive(str(root))
    assert {r["path"] for r in a.catalog().to_pylist()} == {str(p.relative_to(root)) for p in captures}
    out = tmp_path / "q.pcapng"
    for bpf in BPFS:
        got, err = query(root, out, bpf)
        ref = brute(root, bpf)
        assert got == ref and len(ref) > 10, bpf
        assert "scanned without" in err and "(0 scanned" in err
    got, _ = query(root, out, None)
    names = {r[0] for r in tshark_fields(out, "frame.interface_name")}
    assert names == {"alpha/if0", "beta/if0", f"gamma/{outer['gamma']}", f"delta/{outer['delta']}"}
    # time bounds exactly at file edges (first and last packet of files)
    rows = sorted(a.catalog().to_pylist(), key=lambda r: r["path"])
    for row in (rows[0], rows[len(rows) // 2], rows[-1]):
        first, last = row["first_ts_ns"], row["last_ts_ns"]
        for since, until in ((first, last), (first, last + 1), (last, None), (None, first + 1)):
            extra = ([f"--since={since // 10**9}.{since % 10**9:09d}"] if since is not None else []) + \
                    ([f"--until={until // 10**9}.{until % 10**9:09d}"] if until is not None else [])
            got, _ = query(root, out, "tcp or udp", *extra)
            assert got == brute(root, "tcp or udp", since, until), (row["path"], since, until)
    # one sensor of the merged files (the Python API; pcapng interface names tell the sensor)
    got = [(int(b.ts_ns[i]), bytes(b[i])) for b in a.packets("udp", sensor="gamma") for i in range(len(b))]
    ref = sorted(((int(b.ts_ns[i]), bytes(b[i])) for f in captures if f.parent.name == "merged"
                  for b in pktstream.read(f, bpf="udp") if b.interface.startswith("gamma/")
                  for i in range(len(b))), key=lambda x: x[0])
    assert got == ref and len(ref) > 100
