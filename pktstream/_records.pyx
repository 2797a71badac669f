# cython: language_level=3
"""Record codecs for capture files, in C loops (no per-packet Python).

Everything here converts between on-disk layouts and pktstream's block layout: classic pcap
records, little-endian, 16-byte header (ts_sec, ts_nsec, caplen, wirelen) + caplen bytes.

* ``pcap_walk``: classic pcap records (either byte order, µs or ns) → block records, or just
  a validating scan when the file already is little-endian nanosecond (zero-copy wrap).
* ``pcapng_walk``: runs of EPB/SPB/OPB blocks → block records + interface id per packet; it
  stops at any other block (SHB, IDB, ...) and hands it to Python.
* ``take_records``, ``ns_to_us``, ``records_to_epb``: gather, µs conversion, pcapng encoding.
* ``new_buffer``: a bytearray whose bytes are not zeroed first (the caller fills it).

Every length read from input is checked against the bytes present and ``max_caplen`` before
it is used; output buffers are sized by the caller from the input size (output <= input) and
checked again here. Input buffers may be writable and change while a loop runs (the GIL is
released): each field is read once into a local, checked, then used, so the worst a change
can do is a ``ValueError``, never a read or write outside a buffer. Lengths are computed in
64-bit (``Py_ssize_t``/``uint64_t``): no 32-bit field can overflow them.
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.mem cimport PyMem_Free, PyMem_Malloc

cimport numpy as cnp

cnp.import_array()

import numpy as np

from pktstream._compat cimport RECORD_HEADER as HDR, ps_get_le32, ps_put_le32

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint32_t ps_get32(const unsigned char *p, int swap) {
        uint32_t v;
        memcpy(&v, p, 4);
        return swap ? __builtin_bswap32(v) : v;
    }
    static inline uint16_t ps_get16(const unsigned char *p, int swap) {
        uint16_t v;
        memcpy(&v, p, 2);
        return swap ? __builtin_bswap16(v) : v;
    }
    /* a hint only: never faults, also for addresses of unmapped pages */
    static inline void ps_prefetch(const unsigned char *p) { __builtin_prefetch(p, 0, 3); }
    /* units since the epoch at `ups` (> 0) units per second -> whole seconds and nanoseconds,
       exact for every 64-bit `ts` (`mult`: ns per unit when integral, else 0: the fast path) */
    static inline void ps_units_split(uint64_t ts, uint64_t ups, uint64_t mult, uint64_t *secs, uint32_t *nsec) {
        uint64_t ns;
        if (mult && !__builtin_mul_overflow(ts, mult, &ns)) {
            *secs = ns / 1000000000ULL;
            *nsec = (uint32_t)(ns - *secs * 1000000000ULL);
            return;
        }
        *secs = ts / ups;
        *nsec = (uint32_t)(((unsigned __int128)(ts - *secs * ups) * 1000000000ULL) / ups);
    }
    """
    uint32_t ps_get32(const unsigned char *p, int swap) nogil
    uint16_t ps_get16(const unsigned char *p, int swap) nogil
    void ps_units_split(uint64_t ts, uint64_t ups, uint64_t mult, uint64_t *secs, uint32_t *nsec) nogil
    void ps_prefetch(const unsigned char *p) nogil

cdef enum:
    # pcap_walk asks for the cache lines this far ahead of the record it is at: a file's record
    # headers are a chain (each offset comes from the caplen before it) that no hardware
    # prefetcher follows, so in a buffer that is not in the CPU caches (a memory-mapped file)
    # every header was a full memory latency; ~10 records ahead overlaps them
    PREFETCH_AHEAD = 4096

