"""The index never hides a packet libpcap's filter matches, and a damaged index never stops a
query (no root). Frames whose headers the snap length cut or that are malformed, flow files that
are gone or unreadable, a re-index that fails half-way, a catalog file that is another Parquet
file, sensor ids with dots, port numbers in octal or hex: each query equals a brute-force read
of every file with libpcap's filter (``brute``, what ``tcpdump -r FILE BPF`` prints)."""
from __future__ import annotations

import errno
import os
import struct

import pytest

import pktstream
from archive_data import _arp, _eth, _ipv4, _ipv6, _tcp, _udp, batches, to_format3
from pktstream.archive import Archive
from pktstream.archive.index import file_id, sensor_of
from pktstream.archive.prune import parse
from pktstream.archive.store import LocalStore
from pktstream.formats import open_writer
from test_archive import CHUNK, T0, brute, got

S = 10**9


def _cut(frame: bytes, caplen: int) -> tuple[bytes, int]:
    return frame[:caplen], len(frame)


def _bad_ipv4(src: str, dst: str, *, ihl: int = 5, version: int = 4) -> bytes:
    h = bytearray(_ipv4(src, dst, 6, _tcp(4000, 80, 0x02, b"")))
    h[0] = (version << 4) | ihl
    return bytes(h)


def edge_frames() -> list[tuple[bytes, int]]:
    """(captured bytes, length on the wire) of frames an index can get wrong."""
    return [
        (_eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 6, _tcp(1234, 443, 0x18, b"x" * 30))), 0),
        _cut(_eth(0x0800, _ipv4("10.0.0.3", "10.0.0.4", 6, _tcp(5555, 80, 0x02, b""))), 38),   # both ports
        _cut(_eth(0x0800, _ipv4("10.0.0.13", "10.0.0.14", 6, _tcp(7777, 8888, 0x02, b""))), 36),  # sport only
        _cut(_eth(0x0800, _ipv4("10.0.0.5", "10.0.0.6", 17, _udp(5353, 53, b"q" * 20))), 38),
        (_eth(0x0800, _bad_ipv4("10.9.9.9", "10.9.9.10", ihl=4)), 0),                        # IHL 4
        (_eth(0x0800, _bad_ipv4("10.8.8.8", "10.8.8.9", version=5)), 0),                     # version 5
        _cut(_eth(0x0800, _ipv4("10.7.7.7", "10.7.7.8", 6, _tcp(1, 2, 0x02, b""))), 32),     # src only
        _cut(_eth(0x86DD, _ipv6("2001:db8::7", "2001:db8::8", 6, _tcp(1, 2, 0x02, b""))), 38),  # src only
        _cut(_eth(0x0806, _arp("10.6.6.6", "10.6.6.7")), 34),                                 # sender only
        # an IPv6 fragment header cut after its next-header byte: libpcap's "udp" reads that byte
        _cut(_eth(0x86DD, _ipv6("2001:db8::9", "2001:db8::a", 44,
                                struct.pack("!BBHI", 17, 0, 1, 7) + _udp(1000, 53, b"f" * 20))), 56),
    ]


EDGE_BPFS = ["port 80", "tcp port 80", "port 53", "dst port 53", "src port 7777", "dst port 8888",
             "host 10.9.9.9", "host 10.8.8.8", "src host 10.7.7.7", "net 10.8.0.0/16", "host 2001:db8::7",
             "host 10.6.6.6", "port 0120", "port 0x50", "portrange 0120-0x50", "not port 443",
             "host 198.18.1.1 and port 80", "host 192.0.2.250", "ip6 and udp", "udp and host 2001:db8::9"]


def _write_edges(path, frames, start_ns: int, link_type: int = 1) -> None:
    out = bytearray()
    for i, (data, wire) in enumerate(frames):
        ts = start_ns + i * 1000
        out += struct.pack("<IIII", ts // S, ts % S, len(data), wire or len(data)) + data
    with open_writer(path) as w:
        w.write(pktstream.PacketBatch.from_records(bytes(out), link_type=link_type))


@pytest.fixture
def edge_archive(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    _write_edges(root / "edges.pcap", edge_frames(), T0)
    with open_writer(root / "mix.pcapng", rotate_bytes=100_000) as w:  # ordinary traffic to prune
        for b in batches(3, 1500, T0):
            w.write(b)
    return root


@pytest.mark.parametrize("bpf", EDGE_BPFS)
def test_cut_and_malformed_headers_are_never_pruned_away(edge_archive, bpf):
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    want = brute(edge_archive, bpf)
    assert got(a, bpf) == want
    assert a.last_stats.files_scanned == 0 and not a.last_stats.problems


def test_edge_filters_are_decided_by_libpcap_as_the_test_expects(edge_archive):
    """The oracle sees what the test is about: each cut or malformed frame matches its filter."""
    for bpf in ("port 80", "dst port 53", "src port 7777", "host 10.9.9.9", "host 10.8.8.8",
                "src host 10.7.7.7", "host 2001:db8::7", "host 10.6.6.6", "port 0120", "port 0x50",
                "ip6 and udp"):
        assert [p for p in brute(edge_archive, bpf) if p[0] < T0 + S], bpf
    # and the index still prunes: a host that is nowhere reads none of the ordinary files (the
    # malformed frames leave the edge file's summary unable to say "not here": it is read)
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    assert got(a, "host 192.0.2.250") == [] and a.last_stats.files_read == 1 < a.last_stats.files_total
    assert got(a, "port 4321") == [] and a.last_stats.files_read == 1


def test_a_cut_ipv6_fragment_header_is_indexed_with_the_protocol_libpcap_reads(tmp_path):
    """Alone in its file with one decided frame, so nothing else makes its chunk read."""
    frag6 = _eth(0x86DD, _ipv6("2001:db8::9", "2001:db8::a", 44,
                               struct.pack("!BBHI", 17, 0, 1, 7) + _udp(1000, 53, b"f" * 20)))
    _write_edges(tmp_path / "frag.pcap", [(_eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 6, _tcp(1, 2, 0x10, b""))), 0),
                                          _cut(frag6, 14 + 40 + 2)], T0)
    a = Archive(str(tmp_path))
    a.index(chunk_bytes=CHUNK)
    for bpf in ("udp", "ip6 and udp", "udp and host 2001:db8::9"):
        want = brute(tmp_path, bpf)
        assert len(want) == 1, bpf  # the oracle matches the cut frame
        assert got(a, bpf) == want, bpf
        assert a.last_stats.files_scanned == 0 and not a.last_stats.problems


