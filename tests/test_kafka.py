"""Kafka end to end against a real broker (tansu, started here on loopback): sensors produce
their blocks to a topic, receivers consume it as one consumer group and write files; tcpdump on
the same interfaces is the reference."""
from __future__ import annotations

import json
import re
import signal
import threading
import urllib.request
from pathlib import Path

import pytest

from conftest import PKTSTREAM, free_port, read_pcap_dpkt, start_tcpdump, wait_pcap_count, wait_received, wait_until
from pktstream.lab import traffic
from pktstream.lab.netns import Veth
from servers import tansu  # noqa: F401  (fixture)
from test_stream import assert_same_packets

pytestmark = pytest.mark.live

# tansu joins groups slowly with librdkafka's defaults (23 s); these make it ~3 s
GROUP_PROPS = ["--kafka-property", "session.timeout.ms=6000", "--kafka-property", "heartbeat.interval.ms=500",
               "--kafka-property", "topic.metadata.refresh.interval.ms=1000"]


def kafka_receiver(broker: str, topic: str, group: str, d: Path, metrics: int | None = None) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)  # --output-dir creates only its last component
    cmd = [*PKTSTREAM, "receiver", "--from", f"kafka://{broker}/{topic}", "--group", group,
           "--output-dir", str(d / "out"), "--format", "pcap", "--state-dir", str(d / "st"),
           "--stats-interval", "1", "--stats-json", str(d / "rx.json"), *GROUP_PROPS]
    if metrics:
        cmd += ["--metrics", f"127.0.0.1:{metrics}"]
    return cmd


def kafka_sensor(broker: str, topic: str, iface: str, sid: str, d: Path, *extra: str) -> list[str]:
    return [*PKTSTREAM, "sensor", "--output", f"kafka://{broker}/{topic}", "-i", iface, "--sensor-id", sid,
            "--max-wait", "0.1", "-s", "1600", "--block-size", "64KiB",
            "--stats-json", str(d / f"{sid}.json"), *extra]


def committed_seq(dirs: list[Path], sid: str) -> int:
    best = 0
    for d in dirs:
        p = d / "st" / "receiver-state.json"
        try:
            best = max(best, json.loads(p.read_text())["sensors"].get(sid, {}).get("last_seq", 0))
        except (OSError, ValueError):
            pass
    return best


def wait_committed(dirs: list[Path], sid: str, seq: int, timeout: float = 40) -> None:
    wait_until(lambda: committed_seq(dirs, sid) >= seq, timeout,
               f"receivers to commit {sid} up to {seq} (at {committed_seq(dirs, sid)})", interval=0.1)


def metric(port: int, name: str, sensor: str) -> int:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return -1
    for line in body.splitlines():
        if line.startswith(f'{name}{{sensor="{sensor}"}}'):
            return int(float(line.split()[-1]))
    return 0


def wait_metric(port: int, name: str, sensor: str, value: int, timeout: float = 40) -> None:
    wait_until(lambda: metric(port, name, sensor) >= value, timeout,
               f"{name}{{{sensor}}} >= {value} (is {metric(port, name, sensor)})", interval=0.1)


def union_packets(dirs: list[Path], sid: str) -> list:
    pkts = []
    for d in dirs:
        for f in sorted((d / "out").glob(f"{sid}*.pcap")):
            pkts.extend(read_pcap_dpkt(f))
    return sorted(pkts)


