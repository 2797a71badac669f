# cython: language_level=3
"""Cython core: libpcap handles, the ring of blocks, PacketBatch.

A *block* is a contiguous run of classic pcap records (16-byte little-endian header
ts_sec, ts_nsec, caplen, wirelen, then caplen bytes) from one handle. Packets are copied
exactly once, in the C callback, from libpcap's buffer into the current ring block.
"""
cimport cython
from cpython.buffer cimport PyBUF_WRITABLE, PyBUF_FORMAT, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno, EINTR
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t, uint8_t
from libc.limits cimport INT_MAX
from libc.stdlib cimport abort, calloc, free, malloc, realloc
from libc.stdio cimport FILE, fclose
from libc.string cimport memcpy, memset, strerror, strncpy
from libc.signal cimport SIGABRT, SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIGSYS, SIGTRAP
from posix.signal cimport SIG_BLOCK, sigdelset, sigfillset
from posix.types cimport sigset_t

import os
import threading
import warnings
from typing import NamedTuple

from pktstream._compat cimport *
from pktstream._libpcap cimport *
from pktstream.exceptions import (
    ClosedError, FileFormatError, FilterError, PcapError, PcapWarning, pcap_error,
)

cdef object _np = None


cdef object _numpy():
    """numpy, imported on first use of a batch's index arrays (``import pktstream``, the CLI
    and a sensor never need it: they start faster and hold ~15 MiB less)."""
    global _np
    if _np is None:
        import numpy
        _np = numpy
    return _np

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum: POLLIN
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef inline int poll_one(int fd, int timeout_ms) noexcept nogil:
    cdef pollfd p
    p.fd = fd
    p.events = POLLIN
    p.revents = 0
    return poll(&p, 1, timeout_ms)

cdef extern from "<sys/eventfd.h>" nogil:
    enum: EFD_NONBLOCK
    enum: EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void *buf, size_t count)
    ssize_t read(int fd, void *buf, size_t count)
    int close(int fd)

cdef extern from "<sys/mman.h>" nogil:
    enum: PROT_READ
    enum: PROT_WRITE
    enum: MAP_PRIVATE
    enum: MAP_ANONYMOUS
    enum: MADV_DONTNEED
    void *MAP_FAILED
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, unsigned int size)

cdef extern from "<netinet/in.h>" nogil:
    enum: AF_INET
    enum: AF_INET6
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        in_addr sin_addr
    struct sockaddr_in6:
        in6_addr sin6_addr

cdef enum:
    BLOCK_FREE = 0
    BLOCK_FILLING = 1
    BLOCK_OUT = 2
    EARLY_BURST = 4   # adaptive sealing: early seals in a row before one per idle_wait applies

cdef enum:
    STOP_DRAIN = 1    # stop(): deliver what the kernel had, then end
    STOP_CLOSE = 2    # close(): seal the partly filled block and end now
    FAIL_POLL = -100  # CaptureState.fail_rc: poll() failed (fail_errno says why)
    IDLE_POLL_MS = 5000  # live capture thread: longest sleep with nothing partly filled (ring trim)
    BEHIND_SHARE = 4     # the consumer is behind while 1/BEHIND_SHARE of the blocks wait for next_batch
    BEHIND_POLL_MS = 5   # ... then a seal put off by time is looked at again this often

cdef enum:
    RING_TRIM_EVERY_NS = 1000000000   # live rings: how often the capture thread looks for idle blocks
    RING_TRIM_IDLE_NS = 2000000000    # a free block unused this long gives its pages back

#: Default settings, documented in docs/CONFIGURATION.md.
DEFAULT_SNAPLEN = 262144
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024
DEFAULT_BLOCK_BYTES = 1024 * 1024
DEFAULT_RING_BLOCKS = 32
DEFAULT_TIMEOUT_MS = 50
DEFAULT_MAX_WAIT = 0.2

cdef char _init_errbuf[PCAP_ERRBUF_SIZE]
if HAVE_PCAP_INIT:
    memset(_init_errbuf, 0, sizeof(_init_errbuf))
    if pcap_init(PCAP_CHAR_ENC_UTF_8, _init_errbuf) != 0:
        warnings.warn(f"pcap_init: {_init_errbuf.decode('utf-8', 'replace')}", PcapWarning)


def libpcap_version() -> str:
    """libpcap's own version string, e.g. ``'libpcap version 1.10.3 (with TPACKET_V3)'``."""
    return pcap_lib_version().decode("utf-8", "replace")


def link_type_name(int link_type) -> str:
    """libpcap's name for a DLT value (``1`` → ``'EN10MB'``), or ``'DLT_<n>'`` if unknown."""
    cdef const char *name = pcap_datalink_val_to_name(link_type)
    return name.decode() if name != NULL else f"DLT_{link_type}"


cdef str _decode(const char *s):
    return s.decode("utf-8", "replace") if s != NULL else ""


# ---------------------------------------------------------------------------------------------
# Ring of blocks
# ---------------------------------------------------------------------------------------------

# Allocation counters, always compiled in (an atomic add per ring block or wrapped buffer,
# never per packet); alloc_counters() exposes them and the tests check that they balance.
cdef uint64_t _ring_blocks_allocated = 0
cdef uint64_t _ring_blocks_freed = 0
cdef uint64_t _buffers_acquired = 0
cdef uint64_t _buffers_released = 0
cdef uint64_t _captures_opened = 0
cdef uint64_t _captures_freed = 0


def alloc_counters() -> dict:
    """Allocations and frees of the C core since import: ring blocks (``malloc``/``free``),
    foreign buffers wrapped by batches (``PyObject_GetBuffer``/``PyBuffer_Release``) and
    capture states. When every Capture and PacketBatch is gone, each pair balances."""
    return {"ring_blocks_allocated": ps_load_u64(&_ring_blocks_allocated),
            "ring_blocks_freed": ps_load_u64(&_ring_blocks_freed),
            "buffers_acquired": ps_load_u64(&_buffers_acquired),
            "buffers_released": ps_load_u64(&_buffers_released),
            "captures_opened": ps_load_u64(&_captures_opened),
            "captures_freed": ps_load_u64(&_captures_freed),
            "debug_build": bool(PKTSTREAM_DEBUG)}


cdef inline unsigned char *_block_alloc(size_t nbytes) noexcept nogil:
    cdef unsigned char *m = <unsigned char *> malloc(nbytes if nbytes else 1)
    if m != NULL:
        ps_count(&_ring_blocks_allocated)
    return m


cdef inline void _block_free(unsigned char *m) noexcept nogil:
    if m != NULL:
        free(m)
        ps_count(&_ring_blocks_freed)


cdef inline unsigned char *_live_block_alloc(size_t nbytes) noexcept nogil:
    """A live ring block: anonymous pages the kernel provides when first written (no RSS until
    packets land in it) and that ``madvise(MADV_DONTNEED)`` gives back. Debug and sanitizer
    builds use malloc instead, so that ASan watches the block's bounds."""
    cdef void *m
    if PKTSTREAM_DEBUG:
        return _block_alloc(nbytes)
    m = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if m == MAP_FAILED:
        return NULL
    ps_count(&_ring_blocks_allocated)
    return <unsigned char *> m


cdef inline void _live_block_free(unsigned char *m, size_t nbytes) noexcept nogil:
    if m == NULL:
        return
    if PKTSTREAM_DEBUG:
        _block_free(m)
        return
    munmap(m, nbytes)
    ps_count(&_ring_blocks_freed)


@cython.final
cdef class Ring:
    """Fixed set of blocks. A block is FREE, FILLING (the capture thread writes it) or OUT (a
    PacketBatch owns it). Only the capture thread moves FREE→FILLING→OUT; only the owning batch
    moves OUT→FREE. Memory is freed when the ring and every batch of it are gone.

    A live ring maps its blocks up front (address space only): a block's pages become resident
    when packets are first written into it, the capture thread fills the lowest-numbered free
    block (a quiet link keeps using the first one or two), and a free block unused for 2 s gives
    its pages back (``madvise(MADV_DONTNEED)``, done by the capture thread). Resident memory
    follows the traffic: a burst may fault pages in the packet callback, the kernel buffer
    absorbs that. A *lazy* ring (reading files) allocates a block when it is first filled, and
    a block grows for a record larger than ``block_bytes`` (a packet that was actually read);
    it shrinks back when reused. Memory follows what was read, never what a file header claims."""
    cdef unsigned char **blocks   # NULL until first used (lazy rings)
    cdef size_t *cap              # bytes allocated for each block
    cdef size_t block_bytes
    cdef int nblocks
    cdef int *state
    cdef size_t *used
    cdef uint32_t *count
    cdef uint8_t *resident        # live rings: written since the last trim (capture thread only)
    cdef int64_t *last_used_ns    # live rings: monotonic time the block was last acquired
    cdef bint lazy

    def __cinit__(self, size_t block_bytes, int nblocks, bint lazy=False):
        cdef int i
        if nblocks < 2:
            raise ValueError("ring_blocks must be at least 2")
        if block_bytes < RECORD_HEADER + 1 or block_bytes > (<size_t> 1 << 40) // <size_t> nblocks:
            raise ValueError(f"cannot make a ring of {nblocks} blocks of {block_bytes} bytes")
        self.blocks = <unsigned char **> calloc(nblocks, sizeof(unsigned char *))
        self.cap = <size_t *> calloc(nblocks, sizeof(size_t))
        self.state = <int *> calloc(nblocks, sizeof(int))
        self.used = <size_t *> calloc(nblocks, sizeof(size_t))
        self.count = <uint32_t *> calloc(nblocks, sizeof(uint32_t))
        self.resident = <uint8_t *> calloc(nblocks, sizeof(uint8_t))
        self.last_used_ns = <int64_t *> calloc(nblocks, sizeof(int64_t))
        if (self.blocks == NULL or self.cap == NULL or self.state == NULL or self.used == NULL
                or self.count == NULL or self.resident == NULL or self.last_used_ns == NULL):
            raise MemoryError(f"cannot allocate a ring of {nblocks} blocks")
        self.nblocks = nblocks
        self.block_bytes = block_bytes
        self.lazy = lazy
        if not lazy:
            for i in range(nblocks):
                self.blocks[i] = _live_block_alloc(block_bytes)
                if self.blocks[i] == NULL:
                    raise MemoryError(f"cannot allocate a ring of {nblocks} x {block_bytes} bytes")
                self.cap[i] = block_bytes

    def __dealloc__(self):
        cdef int i
        if self.blocks != NULL:
            for i in range(self.nblocks):
                if self.lazy:
                    _block_free(self.blocks[i])
                else:
                    _live_block_free(self.blocks[i], self.cap[i])
        free(self.blocks)
        free(self.cap)
        free(self.state)
        free(self.used)
        free(self.count)
        free(self.resident)
        free(self.last_used_ns)

    cdef void release(self, int block) noexcept nogil:
        ps_store_int(&self.state[block], BLOCK_FREE)

    @property
    def free_blocks(self) -> int:
        """Number of blocks neither being filled nor held by a batch."""
        cdef int i, n = 0
        for i in range(self.nblocks):
            if ps_load_int(&self.state[i]) == BLOCK_FREE:
                n += 1
        return n

    @property
    def reserved_bytes(self) -> int:
        """Bytes currently allocated (live rings: mapped) for blocks."""
        cdef size_t total = 0
        cdef int i
        for i in range(self.nblocks):
            total += self.cap[i]
        return total

    @property
    def resident_blocks(self) -> int:
        """Live rings: blocks written since their pages were last given back (an upper bound
        of the ring's resident memory in blocks); lazy rings: blocks allocated. Read from any
        thread, it is a snapshot."""
        cdef int i, n = 0
        for i in range(self.nblocks):
            if (self.resident[i] if not self.lazy else self.cap[i] != 0):
                n += 1
        return n


