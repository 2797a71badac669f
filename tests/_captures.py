"""Real captures for the file-format, decode and CLI tests, made once per test session.

tcpdump (ns and µs pcap), tshark (pcapng) and tcpdump on the namespace's ``any`` device
(Linux cooked v2 and v1) capture the same replayed multi-protocol traffic on a veth pair;
editcap, mergecap, zstd and gzip derive the other files from those.
"""
from __future__ import annotations

import gzip
import re
import shutil
import signal
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

from conftest import Proc, pcap_count, wait_pcap_count, wait_until
from pktstream.lab.netns import Veth

_CACHE: dict[str, dict[str, Path]] = {}
N_PACKETS = 2000


def _sh(*cmd) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def tshark_rows(path, *fields: str, extra: tuple = ()) -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), *extra, "-T", "fields", "-E", "occurrence=f"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def tshark_frames(path) -> list[tuple[int, int, int, int]]:
    """(ts_ns, frame.len, frame.cap_len, interface id) per packet as tshark reads them."""
    rows = tshark_rows(path, "frame.time_epoch", "frame.len", "frame.cap_len", "frame.interface_id")
    return [(int(Decimal(r[0]) * 10**9), int(r[1]), int(r[2]), int(r[3] or 0)) for r in rows]


def pcapng_count(path: Path) -> int:
    """Enhanced/simple packet blocks in a (possibly still growing) little-endian pcapng file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    n, pos = 0, 0
    while pos + 12 <= len(data):
        btype, blen = struct.unpack_from("<II", data, pos)
        if blen < 12 or pos + blen > len(data):
            break
        n += btype in (3, 6)
        pos += blen
    return n


def write_pcap_be_us(src_records: list[tuple[int, int, bytes]], path: Path, link_type: int = 1) -> None:
    """A big-endian microsecond pcap file (no tool writes one), from (ts_ns, wirelen, data)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, link_type))
        for ts, wire, data in src_records:
            f.write(struct.pack(">IIII", ts // 10**9, ts % 10**9 // 1000, len(data), wire) + data)


def write_pcapng_be(src_records: list[tuple[int, int, bytes]], path: Path, *, tsresol: int = 6,
                    name: str = "be0") -> None:
    """A big-endian pcapng file (SHB, IDB with if_name and if_tsresol, EPBs)."""
    def block(btype: int, body: bytes) -> bytes:
        return struct.pack(">II", btype, len(body) + 12) + body + struct.pack(">I", len(body) + 12)

    def opt(code: int, val: bytes) -> bytes:
        return struct.pack(">HH", code, len(val)) + val + b"\0" * (-len(val) % 4)

    out = [block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))]
    out.append(block(1, struct.pack(">HHI", 1, 0, 262144) + opt(2, name.encode())
                     + opt(9, bytes([tsresol])) + opt(0, b"")))
    div = 10 ** (9 - tsresol)
    for ts, wire, data in src_records:
        t = ts // div
        out.append(block(6, struct.pack(">IIIII", 0, t >> 32, t & 0xFFFFFFFF, len(data), wire)
                         + data + b"\0" * (-len(data) % 4)))
    Path(path).write_bytes(b"".join(out))


def _all_but_kernel_drops(tcpdump: Proc, path: Path, n: int) -> bool:
    """Whether tcpdump's file holds ``n`` packets, or all it captured with the rest counted as
    dropped by the kernel (its counters, printed on SIGUSR1)."""
    have = pcap_count(path)
    if have >= n:
        return True
    tcpdump.p.send_signal(signal.SIGUSR1)  # answered on stderr; a later poll reads it
    captured = re.findall(r"(\d+) packets? captured", tcpdump.stderr)
    dropped = re.findall(r"(\d+) packets? dropped by kernel", tcpdump.stderr)
    return bool(captured and dropped) and int(dropped[-1]) > 0 and have == int(captured[-1]) \
        and have + int(dropped[-1]) >= n


