"""Type stubs for the Cython extension ``pktstream._flowtable`` (see _flowtable.pyx)."""
from typing import Any, TypeAlias, final

import numpy.typing as npt
from _typeshed import ReadableBuffer

# numpy arrays are buffers, but their stubs say so (__buffer__) only for Python >= 3.12
_In: TypeAlias = ReadableBuffer | npt.NDArray[Any]

#: size of one flow key in FlowTable.flows()["key"]
KEY_BYTES: int

@final
class FlowTable:
    @property
    def packets(self) -> int: ...
    def __len__(self) -> int: ...
    def add(self, records: _In, count: int, link_type: int, iface: int, chunk: int) -> tuple[int, int, int]: ...
    def flows(self) -> dict[str, bytearray]: ...

def address_texts(addresses: _In, versions: _In) -> tuple[bytearray, bytearray, bytearray, int]: ...
