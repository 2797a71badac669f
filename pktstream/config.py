"""YAML configuration → validated settings (PacketStreamer's keys accepted unchanged).

Every key, its default and its upstream meaning is documented in docs/CONFIGURATION.md.
Errors name the key path and the reason (``ConfigError: output.server.port: must be 1-65535``);
unknown keys are errors too (upstream silently ignores them, e.g. ``tls.certFile``).
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pktstream.exceptions import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_size(value: Any, path: str) -> int:
    """Bytes from an int or a string such as ``"5MB"``, ``"64MiB"``, ``"512k"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{path}: must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            mult = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]  # (a bare number: bytes)
            base = 1024 if m.group(3) else 1000
            return int(float(m.group(1)) * base ** mult)
    raise ConfigError(f"{path}: expected a size like 1048576 or '64MiB', got {value!r}")


def parse_duration(value: Any, path: str) -> float:
    """Seconds from a number or a Go-style duration string (``"1m"``, ``"500ms"``, ``"1h30m"``)."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):  # (YAML .nan, .inf: a timeout that never fires, a rate never limited)
            raise ConfigError(f"{path}: expected a finite number of seconds, got {value!r}")
        if value < 0:
            raise ConfigError(f"{path}: must not be negative")
        return float(value)
    if isinstance(value, str):
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", value.strip())
        if parts and "".join(a + b for a, b in parts) == value.strip():
            unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
            return sum(float(a) * unit[b] for a, b in parts)
    raise ConfigError(f"{path}: expected seconds or a duration like '1m', got {value!r}")


class _Node:
    """A mapping being validated: tracks which keys were read, to report unknown ones."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data, self.path = data, path
        self.used: set[str] = set()

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def child(self, key: str) -> _Node:
        self.used.add(key)
        return _Node(self.data.get(key), self._p(key))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, kind: str, default: Any = None) -> Any:
        self.used.add(key)
        v = self.data.get(key)
        p = self._p(key)
        if v is None:
            return default
        if kind == "str":
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise ConfigError(f"{p}: expected a string, got {v!r}")
            return str(v)
        if kind == "bool":
            if not isinstance(v, bool):
                raise ConfigError(f"{p}: expected true or false, got {v!r}")
            return v
        if kind == "int":
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{p}: expected an integer, got {v!r}")
            return v
        if kind == "float":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{p}: expected a non-negative number, got {v!r}")
            return float(v)
        if kind == "port":
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
                raise ConfigError(f"{p}: must be a port number 1-65535, got {v!r}")
            return v
        if kind == "ports":
            if not isinstance(v, list):
                raise ConfigError(f"{p}: expected a list of ports, got {v!r}")
            for i, x in enumerate(v):
                if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < 65536:
                    raise ConfigError(f"{p}[{i}]: must be a port number 1-65535, got {x!r}")
            return list(v)
        if kind == "strlist":
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{p}: expected a list of strings, got {v!r}")
            return list(v)
        if kind == "size":
            return parse_size(v, p)
        if kind == "duration":
            return parse_duration(v, p)
        raise AssertionError(kind)

    def finish(self, hints: dict[str, str] | None = None) -> None:
        for key in self.data:
            if key in self.used:
                continue
            hint = (hints or {}).get(key)
            if hint is None:
                close = difflib.get_close_matches(str(key), list(self.used), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "not a pktstream key"
            raise ConfigError(f"{self._p(str(key))}: unknown key ({hint})")


_TLS_HINTS = {"certFile": "the key is 'certfile' (lowercase, as PacketStreamer reads it)",
              "keyFile": "the key is 'keyfile' (lowercase, as PacketStreamer reads it)",
              "caFile": "the key is 'cafile'"}


@dataclass
class TLSSettings:
    """``tls:`` — PacketStreamer's enable/certfile/keyfile plus verification settings."""
    enable: bool = False
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    client_certs: bool = False       # receiver: require client certificates (mTLS)
    insecure: bool = False           # sensor: do not verify the receiver (must be spelled out)
    server_name: str | None = None   # sensor: name to verify instead of the address
    identity_from_cert: bool = False # receiver (mTLS): sensor id must be the cert's CN/SAN


@dataclass
class AuthSettings:
    """``auth:`` — shared key (PacketStreamer ``enable``/``key``) or per-sensor key file."""
    enable: bool = False
    key: str | None = None
    keyfile: str | None = None       # receiver: YAML/lines "sensor-id: key"


def _tls(node: _Node, role: str) -> TLSSettings:
    t = TLSSettings(enable=node.get("enable", "bool", False), certfile=node.get("certfile", "str"),
                    keyfile=node.get("keyfile", "str"), cafile=node.get("cafile", "str"),
                    client_certs=node.get("clientCerts", "bool", False),
                    insecure=node.get("insecure", "bool", False), server_name=node.get("serverName", "str"),
                    identity_from_cert=node.get("identityFromCert", "bool", False))
    node.finish(_TLS_HINTS)
    check_tls(t, role, node.path or "tls")
    return t


def check_tls(t: TLSSettings, role: str, where: str) -> None:
    """TLS settings that would not do what they say (after the command line's flags too): a
    key, CA or client-certificate setting on a receiver without a certificate, or any TLS
    setting on a sensor with TLS off, would have meant plaintext."""
    if role == "receiver":
        if not t.enable and (t.keyfile or t.cafile or t.client_certs):
            raise ConfigError(f"{where}: a TLS key, CA or client certificates need the receiver's certificate "
                              "(certfile, --tls-cert): without one it would serve plaintext")
        if t.enable and not (t.certfile and t.keyfile):
            raise ConfigError(f"{where}: a receiver with TLS needs certfile and keyfile (--tls-cert, --tls-key)")
    elif not t.enable and (t.certfile or t.keyfile or t.cafile or t.server_name or t.insecure):
        raise ConfigError(f"{where}: TLS settings given but TLS is off (enable: true): it would connect in plaintext")
    if t.identity_from_cert and not t.client_certs:
        raise ConfigError(f"{where}: identityFromCert needs client certificates (clientCerts: true, mTLS)")
    if t.enable and bool(t.certfile) != bool(t.keyfile):
        raise ConfigError(f"{where}: certfile and keyfile go together (--tls-cert, --tls-key)")


def _auth(node: _Node) -> AuthSettings:
    a = AuthSettings(enable=node.get("enable", "bool", False), key=node.get("key", "str"),
                     keyfile=node.get("keyfile", "str"))
    node.finish()
    if a.enable and not (a.key or a.keyfile):
        raise ConfigError(f"{node.path}: auth is enabled but neither key nor keyfile is set")
    if not a.enable and (a.key or a.keyfile):
        # upstream ignores a key while enable is false: nobody would be authenticated
        raise ConfigError(f"{node.path}: a key is set but enable is false; set enable: true to use it, or remove it")
    return a


@dataclass
class ReceiverSettings:
    listen: str = "0.0.0.0:8081"
    output_file: str | None = None
    output_dir: str | None = None
    stdout: bool = False
    rotate_bytes: int | None = None
    rotate_seconds: float | None = None
    max_files: int | None = None
    fsync: bool = False
    # index completed files as they are written (docs/ARCHIVE.md); None: the default, on for file
    # outputs that complete files as they go (a directory, rotation): pktstream.cli.stream.build_receiver
    index: bool | None = None
    index_max_flows: int | None = None  # flow records held per open file before a spill (None: default)
    zstd_frame_size: int | None = None  # .zst outputs: seekable layout with frames of this many bytes
    state_dir: str | None = None
    snaplen: int = 262144
    max_connections: int = 256
    connection_burst: int = 20
    connection_seconds: float = 10.0
    handshake_timeout: float = 10.0
    heartbeat: float = 5.0
    max_block_bytes: int = 8 << 20
    stats_interval: float = 60.0
    metrics: str | None = None
    log_file: str | None = None
    tls: TLSSettings = field(default_factory=TLSSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    kafka: Any = None        # config_plugins.KafkaSettings (output.plugins.kafka)
    s3: Any = None           # config_plugins.S3Settings (output.plugins.s3)
    kafka_input: Any = None  # config_plugins.KafkaInputSettings (input.kafka)
    allow_unauthenticated: bool = False  # listen beyond loopback without key or client certificates
    packetstreamer: bool = True          # legacy.packetstreamer: accept PacketStreamer sensors
    packetstreamer_ids: dict[str, str] = field(default_factory=dict)  # legacy.sensors: address -> id


def _legacy(node: _Node, s: ReceiverSettings) -> None:
    """``legacy:`` — PacketStreamer sensors on this receiver (pktstream/stream/legacy.py)."""
    s.packetstreamer = node.get("packetstreamer", "bool", True)
    ids = node.data.get("sensors")
    node.used.add("sensors")
    if ids is not None:
        if not isinstance(ids, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
            raise ConfigError(f"{node.path}.sensors: expected a mapping 'address: sensor-id'")
        s.packetstreamer_ids = dict(ids)
    node.finish()


@dataclass
class SensorSettings:
    receiver: str | None = None
    interfaces: list[str] = field(default_factory=list)
    include_loopback: bool = False
    bpf: str | None = None
    pcap_mode: str = "all"
    capture_ports: list[int] = field(default_factory=list)
    capture_interfaces_ports: dict[str, list[int]] = field(default_factory=dict)
    ignore_ports: list[int] = field(default_factory=list)
    snaplen: int = 262144
    promisc: bool = False
    immediate: bool = False
    buffer_bytes: int = 8 << 20  # as CaptureOptions (stream/sensor.py)
    block_bytes: int = 1 << 20
    max_wait: float = 0.2
    idle_wait: float = 0.05
    timeout_ms: int = 10
    compression_level: int = -1  # as DeliveryOptions (stream/sensor.py)
    window_bytes: int = 32 << 20  # as DeliveryOptions
    spool_dir: str | None = "auto"   # "auto": <state dir>/spool/<sensor id>; None: no spool
    spool_bytes: int | None = None   # None: 1 GiB or half the free space
    sensor_id: str | None = None
    heartbeat: float = 5.0
    stats_interval: float = 5.0
    user: str | None = None
    group: str | None = None
    log_file: str | None = None
    tls: TLSSettings = field(default_factory=TLSSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    kafka: Any = None        # config_plugins.KafkaSettings (output.plugins.kafka)


def _common(root: _Node, role: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if root.has("inputPacketLen"):
        v = root.get("inputPacketLen", "int")
        if not 0 < v <= 262144:
            raise ConfigError(f"inputPacketLen: must be 1-262144, got {v}")
        out["snaplen"] = v
    out["log_file"] = root.get("logFilename", "str")
    out["tls"] = _tls(root.child("tls"), role)
    out["auth"] = _auth(root.child("auth"))
    return out


def _plugins(node: _Node, settings: Any, role: str) -> None:
    """output.plugins.kafka / .s3 (pktstream.config_plugins) → settings.kafka / settings.s3
    (s3: receivers only)."""
    from pktstream import config_plugins
    for name, value in config_plugins.plugins(node, role).items():
        setattr(settings, name, value)


def receiver_settings(data: Any) -> ReceiverSettings:
    """Validate a receiver config mapping (PacketStreamer receiver YAML + pktstream keys)."""
    root = _Node(data, "")
    s = ReceiverSettings()
    inp = root.child("input")
    if inp.has("port") or inp.has("address"):
        port = inp.get("port", "port")
        if port is None:
            raise ConfigError("input.port: required (the port to listen on)")
        addr = inp.get("address", "str", "0.0.0.0") or "0.0.0.0"
        s.listen = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    from pktstream.config_plugins import kafka_input
    s.kafka_input = kafka_input(inp.child("kafka"))
    inp.finish()
    out = root.child("output")
    f = out.child("file")
    path = f.get("path", "str")
    if path == "stdout":
        s.stdout = True
    else:
        s.output_file = path
    f.finish()
    s.output_dir = out.get("directory", "str")
    rot = out.child("rotate")
    s.rotate_bytes = rot.get("bytes", "size")
    s.rotate_seconds = rot.get("seconds", "duration")
    s.max_files = rot.get("files", "int")
    rot.finish()
    s.fsync = out.get("fsync", "bool", False)
    s.index = out.get("index", "bool")
    s.index_max_flows = out.get("indexMaxFlows", "int")
    s.zstd_frame_size = out.get("zstdFrameSize", "size")
    srv = out.child("server")
    _plugins(out.child("plugins"), s, "receiver")
    ignored = []
    if srv.data:
        if not (s.output_file or s.output_dir or s.stdout or s.kafka or s.s3):
            raise ConfigError("output.server: a receiver cannot forward to another receiver "
                              "(PacketStreamer writes unframed data there); use output.file")
        ignored.append("output.server")  # a file shared with the sensors: their receiver address
    out.finish()
    if s.output_file and s.output_dir:
        raise ConfigError("output: file.path and directory are exclusive")
    s.state_dir = root.get("stateDir", "str")
    if root.has("compressBlockSize"):
        # upstream's value (65 KiB by default) may only raise the limit: pktstream sensors make
        # 1 MiB blocks by default and a lower limit would refuse every full block
        s.max_block_bytes = max(root.get("compressBlockSize", "int") * 1024, s.max_block_bytes)
    s.max_connections = root.get("maxConnections", "int", s.max_connections)
    rate = root.child("connectionRate")
    s.connection_burst = rate.get("burst", "int", s.connection_burst)
    s.connection_seconds = rate.get("seconds", "duration", s.connection_seconds)
    rate.finish()
    if s.connection_burst < 1 or s.connection_seconds <= 0:
        raise ConfigError("connectionRate: burst must be >= 1 and seconds > 0")
    s.handshake_timeout = root.get("handshakeTimeout", "duration", s.handshake_timeout)
    s.heartbeat = root.get("heartbeat", "duration", s.heartbeat)
    s.stats_interval = root.get("statsInterval", "duration", s.stats_interval)
    metrics = root.child("metrics")
    s.metrics = metrics.get("listen", "str")
    metrics.finish()
    _legacy(root.child("legacy"), s)
    allow_unauthenticated = root.get("allowUnauthenticated", "bool")
    # an upstream PacketStreamer config without auth (no auth key, or upstream's own example
    # block with enable: false) starts as it did there, warned; not an empty "auth:"
    top = data if isinstance(data, dict) else {}
    auth = top.get("auth")
    upstream_open = "auth" not in top or (isinstance(auth, dict) and auth.get("enable") is False)
    s.allow_unauthenticated = upstream_open if allow_unauthenticated is None else allow_unauthenticated
    for k, v in _common(root, "receiver").items():
        setattr(s, k, v)
    _ignore_other_role(root, SENSOR_KEYS, ignored, "receiver", "sensor")
    root.finish()
    check_receiver_settings(s)
    return s


#: Top-level keys only a sensor reads (PacketStreamer's and pktstream's); a receiver reading a
#: file shared by both roles (as upstream documents it) ignores them, with one info line.
SENSOR_KEYS = ("pcapMode", "capturePorts", "captureInterfacesPorts", "ignorePorts", "gatherMaxWaitSec",
               "interfaces", "includeLoopback", "bpf", "promisc", "immediateMode", "bufferSize",
               "blockSize", "maxWait", "idleWait", "kernelTimeout", "compressionLevel", "windowSize", "spool",
               "sensorId", "user", "group")
#: Top-level keys only a receiver reads.
RECEIVER_KEYS = ("input", "stateDir", "maxConnections", "connectionRate", "handshakeTimeout", "metrics", "legacy")


def _ignore_other_role(root: _Node, keys: tuple[str, ...], ignored: list[str], role: str, other: str) -> None:
    ignored += [k for k in keys if k in root.data]
    root.used.update(keys)
    if ignored:
        import logging
        logging.getLogger("pktstream").info("config: ignoring %s key%s %s (this is a %s)", other,
                                            "s" if len(ignored) > 1 else "", ", ".join(ignored), role)


def sensor_settings(data: Any) -> SensorSettings:
    """Validate a sensor config mapping (PacketStreamer sensor YAML + pktstream keys)."""
    root = _Node(data, "")
    s = SensorSettings()
    out = root.child("output")
    srv = out.child("server")
    if srv.data:
        port = srv.get("port", "port")
        if port is None:
            raise ConfigError("output.server.port: required")
        addr = srv.get("address", "str")
        if not addr:
            raise ConfigError("output.server.address: required")
        s.receiver = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    srv.finish()
    ignored = []
    if out.child("file").data:
        if not s.receiver:
            raise ConfigError("output.file: a sensor streams to a receiver; for a local file use "
                              "`pktstream capture -w FILE` (PacketStreamer wrote an unreadable file here)")
        ignored.append("output.file")  # a file shared with the receiver: its output
    for k in ("directory", "rotate", "fsync", "index", "indexMaxFlows", "zstdFrameSize"):
        if k in out.data:
            out.used.add(k)
            ignored.append(f"output.{k}")
    plugins = out.child("plugins")
    if s.receiver and "s3" in plugins.data:  # the receiver's S3 output in a shared file
        plugins = _Node({k: v for k, v in plugins.data.items() if k != "s3"}, plugins.path)
        ignored.append("output.plugins.s3")
    _plugins(plugins, s, "sensor")
    out.finish()
    if s.receiver and s.kafka:
        raise ConfigError("output: server and plugins.kafka are exclusive (a sensor streams to one of them)")
    mode = root.get("pcapMode", "str", "all") or "all"
    if mode.lower() not in ("all", "allow", "deny"):
        raise ConfigError(f"pcapMode: must be all, allow or deny, got {mode!r}")
    s.pcap_mode = mode.lower()
    s.capture_ports = root.get("capturePorts", "ports", [])
    cip = root.child("captureInterfacesPorts")
    for name in list(cip.data):
        s.capture_interfaces_ports[str(name)] = cip.get(name, "ports", [])
    s.ignore_ports = root.get("ignorePorts", "ports", [])
    if root.has("compressBlockSize"):
        kib = root.get("compressBlockSize", "int")
        if kib <= 0:
            raise ConfigError(f"compressBlockSize: must be positive (KiB), got {kib}")
        s.block_bytes = kib * 1024
    if root.has("gatherMaxWaitSec"):
        s.max_wait = root.get("gatherMaxWaitSec", "float")
    s.interfaces = root.get("interfaces", "strlist", [])
    s.include_loopback = root.get("includeLoopback", "bool", False)
    s.bpf = root.get("bpf", "str")
    s.promisc = root.get("promisc", "bool", False)
    s.immediate = root.get("immediateMode", "bool", False)
    s.buffer_bytes = root.get("bufferSize", "size", s.buffer_bytes)
    if root.has("blockSize"):
        s.block_bytes = root.get("blockSize", "size")
    if root.has("maxWait"):
        s.max_wait = root.get("maxWait", "duration")
    if root.has("idleWait"):
        s.idle_wait = root.get("idleWait", "duration")
    if root.has("kernelTimeout"):
        ms = round(root.get("kernelTimeout", "duration") * 1000)
        if not 1 <= ms <= 60000:
            raise ConfigError(f"kernelTimeout: must be 1 ms .. 60 s, got {ms} ms")
        s.timeout_ms = ms
    lvl = root.get("compressionLevel", "int", s.compression_level)
    if not -7 <= lvl <= 22:
        raise ConfigError(f"compressionLevel: must be -7..22, got {lvl}")
    s.compression_level = lvl
    s.window_bytes = root.get("windowSize", "size", s.window_bytes)
    spool = root.child("spool")
    enabled = spool.get("enable", "bool", True)
    s.spool_dir = spool.get("dir", "str") or "auto"
    s.spool_bytes = spool.get("maxBytes", "size", None)
    spool.finish()
    if not enabled:
        s.spool_dir, s.spool_bytes = None, None
    elif s.spool_bytes is not None and s.spool_bytes <= 0:
        raise ConfigError("spool.maxBytes: must be positive (disable the spool with spool.enable: false)")
    s.sensor_id = root.get("sensorId", "str")
    s.user = root.get("user", "str")
    s.group = root.get("group", "str")
    s.heartbeat = root.get("heartbeat", "duration", s.heartbeat)
    s.stats_interval = root.get("statsInterval", "duration", s.stats_interval)
    for k, v in _common(root, "sensor").items():
        setattr(s, k, v)
    if s.auth.keyfile:
        raise ConfigError("auth.keyfile: a receiver setting (per-sensor keys); a sensor uses auth.key")
    _ignore_other_role(root, RECEIVER_KEYS, ignored, "sensor", "receiver")
    root.finish()
    if s.block_bytes < s.snaplen + 16:
        s.block_bytes = s.snaplen + 16  # a block must hold one whole record (upstream panicked)
    check_sensor_settings(s)
    return s


def _require(ok: bool, what: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{what}: {rule}, got {value!r}")


def check_receiver_settings(s: ReceiverSettings) -> None:
    """Ranges of the receiver's settings (from the config file, then again after the command
    line's flags): a value out of range is refused at start, not met at the first packet."""
    _require(s.rotate_seconds is None or s.rotate_seconds >= 0, "rotate.seconds (-G)", s.rotate_seconds,
             "seconds >= 0 (0: off)")
    _require(s.max_files is None or s.max_files >= 1, "rotate.files (-W)", s.max_files, "at least 1")
    _require(s.max_connections >= 1, "maxConnections (--max-connections)", s.max_connections, "at least 1")
    _require(0.1 <= s.heartbeat <= 3600, "heartbeat (--heartbeat)", s.heartbeat, "0.1-3600 seconds")
    _require(s.stats_interval > 0, "statsInterval (--stats-interval)", s.stats_interval, "seconds > 0")
    _require(0 < s.handshake_timeout <= 3600, "handshakeTimeout", s.handshake_timeout, "0-3600 seconds, more than 0")
    _require(s.index_max_flows is None or s.index_max_flows >= 0, "index.maxFlows (--index-max-flows)",
             s.index_max_flows, "at least 0 (0: no bound)")


def check_sensor_settings(s: SensorSettings) -> None:
    """Ranges of the sensor's settings (as :func:`check_receiver_settings`)."""
    _require(0 < s.snaplen <= 262144, "snaplen (-s)", s.snaplen, "1-262144 bytes")
    _require(s.max_wait >= 0, "maxWait (--max-wait)", s.max_wait, "seconds >= 0")
    _require(s.idle_wait >= 0, "idleWait (--idle-wait)", s.idle_wait, "seconds >= 0")
    _require(-7 <= s.compression_level <= 22, "compressionLevel (--level)", s.compression_level, "-7..22")
    _require(s.window_bytes > 0 or s.spool_dir is not None, "windowSize (--window)", s.window_bytes,
             "above 0 without a spool (every block would be dropped)")
    _require(0.1 <= s.heartbeat <= 3600, "heartbeat (--heartbeat)", s.heartbeat, "0.1-3600 seconds")
    _require(s.stats_interval > 0, "statsInterval (--stats-interval)", s.stats_interval, "seconds > 0")


def load_yaml(path: str, what: str = "config file", *, text_only: bool = False) -> Any:
    """The YAML document in ``path`` (``text_only``: every scalar as the text written, no
    numbers or booleans); a one-line ConfigError naming ``what`` if it cannot be read. A
    top-level ``auth.key`` is always the text written: YAML reads ``key: 0123`` as the number
    83, which neither the sensor's key file nor upstream's Go decoder would."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text_only:
            return yaml.load(text, Loader=yaml.BaseLoader)
        data = yaml.safe_load(text)
        auth = data.get("auth") if isinstance(data, dict) else None
        if isinstance(auth, dict) and auth.get("key") is not None and not isinstance(auth["key"], (str, bool)):
            raw = yaml.load(text, Loader=yaml.BaseLoader)
            auth["key"] = raw["auth"]["key"]
        return data
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def read_key_file(path: str) -> dict[str, str]:
    """``sensor-id: key`` per line (YAML mapping); removing a line revokes that sensor. A key
    is the text written (``0123`` stays ``0123``, as in the sensor's key file); a value YAML
    reads as null or a boolean (``~``, ``null``, ``yes``, ``off``) is refused, not taken as a
    key anyone could guess."""
    data = load_yaml(path, "auth.keyfile", text_only=True)
    if data is None or data == "":
        data = {}  # (every line removed: every sensor is refused)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"auth.keyfile {path}: expected lines 'sensor-id: key'")
    typed = load_yaml(path, "auth.keyfile") or {}  # (what each value means to YAML: null, a boolean)
    for k, v in data.items():
        if not isinstance(v, str):
            raise ConfigError(f"auth.keyfile {path}: the key of {k!r} is not text")
        if not v or typed.get(k, "") is None:
            raise ConfigError(f"auth.keyfile {path}: {k!r} has an empty key ({v or 'nothing'}); remove its line "
                              "to revoke it")
        if isinstance(typed.get(k), bool):
            raise ConfigError(f"auth.keyfile {path}: the key of {k!r} reads as a boolean ({v}); quote it if it "
                              "is the key")
    import logging
    mode = os.stat(path).st_mode
    if mode & 0o077:
        logging.getLogger("pktstream").warning("auth.keyfile %s is readable by others (mode %o)", path, mode & 0o777)
    if not data:
        logging.getLogger("pktstream").warning("auth.keyfile %s lists no sensor: every sensor is refused", path)
    return dict(data)
