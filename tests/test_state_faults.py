"""The receiver's state (``--state-dir``) when saving it fails: nothing is acknowledged that
no saved state describes, one timer tries again, the files are cut back to the last saved
state after a stop, and the error lines name what failed (no root needed: faults are injected
in process)."""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import threading
import time

import pytest

from pktstream.sinks import FileSink
from pktstream.sinks.base import Source
from pktstream.stream.receiver import ingest as ingest_mod
from pktstream.stream.receiver.ingest import STATE_FILE, Ingest
from test_partfiles import make_batches, read_ts, read_ts_of

SENSOR = "receiver"  # the sensor id of every batch here


class FailingState:
    """Wraps an Ingest's state file: ``failing`` saves raise ENOSPC; ``attempts`` counts them."""

    def __init__(self, ingest: Ingest) -> None:
        self.real = ingest.state.write
        self.failing = 0  # failures to inject (-1: until told otherwise)
        self.attempts = 0
        ingest.state.write = self.write  # type: ignore[method-assign]

    def write(self, state) -> None:
        if state is not None and state.get("sinks") is not None:
            self.attempts += 1
            if self.failing:
                self.failing -= 1 if self.failing > 0 else 0
                raise OSError(28, "No space left on device (test)")
        self.real(state)


def _ingest(tmp_path) -> tuple[Ingest, FileSink]:
    (tmp_path / "out").mkdir(exist_ok=True)
    sink = FileSink(str(tmp_path / "out" / "cap.pcapng"))
    return Ingest([sink], counters=collections.Counter(), closing=threading.Event(),
                  state_dir=str(tmp_path / "state")), sink


async def _send(ingest: Ingest, seq: int, batch) -> None:
    await ingest.dispatch(ingest.sensor_state(SENSOR), seq, Source(SENSOR, "h", "eth0", 1, 262144, seq=seq), batch)


async def _acked(ingest: Ingest, seq: int) -> None:
    """Until ``seq`` is acknowledged (a commit hook says when; the timeout bounds a failure)."""
    done = asyncio.Event()
    ingest.add_commit_hook(lambda _i: ingest.sensors[SENSOR].last_committed >= seq and done.set())
    if ingest.sensors[SENSOR].last_committed < seq:
        await asyncio.wait_for(done.wait(), 60)


async def _flushed(ingest: Ingest, index: int) -> None:
    """Until the output has flushed batch ``index`` and the commit that follows has run."""
    for _ in range(6000):  # (bounds a failure: 60 s)
        if ingest.outputs.committed(ingest.index) >= index:
            return  # (and the commit after it has run: the same callback notes the flush and commits)
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch {index} not flushed")