cdef enum:
    WALK_MORE = 0        # stopped at an incomplete record/block at ``pos``: need more bytes
    WALK_BLOCK = 1       # pcapng: a non-packet block starts at ``pos``
    WALK_BAD_LENGTH = 2  # a length field is hostile or inconsistent at ``pos``
    WALK_BAD_IFACE = 3   # pcapng: packet block names an interface that was never described
    WALK_OPTIONS = 4     # pcapng: packet block with options at ``pos`` (only when asked to stop)
    WALK_FULL = 5        # the output (records or packets) is full
    WALK_BAD_TIME = 6    # pcap: a timestamp fraction out of range (>= 1e6 µs or 1e9 ns) at ``pos``
    WALK_CUT = 7         # pcap, not converting: the record at ``pos`` is longer than the snapshot

#: walk status codes, for Python callers
STATUS = {"more": WALK_MORE, "block": WALK_BLOCK, "bad_length": WALK_BAD_LENGTH,
          "bad_iface": WALK_BAD_IFACE, "options": WALK_OPTIONS, "full": WALK_FULL, "bad_time": WALK_BAD_TIME,
          "cut": WALK_CUT}


@cython.boundscheck(False)
@cython.wraparound(False)
def pcap_walk(const unsigned char[::1] src, Py_ssize_t start, Py_ssize_t end, bint swap,
              bint usec, uint32_t max_caplen, unsigned char[::1] dst=None, Py_ssize_t max_packets=-1,
              int64_t[::1] ts_out=None, uint32_t[::1] caplen_out=None, uint32_t[::1] wirelen_out=None,
              int64_t[::1] offset_out=None, uint32_t snapshot=0xFFFFFFFF):
    """Walk classic pcap records in ``src[start:end]``.

    With ``dst`` (at least ``end - start`` bytes) the records are written there as LE ns
    records; without, they are only checked (the input already is LE ns).
    A record longer than ``snapshot`` (the file's snap length) is cut to it as libpcap cuts
    it (the rest of its bytes are skipped) when writing to ``dst``; without ``dst`` the walk
    stops at it (status "cut": the caller converts from there on).
    With the four ``*_out`` arrays (all or none), packet ``k``'s timestamp (ns), caplen,
    wirelen and the offset of its data in the records (``dst``, or ``src[start:]``) go to entry
    ``k``: ``PacketBatch.from_records(index=...)`` then needs no second pass; at most as many
    packets as the shortest array holds are walked (then status "full").
    Returns ``(status, pos, count, out_len)``: ``pos`` is where walking stopped.
    """
    cdef Py_ssize_t pos = start, out = 0, count = 0
    cdef uint32_t sec, frac, caplen, wirelen, keep
    cdef int status = WALK_MORE
    cdef unsigned char *d = NULL
    cdef const unsigned char *s = &src[0] if src.shape[0] else NULL
    cdef int64_t *pts = NULL
    cdef uint32_t *pcl = NULL
    cdef uint32_t *pwl = NULL
    cdef int64_t *poff = NULL
    cdef bint fill = ts_out is not None
    if end > src.shape[0] or start < 0 or start > end:
        raise ValueError("range outside the buffer")
    if dst is not None:
        if dst.shape[0] < end - start:
            raise ValueError("output buffer too small")
        d = &dst[0] if dst.shape[0] else NULL
    if max_packets < 0:
        max_packets = (end - start) // HDR + 1
    if fill != (caplen_out is not None) or fill != (wirelen_out is not None) or fill != (offset_out is not None):
        raise ValueError("give all four index arrays or none")
    if fill:
        max_packets = min(max_packets, ts_out.shape[0], caplen_out.shape[0], wirelen_out.shape[0],
                          offset_out.shape[0])
        if max_packets > 0:
            pts, pcl, pwl, poff = &ts_out[0], &caplen_out[0], &wirelen_out[0], &offset_out[0]
    cdef Py_ssize_t ahead = start  # cache lines before this were asked for (ps_prefetch)
    with nogil:
        while True:
            if count >= max_packets:
                status = WALK_FULL
                break
            if end - pos < HDR:
                break
            while ahead < end and ahead - pos < PREFETCH_AHEAD:
                ps_prefetch(s + ahead)
                ahead += 64
            caplen = ps_get32(s + pos + 8, swap)
            if caplen > max_caplen:
                status = WALK_BAD_LENGTH
                break
            if <Py_ssize_t> caplen > end - pos - HDR:
                break
            if ps_get32(s + pos + 4, swap) >= (1000000 if usec else 1000000000):
                status = WALK_BAD_TIME  # (a µs fraction * 1000 would also wrap in 32 bits)
                break
            keep = caplen
            if caplen > snapshot:
                if d == NULL:
                    status = WALK_CUT
                    break
                keep = snapshot
            if fill:  # count < max_packets <= every array's length
                sec = ps_get32(s + pos, swap)
                frac = ps_get32(s + pos + 4, swap)
                if usec:
                    frac = frac * 1000
                pts[count] = <int64_t> sec * 1000000000 + frac
                pcl[count] = keep
                pwl[count] = ps_get32(s + pos + 12, swap)
                poff[count] = out + HDR
            if d != NULL:
                sec = ps_get32(s + pos, swap)
                frac = ps_get32(s + pos + 4, swap)
                wirelen = ps_get32(s + pos + 12, swap)
                if usec:
                    frac = frac * 1000
                ps_put_le32(d + out, sec)
                ps_put_le32(d + out + 4, frac)
                ps_put_le32(d + out + 8, keep)
                ps_put_le32(d + out + 12, wirelen)
                memcpy(d + out + HDR, s + pos + HDR, keep)
            out += HDR + keep
            pos += HDR + caplen
            count += 1
    return status, pos, count, out


