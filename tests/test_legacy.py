"""PacketStreamer sensors on a pktstream receiver (pktstream/stream/legacy.py).

The byte streams in tests/data/packetstreamer/ were sent by a real, unmodified PacketStreamer
sensor and recorded, with tcpdump on the same interface as the oracle (README there). Here they
are replayed over TCP (and TLS) into a real Receiver, whose output file must hold the oracle's
packets: same bytes, same wire length, same microsecond timestamps.
"""
from __future__ import annotations

import collections
import signal
import socket
import ssl
import struct
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import PKTSTREAM, free_port, read_pcap_dpkt, start_tcpdump, wait_pcap_count, wait_received, wait_until
from pktstream import _s2
from pktstream.config import receiver_settings
from pktstream.exceptions import ConfigError
from pktstream.sinks import FileSink
from pktstream.stream import protocol as P
from pktstream.stream.legacy import AUTH_OK, PacketStreamerSettings
from pktstream.stream.receiver import Limits, Receiver, Security

DATA = Path(__file__).parent / "data" / "packetstreamer"
KEY = "legacy-test-key"  # the auth recording's key (record.py)


def oracle(name: str, tmp_path: Path) -> list[tuple[int, int, bytes]]:
    path = tmp_path / f"{name}-oracle.pcap"
    path.write_bytes(zstandard.ZstdDecompressor().decompress((DATA / f"{name}.pcap.zst").read_bytes(),
                                                             max_output_size=1 << 24))
    return read_pcap_dpkt(path)


def stream(name: str) -> bytes:
    return (DATA / f"{name}.stream").read_bytes()


def sent_timestamps(name: str) -> list[int]:
    """The µs timestamps (as ns) of the records the sensor sent, in order."""
    data = stream(name)
    pos, out = (64 if name == "auth" else 0), []
    while pos < len(data):
        n = struct.unpack_from("<I", data, pos + 4)[0]
        raw = bytes(_s2.decode_block(data[pos + 8:pos + 8 + n], 1 << 20))
        pos += 8 + n
        r = 0
        while r < len(raw):
            sec, usec, caplen, _ = struct.unpack_from("<IIII", raw, r)
            out.append(sec * 10**9 + usec * 1000)
            r += 16 + caplen
    return out


def assert_delivered(got: list, name: str, ref: list) -> None:
    """Same packets as tcpdump saw (bytes, wire length; its own capture timestamps differ by
    a few µs), each with exactly the µs timestamp the sensor sent."""
    assert len(got) == len(ref), f"{len(got)} packets, tcpdump saw {len(ref)}"
    assert [g[1:] for g in got] == [r[1:] for r in ref]
    assert all(abs(g[0] - r[0]) <= 1_000_000 for g, r in zip(got, ref))
    assert [g[0] for g in got] == sent_timestamps(name)


class Run:
    """A receiver writing one pcap file, started and always stopped. ``legacy``: its
    PacketStreamerSettings; other keywords: its Security."""

    def __init__(self, tmp_path: Path, legacy: PacketStreamerSettings | None = None, **security) -> None:
        self.out = tmp_path / "out.pcap"
        self.rx = Receiver("127.0.0.1:0", [FileSink(str(self.out))], security=Security(**security),
                           legacy=legacy).start()

    def packets(self, sensor: str = "127.0.0.1") -> int:
        return self.rx.stats()["sensors"].get(sensor, {}).get("packets", 0)

    def result(self) -> list[tuple[int, int, bytes]]:
        self.stop()
        return read_pcap_dpkt(self.out) if self.out.exists() else []  # created with the first packet

    def stop(self) -> None:
        self.rx.stop()
        self.rx.join(30)

    def connect(self, tls: ssl.SSLContext | None = None) -> socket.socket:
        s = socket.create_connection(self.rx.address, timeout=30)
        return tls.wrap_socket(s, server_hostname="127.0.0.1") if tls else s


