"""Deterministic multi-protocol Ethernet traffic written as a pcap file, for tcpreplay.

Frames: IPv4 UDP/TCP (SYN, data, FIN)/ICMP echo, IPv4 fragments, IPv6 UDP/TCP/ICMPv6, ARP,
802.1Q-tagged IPv4, DNS-looking UDP; sizes from 60 to 1514 bytes. Addresses are in the
RFC 2544 benchmarking range 198.18.0.0/15 and 2001:db8::/32 (documentation).
"""
from __future__ import annotations

import random
import struct

SRC_MAC = bytes.fromhex("02000000aa01")
DST_MAC = bytes.fromhex("02000000bb02")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(proto: int, src: str, dst: str, payload: bytes, ident: int = 1, frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0,
                      bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + payload


def _ipv6(nh: int, src: bytes, dst: bytes, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, src, dst) + payload


def _udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def _tcp(sport: int, dport: int, seq: int, flags: int, data: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + data


def _eth(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    head = DST_MAC + SRC_MAC
    if vlan is not None:
        head += struct.pack("!HH", 0x8100, vlan)
    frame = head + struct.pack("!H", ethertype) + payload
    return frame + b"\0" * max(0, 60 - len(frame))


def frames(n: int, seed: int = 1) -> list[bytes]:
    """``n`` varied frames (deterministic for a seed)."""
    rnd = random.Random(seed)
    a4, b4 = "198.18.0.1", "198.18.0.2"
    a6 = bytes.fromhex("20010db8000000000000000000000001")
    b6 = bytes.fromhex("20010db8000000000000000000000002")
    out = []
    for i in range(n):
        kind = i % 10
        size = rnd.choice((18, 64, 200, 512, 1000, 1400, 1458))
        data = bytes(rnd.getrandbits(8) for _ in range(8)) * (size // 8 + 1)
        data = data[:size]
        if kind == 0:
            f = _eth(0x0800, _ipv4(17, a4, b4, _udp(40000 + i % 50, 9999, data), ident=i))
        elif kind == 1:
            f = _eth(0x0800, _ipv4(6, a4, b4, _tcp(40001, 80, i * 1000, 0x18, data), ident=i))
        elif kind == 2:
            f = _eth(0x0800, _ipv4(6, b4, a4, _tcp(80, 40001, i, 0x10, b""), ident=i))
        elif kind == 3:
            f = _eth(0x0800, _ipv4(1, a4, b4, struct.pack("!BBHHH", 8, 0, 0, 7, i & 0xFFFF) + data[:56]))
        elif kind == 4:
            f = _eth(0x86DD, _ipv6(17, a6, b6, _udp(5353, 5353, data)))
        elif kind == 5:
            f = _eth(0x86DD, _ipv6(6, a6, b6, _tcp(443, 50000, i, 0x02, b"")))
        elif kind == 6:
            f = _eth(0x0806, struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, SRC_MAC,
                                         bytes([198, 18, 0, 1]), b"\0" * 6, bytes([198, 18, 0, 2])))
        elif kind == 7:
            f = _eth(0x0800, _ipv4(17, a4, b4, _udp(40002, 53, b"\x12\x34\x01\x00\x00\x01" + data[:40]),
                                   ident=i), vlan=100)
        elif kind == 8:  # first fragment of a large UDP datagram
            f = _eth(0x0800, _ipv4(17, a4, b4, _udp(40003, 7000, data)[:1400], ident=i, frag=0x2000))
        else:
            f = _eth(0x86DD, _ipv6(58, a6, b6, struct.pack("!BBHHH", 128, 0, 0, 1, i & 0xFFFF) + data[:32]))
        out.append(f[:1514])
    return out


def write_pcap(path: str, n: int, seed: int = 1) -> list[bytes]:
    """Write ``n`` frames as a microsecond pcap (1 µs apart) and return them."""
    fr = frames(n, seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(fr):
            f.write(struct.pack("<IIII", 1700000000 + i // 1000000, i % 1000000, len(frame), len(frame)))
            f.write(frame)
    return fr


def write_udp_pcap(path: str, n: int, size: int = 1514) -> None:
    """``n`` identical-size UDP frames (for rate benchmarks)."""
    payload = bytes(range(256)) * (size // 256 + 1)
    frame = _eth(0x0800, _ipv4(17, "198.18.0.1", "198.18.0.2", _udp(40000, 9999, payload[: size - 42])))
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(n):
            f.write(struct.pack("<IIII", 1700000000, i % 1000000, len(frame), len(frame)))
            f.write(frame)


def write_random_udp_pcap(path: str, n: int, size: int = 1000, seed: int = 7, dport: int = 9999) -> None:
    """``n`` UDP frames to ``dport`` with random (incompressible) payloads and distinct ids."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(n):
            payload = i.to_bytes(4, "big") + rnd.randbytes(size - 42 - 4)
            frame = _eth(0x0800, _ipv4(17, "198.18.0.1", "198.18.0.2", _udp(40000, dport, payload), ident=i & 0xFFFF))
            f.write(struct.pack("<IIII", 1700000000, i % 1000000, len(frame), len(frame)))
            f.write(frame)