@cython.boundscheck(False)
@cython.wraparound(False)
def pcapng_walk(const unsigned char[::1] src, Py_ssize_t start, Py_ssize_t end, bint swap,
                const uint64_t[::1] if_ups, const uint64_t[::1] if_mult, const int64_t[::1] if_offset,
                const uint32_t[::1] if_snaplen, uint32_t max_block, unsigned char[::1] dst,
                Py_ssize_t dst_pos, int32_t[::1] ifaces, Py_ssize_t count0, bint stop_on_options):
    """Walk pcapng blocks in ``src[start:end]`` (one section, byte order ``swap``).

    Packet blocks (EPB, SPB, OPB) become LE ns records appended at ``dst[dst_pos:]`` with their
    interface id at ``ifaces[count0 + k]``; per interface ``if_ups`` (timestamp units per
    second), ``if_mult`` (ns per unit when integral, else 0), ``if_offset`` (if_tsoffset, s) and
    ``if_snaplen`` (for SPB). Returns ``(status, pos, count, out_end)``.
    """
    cdef Py_ssize_t pos = start, out = dst_pos, count = count0, cap_out = dst.shape[0]
    cdef Py_ssize_t cap_n = ifaces.shape[0]
    cdef Py_ssize_t n_if = if_ups.shape[0]
    cdef const unsigned char *s = &src[0] if src.shape[0] else NULL
    cdef unsigned char *d = &dst[0] if dst.shape[0] else NULL
    cdef uint32_t btype, blen, iface, caplen, wirelen, hdr, nsec
    cdef uint64_t ts, secs, ups
    cdef int status = WALK_MORE
    if end > src.shape[0] or start < 0 or start > end:
        raise ValueError("range outside the buffer")
    if not (if_mult.shape[0] == if_offset.shape[0] == if_snaplen.shape[0] == n_if):
        raise ValueError("interface tables differ in length")
    for k in range(n_if):
        if if_ups[k] == 0:
            raise ValueError("interface with 0 timestamp units per second")
    if not 0 <= dst_pos <= cap_out or not 0 <= count0 <= cap_n:
        raise ValueError("output position outside the output buffers")
    with nogil:
        while True:
            if end - pos < 12:
                break
            btype = ps_get32(s + pos, swap)
            if btype != 6 and btype != 3 and btype != 2:
                status = WALK_BLOCK  # Python reads SHB/IDB/... (an SHB may change byte order)
                break
            blen = ps_get32(s + pos + 4, swap)
            if blen < 12 or blen % 4 or blen > max_block:
                status = WALK_BAD_LENGTH
                break
            if <Py_ssize_t> blen > end - pos:
                break
            if ps_get32(s + pos + blen - 4, swap) != blen:
                status = WALK_BAD_LENGTH
                break
            if btype == 3:  # simple packet block: interface 0, no timestamp
                hdr = 12
                if blen < 16:
                    status = WALK_BAD_LENGTH
                    break
                iface = 0
                wirelen = ps_get32(s + pos + 8, swap)
                caplen = wirelen
                if n_if > 0 and if_snaplen[0] and caplen > if_snaplen[0]:
                    caplen = if_snaplen[0]
                if caplen > blen - 16:
                    caplen = blen - 16
                ts = 0
            else:
                hdr = 28
                if blen < 32:
                    status = WALK_BAD_LENGTH
                    break
                if btype == 6:
                    iface = ps_get32(s + pos + 8, swap)
                else:
                    iface = ps_get16(s + pos + 8, swap)
                ts = (<uint64_t> ps_get32(s + pos + 12, swap) << 32) | ps_get32(s + pos + 16, swap)
                caplen = ps_get32(s + pos + 20, swap)
                wirelen = ps_get32(s + pos + 24, swap)
                if caplen > blen - 32:
                    status = WALK_BAD_LENGTH
                    break
            if iface >= n_if:
                status = WALK_BAD_IFACE
                break
            if stop_on_options and btype != 3 and (((caplen + 3) >> 2) << 2) + 32 < blen:
                status = WALK_OPTIONS
                break
            if count >= cap_n or cap_out - out < HDR + <Py_ssize_t> caplen:
                status = WALK_FULL
                break
            if btype == 3:
                secs = 0
                nsec = 0
            else:
                ups = if_ups[iface]  # (read once: checked above, but the caller's array may change)
                if ups == 0:
                    status = WALK_BAD_IFACE
                    break
                ps_units_split(ts, ups, if_mult[iface], &secs, &nsec)
            # if_tsoffset is any int64 from the file: wrap like the 32-bit field does, no overflow
            ps_put_le32(d + out, <uint32_t> (secs + <uint64_t> if_offset[iface]))
            ps_put_le32(d + out + 4, nsec)
            ps_put_le32(d + out + 8, caplen)
            ps_put_le32(d + out + 12, wirelen)
            memcpy(d + out + HDR, s + pos + hdr, caplen)
            ifaces[count] = <int32_t> iface
            out += HDR + caplen
            count += 1
            pos += blen
    return status, pos, count, out


