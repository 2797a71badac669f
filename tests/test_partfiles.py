"""``.part`` files (docs/FILES.md "Safe output"): a reader of a file being written, or of one
whose writer died, gets every whole batch written before, never less (issue #15, item 3)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest

import pktstream
from pktstream import PacketBatch
from pktstream.formats import CaptureWriter
from pktstream.lab.traffic import frames

FORMATS = ["pcapng.zst", "pcap.zst", "pcapng", "pcap"]


def make_batches(n_batches: int, per_batch: int, seed: int = 3) -> list[PacketBatch]:
    """Real Ethernet frames (pktstream.lab.traffic) in batches; packet i has timestamp i ns."""
    pkts = frames(n_batches * per_batch, seed=seed)
    out = []
    for b in range(n_batches):
        recs = bytearray()
        for i in range(b * per_batch, (b + 1) * per_batch):
            data = pkts[i]
            recs += struct.pack("<IIII", 1_700_000_000 + i // 10**9, i % 10**9, len(data), len(data)) + data
        out.append(PacketBatch.from_records(bytes(recs), link_type=1, interface="eth0"))
    return out


def incompressible_batches(n_batches: int, per_batch: int) -> list[PacketBatch]:
    """Ethernet frames with random 300-byte payloads (zstd cannot shrink them); packet i has
    timestamp i ns."""
    import random
    rnd = random.Random(5)
    out = []
    for b in range(n_batches):
        recs = bytearray()
        for i in range(b * per_batch, (b + 1) * per_batch):
            frame = b"\x02" * 12 + b"\x08\x00" + rnd.randbytes(300)
            recs += struct.pack("<IIII", 1_700_000_000, i, len(frame), len(frame)) + frame
        out.append(PacketBatch.from_records(bytes(recs), link_type=1, interface="eth0"))
    return out


def _ls(d) -> list[str]:
    """The names in directory ``d``, sorted, but the writer record every run with a state dir
    keeps there (sinks.file.WRITER_RECORD)."""
    from pktstream.sinks.file import WRITER_RECORD
    return sorted(n for n in os.listdir(d) if n != WRITER_RECORD)


def read_ts(path: str) -> list[int]:
    """Timestamps of every packet a reader gets from ``path`` (a truncated tail is allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pktstream.formats.TruncatedFileWarning)
        return [t - 1_700_000_000 * 10**9 for b in pktstream.read(path) for t in b.ts_ns.tolist()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_part_file_read_after_every_batch_gives_all_batches(tmp_path, fmt):
    """Read the .part after each write: exactly the packets written so far (a single flushed
    zstd block made the old reader stop after 24 bytes: "truncated pcapng block at byte 0")."""
    batches = make_batches(12, 37)
    w = CaptureWriter(str(tmp_path / f"cap.{fmt}"))
    total = 0
    for b in batches:
        w.write(b)
        total += len(b)
        got = read_ts(w.current_path + ".part")
        assert got == list(range(total))
    w.close()
    assert read_ts(str(tmp_path / f"cap.{fmt}")) == list(range(total))


@pytest.mark.parametrize("fmt", FORMATS)
def test_part_file_read_while_growing_is_a_prefix_with_every_flushed_batch(tmp_path, fmt):
    """A reader racing a writer: every read is the first N packets, with N at least every
    packet of the batches flushed before the read started."""
    batches = make_batches(60, 50, seed=5)
    path = str(tmp_path / f"grow.{fmt}")
    w = CaptureWriter(path)
    w.write(batches[0])
    part = w.current_path + ".part"
    flushed = [len(batches[0])]  # packets in completed writes (the writer appends)
    done = threading.Event()
    errors: list[BaseException] = []
    reads: list[tuple[int, int]] = []

    def writer() -> None:
        try:
            for b in batches[1:]:
                w.write(b)
                flushed.append(flushed[-1] + len(b))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        while True:
            finished = done.is_set()
            before = flushed[-1]
            got = read_ts(part)
            assert got == list(range(len(got))), "not a prefix of what was written"
            assert len(got) >= before, f"read {len(got)} packets, {before} were flushed before the read"
            reads.append((before, len(got)))
            if finished:
                break
    finally:
        t.join()
    assert not errors
    w.close()
    assert reads[-1] == (flushed[-1], flushed[-1])
    assert read_ts(path) == list(range(flushed[-1]))


_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[3])
from test_partfiles import make_batches
from pktstream.formats import CaptureWriter
w = CaptureWriter(sys.argv[1])
for k, b in enumerate(make_batches(int(sys.argv[2]), 41)):
    w.write(b)
    print(k + 1, flush=True)
