"""Unit tests of pieces whose failure modes are hard to reach end to end."""
from __future__ import annotations

import argparse
import errno
import os

import pytest

from pktstream.config import ConfigError, receiver_settings, sensor_settings
from pktstream.exceptions import ClosedError
from pktstream.sinks.file import safe_name
from pktstream.stream import protocol as P
from pktstream.stream.sendwindow import FrameStore


def _frame(seq: int, payload: bytes = b"x" * 100) -> tuple[bytes, bytes]:
    return P.encode_header(P.FrameType.DATA, len(payload), seq=seq, count=0, raw_len=len(payload)), payload


def _seq_of(header: bytes) -> int:
    return P.decode_header(header, max_payload=1 << 20, max_raw=1 << 20).seq


@pytest.mark.parametrize("spool", [False, True])
def test_unsent_blocks_behind_the_receiver_are_renumbered(tmp_path, spool):
    """A sensor whose clock is behind numbers blocks below what the receiver already has: they
    are renumbered above it, in order, instead of passing for acknowledged."""
    store = FrameStore(window_bytes=0 if spool else 1 << 20, spool_dir=str(tmp_path) if spool else None,
                       spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(_frame, 0, 200)
    store.resume(500)
    got = []
    while (nxt := store.after(got[-1] if got else 0)) is not None:
        seq, (header, payload) = nxt
        assert _seq_of(header) == seq
        got.append(seq)
    assert got == [501, 502, 503]
    assert store.put(_frame, 0, 200) == 504
    if spool:
        # handed out: SEQ.frame; never handed out: SEQ.new.frame
        assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".frame")) == \
            [f"{s:020d}.frame" for s in (501, 502, 503)] + [f"{504:020d}.new.frame"]


def test_unsent_blocks_are_renumbered_above_what_the_receiver_accepted_not_only_committed():
    """WELCOME says committed up to 500 and accepted (still being written) up to 700: blocks
    numbered 100-102 that were never sent go above 700 -- above 500 only (501..503), the
    receiver would drop them as duplicates of frames it accepted, and acknowledge them."""
    store = FrameStore(window_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(_frame, 0, 200)
    store.resume(500, 700)
    got = []
    while (nxt := store.after(got[-1] if got else 0)) is not None:
        got.append(nxt[0])
    assert got == [701, 702, 703] and store.put(_frame, 0, 200) == 704


@pytest.mark.parametrize("spool", [False, True])
def test_renumbering_inside_the_unsent_range_keeps_every_block(tmp_path, spool):
    """The receiver's floor falls among the unsent blocks' numbers (100-103, floor 101): every
    block keeps its own payload under a new number above all of them, in order. (Renumbering
    100 -> 102 in the spool once replaced the file of block 102, and so on down the line.)"""
    store = FrameStore(window_bytes=0 if spool else 1 << 20, spool_dir=str(tmp_path) if spool else None,
                       spool_bytes=1 << 20, first_seq=100)
    for i in range(4):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    store.resume(99, 101)
    got = []
    while (nxt := store.after(got[-1][0] if got else 0)) is not None:
        seq, (header, payload) = nxt
        assert _seq_of(header) == seq
        got.append((seq, payload[0]))
    assert [p for _s, p in got] == [0, 1, 2, 3]
    assert [s for s, _p in got] == sorted(s for s, _p in got) and got[0][0] > 103
    if spool:
        assert sorted(int(n[:20]) for n in os.listdir(tmp_path) if n.endswith(".frame")) == [s for s, _p in got]
    assert store.put(_frame, 0, 200) == got[-1][0] + 1


def _sent_all(store) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while (nxt := store.after(got[-1][0] if got else 0)) is not None:
        seq, (header, payload) = nxt
        assert _seq_of(header) == seq
        got.append((seq, bytes(payload)))
    return got


def test_a_renumbering_cut_short_is_undone_and_redone(tmp_path):
    """A kill between a spooled block's new header and its rename leaves a file whose name and
    header disagree: the next run puts the name's number back (never sending it under the
    header's, which would acknowledge the blocks in between), and, the block never having been
    handed out, renumbers it with the others when the receiver says it is behind."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    path = tmp_path / f"{100:020d}.new.frame"
    data = bytearray(path.read_bytes())
    data[:P.HEADER_LEN] = _frame(900)[0]  # the new header was written, the rename did not happen
    path.write_bytes(bytes(data))
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    again.resume(500)
    got = _sent_all(again)
    assert [s for s, _p in got] == [501, 502, 503] and [p[0] for _s, p in got] == [0, 1, 2]


def test_a_previous_runs_never_sent_blocks_behind_the_receiver_are_renumbered(tmp_path, caplog):
    """A sensor whose clock is behind spools blocks while the receiver is away and is restarted
    before it reaches it: the next run renumbers them above the receiver's floor (they were
    never handed out, so the receiver cannot have them), instead of taking them for committed."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    with caplog.at_level("INFO", logger="pktstream"):
        again.resume(500)
    assert "already committed" not in caplog.text
    got = _sent_all(again)
    assert [s for s, _p in got] == [501, 502, 503] and [p[0] for _s, p in got] == [0, 1, 2]
    assert again.dropped_blocks == 0


def test_a_spooled_block_whose_file_is_gone_is_counted_and_the_rest_kept_in_order(tmp_path):
    """Renumbering meets a spooled block whose file was removed behind the sensor's back: that
    block is counted as dropped, the others are renumbered in order and sent, and new blocks
    get numbers above them (no number is handed out twice)."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    (tmp_path / f"{101:020d}.new.frame").unlink()
    store.resume(500)
    assert store.dropped_blocks == 1
    nxt = store.put(lambda seq: _frame(seq, b"\x09" * 100), 0, 200)
    got = _sent_all(store)
    assert [p[0] for _s, p in got] == [0, 2, 9] and [s for s, _p in got] == sorted({s for s, _p in got})
    assert got[-1][0] == nxt > 500


def test_a_kill_in_the_middle_of_a_renumbering_keeps_the_order(tmp_path, monkeypatch):
    """The spool as a kill leaves it right after the first rename of a renumbering (from the
    last block down): the next run sends every block, in the order they were captured."""
    import shutil

    import pktstream.stream.sendwindow as sw
    spool, killed = tmp_path / "s", tmp_path / "killed"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for i in range(4):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    real = os.replace

    def replace(a, b, **kw):
        real(a, b, **kw)
        if not killed.exists():
            shutil.copytree(spool, killed)  # what is on disk at the kill

    monkeypatch.setattr(sw.os, "replace", replace)
    store.resume(500)
    monkeypatch.setattr(sw.os, "replace", real)
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(killed), spool_bytes=1 << 20)
    again.resume(500)
    assert [p[0] for _s, p in _sent_all(again)] == [0, 1, 2, 3]


def test_a_renumbering_cut_short_gets_its_names_number_back(tmp_path):
    """The kill between header and rename, and a next receiver that is *not* ahead: the block
    goes out under its file's number with a header that says the same."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    path = tmp_path / f"{100:020d}.new.frame"
    data = bytearray(path.read_bytes())
    data[:P.HEADER_LEN] = _frame(900)[0]
    path.write_bytes(bytes(data))
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    again.resume(50)
    assert [s for s, _p in _sent_all(again)] == [100, 101, 102]  # (_sent_all checks the headers)


def test_a_spool_that_cannot_be_renamed_still_sends_and_counts_nothing(tmp_path, monkeypatch):
    """A spool that turned read-only (renames fail with EROFS): renumbered blocks go on from
    memory, never-sent ones are sent without their mark; nothing is counted as lost."""
    import errno

    import pktstream.stream.sendwindow as sw
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)

    def refuse(a, b, **_kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sw.os, "replace", refuse)
    store.resume(500)
    got = _sent_all(store)
    assert [p[0] for _s, p in got] == [0, 1, 2] and [s for s, _p in got] == [501, 502, 503]
    assert store.dropped_blocks == 0


def test_a_read_only_spool_resends_and_removes_blocks_by_the_names_they_have(tmp_path, monkeypatch):
    """Renames failing (a spool remounted read-only after an I/O error): a handed-out block kept
    its never-sent name, but a resend and the acknowledgement looked for SEQ.frame -- counted
    lost although on disk, its file left for the next run to send again (a fault-injection
    review). Removals failing too: each acknowledgement raised and cut the session."""
    import errno

    import pktstream.stream.sendwindow as sw
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 2, 200)

    def refuse(*_a, **_kw):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(sw.os, "replace", refuse)
    assert [s for s, _p in _sent_all(store)] == [100, 101, 102]
    got = _sent_all(store)  # resent after a reconnect
    assert [p[0] for _s, p in got] == [0, 1, 2] and store.dropped_blocks == 0
    store.ack(100)
    assert not (tmp_path / f"{100:020d}.new.frame").exists()
    real_unlink = os.unlink
    monkeypatch.setattr(sw.os, "unlink", refuse)
    store.ack(102)  # (no exception: the session goes on)
    assert store.pending()[0] == 0 and store.spool_errors == 5 and store.dropped_blocks == 0  # (3 marks, 2 removals)
    monkeypatch.setattr(sw.os, "unlink", real_unlink)