# ---------------------------------------------------------------------------------------------
# PacketBatch
# ---------------------------------------------------------------------------------------------

cdef char *_FORMAT_B = "B"


@cython.final
# Not in the cyclic GC at all (no traverse, no clear). __dealloc__ needs _ring (and the buffer) to
# give the block back; and the object it holds a buffer of must not be cleared before it: traversed,
# a memoryview it wraps (``from_records(memoryview(b)[i:j])``) could be found unreachable with it in
# cyclic garbage (a traceback's frames), and CPython's memoryview clear drops its managed buffer
# even while exported -- the batch's release then crashed the interpreter. What a batch refers to
# (its ring, the object it wraps, its interface name, its index arrays) never refers back to it.
@cython.no_gc
cdef class PacketBatch:
    """A zero-copy view of one block of pcap records (nanosecond timestamps).

    Supports the buffer protocol (read-only; the bytes are the records, so a nanosecond pcap
    file header followed by ``bytes(batch)`` is a valid pcap file), ``len()``, indexing and
    iteration (each packet as a read-only ``memoryview``) and numpy arrays ``ts_ns``,
    ``caplen``, ``wirelen`` and ``offset`` (offset of each packet's data in the buffer).

    Lifetime: views keep the batch alive. ``release()`` gives the block back to the capture
    ring at once; it raises ``BufferError`` while views exist, and any use after it raises
    ``ClosedError``. A batch that is garbage-collected (also as part of cyclic garbage) is
    released automatically.

    Memory safety: every walk over the records checks each one against the buffer's size, so
    a wrapped buffer that is changed after ``from_records`` (a ``bytearray``), or wrapped with
    ``validate=False`` and a wrong ``count``, gives :class:`FileFormatError`, never a read
    outside the buffer. The index arrays are computed once, on first use.
    Thread safety: a batch may be used and released from any one thread at a time.
    """
    cdef Ring _ring
    cdef int _block
    cdef object _owner
    cdef Py_buffer _pybuf
    cdef bint _has_pybuf
    cdef const unsigned char *_data
    cdef Py_ssize_t _nbytes
    cdef Py_ssize_t _count
    cdef int _exports
    cdef bint _released
    cdef int _link_type
    cdef int _snaplen
    cdef object _interface
    cdef object _arrays
    cdef Py_ssize_t _stride

    def __cinit__(self):
        self._stride = 1
        self._block = -1
        self._count = -1

    def __init__(self, *args, **kwargs):
        raise TypeError("PacketBatch is created by Capture or PacketBatch.from_records()")

    def __dealloc__(self):
        self._release_storage()

    cdef void _release_storage(self) noexcept:
        if self._released:
            return
        self._released = True
        self._data = NULL
        if self._ring is not None and self._block >= 0:
            self._ring.release(self._block)
        if self._has_pybuf:
            PyBuffer_Release(&self._pybuf)
            self._has_pybuf = False
            ps_count(&_buffers_released)

    @staticmethod
    cdef PacketBatch _from_ring(Ring ring, int block, int link_type, int snaplen, object interface):
        cdef PacketBatch b = PacketBatch.__new__(PacketBatch)
        if PKTSTREAM_DEBUG:
            assert ps_load_int(&ring.state[block]) == BLOCK_OUT and ring.used[block] <= ring.cap[block]
        b._ring = ring
        b._block = block
        b._data = ring.blocks[block]
        b._nbytes = <Py_ssize_t> ring.used[block]
        b._count = ring.count[block]
        b._link_type = link_type
        b._snaplen = snaplen
        b._interface = interface
        return b

    @staticmethod
    def from_records(data, *, link_type, snaplen=DEFAULT_SNAPLEN, interface=None,
                     bint validate=True, Py_ssize_t count=-1, index=None) -> PacketBatch:
        """Wrap a buffer of pcap records (ns timestamps, little-endian) without copying.

        :param data: any contiguous buffer; it is kept alive by the batch.
        :param validate: walk and check every record header (bounds, ``caplen <= snaplen``,
            ``caplen <= wirelen``, ``ts_nsec < 1e9``) and raise :class:`FileFormatError` with the
            byte offset of the first bad record. Leave on for data from outside the process.
            Without it (or if a writable buffer changes later) the records are still checked
            against the buffer's bounds when the index arrays are built.
        :param count: with ``validate=False``, the number of records (trusted for ``len()``;
            a buffer holding fewer gives :class:`FileFormatError` on first use of the index).
        :param index: ``(ts_ns int64, caplen uint32, wirelen uint32, offset int64)`` arrays of
            the records, as ``pktstream._records.pcap_walk`` fills them: taken as the index
            (made read-only) instead of walking the records again. Every offset and caplen is
            checked against the buffer (:class:`FileFormatError`), so no packet view can reach
            outside it; that they match the record headers is the caller's word.
        """
        link_type, snaplen = int(link_type), int(snaplen)
        if not 0 <= link_type <= 0x7fffffff:
            raise FileFormatError(f"link type {link_type} out of range")
        if snaplen <= 0 or snaplen > 0x7fffffff:
            snaplen = 0x7fffffff  # 0 or absurd (as files from the wild have): no limit, like libpcap
        cdef PacketBatch b = PacketBatch.__new__(PacketBatch)
        PyObject_GetBuffer(data, &b._pybuf, PyBUF_SIMPLE)
        b._has_pybuf = True
        ps_count(&_buffers_acquired)
        b._owner = data
        b._data = <const unsigned char *> b._pybuf.buf
        b._nbytes = b._pybuf.len
        b._link_type = link_type
        b._snaplen = snaplen
        b._interface = interface
        if validate:
            b._count = validate_records(b._data, b._nbytes, snaplen)
        elif count >= 0:
            b._count = count
        if index is not None:
            b._take_index(index)
        return b

    cdef int _take_index(self, index) except -1:
        import numpy as np
        # own copies, checked after they are made: the caller's arrays (or other views of
        # their base) may be written later, and the offsets are trusted from here on
        ts, cap, wire, off = (np.array(a, dtype=t, copy=True, order="C") for a, t in
                              zip(index, (np.int64, np.uint32, np.uint32, np.int64)))
        cdef const int64_t[::1] vts = ts
        cdef const uint32_t[::1] vcap = cap
        cdef const uint32_t[::1] vwire = wire
        cdef const int64_t[::1] voff = off
        cdef Py_ssize_t n = vts.shape[0], i, size = self._nbytes
        if self._count < 0:
            self._count = n
        if not (vcap.shape[0] == vwire.shape[0] == voff.shape[0] == n == self._count):
            raise ValueError(f"index arrays of {n}, {vcap.shape[0]}, {vwire.shape[0]}, {voff.shape[0]} "
                             f"entries for {self._count} records")
        cdef const uint32_t *pc = &vcap[0] if n else NULL
        cdef const int64_t *po = &voff[0] if n else NULL
        cdef bint bad = False
        with nogil:
            for i in range(n):
                # offset of the data: after a record header, inside the buffer, caplen bytes fit
                if po[i] < RECORD_HEADER or po[i] > size or <int64_t> pc[i] > size - po[i]:
                    bad = True
                    break
        if bad:
            raise FileFormatError(f"index entry {i} (offset {off[i]}, caplen {cap[i]}) is outside the "
                                  f"{size}-byte buffer", offset=int(off[i]))
        for a in (ts, cap, wire, off):
            a.flags.writeable = False
        self._arrays = (ts, cap, wire, off)
        return 0

    cdef inline int _check(self) except -1:
        if self._released:
            raise ClosedError("PacketBatch has been released")
        return 0

    # -- buffer protocol ---------------------------------------------------------------------
    def __getbuffer__(self, Py_buffer *view, int flags):
        self._check()
        if flags & PyBUF_WRITABLE:
            raise BufferError("PacketBatch is read-only")
        view.buf = <void *> self._data if self._nbytes else <void *> &self._link_type
        view.obj = self
        view.len = self._nbytes
        view.readonly = 1
        view.itemsize = 1
        # "B" when asked for (memoryview assignment compares formats and must not get NULL)
        view.format = _FORMAT_B if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = &self._nbytes
        view.strides = &self._stride  # typed memoryviews (const uchar[::1]) read the strides
        view.suboffsets = NULL
        view.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self._exports -= 1

    # -- metadata ----------------------------------------------------------------------------
    @property
    def link_type(self) -> int:
        """DLT link type of every packet in the batch."""
        return self._link_type

    @property
    def link_type_name(self) -> str:
        return link_type_name(self._link_type)

    @property
    def snaplen(self) -> int:
        return self._snaplen

    @property
    def interface(self):
        """Name of the interface (or file) the packets came from, or None."""
        return self._interface

    @property
    def nbytes(self) -> int:
        """Size of the records in bytes (record headers included)."""
        return self._nbytes

    @property
    def released(self) -> bool:
        return self._released

    @property
    def has_arrays(self) -> bool:
        """True when the per-packet arrays (``ts_ns``, ``caplen``, ``wirelen``, ``offset``) are
        already built (a reader or writer asked for them): using them then costs nothing."""
        return self._arrays is not None

    @property
    def buffer_owner(self):
        """The object whose buffer this batch wraps (``from_records``), or None for a ring block.
        Wrapping it again gives a sibling batch over the same memory without exporting this one."""
        self._check()
        return self._owner

    def __len__(self):
        self._check()
        if self._count < 0:
            self._exports += 1  # (a release() from another thread meanwhile raises BufferError)
            try:
                self._count = validate_records(self._data, self._nbytes, 0x7fffffff)
            finally:
                self._exports -= 1
        return self._count

    def __repr__(self):
        if self._released:
            return "<PacketBatch released>"
        return (f"<PacketBatch {len(self)} packets, {self._nbytes} bytes, "
                f"{self.link_type_name}, interface={self._interface!r}>")

    # -- index arrays ------------------------------------------------------------------------
    cdef object _index(self):
        self._check()
        if self._arrays is not None:
            return self._arrays
        # the storage stays until the end (release() from another thread raises BufferError):
        # taken before any Python call below, which may let another thread run
        self._exports += 1
        try:
            return self._build_index()
        finally:
            self._exports -= 1

    cdef object _build_index(self):
        cdef Py_ssize_t n = len(self)
        np = _numpy()
        ts = np.empty(n, dtype=np.int64)
        cap = np.empty(n, dtype=np.uint32)
        wire = np.empty(n, dtype=np.uint32)
        off = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] vts = ts
        cdef uint32_t[::1] vcap = cap
        cdef uint32_t[::1] vwire = wire
        cdef int64_t[::1] voff = off
        # raw pointers into the fresh arrays (n may be 0: no element is read then)
        cdef int64_t *pts = &vts[0] if n else NULL
        cdef uint32_t *pcap_ = &vcap[0] if n else NULL
        cdef uint32_t *pwire = &vwire[0] if n else NULL
        cdef int64_t *poff = &voff[0] if n else NULL
        cdef Py_ssize_t pos = 0, i = 0, size = self._nbytes
        cdef const unsigned char *d = self._data
        cdef uint32_t caplen
        cdef int bad = 0
        with nogil:
            # the buffer may be writable and change under us: read each field once, check it
            # against the (fixed) size before using it, keep only what was checked
            while i < n:
                if size - pos < RECORD_HEADER:
                    bad = 1
                    break
                caplen = ps_get_le32(d + pos + 8)
                if <Py_ssize_t> caplen > size - pos - RECORD_HEADER:
                    bad = 4
                    break
                pts[i] = <int64_t> ps_get_le32(d + pos) * 1000000000 + ps_get_le32(d + pos + 4)
                pcap_[i] = caplen
                pwire[i] = ps_get_le32(d + pos + 12)
                poff[i] = pos + RECORD_HEADER
                pos += RECORD_HEADER + caplen
                i += 1
        if bad:
            raise FileFormatError(f"bad pcap record {i} of {n} at byte {pos}: "
                                  f"{'truncated record header' if bad == 1 else 'record runs past the end'}"
                                  f" of the {size}-byte buffer (changed after it was wrapped, or a wrong count)",
                                  offset=pos)
        for a in (ts, cap, wire, off):
            a.flags.writeable = False
        self._arrays = (ts, cap, wire, off)
        return self._arrays

    @property
    def ts_ns(self):
        """Timestamps, int64 nanoseconds since the epoch (read-only array)."""
        return self._index()[0]

    @property
    def caplen(self):
        """Captured length of each packet (uint32)."""
        return self._index()[1]

    @property
    def wirelen(self):
        """Original length on the wire of each packet (uint32)."""
        return self._index()[2]

    @property
    def offset(self):
        """Offset of each packet's data inside the batch buffer (int64)."""
        return self._index()[3]

    # -- packets -----------------------------------------------------------------------------
    def __getitem__(self, Py_ssize_t i):
        """Packet ``i`` as a read-only memoryview into the batch (valid while referenced)."""
        arrays = self._index()
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("packet index out of range")
        cdef Py_ssize_t start = arrays[3][i]
        return memoryview(self)[start:start + arrays[1][i]]

    def __iter__(self):
        """Yield each packet as a read-only memoryview (zero-copy)."""
        _ts, cap, _wire, off = self._index()
        mv = memoryview(self)
        for start, length in zip(off.tolist(), cap.tolist()):
            yield mv[start:start + length]

    def copy(self) -> PacketBatch:
        """An independent batch owning a copy of the records (the ring block can be reused)."""
        self._check()
        return PacketBatch.from_records(bytes(self), link_type=self._link_type,
                                        snaplen=self._snaplen, interface=self._interface,
                                        validate=False, count=len(self))

    def release(self) -> None:
        """Give the block back now. Raises ``BufferError`` while memoryviews of it exist."""
        if self._released:
            return
        if self._exports > 0:
            raise BufferError(f"PacketBatch still has {self._exports} exported view(s)")
        self._arrays = None
        self._release_storage()

    def filter(self, str expression):
        """Boolean mask (numpy) of the packets matching a BPF expression (libpcap's offline filter)."""
        self._check()
        # the storage stays until the end (release() from another thread raises BufferError):
        # taken before any Python call below, which may let another thread run
        self._exports += 1
        try:
            return self._filter(expression)
        finally:
            self._exports -= 1

    cdef object _filter(self, str expression):
        cdef BpfProgram prog = BpfProgram(expression, self._link_type, self._snaplen)
        _ts, cap, wire, off = self._index()
        cdef Py_ssize_t n = len(self), i
        np = _numpy()
        mask = np.zeros(n, dtype=np.bool_)
        cdef const unsigned char *d = self._data
        cdef pcap_pkthdr h
        cdef const int64_t[::1] voff = off
        cdef const uint32_t[::1] vcap = cap
        cdef const uint32_t[::1] vwire = wire
        cdef uint8_t[::1] vm = mask.view(np.uint8)
        cdef const int64_t *poff = &voff[0] if n else NULL
        cdef const uint32_t *pcaplen = &vcap[0] if n else NULL
        cdef const uint32_t *pwire = &vwire[0] if n else NULL
        cdef uint8_t *pm = &vm[0] if n else NULL
        memset(&h, 0, sizeof(h))
        with nogil:
            for i in range(n):
                # lengths from the checked index, not the buffer (which may have changed since)
                h.caplen = pcaplen[i]
                h.len = pwire[i]
                pm[i] = pcap_offline_filter(&prog.prog, &h, d + poff[i]) != 0
        return mask


