"""Capture files on the receiver: one merged file or one file per sensor, with rotation.

Files are written as ``NAME.part`` and renamed when complete, so a file with its final name
is always whole. After a crash, :meth:`FileSink.recover` truncates each ``.part`` file to the
size recorded at the last acknowledged flush (the sensors resend everything after it) and
renames it: nothing acknowledged is lost and nothing is written twice. An existing file is
never overwritten: the next free name ``stem~N.ext`` is used.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from pktstream._capture import PacketBatch, link_type_name
from pktstream.exceptions import ConfigError
from pktstream.formats import fsync_dir
from pktstream.formats.writer import CaptureWriter, format_from_name, rotated_files, rotated_name_re, split_ext
from pktstream.sinks.base import Sink, Source

log = logging.getLogger("pktstream.stream.receiver")

def safe_name(text: str) -> str:
    """A sensor-supplied name as a single harmless path component. Names that had to be
    changed get a short hash of the original, so two different ids never share a file."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100].lstrip(".") or "_"
    if cleaned != text:
        cleaned += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return cleaned


def _free_name(base: str, sep: str = "~", floor: int = 0) -> tuple[str, int]:
    """The name a non-rotating output of ``base`` opens, and its number: ``base`` (0) if no
    file of its names exists, else ``stem<sep>N.ext`` (``sep`` ``~``, which no sensor id holds:
    the archive tells the suffix from an id ending in a number, ``node.12``, and no other
    output's or a dated copy's name, ``cap.20240601.pcap``, is taken for one; states before
    2026-12-04 have ``.`` for a path output) numbered past every file of its names present
    (also as ``.part``) and at least ``floor``. Never overwrites; and numbers only grow, so
    recovery tells the files opened after a saved state (higher numbers) from those before."""
    stem, ext = split_ext(base)
    ext = ext or ".pcap"
    numbers = _free_numbers(base, sep, part=None)
    n = max(floor, max(numbers) + 1 if numbers else 0)
    return (f"{stem}{ext}" if n == 0 else f"{stem}{sep}{n}{ext}"), n


def _free_re(base: str, sep: str, part: bool | None) -> re.Pattern[str]:
    """The names of a non-rotating output of ``base``: ``stem.ext`` and the free names
    (``stem<sep>N.ext``, :func:`_free_name`; group 1: N), completed (``part`` False), ``.part``
    (True) or both (None)."""
    stem, ext = split_ext(os.path.basename(base))
    suffix = {False: "", True: r"\.part", None: r"(?:\.part)?"}[part]
    return re.compile(rf"{re.escape(stem)}(?:{re.escape(sep)}([1-9]\d*))?{re.escape(ext or '.pcap')}{suffix}")


def _free_numbers(base: str, sep: str, part: bool | None) -> dict[int, str]:
    """The files of ``base``'s names present (:func:`_free_re`): number -> path."""
    d = os.path.dirname(base) or "."
    name_re = _free_re(base, sep, part)
    try:
        names = os.listdir(d)
    except OSError:
        return {}
    found = {}
    for name in names:
        m = name_re.fullmatch(name)
        if m:
            found[int(m.group(1) or 0)] = os.path.join(os.path.dirname(base), name)
    return found


def _make_dir(d: str) -> None:
    """Create the output directory: its last component only (like mkdir without -p), so a
    typo does not silently create a whole tree."""
    if os.path.isdir(d):
        return
    parent = os.path.dirname(os.path.abspath(d))
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create output directory {d}: {parent} does not exist")
    try:
        os.mkdir(d, 0o750)
    except FileExistsError:
        if not os.path.isdir(d):
            raise ConfigError(f"output directory {d} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {d}: {(exc.strerror or str(exc)).lower()}") from None


def _check_writable(d: str, what: str) -> None:
    """Create and remove a file in ``d``: the test that counts (permissions, read-only mounts)."""
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(prefix=".pktstream-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write {what}: {d}: {(exc.strerror or str(exc)).lower()}") from None


def _writer_state(writer: CaptureWriter) -> dict[str, Any] | None:
    final = writer.current_path
    st: dict[str, Any]
    if final is None:
        done = writer.last_completed
        if done is None:
            return None
        # a rotating output with no file open (time rotation completed it): the files it opens
        # after this flush hold nothing acknowledged, so recovery needs its place all the same
        final, seq, size, stream = done
        st = {"part": writer.data_path_of(final), "final": final, "size": size, "seq": seq,
              "pattern": writer.name_pattern}
    else:
        stream = writer.stream_bytes
        st = {"part": writer.data_path_of(final), "final": final, "size": os.fstat(writer.fileno()).st_size}
        if writer.current_seq is not None:  # rotating: recovery removes later files (entirely unacknowledged)
            st.update(seq=writer.current_seq, pattern=writer.name_pattern)
    if writer.format.endswith(".zst"):
        # recovery keeps this many decoded bytes: a re-encoded file (recovery, a reset) has
        # another size, and a cut at the old byte offset would lose acknowledged packets
        st["stream_bytes"] = stream
    if writer.zstd_frame_bytes:
        st["zstd_frame_bytes"] = writer.zstd_frame_bytes  # recovery keeps the seekable layout
    return st


UNACKED_PREFIX = ".pktstream-unacked-"  # a marker: files of an output no acknowledged state names yet


def _state_entries(state: dict[str, Any], fields: tuple[str, ...] = ("open", "names")) -> list[dict[str, Any]]:
    """The entries of a state's ``open`` and ``names`` lists (anything but a dict ignored)."""
    out: list[dict[str, Any]] = []
    for field in fields:
        value = state.get(field)
        if isinstance(value, list):
            out += [f for f in value if isinstance(f, dict)]
    return out


def _output_key(entry: Any) -> tuple[Any, ...] | None:
    """The output key of a state entry (``output``: [sensor id or None, link type or None])."""
    out = entry.get("output") if isinstance(entry, dict) else None
    return tuple(out) if isinstance(out, list) and len(out) == 2 else None


