"""Building, writing, repairing and loading the index of an archive.

Commit order: the flow files of a capture file are written first, its catalog row last (each
atomically), so a catalog row always describes complete flow files; a crash in between
leaves orphan flow files that :func:`repair` removes. A catalog row whose capture file is
gone is removed with its flow files; one whose file changed (size or version) is *stale*.

Thread safety: functions, no shared state; concurrent indexing of the same file is not
supported (the last writer wins, consistently).
"""
from __future__ import annotations

import bisect
import operator
import time
from collections.abc import Callable, Iterable
from typing import Any

from pktstream.archive.bloom import filter_outdated
from pktstream.archive.index import (
    BINARY_COLUMNS,
    CATALOG_ROW_SUFFIX,
    INDEX_DIR,
    INDEX_MAX_FLOWS,
    LEGACY_ROW_SUFFIX,
    CaptureReadError,
    FileIndexBuilder,
    IndexNotBuilt,
    SpilledFlows,
    catalog_file,
    catalog_schema,
    file_id,
    flow_parquet_options,
    legacy_catalog_file,
)
from pktstream.archive.store import Entry, SubStore

CHUNK_BYTES = 256 << 10  # the read unit of offline indexing (decompressed stream bytes)
MIN_CHUNK_BYTES = 4096  # (the reader's smallest batch)


def index_entry(store, entry: Entry, *, chunk_bytes: int = CHUNK_BYTES,
                name: str | None = None, max_flows: int = INDEX_MAX_FLOWS) -> tuple[dict[str, Any], dict]:
    """Read one capture file and build its index (catalog row, flow tables: a value may be a
    :class:`~pktstream.archive.index.SpilledFlows`, closed by :func:`write_index` or by the
    caller); ``name`` (default: its path) is the name it is indexed under (sensor
    attribution, file id); ``max_flows``: the builder's memory bound."""
    from pktstream.exceptions import FileFormatError
    from pktstream.formats import open_reader
    _check_chunk_bytes(chunk_bytes)
    b = FileIndexBuilder(name or entry.path, max_flows=max_flows)
    status, error, fmt, comp = "ok", None, "unknown", None
    f = None
    truncations: list[str] = []  # (the reader's callback: no process-wide warnings state)
    try:
        from pktstream.archive.query import ZstdChecked
        with ZstdChecked(store.open(entry.path), entry.path) as f, \
                open_reader(f, batch_bytes=chunk_bytes, truncated=lambda msg, offset: truncations.append(msg)) as r:
            fmt, comp = r.format, f.compression or r.compression
            for batch in r:
                b.add(batch, *r.last_range)
            if r.format == "pcapng":
                b.sections = len(r.sections)
                for s in r.sections:
                    b.add_header_block(s.block_offset, s.block_length)
                for i in r.interfaces:
                    b.add_header_block(i.block_offset, i.block_length)
    except IndexNotBuilt:
        b.close()
        raise  # the index's own failure: no catalog row (the file stays unindexed, and is scanned)
    except (FileFormatError, EOFError, ValueError) as exc:  # (corrupt gzip/zstd: FileFormatError)
        status, error = "damaged", " ".join(str(exc).split())
    except OSError as exc:  # a read that failed, not the file's content: retried next time
        b.close()
        raise CaptureReadError(f"cannot read it: {' '.join(str(exc).split())}") from exc
    if status == "ok" and f is not None and f.truncated:
        status, error = "truncated", f"{entry.path}: truncated zstd data: the file ends inside its frame"
    if status == "ok" and truncations:
        status, error = "truncated", truncations[-1]
    try:
        return b.finish(size=entry.size, version=entry.version, format=fmt, compression=comp,
                        status=status, error=error)
    except BaseException:
        b.close()  # (spill files)
        raise


def _check_chunk_bytes(chunk_bytes: int) -> None:
    """An argument error, not damage of every file read with it."""
    try:
        n = operator.index(chunk_bytes)
    except TypeError:
        raise TypeError(f"chunk_bytes {chunk_bytes!r}: give an integer number of bytes") from None
    if n < MIN_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes {chunk_bytes!r}: give at least {MIN_CHUNK_BYTES} (bytes of decompressed stream)")


def parquet_file(data: bytes):
    """A ``pyarrow.parquet.ParquetFile`` over index bytes held in memory. Index files are small
    (a catalog row, one file's flow records): read them with ``use_threads=False`` -- pyarrow's
    thread pool costs more CPU than it saves there (a catalog row: 2.4 -> 1.0 ms of CPU)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pq.ParquetFile(pa.BufferReader(data))


def row_bytes(row_table) -> bytes:
    """A one-row catalog table as stored in ``_index/files/``: an Arrow IPC file, uncompressed
    (measured on a 16 MB file's row: written in 0.15 ms and read in 0.17 ms, 55 KB, where
    Parquet took 2.9 ms and 2.3 ms for 26 KB -- a fixed cost of every completed capture file;
    the snapshot, which queries and other tools read, stays Parquet)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, row_table.schema) as w:
        w.write_table(row_table)
    return sink.getvalue().to_pybytes()


