"""Type stubs for the Cython extension ``pktstream._decode`` (see _decode.pyx)."""
from typing import Any

import numpy as np
import numpy.typing as npt
from _typeshed import ReadableBuffer

#: (column name, numpy dtype or (dtype, width)) of every column decode_columns() returns
FIELDS: tuple[tuple[str, type[np.generic] | tuple[type[np.generic], int]], ...]

def decode_columns(buf: ReadableBuffer, offsets: ReadableBuffer, caplen: ReadableBuffer,
                   link_type: int) -> dict[str, npt.NDArray[Any]]: ...
