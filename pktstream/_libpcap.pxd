# Declarations only: the parts of <pcap/pcap.h> that pktstream calls.
from libc.stdint cimport uint32_t, int32_t, uint16_t
from libc.stdio cimport FILE

cdef extern from "<sys/time.h>" nogil:
    ctypedef long time_t
    ctypedef long suseconds_t
    struct timeval:
        time_t tv_sec
        suseconds_t tv_usec

cdef extern from "<stdio.h>" nogil:
    FILE *fmemopen(void *buf, size_t size, const char *mode)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family

cdef extern from "<pcap/pcap.h>" nogil:
    ctypedef struct pcap_t:
        pass
    ctypedef unsigned int bpf_u_int32
    enum:
        PCAP_ERRBUF_SIZE
        PCAP_ERROR
        PCAP_ERROR_BREAK
        PCAP_ERROR_NOT_ACTIVATED
        PCAP_ERROR_ACTIVATED
        PCAP_ERROR_NO_SUCH_DEVICE
        PCAP_ERROR_RFMON_NOTSUP
        PCAP_ERROR_NOT_RFMON
        PCAP_ERROR_PERM_DENIED
        PCAP_ERROR_IFACE_NOT_UP
        PCAP_ERROR_CANTSET_TSTAMP_TYPE
        PCAP_ERROR_PROMISC_PERM_DENIED
        PCAP_ERROR_TSTAMP_PRECISION_NOTSUP
        PCAP_TSTAMP_PRECISION_MICRO
        PCAP_TSTAMP_PRECISION_NANO
        PCAP_IF_LOOPBACK
        PCAP_IF_UP
        PCAP_IF_RUNNING
        PCAP_IF_WIRELESS
        PCAP_IF_CONNECTION_STATUS
        PCAP_IF_CONNECTION_STATUS_CONNECTED
        PCAP_IF_CONNECTION_STATUS_DISCONNECTED
        PCAP_NETMASK_UNKNOWN
        PCAP_CHAR_ENC_UTF_8

    ctypedef enum pcap_direction_t:
        PCAP_D_INOUT
        PCAP_D_IN
        PCAP_D_OUT

    struct pcap_pkthdr:
        timeval ts
        bpf_u_int32 caplen
        bpf_u_int32 len

    struct pcap_stat:
        unsigned int ps_recv
        unsigned int ps_drop
        unsigned int ps_ifdrop

    struct bpf_insn:
        unsigned short code
        unsigned char jt
        unsigned char jf
        unsigned int k
    struct bpf_program:
        unsigned int bf_len
        bpf_insn *bf_insns

    struct pcap_addr:
        pcap_addr *next
        sockaddr *addr
        sockaddr *netmask
        sockaddr *broadaddr
        sockaddr *dstaddr
    ctypedef pcap_addr pcap_addr_t

    struct pcap_if:
        pcap_if *next
        char *name
        char *description
        pcap_addr *addresses
        bpf_u_int32 flags
    ctypedef pcap_if pcap_if_t

    ctypedef void (*pcap_handler)(unsigned char *user, const pcap_pkthdr *h,
                                  const unsigned char *bytes) noexcept nogil

    int pcap_init(unsigned int opts, char *errbuf)
    const char *pcap_lib_version()
    pcap_t *pcap_create(const char *source, char *errbuf)
    int pcap_set_snaplen(pcap_t *p, int snaplen)
    int pcap_set_promisc(pcap_t *p, int promisc)
    int pcap_set_timeout(pcap_t *p, int to_ms)
    int pcap_set_immediate_mode(pcap_t *p, int immediate)
    int pcap_set_buffer_size(pcap_t *p, int buffer_size)
    int pcap_set_tstamp_precision(pcap_t *p, int tstamp_precision)
    int pcap_activate(pcap_t *p)
    pcap_t *pcap_open_offline_with_tstamp_precision(const char *fname, unsigned int precision, char *errbuf)
    pcap_t *pcap_open_dead_with_tstamp_precision(int linktype, int snaplen, unsigned int precision)
    pcap_t *pcap_fopen_offline_with_tstamp_precision(FILE *fp, unsigned int precision, char *errbuf)
    void pcap_close(pcap_t *p)
    int pcap_setnonblock(pcap_t *p, int nonblock, char *errbuf)
    int pcap_get_selectable_fd(pcap_t *p)
    const timeval *pcap_get_required_select_timeout(pcap_t *p)
    int pcap_dispatch(pcap_t *p, int cnt, pcap_handler callback, unsigned char *user)
    void pcap_breakloop(pcap_t *p)
    int pcap_stats(pcap_t *p, pcap_stat *ps)
    int pcap_setdirection(pcap_t *p, pcap_direction_t d)
    int pcap_compile(pcap_t *p, bpf_program *fp, const char *str, int optimize, bpf_u_int32 netmask)
    int pcap_setfilter(pcap_t *p, bpf_program *fp)
    void pcap_freecode(bpf_program *fp)
    int pcap_offline_filter(const bpf_program *fp, const pcap_pkthdr *h, const unsigned char *pkt)
    int pcap_datalink(pcap_t *p)
    int pcap_is_swapped(pcap_t *p)
    const char *pcap_datalink_val_to_name(int dlt)
    const char *pcap_datalink_val_to_description(int dlt)
    int pcap_snapshot(pcap_t *p)
    int pcap_inject(pcap_t *p, const void *buf, size_t size)
    int pcap_findalldevs(pcap_if_t **alldevsp, char *errbuf)
    void pcap_freealldevs(pcap_if_t *alldevs)
    char *pcap_geterr(pcap_t *p)
    const char *pcap_statustostr(int error)
