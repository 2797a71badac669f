"""Kafka and S3 for ``pktstream receiver`` / ``pktstream sensor``: URL flags → settings → objects.

Receiver: ``--from kafka://HOST:PORT/TOPIC --group G`` (instead of ``--listen``),
``-w s3://BUCKET/PREFIX [--s3-endpoint URL]``, ``-w kafka://HOST:PORT/TOPIC``.
Sensor: ``--output kafka://HOST:PORT/TOPIC`` (instead of ``--receiver``).
Both: ``--kafka-property KEY=VALUE`` (librdkafka: TLS, SASL, timeouts ...).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, TypeVar

from pktstream import config as C
from pktstream.config_plugins import KafkaInputSettings, KafkaSettings, S3Settings
from pktstream.exceptions import ConfigError

_K = TypeVar("_K", KafkaSettings, KafkaInputSettings)


def _size(text: str) -> int:
    try:
        return C.parse_size(text, "size")
    except ValueError as exc:  # (argparse would print only "invalid _size value")
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None


def _prop(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _kafka_from_url(url: str, settings: _K) -> _K:
    """``kafka://HOST:PORT/TOPIC`` into Kafka output or input settings (brokers, topic)."""
    from pktstream.stream.kafka import parse_kafka_url
    settings.brokers, settings.topic = parse_kafka_url(url)
    return settings


def add_receiver_args(r) -> None:
    r.add_argument("--from", dest="from_url", metavar="kafka://HOST:PORT/TOPIC",
                   help="consume this Kafka topic (as member of --group) instead of listening for sensors")
    r.add_argument("--group", dest="kafka_group", metavar="G",
                   help="Kafka consumer group (default pktstream-receivers)")
    r.add_argument("--kafka-property", action="append", type=_prop, default=[], metavar="KEY=VALUE",
                   help="librdkafka property for the Kafka input/output (repeat): TLS, SASL, timeouts")
    r.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for -w s3:// (default AWS)")
    r.add_argument("--s3-region", metavar="REGION")
    r.add_argument("--s3-path-style", action="store_true", help="path-style addressing (MinIO, moto, Ceph)")
    r.add_argument("--s3-staging", metavar="DIR", help="local staging directory for S3 uploads "
                   "(default STATE_DIR/s3-staging, else a temporary directory)")
    r.add_argument("--s3-staging-size", type=_size, metavar="SIZE", help="staging bound (default 1GiB)")
    r.add_argument("--s3-part-size", type=_size, metavar="SIZE", help="multipart part size (>= 5MiB)")
    r.add_argument("--s3-key-template", metavar="TEMPLATE", help="object key template (docs/CONFIGURATION.md)")
    r.add_argument("--s3-request-attempts", type=int, metavar="N",
                   help="attempts per S3 request before the file waits for the next retry (default 3)")


def add_sensor_args(s) -> None:
    s.add_argument("--output", dest="output_url", metavar="kafka://HOST:PORT/TOPIC",
                   help="produce blocks to Kafka instead of streaming to a receiver")
    s.add_argument("--kafka-property", action="append", type=_prop, default=[], metavar="KEY=VALUE",
                   help="librdkafka property (repeat): TLS, SASL, timeouts")
    s.add_argument("--kafka-stall-timeout", type=float, default=30.0, metavar="SEC",
                   help="no delivery report for SEC while frames are outstanding: new producer, resend (30)")


def apply_receiver_args(args, s) -> None:
    """Fold URL flags into ReceiverSettings (call before the 'no output' check)."""
    from pktstream.sinks.s3 import parse_s3_url
    props = dict(getattr(args, "kafka_property", None) or [])
    w = getattr(args, "write", None) or ""
    if w.startswith("s3://"):
        bucket, prefix = parse_s3_url(w)
        s.s3 = s.s3 or S3Settings()
        s.s3.bucket, s.s3.prefix = bucket, prefix
        args.write = None
    elif w.startswith("kafka://"):
        s.kafka = _kafka_from_url(w, s.kafka or KafkaSettings())
        args.write = None
    if s.s3 is not None:
        for attr, flag in (("endpoint", "s3_endpoint"), ("region", "s3_region"), ("staging_dir", "s3_staging"),
                           ("staging_max_bytes", "s3_staging_size"), ("upload_chunk_size", "s3_part_size"),
                           ("key_template", "s3_key_template"), ("request_attempts", "s3_request_attempts")):
            if getattr(args, flag, None) is not None:
                setattr(s.s3, attr, getattr(args, flag))
        s.s3.path_style = s.s3.path_style or bool(getattr(args, "s3_path_style", False))
        if not 1 <= s.s3.request_attempts <= 20:
            raise ConfigError(f"--s3-request-attempts: 1-20 attempts per request, got {s.s3.request_attempts}")
    if s.kafka is not None:
        s.kafka.properties.update(props)
    url = getattr(args, "from_url", None)
    if url:
        if not url.startswith("kafka://"):
            raise ConfigError(f"--from {url}: only kafka://HOST:PORT/TOPIC inputs exist")
        s.kafka_input = _kafka_from_url(url, s.kafka_input or KafkaInputSettings())
    if s.kafka_input is not None:
        if getattr(args, "kafka_group", None):
            s.kafka_input.group = args.kafka_group
        s.kafka_input.properties.update(props)
    elif getattr(args, "kafka_group", None):
        raise ConfigError("--group needs a Kafka input (--from kafka://...)")