def real_captures(base: Path, mixed_pcap: Path) -> dict[str, Path]:
    if "files" in _CACHE:
        return _CACHE["files"]
    d = base
    files = {k: d / v for k, v in {
        "ns": "tcpdump-ns.pcap", "us": "tcpdump-us.pcap", "tshark": "tshark.pcapng",
        "sll2": "any-sll2.pcap", "sll": "any-sll.pcap"}.items()}
    with Veth("pf") as v:
        procs: list[Proc] = []
        procs += [
            Proc(["tcpdump", "-i", v.outer, "-n", "-B", "262144", "--immediate-mode",
                  "--time-stamp-precision=nano", "-U", "-w", str(files["ns"])]),
            Proc(["tcpdump", "-i", v.outer, "-n", "-B", "262144", "--immediate-mode", "-U",
                  "-w", str(files["us"])]),
            Proc(v.in_ns("tcpdump", "-i", "any", "-n", "-B", "262144", "--immediate-mode",
                         "--time-stamp-precision=nano", "-U", "-w", str(files["sll2"]))),
            Proc(v.in_ns("tcpdump", "-i", "any", "-y", "LINUX_SLL", "-n", "-B", "262144",
                         "--immediate-mode", "-U", "-w", str(files["sll"]))),
        ]
        try:  # the captures are stopped on failure too (none outlives the namespace)
            for p in procs:
                p.wait_for("listening on")
            procs.append(Proc(["tshark", "-i", v.outer, "-n", "-w", str(files["tshark"])]))
            procs[-1].wait_for("Capturing on")  # dumpcap says so once its capture is open
            v.replay(mixed_pcap, pps=20000)
            # every capture has every packet (on "any", the replay leaving the inner end) before
            # stopping; "any" in the namespace may have lost a few to its kernel buffer while
            # three suites ran on two cores (1,971 of 2,000 once): a file then holds all but what
            # tcpdump itself counts as dropped by the kernel
            for k in ("ns", "us"):
                wait_pcap_count(files[k], N_PACKETS)
            for k, p in (("sll2", procs[2]), ("sll", procs[3])):
                wait_until(lambda k=k, p=p: _all_but_kernel_drops(p, files[k], N_PACKETS), 30,
                           f"{N_PACKETS} packets, less tcpdump's kernel drops, in {files[k]}", interval=0.1)
            wait_until(lambda: pcapng_count(files["tshark"]) >= N_PACKETS, 30,
                       f"tshark to write {N_PACKETS} packets (has {pcapng_count(files['tshark'])})")
        finally:
            for p in procs:
                p.stop()
    # derived files
    files["pcapng_ns"] = d / "editcap-ns.pcapng"
    _sh("editcap", "-F", "pcapng", files["ns"], files["pcapng_ns"])
    files["multi"] = d / "merged-multi.pcapng"  # two interfaces: EN10MB (µs) + LINUX_SLL2 (ns)
    _sh("mergecap", "-w", files["multi"], files["tshark"], files["sll2"])
    files["multi_zst"] = d / "merged-multi.pcapng.zst"
    _sh("zstd", "-q", "-f", files["multi"], "-o", files["multi_zst"])
    raw = files["ns"].read_bytes()
    files["frames2_zst"] = d / "two-frames.pcap.zst"  # concatenated zstd frames
    import zstandard
    half = len(raw) // 2
    files["frames2_zst"].write_bytes(zstandard.ZstdCompressor().compress(raw[:half])
                                     + zstandard.ZstdCompressor().compress(raw[half:]))
    files["gz"] = d / "tcpdump-us.pcap.gz"
    files["gz"].write_bytes(gzip.compress(files["us"].read_bytes()))
    files["commented"] = d / "commented.pcapng"
    _sh("editcap", "-a", "3:hello from editcap", "-a", "10:second comment", files["tshark"], files["commented"])
    files["sections"] = d / "two-sections.pcapng"  # two SHBs (cat of two pcapng files)
    sll_ng = d / "sll.pcapng"
    _sh("editcap", "-F", "pcapng", files["sll"], sll_ng)
    files["sections"].write_bytes(files["tshark"].read_bytes() + sll_ng.read_bytes())
    from conftest import read_pcap_dpkt
    recs = read_pcap_dpkt(files["ns"])
    files["be_us"] = d / "big-endian-us.pcap"
    write_pcap_be_us(recs, files["be_us"])
    files["be_ng"] = d / "big-endian.pcapng"
    write_pcapng_be(recs, files["be_ng"])
    _CACHE["files"] = files
    return files


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def interleaved_pcapng(path, n: int, *, names=("eth0", "eth1", "eth2"),
                       snaplens=(65535, 65535, 65535)) -> list[tuple[str, bytes, str]]:
    """A pcapng written block by block here (not by pktstream): three Ethernet interfaces
    interleaved packet by packet (the first two alternating, every tenth packet on the third;
    ``names`` may repeat), a comment on every 97th packet, frames cut to their interface's
    snap length; returns (interface name, captured bytes, comment) per packet in file order."""
    def block(btype: int, body: bytes) -> bytes:
        return struct.pack("<II", btype, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))

    def opt(code: int, value: bytes) -> bytes:
        return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)
    blocks = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))]
    for name, snap in zip(names, snaplens):
        blocks.append(block(1, struct.pack("<HHI", 1, 0, snap) + opt(2, name.encode())
                            + opt(9, b"\x09") + opt(0, b"")))
    want = []
    for j in range(n):
        frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + j.to_bytes(4, "big") + bytes(40 + j % 50)
        iface = j % 2 if j % 10 else 2
        ts = 1_732_708_800_000_000_000 + 1000 * j
        data = frame[:snaplens[iface]]
        body = (struct.pack("<IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data), len(frame))
                + data + bytes(-len(data) % 4))
        note = f"note {j}" if j % 97 == 5 else ""
        if note:
            body += opt(1, note.encode()) + opt(0, b"")
        blocks.append(block(6, body))
        want.append((names[iface], data, note))
    Path(path).write_bytes(b"".join(blocks))
    return want