cdef Py_ssize_t validate_records(const unsigned char *d, Py_ssize_t n, uint32_t snaplen) except -1:
    """Walk record headers; return the packet count or raise FileFormatError at the bad one."""
    cdef Py_ssize_t pos = 0, count = 0
    cdef uint32_t caplen, wirelen, nsec
    cdef int bad = 0
    with nogil:
        while pos < n:
            if n - pos < RECORD_HEADER:
                bad = 1
                break
            nsec = ps_get_le32(d + pos + 4)
            caplen = ps_get_le32(d + pos + 8)
            wirelen = ps_get_le32(d + pos + 12)
            if nsec >= 1000000000:
                bad = 2
                break
            if caplen > snaplen or caplen > wirelen:
                bad = 3
                break
            if <Py_ssize_t> caplen > n - pos - RECORD_HEADER:
                bad = 4
                break
            pos += RECORD_HEADER + caplen
            count += 1
    if bad:
        reason = {1: "truncated record header", 2: "nanoseconds field >= 1e9",
                  3: "caplen larger than snaplen or wire length", 4: "record runs past the end"}[bad]
        raise FileFormatError(f"bad pcap record at byte {pos}: {reason}", offset=pos)
    return count


def count_records(data, uint32_t snaplen=0x7fffffff) -> int:
    """Validate a buffer of pcap records and return how many there are."""
    cdef Py_buffer buf
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        return validate_records(<const unsigned char *> buf.buf, buf.len, snaplen)
    finally:
        PyBuffer_Release(&buf)


# ---------------------------------------------------------------------------------------------
# BPF
# ---------------------------------------------------------------------------------------------

cdef inline bint _host_little_endian() noexcept:
    cdef uint16_t one = 1
    return (<unsigned char *> &one)[0] == 1


cdef pcap_t *_savefile_handle(int dlt, int snaplen) noexcept:
    """A handle libpcap takes for a savefile of link type ``dlt`` (a pcap file header read
    from memory; no packets), or NULL when it cannot be made for this link type."""
    cdef char errbuf[PCAP_ERRBUF_SIZE]
    cdef unsigned char hdr[24]
    cdef uint32_t word[4]
    cdef uint16_t version[2]
    cdef pcap_t *p
    cdef FILE *f
    # a ns pcap file header in host byte order (not "swapped"), version 2.4
    word[0] = 0xA1B23C4D
    version[0] = 2
    version[1] = 4
    word[1] = 0  # thiszone, sigfigs
    word[2] = <uint32_t> snaplen
    word[3] = <uint32_t> (101 if dlt == 12 else 100 if dlt == 11 else dlt)  # DLT -> LINKTYPE_
    memcpy(hdr, &word[0], 4)
    memcpy(hdr + 4, version, 4)
    memcpy(hdr + 8, &word[1], 4)
    memcpy(hdr + 12, &word[1], 4)
    memcpy(hdr + 16, &word[2], 8)
    f = fmemopen(hdr, sizeof(hdr), "rb")
    if f == NULL:
        return NULL
    p = pcap_fopen_offline_with_tstamp_precision(f, PCAP_TSTAMP_PRECISION_NANO, errbuf)
    if p == NULL:
        fclose(f)
        return NULL
    if pcap_datalink(p) != dlt:  # (a LINKTYPE_ value libpcap maps elsewhere)
        pcap_close(p)
        return NULL
    return p  # (the header was read at open: closing it never reads the stack buffer again)


cdef _check_no_nul(str expression):
    """libpcap reads a filter up to its first NUL: ``"tcp\\0 or udp"`` would compile as ``tcp``."""
    if "\0" in expression:
        raise FilterError(f"bad BPF filter {expression!r}: it holds a NUL character")


