"""Per-file indexes of capture files: flow (session) records and a catalog row.

A :class:`FileIndexBuilder` takes the batches of ONE capture file, in file order, each with the
range of the (decompressed) file stream it came from -- a *chunk*: the unit a query reads
again. It aggregates them (one C pass per batch: ``pktstream._flowtable.FlowTable``) into flow
records, one per (sensor, interface, VLAN, ethertype,
IP version, src, dst, sport, dport, proto), with first/last ns, packets, wire bytes, the TCP
flags seen and the chunk numbers holding its packets; ``finish()`` returns the flow tables,
one per Hive partition ``sensor=S/date=YYYY-MM-DD`` (UTC date of the flow's first packet), and
the file's catalog row (time range, counts, sensors, address/port summaries, chunk table,
pcapng header block positions). Layout on disk: docs/ARCHIVE.md.

Sensor attribution: a pcapng interface named ``sensor/interface`` (what the receiver writes
in merged files) gives both; any other name is the interface of the sensor named by the
file's name up to its first dot (per-sensor files ``<sensor id>.pcap.zst``,
``<sensor id>.000003.pcap.zst``), or by the SENSOR directory of an object named by the S3
output's default key (``SENSOR/YYYY/MM/DD/HHMMSS-RUN-SEQ.EXT``).

Lifetime/threads: a builder belongs to one file and one thread; the batches passed to
:meth:`FileIndexBuilder.add` are walked at once and not kept.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import socket
from typing import Any

import numpy as np

from pktstream._capture import PacketBatch
from pktstream._flowtable import KEY_BYTES, FlowTable, address_texts
from pktstream.archive.bloom import MAPPED_PREFIX, build_filter, port_bitmap

INDEX_DIR = "_index"
FORMAT_VERSION = 1
SUMMARY_LIMIT = 4096  # more distinct addresses/ports than this: the summary is "unknown" (null)

# a flow key as FlowTable.flows() gives it (native byte order)
_KEY = np.dtype([("iface", "=i4"), ("vlan", "=i4"), ("ethertype", "=u2"), ("ipv", "u1"), ("proto", "u1"),
                 ("sport", "=u2"), ("dport", "=u2"), ("src", "V16"), ("dst", "V16")])
assert _KEY.itemsize == KEY_BYTES


def file_id(rel_path: str) -> str:
    """Stable name of a capture file's index files (from its path in the archive)."""
    return hashlib.sha1(rel_path.encode()).hexdigest()[:20]


def partition_value(text: str) -> str:
    """A sensor id as a Hive partition value (path-safe; changed names get a hash suffix)."""
    cleaned = re.sub(r"[^A-Za-z0-9._@-]", "_", text)[:100].lstrip(".") or "_"
    if cleaned != text:
        cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return cleaned


# an object named by the S3 output's default key template: SENSOR/YYYY/MM/DD/HHMMSS-RUN-SEQ.EXT
_S3_DEFAULT_KEY = re.compile(r"(?:^|/)(?P<sensor>[^/]+)/\d{4}/\d\d/\d\d/\d{6}-[0-9a-f]+-\d{6}\.[^/]+$")


def sensor_of(interface: str | None, rel_path: str) -> tuple[str, str]:
    """(sensor, interface) of a batch: ``sensor/iface`` interface names, else the SENSOR
    directory of an S3 output's default key, else the file's stem."""
    name = "" if interface is None else str(interface)
    if "/" in name and not name.startswith("/"):
        sensor, _, itf = name.partition("/")
        return sensor, itf
    m = _S3_DEFAULT_KEY.search(rel_path)
    stem = m["sensor"] if m else os.path.basename(rel_path).split(".")[0] or "unknown"
    if name == "" or os.sep in name or name.endswith(os.path.basename(rel_path)):
        name = "if0"  # a pcap file's "interface" is its path
    return stem, name


_MAPPED = b"\0" * 10 + b"\xff\xff"


def address_text(row: bytes, version: int) -> str | None:
    """A 16-byte address row (IPv4 mapped) as text (ARP addresses: version 0, mapped), in the
    form ``inet_ntop`` writes (:func:`canonical` gives the same for a query's address;
    ``pktstream._flowtable.address_texts`` does this for whole columns)."""
    if version == 4 or (version == 0 and row[:12] == _MAPPED):
        return socket.inet_ntop(socket.AF_INET, row[12:16])
    if version == 6:
        return socket.inet_ntop(socket.AF_INET6, row)
    return None