sys.stdin.read()  # killed here, with the file still open
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_writer_leaves_a_part_file_with_every_batch(tmp_path, fmt):
    n = 9
    path = str(tmp_path / f"dead.{fmt}")
    with subprocess.Popen([sys.executable, "-c", _WRITER, path, str(n), os.path.dirname(__file__)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        try:
            lines = [p.stdout.readline().strip() for _ in range(n)]
            assert lines[-1] == str(n)
        finally:
            p.kill()
    assert not os.path.exists(path)
    assert read_ts(path + ".part") == list(range(n * 41))


def test_recovery_completes_a_large_zst_part_file_in_bounded_memory(tmp_path):
    """FileSink.recover on a crashed ``.zst`` file (a zstd frame without its end, longer than the
    last acknowledged flush): the acknowledged blocks become one complete, checksummed frame,
    byte for byte, and the file is re-encoded streaming: Python's peak allocation (tracemalloc)
    stays a small fraction of the 48 MiB content (the old version held all of it, twice)."""
    import hashlib
    import tracemalloc

    import numpy as np
    import zstandard

    from pktstream.sinks import FileSink

    final = tmp_path / "s1.pcap.zst"
    part = tmp_path / "s1.pcap.zst.part"
    rng = np.random.default_rng(5)
    acked = hashlib.sha256()
    cobj = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    mib = 1 << 20
    with open(part, "wb") as f:
        for i in range(52):
            chunk = rng.integers(0, 16, mib, dtype=np.uint8).tobytes()  # ~2:1, like packets
            f.write(cobj.compress(chunk) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
            if i < 48:
                acked.update(chunk)
            if i == 47:
                committed = f.tell()  # the last acknowledged flush; the rest is resent by sensors
        tail = cobj.compress(b"x" * mib) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        f.write(tail[:len(tail) // 2])  # the block being written when the process died
    assert part.stat().st_size > committed > 24 * mib

    tracemalloc.start()
    try:
        FileSink.recover({"open": [{"part": str(part), "final": str(final), "size": committed}]})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not part.exists() and not (tmp_path / "s1.pcap.zst.part.tmp").exists()
    assert peak < 8 * mib, f"peak Python allocation {peak} bytes while re-encoding 48 MiB"

    with open(final, "rb") as f:
        params = zstandard.get_frame_parameters(f.read(18))
        f.seek(0)
        dobj = zstandard.ZstdDecompressor().decompressobj()
        got, n = hashlib.sha256(), 0
        while chunk := f.read(mib):
            out = dobj.decompress(chunk)
            got.update(out)
            n += len(out)
    assert params.has_checksum and dobj.eof  # one complete frame, checksum verified on decode
    assert n == 48 * mib and got.hexdigest() == acked.hexdigest()


@pytest.mark.parametrize("fmt", FORMATS)
def test_recovery_cuts_back_a_file_rotation_completed_after_the_last_flush(tmp_path, fmt):
    """A crash after rotation completed a file holding unacknowledged batches (written after the
    last flush): recovery cuts it back to the flushed state (a .zst file re-encoded from its
    whole blocks), so the resent batches do not end up in two files; the file opened after the
    flush is removed. Afterwards the directory holds exactly the flushed packets."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "s1", "eth0", 1, 262144)
    batches = make_batches(12, 40)
    (tmp_path / "probe").mkdir()
    (tmp_path / "out").mkdir()
    probe = FileSink(str(tmp_path / "probe" / f"p.{fmt}"))
    for b in batches[:2]:
        probe.write(src, b)
    flushed_size = probe.flush()["open"][0]["size"]
    probe.close()
    sink = FileSink(str(tmp_path / "out" / f"o.{fmt}"), rotate_bytes=flushed_size * 5 // 4)
    for b in batches[:2]:
        sink.write(src, b)
    state = sink.flush()
    first = state["open"][0]["final"]
    assert state["open"][0]["size"] == flushed_size
    for b in batches[2:]:
        sink.write(src, b)  # until the first file goes past rotate_bytes and is completed
        if os.path.exists(first):
            break
    for out in sink._outputs.values():
        out.abandon()  # the crash
    assert os.path.isfile(first) and len(read_ts(first)) > 80
    with open(first + ".idx", "wb") as f:  # as an S3 output stages an index at completion
        f.write(b"index of the uncut file")
    FileSink.recover(state)
    assert os.listdir(tmp_path / "out") == [os.path.basename(first)]  # no stale staged index
    assert read_ts(first) == [int(t) - 1_700_000_000 * 10**9 for b in batches[:2] for t in b.ts_ns]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_crash_right_after_recovery_keeps_what_was_acknowledged(tmp_path, fmt):
    """The receiver dies again before its first commit after a crash recovery (a crash loop, a
    second restart while the sensors back off): the second recovery must change nothing. A
    ``.zst`` file is re-encoded by recovery, so its size changes; the receiver persists the
    recovered sizes before it goes on (a recovery from the old state cut the new encoding at
    the old byte offset and lost acknowledged packets)."""
    import collections

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    batches = incompressible_batches(6, 200)  # the re-encoded file is not smaller than the old one
    src = Source("s1", "s1", "eth0", 1, 262144)
    out, state_dir = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    path = str(out / f"o.{fmt}")
    sink = FileSink(path)
    for b in batches[:4]:
        sink.write(src, b)
    flushed = sink.flush()
    for b in batches[4:]:
        sink.write(src, b)  # never acknowledged
    for o in sink._outputs.values():
        o.abandon()  # the crash
    mode = os.stat(flushed["open"][0]["part"]).st_mode & 0o777
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text(json.dumps({"sensors": {"s1": {"last_seq": 4}}, "sinks": {sink.name: flushed}}))
    final = flushed["open"][0]["final"]
    acked = [i for b in batches[:4] for i in (b.ts_ns - 1_700_000_000 * 10**9).tolist()]
    for restart in range(3):  # each receiver dies before its first commit
        ingest = Ingest([FileSink(path)], counters=collections.Counter(), closing=threading.Event(),
                        state_dir=str(state_dir))
        ingest.shutdown()
        assert read_ts(final) == acked, f"restart {restart + 1}"
        assert sorted(os.listdir(out)) == [os.path.basename(final)]
        assert os.stat(final).st_mode & 0o777 == mode == 0o640  # (a re-encoded file was 0644)
    saved = json.loads((state_dir / STATE_FILE).read_text())
    assert saved["sensors"] == {"s1": {"last_seq": 4}}
    assert saved["sinks"][sink.name]["open"][0]["size"] == os.path.getsize(final)


def test_a_recovery_interrupted_half_way_keeps_what_was_acknowledged(tmp_path, monkeypatch):
    """Recovery re-encodes one .zst file, then fails on the next (disk full, a start timeout):
    the recovered size of the first is persisted at once, not after every file, so the next
    start does not cut its new encoding at the old size (cold review of the fix above)."""
    import collections

    from pktstream.sinks import FileSink, file as filemod
    from pktstream.sinks.base import Source
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    batches = incompressible_batches(6, 200)
    out, state_dir = tmp_path / "out", tmp_path / "state"
    sink = FileSink(directory=str(out), format="pcap.zst")
    srcs = [Source(s, s, "eth0", 1, 262144) for s in ("alpha", "beta")]
    for b in batches[:4]:
        for src in srcs:
            sink.write(src, b)
    flushed = sink.flush()
    for b in batches[4:]:
        for src in srcs:
            sink.write(src, b)  # never acknowledged
    for o in sink._outputs.values():
        o.abandon()  # the crash
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text(json.dumps({"sensors": {}, "sinks": {sink.name: flushed}}))
    acked = [i for b in batches[:4] for i in (b.ts_ns - 1_700_000_000 * 10**9).tolist()]
    real, calls = filemod._finish_zstd, []

    def second_fails(part, frame_bytes=None, keep=None):
        calls.append(part)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(part, frame_bytes, keep)
    monkeypatch.setattr(filemod, "_finish_zstd", second_fails)
    with pytest.raises(OSError, match="No space"):
        Ingest([FileSink(directory=str(out), format="pcap.zst")], counters=collections.Counter(),
               closing=threading.Event(), state_dir=str(state_dir))
    monkeypatch.setattr(filemod, "_finish_zstd", real)
    ingest = Ingest([FileSink(directory=str(out), format="pcap.zst")], counters=collections.Counter(),
                    closing=threading.Event(), state_dir=str(state_dir))
    ingest.shutdown()
    for f in flushed["open"]:
        assert read_ts(f["final"]) == acked, f["final"]


def test_the_receiver_numbers_files_after_those_its_state_names(tmp_path):
    """The receiver hands each output the recovered state (``Sink.resume``): a rotating
    output's next file is numbered after the state's, also when the files that held the lower
    numbers are gone (an S3 output's staging directory moves them out), so the next recovery
    cannot take a new file for the acknowledged one."""
    import collections

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    batches = make_batches(3, 50)
    src = Source("s1", "s1", "eth0", 1, 262144)
    out, state_dir = tmp_path / "out", tmp_path / "state"
    sink = FileSink(directory=str(out), format="pcap", rotate_seconds=3600)
    sink.write(src, batches[0])
    flushed = sink.flush()
    assert flushed["open"][0]["seq"] == 0
    for o in sink._outputs.values():
        o.abandon()  # the crash
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text(json.dumps({"sensors": {}, "sinks": {sink.name: flushed}}))
    sink = FileSink(directory=str(out), format="pcap", rotate_seconds=3600)
    ingest = Ingest([sink], counters=collections.Counter(), closing=threading.Event(), state_dir=str(state_dir))
    assert sorted(os.listdir(out)) == ["s1.000000.pcap"]  # recovered
    os.unlink(out / "s1.000000.pcap")  # taken away (uploaded, moved out of staging)
    sink.write(src, batches[1])
    assert _ls(out) == ["s1.000001.pcap.part"]
    ingest.shutdown()
    sink.close()


ZST_LAYOUTS = [("pcap.zst", None), ("pcapng.zst", None), ("pcapng.zst", 64 << 10)]


@pytest.mark.parametrize("rotate", [False, True], ids=["open", "rotated"])
@pytest.mark.parametrize("fmt,frame_bytes", ZST_LAYOUTS, ids=["pcap.zst", "pcapng.zst", "seekable"])
def test_a_crash_after_a_reset_keeps_what_was_acknowledged(tmp_path, fmt, frame_bytes, rotate):
    """A write fails (disk full): the sink goes back to its last flush, re-encoding the .zst
    file open then (``rotated``: completed by rotation since) -- another size than the one in
    the receiver's persisted state, which only its next commit updates. The receiver is killed
    before that commit (the disk is still full): recovery from that state must keep every
    acknowledged packet (a cut at the state's byte offset lost the re-encoding's tail)."""
    from pktstream.formats.reader import ZstdBlockReader
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = incompressible_batches(6, 200)  # the re-encoding is longer than the old encoding
    src = Source("s1", "s1", "eth0", 1, 262144)
    out = tmp_path / "out"
    out.mkdir()
    kw = {"rotate_bytes": 300_000} if rotate else {}
    sink = FileSink(str(out / f"o.{fmt}"), zstd_frame_bytes=frame_bytes, **kw)
    for b in batches[:4]:
        sink.write(src, b)
    saved = json.loads(json.dumps(sink.flush()))  # persisted by the receiver's commit
    entry = saved["open"][0]
    with open(entry["part"], "rb") as f:  # the state's decoded size is what the file decodes to
        r, buf, decoded = ZstdBlockReader(f, entry["part"]), bytearray(1 << 16), 0
        while n := r.readinto(buf):
            decoded += n
    assert entry["stream_bytes"] == decoded > 0
    for b in batches[4:]:
        sink.write(src, b)
    final = entry["final"]
    assert os.path.exists(final) == rotate  # (rotated: the flushed file was completed since)
    sink.reset()  # the write error
    acked = [i for b in batches[:4] for i in (b.ts_ns - 1_700_000_000 * 10**9).tolist()]
    assert read_ts(final) == acked
    assert os.path.getsize(final) > entry["size"]  # re-encoded: what made the old cut lose packets
    for o in sink._outputs.values():
        o.abandon()  # killed before the next commit
    for restart in range(2):
        after = FileSink.recover(saved)
        assert read_ts(final) == acked, f"restart {restart + 1}"
        assert sorted(os.listdir(out)) == [os.path.basename(final)]
        saved = after


@pytest.mark.parametrize("fmt,frame_bytes", ZST_LAYOUTS, ids=["pcap.zst", "pcapng.zst", "seekable"])
def test_a_crash_before_the_recovered_size_is_saved_keeps_what_was_acknowledged(tmp_path, fmt, frame_bytes):
    """Killed while recovering, after a .zst file's re-encoding took its place but before the
    state with its new size was written (``persist`` fails here as a SIGKILL would stop it):
    the next recovery, from the old state, must keep every acknowledged packet."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = incompressible_batches(6, 200)
    src = Source("s1", "s1", "eth0", 1, 262144)
    out = tmp_path / "out"
    out.mkdir()
    sink = FileSink(str(out / f"o.{fmt}"), zstd_frame_bytes=frame_bytes)
    for b in batches[:4]:
        sink.write(src, b)
    saved = json.loads(json.dumps(sink.flush()))
    for b in batches[4:]:
        sink.write(src, b)  # never acknowledged
    for o in sink._outputs.values():
        o.abandon()  # the crash
    final = saved["open"][0]["final"]
    acked = [i for b in batches[:4] for i in (b.ts_ns - 1_700_000_000 * 10**9).tolist()]

    def killed(state):
        assert os.path.getsize(final) != saved["open"][0]["size"]  # the re-encoding is in place
        raise KeyboardInterrupt("killed")
    with pytest.raises(KeyboardInterrupt):
        FileSink.recover(saved, killed)
    FileSink.recover(saved)
    assert read_ts(final) == acked
    assert sorted(os.listdir(out)) == [os.path.basename(final)]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng.zst"])
def test_recovery_removes_files_completed_entirely_after_the_last_flush(tmp_path, fmt):
    """A flush group larger than the rotation size: rotation completes the file open at the
    flush, then whole files holding only unacknowledged batches, then opens another. Recovery
    cuts the first back, removes the later complete files and the open one (the sensors resend
    all of it), and leaves an earlier run's file -- even one whose mtime is in the future (a
    clock set back between runs): the writer numbers its files after it -- and the files of a
    second writer whose name starts the same (another link type of the same strftime pattern)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "s1", "eth0", 1, 262144)
    batches = make_batches(16, 40)
    out = tmp_path / "out"
    out.mkdir()
    ext = "." + fmt
    w = CaptureWriter(str(tmp_path / f"earlier{ext}"))
    w.write(batches[0])
    w.close()
    earlier = out / f"o-2026.000009{ext}"  # an earlier run's file, written "later" by a clock set back since
    os.replace(tmp_path / f"earlier{ext}", earlier)
    future = (time.time_ns() + 3600 * 10**9,) * 2
    os.utime(earlier, ns=future)
    other = [out / f"o-2026.LINUX_SLL.{i:06d}{ext}" for i in (20, 21)]  # another writer's files
    for p in other:
        p.write_bytes(earlier.read_bytes())
    (tmp_path / "probe").mkdir()
    probe = FileSink(str(tmp_path / "probe" / f"p{ext}"))
    probe.write(src, batches[0])
    one_batch = probe.flush()["open"][0]["size"]
    probe.close()
    sink = FileSink(str(out / f"o-%Y{ext}"), rotate_bytes=one_batch + 1)  # about a batch per file
    sink.write(src, batches[0])
    state = sink.flush()
    first = state["open"][0]["final"]
    assert state["open"][0]["seq"] == 10 and state["open"][0]["size"] == one_batch  # after the earlier file
    for b in batches[1:5]:
        sink.write(src, b)
    later = sorted(set(sink.paths) - {first})
    assert len(later) >= 2  # files completed entirely after the flush
    for o in sink._outputs.values():
        o.abandon()  # the crash
    FileSink.recover(state)
    left = sorted(os.listdir(out))
    assert left == sorted([os.path.basename(first), earlier.name] + [p.name for p in other])
    assert read_ts(first) == [int(t) - 1_700_000_000 * 10**9 for t in batches[0].ts_ns]
    assert len(read_ts(str(earlier))) == 40


@pytest.mark.parametrize("fmt", ["pcap", "pcapng.zst"])
def test_recovery_after_a_flush_that_time_rotation_left_without_an_open_file(tmp_path, fmt):
    """Time rotation (``-G``) completes a file at a flush (or on idle), so no file is open when
    the flush's state is taken; the files the output opens and completes after it hold only
    unacknowledged batches. Recovery still knows the output's place: it removes those (the
    sensors resend them) and keeps the completed file as it was."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "s1", "eth0", 1, 262144)
    batches = make_batches(4, 40)
    out = tmp_path / "out"
    out.mkdir()
    rotate_s = 0.05
    sink = FileSink(str(out / f"o.{fmt}"), rotate_seconds=rotate_s)

    def write_until_due(batch) -> None:
        sink.write(src, batch)
        written = time.time()  # (the writer's clock: the file was opened before, so it is due rotate_s after)
        while time.time() < written + rotate_s:
            time.sleep(0.01)

    write_until_due(batches[0])
    state = sink.flush()  # the file is due: the flush completes it
    assert sink.open_paths() == set()
    [entry] = state["open"]
    first = entry["final"]
    assert os.path.isfile(first) and entry["size"] == os.path.getsize(first) and entry["seq"] == 0
    write_until_due(batches[1])
    sink.tick()  # completes the second file (unacknowledged) while idle
    sink.write(src, batches[2])  # and opens a third
    assert len(sink.paths) == 2 and len(sink.open_paths()) == 1
    for o in sink._outputs.values():
        o.abandon()  # the crash
    FileSink.recover(state)
    assert os.listdir(out) == [os.path.basename(first)]
    assert read_ts(first) == [int(t) - 1_700_000_000 * 10**9 for t in batches[0].ts_ns]


def test_rotating_numbers_skip_part_files_and_each_directory_is_scanned(tmp_path):
    """A new rotating writer numbers after the files of its pattern already there, .part files
    included (one left by a crashed run without a state dir was truncated by O_TRUNC), and
    scans each directory a strftime pattern leads it to (the next day's directory may hold an
    earlier run's higher numbers)."""
    batches = make_batches(4, 40)
    d = tmp_path / "cap"
    d.mkdir()
    (d / "c.000000.pcap").write_bytes(b"x")
    (d / "c.000001.pcap.part").write_bytes(b"p" * 5000)
    w = CaptureWriter(str(d / "c.pcap"), rotate_bytes=10**9)
    w.write(batches[0])
    assert w.current_seq == 2 and (d / "c.000001.pcap.part").read_bytes() == b"p" * 5000
    w.close()
    for year in ("2024", "2025"):
        (tmp_path / "sd" / year).mkdir(parents=True)
    (tmp_path / "sd" / "2025" / "c.000007.pcap").write_bytes(b"x")  # an earlier run's
    now = [time.mktime((2024, 6, 1, 12, 0, 0, 0, 0, -1))]
    w = CaptureWriter(str(tmp_path / "sd" / "%Y" / "c.pcap"), rotate_seconds=1, clock=lambda: now[0])
    w.write(batches[0])
    assert w.current_path.endswith("2024/c.000000.pcap")
    now[0] = time.mktime((2025, 6, 1, 12, 0, 0, 0, 0, -1))
    w.write(batches[1])  # time rotation into 2025/
    assert w.current_path.endswith("2025/c.000008.pcap")
    w.close()


def test_two_writers_never_share_a_name_pattern(tmp_path):
    """Sensor s1's second link type is written as s1.LINUX_SLL.pcap; a sensor named
    "s1.LINUX_SLL" gets another name (both wrote, and truncated, one .part file; recovery of
    one would remove the other's files)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    sink = FileSink(directory=str(tmp_path / "d"), format="pcap", rotate_bytes=10**9)
    eth, sll = make_batches(1, 10)[0], make_batches(1, 10, seed=4)[0]
    sll = PacketBatch.from_records(bytes(sll), link_type=113, interface="any")
    sink.write(Source("s1", "h", "eth0", 1, 262144), eth)
    sink.write(Source("s1", "h", "any", 113, 262144), sll)
    sink.write(Source("s1.LINUX_SLL", "h", "eth0", 1, 262144), eth)
    names = sorted(os.path.basename(p) for p in sink.open_paths())
    sink.close()
    assert names == ["s1.000000.pcap", "s1.LINUX_SLL-2.000000.pcap", "s1.LINUX_SLL.000000.pcap"]


def _all_ts(paths) -> list[int]:
    return sorted(t for p in paths for t in read_ts(str(p)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_reset_after_a_group_that_crossed_rotations_keeps_every_packet_once(tmp_path, fmt):
    """A write group larger than the rotation size fails (disk full, an S3 output's full
    staging) after rotation completed the file open at the last flush and whole files after
    it: reset() takes the output back to that flush -- the first file cut back to its flushed
    size, the later ones removed -- so the receiver's rewrite of the group stores each packet
    once (the later files used to stay: the start of the group twice)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "s1", "eth0", 1, 262144)
    batches = make_batches(8, 40)
    probe = FileSink(str(tmp_path / f"probe.{fmt}"))
    probe.write(src, batches[0])
    one_batch = probe.flush()["open"][0]["size"]
    probe.close()
    out = tmp_path / "out"
    out.mkdir()
    sink = FileSink(directory=str(out), format=fmt, rotate_bytes=one_batch + 1)  # about a batch per file
    sink.write(src, batches[0])
    sink.flush()
    group = batches[1:6]
    for b in group[:4]:
        sink.write(src, b)
    assert len(sink.paths) >= 3  # the flushed file and whole files after it were completed
    sink.reset()  # (the group's fifth write failed)
    assert not [n for n in os.listdir(out) if n.endswith(".part")]
    for b in group:  # the receiver writes the whole group again
        sink.write(src, b)
    sink.flush()
    sink.close()
    files = sorted(out.iterdir())
    assert sorted(map(str, files)) == sorted(sink.paths)
    assert _all_ts(files) == sorted(int(t) - 1_700_000_000 * 10**9 for b in batches[:6] for t in b.ts_ns)


@pytest.mark.parametrize("fmt", ["pcap.zst", "pcapng"])
def test_a_file_whose_completion_failed_is_cut_back_by_reset_not_orphaned(tmp_path, fmt, monkeypatch):
    """Completing a file at a rotation fails (disk full while its zstd frame is written out,
    an I/O error renaming it): the file, holding acknowledged batches, is still the writer's to abandon, so
    reset() cuts it back to the last flush and completes it (it was left as an orphan .part,
    which the next crash recovery removed as unacknowledged)."""
    import errno

    from pktstream.formats import writer as W
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "s1", "eth0", 1, 262144)
    batches = make_batches(4, 40)
    out = tmp_path / "out"
    out.mkdir()
    sink = FileSink(directory=str(out), format=fmt, rotate_bytes=1)  # every write completes the file before
    sink.write(src, batches[0])
    state = sink.flush()
    def refuse(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if fmt.endswith(".zst"):
        monkeypatch.setattr(W.ZstdFileWriter, "finish", refuse)  # the zstd frame's end
    else:
        monkeypatch.setattr(W.os, "replace", refuse)  # the rename to the final name
    with pytest.raises(OSError, match="No space left"):
        sink.write(src, batches[1])  # rotation completes the first file: fails
    monkeypatch.undo()
    sink.reset()
    first = state["open"][0]["final"]
    assert os.path.exists(first) and not [n for n in os.listdir(out) if n.endswith(".part")]
    for b in batches[1:]:
        sink.write(src, b)
    sink.flush()
    sink.close()
    assert _all_ts(out.iterdir()) == sorted(int(t) - 1_700_000_000 * 10**9 for b in batches for t in b.ts_ns)


def test_close_completes_every_output_when_one_fails_and_recovery_completes_that_one(tmp_path, monkeypatch):
    """FileSink.close() tries every output: one file that cannot be completed (disk full) does
    not leave the other sensors' files as .part; it raises afterwards, and the failed file is
    completed by recovery from the last flushed state."""
    import errno

    from pktstream.formats import writer as W
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(3, 40)
    out = tmp_path / "out"
    out.mkdir()
    sink = FileSink(directory=str(out), format="pcap.zst")
    for i, b in enumerate(batches):
        sink.write(Source(f"s{i}", "h", "eth0", 1, 262144), b)
    state = sink.flush()
    real, calls = W.ZstdFileWriter.finish, []

    def finish(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)
    monkeypatch.setattr(W.ZstdFileWriter, "finish", finish)
    with pytest.raises(OSError, match="No space left"):
        sink.close()
    monkeypatch.undo()
    names = sorted(os.listdir(out))
    assert len(calls) == 3 and sum(n.endswith(".part") for n in names) == 1 and len(names) == 3
    FileSink.recover(state)
    assert not [n for n in os.listdir(out) if n.endswith(".part")]
    assert _all_ts(out.iterdir()) == sorted(int(t) - 1_700_000_000 * 10**9 for b in batches for t in b.ts_ns)


def test_a_flush_that_fails_for_one_output_takes_every_output_back(tmp_path, monkeypatch):
    """The second of two outputs fails to flush: the first one's new state must not count as
    flushed, or reset() keeps its copy of the group and the rewrite doubles it there."""
    import errno

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(4, 30)
    out = tmp_path / "out"
    out.mkdir()
    sink = FileSink(directory=str(out), format="pcap")
    a, b = Source("s1", "h", "eth0", 1, 262144), Source("s2", "h", "eth0", 1, 262144)
    sink.write(a, batches[0])
    sink.write(b, batches[1])
    sink.flush()
    sink.write(a, batches[2])
    sink.write(b, batches[3])
    second = list(sink._outputs.values())[1]

    def refuse():
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(second, "flush", refuse)
    with pytest.raises(OSError, match="No space left"):
        sink.flush()
    monkeypatch.undo()
    sink.reset()
    sink.write(a, batches[2])
    sink.write(b, batches[3])
    sink.flush()
    sink.close()
    assert _all_ts(out.iterdir()) == sorted(int(t) - 1_700_000_000 * 10**9 for bt in batches for t in bt.ts_ns)


def test_an_in_place_output_goes_on_in_a_new_file_after_a_reset(tmp_path):
    """PacketStreamer's growing file (a name without extension): after a write error the new
    writer must not reopen the name (it truncated the flushed, acknowledged packets)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(2, 30)
    src = Source("s1", "h", "eth0", 1, 262144)
    sink = FileSink(str(tmp_path / "live"))
    assert sink.in_place
    sink.write(src, batches[0])
    sink.flush()
    sink.write(src, batches[1])
    sink.reset()
    sink.write(src, batches[1])
    sink.flush()
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["live", "live.pcap"]
    assert _all_ts(tmp_path.iterdir()) == sorted(int(t) - 1_700_000_000 * 10**9 for bt in batches for t in bt.ts_ns)


def test_a_rotation_that_failed_after_its_rename_is_cut_back_by_reset(tmp_path, monkeypatch):
    """The directory fsync after a rotation's rename fails (fsync on): the renamed file is not
    in the writer's list, and reset() must still cut it back to the last flush."""
    import errno
    import stat

    from pktstream.formats import writer as W
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(3, 30)
    src = Source("s1", "h", "eth0", 1, 262144)
    out = tmp_path / "out"
    out.mkdir()
    sink = FileSink(directory=str(out), format="pcap", rotate_bytes=2 * batches[0].nbytes + 100, fsync=True)
    sink.write(src, batches[0])
    sink.flush()
    sink.write(src, batches[1])  # the same file (the next batch would not fit: rotation first)
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    monkeypatch.setattr(W.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        sink.write(src, batches[2])  # rotation completes the file: its directory's fsync fails
    monkeypatch.undo()
    sink.reset()
    for b in batches[1:]:
        sink.write(src, b)
    sink.flush()
    sink.close()
    assert _all_ts(out.iterdir()) == sorted(int(t) - 1_700_000_000 * 10**9 for bt in batches for t in bt.ts_ns)


def _per_sensor_flushed_then_written(tmp_path, fmt: str, per_batch: int):
    """A per-sensor FileSink in ``tmp_path``: batch 0 written and flushed (its state, as
    persisted), batch 1 written after it. Returns (sink, source, 3 batches, state)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(3, per_batch)
    src = Source("s1", "h", "eth0", 1, 262144)
    sink = FileSink(directory=str(tmp_path), format=fmt)
    sink.write(src, batches[0])
    state = json.loads(json.dumps(sink.flush()))
    sink.write(src, batches[1])
    return sink, src, batches, state


def _crash(*sinks) -> None:
    """The process dies: every writer stops where it is (its .part stays)."""
    for sink in sinks:
        for o in sink._outputs.values():
            o.abandon()


def test_recovery_never_removes_another_outputs_part_file(tmp_path):
    """Two outputs in one directory whose names start alike (site1.eth.pcap, site1.tap.pcapng):
    recovering one removed the other's .part -- acknowledged packets -- as "opened after the
    flush" (the sweep matched the text before the first dot; cold review). Each removes only
    .part files of its own names now."""
    import collections

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    out, state_dir = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    state_dir.mkdir()
    src = Source("s1", "s1", "eth0", 1, 262144)
    batch = make_batches(1, 50)[0]
    a, c = FileSink(str(out / "site1.eth.pcap")), FileSink(str(out / "site1.tap.pcapng"))
    sinks = {}
    for sink in (a, c):
        sink.write(src, batch)
        sinks[sink.name] = sink.flush()
    _crash(a, c)
    (state_dir / STATE_FILE).write_text(json.dumps({"sensors": {}, "sinks": sinks}))
    again = [FileSink(str(out / "site1.eth.pcap")), FileSink(str(out / "site1.tap.pcapng"))]
    Ingest(again, counters=collections.Counter(), closing=threading.Event(), state_dir=str(state_dir)).shutdown()
    assert sorted(os.listdir(out)) == ["site1.eth.pcap", "site1.tap.pcapng"]
    want = read_ts_of(batch)
    assert read_ts(str(out / "site1.eth.pcap")) == want and read_ts(str(out / "site1.tap.pcapng")) == want


def read_ts_of(batch) -> list[int]:
    return [t - 1_700_000_000 * 10**9 for t in batch.ts_ns.tolist()]


def test_a_reset_keeps_each_link_types_names(tmp_path):
    """A merged pcap output with two link types: the first seen gets NAME.pcap, the second
    NAME.<LINKTYPE>.pcap. After a reset the order of arrival could flip, and a link type went on
    under names the persisted state never gave it: after a crash recovery neither cut nor
    removed them, so unacknowledged packets stayed (and were resent: twice; cold review)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    eth = make_batches(6, 20)
    sll = [PacketBatch.from_records(bytes(b), link_type=113, interface="any") for b in make_batches(2, 20, seed=4)]
    src_eth, src_sll = Source("s1", "h", "eth0", 1, 262144), Source("s1", "h", "any", 113, 262144)
    sink = FileSink(str(tmp_path / "cap.pcap"), rotate_bytes=eth[0].nbytes + 200)
    sink.write(src_eth, eth[0])
    sink.write(src_sll, sll[0])
    state = json.loads(json.dumps(sink.flush()))
    sink.write(src_eth, eth[1])
    sink.reset()  # the group failed
    sink.write(src_sll, sll[1])  # written again, the other link type first
    for b in eth[2:]:
        sink.write(src_eth, b)
    _crash(sink)
    FileSink.recover(state)
    names = sorted(os.listdir(tmp_path))
    seqs = {os.path.basename(f["pattern"]): f["seq"] for f in state["open"]}
    assert set(seqs) == {"cap.pcap", "cap.LINUX_SLL.pcap"}
    for n in names:  # only the state's names, up to the file open at the flush
        stem, num, _ = n.rsplit(".", 2)
        assert int(num) <= seqs[stem + ".pcap"], names
    assert _all_ts(tmp_path / n for n in names) == sorted(read_ts_of(eth[0]) + read_ts_of(sll[0]))


def test_a_strftime_output_never_removes_a_sensors_part_beside_it(tmp_path):
    """A rotating strftime pattern (%Y%m%d.pcap) and per-sensor files in one directory: the
    pattern's field matches a sensor's name (web1.000003.pcap), so a reset or recovery of the
    merged output that also removed .part files numbered after its flush removed the other
    output's live or acknowledged one (cold review of a fix tried this session, not kept)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("web1", "web1", "eth0", 1, 262144)
    b = make_batches(6, 20)
    rot = {"rotate_bytes": b[0].nbytes + 100}
    merged = FileSink(str(tmp_path / "%Y%m%d.pcap"), **rot)
    per = FileSink(directory=str(tmp_path), format="pcap", **rot)
    for x in b[:3]:
        merged.write(src, x)
        per.write(src, x)
    sm = json.loads(json.dumps(merged.flush()))
    per.write(src, b[3])
    sp = json.loads(json.dumps(per.flush()))
    assert sp["open"][0]["seq"] > sm["open"][0]["seq"]
    merged.write(src, b[3])
    merged.reset()  # the merged output's group failed: the per-sensor file stays open and whole
    per.close()
    want = read_ts_of(b[0]) + read_ts_of(b[1]) + read_ts_of(b[2]) + read_ts_of(b[3])
    assert _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("web1.")) == sorted(want)
    merged.close()


def test_recovery_removes_the_part_a_per_sensor_file_got_after_a_reset(tmp_path):
    """A per-sensor output that does not rotate: after a reset it goes on in s1~1.pcapng; a
    crash then left that .part (unacknowledged) for good (cold review)."""
    from pktstream.sinks import FileSink
    sink, src, batches, state = _per_sensor_flushed_then_written(tmp_path, "pcapng", 20)
    sink.reset()
    sink.write(src, batches[2])
    _crash(sink)
    assert sorted(os.listdir(tmp_path)) == ["s1.pcapng", "s1~1.pcapng.part"]
    FileSink.recover(state)
    assert sorted(os.listdir(tmp_path)) == ["s1.pcapng"]
    assert read_ts(str(tmp_path / "s1.pcapng")) == read_ts_of(batches[0])


@pytest.mark.parametrize("rotate", [None, 10**6], ids=["plain", "rotating"])
def test_recovery_removes_the_part_of_a_link_type_first_seen_after_the_flush(tmp_path, rotate):
    """A merged pcap output whose second link type first came after the last flush: no state
    entry names its file, and its .part (nothing in it acknowledged) stayed; with rotation for
    good (cold review). The state lists such outputs' names."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    eth = make_batches(1, 20)[0]
    sll = PacketBatch.from_records(bytes(make_batches(1, 20, seed=4)[0]), link_type=113, interface="any")
    sink = FileSink(str(tmp_path / "cap.pcap"), rotate_bytes=rotate)
    sink.write(Source("s1", "h", "eth0", 1, 262144), eth)
    sink.write(Source("s1", "h", "any", 113, 262144), sll)
    sink.flush()
    sink.reset()  # (after a reset no file is open until the next write: the SLL output's name is in "names")
    sink.write(Source("s1", "h", "eth0", 1, 262144), eth)
    state = json.loads(json.dumps(sink.flush()))
    assert [os.path.basename(n["base"]) for n in state["names"]] == ["cap.LINUX_SLL.pcap"]
    sink.write(Source("s1", "h", "any", 113, 262144), sll)  # after the flush
    _crash(sink)
    assert sum(n.endswith(".part") for n in os.listdir(tmp_path)) == 2
    FileSink.recover(state)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]


def test_resume_ignores_names_of_another_format(tmp_path):
    """A per-sensor output restarted with another format after a crash (pcapng, then pcap):
    the state's key for the sensor's pcapng output made its pcap link type a "second" one,
    named s1.EN10MB.pcap from then on (cold review)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "h", "eth0", 1, 262144)
    sink = FileSink(directory=str(tmp_path / "a"), format="pcapng")
    sink.write(src, make_batches(1, 5)[0])
    state = json.loads(json.dumps(sink.flush()))
    sink.close()
    again = FileSink(directory=str(tmp_path / "a"), format="pcap")
    again.resume(state)
    again.write(src, make_batches(1, 5)[0])
    assert sorted(os.path.basename(p) for p in again.open_paths()) == ["s1.pcap"]
    again.close()


def test_a_reset_that_fails_never_truncates_acknowledged_data(tmp_path, monkeypatch):
    """reset() failing half-way (the re-encode of a .zst file hits ENOSPC) left the abandoned
    writer in place: the receiver's retry reopened its file under the same name, truncated,
    and the acknowledged batch was gone (cold review). Every writer is replaced now, the error
    still raised."""
    from pktstream.sinks import FileSink, file as filemod
    sink, src, batches, state = _per_sensor_flushed_then_written(tmp_path, "pcap.zst", 30)

    def full(part, frame_bytes=None, keep=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(filemod, "_finish_zstd", full)
    with pytest.raises(OSError, match="No space"):
        sink.reset()
    monkeypatch.undo()
    sink.write(src, batches[1])  # the receiver's retry of the group
    sink.write(src, batches[2])
    assert os.path.getsize(tmp_path / "s1.pcap.zst.part") >= state["open"][0]["size"]  # not truncated
    _crash(sink)
    FileSink.recover(state)
    assert read_ts(str(tmp_path / "s1.pcap.zst")) == read_ts_of(batches[0])


def test_a_rotating_file_output_names_each_completed_file(tmp_path, caplog):
    """The receiver's log says which files it wrote: a strftime pattern expanded and numbered,
    one line per completed file, with its size."""
    import logging

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    sink = FileSink(str(tmp_path / "cap-%Y.pcap"), rotate_bytes=20_000)
    with caplog.at_level(logging.INFO, logger="pktstream"):
        for b in make_batches(6, 40):
            sink.write(Source("s1", "h", "eth0", 1, 262144), b)
            sink.flush()
        sink.close()
    files = sorted(str(p) for p in tmp_path.iterdir())
    assert len(files) > 2 and not any("%" in f for f in files)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("completed ")]
    assert sorted(m.split()[1] for m in logged) == files
    assert all(m.endswith(f"({os.path.getsize(m.split()[1])} bytes)") for m in logged)


OWNER = "/var/lib/pktstream/receiver-state.json"  # a receiver's state file (markers' owner)


def _two_sensors_b_after_the_flush(tmp_path, fmt: str = "pcapng", *, index: bool = False, owner: str = OWNER):
    """A per-sensor rotating FileSink as a receiver with a state dir drives it: sensor a
    written, flushed, its state saved and acknowledged; then sensor b -- first seen after that
    flush -- written across rotations, and the process dies. Returns (state acknowledged, b's
    batches, a's batch, sink options)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    b = incompressible_batches(4, 20)  # (rotation by size counts a .zst file's compressed bytes)
    a_batch = make_batches(1, 20, seed=4)[0]
    opts = {"directory": str(tmp_path), "format": fmt, "rotate_bytes": b[0].nbytes + 200, "index": index}
    sink = FileSink(**opts)
    assert sink.recover_unacknowledged(None, owner) == []  # (the start: nothing persisted yet)
    sink.use_acknowledgements()
    sink.write(Source("a", "h", "eth0", 1, 262144), a_batch)
    state = json.loads(json.dumps(sink.flush()))
    sink.persisted(state)  # the receiver saved it (a's marker goes), then acknowledges
    sink.acknowledged(state)
    for x in b[:3]:
        sink.write(Source("b", "h", "eth0", 1, 262144), x)
    _crash(sink)
    return state, b, a_batch, opts


@pytest.mark.parametrize("fmt", ["pcapng", "pcap.zst"])
def test_recovery_removes_the_files_of_a_sensor_first_seen_after_the_last_flush(tmp_path, fmt):
    """No persisted state names an output opened after the last acknowledged flush: its files
    -- completed by rotation, and its .part -- stayed after a crash, and the sensor resent their
    packets into new files: every one of them twice in the directory (found in session 21). The
    output keeps the names of its files in a marker until an acknowledged state names it."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    state, b, a_batch, opts = _two_sensors_b_after_the_flush(tmp_path, fmt)
    names = sorted(os.listdir(tmp_path))
    b_files = [n for n in names if n.startswith("b.")]
    assert len([n for n in b_files if n.endswith(fmt)]) >= 1 and b_files[-1].endswith(".part"), b_files
    assert sum(n.startswith(".pktstream-unacked-") for n in names) == 1  # (a's output was acknowledged)
    after = FileSink.recover(state)
    again = FileSink(**opts)
    removed = again.recover_unacknowledged(after, OWNER)
    assert sorted(os.path.basename(p) for p in removed) == b_files
    assert not [n for n in _ls(tmp_path) if n.startswith(("b.", ".pktstream-"))]
    again.resume(after)
    again.use_acknowledgements()
    for x in b[:3]:  # the sensor resends what was not acknowledged
        again.write(Source("b", "h", "eth0", 1, 262144), x)
    again.close()
    got = _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("b."))
    assert got == sorted(read_ts_of(b[0]) + read_ts_of(b[1]) + read_ts_of(b[2]))  # once each
    assert _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("a.")) == read_ts_of(a_batch)


def test_a_crash_between_saving_the_state_and_removing_the_marker_keeps_the_files(tmp_path):
    """The receiver removes an output's marker right after saving a state that names it, before
    it acknowledges anything; a crash between the two leaves the marker, and the state then
    names the output: nothing of it is removed beyond what the usual recovery cuts."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    b = make_batches(2, 20)
    sink = FileSink(directory=str(tmp_path), format="pcapng")
    sink.recover_unacknowledged(None, OWNER)
    sink.write(Source("b", "h", "eth0", 1, 262144), b[0])
    state = json.loads(json.dumps(sink.flush()))  # saved; the crash comes before persisted()
    _crash(sink)
    assert sum(n.startswith(".pktstream-unacked-") for n in os.listdir(tmp_path)) == 1
    after = FileSink.recover(state)
    assert FileSink(directory=str(tmp_path), format="pcapng").recover_unacknowledged(after, OWNER) == []
    assert _ls(tmp_path) == ["b.pcapng"]
    assert read_ts(str(tmp_path / "b.pcapng")) == read_ts_of(b[0])


def test_an_acknowledged_output_idle_until_a_crash_keeps_every_packet(tmp_path):
    """A first version removed an output's marker only at the output thread's next flush after
    the acknowledgement: a sink idle from its first acknowledgement to a crash kept the marker,
    and a start without a state for it removed acknowledged packets (cold review). The marker
    goes when the state is saved, before anything is acknowledged."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    b = make_batches(1, 20)[0]
    sink = FileSink(directory=str(tmp_path), format="pcapng")
    sink.recover_unacknowledged(None, OWNER)
    sink.use_acknowledgements()
    sink.write(Source("b", "h", "eth0", 1, 262144), b)
    state = json.loads(json.dumps(sink.flush()))
    sink.persisted(state)
    sink.acknowledged(state)  # the sensor drops these packets now
    _crash(sink)  # idle until the crash
    assert not [n for n in _ls(tmp_path) if n.startswith(".")]
    for st in (None, FileSink.recover(state)):  # a start without the state (moved away), and with it
        assert FileSink(directory=str(tmp_path), format="pcapng").recover_unacknowledged(st, OWNER) == []
    assert _all_ts(tmp_path / n for n in _ls(tmp_path)) == read_ts_of(b)


def test_markers_exist_only_under_a_state_dir_and_go_when_a_state_naming_them_is_saved(tmp_path):
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batch = make_batches(1, 20)[0]
    plain = FileSink(directory=str(tmp_path / "plain"), format="pcapng")  # (a library user, or no state dir)
    plain.use_acknowledgements()
    marked = FileSink(directory=str(tmp_path / "marked"), format="pcapng")
    marked.recover_unacknowledged(None, OWNER)
    for sink in (plain, marked):
        sink.write(Source("s1", "h", "eth0", 1, 262144), batch)
    assert not [n for n in _ls(tmp_path / "plain") if n.startswith(".")]
    assert [n for n in os.listdir(tmp_path / "marked") if n.startswith(".pktstream-unacked-")]
    marked.persisted(json.loads(json.dumps(marked.flush())))
    assert not [n for n in _ls(tmp_path / "marked") if n.startswith(".")]
    for sink in (plain, marked):
        sink.close()


def test_recovery_of_an_unacknowledged_output_removes_its_index_too(tmp_path):
    """With the index on, a removed file's catalog row and flow records go with it."""
    from pktstream.archive import Archive
    from pktstream.sinks import FileSink
    state, b, a_batch, opts = _two_sensors_b_after_the_flush(tmp_path, index=True)
    assert {r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()} >= {"b.000000.pcapng", "b.000001.pcapng"}
    after = FileSink.recover(state)
    FileSink(**opts).recover_unacknowledged(after, OWNER)
    assert all(not r["path"].startswith("b.") for r in Archive(str(tmp_path)).catalog().to_pylist())
    import pyarrow.parquet as pq
    flows = list((tmp_path / "_index" / "flows").rglob("*.parquet"))
    assert flows and not [f for p in flows for f in pq.read_table(p, columns=["file"]).column("file").to_pylist()
                          if f.startswith("b.")]


@pytest.mark.parametrize("earlier,interrupted", [(False, False), (True, False), (True, True)],
                         ids=["current", "state-of-a-version-before-its-id", "upgrade-start-interrupted"])
def test_a_receiver_restart_removes_an_unacknowledged_outputs_files(tmp_path, monkeypatch, earlier, interrupted):
    """The same through the receiver's ingest (its state dir), as a restart after SIGKILL runs
    it; also after an upgrade from a version that named the state by its file only (its
    markers were taken for another receiver's, and the files kept: packets twice, third cold
    review), and when the upgrade's first start dies in its recovery (the new id was saved
    before it, and the next start took the old markers for a stranger's: a later cold review)."""
    import collections

    from pktstream.sinks import FileSink
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    out, state_dir = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    state_dir.mkdir()
    owner = os.path.realpath(state_dir / STATE_FILE) + ("" if earlier else "#0123456789abcdef")  # (file, id)
    state, b, a_batch, opts = _two_sensors_b_after_the_flush(out, owner=owner)
    if earlier:  # (what that version saved: no id, no owner)
        state.pop("owner")
    (state_dir / STATE_FILE).write_text(json.dumps({"sensors": {}, "sinks": {f"file:{out}": state},
                                                    **({} if earlier else {"id": "0123456789abcdef"})}))
    if interrupted:
        with monkeypatch.context() as m:
            m.setattr(FileSink, "recover_unacknowledged", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "EIO")))
            with pytest.raises(OSError, match="EIO"):
                Ingest([FileSink(**opts)], counters=collections.Counter(), closing=threading.Event(),
                       state_dir=str(state_dir))
    again = FileSink(**opts)
    Ingest([again], counters=collections.Counter(), closing=threading.Event(), state_dir=str(state_dir)).shutdown()
    assert [n for n in _ls(out) if not n.startswith("a.")] == []
    assert _all_ts(out / n for n in _ls(out)) == read_ts_of(a_batch)


def test_recovery_removes_what_an_output_without_an_open_file_at_the_flush_completed_after_it(tmp_path):
    """A rotating output the acknowledged state lists under ``names`` (no file open at that
    flush: a sensor resumed after a restart that has not sent yet, any output after a reset)
    completed files after the flush; recovery removed only its .part, the completed ones stayed
    and the sensor resent their packets: 57 of 80 twice (cold review). The state gives such an
    output's next file number; recovery removes its files numbered so or higher."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    a_src, b_src = Source("a", "h", "eth0", 1, 262144), Source("b", "h", "eth0", 1, 262144)
    bb = incompressible_batches(4, 20)
    a = make_batches(2, 20, seed=4)
    opts = {"directory": str(tmp_path), "format": "pcapng", "rotate_bytes": bb[0].nbytes + 200}
    sink = FileSink(**opts)  # run 1: a and b written, the flush saved and acknowledged; crash
    sink.write(a_src, a[0])
    sink.write(b_src, bb[0])
    state1 = json.loads(json.dumps(sink.flush()))
    _crash(sink)
    state1 = FileSink.recover(state1)
    sink = FileSink(**opts)  # run 2: b idle at the flush (under "names"), then sends across rotations
    sink.resume(state1)
    sink.write(a_src, a[1])
    state2 = json.loads(json.dumps(sink.flush()))
    assert [n["output"] for n in state2["names"]] == [["b", None]] and state2["names"][0]["next_seq"] >= 1
    for x in bb[1:4]:
        sink.write(b_src, x)
    _crash(sink)
    assert len([n for n in os.listdir(tmp_path) if n.startswith("b.") and n.endswith(".pcapng")]) >= 3
    state2 = FileSink.recover(state2)
    sink = FileSink(**opts)  # run 3: the sensor resends what was not acknowledged
    sink.resume(state2)
    for x in bb[1:4]:
        sink.write(b_src, x)
    sink.close()
    got = _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("b."))
    assert got == sorted(t for x in bb for t in read_ts_of(x))  # each once
    assert _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("a.")) == read_ts_of(a[0]) + read_ts_of(a[1])


def test_a_marker_that_cannot_be_removed_fails_the_save_and_nothing_is_acknowledged(tmp_path, monkeypatch):
    """The receiver acknowledges what a saved state covers only after the markers of the
    outputs it names are gone: a marker it cannot remove fails the save (retried), so a marker
    never lists acknowledged packets."""
    import collections

    from pktstream.sinks import FileSink, file as file_sink
    from pktstream.sinks.base import Source
    from pktstream.stream.receiver.ingest import Ingest
    sink = FileSink(directory=str(tmp_path / "out"), format="pcapng")
    (tmp_path / "state").mkdir()
    ingest = Ingest([sink], counters=collections.Counter(), closing=threading.Event(),
                    state_dir=str(tmp_path / "state"))  # (turns the markers on: recover_unacknowledged)
    sink.write(Source("b", "h", "eth0", 1, 262144), make_batches(1, 20)[0])
    state = json.loads(json.dumps(sink.flush()))
    real_unlink = os.unlink

    def failing(path, *a, **k):
        if os.path.basename(str(path)).startswith(file_sink.UNACKED_PREFIX):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *a, **k)
    monkeypatch.setattr(file_sink.os, "unlink", failing)
    with pytest.raises(OSError):
        ingest._write_state({"sensors": {}, "sinks": {sink.name: state}})
    monkeypatch.setattr(file_sink.os, "unlink", real_unlink)
    assert [n for n in os.listdir(tmp_path / "out") if n.startswith(file_sink.UNACKED_PREFIX)]
    ingest._write_state({"sensors": {}, "sinks": {sink.name: state}})  # the retry
    assert not [n for n in _ls(tmp_path / "out") if n.startswith(".")]
    ingest.shutdown()
    sink.close()


def test_a_writer_that_never_opened_a_file_gives_no_file_number_to_the_state(tmp_path):
    """A sensor's first batch of a run was empty (a DATA frame with count 0): its writer
    exists but never scanned the directory, so its next number is only its start (0). A reset
    recorded that as the output's floor, the next state gave it as the output's next file
    number, and recovery from that state removed every file of the sensor, earlier runs'
    acknowledged ones included (second cold review). Only a writer that opened a file gives one."""
    from pktstream import PacketBatch
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    bb = incompressible_batches(3, 20)
    a = make_batches(1, 20, seed=4)[0]
    a_src, b_src = Source("a", "h", "eth0", 1, 262144), Source("b", "h", "eth0", 1, 262144)
    opts = {"directory": str(tmp_path), "format": "pcapng", "rotate_bytes": bb[0].nbytes + 200}
    sink = FileSink(**opts)  # an earlier run: b's files, acknowledged, closed in order
    for x in bb:
        sink.write(b_src, x)
    sink.close()
    before = _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("b."))
    sink = FileSink(**opts)  # this run (an orderly stop leaves no state for the outputs)
    sink.recover_unacknowledged(None, OWNER)
    sink.write(b_src, PacketBatch.from_records(b"", link_type=1, interface="eth0"))
    sink.write(a_src, a)
    sink.reset()  # (a write failed)
    sink.write(a_src, a)
    state = json.loads(json.dumps(sink.flush()))
    assert all("next_seq" not in n for n in state.get("names", []) if n["output"] == ["b", None])
    sink.persisted(state)
    _crash(sink)
    after = FileSink.recover(state)
    FileSink(**opts).recover_unacknowledged(after, OWNER)
    assert _all_ts(p for p in tmp_path.iterdir() if p.name.startswith("b.")) == before == \
        sorted(t for x in bb for t in read_ts_of(x))


def test_no_commit_after_the_last_one_at_shutdown(tmp_path):
    """A failed commit at shutdown schedules a retry; run after the outputs closed (and forgot
    their states) it saved a state naming none of their outputs and acknowledged their data,
    and the next start removed the files their markers listed: acknowledged packets lost
    (second cold review). No commit runs after shutdown's; and a save naming none of a sink's
    outputs while it has markers out fails (the sink refuses it)."""
    import asyncio
    import collections

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    (tmp_path / "state").mkdir()
    failing = [True]

    async def run() -> None:
        sink = FileSink(directory=str(tmp_path / "out"), format="pcapng")
        ingest = Ingest([sink], counters=collections.Counter(), closing=threading.Event(),
                        state_dir=str(tmp_path / "state"))
        real_write = ingest.state.write

        def write(state):
            if failing[0] and state is not None and state.get("sinks"):
                raise OSError(28, "No space left on device (test)")
            real_write(state)
        ingest.state.write = write
        ingest.start()
        await ingest.dispatch(ingest.sensor_state("b"), 1, Source("b", "h", "eth0", 1, 262144, seq=1),
                              make_batches(1, 20)[0])
        await ingest.finish()  # drains; its commit fails (a retry is scheduled); the output closes
        failing[0] = False
        ingest.commit()  # the retry, after the output closed
        assert ingest.sensors["b"].last_committed == 0  # nothing acknowledged: the sensor resends it
        saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())
        assert saved["sensors"].get("b", {"last_seq": 0})["last_seq"] == 0  # (no final save after a failed commit)
        with pytest.raises(OSError):  # (and the sink's own refusal)
            ingest._write_state({"sensors": {}, "sinks": {}})
        ingest.shutdown()
    asyncio.run(run())


def test_markers_of_another_receiver_or_run_are_discarded_and_their_files_kept(tmp_path):
    """Two receivers writing into one directory (each with its own state): a start of one
    removed the other's live file its marker listed, and the other then acknowledged packets
    into a file that was gone (third cold review). Markers belong to the state that wrote them;
    another owner's (or a run without a state dir) only drops them: the files stay."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batch = make_batches(1, 20)[0]
    other = FileSink(directory=str(tmp_path), format="pcapng")
    other.recover_unacknowledged(None, "/receiver-2/state.json")
    other.write(Source("y", "h", "eth0", 1, 262144), batch)  # y: no saved state names it yet
    assert [n for n in os.listdir(tmp_path) if n.startswith(".pktstream-unacked-")]
    me = FileSink(directory=str(tmp_path) + "/", format="pcapng")  # (the same directory, spelt otherwise)
    assert me.recover_unacknowledged({"open": [], "names": []}, "/receiver-1/state.json") == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pktstream-unacked-")]
    state = json.loads(json.dumps(other.flush()))
    other.persisted(state)  # (its marker is gone already: nothing to remove, no error)
    other.close()
    me.close()
    assert read_ts(str(tmp_path / "y.pcapng")) == read_ts_of(batch)
    # a run without a state dir discards its sink's markers too (a later run with the state
    # would otherwise go by a list whose names this run may reuse)
    third = FileSink(directory=str(tmp_path / "z"), format="pcapng")
    third.recover_unacknowledged(None, OWNER)
    third.write(Source("b", "h", "eth0", 1, 262144), batch)
    _crash(third)
    assert FileSink(directory=str(tmp_path / "z"), format="pcapng").recover_unacknowledged(None, None) == []
    assert _ls(tmp_path / "z") == ["b.pcapng.part"]


class _Killed(BaseException):
    """The process dies here (no ``except Exception`` catches it)."""


def test_a_recovery_killed_between_a_files_removal_and_its_index_leaves_no_row_of_a_missing_file(tmp_path,
                                                                                                 monkeypatch):
    """recover_unacknowledged removed a listed file, then its catalog row; killed between the
    two, the row stayed, and the next start -- the file already gone -- never removed it: an
    index row of a file that does not exist (fuzzing of crashes inside recovery). The index
    now goes first."""
    from pktstream.archive import Archive
    from pktstream.sinks import FileSink
    state, b, a_batch, opts = _two_sensors_b_after_the_flush(tmp_path, index=True)
    assert {"b.000000.pcapng", "b.000001.pcapng"} <= {r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()}
    after = FileSink.recover(state)
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        real_unlink(path, *a, **kw)
        if str(path).endswith(".000000.pcapng"):  # killed right after the first listed file went
            raise _Killed(path)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(_Killed):
        FileSink(**opts).recover_unacknowledged(after, OWNER)
    monkeypatch.undo()
    assert not (tmp_path / "b.000000.pcapng").exists()
    FileSink(**opts).recover_unacknowledged(after, OWNER)  # the next start
    files = {n for n in os.listdir(tmp_path) if n.endswith(".pcapng")}
    assert {r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()} <= files
    assert not [f for f in files if f.startswith("b.")]


def _runner(sink):
    """The receiver's runner of ``sink`` (its thread not started: the test calls it)."""
    from pktstream.stream.receiver.outputs import SinkRunner
    return SinkRunner(sink, maxsize=0, closing=threading.Event(), on_flushed=lambda *a: None)


def _bounded_retries(monkeypatch, tries: int = 5) -> None:
    """The runner's pause between tries, without the wait; past ``tries`` the test fails (a
    runner retrying for ever is the failure, not a hang)."""
    pauses = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) > tries:
            raise AssertionError(f"the runner is still retrying after {tries} tries")
    monkeypatch.setattr(time, "sleep", sleep)


def _acknowledge(sink, state: dict) -> dict:
    """What the receiver does with a flushed state: save it, then acknowledge."""
    state = json.loads(json.dumps(state))
    sink.persisted(state)
    sink.acknowledged(state)
    return state


def _packets(directory, ext: str) -> list[int]:
    return _all_ts(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(ext))


@pytest.mark.parametrize("crash", [True, False])
def test_a_time_rotation_that_fails_while_idle_loses_nothing(tmp_path, monkeypatch, crash):
    """An idle output's time rotation failed at its rename (EIO): the writer had dropped the
    file, whose .part held acknowledged packets, and the runner only counted the error -- the
    next state named no open file for it, so a crash's recovery removed that .part, and without
    a crash it was never completed (fuzzing with write errors). The runner now resets the
    output: the file is completed as of its last flush (everything, at idle)."""
    import errno

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    clock = [1_800_000_000.0]
    opts = {"directory": str(tmp_path), "format": "pcap", "rotate_seconds": 10}

    def new_sink():
        s = FileSink(**opts)
        s.opts["clock"] = lambda: clock[0]
        return s
    batches = make_batches(3, 5)
    src = Source("s1", "h", "eth0", 1, 262144)
    sink = new_sink()
    runner = _runner(sink)
    sink.recover_unacknowledged(None, OWNER)
    sink.use_acknowledgements()
    sink.write(src, batches[0])
    _acknowledge(sink, sink.flush())  # batch 0 acknowledged, in s1.000000.pcap.part
    clock[0] += 11  # due; the output is idle
    real_replace = os.replace
    faults = [1]

    def replace(a, b, *x, **kw):  # the rotation's rename fails once
        if faults[0] and str(a).endswith(".pcap.part"):
            faults[0] -= 1
            raise OSError(errno.EIO, "Input/output error", a)
        return real_replace(a, b, *x, **kw)
    monkeypatch.setattr(os, "replace", replace)
    runner._idle()
    monkeypatch.undo()
    assert runner.counters["failures"] == 1 and faults[0] == 0
    state = _acknowledge(sink, sink.flush())  # the next commit
    if crash:
        _crash(sink)
        after = FileSink.recover(state)
        sink = new_sink()
        sink.resume(after)
        sink.recover_unacknowledged(after, OWNER)
    sink.write(src, batches[1])
    sink.flush()
    sink.close()
    assert _packets(tmp_path, ".pcap") == sorted(int(t) - 1_700_000_000 * 10**9 for b in batches[:2] for t in b.ts_ns)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]


