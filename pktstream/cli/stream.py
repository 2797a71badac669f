"""``pktstream receiver`` and ``pktstream sensor``: YAML config (PacketStreamer's keys) + flags."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from pktstream import config as C
from pktstream.cli import cloud
from pktstream.exceptions import ConfigError

if TYPE_CHECKING:
    from pktstream.sinks.base import Sink

log = logging.getLogger("pktstream")


def _size(text: str) -> int:
    try:
        return C.parse_size(text, "size")
    except ValueError as exc:  # (argparse would print only "invalid _size value")
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None


def _ports(text: str, flag: str) -> list[int]:
    """A comma-separated port list of a flag (each 1-65535)."""
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text}: give port numbers separated by commas") from None
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        raise ConfigError(f"{flag}: port {bad[0]} is not 1-65535")
    return ports


def _rotate_size(text: str) -> int:
    """-C: a bare number is millions of bytes, as tcpdump's -C; else a size (``100MB``)."""
    try:
        n: float | None = float(text)
    except ValueError:
        n = None
    if n is not None and not math.isfinite(n):
        raise argparse.ArgumentTypeError(f"{text!r}: give a size like 100MB or 1GiB")
    size = int(n * 1_000_000) if n is not None else None
    if size is None:
        try:
            size = C.parse_size(text, "-C")
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a size like 100MB or 1GiB (a bare number is "
                                             "millions of bytes, as tcpdump's -C)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive size")
    return size


def _read_secret(path: str) -> str:
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"--auth-key-file {path}: {exc.strerror or exc}") from None
    if not key:
        raise ConfigError(f"key file {path} is empty")
    return key