def canonical(address) -> str:
    """The text the index uses for an ``ipaddress`` address (``inet_ntop``'s form)."""
    return socket.inet_ntop(socket.AF_INET if address.version == 4 else socket.AF_INET6, address.packed)


class FileIndexBuilder:
    """Flow records and the catalog row of one capture file, built from its batches.

    :param rel_path: the file's path relative to the archive root (its name in the index).
    :param max_chunk: when > 0, a batch that follows the last chunk directly extends it while
        the chunk stays within this many bytes.
    Not thread-safe; one builder per file.
    """

    def __init__(self, rel_path: str, *, max_chunk: int = 0) -> None:
        self.rel_path = rel_path
        self.max_chunk = max_chunk  # > 0: contiguous batches share a chunk up to this size
        self._ifaces: dict[tuple[str, str, int], int] = {}
        self._table = FlowTable()
        self.chunks: list[list[int]] = []  # [start, end, packets, first_ts, last_ts]
        self.header_blocks: list[tuple[int, int]] = []
        self.sections = 1
        self.packets = 0
        self.wire_bytes = 0

    def add_header_block(self, offset: int, length: int) -> None:
        """A pcapng SHB/IDB at ``offset`` (a query re-reads it before any chunk after it)."""
        if offset >= 0 and (offset, length) not in self.header_blocks:
            self.header_blocks.append((offset, length))

    def add(self, batch: PacketBatch, start: int, end: int, *, interface: str | None = None) -> None:
        """Index ``batch``, whose records came from stream bytes ``[start, end)``.

        Consecutive calls with the same range share one chunk (a pcapng range may hold the
        packets of several interfaces)."""
        n = len(batch)
        if n == 0:
            return
        prev = self.chunks[-1] if self.chunks else None
        same = prev is not None and prev[0] == start and prev[1] == end
        extend = (not same and prev is not None and self.max_chunk > 0 and prev[1] == start
                  and end - prev[0] <= self.max_chunk)  # small batches of a live capture
        chunk = len(self.chunks) - 1 if same or extend else len(self.chunks)
        sensor, itf = sensor_of(batch.interface if interface is None else interface, self.rel_path)
        link_type = batch.link_type
        iid = self._ifaces.setdefault((sensor, itf, link_type), len(self._ifaces))
        # one C pass over the records: flow key, hash insert, per-flow counters
        wire, ts_min, ts_max = self._table.add(batch, n, link_type, iid, chunk)
        if prev is not None and chunk == len(self.chunks) - 1:
            if extend:
                prev[1] = end
            prev[2] += n
            prev[3] = min(prev[3], ts_min)
            prev[4] = max(prev[4], ts_max)
        else:
            self.chunks.append([start, end, n, ts_min, ts_max])
        self.packets += n
        self.wire_bytes += wire

    # -- results ---------------------------------------------------------------------------
    def _flows(self) -> dict[str, Any]:
        """The flow table's records as numpy columns, ordered by first packet time, then key bytes."""
        if not len(self._table):
            return {}
        raw = self._table.flows()
        key = np.frombuffer(raw["key"], dtype=_KEY)
        first = np.frombuffer(raw["first_ns"], dtype=np.int64)
        order = np.argsort(key.view(f"V{_KEY.itemsize}"), kind="stable")
        order = order[np.argsort(first[order], kind="stable")]
        offsets = np.frombuffer(raw["chunk_offsets"], dtype=np.int32)
        values = np.frombuffer(raw["chunk_values"], dtype=np.int32)
        counts = np.diff(offsets)[order]
        new_offsets = np.zeros(len(order) + 1, dtype=np.int32)
        np.cumsum(counts, out=new_offsets[1:])
        # the chunk lists in the new order: gather each flow's run of values
        starts = np.repeat(offsets[:-1][order] - new_offsets[:-1], counts)
        take = np.arange(len(values), dtype=np.int64) + starts
        return {"key": key[order],
                "packets": np.frombuffer(raw["packets"], dtype=np.int64)[order],
                "bytes": np.frombuffer(raw["bytes"], dtype=np.int64)[order],
                "first": first[order],
                "last": np.frombuffer(raw["last_ns"], dtype=np.int64)[order],
                "flags": np.frombuffer(raw["tcp_flags"], dtype=np.uint16)[order],
                "chunk_offsets": new_offsets, "chunk_values": values[take]}

    def finish(self, *, size: int, version: str, format: str, compression: str | None,
               status: str = "ok", error: str | None = None) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
        """(catalog row, {(sensor, date): flow table}) for this file.

        :param size: / :param version: the file's size and version (mtime ns, or S3 ETag) when
            it was read: a later change makes the index stale.
        :param status: ``"ok"``, ``"truncated"`` (indexed up to the cut) or ``"damaged"``.
        """
        import pyarrow as pa
        f = self._flows()
        names = {v: k for k, v in self._ifaces.items()}
        tables: dict[tuple[str, str], Any] = {}
        addrs: list[str] | None = []
        ports: set[int] = set()
        address_filter = build_filter(np.zeros((0, 16), np.uint8))
        first_ts = last_ts = None
        if f:
            key = f["key"]
            ipv = np.ascontiguousarray(key["ipv"])
            n = len(key)

            def texts(col: np.ndarray) -> Any:
                """The addresses as an Arrow string array (text made in C, inet_ntop's form)."""
                offsets, data, valid, nulls = address_texts(np.ascontiguousarray(col).view(np.uint8), ipv)
                return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data),
                                                   pa.py_buffer(valid), nulls)

            src, dst = texts(key["src"]), texts(key["dst"])
            distinct = pa.chunked_array([src, dst]).unique().drop_null()  # (ASCII: Arrow's order is str's)
            addrs = distinct.sort().to_pylist() if len(distinct) <= SUMMARY_LIMIT else None
            address_filter = build_filter(_addresses_with_text(key, ipv))
            ipmask = ipv > 0  # (ARP addresses are in the address summary, no ports)
            ports = set(np.unique(key["sport"][ipmask]).tolist()) | set(np.unique(key["dport"][ipmask]).tolist())
            iface_ids = key["iface"]
            ids = sorted(names)
            sensor_of_id = np.array([names[i][0] for i in ids], dtype=object)
            link_of_id = np.array([names[i][2] for i in ids], dtype=np.int32)
            iface_take = pa.array(iface_ids)
            days = f["first"] // 86_400_000_000_000
            first_ts, last_ts = int(f["first"].min()), int(f["last"].max())
            chunks = pa.ListArray.from_arrays(pa.array(f["chunk_offsets"]), pa.array(f["chunk_values"]))
            table = pa.table({
                "file": pa.repeat(pa.scalar(self.rel_path, pa.string()), n),
                "interface": pa.array([names[i][1] for i in ids], pa.string()).take(iface_take),
                "link_type": pa.array(link_of_id[iface_ids], pa.int32()),
                "vlan": pa.array(key["vlan"]), "ethertype": pa.array(key["ethertype"]),
                "ip_version": pa.array(ipv), "src": src, "dst": dst,
                "sport": pa.array(key["sport"]), "dport": pa.array(key["dport"]), "proto": pa.array(key["proto"]),
                "first_ts_ns": pa.array(f["first"]), "last_ts_ns": pa.array(f["last"]),
                "packets": pa.array(f["packets"]), "bytes": pa.array(f["bytes"]),
                "tcp_flags": pa.array(f["flags"]), "chunks": chunks,
            })
            # one table per (sensor, date) partition; sensors are compared by name (two
            # interfaces of one sensor share a partition)
            sensor_idx = {name: k for k, name in enumerate(sorted(set(sensor_of_id.tolist())))}
            sensor_code = np.array([sensor_idx[x] for x in sensor_of_id.tolist()], dtype=np.int64)[iface_ids]
            part = sensor_code * 1_000_000 + (days - days.min())
            by_sensor = {v: k for k, v in sensor_idx.items()}
            codes = np.unique(part).tolist()
            for code in codes:  # rows are in first_ts_ns order already (see _flows)
                t = table if len(codes) == 1 else table.take(pa.array(np.flatnonzero(part == code)))
                sensor = by_sensor[code // 1_000_000]
                tables[(sensor, _date(int(days.min()) + code % 1_000_000))] = t
        row = {
            "path": self.rel_path, "file_id": file_id(self.rel_path), "index_version": FORMAT_VERSION,
            "size": size, "version": version, "format": format, "compression": compression,
            "status": status, "error": error,
            "first_ts_ns": first_ts, "last_ts_ns": last_ts, "packets": self.packets, "bytes": self.wire_bytes,
            "flows": sum(t.num_rows for t in tables.values()),
            "sensors": sorted({s for s, _, _ in self._ifaces}),
            "interfaces": sorted({f"{s}/{i}" for s, i, _ in self._ifaces}),
            "addresses": addrs,
            "ports": sorted(ports) if len(ports) <= SUMMARY_LIMIT else None,
            "address_filter": address_filter,
            "port_bitmap": None if len(ports) <= SUMMARY_LIMIT else port_bitmap(np.fromiter(ports, np.int64)),
            "sections": self.sections,
            "header_blocks": [{"offset": o, "length": n} for o, n in sorted(self.header_blocks)],
            "chunks": [{"start": c[0], "end": c[1], "packets": c[2], "first_ts_ns": c[3], "last_ts_ns": c[4]}
                       for c in self.chunks],
            "flow_files": sorted(flow_file(s, d, self.rel_path) for s, d in tables),
        }
        return row, tables


def _addresses_with_text(key: np.ndarray, ipv: np.ndarray) -> np.ndarray:
    """The 16-byte src and dst addresses (uint8, shape (n, 16)) of the flow keys that have a
    text in the flow records (IP, and ARP's IPv4-mapped ones), IPv4 with the mapped prefix."""
    out = []
    for name in ("src", "dst"):
        rows = np.ascontiguousarray(key[name]).view(np.uint8).reshape(-1, 16)
        mapped = (rows[:, :12] == _MAPPED_ROW).all(axis=1)
        v4 = (ipv == 4) | ((ipv == 0) & mapped)
        rows = rows[v4 | (ipv == 6)].copy()
        rows[v4[v4 | (ipv == 6)], :12] = _MAPPED_ROW
        out.append(rows)
    return np.concatenate(out)


_MAPPED_ROW = np.frombuffer(MAPPED_PREFIX, dtype=np.uint8)


def _date(days: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(days))).isoformat()


