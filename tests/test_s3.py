"""S3 output against a real S3 server (moto, started here on loopback; a live fixture): the sink
itself, and end to end: sensor → TCP → receiver → rotated files → objects (PUT and multipart), downloaded
and read back by tshark."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import warnings
from pathlib import Path

import pytest

from conftest import PKTSTREAM, free_port, read_pcap_dpkt, start_tcpdump, wait_pcap_count, wait_until
from pktstream.lab import traffic
from servers import moto  # noqa: F401  (fixture)
from test_stream import assert_same_packets, sensor_cmd

pytestmark = pytest.mark.live

BUCKET = "pcaps"


def s3_receiver(port: int, endpoint: str, d: Path, *extra: str) -> list[str]:
    return [*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "-w", f"s3://{BUCKET}/cap/",
            "--s3-endpoint", endpoint, "--s3-path-style", "--s3-staging", str(d / "staging"),
            "--state-dir", str(d / "st"), "--stats-interval", "1", "--stats-json", str(d / "rx.json"), *extra]


def download_all(client, dest: Path) -> dict[str, dict]:
    """Every object under cap/ → dest (tshark converts it to a nanosecond pcap there)."""
    out = {}
    dest.mkdir(exist_ok=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="cap/"):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            local = dest / key.replace("/", "_")
            client.download_file(BUCKET, key, str(local))
            pcap = local.with_suffix(".pcap")
            subprocess.run(["tshark", "-r", str(local), "-F", "nsecpcap", "-w", str(pcap)], check=True,
                           capture_output=True)
            out[key] = {"etag": obj["ETag"], "size": obj["Size"], "pcap": pcap}
    return out


def object_order(key: str) -> int:
    m = re.search(r"-(\d{6})\.pcapng$", key)
    assert m, key
    return int(m.group(1))


def wait_uploads(rx, n: int, timeout: float = 30) -> None:
    rx.wait_for(": uploaded cap/", timeout=timeout, count=n)


def s3_packets(client) -> int:
    """Packets in every object under cap/ (listing, downloading and counting them)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return sum(len(read_pcap_dpkt(o["pcap"])) for o in download_all(client, Path(d)).values())


def test_s3_objects_equal_reference_and_survive_an_s3_outage(veth, procs, tmp_path, moto):
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    p1, p2 = tmp_path / "p1.pcap", tmp_path / "p2.pcap"
    traffic.write_random_udp_pcap(str(p1), 7000, size=1000)   # ~7 MB: a 6 MiB multipart object + one more
    traffic.write_random_udp_pcap(str(p2), 2000, size=700)
    port = free_port()
    rx = procs(s3_receiver(port, moto.endpoint, tmp_path, "-C", "6MiB", "-G", "1.5", "--s3-part-size", "5MiB"),
               env=None)
    rx.wait_for("listening on")
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs(sensor_cmd(port, veth.outer, "-s", "1600", "--block-size", "256KiB",
                          "--stats-json", str(tmp_path / "sx.json")))
    sx.wait_for("connected to receiver")
    veth.replay(p1, pps=20000)
    wait_uploads(rx, 2)
    # the last file of phase 1 completes after -G and is uploaded: wait until S3 has it all
    wait_until(lambda: s3_packets(s3) >= 7000, 60, "all 7000 packets of phase 1 in S3", interval=0.5)
    before = download_all(s3, tmp_path / "dl")  # moto forgets everything when it stops
    # multipart exactly above the part size, in 5 MiB parts (how the files were cut depends on
    # timing: -C 6MiB or -G 1.5 s, whichever comes first)
    part = 5 << 20
    for o in before.values():
        etag = o["etag"].strip('"')
        parts = int(etag.rpartition("-")[2]) if "-" in etag else None
        assert parts == (-(-o["size"] // part) if o["size"] > part else None), o

    moto.stop()                                   # S3 unavailable
    veth.replay(p2, pps=4000)                     # 0.5 s of traffic: files complete, uploads fail
    wait_until(lambda: "failed" in rx.stderr and "retrying" in rx.stderr, 60, "an upload to fail and be retried")
    wait_until(lambda: list((tmp_path / "staging" / "ready").iterdir()), 60,
               "completed files to wait in the staging directory")
    wait_pcap_count(ref, 9000)
    moto.start()                                  # back on the same port, empty
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    assert sx.stop(signal.SIGTERM) == 0
    td.stop()
    assert rx.stop(signal.SIGTERM) == 0           # close() completes and uploads everything
    assert list((tmp_path / "staging" / "ready").iterdir()) == []
    after = download_all(s3, tmp_path / "dl2")
    assert after and not set(after) & set(before)  # new objects only, no key reused

    objs = sorted({**before, **after}.items(), key=lambda kv: object_order(kv[0]))
    got = []
    for key, o in objs:
        assert key.startswith("cap/") and "/" in key[4:]
        got.extend(read_pcap_dpkt(o["pcap"]))
    ref_pkts = read_pcap_dpkt(ref)
    assert len(ref_pkts) == 9000
    assert_same_packets(got, ref_pkts, tol_ns=0)
    rst = json.loads((tmp_path / "rx.json").read_text())
    out = next(v for k, v in rst["outputs"].items() if k.startswith("s3://"))
    assert out.get("dropped_packets", 0) == 0


def _batches(n_batches: int, per_batch: int) -> list:
    """Real Ethernet frames in batches; packet i has timestamp i ns."""
    import struct

    from pktstream import PacketBatch
    pkts = traffic.frames(n_batches * per_batch, seed=11)
    out = []
    for b in range(n_batches):
        recs = b"".join(struct.pack("<IIII", 1_700_000_000, i, len(pkts[i]), len(pkts[i])) + pkts[i]
                        for i in range(b * per_batch, (b + 1) * per_batch))
        out.append(PacketBatch.from_records(recs, link_type=1, interface="eth0"))
    return out


def test_s3_sink_uploads_with_put_and_multipart(tmp_path, moto):
    """S3Sink alone (boto3 managed transfer): a file above part_size becomes a multipart object of
    part_size parts, a small one a single PUT; both with the content type, byte for byte the
    packets written, nothing left staged; its client retries each request (standard mode)."""
    import pktstream
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import MIN_PART, S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "staging"), endpoint_url=moto.endpoint,
                  region="us-east-1", path_style=True, format="pcap", rotate_bytes=6 << 20,
                  rotate_seconds=3600, part_size=MIN_PART, acl=None, close_timeout=60)
    assert sink.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    src = Source("s1", "host", "eth0", 1, 65535)
    batches = _batches(40, 600)                  # ~8.4 MB: one 6 MiB file (2 parts) + the rest
    written = [bytes(p) for b in batches for p in b]
    for b in batches:
        sink.write(src, b)
        sink.flush()
    sink.close()                                 # completes the last file, waits for its upload
    assert os.listdir(tmp_path / "staging" / "ready") == []
    assert sink.counters["uploaded_files"] == 2 and sink.counters["multipart_uploads"] == 1
    assert sink.counters["upload_failures"] == 0 and "left_staged" not in sink.counters
    keys = sink.uploaded
    heads = [s3.head_object(Bucket=BUCKET, Key=k) for k in keys]
    assert [h["ContentType"] for h in heads] == ["application/vnd.tcpdump.pcap"] * 2
    assert heads[0]["ETag"].strip('"').endswith("-2") and heads[0]["ContentLength"] > MIN_PART
    assert "-" not in heads[1]["ETag"] and heads[1]["ContentLength"] <= MIN_PART
    got = []
    for i, k in enumerate(keys):
        local = tmp_path / f"o{i}.pcap"
        s3.download_file(BUCKET, k, str(local))
        got += [bytes(p) for b in pktstream.read(str(local)) for p in b]
    assert got == written