def replay(sock: socket.socket, data: bytes, auth: bool = False) -> bytes:
    """Send a recorded stream as the sensor did: with auth, the 64-byte hello, then the
    receiver's 5-byte answer, then the frames. Returns the answer (b"" without auth)."""
    answer = b""
    if auth:
        sock.sendall(data[:64])
        while len(answer) < 5:
            chunk = sock.recv(5 - len(answer))
            if not chunk:
                break
            answer += chunk
        if answer != AUTH_OK:
            return answer
        data = data[64:]
    sock.sendall(data)
    return answer


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the receiver sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.mark.parametrize("name", ["plain", "large"])
def test_recorded_stream_equals_tcpdump(name, tmp_path):
    ref = oracle(name, tmp_path)
    run = Run(tmp_path)
    try:
        with run.connect() as s:
            replay(s, stream(name))
            wait_until(lambda: run.packets() == len(ref), what=f"{len(ref)} packets")
            st = run.rx.stats()["sensors"]["127.0.0.1"]
            assert st["legacy"] == "unacknowledged" and st["connected"]
            assert st["frames"] >= (4 if name == "large" else 2)
    finally:
        got = run.result()
    assert_delivered(got, name, ref)


def test_auth_key_accepted(tmp_path):
    ref = oracle("auth", tmp_path)
    run = Run(tmp_path, auth_key=KEY)
    try:
        with run.connect() as s:
            assert replay(s, stream("auth"), auth=True) == AUTH_OK
            wait_until(lambda: run.packets() == len(ref), what=f"{len(ref)} packets")
    finally:
        got = run.result()
    assert_delivered(got, "auth", ref)


@pytest.mark.parametrize("kw, name, counter", [({"auth_key": "another-key"}, "auth", "auth_failures"),
                                               ({"auth_keys": {"other-sensor": KEY}}, "auth", "auth_failures"),
                                               ({"auth_key": KEY}, "plain", "protocol_errors")])
def test_wrong_or_missing_key_refused(kw, name, counter, tmp_path, caplog):
    run = Run(tmp_path, **kw)
    try:
        with run.connect() as s:
            answer = replay(s, stream(name), auth=name == "auth")
            assert answer != AUTH_OK
            read_to_eof(s)  # the receiver closed it
            assert run.rx.stats().get(counter, 0) == 1
    finally:
        got = run.result()
    assert got == []
    assert run.packets() == 0
    if name == "plain":  # a sensor without auth.enable: the log says what to do
        assert "the sensor needs auth.enable and that auth.key" in caplog.text


def test_key_per_sensor_id_from_the_address_mapping(tmp_path):
    ref = oracle("auth", tmp_path)
    run = Run(tmp_path, auth_keys={"web-1": KEY}, legacy=PacketStreamerSettings(sensors={"127.0.0.1": "web-1"}))
    try:
        with run.connect() as s:
            assert replay(s, stream("auth"), auth=True) == AUTH_OK
            wait_until(lambda: run.packets("web-1") == len(ref), what=f"{len(ref)} packets")
            metrics = run.rx.prometheus()
            assert 'pktstream_sensor_legacy{sensor="web-1"} 1' in metrics
            assert 'pktstream_sensor_connected{sensor="web-1"} 1' in metrics
        wait_until(lambda: not run.rx.stats()["sensors"]["web-1"]["connected"], what="disconnect")
    finally:
        got = run.result()
    assert_delivered(got, "auth", ref)


def test_tls(tmp_path):
    import trustme
    ca = trustme.CA()
    srv = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(srv)
    cli = ssl.create_default_context()  # as upstream: no verification of the receiver
    cli.check_hostname, cli.verify_mode = False, ssl.CERT_NONE
    ref = oracle("plain", tmp_path)
    run = Run(tmp_path, ssl_context=srv)
    try:
        with run.connect(cli) as s:
            replay(s, stream("plain"))
            wait_until(lambda: run.packets() == len(ref), what=f"{len(ref)} packets")
    finally:
        got = run.result()
    assert_delivered(got, "plain", ref)


def test_switched_off(tmp_path):
    run = Run(tmp_path, legacy=PacketStreamerSettings(enabled=False))
    try:
        with run.connect() as s:
            s.sendall(stream("plain"))
            wait_until(lambda: run.rx.stats().get("protocol_errors", 0) == 1, what="the refusal")
    finally:
        got = run.result()
    assert got == [] and run.rx.stats()["sensors"] == {}


