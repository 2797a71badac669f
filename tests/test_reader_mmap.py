"""Reading memory-mapped files (``memory_map=True``): the same batches as the read() path for
every format, batches that outlive the reader, files that change size while mapped."""
from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pktstream
from _captures import write_pcap_be_us, write_pcapng_be
from conftest import read_pcap_dpkt
from pktstream import FileFormatError, PacketBatch
from pktstream.formats import TruncatedFileWarning, open_reader, open_writer

NS_MAGIC = 0xA1B23C4D


def _pcap(path: Path, recs, *, snaplen: int = 262144, usec: bool = False, link_type: int = 1) -> Path:
    """A little-endian pcap file from (ts_ns, wirelen, data), written here with struct."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4 if usec else NS_MAGIC, 2, 4, 0, 0, snaplen, link_type)]
    for ts, wire, data in recs:
        frac = ts % 10**9 // 1000 if usec else ts % 10**9
        out.append(struct.pack("<IIII", ts // 10**9, frac, len(data), wire) + data)
    path.write_bytes(b"".join(out))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, mixed_pcap) -> dict[str, Path]:
    """Every uncompressed layout the reader converts or wraps, from the 2000 mixed frames."""
    d = tmp_path_factory.mktemp("mmap")
    recs = read_pcap_dpkt(mixed_pcap)
    f = {"ns": _pcap(d / "ns.pcap", recs), "us": _pcap(d / "us.pcap", recs, usec=True)}
    f["be_us"] = d / "be-us.pcap"
    write_pcap_be_us(recs, f["be_us"])
    f["be_ng"] = d / "be.pcapng"
    write_pcapng_be(recs, f["be_ng"])
    # snaplen edge cases: caplen == snaplen everywhere, empty packets, one 9000-byte packet
    # longer than the smallest window (the window grows as the read() buffer does)
    snap = [(ts, w, data[:64]) for ts, w, data in recs[:300]]
    f["snap64"] = _pcap(d / "snap64.pcap", snap, snaplen=64)
    f["empty_packets"] = _pcap(d / "empty.pcap", [(10**9 + i, 60, b"") for i in range(50)] + recs[:20])
    f["jumbo"] = _pcap(d / "jumbo.pcap", recs[:30] + [(2 * 10**9, 9000, bytes(range(256)) * 35 + bytes(40))]
                       + recs[30:90])
    f["header_only"] = _pcap(d / "header.pcap", [])
    # pcapng: two interfaces with different link types, comments; two sections (cat of files)
    body = b"".join(struct.pack("<IIII", t // 10**9, t % 10**9, len(x), w) + x for t, w, x in recs[:500])
    f["ng_multi"] = d / "multi.pcapng"
    with open_writer(f["ng_multi"], format="pcapng") as w:
        for i in range(6):
            w.write(PacketBatch.from_records(body, link_type=1 if i % 2 else 113, interface=f"if-{i % 3}"),
                    {3: f"comment {i}"})
    f["ng_sections"] = d / "sections.pcapng"
    f["ng_sections"].write_bytes(f["ng_multi"].read_bytes() + f["be_ng"].read_bytes())
    return f


def _batches(path, **kw) -> list[tuple]:
    """Everything a batch says, per batch, plus the reader's metadata at that batch."""
    out = []
    with warnings.catch_warnings(record=True) as caught, open_reader(path, comments=True, **kw) as r:
        warnings.simplefilter("always")
        assert r.memory_mapped == kw.get("memory_map", False)
        for b in r:
            out.append((b.interface, b.link_type, b.snaplen, len(b), bytes(b), b.ts_ns.tolist(),
                        b.wirelen.tolist(), b.caplen.tolist(), b.offset.tolist(), dict(r.comments), r.last_range))
            assert not b.ts_ns.flags.writeable and not b.offset.flags.writeable
    out.append(tuple((type(w.message).__name__, str(w.message)) for w in caught))
    return out


@pytest.mark.parametrize("name", ["ns", "us", "be_us", "be_ng", "snap64", "empty_packets", "jumbo", "header_only",
                                  "ng_multi", "ng_sections"])
@pytest.mark.parametrize("batch_bytes", [4096, 65536, 1 << 20])
def test_mapped_batches_equal_read_batches(files, name, batch_bytes):
    path = files[name]
    mapped = _batches(path, batch_bytes=batch_bytes, memory_map=True)
    assert mapped == _batches(path, batch_bytes=batch_bytes)
    if name != "header_only":
        assert len(mapped) > 1


def test_le_ns_batches_are_views_of_the_mapping(files):
    with open_reader(files["ns"], batch_bytes=65536, memory_map=True) as r:
        b = next(iter(r))
        owner = b.buffer_owner
        assert isinstance(owner, memoryview) and type(owner.obj).__name__ == "mmap"
        assert r.bytes_read == r.last_range[1]
    with open_reader(files["us"], batch_bytes=65536, memory_map=True) as r:  # converted: a copy
        assert isinstance(next(iter(r)).buffer_owner.obj, bytearray)


