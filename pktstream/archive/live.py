"""Index as you write: a :class:`~pktstream.formats.writer.WriteObserver` that builds each
capture file's index from the batches being written (no re-read) and commits it when the file
is completed; deleting a file (``max_files``) deletes its index.

The index is committed right after the rename of the completed file (flow files, then the
catalog row). A crash between the two leaves a file without an index; the receiver's
recovery (``FileSink.recover`` with an index root in its state) runs :func:`repair` on the
archive, which indexes such files from disk and drops indexes of vanished files.
An indexing failure is logged and never fails the capture: the file is then scanned by
queries and indexed by ``pktstream index``.

Thread safety: used from the one thread that writes the files (a sink's output thread).
"""
from __future__ import annotations

import base64
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from pktstream._capture import PacketBatch
from pktstream.archive.catalog import CHUNK_BYTES, read_row, remove_index, repair, write_index, write_snapshot
from pktstream.archive.index import (
    BINARY_COLUMNS,
    INDEX_DIR,
    INDEX_MAX_FLOWS,
    CaptureReadError,
    FileIndexBuilder,
    IndexSpillError,
    SpilledFlows,
)
from pktstream.archive.store import LocalStore

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger("pktstream.receiver")

# changes (files completed or removed) after which the catalog snapshot is refreshed: a query
# reads the rows it lacks from their own files (Arrow IPC, ~0.6 ms each), so a query pays at most
# ~20 ms for them, while the receiver rewrites the snapshot (O(archive)) half as often as at 16
SNAPSHOT_EVERY = 32
SNAPSHOT_MAX_AGE_S = 30.0  # ... or seconds after a change
SNAPSHOT_TIME_SHARE = 0.02  # ... but snapshots take at most this share of the writer thread's time
SNAPSHOT_AT_CLOSE_MAX_S = 2.0  # at close only when the last one took at most this (shutdown stays quick)
SNAPSHOT_KNOWN_ROWS = 64  # catalog rows written since the last snapshot kept for the next one (not read back)
RETRY_FIRST_S = 1.0  # an index write or removal that failed (disk full, I/O error) is tried again after this,
RETRY_MAX_S = 60.0   # then after twice as long each time, up to this,
RETRY_ATTEMPTS = 20  # and at most this many times (~15 minutes): then pktstream index repairs it
RETRY_AT_CLOSE_MAX_S = 5.0  # at close every one is tried once more; none is started after this long

_PASSING = (OSError, CaptureReadError, IndexSpillError)  # index failures that may pass (retried)
_LATER = {True: "(the file will be indexed from disk once completed)",  # what happens next, by _PASSING
          False: "(the file gets no index now: pktstream index builds it)"}