@pytest.mark.parametrize("offset,value", [(5, P.FrameType.HEARTBEAT), (5, P.FrameType.STATS), (8, 40)])
def test_a_spool_file_whose_header_is_not_a_spooled_blocks_is_dropped_and_counted(tmp_path, offset, value):
    """One changed byte made a spooled block a HEARTBEAT (its packets lost, counted nowhere),
    a STATS frame (every session closed on it: nothing delivered after it, ever), or gave it
    another header length."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for _ in range(2):
        store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=400),
                               b"x" * 100), 4, 200)
    store.close()
    path = tmp_path / f"{100:020d}.new.frame"
    data = bytearray(path.read_bytes())
    if offset == 8:
        data[8:10] = value.to_bytes(2, "little")
    else:
        data[offset] = value
    path.write_bytes(bytes(data))
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    assert again.dropped_blocks == 1 and again.pending()[0] == 1 and not path.exists()
    assert again.dropped_packets == 4


def test_a_previous_runs_block_larger_than_the_receiver_accepts_is_dropped_and_counted(tmp_path):
    """A spooled block larger than the receiver accepts (a run with a larger block size, a
    corrupt raw length): the receiver closed every session on it, and nothing behind it was
    ever delivered (a fault-injection review). It is dropped at the handshake, counted."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for raw in (400, 4000, 400):
        store.put(lambda seq, raw=raw: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=raw),
                                        b"x" * 100), 4, 200)
    assert store.drop_larger(1000) == 0  # (this run's blocks: made at its block size, checked at the handshake)
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    assert again.drop_larger(1000) == 1
    assert [s for s, _p in _sent_all(again)] == [100, 102]
    assert again.dropped_blocks == 1 and again.dropped_packets == 4
    assert not (tmp_path / f"{101:020d}.new.frame").exists()


def test_blocks_that_cannot_be_spilled_at_exit_are_counted_said_once_and_leave_nothing(tmp_path, monkeypatch,
                                                                                         caplog):
    """A full spool disk at SIGTERM: one error line per block, a temporary file left per block
    (counted again as lost by the next start), and the exit report knew frames, not packets."""
    import errno

    import pktstream.stream.sendwindow as sw
    store = FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=400),
                               b"x" * 100), 4, 200)

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sw.os, "fsync", full)
    with caplog.at_level("ERROR", logger="pktstream"):
        assert store.spill() == 0
    assert [r.getMessage() for r in caplog.records] == [
        "spool: cannot keep 3 unacknowledged blocks for the next run ([Errno 28] No space left on device): "
        "they are lost"]
    assert store.unspooled() == (3, 12) and store.spool_errors == 3
    assert sorted(os.listdir(tmp_path)) == ["lock", "seq"]


def test_blocks_the_receiver_has_are_not_counted_lost_for_their_size(tmp_path):
    """drop_larger runs after resume: a previous run's blocks the receiver committed (their
    acknowledgement lost with that run) are gone by then, not counted lost for being larger
    than it now accepts (a review)."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=4000),
                               b"x" * 100), 4, 200)
    _sent_all(store)
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    again.resume(101)
    assert again.drop_larger(1000) == 1 and again.dropped_packets == 4  # (only 102: the receiver has 100, 101)


def test_a_header_decode_rejects_still_counts_its_packets(tmp_path):
    """A stored block whose type byte became HEARTBEAT fails decode_header itself (flags on a
    control frame): its packets were counted as 0."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=100,
                                           flags=P.Flags.STORED), b"x" * 100), 4, 200)
    store.close()
    path = tmp_path / f"{100:020d}.new.frame"
    data = bytearray(path.read_bytes())
    data[5] = P.FrameType.HEARTBEAT
    path.write_bytes(bytes(data))
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    assert again.dropped_blocks == 1 and again.dropped_packets == 4


def test_a_spooled_block_read_failing_for_a_passing_reason_is_kept(tmp_path, monkeypatch):
    """EMFILE (too many open files) reading a spooled block: it was counted lost and its
    intact file removed; the session now ends and the next one reads it (a review)."""
    import errno

    import pktstream.stream.sendwindow as sw
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    store.put(_frame, 0, 200)
    real_open = open

    def emfile(path, *a, **kw):
        if str(path).endswith(".frame"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *a, **kw)
    monkeypatch.setattr(sw, "open", emfile, raising=False)
    with pytest.raises(OSError):
        store.after(0)
    monkeypatch.setattr(sw, "open", real_open, raising=False)
    assert store.dropped_blocks == 0 and store.after(0)[0] == 100


def test_a_block_renumbered_in_memory_removes_its_old_file_when_acknowledged(tmp_path, monkeypatch):
    """A never-sent spooled block renumbered while its file could not be renamed goes on from
    memory; its old file stayed after the acknowledgement, and the next run sent it again
    (a review)."""
    import errno

    import pktstream.stream.sendwindow as sw
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    store.put(_frame, 0, 200)
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    real_replace = os.replace

    def eio(a, b, **kw):
        if str(a).endswith(".new.frame"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(a, b, **kw)
    monkeypatch.setattr(sw.os, "replace", eio)
    again.resume(500)
    monkeypatch.setattr(sw.os, "replace", real_replace)
    seq, _data = again.after(0)
    assert seq == 501
    again.ack(501)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".frame")]


def test_a_handed_out_spooled_block_whose_file_is_gone_is_counted(tmp_path):
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=400),
                               b"x" * 100), 4, 200)
    _sent_all(store)  # handed out once (SEQ.frame now)
    (tmp_path / f"{101:020d}.frame").unlink()
    assert [s for s, _p in _sent_all(store)] == [100, 102]  # resent after a reconnect
    assert store.dropped_blocks == 1 and store.dropped_packets == 4 and store.pending()[0] == 2