def _mapped(path: Path) -> int:
    """How many mappings of ``path`` this process has (/proc/self/maps)."""
    real = str(path.resolve())
    return sum(line.rstrip("\n").endswith(real) for line in Path("/proc/self/maps").read_text().splitlines(True))


def test_batches_kept_after_close_stay_valid_and_the_mapping_goes_with_the_last(files):
    path = files["ns"]
    expected = _batches(path, batch_bytes=16384)
    r = open_reader(path, batch_bytes=16384, memory_map=True)
    kept = list(r)
    view = memoryview(kept[3])[16:40]  # a view of a batch outlives the batch too
    third = kept[3][0]
    r.close()
    del r
    gc.collect()
    assert _mapped(path) == 1
    assert [bytes(b) for b in kept] == [e[4] for e in expected[:-1]]
    assert [b.ts_ns.tolist() for b in kept] == [e[5] for e in expected[:-1]]
    want_view, want_third = bytes(view), bytes(third)
    del kept
    assert _mapped(path) == 1 and bytes(view) == want_view and bytes(third) == want_third
    del view
    assert _mapped(path) == 1  # the packet view still holds it
    del third
    assert _mapped(path) == 0
    # nothing held: closing the reader unmaps at once (no garbage collection needed)
    with open_reader(path, memory_map=True) as r:
        assert sum(map(len, r)) == 2000
        assert _mapped(path) == 1
    assert _mapped(path) == 0


def test_what_is_not_mapped(files, tmp_path):
    part = tmp_path / "growing.pcap.part"
    part.write_bytes(files["ns"].read_bytes())
    gz = tmp_path / "ns.pcap.gz"
    import gzip
    gz.write_bytes(gzip.compress(files["ns"].read_bytes()))
    for source in (part, gz):
        with open_reader(source, memory_map=True) as r:
            assert not r.memory_mapped and sum(map(len, r)) == 2000
    with open(files["ns"], "rb") as f, open_reader(f, memory_map=True) as r:  # a file object: not ours
        assert not r.memory_mapped
    with open_reader(files["ns"]) as r:  # the default
        assert not r.memory_mapped
    rfd, wfd = os.pipe()
    os.write(wfd, files["header_only"].read_bytes())
    os.close(wfd)
    with open(rfd, "rb", buffering=0) as f:
        with open_reader(f"/proc/self/fd/{f.fileno()}", memory_map=True) as r:  # a pipe by path
            assert not r.memory_mapped and list(r) == []


@pytest.mark.parametrize("name", ["ns", "us", "ng_multi"])
def test_truncated_final_record_is_reported_as_by_read(files, tmp_path, name):
    data = files[name].read_bytes()
    cut = tmp_path / ("cut" + files[name].suffix)
    cut.write_bytes(data[:len(data) - 37])
    mapped = _batches(cut, batch_bytes=8192, memory_map=True)
    assert mapped == _batches(cut, batch_bytes=8192)
    assert mapped[-1] and mapped[-1][-1][0] == "TruncatedFileWarning"
    with pytest.raises(FileFormatError, match="truncated") as exc:
        list(pktstream.read(cut, truncated="error", memory_map=True))
    with pytest.raises(FileFormatError) as exc_read:
        list(pktstream.read(cut, truncated="error"))
    assert exc.value.offset == exc_read.value.offset


def test_hostile_length_in_a_mapped_file(files, tmp_path):
    data = bytearray(files["ns"].read_bytes())
    at = 24 + 16 + struct.unpack_from("<I", data, 24 + 8)[0]  # the second record
    struct.pack_into("<I", data, at + 8, 0xFFFFFFF0)  # second record's caplen
    p = tmp_path / "hostile.pcap"
    p.write_bytes(data)
    got = []
    with pytest.raises(FileFormatError, match=f"packet length 4294967280 larger than .* at byte {at}"):
        for b in pktstream.read(p, memory_map=True):
            got.append(len(b))
    assert got == [1]


