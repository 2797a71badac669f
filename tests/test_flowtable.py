"""The archive's Cython flow table (pktstream._flowtable) against a reference built from
``decode_columns`` (the numpy path the index used before it): the same flow keys, counters,
TCP flags and chunk lists for varied and hostile frames on every link type; hypothesis fuzzing
with random and mutated frames (``./run sanitize`` runs this file under ASan + UBSan); bad
record buffers are refused without changing the table.
"""
from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from archive_data import _arp, _eth, _ipv4, _ipv6, _tcp, _udp, batches, frame
from pktstream import PacketBatch
from pktstream._decode import decode_columns
from pktstream._flowtable import KEY_BYTES, FlowTable, address_texts
from pktstream.archive import FileIndexBuilder
from pktstream.archive.index import address_text

EXAMPLES = int(os.environ.get("PKTSTREAM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
LINK_TYPES = (1, 113, 276, 12, 14, 101, 228, 229, 0, 108, 147)
MAPPED = b"\0" * 10 + b"\xff\xff"
KEY = np.dtype([("iface", "=i4"), ("vlan", "=i4"), ("ethertype", "=u2"), ("ipv", "u1"), ("proto", "u1"),
                ("sport", "=u2"), ("dport", "=u2"), ("src", "V16"), ("dst", "V16")])


def reference(adds) -> dict[tuple, list]:
    """Flow records from decode_columns, aggregated in Python: key tuple -> [first_ns,
    last_ns, packets, wire bytes, tcp flags OR, sorted chunks]. ``adds``: (batch, iface,
    chunk). Untagged Ethernet ARP/RARP of >= 42 bytes: protocol addresses as mapped src/dst."""
    out: dict[tuple, list] = {}
    for batch, iface, chunk in adds:
        mem = bytes(batch)
        cols = decode_columns(memoryview(batch), batch.offset, batch.caplen, batch.link_type)
        for i in range(len(batch)):
            src, dst = bytes(cols["src"][i]), bytes(cols["dst"][i])
            et, vlan = int(cols["ethertype"][i]), int(cols["vlan"][i])
            if batch.link_type == 1 and et in (0x0806, 0x8035) and vlan < 0 and batch.caplen[i] >= 42:
                o = int(batch.offset[i]) + 14
                src, dst = MAPPED + mem[o + 14:o + 18], MAPPED + mem[o + 24:o + 28]
            proto = int(cols["proto"][i])
            if cols["ip_version"][i] == 6 and proto == 44:  # (the one documented difference)
                proto = _proto_behind_cut_fragment(mem, int(batch.offset[i]), int(batch.caplen[i]),
                                                   int(cols["l3_offset"][i]))
            key = (iface, vlan, et, int(cols["ip_version"][i]), proto, int(cols["sport"][i]),
                   int(cols["dport"][i]), src, dst)
            ts, wl = int(batch.ts_ns[i]), int(batch.wirelen[i])
            r = out.setdefault(key, [ts, ts, 0, 0, 0, []])
            r[0], r[1] = min(r[0], ts), max(r[1], ts)
            r[2] += 1
            r[3] += wl
            r[4] |= int(cols["tcp_flags"][i])
            if chunk not in r[5]:
                r[5].append(chunk)
    for r in out.values():
        r[5].sort()
    return out


def _proto_behind_cut_fragment(mem: bytes, o: int, L: int, l3: int) -> int:
    """The IPv6 extension walk (as decode_columns), except that a fragment header the snap
    length cut gives its next-header byte once captured (what libpcap's "udp" reads)."""
    nh, l4 = mem[o + l3 + 6], l3 + 40
    for _ in range(8):
        if nh in (0, 43, 60, 135, 51):
            if L < l4 + 8:
                return nh
            hl = (mem[o + l4 + 1] + 2) * 4 if nh == 51 else (mem[o + l4 + 1] + 1) * 8
        elif nh == 44:
            if L < l4 + 8:
                return mem[o + l4] if L > l4 else 44
            hl = 8
        else:
            break
        nh, l4 = mem[o + l4], l4 + hl
    return nh


def table_records(t: FlowTable) -> dict[tuple, list]:
    f = t.flows()
    key = np.frombuffer(f["key"], dtype=KEY)
    cols = {k: np.frombuffer(f[k], dtype=np.int64) for k in ("first_ns", "last_ns", "packets", "bytes")}
    flags = np.frombuffer(f["tcp_flags"], dtype=np.uint16)
    off = np.frombuffer(f["chunk_offsets"], dtype=np.int32)
    vals = np.frombuffer(f["chunk_values"], dtype=np.int32)
    out = {}
    for i, k in enumerate(key):
        t_ = (int(k["iface"]), int(k["vlan"]), int(k["ethertype"]), int(k["ipv"]), int(k["proto"]),
              int(k["sport"]), int(k["dport"]), bytes(k["src"]), bytes(k["dst"]))
        assert t_ not in out, "a flow key twice"
        out[t_] = [int(cols["first_ns"][i]), int(cols["last_ns"][i]), int(cols["packets"][i]),
                   int(cols["bytes"][i]), int(flags[i]), vals[off[i]:off[i + 1]].tolist()]
    return out


def check(adds) -> FlowTable:
    """Add (batch, iface, chunk) triples to a table; its records equal the reference."""
    t = FlowTable()
    for b, iface, chunk in adds:
        n = len(b)
        wire, lo, hi = t.add(b, n, b.link_type, iface, chunk)
        if n:
            assert (wire, lo, hi) == (int(b.wirelen.sum()), int(b.ts_ns.min()), int(b.ts_ns.max()))
        else:
            assert (wire, lo, hi) == (0, 0, 0)
    assert table_records(t) == reference(adds)
    assert t.packets == sum(len(b) for b, _, _ in adds) == sum(r[2] for r in table_records(t).values())
    return t


def batch_of(frames: list[bytes], link_type: int = 1, t0: int = 1_700_000_000 * 10**9, wire_extra: int = 0):
    recs = bytearray()
    for i, data in enumerate(frames):
        ts = t0 + i * 1000 + (i * 7919) % 500  # not monotonic
        recs += struct.pack("<IIII", ts // 10**9, ts % 10**9, len(data), len(data) + wire_extra) + data
    return PacketBatch.from_records(bytes(recs), link_type=link_type)


def hostile_frames() -> list[bytes]:
    """Truncated headers at every layer, bad IHL/version, VLAN stacks (truncated too), IPv6
    extension header chains (fragment, AH, too many, truncated), ARP tagged/short/RARP."""
    tcp4 = _ipv4("10.0.0.1", "10.0.0.2", 6, _tcp(1234, 80, 0x12, b"x" * 20))
    udp6 = _ipv6("2001:db8::1", "2001:db8::2", 17, _udp(53, 5353, b"q" * 10))
    out = [_eth(0x0800, tcp4), _eth(0x86DD, udp6)]
    full = _eth(0x0800, tcp4)
    out += [full[:n] for n in range(0, len(full), 3)]  # every truncation
    out += [_eth(0x0800, bytes([0x40 | ihl]) + tcp4[1:]) for ihl in (0, 4, 5, 6, 15)]  # bad/odd IHL
    out.append(_eth(0x0800, b"\x65" + tcp4[1:]))  # IPv6 version in an IPv4 ethertype
    out.append(_eth(0x0800, tcp4[:6] + b"\x20\x00" + tcp4[8:]))  # first fragment (MF)
    out.append(_eth(0x0800, tcp4[:6] + b"\x00\xb9" + tcp4[8:]))  # non-first fragment: no ports
    tcp_bad_off = _ipv4("10.0.0.1", "10.0.0.2", 6, _tcp(1, 2, 0xFF, b"")[:12] + b"\x31\xff" + b"\0" * 6)
    out.append(_eth(0x0800, tcp_bad_off))  # data offset < 5, NS flag
    tagged = _eth(0x0800, tcp4)
    for tags in ([(0x8100, 10)], [(0x88A8, 100), (0x8100, 200)], [(0x9100, 1), (0x8100, 2), (0x8100, 3)]):
        head = tagged[:12] + b"".join(struct.pack("!HH", tpid, vid | 0xE000) for tpid, vid in tags)
        f = head + tagged[12:]
        out += [f, f[:14], f[:16], f[:18], f[:20], f[:22]]
    # IPv6 extension headers: hop-by-hop, routing, destination options, fragment, AH, chains
    l4 = _udp(4000, 4001, b"d" * 8)

    def v6(chain: list[tuple[int, bytes]], last: int, payload: bytes) -> bytes:
        body, nh = payload, last
        for typ, hdr in reversed(chain):
            body = bytes([nh]) + hdr[1:] + body
            nh = typ
        return _eth(0x86DD, _ipv6("2001:db8::7", "2001:db8::8", nh, body))
    ext8 = b"\0" * 8
    frag0 = b"\0\0\x00\x00\0\0\0\1"
    frag1 = b"\0\0\x05\xa8\0\0\0\1"
    ah = b"\0\x01" + b"\0" * 10  # (1 + 2) * 4 = 12 bytes
    for chain in ([(0, ext8)], [(43, ext8), (60, ext8)], [(44, frag0)], [(44, frag1)], [(51, ah)],
                  [(0, ext8)] * 9, [(60, b"\0\x01" + b"\0" * 14)], [(135, ext8)]):
        f = v6(chain, 17, l4)
        out += [f, f[:54 + 4], f[:54 + 9], f[:-4]]
    out.append(_eth(0x86DD, _ipv6("::1", "::2", 58, b"\x80\x00\0\0\0\0\0\0")))
    out.append(_eth(0x86DD, b"\x40" + udp6[1:]))  # IPv4 version in an IPv6 ethertype
    arp = _eth(0x0806, _arp("192.0.2.1", "192.0.2.2"))
    out += [arp, arp[:41], arp[:42], arp[:30], _eth(0x8035, _arp("192.0.2.3", "192.0.2.4")),
            _eth(0x0806, _arp("192.0.2.5", "192.0.2.6"), vlan=7)]
    out += [_eth(0x0800, _ipv4("10.0.0.3", "10.0.0.4", p, b"\0" * 12)) for p in (1, 17, 132, 136, 47, 0)]
    out += [_eth(0x88CC, b"lldp" * 10), b"", b"\x01"]
    return out


def cooked(frame_: bytes, link_type: int) -> bytes:
    """An Ethernet frame re-framed for another link type (header + network layer)."""
    et, net = frame_[12:14] if len(frame_) >= 14 else b"\x08\x00", frame_[14:]
    version = net[0] >> 4 if net else 0
    if link_type == 113:
        return b"\0\0\0\1\0\6" + b"\2" * 6 + b"\0\0" + et + net
    if link_type == 276:
        return et + b"\0\0" + b"\0\0\0\2" + b"\0\1\0\6" + b"\2" * 8 + net
    if link_type in (0, 108):
        af = 2 if version == 4 else 10 if version == 6 else 99
        return (struct.pack("!I", af) if link_type == 108 else struct.pack("=I", af)) + net
    return net  # raw IP link types


def test_mixed_traffic_and_chunks():
    adds = [(b, k % 3, k // 4) for k, b in enumerate(batches(3, 4000, 10**18, per_batch=97))]
    t = check(adds)
    assert 100 < len(t) < 4000
    assert KEY_BYTES == KEY.itemsize == 48


def test_hostile_frames_on_every_link_type():
    frames = hostile_frames()
    adds = [(batch_of(frames), 0, 0)]
    for k, lt in enumerate(LINK_TYPES[1:]):
        adds.append((batch_of([cooked(f, lt) for f in frames] + frames[:20], link_type=lt), k + 1, k))
    check(adds)


def test_one_flow_many_chunks_and_empty_batches():
    f = _eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1, 2, b"")))
    adds = [(batch_of([f] * 3, t0=10**18 + c * 10**6), 0, c) for c in range(0, 300, 3)]
    adds.insert(5, (PacketBatch.from_records(b"", link_type=1), 0, 12))
    t = check(adds)
    assert len(t) == 1
    assert table_records(t)[next(iter(table_records(t)))][5] == list(range(0, 300, 3))


def test_bad_buffers_leave_the_table_unchanged():
    good = batch_of(hostile_frames())
    t = FlowTable()
    t.add(good, len(good), 1, 0, 1)
    before = table_records(t)
    raw = bytes(good)
    for bad, count in ((raw[:-1], len(good)), (raw, len(good) + 1), (raw[:10], 1),
                       (struct.pack("<IIII", 0, 0, 0xFFFFFFFF, 1) + b"x", 1)):
        with pytest.raises(ValueError):
            t.add(bad, count, 1, 0, 2)
    with pytest.raises(ValueError):
        t.add(raw, len(good), 1, 0, 0)  # chunk numbers never decrease
    with pytest.raises(ValueError):
        t.add(raw, -1, 1, 0, 2)
    assert table_records(t) == before and t.packets == len(good)
    # fewer records than the buffer holds: only those are counted
    assert t.add(raw, 2, 1, 5, 3)[0] == int(good.wirelen[:2].sum())
    assert t.packets == len(good) + 2


def test_a_count_beyond_the_buffer_is_refused_before_anything_is_sized():
    """A record count no buffer of this size can hold: ValueError, before any allocation is
    sized by it (2**61 + 1 records wrapped the record-start array to 8 bytes, and the check loop
    wrote past it: a heap overflow under ASan, a crash later otherwise)."""
    good = batches(4, 40, 1_000_000_000)[0]
    raw = memoryview(good)
    t = FlowTable()
    for count in (2**61 + 1, 2**40, len(raw) // 16 + 1):
        with pytest.raises(ValueError, match="cannot fit"):
            t.add(raw, count, 1, 0, 0)
    assert len(t) == 0 and t.packets == 0
    t.add(raw, len(good), 1, 0, 0)  # the table is fine
    assert t.packets == len(good)


def test_two_threads_get_an_error_never_a_crash():
    """One table used by two threads at once: the second gets RuntimeError (the GIL is released
    while the records of a large batch are checked and inserted). Run in a child process, many times: with the busy
    flag set too late, this crashed the process (freed slots written through)."""
    import subprocess
    import sys
    code = """
import struct, threading
from pktstream._flowtable import FlowTable
empty = struct.pack("<IIII", 1, 0, 0, 0) * 2_000_000
many = b"".join(struct.pack("<IIII", 1, 0, 34, 60) + b"\\0" * 12 + b"\\x08\\x00" + b"E" + b"\\0" * 11
                + struct.pack(">I", i) + b"\\x0a\\0\\0\\1" for i in range(100_000))
outcomes = []
for _ in range(5):
    t = FlowTable()
    def run(buf, n):
        try:
            t.add(buf, n, 1, 0, 0)
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("busy")
    a = threading.Thread(target=run, args=(empty, 2_000_000))
    b = threading.Thread(target=run, args=(many, 100_000))
    a.start(); b.start(); a.join(); b.join()
    assert t.packets in (0, 100_000, 2_000_000, 2_100_000), t.packets
print(" ".join(outcomes))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert set(r.stdout.split()) <= {"ok", "busy"} and len(r.stdout.split()) == 10


def test_growth_and_builder_order():
    """Many distinct flows (the table rehashes several times); the builder gives them in
    (first time, key) order with their chunk lists."""
    rng = random.Random(5)
    frames = [_eth(0x0800, _ipv4(f"10.{rng.randrange(256)}.{rng.randrange(256)}.1", "10.0.0.2", 6,
                                 _tcp(rng.randrange(65536), 443, 0x02, b""))) for _ in range(20000)]
    adds = [(batch_of(frames[i:i + 1000], t0=10**18 + i * 10**6), 0, i // 3000) for i in range(0, 20000, 1000)]
    adds += [(batch_of(frames[:500], t0=2 * 10**18), 0, 9)]
    check(adds)
    b = FileIndexBuilder("s.pcap")
    pos = 24
    for batch, _, _ in adds:
        b.add(batch, pos, pos + batch.nbytes)
        pos += batch.nbytes
    f = b._flows()
    ref = reference([(batch, 0, k) for k, (batch, _, _) in enumerate(adds)])
    order = [(int(t), bytes(k)) for t, k in zip(f["first"], f["key"].view("V48"))]
    assert order == sorted(set(order)) and len(order) == len(ref)
    for i, k in enumerate(f["key"]):
        r = ref[(int(k["iface"]), int(k["vlan"]), int(k["ethertype"]), int(k["ipv"]), int(k["proto"]),
                 int(k["sport"]), int(k["dport"]), bytes(k["src"]), bytes(k["dst"]))]
        got = f["chunk_values"][f["chunk_offsets"][i]:f["chunk_offsets"][i + 1]].tolist()
        assert [int(f["first"][i]), int(f["last"][i]), int(f["packets"][i]), int(f["bytes"][i]),
                int(f["flags"][i]), got] == r


_frames = st.lists(st.binary(max_size=120), max_size=12)
_mutations = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8)


@FUZZ
@given(_frames, st.sampled_from(LINK_TYPES), st.integers(0, 3))
def test_random_frames_agree_with_decode(frames, link_type, chunk):
    check([(batch_of(frames, link_type=link_type), 1, chunk)])


@FUZZ
@given(st.integers(0, 2**32 - 1), st.sampled_from(LINK_TYPES), _mutations, st.integers(0, 200))
def test_mutated_frames_agree_with_decode(seed, link_type, mutations, cut):
    """Well-formed frames of the mix (and hostile ones), re-framed for the link type, then
    bytes changed and cut: whatever the parser makes of them, decode_columns makes too."""
    rng = random.Random(seed)
    pool = hostile_frames()
    frames = []
    for _ in range(6):
        f = bytearray(cooked(frame(rng), link_type) if rng.random() < 0.7 else
                      cooked(rng.choice(pool), link_type) if link_type != 1 else rng.choice(pool))
        for pos, val in mutations:
            if f and rng.random() < 0.5:
                f[pos % len(f)] = val
        frames.append(bytes(f[:len(f) - cut % (len(f) + 1)] if rng.random() < 0.3 else f))
    check([(batch_of(frames, link_type=link_type, wire_extra=cut), 2, 0)])


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 8), st.sampled_from(LINK_TYPES))
def test_random_record_buffers_never_read_outside(buf, count, link_type):
    """Arbitrary bytes as a record buffer: accepted only if the records fit, never a stray
    read (ASan checks that under ./run sanitize)."""
    t = FlowTable()
    try:
        t.add(buf, count, link_type, 0, 0)
    except ValueError:
        assert t.packets == 0 and len(t) == 0
        return
    assert t.packets == count
    assert sum(r[2] for r in table_records(t).values()) == count
    if count:
        assert table_records(t) == reference([(PacketBatch.from_records(buf, link_type=link_type, validate=False,
                                                                         count=count), 0, 0)])


@FUZZ
@given(st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.sampled_from([0, 4, 6, 17]), st.booleans()),
                max_size=40))
def test_address_texts_as_address_text(rows):
    """The C column conversion gives index.address_text's text (None: no text) row by row."""
    addrs = b"".join(MAPPED + a[12:] if mapped else a for a, _, mapped in rows)
    versions = bytes(v for _, v, _ in rows)
    offsets, data, valid, nulls = address_texts(addrs, versions)
    off = np.frombuffer(offsets, dtype=np.int32)
    want = [address_text(addrs[16 * i:16 * i + 16], v) for i, v in enumerate(versions)]
    got = [bytes(data[off[i]:off[i + 1]]).decode() if valid[i // 8] >> (i % 8) & 1 else None
           for i in range(len(rows))]
    assert got == want and nulls == want.count(None) and off[-1] == len(data)
    with pytest.raises(ValueError):
        address_texts(addrs + b"x", versions)


def test_clear_keeps_memory_and_chunk_order():
    """``clear`` forgets the flows (a spill), keeps the allocation (memory stays bounded by the
    largest table), keeps refusing decreasing chunk numbers and keeps counting packets."""
    rng = random.Random(9)
    frames = [_eth(0x0800, _ipv4(f"10.{rng.randrange(256)}.{rng.randrange(256)}.1", "10.0.0.2", 17,
                                 _udp(rng.randrange(65536), 53, b"q"))) for _ in range(3000)]
    t = FlowTable()
    first = batch_of(frames[:1500])
    t.add(first, len(first), 1, 0, 0)
    held, refs, nbytes = len(t), t.refs, t.nbytes
    assert held > 1000 and refs == held and nbytes >= held * 88
    t.clear()
    assert (len(t), t.refs, t.nbytes, t.packets) == (0, 0, nbytes, 1500)
    assert table_records(t) == {}
    with pytest.raises(ValueError, match="chunk -1"):
        t.add(first, len(first), 1, 0, -1)
    second = batch_of(frames[1500:])
    t.add(second, len(second), 1, 0, 0)  # the same chunk number again is allowed
    assert table_records(t) == reference([(second, 0, 0)])
    assert t.nbytes == nbytes and t.packets == 3000


@pytest.mark.parametrize("n", [8191, 8192, 20000])
def test_batches_around_the_gil_release_size_give_the_reference(n):
    """``add`` releases the GIL only for batches of 8192 records or more: both ways, walked and
    with the offset array, the records equal the reference, and a bad offset is refused."""
    rng = random.Random(n)
    frames = hostile_frames() + [frame(rng) for _ in range(n - len(hostile_frames()))]
    b = batch_of(frames)
    assert len(b) == n
    check([(b, 2, 0)])
    given_ = FlowTable()
    assert given_.add(b, n, 1, 2, 0, b.offset) == (int(b.wirelen.sum()), int(b.ts_ns.min()), int(b.ts_ns.max()))
    assert table_records(given_) == reference([(b, 2, 0)])
    off = np.array(b.offset)
    off[-1] = len(bytes(b)) + 1
    t = FlowTable()
    with pytest.raises(ValueError, match=f"record {n - 1} of {n}"):
        t.add(bytes(b), n, 1, 2, 0, np.ascontiguousarray(off, dtype=np.int64))
    assert t.packets == 0 and len(t) == 0


def test_offsets_give_the_same_records_and_are_checked():
    """``add`` with the batch's offset array (no record walk) gives what the walk gives; offsets
    outside the buffer, or whose record runs past it, are refused with the table unchanged."""
    frames = hostile_frames() + [frame(random.Random(k)) for k in range(200)]
    b = batch_of(frames)
    walked, given_ = FlowTable(), FlowTable()
    walked.add(b, len(b), 1, 3, 0)
    given_.add(b, len(b), 1, 3, 0, b.offset)
    assert table_records(given_) == table_records(walked) == reference([(b, 3, 0)])
    before = table_records(given_)
    raw = bytes(b)
    off = np.array(b.offset)
    for bad in (off[:-1], np.concatenate([off[:-1], [len(raw) + 1]]), np.concatenate([[15], off[1:]]),
                np.concatenate([off[:-1], [len(raw) - 1]]), np.concatenate([[-5], off[1:]])):
        with pytest.raises(ValueError):
            given_.add(raw, len(b), 1, 3, 1, np.ascontiguousarray(bad, dtype=np.int64))
    assert table_records(given_) == before and given_.packets == len(b)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(-20, 320), max_size=8), st.sampled_from(LINK_TYPES))
def test_random_offsets_never_read_outside(buf, offsets, link_type):
    """Arbitrary offsets into arbitrary bytes: each record is read only if it fits (ASan)."""
    t = FlowTable()
    off = np.array(offsets, dtype=np.int64)
    try:
        t.add(buf, len(off), link_type, 0, 0, off)
    except ValueError:
        assert t.packets == 0 and len(t) == 0
        return
    assert t.packets == len(off) == sum(r[2] for r in table_records(t).values())


# -- the builder's order, addresses and filter, made in C ----------------------------------------
DAY_NS = 86_400 * 10**9


def _batch_at(frames: list[bytes], times: list[int]) -> PacketBatch:
    recs = bytearray()
    for data, ts in zip(frames, times):
        recs += struct.pack("<IIII", ts // 10**9, ts % 10**9, len(data), len(data)) + data
    return PacketBatch.from_records(bytes(recs), link_type=1)


@pytest.mark.parametrize("per_chunk, hosts, spread", [(300, 30, 5), (4000, 250, 400)])
def test_flows_in_partition_time_and_key_order(per_chunk, hosts, spread):
    """``flows(groups)`` orders records by (group, day from the first day, first time, key
    bytes) -- flows first seen out of time order, across UTC midnights, with equal first times
    -- and keeps each record's counters and chunk list; ``flows()`` stays in first-seen order.
    The large table (more than 8,192 flows) is sorted with the GIL released."""
    rng = random.Random(11)
    t = FlowTable()
    base = 1_700_000_000 * 10**9 // DAY_NS * DAY_NS + DAY_NS - 50 * 10**9  # 50 s before a midnight
    for chunk in range(6):
        frames, times = [], []
        for _ in range(per_chunk):
            frames.append(_eth(0x0800, _ipv4(f"10.0.{rng.randrange(4)}.{rng.randrange(hosts)}", "10.9.0.1", 17,
                                             _udp(rng.randrange(4), 53, b""))))
            # few distinct times (equal first times) on both sides of two midnights, not in order
            times.append(base + rng.randrange(spread) * 20 * 10**9 + rng.choice((0, 1, DAY_NS)))
        t.add(_batch_at(frames, times), len(frames), 1, chunk % 3, chunk)
    seen = t.flows()
    groups = np.array([1, 0, 1], dtype=np.int64)  # ifaces 0 and 2 are one sensor
    got = t.flows(groups)
    key0 = np.frombuffer(seen["key"], dtype=KEY)
    first0 = np.frombuffer(seen["first_ns"], dtype=np.int64)
    day0 = int(first0.min()) // DAY_NS
    assert got["day0"] == day0 and len({int(f) // DAY_NS for f in first0}) == 3
    off0 = np.frombuffer(seen["chunk_offsets"], dtype=np.int32)
    val0 = np.frombuffer(seen["chunk_values"], dtype=np.int32)
    cols0 = {c: np.frombuffer(seen[c], dtype=np.int64) for c in ("last_ns", "packets", "bytes")}
    flags0 = np.frombuffer(seen["tcp_flags"], dtype=np.uint16)

    def record(i):  # one first-seen record, as the reference orders and compares it
        part = int(groups[key0[i]["iface"]]) * 1_000_000 + int(first0[i]) // DAY_NS - day0
        return (part, int(first0[i]), key0[i].tobytes(), int(cols0["last_ns"][i]), int(cols0["packets"][i]),
                int(cols0["bytes"][i]), int(flags0[i]), val0[off0[i]:off0[i + 1]].tolist())

    want = sorted(record(i) for i in range(len(key0)))
    assert [r[:3] for r in want] != [record(i)[:3] for i in range(len(key0))]  # first seen: not in order
    key = np.frombuffer(got["key"], dtype=KEY)
    off = np.frombuffer(got["chunk_offsets"], dtype=np.int32)
    val = np.frombuffer(got["chunk_values"], dtype=np.int32)
    part = np.frombuffer(got["part"], dtype=np.int64)
    cols = {c: np.frombuffer(got[c], dtype=np.int64) for c in ("first_ns", "last_ns", "packets", "bytes")}
    flags = np.frombuffer(got["tcp_flags"], dtype=np.uint16)
    have = [(int(part[i]), int(cols["first_ns"][i]), key[i].tobytes(), int(cols["last_ns"][i]),
             int(cols["packets"][i]), int(cols["bytes"][i]), int(flags[i]), val[off[i]:off[i + 1]].tolist())
            for i in range(len(key))]
    assert have == want and len(set(part.tolist())) == 6
    assert (len(key) > 8192) == (per_chunk > 1000)
    # a table first seen in order (the path without a sort): records as first seen
    s = FlowTable()
    frames = [_eth(0x0800, _ipv4(f"10.1.0.{i}", "10.9.0.1", 17, _udp(i, 53, b""))) for i in range(40)]
    s.add(_batch_at(frames, [base + (i // 2) * 10**9 for i in range(40)]), 40, 1, 0, 0)  # (pairs: equal times)
    plain, grouped = s.flows(), s.flows(np.zeros(1, dtype=np.int64))
    keys = [bytes(k) for k in np.frombuffer(grouped["key"], dtype=KEY).view("V48")]
    firsts = np.frombuffer(grouped["first_ns"], dtype=np.int64).tolist()
    assert list(zip(firsts, keys)) == sorted(zip(firsts, keys)) and len(set(firsts)) == 20
    # (equal first times in key order -- the first-seen order happens to be that here too)
    assert all(bytes(grouped[c]) == bytes(plain[c]) for c in plain if c not in ("first_min", "last_max"))
    # an interface without a group is refused
    for bad in (np.array([0, 0], dtype=np.int64), np.array([0, -1, 0], dtype=np.int64),
                np.array([0, 1 << 20, 0], dtype=np.int64)):
        with pytest.raises(ValueError, match="has no group"):
            t.flows(bad)
    assert len(FlowTable().flows(np.zeros(0, dtype=np.int64))["part"]) == 0


@FUZZ
@given(st.lists(st.tuples(st.sampled_from((0, 4, 6, 5)), st.binary(min_size=16, max_size=16),
                          st.binary(min_size=16, max_size=16), st.booleans()), max_size=20))
def test_key_addresses_and_address_strings_agree_with_python(keys):
    """The addresses a key gives as text (IPv4: version 4, and ARP's IPv4-mapped; IPv6:
    version 6), as numbers and rows; their text is inet_ntop's; the Bloom bits are bloom.py's
    layout."""
    import socket

    from pktstream._flowtable import address_strings, bloom_bits, key_addresses
    from pktstream.archive import bloom
    raw = np.zeros(len(keys), dtype=KEY)
    want4, want6 = [], []
    for i, (ipv, src, dst, mapped) in enumerate(keys):
        if mapped:
            src = MAPPED + src[12:]
        raw[i]["ipv"], raw[i]["src"], raw[i]["dst"] = ipv, src, dst
        for a in (src, dst):
            if ipv == 4 or (ipv == 0 and a[:12] == MAPPED):
                want4.append(int.from_bytes(a[12:], "big"))
            elif ipv == 6:
                want6.append(a)
    four, six = key_addresses(raw.view(np.uint8).reshape(-1))
    assert np.frombuffer(four, dtype=np.uint32).tolist() == want4
    assert [bytes(six[i:i + 16]) for i in range(0, len(six), 16)] == want6
    rows = [MAPPED + w.to_bytes(4, "big") for w in want4] + want6
    versions = [4] * len(want4) + [6] * len(want6) + [0, 5]
    rows += [b"\1" * 16, MAPPED + b"\1\2\3\4"]  # version 0 not mapped, unknown version 5: no text
    texts = address_strings(b"".join(rows), bytes(versions))
    assert texts == ([socket.inet_ntop(socket.AF_INET, r[12:]) for r in rows[:len(want4)]]
                     + [socket.inet_ntop(socket.AF_INET6, r) for r in want6] + [None, None])
    with pytest.raises(ValueError):
        address_strings(b"\0" * 15, b"\4")
    with pytest.raises(ValueError):
        key_addresses(b"\0" * (KEY_BYTES + 1))
    # the hashes and the filter's bits: the numpy form of the documented layout
    arr = np.frombuffer(b"".join(rows), np.uint8).reshape(-1, 16)
    words = arr.view("<u8").astype(np.uint64)

    def fmix64(x):
        for m in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
            x = (x ^ (x >> np.uint64(33))) * np.uint64(m)
        return x ^ (x >> np.uint64(33))

    with np.errstate(over="ignore"):
        want_h = fmix64(fmix64(words[:, 0] ^ np.uint64(bloom.SEED)) ^ words[:, 1])
    assert bloom.address_hashes(arr).tolist() == want_h.tolist()
    h = np.unique(want_h)
    nbytes = max(8, -(-len(h) * bloom.BITS_PER_ADDRESS // 8))
    bits = np.zeros(nbytes * 8, dtype=bool)
    h1, h2 = h & np.uint64(0xFFFFFFFF), (h >> np.uint64(32)) | np.uint64(1)
    for i in range(bloom.HASHES):
        bits[((h1 + np.uint64(i) * h2) % np.uint64(nbytes * 8)).astype(np.int64)] = True
    assert bytes(bloom_bits(h, nbytes, bloom.HASHES)) == np.packbits(bits, bitorder="little").tobytes()
    assert bloom.filter_of_hashes(h)[2:] == np.packbits(bits, bitorder="little").tobytes()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from((0, 4, 6)), st.sampled_from((0x0800, 0x86DD, 0x0806, 0x8035, 0x88CC, 0)),
                          st.sampled_from((1, 113, 12)), st.booleans(), st.booleans(),
                          st.integers(0, 65535), st.integers(0, 65535)), max_size=12))
def test_key_summary_agrees_with_summary_completeness(keys):
    """key_summary's ports and (broken IP, unaddressed ARP) give what summary_completeness and
    the numpy port marking give for the same keys."""
    from pktstream._flowtable import key_summary
    from pktstream.archive.index import summary_completeness
    raw = np.zeros(len(keys), dtype=KEY)
    links = np.array([k[2] for k in keys], dtype=np.int32)
    for i, (ipv, et, _link, src_mapped, dst_mapped, sport, dport) in enumerate(keys):
        raw[i]["ipv"], raw[i]["ethertype"], raw[i]["sport"], raw[i]["dport"] = ipv, et, sport, dport
        raw[i]["src"] = (MAPPED if src_mapped else b"\x01" * 12) + b"\x07" * 4
        raw[i]["dst"] = (MAPPED if dst_mapped else b"\x01" * 12) + b"\x08" * 4
    seen = np.zeros(65536, dtype=bool)
    broken, unaddressed = key_summary(raw.view(np.uint8).reshape(-1), links, seen.view(np.uint8))
    ipv = raw["ipv"]
    addressed = np.array([k[3] and k[4] for k in keys], dtype=bool)
    ok_addr, ok_ports = summary_completeness(ipv, raw["ethertype"], links, addressed)
    assert (not broken and not unaddressed, not broken) == (ok_addr, ok_ports)
    want = np.zeros(65536, dtype=bool)
    want[raw["sport"][ipv > 0]] = True
    want[raw["dport"][ipv > 0]] = True
    assert np.array_equal(seen, want)
    with pytest.raises(ValueError):
        key_summary(raw.view(np.uint8).reshape(-1), links[:-1] if len(keys) else np.zeros(1, np.int32),
                    seen.view(np.uint8))
    with pytest.raises(ValueError):
        key_summary(b"", np.zeros(0, np.int32), bytearray(100))


def test_address_texts_with_and_without_the_gil():
    """address_texts gives the same text below and above the size at which it releases the GIL
    (8,192 rows), and address_strings the same as a list."""
    import pyarrow as pa

    from pktstream._flowtable import address_strings
    rng = np.random.default_rng(3)
    for n in (8191, 8192, 9000):
        rows = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        versions = rng.choice(np.array([0, 4, 6, 9], dtype=np.uint8), n)
        rows[np.flatnonzero(versions == 0)[::2], :12] = np.frombuffer(MAPPED, np.uint8)  # ARP's: text
        offsets, data, valid, nulls = address_texts(rows.reshape(-1), versions)
        got = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data), pa.py_buffer(valid),
                                          nulls).to_pylist()
        assert got == address_strings(rows.reshape(-1), versions)
        assert got == [address_text(bytes(r), int(v)) for r, v in zip(rows, versions)]
        assert sum(t is not None for t, v in zip(got, versions) if v == 0) > n // 20


@FUZZ
@given(st.binary(max_size=KEY_BYTES * 6).map(lambda b: b[:len(b) // KEY_BYTES * KEY_BYTES]),
       st.lists(st.integers(0, 2**64 - 1), max_size=40), st.text(max_size=5), st.integers(0, 50))
def test_key_columns_distinct_and_repeat_agree_with_numpy(keys, words, text, n):
    """The small C helpers of FileIndexBuilder against their numpy forms: key_columns (the
    structured fields), distinct_sorted (np.unique of uint32 and uint64), mapped_rows and
    repeat_offsets; bad sizes are refused."""
    import pyarrow as pa

    from pktstream._flowtable import distinct_sorted, key_columns, mapped_rows, repeat_offsets
    from pktstream.archive.index import repeated_strings
    ref = np.frombuffer(keys, dtype=KEY)
    cols = key_columns(keys)
    for name in ("iface", "vlan", "ethertype", "ipv", "proto", "sport", "dport"):
        assert np.frombuffer(cols[name], dtype=ref.dtype[name]).tolist() == ref[name].tolist(), name
    for name in ("src", "dst"):
        assert bytes(cols[name]) == b"".join(bytes(v) for v in ref[name]), name
    with pytest.raises(ValueError):
        key_columns(keys + b"\0")
    for dtype in (np.uint64, np.uint32):
        a = np.array(words, dtype=np.uint64).astype(dtype)
        got = np.frombuffer(distinct_sorted(a.view(np.uint8), a.dtype.itemsize), dtype=dtype)
        assert got.tolist() == np.unique(a).tolist()
    with pytest.raises(ValueError):
        distinct_sorted(b"\0" * 8, 2)
    with pytest.raises(ValueError):
        distinct_sorted(b"\0" * 7, 4)
    quads = np.array(words, dtype=np.uint64).astype(np.uint32)
    assert bytes(mapped_rows(quads)) == b"".join(MAPPED + int(q).to_bytes(4, "big") for q in quads)
    data = text.encode()
    assert np.frombuffer(repeat_offsets(n, len(data)), dtype=np.int32).tolist() == [i * len(data) for i in range(n + 1)]
    assert repeated_strings(text, n).equals(pa.array([text] * n, pa.string()))
    for n_bad, len_bad in ((2**20, 2**12), (2**62 - 1, 0), (2**62, 4), (-1, 1), (1, -1)):
        with pytest.raises(ValueError):
            repeat_offsets(n_bad, len_bad)


def test_distinct_sorted_radix_agrees_with_numpy_on_large_and_skewed_input():
    """distinct_sorted sorts a byte at a time (a byte all values share is skipped): random,
    few distinct, sorted, reversed, constant and top-bit-only values, at sizes around a file's
    address count and past the GIL threshold, equal np.unique's."""
    from pktstream._flowtable import distinct_sorted
    rng = np.random.default_rng(7)
    for dtype in (np.uint32, np.uint64):
        top = np.iinfo(dtype).max
        for n in (1, 2, 3, 255, 256, 257, 2_700, 9_000):
            cases = {
                "random": rng.integers(0, top, n, dtype=dtype, endpoint=True),
                "few": rng.integers(0, 40, n).astype(dtype),
                "sorted": np.sort(rng.integers(0, 2**31, n)).astype(dtype),
                "reversed": np.sort(rng.integers(0, 2**31, n))[::-1].astype(dtype),
                "constant": np.full(n, 7, dtype),
                "top bits": (rng.integers(0, 4, n).astype(dtype) << (8 * np.dtype(dtype).itemsize - 2)),
            }
            for kind, a in cases.items():
                a = np.ascontiguousarray(a)
                got = np.frombuffer(distinct_sorted(a.view(np.uint8), a.dtype.itemsize), dtype=dtype)
                assert got.tolist() == np.unique(a).tolist(), (dtype, n, kind)


def test_unaligned_and_bad_arguments_are_refused_or_read_safely():
    """Byte buffers at any offset are read through copies (same results); typed buffers that
    are not aligned for their items, and bad Bloom sizes, are refused with ValueError."""
    from pktstream._flowtable import bloom_bits, key_addresses, key_columns, key_summary, mapped_rows
    raw = np.zeros(3, dtype=KEY)
    raw["ipv"], raw["iface"], raw["sport"] = 4, [1, 2, 3], [80, 443, 53]
    raw["src"] = [MAPPED + bytes([10, 0, 0, i]) for i in range(3)]
    good = raw.tobytes()
    odd = memoryview(b"\0" + good)[1:]
    assert {k: bytes(v) for k, v in key_columns(odd).items()} == {k: bytes(v) for k, v in key_columns(good).items()}
    assert [bytes(x) for x in key_addresses(odd)] == [bytes(x) for x in key_addresses(good)]
    links = np.ones(3, dtype=np.int32)
    seen_a, seen_b = bytearray(65536), bytearray(65536)
    assert key_summary(odd, links, seen_a) == key_summary(good, links, seen_b) and seen_a == seen_b
    words = np.frombuffer(b"\0" + np.arange(4, dtype=np.uint64).tobytes(), dtype=np.uint64, offset=1, count=3)
    with pytest.raises(ValueError, match="not aligned"):
        bloom_bits(words, 8, 7)
    with pytest.raises(ValueError, match="not aligned"):
        mapped_rows(np.frombuffer(b"\0" + bytes(8), dtype=np.uint32, offset=1, count=2))
    with pytest.raises(ValueError, match="not aligned"):
        key_summary(good, np.frombuffer(b"\0" + bytes(12), dtype=np.int32, offset=1, count=3), seen_a)
    with pytest.raises(ValueError, match="not aligned"):
        FlowTable().flows(np.frombuffer(b"\0" + bytes(8), dtype=np.int64, offset=1, count=1))
    batch = batch_of([_eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1, 2, b"")))])
    with pytest.raises(ValueError, match="not aligned"):
        FlowTable().add(batch, 1, 1, 0, 0, np.frombuffer(b"\0" + bytes(8), dtype=np.int64, offset=1, count=1))
    for nbytes, k in ((0, 7), (8, 65), (8, -1)):
        with pytest.raises(ValueError):
            bloom_bits(np.zeros(1, dtype=np.uint64), nbytes, k)


def test_a_refused_batch_leaves_the_summaries_as_its_records_do():
    """The summaries' completeness counts the link types of interfaces that have records: a
    batch the flow table refused (no records) on an interface of a link type the index does
    not decode leaves the address summary complete; one with records makes it unknown."""
    class Refusing:  # (the flow table, refusing batches of link type 147 as a damaged one would be)
        def __init__(self, table):
            self.table = table

        def add(self, records, count, link_type, *args):
            if link_type == 147:
                raise ValueError("record 0 of 1 at byte 0 runs past the 0-byte buffer")
            return self.table.add(records, count, link_type, *args)

        def __getattr__(self, name):
            return getattr(self.table, name)

        def __len__(self):
            return len(self.table)

    eth = batch_of([_eth(0x0800, _ipv4("10.0.0.1", "10.0.0.2", 17, _udp(1, 2, b"")))])
    other = batch_of([b"\x01" * 40], link_type=147)
    rows = []
    for refuse in (True, False):
        b = FileIndexBuilder("s.pcapng")
        if refuse:
            b._table = Refusing(b._table)
        b.add(eth, 0, 100, interface="eth0")
        try:
            b.add(other, 100, 200, interface="usb0")
        except ValueError:
            assert refuse
        rows.append(b.finish(size=1, version="1", format="pcapng", compression=None)[0])
    assert rows[0]["addresses"] == ["10.0.0.1", "10.0.0.2"] and rows[0]["ports"] == [1, 2]
    assert rows[1]["addresses"] is None and rows[1]["ports"] is None