def test_a_reset_that_fails_is_tried_again_and_nothing_is_acknowledged_before(tmp_path, monkeypatch):
    """A rotation's rename failed (EIO), then the reset's cut-back too: reset() logged it,
    forgot the output's flushed state and moved on to the next file number; the old .part --
    flushed, acknowledged packets -- was completed by nothing, not by close, not by a crash's
    recovery (fuzzing with two faults in a row). A failed reset is now kept and tried again by
    the next one, and flush() refuses until it worked, so the receiver acknowledges nothing
    past it; here through the receiver's own runner (its retry loop), then a crash."""
    import builtins
    import errno

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(2, 3, seed=5)
    src = Source("s1", "h", "eth0", 1, 262144)
    opts = {"directory": str(tmp_path), "format": "pcapng", "rotate_bytes": batches[0].nbytes + 400}
    sink = FileSink(**opts)
    runner = _runner(sink)
    sink.recover_unacknowledged(None, OWNER)
    sink.use_acknowledgements()
    ok, state = runner._write_with_retry([(1, src, batches[0])])
    assert ok
    _acknowledge(sink, state)  # batch 0: s1.000000.pcapng.part
    faults = [2]
    real_replace, real_open = os.replace, builtins.open

    def eio(name):
        faults[0] -= 1
        raise OSError(errno.EIO, "Input/output error", name)

    def replace(a, b, *x, **kw):  # the rotation's rename
        if faults[0] > 0:
            eio(a)
        return real_replace(a, b, *x, **kw)

    def open_(f, mode="r", *a, **kw):  # the reset's cut-back (open "r+b")
        if faults[0] > 0 and "+" in mode:
            eio(f)
        return real_open(f, mode, *a, **kw)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(builtins, "open", open_)
    _bounded_retries(monkeypatch)
    ok, state = runner._write_with_retry([(2, src, batches[1])])
    monkeypatch.undo()
    assert ok and faults[0] == 0
    # tries: the write (rename fails; reset fails), the flush (refused: the reset is pending;
    # the reset now works), the write again
    assert runner.counters["failures"] == 2
    state = _acknowledge(sink, state)
    _crash(sink)
    after = FileSink.recover(state)
    sink = FileSink(**opts)
    sink.resume(after)
    sink.recover_unacknowledged(after, OWNER)
    sink.close()
    assert _packets(tmp_path, ".pcapng") == sorted(int(t) - 1_700_000_000 * 10**9 for b in batches for t in b.ts_ns)