cdef int _check_forward(const bpf_program *prog, str expression) except -1:
    """Refuse a compiled filter whose jumps are not all forward and inside the program:
    libpcap's ``protochain`` compiles to a loop, which its interpreter runs for ever on a
    crafted IPv6 header chain (libpcap issue 1521: tcpdump hangs too) -- one packet from the
    network would stop a reader, a query or the capture thread. The kernel refuses such
    programs for the same reason."""
    cdef unsigned int i, n = prog.bf_len
    cdef const bpf_insn *ins
    for i in range(n):
        ins = &prog.bf_insns[i]
        if (ins.code & 0x07) != 0x05:  # BPF_CLASS != BPF_JMP
            continue
        if (ins.code & 0xf0) == 0x00:  # BPF_JA: k is the offset
            if ins.k >= n - i - 1:
                break
        elif ins.jt >= n - i - 1 or ins.jf >= n - i - 1:
            break
    else:
        return 0
    raise FilterError(f"BPF filter {expression!r} is refused: its program jumps backwards (libpcap's "
                      "'protochain' loops, and can loop for ever on a crafted packet); use 'ip6 proto N' "
                      "or 'ip6 and tcp'-style tests")


@cython.final
cdef class BpfProgram:
    """A compiled BPF filter for a link type (used for offline filtering of batches)."""
    cdef bpf_program prog
    cdef bint compiled

    def __cinit__(self, str expression, int link_type, int snaplen=DEFAULT_SNAPLEN):
        # compiled as for a capture file (what tcpdump -r compiles against): libpcap's code
        # differs from a live handle's for some link types (NULL/LOOP "ip6" tests the BSD
        # address families a file may hold, not this host's AF_INET6)
        _check_no_nul(expression)
        cdef pcap_t *p = _savefile_handle(link_type, snaplen)
        if p == NULL:
            p = pcap_open_dead_with_tstamp_precision(link_type, snaplen, PCAP_TSTAMP_PRECISION_NANO)
        if p == NULL:
            raise MemoryError("pcap_open_dead failed")
        try:
            if pcap_compile(p, &self.prog, expression.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
                raise FilterError(f"bad BPF filter {expression!r} for {link_type_name(link_type)}: "
                                  f"{_decode(pcap_geterr(p))}")
            self.compiled = True
            _check_forward(&self.prog, expression)
        finally:
            pcap_close(p)

    def __dealloc__(self):
        if self.compiled:
            pcap_freecode(&self.prog)

    def matches(self, data, int wirelen=-1) -> bool:
        """Whether one packet (bytes) passes the filter."""
        cdef Py_buffer buf
        cdef pcap_pkthdr h
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            memset(&h, 0, sizeof(h))
            h.caplen = <uint32_t> buf.len
            h.len = <uint32_t> (buf.len if wirelen < 0 else wirelen)
            return pcap_offline_filter(&self.prog, &h, <const unsigned char *> buf.buf) != 0
        finally:
            PyBuffer_Release(&buf)


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------

ctypedef struct CaptureState:
    pcap_t *p
    unsigned char **blocks   # the ring's blocks (Ring.blocks)
    size_t *cap              # bytes allocated for each block (Ring.cap)
    size_t block_bytes       # normal block size
    bint lazy                # blocks are allocated when first filled and may grow (files)
    int err                  # set in the callback: a block could not be allocated
    int nblocks
    int *state
    size_t *used
    uint32_t *count
    uint8_t *resident        # live rings: block written since its pages were last given back
    int64_t *last_used_ns    # live rings: monotonic time each block was last acquired
    int64_t last_trim_ns     # live rings: last look for idle blocks (see _trim)
    int cur                  # block being filled, -1 if none
    int last                 # last block acquired (scan starts after it)
    int64_t cur_first_ns     # monotonic time the first packet entered `cur`
    int64_t last_seal_ns     # monotonic time a block with packets was last sealed (0: never)
    int64_t idle_wait_ns     # adaptive sealing (see _early_at); < 0: off
    int64_t early_tat        # adaptive sealing: theoretical time of the next early seal (GCRA)
    int *queue               # FIFO of sealed blocks, capacity nblocks
    int q_head
    int q_len
    uint32_t ns_mult         # 1 if libpcap gives ns, 1000 if µs
    uint64_t seen            # callback invocations (packets libpcap delivered)
    uint64_t packets         # copied into the ring
    uint64_t bytes           # caplen bytes copied
    uint64_t ring_drops      # packets dropped: no free block (batches held too long)
    uint64_t oversize_drops  # packets larger than a block (cannot happen live: block >= snaplen)
    uint64_t early_seals     # partly filled blocks sealed by the adaptive rule (idle_wait)
    uint64_t ring_full_ns    # live: time the capture thread waited for a free block (consumer behind)
    uint64_t max_packets     # 0 = unlimited
    int stop                 # set by stop() (STOP_DRAIN) or close() (STOP_CLOSE) from any thread
    int draining             # stopping: emptying the kernel buffer
    uint64_t drain_target    # stopping: packets the kernel had retired at stop (seen reaching it ends the drain)
    pthread_mutex_t stats_mu  # pcap_stats() from one thread at a time (reader drain, stats())
    pthread_mutex_t q_mu      # the queue (queue, q_head, q_len): the capture thread seals, next_batch pops
    pthread_mutex_t handle_mu  # live: pcap_dispatch (capture thread) against pcap_compile/pcap_setfilter
    int stop_fd              # eventfd: stop()/close() wake the capture thread's poll
    int ready_fd             # live: eventfd written when a block is queued or the capture thread ends; -1 offline
    int timeout_ms           # live: the kernel's batching timeout (libpcap's read timeout)
    int64_t max_wait_ns      # seal a partly filled block this long after its first packet
    int done                 # live: the capture thread has ended (atomic; nothing more will be queued)
    int filter_pending       # live: set_filter waits for handle_mu (atomic; ends a wait for a free block)
    int fail_rc              # live: why it ended early: a pcap_dispatch error (< 0) or FAIL_POLL
    int fail_errno           # live: errno of a failed poll
    char fail_msg[512]       # live: pcap_geterr() at the failure, copied by the capture thread
    unsigned char *stash     # files: a record read when no block was free (malloc'ed, see _stash)
    size_t stash_len         # files: bytes of the stashed record, 0 if none


cdef inline int64_t _seconds_to_ns(double seconds) noexcept:
    """Non-negative seconds → ns, clamped to 30 years (no float → int overflow)."""
    if not seconds > 0:
        return 0
    if seconds > 1e9:
        return 1000000000 * <int64_t> 1000000000
    return <int64_t> (seconds * 1e9)


cdef inline int _min_ms(int ms, int64_t ns_left) noexcept nogil:
    """min(ms, ns_left rounded up to ms), without overflowing an int."""
    cdef int64_t left = ns_left // 1000000 + 1
    if left < 0:
        left = 0
    return ms if ms <= left else <int> left


cdef inline int _free_count(CaptureState *s) noexcept nogil:
    cdef int i, n = 0
    for i in range(s.nblocks):
        if ps_load_int(&s.state[i]) == BLOCK_FREE:
            n += 1
    return n


cdef inline bint _any_free(CaptureState *s) noexcept nogil:
    return _free_count(s) > 0


cdef inline int _queued(CaptureState *s) noexcept nogil:
    """Sealed blocks not yet taken by next_batch (any thread)."""
    cdef int n
    pthread_mutex_lock(&s.q_mu)
    n = s.q_len
    pthread_mutex_unlock(&s.q_mu)
    return n


cdef inline void _notify(CaptureState *s) noexcept nogil:
    """Live: wake next_batch (a block was queued, or the capture thread ended)."""
    cdef uint64_t one = 1
    if s.ready_fd >= 0:
        write(s.ready_fd, &one, sizeof(one))


cdef inline void _seal(CaptureState *s) noexcept nogil:
    """Queue the block being filled (capture thread: the live one, or next_batch's offline)."""
    cdef int b = s.cur
    cdef int q_len
    if b < 0:
        return
    s.cur = -1
    if s.count[b] == 0:
        ps_store_int(&s.state[b], BLOCK_FREE)
        return
    ps_store_int(&s.state[b], BLOCK_OUT)
    s.last_seal_ns = ps_monotonic_ns()
    pthread_mutex_lock(&s.q_mu)
    s.queue[(s.q_head + s.q_len) % s.nblocks] = b
    s.q_len += 1
    q_len = s.q_len
    pthread_mutex_unlock(&s.q_mu)
    _notify(s)
    if s.p != NULL and (q_len * 2 >= s.nblocks or _free_count(s) <= 1):
        # Half the ring is sealed and waiting, or at most one block is left: leave
        # pcap_dispatch before the ring runs out. With TPACKET_V3 one dispatch would otherwise
        # drain the whole kernel buffer (tens of MiB) into the ring and drop what does not
        # fit; stopping here leaves the rest in the kernel buffer (or the file) instead, and
        # lets a file's reader hand batches out.
        pcap_breakloop(s.p)


cdef inline int64_t _early_at(CaptureState *s, int64_t max_wait_ns) noexcept nogil:
    """Adaptive sealing: the monotonic time from which the partly filled block may be sealed
    early (-1: not enabled, nothing to seal, or ``max_wait`` seals it first).

    Two conditions, both must hold:

    * *quiet link*: at the rate seen since the previous seal, a whole block would take longer
      than ``max_wait`` to fill (``used / elapsed < block_bytes / max_wait``). At higher rates
      this time grows faster than the clock and blocks are sealed full (or at ``max_wait``)
      exactly as without adaptive sealing: batching is kept where it pays.
    * *budget*: early seals are rate-limited to one per ``idle_wait`` on average with a burst
      of ``EARLY_BURST`` (a generic cell rate algorithm on ``early_tat``), which bounds the
      per-block cost on a link that is quiet but never idle (e.g. 1 kpps of small frames).

    Computed in double precision: no overflow for any block size, time or ``max_wait``.
    Capture thread only (like every other CaptureState field it reads or writes).
    """
    cdef double need, at, bucket
    if s.idle_wait_ns < 0 or s.cur < 0 or s.count[s.cur] == 0 or s.block_bytes == 0:
        return -1
    need = <double> s.used[s.cur] * <double> max_wait_ns / <double> s.block_bytes
    if need >= <double> max_wait_ns:
        return -1
    at = <double> s.last_seal_ns + need
    bucket = <double> s.early_tat - <double> (EARLY_BURST - 1) * <double> s.idle_wait_ns
    if bucket > at:
        at = bucket
    if at >= <double> (s.cur_first_ns + max_wait_ns):
        return -1  # max_wait comes first
    return <int64_t> at


cdef inline void _seal_early(CaptureState *s, int64_t now) noexcept nogil:
    """Seal the partly filled block by the adaptive rule and charge the budget (capture thread)."""
    if s.early_tat < now:
        s.early_tat = now
    s.early_tat += s.idle_wait_ns
    s.early_seals += 1
    _seal(s)


cdef inline bint _resize_block(CaptureState *s, int b, size_t nbytes) noexcept nogil:
    """Lazy rings: (re)allocate the FILLING, empty block ``b`` to ``nbytes``."""
    _block_free(s.blocks[b])
    s.cap[b] = 0
    s.blocks[b] = _block_alloc(nbytes)
    if s.blocks[b] == NULL:
        s.err = 1
        return False
    s.cap[b] = nbytes
    return True


cdef inline int _acquire(CaptureState *s) noexcept nogil:
    """Take a free block for filling: the lowest-numbered one in a live ring (a quiet link
    keeps the same one or two blocks resident), the next one round the ring in a lazy ring."""
    cdef int i, b
    for i in range(1, s.nblocks + 1):
        b = i - 1 if not s.lazy else (s.last + i) % s.nblocks
        if ps_load_int(&s.state[b]) == BLOCK_FREE:
            if s.lazy and s.cap[b] != s.block_bytes:  # first use, or grown for a big record
                if not _resize_block(s, b, s.block_bytes):
                    return -2
            ps_store_int(&s.state[b], BLOCK_FILLING)
            s.used[b] = 0
            s.count[b] = 0
            s.cur = b
            s.last = b
            if not s.lazy:
                s.resident[b] = 1
                s.last_used_ns[b] = ps_monotonic_ns()
            return b
    return -1


cdef void _trim(CaptureState *s, int64_t now) noexcept nogil:
    """Live rings: give back the pages of free blocks not acquired for ``RING_TRIM_IDLE_NS``
    (capture thread only: it alone moves a FREE block on, so no batch can see the pages go)."""
    cdef int b
    s.last_trim_ns = now
    if s.lazy or PKTSTREAM_DEBUG:  # malloc'ed blocks (files, sanitizer builds) are kept
        return
    for b in range(s.nblocks):
        if (s.resident[b] and now - s.last_used_ns[b] >= RING_TRIM_IDLE_NS
                and ps_load_int(&s.state[b]) == BLOCK_FREE):
            if madvise(s.blocks[b], s.cap[b], MADV_DONTNEED) == 0:
                s.resident[b] = 0


cdef void _on_packet(unsigned char *user, const pcap_pkthdr *h, const unsigned char *data) noexcept nogil:
    """libpcap callback: copy the packet once into the current block as a pcap record."""
    cdef CaptureState *s = <CaptureState *> user
    cdef size_t need = <size_t> RECORD_HEADER + h.caplen
    cdef unsigned char *dst
    cdef int got
    cdef int64_t waited_from
    s.seen += 1
    if s.max_packets and s.packets >= s.max_packets:
        pcap_breakloop(s.p)
        return
    if need > s.block_bytes and not s.lazy:
        s.oversize_drops += 1
        return
    if s.cur >= 0 and s.used[s.cur] + need > s.cap[s.cur]:
        _seal(s)
    if s.cur < 0:
        got = _acquire(s)
        if got == -2:  # out of memory (lazy ring): next_batch raises MemoryError
            pcap_breakloop(s.p)
            return
        if got == -1 and s.ready_fd >= 0:
            # live: every block is sealed or held. While next_batch still has sealed blocks to
            # take, its consumer is behind, not gone: wait here for one to be released (the
            # kernel buffer keeps what arrives meanwhile) instead of dropping this packet; not
            # while set_filter waits for the handle (its caller may be that consumer)
            waited_from = ps_monotonic_ns()
            while (got == -1 and ps_load_int(&s.stop) != STOP_CLOSE and _queued(s) > 0
                   and not ps_load_int(&s.filter_pending)):
                poll(NULL, 0, 1)
                got = _acquire(s)
            s.ring_full_ns += <uint64_t> (ps_monotonic_ns() - waited_from)
        if got == -1 and s.lazy and s.stash_len == 0:
            # a file: the caller holds every other block; keep this packet for the next call
            # (which delivers the block just sealed) instead of dropping it
            if _stash(s, h, data, need):
                pcap_breakloop(s.p)
                return
        if got < 0:
            # every block is held by a batch: count the drop and stop draining the kernel
            # buffer, which keeps the rest until a block is released (see next_batch);
            # when stopping, everything left is counted instead, unless the wait above gave
            # way to close() or set_filter (then only this packet: the loop is left at once)
            s.ring_drops += 1
            if (not s.draining or ps_load_int(&s.stop) == STOP_CLOSE
                    or ps_load_int(&s.filter_pending)):
                pcap_breakloop(s.p)
            return
    if need > s.cap[s.cur]:
        # lazy ring, a record larger than a block (the fresh block is empty): grow this block
        # to the size of the record libpcap actually read, never to what the header claims
        if not _resize_block(s, s.cur, need):
            s.ring_drops += 1
            ps_store_int(&s.state[s.cur], BLOCK_FREE)
            s.cur = -1
            pcap_breakloop(s.p)
            return
    if PKTSTREAM_DEBUG:
        if s.used[s.cur] + need > s.cap[s.cur] or ps_load_int(&s.state[s.cur]) != BLOCK_FILLING:
            abort()
    dst = s.blocks[s.cur] + s.used[s.cur]
    ps_put_le32(dst, <uint32_t> h.ts.tv_sec)
    ps_put_le32(dst + 4, <uint32_t> h.ts.tv_usec * s.ns_mult)
    ps_put_le32(dst + 8, h.caplen)
    ps_put_le32(dst + 12, h.len)
    memcpy(dst + RECORD_HEADER, data, h.caplen)
    if s.count[s.cur] == 0:
        s.cur_first_ns = ps_monotonic_ns()
    s.used[s.cur] += need
    s.count[s.cur] += 1
    s.packets += 1
    s.bytes += h.caplen
    if s.max_packets and s.packets >= s.max_packets:
        _seal(s)
        pcap_breakloop(s.p)


cdef bint _stash(CaptureState *s, const pcap_pkthdr *h, const unsigned char *data,
                 size_t need) noexcept nogil:
    """Files: copy a record that found no free block aside (the next read places it first).
    False if out of memory (the packet is then counted in ring_drops)."""
    cdef unsigned char *m = <unsigned char *> realloc(s.stash, need)
    if m == NULL:
        return False
    s.stash = m
    ps_put_le32(m, <uint32_t> h.ts.tv_sec)
    ps_put_le32(m + 4, <uint32_t> h.ts.tv_usec * s.ns_mult)
    ps_put_le32(m + 8, h.caplen)
    ps_put_le32(m + 12, h.len)
    memcpy(m + RECORD_HEADER, data, h.caplen)
    s.stash_len = need
    return True


cdef int _unstash(CaptureState *s) noexcept nogil:
    """Files: place the stashed record in a fresh block (the caller checked one is free).
    0 placed (or nothing stashed), -1 out of memory (the stash is kept). No block is being
    filled meanwhile: a record is stashed only when none could be acquired, the one filled
    before it sealed, and nothing is read until it is placed."""
    cdef size_t need = s.stash_len
    if need == 0:
        return 0
    if s.cur >= 0:  # (not reached: see above; sealed rather than left filling and lost)
        _seal(s)
    if _acquire(s) < 0:
        return -1
    if need > s.cap[s.cur] and not _resize_block(s, s.cur, need):
        ps_store_int(&s.state[s.cur], BLOCK_FREE)
        s.cur = -1
        return -1
    memcpy(s.blocks[s.cur] + s.used[s.cur], s.stash, need)
    if s.count[s.cur] == 0:
        s.cur_first_ns = ps_monotonic_ns()
    s.used[s.cur] += need
    s.count[s.cur] += 1
    s.packets += 1
    s.bytes += need - RECORD_HEADER
    s.stash_len = 0
    return 0


cdef int _dispatch(CaptureState *s) noexcept nogil:
    """Live: one pcap_dispatch, excluded from set_filter; keeps libpcap's message on error."""
    cdef int rc
    pthread_mutex_lock(&s.handle_mu)
    rc = pcap_dispatch(s.p, -1, _on_packet, <unsigned char *> s)
    if rc < 0 and rc != PCAP_ERROR_BREAK:
        strncpy(s.fail_msg, pcap_geterr(s.p), sizeof(s.fail_msg) - 1)
    pthread_mutex_unlock(&s.handle_mu)
    return rc


cdef void _capture_until_stop(CaptureState *s, pollfd *fds) noexcept nogil:
    """Live capture thread, first part: fill and seal blocks until stop(), close(), ``count``
    or an error (fail_rc). Sleeps in poll on the socket and the stop eventfd; wakes for the
    kernel's blocks, max_wait, the adaptive seal and the ring trim (every IDLE_POLL_MS idle)."""
    cdef int64_t now, early_at
    cdef int poll_ms, prc, rc
    cdef bint behind
    cdef const timeval *required
    while True:
        if ps_load_int(&s.stop) or (s.max_packets and s.packets >= s.max_packets):
            return
        now = ps_monotonic_ns()
        if now - s.last_trim_ns >= RING_TRIM_EVERY_NS:
            _trim(s, now)
        # a consumer behind (a quarter of the ring sealed and not yet taken: GIL waits, a
        # reconnection's resend, a loaded host) would take a block sealed now no sooner than
        # a fuller one, and every partly filled block sealed by time is ring capacity lost: at
        # low rates (blocks of ~50 ms) the ring held ~1.5 s of traffic, then the kernel buffer
        # (its blocks retired every timeout_ms) ~0.3 s more before it dropped. Until it
        # catches up, blocks are sealed only full: the ring holds whole MiBs, seconds of traffic
        behind = _queued(s) * BEHIND_SHARE >= s.nblocks
        if not behind:
            if s.cur >= 0 and s.count[s.cur] > 0 and now - s.cur_first_ns >= s.max_wait_ns:
                _seal(s)
            # everything the kernel had is dispatched (or nothing was yet): a partly filled
            # block on a quiet link goes now (adaptive sealing)
            early_at = _early_at(s, s.max_wait_ns)
            if early_at >= 0 and now >= early_at:
                _seal_early(s, now)
        if s.cur < 0 and not _any_free(s):
            # the ring is full of batches still held: leave packets in the kernel buffer
            # until one is released (or stop() is called)
            poll(&fds[1], 1, 10)
            s.ring_full_ns += <uint64_t> (ps_monotonic_ns() - now)
            continue
        poll_ms = IDLE_POLL_MS
        if s.cur >= 0 and s.count[s.cur] > 0 and behind:
            poll_ms = BEHIND_POLL_MS  # (next_batch does not wake this thread when it catches up)
        elif s.cur >= 0 and s.count[s.cur] > 0:
            # the kernel wakes poll when it hands over packets (within timeout_ms); a
            # wake-up of our own is due only at max_wait or the adaptive seal
            poll_ms = _min_ms(IDLE_POLL_MS, s.cur_first_ns + s.max_wait_ns - now)
            early_at = _early_at(s, s.max_wait_ns)
            if early_at >= 0:
                poll_ms = _min_ms(poll_ms, early_at - now)
        required = pcap_get_required_select_timeout(s.p)
        if required != NULL:  # libpcap asks to be called again this soon (e.g. interface down)
            poll_ms = _min_ms(poll_ms, <int64_t> required.tv_sec * 1000000000 + <int64_t> required.tv_usec * 1000)
        prc = poll(fds, 2, poll_ms)
        if prc < 0 and errno != EINTR:
            s.fail_errno = errno
            s.fail_rc = FAIL_POLL
            return
        rc = _dispatch(s)
        if rc < 0 and rc != PCAP_ERROR_BREAK:
            s.fail_rc = rc  # the interface went away, or the driver failed
            return


cdef void _drain_wait(CaptureState *s, pollfd *fds, int ms) noexcept nogil:
    """Stopping: wait up to ``ms`` for the kernel to hand over a block; close() (STOP_CLOSE,
    through stop_fd) ends the wait at once."""
    cdef int64_t end = ps_monotonic_ns() + <int64_t> ms * 1000000
    cdef int64_t left
    cdef uint64_t junk
    while ps_load_int(&s.stop) != STOP_CLOSE:
        left = end - ps_monotonic_ns()
        if left <= 0:
            return
        fds[0].revents = 0
        fds[1].revents = 0
        if poll(fds, 2, _min_ms(IDLE_POLL_MS, left)) < 0 and errno != EINTR:
            return
        if fds[1].revents:
            read(s.stop_fd, &junk, sizeof(junk))  # another stop(), or close(): looked at above
        if fds[0].revents:
            return


cdef void _drain_after_stop(CaptureState *s, pollfd *fds) noexcept nogil:
    """Live capture thread, after stop() (or ``count``): take what the kernel had retired at
    that moment, then end. Under sustained traffic no dispatch ever comes back empty, so the
    end is having seen as many packets as the kernel had counted at stop()."""
    cdef pcap_stat ps
    cdef int prc, drain_waits = 0
    cdef int32_t delta
    cdef uint64_t junk
    s.draining = 1
    read(s.stop_fd, &junk, sizeof(junk))  # stop()'s wake-up is taken: close() can wake a wait below
    # the kernel hands over a partly filled buffer block only when its timeout (timeout_ms)
    # expires: wait for that once, then drain
    memset(&ps, 0, sizeof(ps))
    s.drain_target = 0
    pthread_mutex_lock(&s.stats_mu)
    prc = pcap_stats(s.p, &ps)
    pthread_mutex_unlock(&s.stats_mu)
    if prc == 0:
        # libpcap's counters are 32 bits: the kernel's count, relative to what was seen,
        # modulo 2^32 (a sensor passes 2^32 in days)
        delta = <int32_t> (<uint32_t> (ps.ps_recv - ps.ps_drop) - <uint32_t> s.seen)
        s.drain_target = s.seen + <uint64_t> delta if delta > 0 else s.seen
        if s.drain_target > s.seen:
            _drain_wait(s, fds, s.timeout_ms if s.timeout_ms > 0 else 100)
    while ps_load_int(&s.stop) != STOP_CLOSE:
        if s.max_packets and s.packets >= s.max_packets:
            break
        prc = _dispatch(s)
        if prc == 0 and drain_waits < 20 and s.drain_target > s.seen:
            # nothing handed over, yet the kernel had packets at stop() not seen yet: they sit
            # in a block whose timeout has not expired (the wait above was met by an earlier
            # block, or the machine is loaded): wait for it (bounded) and dispatch again,
            # instead of ending without them
            drain_waits += 1
            _drain_wait(s, fds, s.timeout_ms if s.timeout_ms > 0 else 100)
            continue
        if prc == 0 or (prc < 0 and prc != PCAP_ERROR_BREAK) or (
                s.drain_target and s.seen >= s.drain_target):
            break
    read(s.stop_fd, &junk, sizeof(junk))


cdef void *_capture_thread(void *arg) noexcept nogil:
    """The live capture thread: a plain C thread that never takes the GIL, so the kernel
    buffer is emptied into the ring while Python threads (the consumer of the batches, a
    compressor, a sender) run; it only has to cover this thread's own scheduling delays.
    Started by the first next_batch, joined by close() (or when the Capture is freed)."""
    cdef CaptureState *s = <CaptureState *> arg
    cdef sigset_t all_signals
    cdef pollfd fds[2]
    sigfillset(&all_signals)
    # a crash in this thread still reaches faulthandler / ASan
    sigdelset(&all_signals, SIGSEGV)
    sigdelset(&all_signals, SIGBUS)
    sigdelset(&all_signals, SIGFPE)
    sigdelset(&all_signals, SIGILL)
    sigdelset(&all_signals, SIGTRAP)
    sigdelset(&all_signals, SIGSYS)
    sigdelset(&all_signals, SIGABRT)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)  # the rest are for Python's threads
    fds[0].fd = pcap_get_selectable_fd(s.p)
    fds[0].events = POLLIN
    fds[1].fd = s.stop_fd
    fds[1].events = POLLIN
    _capture_until_stop(s, fds)
    if s.fail_rc == 0 and ps_load_int(&s.stop) != STOP_CLOSE:
        _drain_after_stop(s, fds)
    _seal(s)  # the partly filled block (on a failure too: delivered before the error)
    ps_store_int(&s.done, 1)
    _notify(s)
    return NULL


