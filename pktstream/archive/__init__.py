"""The indexed packet archive: capture files + per-file flow records and a catalog (Parquet).

:class:`Archive` opens a directory or ``s3://bucket/prefix``; ``pktstream index|query|flows|sql``
are the commands (:mod:`pktstream.archive.cli`). docs/ARCHIVE.md describes the layout.
"""
from pktstream.archive.archive import Archive, parse_time
from pktstream.archive.index import FileIndexBuilder
from pktstream.archive.query import QueryStats

__all__ = ["Archive", "FileIndexBuilder", "QueryStats", "parse_time"]
