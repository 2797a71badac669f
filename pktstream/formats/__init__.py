"""Capture file formats: pcap, pcapng and their zstd-compressed forms."""
from pktstream.formats.pcap import PcapWriter, pcap_file_header

__all__ = ["PcapWriter", "pcap_file_header"]