def test_a_save_failing_at_stop_leaves_the_files_to_recovery(tmp_path):
    """A stop whose last commit could not save the state completes the files all the same:
    it then saved a state naming none of their outputs, so the next start kept the
    unacknowledged tail that the sensor resends -- packets twice (a fault-injection review).
    Now the state saved last stays, and the next start cuts the file back to it."""
    batches = make_batches(2, 30)

    async def run() -> None:
        ingest, _ = _ingest(tmp_path)
        state = FailingState(ingest)
        ingest.start()
        await _send(ingest, 1, batches[0])
        await _acked(ingest, 1)
        state.failing = -1  # (until the outputs close: stop's commit fails, its final save would work)
        real_close = ingest.outputs.close

        async def close() -> None:
            state.failing = 0
            await real_close()
        ingest.outputs.close = close  # type: ignore[method-assign]
        await _send(ingest, 2, batches[1])
        await ingest.finish()
        ingest.shutdown()
        assert ingest.sensors[SENSOR].last_committed == 1
        assert (ingest.unsaved_at_stop or "").startswith("receiver state not saved at stop (")  # (exit status 3)
    asyncio.run(run())
    saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert saved["sensors"][SENSOR]["last_seq"] == 1 and saved["sinks"], saved
    out = str(tmp_path / "out" / "cap.pcapng")
    assert read_ts(out) == read_ts_of(batches[0]) + read_ts_of(batches[1])  # (completed whole)

    async def restart() -> None:
        ingest, _ = _ingest(tmp_path)  # recovery
        assert ingest.sensors[SENSOR].last_committed == 1  # the sensor resends seq 2
        ingest.start()
        await _send(ingest, 2, batches[1])
        await ingest.finish()
        ingest.shutdown()
    asyncio.run(restart())
    files = sorted(p for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    got = sorted(t for p in files for t in read_ts(str(p)))
    assert got == sorted(read_ts_of(batches[0]) + read_ts_of(batches[1])), [p.name for p in files]


def test_a_final_save_failing_after_the_stop_commit_is_said_and_makes_exit_status_3(tmp_path):
    """The stop's commit saved (everything acknowledged), then the outputs closed and the state
    saved after it failed: the files are complete and the state saved by the commit describes
    them, but the stop was not clean -- said in ``unsaved_at_stop`` (exit status 3), as a
    stop whose state saved is not (None)."""
    batches = make_batches(2, 30)
    stops: list[str | None] = []

    async def run(fail_final: bool) -> None:
        ingest, _ = _ingest(tmp_path)
        state = FailingState(ingest)
        ingest.start()
        await _send(ingest, len(stops) + 1, batches[len(stops)])
        real_close = ingest.outputs.close

        async def close() -> None:
            await real_close()
            state.failing = 1 if fail_final else 0  # (the save after the close)
        ingest.outputs.close = close  # type: ignore[method-assign]
        await ingest.finish()
        ingest.shutdown()
        assert ingest.sensors[SENSOR].last_committed == len(stops) + 1  # (the commit saved)
        stops.append(ingest.unsaved_at_stop)
    asyncio.run(run(fail_final=False))
    asyncio.run(run(fail_final=True))
    assert stops[0] is None
    assert (stops[1] or "").startswith("cannot save the receiver state") and stops[1].endswith(
        "(at stop: the next start recovers from the state saved last)"), stops


def test_a_failing_save_is_tried_again_by_one_timer_and_said_once(tmp_path, monkeypatch, caplog):
    """Each flush during an outage of the state dir started a save of its own, and each failed
    save a retry loop of its own: 166 failing writes and error lines a second after 20 s of a
    sensor at 10 frames/s (a fault-injection review). Now flushes wait for the one timer, and
    the error is said once (then once a minute); a save that works says so and acknowledges."""
    monkeypatch.setattr(ingest_mod, "STATE_RETRY_S", 3600.0)  # (the timer never comes in this test)
    batches = make_batches(20, 5)
    caplog.set_level(logging.WARNING, logger="pktstream.stream.receiver")

    async def run() -> None:
        ingest, _ = _ingest(tmp_path)
        state = FailingState(ingest)
        ingest.start()
        state.failing = -1
        for i, b in enumerate(batches, 1):
            await _send(ingest, i, b)
            await _flushed(ingest, i)  # (a flush, and its commit, per batch)
        assert state.attempts == 1 and ingest.counters["state_write_failures"] == 1
        assert ingest.sensors[SENSOR].last_committed == 0
        state.failing = 0
        await ingest.finish()  # (its commit saves; nothing else tried meanwhile)
        ingest.shutdown()
        assert ingest.sensors[SENSOR].last_committed == 20
    asyncio.run(run())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("cannot save the receiver state: [Errno 28] No space left"), errors
    assert "nothing is acknowledged until it is saved" in errors[0]
    assert any("saved again after 1 failures" in r.getMessage() for r in caplog.records)


def test_the_retry_timer_saves_without_a_flush(tmp_path, monkeypatch):
    """An idle receiver (no flush to come) saves the state and acknowledges once the fault
    passes (a guard of the one timer's retries; the parent's behaviour was the same)."""
    monkeypatch.setattr(ingest_mod, "STATE_RETRY_S", 0.01)

    async def run() -> None:
        ingest, _ = _ingest(tmp_path)
        state = FailingState(ingest)
        ingest.start()
        state.failing = 3
        await _send(ingest, 1, make_batches(1, 5)[0])
        await _acked(ingest, 1)
        assert state.attempts == 4 and ingest.counters["state_write_failures"] == 3
        await ingest.finish()
        ingest.shutdown()
    asyncio.run(run())


def test_a_state_dir_removed_while_running_is_made_again(tmp_path, caplog):
    """``rm -rf`` of the state dir stopped every acknowledgement until someone made it again."""
    caplog.set_level(logging.WARNING, logger="pktstream.stream.receiver")

    async def run() -> None:
        ingest, _ = _ingest(tmp_path)
        ingest.start()
        await _send(ingest, 1, make_batches(1, 5)[0])
        await _acked(ingest, 1)
        shutil.rmtree(tmp_path / "state")
        await _send(ingest, 2, make_batches(1, 5)[0])
        await _acked(ingest, 2)
        await ingest.finish()
        ingest.shutdown()
    asyncio.run(run())
    assert json.loads((tmp_path / "state" / STATE_FILE).read_text())["sensors"][SENSOR]["last_seq"] == 2
    assert any(r.getMessage() == f"state: the directory {tmp_path / 'state'} was removed: made again"
               for r in caplog.records)


def test_a_state_dir_is_made_again_only_itself_and_on_its_filesystem(tmp_path, monkeypatch):
    """Its parent gone too (a volume unmounted), the whole path was made again elsewhere: a later
    start with the volume back would load the old state and cut acknowledged packets away (a
    review)."""
    state = ingest_mod.StateFile(str(tmp_path / "vol" / "state"))
    shutil.rmtree(tmp_path / "vol")
    with pytest.raises(FileNotFoundError, match="cannot save the receiver state"):
        state.write({"sensors": {}})
    assert not (tmp_path / "vol").exists()
    (tmp_path / "vol").mkdir()  # the parent is back, on another filesystem
    real_stat = ingest_mod.os.stat
    monkeypatch.setattr(ingest_mod.os, "stat", lambda p, *a, **kw: os.stat_result(
        (*real_stat(p, *a, **kw)[:2], real_stat(p, *a, **kw).st_dev + 1, *real_stat(p, *a, **kw)[3:])))
    with pytest.raises(OSError, match="not on the filesystem it was on at start"):
        state.write({"sensors": {}})
    assert not (tmp_path / "vol" / "state").exists()


def test_an_unwritable_state_dir_is_refused_at_start(tmp_path, monkeypatch):
    """A state dir that cannot be written (a read-only mount; a file where a directory should
    be) is a configuration error at start, not a receiver that never acknowledges."""
    import builtins

    from pktstream.exceptions import ConfigError
    real_open = builtins.open

    def read_only(path, *a, **kw):
        if str(path).endswith(".probe"):
            raise OSError(30, "Read-only file system")
        return real_open(path, *a, **kw)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(ConfigError, match="^cannot write the receiver state directory .*/ro: read-only file system$"):
        Ingest([], counters=collections.Counter(), closing=threading.Event(), state_dir=str(tmp_path / "ro"))
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="^cannot write the receiver state directory .*/file/state: not a directory$"):
        Ingest([], counters=collections.Counter(), closing=threading.Event(),
               state_dir=str(tmp_path / "file" / "state"))


