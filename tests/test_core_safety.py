"""Memory safety of the Cython core (issue #12): foreign buffers that change after they were
wrapped, wrong counts, files truncated while they are read, hostile file headers, hostile
lengths given to the record codecs, batches in cyclic garbage, and allocation counters that
balance. No root needed: everything here is offline.

Each test fails on the code before the fix (some by crashing, which is why the truncation
and hostile-header cases run in a child process)."""
from __future__ import annotations

import gc
import io
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import pktstream
from pktstream import Capture, FileFormatError, PacketBatch
from pktstream._decode import decode_columns
from pktstream._records import (
    gather_records,
    merge_heads,
    pcapng_walk,
    records_to_epb,
    records_to_epb_ids,
    take_mask,
    take_records,
)
from pktstream.formats import open_reader

NS_HEADER = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)


def _records(n: int, size: int = 30, fill: int = 0) -> bytes:
    return b"".join(struct.pack("<IIII", 1_700_000_000 + i, i, size, size) + bytes([fill]) * size
                    for i in range(n))


def _run_child(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a SIGBUS or an OOM there fails the test, not pytest)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    if env.get("PKTSTREAM_ASAN_PRELOAD"):  # ./run sanitize: the child needs the ASan runtime too
        env["LD_PRELOAD"] = env["PKTSTREAM_ASAN_PRELOAD"]
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)


# -- foreign buffers ------------------------------------------------------------------------

def test_mutated_bytearray_is_bounds_checked():
    """The issue's case: wrap a bytearray, change one caplen, read the index."""
    buf = bytearray(_records(3))
    batch = PacketBatch.from_records(buf, link_type=1)
    assert len(batch) == 3
    struct.pack_into("<I", buf, 46 + 8, 100_000)  # caplen of record 1: far past the 138 bytes
    with pytest.raises(FileFormatError, match="runs past the end of the 138-byte buffer"):
        batch.offset
    with pytest.raises(FileFormatError):
        list(batch)
    batch.release()
    buf.append(0)  # the exporter is unlocked again


def test_validate_false_with_a_wrong_count_is_bounds_checked():
    data = _records(3)
    batch = PacketBatch.from_records(data, link_type=1, validate=False, count=10)
    with pytest.raises(FileFormatError, match="record 3 of 10"):
        batch.ts_ns
    batch.release()


def test_filter_uses_the_checked_lengths_not_the_buffer():
    """Lengths given to libpcap's filter come from the index built (and checked) once; a caplen
    changed afterwards must not let the filter read past the packet (here: into the next record)."""
    buf = bytearray(_records(1, 30, 0x00) + _records(1, 30, 0xAB))
    batch = PacketBatch.from_records(buf, link_type=1)
    assert batch.filter("ether[50] = 0xab").tolist() == [False, False]
    struct.pack_into("<I", buf, 8, 60)  # record 0 now claims the next record's bytes
    assert batch.filter("ether[50] = 0xab").tolist() == [False, False]
    batch.release()


# -- files truncated while read --------------------------------------------------------------

def test_file_truncated_while_reading_no_sigbus(tmp_path):
    """A LE-ns pcap (formerly memory-mapped) cut short after the first batch was delivered: the
    batches already held stay readable and reading ends with a truncation warning, not SIGBUS."""
    path = tmp_path / "shrinking.pcap"
    path.write_bytes(NS_HEADER + _records(4000, 200, 0x5A))
    r = _run_child(f"""
        import os, warnings, pktstream
        from pktstream.formats import open_reader
        path = {str(path)!r}
        held, n = [], 0
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with open_reader(path, batch_bytes=64 * 1024) as rd:
                for i, b in enumerate(rd):
                    held.append(b)
                    if i == 0:
                        os.truncate(path, 24 + 216 * 700 + 5)  # and mid-record
        total = sum(len(b) for b in held)
        # every byte of every batch delivered is still there
        assert all(bytes(p) == b"\x5a" * 200 for b in held for p in b)
        print(total, len(w))
    """, tmp_path)
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    total, nwarn = map(int, r.stdout.split())
    assert 300 <= total <= 700 and nwarn == 1