class LiveIndexer:
    """Indexes the files of one archive root as they are written.

    :param root: the archive root (the directory queries are given); files outside it are
        not indexed (logged once).
    :param chunk_bytes: consecutive batches are merged into chunks (the unit a query reads)
        up to this many stream bytes.
    :param max_flows: flows held in memory per open file before they are spilled
        (:class:`~pktstream.archive.index.FileIndexBuilder`; 0: no bound).
    """

    SPILL_SUBDIR = INDEX_DIR  # where spill files go, below the root

    def __init__(self, root: str, *, chunk_bytes: int = CHUNK_BYTES, max_flows: int = INDEX_MAX_FLOWS) -> None:
        self.root = os.path.abspath(root)
        self.store = LocalStore(self.root)
        self.chunk_bytes = chunk_bytes
        self.max_flows = max_flows
        self._open: dict[str, tuple[FileIndexBuilder, str]] = {}
        # per open pcapng file: its interfaces as the writer numbers them ((name, link type, snap
        # length) -> IDB index): a reader names an IDB without a name by its index ("if1")
        self._idbs: dict[str, dict[tuple[Any, int, int], int]] = {}
        self.indexed = 0
        self.failures = 0
        self.spills = 0  # flow tables written out early (files with more than max_flows flows)
        self.peak_flows_held = 0  # most flows one open file's table held at once
        self.peak_table_bytes = 0  # most memory one open file's flow table held
        self.recover_root = True  # the receiver's recovery repairs this root's index
        self._changes = 0
        self._snapshot_at = time.monotonic()
        self._snapshot_s = 0.0  # how long the last snapshot took (it grows with the archive)
        self.snapshots = 0
        # {catalog file: (version, row table)} written since the last snapshot (at most
        # SNAPSHOT_KNOWN_ROWS): the next snapshot takes them from memory instead of the disk
        self._known: dict[str, tuple[str, Any]] = {}
        # {capture file: [what ("index" | "remove"), next try (monotonic s), delay s, tries left]}: index
        # writes and removals that failed for a reason that may pass (disk full, I/O errors),
        # tried again while the writer is idle -- until then the file is scanned by queries
        # (no index), or its index names a file that is gone
        self._retry: dict[str, list[Any]] = {}
        self._unindexed: set[str] = set()  # open files whose index was given up while written

    def _changed(self) -> None:
        self._changes += 1
        self._snapshot_if_due()

    def _snapshot_if_due(self, *, final: bool = False) -> None:
        """Refresh the catalog snapshot after SNAPSHOT_EVERY changes or SNAPSHOT_MAX_AGE_S s
        with changes, but never more often than every ``last duration / SNAPSHOT_TIME_SHARE``
        seconds: a snapshot is rewritten whole (O(files in the archive), reads and writes), so
        a fixed cadence would hold the writer's thread longer per completed file the larger the
        archive grows. It is only a cache (queries read the rows it lacks from their own
        catalog files); ``final``: now, when anything changed and the last one took at most
        SNAPSHOT_AT_CLOSE_MAX_S (:meth:`close`)."""
        if not self._changes:
            return
        elapsed = time.monotonic() - self._snapshot_at
        if final:
            if self._snapshot_s > SNAPSHOT_AT_CLOSE_MAX_S:
                return
        elif (elapsed < self._snapshot_s / SNAPSHOT_TIME_SHARE
              or (self._changes < SNAPSHOT_EVERY and elapsed <= SNAPSHOT_MAX_AGE_S)):
            return
        t0 = time.monotonic()
        try:
            write_snapshot(self.store, self._known)
            self.snapshots += 1
        except Exception as exc:
            log.warning("index: catalog snapshot of %s: %s", self.root, exc)
        self._known = {}
        self._snapshot_at = time.monotonic()
        self._snapshot_s = self._snapshot_at - t0
        self._changes = 0

    def idle(self) -> None:
        """The writer's thread has nothing to write: failed index writes and removals whose
        time has come are tried again; a snapshot held back is written when due."""
        if self._retry:
            self._retry_due()
        self._snapshot_if_due()

    @property
    def pending_retries(self) -> int:
        """Index writes and removals that failed and wait to be tried again."""
        return len(self._retry)

    def _schedule(self, path: str, what: str, exc: Exception | None, delay_s: float | None = None) -> None:
        """Try ``what`` for ``path`` again after ``delay_s`` (default RETRY_FIRST_S) when ``exc``
        may pass (None, or an OS error: disk full, I/O); not for an error that would come
        again (the file is then scanned by queries and named by ``pktstream index``)."""
        if exc is None or isinstance(exc, _PASSING):
            first = RETRY_FIRST_S if delay_s is None else delay_s
            self._retry[path] = [what, time.monotonic() + first, RETRY_FIRST_S, RETRY_ATTEMPTS]

    def _index_from_disk(self, path: str, rel: str) -> None:
        """Index ``path`` from the file (its batches are gone); raises when it has no row after."""
        repair(self.store, [rel], upgrade=False)  # (an older index's rewrite is pktstream index's job)
        if os.path.exists(path) and read_row(self.store, rel) is None:
            raise OSError(f"{path}: not indexed")

    def _retry_due(self, last: bool = False) -> None:
        """The retries whose time has come (``last``: every one, a last time, none started
        after ``RETRY_AT_CLOSE_MAX_S``: the output closes; those left are named)."""
        now = time.monotonic()
        for path, entry in list(self._retry.items()):
            what, due, delay, left = entry
            if due > now and not last:
                continue
            if last and time.monotonic() - now > RETRY_AT_CLOSE_MAX_S:
                del self._retry[path]
                log.warning("index: %s of %s not tried again before the output closed (pktstream index repairs it)",
                            what, path)
                continue
            rel = self._rel(path)
            try:
                if rel is None:
                    pass
                elif what == "remove" or not os.path.exists(path):
                    remove_index(self.store, rel)
                else:
                    self._index_from_disk(path, rel)
            except Exception as exc:
                if left <= 1 or last:
                    del self._retry[path]
                    log.warning("index: %s of %s given up %s: %s (pktstream index repairs it)", what, path,
                                "as the output closed" if last else f"after {RETRY_ATTEMPTS} tries", exc)
                    continue
                entry[1:] = [now + min(2 * delay, RETRY_MAX_S), min(2 * delay, RETRY_MAX_S), left - 1]
                log.debug("index: %s of %s failed again: %s", what, path, exc)
                continue
            del self._retry[path]
            log.warning("index: %s of %s done after an earlier failure", "removal" if what == "remove" else "index",
                        path)
            self._changed()

    def close(self) -> None:
        """The outputs are closed: index writes and removals still waiting to be tried again
        are tried a last time (whatever their time; those failing again are named), and the
        snapshot is brought up to date (when anything changed, and it is quick: see
        :meth:`_snapshot_if_due`)."""
        if self._retry:
            self._retry_due(last=True)
        self._snapshot_if_due(final=True)

    def _spill_dir(self) -> str:
        """Spill files go under the root (its index directory): on the archive's disk, not in
        a /tmp that may be small or in memory (tmpfs), where the bound would not hold."""
        d = os.path.join(self.root, self.SPILL_SUBDIR)
        os.makedirs(d, exist_ok=True)
        return d

    def _rel(self, path: str) -> str | None:
        rel = os.path.relpath(os.path.abspath(path), self.root)
        if rel.startswith(".."):
            return None
        return rel.replace(os.sep, "/")

    def opened(self, path: str, format: str, header_block: tuple[int, int] | None) -> None:
        rel = self._rel(path)
        if rel is None:
            log.warning("index: %s is outside the archive root %s: not indexed", path, self.root)
            return
        self._retry.pop(path, None)  # (a new file of that name: a retry for the old one would remove its index)
        self._unindexed.discard(path)
        try:
            b = FileIndexBuilder(rel, max_chunk=self.chunk_bytes, max_flows=self.max_flows,
                                 spill_dir=self._spill_dir())
            if header_block is not None:
                b.add_header_block(*header_block)
        except Exception as exc:  # never fail the capture
            log.warning("index: %s: %s %s", path, exc, _LATER[isinstance(exc, _PASSING)])
            self.failures += 1
            if isinstance(exc, _PASSING):
                self._unindexed.add(path)  # (indexed from disk once completed)
            return
        self._open[path] = (b, format)

    def wrote(self, path: str, batch: PacketBatch, start: int, end: int,
              idb_positions: list[tuple[int, int]], offsets: npt.NDArray[np.int64] | None = None) -> None:
        entry = self._open.get(path)
        if entry is None:
            return
        try:
            for off, n in idb_positions:
                entry[0].add_header_block(off, n)
            # attribution as a reader of the file will see it: pcapng keeps interface names,
            # a pcap file has none (its sensor is its file name)
            b = entry[0]
            spills = b.spills
            interface: str | None = ""  # (a pcap file has none: its sensor is its file name)
            if entry[1].startswith("pcapng"):
                idbs = self._idbs.setdefault(path, {})
                k = idbs.setdefault((batch.interface, batch.link_type, batch.snaplen), len(idbs))
                interface = None if batch.interface else f"if{k}"  # (an unnamed IDB as a reader names it)
            b.add(batch, start, end, interface=interface, offsets=offsets)
            self.spills += b.spills - spills
            if b.peak_flows_held > self.peak_flows_held:
                self.peak_flows_held = b.peak_flows_held
            if b.peak_table_bytes > self.peak_table_bytes:
                self.peak_table_bytes = b.peak_table_bytes
        except Exception as exc:  # never fail the capture
            log.warning("index: %s: %s %s", path, exc, _LATER[isinstance(exc, _PASSING)])
            self._open.pop(path, None)
            self._idbs.pop(path, None)
            entry[0].close()
            self.failures += 1
            if isinstance(exc, _PASSING):
                self._unindexed.add(path)  # (indexed from disk once completed)

    def completed(self, path: str) -> None:
        self._idbs.pop(path, None)
        entry = self._open.pop(path, None)
        if entry is None:
            if path in self._unindexed:
                self._unindexed.discard(path)
                self._schedule(path, "index", None, delay_s=0.0)
            return
        b, fmt = entry
        try:
            st = os.stat(path)
            row, tables = b.finish(size=st.st_size, version=str(st.st_mtime_ns), format=fmt.split(".")[0],
                                   compression="zstd" if fmt.endswith(".zst") else None)
            rel, version, row_table = write_index(self.store, row, tables)
            if len(self._known) < SNAPSHOT_KNOWN_ROWS:
                self._known[rel] = (version, row_table)
            self.indexed += 1
            self._changed()
        except Exception as exc:
            log.warning("index: %s: %s (tried again when idle; pktstream index repairs it)", path, exc)
            self.failures += 1
            self._schedule(path, "index", exc)
        finally:
            b.close()

    def removed(self, path: str) -> None:
        rel = self._rel(path)
        if rel is not None:
            self._retry.pop(path, None)
            try:
                remove_index(self.store, rel)
                self._changed()
            except Exception as exc:
                log.warning("index: removing the index of %s: %s (tried again when idle)", path, exc)
                self._schedule(path, "remove", exc)

    def discarded(self, path: str) -> None:
        self._idbs.pop(path, None)
        self._unindexed.discard(path)  # (a reset that keeps the file indexes it: repair_paths)
        entry = self._open.pop(path, None)
        if entry is not None:
            entry[0].close()

    def repair_paths(self, paths: list[str]) -> None:
        """Index files completed outside the writer (cut back after a write error). Never
        raises: a file it cannot index now is tried again when idle (an index failure must not
        fail the capture -- a reset that raised would keep its output from flushing)."""
        for path in paths:
            rel = self._rel(path)
            if rel is None:
                continue
            try:
                self._index_from_disk(path, rel)
            except Exception as exc:
                log.warning("index: %s: %s (tried again when idle)", path, exc)
                self._schedule(path, "index", None)


