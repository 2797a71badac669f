"""Where an archive lives: a local directory or an S3 prefix, behind one small interface.

An archive is capture files (any layout under the root, ``.part`` files and the ``_index``
directory excluded) plus ``_index/`` (docs/ARCHIVE.md). Paths given to a store are relative to
its root, with ``/`` separators.

Thread safety: a store may be shared by threads (the S3 client is thread-safe; local
operations are independent system calls).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from pktstream.archive.index import INDEX_DIR

CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap", ".pcap.zst", ".pcapng.zst", ".pcap.gz", ".pcapng.gz")


def is_capture_name(name: str) -> bool:
    """A name the archive treats as a capture file (by extension; content decides the format)."""
    return name.endswith(CAPTURE_SUFFIXES) and not name.startswith(".")


@dataclass(frozen=True)
class Entry:
    """A capture file in the archive: path relative to the root, size, version (mtime ns or ETag)."""
    path: str
    size: int
    version: str


class LocalStore:
    """An archive in a local directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def full(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def captures(self) -> list[Entry]:
        """Every capture file under the root (sorted by path)."""
        out = []
        bases = {""}
        for d, dirs, files in os.walk(self.root):
            rel = os.path.relpath(d, self.root).replace(os.sep, "/")  # once per directory
            prefix = "" if rel == "." else rel + "/"
            if INDEX_DIR in dirs:
                bases.add(prefix[:-1])
            dirs[:] = sorted(x for x in dirs if x != INDEX_DIR and not x.startswith("."))
            for name in files:
                if is_capture_name(name):
                    try:
                        st = os.stat(os.path.join(d, name))
                    except OSError:
                        continue
                    out.append(Entry(prefix + name, st.st_size, str(st.st_mtime_ns)))
        self.bases = sorted(bases)
        return sorted(out, key=lambda e: e.path)

    def entry(self, rel: str) -> Entry | None:
        try:
            st = os.stat(self.full(rel))
        except OSError:
            return None
        return Entry(rel, st.st_size, str(st.st_mtime_ns))

    def list_files(self, prefix: str) -> list[str]:
        """Files under ``prefix`` (relative paths)."""
        base = self.full(prefix)
        out = []
        for d, _, files in os.walk(base):
            out += [os.path.relpath(os.path.join(d, f), self.root).replace(os.sep, "/") for f in files
                    if not f.endswith(".tmp")]
        return sorted(out)

    def list_stat(self, prefix: str) -> list[tuple[str, str]]:
        """(relative path, version) of the files directly in directory ``prefix``."""
        out = []
        try:
            with os.scandir(self.full(prefix)) as it:
                for e in it:
                    if e.is_file() and not e.name.endswith(".tmp"):
                        st = e.stat()
                        out.append((f"{prefix}/{e.name}", f"{st.st_size}-{st.st_mtime_ns}"))
        except FileNotFoundError:
            pass
        return sorted(out)

    def open(self, rel: str) -> BinaryIO:
        return open(self.full(rel), "rb")

    def read_range(self, rel: str, start: int, end: int, f: BinaryIO | None = None) -> bytes:
        if f is None:
            with open(self.full(rel), "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        f.seek(start)
        return f.read(end - start)

    def read_bytes(self, rel: str) -> bytes:
        with open(self.full(rel), "rb") as f:
            return f.read()

    def arrow_file(self, rel: str) -> Any:
        """The file as a pyarrow random-access file, read in place (``pyarrow.OSFile``: a
        Parquet reader then reads the footer and the column chunks it decodes, not the whole
        file); open until it is garbage-collected."""
        import pyarrow as pa
        return pa.OSFile(self.full(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write atomically (temporary file, then rename); returns the version
        :meth:`list_stat` gives the file (size and mtime, read before the rename: a later
        replacement by another process has another version)."""
        path = self.full(rel)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:  # (the directory is made only then: a receiver writes files into
            os.makedirs(os.path.dirname(path), exist_ok=True)  # a few directories, often)
            f = open(tmp, "wb")
        with f:
            f.write(data)
            f.flush()
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
        return f"{st.st_size}-{st.st_mtime_ns}"

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self.full(rel))
        except FileNotFoundError:
            pass

    def remove_empty_dirs(self, prefix: str, pattern: str = "*") -> None:
        """Remove the directories of ``prefix`` whose name matches ``pattern`` (fnmatch) when
        nothing but empty directories is below them, deepest first; one that is not empty (any
        more) is left."""
        import fnmatch
        try:
            names = [n for n in os.listdir(self.full(prefix)) if fnmatch.fnmatchcase(n, pattern)]
        except OSError:
            return
        for name in names:
            top = os.path.join(self.full(prefix), name)
            for d, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count(os.sep)):
                try:
                    os.rmdir(d)
                except OSError:
                    pass

    def remove_stale_temporaries(self, prefix: str, min_age_s: float = 60.0) -> list[str]:
        """Remove the temporary files :meth:`write_bytes` left under ``prefix`` when its process
        died before the rename (``NAME.PID.tmp``: that process is gone, and the file is older
        than ``min_age_s``); returns their relative paths."""
        removed = []
        now = time.time()
        for d, _, files in os.walk(self.full(prefix)):
            for f in files:
                m = _TMP_NAME.search(f)
                if m is None or _process_exists(int(m.group(1))):
                    continue
                path = os.path.join(d, f)
                try:
                    if now - os.stat(path).st_mtime < min_age_s:
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        return sorted(removed)


_TMP_NAME = re.compile(r"\.(\d+)\.tmp$")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # (another user's process; or no such pid at all: left alone either way)
    return True


class S3Store:
    """An archive under ``s3://bucket/prefix``. Credentials: boto3's usual chain; endpoint from
    ``endpoint_url`` or ``AWS_ENDPOINT_URL`` (S3-compatible servers use path-style addressing)."""

    def __init__(self, url: str, *, client=None, endpoint_url: str | None = None) -> None:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"{url!r}: no bucket (s3://BUCKET/PREFIX)")
        self.bucket = bucket
        self.prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        if client is None:
            import boto3
            from botocore.config import Config
            endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("PKTSTREAM_S3_ENDPOINT")
            client = boto3.client("s3", endpoint_url=endpoint,
                                  config=Config(s3={"addressing_style": "path" if endpoint else "auto"}))
        self.client = client

    def _objects(self, prefix: str) -> Iterator[dict]:
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            resp = self.client.list_objects_v2(**kw)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def captures(self) -> list[Entry]:
        out = []
        bases = {""}
        for obj in self._objects(""):
            rel = obj["Key"][len(self.prefix):]
            if f"{INDEX_DIR}/" in rel:
                head, _, _ = rel.partition(f"{INDEX_DIR}/")
                if head == "" or head.endswith("/"):
                    bases.add(head.rstrip("/"))
                    continue
            if not is_capture_name(rel.rsplit("/", 1)[-1]):
                continue
            out.append(Entry(rel, obj["Size"], obj["ETag"].strip('"')))
        self.bases = sorted(bases)
        return sorted(out, key=lambda e: e.path)

    def entry(self, rel: str) -> Entry | None:
        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self.prefix + rel)
        except Exception:
            return None
        return Entry(rel, h["ContentLength"], h["ETag"].strip('"'))

    def list_files(self, prefix: str) -> list[str]:
        return sorted(o["Key"][len(self.prefix):] for o in self._objects(prefix))

    def list_stat(self, prefix: str) -> list[tuple[str, str]]:
        return sorted((o["Key"][len(self.prefix):], o["ETag"].strip('"')) for o in self._objects(prefix + "/"))

    def open(self, rel: str) -> BinaryIO:
        """A streaming reader of the object; S3 errors (opening or reading) raise ``OSError``
        naming the object, as a local file's would."""
        from botocore.exceptions import BotoCoreError, ClientError
        where = f"s3://{self.bucket}/{self.prefix + rel}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"{where}: {exc}") from exc
        return cast(BinaryIO, _Body(body, where))

    def read_range(self, rel: str, start: int, end: int, f: BinaryIO | None = None) -> bytes:
        if end <= start:
            return b""
        resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel, Range=f"bytes={start}-{end - 1}")
        return resp["Body"].read()

    def read_bytes(self, rel: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"].read()

    def arrow_file(self, rel: str) -> Any:
        """The object as a pyarrow random-access file (its bytes, read once)."""
        import pyarrow as pa
        return pa.BufferReader(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Put the object; returns its version as :meth:`list_stat` gives it (the ETag). An S3
        error raises ``OSError`` naming the object, as a local write's would."""
        with self._as_os_error(rel):
            return str(self.client.put_object(Bucket=self.bucket, Key=self.prefix + rel, Body=data)["ETag"]).strip('"')

    @contextlib.contextmanager
    def _as_os_error(self, rel: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise OSError(f"s3://{self.bucket}/{self.prefix + rel}: {exc}") from exc

    def remove_stale_temporaries(self, prefix: str, min_age_s: float = 60.0) -> list[str]:
        """An object store writes no temporary objects (a PUT is atomic): nothing to remove."""
        return []

    def remove_empty_dirs(self, prefix: str, pattern: str = "*") -> None:
        """An object store has no directories: nothing to remove."""

    def delete(self, rel: str) -> None:
        """Delete the object (S3 errors raise ``OSError``)."""
        with self._as_os_error(rel):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + rel)


class _Body(io.RawIOBase):
    """A streaming S3 body as a raw binary file (readinto), closing the connection on close."""

    def __init__(self, body, where: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        self._body = body
        self._where = where
        self._errors = (BotoCoreError, ClientError)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._body.read(len(b))
        except self._errors as exc:  # (a connection lost mid-object, ...)
            raise OSError(f"{self._where}: {exc}") from exc
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


def base_of(path: str, bases: list[str]) -> str:
    """The deepest index base (a directory holding ``_index``) above a capture file."""
    best = ""
    for b in bases:
        if b and path.startswith(b + "/") and len(b) > len(best):
            best = b
    return best


class SubStore:
    """The part of an archive whose index lives in ``BASE/_index``: paths relative to BASE.
    A directory written by a receiver with ``--index`` is such a part; an archive root above
    several of them reads each one's index."""

    def __init__(self, store, base: str, entries: list[Entry], *, mine: bool = False) -> None:
        """``entries``: the archive's capture files (``mine``: only this part's already)."""
        self.parent = store
        self.base = base
        self.url = store.url + ("/" + base if base else "")
        if hasattr(store, "root"):
            self.root = os.path.join(store.root, *base.split("/")) if base else store.root
        if not mine:
            bases = getattr(store, "bases", [""])
            entries = [e for e in entries if base_of(e.path, bases) == base]
        cut = len(base) + 1 if base else 0
        self._entries = [Entry(e.path[cut:], e.size, e.version) for e in entries] if cut else list(entries)

    def _p(self, rel: str) -> str:
        return f"{self.base}/{rel}" if self.base else rel

    def full_path(self, rel: str) -> str:
        """The path of ``rel`` relative to the whole archive."""
        return self._p(rel)

    def captures(self) -> list[Entry]:
        """This part's capture files as listed when the part was made (one listing per run)."""
        return list(self._entries)

    def relisted(self) -> SubStore:
        """The same part with its capture files listed again (what is there now)."""
        return SubStore(self.parent, self.base, self.parent.captures())

    def entry(self, rel: str) -> Entry | None:
        e = self.parent.entry(self._p(rel))
        return None if e is None else Entry(rel, e.size, e.version)

    def list_files(self, prefix: str) -> list[str]:
        cut = len(self.base) + 1 if self.base else 0
        return [p[cut:] for p in self.parent.list_files(self._p(prefix))]

    def remove_stale_temporaries(self, prefix: str) -> list[str]:
        cut = len(self.base) + 1 if self.base else 0
        return [p[cut:] for p in self.parent.remove_stale_temporaries(self._p(prefix))]

    def remove_empty_dirs(self, prefix: str, pattern: str = "*") -> None:
        self.parent.remove_empty_dirs(self._p(prefix), pattern)

    def list_stat(self, prefix: str) -> list[tuple[str, str]]:
        cut = len(self.base) + 1 if self.base else 0
        return [(p[cut:], v) for p, v in self.parent.list_stat(self._p(prefix))]

    def open(self, rel: str) -> BinaryIO:
        return self.parent.open(self._p(rel))

    def read_range(self, rel: str, start: int, end: int, f: BinaryIO | None = None) -> bytes:
        return self.parent.read_range(self._p(rel), start, end, f)

    def read_bytes(self, rel: str) -> bytes:
        return self.parent.read_bytes(self._p(rel))

    def arrow_file(self, rel: str) -> Any:
        return self.parent.arrow_file(self._p(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        return self.parent.write_bytes(self._p(rel), data)

    def delete(self, rel: str) -> None:
        self.parent.delete(self._p(rel))


def parts(store, entries: list[Entry] | None = None) -> list[SubStore]:
    """The archive split by index base (always including the root); ``entries``: what
    ``store.captures()`` just returned (not listed again)."""
    if entries is None:
        entries = store.captures()
    bases = getattr(store, "bases", [""])
    mine: dict[str, list[Entry]] = {b: [] for b in bases}
    for e in entries:  # (each file's base found once, not once per base)
        mine.setdefault(base_of(e.path, bases), []).append(e)
    return [SubStore(store, b, mine[b], mine=True) for b in bases]


def open_store(location: str, **kw) -> LocalStore | S3Store:
    """A store for a directory path or an ``s3://bucket/prefix`` URL."""
    if location.startswith("s3://"):
        return S3Store(location, **kw)
    if not os.path.isdir(location):
        raise FileNotFoundError(2, "no such archive directory", location)
    return LocalStore(location)