def _stream_bytes(st: dict[str, Any]) -> int | None:
    """A state entry's decoded bytes acknowledged (``.zst`` files; None: not recorded, as in
    states written before it, or not a ``.zst`` file)."""
    v = st.get("stream_bytes")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class FileSink(Sink):
    """Write batches to capture files.

    :param path: merged output (``.pcap``, ``.pcapng``, ``.pcap.zst``, ``.pcapng.zst``). pcapng
        holds every sensor interface as its own interface; pcap gets one file per link type
        (``NAME.<LINKTYPE>.pcap`` for the second and later ones).
    :param directory: per-sensor files ``DIR/<sensor id>.<format>`` instead of one merged file.
    :param rotate_bytes: start a new file past this size (tcpdump ``-C``).
    :param rotate_seconds: start a new file after this time (tcpdump ``-G``).
    :param max_files: keep only the newest N files per output (tcpdump ``-W``).
    :param fsync: fsync at every flush (power-loss durability before acknowledging).
    :param index: index every completed file as it is written (docs/ARCHIVE.md): True for the
        output directory (or the merged file's directory) as the archive root, or a root path.
    :param index_max_flows: the index's memory bound: flow records held per open file before
        they are spilled to a row group (docs/ARCHIVE.md; 0: no bound).
    :param zstd_frame_bytes: ``.zst`` formats: write the seekable layout with frames of about
        this many uncompressed bytes (docs/ARCHIVE.md); None (default): one frame per file.

    Rotation and file formats are :class:`pktstream.formats.CaptureWriter`'s.
    """

    name = "file"

    def __init__(self, path: str | None = None, *, directory: str | None = None, format: str | None = None,
                 rotate_bytes: int | None = None, rotate_seconds: float | None = None,
                 max_files: int | None = None, fsync: bool = False, mode: int = 0o640,
                 hostname: str | None = None, gate: bool = True, index: bool | str = False,
                 zstd_frame_bytes: int | None = None, index_max_flows: int | None = None) -> None:
        if (path is None) == (directory is None):
            raise ValueError("FileSink needs exactly one of path or directory")
        self.path = os.fspath(path) if path else None
        self.directory = os.fspath(directory) if directory else None
        if self.path and format and format_from_name(self.path) != format:
            # (recovery, readers and the index go by the name: a .zst format in a .pcap name
            # would be cut like a pcap file after a crash)
            raise ConfigError(f"{self.path}: a {format} file is named *.{format}; name it so, or leave the format "
                              "out (the name gives it)")
        self.format = format or (format_from_name(self.path) or "pcap" if self.path else "pcapng")
        self.gate = gate
        self.opts: dict[str, Any] = dict(rotate_bytes=rotate_bytes, rotate_seconds=rotate_seconds, max_files=max_files,
                         fsync=fsync, mode=mode, hostname=hostname,
                         on_complete=_log_completed)  # (an S3 output's staging replaces it)
        if zstd_frame_bytes is not None:
            from pktstream.formats.writer import MAX_ZSTD_FRAME_BYTES
            if not 0 < zstd_frame_bytes <= MAX_ZSTD_FRAME_BYTES:
                raise ConfigError(f"zstd frame size {zstd_frame_bytes}: give 1 B .. 1 GiB")
            if not self.format.endswith(".zst"):
                raise ConfigError(f"a zstd frame size needs a .zst format, not {self.format}")
            self.opts["zstd_frame_bytes"] = zstd_frame_bytes
        self.indexer = None  # pktstream.archive.live.LiveIndexer when index is on
        self._outputs: dict[Any, CaptureWriter] = {}
        self._flushed: dict[Any, dict[str, Any]] = {}  # output key -> its state at the last flush
        self._done: list[str] = []  # files completed by earlier writers (after a reset)
        # outputs whose reset failed: (abandoned writer, the file it had open, its state at the
        # last flush), retried by every reset; flush() refuses while any is left
        self._pending_resets: list[tuple[CaptureWriter, str | None, dict[str, Any] | None]] = []
        self._reset_error: Exception | None = None
        self._in_place_reset = False  # an in-place output was reset: it goes on in a new file
        # rotating name pattern -> the lowest number its next writer may give a file: the
        # persisted state may name lower ones until the next commit (a reset, or a recovered
        # state), and a staging directory (S3) no longer holds the files that used them
        self._seq_floor: dict[str, int] = {}
        # output key -> the name pattern it was given: kept across resets (and resumed from the
        # state) so an output keeps its names -- the state and its recovery go by them
        self._bases: dict[Any, str] = {}
        # a non-rotating output moves on to a free name after a reset (NAME~1.pcapng): output key
        # -> the number of its file open now, and the lowest its next one may get (a reset may
        # remove its file; the number is not used again)
        self._free_seq: dict[Any, int] = {}
        self._free_floor: dict[Any, int] = {}
        # output keys (free names) and rotating patterns whose floor was raised past the files
        # in their directory once: a state's numbers alone may be below files another run wrote
        self._floor_checked: set[Any] = set()
        # crash safety of outputs no persisted state names yet (a receiver with a state dir:
        # recover_unacknowledged turns it on): the names of the files such an output opens go
        # into a marker file (UNACKED_PREFIX) first, removed by persisted() when a state naming
        # the output is saved -- before anything in it is acknowledged -- so a marker always
        # lists files of which nothing was acknowledged; the next run removes them
        self._markers = False
        self._closed = False
        self._marker_owner: str | None = None  # the receiver's state (recover_unacknowledged)
        self._owner: str | None = None  # the same for the writer record (set_owner; every output)
        self._marker_lock = threading.Lock()  # _named, _marked: output thread and state writer thread
        self._writer_dirs: set[str] = set()  # directories whose writer record names this run's owner
        self._writer_failed: dict[str, OSError] = {}  # ... and those where setting it failed (flush: again)
        self._entry_synced: dict[Any, str] = {}  # --fsync: per output, the file whose directory entry is synced
        self._concurrent: set[str] = set()  # ... and those where another run took it over (said once)
        self._named: set[Any] = set()  # outputs a persisted state names
        self._marked: dict[Any, tuple[str, list[str]]] = {}  # output -> (its marker, files listed)
        self.name = f"file:{self.path or self.directory}"
        # a path without a capture extension is written as pcap under exactly that name,
        # growing in place like PacketStreamer's output.file.path (tail -F NAME | tcpdump -r -)
        self.in_place = bool(self.path and not split_ext(self.path)[1] and not format
                             and not (rotate_bytes or rotate_seconds or max_files))
        if self.directory:
            _make_dir(self.directory)
            _check_writable(self.directory, self.directory)
        else:
            assert self.path is not None  # exactly one of path and directory
            d = os.path.dirname(os.path.abspath(self.path))
            if "%" not in d:
                try:
                    is_dir = os.path.isdir(d) or os.stat(d) and False
                except OSError as exc:
                    why = "does not exist" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc)).lower()
                    raise ConfigError(f"cannot write {self.path}: directory {d} {why}") from None
                if not is_dir:
                    raise ConfigError(f"cannot write {self.path}: {d} is not a directory")
                _check_writable(d, self.path)
            if self.in_place and os.path.exists(self.path):
                raise ConfigError(f"{self.path} exists and pktstream never overwrites a capture: remove "
                                  "it, or name a .pcap/.pcapng file (then the next free name is used)")
        if index:
            if self.in_place:
                raise ConfigError(f"{self.path}: an index needs files that are completed (a .pcap/.pcapng name)")
            from pktstream.archive.live import LiveIndexer
            root: str = index if isinstance(index, str) else (
                self.directory or os.path.dirname(os.path.abspath(self.path or ".")))
            if "%" in root:
                raise ConfigError(f"index root {root}: give a directory without strftime patterns")
            self.indexer = LiveIndexer(root, **max_flows_option(index_max_flows))

    def _output_for(self, source: Source, batch: PacketBatch) -> CaptureWriter:
        single_link = not self.format.startswith("pcapng")
        key = (source.sensor_id if self.directory else None, batch.link_type if single_link else None)
        out = self._outputs.get(key)
        if out is None:
            base = self._bases.get(key) or self._new_base(key, source, batch)
            in_place = self.in_place and base == self.path and not self._in_place_reset
            if self._rotating or in_place:
                name = base
            else:
                name, n = _free_name(base, self._sep, self._free_floor.get(key, 0))
                self._free_seq[key], self._free_floor[key] = n, n + 1
            on_open = None if in_place else functools.partial(self._opening, key)
            out = self._outputs[key] = CaptureWriter(name, format=self.format, in_place=in_place,
                                                     observer=self.indexer, first_seq=self._seq_floor.get(name, 0),
                                                     on_open=on_open, **self.opts)
            named = self._rotating and self.opts.get("on_complete") is _log_completed  # (not an S3 output's staging)
            log.info("writing %s%s", name, " (rotated; each completed file is named)" if named else "")
        return out

    @property
    def _rotating(self) -> bool:
        return bool(self.opts["rotate_bytes"] or self.opts["rotate_seconds"] or self.opts["max_files"])

    _sep = "~"  # of free names (:func:`_free_name`)

    def _names_of(self, key: Any) -> dict[str, Any]:
        """An output's names as the state keeps them: its key, name pattern and the separator of
        its free names."""
        return {"output": list(key), "base": self._bases[key], "sep": self._sep}

    def _next_free(self, key: Any) -> int:
        """The lowest number a non-rotating output's next file may get: past its last file
        opened here and the state's, and past every file of its names in the directory (one
        look, then kept)."""
        if key not in self._floor_checked:
            self._floor_checked.add(key)
            past = _free_name(self._bases[key], self._sep)[1]
            self._free_floor[key] = max(self._free_floor.get(key, 0), past)
        return self._free_floor[key]

    def _next_seq_floor(self, base: str, floor: int) -> int:
        """The same for a rotating output with no file open: ``floor`` (the state's, or past its
        last file here), raised past every file of its pattern in the directory (one look)."""
        if base not in self._floor_checked and "%" not in base:
            self._floor_checked.add(base)
            numbers = [n for n, _ in rotated_files(base, os.path.dirname(base) or ".", parts=True)]
            floor = self._seq_floor[base] = max([floor, *(n + 1 for n in numbers)])
        return floor

    def _new_base(self, key: Any, source: Source, batch: PacketBatch) -> str:
        """The name pattern of a new output (recorded: a reset does not rename it)."""
        if self.directory:
            base = os.path.join(self.directory, safe_name(source.sensor_id) + "." + self.format)
        else:
            base = cast(str, self.path)  # no directory: a path
        if key[1] is not None and any(k[0] == key[0] for k in self._bases):
            stem, ext = split_ext(base)  # a second link type of a pcap output
            base = f"{stem}.{safe_name(link_type_name(batch.link_type))}{ext}"
        used = set(self._bases.values())
        if base in used:  # (sensor "s1.LINUX_SLL" and sensor s1's second link type): never one name for two
            stem, ext = split_ext(base)
            n = 2
            while f"{stem}-{n}{ext}" in used:
                n += 1
            base = f"{stem}-{n}{ext}"
        self._bases[key] = base
        return base

    def open_paths(self) -> set[str]:
        """Final names of the files being written now (not the caller's to touch)."""
        # (a copy first: stats() calls this from another thread while outputs are added)
        return {w.current_path for w in list(self._outputs.values()) if w.current_path is not None}

    def write(self, source: Source, batch: PacketBatch) -> None:
        self._output_for(source, batch).write(batch)

    # -- outputs no persisted state names (a receiver with a state dir) -----------------------
    def persisted(self, state: dict[str, Any] | None) -> None:
        """A receiver saved a state holding ``state`` as this output's (its state writer thread,
        before it acknowledges anything that state covers): the markers of the outputs it names
        go. Raises OSError when one cannot be removed, or when the state holds nothing for this
        sink after it was closed while markers are out -- the receiver then treats the save as
        failed and acknowledges nothing (a marker must never list acknowledged packets). (None
        before the first flush is normal: such a save acknowledges nothing this sink wrote.)"""
        if not state:
            with self._marker_lock:
                if self._closed and self._marked:
                    raise OSError(errno.EAGAIN, f"{self.name}: a state naming none of its outputs while "
                                                f"{len(self._marked)} are unacknowledged")
            return
        keys = {_output_key(f) for f in _state_entries(state)}
        with self._marker_lock:
            self._named |= keys - {None}
            for key in keys & set(self._marked):
                marker, _files = self._marked[key]
                try:
                    os.unlink(marker)
                except FileNotFoundError:
                    pass
                del self._marked[key]

    def _marker_dir(self) -> str | None:
        """Where this sink's markers are: its directory (None: a strftime pattern in it)."""
        d = self.directory or os.path.dirname(os.path.abspath(cast(str, self.path)))
        return None if "%" in d else d

    def _marker_sink(self) -> str:
        """This sink in its markers: its directory or path, resolved (``dir`` and ``dir/``,
        or a symlink, are one sink)."""
        return "file:" + os.path.realpath(cast(str, self.directory or self.path))

    @staticmethod
    def _owner_tag(owner: str) -> str:
        return hashlib.sha1(owner.encode()).hexdigest()[:8]

    def _marker_path(self, base: str) -> str | None:
        d = self._marker_dir()
        if d is None or self._marker_owner is None:
            return None
        # one per owner (receiver state), sink and output; the owner's tag leads the name
        digest = hashlib.sha1(f"{self._marker_owner}\0{self._marker_sink()}\0{base}".encode()).hexdigest()[:16]
        return os.path.join(d, f"{UNACKED_PREFIX}{self._owner_tag(self._marker_owner)}-{digest}.json")

    def _opening(self, key: Any, path: str) -> None:
        """(Output thread, before the first byte of a file of output ``key``.) The directory's
        writer record names this run's owner (once per directory: :func:`_set_writer`). While no
        persisted state names the output, the file's name is added to its marker first (written
        whole and renamed): a crash then leaves the next run the list of files that hold only
        unacknowledged packets."""
        self._set_writer(os.path.dirname(os.path.abspath(path)))
        if not self._markers:
            return
        with self._marker_lock:
            if key in self._named:
                return
            marker, files = self._marked.get(key) or (self._marker_path(self._bases[key]), [])
            if marker is None:
                return
            files.append(os.path.abspath(path))
            tmp = marker + ".tmp"
            try:
                with open(tmp, "w") as fh:
                    json.dump({"sink": self._marker_sink(), "owner": self._marker_owner, "base": self._bases[key],
                               "files": files}, fh)
                    if self.opts["fsync"]:  # (power-loss durability: the marker before the file)
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, marker)
                if self.opts["fsync"]:
                    fsync_dir(os.path.dirname(marker))
            except OSError:
                files.pop()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._marked[key] = (marker, files)

    def _set_writer(self, d: str) -> None:
        """:func:`_set_writer` for directory ``d`` before each file there: the record names the
        run that opened a file there last (a run writing there at the same time as this one
        took it over: said once, and it is this run's again); a failure is tried again by the
        next file and by every flush, which refuses while it fails (with an owner: a saved state
        must not name files in a directory whose record is not its owner's -- its recovery
        would keep their unacknowledged tails, packets twice)."""
        if d in self._writer_dirs and self._owner is not None:
            found, writer = _writer_of(d)
            if found and writer == self._owner:
                self._writer_failed.pop(d, None)  # (set after all: a failed fsync of the directory, another output's)
                return
            if d in self._concurrent:
                pass  # (said once)
            elif isinstance(writer, _Unreadable):
                self._concurrent.add(d)  # (written again below, which says why if it fails)
                log.warning("%s: %s: written again", os.path.join(d, WRITER_RECORD), writer)
            else:
                self._concurrent.add(d)
                log.warning("%s: another receiver or run (%s) writes there while this one does: give each "
                            "receiver a directory of its own (a crash recovery of either keeps the files "
                            "there that its state does not name while the other was the last to open a "
                            "file, packets may be twice; where their file names meet, it may remove the "
                            "other's)", d, f"{WRITER_RECORD}: {writer}" if found else f"no {WRITER_RECORD}")
        error = _set_writer(d, self._owner, self.opts["fsync"])
        if error is None:
            self._writer_dirs.add(d)
            self._writer_failed.pop(d, None)
        else:
            self._writer_failed[d] = error

    def set_owner(self, owner: str | None) -> None:
        """The receiver's state (file and id) that this run's writer records name (a best-effort
        output gets it too: it must not take the gating outputs' record for a stranger's)."""
        self._owner = owner

    def recover_unacknowledged(self, state: dict[str, Any] | None, owner: str | None = None, *,
                               earlier_owner: str | None = None) -> list[str]:
        """At start (a receiver, after :meth:`recover` and before the first write; ``state``:
        this output's persisted state, if any; ``owner``: the receiver's state, None without a
        state dir; ``earlier_owner``: the name a version before 2026-12-04 gave that same state --
        its file only, without the id -- whose markers are this owner's too). The files listed
        in this sink's markers of ``owner`` are removed -- with their indexes, and the markers
        -- unless ``state`` names their output: they are of outputs no saved state named (a
        sensor first seen after the last acknowledged flush), nothing in them was acknowledged,
        the sensors resend it, and keeping them would hold those packets twice. Markers of
        another owner (another receiver writing into this directory, or a run with another or no
        state dir) are only removed: their files stay (at worst twice), since only their own
        state can tell. With an owner, this sink keeps
        markers from then on (:meth:`persisted`). Returns the paths removed."""
        self._marker_owner = self._owner = owner
        self._markers = owner is not None
        d = self._marker_dir()
        if d is None or not os.path.isdir(d):
            return []
        with contextlib.suppress(OSError):
            _remove_dead_writer_tmps(d)  # (also where this run writes nothing)
        named = {f.get("base") for f in _state_entries(state or {})}
        mine = self._marker_sink()
        owners = {o for o in (owner, earlier_owner) if o is not None} if owner is not None else set()
        tmp_prefixes = tuple(f"{UNACKED_PREFIX}{self._owner_tag(o)}-" for o in owners)
        removed: list[str] = []
        # the files a marker lists are removed only while this owner was the directory's last
        # writer (or, no record, a version before writer records was: the earlier owner's);
        # after another, a file of that name may be the other's (recover's _Sweep does the same)
        found, writer = _writer_of(d)
        ours = (writer in owners) if found else earlier_owner is not None
        for name in sorted(os.listdir(d)):
            if name.startswith(UNACKED_PREFIX) and name.endswith(".json.tmp"):
                if tmp_prefixes and name.startswith(tmp_prefixes):
                    # this owner's marker being written when the process died (before its file)
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, name))
                continue
            if not (name.startswith(UNACKED_PREFIX) and name.endswith(".json")):
                continue
            marker = os.path.join(d, name)
            try:
                with open(marker) as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                log.warning("recovery: %s unreadable (%s): left as it is", marker, exc)
                continue
            if not isinstance(data, dict) or data.get("sink") != mine:
                continue  # (another output's, in the same directory)
            files = data.get("files")
            if data.get("owner") not in owners:
                log.warning("recovery: %s is another receiver's or run's (state %s): its files stay "
                            "(packets it lists may be there twice)", marker, data.get("owner"))
            elif data.get("base") not in named and isinstance(files, list) and not ours:
                log.warning("recovery: %s; the files %s lists stay (packets there may be there twice)",
                            _written_since(d, found, writer), marker)
            elif data.get("base") not in named and isinstance(files, list):
                for f in files:
                    # (only files of this directory: a marker names nothing else)
                    if not isinstance(f, str) or os.path.dirname(f) != os.path.abspath(d):
                        continue
                    why = "opened after the last acknowledged flush"
                    if _unlink(f + ".part", why):
                        removed.append(f + ".part")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f + ".part.tmp")  # (a .zst re-encode of it a crash cut short)
                    # (its index before it, also when the file is gone: a recovery killed between
                    # the two left the row, and the marker, which goes only after all its files)
                    if self._remove_file(f, why):
                        removed.append(f)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
        return removed

    def reset(self) -> None:
        """After a failed write or flush (disk full, I/O error; an S3 output's full staging):
        every output goes back to its last flush -- the file open then is cut back to its size
        at that flush and completed, files that rotation completed or opened since are removed
        (a write group may span rotations) -- and new files start on the next write. The
        receiver then rewrites everything since the last flush, so nothing is lost or doubled.
        An output whose reset fails (a second I/O error) is retried by every later reset, and
        :meth:`flush` refuses until it worked: nothing is acknowledged past a flush whose file
        is not back to it (the persisted state still names it, so a crash meanwhile is
        recovered from it)."""
        errors = self._retry_pending_resets()  # (a reset that failed before: again, first)
        for key, out in self._outputs.items():
            opened: str | None = None
            flushed = self._flushed.get(key)  # (None: nothing of this output was flushed)
            try:
                opened = out.abandon()
                self._reset_output(out, opened, flushed)
            except Exception as exc:  # (the others are reset all the same, and every writer replaced:
                errors.append(exc)    # an abandoned one would reopen its name and truncate it)
                self._pending_resets.append((out, opened, flushed))
        for out in self._outputs.values():  # (a number the persisted state names is never reused)
            if out.in_place:  # a new in-place writer would truncate the file (its flushed data): a new one
                self._in_place_reset = True
            if out.name_pattern is not None and out.numbered:
                # (a writer that never opened a file never looked at the directory: its number
                # says nothing of the files there, and a state's next_seq must be past them all)
                self._seq_floor[out.name_pattern] = max(self._seq_floor.get(out.name_pattern, 0), out.next_seq)
        self._outputs.clear()  # new writers, new (free) names: a completed file is never reopened
        self._flushed.clear()
        if errors:
            if self._pending_resets:
                self._reset_error = errors[0]
            raise errors[0]

    def _retry_pending_resets(self) -> list[Exception]:
        """Try the resets that failed before again; those failing again stay pending. Returns
        their errors."""
        errors: list[Exception] = []
        pending, self._pending_resets = self._pending_resets, []
        for out, current, st in pending:
            try:
                self._reset_output(out, current, st)
            except Exception as exc:
                errors.append(exc)
                self._pending_resets.append((out, current, st))
        return errors

    def _reset_output(self, out: CaptureWriter, current: str | None, st: dict[str, Any] | None) -> None:
        """One output of :meth:`reset`, whose writer was abandoned (``current``: the file it had
        open). Repeatable: a second run after a failure part-way does what the first left (a
        file already cut back and completed stays so; indexes go before their files)."""
        completed = list(out.paths)
        removed: list[str] = []
        cut: str | None = None
        if current is not None and st is not None and current == st["final"]:
            # (completed already: by a run of this that failed after the rename)
            if (_cut_and_complete(out.data_path_of(current), current, st["size"], st.get("zstd_frame_bytes"),
                                  _stream_bytes(st)) or (not out.in_place and os.path.exists(current))):
                completed.append(current)
        else:
            if current is not None:  # opened after the flush: nothing in it was acknowledged
                _cut_and_complete(out.data_path_of(current), current, 0)
            if st is None:
                removed = [p for p in completed if self._remove_file(p)]
            else:
                part = out.data_path_of(st["final"])
                # a cut-back of an earlier try that failed half-way (a .zst file goes back to its
                # .part name to be re-encoded): finished now, never left .part
                finished = (part != st["final"] and not os.path.exists(st["final"]) and os.path.exists(part)
                            and _cut_and_complete(part, st["final"], st["size"], st.get("zstd_frame_bytes"),
                                                  _stream_bytes(st)))
                if os.path.exists(st["final"]):  # completed by a rotation after the flush (also when
                    if st["final"] not in completed:  # the writer failed after its rename: unindexed)
                        completed.append(st["final"])
                        cut = st["final"]
                    if finished or _cut_back_completed(st["final"], st["size"], st.get("zstd_frame_bytes"),
                                                       _stream_bytes(st)):
                        cut = st["final"]
                removed = _remove_later_rotations(st, before_unlink=self._forget_index)
                after = completed.index(st["final"]) + 1 if st["final"] in completed else len(completed)
                removed += [p for p in completed[after:] if self._remove_file(p)]  # (in case the names moved on)
        self._done.extend(p for p in completed if p not in removed and os.path.exists(p) and p not in self._done)
        if self.indexer is not None:
            fixed = [p for p in (cut, current) if p is not None and p in self._done]
            if fixed:
                self.indexer.repair_paths(fixed)
        if out.in_place:
            log.warning("%s: written on in %s after the error (a capture file is never truncated)",
                        out.name_pattern, _free_name(cast(str, out.name_pattern))[0])

    def _forget_index(self, path: str) -> None:
        """Remove the index of a capture file about to be removed (first: a failure or crash
        between the two then leaves a file without index -- scanned by queries, indexed by the
        next repair -- never an index row of a file that is gone)."""
        if self.indexer is not None:
            self.indexer.removed(path)

    def _remove_file(self, path: str, why: str = "written after the last acknowledged flush") -> bool:
        """:func:`_unlink` after :meth:`_forget_index` (also when the file is gone already: a
        run that failed after the unlink)."""
        self._forget_index(path)
        return _unlink(path, why)

    def flush(self) -> dict[str, Any]:
        if self._pending_resets:  # (the caller resets, which tries them again, and writes again)
            raise ResetPending(f"{len(self._pending_resets)} output(s) not yet back to their last flush after a "
                               f"failed reset: {self._reset_error}")
        for d in list(self._writer_failed):
            self._set_writer(d)
        if self._writer_failed and self._owner is not None:
            d, exc = next(iter(self._writer_failed.items()))
            raise OSError(exc.errno, f"{os.path.join(d, WRITER_RECORD)} not written: {exc.strerror or exc} "
                                     "(nothing is acknowledged until it is)")
        open_files = []
        flushed = {}
        for key, out in self._outputs.items():
            out.flush()
            if self.opts["fsync"] and out.current_path is not None:
                os.fsync(out.fileno())
                if self._entry_synced.get(key) != out.current_path:
                    # a new file's name must survive a power loss too, before anything in it is
                    # acknowledged (POSIX: only a sync of its directory makes it durable)
                    fsync_dir(os.path.dirname(os.path.abspath(out.current_path)))
                    self._entry_synced[key] = out.current_path
            st = _writer_state(out)
            if st is not None:
                # which output, and the names it gives files: recovery removes only .part files
                # of those names, and the next run keeps them (resume)
                st.update(self._names_of(key))
                if key in self._free_seq and not out.in_place:
                    st["free"] = self._free_seq[key]  # (recovery removes its names' higher numbers)
                open_files.append(st)
                flushed[key] = st
        # outputs with no file open at this flush (opened after a reset, a second link type):
        # any .part of theirs at a crash holds only what is resent
        names = []
        for k in self._bases:
            if k in flushed:
                continue
            entry = {**self._names_of(k), "rotating": self._rotating}
            floor = self._seq_floor.get(entry["base"])
            if self._rotating and floor is not None:
                # the lowest number its next file gets: every file of its pattern numbered so is
                # newer than this flush (recovery removes them; before, rotated ones stayed)
                entry["next_seq"] = self._next_seq_floor(entry["base"], floor)
            elif not self._rotating:  # the same for the free names of one that does not rotate
                entry["next_free"] = self._next_free(k)
                if k in self._outputs and k in self._free_seq:
                    # its writer has not opened its file yet (an empty first batch, a failed
                    # open): the number it reserved is still to come, and newer than this flush
                    entry["next_free"] = min(entry["next_free"], self._free_seq[k])
            names.append(entry)
        self._flushed.update(flushed)  # (only when every output flushed: a reset goes back to one state)
        state: dict[str, Any] = {"open": open_files}
        if names:
            state["names"] = names
        if self.indexer is not None and getattr(self.indexer, "recover_root", False):
            state["index_root"] = self.indexer.root
        if self._owner is not None:  # (recovery sweeps a directory only while it is the writer)
            state["owner"] = self._owner
        return state

    def tick(self) -> None:
        """Idle: complete the files whose ``rotate_seconds`` have passed, so a quiet sensor's
        file is closed on time (tcpdump -G waits for the next packet); the index's catalog
        snapshot is refreshed when one was held back."""
        if self.opts["rotate_seconds"]:
            for out in self._outputs.values():
                out.rotate_if_due()
        if self.indexer is not None:
            self.indexer.idle()  # (a catalog snapshot held back)

    @property
    def paths(self) -> list[str]:
        """Completed files, oldest first."""
        return self._done + [p for out in self._outputs.values() for p in out.paths]

    def close(self) -> None:
        """Complete every open file; the first error is raised after all were tried (a file
        that could not be completed stays ``.part``, for recovery)."""
        error: Exception | None = None
        self._closed = True  # (persisted: a state after this one names none of its outputs)
        for exc in self._retry_pending_resets():  # a failed reset's last try (else: the next start's recovery)
            log.error("going back to the last flush: %s", exc)
            error = error or exc
        self._pending_resets = []
        for out in self._outputs.values():
            try:
                out.close()
            except Exception as exc:  # noqa: BLE001 - the other outputs' files are completed all the same
                left = out.abandon()  # (its descriptor is closed; the .part stays for recovery)
                log.error("completing %s: %s", left or out.name_pattern, exc)
                error = error or exc
        if self.indexer is not None:
            self.indexer.close()
        if error is not None:
            raise error

    def resume(self, state: dict[str, Any]) -> None:
        """Files of a rotating output are numbered after those the state names: a new writer
        numbers after the files of its pattern in the directory, and a staging directory (S3)
        may no longer hold them; a file with the number of the state's open one would be taken
        for it by the next recovery (cut back to its size and kept, though nothing in it was
        acknowledged)."""
        pcap = not self.format.startswith("pcapng")  # (a pcap output has one per link type)
        for f in _state_entries(state):
            pattern, seq = f.get("pattern"), f.get("seq")
            if isinstance(pattern, str) and isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                self._seq_floor[pattern] = max(self._seq_floor.get(pattern, 0), seq + 1)
            first = _next_seq(f)  # (an output with no file open at that flush: its next number)
            if first is not None:
                self._seq_floor[f["base"]] = max(self._seq_floor.get(f["base"], 0), first)
            key, base = _output_key(f), f.get("base")
            free = _free_first(f)  # (free names: past the state's too, also if its file is gone)
            if key is not None and free is not None:
                self._free_floor[key] = max(self._free_floor.get(key, 0), free)
            if (key is not None and isinstance(base, str) and (key[0] is None or isinstance(key[0], str))
                    and (isinstance(key[1], int) if pcap else key[1] is None)
                    and base not in self._bases.values()):
                self._bases.setdefault(key, base)  # (the names the state's recovery goes by)
            if key is not None and self._bases.get(key) == base:
                self._named.add(key)  # (a persisted state names it: no marker)

    @staticmethod
    def recover(state: dict[str, Any], persist: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Cut each file open at the last acknowledged flush back to it and complete it,
        remove what was written only after it; returns the state with each file's size as
        completed (a ``.zst`` file is re-encoded, so its size changes: a second recovery from the
        old size would cut the new encoding at a byte offset of the old one), and hands it to
        ``persist`` after each file whose entry changed. Files other than those the state names
        are removed from a directory only while its writer record names the state's owner
        (:func:`_set_writer`; states without an owner: always): another writer's files there --
        a receiver without this state dir, one the sensors failed over to -- are kept (at worst
        packets twice, never an acknowledged file removed); indexes go before their files."""
        known = set()
        after: list[Any] = []
        entries = list(state.get("open", []))
        root = state.get("index_root")
        root = root if isinstance(root, str) and os.path.isdir(root) else None
        sweep = _Sweep(state.get("owner"), root, state.get("kept_dirs"))
        for k, f in enumerate(entries):
            part, final, size = f.get("part"), f.get("final"), f.get("size")
            if not (isinstance(part, str) and isinstance(final, str) and isinstance(size, int)):
                after.append(f)
                continue
            frame_bytes = f.get("zstd_frame_bytes")
            frame_bytes = frame_bytes if isinstance(frame_bytes, int) and frame_bytes > 0 else None
            known.add(part)
            # (in a directory another run wrote since, the name may be that run's file now --
            # ours completed and moved away -- so it is completed whole, never cut)
            ours = sweep.ok(os.path.dirname(final))
            if os.path.exists(part):
                if ours:
                    _cut_and_complete(part, final, size, frame_bytes, _stream_bytes(f))
                else:
                    _cut_and_complete(part, final, os.path.getsize(part), frame_bytes)
            elif ours:
                _cut_back_completed(final, size, frame_bytes, _stream_bytes(f))
            if ours:
                _remove_later_rotations(f, before_unlink=sweep.forget)
                _remove_later_free(f, before_unlink=sweep.forget)
            after.append({**f, "size": os.path.getsize(final)} if os.path.isfile(final) else f)
            if persist is not None and after[-1] != f:
                persist(sweep.noted({**state, "open": after + entries[k + 1:]}))
        for f in entries:
            if isinstance(f.get("final"), str) and sweep.ok(os.path.dirname(f["final"])):
                _remove_later_parts(f, known)
        unopened = _state_entries(state, ("names",))
        for f in unopened:
            base = f.get("base")
            if isinstance(base, str) and "%" not in base and sweep.ok(os.path.dirname(base)):
                _remove_parts_of_unopened(f, known, before_unlink=sweep.forget)
                _remove_later_free(f, before_unlink=sweep.forget)
        if root is not None:
            from pktstream.archive.live import recover_index
            # this output's files get their index (and removed ones lose theirs): the open ones'
            # and those an unopened rotating output may have completed after the flush
            recover_index(root, [*state.get("open", []),
                                 *({"final": f["base"], "pattern": f["base"], "seq": f["next_seq"]}
                                   for f in unopened if _next_seq(f) is not None),
                                 *({"dir": os.path.dirname(f["base"]) or ".",
                                    "names_re": _free_re(f["base"], f["sep"], part=False).pattern}
                                   for f in _state_entries(state) if _free_first(f) is not None)])
        return sweep.noted({**state, "open": after})


class ResetPending(OSError):
    """:meth:`FileSink.flush` refused: an output's reset failed and is not done yet (nothing may
    be acknowledged past its last flush until it is)."""


def _log_completed(path: str) -> None:
    """A file completed (rotation, close): its name as written (strftime patterns expanded)."""
    try:
        size = os.path.getsize(path)
    except OSError:  # (removed or moved meanwhile by someone else)
        size = -1
    log.info("completed %s (%d bytes)", path, size)


def _cut_back_completed(final: str, size: int, frame_bytes: int | None = None,
                        stream_bytes: int | None = None) -> bool:
    """A file completed by rotation after the last acknowledged flush: cut its tail (the
    sensors resend it); a .zst file is re-encoded from the whole blocks it held at that flush
    (its frame was ended by the rotation, after them) -- its first ``stream_bytes`` decoded
    bytes when known, so also when it was re-encoded since (by a reset after a write error or
    an interrupted recovery: another size). False if there was nothing to cut."""
    if not os.path.exists(final):
        return False
    actual = os.path.getsize(final)
    if not (actual > size or (stream_bytes is not None and actual != size and final.endswith(".zst"))):
        return False
    _drop_staged_index(final)  # (first: a crash after the cut must not leave the longer file's index)
    if final.endswith(".zst"):
        part = final + ".part"
        os.replace(final, part)  # back to its .part name: a crash now is recovered the same way
        _cut_and_complete(part, final, size, frame_bytes, stream_bytes)
    else:
        with open(final, "r+b") as fh:
            fh.truncate(size)
    log.warning("recovery: %s cut back to what was acknowledged (%d bytes)", final, size)
    return True


def _unlink(path: str, why: str = "written after the last acknowledged flush") -> bool:
    """Remove a completed file that holds only unacknowledged data (and its staged index,
    first: also when the file is gone already)."""
    _drop_staged_index(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    log.warning("removing %s (%s: the sensors resend it)", path, why)
    return True


def _remove_later_parts(f: dict[str, Any], known: set[str]) -> None:
    """Remove the ``.part`` files an output opened after the last acknowledged flush: they
    hold only unacknowledged data. Rotating: numbered after the flushed file (same expansion of
    its pattern); not rotating: after a reset (``NAME~1.pcapng``; ``NAME.1.pcap`` in states
    before 2026-12-04), by its ``base`` and ``sep`` in the state (states without them: nothing). Only names that output
    gives its files, not every ``.part`` whose name starts alike (another output's in the same
    directory may hold acknowledged data)."""
    base, sep, final, seq = f.get("base"), f.get("sep"), f.get("final"), f.get("seq")
    if not isinstance(final, str):
        return
    if isinstance(seq, int):
        # rotating: numbered after the flushed file, under the same expansion of its pattern
        # (a strftime field is not matched as such: it would match other outputs' names)
        stem, ext = split_ext(os.path.basename(final))
        m = re.fullmatch(r"(.*)\.\d{6,}", stem)
        if m is not None:
            name_re = re.compile(rf"{re.escape(m.group(1))}\.(\d{{6,}}){re.escape(ext)}\.part")
            _remove_parts(os.path.dirname(final), name_re, known, above=seq)
    elif isinstance(base, str) and sep in (".", "~"):
        # (only past the file open at the flush: a lower number is no file of this output's
        # opened after it -- another run's; states without the number: all)
        free = _free_first(f)
        for name_re in _free_parts_res(base, sep):
            _remove_parts(os.path.dirname(final), name_re, known, above=None if free is None else free - 1)


def _free_parts_res(base: str, sep: str) -> list[re.Pattern[str]]:
    """The ``.part`` names of a non-rotating output's free names: a state written before
    2026-12-04 with ``.`` (a path output) also ``~``, the names this version opens after it."""
    return [_free_re(base, s, part=True) for s in ([sep, "~"] if sep == "." else [sep])]


def _next_seq(f: dict[str, Any]) -> int | None:
    """A state ``names`` entry's ``next_seq`` (a rotating output's lowest next number), if any."""
    v = f.get("next_seq")
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and isinstance(f.get("base"), str) else None


def _remove_parts_of_unopened(f: dict[str, Any], known: set[str], *,
                              before_unlink: Callable[[str], None] | None = None) -> None:
    """An output with no file open at the last acknowledged flush (state ``names``): every
    ``.part`` of its names was opened after it and holds only what is resent, and so does
    every file of a rotating one numbered ``next_seq`` or higher (completed by rotation after
    the flush; states written before 2026-12-04 lack the number: those stay). Names with a
    strftime field are not swept (the field would match other outputs' names)."""
    base, sep, rotating = f.get("base"), f.get("sep"), f.get("rotating")
    if not (isinstance(base, str) and sep in (".", "~") and isinstance(rotating, bool)) or "%" in base:
        return
    names = [re.compile(rotated_name_re(base).pattern + r"\.part")] if rotating else _free_parts_res(base, sep)
    first = _next_seq(f) if rotating else _free_first(f)  # (from the state's next number on: see _remove_later_parts)
    for name_re in names:
        _remove_parts(os.path.dirname(base), name_re, known, above=None if first is None else first - 1)
    first = _next_seq(f)
    if rotating and first is not None:
        _remove_rotated(base, os.path.dirname(base) or ".", first, before_unlink=before_unlink)


def _free_first(f: dict[str, Any]) -> int | None:
    """The lowest free-name number of a non-rotating output (state entry) that a file opened
    after the flush has: past the file open at it (``free``), or ``next_free`` with none open.
    None: not such an entry (or a state written before 2026-12-04, without the numbers)."""
    base, sep, free, first = f.get("base"), f.get("sep"), f.get("free"), f.get("next_free")
    if not (isinstance(base, str) and sep in (".", "~")) or "%" in base:
        return None
    for n, add in ((free, 1), (first, 0)):
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n + add
    return None


def _remove_later_free(f: dict[str, Any], *, before_unlink: Callable[[str], None] | None = None) -> list[str]:
    """Remove the completed files a non-rotating output opened after the last acknowledged
    flush: its free names numbered :func:`_free_first` or higher (an output reset twice before
    the next saved state completes the file it moved on to, cut back to a flush no saved state
    names; nothing in it was acknowledged, the sensors resend it). Free names only grow
    (:func:`_free_name`), so no earlier file has such a number. Returns their paths."""
    first = _free_first(f)
    if first is None:
        return []
    files = sorted(_free_numbers(f["base"], f["sep"], part=False).items())
    return _remove_numbered(files, first, f.get("final"), "opened", before_unlink)


def _remove_parts(d: str, name_re: re.Pattern[str], known: set[str], above: int | None = None) -> None:
    """Remove the files in ``d`` whose names ``name_re`` matches (``above``: only those whose
    number, group 1, is higher), except ``known`` ones: opened after the last acknowledged
    flush, nothing in them was acknowledged."""
    d = d or "."
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        path = os.path.join(d, name)
        m = name_re.fullmatch(name)
        if m and (above is None or int(m.group(1) or 0) > above) and path not in known and os.path.isfile(path):
            log.warning("recovery: removing %s (opened after the last acknowledged flush: nothing in it "
                        "was acknowledged)", path)
            os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".tmp")  # (a re-encode of it that a crash interrupted)


