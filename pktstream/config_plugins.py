"""``output.plugins.kafka``, ``output.plugins.s3`` and ``input.kafka``: PacketStreamer's plugin keys
(with its documented defaults) plus pktstream's own. Meanings in docs/CONFIGURATION.md."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pktstream.exceptions import ConfigError

MIB = 1 << 20
S3_MIN_PART = 5 * MIB  # S3's smallest multipart part (all but the last)


@dataclass
class KafkaSettings:
    """Kafka output (receiver sink, or a sensor's transport instead of a receiver)."""
    brokers: str = ""
    topic: str = "packetstreamer"
    client_id: str = "packetstreamer"
    acks: str = "all"
    timeout: float | None = None          # connection setup timeout (upstream `timeout`)
    message_size: int = 65 * 1000         # upstream only: accepted, not used (one message per block)
    file_size: int = 1000 * 1000          # upstream only: accepted, not used (no "files" in Kafka here)
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class KafkaInputSettings:
    """A receiver consuming a topic as a member of a consumer group."""
    brokers: str = ""
    topic: str = "packetstreamer"
    group: str = "pktstream-receivers"
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class S3Settings:
    bucket: str = ""
    region: str | None = None
    prefix: str = ""
    endpoint: str | None = None
    path_style: bool = False
    total_file_size: int = 10 * 1000 * 1000   # upstream default 10MB: object size (rotation)
    upload_chunk_size: int = 5 * 1000 * 1000  # upstream default 5MB; raised to S3's 5 MiB minimum
    upload_timeout: float = 60.0              # upstream 1m: an object is completed after this long
    canned_acl: str = "bucket-owner-full-control"
    staging_dir: str | None = None
    staging_max_bytes: int = 1 << 30
    key_template: str | None = None
    format: str = "pcapng"
    request_attempts: int = 3                 # per S3 request (botocore standard retries), then the file waits

    @property
    def part_size(self) -> int:
        return max(self.upload_chunk_size, S3_MIN_PART)


def _properties(node) -> dict[str, Any]:
    props = {}
    for k in list(node.data):
        v = node.data[k]
        if not isinstance(v, (str, int, float, bool)):
            raise ConfigError(f"{node._p(str(k))}: librdkafka properties are scalars, got {v!r}")
        node.used.add(k)
        props[str(k)] = v
    return props


def _brokers(node) -> str:
    if isinstance(node.data.get("brokers"), list):  # a YAML list is accepted too
        v = ",".join(map(str, node.get("brokers", "strlist")))
    else:
        v = node.get("brokers", "str")
    if not v or not v.strip():
        raise ConfigError(f"{node._p('brokers')}: required (comma-separated host:port)")
    return ",".join(b.strip() for b in v.split(",") if b.strip())


def kafka_output(node) -> KafkaSettings | None:
    if not node.data:
        node.finish()
        return None
    k = KafkaSettings(brokers=_brokers(node))
    k.topic = node.get("topic", "str", k.topic) or k.topic
    k.client_id = node.get("clientId", "str", k.client_id) or k.client_id
    k.acks = str(node.get("acks", "str", k.acks))
    if k.acks not in ("all", "-1", "0", "1", "none", "one"):
        raise ConfigError(f"{node._p('acks')}: all, 1 or 0, got {k.acks!r}")
    k.acks = {"none": "0", "one": "1"}.get(k.acks, k.acks)
    if node.has("timeout"):
        k.timeout = node.get("timeout", "duration")
    k.message_size = node.get("messageSize", "size", k.message_size)
    k.file_size = node.get("fileSize", "size", k.file_size)
    k.properties = _properties(node.child("properties"))
    node.finish()
    return k


def kafka_input(node) -> KafkaInputSettings | None:
    if not node.data:
        node.finish()
        return None
    k = KafkaInputSettings(brokers=_brokers(node))
    k.topic = node.get("topic", "str", k.topic) or k.topic
    k.group = node.get("group", "str", k.group) or k.group
    k.properties = _properties(node.child("properties"))
    node.finish()
    return k


def s3_output(node) -> S3Settings | None:
    if not node.data:
        node.finish()
        return None
    s = S3Settings(bucket=node.get("bucket", "str") or "")
    if not 3 <= len(s.bucket) <= 63:
        raise ConfigError(f"{node._p('bucket')}: required (3-63 characters)")
    s.region = node.get("region", "str")
    s.prefix = node.get("prefix", "str", "") or ""
    s.endpoint = node.get("endpoint", "str")
    s.path_style = node.get("pathStyle", "bool", False)
    s.total_file_size = node.get("totalFileSize", "size", s.total_file_size)
    s.upload_chunk_size = node.get("uploadChunkSize", "size", s.upload_chunk_size)
    s.upload_timeout = node.get("uploadTimeout", "duration", s.upload_timeout)
    s.canned_acl = node.get("cannedACL", "str", s.canned_acl) or s.canned_acl
    s.staging_dir = node.get("stagingDir", "str")
    s.staging_max_bytes = node.get("stagingMaxBytes", "size", s.staging_max_bytes)
    s.key_template = node.get("keyTemplate", "str")
    s.format = node.get("format", "str", s.format) or s.format
    s.request_attempts = node.get("requestAttempts", "int", s.request_attempts)
    if not 1 <= s.request_attempts <= 20:
        raise ConfigError(f"{node._p('requestAttempts')}: 1-20 attempts per request, got {s.request_attempts}")
    if s.format not in ("pcap", "pcapng", "pcap.zst", "pcapng.zst"):
        raise ConfigError(f"{node._p('format')}: pcap, pcapng, pcap.zst or pcapng.zst")
    if s.total_file_size <= 0 or s.upload_timeout <= 0:
        raise ConfigError(f"{node.path}: totalFileSize and uploadTimeout must be positive")
    if s.staging_max_bytes < s.total_file_size:
        raise ConfigError(f"{node._p('stagingMaxBytes')}: must hold at least one file (totalFileSize)")
    node.finish()
    return s


def plugins(node, role: str) -> dict[str, Any]:
    """``output.plugins`` → {"kafka": KafkaSettings|None} plus, for a receiver, "s3": S3Settings|None."""
    out: dict[str, Any] = {"kafka": kafka_output(node.child("kafka"))}
    s3 = node.child("s3")
    if role == "sensor" and s3.data:
        raise ConfigError(f"{s3.path}: a pktstream sensor does not upload to S3 itself; stream to a "
                          "receiver with output.plugins.s3 (or to Kafka)")
    if role != "sensor":
        out["s3"] = s3_output(s3)
    node.finish()
    return out