class _RefusePandas:
    """Import hook refusing pandas (see :func:`refuse_pandas`)."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not used by the pktstream receiver")
        return None


def refuse_pandas() -> None:
    """For a process that indexes but never needs pandas (the ``pktstream receiver`` command):
    pyarrow imports pandas at its first array when it is installed, which costs 0.5-1 CPU-s and
    tens of MB of memory at the first completed file; after this call it does not. Not for
    library use (it changes imports for the whole process). Idempotent."""
    import sys
    if "pandas" not in sys.modules and not any(isinstance(f, _RefusePandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _RefusePandas())


RECOVER_RECENT_FILES = 16  # files of a rotating output below the open one that recovery checks


def allow_pandas() -> None:
    """Undo :func:`refuse_pandas` (an embedding process, or a test that built a receiver)."""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RefusePandas)]


def recover_index(root: str, outputs: list[dict] | None = None) -> dict:
    """After a crash: the files of these outputs (``FileSink`` state entries: ``final``, and for
    rotating ones ``pattern``/``seq``) get a current index -- the files recovery completed or
    cut back, and the ``RECOVER_RECENT_FILES`` before the open one (a crash between a rename and
    its index) -- and the indexes of their files that are gone are removed (also of the files
    an entry with ``dir`` and ``names_re``, a regular expression of names, matches). Other files under
    ``root`` are not touched (``pktstream index`` indexes an archive whole). ``outputs`` None:
    the whole root. An error is logged, never raised: the receiver starts, and a query scans a
    file without an index."""
    from pktstream.formats.writer import rotated_files, rotated_name_re
    store = LocalStore(root)
    try:
        if outputs is None:
            res = repair(store, upgrade=False)
        else:
            rels: set[str] = set()
            dirs: dict[str, list[re.Pattern[str]]] = {}
            for f in outputs:
                final, names_re = f.get("final"), f.get("names_re")
                if isinstance(names_re, str) and isinstance(f.get("dir"), str):
                    # (the names of an output's other files: their rows go with them, if gone)
                    dirs.setdefault(os.path.abspath(f["dir"]), []).append(re.compile(names_re))
                    continue
                if not isinstance(final, str):
                    continue
                d = os.path.dirname(os.path.abspath(final))
                if os.path.exists(final):
                    rels.add(os.path.relpath(final, store.root).replace(os.sep, "/"))
                pattern, seq = f.get("pattern"), f.get("seq")
                if isinstance(pattern, str) and isinstance(seq, int):
                    dirs.setdefault(d, []).append(rotated_name_re(pattern))
                    rels.update(os.path.relpath(path, store.root).replace(os.sep, "/")
                                for n, path in rotated_files(pattern, d) if n >= seq - RECOVER_RECENT_FILES)
                else:
                    dirs.setdefault(d, []).append(re.compile(re.escape(os.path.basename(final))))
            def ours(rel: str) -> bool:
                path = os.path.join(store.root, rel)
                return any(r.fullmatch(os.path.basename(path)) for r in dirs.get(os.path.dirname(path), ()))
            res = repair(store, sorted(r for r in rels if not r.startswith("..")), upgrade=False, forget=ours)
    except Exception as exc:  # noqa: BLE001 - the index must never keep a receiver from starting
        log.error("recovery: index of %s not repaired (%s); queries scan the files without an index, "
                  "`pktstream index %s` repairs it", root, exc, root)
        return {"indexed": 0, "removed": 0, "error": str(exc)}
    if res["indexed"] or res["removed"]:
        log.warning("recovery: index of %s: %d file(s) indexed, %d index(es) of vanished files removed",
                    root, res["indexed"], res["removed"])
    return res


def forget_index(root: str, path: str) -> None:
    """Recovery is about to remove capture file ``path``: its index under ``root`` goes first
    (a crash between the two then leaves a file without an index, never an index of a file that
    is gone). An error is logged (the removal of that file's row is left to
    :func:`recover_index`), never raised."""
    root, path = os.path.abspath(root), os.path.abspath(path)
    if os.path.commonpath([root, path]) != root:
        return
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    try:
        remove_index(LocalStore(root), rel)
    except Exception as exc:  # noqa: BLE001 - the recovery goes on
        log.error("recovery: index of %s not removed (%s); the next repair removes it", path, exc)


class StagingIndexer(LiveIndexer):
    """For outputs that stage files before uploading them (S3): a completed file's index is
    kept next to it as ``NAME.idx`` (flow records, with the catalog row in the Parquet
    metadata) until the uploader commits it under the object's key with :func:`commit_staged`."""

    SPILL_SUBDIR = ".spill"  # (no index directory in the staging directory; the uploader takes files only)

    def __init__(self, staging_dir: str, *, chunk_bytes: int = CHUNK_BYTES, max_flows: int = INDEX_MAX_FLOWS) -> None:
        super().__init__(staging_dir, chunk_bytes=chunk_bytes, max_flows=max_flows)
        self.recover_root = False  # no index in the staging directory itself

    def removed(self, path: str) -> None:
        pass

    def repair_paths(self, paths: list[str]) -> None:
        pass  # a file cut back after a write error is indexed from disk by the uploader (S3Sink)

    def completed(self, path: str) -> None:
        self._idbs.pop(path, None)
        entry = self._open.pop(path, None)
        if entry is None:
            return
        b, fmt = entry
        try:
            row, tables = b.finish(size=0, version="", format=fmt.split(".")[0],
                                   compression="zstd" if fmt.endswith(".zst") else None)
            write_staged(path, row, tables)
            self.indexed += 1
        except Exception as exc:
            log.warning("index: %s: %s (pktstream index repairs it)", path, exc)
            self.failures += 1
        finally:
            b.close()


