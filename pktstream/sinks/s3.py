"""S3 output: rotated capture files staged locally, uploaded as objects by a background thread.

Data path: batches → :class:`FileSink` (per-sensor files, rotation by size ``rotate_bytes`` =
PacketStreamer ``totalFileSize`` and age ``rotate_seconds`` = ``uploadTimeout``) in
``staging_dir`` → a completed file is moved to ``staging_dir/ready/`` under a unique name →
the uploader thread uploads it with boto3's managed transfer (``upload_file``: one PUT, or a
multipart upload with ``part_size`` ≥ 5 MiB parts for larger files, aborted if it fails), deletes
it, and goes on. Each request is retried by botocore (standard retry mode, ``request_attempts``
attempts); a file whose upload still fails is retried whole with exponential backoff
(``retry_min`` … ``retry_max`` s), forever. A file is acknowledged to the sensors once it is
*staged* (flushed to the local disk, like FileSink); the upload follows.

Staging is bounded: when ``staging_max_bytes`` are staged (S3 unreachable for long), ``write()``
refuses (counted in ``staging_full``; under a receiver at the start of a write group, so staging
can exceed the bound by one group, at most the receiver's bytes in flight, 64 MiB by default):
a gating S3 output then stops the receiver from acknowledging, and the sensors buffer
(backpressure); a non-gating one drops and counts
(receiver output counters ``dropped_packets``). ``close()`` completes the open files and waits up
to ``close_timeout`` s for the uploads; what is left stays in the staging directory and is
uploaded by the next run with the same staging directory (also after a crash: ``.part`` files are
cut back to their committed size by the receiver's recovery, then uploaded).

Object keys come from ``key_template`` (``str.format``) with ``prefix``, ``sensor`` (sanitised
sensor id), ``date`` (a UTC datetime: when the file was completed), ``run`` (random per sink
instance), ``seq`` (per-sensor file number of this run) and ``ext``; the default
``{prefix}{sensor}/{date:%Y/%m/%d}/{date:%H%M%S}-{run}-{seq:06d}.{ext}`` cannot collide.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import re
import secrets
import threading
import time
from typing import Any

from pktstream._capture import PacketBatch
from pktstream.exceptions import ConfigError
from pktstream.formats._common import fsync_dir
from pktstream.sinks.base import Sink, Source
from pktstream.sinks.file import FileSink, max_flows_option

log = logging.getLogger("pktstream.stream.receiver")

MIN_PART = 5 << 20
DEFAULT_KEY = "{prefix}{sensor}/{date:%Y/%m/%d}/{date:%H%M%S}-{run}-{seq:06d}.{ext}"


def _lock_staging(directory: str) -> Any:
    """Hold ``directory/.lock`` (flock, released when the process ends or the sink closes): two
    receivers staging in one directory would upload, cut back or delete each other's files."""
    import fcntl

    f = open(os.path.join(directory, ".lock"), "ab")  # noqa: SIM115 - held for the sink's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"S3 staging directory {directory} is in use by another running receiver: give each "
                          "its own (--s3-staging DIR or --state-dir DIR)") from None
    return f


def check_key_template(template: str) -> None:
    """Raise ConfigError unless ``template`` formats with the documented fields and gives two
    files (of one sensor or two, of one run or two) two keys: a key used twice would overwrite
    an object."""
    from pktstream.exceptions import ConfigError
    date = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    keys = []
    try:
        for sensor, run, seq in (("s1", "0a1b2c3d", 1), ("s1", "0a1b2c3d", 2), ("s2", "0a1b2c3d", 1),
                                 ("s1", "4e5f6a7b", 1)):
            keys.append(template.format(prefix="p/", sensor=sensor, date=date, run=run, seq=seq, ext="pcapng"))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"S3 key template {template!r}: {type(exc).__name__}: {exc} (fields: prefix, sensor, "
                          "date, run, seq, ext)") from None
    if len(set(keys)) < len(keys):
        raise ConfigError(f"S3 key template {template!r} gives two files the same key (an object would be "
                          "overwritten): use {sensor}, {run} and {seq}")


_READY = re.compile(r"^(?P<sensor>.+)__(?P<stamp>\d{8}T\d{6}Z)__(?P<run>[0-9a-f]+)-(?P<seq>\d+)"
                    r"\.(?P<ext>pcap(?:ng)?(?:\.zst)?)$")