def test_a_never_sent_name_before_a_sent_one_is_taken_as_maybe_sent(tmp_path):
    """Never-sent blocks follow every handed-out one; a spool where one does not (a power loss
    reordering renames, a hand edit) loads in order: the early never-sent block counts as maybe
    sent, so renumbering touches only the suffix and skips nothing."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for i in range(3):
        store.put(lambda seq, i=i: _frame(seq, bytes([i]) * 100), 0, 200)
    store.close()
    (tmp_path / f"{101:020d}.new.frame").rename(tmp_path / f"{101:020d}.frame")
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    again.resume(100, 100)
    got = _sent_all(again)
    assert [p[0] for _s, p in got] == [1, 2] and [s for s, _p in got] == sorted(s for s, _p in got)
    assert again.dropped_blocks == 0


def test_previous_runs_frames_the_receiver_has_are_named_not_resent(tmp_path, caplog):
    """Spooled frames of a previous run at or below what the receiver committed (their ACK was
    lost with that run) are not sent again, and the log says how many."""
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=400),
                               b"x" * 100), 4, 200)
    _sent_all(store)  # handed to a connection whose acknowledgements never came back
    store.close()
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    with caplog.at_level("INFO", logger="pktstream"):
        again.resume(101)
    assert "2 frames (8 packets) of a previous run were already committed" in caplog.text
    assert again.after(0)[0] == 102 and again.pending()[0] == 1


def test_sent_blocks_are_acknowledged_not_renumbered():
    store = FrameStore(window_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(_frame, 0, 200)
    store.after(0)  # 100 was sent on an earlier connection
    store.resume(100)
    assert store.after(100)[0] == 101 and store.pending()[0] == 2


def test_truncated_spool_file_is_dropped_and_counted(tmp_path):
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=10)
    store.put(_frame, 0, 200)
    store.put(_frame, 0, 200)
    store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=7, raw_len=400), b"x" * 100), 7, 200)
    path = tmp_path / f"{11:020d}.new.frame"
    path.write_bytes(path.read_bytes()[:-10])  # a power loss cut it short
    counted = tmp_path / f"{12:020d}.new.frame"
    tmp = tmp_path / f"{12:020d}.new.frame.tmp"  # a spill a kill cut short before its rename
    counted.rename(tmp)
    store.close()  # the sensor process ends (its spool lock with it)
    again = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    assert again.pending()[0] == 1 and again.dropped_blocks == 2 and not path.exists() and not tmp.exists()
    assert again.dropped_packets == 7  # (the header of the cut-short spill was readable)


def test_spool_write_error_is_a_counted_drop(tmp_path, caplog, monkeypatch):
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path / "full"), spool_bytes=1 << 20, first_seq=1)
    real_open = os.open

    def full(path, flags, *a, **kw):  # the disk under the spool is full
        if str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(os, "open", full)
    with caplog.at_level("ERROR", logger="pktstream"):
        for _ in range(4):
            assert store.put(_frame, 5, 200) is None
    monkeypatch.setattr(os, "open", real_open)
    assert store.spool_errors == 4 and store.dropped_packets == 20 and not store.spool_gone
    # one line (then one a minute): a full disk fails every block, a line each flooded the log
    assert len(caplog.records) == 1 and "the block's 5 packets are lost" in caplog.records[0].getMessage()


def test_a_spooled_block_that_cannot_be_read_is_counted_and_its_file_removed(tmp_path, monkeypatch):
    """EIO reading a spooled block: counted lost, and its file was left for the next run,
    which removed it as "already committed by the receiver" (it was not)."""
    import errno

    import pktstream.stream.sendwindow as sw
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=100)
    for _ in range(2):
        store.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=4, raw_len=400),
                               b"x" * 100), 4, 200)
    real_open = open

    def eio(path, *a, **kw):
        if str(path).endswith(f"{100:020d}.frame"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, *a, **kw)
    monkeypatch.setattr(sw, "open", eio, raising=False)
    assert [s for s, _p in _sent_all(store)] == [101]
    assert store.dropped_blocks == 1 and store.dropped_packets == 4
    assert not (tmp_path / f"{100:020d}.frame").exists()


def test_sibling_batches_release_independently():
    recs = (1).to_bytes(4, "little") + bytes(4) + (4).to_bytes(4, "little") * 2 + b"abcd"
    a = P.decode_data(P.Frame(P.FrameType.DATA, 1, 1, 0, 1, len(recs), recs), link_type=1, snaplen=100,
                      interface="x")
    b = P.sibling(a)
    view = a[0]
    b.release()
    assert bytes(view) == b"abcd" and len(a) == 1
    with pytest.raises(ClosedError):
        len(b)


def test_safe_name_never_collides():
    assert safe_name("web-1") == "web-1"
    assert safe_name("web:1") != safe_name("web_1")
    assert "/" not in safe_name("../../x") and not safe_name("../../x").startswith(".")


def test_checksumless_zstd_frame_refused():
    import zstandard
    raw = (1).to_bytes(4, "little") + bytes(4) + (4).to_bytes(4, "little") * 2 + b"abcd"
    payload = zstandard.ZstdCompressor(write_checksum=False, write_content_size=True).compress(raw)
    with pytest.raises(P.FrameError, match="checksum"):
        P.decode_data(P.Frame(P.FrameType.DATA, 0, 1, 0, 1, len(raw), payload), link_type=1, snaplen=100,
                      interface="x")


def test_config_rules():
    assert receiver_settings({"input": {"port": 1}, "compressBlockSize": 65}).max_block_bytes == 8 << 20
    assert receiver_settings({"input": {"port": 1}, "compressBlockSize": 16384}).max_block_bytes == 16 << 20
    with pytest.raises(ConfigError, match="auth.keyfile"):
        sensor_settings({"output": {"server": {"address": "a", "port": 1}},
                         "auth": {"enable": True, "keyfile": "k"}})
    # (YAML .nan / .inf: a handshake that never times out, a connection rate never limited)
    for bad, match in ((float("nan"), "finite"), (float("inf"), "finite"), (0, "handshakeTimeout")):
        with pytest.raises(ConfigError, match=match):
            receiver_settings({"input": {"port": 1}, "handshakeTimeout": bad})
    with pytest.raises(ConfigError, match="connectionRate.seconds.*finite"):
        receiver_settings({"input": {"port": 1}, "connectionRate": {"burst": 2, "seconds": float("nan")}})
    assert receiver_settings({"input": {"port": 1}, "handshakeTimeout": "2s"}).handshake_timeout == 2.0


def test_control_frames_of_unusable_json_are_frame_errors():
    """json.loads refuses some payloads with ValueError or RecursionError, not JSONDecodeError:
    every control frame's JSON must fail as FrameError (the peer's error), nothing else."""
    from pktstream.exceptions import FrameError
    for bad in (b"[" * 60000, b'{"a": ' + b"1" * 5000 + b"}", b"\xff\xfe", b"{", b"[1]"):
        with pytest.raises(FrameError, match="HELLO payload"):
            P.Frame(P.FrameType.HELLO, 0, 0, 0, 0, 0, bad).json()


def test_a_bpf_filter_holding_a_nul_is_refused():
    """libpcap stops at a NUL: "tcp\\0 or udp" compiled as "tcp" and matched no UDP packet."""
    import pktstream
    from pktstream._capture import BpfProgram
    with pytest.raises(pktstream.FilterError, match="NUL"):
        BpfProgram("tcp\0 or udp", 1)
    BpfProgram("tcp or udp", 1)


def test_sizes_bare_numbers_are_bytes_and_dash_c_is_tcpdumps():
    from pktstream.cli.stream import _rotate_size, _size
    from pktstream.config import parse_size
    assert [parse_size(v, "x") for v in ("1", "0.5", "1048576", 1048576, "64MiB", "5MB", "512k", "2KB")] == \
        [1, 0, 1048576, 1048576, 64 << 20, 5_000_000, 512_000, 2000]  # (a bare number was x1000)
    assert sensor_settings({"output": {"server": {"address": "a", "port": 1}},
                            "bufferSize": "8388608"}).buffer_bytes == 8388608
    assert _size("8388608") == 8388608
    assert _rotate_size("100") == 100_000_000 and _rotate_size("100MB") == 100_000_000
    assert _rotate_size("0.5") == 500_000 and _rotate_size("1.5") == 1_500_000  # (decimals too)
    for bad in ("inf", "nan", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _rotate_size(bad)
    for bad in ("-1", "abc", "0"):
        with pytest.raises(argparse.ArgumentTypeError) as exc:
            (_rotate_size if bad == "0" else _size)(bad)
        assert bad in str(exc.value) or "positive" in str(exc.value)


def test_offline_capture_never_loses_packets_to_held_batches(tmp_path):
    """Reading a file while holding every batch: no silent loss. Held until the ring is out,
    the reader says so; released, every packet arrives."""
    import pktstream
    from pktstream.lab import traffic
    path = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(path), 3000, size=1000)
    held, total = [], 0
    with pktstream.open_offline(path, block_bytes=70_000, ring_blocks=4) as cap:
        with pytest.raises(BufferError, match="held by a batch"):
            for batch in cap:
                held.append(batch)
        total = sum(len(b) for b in held)
        for b in held:
            b.release()
        total += sum(len(b) for b in cap)
        assert cap.stats()["ring_drops"] == 0
    assert total == 3000


@pytest.mark.parametrize("ring_blocks", [2, 3])
def test_offline_capture_reading_on_while_holding_all_but_one_block_loses_nothing(tmp_path, ring_blocks):
    """The caller keeps the last ring_blocks - 1 batches (e.g. a previous batch kept while the
    next is read): the packet that finds no block is kept for the next read, not dropped."""
    import pktstream
    from pktstream.lab import traffic
    path = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(path), 3000, size=1000)
    expected = [(ts, bytes(p)) for b in pktstream.read(path) for ts, p in zip(b.ts_ns.tolist(), b)]
    got, kept = [], []
    with pktstream.open_offline(path, block_bytes=70_000, ring_blocks=ring_blocks) as cap:
        for batch in cap:
            got.extend((ts, bytes(p)) for ts, p in zip(batch.ts_ns.tolist(), batch))
            kept.append(batch)
            if len(kept) == ring_blocks:
                kept.pop(0).release()
        st = cap.stats()
    assert st["ring_drops"] == 0 and st["packets"] == 3000, st
    assert got == expected


def test_offline_capture_closed_with_a_packet_kept_aside_delivers_it(tmp_path):
    """close() while a packet waits aside for a free block: the next read delivers it (a packet
    read is never lost uncounted; a cold review)."""
    import pktstream
    from pktstream.lab import traffic
    path = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(path), 50, size=1000)
    expected = [bytes(p) for b in pktstream.read(path) for p in b]
    cap = pktstream.open_offline(path, block_bytes=2200, ring_blocks=2)  # two packets a block
    got = []
    a, b = cap.next_batch(), cap.next_batch()
    with pytest.raises(BufferError):
        cap.next_batch()
    got += [bytes(p) for batch in (a, b) for p in batch]
    a.release()
    x = cap.next_batch()  # the block after b; the packet after it is kept aside (b, x held)
    got += [bytes(p) for p in x]
    cap.close()
    with pytest.raises(BufferError):  # (every block still held)
        cap.next_batch()
    b.release()
    last = cap.next_batch()
    assert last is not None and len(last) == 1
    got += [bytes(p) for p in last]
    assert cap.next_batch() is None
    st = cap.stats()
    assert st["packets"] == len(got) and st["ring_drops"] == 0, st
    assert got == expected[:len(got)]
    x.release()
    last.release()


def test_spill_keeps_in_memory_blocks_for_the_next_run(tmp_path):
    store = FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=7)
    for _ in range(3):
        store.put(_frame, 1, 200)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".frame")] == []
    assert store.spill() == 3
    store.close()
    again = FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    assert [again.after(s)[0] for s in (0, 7, 8)] == [7, 8, 9]
    assert again.next_seq > 9


def test_spill_makes_its_renames_durable(tmp_path):
    """A block kept at exit is in its file (fsync'ed) *and* under its name: the spool directory
    is fsync'ed after the last rename, so a power loss right after exit keeps the blocks
    (strace of a real process is the oracle: the syscalls, in order)."""
    import subprocess
    import sys
    spool, log = tmp_path / "spool", tmp_path / "strace.log"
    code = ("from pktstream.stream.sendwindow import FrameStore\n"
            f"s = FrameStore(window_bytes=1 << 20, spool_dir={str(spool)!r}, spool_bytes=1 << 20)\n"
            "for _ in range(3): s.put(lambda q: (b'h' * 16, b'x' * 100), 1, 200)\n"
            "assert s.spill() == 3\n"
            "s.close()\n")
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=openat,fsync,rename,renameat,renameat2",
                    sys.executable, "-c", code], check=True, timeout=60)
    calls = log.read_text().splitlines()
    renames = [k for k, c in enumerate(calls) if c.split(None, 1)[1].startswith("rename") and ".frame" in c]
    assert len(renames) == 3, calls
    opened = [(k, c.rsplit("= ", 1)[1].split()[0]) for k, c in enumerate(calls)
              if "openat(" in c and f'"{spool}"' in c and "O_RDONLY" in c and "= -1" not in c]
    fsynced = [k for k, c in enumerate(calls) for k0, fd in opened
               if k > max(renames) and k > k0 and f"fsync({fd})" in c]
    assert fsynced, calls


def test_adaptive_levels_reach_back_to_the_configured_one():
    from pktstream.stream.sensor import AdaptiveCompressor
    c = AdaptiveCompressor(19)
    c.level = -7
    c._busy = 0.0
    for _ in range(20):
        c._adapt()
    assert c.level == 19


@pytest.mark.parametrize("leave_by", ["ack", "spill", "spool", "detach"])
def test_stored_blocks_wait_in_the_ring_until_acknowledged(tmp_path, leave_by):
    """An incompressible block is sent straight from its ring block (no copy): the block stays
    out of the ring while the frame is unacknowledged and returns when the frame leaves memory
    (acknowledged, kept in the spool at exit, or written to the spool when the window is full)."""
    import pktstream
    from pktstream.lab import traffic
    from pktstream.stream.sensor import AdaptiveCompressor
    path = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(path), 300, size=1000)
    spool = tmp_path / "spool"
    with pktstream.open_offline(path, block_bytes=70_000, ring_blocks=4) as cap:
        batch = next(iter(cap))
        records = bytes(batch)
        payload, flags = AdaptiveCompressor(1).compress(batch)
        assert payload is batch and flags == P.Flags.STORED  # random bytes: not worth compressing
        free = cap.ring.free_blocks
        store = FrameStore(window_bytes=0 if leave_by == "spool" else 1 << 20, spool_dir=str(spool),
                           spool_bytes=1 << 20)

        def make(seq):
            return P.encode_header(P.FrameType.DATA, batch.nbytes, flags=flags, seq=seq, count=len(batch),
                                   raw_len=batch.nbytes), batch

        seq = store.put(make, len(batch), batch.nbytes + P.HEADER_LEN)
        assert store.pending() == (1, batch.nbytes + P.HEADER_LEN)
        if leave_by != "spool":
            assert not batch.released and cap.ring.free_blocks == free
            got, (_, sent) = store.after(0)
            assert got == seq and bytes(sent) == records
        if leave_by == "ack":
            store.ack(seq)
            assert store.pending() == (0, 0)
        elif leave_by == "spill":
            assert store.spill() == 1
        elif leave_by == "detach":  # the capture ended: the frame gets a copy, the ring goes
            assert store.detach("elsewhere") == 0 and store.detach(batch.interface) == 1
            got, (_, sent) = store.after(0)
            assert type(sent) is bytes and sent == records and not batch.released
            del batch, payload, make  # the last references: the block goes back to the ring
            assert cap.ring.free_blocks == free + 1
            return
        assert batch.released and cap.ring.free_blocks == free + 1
        if leave_by != "ack":  # what the next run sends: the same records, read from the spool
            store.close()
            again = FrameStore(window_bytes=1 << 20, spool_dir=str(spool), spool_bytes=1 << 20)
            assert bytes(again.after(0)[1][1]) == records


def test_incompressible_blocks_are_tried_less_and_less_often():
    """Random payloads: each failed zstd try doubles the stored run (32, 64, ... 512); one
    block that compresses again brings the run back to 32."""
    from pktstream.stream.sensor import AdaptiveCompressor
    comp = AdaptiveCompressor(1)
    tries = []
    real = comp._compressor

    def counting():
        tries.append(i)
        return real()

    comp._compressor = counting
    noise = os.urandom(64 << 10)
    for i in range(1 + 33 + 65 + 129 + 257 + 513 + 513):  # noqa: B007 - counting() records i
        comp.compress(noise)
    assert tries == [0, 33, 98, 227, 484, 997, 1510]
    assert comp.stored_blocks == len(range(1 + 33 + 65 + 129 + 257 + 513 + 513))
    for _ in range(513):  # finish the current run, then a compressible block resets it
        comp.compress(b"a" * (64 << 10))
    assert comp.compressed_blocks >= 1 and comp._stored_run == 32


@pytest.mark.parametrize("tls", [False, True])
def test_send_timeout_means_no_progress_not_a_whole_block(tls):
    """A receiver that reads slowly but steadily never trips the send timeout, however long
    the block takes (the timeout is for a peer that takes nothing): over TLS too, whose
    writes have one deadline per call."""
    import socket
    import ssl
    import threading
    import time

    import trustme

    from pktstream.stream.uplink import Link
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def slow_reader():  # ~300 KB/s
        conn, _ = listener.accept()
        if tls:
            conn = server_ctx.wrap_socket(conn, server_side=True)
        with conn:
            while data := conn.recv(16384):
                received.append(len(data))
                time.sleep(0.05)

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    sock.connect(listener.getsockname())
    if tls:
        sock = client_ctx.wrap_socket(sock, server_hostname="localhost")
    block = os.urandom(1 << 20)
    t0 = time.monotonic()
    Link(sock).send([b"h" * 36, block], 1.0)  # takes ~3 s, a 1 s timeout
    assert time.monotonic() - t0 > 1.5  # the case at hand: longer than the timeout
    sock.shutdown(socket.SHUT_WR)  # not close(): unread TLS tickets would make it a reset
    reader.join(10)
    sock.close()
    listener.close()
    assert sum(received) == 36 + len(block)


def test_copies_out_of_the_ring_reuse_their_buffers(tmp_path):
    """Blocks copied out of a ring under pressure go into pooled buffers: an acknowledged
    copy's buffer carries the next block (no fresh allocation), never two blocks at once."""
    import pktstream
    from pktstream.lab import traffic
    from pktstream.stream.sendwindow import CopyPool
    path = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(path), 600, size=1000)
    pool = CopyPool(keep=2)
    with pktstream.open_offline(path, block_bytes=70_000, ring_blocks=4) as cap:
        batches = []
        for b in cap:
            batches.append((bytes(b), pool.copy(b, 70_000)))
            b.release()
    (first, a), (second, b), (third, c) = batches[:3]
    assert bytes(a) == first and bytes(b) == second and a.obj is not b.obj
    pool.give_back(a)
    pool.give_back(a)  # twice by mistake: still one idle buffer
    assert len(pool._idle[70_000]) == 1
    reused = a.obj
    with pktstream.open_offline(path, block_bytes=70_000, ring_blocks=4) as cap:
        batch = next(iter(cap))
        with memoryview(batch) as m:  # a plain byte buffer (memoryview assignment needs the format)
            assert (m.format, m.itemsize, m.readonly) == ("B", 1, True)
        d = pool.copy(batch, 70_000)
        assert d.obj is reused and bytes(d) == first and bytes(b) == second
        batch.release()
    assert len(pool._idle[70_000]) == 0
    import pktstream.stream.sendwindow as W
    assert W.payload_size(d) == len(first)


