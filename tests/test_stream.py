"""End to end: real sensors and receivers (CLI processes), real traffic on veth pairs,
tcpdump as the reference."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    PKTSTREAM,
    free_port,
    pcap_count,
    read_pcap_dpkt,
    start_tcpdump,
    wait_pcap_count,
    wait_received,
    wait_until,
)
from pktstream.lab import traffic

pytestmark = pytest.mark.live


def receiver_cmd(port: int, *extra: str) -> list[str]:
    # counters logged every 0.2 s: tests wait on them (wait_received), never on a sleep
    return [*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--stats-interval", "0.2", *extra]


def sensor_cmd(port: int, iface: str, *extra: str) -> list[str]:
    return [*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", iface, "--max-wait", "0.1", *extra]


def outputs(directory: Path, pattern: str = "out*.pcap") -> list[Path]:
    """Completed output files in creation order (out.pcap, out~1.pcap, out~2.pcap ...)."""
    files = [p for p in directory.glob(pattern) if not p.name.endswith(".part")]

    def order(p: Path) -> int:
        stem = p.name.split(".")[0]
        return int(stem.rsplit("~", 1)[1]) if "~" in stem else 0
    return sorted(files, key=order)


def received(directory: Path, pattern: str = "out*.pcap") -> list[tuple[int, int, bytes]]:
    pkts = []
    for f in outputs(directory, pattern):
        pkts.extend(read_pcap_dpkt(f))
    return pkts


def assert_same_packets(got, ref, tol_ns=1_000_000):
    assert len(got) == len(ref), f"received {len(got)} packets, reference has {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a[2] == b[2], f"packet {i} differs"
        assert a[1] == b[1], f"packet {i}: wire length {a[1]} != {b[1]}"
        assert abs(a[0] - b[0]) <= tol_ns, f"packet {i}: timestamp {a[0]} vs {b[0]}"


def test_stream_equals_tcpdump_reference(veth, procs, tmp_path, mixed_pcap):
    port = free_port()
    ref = tmp_path / "ref.pcap"
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--state-dir", str(tmp_path / "st"),
                            "--stats-json", str(tmp_path / "rx.json")))
    rx.wait_for("listening on")
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "--stats-json", str(tmp_path / "sx.json")))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 2000)
    assert sx.stop(signal.SIGTERM) == 0
    wait_pcap_count(ref, 2000)  # the oracle has written all it saw (stopping it drops its backlog)
    td.stop()
    rx.wait_for("said goodbye")
    assert rx.stop(signal.SIGTERM) == 0
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    sst = json.loads((tmp_path / "sx.json").read_text())
    rst = json.loads((tmp_path / "rx.json").read_text())
    s = rst["sensors"][sst["sensor_id"]]
    assert s["packets"] == sst["packets"] == 2000 and s["kernel_dropped"] == 0
    assert s["compression_ratio"] > 1 and sst["unacked_frames"] == 0
    # tshark reads the receiver's file
    n = subprocess.run(["tshark", "-r", str(tmp_path / "out.pcap"), "-T", "fields", "-e", "frame.number"],
                       capture_output=True, text=True, check=True).stdout.split()
    assert len(n) == 2000


def test_receiver_sigkill_and_restart_loses_and_duplicates_nothing(veth, procs, tmp_path):
    """Kill -9 the receiver mid-stream, restart it: the outputs together equal the reference."""
    src = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(src), 6000, size=600)
    port = free_port()
    ref = tmp_path / "ref.pcap"
    rx_cmd = receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--state-dir", str(tmp_path / "st"))
    rx = procs(rx_cmd)
    rx.wait_for("listening on")
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "-s", "1600", "--block-size", "64KiB",
                          "--stats-json", str(tmp_path / "sx.json")))
    sx.wait_for("connected to receiver")
    import threading
    replay = threading.Thread(target=veth.replay, args=(src,), kwargs={"pps": 2000})
    replay.start()  # 3 s of traffic
    wait_received(rx, 1000)  # mid-stream: the receiver has part of it
    rx.p.kill()  # SIGKILL mid-stream
    rx.p.wait()
    sx.wait_for("retrying")  # the sensor has noticed: it captures on while the receiver is down
    rx2 = procs(rx_cmd)
    rx2.wait_for("listening on")
    replay.join()
    wait_pcap_count(ref, 6000)  # the kernel has handed every packet to the capture sockets
    assert sx.stop(signal.SIGTERM) == 0  # stopping drains the capture and waits for acks
    td.stop()
    assert rx2.stop(signal.SIGTERM) == 0
    assert "recovery:" in rx2.stderr
    files = outputs(tmp_path)
    assert len(files) == 2, files
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    st = json.loads((tmp_path / "sx.json").read_text())
    assert st["window_dropped_packets"] == 0 and st["packets"] == 6000


def test_receiver_down_spool_keeps_everything(veth, procs, tmp_path):
    """The receiver is unreachable while traffic flows; a bounded spool holds it all."""
    src = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(src), 2000, size=1000)
    port = free_port()
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "-s", "1600", "--block-size", "64KiB", "--window", "200KiB",
                          "--spool-dir", str(tmp_path / "spool"), "--spool-size", "10MiB",
                          "--stats-json", str(tmp_path / "sx.json")))
    sx.wait_for("capturing on")
    veth.replay(src, pps=10000)
    wait_until(lambda: list((tmp_path / "spool").glob("*.frame")), 30, "the window to overflow to the spool")
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap")))
    rx.wait_for("listening on")
    sx.wait_for("connected to receiver", timeout=40)
    wait_received(rx, 2000, timeout=60)  # everything, spool included, has arrived
    assert sx.stop(signal.SIGTERM) == 0
    td.stop()
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    st = json.loads((tmp_path / "sx.json").read_text())
    assert st["spooled_batches"] > 0 and st["window_dropped_packets"] == 0
    assert [f for f in os.listdir(tmp_path / "spool") if f.endswith(".frame")] == []


def test_beyond_the_bound_loss_is_counted_exactly(veth, procs, tmp_path):
    """No spool, a small window, receiver down: what does not fit is dropped AND counted,
    and what was kept arrives in order (the oldest blocks)."""
    from pktstream.stream.sensor import CaptureOptions, DeliveryOptions, Sensor
    src = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(src), 2000, size=1000)
    port = free_port()
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    # in-process sensor: its live counters say when every packet has gone into (or been
    # dropped from) the window, before the receiver comes up
    sensor = Sensor(f"127.0.0.1:{port}", [veth.outer],
                    capture=CaptureOptions(max_wait=0.1, snaplen=1600, block_bytes=64 << 10),
                    delivery=DeliveryOptions(window_bytes=200 << 10, spool_dir=None)).start()
    try:
        wait_until(lambda: veth.outer in sensor.stats()["interfaces"], 30, "the sensor to capture")
        veth.replay(src, pps=10000)
        wait_until(lambda: sensor.stats()["packets"] >= 2000, 30, "the sensor to take all 2000 packets")
        assert not sensor.stats()["connected"]
        rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--stats-json", str(tmp_path / "rx.json")))
        rx.wait_for("listening on")
        wait_until(lambda: sensor.stats()["connected"], 40, "the sensor to connect")
    finally:
        sensor.stop()
        sensor.join(60)  # stopping sends what the window kept and waits for acks
    assert not sensor._thread.is_alive()
    st = sensor.stats()
    wait_pcap_count(ref, 2000)
    td.stop()
    rx.stop(signal.SIGTERM)
    got, ref_pkts = received(tmp_path), read_pcap_dpkt(ref)
    assert len(ref_pkts) == 2000 and st["packets"] == 2000
    assert 0 < len(got) < 2000
    assert st["window_dropped_packets"] == 2000 - len(got)
    # what was kept is whole blocks, in order: the oldest ones, plus a later small block that
    # still fitted; every received packet is a reference packet, none twice, order preserved
    ref_index = {d: i for i, (_, _, d) in enumerate(ref_pkts)}
    positions = [ref_index[d] for _, _, d in got]
    assert positions == sorted(set(positions))
    assert positions[:64] == list(range(64))
    rst = json.loads((tmp_path / "rx.json").read_text())
    assert rst["sensors"][st["sensor_id"]]["window_dropped_packets"] == st["window_dropped_packets"]


def test_network_cut_and_restored(procs, tmp_path):
    """Receiver in its own namespace behind a veth; the link goes down mid-stream (packets are
    silently lost, no RST) and comes back: the sensor notices, reconnects, resends."""
    from pktstream.lab.netns import Veth
    with Veth() as traffic_link, Veth() as rx_link:
        src = tmp_path / "t.pcap"
        traffic.write_random_udp_pcap(str(src), 3000, size=500)
        port = 9000 + os.getpid() % 1000
        rx = procs(rx_link.in_ns(*PKTSTREAM, "receiver", "--listen", f"{rx_link.inner_ip}:{port}",
                                 "--allow-unauthenticated", "-w", str(tmp_path / "out.pcap"), "--heartbeat", "0.5",
                                 "--stats-interval", "0.2"))
        rx.wait_for("listening on")
        ref = tmp_path / "ref.pcap"
        td = start_tcpdump(procs, traffic_link.outer, ref)
        sx = procs([*PKTSTREAM, "sensor", "--receiver", f"{rx_link.inner_ip}:{port}", "-i", traffic_link.outer,
                    "--max-wait", "0.1", "-s", "1600", "--block-size", "64KiB", "--heartbeat", "0.5",
                    "--stats-json", str(tmp_path / "sx.json")])
        sx.wait_for("connected to receiver")
        import threading
        replay = threading.Thread(target=traffic_link.replay, args=(src,), kwargs={"pps": 1000})
        replay.start()
        wait_received(rx, 300)  # mid-stream (3000 packets at 1000 pps)
        subprocess.run(["ip", "link", "set", rx_link.outer, "down"], check=True)
        # packets are silently lost: both sides give the session up after the 2.5 s idle timeout
        sx.wait_for("retrying")
        rx.wait_for("disconnected")
        subprocess.run(["ip", "link", "set", rx_link.outer, "up"], check=True)
        replay.join()
        sx.wait_for("connected to receiver", timeout=60, count=2)
        wait_received(rx, 3000, timeout=60)  # everything resent and accepted
        assert sx.stop(signal.SIGTERM, timeout=60) == 0
        wait_pcap_count(ref, 3000)
        td.stop()
        rx.stop(signal.SIGTERM)
        assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))


def test_sensor_restart_continues_without_loss_or_duplicates(veth, procs, tmp_path, mixed_pcap):
    port = free_port()
    ref = tmp_path / "ref.pcap"
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--state-dir", str(tmp_path / "st"),
                            "--stats-json", str(tmp_path / "rx.json")))
    rx.wait_for("listening on")
    td = start_tcpdump(procs, veth.outer, ref)
    for _ in range(2):
        sx = procs(sensor_cmd(port, veth.outer, "--sensor-id", "s1"))
        sx.wait_for("connected to receiver")
        veth.replay(mixed_pcap, pps=20000)
        wait_received(rx, 2000 * (_ + 1), "s1")
        assert sx.stop(signal.SIGTERM) == 0
    wait_pcap_count(ref, 4000)
    td.stop()
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    rst = json.loads((tmp_path / "rx.json").read_text())
    assert rst["sensors"]["s1"]["connections"] == 2 and rst["sensors"]["s1"]["duplicate_frames"] == 0


def test_idle_session_stays_connected(veth):
    from pktstream.sinks import CallbackSink
    from pktstream.stream.receiver import Limits, Receiver
    from pktstream.stream.sensor import DeliveryOptions, Sensor
    got = []
    rx = Receiver(listen="127.0.0.1:0", outputs=[CallbackSink(lambda s, b: got.append(len(b)))],
                  limits=Limits(heartbeat=0.5)).start()
    sx = Sensor(f"127.0.0.1:{rx.address[1]}", [veth.outer], delivery=DeliveryOptions(heartbeat=0.5)).start()
    try:
        wait_until(lambda: sx.stats()["connected"], 30, "the sensor to connect")
        # not synchronisation: staying idle this long IS the test (over twice the 2.5 s idle
        # timeout); the session must survive it on heartbeats alone
        time.sleep(6)
        st = rx.stats()["sensors"][sx.sensor_id]
        assert st["connected"] and st["connections"] == 1
        assert sx.counters["connection_failures"] == 0
        assert all(i["capturing"] for i in sx.stats()["interfaces"].values())
    finally:
        sx.stop()
        sx.join(20)
        rx.stop()
        rx.join(20)
    # a stopped sensor says so (it said "connected" and "capturing" until its process ended)
    assert not sx.running
    st = sx.stats()
    assert not st["connected"] and st["interfaces"] and not any(i["capturing"] for i in st["interfaces"].values())


def test_slow_output_memory_bounded_and_counted(veth, tmp_path):
    """A slow gating output: the receiver's in-flight bytes stay under their bound, the sensor's
    window stays bounded, and the sensor counts what it had to drop; a slow best-effort output
    drops and counts while the file output gets everything the receiver accepted."""
    from pktstream.sinks import CallbackSink, FileSink
    from pktstream.stream.receiver import Limits, Receiver
    from pktstream.stream.sensor import CaptureOptions, DeliveryOptions, Sensor
    src = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(src), 3000, size=1000)
    peak = {"inflight": 0}

    def slow(source, batch):
        time.sleep(0.2)

    rx = Receiver(listen="127.0.0.1:0", outputs=[FileSink(str(tmp_path / "out.pcap"))],
                  limits=Limits(max_inflight_bytes=256 << 10, sink_queue=2))
    rx.outputs.append(CallbackSink(slow, gate=False))
    gate_slow = Receiver(listen="127.0.0.1:0", outputs=[CallbackSink(slow)],
                         limits=Limits(max_inflight_bytes=256 << 10)).start()
    rx.start()
    cap = CaptureOptions(block_bytes=65536, snaplen=1600, max_wait=0.05)
    s1 = Sensor(f"127.0.0.1:{gate_slow.address[1]}", [veth.outer], sensor_id="slow", capture=cap,
                delivery=DeliveryOptions(window_bytes=512 << 10, spool_dir=None)).start()
    s2 = Sensor(f"127.0.0.1:{rx.address[1]}", [veth.outer], sensor_id="fast", capture=cap,
                delivery=DeliveryOptions(window_bytes=64 << 20)).start()
    try:
        wait_until(lambda: all(s.stats()["connected"] and veth.outer in s.stats()["interfaces"] for s in (s1, s2)),
                   30, "both sensors to capture and connect")
        import threading
        t = threading.Thread(target=veth.replay, args=(src,), kwargs={"pps": 5000})
        t.start()
        # sampling the bounds while traffic flows and until both sensors took it all and the slow
        # receiver was seen holding data (it holds some for seconds: 0.2 s per batch)
        deadline = time.monotonic() + 60
        while t.is_alive() or not (peak["inflight"] > 0 and s1.stats()["packets"] >= 3000
                                   and s2.stats()["packets"] >= 3000):
            peak["inflight"] = max(peak["inflight"], gate_slow.stats()["inflight_bytes"])
            assert s1.stats()["unacked_bytes"] <= (512 << 10) + 70000
            assert time.monotonic() < deadline, (peak, s1.stats()["packets"], s2.stats()["packets"])
            time.sleep(0.05)
        t.join()
    finally:
        for s in (s1, s2):
            s.stop()
        s2.join(30)
        rx.stop()
        rx.join(30)
        st_slow = s1.stats()
        gate_slow.stop()
        s1.join(5)
        gate_slow.join(10)
    assert 0 < peak["inflight"] <= (256 << 10) + 70000
    assert st_slow["window_dropped_packets"] > 0
    assert st_slow["packets"] == 3000
    rst = rx.stats()
    out = rst["outputs"]
    cb = [v for k, v in out.items() if k == "callback"][0]
    f = [v for k, v in out.items() if k.startswith("file:")][0]
    assert f["packets"] == 3000 and cb.get("dropped_packets", 0) > 0
    assert cb.get("packets", 0) + cb["dropped_packets"] == 3000
    assert len(read_pcap_dpkt(tmp_path / "out.pcap")) == 3000


PS_RECEIVER_YAML = """\
input:
  address: 127.0.0.1
  port: {port}
