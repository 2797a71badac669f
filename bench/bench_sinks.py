"""Receiver outputs side by side, one run: file (pcapng), Kafka (tansu on loopback), S3 (moto on
loopback). Each gets the same decoded blocks through the Sink API, as a receiver's output thread
does: write() every block, flush() (Kafka: wait for every delivery report), close() (S3: wait for
every upload). Reported: blocks (= Kafka messages) per second and MB/s of pcap records.

    .venv/bin/python bench/bench_sinks.py [--blocks 96] [--block-size 1048576]
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pktstream._capture import PacketBatch  # noqa: E402
from pktstream.sinks import FileSink  # noqa: E402
from pktstream.sinks.base import Source  # noqa: E402
from servers import AWS_ENV, Moto, Tansu  # noqa: E402


def make_blocks(n: int, block_size: int, pkt: int = 1000) -> list[PacketBatch]:
    """Blocks of ``pkt``-byte frames with random-ish payloads (compress ~1.05x, like real traffic)."""
    rnd = os.urandom(block_size)
    blocks = []
    per = block_size // (pkt + 16)
    t = time.time_ns()
    for b in range(n):
        parts = []
        for i in range(per):
            t += 1000
            off = (b * 7919 + i * 104729) % (len(rnd) - pkt)
            data = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + rnd[off:off + pkt - 14]
            parts.append(struct.pack("<IIII", t // 10**9, t % 10**9, pkt, pkt) + data)
        blocks.append(PacketBatch.from_records(b"".join(parts), link_type=1, snaplen=65535, interface="bench/eth0"))
    return blocks


def run(sink, blocks, close_timed: bool) -> float:
    src = Source("bench", "benchhost", "eth0", 1, 65535)
    t0 = time.perf_counter()
    for i, b in enumerate(blocks, 1):
        sink.write(Source(src.sensor_id, src.hostname, src.interface, 1, 65535, seq=i), b)
        if i % 8 == 0:
            sink.flush()  # a receiver flushes after each group of queued blocks
    sink.flush()
    if close_timed:
        sink.close()
    dt = time.perf_counter() - t0
    if not close_timed:
        sink.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=96)
    ap.add_argument("--block-size", type=int, default=1 << 20)
    a = ap.parse_args()
    os.environ.update(AWS_ENV)
    blocks = make_blocks(a.blocks, a.block_size)
    mb = sum(b.nbytes for b in blocks) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(("file (pcapng, page cache)", run(FileSink(str(tmp / "out.pcapng")), blocks, True)))
        rows.append(("file (pcapng, fsync each flush)",
                     run(FileSink(str(tmp / "out2.pcapng"), fsync=True), blocks, True)))
        tansu = Tansu(tmp)
        tansu.start()
        try:
            tansu.create_topic("bench", 1)
            from pktstream.sinks.kafka import KafkaSink
            rows.append(("Kafka (tansu, acks=all, idempotent)",
                         run(KafkaSink(tansu.bootstrap, "bench"), blocks, True)))
        finally:
            tansu.stop(kill=True)
        moto = Moto(tmp)
        moto.start()
        try:
            moto.client().create_bucket(Bucket="bench")
            from pktstream.sinks.s3 import S3Sink
            s3 = S3Sink("bench", "b/", staging_dir=str(tmp / "stg"), endpoint_url=moto.endpoint,
                        region="us-east-1", path_style=True, rotate_bytes=16 << 20, rotate_seconds=60)
            rows.append(("S3 (moto, 16 MiB objects, multipart 5 MiB parts, until uploaded)", run(s3, blocks, True)))
            n_obj = len(s3.uploaded)
        finally:
            moto.stop()
    print(f"{a.blocks} blocks of {a.block_size} bytes ({mb:.0f} MB of pcap records, ~{len(blocks[0])} packets each)\n")
    print("| output | seconds | blocks (messages)/s | MB/s | × file |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][1]
    for name, dt in rows:
        print(f"| {name} | {dt:.2f} | {a.blocks / dt:.0f} | {mb / dt:.0f} | {dt / base:.1f} |")
    print(f"\nS3 objects uploaded: {n_obj}")


if __name__ == "__main__":
    main()