def _remove_later_rotations(f: dict[str, Any], *, before_unlink: Callable[[str], None] | None = None) -> list[str]:
    """Remove the files a rotating writer completed or opened entirely after the last
    acknowledged flush (a flush group larger than the rotation size): they hold only
    unacknowledged batches, which the sensors resend. Such a file has the writer's name pattern
    and a higher sequence number than the file open at the flush: a writer numbers its files
    after every file of its pattern already in the directory, so no earlier file has one.
    Only the directory of the file open at the flush is searched (a strftime pattern in the
    directory part that moved on is not followed)."""
    seq, pattern, final = f.get("seq"), f.get("pattern"), f.get("final")
    if not (isinstance(seq, int) and isinstance(pattern, str) and isinstance(final, str)):
        return []  # a state written before these fields, or a writer that does not rotate
    return _remove_rotated(pattern, os.path.dirname(final) or ".", seq + 1, keep=final, before_unlink=before_unlink)


def _remove_rotated(pattern: str, directory: str, first: int, keep: str | None = None, *,
                    before_unlink: Callable[[str], None] | None = None) -> list[str]:
    """Remove the completed files of a rotating ``pattern`` in ``directory`` numbered ``first``
    or higher (except ``keep``): completed after the last acknowledged flush, nothing in them
    was acknowledged. ``before_unlink(path)`` runs before each removal (its index first).
    Returns their paths."""
    return _remove_numbered(rotated_files(pattern, directory), first, keep, "completed", before_unlink)