def check_listen(text: str, what: str = "--listen") -> None:
    """Fail now, in one line, if the receiver could not listen on ``text`` (bad port, a host
    that does not resolve, an address in use or not on this machine)."""
    import errno
    import socket

    from pktstream.stream.protocol import parse_hostport
    try:
        host, port = parse_hostport(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT, e.g. 0.0.0.0:8081") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {text}: port {port} is not 0-65535")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{what} {text}: cannot resolve host {host!r} ({exc.strerror})") from None
    fam, kind, proto, _, addr = infos[0]
    with socket.socket(fam, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
        try:
            sock.bind(addr)
        except OSError as exc:
            hint = {errno.EADDRINUSE: " (another program listens there: stop it or choose another port)",
                    errno.EADDRNOTAVAIL: f" ({host} is not an address of this machine)",
                    errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"}.get(exc.errno or 0, "")
            raise ConfigError(f"{what} {text}: cannot listen: {(exc.strerror or str(exc)).lower()}{hint}") from None


def check_receiver_host(text: str) -> None:
    """A sensor's receiver must resolve (its addresses are excluded from the capture filter)."""
    import socket

    from pktstream.stream.protocol import parse_hostport
    try:
        host, port = parse_hostport(text)
    except ValueError:
        raise ConfigError(f"--receiver {text!r}: expected HOST:PORT, e.g. 10.0.0.5:8081") from None
    if not 0 < port <= 65535:
        raise ConfigError(f"--receiver {text}: port {port} is not 1-65535")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve receiver host {host!r} ({exc.strerror})") from None


def _setup_log_file(path: str | None) -> None:
    if path:
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(h)


def build_receiver(args: argparse.Namespace):
    """Settings from --config, overridden by flags → a Receiver."""
    from pktstream.sinks import FileSink, StdoutSink
    from pktstream.stream.legacy import PacketStreamerSettings
    from pktstream.stream.receiver import Limits, Receiver, Security
    from pktstream.stream.tls import server_context

    s = C.receiver_settings(C.load_yaml(args.config) if args.config else {})
    # only an upstream-style config file without auth starts unauthenticated by itself
    s.allow_unauthenticated = (s.allow_unauthenticated and bool(args.config)) or args.allow_unauthenticated
    if args.listen:
        s.listen = args.listen
    cloud.apply_receiver_args(args, s)  # -w s3:// / kafka://, --from kafka://
    if args.write:
        s.stdout, s.output_file = (True, None) if args.write == "-" else (False, args.write)
    if args.output_dir:
        s.output_dir, s.output_file = args.output_dir, None
    for attr in ("state_dir", "rotate_bytes", "rotate_seconds", "max_files", "metrics", "stats_interval",
                 "max_connections", "log_file", "heartbeat", "zstd_frame_size", "index_max_flows"):
        v = getattr(args, attr)
        if v is not None:
            setattr(s, attr, v)
    s.fsync = s.fsync or args.fsync
    C.check_receiver_settings(s)
    if args.index is not None:
        s.index = args.index
    # the default: index the files of outputs that complete them as they go (a directory of
    # per-sensor files, rotation), not a single file completed at exit, stdout, Kafka or S3
    rotates = bool(s.rotate_bytes or s.rotate_seconds or s.max_files)
    index_dir = s.index if s.index is not None else True
    index_file = s.index if s.index is not None else rotates and "%" not in os.path.dirname(s.output_file or "")
    if (s.output_dir and index_dir) or (s.output_file and index_file):
        # the index's pyarrow would load pandas, which the receiver never uses
        from pktstream.archive.live import refuse_pandas
        refuse_pandas()
    if args.no_packetstreamer:
        s.packetstreamer = False
    for item in args.packetstreamer_id or ():
        addr, sep, sid = item.rpartition("=")
        if not sep or not addr or not sid:
            raise ConfigError(f"--packetstreamer-id {item!r}: expected ADDRESS=SENSOR_ID")
        s.packetstreamer_ids[addr] = sid
    if args.auth_key_file:
        s.auth.enable, s.auth.key = True, _read_secret(args.auth_key_file)
    if args.auth_keys:
        s.auth.enable, s.auth.keyfile = True, args.auth_keys
    if args.tls_cert:
        s.tls.enable, s.tls.certfile = True, args.tls_cert
    if args.tls_key:
        s.tls.keyfile = args.tls_key
    if args.tls_ca:
        s.tls.cafile = args.tls_ca
    s.tls.client_certs = s.tls.client_certs or args.tls_client_certs
    s.tls.identity_from_cert = s.tls.identity_from_cert or args.tls_identity_from_cert
    C.check_tls(s.tls, "receiver", "TLS")
    if not (s.output_file or s.output_dir or s.stdout or cloud.has_cloud_output(s)):
        raise ConfigError("no output: give -w FILE, -w - (stdout), -w s3://BUCKET/PREFIX, -w kafka://HOST:PORT/TOPIC, "
                          "--output-dir DIR or output.file.path")
    if s.listen and not (s.kafka_input and not args.listen):
        check_listen(s.listen)
    if s.metrics:
        check_listen(s.metrics, "--metrics")
    _setup_log_file(s.log_file)
    outputs: list[Sink] = []
    rot: dict[str, Any] = dict(rotate_bytes=s.rotate_bytes, rotate_seconds=s.rotate_seconds, max_files=s.max_files,
               fsync=s.fsync)
    if s.output_file:
        outputs.append(FileSink(s.output_file, index=bool(index_file), zstd_frame_bytes=s.zstd_frame_size,
                                index_max_flows=s.index_max_flows, **rot))
    if s.output_dir:
        outputs.append(FileSink(directory=s.output_dir, format=args.format, index=bool(index_dir),
                                zstd_frame_bytes=s.zstd_frame_size, index_max_flows=s.index_max_flows, **rot))
    if s.stdout:
        outputs.append(StdoutSink(snaplen=s.snaplen))
    outputs += cloud.receiver_outputs(s)
    ctx = None
    if s.tls.enable:
        assert s.tls.certfile and s.tls.keyfile  # checked by config.check_tls
        ctx = server_context(s.tls.certfile, s.tls.keyfile, cafile=s.tls.cafile, client_certs=s.tls.client_certs)
    key: str | None = None
    keys: dict[str, bytes | str] | None = None
    if s.auth.enable:
        if s.auth.keyfile:
            keys = dict(C.read_key_file(s.auth.keyfile))
        else:
            key = s.auth.key
    security = Security(auth_key=key, auth_keys=keys, ssl_context=ctx, cert_identity=s.tls.identity_from_cert,
                        allow_unauthenticated=s.allow_unauthenticated)
    if s.kafka_input and (key or keys is not None):
        logging.getLogger("pktstream").warning(
            "auth keys apply to TCP sensors only: blocks from Kafka are not authenticated (their sensor id "
            "is a message header); protect the topic with Kafka ACLs (docs/SECURITY.md)")
    limits = Limits(max_connections=s.max_connections, connection_rate=(s.connection_burst, s.connection_seconds),
                    handshake_timeout=s.handshake_timeout, heartbeat=s.heartbeat,
                    max_raw_bytes=max(s.max_block_bytes, s.snaplen + 16))
    return Receiver(None if s.kafka_input and not args.listen else s.listen, outputs,
                    inputs=cloud.receiver_inputs(s), state_dir=s.state_dir, fsync_state=s.fsync,
                    security=security, limits=limits, metrics=s.metrics, stats_interval=s.stats_interval,
                    legacy=PacketStreamerSettings(enabled=s.packetstreamer, sensors=s.packetstreamer_ids,
                                                  snaplen=s.snaplen))


def build_sensor(args: argparse.Namespace):
    from pktstream.stream.sensor import CaptureOptions, DeliveryOptions, Sensor, SensorSecurity
    from pktstream.stream.tls import client_context

    s = C.sensor_settings(C.load_yaml(args.config) if args.config else {})
    if args.receiver:
        s.receiver = args.receiver
    if args.interface:
        s.interfaces = args.interface
    if args.bpf_option and args.bpf:
        raise ConfigError("give the BPF filter once: --bpf EXPR or as the last words, not both")
    if args.bpf or args.bpf_option:
        s.bpf = args.bpf_option or " ".join(args.bpf)
    for attr in ("pcap_mode", "snaplen", "buffer_bytes", "block_bytes", "max_wait", "idle_wait", "compression_level",
                 "window_bytes", "spool_dir", "spool_bytes", "sensor_id", "log_file", "heartbeat",
                 "user", "group"):
        v = getattr(args, attr)
        if v is not None:
            setattr(s, attr, v)
    if args.capture_ports:
        s.capture_ports = _ports(args.capture_ports, "--capture-ports")
    if args.ignore_ports:
        s.ignore_ports = _ports(args.ignore_ports, "--ignore-ports")
    s.promisc = s.promisc or args.promisc
    s.immediate = s.immediate or args.immediate
    s.include_loopback = s.include_loopback or args.include_loopback
    if args.no_spool:
        s.spool_dir = s.spool_bytes = None
    C.check_sensor_settings(s)
    if args.auth_key_file:
        s.auth.enable, s.auth.key = True, _read_secret(args.auth_key_file)
    if args.tls or args.tls_ca or args.tls_insecure or args.tls_cert or args.tls_key or args.tls_server_name:
        s.tls.enable = True  # (any TLS flag: TLS; a client certificate alone never meant plaintext)
    for attr, flag in (("cafile", "tls_ca"), ("certfile", "tls_cert"), ("keyfile", "tls_key"),
                       ("server_name", "tls_server_name")):
        if getattr(args, flag):
            setattr(s.tls, attr, getattr(args, flag))
    s.tls.insecure = s.tls.insecure or args.tls_insecure
    C.check_tls(s.tls, "sensor", "TLS")
    if args.receiver and args.output_url:
        raise ConfigError("--receiver and --output are exclusive")
    transport = cloud.sensor_transport(args, s)  # --output kafka:// / output.plugins.kafka
    if not s.receiver and transport is None:
        raise ConfigError("no receiver: give --receiver HOST:PORT, --output kafka://HOST:PORT/TOPIC, "
                          "output.server.address/port or output.plugins.kafka")
    if transport is None:
        assert s.receiver is not None
        check_receiver_host(s.receiver)
    _setup_log_file(s.log_file)
    ctx = None
    if s.tls.enable:
        ctx = client_context(cafile=s.tls.cafile, certfile=s.tls.certfile, keyfile=s.tls.keyfile,
                             insecure=s.tls.insecure)
    capture = CaptureOptions(include_loopback=s.include_loopback, pcap_mode=s.pcap_mode,
                             capture_ports=s.capture_ports, capture_interfaces_ports=s.capture_interfaces_ports,
                             ignore_ports=s.ignore_ports, snaplen=s.snaplen, promisc=s.promisc,
                             immediate=s.immediate, buffer_bytes=s.buffer_bytes, block_bytes=s.block_bytes,
                             max_wait=s.max_wait, idle_wait=s.idle_wait, timeout_ms=s.timeout_ms,
                             rescan_interval=args.rescan_interval)
    delivery = DeliveryOptions(compression_level=s.compression_level, window_bytes=s.window_bytes,
                               spool_dir=s.spool_dir, spool_bytes=s.spool_bytes, heartbeat=s.heartbeat,
                               stats_interval=s.stats_interval)
    security = SensorSecurity(auth_key=s.auth.key if s.auth.enable else None, ssl_context=ctx,
                              server_hostname=s.tls.server_name)
    return Sensor(None if transport else s.receiver, s.interfaces or None, bpf=s.bpf, sensor_id=s.sensor_id,
                  capture=capture, delivery=delivery, security=security, user=s.user, group=s.group,
                  transport=transport)


def _on_signals(stop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop())


def cmd_receiver(args: argparse.Namespace) -> int:
    logging.getLogger("pktstream").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    receiver = build_receiver(args)
    _on_signals(receiver.stop)
    status = None
    if args.status:
        from pktstream.stream.status import StatusDisplay
        status = StatusDisplay(receiver).start()
        if not status.enabled:
            log.warning("--status: stderr is not a terminal, no live status (see --metrics, --stats-interval)")
    try:
        receiver.run()
    finally:
        if status is not None:
            status.stop()
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(receiver.stats(), f, indent=1)
    # 3: the state could not be saved at the stop (its error line was logged): the next start
    # recovers and pktstream sensors resend (docs/OPERATIONS.md), but a service manager should know
    return 3 if receiver.unsaved_at_stop is not None else 0


def _counters_line(st: dict[str, Any]) -> str:
    """The sensor's counters in one line (at exit, and on SIGUSR1 like tcpdump)."""
    return (f"{st['packets']} packets captured, {st['kernel_dropped']} dropped by kernel, "
            f"{st['ring_drops']} by ring, {st['window_dropped_packets']} by full send window/spool"
            + (f", {st['rejected_packets']} refused by the destination" if st.get("rejected_packets") else ""))


def _print_counters_on_sigusr1(sensor) -> None:
    """``kill -USR1 PID`` prints the counters so far to stderr. The line is built on a thread
    of its own: the handler runs between two bytecodes of the main thread, which may hold a
    lock that ``stats()`` takes."""
    import threading

    def show() -> None:
        st = sensor.stats()
        print(f"pktstream sensor: {_counters_line(st)}, {st['unacked_frames']} frames unacknowledged, "
              f"{'connected' if st['connected'] else 'not connected'}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=show, name="sigusr1-stats", daemon=True).start())


def cmd_sensor(args: argparse.Namespace) -> int:
    logging.getLogger("pktstream").setLevel(logging.INFO if args.verbose == 0 else logging.DEBUG)
    sensor = build_sensor(args)
    stats_file = open(args.stats_json, "w") if args.stats_json else None  # before dropping root
    _on_signals(sensor.stop)
    _print_counters_on_sigusr1(sensor)
    sensor.run()
    st = sensor.stats()
    report = sensor.exit_report or {}
    unacked, spooled = report.get("unacked_frames", 0), report.get("spooled_frames", 0)
    print(f"pktstream sensor: {_counters_line(st)}, {unacked} frames unacknowledged at exit", file=sys.stderr)
    if stats_file is not None:
        with stats_file:
            json.dump({**st, "exit": report}, stats_file, indent=1)
    status = 0
    if unacked:
        lost = f"{report.get('lost_packets', 0)} packets"
        where = (f"{spooled} kept in the spool {sensor.spool_dir} for the next run, {unacked - spooled} lost ({lost})"
                 if sensor.spool_dir else f"lost (no spool; {lost})")
        print(f"pktstream sensor: exit status 3: {unacked} frames were not acknowledged by the receiver "
              f"({where})", file=sys.stderr)
        status = 3
    failed = report.get("failed_interfaces") or []
    if failed:
        print(f"pktstream sensor: exit status {status or 4}: capture failed on {', '.join(failed)} and did not "
              "resume", file=sys.stderr)
        status = status or 4
    return status


RECEIVER_EPILOG = """\
examples:
  head -c 32 /dev/urandom | base64 > key
  pktstream receiver --listen 0.0.0.0:8081 --auth-key-file key -w capture.pcapng --status
  pktstream receiver --listen 0.0.0.0:8081 --auth-key-file key --output-dir caps -G 3600 -W 48
  pktstream receiver --listen 127.0.0.1:8081 --auth-key-file key -w - | tshark -r -
  pktstream receiver --config receiver.yaml          # PacketStreamer's YAML works as is

Every option and YAML key: docs/CONFIGURATION.md"""

SENSOR_EPILOG = """\
examples (a sensor runs as root, or with CAP_NET_RAW):
  pktstream sensor --receiver 10.0.0.5:8081 --auth-key-file key -i eth0 --sensor-id web-1
  pktstream sensor --receiver 10.0.0.5:8081 --auth-key-file key tcp port 80 or tcp port 443
  pktstream sensor --receiver rx.example.com:8081 --tls --tls-ca ca.pem --auth-key-file key
  pktstream sensor --config sensor.yaml              # PacketStreamer's YAML works as is
  kill -USR1 <pid>                                   # print the counters so far (like tcpdump)

The BPF filter is the last words (like tcpdump), or --bpf 'EXPR'. Every option and YAML key:
docs/CONFIGURATION.md"""


def register(sub) -> None:
    from pktstream.cli import subparser
    r = subparser(sub, "receiver", help="receive streams from sensors and write them out", epilog=RECEIVER_EPILOG)
    r.add_argument("--config", metavar="FILE", help="YAML config (PacketStreamer's format accepted); flags override it")
    r.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:8081)")
    r.add_argument("-w", "--write", metavar="FILE", help="merged output file: .pcap, .pcapng, .pcap.zst, .pcapng.zst "
                   "(a name without one of these is written as pcap under exactly that name); '-' = pcap to "
                   "stdout; s3://BUCKET/PREFIX; kafka://HOST:PORT/TOPIC")
    cloud.add_receiver_args(r)
    r.add_argument("--output-dir", metavar="DIR", help="one file per sensor in DIR (created if its parent exists)")
    r.add_argument("--format", default="pcapng", choices=("pcap", "pcapng", "pcap.zst", "pcapng.zst"),
                   help="format of the --output-dir files (default pcapng)")
    r.add_argument("--state-dir", metavar="DIR", help="persist last sequence per sensor (exact restarts)")
    r.add_argument("-C", "--rotate-bytes", type=_rotate_size, metavar="SIZE",
                   help="rotate files past SIZE, e.g. 100MB; a bare number is millions of bytes, "
                        "as tcpdump's -C (default: off)")
    r.add_argument("-G", "--rotate-seconds", type=float, metavar="SEC", help="rotate files every SEC (default: off)")
    r.add_argument("-W", "--max-files", type=int, metavar="N", help="keep only the newest N files (default: all)")
    r.add_argument("--fsync", action="store_true", help="fsync outputs and state before acknowledging")
    r.add_argument("--index", action=argparse.BooleanOptionalAction, default=None,
                   help="index each completed capture file for pktstream query/flows (docs/ARCHIVE.md; default: on "
                        "for --output-dir and rotated -w files, off for one unrotated file and S3)")
    r.add_argument("--index-max-flows", type=int, metavar="N",
                   help="index memory bound: flow records held per open file before they are written out as a "
                        "row group of its index (default 262144, ~40 MiB; 0: no bound)")
    r.add_argument("--zstd-frame-size", type=_size, metavar="SIZE",
                   help=".zst outputs: seekable layout, a zstd frame per SIZE of data, e.g. 1MiB (queries decompress "
                        "only the frames they need; Wireshark 4.0 cannot open it: pktstream convert; default: one "
                        "frame per file)")
    r.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here (default: off)")
    r.add_argument("--stats-interval", type=float, metavar="SEC", help="log counters every SEC (default 60)")
    r.add_argument("--stats-json", metavar="FILE", help="write final counters as JSON at exit")
    r.add_argument("--status", action="store_true",
                   help="live status on the terminal: one line per sensor (rates, drops), redrawn every second")
    r.add_argument("--max-connections", type=int, metavar="N",
                   help="connections beyond N are closed at once and counted (default 256)")
    r.add_argument("--heartbeat", type=float, metavar="SEC",
                   help="heartbeat interval (default 5); idle timeout is 3x+1")
    r.add_argument("--auth-key-file", metavar="FILE", help="shared key (read from FILE, not the command line)")
    r.add_argument("--auth-keys", metavar="FILE", help="per-sensor keys: YAML 'sensor-id: key' lines")
    r.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain) (default: no TLS)")
    r.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    r.add_argument("--tls-ca", metavar="PEM", help="CA for client certificates")
    r.add_argument("--tls-client-certs", action="store_true", help="require client certificates (mTLS)")
    r.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen beyond loopback without a key or client certificates (anyone who can "
                   "reach the port can write into the outputs)")
    r.add_argument("--tls-identity-from-cert", action="store_true",
                   help="mTLS: a sensor's id must be the CN or a SAN of its certificate")
    r.add_argument("--log-file", metavar="FILE", help="also log to FILE")
    r.add_argument("--no-packetstreamer", action="store_true",
                   help="refuse Deepfence PacketStreamer sensors (default: accepted, legacy: unacknowledged)")
    r.add_argument("--packetstreamer-id", action="append", metavar="ADDRESS=ID",
                   help="sensor id of the PacketStreamer sensor at ADDRESS (repeat; default: its address)")
    r.set_defaults(func=cmd_receiver)

    s = subparser(sub, "sensor", help="capture on interfaces and stream to a receiver", epilog=SENSOR_EPILOG)
    s.add_argument("--config", metavar="FILE", help="YAML config (PacketStreamer's format accepted); flags override it")
    s.add_argument("-i", "--interface", action="append",
                   help="interface (repeat; default: all up, and new ones as they appear)")
    s.add_argument("--receiver", metavar="HOST:PORT", help="the receiver to stream to, e.g. 10.0.0.5:8081 "
                   "(required unless --output or --config gives one)")
    cloud.add_sensor_args(s)
    s.add_argument("--include-loopback", action="store_true", help="also capture on loopback (all-interfaces mode)")
    s.add_argument("--pcap-mode", type=str.lower, choices=("all", "allow", "deny"),
                   help="all: every port (default); allow: only --capture-ports; deny: all but --capture-ports")
    s.add_argument("--capture-ports", metavar="P,P,..", help="ports for pcap mode allow/deny")
    s.add_argument("--ignore-ports", metavar="P,P,..", help="ports never captured")
    s.add_argument("-s", "--snaplen", type=int, metavar="BYTES", help="bytes kept per packet (default 262144)")
    s.add_argument("--promisc", action="store_true", help="promiscuous mode (default: off)")
    s.add_argument("--immediate", action="store_true", help="libpcap immediate mode (default: off)")
    s.add_argument("--buffer-size", dest="buffer_bytes", type=_size, metavar="SIZE",
                   help="kernel buffer (default 8MiB, resident for the sensor's lifetime; the capture thread "
                        "empties it into the 32 MiB ring, paged in as needed)")
    s.add_argument("--block-size", dest="block_bytes", type=_size, metavar="SIZE", help="block size (default 1MiB)")
    s.add_argument("--max-wait", type=float, metavar="SEC",
                   help="under load, seal a partial block after SEC (default 0.2)")
    s.add_argument("--idle-wait", type=float, metavar="SEC", help="on a quiet link, send a partial block at once, "
                   "at most one per SEC on average, 4 in a row (default 0.05; >= --max-wait: off)")
    s.add_argument("--level", dest="compression_level", type=int, help="zstd level (default -1, adaptive)")
    s.add_argument("--window", dest="window_bytes", type=_size, metavar="SIZE",
                   help="unacknowledged bytes kept in memory, then in the spool (default 32MiB)")
    s.add_argument("--spool-dir", metavar="DIR", help="spool frames here when the window is full (default "
                   "/var/lib/pktstream/spool/SENSOR-ID as root, ~/.local/state/pktstream/spool/SENSOR-ID "
                   "otherwise, or $PKTSTREAM_STATE_DIR/spool/SENSOR-ID)")
    s.add_argument("--spool-size", dest="spool_bytes", type=_size, metavar="SIZE",
                   help="spool bound (default 1GiB or half the free disk space); when full, new blocks are "
                   "dropped and counted")
    s.add_argument("--no-spool", action="store_true", help="no disk spool: an outage longer than the "
                   "window loses (counted) blocks")
    s.add_argument("--sensor-id", help="stable id of this sensor (default: host name)")
    s.add_argument("--auth-key-file", metavar="FILE", help="shared key (read from FILE)")
    s.add_argument("--tls", action="store_true", help="connect with TLS (verifying the receiver)")
    s.add_argument("--tls-ca", metavar="PEM", help="CA to verify the receiver with (a self-signed certificate: itself)")
    s.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    s.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    s.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the receiver's certificate")
    s.add_argument("--tls-insecure", action="store_true", help="do NOT verify the receiver (warned)")
    s.add_argument("--heartbeat", type=float, metavar="SEC", help="heartbeat interval (default 5); a receiver "
                   "silent for 3x+1 s is considered gone")
    s.add_argument("--rescan-interval", type=float, default=5.0, metavar="SEC",
                   help="look for new interfaces every SEC when capturing on all (default 5)")
    s.add_argument("--user", help="after opening the capture handles, run as USER keeping only "
                   "CAP_NET_RAW/CAP_NET_ADMIN")
    s.add_argument("--group", help="group for --user (default: the user's group)")
    s.add_argument("--stats-json", metavar="FILE", help="write final counters as JSON at exit")
    s.add_argument("--log-file", metavar="FILE", help="also log to FILE")
    s.add_argument("--bpf", dest="bpf_option", metavar="EXPR",
                   help="BPF filter (as one argument; or give it as the last words)")
    s.add_argument("bpf", nargs="*", help="BPF filter expression, e.g. tcp port 80 (as tcpdump takes it)")
    s.set_defaults(func=cmd_sensor)