class StagingFull(RuntimeError):
    """The local staging directory holds ``staging_max_bytes`` not yet uploaded."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` → ("bucket", "prefix/")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: no bucket (s3://BUCKET/PREFIX)")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def _remove_temporaries(*dirs: str) -> None:
    """Temporary files (``*.tmp``: a staged index or a re-encode being written) that a killed
    run left in the staging directories: no process owns them (the staging lock is ours), and
    they would count against the staging bound for good."""
    for d in dirs:
        for e in os.scandir(d):
            if e.is_file() and e.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)


class S3Sink(Sink):
    """Upload rotated capture files to ``s3://bucket/prefix`` (any S3-compatible endpoint).

    Credentials come from boto3's usual chain (environment, ``~/.aws``, instance/task roles).
    ``zstd_frame_bytes``: ``.zst`` formats in the seekable layout (see :class:`FileSink`);
    ``index_max_flows``: the index's flow records held per open file (see :class:`FileSink`).
    """

    def __init__(self, bucket: str, prefix: str = "", *, staging_dir: str, endpoint_url: str | None = None,
                 region: str | None = None, path_style: bool = False, rotate_bytes: int = 10 * 1000 * 1000,
                 rotate_seconds: float = 60.0, part_size: int = MIN_PART,
                 acl: str | None = "bucket-owner-full-control", staging_max_bytes: int = 1 << 30,
                 key_template: str | None = None, format: str = "pcapng", gate: bool = True,
                 retry_min: float = 0.5, retry_max: float = 10.0, close_timeout: float = 60.0,
                 request_attempts: int = 3, client: Any = None, index: bool = False,
                 zstd_frame_bytes: int | None = None, index_max_flows: int | None = None,
                 fsync: bool = False) -> None:
        if not (rotate_bytes or rotate_seconds):
            # (its objects are its rotated files; and a file never rotated would be named
            # again after a reset, under a name the persisted state gives an acknowledged one)
            raise ConfigError("an S3 output needs rotate_bytes or rotate_seconds (its objects are its rotated files)")
        self.bucket, self.prefix = bucket, prefix
        self.name = f"s3://{bucket}/{prefix}"
        self.gate = gate
        self.part_size = max(int(part_size), MIN_PART)
        self.acl = acl or None
        check_key_template(key_template or DEFAULT_KEY)
        self.staging_dir = os.path.abspath(staging_dir)
        self.ready_dir = os.path.join(self.staging_dir, "ready")
        os.makedirs(self.ready_dir, mode=0o750, exist_ok=True)
        self._lock_file: Any = _lock_staging(self.staging_dir)
        _remove_temporaries(self.staging_dir, self.ready_dir)  # (the lock is ours: a killed run's)
        self.staging_max_bytes = staging_max_bytes
        self.key_template = key_template or DEFAULT_KEY
        self.format = format
        self.retry_min, self.retry_max, self.close_timeout = retry_min, retry_max, close_timeout
        self.run_id = secrets.token_hex(4)
        self._seq: collections.Counter = collections.Counter()
        self.counters: collections.Counter = collections.Counter()
        self._unindexable: set[str] = set()  # ready files whose index could not be built (logged once)
        self.uploaded: list[str] = []   # keys, in upload order
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._all_staged = threading.Event()  # close() has completed (and staged) the open files
        self._staged_cache = (0.0, 0)
        if client is None:
            import boto3
            from botocore.config import Config
            cfg = Config(retries={"mode": "standard", "total_max_attempts": request_attempts}, connect_timeout=5,
                         read_timeout=60, s3={"addressing_style": "path"} if path_style else None)
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
        self.client = client
        from boto3.s3.transfer import TransferConfig
        # multipart above part_size, in part_size parts; no transfer threads: the upload runs in
        # the (daemon) uploader thread, so close() still waits at most close_timeout and an
        # exiting receiver never waits for a transfer pool
        self._transfer = TransferConfig(multipart_threshold=self.part_size + 1,
                                        multipart_chunksize=self.part_size, use_threads=False)
        self.fsync = fsync
        self._files = FileSink(directory=self.staging_dir, format=format, rotate_bytes=rotate_bytes,
                               rotate_seconds=rotate_seconds, zstd_frame_bytes=zstd_frame_bytes, fsync=fsync)
        self.index = index  # index each file as written; committed under its key after the upload
        if index:
            from pktstream.archive.live import StagingIndexer
            self._files.indexer = StagingIndexer(self.staging_dir, **max_flows_option(index_max_flows))
        self._files.opts["on_complete"] = self._completed
        self._files_lock = threading.Lock()  # the FileSink is used by the receiver's thread and the ticker
        self._dirty = False                  # written since the last flush
        # Under a receiver (use_acknowledgements), a completed file waits in the staging
        # directory until the flush that holds its last bytes is acknowledged: until then crash
        # recovery may still cut it back or remove it (the sensors resend its tail).
        self._acks = False
        self._ack_lock = threading.Lock()    # _unacked, _acked_flush (after _files_lock when both)
        self._flushes = 0                    # flush() calls so far
        self._acked_flush = 0                # the newest acknowledged flush
        self._unacked: list[tuple[int, str]] = []  # (the flush that holds it, completed staging file)
        self._leftovers_ok = threading.Event()     # recovery had its turn: earlier runs' files may go
        self._orphans_named = False                # earlier runs' .part files were logged
        self._thread = threading.Thread(target=self._uploader, name="s3-upload", daemon=True)
        self._thread.start()
        self._ticker = threading.Thread(target=self._tick, name="s3-rotate", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        """Time rotation while no data arrives (the receiver only calls flush() after writes): a
        file is completed ``rotate_seconds`` after it was opened even if the sensors are idle.
        A rotation that fails (its rename: EIO, ENOSPC) leaves its file to a reset, which
        completes it cut back to the last flush -- everything: nothing was written since; the
        thread goes on (errors logged once until it works again)."""
        failing = False
        while not self._closing.wait(0.5):
            with self._files_lock:
                if self._closing.is_set():  # close() took the lock first: the files are closed
                    return
                if self._dirty:
                    continue
                try:
                    self._files.flush()  # nothing new since the last flush: this only rotates
                    failing = False
                    continue
                except Exception as exc:
                    self.counters["failures"] += 1
                    error = self._reset_locked()
                    if not failing:
                        log.error("%s: time rotation in %s: %s (back to the last flush%s)", self.name,
                                  self.staging_dir, exc, "" if error is None else f" failed too, tried again: {error}")
                    failing = True
            self._release_upto(self._acked_flush)

    # -- staging ---------------------------------------------------------------------------------
    def _completed(self, path: str) -> None:
        """The FileSink completed a staging file (called with ``_files_lock`` held)."""
        self._hold_or_adopt(self._flushes + (1 if self._dirty else 0), path)  # the flush holding its last bytes

    def _hold_or_adopt(self, flush: int, path: str) -> None:
        """Queue ``path`` for upload, or, under a receiver, hold it until ``flush`` is acknowledged."""
        with self._ack_lock:
            if self._acks and flush > self._acked_flush:
                self._unacked.append((flush, path))
                return
        self._adopt(path)

    def _release_upto(self, flush: int) -> None:
        """Queue the held files whose flush is ``flush`` or older."""
        with self._ack_lock:
            ready = [p for f, p in self._unacked if f <= flush]
            self._unacked = [(f, p) for f, p in self._unacked if f > flush]
        for path in ready:
            self._adopt(path)

    def use_acknowledgements(self) -> None:
        self._acks = True
        self._leftovers_ok.set()

    def set_owner(self, owner: str | None) -> None:
        with self._files_lock:
            self._files.set_owner(owner)

    def recover_unacknowledged(self, state: dict[str, Any] | None, owner: str | None = None, *,
                               earlier_owner: str | None = None) -> list[str]:
        """Staged files of outputs no persisted state named (:class:`FileSink`'s markers):
        removed before any earlier run's leftovers are uploaded."""
        with self._files_lock:
            return self._files.recover_unacknowledged(state, owner, earlier_owner=earlier_owner)

    def persisted(self, state: dict[str, Any] | None) -> None:
        self._files.persisted(state)  # (the markers have a lock of their own: no _files_lock)

    def acknowledged(self, state: dict[str, Any]) -> None:
        flush = state.get("flush")
        if not isinstance(flush, int):
            return
        with self._ack_lock:
            self._acked_flush = max(self._acked_flush, flush)
        self._release_upto(flush)

    def _adopt(self, path: str) -> None:
        """A completed staging file → ``ready/`` under its unique upload name."""
        with self._lock:
            if not os.path.exists(path):
                return
            base = os.path.basename(path)
            ext = self.format
            stem = base[:-(len(ext) + 1)] if base.endswith("." + ext) else base.split(".")[0]
            sensor = re.sub(r"\.\d{6}$", "", stem)
            n = self._seq[sensor]
            self._seq[sensor] += 1
            stamp = dt.datetime.fromtimestamp(os.path.getmtime(path), dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            target = os.path.join(self.ready_dir, f"{sensor}__{stamp}__{self.run_id}-{n:06d}.{ext}")
            if os.path.exists(path + ".idx"):  # its staged index goes first (never a file's without it)
                os.replace(path + ".idx", target + ".idx")
            os.replace(path, target)
            if self.fsync:  # (the rename is durable before the flush holding it is acknowledged)
                fsync_dir(self.ready_dir)
                fsync_dir(self.staging_dir)
        self._wake.set()

    def _adopt_leftovers(self) -> None:
        """Completed files in the staging directory that no writer is writing and that wait for
        no acknowledgement (a previous run's, completed by crash recovery, or cut back after a
        write error) are queued for upload too -- once recovery had its turn."""
        if not self._leftovers_ok.is_set():
            return
        with self._files_lock:  # the receiver's thread opens, rotates and completes files meanwhile
            with self._ack_lock:
                skip = self._files.open_paths() | {p for _, p in self._unacked}
            leftovers = [e.path for e in os.scandir(self.staging_dir)
                         if e.is_file() and not e.name.endswith((".part", ".tmp", ".idx"))
                         and not e.name.startswith(".") and e.path not in skip]
            if not self._orphans_named:  # once, after recovery (which completes them with a state)
                self._orphans_named = True
                orphans = [e.name for e in os.scandir(self.staging_dir) if e.name.endswith(".part")
                           and e.path[:-len(".part")] not in skip]
                if orphans:
                    log.warning("%s: %d .part file(s) in %s were left by an earlier run that stopped without "
                                "completing them and there is no receiver state to recover them (--state-dir): "
                                "not uploaded, not counted as staged (%s)", self.name, len(orphans),
                                self.staging_dir, ", ".join(sorted(orphans)[:3]))
        for path in leftovers:
            self._adopt(path)

    def staged_bytes(self) -> int:
        now = time.monotonic()
        t, n = self._staged_cache
        if now - t < 0.2:
            return n
        n = 0
        open_parts = {p + ".part" for p in self._files.open_paths()}
        for d in (self.staging_dir, self.ready_dir):
            for e in os.scandir(d):
                # (a .part no writer of this run has open: an earlier run's, left by a crash
                # without a state directory to recover it -- named at start, not counted; nor
                # temporary files: a killed process's are removed at start)
                if e.is_file() and not e.name.endswith(".tmp") and (not e.name.endswith(".part")
                                                                      or e.path in open_parts):
                    n += e.stat().st_size
        self._staged_cache = (now, n)
        return n

    # -- Sink ------------------------------------------------------------------------------------
    def write(self, source: Source, batch: PacketBatch) -> None:
        # Under a receiver the bound is checked when a write group starts (the first write after
        # a flush): a group is bounded by the receiver's bytes in flight, is written again whole
        # after a refusal, and its bytes leave staging only after its flush -- a group larger than
        # the room left would be refused for ever (a stall after an S3 outage with a small bound).
        if not (self._acks and self._dirty):
            staged = self.staged_bytes()
            if staged + batch.nbytes > self.staging_max_bytes:
                self.counters["staging_full"] += 1
                raise StagingFull(f"{self.name}: staging {self.staging_dir} holds {staged} bytes "
                                  f"(limit {self.staging_max_bytes}); S3 uploads are behind")
        self._leftovers_ok.set()
        with self._files_lock:
            self._dirty = True
            self._files.write(source, batch)
            t, n = self._staged_cache  # (until the next scan: the cached figure had missed these)
            self._staged_cache = (t, n + batch.nbytes)

    def flush(self) -> dict[str, Any]:
        self._leftovers_ok.set()
        with self._files_lock:
            state = self._files.flush()
            self._dirty = False
            self._flushes += 1
            state = {**state, "flush": self._flushes}
        self._wake.set()
        return state

    def reset(self) -> None:
        with self._files_lock:
            error = self._reset_locked()
        self._release_upto(self._acked_flush)
        if error is not None:
            raise error

    def _reset_locked(self) -> Exception | None:
        """:meth:`reset` with ``_files_lock`` held; returns the staging FileSink's reset error
        (what it completed before the error is taken all the same; the rest is retried by its
        next reset, and its flush refuses until then)."""
        before = set(self._files.paths)
        error: Exception | None = None
        try:
            self._files.reset()
        except Exception as exc:
            error = exc
        self._dirty = False  # (back to the last flush: the next write starts a group)
        self._staged_cache = (0.0, 0)
        with self._ack_lock:
            # files reset() removed are forgotten; what it kept holds nothing past the last
            # flush (a file a rotation completed after it was cut back to it) -- only once it
            # worked: a reset that failed may not have cut or removed them yet (its retry does;
            # flush refuses until then), and a lower number would upload them now
            self._unacked = [(min(f, self._flushes) if error is None else f, p)
                             for f, p in self._unacked if os.path.exists(p)]
        # files reset() cut back to the last flush and completed: acknowledged with that flush
        for path in sorted(set(self._files.paths) - before):
            self._hold_or_adopt(self._flushes, path)
        return error

    recover = staticmethod(FileSink.recover)

    def resume(self, state: dict[str, Any]) -> None:
        self._files.resume(state)

    def close(self) -> None:
        """Complete the open files and upload for up to ``close_timeout`` s. Under a receiver
        (:meth:`use_acknowledgements`) only acknowledged files go: a receiver commits its last
        flush before it closes its outputs, and a file whose flush was not acknowledged (the
        state could not be saved) stays staged -- uploading it would duplicate the packets the
        sensors resend after a crash; the next run's recovery decides. Without a receiver every
        flushed file goes."""
        self._closing.set()
        self._leftovers_ok.set()
        try:
            with self._files_lock:
                try:
                    self._files.close()
                finally:  # (a group that could not be written at shutdown: its files stay)
                    if not self._acks:
                        self._release_upto(self._flushes)
                    elif self._unacked:
                        log.warning("%s: %d files hold data not acknowledged at shutdown; they stay in %s for "
                                    "the next run's recovery", self.name, len(self._unacked), self.staging_dir)
        finally:  # (also when completing a file failed: what is ready is still uploaded)
            self._all_staged.set()
            self._wake.set()
            self._thread.join(self.close_timeout)
            left = self._waiting()
            if left:
                self.counters["left_staged"] += len(left)
                log.warning("%s: %d files not uploaded at shutdown; they stay in %s and are uploaded by the "
                            "next run", self.name, len(left), self.ready_dir)
            self._lock_file.close()  # (releases the staging directory; so does garbage collection)

    # -- uploads ---------------------------------------------------------------------------------
    def key_for(self, name: str) -> str:
        m = _READY.match(name)
        if m is None:
            raise ValueError(f"unexpected staged file name {name!r}")
        date = dt.datetime.strptime(m["stamp"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        return self.key_template.format(prefix=self.prefix, sensor=m["sensor"], date=date, run=m["run"],
                                        seq=int(m["seq"]), ext=m["ext"])

    def _upload(self, path: str, key: str) -> None:
        """One file → one object (boto3 aborts a multipart upload that fails)."""
        extra: dict[str, Any] = {"ContentType": "application/vnd.tcpdump.pcap"}
        if self.acl:
            extra["ACL"] = self.acl
        multipart = os.path.getsize(path) > self.part_size
        self.client.upload_file(path, self.bucket, key, ExtraArgs=extra, Config=self._transfer)
        if multipart:
            self.counters["multipart_uploads"] += 1

    def _index_leftover(self, path: str, name: str) -> None:
        """A ready file without a staged index (completed by crash recovery, cut back after a
        write error, left by an earlier run, or its live index failed): index it from the local
        copy before the upload, so no object of an indexed output goes up without its index."""
        from pktstream.archive.live import stage_index_of_file
        m = _READY.match(name)
        assert m is not None  # key_for() accepted the name
        try:
            stage_index_of_file(path, f"{m['sensor']}.{m['ext']}")
            self.counters["indexed_leftovers"] += 1
        except Exception as exc:  # noqa: BLE001 - the capture still goes up; pktstream index repairs it
            self._unindexable.add(name)
            self.counters["index_failures"] += 1
            log.warning("%s: %s could not be indexed (%s); uploading it without an index (pktstream index "
                        "repairs it)", self.name, name, exc)

    def _commit_index(self, path: str, key: str, size: int) -> None:
        """The object is uploaded: its staged index goes under the prefix, with its ETag
        (a failure is logged; ``pktstream index s3://...`` indexes the object later)."""
        from pktstream.archive.live import commit_staged
        from pktstream.archive.store import S3Store
        try:
            etag = self.client.head_object(Bucket=self.bucket, Key=key)["ETag"].strip('"')
            store = S3Store(f"s3://{self.bucket}/{self.prefix}", client=self.client)
            commit_staged(store, path + ".idx", key[len(self.prefix):], size, etag)
            self.counters["indexed_files"] += 1
        except Exception as exc:  # noqa: BLE001 - the capture is uploaded; its index can be rebuilt
            self.counters["index_failures"] += 1
            log.warning("%s: index of %s not written (%s); pktstream index %s repairs it", self.name, key,
                        exc, self.name)
        try:
            os.unlink(path + ".idx")
        except FileNotFoundError:
            pass

    def _uploader(self) -> None:
        """The upload thread: it must never die (staging would fill and every sensor stall), so
        an unexpected error is logged, counted and retried."""
        while True:
            try:
                if self._upload_pass():
                    return
            except Exception as exc:  # noqa: BLE001 - a bug or an odd file system: keep uploading
                self.counters["uploader_errors"] += 1
                log.error("%s: uploader: %s; retrying in %.0f s", self.name, exc, self.retry_max)
                self._closing.wait(self.retry_max)

    def _upload_pass(self) -> bool:
        """Upload what is ready until the sink closes (True) or an error escapes."""
        delay = self.retry_min
        last_log = 0.0
        while True:
            try:
                self._adopt_leftovers()
            except OSError:
                pass
            self.counters["uploader_scans"] += 1  # passes over the staging directory (tests wait on it)
            # read before listing: once it is set, the files close() completed are in ready/
            done = self._all_staged.is_set()
            files = sorted(n for n in os.listdir(self.ready_dir) if not n.endswith((".unknown", ".idx", ".tmp")))
            if not files:
                if done:
                    return True
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            for name in files:
                path = os.path.join(self.ready_dir, name)
                try:
                    key = self.key_for(name)
                    if self.index and not os.path.exists(path + ".idx") and name not in self._unindexable:
                        self._index_leftover(path, name)
                    size = os.path.getsize(path)
                    self._upload(path, key)
                except ValueError as exc:
                    log.error("%s: %s; leaving it in %s", self.name, exc, self.ready_dir)
                    os.replace(path, path + ".unknown")
                    continue
                except Exception as exc:  # noqa: BLE001 - network, credentials, throttling: retry
                    self.counters["upload_failures"] += 1
                    now = time.monotonic()
                    if now - last_log > 10:
                        last_log = now
                        log.warning("%s: upload of %s failed (%s); %d files waiting, retrying in %.1f s",
                                    self.name, name, exc, len(files), delay)
                    time.sleep(delay)
                    delay = min(self.retry_max, delay * 2)
                    break
                if os.path.exists(path + ".idx"):
                    self._commit_index(path, key, size)
                os.unlink(path)
                delay = self.retry_min
                with self._lock:
                    self.uploaded.append(key)
                self.counters["uploaded_files"] += 1
                self.counters["uploaded_bytes"] += size
                log.info("%s: uploaded %s", self.name, key)

    def stats(self) -> dict[str, Any]:
        return {"staged_bytes": self.staged_bytes(), "waiting_files": len(self._waiting()), **self.counters}

    def _waiting(self) -> list[str]:
        """Capture files in ``ready/`` waiting for their upload (not their staged indexes)."""
        return [n for n in os.listdir(self.ready_dir) if not n.endswith((".unknown", ".idx", ".tmp"))]
