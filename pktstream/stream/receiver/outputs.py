"""A receiver's outputs: each sink runs in its own thread behind a queue.

A *gating* output (files, S3, Kafka, the ``batches()`` iterator) has an unbounded queue — what
it has not written is not acknowledged, so the sensors keep it and the ingest path's in-flight
limit bounds the queue — and retries a failed write every second. A best-effort output (stdout)
has a bounded queue and drops (counted) when it is full or failing.

Lifetime: created and started by :class:`~pktstream.stream.receiver.ingest.Ingest` when the
receiver starts, closed when it stops. Thread-safety: ``submit`` and the bookkeeping methods run
on the receiver's event loop; each runner's thread only calls its sink and ``on_flushed``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pktstream._capture import PacketBatch
from pktstream.sinks.base import Sink, Source
from pktstream.stream import protocol as P

log = logging.getLogger("pktstream.stream.receiver")

#: on_flushed(runner, index, state): the runner wrote and flushed everything up to ``index``
#: (called from the runner's thread)
FlushedCallback = Callable[["SinkRunner", int, "dict[str, Any] | None"], None]


class SinkRunner:
    """A sink, its queue and its thread."""

    def __init__(self, sink: Sink, *, maxsize: int, closing: threading.Event, on_flushed: FlushedCallback) -> None:
        self.sink = sink
        self.gate = sink.gate
        self.closing = closing
        self.on_flushed = on_flushed
        self.queue: queue.Queue = queue.Queue(0 if self.gate else maxsize)
        self.committed = 0
        self.states: collections.deque = collections.deque()  # (index, state) per flush
        self.acknowledged_state: dict[str, Any] | None = None  # the last one given to sink.acknowledged
        self.counters: collections.Counter = collections.Counter()
        self.failing = False
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)

    def submit(self, index: int, source: Source, batch: PacketBatch) -> None:
        try:
            self.queue.put_nowait((index, source, batch))
        except queue.Full:  # only non-gating sinks are bounded here
            self.counters["dropped_batches"] += 1
            self.counters["dropped_packets"] += len(batch)

    def _write_group(self, items: list) -> dict[str, Any] | None:
        """Write and flush items; raises on the first failure."""
        for _index, source, batch in items:
            self.sink.write(source, batch)
        return self.sink.flush()

    def _write_with_retry(self, items: list) -> tuple[bool, dict[str, Any] | None]:
        """(written, state). A gating output retries every second until it works (nothing is
        acknowledged meanwhile, so the sensors buffer); a best-effort one drops and counts."""
        while True:
            try:
                state = self._write_group(items)
                if self.failing:
                    log.warning("output %s works again", self.sink.name)
                    self.failing = False
                return True, state
            except Exception as exc:
                self.counters["failures"] += 1
                if not self.failing:
                    log.error("output %s failed: %s", self.sink.name, exc)
                self.failing = True
                try:
                    self.sink.reset()  # back to the last flush; the whole group is written again
                except Exception as reset_exc:
                    log.error("output %s: reset failed: %s", self.sink.name, reset_exc)
                if not self.gate or self.closing.is_set():
                    key = "dropped" if not self.gate else "unwritten_at_shutdown"
                    self.counters[f"{key}_batches"] += len(items)
                    self.counters[f"{key}_packets"] += sum(len(b) for _, _, b in items)
                    return False, None
                time.sleep(1.0)

    def _run(self) -> None:
        done = False
        while not done:
            try:
                items = [self.queue.get(timeout=1.0)]
            except queue.Empty:
                self._idle()
                continue
            while len(items) < 512:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if None in items:
                done = True
                items = [it for it in items if it is not None]
            if not items:
                continue
            ok, state = self._write_with_retry(items)
            if ok:
                self.counters["batches"] += len(items)
                self.counters["packets"] += sum(len(b) for _, _, b in items)
            if ok or not self.gate:
                # a gating output that could not write keeps its items unacknowledged
                self.on_flushed(self, items[-1][0], state)
        # drained: the sink is closed by Outputs.close(), after the receiver's last commit

    def close_sink(self) -> None:
        """Close the sink (after the thread ended: everything is written and flushed). When it
        fails, its flushed states are kept: the receiver persists them, and the next start's
        recovery completes the files it left open."""
        try:
            self.sink.close()
        except Exception as exc:
            log.error("closing output %s failed: %s (its open files are completed by the next start's recovery)",
                      self.sink.name, exc)
            return
        self.states.clear()  # its files are complete

    def _idle(self) -> None:
        """Nothing to write for a second: let the output do its timed work (rotation)."""
        if self.failing:
            return  # a failing output is being retried by the write path
        try:
            self.sink.tick()
        except Exception as exc:
            self.counters["failures"] += 1
            log.error("output %s: %s", self.sink.name, exc)
            # e.g. a time rotation whose rename failed: its file is left to a reset, which
            # completes it cut back to the last flush -- everything, at idle (without it the
            # file stayed .part, in no later state: a crash then removed acknowledged packets)
            try:
                self.sink.reset()
            except Exception as reset_exc:  # (retried by the next write's reset; its flush refuses)
                log.error("output %s: reset failed: %s", self.sink.name, reset_exc)

    def flushed(self, index: int, state: dict[str, Any] | None) -> None:
        """Record a flush (event loop)."""
        self.committed = max(self.committed, index)
        if state is not None:
            self.states.append((index, state))

    def state_to_persist(self, committed: int) -> dict[str, Any] | None:
        """The flushed state to persist when everything up to ``committed`` is acknowledged:
        the oldest one holding all of it (index >= ``committed``). Never an older one: after a
        crash the output is cut back to it, and batches already acknowledged would be lost.
        With one gating output it is exactly at ``committed``; gating outputs that flushed at
        different points may hold a few unacknowledged batches more, which the sensors resend
        after a crash (written twice to that output, never lost). An output that has not
        reached ``committed`` (best-effort, behind): its newest."""
        best = None
        for index, state in self.states:
            if index >= committed:
                return state
            best = state
        return best

    def state_at(self, committed: int) -> dict[str, Any] | None:
        """The newest flushed state whose data is all acknowledged (index <= ``committed``), for
        :meth:`Sink.acknowledged`; the older ones are dropped (the persisted state is never
        older than ``committed``: :meth:`state_to_persist`)."""
        best = None
        while self.states and self.states[0][0] <= committed:
            best = self.states.popleft()
        if best is not None:
            self.states.appendleft(best)  # still the newest usable one
            return best[1]
        return None


class Outputs:
    """All of a receiver's sink runners."""

    def __init__(self, sinks: list[Sink], *, maxsize: int, closing: threading.Event,
                 on_flushed: FlushedCallback) -> None:
        self.runners = [SinkRunner(s, maxsize=maxsize, closing=closing, on_flushed=on_flushed) for s in sinks]
        self._drained = False  # drain() ran (it runs once)
        self.gating = any(r.gate for r in self.runners)

    def start(self) -> None:
        for r in self.runners:
            r.thread.start()

    def submit(self, index: int, source: Source, batch: PacketBatch) -> None:
        for i, r in enumerate(self.runners):
            # each output gets its own batch object: one releasing it cannot break another
            r.submit(index, source, batch if i == 0 else P.sibling(batch))

    def committed(self, index: int) -> int:
        """The highest index every gating output has written (``index`` when none gates)."""
        gating = [r.committed for r in self.runners if r.gate]
        return min(gating) if gating else index

    def states_to_persist(self, committed: int) -> dict[str, Any]:
        return {r.sink.name: st for r in self.runners if (st := r.state_to_persist(committed))}

    def acknowledged(self, committed: int) -> None:
        """Everything up to ``committed`` is acknowledged (and its state persisted): tell each
        output the newest flush that holds nothing beyond it (event loop). This also keeps
        each runner's list of flushed states short without a state dir."""
        for r in self.runners:
            st = r.state_at(committed)
            if st is None or st is r.acknowledged_state:
                continue
            r.acknowledged_state = st
            try:
                r.sink.acknowledged(st)
            except Exception as exc:  # noqa: BLE001 - an output's bug must not stop the commits
                r.counters["failures"] += 1
                log.error("output %s: acknowledged: %s", r.sink.name, exc)

    async def drain(self) -> None:
        """Interrupt every output and wait until it has written and flushed what it was given
        (waits for the threads, off the loop). The receiver then commits (persists the state,
        acknowledges) and only then :meth:`close` s them: an output that acts on its files at
        close (an S3 upload) then only acts on acknowledged data."""
        if self._drained:
            return
        self._drained = True
        for r in self.runners:
            r.sink.interrupt()
            r.queue.put(None)
        for r in self.runners:
            await asyncio.to_thread(r.thread.join)

    async def close(self) -> None:
        """Drain (if not done) and close every output (off the loop)."""
        await self.drain()
        for r in self.runners:
            await asyncio.to_thread(r.close_sink)

    def stats(self) -> dict[str, dict[str, Any]]:
        # flushes_held: flushed states not yet superseded by an acknowledged one (stays small);
        # then the sink's own counters (S3 uploads and staging, Kafka deliveries)
        out = {}
        for r in self.runners:
            own: dict[str, Any] = {}
            stats = getattr(r.sink, "stats", None)
            if stats is not None:
                try:
                    own = dict(stats())
                except Exception as exc:  # noqa: BLE001 - a counter read must not break the receiver's stats
                    own = {"stats_error": str(exc)}
            out[r.sink.name] = {**own, "gate": r.gate, "queued": r.queue.qsize(), "flushes_held": len(r.states),
                                **r.counters}
        return out