def test_spool_is_locked_and_sequence_numbers_never_go_back(tmp_path):
    """One process per spool; and a restart numbers its blocks above everything the last run
    may have used, even with a clock that went back (no resume step on Kafka)."""
    from pktstream.exceptions import ConfigError
    store = FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20, first_seq=10**15)
    with pytest.raises(ConfigError, match="in use by another sensor"):
        FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    last = store.put(_frame, 0, 200)
    store.ack(last)
    store.close()
    again = FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20)  # clock "behind"
    assert again.put(_frame, 0, 200) > last
    again.close()


def test_default_spool_place(monkeypatch, tmp_path):
    from pktstream.stream import sendwindow
    monkeypatch.setenv("PKTSTREAM_STATE_DIR", str(tmp_path))
    assert sendwindow.default_spool_dir("web-1") == str(tmp_path / "spool" / "web-1")
    assert sendwindow.default_spool_dir("a/../b") == str(tmp_path / "spool" / "a_.._b")
    monkeypatch.delenv("PKTSTREAM_STATE_DIR")
    expected = "/var/lib/pktstream" if os.geteuid() == 0 else os.path.expanduser("~/.local/state/pktstream")
    if os.geteuid() != 0:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert sendwindow.state_dir() == expected
    assert 0 < sendwindow.default_spool_bytes(str(tmp_path / "x" / "y")) <= 1 << 30