def row_table(data: bytes):
    """The table of a catalog row file: Arrow IPC, or Parquet (an index written before
    2026-12-05). Raises on anything else -- also on an IPC file whose buffers are damaged (its
    offsets and lengths are checked against them: reading its values could otherwise run past
    them)."""
    import pyarrow as pa
    if data[:6] == b"ARROW1":
        import pyarrow.ipc as ipc
        t = ipc.open_file(pa.BufferReader(data)).read_all()
        t.validate(full=True)
        return t
    return parquet_file(data).read(use_threads=False)


def write_index(store, row: dict[str, Any], tables: dict) -> tuple[str, str, Any]:
    """Store a file's flow tables (``{(sensor, date): pyarrow.Table or spilled}``:
    :class:`SpilledFlows`, closed here) as one flow file per date with a ``sensor`` column
    (:func:`~pktstream.archive.index.flow_file`), then its catalog row (the commit); old flow
    files of the same capture file that are not rewritten are removed. Returns (catalog file,
    its version, the row as a one-row ``pyarrow.Table``): what :func:`write_snapshot` would
    read back from the catalog file."""
    old = read_row(store, row["path"])
    if old is not None:
        # the old row goes first: its flow files are rewritten in place below, and a row with
        # records of another chunk layout would prune wrongly (a query between the two, or a
        # write failing after them); without a row the file is scanned, then repaired
        _delete_row(store, row["path"])
    _write_flow_files(store, row["path"], tables)
    rel, version, row_table = _write_row(store, row)
    if old is not None:
        for f in set(old.get("flow_files") or ()) - set(row["flow_files"]):
            store.delete(f)
    return rel, version, row_table


def _write_row(store, row: dict[str, Any]) -> tuple[str, str, Any]:
    """Write a file's catalog row (every column of :func:`catalog_schema`); returns (catalog
    file, its version, the row as a one-row ``pyarrow.Table``)."""
    import pyarrow as pa
    rel = catalog_file(row["path"])
    row_table = pa.Table.from_pylist([row], catalog_schema())
    return rel, store.write_bytes(rel, row_bytes(row_table)), row_table


def _full_row(row: dict[str, Any]) -> dict[str, Any]:
    """A catalog row as loaded (heavy columns lazy) with every column of the schema decoded:
    what :func:`_write_row` writes again."""
    return {name: heavy(row, name) if name in HEAVY else row.get(name) for name in catalog_schema().names}


def _write_flow_files(store, rel_path: str, tables: dict) -> list[str]:
    """Write a file's flow tables (``{(sensor, date): table, spilled or row groups}``) as its
    flow files, one per date; returns their paths. Spilled tables are closed. On an error the
    files written so far are removed again (best effort) and it is raised."""
    from pktstream.archive.index import flow_file
    written: list[str] = []
    try:
        by_date: dict[str, list[tuple[str, Any]]] = {}
        for (sensor, date), table in sorted(tables.items(), key=lambda kv: kv[0]):
            by_date.setdefault(date, []).append((sensor, table))
        for date, parts in by_date.items():
            rel = flow_file(date, rel_path)
            store.write_bytes(rel, _flow_parquet(parts))
            written.append(rel)
    except BaseException:
        _delete_quietly(store, written)
        raise
    finally:
        for table in tables.values():
            if isinstance(table, SpilledFlows):
                table.close()
    return written


def _delete_quietly(store, rels: list[str]) -> None:
    for rel in rels:
        try:
            store.delete(rel)
        except Exception:  # noqa: BLE001 - the orphan sweep of the next full index removes it
            pass


class _RowGroups:
    """A format-3 flow file's records, read when they are copied, a row group at a time (memory:
    the file's compressed bytes and one spill of it decoded)."""

    def __init__(self, store: Any, rel: str) -> None:
        self._store, self._rel = store, rel

    def row_groups(self) -> Any:
        pf = parquet_file(self._store.read_bytes(self._rel))
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g, use_threads=False)


_STREAMED = (SpilledFlows, _RowGroups)  # flow tables copied a row group at a time


