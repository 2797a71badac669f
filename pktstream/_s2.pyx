# cython: language_level=3
"""S2 block decoding (klauspost/compress ``s2.Encode`` output), for PacketStreamer sensors.

Written from the format description (Snappy's block format plus S2's extensions), not from any
implementation. A block is ``uvarint(decoded length)`` followed by tagged elements; the low two
bits of a tag byte choose the element:

* ``00`` literal: ``tag >> 2`` < 60 is length − 1; 60/61/62/63 mean that the length − 1 follows
  in 1/2/3/4 little-endian bytes; then the literal bytes.
* ``01`` copy, 1-byte offset: length ``4 + ((tag >> 2) & 7)``, offset ``(tag >> 5) << 8 | next
  byte`` (11 bits). **S2**: offset 0 repeats the previous copy's offset, and the 3-bit length
  code then reads 0–4 → 4–8, 5 → 8 + 1 byte, 6 → 260 + 2 bytes, 7 → 65540 + 3 bytes (LE).
  A block cannot start its copies with a repeat.
* ``10`` copy, 2-byte offset; ``11`` copy, 4-byte offset: length ``1 + (tag >> 2)``.

Every length and offset is checked before it is used: a literal must lie inside the input, a
copy's offset must point into what is already decoded (0 < offset ≤ position), and nothing may
write past the announced length, which itself must not exceed the caller's ``max_len``. A
malformed block raises ``ValueError`` with a one-line reason; no read or write leaves a buffer.
The input may be any readable buffer; it is read once per field (a buffer changing meanwhile can
only produce a ``ValueError``). Functions are thread-safe and release the GIL while decoding.
"""
cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from pktstream._compat cimport RECORD_HEADER as HDR, ps_get_le32, ps_put_le32

#: upper bound of a decoded length the format itself can announce (uvarint of a u32)
MAX_BLOCK = 0xFFFFFFFF

cdef enum:
    S2_OK = 0
    S2_TRUNCATED = 1        # an element's header or literal runs past the end of the input
    S2_BAD_OFFSET = 2       # copy offset 0 (outside the repeat form) or beyond the decoded bytes
    S2_REPEAT_FIRST = 3     # a repeat before any copy
    S2_OVERFLOW = 4         # an element would write past the announced length
    S2_SHORT = 5            # input ended before the announced length was produced