def test_a_reservation_made_by_a_clock_far_ahead_is_ignored(tmp_path):
    """A spool whose sequence reservation is more than half a day ahead of this clock (made
    while the clock was wrong) does not push new blocks beyond what a receiver accepts."""
    import time
    (tmp_path / "seq").write_text(str(time.time_ns() // 1000 + P.SEQ_AHEAD_US * 2))
    store = FrameStore(window_bytes=1 << 20, spool_dir=str(tmp_path), spool_bytes=1 << 20)
    assert store.put(_frame, 0, 200) < time.time_ns() // 1000 + P.SEQ_AHEAD_US
    store.close()


def test_decode_data_is_thread_safe():
    """decode_data is public and called from several threads (receiver sessions, Kafka inputs):
    threads decoding different large frames at the same time (zstandard releases the GIL while
    it decompresses) each get exactly their own packets, each thread with its own decompressor."""
    import struct
    import threading

    import zstandard

    from pktstream.lab.traffic import frames
    nthreads, rounds = 4, 6
    frames_by_thread = []
    for t in range(nthreads):
        pkts = frames(3000, seed=t + 1)   # different content per thread: a mix-up shows
        raw = b"".join(struct.pack("<IIII", t, i, len(p), len(p)) + p for i, p in enumerate(pkts))
        payload = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(raw)
        frames_by_thread.append((P.Frame(P.FrameType.DATA, 0, t + 1, 0, len(pkts), len(raw), payload), raw, pkts))
    start = threading.Barrier(nthreads)
    results: dict[int, list] = {}
    contexts: dict[int, list] = {}  # the decompressor objects themselves (kept alive: ids stay unique)

    def work(t: int) -> None:
        frame, raw, pkts = frames_by_thread[t]
        start.wait()
        out, ctxs = [], []
        for _ in range(rounds):
            batch = P.decode_data(frame, link_type=1, snaplen=65535, interface=f"t{t}", max_raw=len(raw))
            out.append(bytes(batch) == raw and [bytes(v) for v in batch] == pkts)
            ctxs.append(P._dctx())
            batch.release()
        results[t], contexts[t] = out, ctxs

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {t: [True] * rounds for t in range(nthreads)}
    # one decompressor per thread, reused by that thread: none shared between threads
    assert all(all(c is ctxs[0] for c in ctxs) for ctxs in contexts.values())
    assert len({id(ctxs[0]) for ctxs in contexts.values()}) == nthreads


def test_metrics_exposition_parses_and_carries_the_counters():
    """The /metrics text (prometheus_client) parses with Prometheus' own parser and carries the
    receiver's per-sensor, per-output and receiver-level counters, labels escaped."""
    from prometheus_client.parser import text_string_to_metric_families

    from pktstream.sinks import CallbackSink
    from pktstream.stream.receiver import Receiver
    rx = Receiver("127.0.0.1:0", [CallbackSink(lambda s, b: None)])
    sensor = rx.ingest.sensor_state('we"ird\\id')
    sensor.counters.update(packets=7, raw_bytes=700)
    sensor.reported = {"kernel_dropped": 3, "unacked_frames": 2}
    rx.counters["auth_failures"] += 5
    fams = {f.name: f for f in text_string_to_metric_families(rx.prometheus())}
    sample = {(s.name, s.labels.get("sensor")): s.value for f in fams.values() for s in f.samples}
    assert sample[("pktstream_sensor_packets_total", 'we"ird\\id')] == 7
    assert sample[("pktstream_sensor_raw_bytes_total", 'we"ird\\id')] == 700
    assert sample[("pktstream_sensor_kernel_dropped_total", 'we"ird\\id')] == 3
    assert sample[("pktstream_sensor_unacked_frames", 'we"ird\\id')] == 2
    assert sample[("pktstream_sensor_connected", 'we"ird\\id')] == 0
    assert sample[("pktstream_receiver_auth_failures_total", None)] == 5
    assert fams["pktstream_sensor_packets"].type == "counter"
    assert fams["pktstream_sensor_connected"].type == "gauge"


def test_s3_request_attempts_from_yaml_and_flag(tmp_path):
    """output.plugins.s3.requestAttempts / --s3-request-attempts reach the S3 output's botocore
    retry configuration; out of range is a one-line configuration error."""
    import argparse

    from pktstream.cli.cloud import add_receiver_args, apply_receiver_args, receiver_outputs
    base = {"input": {"port": 1}, "output": {"plugins": {"s3": {"bucket": "bkt", "requestAttempts": 5}}}}
    s = receiver_settings(base)
    assert s.s3.request_attempts == 5
    with pytest.raises(ConfigError, match="requestAttempts: 1-20"):
        receiver_settings({**base, "output": {"plugins": {"s3": {"bucket": "bkt", "requestAttempts": 0}}}})
    ap = argparse.ArgumentParser()
    ap.add_argument("-w", dest="write")
    add_receiver_args(ap)
    s = receiver_settings({"input": {"port": 1}})
    args = ap.parse_args(["-w", "s3://bkt/p/", "--s3-request-attempts", "7", "--s3-staging", str(tmp_path),
                          "--s3-endpoint", "http://127.0.0.1:9", "--s3-region", "us-east-1"])
    apply_receiver_args(args, s)
    sink, = receiver_outputs(s)
    try:
        assert sink.client.meta.config.retries["total_max_attempts"] == 7
    finally:
        sink.close()
    with pytest.raises(ConfigError, match="--s3-request-attempts"):
        apply_receiver_args(ap.parse_args(["-w", "s3://bkt/p/", "--s3-request-attempts", "0"]),
                            receiver_settings({"input": {"port": 1}}))


def test_persisted_output_state_never_precedes_the_acknowledgement():
    """Two gating outputs flushing at different points (A at 10 and 20, B at 15): sensors are
    acknowledged up to 15, so A's persisted state must hold 15 (its state at 20: a crash then
    resends 16-20 into A, written twice there, never lost); its state at 10 would cut A back
    and lose 11-15. sink.acknowledged gets the newest state within the acknowledgement (10)."""
    import threading

    from pktstream.sinks import CallbackSink
    from pktstream.stream.receiver.outputs import Outputs
    acked: list = []

    class Held(CallbackSink):
        def acknowledged(self, state):
            acked.append(state)

    a, b = Held(lambda s, x: None), CallbackSink(lambda s, x: None)
    a.name, b.name = "a", "b"
    outs = Outputs([a, b], maxsize=8, closing=threading.Event(), on_flushed=lambda *args: None)
    ra, rb = outs.runners
    ra.flushed(10, {"at": 10})
    ra.flushed(20, {"at": 20})
    rb.flushed(15, {"at": 15})
    committed = outs.committed(20)
    assert committed == 15
    assert outs.states_to_persist(committed) == {"a": {"at": 20}, "b": {"at": 15}}
    outs.acknowledged(committed)
    assert acked == [{"at": 10}]
    outs.acknowledged(committed)  # the same state is given once
    assert acked == [{"at": 10}]
    assert outs.stats()["a"]["flushes_held"] == 2  # (10: the newest acknowledged; 20: not yet)
    rb.flushed(25, {"at": 25})
    outs.acknowledged(outs.committed(25))
    assert acked == [{"at": 10}, {"at": 20}] and outs.stats()["a"]["flushes_held"] == 1


def test_a_copy_of_a_small_block_holds_its_own_size_not_a_whole_block(tmp_path):
    """A quiet link seals small blocks; copied out of the ring while the receiver is away, each
    held a whole pooled block buffer (1 MiB) that the send window counted as its few hundred
    bytes: memory grew ~1 MiB per block without the window ever filling."""
    import pktstream
    from pktstream.lab import traffic
    from pktstream.stream.sendwindow import CopyPool
    path = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(path), 40, size=200)
    pool = CopyPool(keep=2)
    with pktstream.open_offline(path, block_bytes=1 << 20, ring_blocks=4) as cap:
        batch = next(iter(cap))
        small = pool.copy(batch, 1 << 20)
        assert bytes(small) == bytes(batch) and len(small.obj) == batch.nbytes < 1 << 19
        batch.release()
    pool.give_back(small)  # freed, not pooled as a 1 MiB buffer
    assert not any(pool._idle.values())


def test_an_interface_back_with_another_link_type_gets_a_new_index_and_the_old_one_is_announced(tmp_path):
    """Blocks carry an interface index; the receiver reads them with the descriptor announced
    for it. An interface that came back as another link type (a veth replaced by a tun of the
    same name) kept its index: the blocks captured before were written as the new link type
    (Ethernet frames as raw IP), also after a restart (interfaces.json kept names only)."""
    import json as _json

    from pktstream.stream.sensor import DeliveryOptions, Sensor
    spool = tmp_path / "spool"
    s = Sensor("127.0.0.1:1", ["eth9"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=str(spool)))
    eth = s._index_for("eth9", 1, 262144)
    assert s._index_for("lo9", 1, 262144) != eth
    s.store.close()
    # a restart: the earlier run's descriptors are announced (its spooled blocks carry them)
    s2 = Sensor("127.0.0.1:1", ["eth9"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=str(spool)))
    assert {(d["index"], d["name"], d["link_type"]) for d in s2.hello_interfaces()} >= {(eth, "eth9", 1)}
    raw = s2._index_for("eth9", 101, 262144)  # back as raw IP: a new index, the old one still announced
    assert raw != eth and s2.interface_by_index(eth)["link_type"] == 1
    assert s2._index_for("eth9", 1, 65535) not in (eth, raw)  # another snap length: another index too
    s2.store.close()
    s3 = Sensor("127.0.0.1:1", ["eth9"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=str(spool)))
    assert s3._index_for("eth9", 1, 262144) == eth  # the same descriptor keeps its index across restarts
    assert eth not in s3._retired and s3.interface_by_index(raw)["link_type"] == 101
    s3.store.close()
    # a spool of the first format ({name: index}) still gives the name its index
    (spool / "interfaces.json").write_text(_json.dumps({"old0": 7}))
    s4 = Sensor("127.0.0.1:1", ["old0"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=str(spool)))
    assert s4._index_for("old0", 1, 262144) == 7
    s4.store.close()
    # without a spool too a descriptor that comes back gets its index again (no growth per flap)
    s5 = Sensor("127.0.0.1:1", ["eth9"], sensor_id="t2", delivery=DeliveryOptions(spool_dir=None))
    a, b = s5._index_for("eth9", 1, 262144), s5._index_for("eth9", 101, 262144)
    assert {s5._index_for("eth9", lt, 262144) for lt in (1, 101) * 50} == {a, b}
    # a damaged interfaces.json: what a receiver would refuse is dropped, the sensor starts
    (spool / "interfaces.json").write_text('{"descriptors": [{"index": -1, "name": "x", "snaplen": 0}, '
                                           '{"index": 3, "name": "ok0", "link_type": 1, "snaplen": 65535}]}')
    s6 = Sensor("127.0.0.1:1", ["ok0"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=str(spool)))
    assert [d["index"] for d in s6.hello_interfaces()] == [3]
    s6.store.close()
    (spool / "interfaces.json").write_text('{"eth0": Infinity}')
    Sensor("127.0.0.1:1", ["eth0"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=str(spool))).store.close()


def test_stdout_stream_header_snap_length_covers_the_packets_written():
    """A receiver run with a small -s still writes its sensors' packets whole to stdout: the
    pcap header's snap length must cover them, or readers (libpcap, pktstream) cut them."""
    import io
    import struct

    import pktstream
    from pktstream.sinks import StdoutSink
    from pktstream.sinks.base import Source
    frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + bytes(range(200))
    rec = struct.pack("<IIII", 1_732_708_800, 0, len(frame), len(frame)) + frame
    out = io.BytesIO()
    sink = StdoutSink(out, snaplen=96)
    sink.write(Source("s1", "h", "eth0", 1, 1600), pktstream.PacketBatch.from_records(rec, link_type=1, snaplen=1600))
    sink.flush()
    assert struct.unpack_from("<I", out.getvalue(), 16)[0] == 1600
    assert [bytes(p) for b in pktstream.read(io.BytesIO(out.getvalue())) for p in b] == [frame]


def test_file_sink_refuses_a_format_its_file_name_contradicts(tmp_path):
    """Recovery, readers and the index go by the file name: a .zst format written under a .pcap
    name would be cut like a pcap file after a crash (cold review); a name without a capture
    extension and a format given is refused the same way."""
    from pktstream.exceptions import ConfigError
    from pktstream.sinks import FileSink
    for name, fmt in (("cap.pcap", "pcap.zst"), ("cap.pcapng.zst", "pcapng"), ("cap", "pcap")):
        with pytest.raises(ConfigError, match=r"is named \*\." + fmt.replace(".", r"\.")):
            FileSink(str(tmp_path / name), format=fmt)
    assert FileSink(str(tmp_path / "ok.pcap.zst"), format="pcap.zst").format == "pcap.zst"
    assert FileSink(str(tmp_path / "ok.pcap")).format == "pcap"


def test_s3_sink_needs_rotation(tmp_path):
    """An S3 output's objects are its rotated files; one never rotated would be named again
    after a reset under the name the persisted state gives an acknowledged file (cold review)."""
    from pktstream.exceptions import ConfigError
    from pktstream.sinks.s3 import S3Sink
    with pytest.raises(ConfigError, match="needs rotate_bytes or rotate_seconds"):
        S3Sink("b", staging_dir=str(tmp_path), rotate_bytes=None, rotate_seconds=None, client=object())
    assert not os.listdir(tmp_path)  # refused before anything was made


# -- peers' text and keys (cold review, session 19) --------------------------------------------------

@pytest.mark.parametrize("payload", [b'{"name": "\\ud800"}', b'{"name": "\xed\xa0\x80"}',
                                     b'{"x": {"y": ["\\udfff"]}}'])
def test_a_control_frame_with_a_lone_surrogate_is_a_frame_error(payload):
    """Valid JSON, but no text: a lone surrogate passed json.loads, then an interface name
    holding one made every pcapng write raise (nothing acknowledged for any sensor), and a
    proof holding one made the sensor exit."""
    frame = P.Frame(P.FrameType.HELLO, 0, 0, 0, 0, 0, payload)
    with pytest.raises(P.FrameError, match="lone surrogate"):
        frame.json()
    assert P.Frame(P.FrameType.HELLO, 0, 0, 0, 0, 0, '{"name": "caf\u00e9 \U0001F600"}'.encode()).json()


def test_a_proof_that_is_not_ascii_is_refused_not_raised():
    good = P.proof(b"k", "receiver", b"a" * 32, b"b" * 32, "s1")
    assert P.check_proof(good, good)
    for given in ("\ud800", "\u00e9" * 64, None, 5, good[:-1]):
        assert not P.check_proof(good, given)


def test_per_sensor_keys_fail_closed(tmp_path, caplog):
    """A key file lists the sensors let in: empty, it lets none in (it turned authentication
    off); an empty key (anyone can compute its proof) is refused; a key is the text written
    (YAML read 0123 as 83 and yes as True, so the sensor's identical key file was refused)."""
    from pktstream.config import read_key_file
    from pktstream.stream.receiver import Security
    none = Security(auth_keys={})
    assert none.authenticated and none.key_for("any") is None
    with pytest.raises(ConfigError, match="'web-1' has an empty key"):
        Security(auth_keys={"web-1": ""})
    f = tmp_path / "keys.yaml"
    f.write_text("a: 0123\nb: 'yes'\nc: 0x1F\nd: 12:30:00\ne: 'quoted key'\nf: '~'\n")
    f.chmod(0o600)
    assert read_key_file(str(f)) == {"a": "0123", "b": "yes", "c": "0x1F", "d": "12:30:00", "e": "quoted key",
                                     "f": "~"}
    for text, message in [("web-1: ''\n", "'web-1' has an empty key"), ("web-1:\n", "'web-1' has an empty key"),
                          ("web-1: ~   # revoked\n", "'web-1' has an empty key"),  # (was the key "~")
                          ("web-1: null\n", "'web-1' has an empty key"),
                          ("web-1: off\n", "the key of 'web-1' reads as a boolean"),
                          ("web-1: [a, b]\n", "the key of 'web-1' is not text"),
                          ("- a\n", "expected lines 'sensor-id: key'")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_key_file(str(f))
    f.write_text("# every sensor revoked\n")
    with caplog.at_level("WARNING", logger="pktstream"):
        assert read_key_file(str(f)) == {}
    assert "lists no sensor: every sensor is refused" in caplog.text
    with pytest.raises(ConfigError, match="auth.keyfile '/nonexistent/k.yaml' not found"):
        read_key_file("/nonexistent/k.yaml")
    f.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_key_file(str(f))


@pytest.mark.parametrize("yaml_text,allowed", [
    ("input:\n  address: 0.0.0.0\n  port: 8081\n", True),  # upstream, no auth block
    ("input:\n  address: 0.0.0.0\n  port: 8081\nauth:\n  enable: false\n  key: \"\"\n", True),  # upstream's example
    ("input:\n  address: 0.0.0.0\n  port: 8081\nauth:\n  enable: true\n  key: k\n", False),
    ("input:\n  address: 0.0.0.0\n  port: 8081\nallowUnauthenticated: false\n", False),
    ("input:\n  address: 0.0.0.0\n  port: 8081\nauth:\n", False),  # an empty block is no upstream example
])
def test_an_upstream_receiver_config_without_auth_allows_unauthenticated(yaml_text, allowed):
    import yaml
    assert receiver_settings(yaml.safe_load(yaml_text)).allow_unauthenticated is allowed


def test_kafka_stall_timeout_is_checked():
    """0 replaced the producer on every pass (18,959 times in 10 s), nothing delivered."""
    from pktstream.sinks.kafka import KafkaSink
    from pktstream.stream.kafka import check_stall_timeout
    for bad in (0, -1, 0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="stall timeout: must be a number of seconds >= 1"):
            check_stall_timeout(bad)
    assert check_stall_timeout(30) == 30.0
    with pytest.raises(ConfigError, match="stall timeout"):
        KafkaSink("127.0.0.1:9", "t", stall_timeout=0)


def test_librdkafka_log_lines_are_rate_limited_per_facility():
    """A broker outage repeats librdkafka's FAIL line for each reconnect (54 lines in 12 s)."""
    import logging

    from pktstream.stream import kafka
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.args[0])

    log = kafka._librdkafka_logger()
    h = Keep()
    log.addHandler(h)
    old = log.level
    log.setLevel(logging.DEBUG)
    fail, tmout = (f"{name}-{os.getpid()}-{id(got)}" for name in ("FAIL", "REQTMOUT"))  # (a filter's state is global)
    try:
        for fac, text in ((fail, "b1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: refused (after 0ms)"),
                          (fail, "b1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: refused (after 1ms)"),
                          (fail, "b1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: refused (after 2ms)"),
                          (tmout, "b1:9092/1: Timed out 1 in-flight requests"),
                          (fail, "b1:9092/1: SSL handshake failed: certificate verify failed"),
                          (fail, "b1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: refused (after 3ms)")):
            log.log(logging.WARNING, "%s [%s] %s", fac, "rdkafka#producer-1", text)
    finally:
        log.removeHandler(h)
        log.setLevel(old)
    assert got == [fail, tmout, fail]  # the repeated refusal once; the certificate error shows


def test_pcap_mode_on_the_command_line_is_case_insensitive_as_in_yaml():
    from pktstream.cli import build_parser
    args = build_parser(only_command="sensor").parse_args(["sensor", "--pcap-mode", "Allow", "--capture-ports", "80"])
    assert args.pcap_mode == "allow"


def test_a_peers_names_reach_logs_and_files_printable():
    """An interface name or hostname with a newline would forge a log line."""
    from pktstream.stream.protocol import printable
    from pktstream.stream.receiver.ingest import check_interface
    assert printable("eth0") == "eth0" and printable("a\nb\x1b[2J") == "a?b?[2J"
    d = check_interface({"index": 0, "name": "eth0\nERROR forged", "link_type": 1, "snaplen": 100})
    assert d["name"] == "eth0?ERROR forged"


def test_auth_key_in_a_config_file_is_the_text_written(tmp_path):
    """YAML reads ``key: 0123`` as 83: the sensor's key file (and upstream's Go decoder) keep
    the text, so the two sides disagreed."""
    from pktstream.config import load_yaml
    f = tmp_path / "c.yaml"
    f.write_text("output:\n  server:\n    address: 127.0.0.1\n    port: 1\nauth:\n  enable: true\n  key: 0123\n")
    assert sensor_settings(load_yaml(str(f))).auth.key == "0123"
    f.write_text("input:\n  port: 8081\nauth:\n  enable: true\n  key: 12:30\n")
    assert receiver_settings(load_yaml(str(f))).auth.key == "12:30"


def test_a_kafka_block_whose_produce_raised_is_produced_by_the_retry():
    """write() recorded the block as on its way before produce(); when produce raised, the
    receiver's retry skipped it as already sent and the flush waited for a report that could
    not come (the stall timeout, 30 s, then a new producer). Now the retry produces it."""
    import struct

    from pktstream import PacketBatch
    from pktstream.sinks.base import Source
    from pktstream.sinks.kafka import KafkaSink
    sink = KafkaSink("127.0.0.1:9", "t")
    real = sink._producer
    calls = []

    class Flaky:
        def produce(self, topic, **kw):
            calls.append(kw["headers"])
            if len(calls) == 1:
                raise ValueError("produce failed")

        def poll(self, timeout=0):
            return 0

    sink._producer = Flaky()
    rec = struct.pack("<IIII", 1_700_000_000, 0, 60, 60) + bytes(60)
    batch = PacketBatch.from_records(rec, link_type=1)
    src = Source("s1", "h", "eth0", 1, 65535, seq=7)
    with pytest.raises(ValueError):
        sink.write(src, batch)
    sink.write(src, batch)  # the receiver writes the group again after reset()
    assert len(calls) == 2
    sink._producer = real
    sink._pending.clear()
    sink.close()


def test_a_sensor_started_in_the_background_reports_what_ended_it(tmp_path):
    """``Sensor.start()`` runs in a thread: a script learns that it ended, and why, from
    ``running`` and ``error`` (examples/debug_http.py read the private thread before)."""
    from pktstream.stream.sensor import DeliveryOptions, Sensor
    s = Sensor("127.0.0.1:1", ["nosuchdev0"], sensor_id="t1", delivery=DeliveryOptions(spool_dir=None))
    assert not s.running and s.error is None  # not started
    s.start()
    s.join(30)
    assert not s.running
    assert s.error is not None and "nosuchdev0" in str(s.error)


def test_kafka_offset_gaps_count_messages_deleted_before_they_were_read():
    """A Kafka input expects each partition's next offset (the group's committed one, then one
    past each message): a message above it follows messages deleted unread (the topic's
    retention), counted; a rewind (read again) or an unknown start counts nothing."""
    from pktstream.stream.kafka import OffsetGaps
    g = OffsetGaps()
    assert g.seen(0, 17) == 0  # nothing committed: no expectation yet
    assert g.seen(0, 18) == 0 and g.seen(0, 25) == 6  # 19..24 were never read
    g.expect(1, 100)  # the group's committed offset at assignment
    assert g.seen(1, 100) == 0 and g.seen(1, 140) == 39
    assert g.seen(1, 90) == 0 and g.seen(1, 91) == 0  # read again after a rewind: not a loss
    g.forget(1)
    assert g.seen(1, 500) == 0  # revoked and assigned again: no stale expectation


# -- a spool directory removed while the sensor runs ------------------------------------------------
def _counted(packets: int):
    """make_frame for a block of ``packets`` packets."""
    return lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=packets, raw_len=100), b"x" * 100)


