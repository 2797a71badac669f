"""Per-file membership filters of the catalog: a Bloom filter of the addresses, a port bitmap.

A catalog row lists a file's distinct addresses and ports only up to ``SUMMARY_LIMIT``; past
that the list is unknown (null). These filters never overflow, so a query can still drop a file
that cannot hold a host (or a port). They only *prune*: a Bloom filter may say "maybe" for an
address the file does not have (false positive, ~1 % at the default size) but never "no" for one
it has; the query applies the BPF to every packet it reads anyway.

Layout (docs/ARCHIVE.md, "Address filter"):

* an address is its 16 bytes (IPv6; IPv4 as the IPv4-mapped ``::ffff:a.b.c.d``), read as two
  little-endian 64-bit words ``w0`` (bytes 0-7) and ``w1`` (bytes 8-15);
  ``h = fmix64(fmix64(w0 ^ SEED) ^ w1)`` with MurmurHash3's 64-bit finalizer ``fmix64`` and
  ``SEED = 0x9E3779B97F4A7C15``, arithmetic modulo 2**64;
* ``h1 = h mod 2**32``, ``h2 = (h >> 32) | 1``; bit ``i`` of ``k`` is ``(h1 + i * h2) mod m``
  (double hashing, Kirsch and Mitzenmacher);
* the stored value: byte 0 = layout version (1), byte 1 = ``k``, then the ``m / 8`` bytes of
  the bit array, bit ``p`` = bit ``p mod 8`` (least significant first) of byte ``2 + p // 8``;
  ``m`` = 10 bits per distinct ``h`` (address) rounded up to whole bytes, at least 64; ``k = 7``.

Port bitmap: 8192 bytes, bit ``p`` (least significant first) of byte ``p // 8`` set when port
``p`` is a source or destination port of an IP flow of the file (exact).
"""
from __future__ import annotations

import socket

import numpy as np

FILTER_VERSION = 2  # 1: the same layout, from indexes that could miss ARP on cooked links and
#                      packets of link types the flow table does not decode ("maybe" now; upgraded by
#                      pktstream index)
#: the stored filter of a file some of whose packets have addresses its flow records do not hold
#: (ARP/RARP on a link type other than Ethernet, e.g. the cooked captures of ``-i any``): layout
#: version 0, every address "maybe"
UNKNOWN_FILTER = b"\x00"


def filter_outdated(blob: bytes | None) -> bool:
    """Whether a stored filter should be rebuilt by ``pktstream index`` (none, or layout 1)."""
    return blob is None or (len(blob) > 0 and blob[0] == 1)


BITS_PER_ADDRESS = 10
HASHES = 7  # ~ln 2 * 10: 0.8 % false positives at 10 bits per address
SEED = 0x9E3779B97F4A7C15
MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"
PORT_BITMAP_BYTES = 8192


def address_hashes(rows: np.ndarray) -> np.ndarray:
    """The 64-bit hash ``h`` of each 16-byte address (``rows``: uint8, shape (n, 16)), made in C."""
    from pktstream._flowtable import address_hashes as hashes
    return np.frombuffer(hashes(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1)), dtype=np.uint64)


def address_bytes(text: str) -> bytes | None:
    """The 16 bytes the filter hashes for an address in text form (None: not an address)."""
    try:
        return MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, text)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return None


def build_filter(rows: np.ndarray) -> bytes:
    """The Bloom filter (stored layout) of a set of 16-byte addresses (uint8, shape (n, 16);
    duplicates allowed)."""
    # distinct addresses counted by their 64-bit hashes (a sort of integers, not of 16-byte rows)
    return filter_of_hashes(np.unique(address_hashes(rows)))


