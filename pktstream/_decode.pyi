"""Type stubs for the Cython extension ``pktstream._decode`` (see _decode.pyx)."""
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from _typeshed import ReadableBuffer

# numpy arrays are buffers, but their stubs say so (__buffer__) only for Python >= 3.12
_In: TypeAlias = ReadableBuffer | npt.NDArray[Any]

#: (column name, numpy dtype or (dtype, width)) of every column decode_columns() returns
FIELDS: tuple[tuple[str, type[np.generic] | tuple[type[np.generic], int]], ...]

def decode_columns(buf: _In, offsets: _In, caplen: _In,
                   link_type: int) -> dict[str, npt.NDArray[Any]]: ...