def test_a_save_error_names_the_state_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC from closing the buffered file named nothing ("no space left on device"), and an
    empty temporary stayed."""
    state = ingest_mod.StateFile(str(tmp_path))
    real_dump = json.dump

    def dump(obj, fh):
        real_dump(obj, fh)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ingest_mod.json, "dump", dump)
    with pytest.raises(OSError, match=f"^\\[Errno 28\\] cannot save the receiver state {tmp_path}/{STATE_FILE}: "
                                      "no space left on device$"):
        state.write({"sensors": {}})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_directory_sync_after_the_writer_record_is_done_again(tmp_path, monkeypatch):
    """--fsync: the output directory's sync after the writer record's rename failed; the next
    flush found the record naming this run and went on without it (after a power loss, the
    record could be gone: recovery would keep unacknowledged files, packets twice)."""
    import pktstream.sinks.file as file_mod
    synced: list[str] = []
    real = file_mod.fsync_dir

    def fsync_dir(path: str) -> None:
        synced.append(path)
        if len(synced) == 1:
            raise OSError(5, "Input/output error (test)")
        real(path)
    monkeypatch.setattr(file_mod, "fsync_dir", fsync_dir)
    sink = FileSink(str(tmp_path / "cap.pcapng"), fsync=True)
    sink.set_owner("/x/receiver-state.json#0123456789abcdef")
    sink.write(Source("s1", "h", "eth0", 1, 262144, seq=1), make_batches(1, 10)[0])
    assert synced == [str(tmp_path)]  # (the failed one)
    assert sink.flush() is not None
    # done again before the flush returned, and then the new file's entry (the next test)
    assert synced == [str(tmp_path)] * 3
    sink.close()


def test_an_unreadable_writer_record_is_rewritten_not_taken_for_another_receiver(tmp_path, caplog):
    """A writer record that cannot be read (here: not JSON) was reported as another receiver
    writing in the directory ("...: None"); it is this run's to write again."""
    caplog.set_level(logging.WARNING, logger="pktstream.stream.receiver")
    owner = "/x/receiver-state.json#0123456789abcdef"
    sink = FileSink(directory=str(tmp_path), format="pcapng")
    sink.set_owner(owner)
    sink.write(Source("a", "h", "eth0", 1, 262144, seq=1), make_batches(1, 5)[0])
    (tmp_path / ".pktstream-writer.json").write_text("{")
    sink.write(Source("b", "h", "eth0", 1, 262144, seq=1), make_batches(1, 5)[0])  # (a new file there)
    assert sink.flush() is not None
    sink.close()
    assert json.loads((tmp_path / ".pktstream-writer.json").read_text())["owner"] == owner
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / '.pktstream-writer.json'}: unreadable: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1): written again"], caplog.text