def test_s3_sink_client_retries_each_request(tmp_path, moto):
    """The client S3Sink builds retries a failing request (botocore standard mode: 3 attempts
    here) before the sink's own whole-file retry: counted on the wire, S3 down."""
    import botocore.exceptions

    from pktstream.sinks.s3 import S3Sink

    sink = S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "staging"), endpoint_url=moto.endpoint,
                  region="us-east-1", path_style=True, close_timeout=5)
    try:
        sent = []
        sink.client.meta.events.register("before-send.s3.PutObject", lambda **kw: sent.append(kw["request"].url))
        moto.stop()
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            sink.client.put_object(Bucket=BUCKET, Key="cap/x", Body=b"x")
        assert len(sent) == 3
    finally:
        sink.close()


def test_s3_sink_uploads_what_an_earlier_run_left(tmp_path, moto):
    """Leftovers: files an earlier run left in ready/ (unique upload names) and completed files
    in the staging directory (crash recovery) are uploaded, byte for byte; a .part file (being
    written) is not touched; a file in ready/ with a foreign name is set aside as .unknown."""
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging = tmp_path / "staging"
    (staging / "ready").mkdir(parents=True)
    earlier = staging / "ready" / "s1__20260102T030405Z__abcd1234-000007.pcap"
    earlier.write_bytes(b"earlier run" * 100)
    recovered = staging / "s2.pcap"
    recovered.write_bytes(b"recovered" * 100)
    (staging / "s3.pcap.part").write_bytes(b"open")
    (staging / "ready" / "junk.pcap").write_bytes(b"?")
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format="pcap", acl=None, close_timeout=60)
    sink.close()
    assert sink.counters["uploaded_files"] == 2 and sink.counters["upload_failures"] == 0
    assert "cap/s1/2026/01/02/030405-abcd1234-000007.pcap" in sink.uploaded
    s2_key, = [k for k in sink.uploaded if k.startswith("cap/s2/")]
    assert re.fullmatch(rf"cap/s2/\d{{4}}/\d\d/\d\d/\d{{6}}-{sink.run_id}-000000\.pcap", s2_key), s2_key
    body = {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in sink.uploaded}
    assert body == {"cap/s1/2026/01/02/030405-abcd1234-000007.pcap": b"earlier run" * 100,
                    s2_key: b"recovered" * 100}
    assert sorted(n for n in os.listdir(staging) if n != ".lock") == ["ready", "s3.pcap.part"]
    assert os.listdir(staging / "ready") == ["junk.pcap.unknown"]


