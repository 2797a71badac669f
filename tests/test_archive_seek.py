"""Seekable zstd files (independent frames + a seek table in a skippable frame) and the lazy
k-way merge of ``Archive.packets()``: results equal a brute-force read of every file (the
oracle of tests/test_archive.py), queries of seekable files decompress only the frames they
need, ``pktstream convert`` exports a single frame tshark 4.0 reads, FileSink rotation and
``.part`` recovery keep the layout, and a query holds a bounded number of packets."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pktstream
from archive_data import batches
from pktstream.archive import Archive
from pktstream.archive.query import read_seek_table
from pktstream.archive.store import open_store
from pktstream.formats import open_writer
from pktstream.formats.writer import SEEKABLE_MAGIC, SKIPPABLE_SEEK_TABLE
from servers import moto  # noqa: F401  (fixture)
from test_archive import BPFS, CHUNK, T0, brute, got, rare_flow

PKTSTREAM = [sys.executable, "-m", "pktstream"]
FRAME = 32 << 10


def frames_of(path: Path) -> list[tuple[int, int]]:
    """(compressed, decompressed) sizes from the seek table, parsed here independently."""
    data = path.read_bytes()
    n, desc, magic = struct.unpack("<IBI", data[-9:])
    assert magic == SEEKABLE_MAGIC and desc == 0
    start = len(data) - 9 - 8 * n - 8
    assert struct.unpack_from("<II", data, start) == (SKIPPABLE_SEEK_TABLE, 8 * n + 9)
    return [struct.unpack_from("<II", data, start + 8 + 8 * k) for k in range(n)]


def frames_of_part(path: Path) -> list[int]:
    """Starts of the complete zstd frames of a growing file (no seek table yet)."""
    import zstandard
    data = path.read_bytes()
    starts, pos = [], 0
    while pos < len(data):
        try:
            d = zstandard.ZstdDecompressor().decompressobj()
            d.decompress(data[pos:])
            if not d.eof:
                break
            starts.append(pos)
            pos = len(data) - len(d.unused_data)
        except zstandard.ZstdError:
            break
    return starts


def zstd_frame_count(path: Path) -> tuple[int, int]:
    """(data frames, skippable frames) as the zstd CLI counts them walking the file."""
    out = subprocess.run(["zstd", "-lv", str(path)], capture_output=True, text=True, check=True).stdout

    def count(label: str) -> int:
        line = next((x for x in out.splitlines() if x.strip().startswith(label)), None)
        return int(line.split(":")[1]) if line else 0
    return count("# Zstandard Frames"), count("# Skippable Frames")


def make_seekable_archive(root: Path) -> Path:
    """Rotated per-sensor seekable .pcap.zst and .pcapng.zst files, a merged seekable
    .pcapng.zst of two interleaved sensors, one single-frame .pcap.zst; a rare flow in the
    middle of web-1's second file."""
    (root / "by-sensor").mkdir(parents=True)
    for i, (s, fmt) in enumerate((("web-1", "pcap.zst"), ("db-1", "pcapng.zst"))):
        with open_writer(root / "by-sensor" / f"{s}.{fmt}", rotate_bytes=100_000, zstd_frame_bytes=FRAME) as w:
            for k, b in enumerate(batches(i, 4000, T0 + i * 1000)):
                w.write(b)
                if s == "web-1" and k == 45:
                    w.write(rare_flow(5, int(b.ts_ns[-1]) + 1))
    with open_writer(root / "all.pcapng.zst", zstd_frame_bytes=FRAME) as w:
        for a, b in zip(batches(10, 1500, T0, interface="s1/eth0"), batches(11, 1500, T0, interface="s2/eth1")):
            w.write(a)
            w.write(b)
    with open_writer(root / "single.pcap.zst") as w:
        for b in batches(12, 800, T0 + 5 * 10**8):
            w.write(b)
    return root


@pytest.fixture(scope="module")
def seek_dir(tmp_path_factory) -> Path:
    root = make_seekable_archive(tmp_path_factory.mktemp("seek") / "a")
    res = Archive(str(root)).index(chunk_bytes=CHUNK)
    assert res["indexed"] >= 8 and res["damaged"] == 0, res
    return root