def test_file_truncated_to_the_header_before_reading(tmp_path):
    path = tmp_path / "cut.pcap"
    path.write_bytes(NS_HEADER + _records(100))
    with open_reader(path) as rd:
        os.truncate(path, 24)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert list(rd) == []


# -- hostile headers -------------------------------------------------------------------------

def test_hostile_snaplen_does_not_size_the_ring(tmp_path):
    """A 24-byte D-Bus pcap header (libpcap allows 128 MiB packets for it) must not reserve
    snaplen-sized ring blocks: memory follows what is read."""
    path = tmp_path / "dbus.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 0xFFFFFFFF, 231))
    r = _run_child(f"""
        import pktstream
        def vm():  # address space reserved (malloc+memset of zeros is calloc: RSS may not grow)
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmSize:"))
        before = vm()
        cap = pktstream.Capture.open_offline({str(path)!r})
        grown = vm() - before
        assert cap.snaplen >= 1 << 20, cap.snaplen  # what the header claims
        assert cap.next_batch() is None
        cap.close()
        print(grown)
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) < 64 * 1024, f"opening a 24-byte file reserved {int(r.stdout)} KiB"


def test_lazy_ring_grows_for_a_packet_actually_read(tmp_path):
    """Offline rings allocate blocks as packets arrive; a packet larger than a block gets a
    block of its size, and the block shrinks back when it is reused."""
    path = tmp_path / "jumbo.pcap"
    big = struct.pack("<IIII", 1, 0, 9000, 9000) + bytes(range(256)) * 35 + bytes(40)
    path.write_bytes(NS_HEADER + _records(5, 100) + big + _records(300, 100))
    cap = Capture.open_offline(path, block_bytes=4096, ring_blocks=4)
    assert cap.ring.reserved_bytes == 0
    sizes = []
    for batch in cap:
        sizes.extend(batch.caplen.tolist())
        if 9000 in batch.caplen.tolist():
            assert bytes(batch[batch.caplen.tolist().index(9000)]) == big[16:]
        assert cap.ring.reserved_bytes <= 3 * 4096 + 9016
        batch.release()
    cap.close()
    assert sizes == [100] * 5 + [9000] + [100] * 300


# -- hostile lengths in the record codecs -----------------------------------------------------

def test_records_to_epb_caplen_overflow():
    rec = struct.pack("<IIII", 1, 0, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(16)
    with pytest.raises(ValueError, match="runs past the end"):
        records_to_epb(rec, len(rec), 0)
    ok = _records(2, 13)
    out = records_to_epb(ok, len(ok), 0)
    assert len(out) == 2 * (32 + 16) and struct.unpack_from("<I", out, 4)[0] == 48


def test_records_to_epb_ids_needs_one_id_per_record():
    """Per-record interfaces (interleaved pcapng): an id array shorter or longer than the
    records is refused before anything is read past it; a record past the buffer as above."""
    ok = _records(3, 13)
    out = records_to_epb_ids(ok, len(ok), np.array([4, 0, 9], dtype=np.uint32))
    assert [struct.unpack_from("<I", out, 48 * k + 8)[0] for k in range(3)] == [4, 0, 9]
    for ids in ([1, 2], [1, 2, 3, 4], []):
        with pytest.raises(ValueError, match="interface ids for"):
            records_to_epb_ids(ok, len(ok), np.array(ids, dtype=np.uint32))
    with pytest.raises(ValueError, match="interface ids for 0 records"):
        records_to_epb_ids(b"", 0, np.array([1], dtype=np.uint32))
    bad = struct.pack("<IIII", 1, 0, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(16)
    with pytest.raises(ValueError, match="runs past the end"):
        records_to_epb_ids(bad, len(bad), np.zeros(1, dtype=np.uint32))


def test_records_to_epb_offsets_need_room_and_alignment():
    """The offsets a conversion writes (one per record): into an array with room for fewer
    records nothing is written past its end, and its first entry says -1 (no usable offsets;
    the conversion is done all the same); a misaligned int64 view is refused before anything
    is written."""
    ok = _records(3, 13)
    whole = records_to_epb(ok, len(ok), 0)
    for conv in (lambda o: records_to_epb(ok, len(ok), 0, o),
                 lambda o: records_to_epb_ids(ok, len(ok), np.zeros(3, dtype=np.uint32), o)):
        room = np.full(4, -5, dtype=np.int64)
        assert len(conv(room[:2])) == len(whole)
        assert room.tolist() == [-1, 45, -5, -5]
        with pytest.raises(ValueError, match="not aligned"):
            conv(np.zeros(33, dtype=np.uint8)[1:].view(np.int64))
        conv(room[:3])
        assert room.tolist() == [16, 45, 74, -5]
    assert len(records_to_epb(b"", 0, 0, np.zeros(0, dtype=np.int64))) == 0


def test_merge_heads_and_gather_records_check_every_position_and_length():
    """The merge's C steps: a position outside its input, an index that is not one of the
    source's packets, an offset or caplen outside its buffer, arrays of different lengths --
    ValueError before anything is read or copied."""
    ts = np.arange(4, dtype=np.int64)
    for bad in ([5, 0], [-1, 0]):
        with pytest.raises(ValueError, match="outside its 4 packets"):
            merge_heads([ts, ts], np.array(bad, dtype=np.int64))
    with pytest.raises(ValueError, match="one position per input"):
        merge_heads([ts], np.zeros(2, dtype=np.int64))
    rec = _records(2, 13)  # offsets 16 and 45
    offs, caps = np.array([16, 45], dtype=np.int64), np.array([13, 13], dtype=np.uint32)
    out, n = gather_records([rec], [offs], [caps], np.array([0, 0], np.int32), np.array([1, 0], np.int64))
    assert n == 2 and bytes(out) == rec[29:] + rec[:29]
    cases = [
        ([offs], [caps], [1], [0], "source 1, index 0 is not one of"),
        ([offs], [caps], [0], [2], "source 0, index 2 is not one of"),
        ([offs], [caps], [0], [-1], "index -1 is not one of"),
        ([np.array([8], np.int64)], [np.array([13], np.uint32)], [0], [0], "outside its buffer"),
        ([np.array([50], np.int64)], [np.array([13], np.uint32)], [0], [0], "outside its buffer"),
        ([np.array([16], np.int64)], [np.array([0xFFFFFFFF], np.uint32)], [0], [0], "outside its buffer"),
        ([offs], [caps[:1]], [0], [0], "differ in length"),
    ]
    for o, c, which, index, msg in cases:
        with pytest.raises(ValueError, match=msg):
            gather_records([rec], o, c, np.array(which, np.int32), np.array(index, np.int64))
    with pytest.raises(ValueError, match="which and index differ"):
        gather_records([rec], [offs], [caps], np.zeros(2, np.int32), np.zeros(1, np.int64))


def test_take_records_and_take_mask_check_bounds():
    rec = _records(2) + struct.pack("<IIII", 1, 0, 1 << 20, 1 << 20) + bytes(4)
    keys = np.zeros(3, dtype=np.int32)
    with pytest.raises(ValueError, match="runs past"):
        take_records(rec, len(rec), keys, 0)
    with pytest.raises(ValueError, match="beyond the buffer"):
        take_records(rec, len(rec) + 100, keys, 0)
    good = _records(2)
    with pytest.raises(ValueError, match="outside the buffer"):
        take_mask(good, np.array([16, 10_000], dtype=np.int64), np.array([30, 30], dtype=np.uint32),
                  np.ones(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in length"):
        take_mask(good, np.array([16, 62], dtype=np.int64), np.array([30, 30], dtype=np.uint32),
                  np.ones(1, dtype=np.uint8))


def test_decode_columns_checks_every_offset():
    buf = _records(3)
    off = np.array([16, 10_000, 108], dtype=np.int64)  # only the middle one is wrong
    with pytest.raises(ValueError, match="packet 1"):
        decode_columns(buf, off, np.array([30, 30, 30], dtype=np.uint32), 1)


def test_pcapng_walk_checks_output_positions():
    one = np.ones(1, dtype=np.uint64)
    args = (one, np.zeros(1, dtype=np.uint64), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.uint32),
            1 << 20, bytearray(64))
    with pytest.raises(ValueError, match="output position"):
        pcapng_walk(bytes(64), 0, 64, False, *args, -32, np.zeros(4, dtype=np.int32), 0, False)


def test_capture_rejects_overflowing_settings():
    with pytest.raises(ValueError, match="buffer_bytes"):
        Capture("pktstream-no-such-device", buffer_bytes=2**31)
    with pytest.raises(ValueError, match="count"):
        Capture("pktstream-no-such-device", count=-1)
    with pytest.raises(ValueError, match="max_wait"):
        Capture("pktstream-no-such-device", max_wait=float("nan"))


# -- lifetimes -------------------------------------------------------------------------------

class _Node:
    pass


def test_batch_in_cyclic_garbage_returns_its_block(mixed_pcap):
    cap = Capture.open_offline(mixed_pcap, ring_blocks=4)
    free = cap.ring.free_blocks
    batch = cap.next_batch()
    assert cap.ring.free_blocks == free - 1
    gc.collect()
    gc.disable()
    try:
        node = _Node()
        node.self = node
        node.batch = batch
        del node, batch
        gc.collect()
    finally:
        gc.enable()
    assert cap.ring.free_blocks == free
    cap.close()


def test_a_batch_of_a_memoryview_in_cyclic_garbage_never_crashes_the_collector(tmp_path):
    """A batch wrapping a memoryview (``from_records(memoryview(b)[i:j])``, as the writers
    slice batches) in cyclic garbage together with that memoryview -- e.g. a traceback's frames
    holding both after a write error: the collector could clear the memoryview first (CPython
    drops its managed buffer even while exported) and the batch's release then crashed the
    interpreter (SIGSEGV). Found by the receiver's error-path tests."""
    r = _run_child("""
        import gc, struct
        from pktstream import PacketBatch
        data = bytes(98)
        recs = b"".join(struct.pack("<IIII", 1, k, len(data), len(data)) + data for k in range(4))
        b = PacketBatch.from_records(recs, link_type=1)
        for i in range(200):
            mv = memoryview(b)[0:114]
            sub = PacketBatch.from_records(mv, link_type=1)
            cycle = {"mv": mv, "sub": sub}
            cycle["self"] = cycle
            del mv, sub, cycle
        gc.collect()
        assert len(b) == 4 and bytes(b) == recs
        print("collected")
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "collected", (r.returncode, r.stderr[-2000:])


def test_alloc_counters_balance(mixed_pcap):
    from pktstream._capture import alloc_counters
    gc.collect()
    before = alloc_counters()
    cap = Capture.open_offline(mixed_pcap, block_bytes=8192, ring_blocks=3)
    n = 0
    for batch in cap:
        n += len(batch)
        keep = batch.copy()
        batch.release()
    cap.close()
    batches = list(pktstream.read(mixed_pcap, batch_bytes=8192))
    during = alloc_counters()
    assert n == sum(map(len, batches)) == 2000
    assert during["ring_blocks_allocated"] > before["ring_blocks_allocated"]
    assert during["buffers_acquired"] - before["buffers_acquired"] >= len(batches)
    del cap, batch, keep, batches
    gc.collect()
    after = alloc_counters()
    for what in ("ring_blocks", "buffers", "captures"):
        a, f = ("allocated", "freed") if what == "ring_blocks" else (
            ("acquired", "released") if what == "buffers" else ("opened", "freed"))
        grown = after[f"{what}_{a}"] - before[f"{what}_{a}"]
        freed = after[f"{what}_{f}"] - before[f"{what}_{f}"]
        assert grown == freed and grown > 0, (what, grown, freed)


# -- arguments changed by another thread while the GIL is released (a cold review's findings) ---------
# Each child starts a thread that changes the caller's arrays (or releases the batch) as soon as
# the call releases the GIL; before the fixes each crashed (segfault, SIGFPE) in most runs. Now
# every call either completes or raises the one-line error, and the child exits normally.
_RACES = {
    "take_mask": """
        n = 600_000
        src = bytes(64 * n)
        offs = np.arange(n, dtype=np.int64) * 64 + 16
        cap = np.full(n, 48, np.uint32)
        mask = np.zeros(n, np.uint8); mask[:n // 2] = 1  # the output is sized for half
        def evil(): go.wait(); mask[:] = 1
        call = lambda: take_mask(src, offs, cap, mask)
        errors = (ValueError,)
    """,
    "decode_columns": """
        n = 1_000_000
        buf = bytes(64 * 16)
        offs = np.zeros(n, np.int64); cap = np.full(n, 60, np.uint32)
        def evil(): go.wait(); offs[n // 2:] = 1 << 40
        call = lambda: decode_columns(buf, offs, cap, 1)
        errors = (ValueError,)
    """,
    "pcapng_walk": """
        n = 300_000
        epb = struct.pack("<IIIIIIII", 6, 32, 0, 0, 1000, 0, 0, 32)
        src = epb * n
        ups = np.array([3], np.uint64); mult = np.zeros(1, np.uint64)
        offs = np.zeros(1, np.int64); snaps = np.zeros(1, np.uint32)
        dst = bytearray(len(src)); ifaces = np.empty(n + 1, np.int32)
        def evil(): go.wait(); ups[0] = 0
        call = lambda: pcapng_walk(src, 0, len(src), False, ups, mult, offs, snaps, 1 << 24, dst, 0, ifaces, 0, False)
        errors = ()
    """,
    "filter_release": """
        pkt = bytes(12) + b"\\x08\\x00" + bytes([0x45]) + bytes(8) + b"\\x06" + bytes(10) + bytes(20)
        n = 500_000
        ba = bytearray((struct.pack("<IIII", 1, 0, len(pkt), len(pkt)) + pkt) * n)
        b = PacketBatch.from_records(ba, link_type=1)
        b.ts_ns
        def evil():
            go.wait()
            try:
                b.release()
                del ba[:]
            except BufferError:
                pass  # the filter holds the storage: release() refuses while it runs
        call = lambda: b.filter("tcp")
        errors = (ValueError,)
    """,
}


@pytest.mark.parametrize("name", sorted(_RACES))
def test_arguments_changed_by_another_thread_during_a_call(tmp_path, name):
    head = """
        import struct, sys, threading
        import numpy as np
        from pktstream import PacketBatch
        from pktstream._decode import decode_columns
        from pktstream._records import pcapng_walk, take_mask
        sys.setswitchinterval(1e-4)
        go = threading.Event()
    """
    tail = """
        t = threading.Thread(target=evil)
        t.start()
        go.set()
        try:
            call()
        except errors as exc:
            print("error:", exc)
        t.join()
        print("exited normally")
    """
    r = _run_child("".join(textwrap.dedent(c) for c in (head, _RACES[name], tail)), tmp_path)
    assert r.returncode == 0 and "exited normally" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_pcap_timestamp_fractions_out_of_range_are_an_error_not_a_wrapped_time():
    """A µs fraction of 4294968 once wrapped (x1000 in 32 bits) into a silently wrong time; a
    ns fraction >= 1e9 went through the reader (a receiver then rejected the batch)."""
    pkt = bytes(20)
    for magic, frac, unit in ((0xA1B2C3D4, 4294968, "µs"), (0xA1B2C3D4, 1_000_000, "µs"),
                              (0xA1B23C4D, 3_000_000_000, "ns")):
        data = struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 100, frac, 20, 20) + pkt
        with pytest.raises(FileFormatError, match=f"timestamp fraction {frac} {unit} out of range"):
            list(pktstream.read(io.BytesIO(data)))
    ok = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 100, 999_999, 20, 20) + pkt
    assert [t for b in pktstream.read(io.BytesIO(ok)) for t in b.ts_ns.tolist()] == [100_999_999_000]


def test_pcapng_timestamps_of_any_resolution_wrap_like_the_32_bit_seconds_field():
    """if_tsresol 0 (seconds) with a 64-bit timestamp past 2**32 s: seconds mod 2**32, like
    the classic format's field (the ns product used to wrap at 64 bits instead)."""
    def blk(t: int, body: bytes) -> bytes:
        n = 12 + len(body)
        return struct.pack("<II", t, n) + body + struct.pack("<I", n)
    shb = blk(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    for resol, ts, want in ((0, (1 << 36) + 5, 5 * 10**9), (6, 1_700_000_000_123_456, 1_700_000_000_123_456_000),
                            (0x80 | 10, 3 * 1024 + 512, 3_500_000_000)):
        idb = blk(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HHB3x", 9, 1, resol) + struct.pack("<HH", 0, 0))
        epb = blk(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, 60, 60) + bytes(60))
        assert [t for b in pktstream.read(io.BytesIO(shb + idb + epb)) for t in b.ts_ns.tolist()] == [want]


def test_flow_table_refuses_a_negative_chunk():
    from pktstream._flowtable import FlowTable
    rec = _records(1, 54)
    with pytest.raises(ValueError, match="chunk -1"):
        FlowTable().add(rec, 1, 1, 0, -1)


def test_a_looping_filter_is_refused_before_a_crafted_packet_can_hang_it(tmp_path):
    """libpcap's ``protochain`` compiles to a loop, and its interpreter runs it for ever on an
    IPv6 packet whose AH header names itself as the next one (libpcap issue 1521; ``tcpdump -r``
    hangs too): one packet from the network stopped a reader, a query or the capture thread
    (sanitizer fuzzing found it). Every filter whose jumps are not all forward is refused with
    a one-line error, in batch filters and on capture handles alike. (In a child process: on a
    libpcap and pktstream that run it, it never returns.)"""
    r = _run_child("""
        import struct
        import pktstream
        from pktstream import Capture, PacketBatch
        from pktstream.exceptions import FilterError
        ip6 = struct.pack("!IHBB16s16s", 0x60000000, 24, 51, 64, b"\\x20\\x01" + bytes(14),
                          b"\\x20\\x01" + bytes(13) + b"\\x01")
        frame = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\\x86\\xdd" + ip6 + bytes([51, 8]) + bytes(22)
        with open("hang.pcap", "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
            f.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)
        batch = PacketBatch.from_records(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame, link_type=1)
        assert batch.filter("ip6 and tcp").tolist() == [False]  # (a forward-only filter: as before)
        for expr in ("ip6 protochain 6", "ip protochain 17"):
            for run in (lambda: batch.filter(expr), lambda: list(pktstream.read("hang.pcap", bpf=expr)),
                        lambda: Capture.open_offline("hang.pcap", bpf=expr)):
                try:
                    run()
                except FilterError as exc:
                    assert "jumps backwards" in str(exc), exc
                else:
                    raise AssertionError(f"{expr!r} was run")
        print("refused")
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr[-2000:]