def test_a_zst_cut_back_that_fails_half_way_is_finished_by_the_next_reset(tmp_path, monkeypatch):
    """A reset cuts a .zst file that rotation completed after the flush back by renaming it to
    its .part name and re-encoding; the re-encode failing (EIO on its temporary file) made the
    reset pending -- and its retry looked only for the completed name, found nothing, and went
    on: the .part, flushed and acknowledged packets, stayed for good (second fuzzing round).
    The retry finishes it. Through the receiver's runner."""
    import errno
    import random

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source

    def batch(i: int, n: int) -> PacketBatch:
        r = random.Random(i)
        data = [b"\x02" * 12 + b"\x08\x00" + r.randbytes(300) for _ in range(n)]  # (incompressible)
        return PacketBatch.from_records(b"".join(struct.pack("<IIII", 1_700_000_000 + i, k, len(d), len(d)) + d
                                                 for k, d in enumerate(data)), link_type=1, interface="eth0")
    src = Source("s1", "h", "eth0", 1, 262144)
    sink = FileSink(directory=str(tmp_path), format="pcapng.zst", rotate_bytes=3000)
    runner = _runner(sink)
    sink.recover_unacknowledged(None, OWNER)
    sink.use_acknowledgements()
    first = batch(0, 3)
    ok, state = runner._write_with_retry([(1, src, first)])
    _acknowledge(sink, state)
    group = [(2 + i, src, batch(1 + i, 8)) for i in range(3)]  # rotates: s1.000000 completed within it
    real_flush, real_open = sink.flush, os.open
    faults = {"flush": 1, "tmp": 1}

    def flush():  # the group's flush fails once (disk full) ...
        if faults["flush"]:
            faults["flush"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush()

    def os_open(path, flags, *a, **kw):  # ... and the reset's re-encode of s1.000000 too
        if str(path).endswith(".part.tmp") and faults["tmp"]:
            faults["tmp"] -= 1
            raise OSError(errno.EIO, "Input/output error", path)
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(sink, "flush", flush)
    monkeypatch.setattr(os, "open", os_open)
    _bounded_retries(monkeypatch)
    ok, state = runner._write_with_retry(group)
    monkeypatch.undo()
    assert ok and faults == {"flush": 0, "tmp": 0}
    _acknowledge(sink, state)
    sink.close()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]
    want = sorted(int(t) - 1_700_000_000 * 10**9 for b in [first] + [g[2] for g in group] for t in b.ts_ns)
    assert _packets(tmp_path, ".zst") == want