_BINARY = BINARY_COLUMNS  # catalog row values kept as base64 in the .idx metadata (JSON)


def write_staged(path: str, row: dict, tables: dict) -> None:
    """Keep a completed staged file's index next to it as ``path + ".idx"``: its flow records
    (partition values in ``_sensor``/``_date`` columns; spilled records are copied a row group
    at a time) with the catalog row in the Parquet metadata, written to a temporary name and
    renamed (never a partial ``.idx``)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    def tagged(t, s: str, d: str):
        return (t.append_column("_sensor", pa.array([s] * t.num_rows, pa.string()))
                .append_column("_date", pa.array([d] * t.num_rows, pa.string())))

    row = {k: base64.b64encode(v).decode() if k in _BINARY and v is not None else v for k, v in row.items()}
    meta = {b"pktstream.catalog": json.dumps(row).encode()}
    tmp = path + ".idx.tmp"
    if not tables:
        pq.write_table(pa.table({"_sensor": pa.array([], pa.string())}).replace_schema_metadata(meta), tmp,
                       compression="zstd")
    else:
        writer = None
        try:
            for (s, d), t in tables.items():
                parts = t.row_groups() if isinstance(t, SpilledFlows) else [t]
                for part in parts:  # (a spilled partition one row group at a time)
                    part = tagged(part, s, d)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, part.schema.with_metadata(meta), compression="zstd")
                    writer.write_table(part.replace_schema_metadata(meta))
        finally:
            if writer is not None:
                writer.close()
            for t in tables.values():
                if isinstance(t, SpilledFlows):
                    t.close()
    os.replace(tmp, path + ".idx")


def stage_index_of_file(path: str, name: str, *, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Index a completed staged file from disk (one that was not indexed as it was written:
    completed by crash recovery, cut back after a write error, or left by an earlier run) and
    keep the index next to it (:func:`write_staged`). ``name`` is the file name its sensor is
    attributed by (``<sensor id>.<ext>``, as the writer named it). Returns its catalog row."""
    from pktstream.archive.catalog import index_entry
    from pktstream.archive.store import Entry
    st = os.stat(path)
    row, tables = index_entry(LocalStore(os.path.dirname(path)), Entry(os.path.basename(path), st.st_size, ""),
                              chunk_bytes=chunk_bytes, name=name)
    write_staged(path, row, tables)
    return row