def test_sensors_to_kafka_to_two_receivers_in_one_group(tansu, procs, tmp_path, mixed_pcap):
    topic = "pkts"
    tansu.create_topic(topic, partitions=4)
    rx_dirs = [tmp_path / "rx1", tmp_path / "rx2"]
    rx1 = procs(kafka_receiver(tansu.bootstrap, topic, "g1", rx_dirs[0]))
    rx1.wait_for("assigned partitions", timeout=30)
    rx2 = procs(kafka_receiver(tansu.bootstrap, topic, "g1", rx_dirs[1]))
    rx2.wait_for("assigned partitions", timeout=30)
    rx1.wait_for("assigned partitions", timeout=30, count=2)  # rx1 gives half of its partitions up
    with Veth() as va, Veth() as vb:
        refs, sensors = {}, {}
        tds = []
        for sid, v in (("sensor-a", va), ("sensor-b", vb)):
            refs[sid] = tmp_path / f"ref-{sid}.pcap"
            tds.append(start_tcpdump(procs, v.outer, refs[sid]))
            sensors[sid] = procs(kafka_sensor(tansu.bootstrap, topic, v.outer, sid, tmp_path))
            sensors[sid].wait_for("capturing on")
        replays = [threading.Thread(target=v.replay, args=(mixed_pcap,), kwargs={"pps": 10000}) for v in (va, vb)]
        for t in replays:
            t.start()
        for t in replays:
            t.join()
        for sid in sensors:  # every packet handed to the capture sockets; stopping drains
            wait_pcap_count(refs[sid], 2000)
        for sid, sx in sensors.items():
            assert sx.stop(signal.SIGTERM) == 0, sx.stderr
            (tmp_path / f"{sid}.log").write_text(sx.stderr)
        for td in tds:
            td.stop()
    for sid in sensors:
        st = json.loads((tmp_path / f"{sid}.json").read_text())
        assert st["packets"] == 2000 and st["unacked_frames"] == 0 and st["window_dropped_packets"] == 0, \
            (st, sensors[sid].stderr[-3000:])
        wait_committed(rx_dirs, sid, st["acked_seq"])
    assert rx1.stop(signal.SIGTERM) == 0 and rx2.stop(signal.SIGTERM) == 0
    for sid in sensors:
        got = union_packets(rx_dirs, sid)
        ref = sorted(read_pcap_dpkt(refs[sid]))
        assert len(ref) == 2000
        assert_same_packets(got, ref, tol_ns=0)
    # both receivers were members of the group and owned partitions
    for rx in (rx1, rx2):
        assert any("assigned partitions [" in line and "[]" not in line for line in rx.err), rx.stderr
    stats = [json.loads((d / "rx.json").read_text()) for d in rx_dirs]
    assert sum(s["sensors"].get(sid, {}).get("packets", 0) for s in stats for sid in sensors) == 4000
    # a real sensor's messages carry its process, its first seq and the chain of its blocks
    for sid in sensors:
        data = [h for _p, _o, k, h, _v in tansu.read_all(topic) if k == sid.encode() and h.get("type") == b"data"]
        assert len(data) > 1 and len({h["instance"] for h in data}) == 1
        seqs = [int(h["seq"]) for h in data]
        assert all(int(h["first_seq"]) <= seqs[0] for h in data)
        assert [int(h["prev_seq"]) for h in data[1:]] == seqs[:-1]  # (no resend in this test)
    # no false alarm across the rebalance: no message taken for deleted, no gap in a sensor's blocks
    assert all(s["inputs"][0]["skipped_messages"] == 0 for s in stats)
    assert all(x["seq_gaps"] == 0 and x["conflict_frames"] == 0 for s in stats for x in s["sensors"].values())


