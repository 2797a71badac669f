"""Property-based fuzzing (hypothesis) of the frame decoder, the DATA decoder, the handshake
validation, a live receiver, and the Cython core: batches over buffers mutated after they
were wrapped, capture files truncated while they are read, hostile file headers. Short by
default; a long run (``./run sanitize`` runs this file under ASan + UBSan):

    PKTSTREAM_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""
from __future__ import annotations

import io
import os
import socket
import struct
import tempfile
import warnings

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

import pktstream
from pktstream import Capture, PacketBatch
from pktstream.exceptions import FileFormatError, FrameError
from pktstream.formats import open_reader, open_writer
from pktstream.sinks import CallbackSink
from pktstream.stream import protocol as P
from pktstream.stream.receiver import Limits, Receiver, check_interface

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


_mutations = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from([0, 1, 0xFF, 0x7F, 0x80])), max_size=6)


@FUZZ
@given(_records, st.booleans(), st.integers(-1, 12), _mutations, st.booleans())
def test_mutated_buffer_never_reads_outside(recs, validate, count, mutations, index_first):
    """A bytearray wrapped by a batch and then changed (lengths included): every accessor
    either works within the buffer or raises FileFormatError; under ASan, any stray read aborts."""
    buf = bytearray(_pack(recs, lie=False))
    try:
        batch = PacketBatch.from_records(buf, link_type=1, snaplen=4000, validate=validate,
                                         count=-1 if validate else count)
    except FileFormatError:
        return
    try:
        if index_first:
            batch.offset  # index built from the original, then the buffer changes
        for pos, val in mutations:
            if buf:
                buf[pos % len(buf)] = val
                if pos % 3 == 0 and len(buf) >= 16:  # hit a caplen field too
                    struct.pack_into("<I", buf, (pos % (len(buf) - 15)) // 4 * 4 if len(buf) >= 16 else 0,
                                     0xFFFFFFF0 + val % 16)
        off, cap = batch.offset, batch.caplen
        assert ((off + cap) <= batch.nbytes).all() and (off >= 16).all()
        assert sum(len(p) for p in batch) == int(cap.sum())
        batch.filter("tcp or ether[20] = 1")
        pktstream.decode(batch)
        batch.copy().release()
    except (FileFormatError, ValueError):
        pass
    batch.release()


@FUZZ
@given(_records, st.booleans(), st.integers(-2, 2), st.integers(0, 40), st.binary(max_size=24))
def test_epb_writing_with_per_packet_interfaces_stays_inside(recs, lie, id_delta, cut, junk):
    """records_to_epb_ids (a pcapng of interleaved interfaces in one pass) over records whose
    lengths lie, cut short or followed by junk, with too few or too many interface ids: either
    exact EPBs or ValueError; under ASan, any stray read or write aborts."""
    import numpy as np

    from pktstream._records import records_to_epb, records_to_epb_ids
    buf = _pack(recs, lie=lie)
    buf = buf[:max(0, len(buf) - cut)] + junk
    ids = np.arange(max(0, len(recs) + id_delta), dtype=np.uint32) % 3
    found = np.full(len(ids) + 1, -7, dtype=np.int64)
    try:
        out = records_to_epb_ids(buf, len(buf), ids, found[:len(ids)])
    except ValueError:
        return
    assert records_to_epb_ids(buf, len(buf), ids) == out
    same = records_to_epb(buf, len(buf), 0)  # (the same records, one interface)
    assert len(out) == len(same)
    offsets = np.full(len(ids) + 1, -7, dtype=np.int64)  # (room for exactly one per record)
    assert records_to_epb(buf, len(buf), 0, offsets[:len(ids)]) == same
    pos = k = src = 0
    while pos < len(out):
        blen = struct.unpack_from("<I", out, pos + 4)[0]
        assert struct.unpack_from("<I", out, pos + 8)[0] == ids[k]
        assert out[pos + 12:pos + blen] == same[pos + 12:pos + blen]
        assert offsets[k] == src + 16  # the record's packet data in the input
        src += 16 + struct.unpack_from("<I", out, pos + 20)[0]
        pos, k = pos + blen, k + 1
    assert k == len(ids) and offsets[k] == -7
    assert found.tolist() == offsets.tolist()


@FUZZ
@given(st.lists(st.lists(st.lists(st.integers(0, 6), max_size=7), max_size=4), min_size=1, max_size=4))
def test_merge_is_mergecaps_choice_whatever_the_stamps_and_batches(inputs):
    """The merge over batches (pktstream.formats.merge's C steps, refilling an input whenever
    its batch at hand is used up) against mergecap's rule applied packet by packet in Python:
    the earliest of the inputs' next packets, ties to the last input -- stamps unsorted, tied,
    inputs of empty and one-packet batches."""
    import numpy as np

    from pktstream._records import gather_records, merge_heads
    want, heads = [], [[t for b in batches for t in b] for batches in inputs]
    nxt = [0] * len(heads)
    while any(nxt[k] < len(h) for k, h in enumerate(heads)):
        best = None
        for k, h in enumerate(heads):
            if nxt[k] < len(h) and (best is None or h[nxt[k]] <= heads[best][nxt[best]]):
                best = k
        want.append((best, nxt[best]))
        nxt[best] += 1
    # the same through merge_heads, batch by batch; records carry (input, packet number)
    its = [iter([b for b in batches if b]) for batches in inputs]
    at_hand: list = [None] * len(inputs)
    done = [0] * len(inputs)  # packets of the input before the batch at hand
    got = []

    def refill(k: int) -> bool:
        if at_hand[k] is not None:
            done[k] += len(at_hand[k][0])
        b = next(its[k], None)
        if b is None:
            at_hand[k] = None
            return False
        recs = b"".join(struct.pack("<IIIIII", 0, t, 8, 8, k, done[k] + j) for j, t in enumerate(b))
        at_hand[k] = (np.array(b, np.int64), recs, np.arange(len(b), dtype=np.int64) * 24 + 16)
        return True
    live = [k for k in range(len(inputs)) if refill(k)]
    pos = {k: 0 for k in live}
    while live:
        p = np.array([pos[k] for k in live], np.int64)
        which, index = merge_heads([at_hand[k][0] for k in live], p)
        out, n = gather_records([at_hand[k][1] for k in live], [at_hand[k][2] for k in live],
                                [np.full(len(at_hand[k][0]), 8, np.uint32) for k in live], which, index)
        assert n == len(which) > 0 and len(out) == 24 * n
        got += [struct.unpack_from("<II", out, 24 * j + 16) for j in range(n)]
        for j, k in enumerate(list(live)):
            pos[k] = int(p[j])
            if pos[k] == len(at_hand[k][0]):
                pos[k] = 0
                if not refill(k):
                    live.remove(k)
    assert got == want


def _pcap_file(recs, usec: bool, big: bool, snaplen: int, linktype: int) -> bytes:
    o = ">" if big else "<"
    magic = 0xA1B2C3D4 if usec else 0xA1B23C4D
    out = struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for sec, nsec, _caplen, wirelen, data in recs:
        frac = (nsec % 10**9) // 1000 if usec else nsec % 10**9
        out += struct.pack(o + "IIII", sec, frac, len(data), max(wirelen, len(data))) + data
    return out


@settings(max_examples=max(40, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(_records, st.booleans(), st.booleans(), st.integers(0, 2000), st.integers(0, 6), st.booleans())
def test_file_truncated_while_read(recs, usec, big, cut, after, libpcap):
    """A capture file cut short (anywhere, also mid-record) after ``after`` batches were read:
    no crash (formerly SIGBUS on the memory-mapped path), the batches already delivered stay
    intact, and what is delivered is a prefix of the packets."""
    data = _pcap_file(recs * 20, usec, big, 65535, 1)
    want = [r[4] for r in recs * 20]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.pcap")
        with open(path, "wb") as f:
            f.write(data)
        got, held = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if libpcap:
                cap = Capture.open_offline(path, block_bytes=4096, ring_blocks=4)
                batches = cap
            else:
                reader = open_reader(path, batch_bytes=4096)
                batches = reader
            try:
                for i, b in enumerate(batches):
                    if i == after:
                        os.truncate(path, min(cut, len(data)) + 24)
                    held.append((b, [bytes(p) for p in b]))
                    if libpcap:  # keep a few ring blocks, give the rest back
                        if len(held) > 2:
                            held[-3][0].release()
            except FileFormatError:
                pass
            finally:
                (cap if libpcap else reader).close()
        for b, packets in held:
            if not b.released:
                assert [bytes(p) for p in b] == packets
            got.extend(packets)
        assert got == want[:len(got)]


def _outcome(path, **kw) -> list:
    """Every batch (bytes, index arrays, interface) and how the reading ended."""
    out: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open_reader(path, batch_bytes=4096, comments=True, **kw) as r:
                assert r.memory_mapped == kw.get("memory_map", False)
                for b in r:
                    out.append((bytes(b), b.ts_ns.tolist(), b.caplen.tolist(), b.wirelen.tolist(),
                                b.interface, b.link_type, dict(r.comments), r.last_range))
                    pktstream.decode(b)
        except FileFormatError as exc:
            out.append(("error", exc.offset))
    out.append([str(w.message) for w in caught])
    return out


def _packets(outcome: list) -> list[tuple[int, int]]:
    """(time stamp, caplen) of every packet of an :func:`_outcome`, sorted."""
    return sorted((ts, cl) for x in outcome[:-1] if x[0] != "error" for ts, cl in zip(x[1], x[2]))


_PCAPNG: list[bytes] = []


@settings(max_examples=max(40, EXAMPLES // 6), deadline=None, suppress_health_check=list(HealthCheck))
@given(_records, st.sampled_from(["ns", "us", "be", "pcapng"]), st.lists(st.tuples(st.integers(0, 10**6),
       st.integers(0, 255)), max_size=6), st.integers(0, 10**6), st.sampled_from([65535, 40]))
def test_mapped_hostile_files_read_as_read_does(recs, kind, mutations, cut, snaplen):
    """Mutated and cut files through the memory-mapped path: the same batches, errors (with
    offsets) and warnings as the read() path, and no read outside the mapping (sanitizer).
    A snap length of 40 makes records longer than it (cut by both paths)."""
    if kind == "pcapng":
        if not _PCAPNG:
            buf = io.BytesIO()
            with open_writer(buf, format="pcapng") as w:
                body = _pcap_file([(1, 2, 0, 60, bytes(range(60)))] * 30, False, False, 65535, 1)[24:]
                w.write(PacketBatch.from_records(body, link_type=1, interface="a"), {2: "x"})
                w.write(PacketBatch.from_records(body, link_type=113, interface="b"))
            _PCAPNG.append(buf.getvalue())
        data = bytearray(_PCAPNG[0])
    else:
        data = bytearray(_pcap_file(recs * 30, kind == "us", kind == "be", snaplen, 1))
    for at, value in mutations:
        data[at % len(data)] = value
    data = data[:max(24, cut % (len(data) + 1))]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.pcapng" if kind == "pcapng" else "m.pcap")
        with open(path, "wb") as f:
            f.write(data)
        try:
            expected = _outcome(path)
        except FileFormatError:  # not a capture file at all: the same for both
            with pytest.raises(FileFormatError):
                _outcome(path, memory_map=True)
            return
        assert _outcome(path, memory_map=True) == expected
        if kind == "pcapng":  # in file order: the same packets, the same end
            ordered = _outcome(path, file_order=True)
            assert _packets(ordered) == _packets(expected)
            assert [x for x in ordered[:-1] if x[0] == "error"] == [x for x in expected[:-1] if x[0] == "error"]


@settings(max_examples=max(40, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from([1, 101, 113, 147, 231, 276, 0xFFFF, 0x7FFFFFFF]),
       st.sampled_from([0, 1, 100, 65535, 262144, 1 << 27, 0x7FFFFFFF, 0xFFFFFFFF]),
       st.binary(max_size=300), st.booleans())
def test_hostile_pcap_header(linktype, snaplen, body, through_libpcap):
    """Any link type and snaplen in a file header: a clear error or packets, and ring/buffer
    memory bounded by what was read, never by the claimed snaplen."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "h.pcap")
        with open(path, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, snaplen, linktype) + body)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if through_libpcap:
                    with Capture.open_offline(path, block_bytes=4096, ring_blocks=4) as cap:
                        assert cap.ring.reserved_bytes == 0
                        for b in cap:
                            assert cap.ring.reserved_bytes <= 4 * 4096 + len(body)
                            b.release()
                else:
                    for b in pktstream.read(path, batch_bytes=4096):
                        assert b.nbytes <= len(body)
            except (FileFormatError, pktstream.PcapError):
                pass


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                     max_leaves=12)


