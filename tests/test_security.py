"""Security and robustness: TLS/mTLS, mutual HMAC auth, hostile input, limits, full disk,
privilege drop. After each attack a real sensor still streams into the same receiver."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
import zstandard

from conftest import PKTSTREAM, free_port, pcap_count, read_pcap_dpkt, start_tcpdump, wait_pcap_count, wait_received
from pktstream.lab import traffic
from pktstream.stream import protocol as P
from test_stream import assert_same_packets, received, receiver_cmd, sensor_cmd

pytestmark = pytest.mark.live

KEY = "s3cret-shared-key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    import trustme
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("sensor-1", common_name="sensor-1")
    rogue = other_ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(d / "other-ca.pem"))
    for name, cert in (("server", server), ("client", client), ("rogue", rogue)):
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
    (d / "key").write_text(KEY)
    (d / "wrong-key").write_text("not-the-key")
    return d


def stream_and_compare(veth, procs, tmp_path, port, mixed_pcap, *sensor_extra, ref_name="ref.pcap",
                       pattern="out*.pcap"):
    """A real sensor streams replayed traffic; the receiver's file equals tcpdump's."""
    ref = tmp_path / ref_name
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, *sensor_extra))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    # every packet handed to the capture sockets; stopping the sensor drains its capture and
    # waits until the receiver has acknowledged (written) everything
    wait_pcap_count(ref, pcap_count(mixed_pcap))
    assert sx.stop(signal.SIGTERM) == 0
    td.stop()
    return sx, read_pcap_dpkt(ref)


# -- TLS ---------------------------------------------------------------------------------------

def test_tls_verified_and_untrusted_receiver_refused(veth, procs, tmp_path, pki, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--tls-cert", str(pki / "server.pem"),
                            "--tls-key", str(pki / "server.key")))
    rx.wait_for("listening on")
    # a sensor trusting another CA refuses this receiver
    bad = procs(sensor_cmd(port, veth.outer, "--tls-ca", str(pki / "other-ca.pem")))
    bad.wait_for("TLS verification failed")
    bad.stop(signal.SIGTERM)
    # with the right CA: verified TLS, data equals the reference
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, mixed_pcap, "--tls-ca", str(pki / "ca.pem"))
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), ref)


def test_tls_carries_incompressible_blocks(veth, procs, tmp_path, pki):
    """Random payloads are sent stored, straight from the ring blocks: over TLS too."""
    src = tmp_path / "random.pcap"
    traffic.write_random_udp_pcap(str(src), 3000, size=1400)
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--tls-cert", str(pki / "server.pem"),
                            "--tls-key", str(pki / "server.key")))
    rx.wait_for("listening on")
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, src, "--tls-ca", str(pki / "ca.pem"),
                                 "--block-size", "256KiB", "--stats-json", str(tmp_path / "sx.json"))
    rx.stop(signal.SIGTERM)
    assert len(ref) == 3000
    assert_same_packets(received(tmp_path), ref)
    st = json.loads((tmp_path / "sx.json").read_text())
    assert st["wire_bytes"] >= st["raw_bytes"]  # stored, not compressed


def test_tls_insecure_must_be_spelled_out(veth, procs, tmp_path, pki, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--tls-cert", str(pki / "rogue.pem"),
                            "--tls-key", str(pki / "rogue.key")))
    rx.wait_for("listening on")
    no_ca = procs(sensor_cmd(port, veth.outer, "--tls"))  # system store does not know the CA
    no_ca.wait_for("TLS verification failed")
    no_ca.stop(signal.SIGTERM)
    assert "--tls-ca PEM (tls.cafile)" in no_ca.stderr  # says what to do
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, mixed_pcap, "--tls-insecure")
    assert "verification of the receiver is OFF" in sx.stderr
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), ref)


def test_mtls_requires_client_certificate_and_identity(veth, procs, tmp_path, pki, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--tls-cert", str(pki / "server.pem"),
                            "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem"),
                            "--tls-client-certs", "--tls-identity-from-cert"))
    rx.wait_for("listening on")
    ca = ["--tls-ca", str(pki / "ca.pem")]
    nocert = procs(sensor_cmd(port, veth.outer, *ca, "--sensor-id", "sensor-1"))
    rx.wait_for("TLS handshake failed")
    nocert.wait_for("retrying")
    nocert.stop(signal.SIGTERM)
    assert "connected to receiver" not in nocert.stderr
    assert "certificate" in rx.stderr
    wrong_id = procs(sensor_cmd(port, veth.outer, *ca, "--tls-cert", str(pki / "client.pem"),
                                "--tls-key", str(pki / "client.key"), "--sensor-id", "sensor-2"))
    wrong_id.wait_for("receiver refused")
    wrong_id.stop(signal.SIGTERM)
    assert "'sensor-2' is not named in its client certificate" in rx.stderr
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, mixed_pcap, *ca, "--tls-cert",
                                 str(pki / "client.pem"), "--tls-key", str(pki / "client.key"),
                                 "--sensor-id", "sensor-1")
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), ref)


# -- authentication ------------------------------------------------------------------------------

def test_mutual_hmac_auth(veth, procs, tmp_path, pki, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--auth-key-file", str(pki / "key")))
    rx.wait_for("listening on")
    wrong = procs(sensor_cmd(port, veth.outer, "--auth-key-file", str(pki / "wrong-key")))
    wrong.wait_for("key differs from the receiver's key")  # the receiver's proof fails with the wrong key
    wrong.stop(signal.SIGTERM)
    keyless = procs(sensor_cmd(port, veth.outer))
    keyless.wait_for("authentication failed")
    keyless.stop(signal.SIGTERM)
    assert "authentication failed" in rx.stderr and "127.0.0.1" in rx.stderr
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, mixed_pcap, "--auth-key-file", str(pki / "key"))
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), ref)
    # a sensor with a key refuses a receiver that has none (it cannot prove anything)
    port2 = free_port()
    rx2 = procs(receiver_cmd(port2, "-w", str(tmp_path / "other.pcap")))
    rx2.wait_for("listening on")
    s2 = procs(sensor_cmd(port2, veth.outer, "--auth-key-file", str(pki / "key")))
    s2.wait_for("the receiver does not check keys")
    s2.stop(signal.SIGTERM)


def test_a_lone_surrogate_from_one_sensor_stops_no_other(procs, tmp_path):
    """A sensor with a valid key announced an interface named "\\ud800" (valid JSON, no text):
    the pcapng output raised on every retry of its write, so nothing was acknowledged for any
    sensor again (cold review). Its HELLO is now refused like any bad frame, and the others'
    data is written and acknowledged."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"evil: {KEY}\ngood: {KEY}\n")
    keys.chmod(0o600)
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcapng"), "--auth-keys", str(keys),
                            "--stats-json", str(tmp_path / "rx.json"), "--stats-interval", "0.2"))
    rx.wait_for("listening on")
    evil = Peer(port)
    reply = evil.handshake(KEY.encode(), sensor_id="evil", interface="\ud800")
    assert reply is None or reply.type == P.FrameType.ERROR, reply
    assert evil.closed_by_peer()
    evil.close()
    good = Peer(port)
    w = good.handshake(KEY.encode(), sensor_id="good")
    assert w is not None and w.type == P.FrameType.WELCOME
    good.send(_data(1, _records(3)))
    ack = good.recv_frame()
    assert ack is not None and ack.type == P.FrameType.ACK and ack.seq == 1, ack
    good.close()
    rx.stop(signal.SIGTERM)
    assert "lone surrogate" in rx.stderr and "Traceback" not in rx.stderr
    import pktstream
    assert sum(len(b) for b in pktstream.read(tmp_path / "out.pcapng")) == 3