def filter_of_hashes(h: np.ndarray) -> bytes:
    """The Bloom filter (stored layout) of distinct address hashes (:func:`address_hashes`,
    uint64, no duplicates: the filter is sized from their count)."""
    from pktstream._flowtable import bloom_bits
    nbytes = max(8, -(-len(h) * BITS_PER_ADDRESS // 8))
    return bytes((FILTER_VERSION, HASHES)) + bytes(bloom_bits(np.ascontiguousarray(h, dtype=np.uint64), nbytes, HASHES))


def filter_of_texts(texts) -> bytes:
    """:func:`build_filter` of addresses given as text (None and non-addresses skipped)."""
    packed = [b for b in map(address_bytes, (t for t in texts if t is not None)) if b is not None]
    return build_filter(np.frombuffer(b"".join(packed), dtype=np.uint8).reshape(-1, 16))


class AddressProbe:
    """One address, hashed once, tested against many files' filters."""

    def __init__(self, packed: bytes) -> None:
        h = int(address_hashes(np.frombuffer(packed, dtype=np.uint8).reshape(1, 16))[0])
        self.h1 = h & 0xFFFFFFFF
        self.h2 = (h >> 32) | 1

    def may_contain(self, blob: bytes | None) -> bool:
        """False only when the file certainly does not hold the address (a null, empty or
        unknown-version filter: True)."""
        if not blob or len(blob) < 3 or blob[0] != FILTER_VERSION:
            return True
        k = blob[1]
        m = (len(blob) - 2) * 8
        h1, h2 = self.h1, self.h2
        for i in range(k):
            p = (h1 + i * h2) % m
            if not blob[2 + (p >> 3)] >> (p & 7) & 1:
                return False
        return True


class FilterColumn:
    """Many files' stored filters, tested together: one probe of an address against all of
    them in a few numpy operations (a query over a catalog of thousands of files), with the
    answers of :meth:`AddressProbe.may_contain` file by file. Immutable once made."""

    def __init__(self, blobs: list[bytes | None]) -> None:
        """``blobs``: the files' stored filters (None, empty, short or of another layout
        version: "maybe" for every address, as :meth:`AddressProbe.may_contain` says)."""
        # (anything but bytes of this layout: "maybe")
        usable = [b if isinstance(b, bytes) and len(b) >= 3 and b[0] == FILTER_VERSION else None for b in blobs]
        self.valid = np.array([b is not None for b in usable], dtype=np.bool_)
        keep = [b for b in usable if b is not None]
        sizes = np.array([len(b) for b in keep], dtype=np.int64)
        self._buf = np.frombuffer(b"".join(keep), dtype=np.uint8)
        self._start = np.zeros(len(keep), dtype=np.int64)
        np.cumsum(sizes[:-1], out=self._start[1:])
        self._k = self._buf[self._start + 1].astype(np.int64) if len(keep) else np.zeros(0, np.int64)
        self._m = ((sizes - 2) * 8).astype(np.uint64)
        self._rank = np.cumsum(self.valid) - 1  # file i's place among the valid ones

    def may_contain(self, probe: AddressProbe, files: np.ndarray) -> np.ndarray:
        """For files ``files`` (indices), False where the file certainly does not hold the
        probe's address (boolean array, one element per index)."""
        files = np.asarray(files, dtype=np.int64)
        out = np.ones(len(files), dtype=bool)
        sel = self.valid[files]
        if not sel.any():
            return out
        r = self._rank[files[sel]]
        start, k, m = self._start[r], self._k[r], self._m[r]
        hit = np.ones(len(r), dtype=bool)
        h1, h2 = np.uint64(probe.h1), np.uint64(probe.h2)
        for i in range(int(k.max(initial=0))):
            p = (h1 + np.uint64(i) * h2) % m  # (h1, h2 < 2**32, i < 256: no overflow)
            byte = self._buf[start + 2 + (p >> np.uint64(3)).astype(np.int64)]  # (p < m: inside the filter)
            bit = (byte >> (p & np.uint64(7)).astype(np.uint8)) & 1
            hit &= (bit == 1) | (i >= k)
        out[sel] = hit
        return out


def port_bitmap(ports: np.ndarray) -> bytes:
    """The port bitmap (stored layout) of a set of ports (integers 0-65535)."""
    bits = np.zeros(65536, dtype=bool)
    bits[np.asarray(ports, dtype=np.int64)] = True
    return np.packbits(bits, bitorder="little").tobytes()


def bitmap_has_port(blob: bytes | None, lo: int, hi: int) -> bool:
    """Whether a port bitmap has a port in ``[lo, hi]`` (True when it is null or malformed)."""
    if blob is None or len(blob) != PORT_BITMAP_BYTES:
        return True
    lo, hi = max(lo, 0), min(hi, 65535)
    if lo > hi:
        return False
    if hi - lo < 64:
        return any(blob[p >> 3] >> (p & 7) & 1 for p in range(lo, hi + 1))
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8, count=(hi >> 3) + 1)[lo >> 3:], bitorder="little")
    start = lo & 7
    return bool(bits[start:start + hi - lo + 1].any())
