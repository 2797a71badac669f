"""Hand batches to Python code: a callback, or an iterator of (Source, PacketBatch)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from pktstream._capture import PacketBatch
from pktstream.sinks.base import Sink, Source


class CallbackSink(Sink):
    """Call ``fn(source, batch)`` for every batch, in the sink's thread. Exceptions are
    logged and counted by the receiver; the batch is valid only during the call unless
    the callback keeps a reference (or ``batch.copy()``)."""

    name = "callback"

    def __init__(self, fn: Callable[[Source, PacketBatch], None], *, gate: bool = True) -> None:
        self.fn = fn
        self.gate = gate

    def write(self, source: Source, batch: PacketBatch) -> None:
        self.fn(source, batch)


class IteratorSink(Sink):
    """Feeds ``Receiver.batches()``: a bounded queue the consumer iterates."""

    name = "iterator"
    _END = object()

    def __init__(self, maxsize: int = 64, *, gate: bool = True) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.gate = gate
        self._stopping = threading.Event()

    def write(self, source: Source, batch: PacketBatch) -> None:
        while not self._stopping.is_set():  # blocks this sink's thread only, until stop
            try:
                self.queue.put((source, batch), timeout=0.2)
                return
            except queue.Full:
                pass
        raise RuntimeError("receiver stopping and nobody reads the iterator")

    def interrupt(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        try:
            self.queue.put(self._END, timeout=1.0)
        except queue.Full:  # the consumer went away: make room for the end marker
            try:
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.queue.put_nowait(self._END)

    def __iter__(self) -> Iterator[tuple[Source, PacketBatch]]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            yield item
