"""The streaming path: a sensor's capture threads, compressor and send window, its transports
(TCP/TLS uplink, Kafka), the wire protocol, and the receiver that decodes, writes and acknowledges.

    Sensor (sensor.py) -> SendWindow (sendwindow.py) -> Uplink (uplink.py) | KafkaTransport (kafka.py)
        -> Receiver (receiver.py: server, ingest + commit, outputs, metrics) -> sinks

See docs/ARCHITECTURE.md for the whole data path.
"""
