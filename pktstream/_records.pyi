"""Type stubs for the Cython extension ``pktstream._records`` (see _records.pyx).

Buffers are C-contiguous (``[::1]``); ``walk`` results are ``(status, pos, count, out)``."""
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from _typeshed import ReadableBuffer, WriteableBuffer

# numpy arrays are buffers, but their stubs say so (__buffer__) only for Python >= 3.12
_In: TypeAlias = ReadableBuffer | npt.NDArray[Any]
_Out: TypeAlias = WriteableBuffer | npt.NDArray[Any]

#: walk status codes: "more", "block", "bad_length", "bad_iface", "options", "full"
STATUS: dict[str, int]

def pcap_walk(src: _In, start: int, end: int, swap: bool, usec: bool, max_caplen: int,
              dst: _Out | None = None, max_packets: int = -1, ts_out: _Out | None = None,
              caplen_out: _Out | None = None, wirelen_out: _Out | None = None,
              offset_out: _Out | None = None, snapshot: int = 0xFFFFFFFF) -> tuple[int, int, int, int]: ...
def pcapng_walk(src: _In, start: int, end: int, swap: bool, if_ups: _In,
                if_mult: _In, if_offset: _In, if_snaplen: _In,
                max_block: int, dst: _Out, dst_pos: int, ifaces: _Out,
                count0: int, stop_on_options: bool) -> tuple[int, int, int, int]: ...
def take_records(src: _In, length: int, keys: _In,
                 key: int) -> tuple[bytearray, int]: ...
def take_mask(src: _In, offsets: _In, caplen: _In,
              mask: _In) -> tuple[bytearray, int]: ...
def ns_to_us(src: _In, length: int) -> bytearray: ...
def new_buffer(nbytes: int) -> bytearray: ...
def buffer_exported(buf: bytearray) -> bool: ...
def records_to_epb(src: _In, length: int, iface: int,
                   offsets: npt.NDArray[np.int64] | None = None) -> bytearray: ...
def merge_heads(stamps: list[Any], pos: _Out) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
def gather_records(sources: list[Any], offsets: list[Any], caplens: list[Any], which: _In,
                   index: _In) -> tuple[bytearray, int]: ...
def records_to_epb_ids(src: _In, length: int, ifaces: _In,
                       offsets: npt.NDArray[np.int64] | None = None) -> bytearray: ...
