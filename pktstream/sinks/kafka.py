"""Kafka output on a receiver: one message per block, the DATA frame as on the wire.

Format: see :mod:`pktstream.stream.kafka` (key = sensor id, headers sensor_id/hostname/interface/
link_type/snaplen/seq). A gating KafkaSink acknowledges blocks to their sensors only after the
brokers confirmed them: ``write()`` produces, ``flush()`` waits for every delivery report and
raises if some are missing after ``flush_timeout`` — the receiver then retries (nothing is
acknowledged meanwhile, the sensors keep the blocks). Writing a block again after such a failure
does not produce it twice while its first copy is still on its way.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import zstandard
from confluent_kafka import KafkaException

from pktstream._capture import PacketBatch
from pktstream.sinks.base import Sink, Source
from pktstream.stream import protocol as P
from pktstream.stream.kafka import (
    DEFAULT_TOPIC,
    ErrorLog,
    check_stall_timeout,
    check_topic,
    frame_headers,
    kafka_client,
    kafka_error,
    producer_config,
    purge_and_close,
    refused_for_good,
)

log = logging.getLogger("pktstream.stream.receiver")


class KafkaDeliveryError(RuntimeError):
    """Some blocks were not confirmed by the brokers (yet)."""


class KafkaSink(Sink):
    """Produce every batch to ``topic`` as one DATA frame (re-compressed once, zstd ``level``).

    :param brokers: ``host:port[,host:port]`` (PacketStreamer ``brokers``).
    :param acks: ``all`` (default, idempotent producer) or ``1``/``0`` (not idempotent, warned).
    :param properties: extra librdkafka properties (TLS: ``security.protocol=ssl``,
        ``ssl.ca.location``...; SASL: ``sasl.mechanism``, ``sasl.username``, ``sasl.password``).
    :param flush_timeout: seconds ``flush()`` waits for delivery reports before failing.
    :param stall_timeout: outstanding blocks with no report for this long → new producer, resend.
    """

    def __init__(self, brokers: str, topic: str = DEFAULT_TOPIC, *, client_id: str = "pktstream",
                 acks: str = "all", properties: dict[str, Any] | None = None, timeout: float | None = None,
                 flush_timeout: float = 10.0, stall_timeout: float = 30.0, level: int = 1,
                 gate: bool = True) -> None:
        check_topic(topic)
        self.brokers, self.topic = brokers, topic
        self.name = f"kafka://{brokers}/{topic}"
        self.gate = gate
        self.flush_timeout, self.stall_timeout = flush_timeout, check_stall_timeout(stall_timeout)
        self._conf: dict[str, Any] = dict(client_id=client_id, acks=acks, properties=properties, timeout=timeout)
        self.counters: collections.Counter = collections.Counter()
        self._errors = ErrorLog(self.counters)
        self._producer = self._new_producer()
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        # (sensor id, seq) -> [message args, state]  state: None = on its way, True = delivered, exc
        self._pending: collections.OrderedDict[tuple[str, int], list] = collections.OrderedDict()
        self._iface_index: dict[tuple[str, str], int] = {}
        self._own_seq = time.time_ns() // 1000
        self._progress = time.monotonic()
        self._lock = threading.Lock()

    def _new_producer(self):
        return kafka_client("producer", producer_config(self.brokers, error_cb=self._errors, **self._conf))

    def _deliver(self, key, err, msg) -> None:
        entry = self._pending.get(key)
        if entry is None:
            return
        if err is None:
            entry[1] = True
            self._progress = time.monotonic()
            self.counters["delivered"] += 1
        elif refused_for_good(err):
            self._refused(key, entry, err)
        elif err.name() not in ("_PURGE_QUEUE", "_PURGE_INFLIGHT"):
            entry[1] = err
            self.counters["delivery_failures"] += 1

    def _refused(self, key, entry: list, err) -> None:
        """Kafka refuses this block for good (larger than the broker takes): its packets are lost
        and counted, and the output goes on (retrying it would stop every sensor's blocks)."""
        entry[1] = True  # (done: never produced again)
        self.counters["rejected_frames"] += 1
        self.counters["rejected_packets"] += entry[2]
        log.error("%s: block %s/%d refused (%s): its %d packets are lost (counted: rejected_packets)",
                  self.name, key[0], key[1], err, entry[2])

    def _produce(self, key, args: dict[str, Any]) -> None:
        while True:
            try:
                self._producer.produce(self.topic, **args, on_delivery=lambda e, m, k=key: self._deliver(k, e, m))
                return
            except BufferError:  # librdkafka's local queue is full: serve reports, try again
                self._producer.poll(0.1)
            except KafkaException as exc:  # refused by the client before it was queued
                err = kafka_error(exc)
                if not refused_for_good(err):
                    raise
                self._refused(key, self._pending[key], err)
                return

    def write(self, source: Source, batch: PacketBatch) -> None:
        seq = source.seq
        if not seq:
            self._own_seq += 1
            seq = self._own_seq
        key = (source.sensor_id, seq)
        entry = self._pending.get(key)
        if entry is not None and (entry[1] is None or entry[1] is True):
            return  # written again after a failed flush: the first copy is still on its way
        index = self._iface_index.setdefault((source.sensor_id, source.interface),
                                             sum(1 for k in self._iface_index if k[0] == source.sensor_id))
        raw_len = batch.nbytes
        payload = self._cctx.compress(batch)  # type: ignore[arg-type]  # any buffer; the stubs say bytes
        value = P.encode(P.FrameType.DATA, payload, seq=seq, iface=index, count=len(batch), raw_len=raw_len)
        args = dict(value=value, key=source.sensor_id.encode(),
                    headers=frame_headers(sensor_id=source.sensor_id, hostname=source.hostname,
                                          interface=source.interface, link_type=source.link_type,
                                          snaplen=source.snaplen, seq=seq))
        if not any(e[1] is None for e in self._pending.values()):
            self._progress = time.monotonic()
        self._pending[key] = [args, None, len(batch)]
        try:
            self._produce(key, args)
        except BaseException:
            # not queued: the retried write must produce it (as "on its way" it was skipped, and
            # the flush waited for a report that could not come until the stall timeout)
            del self._pending[key]
            raise
        self.counters["produced"] += 1
        self._producer.poll(0)

    def flush(self) -> None:
        deadline = time.monotonic() + self.flush_timeout
        while True:
            self._producer.poll(0.05)
            failed = [k for k, e in self._pending.items() if e[1] is not None and e[1] is not True]
            waiting = sum(1 for e in self._pending.values() if e[1] is None)
            if not failed and not waiting:
                self._pending.clear()
                return None
            now = time.monotonic()
            if failed or now - self._progress > self.stall_timeout:
                # a new producer, everything unconfirmed produced again in order (consumers drop
                # the duplicates of anything the old producer did deliver, by sensor id and seq)
                log.warning("%s: %s; new producer, resending %d blocks", self.name,
                            f"delivery failed ({self._pending[failed[0]][1]})" if failed
                            else f"no delivery report for {self.stall_timeout:.0f} s",
                            len(failed) + waiting)
                self.counters["producer_resets"] += 1
                purge_and_close(self._producer)
                self._producer = self._new_producer()
                self._progress = now
                for key, entry in self._pending.items():
                    if entry[1] is not True:
                        entry[1] = None
                        self._produce(key, entry[0])
            if now > deadline:
                raise KafkaDeliveryError(f"{waiting + len(failed)} blocks not confirmed by the brokers "
                                         f"after {self.flush_timeout:.0f} s")

    def close(self) -> None:
        try:
            left = self._producer.flush(self.flush_timeout)
            if left:
                log.warning("%s: %d blocks not confirmed at shutdown (not acknowledged: the sensors "
                            "still have them)", self.name, left)
        finally:
            purge_and_close(self._producer)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)