@cython.boundscheck(False)
@cython.wraparound(False)
def take_records(const unsigned char[::1] src, Py_ssize_t length, const int32_t[::1] keys,
                 int32_t key):
    """Records of ``src[:length]`` whose entry in ``keys`` equals ``key`` → (bytes, count)."""
    cdef Py_ssize_t pos = 0, out = 0, i = 0, n = 0
    cdef uint32_t caplen
    cdef bint bad = False
    if not 0 <= length <= src.shape[0]:
        raise ValueError("length beyond the buffer")
    cdef const unsigned char *s = &src[0] if src.shape[0] else NULL
    result = bytearray(length)
    cdef unsigned char[::1] dst = result
    cdef unsigned char *d = &dst[0] if length else NULL
    with nogil:
        while pos + HDR <= length and i < keys.shape[0]:
            caplen = ps_get_le32(s + pos + 8)
            if <Py_ssize_t> caplen > length - pos - HDR:
                bad = True
                break
            if keys[i] == key:
                memcpy(d + out, s + pos, HDR + caplen)
                out += HDR + caplen
                n += 1
            pos += HDR + caplen
            i += 1
    if bad:
        raise ValueError(f"record at byte {pos} runs past the end of the buffer")
    del dst
    del result[out:]
    return result, n


@cython.boundscheck(False)
@cython.wraparound(False)
def take_mask(const unsigned char[::1] src, const int64_t[::1] offsets, const uint32_t[::1] caplen,
              const uint8_t[::1] mask):
    """Records whose ``mask`` entry is true (offsets point at packet data) → (bytearray, count)."""
    cdef Py_ssize_t i, n = offsets.shape[0], out = 0, total = 0, count = 0
    if caplen.shape[0] != n or mask.shape[0] != n:
        raise ValueError("offsets, caplen and mask differ in length")
    for i in range(n):
        if offsets[i] < HDR or offsets[i] > src.shape[0] or <int64_t> caplen[i] > src.shape[0] - offsets[i]:
            raise ValueError(f"packet {i} (offset {offsets[i]}, caplen {caplen[i]}) is outside the buffer")
        if mask[i]:
            total += HDR + caplen[i]
    result = bytearray(total)
    if total == 0:
        return result, 0
    cdef unsigned char[::1] dst = result
    cdef unsigned char *d = &dst[0]
    cdef const unsigned char *s = &src[0]
    cdef int64_t off
    cdef Py_ssize_t rec, size = src.shape[0], changed = -1
    with nogil:
        for i in range(n):
            if mask[i]:
                # read once and checked again: another thread may change the arrays meanwhile,
                # and the output was sized by the pass above
                off = offsets[i]
                rec = HDR + <Py_ssize_t> caplen[i]
                if off < HDR or off > size or rec - HDR > size - off or rec > total - out:
                    changed = i
                    break
                memcpy(d + out, s + off - HDR, rec)
                out += rec
                count += 1
    if changed >= 0:
        raise ValueError(f"packet {changed}: its offset, caplen or mask changed during the copy")
    return result[:out] if out < total else result, count