_CRASHING_WRITER = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_s3 import BUCKET, _batches
from pktstream.sinks.base import Source
from pktstream.sinks.s3 import S3Sink
staging, endpoint, state_path = sys.argv[2:5]
sink = S3Sink(BUCKET, "cap/", staging_dir=staging, endpoint_url=endpoint, region="us-east-1", path_style=True,
              format="pcap", rotate_bytes=300_000, rotate_seconds=3600, acl=None)
sink.use_acknowledgements()  # as a receiver does
src = Source("s1", "host", "eth0", 1, 65535)
batches = _batches(12, 600)
for b in batches[:4]:
    sink.write(src, b)
state = sink.flush()
sink.acknowledged(state)  # the receiver persisted it and acknowledged flush 1
for b in batches[4:]:
    sink.write(src, b)  # rotation completes more files: nothing in them is acknowledged
with open(state_path, "w") as f:
    json.dump(state, f)
if sys.argv[5] == "after-an-upload":  # the uploader thread sent a released file before the crash
    import time
    while sink.counters["uploaded_files"] < 1:
        time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)  # the crash, before the next flush
"""


@pytest.mark.parametrize("crash", ["at-once", "after-an-upload"])
def test_s3_sink_uploads_only_acknowledged_files_across_a_crash(tmp_path, moto, crash):
    """Under a receiver, a file rotation completes waits in staging until the flush holding its
    last bytes is acknowledged. A crash after more files were completed: recovery (from the
    persisted state) cuts back and removes what was not acknowledged, and the next run uploads
    exactly the acknowledged packets -- the sensors' resent blocks are not in S3 twice."""
    import pktstream
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging, state_path = tmp_path / "staging", tmp_path / "state.json"
    child = subprocess.run([os.sys.executable, "-c", _CRASHING_WRITER, os.path.dirname(__file__), str(staging),
                            moto.endpoint, str(state_path), crash], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    state = json.loads(state_path.read_text())
    assert state["flush"] == 1
    S3Sink.recover(state)  # what the next receiver does first (Ingest loads the state)
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format="pcap", rotate_bytes=300_000, rotate_seconds=3600, acl=None,
                  close_timeout=60)
    sink.use_acknowledgements()
    sink.close()
    # every object in the bucket, not only those this sink uploaded: the crashed run's uploader may
    # have sent acknowledged files before the kill ("at-once" races with it: a clean-clone run
    # failed when it won)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="cap/")
            for o in page.get("Contents", [])]
    assert set(sink.uploaded) <= set(keys)
    objects = []  # (first timestamp, packets): the key order depends on the runs' random ids
    for i, k in enumerate(keys):
        local = tmp_path / f"o{i}.pcap"
        s3.download_file(BUCKET, k, str(local))
        batches = list(pktstream.read(str(local)))
        objects.append((int(batches[0].ts_ns[0]), [bytes(p) for b in batches for p in b]))
    got = [p for _, pkts in sorted(objects) for p in pkts]
    assert len(keys) >= 2  # rotation completed files before the flush too
    assert got == [bytes(p) for b in _batches(12, 600)[:4] for p in b]


_NEW_SENSOR_THEN_CRASH = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_s3 import BUCKET, _batches
from pktstream.sinks.base import Source
from pktstream.sinks.s3 import S3Sink
staging, endpoint, state_path = sys.argv[2:5]
sink = S3Sink(BUCKET, "cap/", staging_dir=staging, endpoint_url=endpoint, region="us-east-1", path_style=True,
              format="pcap", rotate_bytes=300_000, rotate_seconds=3600, acl=None)
sink.recover_unacknowledged(None, "state")  # as a receiver with a state dir does at start
sink.use_acknowledgements()
batches = _batches(12, 600)
sink.write(Source("s1", "host", "eth0", 1, 65535), batches[0])
state = sink.flush()
sink.persisted(state)  # the receiver saved it,
sink.acknowledged(state)  # and acknowledged flush 1
with open(state_path, "w") as f:
    json.dump(state, f)
for b in batches[1:]:
    sink.write(Source("s2", "host", "eth0", 1, 65535), b)  # a sensor first seen after the flush; rotated
os.kill(os.getpid(), signal.SIGKILL)  # the crash, before the next flush
"""


def test_s3_sink_never_uploads_the_files_of_a_sensor_first_seen_after_the_last_flush(tmp_path, moto):
    """No persisted state names an output opened after the last acknowledged flush: its files
    completed by rotation stayed staged after a crash and the next run uploaded them as an earlier
    run's leftovers -- with the packets the sensor resent: twice in S3. The next run's receiver
    removes them first (FileSink's markers, recover_unacknowledged)."""
    import pktstream
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging, state_path = tmp_path / "staging", tmp_path / "state.json"
    child = subprocess.run([os.sys.executable, "-c", _NEW_SENSOR_THEN_CRASH, os.path.dirname(__file__), str(staging),
                            moto.endpoint, str(state_path)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len([n for n in os.listdir(staging) if n.startswith("s2.") and n.endswith(".pcap")]) >= 2
    state = json.loads(state_path.read_text())
    after = S3Sink.recover(state)  # what the next receiver does (Ingest loads the state)
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format="pcap", rotate_bytes=300_000, rotate_seconds=3600, acl=None,
                  close_timeout=60)
    removed = sink.recover_unacknowledged(after, "state")
    assert removed and all(os.path.basename(p).startswith("s2.") for p in removed)
    sink.resume(after)
    sink.use_acknowledgements()
    sink.close()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="cap/")
            for o in page.get("Contents", [])]
    assert keys and all(k.startswith("cap/s1/") for k in keys), keys
    got = []
    for i, k in enumerate(keys):
        local = tmp_path / f"o{i}.pcap"
        s3.download_file(BUCKET, k, str(local))
        got += [bytes(p) for b in pktstream.read(str(local)) for p in b]
    assert got == [bytes(p) for p in _batches(12, 600)[0]]


