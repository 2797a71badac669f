"""S2 block decoder (pktstream._s2): real encoder output, hand-made malformed blocks, fuzzing.

Vectors: tests/data/s2/vectors.jsonl.zst, made by tests/data/s2/s2vectors.go with the real
klauspost/compress s2 encoder (Encode, EncodeBetter, EncodeBest, EncodeSnappy); frames recorded
from a real PacketStreamer sensor: tests/data/packetstreamer/ (README there). Also run under
ASan/UBSan by ``./run sanitize``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from pktstream import _s2

DATA = Path(__file__).parent / "data"
EXAMPLES = int(os.environ.get("PKTSTREAM_FUZZ_EXAMPLES", "400"))
LIMIT = 1 << 20


def _vectors() -> list[dict]:
    text = zstandard.ZstdDecompressor().decompress((DATA / "s2" / "vectors.jsonl.zst").read_bytes())
    return [json.loads(line) for line in text.splitlines()]


VECTORS = _vectors()


def _recorded_frames() -> list[bytes]:
    """The S2 blocks of every recorded PacketStreamer stream."""
    out = []
    for path in sorted((DATA / "packetstreamer").glob("*.stream")):
        data = path.read_bytes()
        pos = 64 if path.stem == "auth" else 0
        while pos < len(data):
            assert data[pos:pos + 4] == b"\xde\xef\xec\xe0"
            n = struct.unpack_from("<I", data, pos + 4)[0]
            out.append(data[pos + 8:pos + 8 + n])
            pos += 8 + n
    return out


FRAMES = _recorded_frames()


def element_kinds(block: bytes) -> set[str]:
    """Element kinds in a valid block, by an independent walk of its tags (for coverage)."""
    _, pos = _s2.decoded_length(block)
    kinds = set()
    while pos < len(block):
        tag = block[pos]
        t = tag & 3
        if t == 0:
            code = tag >> 2
            n = code + 1 if code < 60 else int.from_bytes(block[pos + 1:pos + code - 58], "little") + 1
            pos += 1 + max(0, code - 59) + n
            kinds.add("literal")
        elif t == 1:
            offset = ((tag >> 5) << 8) | block[pos + 1]
            pos += 2
            if offset == 0:
                code = (tag >> 2) & 7
                pos += max(0, code - 4)
                kinds.add(f"repeat{max(0, code - 4)}")
            else:
                kinds.add("copy1")
        else:
            pos += 3 if t == 2 else 5
            kinds.add("copy2" if t == 2 else "copy4")
    return kinds


@pytest.mark.parametrize("v", VECTORS, ids=[f"{v['name']}-{v['mode']}" for v in VECTORS])
def test_real_encoder_output_decodes(v):
    out = _s2.decode_block(bytes.fromhex(v["block_hex"]), LIMIT)
    assert len(out) == v["decoded_len"]
    assert hashlib.sha256(out).hexdigest() == v["sha256"]


def test_vectors_exercise_every_element_kind():
    kinds = set().union(*(element_kinds(bytes.fromhex(v["block_hex"])) for v in VECTORS))
    assert {"literal", "copy1", "copy2", "repeat0", "repeat1", "repeat2"} <= kinds, kinds


def test_recorded_packetstreamer_frames_decode_to_pcap_records():
    assert len(FRAMES) >= 6
    kinds = set()
    for block in FRAMES:
        raw = _s2.decode_block(block, 66560)  # upstream's default compressBlockSize (65 KiB)
        kinds |= element_kinds(block)
        before = bytes(raw)
        n = _s2.usec_records_to_nsec(raw)
        assert n > 0
        pos = 0
        for _ in range(n):  # µs → ns, nothing else changed
            usec = struct.unpack_from("<I", before, pos + 4)[0]
            assert struct.unpack_from("<I", raw, pos + 4)[0] == usec * 1000
            assert raw[pos:pos + 4] == before[pos:pos + 4] and raw[pos + 8:pos + 16] == before[pos + 8:pos + 16]
            pos += 16 + struct.unpack_from("<I", before, pos + 8)[0]
        assert pos == len(raw)
    assert {"literal", "copy1", "copy2"} <= kinds and any(k.startswith("repeat") for k in kinds), kinds


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


@pytest.mark.parametrize("block, out", [
    (b"\x00", b""),
    (b"\x05\x10hello", b"hello"),
    (_uvarint(12) + b"\x08abc" + bytes([0x01 | (5 << 2), 3]), b"abcabcabcabc"),       # copy1, overlapping
    (_uvarint(14) + b"\x04ab" + bytes([0x01 | (4 << 2), 2]) + b"\x01\x00", b"ab" * 7),  # copy1 len 8, repeat 4
    (_uvarint(9) + b"\x00a" + bytes([0x02 | (7 << 2), 1, 0]), b"a" * 9),              # copy2 len 8
    (_uvarint(6) + b"\x00z" + bytes([0x03 | (4 << 2), 1, 0, 0, 0]), b"z" * 6),        # copy4 len 5
    (_uvarint(1 + 4 + 9) + b"\x00q" + bytes([0x01, 1]) + bytes([0x01 | (5 << 2), 0, 1]), b"q" * 14),  # repeat 8+1
    (_uvarint(1 + 4 + 261) + b"\x00r" + bytes([0x01, 1]) + bytes([0x01 | (6 << 2), 0, 1, 0]), b"r" * 266),
    (_uvarint(1 + 4 + 65541) + b"\x00s" + bytes([0x01, 1]) + bytes([0x01 | (7 << 2), 0, 1, 0, 0]), b"s" * 65546),
    (_uvarint(61) + bytes([60 << 2, 60]) + b"L" * 61, b"L" * 61),                      # 1-byte literal length
    (_uvarint(300) + bytes([61 << 2]) + (299).to_bytes(2, "little") + b"M" * 300, b"M" * 300),
])
def test_hand_made_blocks(block, out):
    assert _s2.decode_block(block, LIMIT) == out


@pytest.mark.parametrize("block, message", [
    (b"", "truncated length header"),
    (b"\x80\x80", "truncated length header"),
    (b"\xff\xff\xff\xff\xff\x01", "longer than 5 bytes"),
    (b"\xff\xff\xff\xff\x7f", r"exceeds 2\*\*32-1"),
    (b"\xff\xff\xff\xff\x0f", "exceeds the limit"),       # 4 GiB announced: refused before allocating
    (_uvarint(LIMIT + 1) + b"\x00", "exceeds the limit"),
    (b"\x05\x10hel", "past the end of the block"),          # literal longer than the input
    (b"\x05" + bytes([60 << 2]), "past the end of the block"),  # literal length byte missing
    (b"\x05\x10hello" + bytes([0x01, 1]), "writes past the announced length"),
    (b"\x06\x10hello", "input ended after 5 of 6"),
    (_uvarint(9) + b"\x00a" + bytes([0x01 | (3 << 2), 2]), "offset outside the decoded data"),
    (_uvarint(9) + b"\x00a" + bytes([0x02, 0, 0]), "offset outside the decoded data"),   # copy2 offset 0
    (_uvarint(9) + b"\x00a" + bytes([0x03, 9, 0, 0, 0]), "offset outside the decoded data"),
    (_uvarint(9) + b"\x00a" + bytes([0x01, 0]), "repeat offset before any copy"),
    (_uvarint(9) + b"\x00a" + bytes([0x01]), "past the end of the block"),
    (_uvarint(9) + b"\x00a" + bytes([0x03, 1, 0]), "past the end of the block"),
    (_uvarint(6) + b"\x00a" + bytes([0x01, 1]) + bytes([0x01 | (6 << 2), 0, 1]), "past the end of the block"),
    (_uvarint(5) + b"\x00a" + bytes([0x01 | (7 << 2), 1]), "writes past the announced length"),
])
def test_malformed_blocks_raise_one_line(block, message):
    with pytest.raises(ValueError, match=message) as info:
        _s2.decode_block(block, LIMIT)
    assert "\n" not in str(info.value)


def test_limit_applies_to_real_blocks():
    v = next(v for v in VECTORS if v["name"] == "long_runs_200000" and v["mode"] == "best")
    with pytest.raises(ValueError, match="exceeds the limit 199999"):
        _s2.decode_block(bytes.fromhex(v["block_hex"]), 199999)
    assert len(_s2.decode_block(bytes.fromhex(v["block_hex"]), 200000)) == 200000


def test_usec_records_to_nsec_rejects_bad_records():
    rec = struct.pack("<IIII", 1, 999999, 3, 3) + b"abc"
    buf = bytearray(rec * 2)
    assert _s2.usec_records_to_nsec(buf) == 2
    assert struct.unpack_from("<I", buf, 4)[0] == 999999000
    assert _s2.usec_records_to_nsec(bytearray()) == 0
    with pytest.raises(ValueError, match="runs past the end"):
        _s2.usec_records_to_nsec(bytearray(rec[:-1]))
    with pytest.raises(ValueError, match="runs past the end"):
        _s2.usec_records_to_nsec(bytearray(rec + rec[:10]))
    with pytest.raises(ValueError, match="microseconds field 1000000"):
        _s2.usec_records_to_nsec(bytearray(struct.pack("<IIII", 1, 1000000, 0, 0)))


# -- fuzzing: any input either decodes to at most the limit or raises ValueError -------------

def _check(block: bytes, limit: int) -> None:
    try:
        out = _s2.decode_block(block, limit)
    except ValueError as exc:
        assert str(exc).startswith("S2 block: ") and "\n" not in str(exc)
        return
    assert len(out) <= limit
    assert len(out) == _s2.decoded_length(block)[0]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=512), st.integers(0, 4096))
def test_fuzz_arbitrary_bytes(block, limit):
    _check(block, limit)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_fuzz_tag_streams(body):
    # a plausible header, so the tag loop (not the length check) sees the fuzz
    _check(_uvarint(len(body) * 3) + body, LIMIT)


SEEDS = [bytes.fromhex(v["block_hex"]) for v in VECTORS if 0 < v["decoded_len"] <= 70000] + FRAMES


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
       st.integers(0, 1 << 20), st.integers(0, 1 << 17))
def test_fuzz_mutated_real_blocks(block, flips, cut, limit):
    b = bytearray(block)
    for pos, value in flips:
        b[pos % len(b)] = value
    _check(bytes(b[:max(1, cut % (len(b) + 1))]), limit)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400))
def test_fuzz_usec_records(data):
    buf = bytearray(data)
    try:
        n = _s2.usec_records_to_nsec(buf)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert n >= 0 and len(buf) == len(data)