def test_broker_killed_and_restarted_mid_stream_loses_nothing(tansu, procs, tmp_path):
    """The broker dies (SIGKILL) while the sensor and the receiver run, and comes back.

    tansu keeps everything in memory, so a restarted broker is empty: blocks it had accepted but
    that no receiver had consumed yet would be gone with it (a real Kafka cluster keeps them on
    disk and on replicas — that durability is the broker's, not pktstream's). What pktstream must
    guarantee, and what is tested here: (1) everything sent before the crash and consumed is in
    the output; (2) blocks captured while the broker is down are kept by the sensor (not
    acknowledged, no delivery report) and delivered after it is back, even though the broker lost
    the idempotent producer's state (the sensor recreates its producer); (3) the receiver's group
    consumer recovers on the empty broker; (4) the union equals the reference, nothing doubled.
    So the test waits until phase 1 has been consumed before killing the broker.
    """
    topic = "pkts"
    tansu.create_topic(topic, partitions=2)
    d = tmp_path / "rx"
    mport = free_port()
    rx = procs(kafka_receiver(tansu.bootstrap, topic, "g2", d, metrics=mport))
    rx.wait_for("assigned partitions", timeout=30)
    phases = []
    for i in range(3):
        src = tmp_path / f"p{i}.pcap"
        traffic.write_random_udp_pcap(str(src), 1000, size=400)
        phases.append(src)
    with Veth() as v:
        ref = tmp_path / "ref.pcap"
        td = start_tcpdump(procs, v.outer, ref)
        sx = procs(kafka_sensor(tansu.bootstrap, topic, v.outer, "s1", tmp_path, "--kafka-stall-timeout", "3",
                                "--kafka-property", "reconnect.backoff.max.ms=500"))
        sx.wait_for("capturing on")
        v.replay(phases[0], pps=5000)
        wait_metric(mport, "pktstream_sensor_packets_total", "s1", 1000)
        assert metric(mport, "pktstream_sensor_connected", "s1") == 1  # (its messages keep coming)
        tansu.stop(kill=True)                       # broker gone, mid-stream
        v.replay(phases[1], pps=5000)               # captured while there is no broker
        wait_pcap_count(ref, 2000)
        assert metric(mport, "pktstream_sensor_packets_total", "s1") == 1000
        tansu.start()                               # same port, empty
        tansu.create_topic(topic, partitions=2)
        v.replay(phases[2], pps=5000)
        wait_metric(mport, "pktstream_sensor_packets_total", "s1", 3000, timeout=60)
        assert sx.stop(signal.SIGTERM) == 0, sx.stderr
        td.stop()
    st = json.loads((tmp_path / "s1.json").read_text())
    assert st["packets"] == 3000 and st["unacked_frames"] == 0 and st["window_dropped_packets"] == 0, st
    wait_committed([d], "s1", st["acked_seq"])
    assert rx.stop(signal.SIGTERM) == 0
    got = []
    for f in sorted((d / "out").glob("s1*.pcap")):
        got.extend(read_pcap_dpkt(f))
    ref_pkts = read_pcap_dpkt(ref)
    assert len(ref_pkts) == 3000
    assert_same_packets(got, ref_pkts, tol_ns=0)   # one sensor = one partition: in order
    assert "recreating the producer" in sx.stderr   # the broker lost the producer state
    s1 = json.loads((d / "rx.json").read_text())["sensors"]["s1"]
    assert s1["seq_gaps"] == 0 and s1["conflict_frames"] == 0, s1  # nothing was lost: no false alarm