output:
  file:
    path: {path}
tls:
  enable: false
  certfile: ""
  keyfile: ""
auth:
  enable: false
  key: ""
"""

PS_SENSOR_YAML = """\
output:
  server:
    address: 127.0.0.1
    port: {port}
pcapMode: all
compressBlockSize: 65
inputPacketLen: 65535
gatherMaxWaitSec: 1
logFilename: {log}
tls:
  enable: false
auth:
  enable: false
  key: ""
"""


def test_packetstreamer_yaml_configs_work(veth, procs, tmp_path, mixed_pcap):
    port = free_port()
    (tmp_path / "receiver.yaml").write_text(PS_RECEIVER_YAML.format(port=port, path=tmp_path / "out.pcap"))
    (tmp_path / "sensor.yaml").write_text(PS_SENSOR_YAML.format(port=port, log=tmp_path / "sensor.log"))
    ref = tmp_path / "ref.pcap"
    rx = procs([*PKTSTREAM, "receiver", "--config", str(tmp_path / "receiver.yaml"), "--stats-interval", "0.2"])
    rx.wait_for("listening on")
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs([*PKTSTREAM, "sensor", "--config", str(tmp_path / "sensor.yaml"), "-i", veth.outer])
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 2000)  # blocks sealed after gatherMaxWaitSec (1 s) and sent
    sx.stop(signal.SIGTERM)
    wait_pcap_count(ref, 2000)
    td.stop()
    rx.stop(signal.SIGTERM)
    assert_same_packets(received(tmp_path), read_pcap_dpkt(ref))
    assert "connected to receiver" in (tmp_path / "sensor.log").read_text()  # logFilename honoured


@pytest.mark.parametrize("role,yaml_text,message", [
    ("receiver", "input:\n  address: 0.0.0.0\n", "input.port: required"),
    ("receiver", "input:\n  port: 99999\n", "input.port: must be a port number"),
    ("receiver", "input:\n  port: 8081\ntls:\n  enable: true\n  certFile: a.pem\n",
     "tls.certFile: unknown key (the key is 'certfile'"),
    ("receiver", "input:\n  port: 8081\noutput:\n  fiel:\n    path: x\n",
     "output.fiel: unknown key (did you mean 'file'?)"),
    ("receiver", "input:\n  port: 8081\nauth:\n  enable: true\n", "auth: auth is enabled but neither key nor keyfile"),
    ("receiver", "input:\n  address: 0.0.0.0\n  port: 8081\nauth:\n  enable: false\n  keyfile: k.yaml\n",
     "auth: a key is set but enable is false"),
    ("sensor", "output:\n  server:\n    address: 127.0.0.1\n    port: 1\nauth:\n  key: s3cret\n",
     "auth: a key is set but enable is false"),
    ("receiver", "- just\n- a list\n", "config: expected a mapping"),
    ("sensor", "output:\n  server:\n    address: 127.0.0.1\npcapMode: all\n", "output.server.port: required"),
    ("sensor", "output:\n  server:\n    address: 127.0.0.1\n    port: 1\npcapMode: Everything\n",
     "pcapMode: must be all, allow or deny"),
    ("sensor", "output:\n  server:\n    address: 127.0.0.1\n    port: 1\ncapturePorts: [80, 'x']\n",
     "capturePorts[1]: must be a port"),
    ("sensor", "output:\n  server:\n    address: 127.0.0.1\n    port: 1\nspool:\n  maxBytes: 0\n",
     "spool.maxBytes: must be positive"),
])
def test_invalid_config_fails_with_key_path(tmp_path, role, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    output = ["-w", str(tmp_path / "o.pcap")] if role == "receiver" else []
    r = subprocess.run([*PKTSTREAM, role, "--config", str(cfg), *output], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_lone_packet_on_idle_sensor_reaches_the_file_alone(veth, procs, tmp_path):
    """Adaptive sealing end to end: with max_wait an hour, a single packet on an idle link
    still reaches the receiver's file (written and flushed per group) as a block of its own:
    no second packet, no full block and no max_wait expiry is needed. Synchronised on the
    file's records."""
    import socket
    port = free_port()
    part = tmp_path / "out.pcap.part"  # the open file; renamed to out.pcap when closed
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap")))
    rx.wait_for("listening on")
    sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer,
                "--max-wait", "3600", "--stats-json", str(tmp_path / "sx.json"), "udp", "port", "9"])
    sx.wait_for("connected to receiver")
    subprocess.run(["ip", "neigh", "replace", veth.inner_ip, "lladdr", "02:00:00:00:00:01",
                    "dev", veth.outer], check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in (1, 2):
            s.sendto(b"lone-%d" % i, (veth.inner_ip, 9))
            wait_pcap_count(part, i, 60)  # the timeout only bounds a failure
            assert pcap_count(part) == i
    assert sx.stop(signal.SIGTERM) == 0
    sst = json.loads((tmp_path / "sx.json").read_text())
    assert sst["packets"] == 2 and sst["batches"] == 2
    assert rx.stop(signal.SIGTERM) == 0
    assert [p[2][-6:] for p in received(tmp_path)] == [b"lone-1", b"lone-2"]


def test_a_receiver_refusing_every_session_after_its_welcome_is_retried_with_back_off(veth, caplog, tmp_path):
    """A receiver that ends every session with an ERROR before acknowledging anything (here:
    the sensor's blocks are numbered more than a day ahead, as after a clock that was wrong at
    start) used to get a fresh handshake every 0.1-0.6 s, for ever, each logged; now the sensor
    backs off as from a refusal (2 s doubling, up to 30 s) and says why."""
    import logging

    from pktstream.sinks import CallbackSink
    from pktstream.stream.receiver import Receiver
    from pktstream.stream.sensor import DeliveryOptions, Sensor
    caplog.set_level(logging.WARNING, logger="pktstream")
    rx = Receiver(listen="127.0.0.1:0", outputs=[CallbackSink(lambda s, b: None)]).start()
    sx = Sensor(f"127.0.0.1:{rx.address[1]}", [veth.outer], sensor_id="ahead",
                delivery=DeliveryOptions(spool_dir=None))
    sx.store.next_seq = time.time_ns() // 1000 + 2 * 86400 * 10**6
    sx.start()
    try:
        wait_until(lambda: sx.stats()["interfaces"], 30, "the sensor to capture")
        pcap = tmp_path / "t.pcap"
        traffic.write_random_udp_pcap(str(pcap), 20, size=200)
        veth.replay(pcap, pps=1000)
        wait_until(lambda: sx.counters["connection_failures"] >= 2, 30, "two refused sessions")
        refusals = [m for m in (r.getMessage() for r in caplog.records)
                    if "right after the handshake; retrying in" in m]
        assert refusals, [r.getMessage() for r in caplog.records]
        waits = [int(m.split("retrying in ")[1].split(" s")[0]) for m in refusals]
        assert min(waits) >= 1 and "attempts so far" in refusals[0]
    finally:
        sx.stop()
        sx.join(20)
        rx.stop()
        rx.join(20)