def _remove_numbered(files: Iterable[tuple[int, str]], first: int, keep: str | None, what: str,
                     before_unlink: Callable[[str], None] | None) -> list[str]:
    """Remove the completed ``files`` ((number, path)) numbered ``first`` or higher, except
    ``keep``, each after ``before_unlink(path)`` (its index first). Returns their paths."""
    removed = []
    for n, path in files:
        if n < first or path == keep or not os.path.isfile(path):
            continue
        log.warning("recovery: removing %s (%s after the last acknowledged flush: nothing in it was "
                    "acknowledged)", path, what)
        if before_unlink is not None:
            before_unlink(path)
        _drop_staged_index(path)
        os.unlink(path)
        removed.append(path)
    return removed


WRITER_RECORD = ".pktstream-writer.json"  # in an output directory: the owner of the run writing there last


def _set_writer(d: str, owner: str | None, fsync: bool) -> OSError | None:
    """Before a run's first file in directory ``d``: its writer record names ``owner`` (the
    receiver's state: file and id); a run without one (no state dir, a script) removes the
    record. Recovery from a state removes files by their names and numbers only from a
    directory whose record names that state's owner (:meth:`FileSink.recover`): after another
    writer, a higher number is not a newer file of this one. Returns the error if it failed
    (logged; the caller tries again): recovery would keep such files (at worst packets twice)
    -- or, a record left that this run could not remove, may take this run's files for its own
    (an error line). Temporary copies a killed process left are removed."""
    path = os.path.join(d, WRITER_RECORD)
    try:
        if owner is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                if fsync:
                    fsync_dir(d)
            return None
        if _writer_of(d) == (True, owner):
            if fsync:  # (its rename is done; a sync of the directory after it may have failed)
                fsync_dir(d)
            return None
        _remove_dead_writer_tmps(d)
        tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"  # (two sinks of a process in one directory)
        try:
            with open(tmp, "w") as fh:
                json.dump({"owner": owner, "pid": os.getpid(), "time": time.time()}, fh)
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if fsync:
            fsync_dir(d)
        return None
    except OSError as exc:
        log.log(logging.ERROR if owner is None else logging.WARNING,
                "%s: %s (%s)", path, exc,
                "a crash recovery from another receiver's state may remove files this run writes there"
                if owner is None else "tried again; the output's flushes wait for it")
        return exc