def _frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = struct.unpack_from("<I", data, pos + 4)[0]
        out.append(data[pos:pos + 8 + n])
        pos += 8 + n
    return out


@pytest.mark.parametrize("bad", ["corrupt", "too_long", "bad_magic"])
def test_bad_frame_closes_only_its_connection(bad, tmp_path):
    ref = oracle("plain", tmp_path)
    frames = _frames(stream("plain"))
    first = frames[0]
    k = _s2.usec_records_to_nsec(_s2.decode_block(first[8:], 1 << 20))  # packets in the first frame
    if bad == "corrupt":  # an S2 copy pointing before the start of the block
        second = first[:11] + bytes([0x03, 0xFF, 0xFF, 0xFF, 0x7F]) + first[16:]
    elif bad == "too_long":
        second = b"\xde\xef\xec\xe0" + struct.pack("<I", 0xFFFFFFF0)
    else:
        second = b"PKST" + first[4:]
    run = Run(tmp_path)
    try:
        with run.connect() as good, run.connect() as evil:
            good.sendall(first)
            wait_until(lambda: run.packets() == k, what="the good sensor's first frame")
            evil.sendall(first + second)  # one good frame, then the bad one
            wait_until(lambda: run.rx.stats().get("protocol_errors", 0) == 1, what="the bad frame")
            assert read_to_eof(evil)[:4] == b"PKST"  # an ERROR frame, then the close
            good.sendall(b"".join(frames[1:]))
            wait_until(lambda: run.packets() == len(ref) + k, what=f"{len(ref) + k} packets")
    finally:
        got = run.result()
    # every packet of the good connection, plus the bad one's first (valid) frame
    def key(p):
        return p[1:]
    assert collections.Counter(map(key, got)) == collections.Counter(map(key, ref + ref[:k]))


def test_config_and_cli_switch():
    s = receiver_settings({"input": {"port": 8081}, "output": {"file": {"path": "x.pcap"}},
                           "legacy": {"packetstreamer": False, "sensors": {"10.0.0.5": "web-1"}}})
    assert s.packetstreamer is False and s.packetstreamer_ids == {"10.0.0.5": "web-1"}
    assert receiver_settings({"input": {"port": 8081}}).packetstreamer is True
    with pytest.raises(ConfigError, match="legacy.sensors"):
        receiver_settings({"legacy": {"sensors": ["10.0.0.5"]}})
    with pytest.raises(ConfigError, match="legacy.packetstreamr"):
        receiver_settings({"legacy": {"packetstreamr": True}})


@pytest.mark.live
def test_mixed_fleet_cli_receiver(veth, procs, tmp_path, mixed_pcap):
    """One pktstream sensor capturing a veth and one PacketStreamer sensor (its recorded stream)
    into one CLI receiver: every packet of both is in the output, attributed to its sensor."""
    port = free_port()
    ref_ps = oracle("plain", tmp_path)
    ref = tmp_path / "ref.pcap"
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--stats-interval", "0.2",
                "--output-dir", str(tmp_path / "out"), "--format", "pcap", "--packetstreamer-id", "127.0.0.1=ps-1"])
    rx.wait_for("listening on")
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer, "--max-wait", "0.1",
                "--sensor-id", "pkt-1"])
    sx.wait_for("connected to receiver")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        replay(s, stream("plain"))
        veth.replay(mixed_pcap, pps=20000)
        wait_received(rx, len(ref_ps), sensor="ps-1")
        wait_received(rx, 2000, sensor="pkt-1")
    assert sx.stop(signal.SIGTERM) == 0
    wait_pcap_count(ref, 2000)
    td.stop()
    rx.wait_for("said goodbye")
    assert rx.stop(signal.SIGTERM) == 0
    files = {p.name: p for p in (tmp_path / "out").rglob("*.pcap")}
    ps_files = [p for n, p in files.items() if "ps-1" in str(p)]
    pkt_files = [p for n, p in files.items() if "pkt-1" in str(p)]
    assert len(ps_files) == 1 and len(pkt_files) == 1, files
    assert_delivered(read_pcap_dpkt(ps_files[0]), "plain", ref_ps)
    assert [p[2] for p in read_pcap_dpkt(pkt_files[0])] == [p[2] for p in read_pcap_dpkt(ref)]