def test_per_sensor_keys_and_revocation(veth, procs, tmp_path, pki, mixed_pcap):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"good-sensor: {KEY}\nother: zzz\n")
    keys.chmod(0o600)
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--auth-keys", str(keys)))
    rx.wait_for("listening on")
    revoked = procs(sensor_cmd(port, veth.outer, "--sensor-id", "revoked-sensor",
                               "--auth-key-file", str(pki / "key")))
    revoked.wait_for("receiver refused")
    revoked.stop(signal.SIGTERM)
    assert "'revoked-sensor' has no key" in rx.stderr
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, mixed_pcap, "--sensor-id", "good-sensor",
                                 "--auth-key-file", str(pki / "key"))
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), ref)


# -- a scripted peer for hostile input ----------------------------------------------------------------

class Peer:
    """A raw TCP client speaking (or abusing) the protocol."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sent = bytearray()

    def send(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def recv_frame(self) -> P.Frame | None:
        head = self._exact(P.HEADER_LEN)
        if head is None:
            return None
        h = P.decode_header(head, max_payload=1 << 20, max_raw=1 << 24)
        payload = self._exact(h.payload_len) if h.payload_len else b""
        return P.Frame(h.type, h.flags, h.seq, h.iface, h.count, h.raw_len, payload or b"")

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (TimeoutError, ConnectionResetError):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def handshake(self, key: bytes | None, sensor_id: str = "attacker", snaplen: int = 2000,
                  interface: str = "x0") -> P.Frame | None:
        nonce = os.urandom(32)
        self.send(P.encode_json(P.FrameType.HELLO, {
            "sensor_id": sensor_id, "hostname": "h", "nonce": nonce.hex(),
            "interfaces": [{"index": 0, "name": interface, "link_type": 1, "snaplen": snaplen}]}))
        ch = self.recv_frame()
        if ch is None or ch.type != P.FrameType.CHALLENGE:
            return ch
        rn = bytes.fromhex(ch.json()["nonce"])
        self.send(P.encode_json(P.FrameType.AUTH, {"proof": P.proof(key, "sensor", rn, nonce, sensor_id)
                                                   if key else ""}))
        return self.recv_frame()

    def closed_by_peer(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def _records(n: int, caplen: int = 100, wirelen: int | None = None) -> bytes:
    out = b""
    for i in range(n):
        out += struct.pack("<IIII", 1700000000, i, caplen, wirelen or caplen) + bytes([i % 256]) * caplen
    return out


def _data(seq: int, records: bytes, count: int | None = None, **kw) -> bytes:
    payload = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(records)
    return P.encode(P.FrameType.DATA, payload, seq=seq, iface=0, raw_len=len(records),
                    count=_count(records) if count is None else count, **kw)


def _count(records: bytes) -> int:
    """Record count by walking the caplen fields (no validation: hostile data is the point)."""
    n = pos = 0
    while pos + 16 <= len(records):
        pos += 16 + struct.unpack_from("<I", records, pos + 8)[0]
        n += 1
    return n


def _bomb() -> bytes:
    """A zstd frame that claims 8 KiB but decompresses to 1 GiB (no content size in the frame)."""
    c = zstandard.ZstdCompressor(write_content_size=False)
    big = c.compressobj()
    out = big.compress(b"\0" * (64 << 20)) + big.flush()
    return P.encode(P.FrameType.DATA, out, seq=10**9, iface=0, raw_len=8192, count=1)


def _bad_checksum() -> bytes:
    recs = _records(5)
    payload = bytearray(zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(recs))
    payload[-1] ^= 0xFF
    return P.encode(P.FrameType.DATA, bytes(payload), seq=10**9 + 1, iface=0, raw_len=len(recs), count=5)


HOSTILE = {
    # name: (needs handshake, bytes to send)
    "garbage": (False, os.urandom(4096)),
    "wrong magic": (False, b"\xde\xef\xec\xe0" + struct.pack("<I", 100) + os.urandom(100)),  # PacketStreamer's
    "truncated header": (False, P.encode_json(P.FrameType.HELLO, {"a": 1})[:20]),
    "oversized control": (False, struct.pack("<IBBHHHQIIII", P.MAGIC, 1, 1, 0, 36, 0, 0, 0, 0, 0, 1 << 30)),
    "hello not json": (False, P.encode(P.FrameType.HELLO, b"\xff\xfe not json")),
    "bad sensor id": (False, P.encode_json(P.FrameType.HELLO, {"sensor_id": "a b\n", "nonce": "00" * 32,
                                                               "interfaces": []})),
    "data before handshake": (False, _data(1, _records(3))),
    "raw_len over limit": (True, P.encode(P.FrameType.DATA, b"x" * 10, seq=10**9, iface=0, raw_len=1 << 30,
                                          count=1)),
    "payload shorter than said": (True, _data(10**9, _records(3))[:-20]),
    "count lies": (True, _data(10**9, _records(3), count=7)),
    "zstd bomb": (True, _bomb()),
    "bad checksum": (True, _bad_checksum()),
    "caplen over snaplen": (True, _data(10**9, _records(2, caplen=3000))),
    "caplen over wirelen": (True, _data(10**9, _records(2, caplen=100, wirelen=50))),
    "record past the end": (True, P.encode(P.FrameType.DATA, (rec := _records(1)[:-10]), flags=1, seq=10**9,
                                           iface=0, raw_len=len(rec), count=1)),
    "unknown interface": (True, P.encode(P.FrameType.DATA, (rec2 := _records(1)), flags=1, seq=10**9, iface=9,
                                         raw_len=len(rec2), count=1)),
    "unknown frame type": (True, struct.pack("<IBBHHHQIIII", P.MAGIC, 1, 99, 0, 36, 0, 0, 0, 0, 0, 0)),
    # JSON that json.loads refuses with other errors than JSONDecodeError (they were not caught:
    # no ERROR frame, not counted, a traceback per connection in the log)
    "hello nested 60,000 deep": (False, P.encode(P.FrameType.HELLO, b"[" * 60000)),
    "hello 5000-digit number": (False, P.encode(P.FrameType.HELLO, b'{"sensor_id": ' + b"1" * 5000 + b"}")),
    "stats nested 60,000 deep": (True, P.encode(P.FrameType.STATS, b"[" * 60000)),
}


TRUNCATED = {"truncated header", "payload shorter than said"}  # the peer then closes its side
# well-framed DATA whose content is bad: rejected, counted and acknowledged (the session stays:
# a sensor would otherwise resend the frame forever and deliver nothing behind it)
REJECTED = {"count lies", "zstd bomb", "bad checksum", "caplen over snaplen", "caplen over wirelen",
            "record past the end", "unknown interface"}


def test_hostile_input_harms_nothing(veth, procs, tmp_path, pki, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--auth-key-file", str(pki / "key"),
                            "--state-dir", str(tmp_path / "st"), "--stats-json", str(tmp_path / "rx.json"),
                            "--heartbeat", "1"))  # a stalled frame is cut off after 3 x 1 + 1 s
    rx.wait_for("listening on")
    key = KEY.encode()
    # a real sensor is connected the whole time
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "--auth-key-file", str(pki / "key"), "--sensor-id", "real"))
    sx.wait_for("connected to receiver")
    replay = threading.Thread(target=veth.replay, args=(mixed_pcap,), kwargs={"pps": 1000})
    replay.start()
    for i, (name, (needs_auth, payload)) in enumerate(HOSTILE.items()):
        peer = Peer(port, source=f"127.0.0.{2 + i // 10}")  # (within the connection rate per address)
        if needs_auth:
            w = peer.handshake(key, sensor_id=f"attacker-{i}")
            assert w is not None and w.type == P.FrameType.WELCOME, name
        peer.send(payload)
        if name in REJECTED:
            ack = peer.recv_frame()
            seq = P.decode_header(payload[:P.HEADER_LEN], max_payload=1 << 30, max_raw=1 << 30).seq
            assert ack is not None and ack.type == P.FrameType.ACK and ack.seq == seq, f"{name}: {ack}"
            peer.close()
            continue
        if name in TRUNCATED:
            peer.sock.shutdown(socket.SHUT_WR)  # EOF in the middle of a frame
        assert peer.closed_by_peer(), f"{name}: connection not closed"
        peer.close()
    replay.join()
    wait_received(rx, 2000, "real", also=(sx,))
    assert sx.stop(signal.SIGTERM) == 0
    wait_pcap_count(ref, 2000)
    td.stop()
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    assert "Traceback" not in rx.stderr and "exception was never retrieved" not in rx.stderr
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["protocol_errors"] >= len(HOSTILE) - len(REJECTED) - 2
    assert set(st["sensors"]) <= {"real"} | {f"attacker-{i}" for i in range(len(HOSTILE))}
    assert all(s["packets"] == 0 for sid, s in st["sensors"].items() if sid != "real")
    assert sum(s["rejected_frames"] for s in st["sensors"].values()) == len(REJECTED)
    assert st["sensors"]["real"]["rejected_frames"] == 0


def test_a_sensor_with_the_key_cannot_exhaust_the_receiver(procs, tmp_path, pki):
    """What a peer holding a valid key could still do to a receiver (cold review): a STATS
    counter too large for a float made every /metrics scrape fail; interfaces announced after the
    handshake had no bound on a connection (the state file, rewritten at every commit, grew with
    them); a peer that never reads its socket made the receiver queue an ACK for every duplicate
    frame it sent, without bound. Now: the counter is dropped, the 4097th announcement on one
    connection closes it (per connection: an honest sensor's interfaces come and go over its
    life), and a peer with 1 MiB of ACKs unread is cut off (counted in ``timeouts``)."""
    import urllib.request
    port, mport = free_port(), free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--auth-key-file", str(pki / "key"),
                            "--metrics", f"127.0.0.1:{mport}", "--stats-json", str(tmp_path / "rx.json")))
    rx.wait_for("listening on")
    key = KEY.encode()
    peer = Peer(port)
    assert peer.handshake(key, sensor_id="big-stats").type == P.FrameType.WELCOME
    peer.send(P.encode_json(P.FrameType.STATS, {"kernel_dropped": 10**400, "ring_drops": 7}))
    peer.send(P.encode(P.FrameType.HEARTBEAT))
    assert peer.recv_frame().type == P.FrameType.HEARTBEAT  # (the STATS before it was taken)
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert 'pktstream_sensor_ring_drops_total{sensor="big-stats"} 7.0' in body
    peer.close()

    peer = Peer(port)
    assert peer.handshake(key, sensor_id="many-ifaces").type == P.FrameType.WELCOME  # (1 interface)
    for i in range(1, 4098):
        peer.send(P.encode_json(P.FrameType.HELLO, {"interface": {"index": i, "name": f"x{i}", "link_type": 1,
                                                                  "snaplen": 2000}}))
    peer.send(P.encode(P.FrameType.HEARTBEAT))
    answer = peer.recv_frame()
    assert answer is not None and answer.type == P.FrameType.ERROR, answer
    assert "4096 interfaces announced on one connection" in answer.json()["reason"]
    assert peer.closed_by_peer()
    peer.close()

    deaf = socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: its ACKs pile up in the receiver
    deaf.connect(("127.0.0.1", port))
    peer = Peer.__new__(Peer)
    peer.sock, peer.sent = deaf, bytearray()
    assert peer.handshake(key, sensor_id="deaf").type == P.FrameType.WELCOME
    dup = _data(0, _records(1))  # seq 0: always a duplicate, answered with an ACK
    peer.sock.settimeout(30)
    cut_off = False
    try:
        for _ in range(400):  # 400 x 1000 duplicates: ACKs far beyond the kernel's buffers and the 1 MiB bound
            peer.sock.sendall(dup * 1000)
    except (BrokenPipeError, ConnectionResetError):
        cut_off = True
    assert cut_off, "a peer that never reads its ACKs was not cut off"
    peer.close()
    rx.wait_for("leaves its acknowledgements unread")
    rx.stop(signal.SIGTERM)
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["timeouts"] >= 1 and st["protocol_errors"] >= 1
    assert "Traceback" not in rx.stderr


def test_replayed_session_and_duplicates(veth, procs, tmp_path, pki):
    """A recorded authenticated session replayed byte for byte is refused (fresh nonces); a
    duplicate frame inside a live session is dropped and counted; a gap is accepted."""
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--auth-key-file", str(pki / "key"),
                            "--stats-json", str(tmp_path / "rx.json")))
    rx.wait_for("listening on")
    key = KEY.encode()
    peer = Peer(port)
    assert peer.handshake(key, sensor_id="rec").type == P.FrameType.WELCOME
    recs = _records(4)
    peer.send(_data(100, recs))
    assert peer.recv_frame().type == P.FrameType.ACK
    peer.send(_data(100, recs))       # replay inside the session: duplicate
    peer.send(_data(105, _records(2)))  # gap: accepted
    ack = peer.recv_frame()
    while ack.seq < 105:
        ack = peer.recv_frame()
    recording = bytes(peer.sent)
    peer.close()
    again = Peer(port)
    again.send(recording)
    frames = []
    while (f := again.recv_frame()) is not None:
        frames.append(f.type)
    again.close()
    assert P.FrameType.ERROR in frames and P.FrameType.WELCOME not in frames
    rx.stop(signal.SIGTERM)
    assert "authentication failed" in rx.stderr
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["sensors"]["rec"]["packets"] == 6 and st["sensors"]["rec"]["duplicate_frames"] == 1
    assert len(read_pcap_dpkt(tmp_path / "out.pcap")) == 6


def test_slowloris_and_connection_flood(veth, procs, tmp_path, mixed_pcap):
    port = free_port()
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"input:\n  address: 127.0.0.1\n  port: {port}\nhandshakeTimeout: 1\n"
                   f"connectionRate:\n  burst: 30\n  seconds: 3\n")
    rx = procs([*PKTSTREAM, "receiver", "--config", str(cfg), "-w", str(tmp_path / "out.pcap"),
                "--stats-json", str(tmp_path / "rx.json")])
    rx.wait_for("listening on")
    slow = Peer(port)
    hello = P.encode_json(P.FrameType.HELLO, {"sensor_id": "slow"})
    closed = False
    for b in hello:  # one byte every 0.2 s (the slowloris itself): the 1 s handshake timeout cuts it off
        try:
            slow.send(bytes([b]))
        except OSError:
            closed = True
            break
        time.sleep(0.2)
    assert closed, f"the receiver let a {len(hello)}-byte hello trickle in over {len(hello) * 0.2:.1f} s"
    slow.close()
    flood = []
    for _ in range(60):
        try:
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            pass
    rx.wait_for("refused, more than 30 connections")
    for s in flood:
        s.close()
    # the sensor is refused until the bucket refills; it retries until it is let in
    sx, ref = stream_and_compare(veth, procs, tmp_path, port, mixed_pcap)
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), ref)
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["timeouts"] >= 1 and st["rate_limited_connections"] > 0


def test_full_disk_loses_nothing(veth, procs, tmp_path):
    """The output disk fills up: the receiver stops acknowledging (the sensor keeps the data),
    says so, and when space is back everything is written, once."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        src = tmp_path / "t.pcap"
        traffic.write_random_udp_pcap(str(src), 3000, size=1000)
        port = free_port()
        rx = procs(receiver_cmd(port, "-w", str(mnt / "out.pcap"), "--stats-json", str(tmp_path / "rx.json")))
        rx.wait_for("listening on")
        ref = tmp_path / "ref.pcap"
        td = start_tcpdump(procs, veth.outer, ref)
        sx = procs(sensor_cmd(port, veth.outer, "-s", "1600", "--block-size", "64KiB"))
        sx.wait_for("connected to receiver")
        veth.replay(src, pps=5000)
        rx.wait_for("No space left on device")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        rx.wait_for("works again")
        wait_received(rx, 3000)
        assert sx.stop(signal.SIGTERM) == 0  # waits until the receiver has written (acked) everything
        wait_pcap_count(ref, 3000)
        td.stop()
        assert rx.stop(signal.SIGTERM) == 0
        assert_same_packets(received(mnt), read_pcap_dpkt(ref))
        assert oct(os.stat(mnt / "out.pcap").st_mode & 0o777) == "0o640"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sensor_drops_root_keeping_only_capture_capabilities(veth, procs, tmp_path, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap")))
    rx.wait_for("listening on")
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "--user", "nobody", "--stats-json", str(tmp_path / "sx.json")))
    sx.wait_for("connected to receiver")
    from pathlib import Path
    status = Path(f"/proc/{sx.p.pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status.splitlines() if ":" in line}
    assert fields["Uid"] == ["65534"] * 4
    assert int(fields["CapEff"][0], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN | CAP_NET_RAW
    assert int(fields["CapPrm"][0], 16) == (1 << 12) | (1 << 13)
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 2000)
    assert sx.stop(signal.SIGTERM) == 0
    wait_pcap_count(ref, 2000)
    td.stop()
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    assert json.loads((tmp_path / "sx.json").read_text())["packets"] == 2000