def _remove_dead_writer_tmps(d: str) -> None:
    """Remove ``WRITER_RECORD.<pid>[-<random>].tmp`` files of processes that are gone (killed
    while writing the record; a process on another host sharing the directory cannot be told
    from a dead one here, and a record it is writing then goes: it writes it again)."""
    prefix = WRITER_RECORD + "."
    for name in os.listdir(d):
        if name.startswith(prefix) and name.endswith(".tmp"):
            pid = name[len(prefix):-len(".tmp")].split("-", 1)[0]
            if pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, name))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts; a number no pid can be: no)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


class _Unreadable:
    """The owner :func:`_writer_of` gives for a record it cannot read (equal to no owner)."""

    def __init__(self, error: BaseException) -> None:
        self.error = " ".join(str(error).split())

    def __str__(self) -> str:
        return f"unreadable: {self.error}"


def _writer_of(d: str) -> tuple[bool, Any]:
    """(a writer record exists in ``d``, the owner it names: an :class:`_Unreadable` if it
    cannot be read)."""
    try:
        with open(os.path.join(d, WRITER_RECORD)) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return False, None
    except (OSError, ValueError) as exc:
        return True, _Unreadable(exc)
    return True, data.get("owner") if isinstance(data, dict) else None


def _written_since(d: str, found: bool, writer: Any) -> str:
    """Recovery's words for a directory whose record does not name its state."""
    if isinstance(writer, _Unreadable):
        return f"{d}: its {WRITER_RECORD} cannot be read ({writer.error}): another receiver may have written there"
    return (f"{d} was written since by another receiver or a run without this state dir "
            f"({f'{WRITER_RECORD}: {writer}' if found else f'no {WRITER_RECORD}'})")