FRAMES = _frames(stream("plain")) + _frames(stream("large"))


@pytest.fixture(scope="module")
def fuzz_receiver(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "out.pcap"
    rx = Receiver("127.0.0.1:0", [FileSink(str(out))],
                  limits=Limits(handshake_timeout=1.0, connection_rate=(100000, 1.0))).start()
    yield rx
    rx.stop()
    rx.join(30)
    if out.exists():  # created with the first accepted packet
        read_pcap_dpkt(out)  # asserts whole, well-formed records, no trailing bytes


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(FRAMES), st.lists(st.tuples(st.integers(0, 1 << 17), st.integers(0, 255)),
                                                            max_size=4), st.integers(0, 1 << 17)),
                min_size=1, max_size=3))
def test_fuzz_mutated_frames_against_a_live_receiver(fuzz_receiver, frames):
    """Recorded frames with bytes changed and cut short: each connection either delivers valid
    packets or is closed; the receiver keeps running and every packet it accepted is valid."""
    data = bytearray()
    for frame, flips, cut in frames:
        f = bytearray(frame)
        for pos, value in flips:
            f[4 + pos % (len(f) - 4)] = value  # the magic stays: these reach the legacy path
        data += f[:max(8, cut % (len(f) + 1))]
    with socket.create_connection(fuzz_receiver.address, timeout=30) as s:
        try:
            s.sendall(bytes(data))
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed by the receiver
        read_to_eof(s)
    assert fuzz_receiver.running


def test_receiver_still_takes_a_recording_after_fuzzing(fuzz_receiver, tmp_path):
    before = fuzz_receiver.stats()["sensors"].get("127.0.0.1", {}).get("packets", 0)
    ref = oracle("plain", tmp_path)
    with socket.create_connection(fuzz_receiver.address, timeout=30) as s:
        replay(s, stream("plain"))
        wait_until(lambda: fuzz_receiver.stats()["sensors"].get("127.0.0.1", {}).get("packets", 0) == before + len(ref),
                   what="the recording after the fuzzing")


def test_status_view_says_legacy(tmp_path):
    from pktstream.stream.status import render_status
    run = Run(tmp_path)
    try:
        with run.connect() as s:
            replay(s, stream("plain"))
            wait_until(lambda: run.packets() == 300, what="300 packets")
            lines = render_status(run.rx.stats(), None, 1.0)
    finally:
        run.stop()
    row = next(line for line in lines if line.startswith("127.0.0.1"))
    assert "up" in row and " 300 " in row and "legacy: unacknowledged (PacketStreamer, no loss counts)" in row


def test_empty_key_from_an_unlisted_sensor_is_refused(tmp_path):
    hello = b"\xde\xef\xec\xe0" + struct.pack("<H", 0) + bytes(58)  # auth.enable with key ""
    run = Run(tmp_path, auth_keys={"someone-else": KEY})
    try:
        with run.connect() as s:
            s.sendall(hello)
            assert read_to_eof(s)[:5] != AUTH_OK
        assert run.rx.stats()["auth_failures"] == 1
    finally:
        run.stop()


def test_pktstream_sensor_takes_over_a_packetstreamer_id(tmp_path):
    """Migration of one host: the PacketStreamer sensor named web-1 stops, a pktstream sensor
    with id web-1 connects, and its frames are accepted and acknowledged as usual."""
    from test_security import Peer, _data, _records
    run = Run(tmp_path, legacy=PacketStreamerSettings(sensors={"127.0.0.1": "web-1"}))
    try:
        with run.connect() as s:
            replay(s, stream("plain"))
            wait_until(lambda: run.packets("web-1") == 300, what="the PacketStreamer sensor's packets")
            peer = Peer(run.rx.address[1])
            welcome = peer.handshake(None, sensor_id="web-1")  # refused: web-1 is still connected
            assert welcome is None or welcome.type != P.FrameType.WELCOME
            peer.close()
        wait_until(lambda: not run.rx.stats()["sensors"]["web-1"]["connected"], what="the disconnect")
        last = run.rx.stats()["sensors"]["web-1"]["last_seq"]
        peer = Peer(run.rx.address[1])
        welcome = peer.handshake(None, sensor_id="web-1")
        assert welcome.type == P.FrameType.WELCOME and welcome.json()["last_seq"] == last > 0
        peer.send(_data(last + 1000, _records(3)))
        ack = peer.recv_frame()
        assert ack.type == P.FrameType.ACK and ack.seq == last + 1000
        st = run.rx.stats()["sensors"]["web-1"]
        assert st["packets"] == 303 and "legacy" not in st
        peer.close()
        # the id is a pktstream sensor's now: the PacketStreamer sensor coming back is refused
        # (one sequence space per id), nothing of it is taken
        refused = run.rx.stats()["auth_failures"]
        with run.connect() as s:
            replay(s, stream("plain"))
            read_to_eof(s)
        assert run.rx.stats()["auth_failures"] == refused + 1
        assert run.rx.stats()["sensors"]["web-1"]["packets"] == 303
    finally:
        run.stop()