def test_an_index_that_cannot_be_written_never_keeps_an_output_from_flushing(tmp_path, monkeypatch):
    """A reset re-indexes the file it cut back; with the index failing (EIO on _index) that
    error made the reset pending, and every later reset failed alike: the output never flushed
    again, though its capture files were fine (second fuzzing round). An index failure is
    logged and tried again later; the capture goes on."""
    import errno

    import pktstream.archive.live as live
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(3, 20)
    src = Source("s1", "h", "eth0", 1, 262144)
    sink = FileSink(directory=str(tmp_path), format="pcap", index=True)
    runner = _runner(sink)
    ok, _ = runner._write_with_retry([(1, src, batches[0])])
    real_flush = sink.flush
    faults = [1]

    def flush():
        if faults[0]:
            faults[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush()

    def repair(*a, **kw):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "_index"))
    monkeypatch.setattr(sink, "flush", flush)
    monkeypatch.setattr(live, "repair", repair)  # the index's directory fails for good
    _bounded_retries(monkeypatch)
    ok, state = runner._write_with_retry([(2, src, batches[1])])
    assert ok and runner.counters["failures"] == 1 and sink.indexer.pending_retries >= 1
    monkeypatch.undo()
    sink.close()
    assert _packets(tmp_path, ".pcap") == sorted(read_ts_of(batches[0]) + read_ts_of(batches[1]))