_RESET_THEN_CRASH = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_s3 import BUCKET, _batches
from pktstream.sinks.base import Source
from pktstream.sinks.s3 import S3Sink
staging, endpoint, fmt, run, state_path = sys.argv[2:7]
sink = S3Sink(BUCKET, "cap/", staging_dir=staging, endpoint_url=endpoint, region="us-east-1", path_style=True,
              format=fmt, rotate_seconds=3600, acl=None)
src = Source("s1", "host", "eth0", 1, 65535)
batches = _batches(12, 100)
if run == "1":
    sink.use_acknowledgements()  # as a receiver does
    for b in batches[:4]:
        sink.write(src, b)
    state = sink.flush()
    sink.acknowledged(state)  # persisted and acknowledged: the file open at this flush holds batches 0-3
    with open(state_path, "w") as f:
        json.dump(state, f)
    sink.reset()  # the next group failed (StagingFull in an S3 outage): back to the flush
    for b in batches[4:8]:
        sink.write(src, b)  # the group written again by a new writer; never acknowledged
else:
    with open(state_path) as f:
        sink.resume(json.load(f))  # as a receiver does after recovery
    sink.use_acknowledgements()
    for b in batches[8:]:
        sink.write(src, b)  # before this run's first commit
os.kill(os.getpid(), signal.SIGKILL)  # the crash, before the next commit
"""


@pytest.mark.parametrize("fmt", ["pcap", "pcap.zst"])
def test_s3_sink_never_reuses_a_number_the_state_names(tmp_path, moto, fmt):
    """The staging directory moves an acknowledged file out (to ready/), so a new writer -- after
    a reset, or in the next run -- found no file of its pattern and numbered from 000000 again:
    the number of the file the persisted state names. A crash before the next commit then made
    recovery take the new file for that one: cut back to its size and kept, and uploaded,
    though nothing in it was acknowledged (the sensors resend it: packets twice in S3, and for
    an uncompressed file a record cut in two). Two crashes in a row (cold review)."""
    import pktstream
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging, state_path = tmp_path / "staging", tmp_path / "state.json"

    def crashing_run(run: str) -> None:
        child = subprocess.run([os.sys.executable, "-c", _RESET_THEN_CRASH, os.path.dirname(__file__),
                                str(staging), moto.endpoint, fmt, run, str(state_path)],
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == -signal.SIGKILL, child.stderr
        recovered = S3Sink.recover(json.loads(state_path.read_text()))  # the next receiver's start
        state_path.write_text(json.dumps(recovered))  # (the receiver persists it)
    crashing_run("1")
    crashing_run("2")
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format=fmt, rotate_seconds=3600, acl=None, close_timeout=60)
    sink.resume(json.loads(state_path.read_text()))
    sink.use_acknowledgements()
    sink.close()
    ts = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="cap/"):
        for i, obj in enumerate(page.get("Contents", [])):
            local = tmp_path / f"o{i}.{fmt}"
            local.write_bytes(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # (a record cut in two is a warning)
                ts += [t for b in pktstream.read(str(local)) for t in b.ts_ns.tolist()]
    assert sorted(ts) == [t for b in _batches(12, 100)[:4] for t in b.ts_ns.tolist()]


def test_s3_sink_holds_completed_files_until_acknowledged(tmp_path, moto):
    """The uploader does not take a completed file that waits for its acknowledgement (its
    pass over leftovers skips it), and takes it once the flush holding it is acknowledged."""
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging = tmp_path / "staging"
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format="pcap", rotate_bytes=300_000, rotate_seconds=3600, acl=None,
                  close_timeout=60)
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    batches = _batches(8, 600)
    for b in batches[:4]:
        sink.write(src, b)
    first = sink.flush()
    for b in batches[4:]:
        sink.write(src, b)
    second = sink.flush()
    held = sorted(n for n in os.listdir(staging) if n.endswith(".pcap"))
    assert len(held) >= 3 and os.listdir(staging / "ready") == []
    sink.acknowledged(first)
    n_first = len(held) - len([n for n in os.listdir(staging) if n.endswith(".pcap")])
    assert n_first >= 1
    wait_until(lambda: sink.counters["uploaded_files"] == n_first, what="the first flush's files uploaded")
    scans = sink.counters["uploader_scans"]
    wait_until(lambda: sink.counters["uploader_scans"] >= scans + 2, what="a whole uploader pass after them")
    # the uploader's passes (each starts with the leftovers) ran: the rest still waits
    assert sorted(n for n in os.listdir(staging) if n.endswith(".pcap")) == held[n_first:]
    sink.acknowledged(second)
    wait_until(lambda: sink.counters["uploaded_files"] == len(held), what="the second flush's files uploaded")
    sink.close()
    assert sink.counters["uploaded_files"] == len(held) + 1  # and the open file, completed at close


def test_s3_sink_holds_files_a_reset_completed_until_acknowledged(tmp_path, moto):
    """After a failed write the receiver resets the output: the open file is cut back to the last
    flush and completed. It waits like any completed file until that flush is acknowledged (it
    was taken at once as a leftover: uploaded, then resent after a crash)."""
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging = tmp_path / "staging"
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format="pcap", rotate_bytes=50 << 20, rotate_seconds=3600, acl=None,
                  close_timeout=60)
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    batches = _batches(3, 600)
    sink.write(src, batches[0])
    first = sink.flush()
    sink.write(src, batches[1])  # the group that "failed"
    sink.reset()
    held = [n for n in os.listdir(staging) if n.endswith(".pcap")]
    assert len(held) == 1
    sink.write(src, batches[2])
    scans = sink.counters["uploader_scans"]
    sink.flush()  # wakes the uploader: whole passes over the staging directory follow
    wait_until(lambda: sink.counters["uploader_scans"] >= scans + 2, what="a whole uploader pass")
    assert [n for n in os.listdir(staging) if n.endswith(".pcap")] == held
    assert sink.counters["uploaded_files"] == 0 and os.listdir(staging / "ready") == []
    sink.acknowledged(first)
    wait_until(lambda: sink.counters["uploaded_files"] == 1, what="the reset file uploaded")
    sink.close()


def test_s3_sink_reset_after_a_group_that_crossed_rotations_uploads_each_packet_once(tmp_path, moto):
    """A write group that crossed rotations fails (StagingFull: the S3 output's normal
    backpressure): reset() takes the staging directory back to the last flush (the files
    completed since are removed, not kept and held), so the rewritten group reaches S3 once
    and nothing it removed stays held against the staging limit."""
    import pktstream
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging = tmp_path / "staging"
    batches = _batches(6, 300)
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1",
                  path_style=True, format="pcap", rotate_bytes=batches[0].nbytes + 100, rotate_seconds=3600,
                  acl=None, close_timeout=60)
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    sink.write(src, batches[0])
    first = sink.flush()
    for b in batches[1:4]:  # the group crosses rotations, then "fails"
        sink.write(src, b)
    sink.reset()
    staged = sorted(n for n in os.listdir(staging) if n.endswith(".pcap"))
    assert len(staged) == 1  # the file of the first flush, cut back to it
    for b in batches[1:]:  # the receiver writes the whole group again
        sink.write(src, b)
    last = sink.flush()
    sink.acknowledged(first)
    sink.acknowledged(last)
    sink.close()
    ts = []
    for i, key in enumerate(sink.uploaded):
        (tmp_path / f"o{i}.pcap").write_bytes(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        ts += [t for b in pktstream.read(tmp_path / f"o{i}.pcap") for t in b.ts_ns.tolist()]
    assert sorted(ts) == sorted(t for b in batches for t in b.ts_ns.tolist())


def test_s3_staging_bound_holds_and_a_started_group_completes(tmp_path, moto):
    """The staging bound (cold review): writes within the 0.2 s the staged figure is cached
    were all let through (a 12 MiB bound held 86 MB); and under a receiver a write group larger
    than the room left was refused again and again for ever (its bytes leave staging only after
    its flush: the receiver stalled after an S3 outage with a small bound). Now the bound counts
    what was written since the last scan, and a group, once begun, completes: staging exceeds
    the bound by at most one group; the next group waits for room."""
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink, StagingFull
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    batches = _batches(12, 200)
    size = batches[0].nbytes
    src = Source("s1", "host", "eth0", 1, 65535)

    def staged(d):
        return sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    opts = dict(endpoint_url=moto.endpoint, region="us-east-1", path_style=True, format="pcap",
                rotate_bytes=1 << 30, rotate_seconds=3600, acl=None, close_timeout=60,
                staging_max_bytes=4 * size + size // 2)
    alone = S3Sink(BUCKET, "a/", staging_dir=str(tmp_path / "a"), **opts)  # (no receiver: each write checked)
    written = 0
    with pytest.raises(StagingFull):
        for b in batches:
            alone.write(src, b)
            written += 1
    assert written == 4 and staged(tmp_path / "a") <= opts["staging_max_bytes"]
    alone.reset()
    alone.close()

    sink = S3Sink(BUCKET, "r/", staging_dir=str(tmp_path / "r"), **opts)
    sink.use_acknowledgements()  # a receiver's gating output: a group, then its flush
    for b in batches[:3]:
        sink.write(src, b)
    sink.flush()  # 3 batches staged, room for one more
    for b in batches[3:9]:  # a group of 6: completes although it passes the bound
        sink.write(src, b)
    first = sink.flush()
    assert staged(tmp_path / "r") > opts["staging_max_bytes"]
    with pytest.raises(StagingFull):  # the next group waits until uploads make room
        sink.write(src, batches[9])
    sink.reset()
    sink.acknowledged(first)
    sink.close()
    assert sink.counters["staging_full"] == 1


def test_s3_sink_uploads_at_close_only_what_is_acknowledged(tmp_path, moto):
    """A receiver commits its last flush before it closes its outputs. A file whose flush was
    not acknowledged when close() runs (the state could not be saved) stays staged instead of
    being uploaded -- the sensors resend its packets after a restart, so uploading it would
    duplicate them -- and the next run's recovery cuts it back to what was acknowledged."""
    import pktstream
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    staging = tmp_path / "staging"
    opts = dict(staging_dir=str(staging), endpoint_url=moto.endpoint, region="us-east-1", path_style=True,
                format="pcap", rotate_bytes=50 << 20, rotate_seconds=3600, acl=None, close_timeout=60)
    sink = S3Sink(BUCKET, "cap/", **opts)
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    batches = _batches(2, 600)
    sink.write(src, batches[0])
    first = sink.flush()
    sink.acknowledged(first)
    sink.write(src, batches[1])
    sink.flush()  # never acknowledged
    sink.close()
    assert sink.counters["uploaded_files"] == 0 and s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0
    assert len([n for n in os.listdir(staging) if n.endswith(".pcap")]) == 1
    # the next run: recovery from the last acknowledged state, then its leftovers go up
    S3Sink.recover(first)
    again = S3Sink(BUCKET, "cap/", **opts)
    again.use_acknowledgements()
    again.close()
    [key] = again.uploaded
    (tmp_path / "o.pcap").write_bytes(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    got = [t for b in pktstream.read(tmp_path / "o.pcap") for t in b.ts_ns.tolist()]
    assert got == batches[0].ts_ns.tolist()  # the acknowledged packets, once


def test_s3_settings_that_would_lose_data_are_refused_or_made_safe(tmp_path, moto, monkeypatch):
    """A key template that could give two files one key (an object overwritten), or that does
    not format, is refused at start, not at the first upload; two receivers cannot share a
    staging directory; without --s3-staging/--state-dir every run to one destination stages in
    the same directory (a temporary one per run left what a stopped run staged behind, never
    uploaded); --fsync reaches the staged files; the output's counters are in the receiver's."""
    import types

    from pktstream.cli.cloud import receiver_outputs
    from pktstream.config_plugins import S3Settings
    from pktstream.exceptions import ConfigError
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink
    from pktstream.stream.receiver.outputs import Outputs

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    kw = dict(endpoint_url=moto.endpoint, region="us-east-1", path_style=True, format="pcap", close_timeout=30)
    for bad, why in (("{prefix}{date:%Y-%m-%d-%H-%M-%S}.{ext}", "same key"), ("{prefix}{sensor}-{seq:06d",
                                                                                  "ValueError"),
                     ("{prefix}{bogus}-{run}-{seq}", "KeyError"), ("{prefix}{sensor}-{seq}.{ext}", "same key")):
        with pytest.raises(ConfigError, match=why):
            S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "t"), key_template=bad, **kw)
    first = S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "shared"), fsync=True, **kw)
    with pytest.raises(ConfigError, match="in use by another running receiver"):
        S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "shared"), **kw)
    assert first._files.opts["fsync"] is True
    first.write(Source("s1", "host", "eth0", 1, 65535), _batches(2, 50)[0])
    first.flush()
    outputs = Outputs([first], maxsize=4, closing=__import__("threading").Event(), on_flushed=lambda *a: None)
    first.close()
    st = outputs.stats()[first.name]
    assert st["uploaded_files"] == 1 and st.get("upload_failures", 0) == 0 and st["waiting_files"] == 0
    S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "shared"), **kw).close()  # released at close

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def settings(prefix: str):
        return types.SimpleNamespace(kafka=None, state_dir=None, rotate_bytes=None, rotate_seconds=None,
                                     index=False, index_max_flows=None, fsync=False,
                                     s3=S3Settings(bucket=BUCKET, prefix=prefix, endpoint=moto.endpoint,
                                                   path_style=True, region="us-east-1"))
    a = receiver_outputs(settings("cap/"))[0]
    a.close()
    b = receiver_outputs(settings("cap/"))[0]
    c = receiver_outputs(settings("other/"))[0]
    assert a.staging_dir == b.staging_dir != c.staging_dir
    assert a.staging_dir.startswith(str(tmp_path / "state" / "pktstream" / "s3-staging"))
    b.close()
    c.close()


