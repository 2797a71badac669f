"""Decoded packet headers as numpy columns, flow summaries, pandas export.

``pktstream.decode(batch)`` (or an iterable of batches) runs one C loop per batch
(``pktstream._decode``) and returns a :class:`Decoded` whose attributes are numpy arrays, one
entry per packet (field list in docs/FILES.md). Addresses are 16-byte rows: IPv6 as is,
IPv4 as IPv4-mapped IPv6 (``::ffff:a.b.c.d``); ``src4``/``dst4`` give IPv4 as uint32.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import numpy as np

from pktstream._capture import PacketBatch
from pktstream._decode import FIELDS, decode_columns

__all__ = ["Decoded", "Flows", "decode"]

COLUMNS = ("ts_ns", "wirelen", "caplen", "link_type") + tuple(name for name, _ in FIELDS)


class Decoded:
    """Per-packet header fields as numpy arrays (attributes named as in ``COLUMNS``)."""

    def __init__(self, cols: dict[str, np.ndarray]) -> None:
        self.columns = cols

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["columns"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return len(self.columns["ts_ns"])

    def __repr__(self) -> str:
        return f"<Decoded {len(self)} packets>"

    @property
    def src4(self) -> np.ndarray:
        """IPv4 source as uint32 (host order value of the dotted quad), 0 when not IPv4."""
        return _v4(self.src, self.ip_version)

    @property
    def dst4(self) -> np.ndarray:
        return _v4(self.dst, self.ip_version)

    def address(self, i: int, which: str = "src") -> str | None:
        """Packet ``i``'s source or destination address as text (None when not IP)."""
        v = int(self.ip_version[i])
        row = getattr(self, which)[i]
        if v == 4:
            return str(ipaddress.IPv4Address(bytes(row[12:])))
        if v == 6:
            return str(ipaddress.IPv6Address(bytes(row)))
        return None

    def addresses(self, which: str = "src") -> np.ndarray:
        """All source (or destination) addresses as an object array of text (None when not IP)."""
        rows = getattr(self, which)
        ver = self.ip_version
        out = np.full(len(self), None, dtype=object)
        cache: dict[bytes, str] = {}
        for i in np.flatnonzero(ver).tolist():
            key = rows[i].tobytes()
            text = cache.get(key)
            if text is None:
                text = cache[key] = (str(ipaddress.IPv4Address(key[12:])) if ver[i] == 4
                                     else str(ipaddress.IPv6Address(key)))
            out[i] = text
        return out

    def flows(self) -> Flows:
        """Summary per 5-tuple (src, dst, sport, dport, proto) of IP packets (one direction each)."""
        ip = np.flatnonzero(self.ip_version)
        n = len(ip)
        key = np.empty((n, 37), dtype=np.uint8)
        key[:, 0:16] = self.src[ip]
        key[:, 16:32] = self.dst[ip]
        key[:, 32:34] = self.sport[ip].astype(">u2").view(np.uint8).reshape(n, 2)
        key[:, 34:36] = self.dport[ip].astype(">u2").view(np.uint8).reshape(n, 2)
        key[:, 36] = self.proto[ip]
        uniq, first_idx, inv = np.unique(key.view("V37").ravel(), return_index=True, return_inverse=True)
        inv = inv.ravel()
        m = len(uniq)
        ts = self.ts_ns[ip]
        wl = self.wirelen[ip].astype(np.int64)
        packets = np.bincount(inv, minlength=m)
        nbytes = np.bincount(inv, weights=wl, minlength=m).astype(np.int64)
        first = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
        last = np.full(m, np.iinfo(np.int64).min, dtype=np.int64)
        np.minimum.at(first, inv, ts)
        np.maximum.at(last, inv, ts)
        sel = ip[first_idx]
        cols = {"ip_version": self.ip_version[sel], "src": self.src[sel], "dst": self.dst[sel],
                "sport": self.sport[sel], "dport": self.dport[sel], "proto": self.proto[sel],
                "packets": packets, "bytes": nbytes, "first_ts_ns": first, "last_ts_ns": last}
        order = np.argsort(first, kind="stable")
        return Flows({k: v[order] for k, v in cols.items()})

    def to_pandas(self, *, addresses: bool = True):
        """A pandas DataFrame, one row per packet; addresses as text when ``addresses``."""
        import pandas as pd
        data = {}
        for name, col in self.columns.items():
            if col.ndim == 2:
                if addresses:
                    data[name] = self.addresses(name)
                continue
            data[name] = col
        df = pd.DataFrame(data)
        if "ts_ns" in df:  # per-packet tables (a flow table has first/last_ts_ns instead)
            df["time"] = pd.to_datetime(df["ts_ns"], unit="ns", utc=True)
        return df


class Flows(Decoded):
    """One row per 5-tuple: ip_version, src, dst, sport, dport, proto, packets, bytes
    (wire bytes), first_ts_ns, last_ts_ns; ordered by first packet."""

    def __len__(self) -> int:
        return len(self.columns["packets"])

    def __repr__(self) -> str:
        return f"<Flows {len(self)} flows>"

    def flows(self):  # pragma: no cover - a flow table has no flows of its own
        raise TypeError("already a flow table")



def _v4(rows: np.ndarray, ver: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(rows[:, 12:16]).view(">u4").ravel().astype(np.uint32)
    out[ver != 4] = 0
    return out


def _decode_one(batch: PacketBatch) -> dict[str, np.ndarray]:
    cols = decode_columns(memoryview(batch), batch.offset, batch.caplen, batch.link_type)
    cols["ts_ns"] = batch.ts_ns
    cols["wirelen"] = batch.wirelen
    cols["caplen"] = batch.caplen
    cols["link_type"] = np.full(len(batch), batch.link_type, dtype=np.int32)
    return cols


def decode(batches: PacketBatch | Iterable[PacketBatch]) -> Decoded:
    """Decode the headers of a batch (or of several, concatenated) into numpy columns."""
    if isinstance(batches, PacketBatch):
        parts = [_decode_one(batches)]
    else:
        parts = [_decode_one(b) for b in batches]
    if not parts:
        parts = [_decode_one(PacketBatch.from_records(b"", link_type=1))]
    if len(parts) == 1:
        cols = parts[0]
    else:
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Decoded({k: cols[k] for k in COLUMNS})
