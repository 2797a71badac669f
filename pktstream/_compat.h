/* Tiny C helpers for the Cython core: little-endian record fields, atomics, clocks, locks.
 * Declared once for Cython in _compat.pxd (cimport it; do not redeclare in a .pyx). */
#ifndef PKTSTREAM_COMPAT_H
#define PKTSTREAM_COMPAT_H
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifndef PKTSTREAM_DEBUG
#define PKTSTREAM_DEBUG 0
#endif
#ifndef HAVE_PCAP_INIT
#define HAVE_PCAP_INIT 0
#endif

static inline void ps_put_le32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}
static inline uint32_t ps_get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint16_t ps_get_be16(const unsigned char *p) {
    return (uint16_t)(((uint16_t)p[0] << 8) | p[1]);
}
static inline uint32_t ps_get_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
/* Block states are shared between the capture thread and whoever releases a batch. */
static inline int ps_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ps_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* Allocation counters (always compiled in: one atomic add per block/buffer, never per packet). */
static inline void ps_count(uint64_t *p) { __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
static inline uint64_t ps_load_u64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline int64_t ps_monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}
#endif
