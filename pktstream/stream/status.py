"""A compact live status of a running receiver on a terminal (``pktstream receiver --status``).

One line per sensor, redrawn in place every second on stderr: connected or not, packet and byte
rates since the last redraw, totals, and every drop counter the sensor reported (kernel,
interface, ring, send window; the sensors' STATS frames), plus one line for the outputs (dropped packets, failures). Log
lines printed meanwhile appear above the table (the table is cleared, the log line written, the
table drawn again), so nothing is lost from the log.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["StatusDisplay", "render_status"]

_HEADER = (f"{'sensor':<16} {'state':<5} {'pkts/s':>8} {'MB/s':>6} {'packets':>10} {'kernel':>7} "
           f"{'ifdrop':>6} {'ring':>6} {'window':>6}")  # 79 columns


def _rate(cur: int, prev: int, dt: float) -> float:
    return max(cur - prev, 0) / dt if dt > 0 else 0.0


def render_status(cur: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> list[str]:
    """The status table (a list of lines) for ``Receiver.stats()`` output ``cur``, with rates
    computed against ``prev`` (the stats ``dt`` seconds earlier; None for no rates yet)."""
    lines = [_HEADER]
    prev_sensors = (prev or {}).get("sensors", {})
    sensors = cur.get("sensors", {})
    for sid in sorted(sensors):
        s = sensors[sid]
        p = prev_sensors.get(sid)
        pps = _rate(s["packets"], p["packets"], dt) if p else 0.0
        mbps = _rate(s["raw_bytes"], p["raw_bytes"], dt) / 1e6 if p else 0.0
        name = sid if len(sid) <= 16 else sid[:15] + "~"
        state = {True: "up", False: "DOWN"}.get(s["connected"], "other")  # (another receiver reads it)
        line = (f"{name:<16} {state:<5} {pps:>8.0f} {mbps:>6.2f} "
                f"{s['packets']:>10} ")
        if s.get("legacy"):  # a PacketStreamer sensor reports no drops: say so instead of zeros
            lines.append(line + f"legacy: {s['legacy']} (PacketStreamer, no loss counts)")
        else:
            lines.append(line + f"{s['kernel_dropped']:>7} {s['interface_dropped']:>6} "
                         f"{s['ring_drops']:>6} {s['window_dropped_packets']:>6}")
    if not sensors:
        lines.append("(no sensor has connected yet)")
    outs = cur.get("outputs", {})
    parts = []
    for name, o in outs.items():
        text = f"{name} {o.get('packets', 0)} written"
        if o.get("dropped_packets"):
            text += f", {o['dropped_packets']} DROPPED"
        if o.get("failures"):
            text += f", {o['failures']} failures"
        if o.get("queued"):
            text += f", {o['queued']} queued"
        parts.append(text)
    errors = {k: cur.get(k, 0) for k in ("protocol_errors", "auth_failures", "timeouts", "rejected_connections")}
    tail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in errors.items() if v)
    lines.append(f"outputs: {'; '.join(parts) or 'none'} | connections {cur.get('connections', 0)}"
                 + (f" | {tail}" if tail else ""))
    return lines


class StatusDisplay:
    """Redraw :func:`render_status` for a receiver every ``interval`` seconds on ``stream``.

    Only meant for terminals (it moves the cursor); ``start()`` does nothing when ``stream``
    is not a TTY unless ``force``. Thread safety: ``start``/``stop`` from one thread.
    """

    _lines: list[str]  # the table last drawn (from start())

    def __init__(self, receiver, stream: TextIO | None = None, *, interval: float = 1.0,
                 force: bool = False) -> None:
        self.receiver = receiver
        self.stream = stream or sys.stderr
        self.interval = interval
        self.enabled = force or (hasattr(self.stream, "isatty") and self.stream.isatty())
        self._lock = threading.RLock()
        self._drawn = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wrapped: list[tuple[logging.Handler, Any]] = []

    # -- drawing -------------------------------------------------------------------------------
    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up N lines, clear to end of screen
            self._drawn = 0

    def _draw(self, lines: list[str]) -> None:
        try:  # a wrapped line would break the redraw: cut lines to the terminal's width
            width = os.get_terminal_size(self.stream.fileno()).columns - 1
        except (OSError, ValueError, AttributeError):
            width = 0
        width = width if width >= 20 else 79  # 0: size unknown
        self.stream.write("".join(line[:width] + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def _run(self) -> None:
        prev, t_prev = None, time.monotonic()
        lines: list[str] = []
        while True:
            try:
                cur = self.receiver.stats()
            except Exception:  # the receiver is shutting down
                cur = None
            now = time.monotonic()
            if cur is not None and (prev is None or self._stop.is_set() or now - t_prev >= self.interval / 2):
                lines = render_status(cur, prev, now - t_prev)
                prev, t_prev = cur, now
                with self._lock:
                    self._lines = lines
                    self._clear()
                    self._draw(lines)
            if self._stop.is_set():
                return
            self._stop.wait(self.interval)

    # -- log lines above the table -------------------------------------------------------------
    def _wrap_handlers(self) -> None:
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is self.stream:
                orig = h.emit

                def emit(record, _orig=orig):
                    with self._lock:
                        drawn = self._drawn
                        self._clear()
                        _orig(record)
                        if drawn:
                            self._draw(self._lines)
                h.emit = emit  # type: ignore[method-assign]  # this handler instance only
                self._wrapped.append((h, orig))

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> StatusDisplay:
        if not self.enabled:
            return self
        self._lines = []
        self._wrap_handlers()
        self._thread = threading.Thread(target=self._run, name="receiver-status", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop redrawing; the last table stays on the screen."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(5)
        for h, _orig in self._wrapped:
            h.__dict__.pop("emit", None)  # back to the class's emit
        self._wrapped.clear()
        self._thread = None
