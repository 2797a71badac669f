"""The indexed archive on files (no root): index building, pruned queries equal to a brute-force
read of every file with libpcap's filter, time bounds at file edges, damaged/truncated/missing
indexes, repair, CLI commands, S3 (moto). Live end-to-end tests with receivers and tcpdump as
the oracle are in tests/test_archive_live.py."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pktstream
from archive_data import batches
from pktstream.archive import Archive, FileIndexBuilder, parse_time
from pktstream.archive.prune import FlowContext, evaluate, parse
from pktstream.formats import TruncatedFileWarning, open_reader, open_writer
from servers import moto  # noqa: F401  (fixture)

T0 = 1_732_708_800 * 10**9          # 2024-11-27T12:00:00Z
CHUNK = 16384
PKTSTREAM = [sys.executable, "-m", "pktstream"]

BPFS = ["host 203.0.113.7 and port 4444", "tcp", "not tcp", "port 53", "vlan 10", "ip6 and port 80",
        "not host 10.9.8.7", None, "arp", "udp and not port 53", "host 192.0.2.99",
        "tcp[13] & 2 != 0", "net 198.18.0.0/16 and (port 80 or 443)", "src host 198.18.2.7 and dst port 22",
        "icmp or ip[6:2] & 0x1fff != 0", "portrange 4000-5000", "not (ip or ip6)"]


def rare_flow(n: int, start: int) -> pktstream.PacketBatch:
    """``n`` packets of one UDP flow 192.0.2.99:5555 → 198.18.1.1:7777 (appears nowhere else)."""

    from archive_data import _eth, _ipv4, _udp, records
    frames = [(start + i * 1000, _eth(0x0800, _ipv4("192.0.2.99", "198.18.1.1", 17, _udp(5555, 7777, b"r" * 40))))
              for i in range(n)]
    return pktstream.PacketBatch.from_records(records(frames), link_type=1)


def make_archive(root: Path) -> Path:
    """Per-sensor rotated files in every format, a merged pcapng.zst (sensor/interface names)
    and a gzip file; one rare flow in the middle of web-1's second file."""
    (root / "by-sensor").mkdir(parents=True)
    for i, (s, fmt) in enumerate((("web-1", "pcap.zst"), ("db-1", "pcap"), ("lb-1", "pcapng"))):
        with open_writer(root / "by-sensor" / f"{s}.{fmt}", rotate_bytes=150_000) as w:
            for k, b in enumerate(batches(i, 2500, T0 + i * 1000)):
                w.write(b)
                if s == "web-1" and k == 25:
                    w.write(rare_flow(5, int(b.ts_ns[-1]) + 1))
    with open_writer(root / "all.pcapng.zst") as w:
        for a, b in zip(batches(10, 800, T0, interface="s1/eth0"), batches(11, 800, T0, interface="s2/eth1")):
            w.write(a)
            w.write(b)
    with open_writer(root / "old.pcap") as w:
        for b in batches(20, 600, T0 - 3600 * 10**9):
            w.write(b)
    data = (root / "old.pcap").read_bytes()
    (root / "old.pcap").unlink()
    (root / "old.pcap.gz").write_bytes(gzip.compress(data))
    return root


def n_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and "_index" not in p.parts)


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    root = make_archive(tmp_path_factory.mktemp("arc") / "a")
    res = Archive(str(root)).index(chunk_bytes=CHUNK)
    assert res["indexed"] == n_files(root) > 10 and res["damaged"] == 0, res
    return root


def brute(root: Path, bpf=None, since=None, until=None, sensor=None, skip=()) -> list[tuple[int, bytes]]:
    """Every file read whole with libpcap's filter (pktstream.read), bounds applied, sorted
    stably by time (files in path order) -- what tcpdump -r over each file gives, merged."""
    from pktstream.archive.index import sensor_of
    out = []
    for path in sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                       and "_index" not in p.parts and not p.name.endswith(".part")):
        if path in skip:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedFileWarning)
            try:
                for b in pktstream.read(root / path, bpf=bpf):
                    if sensor and sensor_of(b.interface, path)[0] != sensor:
                        continue
                    for i in range(len(b)):
                        ts = int(b.ts_ns[i])
                        if (since is None or ts >= since) and (until is None or ts < until):
                            out.append((ts, bytes(b[i])))
            except pktstream.FileFormatError:
                pass  # a damaged file: the packets before the damage count
    out.sort(key=lambda x: x[0])
    return out


def got(archive: Archive, bpf=None, **kw) -> list[tuple[int, bytes]]:
    return [(int(b.ts_ns[i]), bytes(b[i])) for b in archive.packets(bpf, **kw) for i in range(len(b))]


@pytest.mark.parametrize("bpf", BPFS)
def test_query_equals_brute_force(archive_dir, bpf):
    a = Archive(str(archive_dir))
    result = got(a, bpf)
    assert result == brute(archive_dir, bpf)
    assert a.last_stats.files_scanned == 0 and not a.last_stats.problems


def test_selective_query_reads_only_the_matching_chunk(archive_dir):
    a = Archive(str(archive_dir))
    result = got(a, "host 192.0.2.99")
    assert len(result) == 5 and result == brute(archive_dir, "host 192.0.2.99")
    st = a.last_stats
    total = sum(p.stat().st_size for p in archive_dir.rglob("*") if "_index" not in p.parts and p.is_file())
    assert st.files_read == 1 and st.files_total == n_files(archive_dir)
    # one chunk of a .zst file: decompressed up to its end only (bounded decompression)
    assert st.bytes_read < 200_000 < total
    assert st.packets_read < 600


def test_selective_query_on_uncompressed_files_reads_ranges(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    with open_writer(root / "x.pcapng") as w:
        for k, b in enumerate(batches(3, 4000, T0)):
            w.write(b)
            if k == 40:
                w.write(rare_flow(3, int(b.ts_ns[-1]) + 1))
    Archive(str(root)).index(chunk_bytes=CHUNK)
    a = Archive(str(root))
    assert got(a, "udp port 7777") == brute(root, "udp port 7777") and len(got(a, "udp port 7777")) == 3
    assert a.last_stats.bytes_read < 3 * CHUNK < (root / "x.pcapng").stat().st_size / 10


def test_time_bounds_at_file_edges(archive_dir):
    a = Archive(str(archive_dir))
    files = sorted(a.catalog().to_pylist(), key=lambda r: r["path"])
    for row in files[:4]:
        first, last = row["first_ts_ns"], row["last_ts_ns"]
        for since, until in ((first, None), (None, first), (None, first + 1), (last, None), (last + 1, None),
                             (first, last), (first, last + 1)):
            assert got(a, "tcp or arp", since=since, until=until) == brute(archive_dir, "tcp or arp", since, until)


_T = 1_732_708_800 * 10**9


@pytest.mark.parametrize("text, ns", [
    ("2024-11-27T12:00:00Z", _T), ("2024-11-27T12:00:00.000000500Z", _T + 500),
    ("2024-11-27T13:00:00.123456789+01:00", _T + 123_456_789), ("2024-11-27 12:00:00,25", _T + 250_000_000),
    ("2024-11-27", _T - 12 * 3600 * 10**9), ("1732708800", _T), ("1732708800.000000500", _T + 500),
    (str(_T + 7), _T + 7), ("1969-12-31T23:59:59.5Z", -500_000_000), ("-0.5", -500_000_000),
    (dt.datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=dt.UTC), -500_000_000),
    (dt.datetime(2024, 11, 27, 12, 0, 0, 1), _T + 1000), ("20241127T120000.123456789Z", _T + 123_456_789),
    ("1732708800.", _T), (".5", 500_000_000), ("2024-11-27T12:00:00+01:00:30.5", _T - 3630_500_000_000),
    (pd.Timestamp("2024-11-27T12:00:00.000000500Z"), _T + 500)])
def test_time_bounds_are_parsed_to_the_ns(text, ns):
    assert parse_time(text) == ns


@pytest.mark.parametrize("text, why", [
    ("1732708800000", "13 digits could be ms"), ("2024-11-27T12:00:00.0000000001Z", "more than 9"),
    ("1732708800.0000000001", "more than 9"), ("yesterday", "not a time"),
    ("20241127T120000.1234567890Z", "more than 9"), ("1732708800123.456", "13 digits could be ms")])