def test_seekable_layout_is_valid_multi_frame_zstd(tmp_path):
    p = tmp_path / "s.pcapng.zst"
    single = tmp_path / "one.pcapng.zst"
    data = batches(1, 3000, T0)
    for path, fb in ((p, FRAME), (single, None)):
        with open_writer(path, zstd_frame_bytes=fb) as w:
            for b in data:
                w.write(b)
    frames = frames_of(p)
    assert len(frames) > 5 and all(d >= FRAME for _, d in frames[:-1])
    assert sum(c for c, _ in frames) + 8 + 8 * len(frames) + 9 == p.stat().st_size
    # zstd itself: every frame decodes, the data frames plus one skippable frame; same stream
    assert zstd_frame_count(p) == (len(frames), 1) and zstd_frame_count(single) == (1, 0)
    plain = subprocess.run(["zstd", "-dc", str(p)], capture_output=True, check=True).stdout
    assert plain == subprocess.run(["zstd", "-dc", str(single)], capture_output=True, check=True).stdout
    assert sum(d for _, d in frames) == len(plain)
    # pktstream reads it; the query side finds the same table
    assert [bytes(x) for b in pktstream.read(p) for x in b] == [bytes(x) for b in data for x in b]
    t = read_seek_table(open_store(str(tmp_path)), p.name, p.stat().st_size)
    assert t is not None and len(t.compressed) == len(frames) + 1
    assert read_seek_table(open_store(str(tmp_path)), single.name, single.stat().st_size) is None


def test_convert_exports_a_single_frame_tshark_reads(tmp_path):
    p = tmp_path / "s.pcapng.zst"
    data = batches(2, 3000, T0)
    with open_writer(p, zstd_frame_bytes=FRAME) as w:
        for b in data:
            w.write(b)
    out = tmp_path / "export.pcapng.zst"
    subprocess.run([*PKTSTREAM, "convert", str(p), str(out)], check=True, capture_output=True)
    assert zstd_frame_count(out) == (1, 0)
    rows = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.time_epoch"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(rows) == sum(len(b) for b in data) == 3000


@pytest.mark.parametrize("bpf", BPFS)
def test_query_of_seekable_files_equals_brute_force(seek_dir, bpf):
    a = Archive(str(seek_dir))
    assert got(a, bpf) == brute(seek_dir, bpf)
    assert a.last_stats.files_scanned == 0


