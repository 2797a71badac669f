"""The two interfaces frames cross between the parts of the streaming path (docs/ARCHITECTURE.md).

* :class:`Transport` — how a sensor's frames leave it: :class:`pktstream.stream.tcp.TcpTransport`
  (to a receiver) and :class:`pktstream.stream.kafka.KafkaTransport` (to a topic).
* :class:`Input` — another way frames reach a receiver besides its TCP server:
  :class:`pktstream.stream.kafka.KafkaInput`. Inputs feed the receiver's
  :class:`~pktstream.stream.receiver.ingest.Ingest`, the one implementation of
  validate/dedupe/count/commit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pktstream.stream.receiver.ingest import Ingest
    from pktstream.stream.sensor import Sensor


class Transport(Protocol):
    """Sends a sensor's frames. ``run`` is the sensor's sender thread: it takes frames from
    ``sensor.store`` in order (``after(seq)``), releases them once delivered (``ack(seq)``), and
    returns when the sensor is stopping and nothing is left, or at the drain deadline
    (``sensor.stopped_at + drain_timeout``)."""

    def describe(self) -> str:
        """Where frames go, for log lines."""
        ...

    def exclude(self) -> list[tuple[str, int]]:
        """(address, TCP port) pairs of this transport's own traffic, kept out of capture."""
        ...

    def run(self, sensor: Sensor, drain_timeout: float) -> None:
        ...


class Input(Protocol):
    """A source of sensor frames for a receiver. The receiver calls ``start(ingest)`` on its
    event loop after starting, ``stop()`` when stopping (stop taking frames), ``close()`` after
    its final commit (commit what is durable, e.g. consumer offsets)."""

    def describe(self) -> str:
        ...

    def start(self, ingest: Ingest) -> None:
        ...

    def stop(self) -> None:
        ...

    def close(self) -> None:
        ...

    def stats(self) -> dict[str, Any]:
        ...