def commit_staged(store, idx_path: str, rel_path: str, size: int, version: str) -> None:
    """Write a staged index (``NAME.idx``) for the object now at ``rel_path`` in ``store``."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pktstream.archive.index import FORMAT_VERSION, READABLE_VERSIONS, file_id, flow_files
    table = pq.read_table(idx_path)
    row = json.loads(table.schema.metadata[b"pktstream.catalog"])
    if row.get("index_version") in READABLE_VERSIONS:  # (staged by an older version: the same
        row["index_version"] = FORMAT_VERSION          # records, written here in this layout)
    for k in _BINARY:  # (absent in an .idx staged before the address filter: null, upgraded later)
        row[k] = base64.b64decode(row[k]) if row.get(k) is not None else None
    tables = {}
    if "_sensor" in table.column_names and table.num_rows:
        for s, d in sorted(set(zip(table.column("_sensor").to_pylist(), table.column("_date").to_pylist()))):
            t = table.filter(pc.and_(pc.equal(table.column("_sensor"), s), pc.equal(table.column("_date"), d)))
            t = t.drop_columns(["_sensor", "_date"]).replace_schema_metadata(None)
            t = t.set_column(t.column_names.index("file"), "file", pa.array([rel_path] * t.num_rows, pa.string()))
            tables[(s, d)] = t
    row.update(path=rel_path, file_id=file_id(rel_path), size=size, version=version,
               flow_files=flow_files(tables, rel_path))
    write_index(store, row, tables)
