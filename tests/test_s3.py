"""S3 output end to end against a real S3 server (moto, started here on loopback): sensor → TCP →
receiver → rotated files → objects (PUT and multipart), downloaded and read back by tshark."""
from __future__ import annotations

import json
import re
import signal
import subprocess
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
    assert any(o["etag"].strip('"').endswith("-2") for o in before.values()), before  # multipart, 2 parts

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
