"""Per-file indexes of capture files: flow (session) records and a catalog row.

A :class:`FileIndexBuilder` takes the batches of ONE capture file, in file order, each with the
range of the (decompressed) file stream it came from -- a *chunk*: the unit a query reads
again. It aggregates them (one C pass per batch: ``pktstream._flowtable.FlowTable``) into flow
records, one per (sensor, interface, VLAN, ethertype,
IP version, src, dst, sport, dport, proto), with first/last ns, packets, wire bytes, the TCP
flags seen and the chunk numbers holding its packets; ``finish()`` returns the flow tables,
one per (sensor, UTC date of the flow's first packet) -- stored as one Parquet file per date,
``date=YYYY-MM-DD``, with a ``sensor`` column (:func:`flow_file`) -- and the file's catalog
row (time range, counts, sensors, address/port summaries, chunk table, pcapng header block
positions). Layout on disk: docs/ARCHIVE.md.

Sensor attribution: a pcapng interface named ``sensor/interface`` (what the receiver writes
in merged files) gives both; any other name is the interface of the sensor named by the
file's name without its capture extension, rotation number and link-type suffix (per-sensor
files ``<sensor id>.pcap.zst``, ``<sensor id>.000003.pcap.zst``; ids may hold dots), or by the
SENSOR directory of an object named by the S3
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
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from pktstream._capture import PacketBatch
from pktstream._flowtable import (
    GIL_RELEASE_MIN,
    KEY_BYTES,
    FlowTable,
    address_strings,
    address_texts,
    distinct_sorted,
    key_addresses,
    key_columns,
    key_summary,
    mapped_rows,
    repeat_offsets,
)
from pktstream.archive.bloom import MAPPED_PREFIX, UNKNOWN_FILTER, address_hashes, filter_of_hashes, port_bitmap
from pktstream.formats import linktype_to_dlt

if TYPE_CHECKING:
    import numpy.typing as npt

INDEX_DIR = "_index"
FORMAT_VERSION = 4  # 2: ports of cut TCP/UDP headers; summaries incomplete for broken IP, short ARP;
#                    3: the protocol behind a cut IPv6 fragment header; NULL/LOOP family 10 not IPv6;
#                    4: one flow file per date with a sensor column (was: per sensor and date)
READABLE_VERSIONS = (3, 4)  # formats queries use as they are (3 differs only in its flow files' layout)
SUMMARY_LIMIT = 4096  # more distinct addresses/ports than this: the summary is "unknown" (null)

# a flow key as FlowTable.flows() gives it (native byte order)
_KEY = np.dtype([("iface", "=i4"), ("vlan", "=i4"), ("ethertype", "=u2"), ("ipv", "u1"), ("proto", "u1"),
                 ("sport", "=u2"), ("dport", "=u2"), ("src", "V16"), ("dst", "V16")])
assert _KEY.itemsize == KEY_BYTES


def file_id(rel_path: str) -> str:
    """Stable name of a capture file's index files (from its path in the archive)."""
    return hashlib.sha1(rel_path.encode()).hexdigest()[:20]


def partition_value(text: str) -> str:
    """A sensor id as a Hive partition value of index format 3 (``flows/sensor=<value>/``; read
    only since format 4, :data:`LEGACY_FLOW_RE`): the id itself when it is path-safe (letters,
    digits, ``._@-``, at most 100 characters, not starting with ``.``), else its path-safe form
    with ``~`` and 8 hex digits of its SHA-256 -- a character no path-safe id holds, so no
    two ids share a value (before 2026-12-04 the suffix began with ``-``: ``s p`` ->
    ``s_p-e745a89c``, which is also a path-safe id; two sensors' records then went to one file)."""
    cleaned = _path_safe(text)
    return cleaned if cleaned == text else f"{cleaned}~{_suffix(text)}"


def partition_values(text: str) -> tuple[str, ...]:
    """The values a sensor id may have in an index: :func:`partition_value`'s and the one
    older indexes gave it -- ``-`` and the suffix for an id that is not path-safe (before
    2026-12-04), or for a path-safe id ending like a suffix (an index of commit e169e5b)."""
    cleaned = _path_safe(text)
    if cleaned != text:
        return f"{cleaned}~{_suffix(text)}", f"{cleaned}-{_suffix(text)}"
    return (text, f"{text}-{_suffix(text)}") if re.search(r"-[0-9a-f]{8}$", text) else (text,)


