"""Synthetic mixed traffic for the archive's file tests (no root): seeded, so reproducible.

Ethernet frames: IPv4 TCP/UDP/ICMP, IPv4 fragments, IPv6 TCP/UDP, ARP, 802.1Q-tagged IPv4,
between a few hosts; written by pktstream's own writers in every format.
"""
from __future__ import annotations

import random
import struct

from pktstream import PacketBatch

HOSTS = ["198.18.1.1", "198.18.1.2", "198.18.2.7", "203.0.113.7", "10.9.8.7"]
HOSTS6 = ["2001:db8::1", "2001:db8::2"]
PORTS = [80, 443, 53, 4444, 22, 8080]


def _ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _eth(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    head = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    if vlan is not None:
        head += struct.pack("!HH", 0x8100, vlan)
    return head + struct.pack("!H", ethertype) + payload


def _ipv4(src: str, dst: str, proto: int, l4: bytes, *, frag: int = 0, mf: bool = False, ident: int = 1) -> bytes:
    flags = (0x2000 if mf else 0) | (frag // 8)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, flags, 64, proto, 0, _ip4(src), _ip4(dst))
    h = h[:10] + struct.pack("!H", _csum(h)) + h[12:]
    return h + l4


def _tcp(sport: int, dport: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 65535, 0, 0) + payload


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _ipv6(src: str, dst: str, nh: int, l4: bytes) -> bytes:
    import ipaddress
    return (struct.pack("!IHBB", 6 << 28, len(l4), nh, 64) + ipaddress.IPv6Address(src).packed
            + ipaddress.IPv6Address(dst).packed + l4)


def _arp(src: str, dst: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + b"\x02\x00\x00\x00\x00\x01" + _ip4(src)
            + b"\0" * 6 + _ip4(dst))


def frame(rng: random.Random) -> bytes:
    """One random frame of the mix."""
    kind = rng.random()
    a, b = rng.sample(HOSTS, 2)
    pay = bytes(rng.randrange(256) for _ in range(rng.choice((0, 10, 100, 600))))
    if kind < 0.45:
        return _eth(0x0800, _ipv4(a, b, 6, _tcp(rng.choice(PORTS), rng.choice(PORTS),
                                                  rng.choice((0x02, 0x12, 0x10, 0x18, 0x11, 0x04)), pay)))
    if kind < 0.65:
        return _eth(0x0800, _ipv4(a, b, 17, _udp(rng.choice(PORTS), 53, pay)))
    if kind < 0.70:
        return _eth(0x0800, _ipv4(a, b, 1, b"\x08\x00\x00\x00\x00\x01\x00\x01" + pay))
    if kind < 0.74:  # a non-first fragment: no ports
        return _eth(0x0800, _ipv4(a, b, 17, pay + b"x" * 8, frag=1480, ident=rng.randrange(65536)))
    if kind < 0.84:
        x, y = rng.sample(HOSTS6, 2)
        return _eth(0x86DD, _ipv6(x, y, 6, _tcp(rng.choice(PORTS), rng.choice(PORTS), 0x18, pay)))
    if kind < 0.90:
        return _eth(0x0806, _arp(a, b))
    return _eth(0x0800, _ipv4(a, b, 6, _tcp(rng.choice(PORTS), 80, 0x18, pay)), vlan=rng.choice((10, 20)))


def records(frames: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for ts, data in frames:
        out += struct.pack("<IIII", ts // 10**9, ts % 10**9, len(data), len(data)) + data
    return bytes(out)


def batches(seed: int, n: int, start_ns: int, *, per_batch: int = 50, interface: str | None = None,
            step_ns: int = 1_000_000) -> list[PacketBatch]:
    """``n`` packets from ``start_ns`` on, ``per_batch`` per batch, time-ordered."""
    rng = random.Random(seed)
    out, cur, ts = [], [], start_ns
    for _ in range(n):
        ts += rng.randrange(1, step_ns)
        cur.append((ts, frame(rng)))
        if len(cur) == per_batch:
            out.append(PacketBatch.from_records(records(cur), link_type=1, interface=interface))
            cur = []
    if cur:
        out.append(PacketBatch.from_records(records(cur), link_type=1, interface=interface))
    return out


def to_format3(root, value=None, *, parquet_rows: bool = False) -> int:
    """Rewrite the index of ``root`` (one ``_index``, written by this version) as index format 3
    wrote it: a flow file per sensor and date, ``flows/sensor=<value(sensor)>/date=D/<id>.parquet``
    without a ``sensor`` column (a row group per spill, as there), rows of ``index_version`` 3;
    the snapshot is dropped. ``value``:
    the sensor's partition value (default: ``partition_value``); ``parquet_rows``: catalog rows as
    Parquet files (``.parquet``, before 2026-12-05). Returns the rows rewritten."""
    import os

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pktstream.archive.catalog import SNAPSHOT, read_row, row_bytes
    from pktstream.archive.index import catalog_file, catalog_schema, legacy_catalog_file, partition_value
    from pktstream.archive.store import LocalStore
    value = value or partition_value
    store = LocalStore(str(root))
    paths = [pa.ipc.open_file(store.full(rel)).read_all().column("path")[0].as_py()
             for rel in store.list_files("_index/files")]
    for path in paths:
        row = read_row(store, path)
        old_files = []
        for rel in row["flow_files"]:
            pf = pq.ParquetFile(store.full(rel))
            date = rel.split("/date=")[1].split("/")[0]
            groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]  # (a spill each)
            for sensor in sorted({x for g in groups for x in g.column("sensor").to_pylist()}):
                new = f"_index/flows/sensor={value(sensor)}/date={date}/{row['file_id']}.parquet"
                os.makedirs(os.path.dirname(store.full(new)), exist_ok=True)
                with pq.ParquetWriter(store.full(new), groups[0].drop_columns(["sensor"]).schema) as w:
                    for g in groups:
                        part = g.filter(pc.equal(g.column("sensor"), sensor)).drop_columns(["sensor"])
                        if part.num_rows:
                            w.write_table(part)
                old_files.append(new)
            store.delete(rel)
        row.update(flow_files=sorted(old_files), index_version=3)
        table = pa.Table.from_pylist([row], catalog_schema())
        if parquet_rows:
            pq.write_table(table, store.full(legacy_catalog_file(path)))
            store.delete(catalog_file(path))
        else:
            store.write_bytes(catalog_file(path), row_bytes(table))
    store.delete(SNAPSHOT)
    return len(paths)