def test_receiver_kafka_output_messages_are_wire_frames(tansu, veth, procs, tmp_path, mixed_pcap):
    """sensor → TCP → receiver -w kafka:// : one message per block, the DATA frame as on the wire,
    keyed by sensor id, with the interface descriptor in the headers; decoding every message
    gives exactly the tcpdump reference."""
    from pktstream.stream import protocol as P
    from test_stream import receiver_cmd, sensor_cmd
    tansu.create_topic("out", partitions=1)
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", f"kafka://{tansu.bootstrap}/out", "--state-dir", str(tmp_path / "st")))
    rx.wait_for("listening on")
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "--sensor-id", "edge-1", "--stats-json", str(tmp_path / "sx.json")))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    wait_received(rx, 2000)
    assert sx.stop(signal.SIGTERM) == 0
    wait_pcap_count(ref, 2000)
    td.stop()
    assert rx.stop(signal.SIGTERM) == 0
    st = json.loads((tmp_path / "sx.json").read_text())
    assert st["unacked_frames"] == 0  # every block was confirmed by the broker before the ACK
    msgs = tansu.read_all("out", count=st["batches"])  # one message per block
    assert msgs
    got, seqs = [], []
    for _part, _off, key, h, value in msgs:
        assert key == b"edge-1" and h["sensor_id"] == b"edge-1" and h["interface"] == veth.outer.encode()
        head = P.decode_header(value[:P.HEADER_LEN], max_payload=1 << 24, max_raw=1 << 24)
        assert head.type == P.FrameType.DATA and int(h["seq"]) == head.seq
        frame = P.Frame(head.type, head.flags, head.seq, head.iface, head.count, head.raw_len, value[P.HEADER_LEN:])
        batch = P.decode_data(frame, link_type=int(h["link_type"]), snaplen=int(h["snaplen"]), interface="x",
                              max_raw=1 << 24)
        for i in range(len(batch)):
            got.append((int(batch.ts_ns[i]), int(batch.wirelen[i]), bytes(batch[i])))
        seqs.append(head.seq)
    assert seqs == sorted(set(seqs))  # in order, no duplicate
    assert_same_packets(got, read_pcap_dpkt(ref), tol_ns=0)


def test_a_block_kafka_refuses_for_good_is_counted_and_the_output_goes_on(tansu):
    """A block larger than the producer may send (librdkafka's message.max.bytes, as a broker's
    limit would) is refused for good: before, the output retried it for ever and no later block
    of any sensor was acknowledged; now its packets are counted as lost and the next blocks go."""
    from pktstream import PacketBatch
    from pktstream.sinks.base import Source
    from pktstream.sinks.kafka import KafkaSink
    from pktstream.stream import protocol as P

    def batch(n: int, size: int, seed: int) -> PacketBatch:
        return PacketBatch.from_records(_records(seed * 1000, n, size), link_type=1)
    sink = KafkaSink(tansu.bootstrap, "refuse", properties={"message.max.bytes": "60000"})
    src = Source("s1", "host", "eth0", 1, 65535)
    for seq, b in enumerate((batch(5, 200, 1), batch(60, 1400, 2), batch(5, 200, 3)), start=1):
        sink.write(Source(src.sensor_id, src.hostname, src.interface, 1, 65535, seq=seq), b)
    sink.flush()  # returns: nothing waits for the refused block
    sink.close()
    assert sink.counters["rejected_frames"] == 1 and sink.counters["rejected_packets"] == 60
    msgs = tansu.read_all("refuse", count=2)
    seqs = sorted(int(h["seq"]) for _p, _o, _k, h, _v in msgs)
    assert seqs == [1, 3]
    assert all(P.decode_header(v[:P.HEADER_LEN], max_payload=1 << 30, max_raw=1 << 30).count == 5
               for *_x, v in msgs)