def sensor_of_partition(value: str, sensors: list[str]) -> str:
    """The id among ``sensors`` (a catalog row's) whose partition value in format 3's layout is
    ``value`` -- this version's form first: an older index may hold both -- else ``value``."""
    for s in sensors:
        if partition_value(s) == value:
            return s
    for s in sensors:
        if value in partition_values(s):
            return s
    return value


def _path_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", text)[:100].lstrip(".") or "_"


def _suffix(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


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
    stem = m["sensor"] if m else _name_stem(os.path.basename(rel_path)) or "unknown"
    if name == "" or os.sep in name or name.endswith(os.path.basename(rel_path)):
        name = "if0"  # a pcap file's "interface" is its path
    return stem, name




def _name_stem(name: str) -> str:
    """The sensor id in a per-sensor file's name as the receiver writes it:
    ``<id>[.<LINKTYPE>][.<6+ digit rotation number> | ~<N: the next free name>].<capture
    extension>`` (an id may hold dots: ``10.0.0.5.000003.pcap.zst`` is sensor ``10.0.0.5``,
    ``node.12.pcap`` sensor ``node.12``)."""
    from pktstream.archive.store import CAPTURE_SUFFIXES
    for ext in sorted(CAPTURE_SUFFIXES, key=len, reverse=True):
        if name.endswith(ext):
            name = name[:-len(ext)]
            break
    name = re.sub(r"\.\d{6,}$", "", name)
    name = re.sub(r"~\d+$", "", name)  # the next free name of a restarted receiver (``s1~1.pcap``)
    head, dot, last = name.rpartition(".")
    if dot and head and last in _link_type_names():
        name = head
    return name



_LINK_NAMES: frozenset[str] | None = None


def _link_type_names() -> frozenset[str]:
    """libpcap's names of link types (the suffix of a second link type's file: ``.LINUX_SLL``)."""
    global _LINK_NAMES
    if _LINK_NAMES is None:
        from pktstream._capture import link_type_name
        _LINK_NAMES = frozenset(link_type_name(v) for v in range(300))
    return _LINK_NAMES


def address_text(row: bytes, version: int) -> str | None:
    """A 16-byte address row (IPv4 mapped) as text (ARP addresses: version 0, mapped), in the
    form ``inet_ntop`` writes (:func:`canonical` gives the same for a query's address;
    ``pktstream._flowtable.address_texts`` does this for whole columns)."""
    if version == 4 or (version == 0 and row[:12] == MAPPED_PREFIX):
        return socket.inet_ntop(socket.AF_INET, row[12:16])
    if version == 6:
        return socket.inet_ntop(socket.AF_INET6, row)
    return None


def canonical(address) -> str:
    """The text the index uses for an ``ipaddress`` address (``inet_ntop``'s form)."""
    return socket.inet_ntop(socket.AF_INET if address.version == 4 else socket.AF_INET6, address.packed)


# How flow records are stored (measured on a 16 MB file's 1,330 records, 2026-12-04: 0.90 ms
# to write and 0.49 ms to read, 42 KB, where zstd on every column took 1.20 ms, 0.72 ms, 45 KB):
# dictionary encoding for the columns of few distinct values; delta encoding for the numbers
# (times in first-packet order, counters, ports, chunk numbers: small differences, bit-packed);
# zstd only on the address texts, the one kind of column a general compressor shrinks much more
# than an encoding does. (Dictionary encoding of addresses, times and counters cost more CPU
# than it saved bytes.)
FLOW_DICTIONARY = ["file", "interface", "link_type", "vlan", "ethertype", "ip_version", "proto", "tcp_flags",
                   "sensor"]
FLOW_DELTA = ["first_ts_ns", "last_ts_ns", "packets", "bytes", "sport", "dport", "chunks.list.element"]
FLOW_COMPRESSED = ["src", "dst"]

# the flow records' columns, in order (FileIndexBuilder._parts builds them; write_index adds
# ``sensor``, the partition of format 3's directory layout)
FLOW_SCHEMA_COLUMNS = ("file", "interface", "link_type", "vlan", "ethertype", "ip_version", "src", "dst",
                       "sport", "dport", "proto", "first_ts_ns", "last_ts_ns", "packets", "bytes",
                       "tcp_flags", "chunks", "sensor")
BINARY_COLUMNS = ("address_filter", "port_bitmap")  # catalog columns of raw bytes (bloom.py layouts)
#: link types whose packets the flow table decodes (pktstream._flowtable parse_key)
DECODED_LINK_TYPES = (0, 1, 12, 14, 101, 108, 113, 228, 229, 276)
_DECODED = frozenset(DECODED_LINK_TYPES)
FILTER_MAX_ADDRESSES = 1 << 20  # distinct addresses a file's address filter holds (8 MiB of hashes); more: none
INDEX_MAX_FLOWS = 262_144  # default cap on the flow records one builder holds in memory (~40 MiB at most)


def flow_parquet_options() -> dict[str, Any]:
    """``pyarrow.parquet`` writer options of a flow records file (columns not named are stored
    uncompressed); min/max statistics on every column but the chunk lists."""
    return {"compression": {c: "zstd" for c in FLOW_COMPRESSED}, "use_dictionary": FLOW_DICTIONARY,
            "column_encoding": {c: "DELTA_BINARY_PACKED" for c in FLOW_DELTA},
            "write_statistics": [c for c in FLOW_SCHEMA_COLUMNS if c != "chunks"]}


class IndexNotBuilt(Exception):
    """A capture file could not be indexed for a reason that is not its content: it gets no
    catalog row (queries scan it) and the next ``pktstream index`` tries again."""


class IndexSpillError(IndexNotBuilt):
    """Flow records could not be spilled to a temporary file (disk full, ...): an error of the
    index, not of the capture file (which gets no index and is scanned by queries)."""


class CaptureReadError(IndexNotBuilt):
    """Reading the capture file failed (EIO, EACCES, a network store): not damage of the file,
    so nothing about it is recorded (a damaged row would be kept as current for good)."""


class SpilledFlows:
    """Flow records of one partition of one capture file that a builder spilled: a Parquet
    file (one row group per spill, same schema as an in-memory part) in an anonymous temporary
    file (deleted when closed, also by a crash). ``num_rows`` like a ``pyarrow.Table``.

    Lifetime/threads: owned by the builder, then by whoever writes the index (one thread);
    :meth:`close` (or garbage collection) frees the temporary file.
    """

    def __init__(self, schema: Any, spill_dir: str | None) -> None:
        import tempfile

        import pyarrow.parquet as pq
        self._file = tempfile.TemporaryFile(dir=spill_dir)
        self._writer: Any = pq.ParquetWriter(self._file, schema, **flow_parquet_options())
        self.num_rows = 0

    def append(self, table: Any) -> None:
        """Write ``table`` (this partition's schema) as one more row group."""
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.num_rows += table.num_rows

    def seal(self) -> None:
        """No more rows: write the Parquet footer (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def parquet_bytes(self) -> bytes:
        """The whole Parquet file (compressed records: ~10-20 bytes per record)."""
        self.seal()
        self._file.seek(0)
        return self._file.read()

    def row_groups(self) -> Iterator[Any]:
        """The records as Arrow tables, one per row group (spill), read one at a time."""
        import pyarrow.parquet as pq
        self.seal()
        self._file.seek(0)
        pf = pq.ParquetFile(self._file)
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g, use_threads=False)

    def close(self) -> None:
        """Free the temporary file."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        self._file.close()


class FileIndexBuilder:
    """Flow records and the catalog row of one capture file, built from its batches.

    :param rel_path: the file's path relative to the archive root (its name in the index).
    :param max_chunk: when > 0, a batch that follows the last chunk directly extends it while
        the chunk stays within this many bytes.
    :param max_flows: memory bound: when the flow table would hold more than this many flows
        (or more than ``4 * max_flows`` (flow, chunk) pairs), its records are *spilled* --
        written as one more row group of the file's flow records (a temporary file per
        partition, :class:`SpilledFlows`) -- and the table starts again empty. A flow may then
        have several records, each for a disjoint set of its packets (``spills`` counts them).
        0: no bound.
    :param spill_dir: directory of the spill files (default: the system's temporary directory).
    Not thread-safe; one builder per file.
    """

    def __init__(self, rel_path: str, *, max_chunk: int = 0, max_flows: int = INDEX_MAX_FLOWS,
                 spill_dir: str | None = None) -> None:
        self.rel_path = rel_path
        self.max_chunk = max_chunk  # > 0: contiguous batches share a chunk up to this size
        self.max_flows = max_flows
        self.spill_dir = spill_dir
        self._ifaces: dict[tuple[str, str, int], int] = {}
        self._attribution: dict[str | None, tuple[str, str]] = {}  # interface name -> (sensor, interface)
        self._table = FlowTable(max_flows)
        self.chunks: list[list[int]] = []  # [start, end, packets, first_ts, last_ts]
        self.header_blocks: list[tuple[int, int]] = []
        self.sections = 1
        self.packets = 0
        self.wire_bytes = 0
        self.spills = 0  # times the flow table was written out and emptied
        self.peak_flows_held = 0  # most flows held in the table at once
        self.peak_table_bytes = 0  # most memory the flow table held (FlowTable.nbytes)
        self._spilled: dict[tuple[str, str], SpilledFlows] = {}
        # the address summary (None past SUMMARY_LIMIT): distinct IPv4 addresses (sorted uint32)
        # and IPv6 addresses (16 bytes); text only at finish()
        self._addrs: tuple[np.ndarray, set[bytes]] | None = (np.zeros(0, dtype=np.uint32), set())
        self._addr_hashes = np.zeros(0, dtype=np.uint64)  # distinct address hashes (bloom.address_hashes)
        # False: no address summary or filter can say "not here" (ARP on a cooked link: addresses
        # the flow records do not hold; or more than FILTER_MAX_ADDRESSES distinct addresses)
        self._addresses_complete = True
        self._ports_complete = True  # False: the port summary cannot say "not here" either
        self._port_seen = np.zeros(65536, dtype=bool)  # ports of the file's IP flows
        self._with_records: set[int] = set()  # interface ids with records (an add that raised has none)
        self._first_ts: int | None = None
        self._last_ts: int | None = None

    @property
    def flows_held(self) -> int:
        """Flows in the in-memory table now (at most about ``max_flows`` plus one batch)."""
        return len(self._table)

    def add_header_block(self, offset: int, length: int) -> None:
        """A pcapng SHB/IDB at ``offset`` (a query re-reads it before any chunk after it)."""
        if offset >= 0 and (offset, length) not in self.header_blocks:
            self.header_blocks.append((offset, length))

    def add(self, batch: PacketBatch, start: int, end: int, *, interface: str | None = None,
            offsets: npt.NDArray[np.int64] | None = None) -> None:
        """Index ``batch``, whose records came from stream bytes ``[start, end)``.

        Consecutive calls with the same range share one chunk (a pcapng range may hold the
        packets of several interfaces). ``offsets``: the batch's ``offset`` array when the
        caller has it (a writer's conversion found it; ignored when the batch has its own): the
        records are then not walked again (a walk is a chain of dependent loads, 1.5-2x slower
        over records out of the CPU caches). Each offset is checked against the buffer: one
        outside it (-1: the writer found another number of records) raises ValueError, as a
        record running past the buffer does."""
        n = len(batch)
        if n == 0:
            return
        t = self._table
        if self.max_flows > 0 and len(t) and (len(t) + n > self.max_flows or t.refs + n > 4 * self.max_flows):
            self.spill()
        prev = self.chunks[-1] if self.chunks else None
        same = prev is not None and prev[0] == start and prev[1] == end
        extend = (not same and prev is not None and self.max_chunk > 0 and prev[1] == start
                  and end - prev[0] <= self.max_chunk)  # small batches of a live capture
        chunk = len(self.chunks) - 1 if same or extend else len(self.chunks)
        name = batch.interface if interface is None else interface
        attribution = self._attribution.get(name)
        if attribution is None:  # (sensor_of once per interface name and file, not per batch)
            attribution = self._attribution[name] = sensor_of(name, self.rel_path)
        sensor, itf = attribution
        # as a reader of the file will see it: a batch built with a LINKTYPE_ value (101, raw IP)
        # is written as that, and read back as its DLT_ value (12), like an offline index gives it
        link_type = linktype_to_dlt(batch.link_type)
        iid = self._ifaces.setdefault((sensor, itf, link_type), len(self._ifaces))
        # one C pass over the records: flow key, hash insert, per-flow counters
        # (the batch's offset array when a writer built or found it already: no record walk)
        before = t.packets
        try:
            if batch.has_arrays:
                offsets = batch.offset
            wire, ts_min, ts_max = t.add(batch, n, link_type, iid, chunk, offsets)
        finally:
            if t.packets != before:  # (a refused batch adds none; one changed meanwhile, some)
                self._with_records.add(iid)
        if len(t) > self.peak_flows_held:
            self.peak_flows_held = len(t)
            self.peak_table_bytes = max(self.peak_table_bytes, t.nbytes)
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

    def spill(self) -> None:
        """Write the flow records held so far as one more row group of this file's records
        (per partition) and empty the table (its memory is kept for reuse). Raises
        :class:`IndexSpillError` when they cannot be written (the builder is then unusable:
        the file gets no index rather than one missing records)."""
        parts = self._parts()
        if parts:
            try:
                for key, table in parts.items():
                    sp = self._spilled.get(key)
                    if sp is None:
                        sp = self._spilled[key] = SpilledFlows(table.schema, self.spill_dir)
                    sp.append(table)
            except OSError as exc:
                import tempfile
                raise IndexSpillError(f"cannot spill flow records to {self.spill_dir or tempfile.gettempdir()}: "
                                      f"{exc.strerror or exc}") from exc
            self.spills += 1
        self._table.clear()

    def close(self) -> None:
        """Free the spill files (after :meth:`finish`'s tables were written, or to abandon the
        builder). Idempotent."""
        for sp in self._spilled.values():
            sp.close()

    # -- results ---------------------------------------------------------------------------
    def _flows(self) -> dict[str, Any]:
        """The flow table's records as numpy columns, grouped by (sensor, date) partition, each
        group ordered by first packet time, then key bytes (ordered in C: FlowTable.flows)."""
        if not len(self._table):
            return {}
        # partition (sensor, day) of each record: sensors by name (two interfaces of one sensor
        # share a partition), numbered in name order
        names = {v: k for k, v in self._ifaces.items()}
        sensors = sorted({names[i][0] for i in names})
        sensor_of_id = np.zeros(max(names) + 1, dtype=np.int64)
        for i, (sensor, _itf, _lt) in names.items():
            sensor_of_id[i] = sensors.index(sensor)
        raw = self._table.flows(sensor_of_id)
        part = np.frombuffer(raw["part"], dtype=np.int64)
        day0 = raw["day0"]
        return {"key": np.frombuffer(raw["key"], dtype=_KEY), "key_bytes": raw["key"],
                "packets": np.frombuffer(raw["packets"], dtype=np.int64),
                "bytes": np.frombuffer(raw["bytes"], dtype=np.int64),
                "first": np.frombuffer(raw["first_ns"], dtype=np.int64),
                "last": np.frombuffer(raw["last_ns"], dtype=np.int64),
                "flags": np.frombuffer(raw["tcp_flags"], dtype=np.uint16),
                "chunk_offsets": np.frombuffer(raw["chunk_offsets"], dtype=np.int32),
                "chunk_values": np.frombuffer(raw["chunk_values"], dtype=np.int32),
                "first_min": raw["first_min"], "last_max": raw["last_max"], "part": part,
                "partitions": {code: (sensors[code // 1_000_000], _date(day0 + code % 1_000_000))
                               for code in part[np.flatnonzero(np.diff(part, prepend=-1))].tolist()}}

    def _parts(self) -> dict[tuple[str, str], Any]:
        """The records held in the table as Arrow tables, one per (sensor, date) partition,
        rows in first-packet order; the catalog summaries (addresses, ports, time range) are
        updated with them."""
        import pyarrow as pa
        f = self._flows()
        tables: dict[tuple[str, str], Any] = {}
        if not f:
            return tables
        names = {v: k for k, v in self._ifaces.items()}
        key_bytes = f["key_bytes"]
        # (every step below in C or on contiguous buffers: numpy's sorts and strided copies and
        # pyarrow.repeat each released the GIL, a thread switch each in a busy receiver)
        key = {name: np.frombuffer(col, dtype=_KEY[name] if name not in ("src", "dst") else np.uint8)
               for name, col in key_columns(key_bytes).items()}
        ipv = key["ipv"]
        n = len(ipv)

        def texts(col: np.ndarray) -> Any:
            """The addresses as an Arrow string array (text made in C, inet_ntop's form)."""
            offsets, data, valid, nulls = address_texts(col, ipv)
            return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data),
                                               pa.py_buffer(valid), nulls)

        src, dst = texts(key["src"]), texts(key["dst"])
        # the file's distinct addresses: IPv4 as sorted numbers, IPv6 as 16-byte rows
        four, six_buf = key_addresses(key_bytes)
        quads = _distinct_words(np.frombuffer(four, dtype=np.uint32))
        six = bytes(six_buf)
        six_rows = {six[i:i + 16] for i in range(0, len(six), 16)}
        if self._addrs is not None:
            self._add_addresses(quads, six_rows)
        # the address filter's input: distinct hashes of every address of the file (all spills);
        # past FILTER_MAX_ADDRESSES (a flood of spoofed sources) no filter: memory stays bounded
        if self._addresses_complete:
            hashes = address_hashes(np.frombuffer(bytes(mapped_rows(quads)) + b"".join(six_rows), dtype=np.uint8))
            self._addr_hashes = _distinct_words(np.concatenate([self._addr_hashes, hashes])
                                                if len(self._addr_hashes) else hashes)
            if len(self._addr_hashes) > FILTER_MAX_ADDRESSES:
                self._addresses_complete = False
                self._addr_hashes = np.zeros(0, dtype=np.uint64)
        iface_ids = key["iface"]
        ids = sorted(names)
        link_of_id = np.array([names[i][2] for i in ids], dtype=np.int32)
        links = np.full(n, link_of_id[0], dtype=np.int32) if len(ids) == 1 else link_of_id[iface_ids]
        # ports of the IP flows (ARP addresses are in the address summary, no ports), and
        # whether the records hold every address and port (summary_completeness, in one C pass)
        broken_ip, unaddressed = key_summary(key_bytes, links, self._port_seen.view(np.uint8))
        # link types of the interfaces with records (their records may be in an earlier spill)
        decoded = {names[i][2] for i in self._with_records} <= _DECODED
        self._addresses_complete &= decoded and not broken_ip and not unaddressed
        self._ports_complete &= decoded and not broken_ip
        # interface names: a string array built from buffers (Array.take would load pyarrow.compute,
        # ~0.25 CPU-s once per process)
        if len(ids) == 1:  # (one interface: no per-record Python)
            interfaces = repeated_strings(names[ids[0]][1], n)
        else:
            itf_bytes = [names[i][1].encode() for i in ids]
            itf_len = np.array([len(b) for b in itf_bytes], dtype=np.int32)
            itf_offsets = np.zeros(n + 1, dtype=np.int32)
            np.cumsum(itf_len[iface_ids], out=itf_offsets[1:])
            interfaces = pa.StringArray.from_buffers(n, pa.py_buffer(itf_offsets),
                                                     pa.py_buffer(b"".join([itf_bytes[i] for i in iface_ids.tolist()])))
        lo, hi = f["first_min"], f["last_max"]
        self._first_ts = lo if self._first_ts is None else min(self._first_ts, lo)
        self._last_ts = hi if self._last_ts is None else max(self._last_ts, hi)
        chunks = pa.ListArray.from_arrays(_arrow(f["chunk_offsets"]), _arrow(f["chunk_values"]))
        table = pa.table({
            "file": repeated_strings(self.rel_path, n),
            "interface": interfaces,
            "link_type": _arrow(links),
            "vlan": _arrow(key["vlan"]), "ethertype": _arrow(key["ethertype"]),
            "ip_version": _arrow(ipv), "src": src, "dst": dst,
            "sport": _arrow(key["sport"]), "dport": _arrow(key["dport"]), "proto": _arrow(key["proto"]),
            "first_ts_ns": _arrow(f["first"]), "last_ts_ns": _arrow(f["last"]),
            "packets": _arrow(f["packets"]), "bytes": _arrow(f["bytes"]),
            "tcp_flags": _arrow(f["flags"]), "chunks": chunks,
        })
        # one table per (sensor, date) partition, a slice each (_flows grouped the rows); sensors
        # are compared by name (two interfaces of one sensor share a partition)
        part = f["part"]
        if len(f["partitions"]) == 1:
            tables[next(iter(f["partitions"].values()))] = table
        else:
            cuts = [0, *(np.flatnonzero(part[1:] != part[:-1]) + 1).tolist(), n]
            for a, b in zip(cuts[:-1], cuts[1:]):
                tables[f["partitions"][int(part[a])]] = table.slice(a, b - a)
        return tables

    def _add_addresses(self, quads: np.ndarray, six: set[bytes]) -> None:
        """Add distinct addresses (IPv4 as sorted uint32 numbers, IPv6 as 16 bytes) to the
        address summary (None past SUMMARY_LIMIT): text is made once, by :meth:`_address_summary`."""
        assert self._addrs is not None
        old_quads, old_six = self._addrs
        quads = _distinct_words(np.concatenate([old_quads, quads])) if len(old_quads) else quads
        old_six.update(six)
        self._addrs = None if len(quads) + len(old_six) > SUMMARY_LIMIT else (quads, old_six)

    def _address_summary(self) -> list[str | None]:
        """The summary's addresses as text (inet_ntop's form, made in C): IPv4 in numeric order,
        then IPv6 in byte order."""
        assert self._addrs is not None
        quads, six = self._addrs
        rows = bytes(mapped_rows(quads)) + b"".join(sorted(six))
        return address_strings(rows, b"\4" * len(quads) + b"\6" * len(six))

    def finish(self, *, size: int, version: str, format: str, compression: str | None,
               status: str = "ok", error: str | None = None) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
        """(catalog row, {(sensor, date): flow records}) for this file. The records of a
        partition are a ``pyarrow.Table`` (rows in first-packet order), or, when the builder
        spilled, a :class:`SpilledFlows` (row groups in spill order, rows in first-packet order
        within each); :meth:`close` frees those after they are written.

        :param size: / :param version: the file's size and version (mtime ns, or S3 ETag) when
            it was read: a later change makes the index stale.
        :param status: ``"ok"``, ``"truncated"`` (indexed up to the cut) or ``"damaged"``.
        """
        tables: dict[tuple[str, str], Any]
        if self._spilled:
            self.spill()
            tables = dict(self._spilled)
            for sp in tables.values():
                sp.seal()
        else:
            tables = self._parts()
        addrs = self._address_summary() if self._addrs is not None and self._addresses_complete else None
        ports = np.flatnonzero(self._port_seen)
        address_filter = filter_of_hashes(self._addr_hashes) if self._addresses_complete else UNKNOWN_FILTER
        row = {
            "path": self.rel_path, "file_id": file_id(self.rel_path), "index_version": FORMAT_VERSION,
            "size": size, "version": version, "format": format, "compression": compression,
            "status": status, "error": error,
            "first_ts_ns": self._first_ts, "last_ts_ns": self._last_ts, "packets": self.packets,
            "bytes": self.wire_bytes,
            "flows": sum(t.num_rows for t in tables.values()),
            "sensors": sorted({s for s, _, _ in self._ifaces}),
            "interfaces": sorted({f"{s}/{i}" for s, i, _ in self._ifaces}),
            "addresses": addrs,
            "ports": ports.tolist() if len(ports) <= SUMMARY_LIMIT and self._ports_complete else None,
            "address_filter": address_filter,
            "port_bitmap": None if len(ports) <= SUMMARY_LIMIT or not self._ports_complete
            else port_bitmap(ports),
            "sections": self.sections,
            "header_blocks": [{"offset": o, "length": n} for o, n in sorted(self.header_blocks)],
            "chunks": [{"start": c[0], "end": c[1], "packets": c[2], "first_ts_ns": c[3], "last_ts_ns": c[4]}
                       for c in self.chunks],
            "flow_files": flow_files(tables, self.rel_path),
        }
        return row, tables


def summary_completeness(ipv: np.ndarray, ethertype: np.ndarray, link_type: np.ndarray,
                         addressed: np.ndarray | None = None) -> tuple[bool, bool]:
    """Whether flow records (per record: IP version, ethertype, link type; ``addressed``:
    whether the record holds both its addresses, None: all do) hold every address and every
    port libpcap's filters would see in their packets -- (addresses, ports). A summary of
    incomplete records cannot say "not here". Not complete:

    - a link type the flow table does not decode (PPP, 802.11, ...: no addresses or ports);
    - an IPv4/IPv6 ethertype whose header the flow table rejected (version or header length
      wrong, cut by the snap length): libpcap's ``host``/``port`` tests read the bytes where
      the addresses and ports would be all the same;
    - for addresses: ARP/RARP on a link type other than Ethernet (the cooked captures of
      "-i any": libpcap's "host X" matches ARP's addresses, the records do not hold them), or
      an ARP/RARP packet too short for both addresses.
    """
    decoded = set(_distinct(link_type).tolist()) <= _DECODED  # (np.isin: ~10x the time)
    no_ip = ipv == 0
    broken_ip = bool((no_ip & ((ethertype == 0x0800) | (ethertype == 0x86DD))).any())
    arp = no_ip & ((ethertype == 0x0806) | (ethertype == 0x8035))
    unaddressed = arp & (link_type != 1)
    if addressed is not None:
        unaddressed |= arp & ~addressed
    return decoded and not broken_ip and not bool(unaddressed.any()), decoded and not broken_ip


def _arrow(a: np.ndarray) -> Any:
    """A numpy column as an Arrow array (no nulls), zero-copy when contiguous (``pa.array``
    would load numpy.ma, ~0.05 CPU-s once per process, to look for masked arrays)."""
    import pyarrow as pa
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype.newbyteorder("=")), len(a), [None, pa.py_buffer(a)])


