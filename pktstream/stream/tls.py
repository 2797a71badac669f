"""TLS contexts for sensor and receiver (verification on by default; TLS 1.2 minimum)."""
from __future__ import annotations

import logging
import ssl

log = logging.getLogger("pktstream")


def server_context(certfile: str, keyfile: str, *, cafile: str | None = None,
                   client_certs: bool = False) -> ssl.SSLContext:
    """Receiver side. ``client_certs``: require a client certificate signed by ``cafile`` (mTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_certs:
        if not cafile:
            raise ValueError("client certificates (mTLS) need a CA file to verify them against")
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(*, cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None,
                   insecure: bool = False) -> ssl.SSLContext:
    """Sensor side: verifies the receiver's certificate and host name against ``cafile`` or the
    system store, unless ``insecure`` (logged as a warning)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    if insecure:
        log.warning("TLS verification of the receiver is OFF (insecure): anyone on the path can "
                    "impersonate it")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