def test_loopback_address_families_are_decided_as_libpcap_decides_them_in_a_file(tmp_path):
    """Link type NULL: "ip6" in a file tests the BSD families 24/28/30, not Linux's AF_INET6 10,
    so a packet with family 10 matches "not ip6" (and must not be pruned by it)."""
    for name, afs in (("lo0.pcap", (2, 28, 30)), ("lo1.pcap", (24, 10))):  # (lo1: the family-10 packet
        frames = [(struct.pack("<I", af) + (_ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1, 53, b"")) if af == 2 else
                                            _ipv6("2001:db8::1", f"2001:db8::{af:x}", 17, _udp(1, 53, b""))), 0)
                  for af in afs]                                           # with a decided one only)
        _write_edges(tmp_path / name, frames, T0, link_type=0)
    a = Archive(str(tmp_path))
    a.index(chunk_bytes=CHUNK)
    for bpf in ("ip6", "not ip6", "ip", "not ip", "udp", "host 2001:db8::a"):
        want = brute(tmp_path, bpf)
        assert got(a, bpf) == want, bpf
    assert len(brute(tmp_path, "not ip6")) == 2 and len(brute(tmp_path, "ip6")) == 3  # (the oracle's view)


def test_port_numbers_are_read_as_libpcap_reads_them():
    assert parse("port 0120") == ("port", None, 80, 80)
    assert parse("port 0x50") == ("port", None, 80, 80)
    assert parse("portrange 010-0x20") == ("port", None, 8, 32)
    assert parse("port 080") is None  # (libpcap refuses it)
    assert parse("port http") is None


def _flow_files(root) -> list:
    return sorted((root / "_index" / "flows").rglob("*.parquet"))


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_an_unusable_flow_file_makes_its_file_scanned_and_index_repairs_it(edge_archive, damage):
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    victim = next(p for p in _flow_files(edge_archive) if p.name == file_id("mix.000001.pcapng") + ".parquet")
    if damage == "garbage":
        victim.write_bytes(b"not parquet at all")
    else:
        victim.unlink()
    msgs: list[str] = []
    assert got(a, "port 80", warn=msgs.append) == brute(edge_archive, "port 80")
    assert a.last_stats.files_scanned == 1
    assert [m for m in msgs if m.startswith("mix.000001.pcapng: index unusable")] and all("\n" not in m for m in msgs)
    assert len(a.flows(warn=msgs.append)) > 0  # the other files' records are listed
    res = a.index(chunk_bytes=CHUNK)
    if damage == "deleted":
        assert res["indexed"] == 1  # a row whose records are gone is not current
    else:
        Archive(str(edge_archive)).index(chunk_bytes=CHUNK, force=True)
    msgs.clear()
    assert got(a, "port 80", warn=msgs.append) == brute(edge_archive, "port 80")
    assert a.last_stats.files_scanned == 0 and not msgs


def test_a_snapshot_whose_port_lists_cannot_be_decoded_has_its_files_scanned(edge_archive):
    """The snapshot's small columns read, its port lists garbage (decoded only when a query's
    port test needs them, by then from the file read in place): the files are named and
    scanned and the answer is the brute force's -- the query stopped with the decoder's error."""
    import pyarrow.parquet as pq
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    snap = edge_archive / "_index" / "catalog.parquet"
    meta = pq.ParquetFile(snap).metadata
    col = meta.schema.to_arrow_schema().get_field_index("ports")
    data = bytearray(snap.read_bytes())
    for g in range(meta.num_row_groups):
        c = meta.row_group(g).column(col)
        start = c.dictionary_page_offset or c.data_page_offset
        data[start:start + c.total_compressed_size] = b"\xff" * c.total_compressed_size
    snap.write_bytes(bytes(data))
    msgs: list[str] = []
    assert got(a, "port 80", warn=msgs.append) == brute(edge_archive, "port 80")
    assert a.last_stats.files_scanned >= 1 and a.last_stats.files_scanned == len(
        [m for m in msgs if ": index unusable (" in m]), msgs
    assert got(a, "host 198.18.1.1", warn=msgs.append) == brute(edge_archive, "host 198.18.1.1")  # (no port test)


