"""Type stubs for the Cython extension ``pktstream._records`` (see _records.pyx).

Buffers are C-contiguous (``[::1]``); ``walk`` results are ``(status, pos, count, out)``."""
from _typeshed import ReadableBuffer, WriteableBuffer

#: walk status codes: "more", "block", "bad_length", "bad_iface", "options", "full"
STATUS: dict[str, int]

def pcap_walk(src: ReadableBuffer, start: int, end: int, swap: bool, usec: bool, max_caplen: int,
              dst: WriteableBuffer | None = None, max_packets: int = -1) -> tuple[int, int, int, int]: ...
def pcapng_walk(src: ReadableBuffer, start: int, end: int, swap: bool, if_ups: ReadableBuffer,
                if_mult: ReadableBuffer, if_offset: ReadableBuffer, if_snaplen: ReadableBuffer,
                max_block: int, dst: WriteableBuffer, dst_pos: int, ifaces: WriteableBuffer,
                count0: int, stop_on_options: bool) -> tuple[int, int, int, int]: ...
def take_records(src: ReadableBuffer, length: int, keys: ReadableBuffer,
                 key: int) -> tuple[bytearray, int]: ...
def take_mask(src: ReadableBuffer, offsets: ReadableBuffer, caplen: ReadableBuffer,
              mask: ReadableBuffer) -> tuple[bytearray, int]: ...
def ns_to_us(src: ReadableBuffer, length: int) -> bytearray: ...
def records_to_epb(src: ReadableBuffer, length: int, iface: int) -> bytearray: ...