def test_cli_flags(tmp_path):
    from pktstream.cli import build_parser
    from pktstream.cli.stream import build_receiver
    base = ["receiver", "--listen", "127.0.0.1:0", "-w", str(tmp_path / "o.pcap")]
    rx = build_receiver(build_parser().parse_args(base + ["--packetstreamer-id", "10.0.0.5=web-1",
                                                          "--packetstreamer-id", "::1=web-2"]))
    assert rx.legacy.enabled and rx.legacy.sensors == {"10.0.0.5": "web-1", "::1": "web-2"}
    assert rx.legacy.snaplen == 262144
    rx = build_receiver(build_parser().parse_args(base + ["--no-packetstreamer"]))
    assert not rx.legacy.enabled
    with pytest.raises(ConfigError, match="ADDRESS=SENSOR_ID"):
        build_receiver(build_parser().parse_args(base + ["--packetstreamer-id", "web-1"]))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"input:\n  address: 127.0.0.1\n  port: 8081\noutput:\n  file:\n    path: {tmp_path / 'c.pcap'}\n"
                   "inputPacketLen: 65535\nlegacy:\n  packetstreamer: false\n")
    rx = build_receiver(build_parser().parse_args(["receiver", "--config", str(cfg)]))
    assert not rx.legacy.enabled and rx.legacy.snaplen == 65535


def test_made_up_sequence_numbers_grow_across_receiver_restarts(tmp_path):
    """A receiver's outputs may feed another receiver (Kafka) that keeps the highest sequence
    number per sensor across this one's restarts: the numbers given to a PacketStreamer
    sensor's blocks after a restart are above those before (a counter restarting at 1 would have
    its blocks dropped there as duplicates)."""
    last = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        run = Run(tmp_path / str(i))
        try:
            with run.connect() as s:
                replay(s, stream("plain"))
                wait_until(lambda: run.packets() == 300, what="the recorded stream")  # noqa: B023
        finally:
            run.stop()
        last.append(run.rx.stats()["sensors"]["127.0.0.1"]["last_seq"])
    assert 0 < last[0] < last[1]


def test_stalled_frame_is_cut_off(tmp_path, caplog):
    """Idle between frames is fine (upstream sends nothing when idle), but a frame that began
    must be complete within the handshake timeout: a peer stalling mid-frame loses its slot
    (logged as its session timing out: it was no handshake)."""
    rx = Receiver("127.0.0.1:0", [FileSink(str(tmp_path / "out.pcap"))],
                  limits=Limits(handshake_timeout=0.5)).start()
    try:
        frames = _frames(stream("plain"))
        with socket.create_connection(rx.address, timeout=30) as s:
            s.sendall(frames[0])
            wait_until(lambda: rx.stats()["sensors"].get("127.0.0.1", {}).get("packets", 0) > 0,
                       what="the first frame")
            s.sendall(frames[1][:12])  # magic, length and 4 bytes of the block, then nothing
            read_to_eof(s)  # closed by the receiver (a socket timeout here fails the test)
        assert rx.stats()["timeouts"] == 1
        assert "PacketStreamer session timed out" in caplog.text and "handshake timed out" not in caplog.text
    finally:
        rx.stop()
        rx.join(30)