def default_staging_dir(bucket: str, prefix: str, endpoint: str | None) -> str:
    """The staging directory of an S3 output given neither ``--s3-staging`` nor ``--state-dir``:
    the same for every run to the same destination, so files a stopped (or crashed) run left
    are uploaded by the next one: ``$XDG_STATE_HOME/pktstream/s3-staging/BUCKET-HASH``
    (``~/.local/state`` by default)."""
    import hashlib
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    tag = hashlib.sha256(f"{endpoint or ''}|{bucket}|{prefix}".encode()).hexdigest()[:10]
    return os.path.join(base, "pktstream", "s3-staging", f"{re.sub(r'[^A-Za-z0-9._-]', '_', bucket)}-{tag}")


def has_cloud_output(s) -> bool:
    return s.s3 is not None or s.kafka is not None


def receiver_outputs(s) -> list:
    outs: list[Any] = []
    if s.kafka is not None:
        from pktstream.sinks.kafka import KafkaSink
        k = s.kafka
        outs.append(KafkaSink(k.brokers, k.topic, client_id=k.client_id, acks=k.acks, properties=k.properties,
                              timeout=k.timeout))
    if s.s3 is not None:
        from pktstream.sinks.s3 import S3Sink
        x = s.s3
        staging = x.staging_dir or (os.path.join(s.state_dir, "s3-staging") if s.state_dir else
                                    default_staging_dir(x.bucket, x.prefix, x.endpoint))
        outs.append(S3Sink(x.bucket, x.prefix, staging_dir=staging, endpoint_url=x.endpoint, region=x.region,
                           path_style=x.path_style, rotate_bytes=s.rotate_bytes or x.total_file_size,
                           rotate_seconds=s.rotate_seconds or x.upload_timeout, part_size=x.part_size,
                           acl=x.canned_acl, staging_max_bytes=x.staging_max_bytes, key_template=x.key_template,
                           format=x.format, close_timeout=max(x.upload_timeout, 30.0),
                           request_attempts=x.request_attempts,
                           index=getattr(s, "index", False) is True,
                           index_max_flows=getattr(s, "index_max_flows", None),
                           zstd_frame_bytes=getattr(s, "zstd_frame_size", None) if x.format.endswith(".zst") else None,
                           fsync=bool(getattr(s, "fsync", False))))
    return outs


def receiver_inputs(s) -> list:
    if s.kafka_input is None:
        return []
    from pktstream.stream.kafka import KafkaInput
    k = s.kafka_input
    return [KafkaInput(k.brokers, k.topic, k.group, properties=k.properties)]


def sensor_transport(args, s):
    """A KafkaTransport from --output kafka:// or output.plugins.kafka, else None (TCP)."""
    from pktstream.stream.kafka import KafkaTransport
    url = getattr(args, "output_url", None)
    if url:
        if not url.startswith("kafka://"):
            raise ConfigError(f"--output {url}: only kafka://HOST:PORT/TOPIC (or --receiver HOST:PORT)")
        s.kafka = _kafka_from_url(url, s.kafka or KafkaSettings())
        s.receiver = None
    if s.kafka is None:
        return None
    k = s.kafka
    k.properties.update(dict(getattr(args, "kafka_property", None) or []))
    return KafkaTransport(k.brokers, k.topic, client_id=k.client_id, acks=k.acks, properties=k.properties,
                          timeout=k.timeout, stall_timeout=getattr(args, "kafka_stall_timeout", 30.0))
