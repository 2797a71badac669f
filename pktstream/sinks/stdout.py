"""A pcap stream on stdout (logs go to stderr), for ``| tshark -r -`` or ``| tcpdump -r -``."""
from __future__ import annotations

import logging
import sys
from typing import BinaryIO

from pktstream._capture import PacketBatch
from pktstream.formats.pcap import pcap_file_header
from pktstream.sinks.base import Sink, Source

log = logging.getLogger("pktstream.stream.receiver")


class StdoutSink(Sink):
    """Nanosecond pcap on a binary stream. A pcap stream has one link type: batches of another
    link type are dropped and counted (``mismatched_packets``)."""

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None, *, gate: bool = True, snaplen: int = 262144) -> None:
        self.stream = stream or sys.stdout.buffer
        self.gate = gate
        self.snaplen = snaplen
        self.link_type: int | None = None
        self.mismatched_packets = 0

    def write(self, source: Source, batch: PacketBatch) -> None:
        if self.link_type is None:
            self.link_type = batch.link_type
            # the header's snap length is at least the packets' (readers cut longer records)
            self.stream.write(pcap_file_header(batch.link_type, max(self.snaplen, batch.snaplen)))
        if batch.link_type != self.link_type:
            if not self.mismatched_packets:
                log.warning("stdout: dropping packets of link type %d from %s (stream is %d)",
                            batch.link_type, source.name, self.link_type)
            self.mismatched_packets += len(batch)
            return
        self.stream.write(batch)

    def flush(self) -> None:
        self.stream.flush()
        return None

    def close(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass
