"""``pktstream.Archive``: the capture files of a directory or S3 prefix, with their index.

::

    a = pktstream.Archive("/srv/pcap")                    # or "s3://bucket/prefix"
    a.index()                                             # build missing/stale indexes
    a.flows("host 198.18.7.2", since="2024-11-27T12:00")  # pyarrow Table of flow records
    for batch in a.packets("tcp port 443 and host 198.18.7.2"):   # time-ordered PacketBatches
        ...
    a.write("case.pcapng", "host 198.18.7.2")             # like tcpdump -r over every file

Lifetime/threads: an Archive holds no open files between calls; the catalog is read at each
call (a receiver may be adding files). Not for concurrent use from several threads.
"""
from __future__ import annotations

import datetime as dt
import re
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from pktstream.archive.catalog import heavy, heavy_array, is_usable, load_catalog, parquet_file, repair
from pktstream.archive.index import FLOW_DATE_RE, INDEX_DIR, LEGACY_FLOW_RE, repeated_strings, sensor_of_partition
from pktstream.archive.query import FilePlan, QueryStats, SortedFile, iter_plan, merge_files, segments_for
from pktstream.archive.store import open_store

TimeArg = "int | float | str | dt.datetime | None"


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# a time of day with seconds (basic or extended format) and its fraction; the rest (a zone) apart
_ISO_FRACTION = re.compile(r"^(\d{4}-?\d{2}-?\d{2}[T ]\d{2}:?\d{2}:?\d{2})[.,](\d+)(\D.*)?$")
_NUMBER = re.compile(r"^(-?)(\d*)(?:\.(\d*))?$")
_TIME_FORMS = ("ISO 8601 such as 2024-11-27T12:00:00.000000500Z (UTC when no zone is given), seconds "
               "since the epoch with up to 9 decimals (1732708800.0000005), or ns since the epoch (18-19 digits)")