def _flow_parquet(parts: list[tuple[str, Any]]) -> bytes:
    """One date's flow records of a file as a Parquet file: each sensor's records (in sensor
    order) with a ``sensor`` column; in-memory tables as one row group, spilled ones (and a
    format-3 file's) a row group per spill, copied one at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pktstream.archive.index import repeated_strings, strings_by_run
    if not parts:
        raise ValueError("no flow records")
    if not any(isinstance(t, _STREAMED) for _, t in parts):
        if len(parts) == 1:
            table = parts[0][1].append_column("sensor", repeated_strings(parts[0][0], parts[0][1].num_rows))
        else:  # (one chunk per column: the Parquet writer pays per chunk, ~0.13 ms each)
            table = pa.concat_tables([t for _, t in parts]).combine_chunks()
            table = table.append_column("sensor", strings_by_run([s for s, _ in parts],
                                                                 [t.num_rows for _, t in parts]))
        return parquet_bytes(table, **flow_parquet_options())
    out = pa.BufferOutputStream()
    writer = None
    try:
        for sensor, t in parts:
            pieces = t.row_groups() if isinstance(t, _STREAMED) else [t]
            for piece in pieces:
                piece = piece.append_column("sensor", repeated_strings(sensor, piece.num_rows))
                if writer is None:
                    writer = pq.ParquetWriter(out, piece.schema, **flow_parquet_options())
                writer.write_table(piece, row_group_size=max(piece.num_rows, 1))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("no flow records")
    return out.getvalue().to_pybytes()


_RAW = BINARY_COLUMNS  # random bits: no dictionary or min/max statistics


def _catalog_parquet(table, use_dictionary: bool | list[str] = True, row_group_size: int | None = None) -> bytes:
    """``table`` as Parquet: zstd, dictionary encoding for ``use_dictionary``, min/max
    statistics on the scalar columns."""
    import pyarrow as pa
    other = [c for c in table.column_names if c not in _RAW]  # (a catalog table decodes ~2x faster so)
    dictionary = other if use_dictionary is True else use_dictionary
    # min/max statistics where a reader can prune with them: not on lists (addresses, chunks)
    stats = [c for c in other if not pa.types.is_list(table.schema.field(c).type)]
    return parquet_bytes(table, compression="zstd", use_dictionary=dictionary, write_statistics=stats,
                         row_group_size=row_group_size)


def parquet_bytes(table, **options) -> bytes:
    """``table`` as a Parquet file (``pyarrow.parquet.write_table`` options), in memory. Written
    to an Arrow buffer, not ``io.BytesIO``: pyarrow writes a Python file object with one Python
    call per piece (~54 for a flow records file), each taking the GIL back from the receiver's
    other threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = pa.BufferOutputStream()
    pq.write_table(table, out, **options)
    return out.getvalue().to_pybytes()


def read_row(store, rel_path: str) -> dict[str, Any] | None:
    """The catalog row of one capture file, or None."""
    for rel in (catalog_file(rel_path), legacy_catalog_file(rel_path)):
        try:
            data = store.read_bytes(rel)
        except Exception:
            continue
        try:
            rows = row_table(data).to_pylist()
        except Exception:
            return None
        return rows[0] if rows else None
    return None


def _delete_row(store, rel_path: str) -> None:
    """Delete a capture file's catalog row in either format (the old format's first: a stop in
    between never leaves the older row as the one read)."""
    store.delete(legacy_catalog_file(rel_path))
    store.delete(catalog_file(rel_path))


def remove_index(store, rel_path: str) -> None:
    """Remove a capture file's index (catalog row first, then its flow files)."""
    row = read_row(store, rel_path)
    _delete_row(store, rel_path)
    for rel in (row or {}).get("flow_files") or ():
        store.delete(rel)


def load_catalog(store, *, full: bool = False, light: bool = False,
                 entries: list[Entry] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every catalog row of the archive (of every index base below the root: paths relative
    to the root), and the catalog files that could not be read. ``light``: the heavy columns
    (:data:`HEAVY`) are not even decoded until :func:`heavy` asks for one (a query).
    ``entries``: the capture files ``store.captures()`` just listed (not listed again)."""
    from pktstream.archive.store import parts
    rows, bad = [], []
    for sub in parts(store, entries):
        r, b = _load_base(sub, light=light)
        if full:
            for row in r:
                for name in HEAVY:
                    heavy(row, name)
        for row in r:
            row["path"] = sub.full_path(row["path"])
            row["flow_files"] = [sub.full_path(f) for f in row["flow_files"] or ()]
        rows += r
        bad += [sub.full_path(x) for x in b]
    return rows, bad


SNAPSHOT = f"{INDEX_DIR}/catalog.parquet"
#: the snapshot's columns but the lists (:data:`HEAVY`) again, as one Arrow IPC record batch (a
#: query reads them in ~1 ms where the Parquet snapshot's 32-row groups cost ~1 ms per column);
#: only used as the Parquet snapshot's twin (see :func:`_light_snapshot`)
SNAPSHOT_LIGHT = f"{INDEX_DIR}/catalog-light.arrow"
SNAPSHOT_ID = b"pktstream.snapshot_id"
HEAVY = ("addresses", "ports", "header_blocks", "chunks")  # read per row when needed
_SNAP_COLUMNS = ("catalog_file", "catalog_version")


# dictionary encoding in the snapshot only for the texts rows repeat (on addresses, paths and
# chunk tables it cost 14 % of the write and no read time or bytes: measured on 300 rows)
SNAPSHOT_DICTIONARY = ("format", "compression", "status", "error", "sensors", "interfaces")
SNAPSHOT_ROW_GROUP = 32  # rows per row group of catalog.parquet: a heavy value decodes only its group


class _LazyColumns:
    """Columns of a catalog Parquet file (by row group) or table, decoded on first use, then kept."""

    def __init__(self, source, names: Iterable[str] | None = None) -> None:
        """``names``: a table's column names when known (``Table.column_names`` builds the
        list anew on each use, ~35 us for a catalog row)."""
        self.source = source  # a pyarrow.parquet.ParquetFile or a pyarrow Table
        self.cache: dict[tuple[str, int], Any] = {}
        self.table = not hasattr(source, "read_row_group")
        if self.table:
            self.names, self.starts = set(source.column_names if names is None else names), [0]
        else:
            self.names = set(source.schema_arrow.names)
            meta = source.metadata
            self.starts = [0]
            for g in range(meta.num_row_groups):
                self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)

    def scalar(self, name: str, i: int) -> Any:
        """Row ``i``'s value of column ``name`` as an Arrow scalar (None: no such column)."""
        if name not in self.names:
            return None  # a column an older catalog does not have
        src = self.source
        if self.table:
            return src.column(name)[i]
        g = bisect.bisect_right(self.starts, i) - 1
        col = self.cache.get((name, g))
        if col is None:
            col = self.cache[(name, g)] = src.read_row_group(g, columns=[name], use_threads=False).column(name)
        return col[i - self.starts[g]]