def test_selective_query_decompresses_only_its_frames(seek_dir):
    a = Archive(str(seek_dir))
    result = got(a, "host 192.0.2.99")
    assert len(result) == 5 and result == brute(seek_dir, "host 192.0.2.99")
    st = a.last_stats
    assert st.files_read == 1
    # the file holding it: only a frame or two of it were read (a single frame would be read
    # from its start up to the chunk)
    sizes = sorted(p.stat().st_size for p in (seek_dir / "by-sensor").glob("web-1.*.pcap.zst"))
    assert st.bytes_read < 3 * (FRAME // 2) < sizes[-1]
    for since, until in ((T0 + 10**9, T0 + 2 * 10**9), (T0 + 3 * 10**9, None)):
        assert got(a, "tcp", since=since, until=until) == brute(seek_dir, "tcp", since, until)


def test_sink_writes_seekable_rotated_files_and_recovers_parts(tmp_path):
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    root = tmp_path / "a"
    root.mkdir()
    sink = FileSink(directory=str(root), format="pcapng.zst", rotate_bytes=60_000, index=True,
                    zstd_frame_bytes=FRAME)
    src = Source("alpha", "h", "eth0", 1, 262144)
    feed = batches(40, 6000, T0, interface="alpha/eth0")
    for b in feed[:-1]:
        sink.write(src, b)
    state = sink.flush()
    assert state["open"] and state["open"][0]["zstd_frame_bytes"] == FRAME
    part = Path(state["open"][0]["part"])
    assert len(frames_of_part(part)) >= 1  # a crash mid-file: complete frames + a cut one
    acknowledged = feed[:-1]
    sink.write(src, feed[-1])  # written after the last flush (no rotation), then the process dies
    for out in sink._outputs.values():
        out.abandon()
    FileSink.recover(state)
    files = sorted(root.glob("alpha.*.pcapng.zst"))
    assert len(files) > 3 and not list(root.glob("*.part"))
    for f in files:
        assert len(frames_of(f)) >= 1  # every file, the recovered one too, has its seek table
    read = [(int(b.ts_ns[i]), bytes(b[i])) for f in files for b in pktstream.read(f) for i in range(len(b))]
    assert read == [(int(b.ts_ns[i]), bytes(b[i])) for b in acknowledged for i in range(len(b))]
    a = Archive(str(root))
    assert got(a, "tcp") == brute(root, "tcp") and a.last_stats.files_scanned == 0


def test_lazy_merge_holds_a_bounded_number_of_packets(tmp_path):
    """Many files in time sequence: the merge opens them one after another and holds about a
    chunk of each, not the result; files that overlap (a merged file of two sensors) are still
    exact."""
    root = tmp_path / "a"
    root.mkdir()
    with open_writer(root / "s.pcapng.zst", rotate_bytes=40_000, zstd_frame_bytes=FRAME) as w:
        for b in batches(50, 20000, T0, per_batch=25):
            w.write(b)
    with open_writer(root / "m.pcapng", rotate_bytes=100_000) as w:
        for x, y in zip(batches(51, 3000, T0, per_batch=25, interface="p/eth0"),
                        batches(52, 3000, T0, per_batch=25, interface="q/eth0")):
            w.write(x)
            w.write(y)
    Archive(str(root)).index(chunk_bytes=CHUNK)
    a = Archive(str(root))
    result = got(a)
    assert result == brute(root)
    st = a.last_stats
    assert st.packets == len(result) == 26000 and st.packets_held == 0
    assert st.files_read > 20
    assert st.peak_packets_held < 2000, st.peak_packets_held   # ~ a chunk per open file
    # write() gives the same packets (the reader regroups a buffer's packets per interface)
    a.write(str(tmp_path / "o.pcapng"))
    assert sorted((int(b.ts_ns[i]), bytes(b[i])) for b in pktstream.read(tmp_path / "o.pcapng")
                  for i in range(len(b))) == sorted(result)


def test_stopping_early_closes_the_files(seek_dir):
    a = Archive(str(seek_dir))
    it = a.packets("tcp")
    first = next(it)
    assert len(first) > 0
    it.close()  # the generators close their readers (no ResourceWarning, no exception)


@pytest.mark.live
def test_receiver_writes_seekable_files_and_query_equals_tcpdump(procs, tmp_path, mixed_pcap):
    """Real receiver with --zstd-frame-size, two sensors on veth pairs: the rotated files are
    seekable, and ``pktstream query`` equals tcpdump over every file."""
    import signal
    import threading

    from conftest import free_port, wait_received
    from pktstream.lab.netns import Veth
    from test_archive_live import brute as tcpdump_brute, query
    from test_stream import receiver_cmd, sensor_cmd
    root = tmp_path / "archive"
    root.mkdir()
    port = free_port()
    rx = procs(receiver_cmd(port, "--output-dir", str(root / "by-sensor"), "--format", "pcap.zst",
                            "-C", "20KB", "--index", "--zstd-frame-size", "4KiB"))
    rx.wait_for("listening on")
    with Veth() as a, Veth() as b:
        sensors = [procs(sensor_cmd(port, v.outer, "--sensor-id", n, "--block-size", "32KiB"))
                   for v, n in ((a, "alpha"), (b, "beta"))]
        for s in sensors:
            s.wait_for("connected to receiver")
        threads = [threading.Thread(target=v.replay, args=(mixed_pcap,), kwargs={"pps": 8000}) for v in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in ("alpha", "beta"):
            wait_received(rx, 2000, n)
        for s in sensors:
            assert s.stop(signal.SIGTERM) == 0
        assert rx.stop(signal.SIGTERM) == 0
    files = sorted((root / "by-sensor").glob("*.pcap.zst"))
    assert len(files) >= 4
    assert sum(len(frames_of(f)) for f in files) > 2 * len(files)  # several frames per file, each with its table
    out = tmp_path / "q.pcapng"
    for bpf in ("host 198.18.0.1 and udp", "tcp", "udp port 53 or icmp"):
        got_, err = query(root, out, bpf)
        ref = tcpdump_brute(root, bpf)
        assert got_ == ref and len(ref) > 10, bpf
        assert "(0 scanned" in err


@pytest.mark.live
def test_s3_output_seekable(tmp_path, moto):
    """S3Sink with the seekable layout: the objects carry their seek table, queries over the
    bucket read frames with ranged GETs and equal a full read of the downloaded objects."""
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink
    s3 = moto.client()
    s3.create_bucket(Bucket="seek")
    sink = S3Sink("seek", "caps/", staging_dir=str(tmp_path / "staging"), client=s3, rotate_bytes=60_000,
                  rotate_seconds=3600, format="pcapng.zst", index=True, acl=None, zstd_frame_bytes=FRAME)
    src = Source("alpha", "alpha", "eth0", 1, 262144)
    for b in batches(60, 6000, T0, per_batch=30):
        sink.write(src, b)
        sink.flush()
    sink.close()
    assert sink.counters["indexed_files"] == sink.counters["uploaded_files"] >= 3
    local = tmp_path / "dl"
    for o in s3.list_objects_v2(Bucket="seek", Prefix="caps/")["Contents"]:
        if "/_index/" not in o["Key"]:
            dest = local / o["Key"][len("caps/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("seek", o["Key"], str(dest))
            assert len(frames_of(dest)) >= 2
    a = Archive("s3://seek/caps", client=s3)
    for bpf in ("host 203.0.113.7 and port 4444", "udp"):
        assert got(a, bpf) == brute(local, bpf)
        assert a.last_stats.files_scanned == 0


def test_frame_size_option_yaml_and_checks(tmp_path):
    """output.zstdFrameSize (YAML) = --zstd-frame-size; a frame size needs a .zst output."""
    from pktstream.config import receiver_settings
    from pktstream.exceptions import ConfigError
    from pktstream.sinks import FileSink
    s = receiver_settings({"input": {"port": 1}, "output": {"file": {"path": str(tmp_path / "a.pcap.zst")},
                                                            "zstdFrameSize": "1MiB"}})
    assert s.zstd_frame_size == 1 << 20
    assert receiver_settings({"input": {"port": 1}, "output": {"file": {"path": "x.pcap"}}}).zstd_frame_size is None
    with pytest.raises(ConfigError, match=".zst"):
        FileSink(str(tmp_path / "a.pcapng"), zstd_frame_bytes=1 << 20)
    with pytest.raises(ConfigError, match="frame size"):
        FileSink(str(tmp_path / "a.pcapng.zst"), zstd_frame_bytes=0)
    with pytest.raises(ValueError, match="zstd_frame_bytes"):
        open_writer(tmp_path / "b.pcap.zst", zstd_frame_bytes=2 << 30)


def test_hostile_seek_tables_are_ignored(tmp_path):
    """A seek table that is not believable -- too many entries, a frame smaller than any zstd
    frame, sizes that do not add up to the file -- is ignored (the file is read as one stream);
    the query still equals brute force."""
    p = tmp_path / "s.pcap.zst"
    with open_writer(p, zstd_frame_bytes=FRAME) as w:
        for b in batches(2, 2000, T0):
            w.write(b)
    data = p.read_bytes()
    n = struct.unpack("<I", data[-9:-5])[0]
    table = len(data) - 9 - 8 * n - 8
    store = open_store(str(tmp_path))
    variants = {
        "many.pcap.zst": data[:-9] + struct.pack("<IBI", (1 << 20) + 1, 0, SEEKABLE_MAGIC),
        "tiny.pcap.zst": data[:table + 8] + struct.pack("<II", 5, 100) + data[table + 16:],
        "sum.pcap.zst": data[:table + 8] + struct.pack("<II", struct.unpack_from("<I", data, table + 8)[0] + 1,
                                                       100) + data[table + 16:],
    }
    assert read_seek_table(store, p.name, len(data)) is not None
    for name, body in variants.items():
        (tmp_path / name).write_bytes(body)
        assert read_seek_table(store, name, len(body)) is None, name
    a = Archive(str(tmp_path))
    a.index(chunk_bytes=CHUNK)
    for bpf in ("tcp", "host 203.0.113.7 and port 4444"):
        assert got(a, bpf) == brute(tmp_path, bpf)


def test_a_large_frame_is_not_held_whole(tmp_path):
    """A query reading a chunk at the end of one large frame keeps about a read unit of it at a
    time, not the frame up to the chunk (frames may be up to 1 GiB)."""
    import tracemalloc
    p = tmp_path / "big.pcap.zst"
    data = batches(3, 60000, T0)
    with open_writer(p, zstd_frame_bytes=1 << 30) as w:
        for b in data[:-1]:
            w.write(b)
        w.write(rare_flow(3, int(data[-2].ts_ns[-1]) + 1))
        w.write(data[-1])
    assert len(frames_of(p)) == 1
    a = Archive(str(tmp_path))
    a.index(chunk_bytes=CHUNK)
    tracemalloc.start()
    result = got(a, "host 192.0.2.99")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(result) == 3 and result == brute(tmp_path, "host 192.0.2.99")
    stream_bytes = sum(b.nbytes for b in data)
    assert stream_bytes > 6 * (1 << 20) and peak < 4 * (1 << 20), (stream_bytes, peak)