def test_fsync_syncs_the_directory_of_each_new_file_before_its_first_flush_returns(tmp_path, monkeypatch):
    """--fsync: a new file's directory entry was synced only when the file completed, so its
    acknowledged packets could lose their name in a power loss (POSIX; a review's suspicion)."""
    import pktstream.sinks.file as file_mod
    synced: list[str] = []
    real = file_mod.fsync_dir
    monkeypatch.setattr(file_mod, "fsync_dir", lambda path: (synced.append(path), real(path)))
    sink = FileSink(str(tmp_path / "cap.pcapng"), fsync=True, rotate_bytes=40_000)
    src = Source("s1", "h", "eth0", 1, 262144, seq=1)
    batches = make_batches(4, 30)
    parts = []
    for b in batches:
        sink.write(src, b)
        before = len(synced)
        sink.flush()
        part = next(p.name for p in tmp_path.iterdir() if p.name.endswith(".part"))
        assert synced[before:] == ([str(tmp_path)] if part not in parts else []), (part, parts)
        parts.append(part)
    sink.close()
    assert len(set(parts)) >= 2  # (a rotation: a second new file)


def test_the_error_line_names_the_state_file(tmp_path, monkeypatch, caplog):
    """One line: what failed (the state file), why, and what it means."""
    monkeypatch.setattr(ingest_mod, "STATE_RETRY_S", 3600.0)
    caplog.set_level(logging.ERROR, logger="pktstream.stream.receiver")
    real_dump = json.dump

    def dump(obj, fh, **kw):
        if getattr(fh, "name", "").endswith(STATE_FILE + ".tmp"):
            raise OSError(28, "No space left on device")
        real_dump(obj, fh, **kw)

    async def run() -> None:
        ingest, _ = _ingest(tmp_path)
        monkeypatch.setattr(ingest_mod.json, "dump", dump)  # (after the start's own save)
        ingest.start()
        await _send(ingest, 1, make_batches(1, 5)[0])
        await _flushed(ingest, 1)
        await ingest.finish()
        ingest.shutdown()
        stops.append(ingest.unsaved_at_stop)
    stops: list[str | None] = []
    asyncio.run(run())
    path = tmp_path / "state" / STATE_FILE
    assert stops == [caplog.records[-1].getMessage()]  # (what the receiver's exit status 3 says)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot save the receiver state {path}: no space left on device: nothing is acknowledged until it is "
        "saved (tried again every 3600 s; 1 failures so far)",
        f"receiver state not saved at stop (cannot save the receiver state {path}: no space left on device): "
        "1 frames not acknowledged; the next start recovers the files from the state saved last and the "
        "sensors send them again"]


@pytest.mark.live
def test_the_receiver_exits_3_when_its_state_cannot_be_saved_at_the_stop(procs, tmp_path):
    """A service manager learns of a stop whose state was not saved: exit status 3 and the
    error line (it was 0, the error only logged); a stop with its state saved exits 0. The
    fault is real: the state directory is replaced by a file while the receiver runs."""
    import signal

    from conftest import PKTSTREAM, free_port
    from pktstream.stream import protocol as P
    from test_security import Peer, _data, _records
    key = b"shared-key-for-everyone"
    (tmp_path / "key").write_text(key.decode() + "\n")
    state = tmp_path / "st"

    def receiver(port: int):
        rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--auth-key-file",
                    str(tmp_path / "key"), "-w", str(tmp_path / f"out{port}.pcap"), "--state-dir", str(state)])
        rx.wait_for("listening on")
        return rx

    def peer_with(port: int, seq: int) -> Peer:
        peer = Peer(port)
        assert peer.handshake(key, sensor_id="s1").type == P.FrameType.WELCOME
        peer.send(_data(seq, _records(3)))
        return peer

    now = time.time_ns() // 1000
    port = free_port()
    rx = receiver(port)
    peer = peer_with(port, now)
    ack = peer.recv_frame()
    assert ack is not None and ack.type == P.FrameType.ACK and ack.seq == now
    peer.close()
    assert rx.stop(signal.SIGTERM) == 0, rx.stderr
    assert "not saved" not in rx.stderr

    port = free_port()
    rx = receiver(port)
    shutil.rmtree(state)
    state.write_text("not a directory")
    peer = peer_with(port, now + 1)
    rx.wait_for("cannot save the receiver state")
    assert rx.stop(signal.SIGTERM) == 3, rx.stderr
    assert "receiver state not saved at stop (" in rx.stderr
    frames = []  # (until the stopped receiver's end of the session)
    while (f := peer.recv_frame()) is not None:
        frames.append(f)
    peer.close()
    assert not [f for f in frames if f.type == P.FrameType.ACK], frames  # written, never acknowledged