def _load_base(store, *, snapshot: bool = True, light: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of one index base. The per-file catalog files are the truth; ``catalog.parquet``
    is a snapshot of them (with each file's size and version) so a query reads one file
    instead of one per capture file; a row is taken from the snapshot only while its catalog
    file is unchanged. Heavy columns (address lists, chunk tables) stay in Arrow until asked
    for (:func:`heavy`); with ``light`` they are not decoded from the snapshot at all until
    then."""
    table, take, snap_lazy, fresh, bad = _load_table(store, snapshot=snapshot, light=light)
    if table is None:
        return [], bad
    names = [c for c in table.column_names if c not in HEAVY]
    cols = [table.column(c).to_pylist() for c in names]  # column-wise: faster than Table.to_pylist
    rows = [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]
    for i, r in enumerate(rows):
        r["_table"], r["_i"] = table, i
        if light:
            r["_lazy"] = (snap_lazy, take[i]) if i < len(take) else (fresh[i - len(take)], 0)
    return rows, bad


def _load_table(store, *, snapshot: bool = True, light: bool = False,
                known: dict[str, tuple[str, Any]] | None = None) -> tuple[Any, list[int], Any, list, list[str]]:
    """The catalog rows of one index base as one Arrow table (None: no rows) with
    ``catalog_file``/``catalog_version`` columns: the snapshot's rows whose catalog file is
    unchanged first (their snapshot row numbers: ``take``), then the others, read from their
    catalog files -- or taken from ``known`` ({catalog file: (version, one-row table)}, what
    :func:`write_index` returned) while the version matches. Also the lazy column readers of
    ``light`` (snapshot, per fresh row) and the catalog files that could not be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pktstream.archive.index import catalog_schema
    listing = store.list_stat(f"{INDEX_DIR}/files")
    snap: dict[str, tuple] = {}
    snap_table = snap_lazy = None
    if snapshot and listing:
        try:
            pf = pq.ParquetFile(store.arrow_file(SNAPSHOT))  # (in place: only what is decoded is read)
            if light:
                snap_table = _light_snapshot(store, pf)
                if snap_table is None:
                    have = set(pf.schema_arrow.names)
                    want = [c for c in [*catalog_schema().names, *_SNAP_COLUMNS] if c in have and c not in HEAVY]
                    snap_table = pf.read(columns=want, use_threads=False)
                snap_lazy = _LazyColumns(pf)
            else:
                snap_table = pf.read(use_threads=False)
            for i, (rel, ver) in enumerate(zip(snap_table.column("catalog_file").to_pylist(),
                                               snap_table.column("catalog_version").to_pylist())):
                snap[rel] = (ver, i)
        except Exception:
            snap_table, snap_lazy, snap = None, None, {}
    bad: list[str] = []
    tables, take = [], []
    fresh: list[_LazyColumns] = []
    twins = _twin_rows(listing)
    for rel, ver in listing:
        if not rel.endswith((CATALOG_ROW_SUFFIX, LEGACY_ROW_SUFFIX)) or rel in twins:
            continue
        hit = snap.get(rel)
        if hit is not None and hit[0] == ver:
            take.append(hit[1])
            continue
        mine = (known or {}).get(rel)
        try:
            if mine is not None and mine[0] == ver:
                t = mine[1]
                names = [*t.column_names, *_SNAP_COLUMNS]  # (once: each use of column_names builds it anew)
            else:
                t = row_table(store.read_bytes(rel))
                names = [*t.column_names, *_SNAP_COLUMNS]
                missing = [c for c in _REQUIRED if c not in names]
                if missing or t.column("path").null_count:  # (a file that is no catalog row)
                    raise ValueError(f"not a catalog row (no {', '.join(missing) or 'path'})")
            t = t.append_column("catalog_file", pa.array([rel] * t.num_rows, pa.string()))
            t = t.append_column("catalog_version", pa.array([ver] * t.num_rows, pa.string()))
            if light:
                fresh += [_LazyColumns(t.slice(i, 1), names) for i in range(t.num_rows)]
                t = t.select([c for c in names if c not in HEAVY])
            tables.append(t)
        except Exception:
            bad.append(rel)
    if snap_table is not None and take:
        tables[:0] = _rows(snap_table, take)
    if not tables:
        return None, take, snap_lazy, fresh, bad
    return pa.concat_tables(tables, promote_options="default"), take, snap_lazy, fresh, bad


def _light_snapshot(store, pf) -> Any:
    """The light snapshot's table (:data:`SNAPSHOT_LIGHT`), or None when there is none, it
    cannot be read, or it is not the Parquet snapshot's twin: another ``SNAPSHOT_ID`` (a crash
    or a reader between the two writes), or -- the id alone is not enough: an older pktstream
    rewriting the Parquet snapshot carries its schema metadata over -- other rows, told by the
    (catalog file, version) of every row, which decide a row's content, in the same order (the
    heavy columns are read from the Parquet snapshot by row number). Its buffers are validated
    before any value is used (damaged offsets would otherwise be read past)."""
    import pyarrow.ipc as ipc
    want = (pf.schema_arrow.metadata or {}).get(SNAPSHOT_ID)
    if want is None:
        return None
    try:
        reader = ipc.open_file(store.arrow_file(SNAPSHOT_LIGHT))
        if (reader.schema.metadata or {}).get(SNAPSHOT_ID) != want:
            return None
        t = reader.read_all()
        t.validate(full=True)
        keys = pf.read(columns=list(_SNAP_COLUMNS), use_threads=False)
        if t.num_rows != keys.num_rows or not all(t.column(c).equals(keys.column(c)) for c in _SNAP_COLUMNS):
            return None
    except Exception:  # noqa: BLE001 - none, or damaged: it is a cache, the Parquet snapshot is read
        return None
    return t


def _light_usable(store) -> bool:
    """Whether queries of this index base can read its light snapshot (``pktstream index``
    writes the snapshots again when not)."""
    import pyarrow.parquet as pq
    try:
        return _light_snapshot(store, pq.ParquetFile(store.arrow_file(SNAPSHOT))) is not None
    except Exception:  # noqa: BLE001 - no Parquet snapshot: written again too
        return False


def _twin_rows(listing: list[tuple[str, str]]) -> set[str]:
    """The catalog files of ``listing`` (``_index/files``) that are two rows of one capture
    file, one per format (``.arrow`` and ``.parquet``): left by a crash between writing one and
    deleting the other, or by an older pktstream (which reads only ``.parquet`` rows) that
    indexed the file again, maybe with other chunks. Which one describes its flow files cannot
    be told, so neither is used -- the file is scanned -- until :func:`repair` removes both and
    indexes it again."""
    names = {rel for rel, _ in listing}
    return {stem + suffix for stem in (n.removesuffix(CATALOG_ROW_SUFFIX) for n in names
                                       if n.endswith(CATALOG_ROW_SUFFIX))
            if stem + LEGACY_ROW_SUFFIX in names for suffix in (CATALOG_ROW_SUFFIX, LEGACY_ROW_SUFFIX)}


# columns every catalog row has (format 1; later ones may be missing: null = unknown)
_REQUIRED = ("path", "index_version", "size", "version", "format", "compression", "status", "first_ts_ns",
             "last_ts_ns", "packets", "flows", "sensors", "flow_files", "chunks", "header_blocks")


def _rows(table, take: list[int]) -> list:
    """Rows ``take`` of a table as slices of runs of consecutive rows (``Table.take`` would
    import pyarrow.compute, 0.1-0.2 s of a ``pktstream query``; the usual case is one run)."""
    out = []
    start = prev = take[0]
    for i in take[1:] + [-1]:
        if i != prev + 1:
            out.append(table.slice(start, prev - start + 1))
            start = i
        prev = i
    return out


def _scalar(row: dict[str, Any], name: str) -> Any:
    lazy = row.get("_lazy")
    if lazy is not None:
        return lazy[0].scalar(name, lazy[1])
    if name in row["_table"].column_names:
        return row["_table"].column(name)[row["_i"]]
    return None


def heavy(row: dict[str, Any], name: str) -> Any:
    """A heavy column of a catalog row (address/port lists, header blocks, chunk table; None
    for a column its catalog does not have)."""
    if name not in row:
        s = _scalar(row, name)
        row[name] = None if s is None else s.as_py()
    return row[name]


def heavy_array(row: dict[str, Any], name: str) -> Any:
    """A list column of a catalog row as a numpy array (the port list; None when null)."""
    if name in row:
        return row[name]
    s = _scalar(row, name)
    return None if s is None or not s.is_valid else s.values.to_numpy(zero_copy_only=False)


def write_snapshot(store, known: dict[str, tuple[str, Any]] | None = None) -> None:
    """Rewrite ``catalog.parquet`` from the per-file catalog files of one index base (those
    in ``known``, rows :func:`write_index` just wrote, are not read back; see
    :func:`_load_table`)."""
    import uuid
    table = _load_table(store, known=known)[0]
    if table is None:
        store.delete(SNAPSHOT_LIGHT)
        store.delete(SNAPSHOT)
        return
    table = table.replace_schema_metadata({SNAPSHOT_ID: uuid.uuid4().hex.encode()})
    dictionary = [c for c in SNAPSHOT_DICTIONARY if c in table.column_names]
    store.write_bytes(SNAPSHOT, _catalog_parquet(table, dictionary, row_group_size=SNAPSHOT_ROW_GROUP))
    # then its small columns (a reader between the two writes finds the ids differ)
    light = table.select([c for c in table.column_names if c not in HEAVY]).combine_chunks()  # (one batch)
    store.write_bytes(SNAPSHOT_LIGHT, row_bytes(light))


def _snapshot_outdated(store) -> bool:
    """Whether ``catalog.parquet`` predates the address filter or the small row groups (its
    footer is read, not its rows); it is then written again."""
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(store.arrow_file(SNAPSHOT)).metadata  # (the footer only)
    except Exception:
        return True
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return "address_filter" not in meta.schema.names or any(n > SNAPSHOT_ROW_GROUP for n in groups)


def is_current(row: dict[str, Any] | None, entry: Entry) -> bool:
    """Whether a catalog row describes the file as it is now, in this index format."""
    from pktstream.archive.index import FORMAT_VERSION
    return is_usable(row, entry) and row is not None and row.get("index_version") == FORMAT_VERSION


def is_usable(row: dict[str, Any] | None, entry: Entry) -> bool:
    """Whether a catalog row describes the file as it is now, in a format queries read as it
    is (:data:`~pktstream.archive.index.READABLE_VERSIONS`; ``pktstream index`` rewrites an
    older one of those)."""
    from pktstream.archive.index import READABLE_VERSIONS
    return (row is not None and row.get("size") == entry.size and row.get("version") == entry.version
            and row.get("index_version") in READABLE_VERSIONS)


def repair(store, paths: Iterable[str] | None = None, *, force: bool = False,
           chunk_bytes: int = CHUNK_BYTES, progress: Callable[[int, int, str], None] | None = None,
           upgrade: bool = True, forget: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Build missing or stale indexes and remove indexes of files that are gone (idempotent),
    in every index base of the archive (a file's index lives in the deepest directory above it
    holding an ``_index``, else at the root).

    :param paths: only these capture files (paths relative to the root); default: the whole
        archive (then orphan catalog rows and flow files are removed too).
    :param force: rebuild even current indexes.
    :param chunk_bytes: the unit a query reads (decompressed stream bytes; at least 4096).
    :param upgrade: give current rows of an older catalog their filters, and index again the
        files whose rows are of an older format queries still read (False: leave them, as a
        receiver's crash recovery does -- an upgrade reads every flow file or capture file,
        ``pktstream index``'s job).
    :param forget: with ``paths``: also remove the indexes of files that are gone whose path
        (relative to the root) it accepts (without ``paths`` every gone file's index is removed).
    :return: counts ``indexed``, ``current``, ``upgraded`` (a current row of an older catalog
        given its address filter / port bitmap from its flow records, without re-reading the
        capture file), ``removed``, ``damaged``, the list ``problems`` and ``seconds``.
    """
    _check_chunk_bytes(chunk_bytes)
    from pktstream.archive.store import base_of, parts
    subs = parts(store)
    total = sum(e.size for sub in subs for e in sub.captures())
    done = [0]
    out: dict[str, Any] = {"indexed": 0, "current": 0, "upgraded": 0, "removed": 0, "damaged": 0, "problems": []}
    t0 = time.monotonic()
    wanted = None if paths is None else set(paths)
    for sub in subs:
        cut = len(sub.base) + 1 if sub.base else 0
        sub_paths = None if wanted is None else [p[cut:] for p in wanted
                                                 if base_of(p, getattr(store, "bases", [""])) == sub.base]
        if sub_paths is not None and not sub_paths and forget is None:
            continue
        base_done = done[0]

        def prog(d: int, t: int, what: str, base_done: int = base_done, sub=sub) -> None:
            if progress:
                progress(base_done + d, total, sub.full_path(what) if what else "")
        sub_forget: Callable[[str], bool] | None = None
        if forget is not None:
            def sub_forget(rel: str, sub=sub, forget=forget) -> bool:
                return forget(sub.full_path(rel))
        res = _repair_base(sub, sub_paths, force=force, chunk_bytes=chunk_bytes, progress=prog, upgrade=upgrade,
                           forget=sub_forget)
        changed = res["indexed"] or res["upgraded"] or res["removed"] or res["problems"]
        top = dict(sub.list_stat(INDEX_DIR))
        if (changed or SNAPSHOT not in top or SNAPSHOT_LIGHT not in top
                or (upgrade and _snapshot_outdated(sub)) or not _light_usable(sub)):
            write_snapshot(sub)
        done[0] += sum(e.size for e in sub.captures())
        for k in ("indexed", "current", "upgraded", "removed", "damaged"):
            out[k] += res[k]
        out["problems"] += [sub.full_path(p) if sub.base else p for p in res["problems"]]
    if progress:
        progress(total, total, "")
    out["seconds"] = time.monotonic() - t0
    return out


def _add_filters(store, row: dict[str, Any]) -> bool:
    """Give a catalog row written before the address filter its filter and (when the port list
    is unknown) port bitmap, from its flow records; rewrite the row. False when a flow file
    cannot be read (then the file is indexed again)."""
    import numpy as np

    from pktstream.archive.bloom import UNKNOWN_FILTER, filter_of_texts, port_bitmap
    from pktstream.archive.index import summary_completeness
    texts: set[str] = set()
    ports: list[Any] = []
    complete = ports_complete = True
    try:
        for rel in row.get("flow_files") or ():
            t = parquet_file(store.read_bytes(rel)).read(
                columns=["src", "dst", "ip_version", "sport", "dport", "ethertype", "link_type"], use_threads=False)
            addressed = np.ones(t.num_rows, bool)
            for name in ("src", "dst"):
                values = t.column(name).to_pylist()
                texts.update(values)
                addressed &= np.array([v is not None for v in values], bool)
            ip = t.column("ip_version").to_numpy() > 0
            ports += [t.column("sport").to_numpy()[ip], t.column("dport").to_numpy()[ip]]
            addresses_ok, ports_ok = summary_completeness(t.column("ip_version").to_numpy(),
                                                          t.column("ethertype").to_numpy(),
                                                          t.column("link_type").to_numpy(), addressed)
            complete &= addresses_ok
            ports_complete &= ports_ok
    except Exception:
        return False
    full = _full_row(row)
    full["address_filter"] = filter_of_texts(texts) if complete else UNKNOWN_FILTER
    if not complete:
        full["addresses"] = None  # (ARP on a cooked link: addresses the records do not hold)
    if not ports_complete:  # (a link type the flow table does not decode: no addresses or ports)
        full["ports"] = full["port_bitmap"] = None
    if full["ports"] is None and ports_complete:
        full["port_bitmap"] = port_bitmap(np.concatenate(ports) if ports else np.zeros(0, np.int64))
    _write_row(store, full)
    store.delete(legacy_catalog_file(row["path"]))
    row["_upgraded"] = True
    return True


def _relayout(store, row: dict[str, Any]) -> bool:
    """Rewrite the flow files of a row of index format 3 (a file per sensor and date) in the
    current layout, from its flow records (the capture file is not read again), then the row
    (replaced in one write), then remove the old flow files. False when a flow file cannot be
    read or is not of format 3 (then the file is indexed again). An OSError (disk full, an S3
    error) is raised with nothing of the new layout left: the format-3 row and files stay as they
    were. Once the new row is written, what is left to remove is removed as far as it goes (the
    orphan sweep of a later full run takes the rest)."""
    import re

    from pktstream.archive.index import FORMAT_VERSION, LEGACY_FLOW_RE, flow_files, sensor_of_partition
    old_files = list(row.get("flow_files") or ())
    tables: dict[tuple[str, str], Any] = {}
    for rel in old_files:
        m = re.search(LEGACY_FLOW_RE, rel)
        if m is None:
            return False
        key = (sensor_of_partition(m.group(1), row.get("sensors") or []), m.group(2))
        if key in tables:
            return False  # (two values of one sensor: an id that collided; its records are doubtful)
        tables[key] = _RowGroups(store, rel)
    full = _full_row(row)
    full.update(index_version=FORMAT_VERSION, flow_files=flow_files(tables, row["path"]))
    try:
        written = _write_flow_files(store, row["path"], tables)
    except OSError:
        raise
    except Exception:
        return False  # (records not as format 3 wrote them)
    try:
        _write_row(store, full)
    except BaseException:
        _delete_quietly(store, written)
        raise
    # (a row of the Parquet row format goes, or both would be unused as twins until repaired)
    _delete_quietly(store, [legacy_catalog_file(row["path"]), *sorted(set(old_files) - set(written))])
    row.update(full)
    row["_upgraded"] = True
    return True


def _remove_orphan_flow_files(store: SubStore, candidates: set[str]) -> None:
    """Remove flow files no catalog row references: left by a crash between a file's flow files
    and its row, or by a row replaced or removed. A receiver indexing into the archive meanwhile
    writes a file's flow files first and its row last, so they are judged against the rows and
    the capture files as they are now: a flow file of a capture file that has no row yet is
    kept (a commit under way, or a file the next index run indexes, rewriting it)."""
    rows, _ = _load_base(store)
    referenced = {f for r in rows for f in r.get("flow_files") or ()}
    with_row = {r.get("file_id") for r in rows}
    pending = {file_id(e.path) for e in store.relisted().captures()} - with_row
    for rel in candidates - referenced:
        if rel.rsplit("/", 1)[-1].removesuffix(".parquet") not in pending:
            store.delete(rel)


def _repair_base(store, paths: Iterable[str] | None = None, *, force: bool = False,
                 chunk_bytes: int = CHUNK_BYTES,
                 progress: Callable[[int, int, str], None] | None = None, upgrade: bool = True,
                 forget: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Build missing or stale indexes and remove indexes of files that are gone (idempotent).

    :param paths: only these capture files (relative paths); default: the whole archive
        (then orphan catalog rows and flow files are removed too).
    :param force: rebuild even current indexes.
    :param chunk_bytes: the unit a query reads (decompressed stream bytes; at least 4096).
    :return: counts ``indexed``, ``current``, ``removed``, ``damaged`` and the list ``problems``.
    """
    entries = store.captures()
    if paths is not None:
        wanted = set(paths)
        entries = [e for e in entries if e.path in wanted]
    rows, bad = _load_base(store)
    by_path = {r["path"]: r for r in rows}
    flow_files = set(store.list_files(f"{INDEX_DIR}/flows"))  # (a row whose records are gone is not current)
    result: dict[str, Any] = {"indexed": 0, "current": 0, "upgraded": 0, "removed": 0, "damaged": 0, "problems": []}
    if paths is None:  # both rows of a file in two formats go (neither was used): it is indexed again below
        for rel in sorted(_twin_rows(store.list_stat(f"{INDEX_DIR}/files"))):
            if rel.endswith(CATALOG_ROW_SUFFIX):
                try:
                    name = row_table(store.read_bytes(rel)).column("path")[0].as_py()
                except Exception:
                    name = rel
                result["problems"].append(f"{name}: catalog rows in two formats (a crash, or an older pktstream), "
                                          "removed; the file is indexed again")
            store.delete(rel)
    for rel in bad:
        store.delete(rel)
        result["problems"].append(f"{rel}: unreadable catalog file, removed")
    total = sum(e.size for e in entries)
    done = 0
    keep: set[str] = set()
    t0 = time.monotonic()
    for e in entries:
        if progress:
            progress(done, total, e.path)
        # a row of an older format queries read: a receiver's recovery (upgrade=False) leaves
        # it, pktstream index rewrites its flow files (format 3) from its records
        row = by_path.get(e.path)
        usable = not force and row is not None and is_usable(row, e) \
            and flow_files.issuperset(row.get("flow_files") or ())
        if usable and upgrade and row is not None and not is_current(row, e):
            try:
                usable = _relayout(store, row)
            except OSError as exc:
                result["problems"].append(f"{e.path}: index not rewritten in the current layout ({exc}); "
                                          "its older index stays in use")
        if usable and row is not None:
            if upgrade and filter_outdated(row.get("address_filter")) and not _add_filters(store, row):
                try:
                    row, tables = index_entry(store, e, chunk_bytes=chunk_bytes)  # flow records unreadable
                except IndexNotBuilt as exc:
                    result["problems"].append(f"{e.path}: not indexed: {exc}")
                    keep.update(row.get("flow_files") or ())  # (the row stays: so do its flow files)
                    continue
                write_index(store, row, tables)
                result["indexed"] += 1
            elif row.get("_upgraded"):
                result["upgraded"] += 1
            else:
                result["current"] += 1
            keep.update(row.get("flow_files") or ())
        else:
            try:
                row, tables = index_entry(store, e, chunk_bytes=chunk_bytes)
            except IndexNotBuilt as exc:
                result["problems"].append(f"{e.path}: not indexed: {exc}")
                keep.update((by_path.get(e.path) or {}).get("flow_files") or ())  # (its row stays)
                done += e.size
                continue
            write_index(store, row, tables)
            keep.update(row["flow_files"])
            result["indexed"] += 1
            if row["status"] != "ok":
                result["damaged"] += 1
                result["problems"].append(f"{e.path}: {row['status']}: {row['error']}")
        done += e.size
    if paths is None or forget is not None:
        present = {e.path for e in (entries if paths is None else store.captures())}
        for r in rows:
            # (looked up again: a receiver indexing into the archive may have completed the file
            # since the listing above, and written its row before the rows were loaded)
            if r["path"] not in present and (forget is None or forget(r["path"])) and store.entry(r["path"]) is None:
                remove_index(store, r["path"])
                result["removed"] += 1
    if paths is None and not flow_files <= keep:
        _remove_orphan_flow_files(store, flow_files - keep)
    if paths is None:
        store.remove_empty_dirs(f"{INDEX_DIR}/flows", "sensor=*")  # (format 3's, emptied by rewrites)
        for rel in store.remove_stale_temporaries(INDEX_DIR):
            result["problems"].append(f"{rel}: an index file a stopped process left half-written, removed")
    if progress:
        progress(total, total, "")
    result["seconds"] = time.monotonic() - t0
    return result