def test_time_bounds_that_would_be_cut_or_guessed_are_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse_time(text)


def test_a_long_bad_time_is_not_echoed_whole():
    """An error is one line: a 64 KiB bad bound is named by its start and length (the query
    server sent it back whole)."""
    with pytest.raises(ValueError) as err:
        parse_time("x" * 65536)
    assert "65536 characters" in str(err.value) and len(str(err.value)) < 400


def test_sensor_selection_and_output_interfaces(archive_dir, tmp_path):
    a = Archive(str(archive_dir))
    assert got(a, "udp", sensor="s2") == brute(archive_dir, "udp", sensor="s2")
    out = tmp_path / "q.pcapng"
    st = a.write(out, "port 53", since=T0, until=T0 + 10**9)
    with open_reader(out) as r:
        pk = [(int(b.ts_ns[i]), bytes(b[i])) for b in r for i in range(len(b))]
        names = {i.name for i in r.interfaces}
    assert sorted(pk) == sorted(brute(archive_dir, "port 53", T0, T0 + 10**9)) and st.packets == len(pk)
    assert names == {"web-1/if0", "db-1/if0", "lb-1/if0", "s1/eth0", "s2/eth1"}


def test_flows_and_sql(archive_dir):
    a = Archive(str(archive_dir))
    t = a.flows("host 192.0.2.99")
    assert t.num_rows == 1
    r = t.to_pylist()[0]
    assert (r["src"], r["sport"], r["dst"], r["dport"], r["proto"], r["packets"], r["sensor"]) == \
        ("192.0.2.99", 5555, "198.18.1.1", 7777, 17, 5, "web-1")
    d = pktstream.decode(b for p in sorted(archive_dir.rglob("*.pcap*")) if "_index" not in p.parts
                         for b in pktstream.read(p))
    all_flows = a.flows()
    assert int(np.sum(all_flows.column("packets").to_numpy())) == len(d)
    s = a.sql("SELECT sensor, sum(packets)::BIGINT AS n FROM flows GROUP BY sensor ORDER BY sensor").to_pylist()
    assert {x["sensor"]: x["n"] for x in s} == {"db-1": 2500, "lb-1": 2500, "s1": 800, "s2": 800,
                                                "web-1": 2505, "old": 600}
    assert a.sql("SELECT count(*) AS n FROM files").to_pylist() == [{"n": n_files(archive_dir)}]
    # the partition columns are text in flows() and in sql() alike (DuckDB alone made date a DATE)
    assert all_flows.schema.field("date").type == "string"
    assert a.sql("SELECT DISTINCT typeof(date) AS t, typeof(sensor) AS s, date FROM flows").to_pylist() == \
        [{"t": "VARCHAR", "s": "VARCHAR", "date": "2024-11-27"}]
    with pytest.raises(ValueError, match="flow filter"):
        a.flows("tcp[13] & 2 != 0")


def test_flows_and_sql_over_receivers_output_directories_below_the_root(tmp_path):
    """Two receivers' output directories, each with its own _index, under one archive root:
    flows() and sql() list both, and name each file from the root as the catalog does (two
    files of the same name in the two directories stay apart)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    for k, sub in enumerate(("by-sensor", "other")):
        (tmp_path / sub).mkdir()
        s = FileSink(directory=str(tmp_path / sub), format="pcap", index=True)
        s.write(Source("web-1", "h", "eth0", 1, 262144), next(iter(batches(1 + k, 50, T0))))
        s.close()
    a = Archive(str(tmp_path))
    paths = sorted(r["path"] for r in a.catalog().to_pylist())
    assert paths == ["by-sensor/web-1.pcap", "other/web-1.pcap"]
    flows = a.flows()
    assert sorted(set(flows.column("file").to_pylist())) == paths
    by_file = a.sql("SELECT file, sum(packets)::BIGINT AS n FROM flows GROUP BY file ORDER BY file").to_pylist()
    want = {p: sum(len(b) for b in pktstream.read(tmp_path / p)) for p in paths}
    assert {x["file"]: x["n"] for x in by_file} == want and all(want.values())
    got_flows = dict.fromkeys(paths, 0)
    for r in flows.select(["file", "packets"]).to_pylist():
        got_flows[r["file"]] += r["packets"]
    assert got_flows == want


def test_output_directories_named_like_partitions_or_globs(tmp_path):
    """Receivers writing into ARCHIVE/recv/sensor=web-9/ and ARCHIVE/rack[1]/, and a third output
    directory whose captures were deleted (its _index keeps empty partition directories): the
    sensor is the one the packets came from, queries by sensor find them, SQL answers."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    subs = ("recv/sensor=web-9", "rack[1]", "gone")
    for k, sub in enumerate(subs):
        (tmp_path / sub).mkdir(parents=True)
        s = FileSink(directory=str(tmp_path / sub), format="pcap", index=True)
        s.write(Source("web-1", "h", "eth0", 1, 262144), next(iter(batches(1 + k, 50, T0))))
        s.close()
    (tmp_path / "gone" / "web-1.pcap").unlink()
    a = Archive(str(tmp_path))
    a.index()
    assert not list((tmp_path / "gone").glob("*.pcap")) and (tmp_path / "gone" / "_index" / "flows").is_dir()
    assert set(a.flows().column("sensor").to_pylist()) == {"web-1"}
    assert got(a, "udp or tcp", sensor="web-1") == brute(tmp_path, "udp or tcp", sensor="web-1") != []
    rows = a.sql("SELECT sensor, date, file, sum(packets)::BIGINT AS n FROM flows GROUP BY ALL ORDER BY file")
    rows = rows.to_pylist()
    assert [(r["sensor"], r["date"], r["file"], r["n"]) for r in rows] == \
        [("web-1", "2024-11-27", f"{sub}/web-1.pcap", 50) for sub in ("rack[1]", "recv/sensor=web-9")]


def test_index_layout_is_hive_partitioned_parquet(archive_dir):
    """One flow file per capture file and date (``date=`` partitions) with a ``sensor``
    column: a merged file of several sensors is one Parquet file, not one per sensor."""
    import duckdb
    import pyarrow.parquet as pq
    flows = list((archive_dir / "_index" / "flows").glob("date=*/*.parquet"))
    assert not list((archive_dir / "_index" / "flows").glob("sensor=*"))
    assert {p.parent.name for p in flows} == {"date=2024-11-27"}
    rows = Archive(str(archive_dir)).catalog().to_pylist()
    assert sorted(p.name for p in flows) == sorted(f"{r['file_id']}.parquet" for r in rows)
    assert any(len(r["sensors"]) > 1 for r in rows)  # (a merged file among them)
    sensors = set()
    for p in flows:
        sensors |= set(pq.read_table(p, columns=["sensor"]).column("sensor").to_pylist())
    assert sensors == {"web-1", "db-1", "lb-1", "s1", "s2", "old"}
    con = duckdb.connect()
    n = con.sql(f"SELECT sum(packets)::BIGINT FROM read_parquet('{archive_dir}/_index/flows/*/*.parquet', "
                "hive_partitioning=true) WHERE sensor = 'web-1' AND date = '2024-11-27'").fetchall()[0][0]
    assert n == 2505
    con.close()
    size = sum(p.stat().st_size for p in (archive_dir / "_index").rglob("*.parquet"))
    assert size > 0
    _assert_flow_storage(flows)


def _assert_flow_storage(paths) -> None:
    """Flow files are stored as designed (index.flow_parquet_options): their columns in the
    declared order, dictionary encoding for the few-valued columns, delta encoding for the
    numbers, zstd on the address texts only, min/max statistics on all but the chunk lists."""
    import pyarrow.parquet as pq

    from pktstream.archive.index import FLOW_COMPRESSED, FLOW_DELTA, FLOW_DICTIONARY, FLOW_SCHEMA_COLUMNS
    assert paths
    for path in paths:
        md = pq.ParquetFile(path).metadata
        assert tuple(md.schema.to_arrow_schema().names) == FLOW_SCHEMA_COLUMNS
        for g in range(md.num_row_groups):
            for i in range(md.num_columns):
                col = md.row_group(g).column(i)
                name = col.path_in_schema
                assert col.compression == ("ZSTD" if name in FLOW_COMPRESSED else "UNCOMPRESSED"), name
                if name in FLOW_DELTA:
                    assert "DELTA_BINARY_PACKED" in col.encodings, name
                if name in FLOW_DICTIONARY:
                    assert "RLE_DICTIONARY" in col.encodings, name
                assert (col.statistics is not None and col.statistics.has_min_max) == (name != "chunks.list.element")