def test_a_zst_re_encode_that_fails_leaves_no_temporary_copy(tmp_path, monkeypatch):
    """A reset re-encodes a flushed .zst file into NAME.part.tmp, then renames it over the
    .part; the rename failing (disk full) left the temporary copy of the capture file, and a
    crash then left it for good -- recovery removed the .part, never its .tmp (third fuzzing
    round). A failed re-encode removes its copy; recovery removes a removed .part's."""
    import errno

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    batches = make_batches(2, 3)
    src = Source("s1", "h", "eth0", 1, 262144)
    opts = {"directory": str(tmp_path), "format": "pcap.zst", "rotate_bytes": 1}  # (a file per group)
    sink = FileSink(**opts)
    sink.recover_unacknowledged(None, OWNER)
    sink.use_acknowledgements()
    sink.write(src, batches[0])
    state = _acknowledge(sink, sink.flush())  # batch 0: s1.000000
    sink.write(src, batches[1])  # s1.000001, flushed; its state never saved
    sink.flush()
    real_replace = os.replace

    def replace(a, b, *x, **kw):
        if str(a).endswith(".part.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", a)
        return real_replace(a, b, *x, **kw)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        sink.reset()  # (the next group failed: back to the flush; its re-encode fails)
    monkeypatch.undo()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    (tmp_path / "s1.000001.pcap.zst.part.tmp").write_bytes(b"a re-encode a crash cut short")
    _crash(sink)
    after = FileSink.recover(state)
    sink = FileSink(**opts)
    sink.resume(after)
    sink.recover_unacknowledged(after, OWNER)
    sink.write(src, batches[1])  # resent
    _acknowledge(sink, sink.flush())
    sink.close()
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if n.endswith((".tmp", ".part"))], names
    assert _packets(tmp_path, ".zst") == sorted(read_ts_of(batches[0]) + read_ts_of(batches[1]))


def _restart(opts: dict, state: dict, owner: str = OWNER):
    """A receiver's start after a crash: recovery from the saved ``state``, then a new sink."""
    from pktstream.sinks import FileSink
    after = FileSink.recover(state)
    sink = FileSink(**opts)
    sink.resume(after)
    sink.recover_unacknowledged(after, owner)
    sink.use_acknowledgements()
    return sink


@pytest.mark.parametrize("fmt,index", [("pcapng", True), ("pcap.zst", False)])
@pytest.mark.parametrize("saved_open", [True, False], ids=["state-names-the-open-file", "state-names-no-file"])
def test_an_output_reset_twice_before_a_saved_state_holds_nothing_twice_after_a_crash(tmp_path, fmt, index,
                                                                                        saved_open):
    """A per-sensor output that does not rotate moves on to s1~1 after a reset; a second reset
    before the next saved state completed s1~1 (cut back to a flush no saved state names), and
    recovery removed only .part files of those names: after a crash the sensors resent its
    packets into s1~2, twice in the archive (third fuzzing round, documented until now). Free
    names now only grow, the state records the number (``free``, ``next_free``), and recovery
    removes completed files numbered after it -- with their index rows."""
    from pktstream.sinks.base import Source
    src = Source("s1", "h", "eth0", 1, 262144)
    batches = make_batches(3, 4)
    opts = {"directory": str(tmp_path), "format": fmt, "index": index}
    sink = _restart(opts, {})
    sink.write(src, batches[0])
    state = _acknowledge(sink, sink.flush())  # batch 0 in s1, acknowledged
    sink.reset()  # the next group failed (disk full): back to that flush; s1~1 is next
    if not saved_open:  # a state saved now names the output, with no file open
        state = _acknowledge(sink, sink.flush())
        assert [e.get("next_free") for e in state["names"]] == [1]
    sink.write(src, batches[1])  # the group again, in s1~1
    sink.flush()  # flushed; the receiver dies before its state is saved ...
    sink.reset()  # ... after a second write error: s1~1 completed, cut back to that flush
    ext = "." + fmt
    assert (tmp_path / f"s1~1{ext}").exists()
    _crash(sink)
    sink = _restart(opts, state)
    assert not (tmp_path / f"s1~1{ext}").exists()
    if index:  # (its index went with it)
        from pktstream.archive import Archive
        assert [r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()] == [f"s1{ext}"]
    sink.write(src, batches[1])  # resent: never acknowledged
    sink.write(src, batches[2])
    _acknowledge(sink, sink.flush())
    sink.close()
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(ext))
    assert names == [f"s1{ext}", f"s1~1{ext}"]  # (the removed s1~1's number: free again)
    assert _packets(tmp_path, ext) == sorted(read_ts_of(batches[0]) + read_ts_of(batches[1]) + read_ts_of(batches[2]))
    if index:
        assert sorted(r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()) == names