def merge_heads(list stamps, int64_t[::1] pos):
    """One step of a chronological merge as mergecap merges: ``stamps[k]`` (int64 ns) are the
    packets of input ``k`` at hand, ``pos[k]`` the next of them. Repeatedly takes the earliest
    of the inputs' next packets (ties: the last input, as mergecap's scan keeps the last of
    equals), until an input's packets at hand are all taken (its next one is in its next
    batch) or every input's are. Returns ``(which, index)`` (int32 input, int64 packet index
    per packet taken, in merged order); ``pos`` is advanced in place. An input with no packet
    at hand at the start is taken as finished."""
    cdef Py_ssize_t k, nin = len(stamps), total = 0, m = 0
    if pos.shape[0] != nin:
        raise ValueError("one position per input")
    if nin == 0:
        return np.empty(0, np.int32), np.empty(0, np.int64)
    held = []  # (keeps each buffer alive while its pointer is used)
    cdef const int64_t **ts = <const int64_t **> PyMem_Malloc(nin * sizeof(int64_t *))
    cdef Py_ssize_t *end = <Py_ssize_t *> PyMem_Malloc(nin * sizeof(Py_ssize_t))
    cdef int64_t *at = <int64_t *> PyMem_Malloc(nin * sizeof(int64_t))  # (pos, read once)
    cdef const int64_t[::1] view
    cdef int32_t[::1] wv
    cdef int64_t[::1] iv
    try:
        if ts == NULL or end == NULL or at == NULL:
            raise MemoryError()
        for k in range(nin):
            view = stamps[k]
            held.append(view)
            end[k] = view.shape[0]
            ts[k] = &view[0] if end[k] else NULL
            at[k] = pos[k]
            if not 0 <= at[k] <= end[k]:
                raise ValueError(f"input {k}: position {at[k]} outside its {end[k]} packets")
            total += end[k] - at[k]
        which_arr = np.empty(total, np.int32)
        index_arr = np.empty(total, np.int64)
        if total:
            wv, iv = which_arr, index_arr
            with nogil:
                m = _merge(ts, end, at, nin, &wv[0], &iv[0], total)
        for k in range(nin):
            pos[k] = at[k]
        return which_arr[:m], index_arr[:m]
    finally:
        PyMem_Free(ts)
        PyMem_Free(end)
        PyMem_Free(at)


