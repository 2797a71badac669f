# cython: language_level=3
"""Vectorised header decode: one C loop over a batch fills numpy columns.

Link layers: Ethernet (with up to two 802.1Q/802.1ad tags recorded, more skipped), Linux
cooked v1/v2 (SLL, SLL2), raw IP (DLT_RAW 12/14, LINKTYPE_RAW 101, DLT_IPV4/IPV6), BSD
loopback (DLT_NULL host order, DLT_LOOP network order). Network: IPv4 (fragments flagged),
IPv6 (hop-by-hop, routing, destination options, fragment, AH extension headers walked).
Transport: TCP (flags, seq, ack), UDP, SCTP/UDP-Lite ports, ICMP/ICMPv6 type and code.
Every read is bounds-checked against the captured length, and every packet's
``offset + caplen`` against the buffer, before the loop: a truncated or malformed header
leaves the remaining fields at their "absent" value and sets ``truncated``.
"""
cimport cython
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import numpy as np
cimport numpy as cnp

cnp.import_array()

from pktstream._compat cimport ps_get_be16, ps_get_be32


cdef inline uint32_t _host32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


FIELDS = (
    ("vlan", np.int32), ("vlan_inner", np.int32), ("ethertype", np.uint16), ("ip_version", np.uint8),
    ("src", (np.uint8, 16)), ("dst", (np.uint8, 16)), ("proto", np.uint8), ("ttl", np.uint8),
    ("frag", np.bool_), ("frag_offset", np.uint16), ("sport", np.uint16), ("dport", np.uint16),
    ("tcp_flags", np.uint16), ("tcp_seq", np.uint32), ("tcp_ack", np.uint32),
    ("icmp_type", np.int16), ("icmp_code", np.int16), ("l3_offset", np.int32),
    ("l4_offset", np.int32), ("payload_offset", np.int32), ("payload_len", np.int32),
    ("truncated", np.bool_),
)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def decode_columns(const unsigned char[::1] buf, const int64_t[::1] offsets,
                   const uint32_t[::1] caplen, int link_type):
    """Decode every packet (data at ``buf[offsets[i]:offsets[i] + caplen[i]]``) → dict of arrays."""
    cdef Py_ssize_t n = offsets.shape[0], i, size = buf.shape[0]
    if caplen.shape[0] != n:
        raise ValueError(f"{n} offsets but {caplen.shape[0]} caplens")
    for i in range(n):  # every packet, not just the last: the arrays may come from anywhere
        if offsets[i] < 0 or offsets[i] > size or <int64_t> caplen[i] > size - offsets[i]:
            raise ValueError(f"packet {i} (offset {offsets[i]}, caplen {caplen[i]}) runs past "
                             f"the {size}-byte buffer")
    cols = {}
    for name, dt in FIELDS:
        cols[name] = np.zeros(n if not isinstance(dt, tuple) else (n, dt[1]),
                              dtype=dt if not isinstance(dt, tuple) else dt[0])
    for name in ("vlan", "vlan_inner", "icmp_type", "icmp_code", "l3_offset", "l4_offset",
                 "payload_offset"):
        cols[name].fill(-1)
    if n == 0:
        return cols
    cdef int32_t[::1] vlan = cols["vlan"]
    cdef int32_t[::1] vlan2 = cols["vlan_inner"]
    cdef uint16_t[::1] etype = cols["ethertype"]
    cdef uint8_t[::1] ipv = cols["ip_version"]
    cdef uint8_t[:, ::1] src = cols["src"]
    cdef uint8_t[:, ::1] dst = cols["dst"]
    cdef uint8_t[::1] proto = cols["proto"]
    cdef uint8_t[::1] ttl = cols["ttl"]
    cdef uint8_t[::1] frag = cols["frag"].view(np.uint8)
    cdef uint16_t[::1] fragoff = cols["frag_offset"]
    cdef uint16_t[::1] sport = cols["sport"]
    cdef uint16_t[::1] dport = cols["dport"]
    cdef uint16_t[::1] tflags = cols["tcp_flags"]
    cdef uint32_t[::1] tseq = cols["tcp_seq"]
    cdef uint32_t[::1] tack = cols["tcp_ack"]
    cdef int16_t[::1] itype = cols["icmp_type"]
    cdef int16_t[::1] icode = cols["icmp_code"]
    cdef int32_t[::1] l3off = cols["l3_offset"]
    cdef int32_t[::1] l4off = cols["l4_offset"]
    cdef int32_t[::1] poff = cols["payload_offset"]
    cdef int32_t[::1] plen = cols["payload_len"]
    cdef uint8_t[::1] trunc = cols["truncated"].view(np.uint8)
    cdef unsigned char empty = 0
    cdef const unsigned char *base = &buf[0] if size else &empty  # only 0-byte packets then
    cdef const unsigned char *p
    # positions in 64 bits: pos + header sizes cannot wrap whatever caplen is
    cdef uint64_t L, pos, l4
    cdef uint32_t et, af, ihl, tot, hl, nh, l4len, thl, k
    cdef int tags
    cdef bint first_frag, ok
    cdef int64_t off
    cdef Py_ssize_t changed = -1
    with nogil:
        for i in range(n):
            # read once and checked again here: another thread may change the arrays meanwhile
            off = offsets[i]
            L = caplen[i]
            if off < 0 or off > size or L > <uint64_t> (size - off):
                changed = i
                break
            p = base + off
            et = 0
            pos = 0
            ok = True
            # ---- link layer -> (ethertype et, network header at pos)
            if link_type == 1:
                if L < 14:
                    trunc[i] = 1
                    continue
                et = ps_get_be16(p + 12)
                pos = 14
            elif link_type == 113:
                if L < 16:
                    trunc[i] = 1
                    continue
                et = ps_get_be16(p + 14)
                pos = 16
            elif link_type == 276:
                if L < 20:
                    trunc[i] = 1
                    continue
                et = ps_get_be16(p)
                pos = 20
            elif link_type == 12 or link_type == 14 or link_type == 101:
                if L < 1:
                    trunc[i] = 1
                    continue
                et = 0x0800 if (p[0] >> 4) == 4 else 0x86DD if (p[0] >> 4) == 6 else 0
            elif link_type == 228:
                et = 0x0800
            elif link_type == 229:
                et = 0x86DD
            elif link_type == 0 or link_type == 108:
                if L < 4:
                    trunc[i] = 1
                    continue
                af = ps_get_be32(p) if link_type == 108 else _host32(p)
                pos = 4
                # IPv6: the BSD families, as libpcap's filter and tcpdump's printer take them in a
                # file (not Linux's AF_INET6 10, which no loopback capture file holds)
                et = 0x0800 if af == 2 else 0x86DD if (af == 24 or af == 28 or af == 30) else 0
            else:
                continue
            # ---- 802.1Q / 802.1ad tags (Ethernet, and cooked captures of tagged frames)
            tags = 0
            while et == 0x8100 or et == 0x88A8 or et == 0x9100:
                if L < pos + 4:
                    ok = False
                    break
                if tags == 0:
                    vlan[i] = ps_get_be16(p + pos) & 0xFFF
                elif tags == 1:
                    vlan2[i] = ps_get_be16(p + pos) & 0xFFF
                tags += 1
                et = ps_get_be16(p + pos + 2)
                pos += 4
            if not ok:
                trunc[i] = 1
                continue
            etype[i] = <uint16_t> et
            # ---- network layer
            l4 = 0
            nh = 256
            first_frag = True
            if et == 0x0800:
                l3off[i] = <int32_t> pos
                if L < pos + 20 or (p[pos] >> 4) != 4:
                    trunc[i] = L < pos + 20
                    continue
                ihl = (p[pos] & 0x0F) * 4
                if ihl < 20 or L < pos + ihl:
                    trunc[i] = 1
                    continue
                ipv[i] = 4
                tot = ps_get_be16(p + pos + 2)
                k = ps_get_be16(p + pos + 6)
                fragoff[i] = <uint16_t> ((k & 0x1FFF) * 8)
                if (k & 0x2000) or (k & 0x1FFF):
                    frag[i] = 1
                first_frag = (k & 0x1FFF) == 0
                ttl[i] = p[pos + 8]
                nh = p[pos + 9]
                proto[i] = <uint8_t> nh
                src[i, 10] = 0xFF
                src[i, 11] = 0xFF
                dst[i, 10] = 0xFF
                dst[i, 11] = 0xFF
                memcpy(&src[i, 12], p + pos + 12, 4)
                memcpy(&dst[i, 12], p + pos + 16, 4)
                l4 = pos + ihl
                l4len = tot - ihl if tot >= ihl else 0
            elif et == 0x86DD:
                l3off[i] = <int32_t> pos
                if L < pos + 40 or (p[pos] >> 4) != 6:
                    trunc[i] = L < pos + 40
                    continue
                ipv[i] = 6
                ttl[i] = p[pos + 7]
                memcpy(&src[i, 0], p + pos + 8, 16)
                memcpy(&dst[i, 0], p + pos + 24, 16)
                l4len = ps_get_be16(p + pos + 4)
                nh = p[pos + 6]
                l4 = pos + 40
                for k in range(8):  # no-cython-lint: at most 8 extension headers (k is a C int)
                    if nh == 0 or nh == 43 or nh == 60 or nh == 135:
                        if L < l4 + 8:
                            ok = False
                            break
                        hl = (p[l4 + 1] + 1) * 8
                    elif nh == 44:
                        if L < l4 + 8:
                            ok = False
                            break
                        hl = 8
                        frag[i] = 1
                        fragoff[i] = <uint16_t> (ps_get_be16(p + l4 + 2) & 0xFFF8)
                        first_frag = fragoff[i] == 0
                    elif nh == 51:
                        if L < l4 + 8:
                            ok = False
                            break
                        hl = (p[l4 + 1] + 2) * 4
                    else:
                        break
                    nh = p[l4]
                    l4 += hl
                    l4len = l4len - hl if l4len >= hl else 0
                proto[i] = <uint8_t> nh
                if not ok:
                    trunc[i] = 1
                    continue
            else:
                continue
            if not first_frag:
                continue
            l4off[i] = <int32_t> l4
            # ---- transport layer
            if nh == 6 or nh == 17 or nh == 132 or nh == 136:  # ports as soon as captured
                if L >= l4 + 2:
                    sport[i] = ps_get_be16(p + l4)
                if L >= l4 + 4:
                    dport[i] = ps_get_be16(p + l4 + 2)
            if nh == 6:
                if L < l4 + 20:
                    if L >= l4 + 14:
                        tflags[i] = ((p[l4 + 12] & 1) << 8) | p[l4 + 13]
                    trunc[i] = 1
                    continue
                sport[i] = ps_get_be16(p + l4)
                dport[i] = ps_get_be16(p + l4 + 2)
                tseq[i] = ps_get_be32(p + l4 + 4)
                tack[i] = ps_get_be32(p + l4 + 8)
                thl = (p[l4 + 12] >> 4) * 4
                tflags[i] = ((p[l4 + 12] & 1) << 8) | p[l4 + 13]
                if thl < 20:
                    trunc[i] = 1
                    continue
                poff[i] = <int32_t> (l4 + thl)
                plen[i] = l4len - thl if l4len >= thl else 0
            elif nh == 17 or nh == 132 or nh == 136:
                if L < l4 + 8:
                    trunc[i] = 1
                    continue
                sport[i] = ps_get_be16(p + l4)
                dport[i] = ps_get_be16(p + l4 + 2)
                thl = 12 if nh == 132 else 8
                poff[i] = <int32_t> (l4 + thl)
                plen[i] = l4len - thl if l4len >= thl else 0
            elif nh == 1 or nh == 58:
                if L < l4 + 4:
                    trunc[i] = 1
                    continue
                itype[i] = p[l4]
                icode[i] = p[l4 + 1]
                poff[i] = <int32_t> (l4 + 8)
                plen[i] = l4len - 8 if l4len >= 8 else 0
            else:
                poff[i] = <int32_t> l4
                plen[i] = <int32_t> l4len
    if changed >= 0:
        raise ValueError(f"packet {changed}: its offset or caplen changed while it was decoded")
    return cols
