"""Capture files on the receiver: one merged file or one file per sensor, with rotation.

Files are written as ``NAME.part`` and renamed when complete, so a file with its final name
is always whole. After a crash, :meth:`FileSink.recover` truncates each ``.part`` file to the
size recorded at the last acknowledged flush (the sensors resend everything after it) and
renames it: nothing acknowledged is lost and nothing is written twice. An existing file is
never overwritten: the next free name ``stem.N.ext`` is used.
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from pktstream._capture import PacketBatch, link_type_name
from pktstream.sinks.base import Sink, Source

log = logging.getLogger("pktstream.receiver")

FORMATS = {".pcap": "pcap", ".pcapng": "pcapng", ".pcap.zst": "pcap.zst", ".pcapng.zst": "pcapng.zst"}


def format_of(path: str) -> str:
    for ext in sorted(FORMATS, key=len, reverse=True):
        if path.endswith(ext):
            return FORMATS[ext]
    return "pcap"


def split_ext(path: str) -> tuple[str, str]:
    for ext in sorted(FORMATS, key=len, reverse=True):
        if path.endswith(ext):
            return path[: -len(ext)], ext
    return path, ""


def safe_name(text: str) -> str:
    """A sensor-supplied name as a single harmless path component."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100].lstrip(".")
    return cleaned or "_"


def _open_writer(path: str, fmt: str, *, hostname: str | None, mode: int, fsync: bool):
    if fmt == "pcap":
        from pktstream.formats.pcap import PcapWriter
        return PcapWriter(path, mode=mode, fsync=fsync)
    from pktstream import formats
    opener = getattr(formats, "open_writer", None)
    if opener is None:
        raise ValueError(f"output format {fmt} is not available in this build")
    return opener(path, format=fmt, hostname=hostname, fsync=fsync, mode=mode)


class _Rotating:
    """One logical output (a path template) rotated by size/time, keeping at most max_files."""

    def __init__(self, base: str, fmt: str, opts: dict[str, Any]) -> None:
        self.base, self.fmt, self.opts = base, fmt, opts
        self.writer = None
        self.final = ""
        self.opened = 0.0
        self.done: list[str] = []

    def _next_name(self) -> str:
        stem, ext = split_ext(self.base)
        ext = ext or ".pcap"
        n = 0
        while True:
            name = f"{stem}{ext}" if n == 0 else f"{stem}.{n}{ext}"
            if not os.path.exists(name) and not os.path.exists(name + ".part"):
                return name
            n += 1

    def get(self):
        o = self.opts
        if self.writer is not None:
            too_big = o["rotate_bytes"] and self.size() >= o["rotate_bytes"]
            too_old = o["rotate_seconds"] and time.monotonic() - self.opened >= o["rotate_seconds"]
            if too_big or too_old:
                self.close()
        if self.writer is None:
            self.final = self._next_name()
            os.makedirs(os.path.dirname(self.final) or ".", exist_ok=True)
            self.writer = _open_writer(self.final, self.fmt, hostname=o["hostname"], mode=o["mode"],
                                       fsync=o["fsync"])
            self.opened = time.monotonic()
            log.info("writing %s", self.final)
        return self.writer

    def size(self) -> int:
        try:
            return os.path.getsize(self.final + ".part")
        except OSError:
            return 0

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        self.done.append(self.final)
        max_files = self.opts["max_files"]
        while max_files and len(self.done) > max_files:
            old = self.done.pop(0)
            try:
                os.unlink(old)
                log.info("rotation: removed %s", old)
            except FileNotFoundError:
                pass


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
    """

    name = "file"

    def __init__(self, path: str | None = None, *, directory: str | None = None, format: str | None = None,
                 rotate_bytes: int | None = None, rotate_seconds: float | None = None,
                 max_files: int | None = None, fsync: bool = False, mode: int = 0o640,
                 hostname: str | None = None, gate: bool = True) -> None:
        if (path is None) == (directory is None):
            raise ValueError("FileSink needs exactly one of path or directory")
        self.path = os.fspath(path) if path else None
        self.directory = os.fspath(directory) if directory else None
        self.format = format or (format_of(self.path) if self.path else "pcapng")
        self.gate = gate
        self.opts = dict(rotate_bytes=rotate_bytes, rotate_seconds=rotate_seconds, max_files=max_files,
                         fsync=fsync, mode=mode, hostname=hostname)
        self._outputs: dict[Any, _Rotating] = {}
        self.name = f"file:{self.path or self.directory}"
        if self.directory:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)

    def _output_for(self, source: Source, batch: PacketBatch) -> _Rotating:
        single_link = self.format.startswith("pcap") and not self.format.startswith("pcapng")
        key = (source.sensor_id if self.directory else None, batch.link_type if single_link else None)
        out = self._outputs.get(key)
        if out is None:
            if self.directory:
                base = os.path.join(self.directory, safe_name(source.sensor_id) + "." + self.format)
            else:
                base = self.path
            if single_link and any(k[0] == key[0] for k in self._outputs):
                stem, ext = split_ext(base)
                base = f"{stem}.{safe_name(link_type_name(batch.link_type))}{ext}"
            out = self._outputs[key] = _Rotating(base, self.format, self.opts)
        return out

    def write(self, source: Source, batch: PacketBatch) -> None:
        self._output_for(source, batch).get().write(batch)

    def flush(self) -> dict[str, Any]:
        open_files = []
        for out in self._outputs.values():
            if out.writer is not None:
                out.writer.flush()
                if self.opts["fsync"]:
                    os.fsync(out.writer.fileno())
                open_files.append({"part": out.final + ".part", "final": out.final, "size": out.size()})
        return {"open": open_files}

    @property
    def paths(self) -> list[str]:
        """Completed files, oldest first."""
        return [p for out in self._outputs.values() for p in out.done]

    def close(self) -> None:
        for out in self._outputs.values():
            out.close()

    @staticmethod
    def recover(state: dict[str, Any]) -> None:
        for f in state.get("open", []):
            part, final, size = f.get("part"), f.get("final"), f.get("size")
            if not (isinstance(part, str) and isinstance(final, str) and isinstance(size, int)):
                continue
            if not os.path.exists(part):
                continue
            actual = os.path.getsize(part)
            if size == 0:
                os.unlink(part)  # nothing acknowledged went into it
                continue
            if actual > size:
                with open(part, "r+b") as fh:
                    fh.truncate(size)
                log.warning("recovery: %s cut from %d to %d bytes (the unacknowledged tail will be "
                            "resent by its sensors)", part, actual, size)
            os.replace(part, final)
            log.warning("recovery: completed %s left by the previous run", final)