def test_sensor_blocks_kafka_refuses_are_counted_and_the_rest_delivered(tansu, veth, procs, tmp_path, mixed_pcap):
    """Sensor → Kafka where most blocks are larger than the producer may send: each refused
    block is counted (rejected_packets) and never stops the blocks after it; what was captured
    is exactly what is in the topic plus what was counted as refused (nothing lost silently).
    The small blocks come from a second interface, so no small packet can share a block with the
    large traffic (a block holds one interface's packets), whatever the timing."""
    from pktstream.stream import protocol as P
    tansu.create_topic("small", partitions=1)
    with Veth() as quiet:
        ref, ref_quiet = tmp_path / "ref.pcap", tmp_path / "ref-quiet.pcap"
        tds = [start_tcpdump(procs, veth.outer, ref), start_tcpdump(procs, quiet.outer, ref_quiet)]
        sx = procs(kafka_sensor(tansu.bootstrap, "small", veth.outer, "edge-9", tmp_path,
                                "-i", quiet.outer, "--kafka-property", "message.max.bytes=1500"))
        sx.wait_for("capturing on")
        veth.replay(mixed_pcap, pps=20000)  # blocks of many packets: larger than 1500 bytes, refused
        wait_pcap_count(ref, 2000)
        tiny = tmp_path / "tiny.pcap"  # then small blocks (a few 60-byte packets): delivered after them
        traffic.write_random_udp_pcap(str(tiny), 5, size=60)
        quiet.replay(tiny, pps=10)
        wait_pcap_count(ref_quiet, 5)  # every packet handed to the capture sockets; stopping drains
        assert sx.stop(signal.SIGTERM) == 0, sx.stderr
        for td in tds:
            td.stop()
    st = json.loads((tmp_path / "edge-9.json").read_text())
    assert "refused by the destination" in sx.stderr, sx.stderr[-2000:]
    assert st["unacked_frames"] == 0 and st["rejected_frames"] > 0 and st["rejected_packets"] > 0
    quiet_index = st["interfaces"][quiet.outer]["index"]
    msgs = tansu.read_all("small", count=st["batches"] - st["rejected_frames"])
    headers = [P.decode_header(v[:P.HEADER_LEN], max_payload=1 << 24, max_raw=1 << 24)
               for *_x, h, v in msgs if h.get("type") == b"data"]
    in_topic = sum(h.count for h in headers)
    small = [h for h in headers if h.iface == quiet_index]
    assert sum(h.count for h in small) == 5  # every small packet delivered ...
    refused = [int(x) for x in re.findall(r"kafka: frame (\d+) refused", sx.stderr)]
    assert len(refused) == st["rejected_frames"]
    assert min(refused) < max(h.seq for h in small)  # ... after (some of) the refused blocks
    assert in_topic + st["rejected_packets"] == st["packets"] \
        == len(read_pcap_dpkt(ref)) + len(read_pcap_dpkt(ref_quiet)) == 2005


def _records(ts0: int, n: int, size: int = 60) -> bytes:
    """``n`` records of ``size`` bytes (pktstream's 16-byte record headers: ts ns, caplen, wirelen)."""
    import os as _os
    return b"".join((ts0 + i).to_bytes(8, "little") + size.to_bytes(4, "little") * 2 + _os.urandom(size)
                    for i in range(n))