def test_file_growing_while_mapped_is_read_on_with_read(files, tmp_path):
    recs = read_pcap_dpkt(files["ns"])
    p = _pcap(tmp_path / "grow.pcap", recs[:1000])
    more = files["ns"].read_bytes()[len(p.read_bytes()):]
    with open_reader(p, batch_bytes=8192, memory_map=True) as r:
        it = iter(r)
        first = next(it)
        assert r.memory_mapped
        with open(p, "ab") as f:
            f.write(more[:len(more) // 2 + 5])  # half the rest and a partial record
            f.flush()
            with pytest.warns(TruncatedFileWarning):
                rest = list(it)
        assert not r.memory_mapped
    got = [bytes(x) for b in [first, *rest] for x in b]
    assert got == [d for _, _, d in recs[:len(got)]] and len(got) > 1000


# A truncation while mapped: the reader notices the new size before its next window (fstat,
# and MADV_POPULATE_READ failing with EFAULT, Linux >= 5.14) and reads on with read(). Run in a
# child: without those checks this is a SIGBUS.
_TRUNCATE = r"""
import os, sys, warnings
import pktstream
from pktstream.formats.reader import CaptureReader
path, cut, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "keep"
if sys.argv[3] == "no-fstat":  # the cut between the size check and the window: MADV_POPULATE_READ sees it
    CaptureReader._map_changed = lambda self: False
got, held = [], []
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for i, b in enumerate(pktstream.read(path, batch_bytes=8192, memory_map=True)):
        got += [bytes(p) for p in b]
        if keep:
            held.append(b)
        if i == 2:
            os.truncate(path, cut)
    print(len(got), len(w))
    for b in held:  # pages past the new end of the file: SIGBUS (documented residual risk)
        bytes(b)
"""


def test_file_truncated_while_mapped_ends_like_read(files, tmp_path):
    p = tmp_path / "t.pcap"
    p.write_bytes(files["ns"].read_bytes())
    data = files["ns"].read_bytes()
    recs = read_pcap_dpkt(files["ns"])
    cut = len(data) // 3  # after the 3 batches (24 KiB) read before the cut
    whole = [i for i in range(len(recs)) if 24 + sum(16 + len(r[2]) for r in recs[:i + 1]) <= cut]
    for how in ("drop", "no-fstat"):
        p.write_bytes(data)
        run = subprocess.run([sys.executable, "-c", _TRUNCATE, str(p), str(cut), how], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, (how, run.returncode, run.stderr)
        n, warned = map(int, run.stdout.split())
        assert warned == 1 and n == len(whole)
    # the residual risk, why mapping is opt-in: batches held across a cut into them
    p.write_bytes(data)
    run = subprocess.run([sys.executable, "-c", _TRUNCATE, str(p), "8192", "keep"], capture_output=True,
                         text=True, timeout=60)
    if os.environ.get("PKTSTREAM_ASAN_PRELOAD"):  # ./run sanitize: ASan reports the SIGBUS and aborts
        assert "AddressSanitizer: BUS" in run.stderr, (run.returncode, run.stderr)
    else:
        assert run.returncode == -signal.SIGBUS, (run.returncode, run.stderr)


def test_index_filled_by_the_walk_is_checked_against_the_buffer(files):
    """pcap_walk's index arrays equal the batch's own walk; from_records(index=...) refuses any
    entry that would reach outside the buffer."""
    import numpy as np

    from pktstream._records import pcap_walk
    for name, swap, usec in (("ns", False, False), ("us", False, True), ("be_us", True, True)):
        data = files[name].read_bytes()
        k = len(data) // 16 + 1
        arrays = (np.empty(k, np.int64), np.empty(k, np.uint32), np.empty(k, np.uint32), np.empty(k, np.int64))
        dst = bytearray(len(data)) if swap or usec else None
        status, pos, n, out = pcap_walk(data, 24, len(data), swap, usec, 262144, dst, -1, *arrays)
        assert n == 2000 and pos == len(data)
        records = bytes(dst[:out]) if dst is not None else data[24:]
        plain = PacketBatch.from_records(records, link_type=1)
        got = tuple(a[:n] for a in arrays)
        for mine, theirs in zip(got, (plain.ts_ns, plain.caplen, plain.wirelen, plain.offset)):
            assert mine.tolist() == theirs.tolist()
        fast = PacketBatch.from_records(records, link_type=1, validate=False, count=n,
                                        index=tuple(a.copy() for a in got))
        assert [bytes(p) for p in fast] == [bytes(p) for p in plain]
        # a short walk stops at the arrays' length
        assert pcap_walk(data, 24, len(data), swap, usec, 262144, dst, -1, *(a[:7] for a in arrays))[2] == 7
    ts, cap, wire, off = (a.copy() for a in got)
    for bad_off, bad_cap in ((15, 10), (len(records) + 1, 0), (len(records) - 5, 6), (-1, 0)):
        o, c = off.copy(), cap.copy()
        o[1000], c[1000] = bad_off, bad_cap
        with pytest.raises(FileFormatError, match="index entry 1000"):
            PacketBatch.from_records(records, link_type=1, validate=False, count=n, index=(ts, c, wire, o))
    with pytest.raises(ValueError, match="index arrays"):
        PacketBatch.from_records(records, link_type=1, validate=False, count=n, index=(ts, cap[:-1], wire, off))
    with pytest.raises(ValueError, match="all four"):
        pcap_walk(data, 24, len(data), swap, usec, 262144, None, -1, arrays[0])
    # the batch keeps its own checked copies: writing the caller's arrays (views of a reused
    # buffer) afterwards changes nothing it reads (it read far outside the buffer before)
    bases = tuple(a.copy() for a in arrays)
    views = tuple(a[:n] for a in bases)
    kept = PacketBatch.from_records(records, link_type=1, validate=False, count=n, index=views)
    bases[3][:n] = 1 << 40
    bases[1][:n] = 1 << 31
    assert kept.offset.tolist() == plain.offset.tolist() and kept.caplen.tolist() == plain.caplen.tolist()
    assert len(kept.filter("tcp or udp")) == len(plain.filter("tcp or udp"))
