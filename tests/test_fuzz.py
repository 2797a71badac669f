"""Property-based fuzzing (hypothesis) of the frame decoder, the DATA decoder, the handshake
validation and a live receiver. Short by default; a long run:

    PKTSTREAM_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import os
import socket
import struct

import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from pktstream import protocol as P
from pktstream.exceptions import FrameError
from pktstream.receiver import Receiver
from pktstream.sinks import CallbackSink

EXAMPLES = int(os.environ.get("PKTSTREAM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def _header(ftype, flags, hlen, seq, iface, count, raw_len, plen, magic=P.MAGIC, version=1):
    return struct.pack("<IBBHHHQIIII", magic, version, ftype, flags, hlen, 0, seq, iface, count, raw_len, plen)


@FUZZ
@given(st.binary(min_size=0, max_size=80))
def test_decode_header_random_bytes(data):
    try:
        h = P.decode_header(data, max_payload=1 << 20, max_raw=1 << 20)
    except FrameError:
        return
    assert h.payload_len <= 1 << 20 or h.type != P.FrameType.DATA


@FUZZ
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_decode_header_fields_bounded(ftype, flags, hlen, seq, iface, count, raw_len, plen):
    try:
        h = P.decode_header(_header(ftype, flags, hlen, seq, iface, count, raw_len, plen),
                            max_payload=1 << 20, max_raw=1 << 20)
    except FrameError:
        return
    # whatever is accepted respects every bound
    assert 36 <= h.header_len <= 1024
    if h.type == P.FrameType.DATA:
        assert h.raw_len <= 1 << 20 and h.payload_len <= 1 << 20 and h.count * 16 <= h.raw_len
    else:
        assert h.payload_len <= P.MAX_CONTROL_BYTES and h.flags == 0


_records = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 3000),
                              st.integers(0, 3000), st.binary(max_size=64)), max_size=8)


def _pack(recs, lie: bool):
    out = b""
    for sec, nsec, caplen, wirelen, data in recs:
        real = caplen if lie else len(data)
        out += struct.pack("<IIII", sec, nsec, real, wirelen) + data
    return out


@FUZZ
@given(_records, st.booleans(), st.booleans(), st.integers(-3, 3), st.binary(max_size=32), st.booleans())
def test_decode_data_never_crashes(recs, lie, stored, count_delta, junk, corrupt):
    raw = _pack(recs, lie)
    payload = raw if stored else zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(raw)
    if corrupt and payload:
        payload = payload[: len(payload) // 2] + junk + payload[len(payload) // 2:]
    frame = P.Frame(P.FrameType.DATA, int(stored), 1, 0, max(0, len(recs) + count_delta), len(raw), payload)
    try:
        batch = P.decode_data(frame, link_type=1, snaplen=2000, interface="x", max_raw=1 << 20)
    except FrameError:
        return
    # accepted: every record is whole and within snaplen, and the count is what was announced
    assert len(batch) == frame.count
    assert all(c <= 2000 for c in batch.caplen.tolist())
    assert (batch.caplen <= batch.wirelen).all()
    assert int(batch.caplen.sum()) + 16 * len(batch) == batch.nbytes
    batch.release()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                     max_leaves=12)


@FUZZ
@given(st.dictionaries(st.sampled_from(["index", "name", "link_type", "snaplen", "x"]), _json))
def test_interface_descriptor_validation(d):
    try:
        out = Receiver._check_iface(d)
    except FrameError:
        return
    assert isinstance(out["name"], str) and 0 < len(out["name"]) <= 64
    assert 1 <= out["snaplen"] <= 1 << 18


@settings(max_examples=max(40, EXAMPLES // 5), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, p: P.encode(P.FrameType(t), p), st.integers(1, 10), st.binary(max_size=100)),
    st.builds(lambda obj: P.encode_json(P.FrameType.HELLO, obj), st.dictionaries(st.text(max_size=12), _json)),
), min_size=1, max_size=4))
def test_live_receiver_survives_random_streams(receiver, chunks):
    """Random byte streams, random frames and random HELLOs against a running receiver: each
    connection is closed or ignored, and the receiver keeps serving real handshakes."""
    with socket.create_connection(("127.0.0.1", receiver.address[1]), timeout=5) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiver already closed it
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
    assert receiver._thread.is_alive()


def test_receiver_still_serves_after_fuzzing(receiver):
    from test_security import Peer
    peer = Peer(receiver.address[1])
    assert peer.handshake(None, sensor_id="after-fuzz").type == P.FrameType.WELCOME
    peer.close()
    assert receiver.stats()["sensors"].get("after-fuzz") is not None


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def receiver():
    got = []
    rx = Receiver(listen="127.0.0.1:0", outputs=[CallbackSink(lambda s, b: got.append(b))],
                  handshake_timeout=1.0, connection_rate=(100000, 1.0)).start()
    yield rx
    rx.stop()
    rx.join(10)
    assert not got  # nothing random ever reached an output