@FUZZ
@given(st.dictionaries(st.sampled_from(["index", "name", "link_type", "snaplen", "x"]), _json))
def test_interface_descriptor_validation(d):
    try:
        out = check_interface(d)
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
        except (TimeoutError, ConnectionResetError):
            pass
    assert receiver.running


def test_receiver_still_serves_after_fuzzing(receiver):
    from test_security import Peer
    peer = Peer(receiver.address[1])
    assert peer.handshake(None, sensor_id="after-fuzz").type == P.FrameType.WELCOME
    peer.close()
    assert receiver.stats()["sensors"].get("after-fuzz") is not None




@pytest.fixture(scope="module")
def receiver():
    got = []
    rx = Receiver(listen="127.0.0.1:0", outputs=[CallbackSink(lambda s, b: got.append(b))],
                  limits=Limits(handshake_timeout=1.0, connection_rate=(100000, 1.0))).start()
    yield rx
    rx.stop()
    rx.join(10)
    assert not got  # nothing random ever reached an output


def test_zstd_skippable_frames_are_skipped_in_bounded_memory(tmp_path):
    """A skippable frame is skipped as it is read: a 3 MiB one before the data costs no 3 MiB
    buffer, and one that claims 4 GiB in a short file ends the data (no 4 GiB read or buffer)."""
    import tracemalloc

    from archive_data import batches
    from pktstream.formats import open_writer
    plain = tmp_path / "p.pcap"
    with open_writer(plain) as w:
        for b in batches(3, 300, 10**18):
            w.write(b)
    want = [bytes(b[i]) for b in pktstream.read(plain) for i in range(len(b))]
    frame = zstandard.ZstdCompressor().compress(plain.read_bytes())
    skip = struct.pack("<II", 0x184D2A5A, 3 << 20) + os.urandom(3 << 20)
    (tmp_path / "s.pcap.zst").write_bytes(skip + frame)
    (tmp_path / "t.pcap.zst").write_bytes(frame + struct.pack("<II", 0x184D2A50, 0xFFFFFFF0) + b"x" * 10)
    (tmp_path / "f.pcap.zst").write_bytes(frame)
    peaks = {}
    for name in ("f.pcap.zst", "s.pcap.zst", "t.pcap.zst"):
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = [bytes(b[i]) for b in pktstream.read(tmp_path / name) for i in range(len(b))]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got == want, name
        peaks[name] = peak
    # no buffer for the skipped bytes: what reading the frame alone costs, plus < 1 MiB
    assert max(peaks.values()) < peaks["f.pcap.zst"] + (1 << 20), peaks


