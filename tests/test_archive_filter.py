"""The catalog's per-file address filter (Bloom) and port bitmap: no false negatives, files whose
address/port lists overflow ``SUMMARY_LIMIT`` pruned for hosts and ports they do not hold, results
equal to a full read of every file with libpcap's filter, and catalogs written before the filter
(answered as before, upgraded by ``pktstream index`` from their flow records)."""
from __future__ import annotations

import ipaddress
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

import pktstream
from archive_data import _eth, _ipv4, _ipv6, _tcp, _udp, records
from pktstream.archive import Archive
from pktstream.archive.bloom import (
    AddressProbe,
    FilterColumn,
    address_bytes,
    build_filter,
    filter_of_texts,
    port_bitmap,
)
from pktstream.archive.index import SUMMARY_LIMIT, canonical
from pktstream.archive.prune import CatalogContext, SummaryContext, files_may_match, may_match, parse
from test_archive import brute, got

T0 = 1_732_708_800 * 10**9
HOSTS = 3000          # distinct sources per file: with their destinations > SUMMARY_LIMIT addresses and ports
SENSORS = ("s0", "s1", "s2", "s3")
PKTSTREAM = [sys.executable, "-m", "pktstream"]


def _host(sensor: int, i: int) -> str:
    return f"10.{sensor}.{i >> 8}.{i & 255}"


def _dst(sensor: int, i: int) -> str:
    return f"172.{16 + sensor}.{i >> 8}.{i & 255}"


def _host6(sensor: int, i: int) -> str:
    return f"2001:db8:{sensor}::{i:x}"


def _sensor_batches(k: int) -> list[pktstream.PacketBatch]:
    """One sensor's traffic: HOSTS IPv4 sources to HOSTS destinations and 200 IPv6 pairs, each
    flow on its own source port, every other one to its own destination port (> SUMMARY_LIMIT
    ports), all in this sensor's address and port ranges."""
    rng = random.Random(k)
    frames = []
    ts = T0 + k * 1000
    for i in range(HOSTS):
        sport, dport = 1024 + 10 * i + k, rng.choice((80, 443, 53)) if i % 2 == 0 else 20000 + 10 * i + k
        l4 = _udp(sport, dport, b"u" * 20) if dport == 53 else _tcp(sport, dport, 0x18, b"t" * 20)
        frames.append((ts, _eth(0x0800, _ipv4(_host(k, i), _dst(k, i), 17 if dport == 53 else 6, l4))))
        ts += 1000
    for i in range(200):
        frames.append((ts, _eth(0x86DD, _ipv6(_host6(k, i), _host6(k, 1000 + i), 17, _udp(40000 + i, 53, b"6")))))
        ts += 1000
    out = []
    for j in range(0, len(frames), 100):
        out.append(pktstream.PacketBatch.from_records(records(frames[j:j + 100]), link_type=1))
    return out