def _distinct_words(a: np.ndarray) -> np.ndarray:
    """:func:`_distinct` of a uint32 or uint64 array: sorted in C keeping the GIL when small (a
    file's addresses), by numpy when large (faster there, and releasing the GIL pays)."""
    if len(a) >= GIL_RELEASE_MIN:
        return _distinct(a)
    return np.frombuffer(distinct_sorted(np.ascontiguousarray(a).view(np.uint8), a.dtype.itemsize), dtype=a.dtype)


def repeated_strings(text: str, n: int) -> Any:
    """An Arrow string array of ``n`` times ``text``, from buffers."""
    import pyarrow as pa
    data = text.encode()
    return pa.StringArray.from_buffers(n, pa.py_buffer(repeat_offsets(n, len(data))), pa.py_buffer(data * n))


def strings_by_run(texts: list[str], counts: list[int]) -> Any:
    """An Arrow string array of ``counts[i]`` times ``texts[i]``, one run after another, from
    buffers (no Python object per value)."""
    import pyarrow as pa
    data = [t.encode() for t in texts]
    runs = np.asarray(counts, dtype=np.int64)
    per_row = np.repeat(np.array([len(d) for d in data], dtype=np.int64), runs)
    if int(per_row.sum()) > 0x7FFFFFFF:
        raise ValueError(f"{len(per_row)} strings: more than an Arrow string array holds")
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    return pa.StringArray.from_buffers(len(per_row), pa.py_buffer(offsets),
                                       pa.py_buffer(b"".join(d * int(n) for d, n in zip(data, runs, strict=True))))