def test_foreign_forged_and_second_process_messages_are_counted_and_mute_nothing(tansu, procs, tmp_path):
    """Messages a sensor did not make, or not alone, on the receiver's topic: a foreign message
    (no sensor entry, counted), a bad block with a seq far ahead (rejected, counted, and the
    sensor's next blocks still written: before, it muted the sensor for ever), a second process
    publishing with one sensor id (its blocks below the first's counted as conflicts, not as
    duplicates), a previous run's resend (a duplicate), a block above the receiver's size limit
    (counted as that sensor's rejected packets)."""
    import time as _time

    import zstandard
    from confluent_kafka import Producer

    from pktstream.stream import protocol as P
    tansu.create_topic("forge", partitions=1)
    mport = free_port()
    d = tmp_path / "rx"
    rx = procs(kafka_receiver(tansu.bootstrap, "forge", "g-forge", d, metrics=mport))
    rx.wait_for("assigned partitions")
    producer = [Producer({"bootstrap.servers": tansu.bootstrap, "enable.idempotence": True, "linger.ms": 0})]
    written: dict[str, list[bytes]] = {"s1": [], "s2": [], "s4": [], "s5": [], "s6": []}

    last: dict[tuple[str, str], int] = {}  # (sensor, process) -> its previous block's seq

    def send(sid: str, seq: int, n: int, *, instance: str, first_seq: int, raw: bytes | None = None,
             raw_len: int | None = None, keep: bool = True, prev: int | None = None) -> None:
        raw = _records(seq * 1000, n) if raw is None else raw
        payload = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
        head = P.encode_header(P.FrameType.DATA, len(payload), seq=seq, count=n,
                               raw_len=len(raw) if raw_len is None else raw_len)
        headers = {"type": "data", "sensor_id": sid, "hostname": "h", "interface": "eth0", "link_type": "1",
                   "snaplen": "65535", "seq": str(seq), "instance": instance, "first_seq": str(first_seq),
                   "prev_seq": str(last.get((sid, instance), 0) if prev is None else prev)}
        last[(sid, instance)] = seq
        producer[0].produce("forge", key=sid.encode(), value=head + payload,
                     headers=[(k, v.encode()) for k, v in headers.items()])
        if keep and sid in written:
            written[sid].append(raw)

    producer[0].produce("forge", key=b"foreign", value=b"an application's own message")
    ahead = _time.time_ns() // 1000 + 3600 * 10**6
    send("s1", 1000, 3, instance="A", first_seq=1000)
    bad = bytearray(_records(0, 5))
    bad[8:12] = (10**6).to_bytes(4, "little")  # a record longer than the block
    send("s1", ahead, 5, instance="A", first_seq=1000, raw=bytes(bad), keep=False)
    send("s1", 1001, 4, instance="A", first_seq=1000, prev=1000)
    send("s2", 2000, 2, instance="A", first_seq=2000)
    send("s2", 2010, 2, instance="A", first_seq=2000)
    send("s2", 2005, 3, instance="B", first_seq=2005, keep=False)  # a second process: below 2010
    send("s2", 2000, 2, instance="C", first_seq=5000, keep=False)  # a later run resends a spooled block
    send("s2", 5000, 1, instance="C", first_seq=5000)
    bad5 = bytearray(_records(0, 2))
    bad5[8:12] = (10**6).to_bytes(4, "little")
    send("s5", 5999, 1, instance="A", first_seq=5999)
    send("s5", 6000, 2, instance="A", first_seq=5999, raw=bytes(bad5), keep=False)  # rejected ...
    send("s5", 6000, 2, instance="A", first_seq=5999, raw=bytes(bad5), keep=False, prev=5999)  # ... resent: a duplicate
    send("s5", 6001, 1, instance="A", first_seq=5999)
    send("s6", 7000, 1, instance="A", first_seq=7000)
    send("s6", _time.time_ns() // 1000, 2, instance="X", first_seq=1, raw=bytes(bad5), keep=False)  # not A's
    send("s6", 7001, 1, instance="A", first_seq=7000)  # written: the bad block near the clock muted nothing
    send("s4", 4000, 1, instance="A", first_seq=4000)
    send("s4", 4001, 1, instance="A", first_seq=4000)
    send("s4", 4003, 1, instance="A", first_seq=4000, prev=4002)  # 4002 never arrives (a broker lost it)
    big = 16 << 20  # above the receiver's 8 MiB
    send("s3", 3000, 1, instance="A", first_seq=3000, raw=b"\0" * big, raw_len=big)
    assert producer[0].flush(30) == 0
    producer.clear()  # (an open client would keep reconnecting to the broker stopped after the test)
    wait_metric(mport, "pktstream_sensor_packets_total", "s2", 5)
    wait_metric(mport, "pktstream_sensor_packets_total", "s1", 7)
    wait_metric(mport, "pktstream_sensor_packets_total", "s4", 3)
    wait_metric(mport, "pktstream_sensor_packets_total", "s5", 2)
    wait_metric(mport, "pktstream_sensor_packets_total", "s6", 2)
    wait_metric(mport, "pktstream_sensor_rejected_packets_total", "s3", 1)
    wait_metric(mport, "pktstream_sensor_conflict_packets_total", "s2", 3)
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    assert re.search(r'^pktstream_input_bad_messages_total\{input="kafka://[^"]+"\} 1\.0$', body, re.M), body
    assert rx.stop(signal.SIGTERM) == 0, rx.stderr
    st = json.loads((d / "rx.json").read_text())
    sensors = st["sensors"]
    assert set(sensors) == {"s1", "s2", "s3", "s4", "s5", "s6"}, sensors.keys()  # no entry for the foreign key
    assert [sensors[x]["seq_gaps"] for x in ("s1", "s2", "s3", "s4", "s5")] == [0, 0, 0, 1, 0]
    s5 = sensors["s5"]
    assert (s5["rejected_packets"], s5["duplicate_frames"], s5["packets"]) == (2, 1, 2), s5
    s6 = sensors["s6"]
    assert (s6["rejected_packets"], s6["duplicate_frames"], s6["packets"]) == (2, 0, 2), s6
    assert "the blocks after seq 4001 up to seq 4002 never arrived" in rx.stderr
    assert st["inputs"][0]["skipped_messages"] == 0 and "committed offsets" not in rx.stderr
    assert sensors["s1"]["rejected_packets"] == 5 and sensors["s1"]["duplicate_frames"] == 0
    assert sensors["s2"]["conflict_frames"] == 1 and sensors["s2"]["conflict_packets"] == 3
    assert sensors["s2"]["duplicate_frames"] == 1 and sensors["s2"]["rejected_frames"] == 0
    assert sensors["s3"]["rejected_packets"] == 1 and sensors["s3"]["packets"] == 0
    assert st["inputs"][0]["bad_messages"] == 1
    assert "two sensors publish with this id" in rx.stderr and "above the 8388608" in rx.stderr
    for sid, raws in written.items():
        got = sorted(p[2] for f in sorted((d / "out").glob(f"{sid}*.pcap")) for p in read_pcap_dpkt(f))
        assert got == sorted(p for r in raws for p in _packets_of(r)), sid
    # restarted, the receiver remembers which process made which blocks (its state file): an
    # earlier block of the first process read again is a duplicate, the second process's a conflict
    rx = procs(kafka_receiver(tansu.bootstrap, "forge", "g-forge", d, metrics=mport))
    rx.wait_for("assigned partitions")
    producer.append(Producer({"bootstrap.servers": tansu.bootstrap, "enable.idempotence": True, "linger.ms": 0}))
    send("s2", 2009, 2, instance="A", first_seq=2000, keep=False)
    send("s2", 2006, 2, instance="B", first_seq=2005, keep=False)
    assert producer[0].flush(30) == 0
    producer.clear()
    wait_metric(mport, "pktstream_sensor_conflict_frames_total", "s2", 1)
    wait_metric(mport, "pktstream_sensor_duplicate_frames_total", "s2", 1)
    assert rx.stop(signal.SIGTERM) == 0, rx.stderr
    s2 = json.loads((d / "rx.json").read_text())["sensors"]["s2"]
    assert (s2["duplicate_frames"], s2["conflict_frames"], s2["packets"]) == (1, 1, 0), s2
    # (started again at the group's committed offset: no message is taken for one deleted unread)
    assert json.loads((d / "rx.json").read_text())["inputs"][0]["skipped_messages"] == 0
    # another group on the same state reads the whole topic again: every block is one read
    # again (a duplicate), none a second process's, although process B never had one accepted
    rx = procs(kafka_receiver(tansu.bootstrap, "forge", "g-forge-replay", d, metrics=mport))
    rx.wait_for("assigned partitions")
    wait_metric(mport, "pktstream_sensor_duplicate_frames_total", "s2", 7)
    wait_metric(mport, "pktstream_sensor_duplicate_frames_total", "s4", 3)
    assert rx.stop(signal.SIGTERM) == 0, rx.stderr
    again = json.loads((d / "rx.json").read_text())["sensors"]
    assert all(x["conflict_frames"] == 0 and x["packets"] == 0 and x["seq_gaps"] == 0 for x in again.values()), again


def _packets_of(raw: bytes) -> list[bytes]:
    """The packet bytes of a records block."""
    from pktstream import PacketBatch
    b = PacketBatch.from_records(raw, link_type=1)
    return [bytes(b[i]) for i in range(len(b))]
