"""Capture file formats: pcap, pcapng and their zstd-compressed forms (see docs/FILES.md).

Reading: :func:`read` / :func:`open_reader` (format from the magic bytes; gzip and zstd
compressed files too). Writing: :func:`open_writer` (format from the extension, rotation,
``.part`` then rename), or the single-file :class:`PcapWriter` / :class:`PcapngWriter`.
"""
from pktstream.formats._common import TruncatedFileWarning, dlt_to_linktype, fsync_dir, linktype_to_dlt
from pktstream.formats.pcap import PcapWriter, pcap_file_header
from pktstream.formats.pcapng import PcapngWriter
from pktstream.formats.reader import CaptureReader, InterfaceInfo, SectionInfo, filter_batch, open_reader, read
from pktstream.formats.writer import CaptureWriter, format_from_name, open_writer

__all__ = ["CaptureReader", "CaptureWriter", "InterfaceInfo", "PcapWriter", "PcapngWriter", "SectionInfo",
           "TruncatedFileWarning", "dlt_to_linktype", "filter_batch", "format_from_name", "fsync_dir",
           "linktype_to_dlt", "open_reader", "open_writer", "pcap_file_header", "read"]