def _tree(d) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def _taken_over(spool, first_seq: int, extra: tuple[int, ...]) -> tuple[FrameStore, dict[str, bytes]]:
    """The spool directory removed, then made again and locked by another sensor process whose
    blocks have the same file names as the first's (numbered from ``first_seq`` too, the first
    two handed out; and never-sent files numbered ``extra``): a file operation by path would
    hit one of them."""
    import shutil
    shutil.rmtree(spool)
    other = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=first_seq)
    for _ in range(8):
        other.put(_counted(7), 7, 200)
    assert [other.after(first_seq - 1)[0], other.after(first_seq)[0]] == [first_seq, first_seq + 1]
    for seq in extra:
        (spool / f"{seq:020d}.new.frame").write_bytes(b"".join(_counted(7)(seq)))
    return other, _tree(spool)


def test_a_spool_removed_while_running_is_never_written_to_again(tmp_path, caplog):
    """The spool directory removed while the sensor runs, and made again and locked by another
    sensor process: the first never creates, renames, rewrites, reads or removes a file there --
    its blocks would be the other's to send. Drops of a previous run's blocks, acks, renumbering
    and sends run before and as the removal is noticed (files of the same names are there); its
    never-sent spooled blocks are then counted lost together, in one line, and what does not
    fit its window is dropped and counted; the exit spill and its interfaces.json go nowhere."""
    spool = tmp_path / "spool"
    first = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for _ in range(2):  # a previous run's blocks, larger than the receiver will accept
        first.put(lambda seq: (P.encode_header(P.FrameType.DATA, 100, seq=seq, count=1, raw_len=400),
                               b"x" * 100), 1, 200)
    first.close()
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20)
    base = store.next_seq
    for _ in range(6):
        assert store.put(_counted(3), 3, 200) is not None  # base .. base+5 on disk
    assert [store.after(101)[0], store.after(base)[0]] == [base, base + 1]  # handed out: SEQ.frame
    other, theirs = _taken_over(spool, base, (100, 101))
    floor = base + 1000
    with caplog.at_level("INFO", logger="pktstream"):
        assert store.drop_larger(200) == 2  # 100, 101
        store.ack(base)
        store.window_bytes = 1 << 20
        assert store.put(_counted(1), 1, 200) == base + 6  # (in memory)
        store.resume(floor)  # never sent: base+2 .. base+5 (noticed: their files are gone) and base+6
        assert _tree(spool) == theirs
        assert store.spool_gone and [s for s, _p in _sent_all(store)] == [floor + 5]  # (base+1: committed)
        store.window_bytes = 0
        for _ in range(4):
            assert store.put(_counted(2), 2, 200) is None
        store.ack(floor + 5)
        assert store.spill() == 0
        with pytest.raises(OSError):
            store.write_file("interfaces.json", b"{}")
    assert _tree(spool) == theirs
    assert store.spool_used == 0 and store.pending() == (0, 0)
    # lost: the two too large, base+2 .. base+5 (never sent), 4 puts
    assert (store.dropped_blocks, store.dropped_packets) == (2 + 4 + 4, 2 + 12 + 8)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert sum("was removed while the sensor runs: 4 spooled blocks (12 packets)" in m for m in errors) == 1, errors
    store.close()
    other.close()