def test_s3_sink_time_rotation_that_fails_while_idle_goes_on_and_loses_nothing(tmp_path, moto, monkeypatch):
    """The staging FileSink's idle time rotation runs in the sink's own thread; its rename
    failing (EIO) raised out of that thread -- no more time rotation -- and left the writer
    without its file, whose .part held acknowledged packets: never uploaded, and removed by a
    crash's recovery (fuzzing with write errors). The thread now resets the staging output
    (the file is completed as of the last flush: everything, at idle) and goes on."""
    import errno
    import threading

    import pktstream
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink

    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    clock = [1_800_000_000.0]
    sink = S3Sink(BUCKET, "cap/", staging_dir=str(tmp_path / "staging"), endpoint_url=moto.endpoint,
                  region="us-east-1", path_style=True, format="pcap", rotate_bytes=50_000_000, rotate_seconds=10,
                  acl=None, close_timeout=60)
    sink._files.opts["clock"] = lambda: clock[0]
    sink.recover_unacknowledged(None, "/var/lib/pktstream/receiver-state.json")
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    batches = _batches(2, 50)
    sink.write(src, batches[0])
    state = sink.flush()
    sink.persisted(state)
    sink.acknowledged(state)
    real_replace = os.replace
    faults = [1]

    def replace(a, b, *x, **kw):  # the ticker's rotation: its rename fails once
        if faults[0] and str(a).endswith(".pcap.part") and threading.current_thread().name == "s3-rotate":
            faults[0] -= 1
            raise OSError(errno.EIO, "Input/output error", a)
        return real_replace(a, b, *x, **kw)
    monkeypatch.setattr(os, "replace", replace)
    clock[0] += 11  # the open file is due; nothing arrives
    wait_until(lambda: sink.counters["failures"] == 1, 30, "the idle rotation to fail")
    wait_until(lambda: sink.counters["uploaded_files"] == 1, 60, "the file, completed by the reset, uploaded")
    monkeypatch.undo()
    assert sink._ticker.is_alive() and faults[0] == 0
    sink.write(src, batches[1])
    clock[0] += 11
    state = sink.flush()  # (rotates: due again)
    sink.persisted(state)
    sink.acknowledged(state)
    sink.close()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="cap/").get("Contents", [])]
    got = []
    for i, k in enumerate(keys):
        local = tmp_path / f"o{i}.pcap"
        s3.download_file(BUCKET, k, str(local))
        got += [bytes(p) for b in pktstream.read(str(local)) for p in b]
    assert len(keys) == 2 and sorted(got) == sorted(bytes(p) for b in batches for p in b)