cdef inline uint64_t _le(const uint8_t *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v |= (<uint64_t> p[i]) << (8 * i)
    return v


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef int _decode(const uint8_t *src, uint64_t slen, uint8_t *dst, uint64_t dlen,
                 uint64_t *where) noexcept nogil:
    """Decode elements of src[0:slen] into dst[0:dlen]. ``where``: input position of the
    failing element (or the output length reached, for S2_SHORT)."""
    cdef uint64_t s = 0, d = 0, length, offset, last = 0, i, extra, start = 0, p
    cdef uint8_t tag
    cdef unsigned int code
    cdef int status = S2_OK
    while s < slen:
        start = s
        tag = src[s]
        if tag & 3 == 0:  # literal
            code = tag >> 2
            if code < 60:
                length = code + 1
                s += 1
            else:
                extra = code - 59  # 1..4 length bytes
                if slen - s < 1 + extra:
                    status = S2_TRUNCATED
                    break
                length = _le(src + s + 1, <int> extra) + 1
                s += 1 + extra
            if length > slen - s:
                status = S2_TRUNCATED
                break
            if length > dlen - d:
                status = S2_OVERFLOW
                break
            memcpy(dst + d, src + s, length)
            s += length
            d += length
            continue
        if tag & 3 == 1:  # copy, 1-byte offset (or S2 repeat)
            if slen - s < 2:
                status = S2_TRUNCATED
                break
            code = (tag >> 2) & 7
            offset = ((<uint64_t> (tag >> 5)) << 8) | src[s + 1]
            s += 2
            if offset == 0:  # S2 repeat of the last offset
                if last == 0:
                    status = S2_REPEAT_FIRST
                    break
                offset = last
                if code < 5:
                    length = 4 + code
                else:
                    extra = code - 4  # 1..3 length bytes
                    if slen - s < extra:
                        status = S2_TRUNCATED
                        break
                    length = _le(src + s, <int> extra)
                    length += 8 if code == 5 else (260 if code == 6 else 65540)
                    s += extra
            else:
                length = 4 + code
        elif tag & 3 == 2:  # copy, 2-byte offset
            if slen - s < 3:
                status = S2_TRUNCATED
                break
            length = 1 + (tag >> 2)
            offset = _le(src + s + 1, 2)
            s += 3
        else:  # copy, 4-byte offset
            if slen - s < 5:
                status = S2_TRUNCATED
                break
            length = 1 + (tag >> 2)
            offset = _le(src + s + 1, 4)
            s += 5
        if offset == 0 or offset > d:
            status = S2_BAD_OFFSET
            break
        if length > dlen - d:
            status = S2_OVERFLOW
            break
        last = offset
        if offset >= length:
            memcpy(dst + d, dst + d - offset, length)
        else:
            # overlapping: the output repeats with period `offset`, so also with period p, the
            # smallest multiple of it >= 8; after the first p bytes, 8-byte steps at distance p
            # read only finished bytes and never overlap their destination
            p = offset
            while p < 8:
                p += offset
            i = 0
            while i < length and i < p:
                dst[d + i] = dst[d + i - offset]
                i += 1
            while length - i >= 8:
                memcpy(dst + d + i, dst + d + i - p, 8)
                i += 8
            while i < length:
                dst[d + i] = dst[d + i - p]
                i += 1
        d += length
    if status != S2_OK:
        where[0] = start
        return status
    if d != dlen:
        where[0] = d
        return S2_SHORT
    return S2_OK


@cython.boundscheck(False)
@cython.wraparound(False)
def decoded_length(const unsigned char[::1] src) -> tuple:
    """``(decoded length, header size)`` of an S2 block: its leading uvarint (at most 5 bytes,
    at most 2**32 − 1). ValueError if it is truncated or too large."""
    cdef Py_ssize_t n = src.shape[0], i
    cdef uint64_t v = 0
    cdef uint8_t b
    for i in range(min(n, 5)):
        b = src[i]
        v |= (<uint64_t> (b & 0x7F)) << (7 * i)
        if b < 0x80:
            if v > MAX_BLOCK:
                raise ValueError(f"S2 block: decoded length {v} exceeds 2**32-1")
            return v, i + 1
    if n < 5:
        raise ValueError("S2 block: truncated length header")
    raise ValueError("S2 block: length header longer than 5 bytes")


_REASONS = {
    S2_TRUNCATED: "element runs past the end of the block",
    S2_BAD_OFFSET: "copy offset outside the decoded data",
    S2_REPEAT_FIRST: "repeat offset before any copy",
    S2_OVERFLOW: "element writes past the announced length",
}


@cython.boundscheck(False)
@cython.wraparound(False)
def decode_block(const unsigned char[::1] src, Py_ssize_t max_len) -> bytearray:
    """Decode one S2 (or Snappy) block into a new bytearray of its announced length, which must
    be at most ``max_len`` (checked before anything is allocated). ValueError with the reason
    and position on a malformed block."""
    cdef uint64_t dlen, hdr, where = 0
    cdef int status
    if max_len < 0:
        raise ValueError("max_len must be >= 0")
    dlen, hdr = decoded_length(src)
    if dlen > <uint64_t> max_len:
        raise ValueError(f"S2 block: decoded length {dlen} exceeds the limit {max_len}")
    result = bytearray(dlen)
    cdef unsigned char[::1] out = result
    cdef uint8_t *d = &out[0] if dlen else NULL
    cdef const uint8_t *s = &src[0]
    cdef uint64_t slen = <uint64_t> src.shape[0]
    with nogil:
        status = _decode(s + hdr, slen - hdr, d, dlen, &where)
    if status == S2_SHORT:
        raise ValueError(f"S2 block: input ended after {where} of {dlen} announced bytes")
    if status != S2_OK:
        raise ValueError(f"S2 block: {_REASONS[status]} (at byte {where + hdr})")
    return result


@cython.boundscheck(False)
@cython.wraparound(False)
def usec_records_to_nsec(unsigned char[::1] buf) -> int:
    """Rewrite, in place, classic pcap records with microsecond timestamps (PacketStreamer's
    blocks) as pktstream's nanosecond records; returns the number of records. ValueError if a
    record header or its data runs past the buffer, or a microsecond field is >= 10**6 (the
    buffer may then be partly converted). Record contents are otherwise validated later
    (``PacketBatch.from_records``)."""
    cdef Py_ssize_t n = buf.shape[0], pos = 0, count = 0
    cdef uint32_t usec
    cdef uint64_t caplen
    cdef int status = 0
    if n == 0:
        return 0
    cdef unsigned char *p = &buf[0]
    with nogil:
        while pos < n:
            if n - pos < HDR:
                status = 1
                break
            usec = ps_get_le32(p + pos + 4)
            caplen = ps_get_le32(p + pos + 8)
            if usec >= 1000000:
                status = 2
                break
            if caplen > <uint64_t> (n - pos - HDR):
                status = 1
                break
            ps_put_le32(p + pos + 4, usec * 1000)
            pos += HDR + <Py_ssize_t> caplen
            count += 1
    if status == 1:
        raise ValueError(f"pcap record at byte {pos} runs past the end of the block ({n} bytes)")
    if status == 2:
        raise ValueError(f"pcap record at byte {pos}: microseconds field {usec} >= 1000000")
    return count