class InterfaceAddress(NamedTuple):
    """One address of an interface (IPv4 or IPv6, as text)."""
    family: str
    address: str
    netmask: str | None


class Interface(NamedTuple):
    """A capture device as listed by ``pcap_findalldevs``."""
    name: str
    description: str
    up: bool
    running: bool
    loopback: bool
    wireless: bool
    addresses: tuple
    flags: int


cdef object _sockaddr_text(sockaddr *sa):
    cdef char buf[64]
    if sa == NULL:
        return None
    if sa.sa_family == AF_INET:
        if inet_ntop(AF_INET, &(<sockaddr_in *> sa).sin_addr, buf, sizeof(buf)) != NULL:
            return buf.decode()
    elif sa.sa_family == AF_INET6:
        if inet_ntop(AF_INET6, &(<sockaddr_in6 *> sa).sin6_addr, buf, sizeof(buf)) != NULL:
            return buf.decode()
    return None


def list_interfaces() -> list:
    """Capture devices (``pcap_findalldevs``) with flags and IPv4/IPv6 addresses."""
    cdef char errbuf[PCAP_ERRBUF_SIZE]
    cdef pcap_if_t *alldevs = NULL
    cdef pcap_if_t *d
    cdef pcap_addr_t *a
    memset(errbuf, 0, sizeof(errbuf))
    if pcap_findalldevs(&alldevs, errbuf) != 0:
        raise PcapError(f"pcap_findalldevs: {_decode(errbuf)}")
    out = []
    try:
        d = alldevs
        while d != NULL:
            addrs = []
            a = d.addresses
            while a != NULL:
                text = _sockaddr_text(a.addr)
                if text is not None:
                    addrs.append(InterfaceAddress("inet" if a.addr.sa_family == AF_INET else "inet6",
                                                  text, _sockaddr_text(a.netmask)))
                a = a.next
            out.append(Interface(_decode(d.name), _decode(d.description),
                                 bool(d.flags & PCAP_IF_UP), bool(d.flags & PCAP_IF_RUNNING),
                                 bool(d.flags & PCAP_IF_LOOPBACK), bool(d.flags & PCAP_IF_WIRELESS),
                                 tuple(addrs), d.flags))
            d = d.next
    finally:
        pcap_freealldevs(alldevs)
    return out