# -- faults found by fault-injection fuzzing of the S3 output (session 24) ------------------------
def _s3_sink(moto, staging, **kw):
    """An S3 output under a receiver (markers, acknowledgements) into a new bucket."""
    from pktstream.sinks.s3 import S3Sink
    s3 = moto.client()
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)
    opts = {"staging_dir": str(staging), "endpoint_url": moto.endpoint, "region": "us-east-1", "path_style": True,
            "format": "pcap", "rotate_seconds": None, "acl": None, "close_timeout": 60, **kw}
    sink = S3Sink(BUCKET, "cap/", **opts)
    return sink, opts


def _commit(sink) -> dict:
    """The receiver: flush, save the state, acknowledge."""
    state = json.loads(json.dumps(sink.flush()))
    sink.persisted(state)
    sink.acknowledged(state)
    return state


def _objects(moto, tmp_path) -> tuple[list[int], dict[str, int]]:
    """Every packet's timestamp in the bucket's objects, and the packets per object."""
    import pktstream
    s3 = moto.client()
    ts, per_object = [], {}
    for i, o in enumerate(s3.list_objects_v2(Bucket=BUCKET, Prefix="cap/").get("Contents", [])):
        if "/_index/" in o["Key"]:
            continue
        local = tmp_path / f"object{i}.pcap"
        s3.download_file(BUCKET, o["Key"], str(local))
        got = [t for b in pktstream.read(str(local)) for t in b.ts_ns.tolist()]
        ts += got
        per_object[o["Key"][len("cap/"):]] = len(got)
    return sorted(ts), per_object