@FUZZ
@given(st.lists(st.integers(1, 3000), max_size=60), st.sampled_from([None, "udp", "tcp"]),
       st.integers(0, 8), st.integers(2, 4), st.sampled_from([17, 40, 200, 1100, 4000, 65536]),
       st.integers(0, 5), st.randoms(use_true_random=False))
def test_reading_a_file_while_holding_batches_loses_nothing(sizes, bpf, count, ring_blocks, block_bytes, hold,
                                                            rnd):
    """``Capture.open_offline`` with batches held and released in any order (``hold`` kept, a
    random one released on BufferError), packets larger than a block, a BPF filter and a count:
    exactly what pktstream.read gives, in order, nothing in ring_drops (a packet that finds no
    free block waits aside for the next read)."""
    buf = io.BytesIO()
    buf.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for i, size in enumerate(sizes):
        frame = bytearray(max(size, 34))
        frame[12:15] = b"\x08\x00\x45"  # IPv4: every third TCP, the rest UDP
        frame[23] = 6 if i % 3 == 0 else 17
        frame[34:] = bytes([i % 256]) * (len(frame) - 34)
        buf.write(struct.pack("<IIII", 1_700_000_000 + i, i, len(frame), len(frame)) + frame)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.pcap")
        with open(path, "wb") as fh:
            fh.write(buf.getvalue())

        def packets(batch):
            return [(t, bytes(p)) for t, p in zip(batch.ts_ns.tolist(), batch)]
        expected = [p for b in pktstream.read(path, bpf=bpf) for p in packets(b)]
        expected = expected[:count] if count else expected
        got, held = [], []
        with Capture.open_offline(path, bpf=bpf, block_bytes=block_bytes, ring_blocks=ring_blocks,
                                  count=count) as cap:
            while True:
                try:
                    batch = cap.next_batch()
                except BufferError:
                    assert held
                    held.pop(rnd.randrange(len(held))).release()
                    continue
                if batch is None:
                    break
                got += packets(batch)
                held.append(batch)
                while len(held) > hold:
                    held.pop(rnd.randrange(len(held))).release()
            st_ = cap.stats()
        for batch in held:
            batch.release()
    assert got == expected
    assert (st_["packets"], st_["ring_drops"], st_["oversize_drops"]) == (len(got), 0, 0), st_