def test_index_is_idempotent_and_repairs(tmp_path):
    root = make_archive(tmp_path / "a")
    a = Archive(str(root))
    n = n_files(root)
    assert a.index(chunk_bytes=CHUNK)["indexed"] == n
    before = {p: p.stat().st_mtime_ns for p in (root / "_index").rglob("*") if p.is_file()}
    assert len([p for p in before if p.suffix == ".arrow" and "files" in p.parts]) == n  # (one catalog row per file)
    res = a.index(chunk_bytes=CHUNK)
    assert (res["indexed"], res["current"], res["removed"]) == (0, n, 0)
    assert {p: p.stat().st_mtime_ns for p in (root / "_index").rglob("*") if p.is_file()} == before
    # a capture file deleted: its index goes; an orphan flow file (crash before the catalog row) goes
    gone = root / "by-sensor" / "db-1.000000.pcap"
    gone.unlink()
    orphan = root / "_index" / "flows" / "sensor=x" / "date=2024-11-27" / "0123.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"junk")
    res = a.index(chunk_bytes=CHUNK)
    assert (res["indexed"], res["removed"]) == (0, 1)
    assert not orphan.exists()
    assert "by-sensor/db-1.000000.pcap" not in {r["path"] for r in a.catalog().to_pylist()}
    assert got(a, "tcp") == brute(root, "tcp")


