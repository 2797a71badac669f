"""Kafka as a transport (confluent-kafka / librdkafka): sensors produce, receivers consume.

Message format (the same from a sensor and from a receiver's KafkaSink): one message per block;
the value is the DATA frame exactly as on the TCP wire (36-byte header with seq, iface, count,
raw_len + one zstd frame or STORED records, docs/PROTOCOL.md); the key is the sensor id (so a
sensor's blocks stay ordered in one partition); headers::

    sensor_id, hostname, interface, link_type, snaplen, seq      (UTF-8 text)
    type = "data" | "stats"                                      (stats: value is a STATS frame)

A consumer needs nothing else: the headers carry the interface descriptor the TCP protocol sends
in HELLO. ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC`` names brokers and topic.

Delivery: producers are idempotent (acks=all) with ``message.timeout.ms=0`` (librdkafka retries
forever, keeping order); a frame counts as delivered only when its delivery report arrives. If
no report arrives for ``stall_timeout`` s while frames are outstanding (seen with a broker that
lost its producer state, e.g. restarted with in-memory storage), the producer is recreated and
everything unacknowledged is produced again; consumers drop the duplicates by (sensor id, seq).
"""
from __future__ import annotations

import collections
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pktstream.exceptions import ConfigError, FrameError
from pktstream.stream import protocol as P

log = logging.getLogger("pktstream.stream.kafka")
_rdlog = logging.getLogger("pktstream.stream.kafka.librdkafka")


class _EveryTenSeconds:
    """Whether a log line of a key is due: at most once per 10 s per key (at most 1,000 keys
    remembered). Called from librdkafka's threads (dict operations under the GIL)."""

    def __init__(self) -> None:
        self._last: dict[Any, float] = {}

    def due(self, key: Any) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < 10:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


class _LibrdkafkaLines(logging.Filter):
    """librdkafka's log lines (``logger``: level, "%s [%s] %s", facility, client, text) pass at
    most once per 10 s per level, facility and text (numbers aside): a broker outage repeats
    its FAIL line for every reconnect attempt (as ErrorLog does for error codes), while another
    error of the same facility (a certificate refused) still shows. Called from librdkafka's
    threads."""

    def __init__(self) -> None:
        super().__init__()
        self._every = _EveryTenSeconds()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        facility = str(args[0]) if args else ""
        text = re.sub(r"\d+", "#", str(args[-1]) if len(args) >= 3 else str(record.msg))[:200]
        return self._every.due((record.levelno, facility, text))


_rdlog.addFilter(_LibrdkafkaLines())

DEFAULT_TOPIC = "packetstreamer"  # PacketStreamer's default topic
MAX_MESSAGE_BYTES = 16 << 20


def parse_kafka_url(url: str) -> tuple[str, str]:
    """``kafka://h1:9092,h2:9092/topic`` → ("h1:9092,h2:9092", "topic") (topic defaults to
    PacketStreamer's ``packetstreamer``)."""
    if not url.startswith("kafka://"):
        raise ValueError(f"not a kafka:// URL: {url!r}")
    rest = url[len("kafka://"):]
    brokers, _, topic = rest.partition("/")
    topic = topic.strip("/") or DEFAULT_TOPIC
    if not brokers:
        raise ValueError(f"{url!r}: no broker (kafka://HOST:PORT/TOPIC)")
    for b in brokers.split(","):
        hp, host, sep, port = _broker_parts(b)
        if not hp or (sep and (not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535)):
            # (librdkafka took port 0 or a port modulo 65536, and retried it for ever)
            raise ValueError(f"{url!r}: broker {b.strip()!r}: give HOST:PORT with a port 1..65535")
    return brokers, topic


def _broker_parts(entry: str) -> tuple[str, str, str, str]:
    """One broker of a list, ``[PROTO://]HOST[:PORT]``: (HOST[:PORT], host, ":" or "", port text)."""
    hp = entry.strip().split("://", 1)[-1]
    return (hp, *hp.rpartition(":"))


