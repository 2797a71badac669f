"""The indexed packet archive: capture files + per-file flow records and a catalog (Parquet).

:class:`Archive` opens a directory or ``s3://bucket/prefix``; ``pktstream index|query|flows|sql|serve``
are the commands (:mod:`pktstream.archive.cli`). docs/ARCHIVE.md describes the layout.

The names below load on first use (PEP 562): a ``pktstream query`` answered by a query server
(:mod:`pktstream.archive.wire`) never loads numpy or pyarrow.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pktstream.archive.archive import Archive, parse_time
    from pktstream.archive.index import FileIndexBuilder
    from pktstream.archive.query import QueryStats

__all__ = ["Archive", "FileIndexBuilder", "QueryStats", "parse_time"]

_WHERE = {"Archive": "archive", "parse_time": "archive", "FileIndexBuilder": "index", "QueryStats": "query"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pktstream.archive' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"pktstream.archive.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
