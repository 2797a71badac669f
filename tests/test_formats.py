"""Capture-file readers and writers against tcpdump, tshark, editcap, mergecap, capinfos."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pktstream
from _captures import interleaved_pcapng, real_captures, tshark_frames, tshark_rows
from archive_data import _eth, _ipv4, _udp, records
from conftest import read_pcap_dpkt
from pktstream import FileFormatError, PacketBatch
from pktstream.formats import CaptureWriter, TruncatedFileWarning, open_reader, open_writer

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def caps(tmp_path_factory, mixed_pcap):
    return real_captures(tmp_path_factory.mktemp("caps"), mixed_pcap)


def ours(path, **kw) -> list[tuple[int, int, int, str, int]]:
    """(ts_ns, wirelen, caplen, interface, link_type) per packet, in the order read."""
    out = []
    for b in pktstream.read(path, **kw):
        for ts, w, c in zip(b.ts_ns.tolist(), b.wirelen.tolist(), b.caplen.tolist()):
            out.append((ts, w, c, b.interface, b.link_type))
    return out


def packet_bytes(path, **kw) -> list[bytes]:
    return [bytes(p) for b in pktstream.read(path, **kw) for p in b]


def assert_like_tshark(path, tshark_path=None, per_interface=True):
    mine = ours(path)
    ref = tshark_frames(tshark_path or path)
    assert len(mine) == len(ref) > 0
    # multi-interface files come out one interface per batch: compare as sorted multisets,
    # and the order within each interface exactly
    assert sorted((t, w, c) for t, w, c, *_ in mine) == sorted((t, w, c) for t, w, c, _ in ref)
    by_if_ref: dict[int, list] = {}
    for t, w, c, i in ref:
        by_if_ref.setdefault(i, []).append((t, w, c))
    by_if_mine: dict[str, list] = {}
    for t, w, c, name, _ in mine:
        by_if_mine.setdefault(name, []).append((t, w, c))
    if per_interface:
        assert sorted(map(tuple, by_if_mine.values())) == sorted(map(tuple, by_if_ref.values()))
    assert sum(c for *_, c, _i in ref) == sum(c for _, _, c, *_ in mine)
    return mine


@pytest.mark.parametrize("name", ["ns", "us", "tshark", "sll2", "sll", "pcapng_ns", "multi", "multi_zst",
                                  "frames2_zst", "gz", "commented", "sections", "be_us", "be_ng"])
def test_read_matches_tshark(caps, name):
    # tshark numbers interfaces per section, so in a two-section file ids repeat
    mine = assert_like_tshark(caps[name], per_interface=name != "sections")
    if name not in ("multi", "multi_zst", "sections", "sll", "sll2"):  # captured on "any": a few may be late
        assert len(mine) == 2000


def test_packet_bytes_and_ns_timestamps_equal_tcpdump_file(caps):
    ref = read_pcap_dpkt(caps["ns"])  # independent struct parser
    for name in ("ns", "pcapng_ns", "frames2_zst", "be_us", "be_ng", "us", "gz"):
        got = [(t, w, bytes(p)) for b in pktstream.read(caps[name])
               for t, w, p in zip(b.ts_ns.tolist(), b.wirelen.tolist(), b)]
        assert [g[2] for g in got] == [r[2] for r in ref], name
        if name in ("ns", "pcapng_ns", "frames2_zst"):
            assert [g[0] for g in got] == [r[0] for r in ref], name
        else:  # µs files: same instants truncated to µs
            us = read_pcap_dpkt(caps["us"]) if name in ("us", "gz") else ref
            assert [g[0] for g in got] == [r[0] // 1000 * 1000 for r in us], name


def test_multi_interface_metadata(caps):
    with open_reader(caps["multi"]) as r:
        batches = list(r)
        assert r.format == "pcapng"
        assert [i.link_type for i in r.interfaces] == [1, 276]
        assert all(i.tsresol in (6, 9) for i in r.interfaces)
        assert r.interfaces[0].name.startswith("pf")  # dumpcap's if_name: the veth name
    assert {(b.interface, b.link_type) for b in batches} == {(r.interfaces[0].name, 1), (r.interfaces[1].name, 276)}
    assert all(len({b.link_type}) == 1 for b in batches)
    with open_reader(caps["sections"]) as r:
        list(r)
        assert len(r.sections) == 2 and len(r.interfaces) == 2
        assert [i.section for i in r.interfaces] == [0, 1]
        assert r.link_types == [1, 113]


def test_ns_zero_copy_and_batching(caps):
    with open_reader(caps["ns"], batch_bytes=64 * 1024) as r:
        batches = list(r)
    # LE ns file: read into a buffer and wrapped as it is (no conversion copy, no mmap: see
    # test_core_safety.py for truncation while reading)
    assert all(isinstance(b.buffer_owner, memoryview) and b.buffer_owner.obj is not None for b in batches)
    assert len(batches) > 5 and sum(map(len, batches)) == 2000
    assert all(b.nbytes <= 64 * 1024 for b in batches)
    mv = memoryview(batches[0])
    assert mv.readonly


def test_reused_read_buffers_never_change_a_held_batch(caps):
    # buffers are refilled only once no batch (or view of one) holds them: batches kept, a
    # view kept, or dropped at once must all read as a fresh read of the file does
    with open_reader(caps["ns"], batch_bytes=16 * 1024) as r:
        expected = [bytes(b) for b in r]
    assert len(expected) > 10
    with open_reader(caps["ns"], batch_bytes=16 * 1024) as r:
        kept = list(r)
    views = []
    with open_reader(caps["ns"], batch_bytes=16 * 1024) as r:
        for i, b in enumerate(r):
            if i % 3 == 0:
                views.append((i, memoryview(b)))  # the batch itself is dropped, a view of it kept
            else:
                assert bytes(b) == expected[i]   # dropped: its buffer is reused for a later batch
    assert [bytes(b) for b in kept] == expected
    assert all(bytes(v) == expected[i] for i, v in views)


def test_records_to_epb_one_pass_matches_the_writer_layout():
    from pktstream._records import new_buffer, records_to_epb
    recs = b"".join(struct.pack("<IIII", 1, 500 + k, k, 1500) + bytes(range(k)) for k in (0, 1, 2, 3, 4, 5, 60))
    out = records_to_epb(recs, len(recs), 7)
    pos = 0
    for k in (0, 1, 2, 3, 4, 5, 60):
        btype, blen, iface, hi, lo, cap, wire = struct.unpack_from("<7I", out, pos)
        assert (btype, iface, cap, wire) == (6, 7, k, 1500)
        assert blen == 32 + (k + 3) // 4 * 4 and struct.unpack_from("<I", out, pos + blen - 4)[0] == blen
        assert out[pos + 28:pos + 28 + k] == bytes(range(k)) and not any(out[pos + 28 + k:pos + blen - 4])
        assert (hi << 32 | lo) == 1 * 10**9 + 500 + k
        pos += blen
    assert pos == len(out)
    with pytest.raises(ValueError, match="past the end"):
        records_to_epb(recs[:-1], len(recs) - 1, 0)
    assert len(new_buffer(12345)) == 12345 and len(records_to_epb(b"", 0, 0)) == 0


def test_records_to_epb_gives_each_packets_offset_from_its_own_pass():
    """``offsets=``: the conversion's pass writes each packet's data offset (what a batch's
    ``offset`` array holds, walked separately) -- for the live index, which then does not walk
    the records again; the EPBs are the same with and without."""
    import numpy as np

    from pktstream._records import records_to_epb, records_to_epb_ids
    sizes = (0, 1, 2, 3, 4, 5, 60, 1500, 7)
    recs = b"".join(struct.pack("<IIII", 1, 500 + k, k, 1500) + bytes(k) for k in sizes)
    want = PacketBatch.from_records(recs, link_type=1).offset
    offs = np.full(len(sizes) + 3, 99, dtype=np.int64)
    assert records_to_epb(recs, len(recs), 7, offs) == records_to_epb(recs, len(recs), 7)
    # room for more records than there are: no offset (-1), not what was there before
    assert offs[:len(sizes)].tolist() == want.tolist() and offs[len(sizes):].tolist() == [-1] * 3
    offs[:] = 99
    ids = np.arange(len(sizes), dtype=np.uint32)
    assert records_to_epb_ids(recs, len(recs), ids, offs[:len(sizes)]) == records_to_epb_ids(recs, len(recs), ids)
    assert offs[:len(sizes)].tolist() == want.tolist() and offs[len(sizes):].tolist() == [99] * 3
    offs[:] = 99
    assert records_to_epb(b"", 0, 7, offs) == b"" and offs.tolist() == [-1] * len(offs)
    offs[:] = 99  # room for fewer records than there are: the first entry says so
    assert records_to_epb(recs, len(recs), 7, offs[:4]) == records_to_epb(recs, len(recs), 7)
    assert offs[:4].tolist() == [-1, *want[1:4].tolist()] and offs[4:].tolist() == [99] * (len(offs) - 4)


def test_packet_comments_read_and_kept_by_convert(caps, tmp_path):
    with open_reader(caps["commented"], comments=True) as r:
        found = {}
        seen = 0
        for b in r:
            for k, text in r.comments.items():
                found[seen + k] = text
            seen += len(b)
    assert found == {2: "hello from editcap", 9: "second comment"}
    out = tmp_path / "c.pcapng"
    import pktstream.cli
    assert pktstream.cli.main(["convert", str(caps["commented"]), str(out)]) == 0
    rows = tshark_rows(out, "frame.number", "frame.comment")
    assert {int(n): c for n, c in rows if c} == {3: "hello from editcap", 10: "second comment"}


def test_bpf_on_read_matches_tshark(caps):
    got = ours(caps["ns"], bpf="tcp port 80 or icmp6")
    ref = tshark_frames(caps["ns"])
    sel = tshark_rows(caps["ns"], "frame.number", extra=("-Y", "tcp.port == 80 || icmpv6"))
    want = [ref[int(r[0]) - 1][:3] for r in sel]
    assert [g[:3] for g in got] == want and len(want) > 100


# -- writers -----------------------------------------------------------------------------------

def _tshark_full(path) -> list[list[str]]:
    return tshark_rows(path, "frame.time_epoch", "frame.len", "frame.cap_len", "frame.protocols",
                       "eth.src", "ip.src", "ipv6.dst", "tcp.seq_raw", "udp.dstport", "vlan.id")


@pytest.mark.parametrize("fmt", ["pcap", "pcapng", "pcap.zst", "pcapng.zst"])
def test_written_files_read_identically_by_tshark(caps, tmp_path, fmt):
    src = caps["tshark"]
    out = tmp_path / f"out.{fmt}"
    with open_writer(out, hostname="sensor-7") as w:
        for b in pktstream.read(src, batch_bytes=32 * 1024):
            w.write(b)
    assert w.paths == [str(out)] and not Path(str(out) + ".part").exists()
    assert _tshark_full(out) == _tshark_full(src)
    info = subprocess.run(["capinfos", "-c", "-M", str(out)], capture_output=True, text=True, check=True).stdout
    assert "Number of packets:   2000" in info
    if fmt == "pcap":
        n = subprocess.run(["tcpdump", "-nr", str(out)], capture_output=True, text=True, check=True)
        assert len(n.stdout.splitlines()) == 2000
    if fmt.startswith("pcapng"):
        meta = subprocess.run(["capinfos", str(out)], capture_output=True, text=True, check=True).stdout
        assert "host sensor-7" in meta and "pktstream" in meta
        rows = tshark_rows(out, "frame.interface_name", "frame.interface_description")
        assert {tuple(r) for r in rows} == {(w_name := rows[0][0], f"sensor-7:{w_name}")}
    if fmt.endswith(".zst"):
        raw = out.read_bytes()
        assert raw.count(b"\x28\xb5\x2f\xfd") >= 1
        import zstandard
        frames = 0
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=False)
        reader.read()
        frames += 1
        assert reader.tell() > 0 and frames == 1
        assert zstandard.frame_header_size(raw) > 0


def test_pcap_roundtrip_tcpdump_bytes_identical(caps, tmp_path):
    """tcpdump's ns pcap → pktstream (ns) is byte-identical after the 24-byte header; µs too."""
    out = tmp_path / "rt.pcap"
    with open_writer(out) as w:
        for b in pktstream.read(caps["ns"]):
            w.write(b)
    assert out.read_bytes()[24:] == caps["ns"].read_bytes()[24:]
    out_us = tmp_path / "rt-us.pcap"
    with open_writer(out_us, nanosecond=False) as w:
        for b in pktstream.read(caps["us"]):
            w.write(b)
    assert out_us.read_bytes()[24:] == caps["us"].read_bytes()[24:]
    assert out_us.read_bytes()[:4] == caps["us"].read_bytes()[:4]