def test_missing_stale_and_damaged(tmp_path):
    root = make_archive(tmp_path / "a")
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    from pktstream.archive.index import catalog_file
    # missing index: a catalog row removed → that file is scanned
    (root / catalog_file("by-sensor/lb-1.000001.pcapng")).unlink()
    # stale + truncated: a pcap file cut in the middle of a record
    cut = root / "by-sensor" / "db-1.000001.pcap"
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2 + 7])
    # a .zst file cut in the middle (a copy in progress), and one that is not a capture at all
    cutz = root / "by-sensor" / "web-1.000000.pcap.zst"
    cutz.write_bytes(cutz.read_bytes()[:cutz.stat().st_size * 6 // 10])
    garbage = root / "by-sensor" / "web-1.000001.pcap.zst"
    garbage.write_bytes(b"garbage!" * 100)
    messages = []
    result = got(a, "tcp", warn=messages.append)
    assert result == brute(root, "tcp")
    st = a.last_stats
    assert st.files_scanned == 4
    assert any("lb-1.000001.pcapng (no index)" in s for s in st.scanned)
    assert any("db-1.000001.pcap (stale index)" in s for s in st.scanned)
    assert any(m.startswith("by-sensor/db-1.000001.pcap: ") and "truncated" in m for m in messages)
    assert any(m.startswith("by-sensor/web-1.000000.pcap.zst: ") and "truncated" in m for m in messages)
    assert any(m.startswith("by-sensor/web-1.000001.pcap.zst: ") and "not a pcap" in m for m in messages)
    assert all("\n" not in m for m in messages)
    # index repairs what it can; the damaged files are indexed up to the damage and said so
    res = a.index(chunk_bytes=CHUNK)
    assert res["indexed"] == 4 and res["damaged"] == 3
    assert any(p.startswith("by-sensor/web-1.000001.pcap.zst: damaged: ") for p in res["problems"])
    messages.clear()
    result2 = got(a, "tcp", warn=messages.append)
    assert result2 == result and a.last_stats.files_scanned == 0
    assert any(m.startswith("by-sensor/web-1.000000.pcap.zst: truncated") for m in messages)


def test_unreadable_catalog_file_is_named_and_ignored(tmp_path):
    root = make_archive(tmp_path / "a")
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    from pktstream.archive.index import catalog_file
    (root / catalog_file("all.pcapng.zst")).write_bytes(b"not parquet")
    msgs = []
    assert got(a, "udp", warn=msgs.append) == brute(root, "udp")
    assert any("unreadable catalog file" in m for m in msgs)
    assert any("all.pcapng.zst (no index)" in s for s in a.last_stats.scanned)


def test_builder_flows_match_decode():
    bs = batches(7, 1000, T0, per_batch=100)
    b = FileIndexBuilder("web-9.pcap")
    pos = 24
    for x in bs:
        b.add(x, pos, pos + x.nbytes)
        pos += x.nbytes
    row, tables = b.finish(size=pos, version="1", format="pcap", compression=None)
    assert list(tables) == [("web-9", "2024-11-27")]
    t = tables[("web-9", "2024-11-27")]
    d = pktstream.decode(bs)
    assert int(np.sum(t.column("packets").to_numpy())) == 1000 == row["packets"]
    assert int(np.sum(t.column("bytes").to_numpy())) == int(d.wirelen.sum()) == row["bytes"]
    ip = d.ip_version > 0
    assert set(row["addresses"]) == {x for x in d.addresses("src")[ip]} | {x for x in d.addresses("dst")[ip]}
    assert len(row["chunks"]) == 10 and sum(c["packets"] for c in row["chunks"]) == 1000
    assert row["first_ts_ns"] == int(d.ts_ns.min()) and row["last_ts_ns"] == int(d.ts_ns.max())
    # TCP flags: OR over the flow's packets
    tcp = t.filter(t.column("proto").to_numpy() == 6).to_pylist()
    assert any(r["tcp_flags"] & 0x02 for r in tcp) and all(r["tcp_flags"] for r in tcp)
    for r in t.to_pylist():
        assert r["chunks"] == sorted(set(r["chunks"])) and r["first_ts_ns"] <= r["last_ts_ns"]


def test_prune_parser():
    assert parse("host 1.2.3.4 and (port 80 or 443)") is not None
    assert parse("tcp port 80") == ("and", ("proto", "tcp"), ("port", None, 80, 80))
    for unsupported in ("vlan and host 1.2.3.4", "tcp[13] & 2 != 0", "host example.com", "ether host 1:2:3:4:5:6",
                        "greater 100", "src or dst host 1.2.3.4", "(host 1.2.3.4"):
        assert parse(unsupported) is None, unsupported
    cols = {"ip_version": np.array([4, 4, 6, 0, 4], np.uint8), "proto": np.array([6, 17, 6, 0, 6], np.uint8),
            "sport": np.array([80, 53, 80, 0, 0], np.uint16), "dport": np.array([1000, 999, 2, 0, 0], np.uint16),
            "vlan": np.array([-1, -1, -1, -1, -1]), "src": ["1.2.3.4", "1.2.3.4", "2001:db8::1", None, "1.2.3.4"],
            "dst": ["5.6.7.8", "5.6.7.8", "2001:db8::2", None, "5.6.7.8"]}
    mt, mf = evaluate(parse("port 80"), FlowContext(cols))
    assert mt.tolist() == [True, False, True, True, False]
    assert mf.tolist() == [False, True, True, True, True]      # IPv6 never false; fragment undecided
    mt, mf = evaluate(parse("not host 1.2.3.4"), FlowContext(cols))
    assert mt.tolist() == [False, False, True, True, False]
    # addresses compare in the index's text form, whatever form the filter writes them in
    cols["src"][2] = "::ffff:1.2.3.4"
    mt, mf = evaluate(parse("host ::ffff:102:304"), FlowContext(cols))
    assert mt.tolist() == [False, False, True, True, False]


def test_cli_index_query_flows_sql(tmp_path):
    root = make_archive(tmp_path / "a")
    r = subprocess.run([*PKTSTREAM, "index", str(root), "--progress"], capture_output=True, text=True, timeout=120)
    n = n_files(root)
    assert r.returncode == 0, r.stderr
    assert f"{n} indexed, 0 already current" in r.stderr and "[###" in r.stderr
    r = subprocess.run([*PKTSTREAM, "index", str(root)], capture_output=True, text=True, timeout=120)
    assert f"0 indexed, {n} already current" in r.stderr and "[" not in r.stderr
    out = tmp_path / "q.pcapng"
    r = subprocess.run([*PKTSTREAM, "query", str(root), "host", "203.0.113.7", "and", "port", "4444",
                        "-w", str(out), "--since", "2024-11-27T12:00:00Z"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pk = [(int(b.ts_ns[i]), bytes(b[i])) for b in pktstream.read(out) for i in range(len(b))]
    # (pktstream.read gives a pcapng file per interface and buffer: compare as sets of packets;
    # the order of the file is checked with tshark in test_archive_live.py)
    assert sorted(pk) == sorted(brute(root, "host 203.0.113.7 and port 4444", since=T0))
    assert f"{len(pk)} packets matched" in r.stderr and "read " in r.stderr
    # to a pipe: the command ends with os._exit (pktstream.cli.run), after flushing what it wrote
    r = subprocess.run([*PKTSTREAM, "query", str(root), "host", "203.0.113.7", "and", "port", "4444",
                        "-w", "-", "--since", "2024-11-27T12:00:00Z"], capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout == out.read_bytes() and b"packets matched" in r.stderr
    r = subprocess.run([*PKTSTREAM, "flows", str(root), "host", "192.0.2.99", "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["sport"] == 5555 and rows[0]["packets"] == 5
    r = subprocess.run([*PKTSTREAM, "sql", str(root), "SELECT count(*) AS n FROM files", "--format", "csv"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["n", str(n)], r.stderr
    r = subprocess.run([*PKTSTREAM, "query", str(root), "tcp", "and", "(", "-w", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "pktstream query:" in r.stderr
    r = subprocess.run([*PKTSTREAM, "query", str(tmp_path / "nope"), "-w", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _uploaded_archive(tmp_path, moto):
    """make_archive's files as objects under s3://arch/pc/ (moto); (client, local root)."""
    s3 = moto.client()
    s3.create_bucket(Bucket="arch")
    root = make_archive(tmp_path / "a")
    for p in root.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), "arch", "pc/" + str(p.relative_to(root)))
    return s3, root


@pytest.mark.live
def test_s3_archive(tmp_path, moto):
    from servers import AWS_ENV  # noqa: F401
    s3, root = _uploaded_archive(tmp_path, moto)
    a = Archive("s3://arch/pc", client=s3)
    assert a.index(chunk_bytes=CHUNK)["indexed"] == n_files(root)
    assert a.index(chunk_bytes=CHUNK)["current"] == n_files(root)
    for bpf in ("host 192.0.2.99", "tcp and port 80", None):
        assert got(a, bpf) == brute(root, bpf)
    # an object that cannot be read as a capture (garbage) and a deleted one
    s3.put_object(Bucket="arch", Key="pc/by-sensor/zz.pcap", Body=b"\x00" * 100)
    s3.delete_object(Bucket="arch", Key="pc/all.pcapng.zst")
    msgs = []
    assert got(a, "udp", warn=msgs.append) == brute(root, "udp", skip={"all.pcapng.zst"})
    assert any(m.startswith("by-sensor/zz.pcap: ") for m in msgs)
    r = subprocess.run([*PKTSTREAM, "query", "s3://arch/pc", "host", "192.0.2.99", "-w", str(tmp_path / "o.pcapng")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AWS_ENDPOINT_URL": moto.endpoint})
    assert r.returncode == 0, r.stderr
    assert len([1 for b in pktstream.read(tmp_path / "o.pcapng") for _ in range(len(b))]) == 5


@pytest.mark.live
def test_a_format_3_index_on_s3_is_rewritten_and_a_refused_put_keeps_it(tmp_path, moto):
    """An S3 archive indexed by the version before (format 3): queried as it is; ``pktstream
    index`` rewrites it, and where S3 refuses a PUT (an S3 error, raised as an OSError) the file
    is named, its format-3 index stays in use and the next run rewrites it."""
    from botocore.exceptions import ClientError

    from archive_data import to_format3
    from pktstream.archive.index import FORMAT_VERSION, file_id
    s3, root = _uploaded_archive(tmp_path, moto)
    a = Archive("s3://arch/pc", client=s3)
    n = n_files(root)
    assert a.index(chunk_bytes=CHUNK)["indexed"] == n
    local = tmp_path / "idx"  # (the index, rewritten as format 3 wrote it, put back)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="arch", Prefix="pc/_index/")["Contents"]]
    for k in keys:
        (local / k[3:]).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("arch", k, str(local / k[3:]))
        s3.delete_object(Bucket="arch", Key=k)
    assert to_format3(local) == n
    for p in (local / "_index").rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), "arch", "pc/" + p.relative_to(local).as_posix())
    want = brute(root, "tcp and port 80")
    assert got(a, "tcp and port 80") == want and a.last_stats.files_scanned == 0
    refused = []

    class Refusing:  # the real client, PUTs of one file's new flow files refused
        def __getattr__(self, name):
            return getattr(s3, name)

        def put_object(self, **kw):
            if "/flows/date=" in kw["Key"] and file_id("old.pcap.gz") in kw["Key"]:
                refused.append(kw["Key"])
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                                  "PutObject")
            return s3.put_object(**kw)
    res = Archive("s3://arch/pc", client=Refusing()).index(chunk_bytes=CHUNK)
    assert refused and res["upgraded"] == n - 1 and res["indexed"] == 0, res
    assert len(res["problems"]) == 1 and res["problems"][0].startswith(
        "old.pcap.gz: index not rewritten in the current layout (s3://arch/pc/_index/flows/date="), res["problems"]
    assert got(a, "tcp and port 80") == want and a.last_stats.files_scanned == 0
    res = a.index(chunk_bytes=CHUNK)
    assert (res["upgraded"], res["current"], res["indexed"]) == (1, n - 1, 0), res
    assert {r["index_version"] for r in a.catalog().to_pylist()} == {FORMAT_VERSION}
    assert not [o for o in s3.list_objects_v2(Bucket="arch", Prefix="pc/_index/flows/sensor=").get("Contents", [])]
    assert got(a, "tcp and port 80") == want and a.last_stats.files_scanned == 0


@pytest.mark.live
def test_an_s3_object_that_cannot_be_read_while_indexing_is_named_and_retried(tmp_path, moto):
    """A failing GET (here: the client refuses once) is a read error, not damage: ``index``
    names it and goes on, records nothing for it, and the next run indexes it."""
    from botocore.exceptions import ClientError
    s3, root = _uploaded_archive(tmp_path, moto)
    refused = []

    class Refusing:  # the real client, with one GET of one object refused
        def __getattr__(self, name):
            return getattr(s3, name)

        def get_object(self, **kw):
            if kw["Key"] == "pc/old.pcap.gz" and not refused:
                refused.append(kw["Key"])
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                                  "GetObject")
            return s3.get_object(**kw)
    res = Archive("s3://arch/pc", client=Refusing()).index(chunk_bytes=CHUNK)
    assert refused and res["indexed"] == n_files(root) - 1 and res["damaged"] == 0
    assert len(res["problems"]) == 1 and res["problems"][0].startswith(
        "old.pcap.gz: not indexed: cannot read it: s3://arch/pc/old.pcap.gz: An error occurred (SlowDown)")
    a = Archive("s3://arch/pc", client=s3)
    assert got(a, "udp") == brute(root, "udp") and a.last_stats.files_scanned == 1
    assert a.index(chunk_bytes=CHUNK)["indexed"] == 1
    assert got(a, "udp") == brute(root, "udp") and a.last_stats.files_scanned == 0


def _sink_archive(root: Path, *, crash: bool = False):
    """Two indexed FileSinks as a receiver has them: per-sensor rotated .pcap.zst files with
    -W retention, and a merged rotated pcapng; three sensors."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    root.mkdir()
    per = FileSink(directory=str(root / "by-sensor"), format="pcap.zst", rotate_bytes=60_000, max_files=4,
                   index=True)
    (root / "merged").mkdir()
    merged = FileSink(str(root / "merged" / "all.pcapng"), rotate_bytes=200_000, index=True)
    (root / "pcap").mkdir()
    merged_pcap = FileSink(str(root / "pcap" / "all.pcap"), rotate_bytes=300_000, index=True)
    sources = [Source(s, "h-" + s, "eth0", 1, 262144) for s in ("alpha", "beta", "gamma")]
    # as the receiver hands them to its outputs: interface "sensor/interface"
    feeds = [batches(30 + i, 1500, T0 + i * 7, per_batch=20, interface=f"{s.sensor_id}/eth0")
             for i, s in enumerate(sources)]
    for k in range(len(feeds[0])):
        for src, feed in zip(sources, feeds):
            for sink in (per, merged, merged_pcap):
                sink.write(src, feed[k])
        if k % 5 == 0:
            state = (per.flush(), merged.flush(), merged_pcap.flush())
    state = (per.flush(), merged.flush(), merged_pcap.flush())
    for sink in (per, merged, merged_pcap):
        if crash:  # the process dies: open files stay .part files, nothing more is written
            for out in sink._outputs.values():
                out.abandon()
        else:
            sink.close()
    return per, merged, state


def test_index_as_you_write_equals_brute_force(tmp_path):
    root = tmp_path / "a"
    per, merged, _ = _sink_archive(root)
    a = Archive(str(root))
    files = {e.path for e in a.store.captures()}
    assert {r["path"] for r in a.catalog().to_pylist()} == files        # every file indexed, no more
    assert len([f for f in files if f.startswith("by-sensor/")]) == 12    # -W 4 per sensor
    assert per.indexer.indexed > 12 and merged.indexer.indexed >= 2
    assert (root / "by-sensor" / "_index").is_dir() and (root / "merged" / "_index").is_dir()
    for bpf in ("host 203.0.113.7 and port 4444", "udp", None, "vlan 20"):
        assert got(a, bpf) == brute(root, bpf)
        assert a.last_stats.files_scanned == 0
    # sensors: the pcapng interface names, the per-sensor file names, a merged pcap's name
    for sensor in ("alpha", "all"):
        assert got(a, "tcp", sensor=sensor) == brute(root, "tcp", sensor=sensor) != []
    # the live index is what an offline build considers current, and has the same flows
    res = a.index()
    assert (res["indexed"], res["current"], res["removed"]) == (0, len(files), 0)
    live = a.flows().sort_by([("file", "ascending"), ("first_ts_ns", "ascending"), ("src", "ascending")])
    assert a.index(force=True)["indexed"] == len(files)
    off = a.flows().sort_by([("file", "ascending"), ("first_ts_ns", "ascending"), ("src", "ascending")])
    keep = ["file", "sensor", "interface", "src", "dst", "sport", "dport", "proto", "vlan", "packets", "bytes",
            "first_ts_ns", "last_ts_ns", "tcp_flags"]
    assert live.select(keep).to_pylist() == off.select(keep).to_pylist()


def test_recovery_leaves_no_file_without_index_and_no_index_without_file(tmp_path):
    from pktstream.archive.index import catalog_file
    from pktstream.sinks import FileSink
    root = tmp_path / "a"
    per, merged, state = _sink_archive(root, crash=True)               # killed: .part files left
    parts = sorted(p.name for p in root.rglob("*.part"))
    assert len(parts) == 5
    # a crash between a rename and its index, and a file deleted behind the receiver's back
    completed = sorted((root / "by-sensor").glob("alpha.*.pcap.zst"))
    (root / "by-sensor" / catalog_file(completed[-1].name)).unlink()
    completed[0].unlink()
    for st in state:
        assert "index_root" in st
        FileSink.recover(st)
    a = Archive(str(root))
    files = {e.path for e in a.store.captures()}
    assert not list(root.rglob("*.part"))
    assert {r["path"] for r in a.catalog().to_pylist()} == files
    assert a.index()["indexed"] == 0
    assert got(a, "tcp") == brute(root, "tcp") and a.last_stats.files_scanned == 0


def test_recovery_indexes_only_its_outputs_files_and_never_fails_the_start(tmp_path, caplog):
    """Recovery indexes the files of the outputs in the state (not every capture under the
    root: an older, never indexed capture there stays as it is, for `pktstream index`), and an
    index it cannot write (here `_index` is a plain file) is logged, never raised: the receiver
    starts, the captures are recovered all the same."""
    import shutil

    from pktstream.sinks import FileSink
    root = tmp_path / "a"
    per, merged, state = _sink_archive(root, crash=True)
    old = root / "merged" / "older-capture.pcap"
    shutil.copy(next((root / "pcap").glob("all.*.pcap")), old)  # a capture from before indexing
    for st in state:
        FileSink.recover(st)
    a = Archive(str(root))
    assert "merged/older-capture.pcap" not in {r["path"] for r in a.catalog().to_pylist()}
    assert got(a, "tcp") == brute(root, "tcp") and a.last_stats.files_scanned == 1  # that one, scanned
    # a second crash, and the index root cannot be written
    root2 = tmp_path / "b"
    _per2, _merged2, state2 = _sink_archive(root2, crash=True)
    shutil.rmtree(root2 / "by-sensor" / "_index")
    (root2 / "by-sensor" / "_index").write_bytes(b"not a directory")
    for st in state2:
        FileSink.recover(st)  # no exception
    assert "not repaired" in caplog.text
    assert not list(root2.rglob("*.part"))


def test_live_catalog_snapshot_takes_a_bounded_share(tmp_path, monkeypatch):
    """The receiver's catalog snapshot is rewritten whole (its cost grows with the archive), so
    it is refreshed at most as often as its last cost allows (SNAPSHOT_TIME_SHARE); rows it lacks
    are read from their own catalog files, and closing the output brings it up to date."""
    import pyarrow.parquet as pq

    import pktstream.archive.live as live
    from pktstream.archive.catalog import SNAPSHOT
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    monkeypatch.setattr(live, "SNAPSHOT_MAX_AGE_S", 1e9)  # (by count only, however slow the machine)
    root = tmp_path / "a"
    sink = FileSink(directory=str(root), format="pcapng", rotate_bytes=8_000, index=True)
    src = Source("s1", "h-s1", "eth0", 1, 262144)
    feed = iter(batches(5, 6000, T0, per_batch=10, interface="s1/eth0"))
    while sink.indexer.snapshots == 0:  # the first snapshot: after SNAPSHOT_EVERY changes
        sink.write(src, next(feed))
    assert sink.indexer.indexed == live.SNAPSHOT_EVERY
    monkeypatch.setattr(live, "SNAPSHOT_TIME_SHARE", 1e-12)  # any snapshot now costs "too much"
    while sink.indexer.indexed < 3 * live.SNAPSHOT_EVERY:
        sink.write(src, next(feed))
    sink.tick()
    assert sink.indexer.snapshots == 1  # held back, though 2 * SNAPSHOT_EVERY more files completed
    in_snapshot = pq.read_table(root / SNAPSHOT, columns=["path"]).column("path").to_pylist()
    assert len(in_snapshot) == live.SNAPSHOT_EVERY
    a = Archive(str(root))
    files = {e.path for e in a.store.captures()}
    assert {r["path"] for r in a.catalog().to_pylist()} == files  # the rest from their catalog files
    assert got(a, "udp") == brute(root, "udp") != []
    sink.close()  # (the open file completed): the snapshot is written now
    assert sink.indexer.snapshots == 2
    in_snapshot = pq.read_table(root / SNAPSHOT, columns=["path"]).column("path").to_pylist()
    assert sorted(in_snapshot) == sorted(e.path for e in a.store.captures())


def test_catalog_snapshot_is_only_a_cache(tmp_path):
    """``_index/catalog.parquet`` holds all rows for one read; a row is taken from it only while
    its per-file catalog file is unchanged."""
    from pktstream.archive.catalog import SNAPSHOT, load_catalog
    from pktstream.archive.index import catalog_file
    root = make_archive(tmp_path / "a")
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)
    assert (root / SNAPSHOT).is_file()
    # a catalog file removed behind the snapshot's back: its row is gone
    (root / catalog_file("all.pcapng.zst")).unlink()
    assert "all.pcapng.zst" not in {r["path"] for r in load_catalog(a.store)[0]}
    # a file re-indexed with another chunk size: the new row, not the snapshot's
    before = next(r for r in a.catalog().to_pylist() if r["path"] == "old.pcap.gz")
    old_snapshot = (root / SNAPSHOT).read_bytes()
    a.index(["old.pcap.gz"], force=True, chunk_bytes=4 * CHUNK)
    (root / SNAPSHOT).write_bytes(old_snapshot)  # a snapshot older than the row
    after = next(r for r in a.catalog().to_pylist() if r["path"] == "old.pcap.gz")
    assert len(after["chunks"]) < len(before["chunks"])
    assert got(a, "udp") == brute(root, "udp")


def test_light_snapshot_is_read_only_with_its_parquet_twin(tmp_path):
    """``_index/catalog-light.arrow`` (the snapshot's small columns, one Arrow batch) is read
    instead of the Parquet snapshot's only while both carry one snapshot id: an older Parquet
    snapshot beside it, a damaged or missing light file -- the query reads the Parquet's
    columns and stays exact; ``pktstream index`` writes a missing one again."""
    import struct

    import pyarrow.parquet as pq

    from pktstream.archive.catalog import SNAPSHOT, SNAPSHOT_ID, SNAPSHOT_LIGHT, _light_snapshot
    root = make_archive(tmp_path / "a")
    a = Archive(str(root))
    a.index(chunk_bytes=CHUNK)

    def light():
        return _light_snapshot(a.store, pq.ParquetFile(a.store.arrow_file(SNAPSHOT)))

    t = light()
    assert t is not None and t.num_rows == len(a.catalog()) and "chunks" not in t.column_names
    assert t.schema.metadata[SNAPSHOT_ID] == pq.read_schema(root / SNAPSHOT).metadata[SNAPSHOT_ID]
    assert got(a, "udp") == brute(root, "udp")
    # the Parquet snapshot of another write beside this light file (a crash between the two)
    old_parquet, old_light = (root / SNAPSHOT).read_bytes(), (root / SNAPSHOT_LIGHT).read_bytes()
    a.index(["old.pcap.gz"], force=True, chunk_bytes=4 * CHUNK)
    assert (root / SNAPSHOT_LIGHT).read_bytes() != old_light
    (root / SNAPSHOT_LIGHT).write_bytes(old_light)
    assert light() is None
    assert got(a, "udp") == brute(root, "udp") and got(a, "tcp port 80") == brute(root, "tcp port 80")
    (root / SNAPSHOT).write_bytes(old_parquet)  # the pair again, older than the row: the row is read
    assert light() is not None
    assert got(a, "udp") == brute(root, "udp")
    # damaged: garbage after the magic, or cut short
    for data in (old_light[:8] + b"\xff" * (len(old_light) - 8), old_light[: len(old_light) // 2]):
        (root / SNAPSHOT_LIGHT).write_bytes(data)
        assert light() is None
        assert got(a, "udp") == brute(root, "udp")
    (root / SNAPSHOT_LIGHT).unlink()
    assert light() is None and got(a, "udp") == brute(root, "udp")
    a.index(chunk_bytes=CHUNK)  # nothing to index, the light snapshot written again
    assert light() is not None
    # values whose offsets run past their buffer, the file's structure intact: refused
    good = (root / SNAPSHOT_LIGHT).read_bytes()
    first = light().column("path")[0].as_py().encode()
    at = good.index(struct.pack("<ii", 0, len(first)))
    (root / SNAPSHOT_LIGHT).write_bytes(good[:at + 4] + struct.pack("<i", 1 << 30) + good[at + 8:])
    assert light() is None and got(a, "udp") == brute(root, "udp")
    (root / SNAPSHOT_LIGHT).write_bytes(good)
    # an older pktstream rewrote the Parquet snapshot (its rows in another order here) and carried
    # the snapshot id over in its schema metadata: the rows differ, so the light file is not used
    t = pq.read_table(root / SNAPSHOT)
    assert t.schema.metadata[SNAPSHOT_ID] == light().schema.metadata[SNAPSHOT_ID]
    pq.write_table(t.take(list(range(t.num_rows))[::-1]), root / SNAPSHOT, row_group_size=2)
    assert pq.read_schema(root / SNAPSHOT).metadata[SNAPSHOT_ID] == t.schema.metadata[SNAPSHOT_ID]
    assert light() is None
    for bpf in ("udp", "tcp port 80", "host 10.0.0.1", "port 53"):
        assert got(a, bpf) == brute(root, bpf), bpf
    a.index(chunk_bytes=CHUNK)  # nothing to index: both snapshots written again, a pair
    assert light() is not None


@pytest.mark.live
def test_s3_output_indexed_as_written(tmp_path, moto):
    """S3Sink(index=True): each object's index is committed under the prefix after its upload
    (with its ETag); the archive queries equal a full read of the downloaded objects."""
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink
    s3 = moto.client()
    s3.create_bucket(Bucket="live")
    sink = S3Sink("live", "caps/", staging_dir=str(tmp_path / "staging"), client=s3, rotate_bytes=60_000,
                  rotate_seconds=3600, format="pcapng.zst", index=True, acl=None)
    srcs = [Source(s, s, "eth0", 1, 262144) for s in ("alpha", "beta")]
    feeds = [batches(40 + i, 1500, T0, per_batch=30) for i in range(2)]
    for k in range(len(feeds[0])):
        for src, feed in zip(srcs, feeds):
            sink.write(src, feed[k])
        sink.flush()
    sink.close()
    assert sink.counters["indexed_files"] == sink.counters["uploaded_files"] >= 4
    assert not [n for n in os.listdir(tmp_path / "staging" / "ready")]
    local = tmp_path / "dl"
    for o in s3.list_objects_v2(Bucket="live", Prefix="caps/")["Contents"]:
        if "/_index/" not in o["Key"]:
            dest = local / o["Key"][len("caps/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("live", o["Key"], str(dest))
    a = Archive("s3://live/caps", client=s3)
    assert {r["path"] for r in a.catalog().to_pylist()} == {str(p.relative_to(local)) for p in local.rglob("*")
                                                             if p.is_file()}
    for bpf in ("host 203.0.113.7 and port 4444", "udp", None):
        assert got(a, bpf) == brute(local, bpf)
        assert a.last_stats.files_scanned == 0
    assert a.index()["current"] == sink.counters["uploaded_files"]


@pytest.mark.live
def test_s3_output_indexes_files_it_did_not_index_as_written(tmp_path, moto):
    """S3Sink(index=True) and staged files without an index -- one completed by crash recovery
    in the staging directory, one an earlier run left in ready/ -- each is indexed from its local
    copy before its upload: no object of an indexed output without an index, sensors attributed
    by the writer's names, and an offline re-index of the objects attributes them the same."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink
    s3 = moto.client()
    s3.create_bucket(Bucket="left")
    staging = tmp_path / "staging"
    (staging / "ready").mkdir(parents=True)
    recovered = FileSink(directory=str(staging), format="pcap.zst")  # as recovery completes a .part file
    for b in batches(50, 400, T0, per_batch=40):
        recovered.write(Source("s2", "s2", "eth0", 1, 262144), b)
    recovered.close()
    assert os.path.isfile(staging / "s2.pcap.zst") and not os.path.exists(staging / "s2.pcap.zst.idx")
    with open_writer(staging / "ready" / "s1__20241127T120000Z__abcd1234-000007.pcap.zst") as w:
        for b in batches(51, 400, T0 + 10**9, per_batch=40):
            w.write(b)
    sink = S3Sink("left", "caps/", staging_dir=str(staging), client=s3, rotate_seconds=3600,
                  format="pcap.zst", index=True, acl=None, close_timeout=60)
    sink.close()
    assert sink.counters["uploaded_files"] == sink.counters["indexed_files"] == 2
    assert sink.counters["indexed_leftovers"] == 2 and sink.counters["index_failures"] == 0
    local = tmp_path / "dl"
    for key in sink.uploaded:
        dest = local / key[len("caps/"):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("left", key, str(dest))
    a = Archive("s3://left/caps", client=s3)
    assert {r["path"] for r in a.catalog().to_pylist()} == {k[len("caps/"):] for k in sink.uploaded}
    for bpf in ("host 203.0.113.7 and port 4444", "udp", None):
        assert got(a, bpf) == brute(local, bpf) != []
        assert a.last_stats.files_scanned == 0
    assert sorted(set(a.flows().column("sensor").to_pylist())) == ["s1", "s2"]
    assert got(a, "tcp", sensor="s2") == brute(local / "s2", "tcp") != []
    assert a.index(force=True)["indexed"] == 2  # offline, from the objects: the same attribution
    assert sorted(set(a.flows().column("sensor").to_pylist())) == ["s1", "s2"]


def _scan(n: int, start: int, seed: int) -> list[pktstream.PacketBatch]:
    """A port scan (a new flow per SYN: 203.0.113.66 → 198.18.x.y, random ports) interleaved
    with a long-lived flow 192.0.2.50:40000 → 198.18.1.1:443 (every 10th packet: it spans
    every spill) and the mixed traffic of archive_data; 100 packets per batch."""
    import random

    from archive_data import _eth, _ipv4, _tcp, frame, records
    rng = random.Random(seed)
    out, cur, ts = [], [], start
    for i in range(n):
        ts += rng.randrange(1, 100_000)
        if i % 10 == 0:
            data = _eth(0x0800, _ipv4("192.0.2.50", "198.18.1.1", 6, _tcp(40000, 443, 0x10, b"x" * 20)))
        elif i % 10 < 8:
            dst = f"198.18.{rng.randrange(256)}.{rng.randrange(256)}"
            data = _eth(0x0800, _ipv4("203.0.113.66", dst, 6, _tcp(rng.randrange(1024, 65536), rng.randrange(1, 65536),
                                                                  0x02, b"")))
        else:
            data = frame(rng)
        cur.append((ts, data))
        if len(cur) == 100:
            out.append(pktstream.PacketBatch.from_records(records(cur), link_type=1, interface="scan-1/eth0"))
            cur = []
    return out


def _aggregate(table) -> dict[tuple, list]:
    """Flow records merged by (file, key): [first, last, packets, bytes, flags OR, chunks]."""
    out: dict[tuple, list] = {}
    for r in table.to_pylist():
        k = (r["file"], r["interface"], r["vlan"], r["ethertype"], r["ip_version"], r["src"], r["dst"], r["sport"],
             r["dport"], r["proto"])
        a = out.get(k)
        if a is None:
            out[k] = [r["first_ts_ns"], r["last_ts_ns"], r["packets"], r["bytes"], r["tcp_flags"], set(r["chunks"])]
        else:
            a[0], a[1] = min(a[0], r["first_ts_ns"]), max(a[1], r["last_ts_ns"])
            a[2] += r["packets"]
            a[3] += r["bytes"]
            a[4] |= r["tcp_flags"]
            a[5] |= set(r["chunks"])
    return out


@pytest.mark.parametrize("fmt", ["pcapng", "pcap.zst"])
def test_bounded_index_of_a_port_scan_equals_brute_force(tmp_path, fmt, monkeypatch):
    """A file with far more flows than the cap: the flow table is spilled (row groups of the
    file's flow records; to the archive's own _index directory, not the temporary directory --
    here one that does not exist), the table never holds more than the cap plus one batch, and
    queries, flows and the catalog give what an unbounded index and brute force give."""
    import tempfile

    import pyarrow.parquet as pq

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("scan-1", "h-scan", "eth0", 1, 262144)
    feed = _scan(12_000, T0, 3)
    sinks = {}
    for name, cap in (("capped", 500), ("unbounded", 0)):
        sinks[name] = FileSink(directory=str(tmp_path / name), format=fmt, index=True,
                               rotate_bytes=600_000 if fmt == "pcapng" else 100_000,
                               index_max_flows=cap)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-temporary-directory"))
    for b in feed:
        for sink in sinks.values():
            sink.write(src, b)
    for sink in sinks.values():
        sink.close()
    monkeypatch.undo()
    capped, unbounded = sinks["capped"].indexer, sinks["unbounded"].indexer
    assert capped.failures == unbounded.failures == 0 and capped.indexed == unbounded.indexed >= 2
    assert unbounded.spills == 0 and unbounded.peak_flows_held > 1500
    assert capped.spills >= 10 and capped.peak_flows_held <= 500 + 100   # the cap plus one batch
    assert 0 < capped.peak_table_bytes < unbounded.peak_table_bytes / 3
    root = tmp_path / "capped"
    a = Archive(str(root))
    for bpf in ("host 203.0.113.66", "host 192.0.2.50 and port 443", "tcp[13] & 2 != 0", "udp", None,
                "dst host 198.18.7.7 or port 4444"):
        assert got(a, bpf) == brute(root, bpf)
        assert a.last_stats.files_scanned == 0 and not a.last_stats.problems
    # the long-lived flow has a record per spill: disjoint packet sets that add up
    long = a.flows("host 192.0.2.50 and port 443")
    assert long.num_rows > capped.indexed and sum(long.column("packets").to_pylist()) == 1200
    # merged by key, the capped index is the unbounded one (chunk numbers, times, counters)
    c_all, u_all = a.flows(), Archive(str(tmp_path / "unbounded")).flows()
    assert c_all.num_rows > u_all.num_rows and _aggregate(c_all) == _aggregate(u_all)
    c_rows = {r["path"]: r for r in a.catalog().to_pylist()}
    u_rows = {r["path"]: r for r in Archive(str(tmp_path / "unbounded")).catalog().to_pylist()}
    for path, r in c_rows.items():
        u = u_rows[path]
        for k in ("packets", "bytes", "first_ts_ns", "last_ts_ns", "addresses", "ports", "chunks", "flow_files",
                  "address_filter", "port_bitmap"):  # (the filter holds the addresses of every spill)
            assert r[k] == u[k], k
        assert r["flows"] >= u["flows"]
    # each spill is a row group of the file's flow records
    groups = [pq.ParquetFile(p).metadata.num_row_groups for p in (root / "_index" / "flows").rglob("*.parquet")]
    assert max(groups) > 1
    _assert_flow_storage(list((root / "_index" / "flows").rglob("*.parquet")))  # (spilled: the same layout)


def test_spilled_builder_staged_index(tmp_path):
    """A spilled builder's records go through the staging path (S3 outputs) a row group at a time."""
    import pyarrow.parquet as pq

    from pktstream.archive.index import SpilledFlows
    from pktstream.archive.live import write_staged
    feed = _scan(3000, T0, 4)
    b = FileIndexBuilder("scan-1.pcap", max_flows=200)
    pos = 24
    for x in feed:
        b.add(x, pos, pos + x.nbytes)
        pos += x.nbytes
    assert b.spills >= 10 and b.flows_held <= 300
    row, tables = b.finish(size=pos, version="1", format="pcap", compression=None)
    assert all(isinstance(t, SpilledFlows) for t in tables.values())
    path = tmp_path / "scan-1.pcap"
    write_staged(str(path), row, tables)
    t = pq.read_table(str(path) + ".idx")
    assert t.num_rows == row["flows"] and sum(t.column("packets").to_pylist()) == 3000 == row["packets"]
    b.close()


def test_receiver_indexes_rotated_and_directory_outputs_by_default(tmp_path):
    """Index as you write is on for receiver file outputs that rotate or write to a directory,
    off for one unrotated file and stdout; --no-index / output.index: false turn it off,
    --index on; --index-max-flows / output.indexMaxFlows set the memory bound."""
    from pktstream.archive.live import allow_pandas
    from pktstream.cli import build_parser
    from pktstream.cli.stream import build_receiver
    from pktstream.exceptions import ConfigError
    from pktstream.sinks import FileSink

    def indexers(*args: str) -> list:
        try:
            rx = build_receiver(build_parser().parse_args(["receiver", "--listen", "127.0.0.1:0", *args]))
        finally:
            allow_pandas()  # (the receiver command refuses pandas for the whole process)
        try:
            return [o.indexer for o in rx.outputs if isinstance(o, FileSink)]
        finally:
            for o in rx.outputs:
                o.close()

    (tmp_path / "d").mkdir()
    on = indexers("--output-dir", str(tmp_path / "d" / "by-sensor"))
    assert len(on) == 1 and on[0] is not None and on[0].max_flows == 262_144
    assert indexers("-w", str(tmp_path / "d" / "rot.pcapng"), "-C", "10MB")[0] is not None
    assert indexers("-w", str(tmp_path / "d" / "g.pcap"), "-G", "60")[0] is not None
    assert indexers("-w", str(tmp_path / "d" / "one.pcapng")) == [None]          # completed only at exit
    assert indexers("-w", str(tmp_path / "d" / "one.pcapng"), "--index")[0] is not None
    assert indexers("--output-dir", str(tmp_path / "d" / "x"), "--no-index") == [None]
    assert indexers("--output-dir", str(tmp_path / "d" / "y"), "--index-max-flows", "1000")[0].max_flows == 1000
    assert indexers("-w", "-") == []
    with pytest.raises(ConfigError, match="index max flows"):  # refused at start, not at the first write
        indexers("--output-dir", str(tmp_path / "d" / "w"), "--index-max-flows", str(2**31))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"input:\n  port: 8081\noutput:\n  directory: {tmp_path / 'd' / 'z'}\n  index: false\n")
    assert indexers("--config", str(cfg)) == [None]
    cfg.write_text(f"input:\n  port: 8081\noutput:\n  directory: {tmp_path / 'd' / 'z'}\n  indexMaxFlows: 5000\n")
    assert indexers("--config", str(cfg))[0].max_flows == 5000


def test_a_failed_spill_leaves_the_file_unindexed_never_short(tmp_path, monkeypatch):
    """The flow records cannot be spilled (a full temporary directory): the file gets no index
    -- never one that misses records, marked "damaged" for good -- its spill files are closed,
    and a query scans it and gives what brute force gives."""
    import errno

    from pktstream.archive.catalog import index_entry
    from pktstream.archive.index import IndexSpillError, SpilledFlows
    from pktstream.archive.store import LocalStore
    from pktstream.formats import CaptureWriter
    root = tmp_path / "a"
    root.mkdir()
    w = CaptureWriter(str(root / "scan.pcap"))
    for b in _scan(3000, T0, 5):
        w.write(b)
    w.close()
    calls, opened = [0], []
    real_append, real_init = SpilledFlows.append, SpilledFlows.__init__

    def append(self, table):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, table)

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        opened.append(self)
    monkeypatch.setattr(SpilledFlows, "append", append)
    monkeypatch.setattr(SpilledFlows, "__init__", init)
    store = LocalStore(str(root))
    entry = store.entry("scan.pcap")
    with pytest.raises(IndexSpillError, match="No space left"):
        index_entry(store, entry, max_flows=200, chunk_bytes=4096)  # (batches of ~60 packets: many spills)
    assert opened and all(sp._file.closed for sp in opened)
    # through repair (pktstream index): a problem reported, no catalog row, the query scans it
    import pktstream.archive.catalog as catalog
    monkeypatch.setattr(catalog, "index_entry", lambda st, e, **kw: index_entry(st, e, **{**kw, "max_flows": 200,
                                                                                 "chunk_bytes": 4096}))
    calls[0] = 0
    res = catalog.repair(store)
    assert res["indexed"] == 0 and "not indexed" in res["problems"][0]
    a = Archive(str(root))
    assert a.catalog().num_rows == 0
    assert got(a, "host 192.0.2.50 and port 443") == brute(root, "host 192.0.2.50 and port 443")
    assert a.last_stats.files_scanned == 1


def test_index_writes_and_removals_that_fail_are_tried_again_when_idle(tmp_path, monkeypatch):
    """A completed file's index write failing (disk full), an open file's indexing failing,
    or a retention removal's index removal failing were only logged: the file stayed without an
    index, or the index named a file that was gone, until someone ran ``pktstream index`` (a
    crash-recovery fuzzer's disk-full runs). They are tried again when the writer is idle."""
    import errno

    import pktstream.archive.index as ix
    import pktstream.archive.live as live
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    monkeypatch.setattr(live, "RETRY_FIRST_S", 0.0)  # (tried at the next idle tick)
    root = tmp_path / "a"
    sink = FileSink(directory=str(root), format="pcapng", rotate_bytes=60_000, max_files=2, index=True)
    src = Source("s1", "h", "eth0", 1, 262144)
    feed = batches(7, 1500, T0, per_batch=50)
    full = OSError(errno.ENOSPC, "No space left on device")

    def fail_once(real):
        left = [1]

        def f(*a, **kw):
            if left[0]:
                left[0] -= 1
                raise full
            return real(*a, **kw)
        return f

    def rows() -> set[str]:
        return {r["path"] for r in Archive(str(root)).catalog().to_pylist()}

    def files() -> set[str]:
        return {n for n in os.listdir(root) if n.endswith(".pcapng")}
    monkeypatch.setattr(ix.FileIndexBuilder, "add", fail_once(ix.FileIndexBuilder.add))  # file 0, written
    monkeypatch.setattr(live, "write_index", fail_once(live.write_index))  # file 1, completed
    k = 0
    while len(files()) < 2:
        sink.write(src, feed[k])
        k += 1
    indexer = sink.indexer
    assert indexer.failures == 2 and indexer.pending_retries == 2 and rows() == set()
    sink.tick()
    assert indexer.pending_retries == 0 and rows() == files()
    monkeypatch.setattr(live, "remove_index", fail_once(live.remove_index))  # retention's first removal
    while len(os.listdir(root)) and "s1.000000.pcapng" in files():
        sink.write(src, feed[k])
        k += 1
    assert "s1.000000.pcapng" in rows() and indexer.pending_retries == 1
    sink.tick()
    assert indexer.pending_retries == 0 and rows() == files()
    for b in feed[k:]:
        sink.write(src, b)
    sink.close()
    assert rows() == files() and len(files()) == 2
    a = Archive(str(root))
    assert got(a, "tcp") == brute(root, "tcp") != [] and a.last_stats.files_scanned == 0


@pytest.mark.parametrize("fails_again", [False, True])
def test_an_index_write_waiting_to_be_tried_again_is_tried_at_close(tmp_path, monkeypatch, caplog, fails_again):
    """A failed index write waits for an idle tick; an output closed before it (a receiver
    stopped within the retry's delay) dropped it, and the file stayed without an index until
    someone ran ``pktstream index``. Close tries every waiting retry a last time, and names the
    file when that fails too."""
    import errno

    import pktstream.archive.live as live
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    monkeypatch.setattr(live, "RETRY_FIRST_S", 3600.0)  # (never due before the close)
    root = tmp_path / "a"
    sink = FileSink(directory=str(root), format="pcapng", rotate_bytes=60_000, index=True)
    src = Source("s1", "h", "eth0", 1, 262144)
    real = live.write_index
    full = OSError(errno.ENOSPC, "No space left on device")
    calls = []

    def write_index(*a, **kw):  # the completed file's index write fails once ...
        calls.append(a)
        if len(calls) == 1:
            raise full
        return real(*a, **kw)

    def repair(*a, **kw):  # ... and, with fails_again, its retry (indexing from the file) too
        raise full
    monkeypatch.setattr(live, "write_index", write_index)
    if fails_again:
        monkeypatch.setattr(live, "repair", repair)
    feed = batches(4, 600, T0, per_batch=50)
    k = 0
    while not os.path.exists(root / "s1.000000.pcapng"):
        sink.write(src, feed[k])
        k += 1
    sink.tick()
    assert sink.indexer.pending_retries == 1
    sink.close()
    assert sink.indexer.pending_retries == 0
    catalog = {r["path"] for r in Archive(str(root)).catalog().to_pylist()}
    assert ("s1.000000.pcapng" in catalog) is not fails_again
    assert fails_again is any("s1.000000.pcapng given up as the output closed" in r.getMessage()
                              for r in caplog.records)


def test_a_file_whose_index_could_not_be_started_is_indexed_when_idle(tmp_path, monkeypatch):
    """Starting a file's index failing (disk full making the spill directory) left the file
    unindexed for good: only failures after the start were tried again (second fuzzing round)."""
    import errno

    import pktstream.archive.live as live
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    monkeypatch.setattr(live, "RETRY_FIRST_S", 0.0)
    root = tmp_path / "a"
    real = live.FileIndexBuilder
    left = [1]

    def builder(*a, **kw):
        if left[0]:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)
    monkeypatch.setattr(live, "FileIndexBuilder", builder)
    sink = FileSink(directory=str(root), format="pcap", rotate_bytes=60_000, index=True)
    src = Source("s1", "h", "eth0", 1, 262144)
    feed = batches(8, 600, T0, per_batch=50)
    k = 0
    while not os.path.exists(root / "s1.000000.pcap"):
        sink.write(src, feed[k])
        k += 1
    assert left == [0] and sink.indexer.pending_retries == 1
    sink.tick()
    assert sink.indexer.pending_retries == 0
    assert "s1.000000.pcap" in {r["path"] for r in Archive(str(root)).catalog().to_pylist()}
    for b in feed[k:]:
        sink.write(src, b)
    sink.close()
    a = Archive(str(root))
    assert got(a, "udp") == brute(root, "udp") != [] and a.last_stats.files_scanned == 0