@pytest.mark.parametrize("how", ["empty-batch", "failed-open"])
def test_a_file_opened_after_a_flush_that_named_its_output_is_removed_by_recovery(tmp_path, monkeypatch, how):
    """A new output's writer existed at a flush without a file (its first batch was empty, a
    DATA frame of no packets; or its file's marker could not be written): the flush named the
    output with the number after the one its writer had reserved, so after a crash recovery
    left that file's .part (nothing in it acknowledged) and the resent packets went into the
    next name -- twice, and a .part for good (a cold review)."""
    from pktstream.sinks.base import Source
    from pktstream.sinks.file import WRITER_RECORD
    src = Source("s1", "h", "eth0", 1, 262144)
    batches = make_batches(2, 4)
    opts = {"directory": str(tmp_path), "format": "pcapng"}
    sink = _restart(opts, {})
    if how == "empty-batch":
        sink.write(src, PacketBatch.from_records(b"", link_type=1, interface="eth0"))
    else:
        real = json.dump
        monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
        with pytest.raises(OSError, match="disk full"):
            sink.write(src, batches[0])
        monkeypatch.setattr(json, "dump", real)
    state = _acknowledge(sink, sink.flush())
    assert [e.get("next_free") for e in state["names"]] == [0], state
    sink.write(src, batches[0])  # file 0: s1.pcapng
    sink.flush()  # flushed, never saved: the receiver dies
    _crash(sink)
    sink = _restart(opts, state)
    assert sorted(set(os.listdir(tmp_path)) - {WRITER_RECORD}) == [], os.listdir(tmp_path)
    sink.write(src, batches[0])  # resent
    sink.write(src, batches[1])
    _acknowledge(sink, sink.flush())
    sink.close()
    assert sorted(set(os.listdir(tmp_path)) - {WRITER_RECORD}) == ["s1.pcapng"]
    assert _packets(tmp_path, ".pcapng") == sorted(read_ts_of(batches[0]) + read_ts_of(batches[1]))


def test_recovery_keeps_a_file_a_marker_names_that_another_writer_wrote_since(tmp_path):
    """A receiver's marker lists s9.pcapng (a sensor first seen after its last saved state; the
    failed group's reset removed the file), the receiver dies, and another writer (a script's
    FileSink, or a receiver writing -w DIR/s9.pcapng) writes and completes s9.pcapng: the
    receiver's restart removed it -- the other writer's packets -- by the marker, without
    looking at the writer record (a cold review). It is kept now, and the restart says why."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    s1, s9 = Source("s1", "h", "eth0", 1, 262144), Source("s9", "h", "eth0", 1, 262144)
    ours, theirs = make_batches(2, 4)
    opts = {"directory": str(tmp_path), "format": "pcapng"}
    sink = _restart(opts, {})
    sink.write(s1, ours)
    state = _acknowledge(sink, sink.flush())  # names s1 only
    sink.write(s9, ours)  # s9's marker lists s9.pcapng
    sink.reset()  # (the group failed): nothing of s9 was flushed, its file goes
    assert not (tmp_path / "s9.pcapng").exists() and not (tmp_path / "s9.pcapng.part").exists()
    _crash(sink)
    other = FileSink(str(tmp_path / "s9.pcapng"))  # another writer, no state dir
    other.write(s9, theirs)
    other.flush()
    other.close()
    sink = _restart(opts, state)
    assert _all_ts([tmp_path / "s9.pcapng"]) == read_ts_of(theirs)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pktstream-unacked")]  # (the marker went)
    sink.close()


def test_the_writer_record_names_the_run_that_opened_a_file_last(tmp_path, caplog):
    """Failover partners A and B (state dirs of their own) both writing into one directory, a
    sensor moving A -> B -> A: A's new file (after a write error's reset) left the record
    naming B, whose crash recovery then removed A's open file -- acknowledged packets (a cold
    review). The record is checked before every file: A takes it back (and says that another
    run writes there), and B's recovery keeps what its state does not name."""
    import logging

    from pktstream.sinks.base import Source
    from pktstream.sinks.file import WRITER_RECORD

    def restart(state: dict, owner: str):
        return _restart(opts, state, owner)

    a_owner, b_owner = "/host-a/receiver-state.json#aaaa", "/host-b/receiver-state.json#bbbb"
    opts = {"directory": str(tmp_path), "format": "pcapng"}
    src = Source("s1", "h", "eth0", 1, 262144)
    b0, b1, b2 = make_batches(3, 4)
    a = restart({}, a_owner)
    a.write(src, b0)
    _acknowledge(a, a.flush())  # s1.pcapng, A's
    b = restart({}, b_owner)
    b.write(src, b1)
    b_state = _acknowledge(b, b.flush())  # s1~1.pcapng, B's
    a.reset()  # a write error on A: its next file is s1~2
    with caplog.at_level(logging.WARNING, logger="pktstream"):
        a.write(src, b2)
    _acknowledge(a, a.flush())  # acknowledged in s1~2
    assert json.loads((tmp_path / WRITER_RECORD).read_text())["owner"] == a_owner
    assert "writes there while this one does" in caplog.text
    _crash(b)
    b = restart(b_state, b_owner)  # B killed and restarted: A's s1~2 stays
    a.close()
    b.close()
    assert _packets(tmp_path, ".pcapng") == sorted(read_ts_of(b0) + read_ts_of(b1) + read_ts_of(b2))


def test_a_writer_record_set_but_not_synced_is_not_refused_for_good(tmp_path, monkeypatch):
    """Taking the record back from another run, the directory sync after the rename failed once
    (EIO): the record named this run, the failure stayed noted, and every later flush was
    refused -- nothing acknowledged until a restart (a cold review). The next check clears it."""
    import pktstream.sinks.file as file_sink
    from pktstream.sinks.base import Source
    from pktstream.sinks.file import WRITER_RECORD
    sink = _restart({"directory": str(tmp_path), "format": "pcapng", "fsync": True}, {})
    b0, b1 = make_batches(2, 3)
    sink.write(Source("s1", "h", "eth0", 1, 262144), b0)
    _acknowledge(sink, sink.flush())
    (tmp_path / WRITER_RECORD).write_text(json.dumps({"owner": "/elsewhere/receiver-state.json#bbbb"}))
    real, calls = file_sink.fsync_dir, []

    def fails_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "EIO")
        return real(path)
    monkeypatch.setattr(file_sink, "fsync_dir", fails_once)
    sink.write(Source("s2", "h", "eth0", 1, 262144), b1)  # a second sensor's file: the record taken back
    assert calls and json.loads((tmp_path / WRITER_RECORD).read_text())["owner"] == OWNER
    _acknowledge(sink, sink.flush())
    sink.close()


def test_free_names_are_numbered_past_every_file_of_the_names(tmp_path):
    """A non-rotating output's next name after a reset is past the highest number of its
    names present (a removed s1~1 is not used again: recovery takes higher numbers for files
    newer than its state), and so is a restart's first file."""
    from pktstream.sinks.base import Source
    src = Source("s1", "h", "eth0", 1, 262144)
    batch = make_batches(1, 3)[0]
    for name in ("s1.pcapng", "s1~2.pcapng.part", "s1~3.pcap", "s10.pcapng"):  # (the last two: other names)
        (tmp_path / name).write_bytes(b"")
    sink = _restart({"directory": str(tmp_path)}, {})
    sink.write(src, batch)
    assert sink.flush()["open"][0]["final"] == str(tmp_path / "s1~3.pcapng")
    sink.reset()
    os.unlink(tmp_path / "s1~3.pcapng")
    sink.write(src, batch)
    st = sink.flush()["open"][0]
    assert (st["final"], st["free"]) == (str(tmp_path / "s1~4.pcapng"), 4)
    sink.close()


@pytest.mark.parametrize("rotate", [None, 10**6], ids=["plain", "rotating"])
def test_recovery_from_a_state_keeps_files_another_run_wrote_since(tmp_path, rotate):
    """A receiver with a state dir killed; another run writes into the same directory (one
    without --state-dir, or a receiver the sensors failed over to), acknowledges and stops;
    the first starts again from its state: its recovery removed the other run's files as
    "numbered after the state" -- acknowledged packets lost (cold review). The directory's
    writer record now tells: recovery removes nothing but what its state names there when
    another run wrote there last."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.sinks.file import WRITER_RECORD
    src = Source("s1", "h", "eth0", 1, 262144)
    batches = make_batches(3, 4)
    opts = {"directory": str(tmp_path), "format": "pcapng", "rotate_bytes": rotate}
    sink = _restart(opts, {})
    sink.write(src, batches[0])
    state = _acknowledge(sink, sink.flush())
    _crash(sink)  # run 1 (state dir X) killed
    assert json.loads((tmp_path / WRITER_RECORD).read_text())["owner"] == OWNER
    other = FileSink(**opts)  # run 2: no state dir, acknowledges as it writes
    other.write(src, batches[1])
    other.flush()
    other.close()
    assert not (tmp_path / WRITER_RECORD).exists()
    kept = [n.removesuffix(".part") for n in _ls(tmp_path)]  # (run 1's .part, run 2's file)
    assert len(kept) == 2
    sink = _restart(opts, state)  # run 3: state dir X again
    assert _ls(tmp_path) == kept
    sink.write(src, batches[2])
    _acknowledge(sink, sink.flush())
    sink.close()
    assert _packets(tmp_path, ".pcapng") == sorted(read_ts_of(batches[0]) + read_ts_of(batches[1]) +
                                                   read_ts_of(batches[2]))
    assert json.loads((tmp_path / WRITER_RECORD).read_text())["owner"] == OWNER  # (its own again)


def test_a_path_outputs_free_names_never_match_a_dotted_sensors_file(tmp_path):
    """A merged output ``-w D/site.pcapng`` and per-sensor files in D (sensor ids ``site.2``,
    ``site.3``: dotted ids are allowed) of one receiver: the merged output's free names were
    ``site.N.pcapng``, so its recovery removed the sensors' files -- a completed one holding
    acknowledged packets, and an open .part (cold review). Free names are ``site~N.pcapng``
    for every output now."""
    from pktstream.sinks.base import Source
    b = make_batches(3, 4)
    merged = _restart({"path": str(tmp_path / "site.pcapng")}, {})
    merged.write(Source("x", "h", "eth0", 1, 262144), b[0])
    state = _acknowledge(merged, merged.flush())
    per_sensor = _restart({"directory": str(tmp_path), "format": "pcapng"}, {})
    s2, s3 = Source("site.2", "h", "eth0", 1, 262144), Source("site.3", "h", "eth0", 1, 262144)
    per_sensor.write(s2, b[1])
    per_sensor.write(s3, b[2])
    _acknowledge(per_sensor, per_sensor.flush())
    per_sensor.reset()  # (site.2 and site.3 completed as of that flush)
    per_sensor.write(s3, b[2])  # site.3~1.pcapng.part
    merged.reset()
    merged.write(Source("x", "h", "eth0", 1, 262144), b[0])  # the merged output moves on
    assert "site~1.pcapng.part" in _ls(tmp_path)
    _crash(merged, per_sensor)
    before = set(_ls(tmp_path))
    _restart({"path": str(tmp_path / "site.pcapng")}, state)
    assert set(_ls(tmp_path)) == before - {"site~1.pcapng.part"}


def test_a_recovery_killed_after_a_removal_leaves_no_index_row_of_a_missing_file(tmp_path, monkeypatch):
    """Recovery removes a file opened after its state (a reset-twice output's completed free
    name) and its index row: the row goes first, so a recovery killed right after the file's
    removal leaves no row of a file that is gone (cold review: it went after, with the index
    repair)."""
    from pktstream.archive import Archive
    from pktstream.sinks.base import Source
    src = Source("s1", "h", "eth0", 1, 262144)
    batches = make_batches(2, 4)
    opts = {"directory": str(tmp_path), "format": "pcapng", "index": True}
    sink = _restart(opts, {})
    sink.write(src, batches[0])
    state = _acknowledge(sink, sink.flush())
    sink.reset()
    sink.write(src, batches[1])
    sink.flush()
    sink.reset()  # s1~1 completed and indexed, after the saved state
    _crash(sink)
    assert "s1~1.pcapng" in {r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()}
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        real_unlink(path, *a, **kw)
        if str(path).endswith("s1~1.pcapng"):
            raise _Killed(path)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(_Killed):
        _restart(opts, state)
    monkeypatch.undo()
    assert {r["path"] for r in Archive(str(tmp_path)).catalog().to_pylist()} <= set(_ls(tmp_path))


@pytest.mark.parametrize("saved", [False, True], ids=["killed-before-its-first-state", "killed-after-it"])
@pytest.mark.parametrize("rotate", [None, 10**6], ids=["plain", "rotating"])
def test_another_runs_files_stay_through_a_second_crash(tmp_path, rotate, saved):
    """After the recovery above kept another run's files, the recovering run writes into the
    directory (its writer record names it again) and is killed too: the next recovery -- from
    the recovered state, or from the first state the run saved -- must keep them as well (the
    old state's numbers are below them; the new state's numbers are past them)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    s1, s5 = Source("s1", "h", "eth0", 1, 262144), Source("s5", "h", "eth0", 1, 262144)
    batches = make_batches(4, 4)
    opts = {"directory": str(tmp_path), "format": "pcapng", "rotate_bytes": rotate}
    saved_states: list[dict] = []

    def restart(state: dict):
        after = FileSink.recover(state, saved_states.append)
        saved_states.append(after)
        sink = FileSink(**opts)
        sink.resume(after)
        sink.recover_unacknowledged(after, OWNER)
        sink.use_acknowledgements()
        return sink
    sink = restart({})
    sink.write(s5, batches[0])
    state = _acknowledge(sink, sink.flush())
    _crash(sink)  # run 1 killed
    other = FileSink(**opts)  # run 2: no state dir
    other.write(s5, batches[1])
    other.flush()
    other.close()
    theirs = [n for n in _ls(tmp_path) if not n.endswith(".part")]
    sink = restart(state)  # run 3: keeps run 2's file
    sink.write(s1, batches[2])  # (s5 stays idle)
    if saved:
        saved_states.append(_acknowledge(sink, sink.flush()))
    _crash(sink)
    sink = restart(saved_states[-1])  # run 4
    assert set(theirs) <= set(_ls(tmp_path))
    sink.write(s1, batches[3])
    _acknowledge(sink, sink.flush())
    sink.close()
    want = [t for k in ((0, 1, 2, 3) if saved else (0, 1, 3)) for t in read_ts_of(batches[k])]
    assert _packets(tmp_path, ".pcapng") == sorted(want)


