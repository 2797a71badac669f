# Declarations only: the helpers of _compat.h and the constants every extension shares.
# `from pktstream._compat cimport ...` in a .pyx; never redeclare them there.
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from posix.types cimport sigset_t

cdef extern from "_compat.h" nogil:
    enum: PKTSTREAM_DEBUG
    enum: HAVE_PCAP_INIT
    void ps_put_le32(unsigned char *p, uint32_t v)
    uint32_t ps_get_le32(const unsigned char *p)
    uint16_t ps_get_be16(const unsigned char *p)
    uint32_t ps_get_be32(const unsigned char *p)
    int ps_load_int(int *p)
    void ps_store_int(int *p, int v)
    void ps_count(uint64_t *p)
    uint64_t ps_load_u64(uint64_t *p)
    int64_t ps_monotonic_ns()

    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    ctypedef struct pthread_t:
        pass
    int pthread_create(pthread_t *t, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t t, void **ret)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)  # (Cython's posix/ lacks it)

cdef enum:
    RECORD_HEADER = 16  # classic pcap record header: ts_sec, ts_nsec, caplen, wirelen