def _all_ts(batches) -> list[int]:
    return sorted(t for b in batches for t in b.ts_ns.tolist())


def test_s3_sink_a_rotation_whose_directory_fsync_fails_uploads_each_packet_once(tmp_path, moto, monkeypatch):
    """--fsync: a rotation's directory fsync failing (EIO) after its rename left a completed
    staging file neither the writer nor the sink knew of; the reset kept it, the uploader took
    it as a leftover -- unacknowledged -- and the rewritten group sent its packets again: twice
    in S3 (fuzzing). The writer records the file before that fsync now."""
    import errno

    import pktstream.formats.writer as writer
    from pktstream.sinks.base import Source
    batches = _batches(1, 20)
    sink, _ = _s3_sink(moto, tmp_path / "staging", rotate_bytes=batches[0].nbytes // 3, fsync=True)
    sink.recover_unacknowledged(None, "/var/lib/pktstream/receiver-state.json")
    sink.use_acknowledgements()
    real, faults = writer.fsync_dir, [1]

    def fsync_dir(path):
        if faults[0]:
            faults[0] -= 1
            raise OSError(errno.EIO, "Input/output error", path)
        return real(path)
    monkeypatch.setattr(writer, "fsync_dir", fsync_dir)
    src = Source("s1", "host", "eth0", 1, 65535)
    with pytest.raises(OSError, match="Input/output"):
        sink.write(src, batches[0])  # (the first rotation's fsync fails)
    sink.reset()  # the runner: back to the last flush (nothing), and the group again
    sink.write(src, batches[0])
    _commit(sink)
    sink.close()
    assert faults == [0] and _objects(moto, tmp_path)[0] == _all_ts(batches)


def test_s3_sink_a_reset_that_fails_half_way_uploads_nothing_unacknowledged(tmp_path, moto, monkeypatch):
    """A reset failing half-way (EIO removing one of the files rotation completed during the
    failed group) made the sink release the files it had not removed yet as if they held only
    the last flush: uploaded at once, and the receiver wrote the group again -- twice in S3
    (fuzzing). They stay held until a reset worked."""
    import errno

    from pktstream.sinks.base import Source
    batches = _batches(3, 5)
    sink, _ = _s3_sink(moto, tmp_path / "staging", rotate_bytes=1)  # (a file per packet)
    sink.recover_unacknowledged(None, "/var/lib/pktstream/receiver-state.json")
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    sink.write(src, batches[0])
    _commit(sink)
    sink.write(src, batches[1])  # the next group: files completed by rotation
    real_open, real_unlink = os.open, os.unlink
    faults = {"open": 1, "unlink": 1}

    def os_open(path, flags, *a, **kw):  # disk full at the group's next file
        if str(path).endswith(".pcap.part") and faults["open"]:
            faults["open"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, flags, *a, **kw)

    def unlink(path, *a, **kw):  # the reset's removal of one of the group's files
        if re.search(r"s1\.0+6\.pcap$", str(path)) and faults["unlink"]:
            faults["unlink"] -= 1
            raise OSError(errno.EIO, "Input/output error", path)
        return real_unlink(path, *a, **kw)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(OSError, match="No space"):
        sink.write(src, batches[2])
    with pytest.raises(OSError, match="Input/output"):
        sink.reset()
    monkeypatch.undo()
    assert faults == {"open": 0, "unlink": 0}
    with pytest.raises(OSError):  # the runner writes the group again: refused until a reset worked
        sink.write(src, batches[1])
        sink.flush()
    sink.reset()
    for b in batches[1:]:
        sink.write(src, b)
    _commit(sink)
    sink.close()
    assert _objects(moto, tmp_path)[0] == _all_ts(batches)


@pytest.mark.parametrize("fmt", ["pcap", "pcapng.zst"])
def test_s3_sink_a_recovery_killed_after_a_cut_back_commits_no_stale_index(tmp_path, moto, fmt):
    """An indexed S3 output's recovery cut back a file rotation completed after the last
    acknowledged flush, then dropped its staged index (NAME.idx, of the whole file); killed
    between the two, the next recovery found nothing to cut and the uploader committed the old
    index for the shorter object: a catalog row counting packets the object does not hold
    (fuzzing; .zst files also through a re-encode cut short). The staged index goes first."""
    from pktstream.archive import Archive
    from pktstream.sinks.base import Source
    from pktstream.sinks.s3 import S3Sink
    from test_partfiles import incompressible_batches

    class Killed(BaseException):
        pass
    batches = incompressible_batches(6, 10)  # (rotation counts a .zst file's compressed bytes)
    sink, opts = _s3_sink(moto, tmp_path / "staging", rotate_bytes=batches[0].nbytes * 2, index=True, format=fmt)
    owner = "/var/lib/pktstream/receiver-state.json"
    sink.recover_unacknowledged(None, owner)
    sink.use_acknowledgements()
    src = Source("s1", "host", "eth0", 1, 65535)
    sink.write(src, batches[0])
    state = _commit(sink)
    for b in batches[1:]:  # the next group: rotation completes the first file (indexed) and more
        sink.write(src, b)
    for w in sink._files._outputs.values():  # killed
        w.abandon()
    sink._closing.set()
    sink._lock_file.close()
    real_unlink, real_replace = os.unlink, os.replace

    def unlink(path, *a, **kw):  # killed at the first staged index's removal (after any cut)
        if str(path).endswith(".idx"):
            raise Killed(path)
        return real_unlink(path, *a, **kw)

    def replace(a, b, *x, **kw):  # ... or at a .zst re-encode's last step
        if str(a).endswith(".part.tmp"):
            raise Killed(a)
        return real_replace(a, b, *x, **kw)
    os.unlink, os.replace = unlink, replace
    try:
        with pytest.raises(Killed):
            S3Sink.recover(state)
    finally:
        os.unlink, os.replace = real_unlink, real_replace
    sink = S3Sink(BUCKET, "cap/", **opts)  # the next start
    after = S3Sink.recover(state)
    sink.resume(after)
    sink.recover_unacknowledged(after, owner)
    sink.use_acknowledgements()
    for b in batches[1:]:  # resent
        sink.write(src, b)
    _commit(sink)
    sink.close()
    ts, per_object = _objects(moto, tmp_path)
    assert ts == _all_ts(batches)
    rows = {r["path"]: r["packets"] for r in Archive(f"s3://{BUCKET}/cap/", client=moto.client()).catalog().to_pylist()}
    assert rows == per_object


def test_s3_sink_removes_the_temporary_files_a_killed_run_left(tmp_path, moto):
    """A staged index being written (NAME.idx.tmp) when the process was killed stayed for good
    and counted against the staging bound: with a small bound every later group was refused,
    the output stuck (fuzzing). The staging lock is the sink's: it removes them at start."""
    staging = tmp_path / "staging"
    (staging / "ready").mkdir(parents=True)
    (staging / "s1.000003.pcap.idx.tmp").write_bytes(bytes(8000))
    (staging / "ready" / "x.pcap.idx.tmp").write_bytes(bytes(8000))
    sink, _ = _s3_sink(moto, staging, rotate_bytes=10**6, staging_max_bytes=10_000)
    assert sink.staged_bytes() == 0
    assert not [p for p in staging.rglob("*.tmp")]
    sink.close()