@pytest.mark.parametrize("second", ["stopped", "killed"])
@pytest.mark.parametrize("rotate", [None, 10**6], ids=["plain", "rotating"])
def test_another_runs_part_file_stays_through_later_restarts(tmp_path, rotate, second):
    """Another run (no state dir) killed with acknowledged packets in its .part: the first
    recovery of our state kept it, but once our run had set the writer record again, the next
    recovery removed it -- the .part sweeps went by name, not number (second cold review).
    They go past the state's numbers now, and the states saved number past every file there."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    s1, s5 = Source("s1", "h", "eth0", 1, 262144), Source("s5", "h", "eth0", 1, 262144)
    b = make_batches(3, 4)
    opts = {"directory": str(tmp_path), "format": "pcapng", "rotate_bytes": rotate}
    run = _restart(opts, {})
    run.write(s5, b[0])
    state = _acknowledge(run, run.flush())
    _crash(run)  # run 1 (our state dir) killed
    other = FileSink(**opts)  # run 2: no state dir
    other.write(s5, b[1])
    other.flush()  # (acknowledged as it flushes)
    _crash(other)  # killed too: b[1] only in its .part
    theirs = set(_ls(tmp_path)) - {"s5.pcapng.part", "s5.000000.pcapng.part"}
    assert len(theirs) == 1 and min(theirs).endswith(".part")
    run = _restart(opts, state)  # run 3
    assert theirs <= set(_ls(tmp_path))
    run.write(s1, b[2])  # (s5 idle; the record names us again)
    state = _acknowledge(run, run.flush())
    if second == "stopped":
        run.close()
    else:
        _crash(run)
    _restart(opts, state).close()  # run 4
    assert theirs <= set(_ls(tmp_path))
    assert set(read_ts_of(b[1])) <= set(_packets(tmp_path, ".part"))


def test_a_best_effort_output_keeps_the_writer_record_of_its_receiver(tmp_path):
    """A best-effort output (gate=False) in the directory of a gating one: the receiver set no
    owner on it, so its first file removed the writer record as a stranger's would, and the
    gating output's recovery then kept its unacknowledged files: packets twice for a single
    receiver (second cold review). The receiver gives every output its state's owner -- its
    file and the random id kept in it."""
    import collections

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    from pktstream.sinks.file import WRITER_RECORD
    from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
    out, state_dir = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    gating, best_effort = FileSink(directory=str(out)), FileSink(str(out / "all.pcap"), gate=False)
    ingest = Ingest([gating, best_effort], counters=collections.Counter(), closing=threading.Event(),
                    state_dir=str(state_dir))
    owner = f"{os.path.realpath(state_dir / STATE_FILE)}#{ingest.state_id}"
    assert json.loads((state_dir / STATE_FILE).read_text())["id"] == ingest.state_id  # (kept before any file)
    src, batch = Source("s1", "h", "eth0", 1, 262144), make_batches(1, 4)[0]
    gating.write(src, batch)
    best_effort.write(src, batch)
    assert json.loads((out / WRITER_RECORD).read_text())["owner"] == owner
    assert gating.flush()["owner"] == owner
    gating.close()
    best_effort.close()
    ingest.shutdown()
    again = Ingest([FileSink(directory=str(out))], counters=collections.Counter(), closing=threading.Event(),
                   state_dir=str(state_dir))
    assert again.state_id == ingest.state_id  # (the same state: the same owner)
    again.shutdown()
    os.unlink(state_dir / STATE_FILE)  # a new state at the same path (another host's, a fresh start)
    fresh = Ingest([FileSink(directory=str(out))], counters=collections.Counter(), closing=threading.Event(),
                   state_dir=str(state_dir))
    assert fresh.state_id != ingest.state_id
    fresh.shutdown()


def test_recovery_completes_a_part_whole_in_a_directory_another_run_wrote(tmp_path):
    """The state names a file whose .part is back: ours was completed and moved away (an
    archival job), and another run reused the name and was killed. Recovery cut that run's
    acknowledged packets back to our old size (second cold review); in a directory another run
    wrote since it completes the .part whole."""
    import shutil

    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    s1 = Source("s1", "h", "eth0", 1, 262144)
    small, big = make_batches(1, 2)[0], make_batches(2, 20)[1]
    out, away = tmp_path / "out", tmp_path / "away"
    out.mkdir()
    away.mkdir()
    opts = {"directory": str(out), "format": "pcapng"}
    run = _restart(opts, {})
    run.write(s1, small)
    state = _acknowledge(run, run.flush())
    run.close()
    shutil.move(str(out / "s1.pcapng"), str(away / "s1.pcapng"))
    other = FileSink(**opts)  # no state dir
    other.write(s1, big)
    other.flush()
    _crash(other)
    _restart(opts, state).close()
    assert set(read_ts_of(big)) <= set(_packets(out, ".pcapng"))


def test_a_path_outputs_file_opened_after_a_state_of_an_earlier_version_is_removed(tmp_path):
    """A path output's state saved by a version before 2026-12-04 names its free names with
    ``.`` (cap.1.pcapng); this version opens cap~1.pcapng after it. Killed before its first
    saved state, the next recovery -- from that old state -- swept only cap.N.pcapng.part: the
    unacknowledged cap~1.pcapng.part stayed for good, and the resend went into cap~2 (third
    cold review)."""
    from pktstream.sinks import FileSink
    from pktstream.sinks.base import Source
    src = Source("s1", "h", "eth0", 1, 262144)
    batches = make_batches(2, 4)
    opts = {"path": str(tmp_path / "cap.pcapng")}
    sink = FileSink(**opts)
    sink.write(src, batches[0])
    state = json.loads(json.dumps(sink.flush()))
    _crash(sink)
    for entry in state["open"]:  # (as that version saved it)
        entry["sep"] = "."
        entry.pop("free")
    sink = _restart(opts, state)  # the upgraded receiver
    sink.write(src, batches[1])  # (into cap~1.pcapng: cap.pcapng exists)
    _crash(sink)  # killed before its first saved state
    assert _ls(tmp_path) == ["cap.pcapng", "cap~1.pcapng.part"]
    _restart(opts, state).close()
    assert _ls(tmp_path) == ["cap.pcapng"]
    assert read_ts(str(tmp_path / "cap.pcapng")) == read_ts_of(batches[0])


def test_a_writer_record_that_could_not_be_set_is_set_by_the_next_flush(tmp_path, monkeypatch):
    """Setting the directory's writer record failed at the run's first file (disk full): it
    was not tried again, and a crash recovery then kept everything there -- the unacknowledged
    tail of the open file too: packets twice, for a single receiver (third cold review). The
    next flush sets it."""
    import errno

    from pktstream.sinks.base import Source
    from pktstream.sinks.file import WRITER_RECORD
    sink = _restart({"directory": str(tmp_path), "format": "pcapng"}, {})
    real_replace, faults = os.replace, [1]

    def replace(a, b, *x, **kw):
        if str(b).endswith(WRITER_RECORD) and faults[0]:
            faults[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", b)
        return real_replace(a, b, *x, **kw)
    monkeypatch.setattr(os, "replace", replace)
    sink.write(Source("s1", "h", "eth0", 1, 262144), make_batches(1, 4)[0])
    assert faults == [0] and not (tmp_path / WRITER_RECORD).exists()
    state = _acknowledge(sink, sink.flush())
    assert json.loads((tmp_path / WRITER_RECORD).read_text())["owner"] == state["owner"] == OWNER
    faults[0] = 10**6  # failing for good (and a record of another owner there): a flush refuses
    (tmp_path / WRITER_RECORD).write_text(json.dumps({"owner": "another"}))
    sink._writer_dirs.clear()  # (as at a new directory of the run)
    sink.write(Source("s2", "h", "eth0", 1, 262144), make_batches(1, 4)[0])
    with pytest.raises(OSError, match="not written"):
        sink.flush()
    monkeypatch.undo()
    _acknowledge(sink, sink.flush())
    sink.close()


def test_temporary_files_a_killed_run_left_are_removed(tmp_path):
    """A run killed while writing the writer record left WRITER_RECORD.<pid>.tmp for good, and
    one killed during a .zst re-encode of a file no saved state named left NAME.part.tmp beside
    the .part its marker lists (a fuzzing round): both go at the next start."""
    import subprocess as sp

    from pktstream.sinks import FileSink
    from pktstream.sinks.file import WRITER_RECORD
    state, b, a_batch, opts = _two_sensors_b_after_the_flush(tmp_path, "pcapng.zst")
    dead = sp.Popen(["true"])
    dead.wait()  # (a process id that is gone)
    (tmp_path / f"{WRITER_RECORD}.{dead.pid}.tmp").write_text("{")
    (tmp_path / f"{WRITER_RECORD}.{10**30}.tmp").write_text("{")  # (no pid can be that)
    (tmp_path / f"{WRITER_RECORD}.{dead.pid}-0a1b2c3d.tmp").write_text("{")  # (as named now)
    other = tmp_path / f"{WRITER_RECORD}.\u00b2.tmp"  # (isdigit, but no number: not a record's, kept)
    other.write_text("{")
    parts = [n for n in _ls(tmp_path) if n.startswith("b.") and n.endswith(".part")]
    (tmp_path / (parts[0] + ".tmp")).write_bytes(b"a re-encode a crash cut short")
    after = FileSink.recover(state)
    sink = FileSink(**opts)
    sink.resume(after)
    sink.recover_unacknowledged(after, OWNER)  # (at start: also where the run writes nothing)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == [other.name], os.listdir(tmp_path)
    sink.close()
