# cython: language_level=3
"""Flow table of the archive index: one hash insert per packet, straight from the records.

:class:`FlowTable` walks a buffer of pcap records (what a ``PacketBatch`` exports: 16-byte
little-endian headers with nanosecond timestamps, then the packet bytes), parses each packet's
flow key -- (interface id, VLAN, ethertype, IP version, src, dst, sport, dport, proto), exactly
the fields ``pktstream._decode.decode_columns`` gives, plus the sender/target protocol
addresses of untagged Ethernet ARP/RARP as IPv4-mapped src/dst -- and updates the flow's
first/last ns, packets, wire bytes, TCP flags OR and chunk list in an open-addressing hash
table (linear probing, keyed hash with a random per-table secret: traffic cannot be crafted to
collide without knowing it).

Safety: the records' bounds are checked against the buffer before anything is counted (a bad
buffer raises ``ValueError`` and leaves the table unchanged), every header read is checked
against the captured length, and all memory a batch can need is reserved before its loop, so
a failure leaves the table as it was.

Lifetime/threads: a table is owned by one thread (one capture file's index); ``add`` releases
the GIL while it walks a batch of at least 8,192 records (a smaller one is walked faster than
the GIL changes hands) and raises ``RuntimeError`` if another thread uses the table meanwhile.
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset, strlen

import os

from pktstream._compat cimport RECORD_HEADER, ps_get_be16, ps_get_be32, ps_get_le32

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* a 64x64 -> 128-bit multiply folded to 64 bits (the mixing step of wyhash-style hashes) */
    static inline uint64_t ps_ft_mum(uint64_t a, uint64_t b) {
    #ifdef __SIZEOF_INT128__
        __uint128_t r = (__uint128_t) a * b;
        return (uint64_t) r ^ (uint64_t) (r >> 64);
    #else
        uint64_t ha = a >> 32, hb = b >> 32, la = (uint32_t) a, lb = (uint32_t) b;
        uint64_t rh = ha * hb, rm0 = ha * lb, rm1 = hb * la, rl = la * lb, t = rl + (rm0 << 32);
        uint64_t c = t < rl, lo = t + (rm1 << 32);
        c += lo < t;
        return lo ^ (rh + (rm0 >> 32) + (rm1 >> 32) + c);
    #endif
    }
    #define PS_FT_HI 0xFFFFFFFF00000000ULL
    /* 48-byte key, 8 secret words */
    static inline uint64_t ps_ft_hash(const void *key, const uint64_t *s) {
        uint64_t w[6];
        memcpy(w, key, 48);
        uint64_t h = ps_ft_mum(w[0] ^ s[0], w[1] ^ s[1]);
        h = ps_ft_mum(w[2] ^ s[2] ^ h, w[3] ^ s[3]);
        h = ps_ft_mum(w[4] ^ s[4] ^ h, w[5] ^ s[5]);
        return ps_ft_mum(h ^ s[6], 48 ^ s[7]);
    }
    """
    uint64_t ps_ft_hash(const void *key, const uint64_t *s) nogil
    const uint64_t PS_FT_HI

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define ps_ft_prefetch(p) __builtin_prefetch((const void *) (p))
    #else
    #define ps_ft_prefetch(p) ((void) 0)
    #endif
    """
    void ps_ft_prefetch(const void *p) nogil


cdef extern from "<arpa/inet.h>" nogil:
    enum: AF_INET
    enum: AF_INET6
    const char *inet_ntop(int af, const void *src, char *dst, unsigned int size)


cdef struct FlowKey:  # 48 bytes, no padding; index.py's numpy key dtype has this layout
    int32_t iface
    int32_t vlan
    uint16_t ethertype
    uint8_t ipv
    uint8_t proto
    uint16_t sport
    uint16_t dport
    uint8_t src[16]
    uint8_t dst[16]


cdef struct Flow:
    FlowKey key
    int64_t first_ns
    int64_t last_ns
    int64_t packets
    int64_t wire_bytes
    int32_t last_chunk
    uint16_t tcp_flags


cdef struct ChunkRef:  # (flow, chunk): appended when a flow is first seen in a chunk
    int32_t flow
    int32_t chunk


KEY_BYTES = sizeof(FlowKey)
#: batches/arrays from this size on are worked with the GIL released (smaller: kept)
GIL_RELEASE_MIN = NOGIL_MIN_RECORDS

cdef enum:
    MAX_FLOWS = 0x3FFFFFFF  # flow ids are int32; slots hold id + 1
    PIPE = 8  # records parsed and hashed ahead of their inserts (add)
    # add releases the GIL for batches of at least this many records (~1 ms of work): for the
    # few hundred records a receiver's batch holds, handing the GIL over and waiting to get it
    # back cost more than the walk (a receiver indexing 16 MB files: ~1,400 thread switches
    # and +30 % of add's CPU, bench/README.md session 28)
    NOGIL_MIN_RECORDS = 8192
    MAX_GROUPS = 1 << 20  # FlowTable.flows' groups (group * 1_000_000 + day fits in int64)


cdef inline uint32_t _host32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef inline void parse_key(const unsigned char *p, uint64_t L, int link_type, FlowKey *k,
                           uint16_t *tcp_flags) noexcept nogil:
    """Fill ``k`` (zeroed, vlan -1 by the caller) and the TCP flags of one packet of ``L``
    captured bytes: the same fields, with the same "absent" values, as decode_columns (except
    the protocol behind a cut IPv6 fragment header, see below)."""
    cdef uint64_t pos = 0, l4
    cdef uint32_t et, af, ihl, hl, nh, fk
    cdef int tags = 0, _j
    cdef bint first_frag = True
    tcp_flags[0] = 0
    # ---- link layer -> (ethertype et, network header at pos)
    if link_type == 1:
        if L < 14:
            return
        et = ps_get_be16(p + 12)
        pos = 14
    elif link_type == 113:
        if L < 16:
            return
        et = ps_get_be16(p + 14)
        pos = 16
    elif link_type == 276:
        if L < 20:
            return
        et = ps_get_be16(p)
        pos = 20
    elif link_type == 12 or link_type == 14 or link_type == 101:
        if L < 1:
            return
        et = 0x0800 if (p[0] >> 4) == 4 else 0x86DD if (p[0] >> 4) == 6 else 0
    elif link_type == 228:
        et = 0x0800
    elif link_type == 229:
        et = 0x86DD
    elif link_type == 0 or link_type == 108:
        if L < 4:
            return
        af = ps_get_be32(p) if link_type == 108 else _host32(p)
        pos = 4
        # the families libpcap's "ip"/"ip6" test in a file (BSD's AF_INET6 values; not Linux's
        # 10, which it tests only live): another family is undecided, never pruned
        et = 0x0800 if af == 2 else 0x86DD if (af == 24 or af == 28 or af == 30) else 0
    else:
        return
    # ---- 802.1Q / 802.1ad tags: the outer VLAN id is in the key
    while et == 0x8100 or et == 0x88A8 or et == 0x9100:
        if L < pos + 4:
            return  # truncated inside the tags: ethertype stays 0 (an outer VLAN id stays)
        if tags == 0:
            k.vlan = ps_get_be16(p + pos) & 0xFFF
        tags += 1
        et = ps_get_be16(p + pos + 2)
        pos += 4
    k.ethertype = <uint16_t> et
    # ---- network layer
    if et == 0x0800:
        if L < pos + 20 or (p[pos] >> 4) != 4:
            return
        ihl = (p[pos] & 0x0F) * 4
        if ihl < 20 or L < pos + ihl:
            return
        k.ipv = 4
        fk = ps_get_be16(p + pos + 6)
        first_frag = (fk & 0x1FFF) == 0
        nh = p[pos + 9]
        k.proto = <uint8_t> nh
        k.src[10] = 0xFF
        k.src[11] = 0xFF
        k.dst[10] = 0xFF
        k.dst[11] = 0xFF
        memcpy(&k.src[12], p + pos + 12, 4)
        memcpy(&k.dst[12], p + pos + 16, 4)
        l4 = pos + ihl
    elif et == 0x86DD:
        if L < pos + 40 or (p[pos] >> 4) != 6:
            return
        k.ipv = 6
        memcpy(&k.src[0], p + pos + 8, 16)
        memcpy(&k.dst[0], p + pos + 24, 16)
        nh = p[pos + 6]
        l4 = pos + 40
        for _j in range(8):  # at most 8 extension headers, as decode_columns
            if nh == 0 or nh == 43 or nh == 60 or nh == 135:
                if L < l4 + 8:
                    k.proto = <uint8_t> nh
                    return
                hl = (p[l4 + 1] + 1) * 8
            elif nh == 44:
                if L < l4 + 8:
                    # a fragment header cut by the snap length: libpcap's "udp"/"tcp"/"icmp6"
                    # test its next-header byte, so that is the protocol once it is captured
                    # (decode_columns keeps 44 and flags the packet truncated)
                    k.proto = <uint8_t> (p[l4] if L > l4 else nh)
                    return
                hl = 8
                first_frag = (ps_get_be16(p + l4 + 2) & 0xFFF8) == 0
            elif nh == 51:
                if L < l4 + 8:
                    k.proto = <uint8_t> nh
                    return
                hl = (p[l4 + 1] + 2) * 4
            else:
                break
            nh = p[l4]
            l4 += hl
        k.proto = <uint8_t> nh
    else:
        # untagged Ethernet ARP/RARP: sender and target protocol addresses (bytes 14-17 and
        # 24-27 of the ARP header, where libpcap's "arp host" looks), IPv4-mapped
        if link_type == 1 and tags == 0 and (et == 0x0806 or et == 0x8035) and L >= 14 + 28:
            k.src[10] = 0xFF
            k.src[11] = 0xFF
            k.dst[10] = 0xFF
            k.dst[11] = 0xFF
            memcpy(&k.src[12], p + 14 + 14, 4)
            memcpy(&k.dst[12], p + 14 + 24, 4)
        return
    if not first_frag:
        return
    # ---- transport layer: each port (and the TCP flags) as soon as its bytes were captured,
    # also in a header the snap length cut (libpcap's "port" reads just those bytes)
    if nh == 6 or nh == 17 or nh == 132 or nh == 136:
        if L >= l4 + 2:
            k.sport = ps_get_be16(p + l4)
        if L >= l4 + 4:
            k.dport = ps_get_be16(p + l4 + 2)
        if nh == 6 and L >= l4 + 14:
            tcp_flags[0] = <uint16_t> (((p[l4 + 12] & 1) << 8) | p[l4 + 13])


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _locate(const unsigned char *d, Py_ssize_t size, const int64_t *offs, Py_ssize_t count,
                        Py_ssize_t *where, Py_ssize_t *pos_out) noexcept nogil:
    """The starts of ``count`` pcap records in ``d[:size]`` into ``where`` -- from ``offs`` (each
    record's packet data offset, checked) or by walking the records from 0; each record must lie
    inside the buffer. Returns how many do (``count``: all); ``pos_out``: where the first that
    does not starts."""
    cdef Py_ssize_t i, p, pos = 0
    cdef uint32_t caplen
    if offs != NULL:
        for i in range(count):
            p = <Py_ssize_t> offs[i]
            if p < RECORD_HEADER or p > size:
                pos_out[0] = p
                return i
            caplen = ps_get_le32(d + p - 8)
            if <Py_ssize_t> caplen > size - p:
                pos_out[0] = p - RECORD_HEADER
                return i
            where[i] = p - RECORD_HEADER
            if size - p > 48:
                ps_ft_prefetch(d + p + 48)  # the rest of the headers the insert pass reads
        return count
    for i in range(count):
        if size - pos < RECORD_HEADER:
            pos_out[0] = pos
            return i
        caplen = ps_get_le32(d + pos + 8)
        if <Py_ssize_t> caplen > size - pos - RECORD_HEADER:
            pos_out[0] = pos
            return i
        where[i] = pos
        if size - pos > 64:
            ps_ft_prefetch(d + pos + 64)  # the rest of the headers the insert pass reads
        pos += RECORD_HEADER + caplen
    return count


cdef inline int _check_aligned(const void *p, size_t align, str what) except -1:
    """ValueError unless ``p`` (the start of a typed buffer) is aligned for its items (a
    numpy view at an odd offset is accepted by typed memoryviews)."""
    if p != NULL and (<size_t> p) % align:
        raise ValueError(f"{what}: the buffer is not aligned to {align} bytes")
    return 0


cdef struct _Ordered:  # FlowTable.flows' sort entry
    int64_t part
    int64_t first
    const FlowKey *key
    Py_ssize_t idx


cdef int _ordered_cmp(const void *a, const void *b) noexcept nogil:
    """(partition, first packet ns, key bytes) order of two ``_Ordered``."""
    cdef const _Ordered *x = <const _Ordered *> a
    cdef const _Ordered *y = <const _Ordered *> b
    if x.part != y.part:
        return -1 if x.part < y.part else 1
    if x.first != y.first:
        return -1 if x.first < y.first else 1
    return memcmp(x.key, y.key, sizeof(FlowKey))


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _sort_ordered(_Ordered *ent, Py_ssize_t n) noexcept nogil:
    """Sort ``ent`` in (partition, first ns, key bytes) order: a stable LSD radix sort, a byte
    at a time, by first time, then by partition (bytes all entries share are skipped), then
    each run of equal (partition, first) by key with qsort (runs are short): flows() of a
    spill's 262,144 shuffled records took 110 ms so, 147 ms with qsort over all of them. Returns
    -1 when out of memory (``ent`` unchanged then), else 0."""
    cdef _Ordered *tmp = <_Ordered *> malloc(n * sizeof(_Ordered))
    cdef _Ordered *src = ent
    cdef _Ordered *dst = tmp
    cdef _Ordered *sw
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t i, j, total
    cdef int field, shift, d
    cdef uint64_t v
    if tmp == NULL:
        return -1
    for field in range(2):  # 0: first time (less significant), 1: partition
        for shift in range(0, 64, 8):
            memset(count, 0, sizeof(count))
            for i in range(n):
                # (the sign bit flipped: negative values first)
                v = <uint64_t> (src[i].first if field == 0 else src[i].part) ^ 0x8000000000000000ULL
                count[(v >> shift) & 0xFF] += 1
            d = <int> (((<uint64_t> (src[0].first if field == 0 else src[0].part) ^ 0x8000000000000000ULL)
                        >> shift) & 0xFF)
            if count[d] == n:  # every entry has this byte: nothing to move
                continue
            total = 0
            for j in range(256):
                total, count[j] = total + count[j], total
            for i in range(n):
                v = <uint64_t> (src[i].first if field == 0 else src[i].part) ^ 0x8000000000000000ULL
                d = <int> ((v >> shift) & 0xFF)
                dst[count[d]] = src[i]
                count[d] += 1
            sw = src
            src = dst
            dst = sw
    if src != ent:
        memcpy(ent, src, n * sizeof(_Ordered))
    free(tmp)
    i = 0
    while i < n:  # runs of equal (partition, first): by key
        j = i + 1
        while j < n and ent[j].part == ent[i].part and ent[j].first == ent[i].first:
            j += 1
        if j - i > 1:
            qsort(&ent[i], j - i, sizeof(_Ordered), _ordered_cmp)
        i = j
    return 0


@cython.cdivision(True)
cdef inline int64_t _day(int64_t ns) noexcept nogil:
    """The UTC day (since 1970, floored) of a time in ns."""
    cdef int64_t day_ns = <int64_t> 86400 * 1000000000
    cdef int64_t d = ns // day_ns
    if ns % day_ns < 0:  # (C division truncates)
        d -= 1
    return d


@cython.final
cdef class FlowTable:
    """Flow records of one capture file, built packet by packet (see the module docstring).

    Memory: about 90 bytes per flow plus 16 per slot (at most half the slots are used) and
    8 per (flow, chunk) pair; freed with the table. ``max_flows`` > 0: the owner keeps the
    table under that many flows (and ``4 * max_flows`` pairs) plus one batch by calling
    :meth:`clear`, and growth stops doubling past them (allocations of about
    ``max_flows * 120`` bytes).
    Not thread-safe: one owner thread (concurrent use raises ``RuntimeError``).
    """
    cdef Flow *recs
    cdef Py_ssize_t n_flows
    cdef Py_ssize_t cap_flows
    cdef uint64_t *slots  # 0 = empty, else (hash high 32 bits << 32) | (flow id + 1)
    cdef Py_ssize_t n_slots  # a power of two
    cdef ChunkRef *refs
    cdef Py_ssize_t n_refs
    cdef Py_ssize_t cap_refs
    cdef Py_ssize_t *where  # scratch: record start of each record of the batch being added
    cdef Py_ssize_t cap_where
    cdef int32_t chunk  # the highest chunk number given so far
    cdef uint64_t secret[8]
    cdef bint busy
    cdef readonly int64_t packets
    cdef readonly Py_ssize_t max_flows

    def __cinit__(self):
        cdef int j
        cdef bytes seed = os.urandom(64)
        self.chunk = -1
        memcpy(self.secret, <const char *> seed, 64)
        for j in range(8):
            self.secret[j] |= 1  # odd: never a zero multiplier

    def __init__(self, Py_ssize_t max_flows=0):
        """``max_flows``: the bound the owner keeps the table under (0: none; see the class docstring)."""
        if max_flows < 0 or max_flows > MAX_FLOWS:
            raise ValueError(f"max_flows {max_flows}: give 0 .. {MAX_FLOWS}")
        self.max_flows = max_flows

    def __dealloc__(self):
        free(self.recs)
        free(self.slots)
        free(self.refs)
        free(self.where)

    def __len__(self) -> int:
        """Number of distinct flows held."""
        return self.n_flows

    @property
    def refs(self) -> int:
        """Number of (flow, chunk) pairs held (one per flow and chunk it has packets in)."""
        return self.n_refs

    @property
    def nbytes(self) -> int:
        """Bytes of memory the table holds (flow records, slots, chunk pairs: allocated capacity)."""
        return (self.cap_flows * sizeof(Flow) + self.n_slots * sizeof(uint64_t) + self.cap_refs * sizeof(ChunkRef)
                + self.cap_where * sizeof(Py_ssize_t))

    def clear(self) -> None:
        """Forget every flow (after their records were taken with :meth:`flows`): the memory
        is kept for reuse, chunk numbers keep their order (the next ``add`` may reuse the last
        chunk number), ``packets`` keeps counting.

        :raises RuntimeError: another thread is using the table.
        """
        if self.busy:
            raise RuntimeError("FlowTable used by two threads at once")
        self.n_flows = 0
        self.n_refs = 0
        if self.slots != NULL:
            memset(self.slots, 0, self.n_slots * sizeof(uint64_t))

    cdef int _reserve_where(self, Py_ssize_t count) except -1:
        """Room for the record starts of a ``count``-record batch."""
        cdef Py_ssize_t *w
        if count > self.cap_where:
            if <size_t> count > (<size_t> -1) // sizeof(Py_ssize_t):
                raise MemoryError()
            w = <Py_ssize_t *> realloc(self.where, count * sizeof(Py_ssize_t))
            if w == NULL:
                raise MemoryError()
            self.where, self.cap_where = w, count
        return 0

    cdef int _reserve(self, Py_ssize_t more) except -1:
        """Room for ``more`` new flows and chunk references without reallocating, with the slot
        table at most half full."""
        cdef Py_ssize_t need = self.n_flows + more, cap, i, h
        cdef Flow *f
        cdef ChunkRef *r
        cdef uint64_t *s
        cdef uint64_t mask, e
        if need > MAX_FLOWS:
            raise OverflowError(f"more than {MAX_FLOWS} flows in one table")
        if need > self.cap_flows:
            cap = max(2 * self.cap_flows, 1024)
            if self.max_flows > 0:
                cap = min(cap, self.max_flows)  # a bounded table: no doubling past its bound
            cap = max(need, cap)
            f = <Flow *> realloc(self.recs, cap * sizeof(Flow))
            if f == NULL:
                raise MemoryError()
            self.recs, self.cap_flows = f, cap
        if self.n_refs + more > self.cap_refs:
            cap = max(2 * self.cap_refs, 1024)
            if self.max_flows > 0:
                cap = min(cap, 4 * self.max_flows)
            cap = max(self.n_refs + more, cap)
            r = <ChunkRef *> realloc(self.refs, cap * sizeof(ChunkRef))
            if r == NULL:
                raise MemoryError()
            self.refs, self.cap_refs = r, cap
        if 2 * need > self.n_slots:
            cap = max(self.n_slots, 2048)
            while cap < 2 * need:
                cap *= 2
            s = <uint64_t *> calloc(cap, sizeof(uint64_t))
            if s == NULL:
                raise MemoryError()
            mask = <uint64_t> (cap - 1)
            for i in range(self.n_flows):  # rehash: slot from the stored flows' hashes
                e = ps_ft_hash(&self.recs[i].key, self.secret)
                h = <Py_ssize_t> (e & mask)
                while s[h] != 0:
                    h = (h + 1) & <Py_ssize_t> mask
                s[h] = (e & PS_FT_HI) | <uint64_t> (i + 1)
            free(self.slots)
            self.slots, self.n_slots = s, cap
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _insert(self, const unsigned char *d, Py_ssize_t size, Py_ssize_t count, int link_type,
                            int iface, int chunk, int64_t *out) noexcept nogil:
        """Insert the ``count`` records whose starts :func:`_locate` put in ``where`` (room
        reserved); returns how many were added (fewer than ``count``: the buffer changed since
        they were located). ``out``: wire bytes, smallest and largest timestamp (ns)."""
        cdef FlowKey bkey[PIPE]
        cdef uint16_t bflags[PIPE]
        cdef uint64_t bhash[PIPE]
        cdef int64_t bts[PIPE]
        cdef int64_t bwire[PIPE]
        cdef Py_ssize_t i, j, m, h, p, pos
        cdef uint32_t caplen
        cdef uint64_t e, tag
        cdef uint64_t mask = <uint64_t> (self.n_slots - 1)
        cdef uint64_t *slots = self.slots
        cdef Flow *recs = self.recs
        cdef Py_ssize_t *where = self.where
        cdef int64_t ts, wirelen, wire_total = 0, tmin = 0, tmax = 0
        cdef Flow *f = NULL
        cdef int32_t fid
        cdef bint bad = False
        # blocks of PIPE records: parse and hash them all and prefetch their slots (and the
        # next block's record headers), then insert them in order -- the slot misses of a
        # block overlap instead of following one another
        i = 0
        while i < count and not bad:
            m = count - i if count - i < PIPE else PIPE
            for j in range(m):
                pos = where[i + j]
                if size - pos < RECORD_HEADER:  # the buffer changed since it was located
                    bad = True
                    m = j
                    break
                caplen = ps_get_le32(d + pos + 8)
                if <Py_ssize_t> caplen > size - pos - RECORD_HEADER:
                    bad = True
                    m = j
                    break
                bts[j] = <int64_t> ps_get_le32(d + pos) * 1000000000 + ps_get_le32(d + pos + 4)
                bwire[j] = ps_get_le32(d + pos + 12)
                memset(&bkey[j], 0, sizeof(FlowKey))
                bkey[j].iface = iface
                bkey[j].vlan = -1
                parse_key(d + pos + RECORD_HEADER, caplen, link_type, &bkey[j], &bflags[j])
                bhash[j] = ps_ft_hash(&bkey[j], self.secret)
                ps_ft_prefetch(&slots[bhash[j] & mask])
            for j in range(i + m, min(i + m + PIPE, count)):  # record starts inside the buffer
                p = where[j]
                ps_ft_prefetch(d + p)
                if size - p > 64:
                    ps_ft_prefetch(d + p + 64)
            for j in range(m):
                ts = bts[j]
                wirelen = bwire[j]
                if i + j == 0:
                    tmin = tmax = ts
                elif ts < tmin:
                    tmin = ts
                elif ts > tmax:
                    tmax = ts
                wire_total += wirelen
                e = bhash[j]
                tag = e & PS_FT_HI
                h = <Py_ssize_t> (e & mask)
                while True:
                    if slots[h] == 0:  # new flow (room reserved by the caller)
                        fid = <int32_t> self.n_flows
                        self.n_flows += 1
                        slots[h] = tag | <uint64_t> (fid + 1)
                        f = &recs[fid]
                        f.key = bkey[j]
                        f.first_ns = ts
                        f.last_ns = ts
                        f.packets = 0
                        f.wire_bytes = 0
                        f.tcp_flags = 0
                        f.last_chunk = -1
                        break
                    if (slots[h] & PS_FT_HI) == tag:
                        fid = <int32_t> (<uint32_t> slots[h] - 1)
                        f = &recs[fid]
                        if memcmp(&f.key, &bkey[j], sizeof(FlowKey)) == 0:
                            break
                    h = (h + 1) & <Py_ssize_t> mask
                if ts < f.first_ns:
                    f.first_ns = ts
                if ts > f.last_ns:
                    f.last_ns = ts
                f.packets += 1
                f.wire_bytes += wirelen
                f.tcp_flags |= bflags[j]
                if f.last_chunk != chunk:
                    f.last_chunk = chunk
                    self.refs[self.n_refs].flow = fid
                    self.refs[self.n_refs].chunk = chunk
                    self.n_refs += 1
            i += m
        out[0], out[1], out[2] = wire_total, tmin, tmax
        return i

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def add(self, const unsigned char[::1] records not None, Py_ssize_t count, int link_type, int iface,
            int chunk, const int64_t[::1] offsets=None):
        """Add ``count`` pcap records (ns timestamps) from ``records`` -- e.g. a PacketBatch:
        ``add(batch, len(batch), batch.link_type, ...)`` -- as packets of interface id ``iface``
        in chunk number ``chunk`` (chunk numbers never decrease from one call to the next).
        ``offsets``: the offset of each record's packet data in ``records`` (a PacketBatch's
        ``offset`` array, when it is built already): each is checked against the buffer and
        the record walk is skipped (independent loads instead of a chain of dependent ones).

        :returns: (wire bytes, smallest timestamp ns, largest timestamp ns) of these records
            ((0, 0, 0) when ``count`` is 0).
        :raises ValueError: the records do not fit in the buffer (the table is unchanged), or the
            buffer was modified during the call (the records before the changed one are added).
        :raises RuntimeError: another thread is using the table (one thread at a time).
        """
        cdef Py_ssize_t size = records.shape[0], pos = 0, i
        cdef const int64_t *offs = NULL
        cdef Py_ssize_t *where
        if count < 0:
            raise ValueError("negative record count")
        if offsets is not None and offsets.shape[0] < count:
            raise ValueError(f"{offsets.shape[0]} offsets for {count} records")
        if offsets is not None and offsets.shape[0]:
            _check_aligned(&offsets[0], 8, "offsets")
        if offsets is None and count > size // RECORD_HEADER:  # (before anything is sized by it)
            raise ValueError(f"{count} records cannot fit in a {size}-byte buffer")
        if chunk < 0:
            raise ValueError(f"chunk {chunk}: chunk numbers are >= 0")
        if chunk < self.chunk:
            raise ValueError(f"chunk {chunk} after chunk {self.chunk}: chunk numbers never decrease")
        if count == 0:
            return 0, 0, 0
        if self.busy:
            raise RuntimeError("FlowTable used by two threads at once")
        cdef const unsigned char *d = &records[0] if size else NULL
        cdef int64_t out[3]  # wire bytes, smallest and largest timestamp (ns)
        cdef bint release = count >= NOGIL_MIN_RECORDS
        # busy from here to the end: the GIL may be released below, and a second thread must not
        # get past the check while this one validates, reserves or inserts
        self.busy = True
        try:
            # every record inside the buffer, before anything is counted; where[i]: its start
            self._reserve_where(count)
            where = self.where
            if offsets is not None:
                offs = &offsets[0]
            if release:
                with nogil:
                    i = _locate(d, size, offs, count, where, &pos)
            else:
                i = _locate(d, size, offs, count, where, &pos)
            if i < count:
                raise ValueError(f"record {i} of {count} at byte {pos} runs past the {size}-byte buffer")
            self._reserve(count)
            self.chunk = chunk
            if release:
                with nogil:
                    i = self._insert(d, size, count, link_type, iface, chunk, out)
            else:
                i = self._insert(d, size, count, link_type, iface, chunk, out)
            self.packets += i
            if i < count:
                raise ValueError(f"record {i} of {count} changed while it was added (the buffer was modified); "
                                 f"the records before it were added")
        finally:
            self.busy = False
        return out[0], out[1], out[2]

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def flows(self, const int64_t[::1] groups=None) -> dict:
        """The flow records as buffers (``numpy.frombuffer`` them): ``key`` (KEY_BYTES per
        flow: int32 iface, int32 vlan, uint16 ethertype, uint8 ip version, uint8 proto, uint16
        sport, uint16 dport, 16-byte src, 16-byte dst; native byte order; IPv4 addresses
        IPv4-mapped), ``first_ns``/``last_ns``/``packets``/``bytes`` (int64), ``tcp_flags``
        (uint16), ``chunk_offsets`` (int32, flows + 1) and ``chunk_values`` (int32: flow i's
        chunks, ascending, are values[offsets[i]:offsets[i+1]]); ``first_min``/``last_max``: the
        smallest first and largest last time (0 without records).

        ``groups`` None: in first-seen order. Else ``groups[iface]`` (>= 0) is the group of each
        interface id (the builder's sensors): records are ordered by partition -- ``group *
        1_000_000 + day``, day counted from ``day0``, the UTC day of the earliest first time --
        then first packet time, then key bytes (a total order: keys are distinct), and the
        result adds ``part`` (int64 per record) and ``day0`` (days since 1970). A table of
        8,192 records or more is sorted with the GIL released.

        :raises ValueError: an interface id has no group.
        """
        if self.busy:
            raise RuntimeError("FlowTable used by two threads at once")
        cdef Py_ssize_t n = self.n_flows, i, k, g, cnt
        cdef int64_t day, day0 = 0, first_min = 0, last_max = 0
        cdef Flow *f
        cdef int32_t c
        cdef _Ordered *ent = NULL
        cdef bint ordered = True
        cdef int bad = 0
        if self.n_refs > 0x7FFFFFFF:  # (chunk offsets are int32)
            raise ValueError(f"{self.n_refs} (flow, chunk) pairs: more than int32 offsets hold")
        if groups is not None:
            if groups.shape[0]:
                _check_aligned(&groups[0], 8, "groups")
            for i in range(n):
                g = self.recs[i].key.iface
                if g < 0 or g >= groups.shape[0] or groups[g] < 0 or groups[g] >= MAX_GROUPS:
                    raise ValueError(f"interface id {g} has no group (0 .. {MAX_GROUPS - 1})")
                day = _day(self.recs[i].first_ns)
                if i == 0 or day < day0:
                    day0 = day
        key = bytearray(n * sizeof(FlowKey))
        first = bytearray(n * 8)
        last = bytearray(n * 8)
        packets = bytearray(n * 8)
        wire = bytearray(n * 8)
        flags = bytearray(n * 2)
        offsets = bytearray((n + 1) * 4)
        values = bytearray(self.n_refs * 4)
        part = bytearray(n * 8 if groups is not None else 0)
        at_by_flow = bytearray((n + 1) * 4)  # each flow's run in by_flow
        by_flow = bytearray(self.n_refs * 4)  # chunk numbers grouped by flow (first-seen order)
        cdef unsigned char[::1] vk = key
        cdef int64_t[::1] vf = memoryview(first).cast("q")
        cdef int64_t[::1] vl = memoryview(last).cast("q")
        cdef int64_t[::1] vp = memoryview(packets).cast("q")
        cdef int64_t[::1] vw = memoryview(wire).cast("q")
        cdef uint16_t[::1] vg = memoryview(flags).cast("H")
        cdef int32_t[::1] vo = memoryview(offsets).cast("i")
        cdef int32_t[::1] vv = memoryview(values).cast("i") if self.n_refs else None
        cdef int64_t[::1] vpart = memoryview(part).cast("q") if groups is not None and n else None
        cdef int32_t[::1] fo = memoryview(at_by_flow).cast("i")
        cdef int32_t[::1] fv = memoryview(by_flow).cast("i") if self.n_refs else None
        if groups is not None and n:
            ent = <_Ordered *> malloc(n * sizeof(_Ordered))
            if ent == NULL:
                raise MemoryError()
        try:
            if ent != NULL:
                for i in range(n):
                    f = &self.recs[i]
                    ent[i].part = groups[f.key.iface] * 1000000 + (_day(f.first_ns) - day0)
                    ent[i].first = f.first_ns
                    ent[i].key = &f.key
                    ent[i].idx = i
                    if i and ordered and _ordered_cmp(&ent[i - 1], &ent[i]) > 0:
                        ordered = False
                # (records are first seen in time order, mostly: often sorted already)
                if not ordered and n >= NOGIL_MIN_RECORDS:  # (a spill's table)
                    self.busy = True
                    try:
                        with nogil:
                            bad = _sort_ordered(ent, n)
                    finally:
                        self.busy = False
                elif not ordered:
                    bad = _sort_ordered(ent, n)
                if bad:
                    raise MemoryError()
            # counting sort of the (flow, chunk) pairs by flow; appended in chunk order, so each
            # flow's chunks come out ascending (and distinct: a pair is added once per chunk)
            for i in range(n + 1):
                fo[i] = 0
            for i in range(self.n_refs):
                fo[self.refs[i].flow + 1] += 1
            for i in range(n):
                fo[i + 1] += fo[i]
            for i in range(self.n_refs):
                c = self.refs[i].flow
                fv[fo[c]] = self.refs[i].chunk
                fo[c] += 1
            # (fo[c] is now the end of flow c's run: it starts at fo[c - 1], or 0)
            vo[0] = 0
            for k in range(n):
                i = ent[k].idx if ent != NULL else k
                f = &self.recs[i]
                memcpy(&vk[k * sizeof(FlowKey)], &f.key, sizeof(FlowKey))
                vf[k] = f.first_ns
                vl[k] = f.last_ns
                vp[k] = f.packets
                vw[k] = f.wire_bytes
                vg[k] = f.tcp_flags
                if k == 0 or f.first_ns < first_min:
                    first_min = f.first_ns
                if k == 0 or f.last_ns > last_max:
                    last_max = f.last_ns
                if ent != NULL:
                    vpart[k] = ent[k].part
                g = fo[i - 1] if i else 0
                cnt = fo[i] - g
                if cnt:
                    memcpy(&vv[vo[k]], &fv[g], cnt * 4)
                vo[k + 1] = <int32_t> (vo[k] + cnt)
        finally:
            free(ent)
        out = {"key": key, "first_ns": first, "last_ns": last, "packets": packets, "bytes": wire,
               "tcp_flags": flags, "chunk_offsets": offsets, "chunk_values": values,
               "first_min": first_min, "last_max": last_max}
        if groups is not None:
            out["part"] = part
            out["day0"] = day0
        return out


cdef inline const char *_dotted_quad(const unsigned char *a, char *out) noexcept nogil:
    """Write the 4 bytes at ``a`` as ``d.d.d.d`` (NUL-terminated, at most 16 bytes) to ``out``."""
    cdef int j, n = 0
    cdef unsigned int x
    for j in range(4):
        x = a[j]
        if x >= 100:
            out[n] = <char> (48 + x // 100)
            n += 1
        if x >= 10:
            out[n] = <char> (48 + (x // 10) % 10)
            n += 1
        out[n] = <char> (48 + x % 10)
        n += 1
        out[n] = 46 if j < 3 else 0  # "." or the terminating NUL
        n += 1
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
cdef (Py_ssize_t, Py_ssize_t) _texts(const unsigned char[::1] addresses, const unsigned char[::1] versions,
                                     Py_ssize_t n, int32_t[::1] vo, unsigned char[::1] vd,
                                     unsigned char[::1] vb) noexcept nogil:
    """:func:`address_texts`' loop; returns (text bytes used, rows without text)."""
    cdef Py_ssize_t i, used = 0, nulls = 0
    cdef const unsigned char *a
    cdef char *out
    cdef const char *r
    cdef unsigned int v
    vo[0] = 0
    for i in range(n):
        a = &addresses[16 * i]
        v = versions[i]
        out = <char *> &vd[used]
        r = NULL
        if v == 4 or (v == 0 and memcmp(a, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0):
            r = _dotted_quad(a + 12, out)  # what inet_ntop writes, without its sprintf
        elif v == 6:
            r = inet_ntop(AF_INET6, a, out, 46)
        if r != NULL:
            used += <Py_ssize_t> strlen(out)
            vb[i >> 3] |= <unsigned char> (1 << (i & 7))
        else:
            nulls += 1
        vo[i + 1] = <int32_t> used
    return used, nulls


@cython.boundscheck(False)
@cython.wraparound(False)
def address_texts(const unsigned char[::1] addresses not None, const unsigned char[::1] versions not None):
    """Text of ``n`` 16-byte addresses (``addresses``: n * 16 bytes, IPv4 mapped) with IP
    versions ``versions`` (n bytes), as ``inet_ntop`` writes it: version 4, or version 0 with
    an IPv4-mapped address (ARP), is IPv4; version 6 is IPv6; anything else has no text.

    :returns: the buffers of an Arrow string array: (offsets: int32 * (n + 1), data,
        validity bitmap (bit i set: row i has a text), number of rows without text).
    """
    cdef Py_ssize_t n = versions.shape[0], used = 0, nulls = 0
    if addresses.shape[0] != 16 * n:
        raise ValueError(f"{addresses.shape[0]} address bytes for {n} versions (16 each)")
    offsets = bytearray((n + 1) * 4)
    data = bytearray(n * 46 + 1)  # INET6_ADDRSTRLEN (46) per row at most
    valid = bytearray((n + 7) // 8)
    cdef int32_t[::1] vo = memoryview(offsets).cast("i")
    cdef unsigned char[::1] vd = data
    cdef unsigned char[::1] vb = valid
    if n >= NOGIL_MIN_RECORDS:  # (fewer are done sooner than the GIL comes back in a busy receiver)
        with nogil:
            used, nulls = _texts(addresses, versions, n, vo, vd, vb)
    else:
        used, nulls = _texts(addresses, versions, n, vo, vd, vb)
    vd = None  # release the export before resizing
    del data[used:]
    return offsets, data, valid, nulls


@cython.boundscheck(False)
@cython.wraparound(False)
def address_strings(const unsigned char[::1] addresses not None, const unsigned char[::1] versions not None) -> list:
    """:func:`address_texts` as a list of ``str`` (None for a row without text): the catalog's
    address summary, made in one pass without an Arrow array in between."""
    cdef Py_ssize_t n = versions.shape[0], i
    if addresses.shape[0] != 16 * n:
        raise ValueError(f"{addresses.shape[0]} address bytes for {n} versions (16 each)")
    cdef char buf[64]
    cdef const unsigned char *a
    cdef const char *r
    cdef unsigned int v
    out = []
    for i in range(n):
        a = &addresses[16 * i]
        v = versions[i]
        r = NULL
        if v == 4 or (v == 0 and memcmp(a, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0):
            r = _dotted_quad(a + 12, buf)
        elif v == 6:
            r = inet_ntop(AF_INET6, a, buf, 46)
        out.append(buf[:strlen(buf)].decode("ascii") if r != NULL else None)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def key_addresses(const unsigned char[::1] keys not None) -> tuple:
    """The addresses of flow keys (:meth:`FlowTable.flows`' ``key`` buffer) that the flow
    records give as text -- src and dst of each key, duplicates kept:

    - IPv4 (IP version 4, and ARP's -- version 0 -- IPv4-mapped ones): uint32 each, the four
      address bytes read big-endian (numeric order is address order);
    - IPv6 (version 6): 16 bytes each.

    :returns: (IPv4 buffer, IPv6 buffer).
    :raises ValueError: ``keys`` is not a whole number of keys.
    """
    cdef Py_ssize_t n = keys.shape[0] // sizeof(FlowKey), k, n4 = 0, n6 = 0
    if keys.shape[0] != n * <Py_ssize_t> sizeof(FlowKey):
        raise ValueError(f"{keys.shape[0]} key bytes: not a multiple of {sizeof(FlowKey)}")
    v4 = bytearray(2 * n * 4)
    v6 = bytearray(2 * n * 16)
    cdef uint32_t[::1] o4 = memoryview(v4).cast("I") if n else None
    cdef unsigned char[::1] o6 = v6
    cdef FlowKey kbuf
    cdef const FlowKey *key = &kbuf
    cdef const unsigned char *a
    cdef int side
    for k in range(n):
        memcpy(&kbuf, &keys[k * sizeof(FlowKey)], sizeof(FlowKey))  # (the buffer may be unaligned)
        for side in range(2):
            if side == 0:
                a = <const unsigned char *> &key.src[0]
            else:
                a = <const unsigned char *> &key.dst[0]
            if key.ipv == 4 or (key.ipv == 0 and memcmp(a, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0):
                o4[n4] = ps_get_be32(a + 12)
                n4 += 1
            elif key.ipv == 6:
                memcpy(&o6[16 * n6], a, 16)
                n6 += 1
    o4 = None
    o6 = None
    del v4[4 * n4:]
    del v6[16 * n6:]
    return v4, v6


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void _bloom_set(const uint64_t[::1] hashes, int k, uint64_t m, unsigned char[::1] o) noexcept nogil:
    """:func:`bloom_bits`' loop."""
    cdef uint64_t h1, h2, p
    cdef Py_ssize_t j
    cdef int i
    for j in range(hashes.shape[0]):
        h1 = <uint32_t> hashes[j]
        h2 = (hashes[j] >> 32) | 1
        for i in range(k):  # < 2**32 + 64 * 2**32: no overflow
            p = (h1 + <uint64_t> i * h2) % m
            o[p >> 3] |= <unsigned char> (1 << (p & 7))


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
def bloom_bits(const uint64_t[::1] hashes not None, Py_ssize_t nbytes, int k) -> bytearray:
    """The bit array of a Bloom filter (archive/bloom.py's layout) of ``hashes``: ``nbytes``
    bytes, bit ``(h1 + i * h2) mod m`` set for i < ``k``, with ``h1 = h mod 2**32``, ``h2 =
    (h >> 32) | 1`` and ``m = 8 * nbytes``; bit p is bit p mod 8 (least significant first) of
    byte p // 8."""
    if nbytes <= 0 or k < 0 or k > 64:
        raise ValueError(f"nbytes {nbytes}, k {k}: give nbytes > 0 and 0 <= k <= 64")
    out = bytearray(nbytes)
    cdef unsigned char[::1] o = out
    cdef uint64_t m = <uint64_t> nbytes * 8
    if hashes.shape[0]:
        _check_aligned(&hashes[0], 8, "hashes")
    if hashes.shape[0] >= NOGIL_MIN_RECORDS:
        with nogil:
            _bloom_set(hashes, k, m, o)
    else:  # (~60 us for a file's few thousand addresses: sooner than the GIL comes back)
        _bloom_set(hashes, k, m, o)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def key_summary(const unsigned char[::1] keys not None, const int32_t[::1] links not None,
                unsigned char[::1] port_seen not None) -> tuple:
    """What the catalog's summaries need from flow keys (:meth:`FlowTable.flows`' ``key``
    buffer; ``links``: each key's link type): marks the ports of every IP key (IP version > 0)
    in ``port_seen`` (65,536 bytes), and returns (broken IP, unaddressed ARP) -- whether a key
    has an IPv4/IPv6 ethertype but no IP version (a header the flow table rejected), and
    whether an ARP/RARP key lacks its addresses (a link type other than Ethernet, or not both
    captured: not both IPv4-mapped). Either makes a summary unable to say "not here"
    (index.summary_completeness)."""
    cdef Py_ssize_t n = keys.shape[0] // sizeof(FlowKey), k
    if keys.shape[0] != n * <Py_ssize_t> sizeof(FlowKey) or links.shape[0] != n:
        raise ValueError(f"{keys.shape[0]} key bytes and {links.shape[0]} link types: not one per key")
    if port_seen.shape[0] != 65536:
        raise ValueError(f"port_seen has {port_seen.shape[0]} bytes, not 65536")
    if n:
        _check_aligned(&links[0], 4, "links")
    cdef FlowKey kbuf
    cdef const FlowKey *key = &kbuf
    cdef bint broken = False, unaddressed = False
    for k in range(n):
        memcpy(&kbuf, &keys[k * sizeof(FlowKey)], sizeof(FlowKey))  # (the buffer may be unaligned)
        if key.ipv > 0:
            port_seen[key.sport] = 1
            port_seen[key.dport] = 1
        elif key.ethertype == 0x0800 or key.ethertype == 0x86DD:
            broken = True
        elif key.ethertype == 0x0806 or key.ethertype == 0x8035:
            if (links[k] != 1 or memcmp(key.src, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) != 0
                    or memcmp(key.dst, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) != 0):
                unaddressed = True
    return broken, unaddressed


cdef inline uint64_t _fmix64(uint64_t x) noexcept nogil:
    """MurmurHash3's 64-bit finalizer."""
    x ^= x >> 33
    x *= <uint64_t> 0xFF51AFD7ED558CCDULL
    x ^= x >> 33
    x *= <uint64_t> 0xC4CEB9FE1A85EC53ULL
    return x ^ (x >> 33)


@cython.boundscheck(False)
@cython.wraparound(False)
def address_hashes(const unsigned char[::1] rows not None) -> bytearray:
    """The 64-bit hash of each 16-byte address of ``rows`` (archive/bloom.py's layout:
    ``fmix64(fmix64(w0 ^ SEED) ^ w1)``, w0/w1 its two little-endian 64-bit words), as uint64
    (native order)."""
    cdef Py_ssize_t n = rows.shape[0] // 16, i
    if rows.shape[0] != 16 * n:
        raise ValueError(f"{rows.shape[0]} address bytes: not a multiple of 16")
    out = bytearray(8 * n)
    cdef uint64_t[::1] o = memoryview(out).cast("Q") if n else None
    cdef uint64_t w0, w1
    for i in range(n):
        w0 = _le64(&rows[16 * i])
        w1 = _le64(&rows[16 * i + 8])
        o[i] = _fmix64(_fmix64(w0 ^ <uint64_t> 0x9E3779B97F4A7C15ULL) ^ w1)
    return out


cdef inline uint64_t _le64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int j
    for j in range(8):
        v |= (<uint64_t> p[j]) << (8 * j)
    return v


@cython.boundscheck(False)
@cython.wraparound(False)
def key_columns(const unsigned char[::1] keys not None) -> dict:
    """The fields of flow keys (:meth:`FlowTable.flows`' ``key`` buffer) as contiguous columns
    (``numpy.frombuffer`` them), in one pass: ``iface``/``vlan`` int32, ``ethertype``/``sport``/
    ``dport`` uint16, ``ipv``/``proto`` uint8, ``src``/``dst`` 16 bytes each (native order).
    (numpy's copies of the strided fields each released and took back the GIL.)"""
    cdef Py_ssize_t n = keys.shape[0] // sizeof(FlowKey), k
    if keys.shape[0] != n * <Py_ssize_t> sizeof(FlowKey):
        raise ValueError(f"{keys.shape[0]} key bytes: not a multiple of {sizeof(FlowKey)}")
    iface, vlan = bytearray(4 * n), bytearray(4 * n)
    ethertype, sport, dport = bytearray(2 * n), bytearray(2 * n), bytearray(2 * n)
    ipv, proto = bytearray(n), bytearray(n)
    src, dst = bytearray(16 * n), bytearray(16 * n)
    cdef int32_t[::1] o_iface = memoryview(iface).cast("i") if n else None
    cdef int32_t[::1] o_vlan = memoryview(vlan).cast("i") if n else None
    cdef uint16_t[::1] o_et = memoryview(ethertype).cast("H") if n else None
    cdef uint16_t[::1] o_sp = memoryview(sport).cast("H") if n else None
    cdef uint16_t[::1] o_dp = memoryview(dport).cast("H") if n else None
    cdef unsigned char[::1] o_ipv = ipv
    cdef unsigned char[::1] o_proto = proto
    cdef unsigned char[::1] o_src = src
    cdef unsigned char[::1] o_dst = dst
    cdef FlowKey kbuf
    cdef const FlowKey *key = &kbuf
    for k in range(n):
        memcpy(&kbuf, &keys[k * sizeof(FlowKey)], sizeof(FlowKey))  # (the buffer may be unaligned)
        o_iface[k] = key.iface
        o_vlan[k] = key.vlan
        o_et[k] = key.ethertype
        o_sp[k] = key.sport
        o_dp[k] = key.dport
        o_ipv[k] = key.ipv
        o_proto[k] = key.proto
        memcpy(&o_src[16 * k], key.src, 16)
        memcpy(&o_dst[16 * k], key.dst, 16)
    return {"iface": iface, "vlan": vlan, "ethertype": ethertype, "sport": sport, "dport": dport,
            "ipv": ipv, "proto": proto, "src": src, "dst": dst}


ctypedef fused _word:
    uint32_t
    uint64_t


cdef Py_ssize_t _squeeze(_word *a, Py_ssize_t n) noexcept nogil:
    """Drop the repeats of sorted ``a[:n]`` in place; returns how many values are left."""
    cdef Py_ssize_t i, m = 0
    for i in range(n):
        if i == 0 or a[i] != a[m - 1]:
            a[m] = a[i]
            m += 1
    return m


cdef void _radix_sort(_word *a, _word *tmp, Py_ssize_t n) noexcept nogil:
    """Sort ``a[:n]`` ascending: least significant byte first, one counting pass per byte
    (a byte every value shares is skipped); ``tmp`` holds ``n`` values. ~10x quicker than
    ``qsort`` with a comparison callback on a file's few thousand addresses or hashes."""
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t i, total, c
    cdef int b, shift
    cdef _word *src = a
    cdef _word *dst = tmp
    cdef _word *swap
    for b in range(<int> sizeof(_word)):
        shift = 8 * b
        memset(count, 0, sizeof(count))
        for i in range(n):
            count[(src[i] >> shift) & 0xFF] += 1
        if count[(src[0] >> shift) & 0xFF] == n:
            continue
        total = 0
        for c in range(256):
            i = count[c]
            count[c] = total
            total += i
        for i in range(n):
            c = (src[i] >> shift) & 0xFF
            dst[count[c]] = src[i]
            count[c] += 1
        swap = src
        src = dst
        dst = swap
    if src != a:
        memcpy(a, src, n * sizeof(_word))


@cython.boundscheck(False)
@cython.wraparound(False)
def distinct_sorted(const unsigned char[::1] values not None, int itemsize) -> bytearray:
    """The distinct values of a buffer of native uint32 (``itemsize`` 4) or uint64 (8), in
    ascending order, keeping the GIL: for a file's few thousand addresses, sooner than numpy's
    sort gets it back in a busy receiver (for large arrays numpy's sort is faster and releasing
    the GIL pays: index.py uses it from NOGIL_MIN_RECORDS values on)."""
    if itemsize != 4 and itemsize != 8:
        raise ValueError(f"itemsize {itemsize}: give 4 or 8")
    cdef Py_ssize_t n = values.shape[0] // itemsize, m = 0
    if values.shape[0] != n * itemsize:
        raise ValueError(f"{values.shape[0]} bytes: not a multiple of {itemsize}")
    out = bytearray(values)
    cdef unsigned char[::1] o = out
    cdef void *tmp = NULL
    if n:
        tmp = malloc(n * itemsize)
        if tmp == NULL:
            raise MemoryError(f"distinct_sorted: {n} values")
        if itemsize == 4:
            _radix_sort(<uint32_t *> &o[0], <uint32_t *> tmp, n)
            m = _squeeze(<uint32_t *> &o[0], n)
        else:
            _radix_sort(<uint64_t *> &o[0], <uint64_t *> tmp, n)
            m = _squeeze(<uint64_t *> &o[0], n)
        free(tmp)
    o = None
    del out[m * itemsize:]
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def mapped_rows(const uint32_t[::1] quads not None) -> bytearray:
    """16-byte IPv4-mapped address rows (``::ffff:a.b.c.d``) of IPv4 addresses given as numbers
    (:func:`key_addresses`' form)."""
    cdef Py_ssize_t n = quads.shape[0], i
    if n:
        _check_aligned(&quads[0], 4, "quads")
    out = bytearray(16 * n)
    cdef unsigned char[::1] o = out
    cdef uint32_t q
    for i in range(n):
        memset(&o[16 * i], 0, 10)
        o[16 * i + 10] = 0xFF
        o[16 * i + 11] = 0xFF
        q = quads[i]
        o[16 * i + 12] = <unsigned char> (q >> 24)
        o[16 * i + 13] = <unsigned char> (q >> 16)
        o[16 * i + 14] = <unsigned char> (q >> 8)
        o[16 * i + 15] = <unsigned char> q
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def repeat_offsets(Py_ssize_t n, Py_ssize_t length) -> bytearray:
    """The int32 offsets of an Arrow string array of ``n`` times one ``length``-byte string
    (``pyarrow.repeat`` released and took back the GIL)."""
    if n < 0 or length < 0 or n > 0x7FFFFFFE or (length and n > 0x7FFFFFFF // length):
        raise ValueError(f"{n} strings of {length} bytes: not an Arrow string array")
    out = bytearray(4 * (n + 1))
    cdef int32_t[::1] o = memoryview(out).cast("i")
    cdef Py_ssize_t i
    for i in range(n + 1):
        o[i] = <int32_t> (i * length)
    return out
