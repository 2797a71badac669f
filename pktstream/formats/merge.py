"""Chronological merge of capture files, packet for packet as mergecap merges them.

mergecap repeatedly writes the earliest of its inputs' next packets (ties: the last input, its
scan keeping the last of equals), so an input that is not itself in time order comes out as
mergecap writes it, not sorted. Here that choice is made in C over the batches at hand
(``pktstream._records.merge_heads``) until one input's batch is used up, the chosen records
are copied into one buffer (``gather_records``) and handed out as one batch with each packet's
interface; then that input's next batch is read. So two captures whose packets interleave one
by one cost a C loop per packet, not a Python step (21.4 s → 0.68 s per million packets here;
bench/README.md).

Thread safety: a :func:`merge` generator belongs to one thread; it reads its readers.
Lifetime: a batch handed out is a copy, or (while one input is left) that reader's own batch or
a zero-copy slice of it: valid after the readers close, as the readers' batches are.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pktstream._capture import PacketBatch
from pktstream._records import gather_records, merge_heads
from pktstream.formats.pcapng import PacketInterfaces
from pktstream.formats.reader import CaptureReader
from pktstream.formats.writer import slice_batch

__all__ = ["merge", "MergedInterface"]


@dataclass(frozen=True)
class MergedInterface:
    """An output interface of a merge: the inputs' interfaces with the same name, link type
    and snap length are one (as the pcapng writer keys them)."""
    name: str | None
    link_type: int
    snaplen: int


class _Input:
    """One reader and the batch of it at hand (``pos``: its next packet)."""

    def __init__(self, reader: CaptureReader, table: dict, infos: list[MergedInterface]) -> None:
        self.reader = reader
        self._it = iter(reader)
        self._table = table
        self._infos = infos
        self.batch: PacketBatch | None = None
        self.pos = 0
        self.comments: dict[int, str] = {}

    def refill(self) -> bool:
        """Read the next batch holding packets; False when the input is finished."""
        for b in self._it:
            if len(b):
                self.batch, self.pos = b, 0
                self.ts, self.offs, self.caps = b.ts_ns, b.offset, b.caplen
                self.gids = self._interfaces_of(b)
                self.comments = dict(self.reader.comments)
                return True
        self.batch = None
        return False

    def _interfaces_of(self, b: PacketBatch) -> np.ndarray:
        mixed = self.reader.batch_interfaces
        if mixed is None:
            return np.full(len(b), self._gid(b.interface, b.link_type, b.snaplen), dtype=np.uint32)
        ids, section = mixed
        lut = np.zeros(len(section), dtype=np.uint32)
        for u in np.unique(ids).tolist():
            lut[u] = self._gid(section[u].name, section[u].link_type, section[u].snaplen)
        return lut[ids]

    def _gid(self, name: str | None, link_type: int, snaplen: int) -> int:
        key = (name, link_type, max(snaplen, 1))
        gid = self._table.get(key)
        if gid is None:
            gid = self._table[key] = len(self._infos)
            self._infos.append(MergedInterface(*key))
        return gid


def merge(readers: Sequence[CaptureReader]) -> Iterator[tuple[PacketBatch, PacketInterfaces, dict[int, str]]]:
    """The packets of ``readers`` (opened with ``file_order=True``, and best with
    ``mixed_interfaces=True``; with ``comments=True`` their packet comments come along) in
    mergecap's order, as ``(batch, (ids, interfaces), comments)``: packet ``k`` of the batch came
    from ``interfaces[ids[k]]`` (a :class:`MergedInterface`), ``comments`` maps packet indexes of
    the batch to their comments -- what ``CaptureWriter.write(batch, comments,
    interfaces=...)`` takes. The batch's own ``link_type`` is its first packet's (a merge may mix
    link types: pcapng keeps them apart, pcap refuses them)."""
    table: dict[tuple[str | None, int, int], int] = {}
    infos: list[MergedInterface] = []
    inputs = [i for i in (_Input(r, table, infos) for r in readers) if i.refill()]
    while inputs:  # (in the readers' order: ties go to the later input)
        if len(inputs) == 1:
            only = inputs[0]
            assert only.batch is not None
            b, start = only.batch, only.pos
            notes = {k - start: t for k, t in only.comments.items() if k >= start}
            yield slice_batch(b, start, len(b)) if start else b, (only.gids[start:], infos), notes
            inputs = [] if not only.refill() else inputs
            continue
        pos = np.array([i.pos for i in inputs], dtype=np.int64)
        which, index = merge_heads([i.ts for i in inputs], pos)
        recs, n = gather_records([i.batch for i in inputs], [i.offs for i in inputs],
                                 [i.caps for i in inputs], which, index)
        if n == 0:  # (cannot happen: every input here has a packet at hand)
            raise AssertionError("merge made no progress")
        gids = np.empty(n, dtype=np.uint32)
        notes = {}
        for k, i in enumerate(inputs):
            sel = np.flatnonzero(which == k)
            gids[sel] = i.gids[index[sel]]
            if i.comments:
                keys = np.fromiter(i.comments, dtype=np.int64, count=len(i.comments))
                hit = np.isin(index[sel], keys)
                notes.update((int(o), i.comments[int(j)]) for o, j in zip(sel[hit], index[sel][hit]))
        first = infos[int(gids[0])]
        snaplen = max(infos[g].snaplen for g in np.unique(gids).tolist())
        yield (PacketBatch.from_records(recs, link_type=first.link_type, snaplen=snaplen, interface=None,
                                        validate=False, count=n), (gids, infos), notes)
        for k, i in enumerate(inputs):
            i.pos = int(pos[k])
        inputs = [i for i in inputs if i.pos < len(i.ts) or i.refill()]
