"""Receiver outputs end to end: merged pcapng from several sensors, per-sensor files, stdout
into tshark, crash recovery of pcapng and pcap.zst files, rotation, metrics, Python API."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import free_port, read_pcap_dpkt, start_tcpdump, tshark_fields, wait_pcap_count, wait_received, wait_until
from pktstream.lab import traffic
from pktstream.lab.netns import Veth
from test_stream import receiver_cmd, sensor_cmd

pytestmark = pytest.mark.live


def test_several_sensors_into_one_pcapng(procs, tmp_path, mixed_pcap):
    """Two sensors (one with two interfaces) → one pcapng with one interface per sensor
    interface, every packet there, as tshark reads it."""
    port = free_port()
    out = tmp_path / "all.pcapng"
    rx = procs(receiver_cmd(port, "-w", str(out), "--stats-json", str(tmp_path / "rx.json")))
    rx.wait_for("listening on")
    with Veth() as a, Veth() as b, Veth() as c:
        s1 = procs(sensor_cmd(port, a.outer, "-i", b.outer, "--sensor-id", "alpha"))
        s2 = procs(sensor_cmd(port, c.outer, "--sensor-id", "beta"))
        s1.wait_for("connected to receiver")
        s2.wait_for("connected to receiver")
        threads = [threading.Thread(target=v.replay, args=(mixed_pcap,), kwargs={"pps": 10000}) for v in (a, b, c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_received(rx, 4000, "alpha")
        wait_received(rx, 2000, "beta")
        for s in (s1, s2):
            assert s.stop(signal.SIGTERM) == 0
        rx.stop(signal.SIGTERM)
        names = {a.outer: "alpha/" + a.outer, b.outer: "alpha/" + b.outer, c.outer: "beta/" + c.outer}
    rows = tshark_fields(out, "frame.interface_name", "frame.interface_id")
    per_name = Counter(r[0] for r in rows)
    assert per_name == {n: 2000 for n in names.values()}
    assert len({r[1] for r in rows}) == 3  # three IDBs
    # each interface's packets are exactly the replayed frames, in order
    expected = [d for _, _, d in read_pcap_dpkt(mixed_pcap)]
    import pktstream
    per_iface: dict[str, list[bytes]] = {}
    for batch in pktstream.read(str(out)):
        per_iface.setdefault(batch.interface, []).extend(bytes(p) for p in batch)
    assert {k: v == expected for k, v in per_iface.items()} == {n: True for n in names.values()}
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["sensors"]["alpha"]["packets"] == 4000 and st["sensors"]["beta"]["packets"] == 2000


def test_per_sensor_files(veth, procs, tmp_path, mixed_pcap):
    port = free_port()
    rx = procs(receiver_cmd(port, "--output-dir", str(tmp_path / "by-sensor")))
    rx.wait_for("listening on")
    sx = procs(sensor_cmd(port, veth.outer, "--sensor-id", "../../etc/evil"))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 2000)
    sx.stop(signal.SIGTERM)
    rx.stop(signal.SIGTERM)
    files = [f for f in (tmp_path / "by-sensor").iterdir() if f.name != "_index"]
    assert (tmp_path / "by-sensor" / "_index" / "files").is_dir()  # indexed by default
    import hashlib
    tag = hashlib.sha256(b"../../etc/evil").hexdigest()[:8]
    assert [f.name for f in files] == [f"_.._etc_evil-{tag}.pcapng"]  # sanitised, inside the directory
    assert len(tshark_fields(files[0], "frame.number")) == 2000


def test_stdout_into_tshark(veth, procs, tmp_path, mixed_pcap):
    """``pktstream receiver -w - | tshark -r -``: a clean pcap stream, logs on stderr."""
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", "-"), stdout=subprocess.PIPE)
    with open(tmp_path / "tshark.txt", "w") as out:
        tshark = subprocess.Popen(["tshark", "-r", "-", "-T", "fields", "-e", "frame.len"], stdin=rx.p.stdout,
                                  stdout=out, stderr=subprocess.DEVNULL)
    rx.p.stdout.close()
    try:
        rx.wait_for("listening on")
        sx = procs(sensor_cmd(port, veth.outer))
        sx.wait_for("connected to receiver")
        veth.replay(mixed_pcap, pps=20000)
        wait_received(rx, 2000)
        sx.stop(signal.SIGTERM)
        assert rx.stop(signal.SIGTERM) == 0
        assert tshark.wait(30) == 0
    finally:
        if tshark.poll() is None:
            tshark.kill()
            tshark.wait()
    lens = (tmp_path / "tshark.txt").read_text().split()
    assert [int(x) for x in lens] == [w for _, w, _ in read_pcap_dpkt(mixed_pcap)]


@pytest.mark.parametrize("ext", ["pcapng", "pcap.zst"])
def test_receiver_sigkill_recovers_pcapng_and_zst(veth, procs, tmp_path, ext):
    src = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(src), 4000, size=400)
    port = free_port()
    ref = tmp_path / "ref.pcap"
    cmd = receiver_cmd(port, "-w", str(tmp_path / f"out.{ext}"), "--state-dir", str(tmp_path / "st"))
    rx = procs(cmd)
    rx.wait_for("listening on")
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "-s", "1600", "--block-size", "64KiB"))
    sx.wait_for("connected to receiver")
    replay = threading.Thread(target=veth.replay, args=(src,), kwargs={"pps": 2000})
    replay.start()
    wait_received(rx, 400)  # mid-stream: the receiver has written part of it (4000 at 2000 pps)
    rx.p.kill()
    rx.p.wait()
    rx2 = procs(cmd)
    rx2.wait_for("listening on")
    replay.join()
    wait_pcap_count(ref, 4000)  # the kernel has handed every packet to the capture sockets
    assert sx.stop(signal.SIGTERM) == 0  # stopping drains the capture and waits for acks
    td.stop()
    rx2.stop(signal.SIGTERM)
    files = sorted(tmp_path.glob(f"out*.{ext}"), key=lambda p: len(p.name))
    assert len(files) == 2
    got = []
    for f in files:  # tshark reads both (the recovered one too)
        got += [r[0] for r in tshark_fields(f, "frame.len")]
    import pktstream
    data = [bytes(p) for f in files for b in pktstream.read(str(f)) for p in b]
    assert data == [d for _, _, d in read_pcap_dpkt(ref)]
    assert len(got) == len(data)


def test_rotation_and_metrics(veth, procs, tmp_path, mixed_pcap):
    port, mport = free_port(), free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "rot.pcap"), "-C", "100KB",
                            "--metrics", f"127.0.0.1:{mport}"))
    rx.wait_for("listening on")
    sx = procs(sensor_cmd(port, veth.outer, "--sensor-id", "m1", "-s", "1600", "--block-size", "32KiB"))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 2000)
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    assert 'pktstream_sensor_packets_total{sensor="m1"} 2000.0' in body
    assert 'pktstream_sensor_kernel_dropped_total{sensor="m1"}' in body
    assert 'pktstream_sensor_connected{sensor="m1"} 1.0' in body
    sx.stop(signal.SIGTERM)
    rx.stop(signal.SIGTERM)
    files = sorted(tmp_path.glob("rot.*.pcap"))
    assert len(files) >= 5 and all(f.stat().st_size <= 100_000 for f in files)
    assert sum(len(read_pcap_dpkt(f)) for f in files) == 2000


def test_time_rotation_while_idle(veth, procs, tmp_path, mixed_pcap):
    """-G: a file is completed on time even when no more traffic comes (tcpdump waits for the
    next packet), and the next burst goes into a new file."""
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "g.pcap"), "-G", "1"))
    rx.wait_for("listening on")
    sx = procs(sensor_cmd(port, veth.outer, "--max-wait", "0.05"))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)  # 0.1 s
    wait_received(rx, 2000)
    # idle now: the receiver gets nothing more, but the file is due 1 s after it was opened
    # (usually one file; two when a stall of the machine spread the burst over more than 1 s)

    def completed() -> list[Path] | None:
        files = sorted(tmp_path.glob("g.*.pcap"))
        if list(tmp_path.glob("*.part")) or sum(len(read_pcap_dpkt(f)) for f in files) != 2000:
            return None
        return files
    done = wait_until(completed, 30, "the idle file to be completed")
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 4000)
    assert sx.stop(signal.SIGTERM) == 0
    assert rx.stop(signal.SIGTERM) == 0
    files = sorted(tmp_path.glob("g.*.pcap"))
    new = [f for f in files if f not in done]
    assert new and sum(len(read_pcap_dpkt(f)) for f in new) == 2000  # the next burst: new files
    assert sum(len(read_pcap_dpkt(f)) for f in done) == 2000  # the completed ones unchanged


def test_python_api_iterator_and_callback(veth):
    """Embedding: Receiver.batches() and a callback, in one process with a Sensor."""
    import pktstream
    from pktstream.sinks import CallbackSink
    from pktstream.stream.receiver import Receiver
    from pktstream.stream.sensor import CaptureOptions, Sensor
    seen = []
    rx = Receiver(listen="127.0.0.1:0", outputs=[CallbackSink(lambda src, b: seen.append(len(b)))])
    it = rx.batches()
    rx.start()
    sx = Sensor(f"127.0.0.1:{rx.address[1]}", [veth.outer], capture=CaptureOptions(max_wait=0.05)).start()
    # a failure must not hang the iterator below: stop the receiver (which ends it) after a bound
    watchdog = threading.Timer(60, rx.stop)
    watchdog.start()
    try:
        # capture open and session up before any packet is sent (a packet sent earlier is not captured)
        wait_until(lambda: sx.stats()["connected"] and veth.outer in sx.stats()["interfaces"], 30,
                   "the sensor to capture and connect")
        frames = traffic.frames(300)
        inj = pktstream.Capture(veth.outer)
        t = threading.Thread(target=lambda: [inj.inject(f) for f in frames])
        t.start()
        got = 0
        for source, batch in it:
            assert source.sensor_id == sx.sensor_id and source.interface == veth.outer
            assert batch.interface == f"{sx.sensor_id}/{veth.outer}"
            got += len(batch)
            if got >= 300:
                break
        t.join()
        inj.close()
        assert got == 300
        # the callback runs in its own output thread: it may get the batches after the
        # iterator did (outputs are not ordered with each other), but it gets all of them
        wait_until(lambda: sum(seen) >= 300, 30, f"the callback to see 300 packets (saw {sum(seen)})")
        assert sum(seen) == 300
    finally:
        watchdog.cancel()
        sx.stop()
        sx.join(20)
        rx.stop()
        threading.Thread(target=lambda: [None for _ in it], daemon=True).start()  # drain
        rx.join(20)


def test_receiver_without_state_dir_keeps_few_flushed_states(veth, tmp_path):
    """Each flush of a file output returns a state; the receiver keeps them until a commit
    supersedes them. Without a state dir they were never dropped (one per flush for the life
    of the receiver); now the acknowledged ones go: ``flushes_held`` stays at most 1."""
    import pktstream
    from pktstream.sinks import FileSink
    from pktstream.stream.receiver import Receiver
    from pktstream.stream.sensor import CaptureOptions, Sensor
    out = tmp_path / "out.pcap"
    rx = Receiver(listen="127.0.0.1:0", outputs=[FileSink(str(out))])
    rx.start()
    sx = Sensor(f"127.0.0.1:{rx.address[1]}", [veth.outer], capture=CaptureOptions(max_wait=0.05)).start()
    inj = None
    try:
        wait_until(lambda: sx.stats()["connected"] and veth.outer in sx.stats()["interfaces"], 30,
                   "the sensor to capture and connect")
        inj = pktstream.Capture(veth.outer)
        frames = traffic.frames(300)
        for group in range(6):  # six groups, each written and flushed before the next is sent
            for f in frames[group * 50:(group + 1) * 50]:
                inj.inject(f)
            wait_until(lambda g=group: rx.stats()["outputs"][f"file:{out}"].get("packets", 0) >= (g + 1) * 50,
                       30, f"group {group} written")
        wait_until(lambda: rx.stats()["outputs"][f"file:{out}"]["flushes_held"] <= 1, 30,
                   f"flushed states dropped ({rx.stats()['outputs']})")
        assert rx.stats()["outputs"][f"file:{out}"]["packets"] == 300
    finally:
        if inj is not None:
            inj.close()
        sx.stop()
        sx.join(20)
        rx.stop()
        rx.join(20)