def test_pcapng_multi_link_types_roundtrip(caps, tmp_path):
    out = tmp_path / "multi.pcapng"
    with open_writer(out) as w:
        for b in pktstream.read(caps["multi"]):
            w.write(b)
    a = sorted(tuple(r) for r in tshark_rows(out, "frame.time_epoch", "frame.len", "frame.protocols"))
    b = sorted(tuple(r) for r in tshark_rows(caps["multi"], "frame.time_epoch", "frame.len", "frame.protocols"))
    assert a == b and len(a) == len(tshark_rows(caps["multi"], "frame.number")) > 2000
    names = {r[0] for r in tshark_rows(out, "frame.interface_name")}
    with open_reader(caps["multi"]) as r:
        list(r)
        assert names == {i.name for i in r.interfaces} and len(names) == 2
    with pytest.raises(ValueError, match="pcapng"):
        with open_writer(tmp_path / "mixed.pcap") as w:
            for b in pktstream.read(caps["multi"]):
                w.write(b)


def test_write_to_pipe_pcap_and_pcapng(caps):
    for fmt in ("pcap", "pcapng"):
        p = subprocess.Popen(["tshark", "-r", "-", "-T", "fields", "-e", "frame.time_epoch"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with open_writer(p.stdin, format=fmt) as w:
            for b in pktstream.read(caps["ns"]):
                w.write(b)
        p.stdin.close()
        out = p.stdout.read().decode().split()
        p.stdout.close()
        assert p.wait() == 0
        assert out == [r[0] for r in tshark_rows(caps["ns"], "frame.time_epoch")], fmt


def _batches_of(path, size):
    return list(pktstream.read(path, batch_bytes=size))


def test_rotation_by_size_splits_exactly(caps, tmp_path):
    limit = 100_000
    with open_writer(tmp_path / "rot.pcap", rotate_bytes=limit) as w:
        for b in _batches_of(caps["ns"], 256 * 1024):
            w.write(b)
    assert len(w.paths) >= 5
    assert all(Path(p).stat().st_size <= limit for p in w.paths)
    assert all(Path(p).stat().st_size > limit - 1600 for p in w.paths[:-1])  # full files
    assert [Path(p).name for p in w.paths][:2] == ["rot.000000.pcap", "rot.000001.pcap"]
    joined = [x for p in w.paths for x in read_pcap_dpkt(p)]
    assert joined == read_pcap_dpkt(caps["ns"])
    assert not list(tmp_path.glob("*.part"))


def test_rotation_max_files_keeps_newest(caps, tmp_path):
    done = []
    with open_writer(tmp_path / "ring.pcapng", rotate_bytes=60_000, max_files=3, on_complete=done.append) as w:
        for b in _batches_of(caps["ns"], 64 * 1024):
            w.write(b)
    assert len(w.paths) == 3 and len(w.removed) == len(done) - 3 > 0
    assert sorted(str(p) for p in tmp_path.glob("ring.*.pcapng")) == sorted(w.paths)
    last = [x for p in w.paths for x in ours(p)]
    allp = ours(caps["ns"])
    assert [x[:3] for x in last] == [x[:3] for x in allp[-len(last):]]


def test_rotation_max_files_counts_the_files_of_earlier_writers(caps, tmp_path):
    """-W bounds the files on disk also across restarts and resets (a new writer of the same
    pattern): before, each new writer counted only its own and the earlier ones stayed."""
    batches = _batches_of(caps["ns"], 64 * 1024)
    for run in range(3):
        w = open_writer(tmp_path / "ring.pcapng", rotate_bytes=60_000, max_files=3)
        for b in batches[:6]:
            w.write(b)
        w.close()
        on_disk = sorted(str(p) for p in tmp_path.glob("ring.*.pcapng"))
        assert len(on_disk) == 3, (run, on_disk)
        assert on_disk == sorted(w.paths)  # the newest three: this run's last files
    assert not list(tmp_path.glob("*.part"))


def test_rotate_if_due_completes_an_idle_file(caps, tmp_path):
    now = [1_700_000_000.0]
    w = CaptureWriter(str(tmp_path / "idle.pcap"), rotate_seconds=10, clock=lambda: now[0])
    batch = _batches_of(caps["ns"], 64 * 1024)[0]
    w.write(batch)
    now[0] += 9
    assert not w.rotate_if_due() and w.paths == [] and w.current_path is not None
    now[0] += 1
    assert w.rotate_if_due() and len(w.paths) == 1 and w.current_path is None
    assert not w.rotate_if_due()  # nothing open: nothing to do
    assert sum(len(b) for b in pktstream.read(w.paths[0])) == len(batch)
    w.write(batch)  # the next write opens the next file
    w.close()
    assert len(w.paths) == 2 and not list(tmp_path.glob("*.part"))


def test_rotation_by_time_with_strftime_names(caps, tmp_path):
    now = [1_700_000_000.0]
    w = CaptureWriter(str(tmp_path / "t-%Y%m%d-%H%M%S.pcap.zst"), rotate_seconds=10, clock=lambda: now[0])
    batches = _batches_of(caps["ns"], 64 * 1024)
    for b in batches:
        w.write(b)
        now[0] += 4
    w.flush()
    w.close()
    assert len(w.paths) == (len(batches) + 2) // 3
    assert len(set(w.paths)) == len(w.paths)
    total = sum(len(b) for p in w.paths for b in pktstream.read(p))
    assert total == 2000
    for p in w.paths:
        assert subprocess.run(["capinfos", "-c", p], capture_output=True).returncode == 0


def test_growing_zst_file_readable_while_written(caps, tmp_path):
    w = open_writer(tmp_path / "grow.pcapng.zst")
    batches = _batches_of(caps["ns"], 64 * 1024)
    for b in batches[:3]:
        w.write(b)
    part = Path(w.current_path + ".part")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = sum(len(b) for b in pktstream.read(part, truncated="ignore"))
    assert got == sum(len(b) for b in batches[:3])
    w.abort()
    assert not part.exists() and not (tmp_path / "grow.pcapng.zst").exists()


def test_empty_writer_gives_valid_files(tmp_path):
    for fmt in ("pcap", "pcapng", "pcap.zst", "pcapng.zst"):
        p = tmp_path / f"e.{fmt}"
        open_writer(p).close()
        r = subprocess.run(["capinfos", "-c", str(p)], capture_output=True, text=True)
        assert r.returncode == 0 and "Number of packets:   0" in r.stdout, (fmt, r.stderr)
        assert list(pktstream.read(p)) == []


def test_fsync_and_mode(caps, tmp_path):
    p = tmp_path / "f.pcap"
    with open_writer(p, fsync=True, mode=0o600) as w:
        w.write(next(iter(pktstream.read(caps["ns"]))))
    assert p.stat().st_mode & 0o777 == 0o600


# -- malformed input ---------------------------------------------------------------------------

def test_truncated_pcap_warns_with_offset_and_delivers_good_packets(caps, tmp_path):
    data = caps["ns"].read_bytes()
    ref = read_pcap_dpkt(caps["ns"])
    cut = 24 + sum(16 + len(r[2]) for r in ref[:100]) + 20
    p = tmp_path / "cut.pcap"
    p.write_bytes(data[:cut])
    with pytest.warns(TruncatedFileWarning, match=f"at byte {cut - 20}") as rec:
        got = packet_bytes(p)
    assert rec[0].message.offset == cut - 20
    assert got == [r[2] for r in ref[:100]]
    with pytest.raises(FileFormatError, match=f"byte {cut - 20}"):
        list(pktstream.read(p, truncated="error"))
    got = []
    with pytest.raises(FileFormatError):
        for b in pktstream.read(p, truncated="error"):
            got.append(len(b))
    assert sum(got) == 100
    # the same through zstd and pcapng
    ng = tmp_path / "cut.pcapng"
    raw = caps["pcapng_ns"].read_bytes()
    ng.write_bytes(raw[:len(raw) - 37])
    with pytest.warns(TruncatedFileWarning, match="truncated pcapng block"):
        assert sum(len(b) for b in pktstream.read(ng)) == 1999


@pytest.mark.parametrize("fmt", ["pcap.zst", "pcapng.zst"])
def test_a_compressed_file_cut_between_flushes_is_reported_truncated(caps, tmp_path, fmt):
    """A writer flushes whole records into whole zstd blocks, so a .zst file cut right after a
    flush decompresses to whole records: only the compressed stream shows the cut (it ends
    inside a frame). Reading it delivers every packet before the cut, then reports the file as
    truncated, like a file ending inside a record (a newcomer's cut copy read silently)."""
    first, rest = list(pktstream.read(caps["ns"], batch_bytes=65536))[:2]
    p = tmp_path / f"w.{fmt}"
    with open_writer(p) as w:
        w.write(first)
        w.flush()
        at = os.path.getsize(f"{p}.part") if os.path.exists(f"{p}.part") else p.stat().st_size
        w.write(rest)
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(p.read_bytes()[:at])
    with pytest.warns(TruncatedFileWarning, match=f"truncated zstd data at compressed byte {at}: the capture ends"):
        assert sum(len(b) for b in pktstream.read(cut)) == len(first)
    got = []
    with pytest.raises(FileFormatError, match="truncated zstd data"):
        for b in pktstream.read(cut, truncated="error"):
            got.append(len(b))
    assert sum(got) == len(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole file: nothing to report
        assert sum(len(b) for b in pktstream.read(p)) == len(first) + len(rest)
    cut.write_bytes(p.read_bytes()[:12])  # not even the first block
    with pytest.raises(FileFormatError, match="truncated zstd data: it ends before the capture's first bytes"):
        list(pktstream.read(cut))


def test_a_gzip_file_cut_short_delivers_what_it_holds_then_warns(caps, tmp_path):
    """gzip raises EOFError at a cut; it used to escape as such, and the whole last buffer
    read before it was lost."""
    import gzip
    data = caps["ns"].read_bytes()
    ref = read_pcap_dpkt(caps["ns"])
    packed = gzip.compress(data)
    cut = tmp_path / "cut.pcap.gz"
    cut.write_bytes(packed[:len(packed) // 2])
    with pytest.warns(TruncatedFileWarning, match="cut.pcap.gz: truncated"):
        got = packet_bytes(cut)
    assert 0 < len(got) < len(ref) and got == [r[2] for r in ref[:len(got)]]
    whole = zlib_decompressed_prefix(packed[:len(packed) // 2])
    records_whole = 0  # every record wholly in the decompressed prefix is delivered
    pos = 24
    while pos + 16 <= len(whole):
        caplen = struct.unpack_from("<I", whole, pos + 8)[0]
        if pos + 16 + caplen > len(whole):
            break
        records_whole, pos = records_whole + 1, pos + 16 + caplen
    assert len(got) == records_whole
    with pytest.raises(FileFormatError, match="truncated"):
        list(pktstream.read(cut, truncated="error"))


def zlib_decompressed_prefix(data: bytes) -> bytes:
    """What a gzip stream cut short decompresses to."""
    import zlib
    d = zlib.decompressobj(wbits=31)
    return d.decompress(data)


def test_hostile_lengths_are_rejected_before_allocation(caps, tmp_path):
    data = bytearray(caps["ns"].read_bytes())
    struct.pack_into("<I", data, 24 + 8, 0xFFFFFFF0)  # first record's caplen
    p = tmp_path / "hostile.pcap"
    p.write_bytes(data)
    with pytest.raises(FileFormatError, match="packet length 4294967280 larger than .* at byte 24"):
        list(pktstream.read(p))
    ng = bytearray(caps["pcapng_ns"].read_bytes())
    # first block after SHB is the IDB: give it an absurd length
    shb_len = struct.unpack_from("<I", ng, 4)[0]
    struct.pack_into("<I", ng, shb_len + 4, 0x7FFFFFF0)
    p2 = tmp_path / "hostile.pcapng"
    p2.write_bytes(ng)
    with pytest.raises(FileFormatError, match=f"block length.* at byte {shb_len}"):
        list(pktstream.read(p2))
    p3 = tmp_path / "notcap.pcap"
    p3.write_bytes(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(FileFormatError, match="not a pcap or pcapng file"):
        list(pktstream.read(p3))
    with pytest.raises(FileFormatError, match="only 0 bytes"):
        list(pktstream.read(io.BytesIO(b"")))


_SMALL: dict[str, bytes] = {}


def _small_files(caps) -> dict[str, bytes]:
    if not _SMALL:
        ref = read_pcap_dpkt(caps["ns"])[:12]
        body = b"".join(struct.pack("<IIII", t // 10**9, t % 10**9, len(d), w) + d for t, w, d in ref)
        _SMALL["pcap"] = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1) + body
        buf = io.BytesIO()
        with open_writer(buf, format="pcapng") as w:
            w.write(PacketBatch.from_records(body, link_type=1), {1: "c"})
        _SMALL["pcapng"] = buf.getvalue()
    return _SMALL


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
@settings(max_examples=int(os.environ.get("PKTSTREAM_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_never_crash(caps, kind, data):
    raw = bytearray(_small_files(caps)[kind])
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    sample = bytes(raw[:cut])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for b in pktstream.read(io.BytesIO(sample), batch_bytes=4096):
                assert b.nbytes <= len(sample) * 2
                b.ts_ns, b.caplen  # noqa: B018 - index arrays must be computable
                pktstream.decode(b)
            with open_reader(io.BytesIO(sample), comments=True) as r:
                for _ in r:
                    pass
        except FileFormatError as exc:
            assert exc.offset is not None and 0 <= exc.offset <= len(sample)


def _null_frames() -> list[bytes]:
    """BSD-loopback payloads (no link header yet): IPv4 UDP to port 53, IPv4 TCP, IPv6 UDP."""
    import ipaddress
    v4 = (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 3, 1, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
          + struct.pack("!HHHH", 1000, 53, 11, 0) + b"abc")
    tcp = (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 2, 0, 64, 6, 0, bytes([10, 0, 0, 3]), bytes([10, 0, 0, 4]))
           + struct.pack("!HHIIBBHHH", 4000, 80, 1, 0, 0x50, 0x02, 1024, 0, 0))
    v6 = (struct.pack("!IHBB", 6 << 28, 8, 17, 64) + ipaddress.IPv6Address("2001:db8::1").packed
          + ipaddress.IPv6Address("2001:db8::2").packed + struct.pack("!HHHH", 1000, 53, 8, 0))
    return [v4, tcp, v6]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("order", [">", "<"])
def test_null_link_filters_and_converts_as_tcpdump_reads_it(tmp_path, fmt, order):
    """Link type NULL carries the address family in the writer's byte order: libpcap's filter
    on a big-endian file tests it byte-swapped, pktstream reads it as LOOP (the same header in
    network byte order); and a file's "ip6" tests the BSD families (24, 28, 30), not this
    host's AF_INET6. Filters match as tcpdump's do, and a converted file means the same."""
    afs = [2, 2, 30]  # AF_INET, AF_INET, AF_INET6 (Darwin)
    pkts = [struct.pack(order + "I", af) + p for af, p in zip(afs, _null_frames())]
    path = tmp_path / f"lo0.{fmt}"
    out = bytearray()
    if fmt == "pcap":
        out += struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 0)
        for i, p in enumerate(pkts):
            out += struct.pack(order + "IIII", 1_732_708_800, i, len(p), len(p)) + p
    else:
        o = order
        out += struct.pack(o + "II", 0x0A0D0D0A, 28) + struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1)
        out += struct.pack(o + "I", 28) + struct.pack(o + "IIHHII", 1, 20, 0, 0, 65535, 20)
        for i, p in enumerate(pkts):
            body = p + b"\0" * (-len(p) % 4)
            t = 1_732_708_800 * 10**6 + i
            out += struct.pack(o + "IIIIIII", 6, 32 + len(body), 0, t >> 32, t & 0xFFFFFFFF, len(p), len(p)) + body
            out += struct.pack(o + "I", 32 + len(body))
    path.write_bytes(bytes(out))
    with open_reader(path) as r:
        assert [bytes(x) for b in r for x in b] == pkts  # the bytes as written
        big = order == ">"
        assert [i.link_type for i in r.interfaces] == [108 if big else 0]
        assert r.byte_order == ("big" if big else "little")
    conv = tmp_path / "conv.pcapng"
    with open_writer(conv) as w:
        for b in pktstream.read(path):
            w.write(b)
    for bpf in ("ip", "ip6", "udp port 53", "host 10.0.0.3", "tcp"):
        want = subprocess.run(["tcpdump", "-nr", str(path), bpf], capture_output=True, text=True, check=True).stdout
        assert want.count("\n") >= 1, bpf  # the oracle sees them
        assert sum(len(b) for b in pktstream.read(path, bpf=bpf)) == want.count("\n"), bpf
        again = subprocess.run(["tcpdump", "-nr", str(conv), bpf], capture_output=True, text=True, check=True).stdout
        assert again.count("\n") == want.count("\n"), bpf
    if fmt == "pcap":  # libpcap's own reader (Capture.open_offline) gives the same link type
        with pktstream.Capture.open_offline(path) as c:
            got = [b for b in c]
        assert {b.link_type for b in got} == {108 if big else 0}
        assert sum(int(b.filter("ip").sum()) for b in got) == 2


@pytest.mark.parametrize("order,magic", [("<", 0xA1B23C4D), ("<", 0xA1B2C3D4), (">", 0xA1B23C4D)],
                         ids=["ns-little", "us-little", "ns-big"])
@pytest.mark.parametrize("memory_map", [False, True])
def test_records_longer_than_the_snap_length_are_cut_as_libpcap_cuts_them(tmp_path, order, magic, memory_map):
    """A pcap record whose caplen exceeds the header's snap length (Solaris 2.3's bufmod bug, a
    hand-made file): libpcap hands out the first snap-length bytes and skips the rest; so do
    the reader (zero-copy, converting, memory-mapped) and a query's filter. Such records first,
    last, in a row and between ordinary ones, over several read buffers."""
    import random
    rng = random.Random(3)
    snap = 96
    out = bytearray(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snap, 1))
    lens = [60, 200, 96, 97, 40, 1514, 1514, 80] + [rng.choice((50, 96, 97, 300, 1514)) for _ in range(3000)] + [500]
    for i, n in enumerate(lens):
        p = bytes(rng.randrange(256) for _ in range(n))
        p = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + p[14:]
        out += struct.pack(order + "IIII", 1_732_708_800 + i, i, n, n + 4) + p
    path = tmp_path / "cut.pcap"
    path.write_bytes(bytes(out))
    want = subprocess.run(["tcpdump", "-r", str(path), "--time-stamp-precision=nano", "-w", "-"],
                          capture_output=True, check=True).stdout
    oracle = [(int(b.ts_ns[i]), bytes(b[i]), int(b.wirelen[i])) for b in pktstream.read(io.BytesIO(want))
              for i in range(len(b))]
    assert max(len(x[1]) for x in oracle) == snap and len(oracle) == len(lens)  # the oracle cut them
    positions = []
    with open_reader(path, batch_bytes=4096, memory_map=memory_map) as r:
        got = []
        for b in r:
            got += [(int(b.ts_ns[i]), bytes(b[i]), int(b.wirelen[i])) for i in range(len(b))]
            positions += r.last_positions().tolist()
        assert r.memory_mapped == memory_map
    assert got == oracle
    assert positions == list(range(len(lens)))  # each packet's place in the file
    # a filter on bytes past the snap length matches as tcpdump's (never: those bytes are gone)
    for bpf in ("ether[100] = 0 or ether[100] != 0", "len > 96", "ip"):
        text = subprocess.run(["tcpdump", "-nr", str(path), bpf], capture_output=True, text=True, check=True).stdout
        assert sum(len(b) for b in pktstream.read(path, bpf=bpf)) == text.count("\n"), bpf


def test_interleaved_interfaces_are_read_in_file_order_with_their_comments(tmp_path):
    """A pcapng whose interfaces interleave packet by packet: read(file_order=True) hands out
    runs of one interface in the file's order (tcpdump's), comments stay with their packets,
    and ``last_positions`` counts through the file; grouped per interface by default."""
    import random
    rng = random.Random(5)
    path = tmp_path / "inter.pcapng"
    written = []
    with open_writer(path) as w:
        for j in range(3000):
            frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + j.to_bytes(4, "big") + bytes(rng.randrange(200))
            rec = struct.pack("<IIII", 1_732_708_800, 1000 * (j // 3), len(frame), len(frame)) + frame
            w.write(PacketBatch.from_records(rec, link_type=1, interface=f"eth{rng.randrange(3)}"),
                    {0: f"packet {j}"} if j % 7 == 0 else None)
            written.append(frame)
    want = subprocess.run(["tcpdump", "-r", str(path), "-w", "-"], capture_output=True, check=True).stdout
    assert [bytes(p) for b in pktstream.read(io.BytesIO(want)) for p in b] == written  # the oracle's order
    assert [bytes(p) for b in pktstream.read(path, file_order=True) for p in b] == written
    got, notes, positions = [], {}, []
    with open_reader(path, batch_bytes=4096, comments=True, file_order=True) as r:
        for b in r:
            notes.update({len(got) + i: t for i, t in r.comments.items()})
            positions += r.last_positions().tolist()
            got += [bytes(p) for p in b]
    assert got == written and positions == list(range(3000))
    assert notes == {j: f"packet {j}" for j in range(0, 3000, 7)}
    grouped = [bytes(p) for b in pktstream.read(path) for p in b]  # (the default: per interface)
    assert grouped != written and sorted(grouped) == sorted(written)


@pytest.mark.parametrize("out_name", ["o.pcapng", "o.pcapng.zst", "o.pcap"])
def test_convert_of_finely_interleaved_interfaces_is_one_pass_and_exact(tmp_path, out_name):
    """``pktstream convert`` of a pcapng whose interfaces alternate packet by packet (each read
    buffer now written whole, in one C pass taking each packet's interface; its speed is in
    bench/README.md): tshark reads the output as it reads the input (interface, time, bytes,
    comment, packet order); with a BPF filter, the packets ``tcpdump -r`` keeps with it."""
    import pktstream.cli
    src = tmp_path / "inter.pcapng"
    want = interleaved_pcapng(src, 5000)
    fields = ("frame.interface_name", "frame.time_epoch", "frame.len", "frame.comment", "data")
    out = tmp_path / out_name
    assert pktstream.cli.main(["convert", str(src), str(out)]) == 0
    got, ref = tshark_rows(out, *fields), tshark_rows(src, *fields)
    assert len(ref) == 5000 and [r[0] for r in ref] == [w[0] for w in want]  # (the oracle read the input)
    if out_name == "o.pcap":  # no interfaces, no comments in pcap
        assert [r[1:3] + r[4:] for r in got] == [r[1:3] + r[4:] for r in ref]
    else:
        assert got == ref
        assert sum(1 for r in got if r[3]) == len([w for w in want if w[2]])
        if out_name == "o.pcapng":
            with open_reader(out) as r:  # one IDB per input interface, not one per run
                list(r)
                assert [i.name for i in r.interfaces] == ["eth0", "eth1", "eth2"]
    bpf = "ether[17] & 3 = 1 or ether[17] & 7 = 2"  # (packet number's low bits: some of each interface)
    filtered = tmp_path / ("f." + out_name.split(".", 1)[1])
    assert pktstream.cli.main(["convert", str(src), str(filtered), bpf]) == 0
    oracle = tmp_path / "oracle.pcap"
    subprocess.run(["tcpdump", "-r", str(src), "-w", str(oracle), bpf], check=True, capture_output=True)
    got = tshark_rows(filtered, "frame.time_epoch", "frame.len", "data")
    assert got == tshark_rows(oracle, "frame.time_epoch", "frame.len", "data") and 1000 < len(got) < 4000
    if out_name != "o.pcap":
        names = {r[0] for r in tshark_rows(filtered, "frame.interface_name")}
        assert names == {"eth0", "eth1", "eth2"}


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_interfaces_sharing_a_name_but_not_the_snap_length_stay_apart(tmp_path, command):
    """Two interfaces both named eth0, one with a 64-byte snap length: written as two IDBs,
    every packet within its IDB's snap length (as one, the file claimed 64 for packets up to
    107 bytes: "invalid packet capture length 107, bigger than snaplen of 64" from tcpdump)."""
    import pktstream.cli
    src = tmp_path / "two-eth0.pcapng"
    interleaved_pcapng(src, 2000, names=("eth0", "eth0", "eth1"), snaplens=(64, 65535, 65535))
    out = tmp_path / "out.pcapng"
    args = ["convert", str(src), str(out)] if command == "convert" else ["merge", str(out), str(src)]
    assert pktstream.cli.main(args) == 0
    with open_reader(out) as r:
        list(r)
        snaps = [(i.name, i.snaplen) for i in r.interfaces]
    assert sorted(snaps) == [("eth0", 64), ("eth0", 65535), ("eth1", 65535)]
    rows = tshark_rows(out, "frame.interface_id", "frame.cap_len")
    longest: dict[int, int] = {}
    for iface, cap in rows:
        longest[int(iface)] = max(longest.get(int(iface), 0), int(cap))
    assert len(rows) == 2000 and all(longest[k] <= snaps[k][1] for k in longest)
    assert sorted(longest.values()) == [64, 98, 107]  # (the two eth0s apart: 64 and 107)


def test_writer_takes_each_packets_interface_across_rotation_and_with_an_index(tmp_path):
    """``CaptureWriter.write(..., interfaces=)``: split by size rotation, every file still names
    each packet's interface; with an index observer (which attributes a batch to one
    interface) the batch goes out as runs and the archive finds each interface's packets."""
    src = tmp_path / "inter.pcapng"
    want = interleaved_pcapng(src, 3000)
    out = tmp_path / "rot" / "r.pcapng"
    out.parent.mkdir()
    with open_reader(src, comments=True, file_order=True, mixed_interfaces=True) as r, \
            open_writer(out, rotate_bytes=20_000, hostname="some-host.example.org") as w:
        mixed = 0
        for b in r:
            mixed += r.batch_interfaces is not None
            w.write(b, r.comments, interfaces=r.batch_interfaces)
        files = w.paths
    assert mixed >= 1 and len(files) > 10
    assert max(os.path.getsize(f) for f in files) <= 20_000  # (each part's IDBs were reserved)
    got = []
    for f in files:
        got += [(row[0], row[1] or "") for row in tshark_rows(f, "frame.interface_name", "frame.comment")]
    assert got == [(w[0], w[2]) for w in want]
    with pytest.raises(ValueError, match="interface ids for a batch"):
        with open_reader(src, file_order=True, mixed_interfaces=True) as r, open_writer(tmp_path / "x.pcapng") as w:
            b = next(iter(r))
            w.write(b, interfaces=(r.batch_interfaces[0][:-1], r.batch_interfaces[1]))
    from pktstream.archive import Archive
    from pktstream.archive.live import LiveIndexer
    idx_dir = tmp_path / "arch"
    idx_dir.mkdir()
    indexer = LiveIndexer(str(idx_dir))
    with open_reader(src, file_order=True, mixed_interfaces=True) as r, \
            CaptureWriter(str(idx_dir / "a.pcapng"), observer=indexer) as w:
        for b in r:
            w.write(b, interfaces=r.batch_interfaces)
    indexer.close()
    flows = Archive(str(idx_dir)).flows()
    assert sorted(set(flows.column("interface").to_pylist())) == ["eth0", "eth1", "eth2"]
    assert sum(flows.column("packets").to_pylist()) == 3000


class _OffsetsSeen:
    """A WriteObserver that keeps what ``wrote`` was given: each batch's records and offsets
    (copied: the writer reuses its array)."""

    def __init__(self):
        self.seen = []

    def opened(self, path, format, header_block):
        pass

    def wrote(self, path, batch, start, end, idb_positions, offsets=None):
        self.seen.append((bytes(batch), None if offsets is None else offsets.copy()))

    def completed(self, path):
        pass

    def removed(self, path):
        pass

    def discarded(self, path):
        pass


class _OldObserver(_OffsetsSeen):
    """An observer written before ``offsets=`` existed: five arguments."""

    def wrote(self, path, batch, start, end, idb_positions):
        self.seen.append((bytes(batch), None))


class _Forwarding(_OldObserver):
    """An observer whose ``wrote`` takes any keyword and forwards it (a proxy) to one that does
    not know ``offsets``: it must not be given them."""

    def wrote(self, *args, **kwargs):
        super().wrote(*args, **kwargs)


@pytest.mark.parametrize("name", ["w.pcapng", "w.pcapng.zst", "w.pcap"])
def test_a_writers_observer_gets_each_batchs_packet_offsets(tmp_path, name):
    """A pcapng writer hands its observer the packet offsets its EPB conversion found (so the
    index does not walk the records again), with size rotation cutting batches, comments and
    interleaved interfaces; they equal a separate walk of the batch the observer got. A batch
    that has its offset array already (the interface runs of a .zst output) and any batch of a
    pcap writer (which converts nothing) come without."""
    src = tmp_path / "inter.pcapng"
    interleaved_pcapng(src, 3000)
    obs = _OffsetsSeen()
    rotate = 20_000 if name == "w.pcapng" else None
    with open_reader(src, comments=True, file_order=True, mixed_interfaces=True) as r, \
            CaptureWriter(str(tmp_path / name), observer=obs, rotate_bytes=rotate) as w:
        for b in r:
            if name.startswith("w.pcapng"):
                w.write(b, r.comments, interfaces=r.batch_interfaces)
            else:
                w.write(PacketBatch.from_records(bytes(b), link_type=b.link_type))
    assert sum(len(PacketBatch.from_records(data, link_type=1)) for data, _ in obs.seen) == 3000
    given = [(data, offsets) for data, offsets in obs.seen if offsets is not None]
    # (the interface runs of a .zst output have their arrays already: none given there)
    assert len(given) > 100 if name == "w.pcapng" else not given
    for data, offsets in given:
        assert offsets.tolist() == PacketBatch.from_records(data, link_type=1).offset.tolist()


def _frames(sizes, t0=1_700_000_000) -> bytes:
    return records([(t0 * 10**9 + k, bytes([k % 251]) * n) for k, n in enumerate(sizes)])


@pytest.mark.parametrize("name", ["w.pcapng", "w.pcapng.zst"])
def test_a_writers_reused_offsets_array_fits_each_batch(tmp_path, name):
    """Batches of one interface, without arrays, each larger than the writer's offsets array so
    far (it starts at 1,024 entries and grows), then small ones, one with comments: every
    batch's offsets as its own walk gives them, for pcapng and pcapng.zst. A batch whose count
    is wrong is written whole as before, and its offsets say so with -1 (never the previous
    batch's offsets): past the records when it claims more, first when it claims fewer. An
    observer without ``offsets=`` (also behind a ``**kwargs`` proxy) gets five arguments."""
    import random
    rng = random.Random(5)
    batches = [_frames([rng.choice((0, 1, 7, 60, 1500)) for _ in range(n)]) for n in (1500, 4000, 9000, 3, 40)]
    obs, old, fwd = _OffsetsSeen(), _OldObserver(), _Forwarding()
    for o in (obs, old, fwd):
        with CaptureWriter(str(tmp_path / f"{id(o)}-{name}"), observer=o) as w:
            for data in batches[:4]:
                w.write(PacketBatch.from_records(data, link_type=1))
            # comments: the offsets come from the batch's own walk (none left from the batch before)
            w.write(PacketBatch.from_records(batches[4], link_type=1), {1: "c", 30: "d"})
            # a count that claims more records than the buffer holds, then fewer: the whole buffer
            # is written (as without an observer), and the offsets say the count is wrong
            w.write(PacketBatch.from_records(_frames([40]), link_type=1, validate=False, count=3))
            w.write(PacketBatch.from_records(_frames([40, 9, 9, 9]), link_type=1, validate=False, count=2))
            w.write(PacketBatch.from_records(_frames([40, 9, 9, 9]), link_type=1, validate=False, count=2),
                    {0: "e"})
        with open_reader(tmp_path / f"{id(o)}-{name}") as r:
            assert sum(len(b) for b in r) == 1500 + 4000 + 9000 + 3 + 40 + 1 + 4 + 4
    weird = [_frames([40]), _frames([40, 9, 9, 9]), _frames([40, 9, 9, 9])]
    assert [d for d, _ in obs.seen] == [d for d, _ in old.seen] == [d for d, _ in fwd.seen] == [*batches, *weird]
    assert all(offsets is None for _, offsets in old.seen + fwd.seen)
    for data, offsets in obs.seen[:len(batches)]:
        assert len(offsets) > 1 and offsets.tolist() == PacketBatch.from_records(data, link_type=1).offset.tolist()
    assert [offsets.tolist() for _, offsets in obs.seen[len(batches):]] == [[16, -1, -1], [-1, 72], [-1, 72]]


def test_the_live_index_takes_the_writers_offsets(tmp_path):
    """The offsets a writer hands over are what the index reads packets at: given other (valid)
    offsets, the index counts other flows; given offsets outside the batch (a batch whose
    count is wrong), it refuses the batch like its own walk would (logged, the file gets no
    index from the writer: none of the packets counted that the file does not hold)."""
    from pktstream.archive import Archive
    from pktstream.archive.index import FileIndexBuilder
    from pktstream.archive.live import LiveIndexer

    udp = [_eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1000 + k, 53, b""))) for k in range(5)]
    data = records([(1_700_000_000 * 10**9 + k, f) for k, f in enumerate(udp)])
    walked, given = FileIndexBuilder("a.pcapng"), FileIndexBuilder("a.pcapng")
    walked.add(PacketBatch.from_records(data, link_type=1), 0, len(data))
    first = np.full(5, 16, dtype=np.int64)  # every packet read at the first one's place
    given.add(PacketBatch.from_records(data, link_type=1), 0, len(data), offsets=first)
    assert (walked.packets, walked.flows_held, given.packets, given.flows_held) == (5, 5, 5, 1)

    class Corrupting:
        """Hands the index offsets outside the batch."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def wrote(self, path, batch, start, end, idb_positions, offsets=None):
            self.inner.wrote(path, batch, start, end, idb_positions, offsets=np.full(len(batch), 1 << 40))
    root = tmp_path / "arch"
    root.mkdir()
    indexer = LiveIndexer(str(root))
    with CaptureWriter(str(root / "a.pcapng"), observer=Corrupting(indexer)) as w:
        w.write(PacketBatch.from_records(data, link_type=1))
    indexer.close()
    assert indexer.failures == 1 and indexer.indexed == 0
    assert Archive(str(root)).flows().num_rows == 0  # (the file has no index: pktstream index builds it)


def test_a_record_longer_than_libpcaps_maximum_is_refused_whatever_the_snap_length(tmp_path):
    """libpcap refuses a record longer than its link type's maximum (262144 for Ethernet) even
    when the header claims a larger snap length; so does the reader, after the good packets."""
    frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + bytes(46)
    big = frame + bytes(300_000 - len(frame))
    body = b"".join(struct.pack("<IIII", 1_732_708_800, 0, len(p), len(p)) + p for p in (frame, big, frame))
    path = tmp_path / "big.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 1_000_000, 1) + body)
    r = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True)
    assert r.stdout.count("\n") == 1 and "invalid packet capture length 300000" in r.stderr
    got = []
    with pytest.raises(FileFormatError, match="packet length 300000 larger than 262144 at byte 100"):
        for b in pktstream.read(path):
            got += [bytes(p) for p in b]
    assert got == [frame]
