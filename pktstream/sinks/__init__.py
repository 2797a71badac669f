"""Receiver outputs. Each sink runs in its own thread behind a bounded queue (see receiver.py)."""
from pktstream.sinks.base import Sink, Source
from pktstream.sinks.callback import CallbackSink, IteratorSink
from pktstream.sinks.file import FileSink
from pktstream.sinks.stdout import StdoutSink

__all__ = ["CallbackSink", "FileSink", "IteratorSink", "Sink", "Source", "StdoutSink"]