def test_blocks_sent_before_the_spool_was_removed_are_not_counted_lost(tmp_path):
    """Blocks the receiver got before the spool went and acknowledges after are delivered, not
    lost; one that has to be sent again (a reconnect) is counted lost then, one by one."""
    import shutil
    spool = tmp_path / "spool"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for _ in range(4):
        store.put(_counted(2), 2, 200)
    assert [s for s, _p in _sent_all(store)] == [100, 101, 102, 103]
    shutil.rmtree(spool)
    assert store.put(_counted(5), 5, 200) is None and store.spool_gone
    assert (store.dropped_blocks, store.dropped_packets) == (1, 5)
    store.ack(101)
    assert store.after(101) is None  # a reconnect: 102 and 103 cannot be read again
    assert (store.dropped_blocks, store.dropped_packets) == (3, 9) and store.pending() == (0, 0)
    store.close()


def test_a_removed_spool_is_noticed_when_its_next_block_is_sent(tmp_path, caplog):
    """A receiver back after the spool went: the first spooled block to send is not there; all
    of them are counted lost in one line (not a line per block), and nothing is sent."""
    import shutil
    spool = tmp_path / "spool"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(_counted(2), 2, 200)
    shutil.rmtree(spool)
    with caplog.at_level("INFO", logger="pktstream"):
        assert store.after(0) is None
    assert store.spool_gone and store.pending() == (0, 0) and (store.dropped_blocks, store.dropped_packets) == (3, 6)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "3 spooled blocks (6 packets)" in errors[0], errors
    store.close()


def test_a_full_spool_removed_while_running_is_noticed_at_the_next_drop(tmp_path, caplog):
    """The likely case (an operator freeing a full disk): the next block does not fit the spool's
    budget, so nothing is written; the removal is still noticed there, the spooled blocks are
    counted lost in one line (not one line each when their turn to be sent comes), and their
    room is not held any more."""
    import shutil
    spool = tmp_path / "spool"
    size = len(_counted(1)(1)[0]) + 100
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=3 * size, first_seq=100)
    for _ in range(3):
        assert store.put(_counted(4), 4, size) is not None
    assert store.put(_counted(4), 4, size) is None  # full
    assert not store.spool_gone
    shutil.rmtree(spool)
    with caplog.at_level("INFO", logger="pktstream"):
        assert store.put(_counted(5), 5, size) is None
        assert store.spool_gone and store.pending() == (0, 0)
        assert store.after(0) is None
        assert store.put(_counted(5), 5, size) is None
    assert store.spool_used == 0
    assert (store.dropped_blocks, store.dropped_packets) == (1 + 3 + 2, 4 + 12 + 10)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "3 spooled blocks (12 packets)" in errors[0], errors
    store.close()


@pytest.mark.parametrize("full", [False, True])
def test_a_removed_spool_whose_link_count_stays_is_noticed_by_a_file_it_cannot_hold(tmp_path, monkeypatch, full):
    """overlayfs keeps a removed directory's link count when it came from a lower layer (e.g.
    a spool directory shipped in the image): the removal is noticed by ENOENT creating a file
    in it -- a block's, or, when the spool is full, a probe's."""
    import shutil
    spool = tmp_path / "spool"
    size = len(_counted(1)(1)[0]) + 100
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=(2 if full else 100) * size, first_seq=1)
    for _ in range(2):
        store.put(_counted(3), 3, size)
    real_fstat = os.fstat

    class _Stat:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return 1 if name == "st_nlink" else getattr(self._st, name)
    monkeypatch.setattr(os, "fstat", lambda fd: _Stat(real_fstat(fd)))
    shutil.rmtree(spool)
    assert store.put(_counted(5), 5, size) is None
    assert store.spool_gone and store.pending() == (0, 0)
    assert (store.dropped_blocks, store.dropped_packets) == (3, 11)


def test_a_spool_moved_away_while_running_goes_on_where_it_is(tmp_path):
    """Renamed (not removed) while the sensor runs: its blocks are still there, and are sent
    and removed there; a directory made at the old path is not touched."""
    spool, moved = tmp_path / "spool", tmp_path / "moved"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    store.put(_counted(1), 1, 200)
    os.rename(spool, moved)
    spool.mkdir()
    assert store.put(_counted(1), 1, 200) == 101
    assert [s for s, _p in _sent_all(store)] == [100, 101]
    store.ack(101)
    assert not store.spool_gone and store.dropped_blocks == 0
    assert not [n for n in os.listdir(moved) if n.endswith(".frame")] and os.listdir(spool) == []
    store.close()


def test_a_closed_store_spools_nowhere(tmp_path, monkeypatch):
    """After close() a block beyond the window is a counted drop: never a file relative to the
    working directory (the spool's descriptor is gone)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = FrameStore(window_bytes=0, spool_dir=str(tmp_path / "spool"), spool_bytes=1 << 20, first_seq=100)
    store.close()
    assert store.put(_counted(2), 2, 200) is None and store.dropped_packets == 2
    assert os.listdir(cwd) == []


def test_a_spool_that_cannot_be_locked_says_why(tmp_path, monkeypatch):
    """Only "would block" means another sensor holds the spool; any other error of flock (no
    locks on a network file system) is said as it is."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match="cannot lock it: No locks available"):
        FrameStore(window_bytes=0, spool_dir=str(tmp_path), spool_bytes=1 << 20)