def broker_addresses(brokers: str) -> list[tuple[str, int]]:
    """(address, port) of every broker (all resolved addresses), for the sensor's self-exclusion."""
    out: list[tuple[str, int]] = []
    for entry in brokers.split(","):
        b, host, _, port_text = _broker_parts(entry)
        host, port = (host or b).strip("[]"), int(port_text) if port_text.isascii() and port_text.isdigit() else 9092
        try:
            addrs = {str(i[4][0]) for i in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except socket.gaierror as exc:  # not resolvable now: excluded once the client finds it
            log.warning("kafka: cannot resolve broker %s: %s", host, exc)
            addrs = set()
        out += [(a, port) for a in sorted(addrs)]
    return out


def _librdkafka_logger() -> logging.Logger:
    return _rdlog


class ErrorLog:
    """librdkafka error callback: count, log at most every 10 s per error code."""

    def __init__(self, counters: collections.Counter) -> None:
        self.counters = counters
        self._every = _EveryTenSeconds()
        self.all_down = False

    def __call__(self, err) -> None:
        name = err.name() if hasattr(err, "name") else str(err)
        self.counters["kafka_errors"] += 1
        self.all_down = name == "_ALL_BROKERS_DOWN" or (self.all_down and name == "_TRANSPORT")
        if self._every.due(name):
            log.warning("kafka: %s", err.str() if hasattr(err, "str") else err)


def producer_config(brokers: str, *, client_id: str = "pktstream", acks: str = "all",
                    properties: dict[str, Any] | None = None, timeout: float | None = None,
                    error_cb: Callable | None = None) -> dict[str, Any]:
    """librdkafka producer settings: idempotent, ordered, infinite retries; ``properties`` (TLS,
    SASL, anything librdkafka accepts: ``security.protocol``, ``ssl.ca.location``,
    ``sasl.mechanism``, ``sasl.username`` ...) override the defaults."""
    acks = str(acks)
    conf: dict[str, Any] = {
        "bootstrap.servers": brokers, "client.id": client_id, "acks": acks,
        "enable.idempotence": acks in ("all", "-1"),
        "message.timeout.ms": 0,              # never give a frame up: retry until delivered
        "linger.ms": 5, "compression.type": "none",  # frames are zstd already
        "message.max.bytes": MAX_MESSAGE_BYTES + 65536,
        "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 2000,
        "socket.connection.setup.timeout.ms": int((timeout or 10) * 1000),
        "logger": _librdkafka_logger(),
    }
    if acks not in ("all", "-1"):
        log.warning("kafka: acks=%s: idempotence off, a broker failure may lose or reorder acknowledged blocks", acks)
    if error_cb is not None:
        conf["error_cb"] = error_cb
    conf.update(properties or {})
    return conf


def kafka_client(kind: str, conf: dict[str, Any]):
    """A librdkafka ``Producer`` (``kind`` "producer") or ``Consumer`` for ``conf``; a setting
    librdkafka refuses (an unknown property, ``acks=0`` with idempotence, a timeout out of
    range) is a one-line ConfigError, not a traceback."""
    from confluent_kafka import Consumer, KafkaException, Producer
    try:
        return (Producer if kind == "producer" else Consumer)(conf)
    except (KafkaException, ValueError, TypeError) as exc:
        err = kafka_error(exc)
        text = err.str() if hasattr(err, "str") else str(err)
        raise ConfigError(f"Kafka {kind} settings: {text}") from None


def check_stall_timeout(seconds: float) -> float:
    """``stall_timeout`` checked: a finite number of seconds >= 1 (0 would replace the producer
    on every pass and never let a report arrive)."""
    if not (isinstance(seconds, (int, float)) and 1 <= seconds < float("inf")):
        raise ConfigError(f"Kafka stall timeout: must be a number of seconds >= 1, got {seconds!r}")
    return float(seconds)


def check_topic(topic: str) -> None:
    """Kafka's topic name rule (a name it refuses would fail every message, for ever)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", topic or "") or topic in (".", ".."):
        raise ConfigError(f"Kafka topic {topic!r}: 1-249 letters, digits, '.', '_' or '-'")


def consumer_config(brokers: str, group: str, *, client_id: str = "pktstream-receiver",
                    properties: dict[str, Any] | None = None, error_cb: Callable | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": brokers, "group.id": group, "client.id": client_id,
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": MAX_MESSAGE_BYTES + 65536,
        # (librdkafka's maximum: a larger message -- a foreign one -- is returned whole however
        # large, and a smaller bound stalled its partition for good; it is then skipped, counted)
        "receive.message.max.bytes": 1_000_000_000,
        "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 2000,
        "logger": _librdkafka_logger(),
    }
    if error_cb is not None:
        conf["error_cb"] = error_cb
    conf.update(properties or {})
    return conf


def frame_headers(*, sensor_id: str, hostname: str, interface: str, link_type: int, snaplen: int,
                  seq: int, kind: str = "data", instance: str = "", first_seq: int = 0,
                  prev_seq: int = 0) -> list[tuple[str, bytes]]:
    """A DATA message's headers. ``instance`` (the sensor process) and ``first_seq`` (the first
    seq that process made; below it: a previous run's spooled block) let a receiver tell a
    second process with the same sensor id from a resend; ``prev_seq`` (the block this sensor
    produced before this one) lets it see blocks that never arrived (docs/DEPLOYMENT.md, "Kafka
    and S3")."""
    headers = [("type", kind.encode()), ("sensor_id", sensor_id.encode()), ("hostname", hostname.encode()),
               ("interface", interface.encode()), ("link_type", str(link_type).encode()),
               ("snaplen", str(snaplen).encode()), ("seq", str(seq).encode())]
    if instance:
        headers += [("instance", instance.encode()), ("first_seq", str(first_seq).encode()),
                    ("prev_seq", str(prev_seq).encode())]
    return headers


def parse_headers(headers) -> dict[str, str]:
    out = {}
    for k, v in headers or ():
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                continue
        out[k] = v or ""
    return out


def purge_and_close(producer) -> None:
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(0)
    except Exception:  # noqa: BLE001 - the old producer is being discarded anyway
        pass


# -- sensor side ---------------------------------------------------------------------------------

#: delivery errors that refuse one message for good (resending it can only fail again)
FRAME_REFUSED = frozenset({"MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_MSG", "CORRUPT_MESSAGE",
                           "INVALID_RECORD", "INVALID_MSG_SIZE", "RECORD_LIST_TOO_LARGE"})


def kafka_error(exc: BaseException) -> Any:
    """The ``KafkaError`` a ``KafkaException`` carries (else the exception itself)."""
    return exc.args[0] if exc.args else exc


def refused_for_good(err: Any) -> bool:
    """Whether a ``KafkaError`` (a delivery report's, or :func:`kafka_error`'s) refuses its
    message for good: see FRAME_REFUSED."""
    return getattr(err, "name", lambda: "")() in FRAME_REFUSED

class KafkaTransport:
    """A Sensor transport that produces the FrameStore's frames to Kafka (instead of TCP to a
    receiver). Frames are forgotten only when their delivery reports arrive; while the brokers
    are unreachable they stay in the window/spool (and beyond it are dropped and counted, as
    with a receiver). Use ``Sensor(transport=KafkaTransport(...))`` or ``--output kafka://``."""

    def __init__(self, brokers: str, topic: str = DEFAULT_TOPIC, *, client_id: str = "pktstream-sensor",
                 acks: str = "all", properties: dict[str, Any] | None = None, timeout: float | None = None,
                 stall_timeout: float = 30.0, max_outstanding: int = 10000) -> None:
        self.brokers, self.topic = brokers, topic
        self.client_id, self.acks, self.properties, self.timeout = client_id, acks, dict(properties or {}), timeout
        self.stall_timeout = check_stall_timeout(stall_timeout)
        self.max_outstanding = max_outstanding
        self.counters: collections.Counter = collections.Counter()
        check_topic(topic)
        self._producer(ErrorLog(self.counters))  # (settings librdkafka refuses: refused now, before capture)

    def describe(self) -> str:
        return f"kafka://{self.brokers}/{self.topic}"

    def exclude(self) -> list[tuple[str, int]]:
        """The bootstrap brokers' (address, port) pairs, excluded from capture from the start."""
        return broker_addresses(self.brokers)

    @staticmethod
    def cluster_addresses(producer, timeout: float = 2.0) -> list[tuple[str, int]]:
        """Every broker of the cluster (from its metadata), as (address, port) pairs."""
        try:
            brokers = producer.list_topics(timeout=timeout).brokers.values()
        except Exception as exc:  # noqa: BLE001 - metadata unavailable now: tried again later
            log.debug("kafka: no cluster metadata: %s", exc)
            return []
        return broker_addresses(",".join(f"{b.host}:{b.port}" for b in brokers))

    def _producer(self, errors: ErrorLog):
        return kafka_client("producer", producer_config(self.brokers, client_id=self.client_id, acks=self.acks,
                                                        properties=self.properties, timeout=self.timeout,
                                                        error_cb=errors))

    def run(self, sensor, drain_timeout: float) -> None:
        """Blocks until the sensor stops and everything is delivered (or ``drain_timeout``)."""
        store = sensor.store
        wake = threading.Event()
        store.on_new_frame(wake.set)
        errors = ErrorLog(self.counters)
        producer = self._producer(errors)
        from confluent_kafka import KafkaException
        outstanding: collections.OrderedDict[int, int] = collections.OrderedDict()  # seq -> packets
        # failed_min: the lowest frame whose delivery failed since the producer was made (the
        # next one resends from the acknowledged seq: nothing at or past it is acknowledged)
        state: dict[str, Any] = {"failed": False, "progress": time.monotonic(), "sent": store.acked_seq,
                                 "delivered": 0, "failed_min": None}
        connected_logged = False
        last_stats = time.monotonic()
        every = _EveryTenSeconds()  # (an outage fails every outstanding frame: one line, not thousands)

        def ack() -> None:
            # everything produced before the oldest outstanding or failed frame is delivered
            low = [x for x in (next(iter(outstanding), None), state["failed_min"]) if x is not None]
            store.ack(min(low) - 1 if low else state["sent"])
            sensor.wake()

        def refused(seq: int, packets: int, err) -> None:
            """Kafka refuses this frame for good (too large, invalid): lost, counted, not retried
            (a retry would stop every later frame of this sensor)."""
            sensor.count_rejected(packets)
            self.counters["rejected_frames"] += 1
            log.error("kafka: frame %d refused (%s): its %d packets are lost (counted: rejected_packets)",
                      seq, err, packets)

        def delivered(seq: int, err, msg) -> None:
            packets = outstanding.pop(seq, None)
            if packets is None:
                return
            if err is not None:
                if err.name() in ("_PURGE_QUEUE", "_PURGE_INFLIGHT"):
                    return
                if not refused_for_good(err):
                    self.counters["delivery_failures"] += 1
                    state["failed"] = True
                    state["failed_min"] = seq if state["failed_min"] is None else min(state["failed_min"], seq)
                    if every.due(("not delivered", err.name())):
                        log.warning("kafka: frame %d not delivered: %s (%d delivery failures so far; "
                                    "such lines at most every 10 s)", seq, err, self.counters["delivery_failures"])
                    return
                refused(seq, packets, err)
            else:
                state["progress"] = time.monotonic()
                state["delivered"] += 1
                self.counters["frames_delivered"] += 1
                errors.all_down = False  # (a broker took it: connected again, whatever the last error said)
            ack()

        draining_since: float | None = None
        last_brokers, brokers_every = 0.0, 1.0
        try:
            while True:
                producer.poll(0)
                now = time.monotonic()
                if state["delivered"] and not connected_logged:
                    log.info("connected to Kafka %s (first frames delivered)", self.describe())
                    connected_logged = True
                sensor.set_connected(state["delivered"] > 0 and not errors.all_down)
                if state["delivered"] and now - last_brokers >= brokers_every:
                    # every broker the client talks to (partition leaders too), not only the
                    # bootstrap list, stays out of capture
                    last_brokers = now
                    brokers_every = max(brokers_every, 60.0)
                    found = self.cluster_addresses(producer)
                    if found:
                        sensor.update_exclusions(sorted(set(found) | set(self.exclude())))
                stalled = outstanding and now - state["progress"] > self.stall_timeout
                if state["failed"] or stalled:
                    log.warning("kafka: %s; recreating the producer and resending %d unacknowledged frames",
                                "delivery failed" if state["failed"] else
                                f"no delivery report for {self.stall_timeout:.0f} s", store.pending()[0])
                    self.counters["producer_resets"] += 1
                    purge_and_close(producer)
                    producer = self._producer(errors)
                    outstanding.clear()
                    state.update(failed=False, progress=now, sent=store.acked_seq, failed_min=None)
                if sensor.stopping:
                    draining_since = draining_since or now
                    if not sensor.capturing() and store.pending()[0] == 0:
                        break
                    if now - draining_since > drain_timeout:
                        log.warning("stopping with %d frames not delivered to Kafka", store.pending()[0])
                        break
                if now - last_stats >= sensor.stats_interval and state["delivered"]:
                    last_stats = now
                    self._produce_stats(producer, sensor)
                try:
                    nxt = store.after(state["sent"]) if len(outstanding) < self.max_outstanding else None
                except OSError as exc:  # a spooled block unreadable for now (EMFILE): read again soon
                    log.warning("spool: %s (tried again)", exc)
                    nxt = None
                if nxt is None:
                    wake.wait(0.05)
                    wake.clear()
                    producer.poll(0.01)
                    continue
                seq, data = nxt
                if isinstance(data, tuple):  # FrameStore keeps (header, payload)
                    data = b"".join(data)
                try:
                    head = P.decode_header(data[:P.HEADER_LEN], max_payload=1 << 30, max_raw=1 << 30)
                except FrameError as exc:  # cannot happen for frames this sensor built
                    log.error("kafka: skipping unreadable frame %d: %s", seq, exc)
                    state["sent"] = seq
                    continue
                itf = sensor.interface_by_index(head.iface)
                headers = frame_headers(sensor_id=sensor.sensor_id, hostname=sensor.hostname,
                                        interface=itf["name"] if itf else str(head.iface),
                                        link_type=itf["link_type"] if itf else 1,
                                        snaplen=itf["snaplen"] if itf else 262144, seq=seq,
                                        instance=sensor.instance, first_seq=store.first_own_seq,
                                        prev_seq=state["sent"])
                try:
                    producer.produce(self.topic, value=data, key=sensor.sensor_id.encode(), headers=headers,
                                     on_delivery=lambda err, msg, s=seq: delivered(s, err, msg))
                except BufferError:
                    producer.poll(0.1)
                    continue
                except KafkaException as exc:  # refused by the client before it was queued
                    err = kafka_error(exc)
                    if refused_for_good(err):
                        state["sent"] = seq
                        refused(seq, head.count, err)
                        ack()
                    else:
                        if every.due(("not produced", getattr(err, "name", lambda: "")())):
                            log.warning("kafka: frame %d not produced: %s", seq, err)
                        state["failed"] = True
                        producer.poll(0.1)
                    continue
                if not outstanding:
                    state["progress"] = time.monotonic()
                outstanding[seq] = head.count
                state["sent"] = seq
                self.counters["frames_produced"] += 1
                sensor.counters["frames_sent"] += 1
        finally:
            sensor.set_connected(False)
            if store.pending()[0] == 0:
                producer.flush(5)
            else:
                purge_and_close(producer)

    def _produce_stats(self, producer, sensor) -> None:
        try:
            producer.produce(self.topic, value=P.encode_json(P.FrameType.STATS, sensor.stats()),
                             key=sensor.sensor_id.encode(),
                             headers=[("type", b"stats"), ("sensor_id", sensor.sensor_id.encode()),
                                      ("hostname", sensor.hostname.encode())])
        except (BufferError, ValueError):
            pass


# -- receiver side ---------------------------------------------------------------------------------

class OffsetGaps:
    """The offset each partition's next message should have: from the group's committed offset
    (``expect``), then from each message read (``seen``). Offsets of a topic that only
    non-transactional producers write and that is not compacted have no holes, so a message
    above the expected offset means the ones between were deleted before they were read.
    Not thread-safe (the consumer thread)."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def expect(self, partition: int, offset: int) -> None:
        self._next[partition] = offset

    def forget(self, partition: int) -> None:
        self._next.pop(partition, None)

    def seen(self, partition: int, offset: int) -> int:
        """Record a message at ``offset``; returns how many messages before it were skipped
        (0 when nothing was expected, or when it is read again after a rewind)."""
        expected = self._next.get(partition)
        self._next[partition] = offset + 1
        return offset - expected if expected is not None and offset > expected else 0


REJECT_AHEAD_US = 60_000_000  # a rejected block moves its sensor's seq only this close to the clock
MAX_READ_KEYS = 10_000  # (partition, sensor, process) chains followed for prev_seq gaps (oldest dropped)

#: a KafkaInput's counters (``stats()``, /metrics ``pktstream_input_*_total``)
INPUT_COUNTERS = ("bad_messages", "consume_errors", "kafka_errors", "offset_commits", "conflict_frames",
                  "skipped_messages", "seq_gaps")


class KafkaInput:
    """Feeds a :class:`~pktstream.stream.receiver.Receiver` from a topic, as a member of a consumer group
    (the receiver calls ``start(ingest)`` with its :class:`~pktstream.stream.receiver.ingest.Ingest`).

    Each DATA message is validated and decompressed exactly like a TCP frame, deduplicated by
    (sensor id, seq) against the receiver's persisted per-sensor state, and handed to the outputs.
    A partition's offset is committed only after every gating output has written, flushed and the
    receiver state has been saved for every message up to it (``Receiver`` commit hook), so a
    crash re-reads (and drops as duplicates) instead of losing. When partitions are revoked in a
    rebalance, the consumer first waits (bounded) for their messages to be committed and commits
    their offsets, so the next owner starts exactly after them.
    """

    def __init__(self, brokers: str, topic: str = DEFAULT_TOPIC, group: str = "pktstream-receivers", *,
                 properties: dict[str, Any] | None = None, client_id: str = "pktstream-receiver",
                 revoke_timeout: float = 15.0) -> None:
        self.brokers, self.topic, self.group = brokers, topic, group
        self.properties = dict(properties or {})
        self.client_id = client_id
        self.revoke_timeout = revoke_timeout
        self.counters: collections.Counter = collections.Counter()
        check_topic(topic)
        kafka_client("consumer", consumer_config(brokers, group, client_id=client_id,
                                                 properties=self.properties)).close()  # (refused now)
        self._pending: dict[int, collections.deque] = {}   # partition -> deque[(offset, index)]
        self._committed_index = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None   # confluent_kafka.Consumer, from start()
        self._ingest: Any = None     # the receiver's ingest, from start()
        self._every = _EveryTenSeconds()  # rate of the per-message warnings
        self._offsets = OffsetGaps()  # (consumer thread) a jump is messages deleted unread
        # (partition, sensor id, process) -> seq of its last block read since the partition was
        # assigned: a block whose prev_seq is above it follows blocks that never arrived
        self._last_read: dict[tuple[int, str, str], int] = {}
        self.assigned: list[int] = []

    def describe(self) -> str:
        return f"kafka://{self.brokers}/{self.topic} (group {self.group})"

    # -- lifecycle (called by the Receiver, in its event loop thread) --------------------------------
    def start(self, ingest) -> None:
        self._ingest = ingest
        ingest.add_commit_hook(self._on_commit)
        self._consumer = kafka_client("consumer", consumer_config(self.brokers, self.group, client_id=self.client_id,
                                                                  properties=self.properties,
                                                                  error_cb=ErrorLog(self.counters)))
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        self._thread = threading.Thread(target=self._run, name="kafka-input", daemon=True)
        self._thread.start()
        log.info("receiver consuming %s", self.describe())

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """After the receiver's final commit: commit what is durable and leave the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        c, self._consumer = self._consumer, None
        if c is None:
            return
        try:
            self._commit_ready(c, sync=True)
            c.close()
        except Exception as exc:  # noqa: BLE001
            log.warning("kafka: closing the consumer: %s", exc)

    # -- commit bookkeeping ---------------------------------------------------------------------------
    def _on_commit(self, committed_index: int) -> None:
        self._committed_index = max(self._committed_index, committed_index)

    def _commit_ready(self, consumer, *, sync: bool = False, partitions=None) -> None:
        from confluent_kafka import KafkaException, TopicPartition
        offsets = []
        with self._lock:
            for part, dq in self._pending.items():
                if partitions is not None and part not in partitions:
                    continue
                last = None
                while dq and dq[0][1] <= self._committed_index:
                    last = dq.popleft()[0]
                if last is not None:
                    offsets.append(TopicPartition(self.topic, part, last + 1))
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=not sync)
            self.counters["offset_commits"] += 1
        except KafkaException as exc:
            log.warning("kafka: offset commit failed (will be re-read and dropped as duplicates): %s", exc)

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned = sorted(set(self.assigned) | {p.partition for p in partitions})
        log.info("kafka: assigned partitions %s of %s", [p.partition for p in partitions], self.topic)
        self._forget({p.partition for p in partitions})
        try:
            committed = consumer.committed(partitions, timeout=10)
        except Exception as exc:  # noqa: BLE001 - unknown: no check until the first message
            log.warning("kafka: cannot read the committed offsets (%s): messages deleted before this "
                        "receiver reads them are not detected until the next one", exc)
            return
        for tp in committed:
            if tp.error is None and tp.offset >= 0:
                self._offsets.expect(tp.partition, tp.offset)

    def _forget(self, parts: set[int], *, gone: bool = False) -> None:
        """What was read from partitions ``parts`` no longer tells what comes next; ``gone``:
        they are no longer read here, so neither are their sensors (consumer thread)."""
        for p in parts:
            self._offsets.forget(p)
        with self._lock:
            for key in [k for k in self._last_read if k[0] in parts]:
                del self._last_read[key]
        if gone and self._ingest is not None:
            self._ingest.loop.call_soon_threadsafe(self._not_read_here, parts)

    def _not_read_here(self, parts: set[int]) -> None:
        """(Event loop.) The sensors of partitions ``parts`` are another receiver's to show."""
        for sensor in list(self._ingest.sensors.values()):
            if sensor.position is not None and sensor.position[0] == self.topic and sensor.position[1] in parts:
                sensor.kafka_rx = None

    def _check_offset(self, partition: int, offset: int) -> None:
        """A message's offset above the next expected one: the messages between were deleted
        before this group read them (the topic's retention while the receivers were down or
        behind, or a broker that lost them): lost, counted (``skipped_messages``), said."""
        skipped = self._offsets.seen(partition, offset)
        if not skipped:
            return
        self.counters["skipped_messages"] += skipped
        if self._every.due(("skipped", partition)):
            log.error("kafka: partition %d: the messages at offsets %d..%d were gone before this receiver read "
                      "them (deleted by the topic's retention, or lost by a broker): %d messages lost "
                      "(%d so far, skipped_messages)", partition, offset - skipped, offset - 1, skipped,
                      self.counters["skipped_messages"])

    def _on_revoke(self, consumer, partitions) -> None:
        parts = {p.partition for p in partitions}
        deadline = time.monotonic() + self.revoke_timeout
        while time.monotonic() < deadline:
            with self._lock:
                waiting = any(dq and dq[-1][1] > self._committed_index
                              for p, dq in self._pending.items() if p in parts)
            if not waiting:
                break
            time.sleep(0.05)
        self._commit_ready(consumer, sync=True, partitions=parts)
        with self._lock:
            for p in parts:
                dq = self._pending.pop(p, None)
                if dq:
                    log.warning("kafka: partition %d revoked with %d messages not yet committed "
                                "(the next owner writes them again)", p, len(dq))
        self.assigned = sorted(set(self.assigned) - parts)
        self._forget(parts, gone=True)
        log.info("kafka: revoked partitions %s", sorted(parts))

    def _on_lost(self, consumer, partitions) -> None:
        with self._lock:
            for p in partitions:
                self._pending.pop(p.partition, None)
        self.assigned = sorted(set(self.assigned) - {p.partition for p in partitions})
        self._forget({p.partition for p in partitions}, gone=True)
        log.warning("kafka: lost partitions %s", [p.partition for p in partitions])

    # -- the consumer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        import asyncio  # here, not at the top: a sensor (which imports this module for its URLs) needs no event loop

        consumer, ingest = self._consumer, self._ingest
        loop = ingest.loop
        while not self._stop.is_set():
            try:
                msgs = consumer.consume(num_messages=256, timeout=0.2)
            except Exception as exc:  # noqa: BLE001
                log.warning("kafka: consume failed: %s", exc)
                time.sleep(0.5)
                continue
            for m in msgs:
                if m.error():
                    if m.error().name() != "_PARTITION_EOF":
                        self.counters["consume_errors"] += 1
                        if self._every.due(("consume", m.error().name())):
                            log.warning("kafka: %s", m.error())
                    continue
                self._check_offset(m.partition(), m.offset())
                fut = asyncio.run_coroutine_threadsafe(self._process(m), loop)
                while True:
                    try:
                        index = fut.result(0.5)
                        break
                    except TimeoutError:
                        if self._stop.is_set() and ingest.closing.is_set():
                            index = None
                            break
                if index is None:
                    break
                with self._lock:
                    self._pending.setdefault(m.partition(), collections.deque()).append((m.offset(), index))
            self._commit_ready(consumer)

    async def _process(self, m) -> int:
        """In the receiver's loop: validate, dedupe, dispatch. Returns the receiver index that
        must be committed before this message's offset may be. A message that is not a
        pktstream frame creates no sensor entry (a foreign producer's keys are not sensors)."""
        from pktstream.stream.receiver.ingest import SENSOR_ID, check_interface, numeric_stats
        ingest = self._ingest
        h = parse_headers(m.headers())
        sid = h.get("sensor_id") or (m.key() or b"").decode(errors="replace")
        if not SENSOR_ID.match(sid or ""):
            return self._bad(m, "bad sensor id", protocol=False)
        value = m.value() or b""
        if h.get("type") == "stats":
            try:
                head = P.decode_header(value[:P.HEADER_LEN], max_payload=P.MAX_CONTROL_BYTES, max_raw=0)
                if head.type != P.FrameType.STATS:
                    raise FrameError(f"{head.type.name} frame in a stats message")
                reported = numeric_stats(P.Frame(head.type, payload=value[head.header_len:]).json())
            except FrameError as exc:
                return self._bad(m, f"sensor {sid}: {exc}", protocol=False)
            sensor = self._sensor(sid, h)
            sensor.reported = reported
            sensor.counters["stats_frames"] += 1
            return ingest.index
        try:
            # (bounds of the format, not of this receiver: a block larger than it takes is a
            # sensor's block, rejected and counted per sensor by ingest, not a foreign message)
            head = P.decode_header(value[:P.HEADER_LEN], max_payload=1 << 30, max_raw=1 << 30)
            if head.type != P.FrameType.DATA:
                raise FrameError(f"{head.type.name} frame in a data message")
            if head.header_len + head.payload_len != len(value):
                raise FrameError(f"message is {len(value)} bytes, frame says {head.header_len + head.payload_len}")
            if str(head.seq) != h.get("seq", str(head.seq)):
                raise FrameError(f"seq header {h.get('seq', '')[:40]!r} != frame seq {head.seq}")
            desc = check_interface({"index": head.iface, "name": h.get("interface", ""),
                                     "link_type": int(h.get("link_type", "-1")),
                                     "snaplen": int(h.get("snaplen", "-1"))})
            first_seq, prev_seq = int(h.get("first_seq", "0")), int(h.get("prev_seq", "0"))
        except (FrameError, ValueError) as exc:
            return self._bad(m, f"sensor {sid}: {exc}", protocol=True)
        sensor = self._sensor(sid, h)
        frame = P.Frame(head.type, head.flags, head.seq, head.iface, head.count, head.raw_len,
                        value[head.header_len:])
        instance = h.get("instance", "")[:64]
        # (at or before the place of the newest message of this sensor handled: read again, e.g.
        # by another group or after a crash; then never a conflict, nor a gap counted twice)
        here = (self.topic, m.partition(), m.offset())
        read_again = sensor.position is not None and sensor.position[:2] == here[:2] and here[2] <= sensor.position[2]
        if not read_again:
            sensor.position = here
        if instance:
            self._check_prev(sensor, (m.partition(), sid, instance), prev_seq, head.seq, count=not read_again)
        if (instance and not read_again and head.seq <= sensor.last_accepted and head.seq >= first_seq > 0
                and head.seq > sensor.instances.get(instance, 0)):
            self._conflict(sensor, instance, frame)
            return ingest.index
        try:
            before = sensor.last_accepted
            if await ingest.ingest(sensor, frame, desc, wire_bytes=len(value), acknowledged=False):
                sensor.interfaces[head.iface] = desc
                if instance and sensor.last_accepted == head.seq:
                    sensor.accepted_from(instance, head.seq)
                elif (instance in sensor.instances and 0 < prev_seq <= before
                      and head.seq <= time.time_ns() // 1000 + REJECT_AHEAD_US):
                    # rejected, and it continues a known process's blocks: its resend (a producer
                    # reset, a re-read) is a duplicate, not counted again. A bad message that does
                    # not (foreign, a seq far ahead) moves nothing: it must not mute the sensor
                    sensor.last_accepted = head.seq
                    sensor.accepted_from(instance, head.seq)
        except FrameError as exc:
            return self._bad(m, f"sensor {sid}: {exc}", protocol=True)
        return ingest.index

    def _sensor(self, sid: str, h: dict[str, str]):
        """The receiver's entry of a sensor whose message validated; its host name from it."""
        sensor = self._ingest.sensor_state(sid)
        sensor.kafka_rx = time.monotonic()
        if sensor.writer is None:
            sensor.peer = self.describe()
        if h.get("hostname"):
            sensor.hostname = P.printable(h["hostname"][:255])
        return sensor

    def _bad(self, m, why: str, *, protocol: bool) -> int:
        """A message that is not a valid pktstream frame: skipped, counted (``bad_messages``;
        a DATA message's also in ``protocol_errors``), said at most every 10 s per kind."""
        self.counters["bad_messages"] += 1
        if protocol:
            self._ingest.counters["protocol_errors"] += 1
        if self._every.due(("bad", re.sub(r"\d+", "#", why)[:120])):
            log.warning("kafka: partition %d offset %d: %s; skipped (%d bad messages so far; "
                        "such lines at most every 10 s)", m.partition(), m.offset(), why, self.counters["bad_messages"])
        return self._ingest.index

    def _check_prev(self, sensor, key: tuple[int, str, str], prev_seq: int, seq: int, *, count: bool) -> None:
        """Blocks of this sensor process that never arrived: its block before this one
        (``prev_seq``) is above the last one read from it since the partition was assigned.
        They are lost between the sensor and this receiver (a broker that lost acknowledged
        messages, the topic's retention) unless the sensor counted them (rejected_frames: Kafka
        refused them): counted per sensor (``seq_gaps``; not again when ``count`` is False: a
        block read again), said every 10 s per sensor."""
        with self._lock:
            last = self._last_read.pop(key, None)
            self._last_read[key] = max(seq, last or 0)  # (re-inserted: the dict's order is recency)
            if len(self._last_read) > MAX_READ_KEYS:
                del self._last_read[next(iter(self._last_read))]
        if last is None or prev_seq <= last or not count:
            return
        sensor.counters["seq_gaps"] += 1
        self.counters["seq_gaps"] += 1
        if self._every.due(("gap", sensor.sensor_id)):
            log.error("kafka: sensor %s: the blocks after seq %d up to seq %d never arrived (lost by a broker or "
                      "deleted by the topic's retention, unless the sensor counts them in rejected_frames); "
                      "%d such gaps so far (seq_gaps)", sensor.sensor_id, last, prev_seq, sensor.counters["seq_gaps"])

    def _conflict(self, sensor, instance: str, frame: P.Frame) -> None:
        """A block this sensor process made (seq >= its first) below what the receiver already
        accepted for its id from another process: two sensors publish with one id (or one's
        clock went back without its spool). Not a duplicate: its packets are lost, counted
        (``conflict_frames``/``conflict_packets``) and said every 10 s per sensor."""
        c = sensor.counters
        c["conflict_frames"] += 1
        c["conflict_packets"] += frame.count
        self.counters["conflict_frames"] += 1
        if self._every.due(("conflict", sensor.sensor_id)):
            others = [i for i in sensor.instances if i != instance]
            log.error("kafka: sensor %s: block %d of process %s is below seq %d accepted from %s: two sensors "
                      "publish with this id (or its clock went back without its spool); its %d packets are "
                      "dropped (%d packets so far, conflict_packets): give each sensor its own --sensor-id",
                      sensor.sensor_id, frame.seq, instance, sensor.last_accepted,
                      f"process {others[-1]}" if others else "an earlier process", frame.count,
                      c["conflict_packets"])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = sum(len(d) for d in self._pending.values())
        return {"input": self.describe(), "assigned_partitions": list(self.assigned),
                "uncommitted_messages": pending, **dict.fromkeys(INPUT_COUNTERS, 0), **self.counters}