def parse_time(value: Any) -> int | None:
    """A time bound as ns since the epoch, exact: int ns, float seconds, datetime (also a
    pandas ``Timestamp``'s ns), ISO 8601 text (UTC when it has no zone; up to 9 fractional
    digits of a second), seconds as text (``1732708800.5``, up to 9 decimals) or ns as text
    (18-19 digits). 13-17 digits could be ms, µs or ns, and more than 9 fractional digits would
    be cut: both are refused (``ValueError`` naming the forms taken), never guessed."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(round(value * 1e9))
    if isinstance(value, dt.datetime):
        return _datetime_ns(value) + int(getattr(value, "nanosecond", 0) or 0)
    text = str(value).strip()
    try:
        m = _NUMBER.match(text)
        if m and (m[2] or m[3]):
            sign, whole, frac = -1 if m[1] else 1, m[2] or "0", m[3] or ""
            if 12 < len(whole) < 18 or (len(whole) > 12 and m[3] is not None):
                raise ValueError(f"{len(whole)} digits could be ms, µs or ns")
            if len(whole) >= 18:
                return sign * int(whole)  # ns
            if len(frac) > 9:
                raise ValueError("more than 9 decimals")
            return sign * (int(whole) * 10**9 + int(frac.ljust(9, "0")))
        frac_ns = 0
        m = _ISO_FRACTION.match(text)
        if m:  # the fraction is taken exactly (datetime keeps µs)
            if len(m[2]) > 9:
                raise ValueError("more than 9 fractional digits")
            frac_ns = int(m[2].ljust(9, "0"))
            text = m[1] + (m[3] or "")
        d = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        why = f" ({exc})" if "digits" in str(exc) or "decimals" in str(exc) else ""
        shown = repr(value) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} characters)"
        raise ValueError(f"not a time: {shown}{why}; give {_TIME_FORMS}") from None
    return _datetime_ns(d) + frac_ns


def _datetime_ns(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    d = value - _EPOCH  # (exact: a float timestamp is not, and int() of it is off before 1970)
    return (d.days * 86400 + d.seconds) * 10**9 + d.microseconds * 1000


class Archive:
    """Capture files plus their index under a directory or ``s3://bucket/prefix``.

    :param location: directory path or ``s3://BUCKET/PREFIX``.
    :param client: a boto3 S3 client to use (S3 only; default: boto3's chain, endpoint from
        ``endpoint_url`` or ``AWS_ENDPOINT_URL``).
    """

    def __init__(self, location: str, *, client=None, endpoint_url: str | None = None) -> None:
        import os
        location = os.fspath(location)
        kw = {}
        if location.startswith("s3://"):
            kw = {"client": client, "endpoint_url": endpoint_url}
        self.store = open_store(location, **kw)
        self.location = location
        self.last_stats: QueryStats | None = None

    def __repr__(self) -> str:
        return f"<Archive {self.store.url}>"

    # -- index -----------------------------------------------------------------------------
    def index(self, paths: list[str] | None = None, *, force: bool = False, chunk_bytes: int | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
        """Build missing/stale indexes, drop those of vanished files (see catalog.repair)."""
        from pktstream.archive.catalog import CHUNK_BYTES
        return repair(self.store, paths, force=force, chunk_bytes=chunk_bytes or CHUNK_BYTES, progress=progress)

    def catalog(self):
        """The catalog: one row per indexed capture file (a pyarrow Table)."""
        import pyarrow as pa

        from pktstream.archive.index import catalog_schema
        rows, _ = load_catalog(self.store, full=True)
        return pa.Table.from_pylist(rows, catalog_schema())

    # -- planning --------------------------------------------------------------------------
    def _candidates(self, tree, since, until, sensors, stats: QueryStats, warn):
        """(entry, catalog row or None, reason) for files that may hold matching packets."""
        from pktstream.archive.prune import CatalogContext, files_may_match
        entries = self.store.captures()
        rows, bad = load_catalog(self.store, light=True, entries=entries)
        for rel in bad:
            stats.problems.append(f"{rel}: unreadable catalog file (ignored)")
            warn(stats.problems[-1])
        by_path = {r["path"]: r for r in rows}
        stats.files_total = len(entries)
        out: list[tuple[Any, dict[str, Any] | None, str] | None] = []
        summed: list[tuple[int, Any, dict[str, Any]]] = []  # (place in out, entry, row): for the BPF test
        for e in entries:
            row = by_path.get(e.path)
            if row is None:
                out.append((e, None, "no index"))
                continue
            if not is_usable(row, e):
                out.append((e, None, "stale index"))
                continue
            if row["status"] != "ok":
                stats.problems.append(f"{e.path}: {row['status']} ({row['error']}); read up to the damage")
                warn(stats.problems[-1])
            if not row["packets"]:
                continue
            if since is not None and row["last_ts_ns"] < since:
                continue
            if until is not None and row["first_ts_ns"] >= until:
                continue
            if sensors is not None and not sensors & set(row["sensors"]):
                continue
            if tree is not None:
                summed.append((len(out), e, row))
                out.append(None)
                continue
            out.append((e, row, ""))
        if summed:
            # every file's summary at once (one Bloom probe of the query's hosts over all filters)
            ctx = CatalogContext([partial(_summary_context, row) for _, _, row in summed],
                                 [row.get("address_filter") for _, _, row in summed])
            keep = files_may_match(tree, ctx).tolist()
            for i, (place, e, row) in enumerate(summed):
                exc = ctx.errors.get(i)
                if exc is not None:  # its summary cannot be read (a damaged snapshot, an I/O
                    # error on it): the file is read whole instead
                    stats.problems.append(f"{e.path}: index unusable ({_short(exc)}): the file is scanned; "
                                          "`pktstream index --force` rebuilds it")
                    warn(stats.problems[-1])
                    out[place] = (e, None, "index unusable")
                elif keep[i]:
                    out[place] = (e, row, "")
        return [x for x in out if x is not None]

    def _flow_table(self, row: dict[str, Any], sensors, stats: QueryStats | None = None,
                    columns: list[str] | None = None):
        """The flow records of a catalog row's file (of the selected sensors; ``columns``: only
        these, plus ``sensor`` and the partition column ``date``), or None."""
        import pyarrow as pa
        parts = []
        for rel in row["flow_files"]:
            legacy = re.search(LEGACY_FLOW_RE, rel)  # (format 3: a file per sensor and date)
            if legacy is not None:
                sensor, date = legacy.groups()
                if sensors is not None and not any(_partition_matches(sensor, s) for s in sensors):
                    continue
            else:
                date = re.search(FLOW_DATE_RE, rel).group(1)  # type: ignore[union-attr]
            want = columns if columns is None or legacy is not None else [*columns, "sensor"]
            t = parquet_file(self.store.read_bytes(rel)).read(columns=want, use_threads=False)
            if stats is not None:
                stats.flow_files_read += 1
            if legacy is not None:
                t = t.append_column("sensor", repeated_strings(sensor_of_partition(sensor, row["sensors"]), t.num_rows))
            else:
                if "sensor" not in t.schema.names:
                    raise ValueError(f"{rel}: flow records without a sensor column")
                if sensors is not None:
                    t = t.filter(pa.array([x in sensors for x in t.column("sensor").to_pylist()], pa.bool_()))
            t = t.append_column("date", pa.array([date] * t.num_rows, pa.string()))
            parts.append(t)
        if not parts:
            return None
        return pa.concat_tables(parts)

    def plan(self, bpf: str | None = None, *, since=None, until=None, sensor=None,
             stats: QueryStats | None = None, warn: Callable[[str], None] | None = None) -> list[FilePlan]:
        """Which files and stream ranges a query reads (see :mod:`pktstream.archive.query`)."""

        from pktstream.archive.prune import FlowContext, may_match, parse
        stats = stats or QueryStats()
        warn = warn or (lambda m: None)
        since, until = parse_time(since), parse_time(until)
        sensors = _sensor_set(sensor)
        tree = parse(bpf)
        plans = []
        for e, row, reason in self._candidates(tree, since, until, sensors, stats, warn):
            if row is None:
                plans.append(FilePlan(e.path, "scan", None, _compression_of(e.path), reason, e.size))
                continue
            try:
                t = self._flow_table(row, sensors, stats, [*_FLOW_KEY_COLUMNS, "chunks"])
                if t is None:
                    continue
                cols = _flow_columns(t)
                keep = may_match(tree, FlowContext(cols))
                if since is not None:
                    keep &= cols["last_ts_ns"] >= since
                if until is not None:
                    keep &= cols["first_ts_ns"] < until
                if not keep.any():
                    continue
                candidates = sorted(set(_chunks_of(t.column("chunks"), keep).tolist()))  # np.unique imports numpy.ma
                chunks = heavy(row, "chunks")
                heavy(row, "header_blocks")
                if candidates and not 0 <= candidates[0] <= candidates[-1] < len(chunks):
                    raise ValueError(f"chunk {candidates[-1]} of a {len(chunks)}-chunk table")
            except Exception as exc:  # noqa: BLE001 - a damaged index: the file is read whole instead
                stats.problems.append(f"{e.path}: index unusable ({_short(exc)}): the file is scanned; "
                                      "`pktstream index --force` rebuilds it")
                warn(stats.problems[-1])
                plans.append(FilePlan(e.path, "scan", None, _compression_of(e.path), "index unusable", e.size))
                continue
            ids = [int(c) for c in candidates if (since is None or chunks[c]["last_ts_ns"] >= since)
                   and (until is None or chunks[c]["first_ts_ns"] < until)]
            if not ids:
                continue
            segs = segments_for(row, ids)
            read = ids if segs is not None else range(len(chunks))  # None: the whole file is read
            plans.append(FilePlan(e.path, "index", segs, row["compression"], "", e.size,
                                  [int(chunks[c]["packets"]) for c in read],
                                  [int(chunks[c]["first_ts_ns"]) for c in read]))
        return plans

    # -- queries ---------------------------------------------------------------------------
    def _run(self, bpf, since, until, sensor, warn) -> tuple[Iterator, QueryStats]:
        """The merged packets (a generator: files are read as it is consumed) and the stats it
        fills in; ``packets`` and ``seconds`` are final when the generator is exhausted."""
        if bpf:
            from pktstream.archive.query import check_filter
            check_filter(bpf)  # a bad expression fails here, with libpcap's message
        t0 = time.monotonic()
        stats = QueryStats()
        warn = warn or (lambda m: print(f"pktstream: warning: {m}", file=sys.stderr))
        plans = self.plan(bpf, since=since, until=until, sensor=sensor, stats=stats, warn=warn)
        s, u = parse_time(since), parse_time(until)
        sensors = _sensor_set(sensor)
        self.last_stats = stats

        def opener(p: FilePlan) -> Callable[[], SortedFile]:
            def open_file() -> SortedFile:
                stats.files_read += 1
                if p.mode == "scan":
                    stats.files_scanned += 1
                    stats.scanned.append(f"{p.path} ({p.reason})")
                src = iter_plan(self.store, p, bpf=bpf, since=s, until=u, sensors=sensors, stats=stats, warn=warn)
                return SortedFile(src, p.chunk_packets, p.chunk_first_ts, stats)
            return open_file

        def run() -> Iterator:
            for b in merge_files([(p.first_ts_ns, opener(p)) for p in plans], stats):
                stats.packets += len(b)
                yield b
            stats.seconds = time.monotonic() - t0
        return run(), stats

    def packets(self, bpf: str | None = None, *, since=None, until=None, sensor=None,
                warn: Callable[[str], None] | None = None) -> Iterator:
        """The packets ``tcpdump -r FILE BPF`` gives over every file, within ``[since, until)``
        and of the given sensor(s), merged in time order, as PacketBatches whose ``interface``
        is ``sensor/interface``. Lazy: files are read as the iterator is consumed and a packet
        is held only until it can be merged (memory: the files overlapping in time, about a
        read buffer each; a file without an index is held whole). ``last_stats`` tells what was read
        (complete once the iterator is exhausted)."""
        it, _ = self._run(bpf, since, until, sensor, warn)
        yield from it

    def write(self, out, bpf: str | None = None, *, since=None, until=None, sensor=None,
              warn: Callable[[str], None] | None = None, format: str | None = None) -> QueryStats:
        """Write the packets of :meth:`packets` to ``out`` (path or binary file object): pcapng
        with one interface per sensor interface, zstd-compressed when ``format`` is
        ``"pcapng.zst"`` (default: when the path ends ``.pcapng.zst`` or ``.pcap.zst``)."""
        import os

        from pktstream.formats import open_writer
        from pktstream.formats.writer import format_from_name
        fmt = format or "pcapng"
        if fmt not in ("pcapng", "pcapng.zst"):
            raise ValueError(f"query output format {fmt!r}: pcapng or pcapng.zst")
        if format is None and isinstance(out, (str, os.PathLike)) \
                and (format_from_name(os.fspath(out)) or "").endswith(".zst"):
            fmt = "pcapng.zst"
        it, stats = self._run(bpf, since, until, sensor, warn)
        w = open_writer(out, format=fmt)
        try:
            for b in it:
                w.write(b)
        except BaseException:
            w.abort()
            raise
        w.close()
        return stats

    def flows(self, bpf: str | None = None, *, since=None, until=None, sensor=None, pandas: bool = False,
              warn: Callable[[str], None] | None = None):
        """Flow records (pyarrow Table, or pandas with ``pandas=True``) of the indexed files:
        those whose key matches ``bpf`` (the subset of BPF in :mod:`pktstream.archive.prune`;
        VLAN-tagged flows are matched on their addresses and ports), overlapping
        ``[since, until)``, of the given sensor(s); ordered by first packet. Files without a
        current index are not listed; problems (unreadable records) go to ``warn`` (default:
        stderr) and ``last_stats.problems``."""
        import pyarrow as pa

        from pktstream.archive.prune import FlowContext, evaluate, parse
        s, u = parse_time(since), parse_time(until)
        sensors = _sensor_set(sensor)
        tree = parse(bpf)
        if bpf and bpf.strip() and tree is None:
            raise ValueError(f"flow filter {bpf!r}: only host, net, port, portrange, ip, ip6, tcp, udp, "
                             "sctp, icmp, icmp6 with and/or/not are understood (docs/ARCHIVE.md)")
        stats = QueryStats()
        self.last_stats = stats
        warn = warn or (lambda m: print(f"pktstream: warning: {m}", file=sys.stderr))
        parts = []
        unindexed = []
        for entry, row, reason in self._candidates(tree, s, u, sensors, stats, warn):
            if row is None:
                unindexed.append(f"{entry.path} ({reason})")
                continue
            try:
                t = self._flow_table(row, sensors)
            except Exception as exc:  # noqa: BLE001 - the other files' records are still listed
                stats.problems.append(f"{entry.path}: flow records unreadable ({_short(exc)}): not listed; "
                                      "`pktstream index --force` rebuilds them")
                warn(stats.problems[-1])
                continue
            if t is None:
                continue
            if "file" in t.column_names and t.num_rows and t.column("file")[0].as_py() != row["path"]:
                # (records name their file relative to their index base, a directory below the
                # root: here it is named as the catalog and queries name it, from the root)
                t = t.set_column(t.column_names.index("file"), "file",
                                 pa.array([row["path"]] * t.num_rows, pa.string()))
            cols = _flow_columns(t)
            keep = None
            if tree is not None:
                mt, mf = evaluate(tree, FlowContext(cols, strict=False))
                keep = mt & ~mf
            if s is not None:
                k2 = cols["last_ts_ns"] >= s
                keep = k2 if keep is None else keep & k2
            if u is not None:
                k2 = cols["first_ts_ns"] < u
                keep = k2 if keep is None else keep & k2
            if keep is not None:
                t = t.filter(pa.array(keep))
            if sensors is not None:
                t = t.filter(pa.array([x in sensors for x in t.column("sensor").to_pylist()], pa.bool_()))
            parts.append(t)
        if unindexed:
            stats.problems.append(f"{len(unindexed)} file(s) without a current index are not listed "
                                  f"(`pktstream index` builds it): {', '.join(unindexed[:3])}"
                                  + (", ..." if len(unindexed) > 3 else ""))
            warn(stats.problems[-1])
        if not parts:
            table = _empty_flows()
        else:
            table = pa.concat_tables(parts).sort_by([("first_ts_ns", "ascending")])
        return table.to_pandas() if pandas else table

    def sql(self, query: str):
        """Run SQL over the index with DuckDB: views ``flows`` (with ``sensor``, ``date``) and
        ``files`` (the catalog). Returns a pyarrow Table."""
        try:
            import duckdb
        except ImportError:
            raise ImportError("pktstream sql needs DuckDB: pip install 'pktstream[sql]'") from None
        con = duckdb.connect()
        try:
            files_tbl = self.catalog()
            if hasattr(self.store, "root"):
                # only flow files a catalog row names: not those of a commit under way or left
                # by a crash before one (their records would be counted twice)
                named = {f for fs in files_tbl.column("flow_files").to_pylist() for f in fs or ()}
                selects = []
                for k, (base, files) in enumerate(_flow_files_by_base(self.store, named)):
                    # every flow file by name (no glob: a directory may be called "rack[1]"),
                    # the date from its own partition directory (DuckDB's Hive partitioning
                    # reads every key=value directory of the whole path: a receiver writing
                    # into ARCHIVE/date=x/ would change every date)
                    con.read_parquet(files, filename=True, hive_partitioning=False,
                                     union_by_name=True).create_view(f"_flows{k}")
                    # a base below the root: its records name files from the base, flows() and
                    # the catalog from the root
                    file = f"'{_sql_str(base)}/' || file" if base else "file"
                    # the sensor column; format 3's files (a file per sensor) have it in the path
                    legacy = f"regexp_extract(filename, '{LEGACY_FLOW_RE}', 1)"
                    if any(re.search(LEGACY_FLOW_RE, f) is None for f in files):
                        sensor = f"COALESCE(sensor, {legacy})"
                        exclude = "filename, sensor"
                    else:
                        sensor, exclude = legacy, "filename"
                    selects.append(f"SELECT * EXCLUDE ({exclude}) REPLACE ({file} AS file), {sensor} AS sensor, "
                                   f"regexp_extract(filename, '{FLOW_DATE_RE}', 1) AS date FROM _flows{k}")
                if selects:
                    con.execute("CREATE VIEW flows AS " + " UNION ALL BY NAME ".join(selects))
                else:
                    flows_tbl = _empty_flows()
                    con.register("flows", flows_tbl)
            else:
                flows_tbl = self.flows()
                con.register("flows", flows_tbl)
            con.register("files", files_tbl)
            rel = con.sql(query)
            if rel is None:  # a statement without a result
                import pyarrow as pa
                return pa.table({})
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        finally:
            con.close()


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


_FLOW_DIR = re.compile(r"(?:sensor=[^/]*/)?date=[^/]*")  # a flow file's directory below flows/ (format 3: sensor=S/)


def _flow_files_by_base(store, named: set[str]) -> list[tuple[str, list[str]]]:
    """(index base, its flow files' full paths) of a local archive: the files of ``named``
    (paths relative to the root, as catalog rows name them) that are there, bases with none
    left out."""
    import os
    store.captures()  # (finds the index bases: the root's and any below it)
    out = []
    for base in getattr(store, "bases", [""]):
        prefix = f"{base}/{INDEX_DIR}/flows/" if base else f"{INDEX_DIR}/flows/"
        files = sorted(path for f in named if f.startswith(prefix)
                       and _FLOW_DIR.fullmatch(f[len(prefix):].rpartition("/")[0])
                       and os.path.isfile(path := os.path.join(store.root, *f.split("/"))))
        if files:
            out.append((base, files))
    return out


def _empty_flows():
    import pyarrow as pa
    return pa.table({"file": pa.array([], pa.string()), "sensor": pa.array([], pa.string()),
                     "interface": pa.array([], pa.string()), "src": pa.array([], pa.string()),
                     "dst": pa.array([], pa.string()), "sport": pa.array([], pa.uint16()),
                     "dport": pa.array([], pa.uint16()), "proto": pa.array([], pa.uint8()),
                     "first_ts_ns": pa.array([], pa.int64()), "last_ts_ns": pa.array([], pa.int64()),
                     "packets": pa.array([], pa.int64()), "bytes": pa.array([], pa.int64())})


def _sensor_set(sensor) -> set[str] | None:
    if sensor is None:
        return None
    if isinstance(sensor, str):
        return {sensor}
    return set(sensor)


def _partition_matches(value: str, sensor: str) -> bool:
    from pktstream.archive.index import partition_values
    return value in partition_values(sensor)


def _compression_of(path: str) -> str | None:
    """Compression of a file without an index, from its first bytes' usual name (the reader
    checks the magic anyway)."""
    if path.endswith(".zst"):
        return "zstd"
    if path.endswith(".gz"):
        return "gzip"
    return None


_FLOW_KEY_COLUMNS = ("ip_version", "proto", "sport", "dport", "vlan", "first_ts_ns", "last_ts_ns", "link_type",
                     "ethertype", "src", "dst")


def _flow_columns(t) -> dict:
    """The flow-key columns of a flow table as numpy arrays (what prune.FlowContext reads)."""
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in _FLOW_KEY_COLUMNS}


def _chunks_of(column, keep):
    """The chunk numbers of the rows ``keep`` (bool array) of a list<int32> column, with numpy
    (an Arrow ``filter`` would import pyarrow.compute: 0.1-0.2 s of ``pktstream query``)."""
    import numpy as np
    out = []
    row0 = 0
    for arr in column.chunks:
        n = len(arr)
        offs = arr.offsets.to_numpy()
        vals = arr.values.to_numpy()[offs[0]:offs[-1]]
        rows = np.repeat(np.arange(n), np.diff(offs))
        out.append(vals[keep[row0:row0 + n][rows]])
        row0 += n
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def _short(exc: BaseException) -> str:
    """An exception as one short line (for a problem message)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _summary_context(row: dict[str, Any], probes: dict[Any, Any]) -> Any:
    """A catalog row's :class:`~pktstream.archive.prune.SummaryContext` (address and port
    lists decoded only when a leaf needs them)."""
    from pktstream.archive.prune import SummaryContext
    return SummaryContext(partial(heavy, row, "addresses"), partial(heavy_array, row, "ports"),
                          address_filter=row.get("address_filter"), port_bitmap=row.get("port_bitmap"),
                          probes=probes)