def test_a_reindex_that_fails_half_way_leaves_the_file_scanned_then_repaired(edge_archive, monkeypatch):
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    # a re-index with another chunk layout whose catalog row cannot be written (disk full)
    real = LocalStore.write_bytes

    def full(self, rel, data):
        if rel.startswith("_index/files/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, data)
    monkeypatch.setattr(LocalStore, "write_bytes", full)
    with pytest.raises(OSError):
        a.index(chunk_bytes=4096, force=True)
    monkeypatch.setattr(LocalStore, "write_bytes", real)
    for bpf in ("host 198.18.1.1 and port 80", "port 53"):
        assert got(a, bpf) == brute(edge_archive, bpf)
    assert a.last_stats.files_scanned == 1  # the one whose row went: scanned, not pruned by a torn index
    res = a.index(chunk_bytes=4096)
    assert res["indexed"] == 1
    assert got(a, "port 53") == brute(edge_archive, "port 53") and a.last_stats.files_scanned == 0


def test_a_failed_read_while_indexing_is_no_damage_and_is_retried(edge_archive, monkeypatch):
    """EIO on one capture file: no catalog row (not "damaged" for good), the query scans it
    whole, and the next index run indexes it."""
    real = LocalStore.open

    def eio(self, rel):
        if rel == "edges.pcap":
            raise OSError(errno.EIO, "Input/output error")
        return real(self, rel)
    monkeypatch.setattr(LocalStore, "open", eio)
    a = Archive(str(edge_archive))
    res = a.index(chunk_bytes=CHUNK)
    monkeypatch.setattr(LocalStore, "open", real)
    assert res["damaged"] == 0
    assert res["problems"] == ["edges.pcap: not indexed: cannot read it: [Errno 5] Input/output error"]
    assert "edges.pcap" not in [r["path"] for r in a.catalog().to_pylist()]
    assert got(a, "port 53") == brute(edge_archive, "port 53") and a.last_stats.files_scanned == 1
    res = a.index(chunk_bytes=CHUNK)
    assert res["indexed"] == 1 and not res["problems"]
    assert got(a, "port 53") == brute(edge_archive, "port 53") and a.last_stats.files_scanned == 0


def test_a_chunk_size_below_the_readers_minimum_is_an_argument_error(edge_archive):
    a = Archive(str(edge_archive))
    with pytest.raises(ValueError, match="chunk_bytes 1024: give at least 4096"):
        a.index(chunk_bytes=1024)
    assert not (edge_archive / "_index").exists()  # (not every file recorded as damaged)


def test_corrupt_gzip_data_is_damage_named_in_one_line_and_the_query_goes_on(edge_archive):
    import gzip
    data = gzip.compress((edge_archive / "edges.pcap").read_bytes())
    (edge_archive / "edges.pcap").unlink()
    (edge_archive / "bad.pcap.gz").write_bytes(data[:30] + bytes(300) + data[330:])  # zlib.error inside
    (edge_archive / "crc.pcap.gz").write_bytes(data[:-8] + bytes(4) + data[-4:])  # gzip.BadGzipFile (an OSError)
    a = Archive(str(edge_archive))
    res = a.index(chunk_bytes=CHUNK)
    assert res["damaged"] == 2, res
    assert sorted(p.split(":")[0] for p in res["problems"]) == ["bad.pcap.gz", "crc.pcap.gz"]
    assert all("corrupt gzip data" in p and "\n" not in p for p in res["problems"])
    msgs: list[str] = []
    for bpf in (None, "port 80"):
        assert got(a, bpf, warn=msgs.append) == brute(edge_archive, bpf)
        assert a.last_stats.files_scanned == 0
    assert {m.split(":")[0] for m in msgs} == {"bad.pcap.gz", "crc.pcap.gz"} and all("\n" not in m for m in msgs)


def test_a_parquet_file_that_is_no_catalog_row_is_named_removed_by_index_and_ignored(edge_archive):
    import pyarrow as pa
    import pyarrow.parquet as pq
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    foreign = edge_archive / "_index" / "files" / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    msgs: list[str] = []
    assert got(a, "udp", warn=msgs.append) == brute(edge_archive, "udp")
    assert any("foreign.parquet: unreadable catalog file" in m for m in msgs)
    res = a.index(chunk_bytes=CHUNK)  # no crash; the misfit is removed and said so
    assert any("foreign.parquet" in p for p in res["problems"]) and not foreign.exists()


def test_a_catalog_row_with_damaged_buffers_is_named_and_never_read(edge_archive, tmp_path):
    """An Arrow IPC catalog row whose string offsets point past its data (a flipped bit, a
    crafted file) is refused as unreadable -- its values would be read past their buffer --
    and named; the query scans that file and answers (a child process: a crash would show)."""
    import subprocess

    from conftest import PKTSTREAM
    from pktstream.archive.catalog import row_table
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    (edge_archive / "_index" / "catalog.parquet").unlink()  # (the rows are read from their files)
    rel = "edges.pcap"
    f = edge_archive / "_index" / "files" / f"{file_id(rel)}.arrow"
    data = bytearray(f.read_bytes())
    sensor = row_table(bytes(data)).column("sensors")[0].as_py()[0].encode()
    # the sensors list's string offsets [0, len] lie right before its one string: make the end 1 GiB
    good = struct.pack("<ii", 0, len(sensor))
    at = [i for i in range(8, len(data)) if data[i:i + len(sensor)] == sensor and data[i - 8:i] == good]
    assert len(at) == 1
    data[at[0] - 4:at[0]] = struct.pack("<i", 1 << 30)
    f.write_bytes(bytes(data))
    out = tmp_path / "q.pcapng"
    r = subprocess.run([*PKTSTREAM, "query", str(edge_archive), "udp", "-w", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{f.name}: unreadable catalog file" in r.stderr, r.stderr
    assert f"scanned {rel}" in r.stderr, r.stderr
    assert got(a, "udp") == brute(edge_archive, "udp")
    res = a.index(chunk_bytes=CHUNK)  # removed and said so; the file indexed again
    assert any(f.name in p for p in res["problems"]) and res["indexed"] == 1


def test_sensor_ids_with_dots_are_attributed_whole(tmp_path):
    assert sensor_of("", "by/10.0.0.5.000003.pcap.zst") == ("10.0.0.5", "if0")
    assert sensor_of("", "web-1.example.com.pcapng") == ("web-1.example.com", "if0")
    assert sensor_of("", "s1.LINUX_SLL.000002.pcap") == ("s1", "if0")
    # the next free name of a restarted receiver (s1~1.pcap); an id ending in a number is whole
    assert sensor_of("", "s1~1.pcap") == ("s1", "if0") and sensor_of("", "s1.LINUX_SLL~2.pcap") == ("s1", "if0")
    assert sensor_of("", "10.0.0.5~1.pcap.zst") == ("10.0.0.5", "if0")
    assert sensor_of("", "node.12.pcap") == ("node.12", "if0") and sensor_of("", "db.01~3.pcapng")[0] == "db.01"
    assert sensor_of("s9/eth0", "10.0.0.5.pcapng") == ("s9", "eth0")
    root = tmp_path / "a"
    root.mkdir()
    for i, sensor in enumerate(("10.0.0.5", "10.0.0.6", "web-1.example.com")):
        with open_writer(root / f"{sensor}.pcap.zst", rotate_bytes=80_000) as w:
            for b in batches(i, 600, T0):
                w.write(b)
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    assert {s for r in a.catalog().to_pylist() for s in r["sensors"]} == {"10.0.0.5", "10.0.0.6", "web-1.example.com"}
    for sensor in ("10.0.0.5", "web-1.example.com"):
        assert got(a, "tcp", sensor=sensor) == brute(root, "tcp", sensor=sensor) != []


def _twin_sensors_archive(root, live: bool, index_offline: bool = True):
    """One merged pcapng holding sensor ``s p`` and a sensor named as ``s p``'s partition value
    was before 2026-12-04 (``s_p-e745a89c``, a path-safe id; now ``s_p~e745a89c``): one flow
    file path for both then, the records of one overwrote the other's and queries left out its
    packets."""
    import hashlib

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    twin = "s_p-" + hashlib.sha256(b"s p").hexdigest()[:8]
    root.mkdir()
    sink = FileSink(str(root / "all.pcapng"), index=live)
    for k, sensor in enumerate(("s p", twin)):
        for b in batches(k, 300, T0 + k * 1000, interface=f"{sensor}/eth0"):
            sink.write(Source(sensor, "h", "eth0", 1, 262144), b)
    sink.close()
    if not live and index_offline:
        Archive(str(root)).index(chunk_bytes=CHUNK)
    return sink


@pytest.mark.parametrize("live", [True, False])
def test_a_sensor_named_like_another_sensors_partition_value_keeps_its_records(tmp_path, live):
    _twin_sensors_archive(tmp_path / "a", live)
    a = Archive(str(tmp_path / "a"))
    row = a.catalog().to_pylist()[0]
    assert len(row["sensors"]) == 2 and len(row["flow_files"]) == 1  # (one date: one file, a sensor column)
    flows = {}
    for r in a.flows().select(["sensor", "packets"]).to_pylist():
        flows[r["sensor"]] = flows.get(r["sensor"], 0) + r["packets"]
    assert flows == {s: 300 for s in row["sensors"]}
    for bpf in (None, "tcp", "udp", "host 192.0.2.99"):
        assert got(a, bpf) == brute(tmp_path / "a", bpf), bpf
        for sensor in row["sensors"]:
            assert got(a, bpf, sensor=sensor) == brute(tmp_path / "a", bpf, sensor=sensor), (bpf, sensor)
    assert a.last_stats.files_scanned == 0


def test_an_index_written_with_the_old_partition_values_is_read_alike(tmp_path):
    """Index format 3 kept a flow file per sensor partition value; before 2026-12-04 an id that
    is not path-safe got a ``-`` suffix (``rack 7`` -> ``rack_7-<hash>``, then ``rack_7~<hash>``),
    and commit e169e5b gave one to path-safe ids ending like a suffix (``node-deadbeef``); such
    indexes (not rewritten) answer sensor queries and name their sensor; path-safe ids keep their
    own name as their value."""
    import hashlib
    import re

    import pktstream.archive.index as ix

    def old_value(text: str) -> str:
        cleaned = re.sub(r"[^A-Za-z0-9._@-]", "_", text)[:100].lstrip(".") or "_"
        return cleaned if cleaned == text else cleaned + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]

    def e169e5b_value(text: str) -> str:  # (the first fix: path-safe ids ending like a suffix got one)
        value = old_value(text)
        return value + "-" + hashlib.sha256(text.encode()).hexdigest()[:8] \
            if value == text and re.search(r"-[0-9a-f]{8}$", text) else value
    sensors = ("rack 7", "rack-20241127", "node-deadbeef")
    for k, (sensor, old) in enumerate(zip(sensors, (old_value, old_value, e169e5b_value))):
        root = tmp_path / f"a{k}"
        root.mkdir()
        with open_writer(root / "all.pcapng") as w:
            for b in batches(3 + k, 400, T0, interface=f"{sensor}/eth0"):
                w.write(b)
        Archive(str(root)).index(chunk_bytes=CHUNK)
        assert to_format3(root, old) == 1
        assert (root / "_index" / "flows" / f"sensor={old(sensor)}").is_dir()
    assert ix.partition_value("rack 7") != old_value("rack 7") and "~" in ix.partition_value("rack 7")
    assert ix.partition_value("rack-20241127") == "rack-20241127"
    assert ix.partition_value("node-deadbeef") != e169e5b_value("node-deadbeef")
    for k, sensor in enumerate(sensors):
        root = tmp_path / f"a{k}"
        a = Archive(str(root))
        assert got(a, "tcp", sensor=sensor) == brute(root, "tcp", sensor=sensor) != []
        assert set(a.flows(sensor=sensor).column("sensor").to_pylist()) == {sensor}
        assert set(a.flows().column("sensor").to_pylist()) == {sensor}
        # pktstream index rewrites it in the current layout, the id itself in its sensor column
        assert a.index(chunk_bytes=CHUNK)["upgraded"] == 1
        assert not list((root / "_index" / "flows").glob("sensor=*"))
        assert got(a, "tcp", sensor=sensor) == brute(root, "tcp", sensor=sensor) != []
        assert set(a.sql("SELECT DISTINCT sensor FROM flows").column("sensor").to_pylist()) == {sensor}


def test_flows_says_which_files_it_cannot_list(edge_archive, monkeypatch):
    """Files without a current index (none yet, or an index of an older format) are named,
    not silently missing from the flow list."""
    import pktstream.archive.index as ix
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    msgs: list[str] = []
    assert len(a.flows(warn=msgs.append)) > 0 and not msgs
    # every row of a format queries no longer read
    monkeypatch.setattr(ix, "READABLE_VERSIONS", (ix.FORMAT_VERSION + 1,))
    assert len(a.flows(warn=msgs.append)) == 0
    assert len(msgs) == 1 and "5 file(s) without a current index are not listed" in msgs[0], msgs


def _tcpdump_order(path, bpf: str | None) -> list[tuple[int, bytes]]:
    """What ``tcpdump -r`` prints, in its order (nanosecond pcap out)."""
    import io
    import subprocess
    out = subprocess.run(["tcpdump", "-r", str(path), "--time-stamp-precision=nano", "-w", "-"]
                         + ([bpf] if bpf else []), capture_output=True, check=True).stdout
    return [(int(b.ts_ns[i]), bytes(b[i])) for b in pktstream.read(io.BytesIO(out)) for i in range(len(b))]


def test_equal_time_stamps_of_several_interfaces_come_out_in_file_order(tmp_path):
    """One pcapng of two sections and three interfaces, packets interleaved in runs of 1-3 per
    interface, four packets per time stamp, over several read buffers: the query's order is the
    file's, as tcpdump -r prints it (the reader hands a read buffer out one interface at a time,
    and interface numbers start again with a section)."""
    import random

    from archive_data import frame, records
    rng = random.Random(7)
    root = tmp_path / "a"
    root.mkdir()
    path = root / "multi.pcapng"
    i = 0
    sections = []
    for end in (5000, 9000):
        part = tmp_path / f"section{end}.pcapng"
        with open_writer(part) as w:
            while i < end:
                run = [(T0 + (j // 4) * 1000, frame(rng) + j.to_bytes(4, "big"))
                       for j in range(i, i + rng.randint(1, 3))]
                w.write(pktstream.PacketBatch.from_records(records(run), link_type=1,
                                                           interface=f"s1/eth{rng.randrange(3)}"))
                i += len(run)
        sections.append(part.read_bytes())
    path.write_bytes(b"".join(sections))
    assert path.stat().st_size > 2 * (1 << 20)  # more than two read buffers
    a = Archive(str(root))
    for indexed in (False, True):
        if indexed:
            a.index(chunk_bytes=CHUNK)
        for bpf in (None, "tcp", "ip6 or arp"):
            want = _tcpdump_order(path, bpf)
            assert len({ts for ts, _ in want}) < len(want)  # ties there are
            assert got(a, bpf) == want, (indexed, bpf)
            assert a.last_stats.files_scanned == (0 if indexed else 1)
        since, until = T0 + 500 * 1000, T0 + 900 * 1000
        assert got(a, "udp", since=since, until=until) == [x for x in _tcpdump_order(path, "udp")
                                                           if since <= x[0] < until]


@pytest.mark.parametrize("moment", ["after the listing", "mid-commit"])
def test_index_beside_a_live_receiver_keeps_what_the_receiver_indexes(tmp_path, moment):
    """``pktstream index`` while a receiver writes into the archive (cold review): a file the
    receiver completes and indexes after the index run listed the capture files kept neither its
    row ("file gone") nor its flow files; flow files a receiver had written but not yet committed
    with its row (flow files first, the row last) were removed as orphans, leaving the row it then
    wrote pointing at nothing. Both interleavings are made to happen here, deterministically."""
    import shutil

    from pktstream.archive import catalog
    from pktstream.archive.store import Entry
    from pktstream.lab.traffic import write_pcap
    root = tmp_path / "a"
    root.mkdir()
    write_pcap(str(root / "old.pcap"), 200, seed=1)
    catalog.repair(LocalStore(str(root)))
    write_pcap(str(tmp_path / "new.pcap"), 300, seed=2)
    held: list = []

    def receiver_indexes_new_file(commit_row: bool) -> None:
        shutil.copy(tmp_path / "new.pcap", root / "new.pcap")
        st = (root / "new.pcap").stat()
        row, tables = catalog.index_entry(LocalStore(str(root)), Entry("new.pcap", st.st_size, str(st.st_mtime_ns)))
        catalog.write_index(LocalStore(str(root)), row, tables)
        if not commit_row:  # the flow files are written, the row not yet
            held.append((root / "_index" / catalog.catalog_file("new.pcap").split("/", 1)[1]).read_bytes())
            LocalStore(str(root)).delete(catalog.catalog_file("new.pcap"))

    class Racing(LocalStore):
        def captures(self):
            out = super().captures()
            if moment == "after the listing" and not held and not (root / "new.pcap").exists():
                receiver_indexes_new_file(commit_row=True)
            return out

        def list_files(self, prefix):
            if moment == "mid-commit" and "flows" in prefix and not held:
                receiver_indexes_new_file(commit_row=False)
            return super().list_files(prefix)

    res = catalog.repair(Racing(str(root)))
    assert res["removed"] == 0
    if held:  # the receiver's commit ends: its row
        (root / "_index" / catalog.catalog_file("new.pcap").split("/", 1)[1]).write_bytes(held[0])
    row = catalog.read_row(LocalStore(str(root)), "new.pcap")
    assert row is not None and row["packets"] == 300
    assert all((root / f).is_file() for f in row["flow_files"])
    again = catalog.repair(LocalStore(str(root)))
    assert (again["indexed"], again["removed"], again["current"]) == (0, 0, 2)
    a = Archive(str(root))
    assert sum(len(b) for b in a.packets("")) == 500


def test_index_removes_half_written_index_files_of_stopped_processes(tmp_path):
    """An index file is written as NAME.PID.tmp, then renamed; a receiver killed in between
    left the temporary file for good (nothing listed or removed it). ``pktstream index`` removes
    those of processes that are gone (and older than a minute), not a live writer's."""
    import time as _time

    from pktstream.archive import catalog
    from pktstream.lab.traffic import write_pcap
    root = tmp_path / "a"
    root.mkdir()
    write_pcap(str(root / "one.pcap"), 100, seed=1)
    catalog.repair(LocalStore(str(root)))
    with open("/proc/sys/kernel/pid_max") as f:
        gone = int(f.read()) + 1  # no process can have it
    part = next((root / "_index" / "flows").glob("date=*"))
    old = _time.time() - 120
    stale = part / f"x.parquet.{gone}.tmp"
    fresh = part / f"y.parquet.{gone}.tmp"
    live = root / "_index" / "files" / f"z.parquet.{os.getpid()}.tmp"
    for p in (stale, fresh, live):
        p.write_bytes(b"half")
    for p in (stale, live):
        os.utime(p, (old, old))
    res = catalog.repair(LocalStore(str(root)))
    assert not stale.exists() and fresh.exists() and live.exists()
    assert [p for p in res["problems"] if "half-written" in p] == \
        [f"{stale.relative_to(root).as_posix()}: an index file a stopped process left half-written, removed"]
    assert (res["indexed"], res["removed"], res["current"]) == (0, 0, 1)


# -- the filter's grammar as libpcap reads it (a differential fuzzer against tcpdump found these) ---

GRAMMAR_BPFS = [
    # "and" and "or" have equal precedence, left to right: not ((port 80 or port 81) and host X)
    "not (port 80 or port 81 and host 10.0.0.1)", "not (port 0x50 or udp and tcp)",
    "not (udp port 80 or port 81 and host 10.0.0.1)",
    # a bare value inherits the whole qualifier, protocol included: "or 443" is "or tcp port 443"
    "not (tcp port 80 or 443)", "tcp port 80 or not 443", "tcp port 80 and not 443",
    "not (tcp src port 53 or 53)", "ip host 10.0.0.1 or not 10.0.0.2", "not (ip host 10.0.0.1 or 10.0.0.2)",
    "not (udp or tcp and src host 2001:db8::1)",
]


def test_and_or_and_inherited_qualifiers_are_read_as_libpcap_reads_them(tmp_path):
    """An index that read ``a or b and c`` as ``a or (b and c)``, or ``tcp port 80 or 443`` as
    ``... or port 443``, got the opposite answer under ``not`` and left out packets the filter
    matches (UDP to 443, UDP to 80, an ARP request, DNS over UDP: each query returned nothing)."""
    root = tmp_path / "g"
    root.mkdir()
    frames = [(_eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(5000, 443, b"a" * 8))), 0),
              (_eth(0x0800, _ipv4("10.0.0.5", "10.0.0.2", 17, _udp(5000, 80, b"b" * 8))), 0),
              (_eth(0x0806, _arp("10.0.0.2", "10.0.0.9")), 0),
              (_eth(0x0800, _ipv4("10.0.0.5", "10.0.0.2", 17, _udp(53, 53, b"c" * 8))), 0)]
    for i, frame in enumerate(frames):  # one file each: a file the index wrongly rules out is not read
        _write_edges(root / f"g{i}.pcap", [frame] * 3, T0 + i * S)
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    for bpf in GRAMMAR_BPFS:
        want = brute(root, bpf)
        assert got(a, bpf) == want, bpf
        assert a.last_stats.files_scanned == 0 and not a.last_stats.problems
    # the oracle sees what the test is about: each of those filters matches packets here
    assert all(brute(root, bpf) for bpf in GRAMMAR_BPFS if bpf != "tcp port 80 and not 443")
    # and the parser keeps pruning where it can: the same trees libpcap builds
    assert parse("port 80 or port 81 and host 10.0.0.1") == (
        "and", ("or", ("port", None, 80, 80), ("port", None, 81, 81)), ("net", None, parse("host 10.0.0.1")[2]))
    assert parse("tcp port 80 or 443") == ("or", parse("tcp port 80"), parse("tcp port 443"))
    assert parse("tcp port 80 or not 443") == ("or", parse("tcp port 80"), ("not", parse("tcp port 443")))
    # where libpcap's inheritance is subtler, no pruning (exact all the same)
    for unsupported in ("(tcp port 80) or 443", "port 80 or (443)", "port 80 or tcp or 443", "10.0.0.1",
                        "port 80 443"):
        assert parse(unsupported) is None, unsupported


def _tcpdump_r(path, bpf: str) -> list[tuple[int, bytes]]:
    """``tcpdump -r PATH BPF``: a filter libpcap refuses for the file's link type prints nothing."""
    from test_archive_live import tcpdump_packets
    return tcpdump_packets(path, bpf, refused_ok=True)


def test_a_filter_one_files_link_type_refuses_matches_nothing_there_and_the_query_goes_on(edge_archive):
    """``ip`` on raw IPv6 and ``ether host`` on raw IP compile to "rejects all packets" (or are
    refused) for those files only: tcpdump -r prints none of their packets and the others'
    as usual; the query does the same, names the file once and is not stopped by it."""
    import subprocess

    from conftest import PKTSTREAM
    _write_edges(edge_archive / "raw6.pcap", [(_ipv6("2001:db8::1", "2001:db8::2", 17, _udp(1000, 53, b"v6")), 0)] * 3,
                 T0 + 5 * S, link_type=229)
    _write_edges(edge_archive / "raw4.pcap", [(_ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1000, 53, b"v4")), 0)] * 3,
                 T0 + 6 * S, link_type=101)
    a = Archive(str(edge_archive))
    a.index(chunk_bytes=CHUNK)
    files = sorted(p for p in edge_archive.rglob("*") if p.is_file() and "_index" not in p.parts)
    # ("ip": the index knows raw6.pcap holds no IPv4 and does not read it)
    for bpf, refused in (("ip", []), ("ether host 02:00:00:00:00:01", ["raw4.pcap", "raw6.pcap"]),
                         ("udp port 53", [])):
        want = sorted((x for f in files for x in _tcpdump_r(f, bpf)), key=lambda x: x[0])
        assert want, bpf  # the other files hold packets the filter matches
        assert got(a, bpf) == want, bpf
        st = a.last_stats
        assert sorted(s.split(":")[0] for s in st.skipped) == refused, (bpf, st.skipped)
        assert not st.problems
        assert ("link type the filter cannot match" in st.summary()) == bool(refused)
    out = edge_archive.parent / "q.pcapng"
    bpf = "ether src 02:00:00:00:00:01"
    r = subprocess.run([*PKTSTREAM, "query", str(edge_archive), *bpf.split(), "-w", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "raw6.pcap: no packet can match the filter (link type IPV6: ethernet addresses supported only" in r.stderr
    assert "2 file(s) of a link type the filter cannot match" in r.stderr
    assert sum(len(b) for b in pktstream.read(out)) == sum(len(_tcpdump_r(f, bpf)) for f in files) > 0
    # a filter Ethernet refuses and another link type takes: the other files answer it
    # ("inbound" on the SLL2 file of a "tcpdump -i any", as tcpdump -r of it answers)
    def sll2(pkttype: int, payload: bytes) -> bytes:
        return struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, pkttype, 6, bytes(8)) + payload
    _write_edges(edge_archive / "any.pcap", [(sll2(t, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1000, 53, b"i"))), 0)
                                             for t in (0, 4, 0, 4, 1)], T0 + 7 * S, link_type=276)
    a.index(chunk_bytes=CHUNK)
    files = sorted(p for p in edge_archive.rglob("*") if p.is_file() and "_index" not in p.parts)
    for bpf in ("inbound", "outbound and udp"):
        want = sorted((x for f in files for x in _tcpdump_r(f, bpf)), key=lambda x: x[0])
        assert len(want) in (2, 3), bpf
        assert got(a, bpf) == want, bpf
        assert "edges.pcap" in " ".join(a.last_stats.skipped)
    # ... and a link type outside the usual ones: pflog's "action pass"
    def pflog(action: int, payload: bytes) -> bytes:
        return struct.pack("!BBBB16s16sIIIiIiB3x", 61, 2, action, 0, b"em0", b"", 1, 0, 0, 0, 0, 0, 1) + payload
    _write_edges(edge_archive / "pf.pcap", [(pflog(a, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1000, 53, b"p"))), 0)
                                            for a in (0, 1, 0)], T0 + 8 * S, link_type=117)
    a.index(chunk_bytes=CHUNK)
    files = sorted(p for p in edge_archive.rglob("*") if p.is_file() and "_index" not in p.parts)
    want = sorted((x for f in files for x in _tcpdump_r(f, "action pass")), key=lambda x: x[0])
    assert len(want) == 2 and got(a, "action pass") == want
    # a filter no link type takes is the user's mistake: it still stops the query
    with pytest.raises(pktstream.FilterError, match="syntax error"):
        got(a, "tcp port")
    r = subprocess.run([*PKTSTREAM, "query", str(edge_archive), "tcp", "port", "-w", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "bad BPF filter" in r.stderr and "Traceback" not in r.stderr


def test_a_live_index_gives_a_batchs_linktype_value_as_the_offline_index_does(tmp_path):
    """A batch built with a LINKTYPE_ value (101, raw IP) is written as that and read back as
    its DLT_ value (12): the live index kept 101 in the flow records, an offline index of the
    same file 12 (found by session 21's fuzzer). Both give what a reader of the file sees."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    frames = [_ipv4("192.0.2.1", "198.51.100.7", 6, _tcp(40000 + i, 443, 0x18, b"x")) for i in range(5)]
    recs = b"".join(struct.pack("<IIII", 1_700_000_000, i, len(f), len(f)) + f for i, f in enumerate(frames))
    sink = FileSink(directory=str(tmp_path), format="pcapng", index=True)
    sink.write(Source("r1", "h", "tun0", 101, 65535), pktstream.PacketBatch.from_records(recs, link_type=101))
    sink.close()
    live = Archive(str(tmp_path)).flows().sort_by("sport").to_pylist()
    assert {r["link_type"] for r in live} == {12} and len(live) == 5
    Archive(str(tmp_path)).index(force=True)
    offline = Archive(str(tmp_path)).flows().sort_by("sport").to_pylist()
    assert [r["link_type"] for r in offline] == [r["link_type"] for r in live]
    assert [(r["src"], r["dst"], r["sport"], r["packets"]) for r in offline] == \
        [(r["src"], r["dst"], r["sport"], r["packets"]) for r in live]


def test_a_live_index_names_unnamed_pcapng_interfaces_as_a_reader_does(tmp_path):
    """Batches without an interface name get IDBs without one, which a reader names by their
    index (if0, if1); the live index called every such interface if0 (session 21's fuzzer)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    eth = [_eth(0x0800, _ipv4("192.0.2.1", "198.51.100.7", 17, _udp(5000 + i, 53, b"q"))) for i in range(3)]
    raw = [_ipv4("192.0.2.9", "198.51.100.8", 17, _udp(6000 + i, 53, b"q")) for i in range(3)]

    def batch(frames, link_type, first):
        recs = b"".join(struct.pack("<IIII", 1_700_000_000, first + i, len(f), len(f)) + f
                        for i, f in enumerate(frames))
        return pktstream.PacketBatch.from_records(recs, link_type=link_type)
    sink = FileSink(str(tmp_path / "all.pcapng"), index=True)
    sink.write(Source("s1", "h", "eth0", 1, 65535), batch(eth, 1, 0))
    sink.write(Source("s1", "h", "tun0", 12, 65535), batch(raw, 12, 10))
    sink.close()
    assert [b.interface for b in pktstream.read(str(tmp_path / "all.pcapng"))] == ["if0", "if1"]

    def names():
        return sorted((r["sport"], r["interface"], r["link_type"]) for r in Archive(str(tmp_path)).flows().to_pylist())
    live = names()
    assert {(i, lt) for _, i, lt in live} == {("if0", 1), ("if1", 12)}
    Archive(str(tmp_path)).index(force=True)
    assert names() == live


def _merged_archive(root, sensors, *, days: int = 1):
    """One merged pcapng (``-w``'s form) holding every sensor's batches, over ``days`` UTC days."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    root.mkdir()
    sink = FileSink(str(root / "all.pcapng"), index=True)
    for day in range(days):
        for k, sensor in enumerate(sensors):
            for b in batches(10 * day + k, 120, T0 + day * 86_400 * S + k * 1000, interface=f"{sensor}/eth0"):
                sink.write(Source(sensor, "h", "eth0", 1, 262144), b)
    sink.close()
    return sink


def test_a_merged_file_of_many_sensors_has_one_flow_file_per_date(tmp_path):
    """The index of a merged file is one Parquet file per UTC date with a ``sensor`` column
    holding each id itself (format 3 wrote a file per sensor: 40 sensors, 40 Parquet writes per
    completed file); sensor queries, flows and SQL see every sensor's records."""
    import pyarrow.parquet as pq
    sensors = [f"s{k}" for k in range(38)] + ["rack 7", "web-1.example.com"]
    root = tmp_path / "a"
    sink = _merged_archive(root, sensors, days=2)
    assert sink.indexer.indexed == 1
    a = Archive(str(root))
    row = a.catalog().to_pylist()[0]
    assert sorted(row["sensors"]) == sorted(sensors) and len(row["flow_files"]) == 2
    files = sorted((root / "_index" / "flows").rglob("*.parquet"))
    assert [p.parent.name for p in files] == ["date=2024-11-27", "date=2024-11-28"]
    for p in files:
        assert set(pq.read_table(p, columns=["sensor"]).column("sensor").to_pylist()) == set(sensors)
    per_sensor = {}
    for r in a.flows().select(["sensor", "packets"]).to_pylist():
        per_sensor[r["sensor"]] = per_sensor.get(r["sensor"], 0) + r["packets"]
    assert per_sensor == {s: 240 for s in sensors}
    for sensor in ("rack 7", "s3", "web-1.example.com"):
        assert got(a, "tcp", sensor=sensor) == brute(root, "tcp", sensor=sensor) != []
        assert a.last_stats.files_scanned == 0 and a.last_stats.flow_files_read == 2  # (the two dates)
        assert set(a.flows(sensor=sensor).column("sensor").to_pylist()) == {sensor}
    rows = a.sql("SELECT sensor, sum(packets)::BIGINT AS n, list(DISTINCT date ORDER BY date) AS dates "
                 "FROM flows GROUP BY ALL").to_pylist()
    assert {r["sensor"]: (r["n"], r["dates"]) for r in rows} == \
        {s: (240, ["2024-11-27", "2024-11-28"]) for s in sensors}
    # a flow file no row names (a commit under way, or a crash before its row): not counted
    (files[0].parent / "0123456789abcdef0123.parquet").write_bytes(files[0].read_bytes())
    assert a.sql("SELECT sum(packets)::BIGINT AS n FROM flows").to_pylist()[0]["n"] == 240 * len(sensors)


def test_an_index_of_format_3_is_queried_as_it_is_and_index_rewrites_it(tmp_path, monkeypatch):
    """An archive indexed before 2026-12-06 (format 3: a flow file per sensor and date) keeps
    answering from its index -- queries, flows, SQL, also beside files indexed since -- and a
    receiver's recovery (upgrade=False) leaves it; ``pktstream index`` rewrites it in the
    current layout from its flow records (no capture file read again), with the same answers."""
    from pktstream.archive.catalog import repair
    from pktstream.archive.index import FORMAT_VERSION
    root = tmp_path / "a"
    _merged_archive(root, ["s1", "rack 7", "s2"])
    with open_writer(root / "web-1.pcap") as w:  # (a per-sensor file)
        for b in batches(5, 300, T0):
            w.write(b)
    Archive(str(root)).index(chunk_bytes=CHUNK)
    want = {bpf: brute(root, bpf) for bpf in ("tcp", "udp", None)}
    want_s = brute(root, "tcp", sensor="rack 7")

    def answers(a):
        for bpf, w in want.items():
            assert got(a, bpf) == w, bpf
            assert a.last_stats.files_scanned == 0 and not a.last_stats.problems
        assert got(a, "tcp", sensor="rack 7") == want_s != []
        flows = a.flows()
        per_sensor = {}
        for r in flows.select(["sensor", "packets"]).to_pylist():
            per_sensor[r["sensor"]] = per_sensor.get(r["sensor"], 0) + r["packets"]
        assert per_sensor == {"s1": 120, "rack 7": 120, "s2": 120, "web-1": 300}
        n = a.sql("SELECT sum(packets)::BIGINT AS n FROM flows").to_pylist()[0]["n"]
        assert n == 660
        return flows.num_rows

    n_flows = answers(Archive(str(root)))
    assert to_format3(root) == 2
    assert len(list((root / "_index" / "flows").glob("sensor=*/date=*/*.parquet"))) == 4
    assert answers(Archive(str(root))) == n_flows
    # one file indexed again in the current layout, the other still of format 3: both answer
    (root / "web-1.pcap").touch()
    assert repair(LocalStore(str(root)), ["web-1.pcap"])["indexed"] == 1
    assert answers(Archive(str(root))) == n_flows
    # a receiver's recovery leaves format 3 rows (no capture file read again at its start)
    res = repair(LocalStore(str(root)), upgrade=False)
    assert (res["indexed"], res["current"]) == (0, 2)
    import pktstream.archive.catalog as catalog

    def no_capture_read(*a, **k):
        raise AssertionError("a capture file read again")
    monkeypatch.setattr(catalog, "index_entry", no_capture_read)
    res = Archive(str(root)).index(chunk_bytes=CHUNK)  # pktstream index: the layout is rewritten
    assert (res["indexed"], res["current"], res["upgraded"]) == (0, 1, 1), res  # (from its flow records)
    monkeypatch.undo()
    assert not list((root / "_index" / "flows").glob("sensor=*"))  # (emptied directories removed too)
    assert {r["index_version"] for r in Archive(str(root)).catalog().to_pylist()} == {FORMAT_VERSION}
    assert answers(Archive(str(root))) == n_flows


def test_rewriting_a_format_3_index_that_fails_keeps_it_in_use(tmp_path, monkeypatch):
    """The disk fills while ``pktstream index`` rewrites a format-3 index (at its second flow
    file, then at its catalog row): the run goes on, names the file, and leaves its format-3 row
    and flow files as they were (queries still use them; no half-written new layout beside them
    for SQL to count twice); the next run rewrites it, its Parquet row (the row format before
    2026-12-05) replaced, not left as a twin. A spilled index keeps a row group per spill."""
    import errno as _errno

    import pyarrow.parquet as pq

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    root = tmp_path / "a"
    root.mkdir()
    sink = FileSink(str(root / "all.pcapng"), index=True, index_max_flows=40)
    for day in range(2):
        for k, sensor in enumerate(("s1", "s2")):
            for b in batches(10 * day + k, 300, T0 + day * 86_400 * S + k * 1000, interface=f"{sensor}/eth0"):
                sink.write(Source(sensor, "h", "eth0", 1, 262144), b)
    sink.close()
    assert sink.indexer.spills > 0
    with open_writer(root / "web-1.pcap") as w:
        for b in batches(5, 300, T0):
            w.write(b)
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    want, want_flows = brute(root, "tcp"), a.flows().num_rows
    n_sql = a.sql("SELECT sum(packets)::BIGINT AS n FROM flows").to_pylist()[0]["n"]
    assert to_format3(root, parquet_rows=True) == 2
    rows = sorted(p.name for p in (root / "_index" / "files").iterdir())

    def files_of_all():
        return sorted(p.relative_to(root) for p in (root / "_index" / "flows").rglob("*.parquet")
                      if p.stem == file_id("all.pcapng"))
    legacy = files_of_all()
    assert len(legacy) == 4 and max(pq.ParquetFile(root / p).metadata.num_row_groups for p in legacy) > 1
    original = LocalStore.write_bytes
    for failing, upgraded in (("/flows/date=", 1), ("_index/files/", 0)):  # (web-1.pcap's rewrite: the 1st run)
        writes = []

        def full_disk(self, rel, data, failing=failing, writes=writes):
            if failing in rel and file_id("all.pcapng") in rel:
                writes.append(rel)
                if failing == "_index/files/" or len(writes) > 1:  # (the second date file, or the row)
                    raise OSError(_errno.ENOSPC, "No space left on device")
            return original(self, rel, data)
        monkeypatch.setattr(LocalStore, "write_bytes", full_disk)
        res = a.index(chunk_bytes=CHUNK)
        monkeypatch.undo()
        assert writes and [p for p in res["problems"] if "not rewritten" in p] == \
            ["all.pcapng: index not rewritten in the current layout ([Errno 28] No space left on device); "
             "its older index stays in use"], res["problems"]
        assert files_of_all() == legacy and res["upgraded"] == upgraded
        assert file_id("all.pcapng") + ".parquet" in {p.name for p in (root / "_index" / "files").iterdir()}
        assert got(a, "tcp") == want and a.last_stats.files_scanned == 0
        assert a.flows().num_rows == want_flows
        assert a.sql("SELECT sum(packets)::BIGINT AS n FROM flows").to_pylist()[0]["n"] == n_sql
    res = a.index(chunk_bytes=CHUNK)
    assert res["upgraded"] == 1 and not res["problems"], res
    assert not list((root / "_index" / "flows").glob("sensor=*"))
    assert sorted(p.name for p in (root / "_index" / "files").iterdir()) == \
        sorted(n.replace(".parquet", ".arrow") for n in rows)
    assert got(a, "tcp") == want and a.last_stats.files_scanned == 0
    assert a.flows().num_rows == want_flows
    assert a.sql("SELECT sum(packets)::BIGINT AS n FROM flows").to_pylist()[0]["n"] == n_sql
    groups = [pq.ParquetFile(p).metadata.num_row_groups for p in (root / "_index" / "flows").rglob("*.parquet")]
    assert max(groups) > 2  # (a row group per spill and sensor, as the format-3 files held them)


def test_an_index_staged_by_the_previous_version_is_committed_current(tmp_path):
    """An S3 output's staged index (``NAME.idx``) written by the version before (format 3: the
    same records) is committed in this layout as a current row: ``pktstream index`` has
    nothing to do (no capture file read again)."""
    from pktstream.archive.index import FORMAT_VERSION, FileIndexBuilder
    from pktstream.archive.live import commit_staged, write_staged
    root = tmp_path / "a"
    root.mkdir()
    path = root / "s1.pcap"
    with open_writer(path) as w:
        for b in batches(1, 200, T0):
            w.write(b)
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    def records(a):
        return sorted((r["sensor"], r["src"], r["dst"], r["sport"], r["dport"], r["proto"], r["packets"],
                       r["first_ts_ns"], r["last_ts_ns"]) for r in a.flows().to_pylist())
    want = records(a)
    for f in (root / "_index").rglob("*"):
        if f.is_file():
            f.unlink()
    b = FileIndexBuilder("s1.pcap", max_chunk=CHUNK)
    pos = 24
    for batch in pktstream.read(path):
        b.add(batch, pos, pos + batch.nbytes)
        pos += batch.nbytes
    row, tables = b.finish(size=0, version="", format="pcap", compression=None)
    row["index_version"] = 3
    staged = tmp_path / "s1.pcap"
    write_staged(str(staged), row, tables)
    st = path.stat()
    commit_staged(LocalStore(str(root)), str(staged) + ".idx", "s1.pcap", st.st_size, str(st.st_mtime_ns))
    assert [r["index_version"] for r in a.catalog().to_pylist()] == [FORMAT_VERSION]
    assert a.index(chunk_bytes=CHUNK)["current"] == 1
    assert records(a) == want and a.catalog().column("flow_files").to_pylist()[0][0].startswith("_index/flows/date=")


def test_index_force_over_a_format_3_index_leaves_no_old_directories(tmp_path):
    """``pktstream index --force`` (every file indexed again from its capture) removes format
    3's flow files and their directories too: a Hive reader of ``_index/flows`` then sees one
    layout."""
    root = tmp_path / "a"
    _merged_archive(root, ["s1", "rack 7"])
    a = Archive(str(root))
    assert to_format3(root) == 1 and list((root / "_index" / "flows").glob("sensor=*"))
    res = a.index(force=True, chunk_bytes=CHUNK)
    assert res["indexed"] == 1 and not res["problems"]
    assert not list((root / "_index" / "flows").glob("sensor=*"))
    assert [p.parent.name for p in (root / "_index" / "flows").rglob("*.parquet")] == ["date=2024-11-27"]
    assert got(a, "tcp", sensor="rack 7") == brute(root, "tcp", sensor="rack 7") != []