def flow_file(sensor: str, date: str, rel_path: str) -> str:
    """Path (relative to the archive root) of a file's flow records in one partition."""
    return f"{INDEX_DIR}/flows/sensor={partition_value(sensor)}/date={date}/{file_id(rel_path)}.parquet"


def catalog_file(rel_path: str) -> str:
    """Path (relative to the archive root) of a file's catalog row."""
    return f"{INDEX_DIR}/files/{file_id(rel_path)}.parquet"


CATALOG_FIELDS = None  # filled lazily by catalog_schema()


def catalog_schema():
    """The catalog's Arrow schema (one row per capture file)."""
    import pyarrow as pa
    global CATALOG_FIELDS
    if CATALOG_FIELDS is None:
        CATALOG_FIELDS = pa.schema([
            ("path", pa.string()), ("file_id", pa.string()), ("index_version", pa.int32()),
            ("size", pa.int64()), ("version", pa.string()), ("format", pa.string()),
            ("compression", pa.string()), ("status", pa.string()), ("error", pa.string()),
            ("first_ts_ns", pa.int64()), ("last_ts_ns", pa.int64()), ("packets", pa.int64()),
            ("bytes", pa.int64()), ("flows", pa.int64()), ("sensors", pa.list_(pa.string())),
            ("interfaces", pa.list_(pa.string())), ("addresses", pa.list_(pa.string())),
            ("ports", pa.list_(pa.uint16())), ("sections", pa.int32()),
            ("header_blocks", pa.list_(pa.struct([("offset", pa.int64()), ("length", pa.int64())]))),
            ("chunks", pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()), ("packets", pa.int64()),
                                           ("first_ts_ns", pa.int64()), ("last_ts_ns", pa.int64())]))),
            ("flow_files", pa.list_(pa.string())),
            # after the columns of format 1 (catalogs without them still load: null = unknown)
            ("address_filter", pa.binary()), ("port_bitmap", pa.binary()),
        ])
    return CATALOG_FIELDS
