"""The Sink interface and the Source of a batch."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pktstream._capture import PacketBatch


@dataclass(frozen=True, slots=True)
class Source:
    """Where a batch came from: a sensor and one of its interfaces."""
    sensor_id: str
    hostname: str
    interface: str
    link_type: int
    snaplen: int
    seq: int = field(default=0, compare=False)  # the sensor's block sequence number (0: unknown)

    @property
    def name(self) -> str:
        """``sensor/interface``: the interface name used in pcapng outputs."""
        return f"{self.sensor_id}/{self.interface}"


class Sink:
    """An output. ``write`` is called from the sink's own thread, in arrival order.

    ``gate``: when True, a frame is acknowledged to its sensor only after this sink has
    written and flushed it; a sink with ``gate=False`` that falls behind drops (and counts)
    instead of slowing the others.
    """

    name = "sink"
    gate = True

    def write(self, source: Source, batch: PacketBatch) -> None:
        raise NotImplementedError

    def flush(self) -> dict[str, Any] | None:
        """Make everything written so far durable; return state to persist (or None)."""
        return None

    def reset(self) -> None:
        """After a failed write/flush: return to the state of the last successful flush (the
        receiver then writes again everything given since). Default: nothing to undo."""

    def tick(self) -> None:
        """Called about once a second while this output has nothing to write (everything
        given so far is written and flushed): time-based work such as rotation. When it raises,
        the receiver calls :meth:`reset` (back to the last flush: everything, at idle).
        Default: none."""

    def resume(self, state: dict[str, Any]) -> None:
        """A receiver calls this once per output that has a persisted state, after crash
        recovery (with the state recovery returned, or the loaded one) and before the first
        write: what the output must not reuse while that state can still be recovered from
        (FileSink: the file numbers it names). Default: nothing."""

    def set_owner(self, owner: str | None) -> None:
        """A receiver calls this once on every output, before :meth:`recover_unacknowledged`
        and the first write: ``owner`` names the receiver's state (its file and the random id
        kept in it), None without a state dir. Default: nothing."""

    def recover_unacknowledged(self, state: dict[str, Any] | None, owner: str | None = None, *,
                               earlier_owner: str | None = None) -> list[str]:
        """A receiver calls this once on each gating output, after :meth:`recover`/:meth:`resume`
        and before the first write (``state``: the output's persisted state, None if none;
        ``owner``: the receiver's state, None without a state dir; ``earlier_owner``: the same
        state as a version before 2026-12-04 named it): remove what this owner wrote for outputs
        that no persisted state named (nothing of it acknowledged; the sensors resend it). With
        an owner, the receiver calls :meth:`persisted` after each state it saves. Returns what
        was removed. Default: nothing."""
        return []

    def persisted(self, state: dict[str, Any] | None) -> None:
        """The receiver saved a state holding ``state`` as this output's (its state writer
        thread), and acknowledges what it covers only after this returns; an OSError fails the
        save (nothing acknowledged, retried). Default: nothing."""

    def use_acknowledgements(self) -> None:
        """A receiver calls this once on each gating output, after crash recovery and before
        the first write: from then on it calls :meth:`acknowledged` after each commit.
        Default: nothing."""

    def acknowledged(self, state: dict[str, Any]) -> None:
        """Everything this output had flushed when its :meth:`flush` returned ``state`` is
        acknowledged to the sensors (and the persisted state, with a state dir, holds it): a
        crash can no longer resend it. Only gating outputs get this. Called on the receiver's
        event loop: must not block. Default: nothing."""

    def interrupt(self) -> None:
        """The receiver is stopping: stop waiting on anything outside (called from any thread)."""

    def close(self) -> None:
        """Flush and release resources. Data not flushed before the process dies is lost."""

    @staticmethod
    def recover(state: dict[str, Any],
                persist: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Repair what a crashed previous run left, from the state its last flush returned.
        Returns the state that describes the outputs as recovery left them (persisted at once
        by the receiver, so a crash before its next commit recovers from it and changes
        nothing), or None: ``state`` still does. ``persist`` is called with that state as it
        changes, file by file (a recovery interrupted half-way must not be redone from the old one)."""
        return None