def _distinct(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a``, sorted (np.unique's result; np.unique would load numpy.ma,
    ~0.05 CPU-s once per process)."""
    a = np.sort(a)
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = a[1:] != a[:-1]
    return a[keep]


def _date(days: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(days))).isoformat()


def flow_file(date: str, rel_path: str) -> str:
    """Path (relative to the archive root) of a file's flow records of one UTC date (all its
    sensors: a ``sensor`` column). Format 3 (before 2026-12-06) kept one file per sensor and
    date, ``flows/sensor=<partition value>/date=<date>/``: a merged file of 100 sensors cost 100
    Parquet files (~1.8 ms each) per capture file; those are still read (:data:`LEGACY_FLOW_RE`)."""
    return f"{INDEX_DIR}/flows/date={date}/{file_id(rel_path)}.parquet"


def flow_files(tables: dict, rel_path: str) -> list[str]:
    """The flow files of a file whose flow tables (``{(sensor, date): table}``) are ``tables``."""
    return sorted({flow_file(d, rel_path) for _, d in tables})


#: a flow file's own partition directories (a directory above may be called sensor=x too):
#: ``sensor=<partition value>/date=<date>/`` in format 3, ``date=<date>/`` since
LEGACY_FLOW_RE = r"/sensor=([^/]*)/date=([^/]*)/[^/]*$"
FLOW_DATE_RE = r"/date=([^/]*)/[^/]*$"


CATALOG_ROW_SUFFIX = ".arrow"  # a catalog row: an Arrow IPC file (before 2026-12-05: Parquet, still read)
LEGACY_ROW_SUFFIX = ".parquet"


def catalog_file(rel_path: str) -> str:
    """Path (relative to the archive root) of a file's catalog row (an Arrow IPC file: one
    row, uncompressed -- written or read in ~0.15 ms where a one-row Parquet file took ~2.3-3 ms,
    a per-file cost of every completed capture file; docs/ARCHIVE.md)."""
    return f"{INDEX_DIR}/files/{file_id(rel_path)}{CATALOG_ROW_SUFFIX}"


def legacy_catalog_file(rel_path: str) -> str:
    """Where an index written before 2026-12-05 keeps a file's catalog row (Parquet)."""
    return f"{INDEX_DIR}/files/{file_id(rel_path)}{LEGACY_ROW_SUFFIX}"


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