cdef Py_ssize_t _merge(const int64_t **ts, const Py_ssize_t *end, int64_t *pos, Py_ssize_t nin,
                       int32_t *out_which, int64_t *out_index, Py_ssize_t room) noexcept nogil:
    cdef Py_ssize_t m = 0, k, best = 0, left = 0
    cdef int64_t t, bt = 0
    for k in range(nin):
        left += pos[k] < end[k]
    while m < room:
        best = -1
        for k in range(nin):
            if pos[k] < end[k]:
                t = ts[k][pos[k]]
                if best < 0 or t <= bt:
                    best, bt = k, t
        if best < 0:
            break
        out_which[m] = <int32_t> best
        out_index[m] = pos[best]
        m += 1
        pos[best] += 1
        if pos[best] == end[best] and left > 1:
            break  # its next packet is in its next batch: the caller refills it first
    return m


def gather_records(list sources, list offsets, list caplens, const int32_t[::1] which,
                   const int64_t[::1] index):
    """Records ``index[i]`` of ``sources[which[i]]`` (each a records buffer with its packets'
    ``offsets`` (of the data) and ``caplens``), one after another → (bytearray, count); every
    index, offset and length is checked against its buffer before anything is copied."""
    cdef Py_ssize_t nin = len(sources), i, n = which.shape[0], total = 0, out = 0, rec, k
    if len(offsets) != nin or len(caplens) != nin:
        raise ValueError("one offsets and one caplens array per source")
    if index.shape[0] != n:
        raise ValueError("which and index differ in length")
    held = []
    cdef const unsigned char **src = <const unsigned char **> PyMem_Malloc((nin or 1) * sizeof(void *))
    cdef Py_ssize_t *size = <Py_ssize_t *> PyMem_Malloc((nin or 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *count = <Py_ssize_t *> PyMem_Malloc((nin or 1) * sizeof(Py_ssize_t))
    cdef const int64_t **off = <const int64_t **> PyMem_Malloc((nin or 1) * sizeof(void *))
    cdef const uint32_t **cap = <const uint32_t **> PyMem_Malloc((nin or 1) * sizeof(void *))
    cdef const unsigned char[::1] sv
    cdef const int64_t[::1] ov
    cdef const uint32_t[::1] cv
    cdef int64_t o, j
    cdef uint32_t c
    cdef unsigned char *d
    try:
        if src == NULL or size == NULL or count == NULL or off == NULL or cap == NULL:
            raise MemoryError()
        for k in range(nin):
            sv, ov, cv = sources[k], offsets[k], caplens[k]
            held.append((sv, ov, cv))
            if ov.shape[0] != cv.shape[0]:
                raise ValueError(f"source {k}: offsets and caplens differ in length")
            src[k] = &sv[0] if sv.shape[0] else NULL
            size[k] = sv.shape[0]
            count[k] = ov.shape[0]
            off[k] = &ov[0] if ov.shape[0] else NULL
            cap[k] = &cv[0] if cv.shape[0] else NULL
        for i in range(n):
            k = which[i]
            if not 0 <= k < nin or not 0 <= index[i] < count[k]:
                raise ValueError(f"packet {i}: source {k}, index {index[i]} is not one of its packets")
            o, c = off[k][index[i]], cap[k][index[i]]
            if o < HDR or o > size[k] or <int64_t> c > size[k] - o:
                raise ValueError(f"packet {i} (offset {o}, caplen {c}) is outside its buffer")
            total += HDR + c
        result = PyByteArray_FromStringAndSize(NULL, total)
        if total == 0:
            return result, 0
        d = <unsigned char *> PyByteArray_AS_STRING(result)
        with nogil:
            for i in range(n):
                # read once and checked again: the arrays may change meanwhile, and the output
                # was sized by the pass above
                k = which[i]
                j = index[i]
                if k < 0 or k >= nin or j < 0 or j >= count[k]:
                    out = -1
                    break
                o, c = off[k][j], cap[k][j]
                rec = HDR + <Py_ssize_t> c
                if o < HDR or o > size[k] or rec - HDR > size[k] - o or rec > total - out:
                    out = -1
                    break
                memcpy(d + out, src[k] + o - HDR, HDR)
                ps_put_le32(d + out + 8, c)  # (the length copied, whatever the header says now)
                memcpy(d + out + HDR, src[k] + o, c)
                out += rec
        if out < 0:
            raise ValueError("an index, offset or caplen changed during the copy")
        if out < total:
            PyByteArray_Resize(result, out)
        return result, n
    finally:
        PyMem_Free(src)
        PyMem_Free(size)
        PyMem_Free(count)
        PyMem_Free(off)
        PyMem_Free(cap)


@cython.boundscheck(False)
@cython.wraparound(False)
def ns_to_us(const unsigned char[::1] src, Py_ssize_t length):
    """Copy of LE ns records with microsecond timestamps (for µs pcap files)."""
    if not 0 <= length <= src.shape[0]:
        raise ValueError("length beyond the buffer")
    result = bytearray(length)
    if length == 0:
        return result
    cdef unsigned char[::1] dst = result
    cdef unsigned char *d = &dst[0]
    cdef Py_ssize_t pos = 0
    with nogil:
        memcpy(d, &src[0], length)
        while length - pos >= HDR:  # walks the private copy: every header is inside it
            ps_put_le32(d + pos + 4, ps_get_le32(d + pos + 4) // 1000)
            pos += HDR + <Py_ssize_t> ps_get_le32(d + pos + 8)
    return result


cdef inline Py_ssize_t _epb_len(uint32_t caplen) noexcept nogil:
    # 64-bit: (caplen + 3) in 32 bits wraps for caplen >= 2**32 - 3
    return 32 + ((<Py_ssize_t> caplen + 3) & ~(<Py_ssize_t> 3))


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_exports


def buffer_exported(bytearray buf):
    """Whether anything (a memoryview, a PacketBatch over one) still holds a view of ``buf``:
    a reader may fill it again only when not (CPython's own resize check, read directly)."""
    return (<PyByteArrayObject *> buf).ob_exports != 0


def new_buffer(Py_ssize_t nbytes):
    """A bytearray of ``nbytes`` whose contents are left as malloc returned them (not zeroed):
    for a buffer the caller fills before any byte of it is exposed (reading a file into it).
    Zeroing 4 MiB costs as much as reading it from the page cache."""
    if nbytes < 0:
        raise ValueError("negative size")
    return PyByteArray_FromStringAndSize(NULL, nbytes)


def records_to_epb(const unsigned char[::1] src, Py_ssize_t length, uint32_t iface, int64_t[::1] offsets=None):
    """LE ns records → pcapng Enhanced Packet Blocks (little-endian, if_tsresol 9), bytes, all
    on interface ``iface``.

    One pass over the records (the receiver's output thread calls this on blocks that are long
    out of the CPU caches): the output is sized for the worst case (every record grows by at
    most 19 bytes: 32-byte EPB framing + 3 bytes of padding - 16-byte record header), written
    without zeroing first (padding bytes are written explicitly), then trimmed.

    ``offsets``: receives the offset in ``src`` of each record's packet data (what
    ``PacketBatch.offset`` holds), found by the same pass -- for a caller that walks the records
    again (the live index). When the number of records found is not its length (a batch whose
    count is wrong), -1 marks the difference: entries past the records found are -1 (a caller
    finds none of another batch's offsets there), and with more records than room the first
    entry is -1; the conversion itself is done either way."""
    return _to_epb(src, length, iface, None, offsets)


def records_to_epb_ids(const unsigned char[::1] src, Py_ssize_t length, const uint32_t[::1] ifaces not None,
                       int64_t[::1] offsets=None):
    """As :func:`records_to_epb`, the interface of record ``k`` being ``ifaces[k]`` (a pcapng
    whose interfaces interleave, written in one pass); ValueError unless ``ifaces`` holds
    exactly one id per record."""
    return _to_epb(src, length, 0, ifaces, offsets)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef _to_epb(const unsigned char[::1] src, Py_ssize_t length, uint32_t iface,
             const uint32_t[::1] ifaces, int64_t[::1] offsets):
    cdef Py_ssize_t pos = 0, out = 0, bound, blen, k = 0, j
    cdef Py_ssize_t nids = ifaces.shape[0] if ifaces is not None else 0
    cdef const uint32_t *ids = &ifaces[0] if nids else NULL
    cdef Py_ssize_t noffs = offsets.shape[0] if offsets is not None else 0
    cdef int64_t *offs = &offsets[0] if noffs else NULL
    if noffs and (<uintptr_t> offs) % sizeof(int64_t):
        raise ValueError("offsets: the buffer is not aligned for int64")
    cdef bint per_record = ifaces is not None
    cdef uint32_t caplen
    cdef uint64_t ts
    cdef int bad = 0
    if not 0 <= length <= src.shape[0]:
        raise ValueError("length beyond the buffer")
    cdef const unsigned char *s = &src[0] if length else NULL
    bound = length + (length // HDR) * 19
    result = PyByteArray_FromStringAndSize(NULL, bound)
    if bound == 0:
        if per_record and nids:
            raise ValueError(f"{nids} interface ids for 0 records")
        for j in range(noffs):
            offs[j] = -1
        return result
    cdef unsigned char *d = <unsigned char *> PyByteArray_AS_STRING(result)
    with nogil:
        while pos + HDR <= length:
            # each field read once; bounds checked against both buffers before any copy
            caplen = ps_get_le32(s + pos + 8)
            if <Py_ssize_t> caplen > length - pos - HDR:
                bad = 1
                break
            blen = _epb_len(caplen)
            if blen > bound - out or blen > <Py_ssize_t> 0xFFFFFFFFU:
                bad = 1
                break
            if per_record:
                if k >= nids:
                    bad = 2
                    break
                iface = ids[k]
            if k < noffs:
                offs[k] = pos + HDR
            ts = <uint64_t> ps_get_le32(s + pos) * 1000000000ULL + ps_get_le32(s + pos + 4)
            ps_put_le32(d + out, 6)
            ps_put_le32(d + out + 4, <uint32_t> blen)
            ps_put_le32(d + out + 8, iface)
            ps_put_le32(d + out + 12, <uint32_t> (ts >> 32))
            ps_put_le32(d + out + 16, <uint32_t> ts)
            ps_put_le32(d + out + 20, caplen)
            ps_put_le32(d + out + 24, ps_get_le32(s + pos + 12))
            memcpy(d + out + 28, s + pos + HDR, caplen)
            memset(d + out + 28 + caplen, 0, blen - 32 - caplen)  # padding to 4 bytes
            ps_put_le32(d + out + blen - 4, <uint32_t> blen)
            out += blen
            pos += HDR + caplen
            k += 1
    if bad == 1:
        raise ValueError(f"record at byte {pos} runs past the end of the buffer")
    if bad == 2 or (per_record and k != nids):
        raise ValueError(f"{nids} interface ids for {k if bad == 0 else 'more'} records")
    for j in range(k, noffs):
        offs[j] = -1
    if k > noffs and noffs:
        offs[0] = -1  # (more records than room: no usable offsets at all)
    PyByteArray_Resize(result, out)
    return result