_DIRECTIONS = {"inout": PCAP_D_INOUT, "both": PCAP_D_INOUT, "in": PCAP_D_IN, "out": PCAP_D_OUT}


@cython.final
@cython.no_gc_clear  # the capture thread uses the ring until __dealloc__ has joined it
cdef class Capture:
    """A libpcap capture handle (live interface or offline file) feeding a ring of blocks.

    Iterating yields :class:`PacketBatch` objects: a block is sealed when full or when
    ``max_wait`` seconds have passed since its first packet. Iteration ends after ``stop()``
    (everything captured so far is delivered first), after ``count`` packets, or at the end of
    a file.

    Lifetime: a live capture fills the ring on its own C thread (no GIL), started by the first
    ``next_batch()`` and joined by ``close()``; batches stay valid after ``close()``.
    Thread safety: one thread iterates; ``stop()``, ``close()``, ``stats()`` and ``set_filter()``
    may be called from any thread. The library installs no signal handlers; iteration checks for
    pending signals (KeyboardInterrupt) at least every 500 ms on the main thread (5 s on another,
    where Python runs no signal handlers).
    """
    cdef CaptureState s
    cdef Ring _ring
    cdef pthread_t _thread   # live: the capture thread (_capture_thread)
    cdef bint _started       # live: _thread runs or ran and is not joined yet
    cdef bint offline
    cdef bint eof
    cdef readonly str device
    cdef readonly int link_type
    cdef readonly int snaplen
    cdef readonly double max_wait
    cdef object _lock
    cdef object _handle_lock
    cdef object __weakref__

    def __cinit__(self):
        self.s.stop_fd = -1
        self.s.ready_fd = -1
        self.s.cur = -1
        self.s.last = -1
        if (pthread_mutex_init(&self.s.stats_mu, NULL) != 0 or pthread_mutex_init(&self.s.q_mu, NULL) != 0
                or pthread_mutex_init(&self.s.handle_mu, NULL) != 0):
            raise MemoryError("pthread_mutex_init failed")
        ps_count(&_captures_opened)

    def __init__(self, str device not None, *, int snaplen=DEFAULT_SNAPLEN, bint promisc=False,
                 bint immediate=False, long buffer_bytes=DEFAULT_BUFFER_BYTES,
                 int timeout_ms=DEFAULT_TIMEOUT_MS, str direction="inout", bpf=None,
                 double max_wait=DEFAULT_MAX_WAIT, long block_bytes=DEFAULT_BLOCK_BYTES,
                 int ring_blocks=DEFAULT_RING_BLOCKS, long count=0, idle_wait=None):
        """Open and activate a live capture on ``device``.

        :param snaplen: bytes kept per packet (tcpdump's ``-s``; default 262144).
        :param promisc: promiscuous mode.
        :param immediate: deliver each packet as soon as it arrives (lowest latency, more CPU).
        :param buffer_bytes: kernel capture buffer (default 32 MiB; tcpdump's ``-B`` is KiB).
        :param timeout_ms: kernel batching timeout (TPACKET_V3 hands over a partly filled buffer block after it).
        :param direction: ``"inout"`` (default), ``"in"`` or ``"out"``.
        :param bpf: filter expression (string or list of words, as tcpdump takes them).
        :param max_wait: seal a partially filled block this many seconds after its first packet
            (while a quarter of the blocks wait for ``next_batch``, the consumer behind, blocks
            are sealed only full: the ring then holds whole blocks of traffic).
        :param block_bytes: size of one ring block (a batch); at least ``snaplen + 16``.
        :param ring_blocks: number of blocks; when all are held by batches, packets are
            dropped and counted in ``stats()['ring_drops']``.
        :param count: stop after this many packets (0 = no limit).
        :param idle_wait: adaptive sealing (None: off, partly filled blocks wait ``max_wait``).
            When the rate seen since the previous block would not fill a block within
            ``max_wait``, a partly filled block is sealed as soon as libpcap has handed over
            what the kernel had, at most one such block per ``idle_wait`` seconds: a packet on a
            quiet link is delivered after the kernel's ``timeout_ms`` instead of ``max_wait``,
            and at high rates blocks are still sealed full (docs/CAPTURE.md).
        :raises NoSuchDevice, CapturePermissionError, InterfaceNotUp, PcapError, FilterError:
        """
        cdef char errbuf[PCAP_ERRBUF_SIZE]
        memset(errbuf, 0, sizeof(errbuf))
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of 'in', 'out', 'inout', not {direction!r}")
        if snaplen <= 0 or snaplen > 262144:
            raise ValueError(f"snaplen must be 1..262144, not {snaplen}")
        if buffer_bytes <= 0 or buffer_bytes > INT_MAX:  # libpcap takes an int
            raise ValueError(f"buffer_bytes must be 1..{INT_MAX}, not {buffer_bytes}")
        self.device = device
        self.s.timeout_ms = timeout_ms
        self._setup_ring(block_bytes, ring_blocks, snaplen, max_wait, count, False)
        if idle_wait is not None:
            iw = float(idle_wait)
            if not iw >= 0:  # also NaN
                raise ValueError(f"idle_wait must be >= 0 seconds or None, not {idle_wait!r}")
            if iw < self.max_wait:  # otherwise max_wait always comes first: off
                self.s.idle_wait_ns = _seconds_to_ns(iw)
        cdef pcap_t *p = pcap_create(device.encode(), errbuf)
        if p == NULL:
            raise PcapError(f"pcap_create on {device!r}: {_decode(errbuf)}", device=device)
        self.s.p = p
        self._check_setting(pcap_set_snaplen(p, snaplen), "pcap_set_snaplen")
        self._check_setting(pcap_set_promisc(p, promisc), "pcap_set_promisc")
        self._check_setting(pcap_set_timeout(p, timeout_ms), "pcap_set_timeout")
        self._check_setting(pcap_set_immediate_mode(p, immediate), "pcap_set_immediate_mode")
        self._check_setting(pcap_set_buffer_size(p, <int> buffer_bytes), "pcap_set_buffer_size")
        self.s.ns_mult = 1
        if pcap_set_tstamp_precision(p, PCAP_TSTAMP_PRECISION_NANO) != 0:
            self.s.ns_mult = 1000
        cdef int rc = pcap_activate(p)
        if rc < 0:
            self._fail(rc, "pcap_activate")
        elif rc > 0:
            warnings.warn(f"pcap_activate on {device!r}: {_decode(pcap_statustostr(rc))} "
                          f"({_decode(pcap_geterr(p))})", PcapWarning, stacklevel=2)
        if pcap_setnonblock(p, 1, errbuf) != 0:
            self._fail(PCAP_ERROR, "pcap_setnonblock", _decode(errbuf))
        if direction != "inout" and pcap_setdirection(p, _DIRECTIONS[direction]) != 0:
            self._fail(PCAP_ERROR, "pcap_setdirection")
        self.link_type = pcap_datalink(p)
        self.snaplen = pcap_snapshot(p)
        self.s.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.s.ready_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.s.stop_fd < 0 or self.s.ready_fd < 0:
            self._fail(PCAP_ERROR, "eventfd", strerror(errno).decode())
        if bpf:
            try:
                self.set_filter(bpf)
            except BaseException:
                self._close_handle()
                raise

    @staticmethod
    def open_offline(path, *, bpf=None, long block_bytes=DEFAULT_BLOCK_BYTES,
                     int ring_blocks=DEFAULT_RING_BLOCKS, long count=0) -> Capture:
        """Read a pcap (or single-link-type pcapng) file through libpcap, nanosecond stamps.

        Ring blocks are allocated as packets are read (``block_bytes`` each; a block grows for a
        larger packet libpcap actually read), not sized from the snaplen the file header claims.
        """
        cdef char errbuf[PCAP_ERRBUF_SIZE]
        memset(errbuf, 0, sizeof(errbuf))
        path = os.fspath(path)
        cdef Capture c = Capture.__new__(Capture)
        c.device = str(path)
        c.offline = True
        c.s.ns_mult = 1
        cdef pcap_t *p = pcap_open_offline_with_tstamp_precision(
            os.fsencode(path), PCAP_TSTAMP_PRECISION_NANO, errbuf)
        if p == NULL:
            msg = _decode(errbuf)
            if not os.path.exists(path):
                raise FileNotFoundError(2, f"no such capture file: {path!r}", path)
            raise FileFormatError(f"cannot read capture file {path!r}: {msg}", path=path)
        c.s.p = p
        c.link_type = pcap_datalink(p)
        if c.link_type == 0 and (pcap_is_swapped(p) != 0) == _host_little_endian():
            c.link_type = 108  # NULL in a big-endian file is LOOP (as pktstream.read gives it; docs/FILES.md)
        c.snaplen = pcap_snapshot(p)
        if c.snaplen <= 0:
            c.snaplen = DEFAULT_SNAPLEN
        try:
            c._setup_ring(block_bytes, ring_blocks, c.snaplen, 0.0, count, True)
        except BaseException:
            c._close_handle()
            raise
        if bpf:
            try:
                c.set_filter(bpf)
            except BaseException:
                c._close_handle()
                raise
        return c

    cdef _setup_ring(self, long block_bytes, int ring_blocks, int snaplen, double max_wait, long count,
                     bint lazy):
        if not lazy and block_bytes < <long> snaplen + RECORD_HEADER:
            raise ValueError(f"block_bytes ({block_bytes}) must be at least snaplen + 16 ({snaplen + 16})")
        if block_bytes <= RECORD_HEADER:
            raise ValueError(f"block_bytes must be more than 16, not {block_bytes}")
        if not max_wait >= 0:  # also NaN
            raise ValueError("max_wait must be >= 0")
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        self._ring = Ring(<size_t> block_bytes, ring_blocks, lazy)
        self.s.blocks = self._ring.blocks
        self.s.cap = self._ring.cap
        self.s.lazy = lazy
        self.s.block_bytes = self._ring.block_bytes
        self.s.nblocks = self._ring.nblocks
        self.s.state = self._ring.state
        self.s.used = self._ring.used
        self.s.count = self._ring.count
        self.s.resident = self._ring.resident
        self.s.last_used_ns = self._ring.last_used_ns
        self.s.last_trim_ns = 0
        self.s.queue = <int *> calloc(ring_blocks, sizeof(int))
        if self.s.queue == NULL:
            raise MemoryError()
        self.s.cur = -1
        self.s.last = -1
        self.s.max_packets = <uint64_t> count
        self.s.idle_wait_ns = -1
        self.s.last_seal_ns = 0
        self.s.early_tat = 0
        self.max_wait = max_wait
        self.s.max_wait_ns = _seconds_to_ns(max_wait)
        self._lock = threading.Lock()
        self._handle_lock = threading.Lock()

    cdef int _check_setting(self, int rc, str op) except -1:
        if rc != 0:
            self._fail(rc, op)
        return 0

    cdef int _fail(self, int rc, str op, detail=None) except -1:
        msg = detail if detail is not None else _decode(pcap_geterr(self.s.p)) if self.s.p != NULL else ""
        status = _decode(pcap_statustostr(rc))
        device = self.device
        self._close_handle()
        text = f"{op} on {device!r}: {status}"
        if msg and msg != status:
            text += f" ({msg})"
        raise pcap_error(text, rc, device)

    def __dealloc__(self):
        self._join()
        if self.s.p != NULL:
            pcap_close(self.s.p)
            self.s.p = NULL
        if self.s.stop_fd >= 0:
            close(self.s.stop_fd)
        if self.s.ready_fd >= 0:
            close(self.s.ready_fd)
        free(self.s.queue)
        free(self.s.stash)
        pthread_mutex_destroy(&self.s.stats_mu)
        pthread_mutex_destroy(&self.s.q_mu)
        pthread_mutex_destroy(&self.s.handle_mu)
        ps_count(&_captures_freed)

    def __del__(self):
        if self.s.p != NULL:
            warnings.warn(f"unclosed Capture on {self.device!r}", ResourceWarning, source=self)

    cdef void _join(self) noexcept:
        """End the live capture thread now (STOP_CLOSE: no drain) and wait for it."""
        cdef uint64_t one = 1
        if not self._started:
            return
        ps_store_int(&self.s.stop, STOP_CLOSE)
        write(self.s.stop_fd, &one, sizeof(one))
        with nogil:
            pthread_join(self._thread, NULL)
        self._started = False

    cdef void _close_handle(self) noexcept:
        # stop_fd stays open until __dealloc__: stop() from another thread may still write it
        if self.s.p != NULL:
            pcap_close(self.s.p)
            self.s.p = NULL

    # -- public API --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.s.p == NULL

    @property
    def link_type_name(self) -> str:
        return link_type_name(self.link_type)

    @property
    def ring(self) -> Ring:
        """The ring of blocks batches are delivered from."""
        return self._ring

    cdef int _check_open(self) except -1:
        if self.s.p == NULL:
            raise ClosedError(f"Capture on {self.device!r} is closed")
        return 0

    def set_filter(self, bpf) -> None:
        """Compile and install a BPF filter (a string or a list of words)."""
        cdef bpf_program prog
        expr = " ".join(bpf) if isinstance(bpf, (list, tuple)) else str(bpf)
        _check_no_nul(expr)
        cdef bytes text = expr.encode()
        cdef const char *c_text = text
        with self._lock:  # close() from another thread must not free the handle meanwhile
            self._check_open()
            with nogil:  # not while the capture thread is inside pcap_dispatch on this handle
                ps_store_int(&self.s.filter_pending, 1)
                pthread_mutex_lock(&self.s.handle_mu)
                ps_store_int(&self.s.filter_pending, 0)
            try:
                if pcap_compile(self.s.p, &prog, c_text, 1, PCAP_NETMASK_UNKNOWN) != 0:
                    raise FilterError(f"bad BPF filter {expr!r} on {self.device!r}: {_decode(pcap_geterr(self.s.p))}")
                try:
                    _check_forward(&prog, expr)
                    if pcap_setfilter(self.s.p, &prog) != 0:
                        raise FilterError(f"cannot install filter {expr!r} on {self.device!r}: "
                                          f"{_decode(pcap_geterr(self.s.p))}")
                finally:
                    pcap_freecode(&prog)
            finally:
                pthread_mutex_unlock(&self.s.handle_mu)

    def stats(self) -> dict:
        """Counters: ``packets``/``bytes`` copied into the ring, libpcap's ``kernel_received``,
        ``kernel_dropped`` (buffer full), ``interface_dropped``, and the ring's own
        ``ring_drops`` (no free block), ``oversize_drops``, and ``ring_full_ms`` (live: how long
        the capture thread waited for a free block, leaving packets in the kernel buffer: the
        consumer behind). Callable from any thread."""
        cdef pcap_stat ps
        cdef int rc = -1
        memset(&ps, 0, sizeof(ps))
        out = {"packets": self.s.packets, "bytes": self.s.bytes,
               "ring_drops": self.s.ring_drops, "oversize_drops": self.s.oversize_drops,
               "early_seals": self.s.early_seals, "ring_full_ms": self.s.ring_full_ns // 1000000,
               "kernel_received": 0, "kernel_dropped": 0, "interface_dropped": 0}
        with self._handle_lock:  # close() from another thread must not free the handle meanwhile
            if self.s.p != NULL and not self.offline:
                with nogil:  # the reader thread's drain calls pcap_stats too: one at a time
                    pthread_mutex_lock(&self.s.stats_mu)
                    rc = pcap_stats(self.s.p, &ps)
                    pthread_mutex_unlock(&self.s.stats_mu)
            ok = rc == 0
        if ok:
            out.update(kernel_received=ps.ps_recv, kernel_dropped=ps.ps_drop,
                       interface_dropped=ps.ps_ifdrop)
        return out

    def inject(self, packet) -> int:
        """Send one raw packet (link-layer frame) on the interface; returns bytes sent."""
        cdef Py_buffer buf
        cdef int rc
        with self._handle_lock:  # close() from another thread must not free the handle meanwhile
            self._check_open()
            PyObject_GetBuffer(packet, &buf, PyBUF_SIMPLE)
            try:
                with nogil:
                    rc = pcap_inject(self.s.p, buf.buf, <size_t> buf.len)
            finally:
                PyBuffer_Release(&buf)
            if rc < 0:
                raise PcapError(f"pcap_inject on {self.device!r}: {_decode(pcap_geterr(self.s.p))}",
                                device=self.device)
        return rc

    def stop(self) -> None:
        """End iteration soon, from any thread: what was captured is still delivered."""
        cdef uint64_t one = 1
        if ps_load_int(&self.s.stop) == 0:
            ps_store_int(&self.s.stop, STOP_DRAIN)
        if self.s.stop_fd >= 0:
            write(self.s.stop_fd, &one, sizeof(one))

    def close(self) -> None:
        """Stop and release the libpcap handle. Idempotent; safe from another thread (waits
        for the iterating thread to leave libpcap). Batches already delivered stay valid."""
        if self.s.p == NULL:
            return
        self.stop()
        with self._lock, self._handle_lock:
            self._join()  # the partly filled block is still delivered
            self._close_handle()

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return self

    def __next__(self) -> PacketBatch:
        batch = self.next_batch()
        if batch is None:
            raise StopIteration
        return batch

    cdef PacketBatch _pop(self):
        """The oldest sealed block as a batch, or None if none is queued."""
        cdef int b = -1
        pthread_mutex_lock(&self.s.q_mu)
        if self.s.q_len > 0:
            b = self.s.queue[self.s.q_head]
            self.s.q_head = (self.s.q_head + 1) % self.s.nblocks
            self.s.q_len -= 1
        pthread_mutex_unlock(&self.s.q_mu)
        if b < 0:
            return None
        return PacketBatch._from_ring(self._ring, b, self.link_type, self.snaplen, self.device)

    def next_batch(self, timeout=None) -> PacketBatch | None:
        """The next sealed batch; ``None`` at the end (stopped, count reached, end of file).

        :param timeout: seconds to wait; on expiry raises ``TimeoutError`` (None: no limit).
        """
        cdef int64_t deadline = -1
        if timeout is not None:
            t = float(timeout)
            if t != t:
                raise ValueError("timeout must be a number of seconds, not NaN")
            deadline = ps_monotonic_ns() + _seconds_to_ns(max(t, 0.0))
        if self.offline:
            return self._next_offline()
        return self._next_live(deadline, timeout)

    cdef object _next_live(self, int64_t deadline, timeout):
        """Live: take the capture thread's next sealed block, starting the thread on first use.
        Waits on ``ready_fd`` in slices that let Python run signal handlers."""
        cdef int wait_ms, prc, rc
        cdef bint done
        cdef int64_t now
        cdef uint64_t junk
        cdef int idle_ms = 500 if threading.current_thread() is threading.main_thread() else 5000
        cdef CaptureState *s = &self.s
        cdef PacketBatch batch
        if not self._started and not self.eof:
            with self._lock:
                if s.p == NULL:  # closed
                    self.eof = True
                elif not self._started and not ps_load_int(&s.done):
                    rc = pthread_create(&self._thread, NULL, _capture_thread, s)
                    if rc != 0:
                        raise OSError(rc, f"cannot start the capture thread for {self.device!r}: "
                                          f"{strerror(rc).decode()}")
                    self._started = True
        while True:
            done = ps_load_int(&s.done)  # read first: the last block is queued before done is set
            batch = self._pop()
            if batch is not None:
                return batch
            if self.eof:
                return None
            if done:
                self.eof = True
                if s.fail_rc == FAIL_POLL:
                    raise OSError(s.fail_errno, f"poll on {self.device!r}: {strerror(s.fail_errno).decode()}")
                if s.fail_rc < 0:
                    # the interface went away (or the driver failed): what was captured before
                    # it has been delivered
                    raise PcapError(f"pcap_dispatch on {self.device!r}: {_decode(s.fail_msg)}",
                                    code=s.fail_rc, device=self.device)
                return None
            wait_ms = idle_ms
            if deadline >= 0 and not ps_load_int(&s.stop):  # once stopping, the drain is bounded
                now = ps_monotonic_ns()
                if now >= deadline:
                    raise TimeoutError(f"no batch from {self.device!r} within {timeout} s")
                wait_ms = _min_ms(wait_ms, deadline - now)
            with nogil:
                prc = poll_one(s.ready_fd, wait_ms)
                if prc > 0:
                    read(s.ready_fd, &junk, sizeof(junk))
            PyErr_CheckSignals()

    cdef object _next_offline(self):
        """Files: dispatch in this thread until a block is sealed."""
        cdef int rc = 0
        cdef CaptureState *s = &self.s
        cdef PacketBatch batch
        while True:
            batch = self._pop()
            if batch is not None:
                return batch
            if self.eof:
                return None
            with self._lock:
                if not _any_free(s) and (s.p != NULL or s.stash_len):
                    if s.cur >= 0:  # no block to go on with: deliver the partial one now
                        _seal(s)
                        continue
                    raise BufferError(f"reading {self.device!r}: every ring block is held by a batch; "
                                      "release batches (or keep copy()s) to read on")
                if s.p == NULL:  # closed from another thread: deliver what was read (the partly
                    if _unstash(s) != 0:  # filled block, a packet kept aside)
                        s.stash_len = 0
                        s.ring_drops += 1  # (out of memory)
                    if s.cur >= 0:
                        _seal(s)
                    if _queued(s) == 0:
                        self.eof = True
                    continue
                with nogil:
                    rc = _unstash(s)
                    if rc == 0:
                        rc = pcap_dispatch(s.p, -1, _on_packet, <unsigned char *> s)
                    else:
                        s.err = 1
                if s.err:
                    s.err = 0
                    raise MemoryError(f"reading {self.device!r}: cannot allocate a ring block")
                if rc == 0 or (s.max_packets and s.packets >= s.max_packets):
                    _seal(s)
                    self.eof = True
                elif rc == PCAP_ERROR_BREAK and ps_load_int(&s.stop):
                    _seal(s)
                    self.eof = True
                elif rc < 0 and rc != PCAP_ERROR_BREAK:
                    raise FileFormatError(f"reading {self.device!r}: {_decode(pcap_geterr(s.p))}",
                                          path=self.device)
            PyErr_CheckSignals()