class _Sweep:
    """Recovery's removals of files by name and number (:meth:`FileSink.recover`): which
    directories allow them (``ok``: no owner in the state, or the writer record names it;
    else logged once per directory) and the index removal before each file (``forget``).
    ``kept``: the directories not swept, persisted with the recovered state (``kept_dirs``):
    the run that recovers sets the record to its owner again when it writes there, and a crash
    before its first saved state must not then sweep another run's files by the old numbers
    (the states it saves number past them: :meth:`FileSink._next_free`, ``_next_seq_floor``)."""

    def __init__(self, owner: Any, index_root: str | None, kept: Any = None) -> None:
        self.owner = owner
        self.index_root = index_root
        self.kept: list[str] = sorted(d for d in kept if isinstance(d, str)) if isinstance(kept, list) else []
        self._dirs: dict[str, bool] = {d: False for d in self.kept}

    def ok(self, d: str) -> bool:
        d = os.path.abspath(d or ".")
        if d not in self._dirs:
            found, writer = (True, self.owner) if not isinstance(self.owner, str) else _writer_of(d)
            self._dirs[d] = found and writer == self.owner
            if not self._dirs[d]:
                self.kept.append(d)
                log.warning("recovery: %s; the files there that this state does not name are kept, packets "
                            "may be there twice (give each receiver a directory of its own)",
                            _written_since(d, found, writer))
        return self._dirs[d]

    def noted(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the directories kept so far (a start from it again -- a crash before
        the next state is saved -- keeps them too)."""
        return {**state, "kept_dirs": list(self.kept)} if self.kept else state

    def forget(self, path: str) -> None:
        if self.index_root is not None:
            from pktstream.archive.live import forget_index
            forget_index(self.index_root, path)


def max_flows_option(value: int | None) -> dict[str, int]:
    """The indexer's ``max_flows`` argument (checked), or nothing for its default."""
    if value is None:
        return {}
    if not 0 <= value <= INDEX_MAX_FLOWS_LIMIT:
        raise ConfigError(f"index max flows {value}: give 0 (no bound) .. {INDEX_MAX_FLOWS_LIMIT}")
    return {"max_flows": int(value)}


INDEX_MAX_FLOWS_LIMIT = 0x3FFFFFFF  # the flow table's own limit (flow ids are 32-bit)


def _drop_staged_index(final: str) -> None:
    """A file cut back by recovery: an index staged next to it (S3 outputs: ``NAME.idx``,
    built when rotation completed it) describes packets no longer in it; without it the
    uploader indexes the file from disk."""
    try:
        os.unlink(final + ".idx")
        log.warning("recovery: dropped the staged index of %s (rebuilt from the file)", final)
    except FileNotFoundError:
        pass


def _cut_and_complete(part: str, final: str, size: int, frame_bytes: int | None = None,
                      stream_bytes: int | None = None) -> bool:
    """Cut ``part`` back to ``size`` bytes (the last acknowledged flush) and complete it;
    False if nothing was left to complete. A ``.zst`` file with ``stream_bytes`` known is cut
    by content instead: its first ``stream_bytes`` decoded bytes are re-encoded, whichever
    encoding it holds (the one written, or one a recovery or reset made since)."""
    try:
        actual = os.path.getsize(part)
    except OSError:
        return False
    _drop_staged_index(final)  # (a .part never has a current one: one left by a crash is stale)
    if size == 0:
        os.unlink(part)  # nothing acknowledged went into it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part + ".tmp")  # (a re-encode of it that a crash interrupted)
        return False
    zst = final.endswith(".zst")
    if zst and stream_bytes is not None:
        _finish_zstd(part, frame_bytes, stream_bytes)
    else:
        if actual > size:
            with open(part, "r+b") as fh:
                fh.truncate(size)
            log.warning("recovery: %s cut from %d to %d bytes (the unacknowledged tail is resent)",
                        part, actual, size)
        if zst:
            _finish_zstd(part, frame_bytes)
    os.replace(part, final)
    log.warning("recovery: completed %s", final)
    return True


def _finish_zstd(part: str, frame_bytes: int | None = None, keep: int | None = None) -> None:
    """A crashed ``.zst`` file is zstd frames, the last without its end: re-encode the whole
    blocks it holds into complete, checksummed frames -- one, or the seekable layout with
    ``frame_bytes`` -- streaming (memory stays bounded whatever the file size). The reader's
    block decoder delivers every whole block of every frame and stops at a block cut off by the
    crash (or at corrupt data: everything before it is kept). ``keep``: only the first ``keep``
    decoded bytes (what was acknowledged; the rest is resent)."""
    tmp = part + ".tmp"
    buf = bytearray(_FINISH_CHUNK)
    mode = os.stat(part).st_mode & 0o777  # the capture file keeps its permissions (0640 by default)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _reencode(part, fd, mode, buf, frame_bytes, keep)
        os.replace(tmp, part)
    except BaseException:  # (a failure leaves no copy of the capture file behind: the .part is as it was)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _reencode(part: str, fd: int, mode: int, buf: bytearray, frame_bytes: int | None, keep: int | None) -> None:
    """:func:`_finish_zstd`'s re-encoding of ``part`` into the file open at ``fd`` (closed here)."""
    from pktstream.formats.reader import ZstdBlockReader
    from pktstream.formats.writer import ZstdFileWriter
    with open(fd, "wb") as out, open(part, "rb") as f:  # (the descriptor owned first: closed whatever fails)
        os.fchmod(fd, mode)
        z = ZstdFileWriter(out, 3, frame_bytes)
        src = ZstdBlockReader(f, part)
        left = keep
        while left is None or left > 0:
            try:
                n = src.readinto(buf)
            except Exception:  # corrupt data (or garbage after the frames): keep what came before
                break
            if not n:
                break
            if left is not None:
                n = min(n, left)
                left -= n
            z.write(bytes(buf[:n]))
        z.finish()
        if left:
            log.warning("recovery: %s decodes to %d bytes of the %d acknowledged (damaged): kept them",
                        part, cast(int, keep) - left, keep)
        elif keep is not None and _more(src, buf):  # (only to say so: the tail is resent)
            log.warning("recovery: %s cut to the %d decoded bytes acknowledged (the unacknowledged tail "
                        "is resent)", part, keep)


def _more(src, buf: bytearray) -> bool:
    """Whether a block reader has decoded bytes left (False also on corrupt data)."""
    try:
        return bool(src.readinto(buf))
    except Exception:
        return False


_FINISH_CHUNK = 1 << 16  # decompressed bytes taken at a time