@pytest.mark.live
def test_a_spool_given_to_the_sensor_user_hands_over_no_link_target(tmp_path):
    """A sensor that drops root gives its spool to the user it becomes -- that user owned the
    spool on earlier runs, and a symbolic link it planted there must not hand its target (any
    file of the host) over, nor a hard link planted there: both are left as they are. (Needs
    root to change owners: marked live.)"""
    import pwd
    nobody = pwd.getpwnam("nobody")
    spool = tmp_path / "spool"
    spool.mkdir()
    target = tmp_path / "shadow"
    target.write_text("secret")
    (spool / "evil").symlink_to(target)
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=1)
    store.put(_counted(1), 1, 200)
    store.chown("nobody")
    os.link(target, spool / "hard")  # (a hard link: its inode is the target's)
    store.chown("nobody")
    assert target.stat().st_uid == 0
    assert spool.stat().st_uid == nobody.pw_uid and (spool / "lock").stat().st_uid == nobody.pw_uid
    assert os.lstat(spool / "evil").st_uid == 0  # (left as it is)
    assert all(os.lstat(spool / n).st_uid == nobody.pw_uid for n in os.listdir(spool) if n not in ("evil", "hard"))
    store.close()


def test_links_planted_in_the_spool_are_never_followed(tmp_path, caplog):
    """A sensor that drops root starts as root in a spool its user owned on earlier runs: a
    symbolic link planted there must not make it read, truncate or write the link's target (the
    sequence reservation's temporary file, a spooled block, interfaces.json) -- before, writing
    ``seq.tmp`` through a link truncated any file of the host."""
    spool = tmp_path / "spool"
    spool.mkdir()
    frame = b"".join(_counted(4)(1))
    targets = {"seq": b"999", "seq.tmp": b"precious", f"{1:020d}.new.frame": frame,
               "interfaces.json": b'{"descriptors": [{"index": 0, "name": "eth0"}]}'}
    for name, data in targets.items():
        (tmp_path / f"target-{name}").write_bytes(data)
        (spool / name).symlink_to(tmp_path / f"target-{name}")
    with caplog.at_level("WARNING", logger="pktstream"):
        store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
        assert store.pending() == (0, 0) and store.dropped_blocks == 1  # the linked block: not taken
        with pytest.raises(OSError):
            store.read_file("interfaces.json")
        store.put(_counted(1), 1, 200)
        store.write_file("interfaces.json", b"{}")
    for name, data in targets.items():
        assert (tmp_path / f"target-{name}").read_bytes() == data, name
    assert not os.path.lexists(spool / f"{1:020d}.new.frame")  # the link removed
    assert (spool / "interfaces.json").read_bytes() == b"{}" and not (spool / "interfaces.json").is_symlink()
    store.close()


def test_a_probe_of_a_full_spool_follows_no_link(tmp_path):
    """The file made to find out whether a full spool was removed is never made through a link
    planted under its name (which would create any file as root, or, pointing nowhere, make an
    intact spool look removed)."""
    spool = tmp_path / "spool"
    size = len(_counted(1)(1)[0]) + 100
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=2 * size, first_seq=1)
    for _ in range(2):
        store.put(_counted(3), 3, size)
    (spool / ".probe").symlink_to(tmp_path / "made-through-the-link")
    assert store.put(_counted(3), 3, size) is None  # full: probed
    assert not (tmp_path / "made-through-the-link").exists() and not store.spool_gone
    assert store.pending()[0] == 2 and (store.dropped_blocks, store.dropped_packets) == (1, 3)
    assert not os.path.lexists(spool / ".probe")  # (the link removed: the name is the probe's)
    (spool / ".probe").symlink_to(tmp_path / "no" / "such" / "dir")
    store._gone_probed = -1.0  # (the next drop probes again: no wait for the once-a-second limit)
    assert store.put(_counted(3), 3, size) is None
    assert not store.spool_gone and store.pending()[0] == 2
    store.close()


def test_after_a_removal_the_exit_report_keeps_nothing_on_the_spool(tmp_path):
    """Blocks handed to a connection before the spool went stay until acknowledged; at exit
    those not acknowledged are lost (their files went with the spool), not "kept for the next
    run"."""
    import shutil
    spool = tmp_path / "spool"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for _ in range(3):
        store.put(_counted(2), 2, 200)
    assert [s for s, _p in _sent_all(store)] == [100, 101, 102]
    shutil.rmtree(spool)
    assert store.spill() == 0 and store.spool_gone
    assert store.spooled_frames() == 0 and store.unspooled() == (3, 6)
    store.close()


@pytest.mark.parametrize("resumed", [True, False])
def test_a_previous_runs_sent_blocks_outlive_the_spool_until_acknowledged(tmp_path, caplog, resumed):
    """Blocks a previous run had handed out (SEQ.frame) may be the receiver's already: when the
    spool goes they stay until the handshake acknowledges them (not lost); those a connection
    needs again are lost then, counted, and said once -- not a line each."""
    import shutil
    spool = tmp_path / "spool"
    first = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for _ in range(5):
        first.put(_counted(2), 2, 200)
    assert [s for s, _p in _sent_all(first)] == [100, 101, 102, 103, 104]
    first.close()
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20)
    shutil.rmtree(spool)
    with caplog.at_level("INFO", logger="pktstream"):
        assert store.put(_counted(1), 1, 200) is None
        assert store.spool_gone and store.pending()[0] == 5
        if resumed:
            store.resume(104, 104)
        assert store.after(0) is None
    lost = 0 if resumed else 5
    assert store.pending() == (0, 0) and (store.dropped_blocks, store.dropped_packets) == (1 + lost, 1 + 2 * lost)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == (1 if resumed else 2) and "0 spooled blocks (0 packets)" in errors[0], errors
    store.close()


def test_hard_links_and_fifos_planted_in_the_spool_are_not_written_through_or_waited_on(tmp_path):
    """A hard link planted as the reservation's temporary file is replaced, not truncated and
    written through (its other name keeps its bytes); a FIFO as the reservation, a spooled block
    or interfaces.json does not stop the start (it was opened blocking) and is not read."""
    import threading
    spool = tmp_path / "spool"
    spool.mkdir()
    (tmp_path / "precious").write_bytes(b"precious")
    os.link(tmp_path / "precious", spool / "seq.tmp")
    for name in ("seq", f"{5:020d}.new.frame", "interfaces.json"):
        os.mkfifo(spool / name)
    made: list[FrameStore] = []
    t = threading.Thread(target=lambda: made.append(FrameStore(window_bytes=0, spool_dir=str(spool),
                                                               spool_bytes=1 << 20, first_seq=100)), daemon=True)
    t.start()
    t.join(60)  # (an event: the thread ends at once; a FIFO opened blocking would hold it forever)
    assert made, "the store did not start (a FIFO was opened blocking)"
    store = made[0]
    assert (tmp_path / "precious").read_bytes() == b"precious"
    assert store.pending() == (0, 0) and not os.path.lexists(spool / f"{5:020d}.new.frame")
    with pytest.raises(OSError):
        store.read_file("interfaces.json")
    assert store.put(_counted(1), 1, 200) == 100 and [s for s, _p in _sent_all(store)] == [100]
    store.close()


def test_a_closed_store_leaves_the_spool_to_the_next_run(tmp_path):
    """After close() nothing is read, removed or counted: the spooled blocks are the next
    run's, sent by it (a misuse, but never a false loss)."""
    spool = tmp_path / "spool"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=100)
    for _ in range(2):
        store.put(_counted(2), 2, 200)
    store.close()
    assert store.after(0) is None
    store.ack(101)
    assert store.spill() == 0 and store.dropped_blocks == 0
    again = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20)
    assert [s for s, _p in _sent_all(again)] == [100, 101]
    again.close()


def test_the_spool_given_to_the_sensor_user_is_only_its_own_files(tmp_path, monkeypatch, caplog):
    """What chown is asked to change (recorded, so without root): the spool and its own files,
    never through a symbolic link, never a hard link's inode or a FIFO; a spool that is itself
    a symbolic link is not given at all (said once)."""
    import pwd

    from pktstream import privileges
    user = pwd.getpwuid(os.getuid()).pw_name
    spool = tmp_path / "spool"
    store = FrameStore(window_bytes=0, spool_dir=str(spool), spool_bytes=1 << 20, first_seq=1)
    store.put(_counted(1), 1, 200)
    (tmp_path / "shadow").write_text("x")
    (spool / "evil").symlink_to(tmp_path / "shadow")
    os.link(tmp_path / "shadow", spool / "hard")
    os.mkfifo(spool / "fifo")
    calls: list[str] = []  # (each file changed through a descriptor of it: its path)
    monkeypatch.setattr(privileges.os, "chown", lambda fd, uid, gid: calls.append(os.readlink(f"/proc/self/fd/{fd}")))
    store.chown(user)
    assert sorted(calls) == sorted([str(spool)] + [str(spool / n) for n in ("lock", "seq", f"{1:020d}.new.frame")])
    store.close()
    linked = tmp_path / "linked"
    linked.symlink_to(spool, target_is_directory=True)
    calls.clear()
    other = FrameStore(window_bytes=0, spool_dir=str(linked) + "/", spool_bytes=1 << 20)  # (a slash follows links)
    with caplog.at_level("WARNING", logger="pktstream"):
        other.chown(user)
    assert calls == [] and "is a symbolic link: not given" in caplog.text
    other.close()