def _write(root: Path) -> Path:
    """Per-sensor files as a receiver writes them with --index: two .pcap.zst, two .pcapng."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    root.mkdir(parents=True)
    sinks = [FileSink(directory=str(root / "zst"), format="pcap.zst", index=True),
             FileSink(directory=str(root / "ng"), format="pcapng", index=True)]
    for k, sensor in enumerate(SENSORS):
        src = Source(sensor, "h-" + sensor, "eth0", 1, 262144)
        for b in _sensor_batches(k):
            sinks[k % 2].write(src, b)
    for s in sinks:
        s.close()
    return root


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("wide") / "a")


def _rows(a: Archive) -> dict[str, dict]:
    return {r["path"]: r for r in a.catalog().to_pylist()}


# -- the filter itself ------------------------------------------------------------------------
_addresses = st.one_of(st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
                       st.integers(0, 2**128 - 1).map(lambda n: canonical(ipaddress.IPv6Address(n))))


@settings(max_examples=300, deadline=None)
@given(st.lists(_addresses, max_size=300), _addresses)
def test_filter_never_gives_a_false_negative(members, other):
    blob = filter_of_texts(members)
    assert len(blob) == 2 + max(8, -(-len(set(members)) * 10 // 8))
    for text in members:
        assert AddressProbe(address_bytes(text)).may_contain(blob), text
        # through the pruning code path: a host test on the file's summary
        assert may_match(parse(f"host {text}"), SummaryContext(None, None, address_filter=blob)) is True
    if other in members:
        assert AddressProbe(address_bytes(other)).may_contain(blob)


# a query's catalog tested at once (CatalogContext / FilterColumn) answers as file by file
_POOL = [f"10.9.0.{i}" for i in range(12)] + ["2001:db8::7", "2001:db8::8"]
_blobs = st.one_of(
    st.none(), st.just(b""), st.just(b"\x01\x07" + bytes(8)), st.binary(max_size=40),
    st.lists(st.sampled_from(_POOL), max_size=8).map(filter_of_texts),
    st.lists(st.sampled_from(_POOL), max_size=8).map(lambda m: b"\x02\x03" + filter_of_texts(m)[2:]),
    # any bits and any number of hashes (a file's k may differ from the others')
    st.tuples(st.integers(0, 12), st.binary(min_size=1, max_size=24)).map(lambda t: bytes((2, t[0])) + t[1]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_blobs, max_size=12), st.sampled_from(_POOL), st.data())
def test_filter_column_answers_as_each_filter(blobs, text, data):
    from pktstream.archive.bloom import FILTER_VERSION
    assert FILTER_VERSION == 2  # (the strategy above writes version 2 by hand)
    probe = AddressProbe(address_bytes(text))
    files = np.array(data.draw(st.lists(st.integers(0, max(len(blobs) - 1, 0)), max_size=20)) if blobs else [],
                     dtype=np.int64)
    assert FilterColumn(blobs).may_contain(probe, files).tolist() == [probe.may_contain(blobs[i]) for i in files]


_leaves = st.one_of(
    st.sampled_from(_POOL).map(lambda a: f"host {a}"),
    st.sampled_from(["src", "dst"]).map(lambda d: f"{d} host 10.9.0.1"),
    st.sampled_from(["net 10.9.0.0/29", "net 10.9.0.8/30", "net 10.0.0.0/8", "net 2001:db8::/126"]),
    st.sampled_from([80, 443, 4444, 53]).map(lambda p: f"port {p}"), st.just("portrange 1-1023"),
    st.sampled_from(["tcp", "udp", "vlan", "ip6"]))
_trees = st.recursive(_leaves, lambda sub: st.one_of(
    st.tuples(sub, st.sampled_from(["and", "or"]), sub).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
    sub.map(lambda t: f"not ({t})")), max_leaves=6)
_summaries = st.fixed_dictionaries({
    "addresses": st.one_of(st.none(), st.lists(st.sampled_from(_POOL), max_size=6)),
    "ports": st.one_of(st.none(), st.lists(st.sampled_from([22, 53, 80, 443, 4444, 8080]), max_size=4)),
    "filter": st.one_of(st.just(b"\x00"), _blobs),
    "bitmap": st.one_of(st.none(), st.lists(st.sampled_from([22, 53, 80, 8080]), max_size=4).map(
        lambda p: port_bitmap(np.array(p, dtype=np.int64)))),
    "broken": st.booleans()})


def _summary(d, probes=None):
    def boom():
        raise ValueError("damaged column")
    return SummaryContext(boom if d["broken"] else d["addresses"], d["ports"], address_filter=d["filter"],
                          port_bitmap=d["bitmap"], probes=probes)


@settings(max_examples=300, deadline=None)
@given(st.lists(_summaries, max_size=10), _trees)
def test_whole_catalog_evaluation_answers_as_file_by_file(summaries, expr):
    """files_may_match over a catalog equals may_match file by file, for any tree of the
    understood leaves (and an unsupported one), over files with and without filters, lists,
    port bitmaps, and with a summary that cannot be read (listed in errors, never pruned)."""
    tree = parse(expr)
    ctx = CatalogContext([lambda p, d=d: _summary(d, p) for d in summaries], [d["filter"] for d in summaries])
    got_ = files_may_match(tree, ctx).tolist()
    want = []
    for i, d in enumerate(summaries):
        try:
            want.append(bool(may_match(tree, _summary(d))))
            assert i not in ctx.errors, (i, expr)
        except ValueError:
            want.append(None)
            assert i in ctx.errors, (i, expr)
    assert [g if w is not None else None for g, w in zip(got_, want, strict=True)] == want
    assert all(got_[i] for i in ctx.errors)


def test_filter_false_positive_rate():
    rng = np.random.default_rng(7)
    members = rng.integers(0, 256, (6000, 16), dtype=np.uint8)
    blob = build_filter(members)
    assert all(AddressProbe(bytes(m)).may_contain(blob) for m in members)
    others = rng.integers(0, 256, (20000, 16), dtype=np.uint8)
    fp = sum(AddressProbe(bytes(m)).may_contain(blob) for m in others) / len(others)
    assert fp < 0.02, fp  # 10 bits and 7 hashes per address: ~0.8 %
    # an empty or absent filter never excludes; an empty set excludes everything
    assert AddressProbe(bytes(16)).may_contain(None)
    assert not AddressProbe(bytes(16)).may_contain(build_filter(np.zeros((0, 16), np.uint8)))


# -- in an archive ----------------------------------------------------------------------------
def test_catalog_rows_have_filters_matching_their_flow_records(wide):
    a = Archive(str(wide))
    rows = _rows(a)
    assert len(rows) == len(SENSORS)
    flows = a.flows().to_pylist()
    for path, row in rows.items():
        mine = [f for f in flows if f["file"] == path]  # (from the root, as the catalog names it)
        texts = {f["src"] for f in mine} | {f["dst"] for f in mine}
        assert len(texts) > SUMMARY_LIMIT and row["addresses"] is None  # the list overflowed
        assert all(AddressProbe(address_bytes(t)).may_contain(row["address_filter"]) for t in texts)
        # the builder (16-byte keys, numpy) and the text path (flow records) make the same bytes
        assert filter_of_texts(texts) == row["address_filter"]
        ports = {f["sport"] for f in mine} | {f["dport"] for f in mine}
        assert len(ports) > SUMMARY_LIMIT and row["ports"] is None
        bits = np.unpackbits(np.frombuffer(row["port_bitmap"], np.uint8), bitorder="little")
        assert set(np.flatnonzero(bits).tolist()) == ports


def _flow_reads(a: Archive, bpf: str) -> int:
    got(a, bpf)
    assert a.last_stats.files_scanned == 0 and not a.last_stats.problems
    return a.last_stats.flow_files_read


def test_overflowing_files_are_pruned_for_absent_hosts_and_ports(wide):
    a = Archive(str(wide))
    rng = random.Random(1)
    hosts = [(k, _host(k, rng.randrange(HOSTS))) for k in range(len(SENSORS)) for _ in range(10)]
    hosts += [(k, _host6(k, rng.randrange(200))) for k in range(len(SENSORS)) for _ in range(3)]
    reads = [_flow_reads(a, f"host {h}") for _, h in hosts]
    # each host is in one file: its flow records are read; the other 3 files only on a false
    # positive (~1 %); without the filter every file's (4 per query) would be
    assert min(reads) >= 1 and sum(reads) <= len(hosts) + 3, reads
    absent = [_flow_reads(a, f"host 192.0.2.{i}") for i in range(30)]
    assert sum(absent) <= 3, absent
    assert a.last_stats.files_read == 0 and a.last_stats.packets == 0
    # ports: every file's port list overflows; the bitmap is exact
    assert _flow_reads(a, f"port {1024 + 10 * 7 + 2}") == 1          # a source port of s2 only
    assert _flow_reads(a, "udp port 40000 or tcp port 5") == 4       # in every file
    assert _flow_reads(a, "portrange 2-20") == 0
    assert _flow_reads(a, f"host {_host(0, 3)} and port 1") == 0         # host maybe, port not there


@pytest.mark.parametrize("bpf", [
    f"host {_host(1, 77)}", f"host {_host(2, 1234)} and tcp", f"src host {_dst(3, 5)}", f"host {_host6(0, 9)}",
    "host 192.0.2.1", f"net {_host(1, 76)}/30", f"host {_host(0, 1)} or host {_host(3, 2)}",
    f"not host {_host(1, 77)} and udp port {1024 + 10 * 4 + 1}", f"port {1024 + 10 * 7 + 2}",
    "portrange 20000-20100", f"ip6 host {_host6(2, 1100)} and udp",
])
def test_query_equals_brute_force(wide, bpf):
    a = Archive(str(wide))
    assert got(a, bpf) == brute(wide, bpf)
    assert a.last_stats.files_scanned == 0 and not a.last_stats.problems


def test_cli_summary_shows_the_flow_records_read(wide, tmp_path):
    out = tmp_path / "o.pcapng"
    r = subprocess.run([*PKTSTREAM, "query", str(wide), "host", _host(3, 100), "-w", str(out)],
                       capture_output=True, text=True, check=True)
    n = sum(len(b) for b in pktstream.read(out))
    assert n == 1 and "1 packets matched" in r.stderr
    assert "flow records of 1 read" in r.stderr or "flow records of 2 read" in r.stderr, r.stderr


def _strip_filters(root: Path) -> None:
    """Rewrite every catalog file (and the snapshot) without the filter columns: a catalog of
    the format before them (its rows Parquet files, as they were then)."""
    from pktstream.archive.catalog import row_table
    rows = list(root.rglob("_index/files/*.arrow"))
    assert rows
    for f in rows:
        t = row_table(f.read_bytes())
        pq.write_table(t.drop_columns(["address_filter", "port_bitmap"]), f.with_suffix(".parquet"))
        f.unlink()
    from pktstream.archive.catalog import write_snapshot
    from pktstream.archive.store import LocalStore, parts
    for sub in parts(LocalStore(str(root))):
        write_snapshot(sub)
    for f in root.rglob("_index/catalog.parquet"):
        assert "address_filter" not in pq.read_schema(f).names


def test_old_catalog_without_filters_answers_and_is_upgraded(wide, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(wide, root)
    before = {p: r["address_filter"] for p, r in _rows(Archive(str(wide))).items()}
    _strip_filters(root)
    a = Archive(str(root))
    assert all(r["address_filter"] is None for r in _rows(a).values())
    for bpf in (f"host {_host(1, 77)}", f"port {1024 + 10 * 7 + 2}", "host 192.0.2.1"):
        assert got(a, bpf) == brute(root, bpf)
        assert a.last_stats.flow_files_read == len(SENSORS)  # unknown: every file's flow records
        assert a.last_stats.files_scanned == 0 and not a.last_stats.problems
    # `pktstream index` adds the filters from the flow records (no capture file re-read)
    r = subprocess.run([*PKTSTREAM, "index", str(root)], capture_output=True, text=True, check=True)
    assert "0 indexed, 0 already current, 4 upgraded" in r.stderr, r.stderr
    # the upgraded rows are in today's format (Arrow IPC), the old Parquet rows gone
    assert len(list(root.rglob("_index/files/*.arrow"))) == len(SENSORS)
    assert not list(root.rglob("_index/files/*.parquet"))
    rows = _rows(a)
    assert {p: r["address_filter"] for p, r in rows.items()} == before
    assert all(r["port_bitmap"] is not None for r in rows.values())
    assert got(a, f"host {_host(1, 77)}") == brute(root, f"host {_host(1, 77)}")
    assert a.last_stats.flow_files_read == 1
    res = a.index()
    assert (res["indexed"], res["current"], res["upgraded"]) == (0, len(SENSORS), 0)


def test_rows_of_both_formats_in_one_catalog_and_a_file_with_both(wide, tmp_path):
    """Rows of both formats in one catalog (an old archive a receiver of today adds files to)
    read alike. A file with a row in each format (a crash between writing one and deleting the
    other, or an older pktstream indexing it again) uses neither: it is scanned, and
    `pktstream index` removes both, says so and indexes it again."""
    from pktstream.archive.catalog import row_table
    root = tmp_path / "twin"
    shutil.copytree(wide, root)
    before = _rows(Archive(str(root)))
    twin, legacy = sorted(root.rglob("_index/files/*.arrow"))[:2]
    pq.write_table(row_table(legacy.read_bytes()), legacy.with_suffix(".parquet"))
    legacy.unlink()
    old = row_table(twin.read_bytes())
    old = old.set_column(old.column_names.index("packets"), "packets", pa.array([1], pa.int64()))
    pq.write_table(old, twin.with_suffix(".parquet"))  # (a wrong count: it must never be read)
    twin_path = row_table(twin.read_bytes()).column("path")[0].as_py()  # (relative to its index's directory)
    twin_path = next(p for p in before if p == twin_path or p.endswith("/" + twin_path))
    a = Archive(str(root))
    assert _rows(a) == {p: r for p, r in before.items() if p != twin_path}
    for bpf in ("udp", f"host {_host(1, 77)}"):
        assert got(a, bpf) == brute(root, bpf)
        assert a.last_stats.files_scanned == 1
    res = a.index()
    assert (res["indexed"], res["current"], res["removed"]) == (1, len(SENSORS) - 1, 0)
    assert [p for p in res["problems"] if "catalog rows in two formats" in p and twin_path in p], res["problems"]
    assert twin.exists() and not twin.with_suffix(".parquet").exists()
    assert legacy.with_suffix(".parquet").exists()  # (current: kept as it is)
    after = _rows(a)
    assert {p: r for p, r in after.items() if p != twin_path} == {p: r for p, r in before.items() if p != twin_path}
    # indexed again from the file: its chunks are the offline reader's, the rest is as it was
    assert {k: v for k, v in after[twin_path].items() if k != "chunks"} == \
        {k: v for k, v in before[twin_path].items() if k != "chunks"}
    assert got(a, "udp") == brute(root, "udp") and a.last_stats.files_scanned == 0
    # indexed again (--force), the old format's row is replaced by today's
    res = a.index(force=True)
    assert res["indexed"] == len(SENSORS)
    assert not list(root.rglob("_index/files/*.parquet"))
    assert len(list(root.rglob("_index/files/*.arrow"))) == len(SENSORS)


@pytest.mark.parametrize("many", [False, True])
def test_arp_on_a_cooked_link_is_never_pruned(tmp_path, many):
    """libpcap's "host X" matches ARP's addresses on Linux cooked captures (-i any) too, where the
    flow records do not hold them: such a file's address list and filter say "maybe" for every
    address (the filter pruned the file away, and a short list did before it). Small file and one
    whose address list overflows; the answer equals a full read with libpcap's filter."""
    from archive_data import _arp
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source

    def sll(proto: int, payload: bytes) -> bytes:  # LINUX_SLL: packet type, ARPHRD, address, protocol
        return struct.pack("!HHH", 0, 1, 6) + b"\x02\x00\x00\x00\x00\x01\0\0" + struct.pack("!H", proto) + payload

    frames, ts = [], T0
    for i in range(HOSTS if many else 20):
        frames.append((ts, sll(0x0800, _ipv4(_host(0, i), _dst(0, i), 17, _udp(1024 + i, 53, b"q")))))
        ts += 1000
    frames.insert(len(frames) // 2, (T0 + 500, sll(0x0806, _arp("10.9.9.9", "10.9.9.10"))))
    root = tmp_path / "cooked"
    sink = FileSink(directory=str(root), format="pcap", index=True)
    src = Source("any-1", "h", "any", 113, 262144)
    for j in range(0, len(frames), 100):
        sink.write(src, pktstream.PacketBatch.from_records(records(frames[j:j + 100]), link_type=113))
    sink.close()
    row, = Archive(str(root)).catalog().to_pylist()
    assert row["addresses"] is None and row["address_filter"] == b"\x00"
    for bpf in ("host 10.9.9.9", "arp and host 10.9.9.10", "host 10.0.0.3"):
        want = brute(root, bpf)
        assert got(Archive(str(root)), bpf) == want and want


def test_a_link_type_the_flow_table_does_not_decode_is_never_pruned(tmp_path):
    """PPP (link type 9): the flow records have no addresses or ports, libpcap's filter sees
    them; the file's address filter, address list, port list and bitmap say "maybe" for all
    (an empty list pruned the file for every host and port query)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    frames = [(T0 + i * 1000, b"\xff\x03\x00\x21" + _ipv4(f"10.1.1.{i % 250 + 1}", "10.2.2.2", 17,
                                                            _udp(1000 + i, 53, b"q")))
              for i in range(300)]
    root = tmp_path / "ppp"
    sink = FileSink(directory=str(root), format="pcap", index=True)
    batch = pktstream.PacketBatch.from_records(records(frames), link_type=9)
    sink.write(Source("ppp-1", "h", "ppp0", 9, 262144), batch)
    sink.close()
    row, = Archive(str(root)).catalog().to_pylist()
    assert row["addresses"] is None and row["address_filter"] == b"\x00"
    assert row["ports"] is None and row["port_bitmap"] is None
    for bpf in ("host 10.1.1.3", "udp port 1002", "host 10.2.2.2 and udp"):
        want = brute(root, bpf)
        assert got(Archive(str(root)), bpf) == want and want
