"""Capture-file commands: ``pktstream info|read|convert|merge`` (see docs/FILES.md)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from pktstream._capture import PacketBatch, link_type_name
from pktstream.formats.reader import filter_batch, filter_mixed, open_reader
from pktstream.formats.writer import format_from_name, mixed_link_types, open_writer

_TCP_FLAGS = "FSRP.UEW"  # tcpdump's letters, in bit order (ACK is ".")


class _Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.on = sys.stderr.isatty() and total > 0
        self.total = total
        self.label = label
        self._last = 0.0

    def update(self, done: int) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}%")
        sys.stderr.flush()

    def done(self) -> None:
        """Show the bar full (however fast the work was), then clear the line."""
        if self.on:
            sys.stderr.write(f"\r{self.label} [{'#' * 30}] 100.0%")
            sys.stderr.write("\r" + " " * (len(self.label) + 40) + "\r")
            sys.stderr.flush()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path) if path != "-" else 0
    except OSError:
        return 0


def _source(path: str):
    return sys.stdin.buffer if path == "-" else path


def _bpf(words: list[str]) -> str | None:
    return " ".join(words) or None


def _guard(func):
    """Errors as one line on stderr and exit status 1; a failed output is removed."""
    import functools

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                return 0
            from pktstream.cli import error_line
            print(f"pktstream {args.command}: {error_line(exc)}", file=sys.stderr)
            return 1
    return run


# -- info --------------------------------------------------------------------------------------
@_guard
def cmd_info(args: argparse.Namespace) -> int:
    prog = _Progress(_size(args.file), "reading")
    packets = nbytes = wire = 0
    first = last = None
    out_of_order = False
    per_iface: dict[int, list[int]] = {}
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a read buffer's packets grouped per interface (fast); the order check puts them
        # back in file order by their positions
        held_pos: list = []
        held_ts: list = []
        prev = None  # the last time stamp in file order checked

        def check_order() -> None:
            nonlocal prev, out_of_order
            if not held_ts:
                return
            t = np.concatenate(held_ts)[np.argsort(np.concatenate(held_pos), kind="stable")]
            if prev is not None and int(t[0]) < prev or len(t) > 1 and bool((np.diff(t) < 0).any()):
                out_of_order = True
            prev = int(t[-1])
            held_pos.clear()
            held_ts.clear()

        with open_reader(_source(args.file)) as r:
            rng = None
            for batch in r:
                n = len(batch)
                if r.last_range != rng:
                    check_order()
                    rng = r.last_range
                if not n:
                    continue
                ts = batch.ts_ns
                packets += n
                nbytes += batch.nbytes - 16 * n
                wire += int(batch.wirelen.sum(dtype=np.int64))
                lo, hi = int(ts.min()), int(ts.max())
                held_pos.append(r.last_positions())
                held_ts.append(ts)
                first = lo if first is None else min(first, lo)
                last = hi if last is None else max(last, hi)
                iface = r.batch_interface  # (by index: two interfaces may share a name)
                per_iface.setdefault(iface.index if iface is not None else 0, [0])[0] += n
                prog.update(r.bytes_read)
            check_order()
            prog.done()
            info = {
                "file": args.file, "format": r.format, "compression": r.compression,
                "packets": packets, "bytes": nbytes, "wire_bytes": wire,
                "link_types": [{"dlt": lt, "name": link_type_name(lt)} for lt in r.link_types],
                "first_ts_ns": first, "last_ts_ns": last,
                "duration_ns": (last - first) if first is not None and last is not None else None,
                "chronological": not out_of_order,
                "interfaces": [{"index": i.index, "name": i.name, "link_type": i.link_type,
                                "snaplen": i.snaplen, "tsresol": i.tsresol,
                                "packets": per_iface.get(i.index, [0])[0],
                                **({"description": i.description} if i.description else {})}
                               for i in r.interfaces],
            }
            if r.format == "pcap":
                info["nanosecond"] = r.nanosecond
                info["byte_order"] = r.byte_order
            else:
                info["sections"] = [{"byte_order": s.byte_order, **s.options} for s in r.sections]
    info["warnings"] = [str(w.message) for w in caught]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fmt = lambda t: "n/a" if t is None else (  # noqa: E731
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t // 10**9)) + f".{t % 10**9:09d} UTC")
    lines = [
        ("File name", args.file),
        ("File type", r.format + (f" ({r.compression}-compressed)" if r.compression else "")),
        ("Link types", ", ".join(f"{d['name']} ({d['dlt']})" for d in info["link_types"]) or "none"),
        ("Number of packets", f"{packets}"),
        ("Data size", f"{nbytes} bytes captured, {wire} bytes on the wire"),
        ("First packet time", fmt(first)),
        ("Last packet time", fmt(last)),
        ("Capture duration", "n/a" if first is None or last is None else f"{(last - first) / 1e9:.9f} seconds"),
        ("Chronological", "yes" if not out_of_order else "no"),
        ("Interfaces", ", ".join(f"{i['name']} [{link_type_name(i['link_type'])}, snaplen {i['snaplen']}, "
                                 f"{i['packets']} packets]" for i in info["interfaces"])),
    ]
    for k, v in lines:
        print(f"{k + ':':<20} {v}")
    for w in info["warnings"]:
        print(f"{'Warning:':<20} {w}")
    return 0


# -- read --------------------------------------------------------------------------------------
def _lines(batch: PacketBatch) -> list[str]:
    from pktstream.headers import decode
    d = decode(batch)
    src, dst = d.addresses("src"), d.addresses("dst")
    out = []
    for i in range(len(d)):
        ts = int(d.ts_ns[i])
        t = time.strftime("%H:%M:%S", time.localtime(ts // 10**9)) + f".{ts % 10**9:09d}"
        wl = int(d.wirelen[i])
        v = int(d.ip_version[i])
        vl = f"vlan {d.vlan[i]}, " if d.vlan[i] >= 0 else ""
        if v:
            proto = int(d.proto[i])
            fam = "IP" if v == 4 else "IP6"
            s, t2 = src[i], dst[i]
            if proto in (6, 17, 132) and d.l4_offset[i] >= 0 and not d.truncated[i]:
                s, t2 = f"{s}.{d.sport[i]}", f"{t2}.{d.dport[i]}"
            if proto == 6 and d.l4_offset[i] >= 0 and not d.truncated[i]:
                fl = int(d.tcp_flags[i])
                flags = "".join(c for k, c in enumerate(_TCP_FLAGS) if fl >> k & 1)
                flags = flags or "none"
                rest = f"Flags [{flags}], seq {d.tcp_seq[i]}, length {max(int(d.payload_len[i]), 0)}"
            elif proto == 17 and d.l4_offset[i] >= 0:
                rest = f"UDP, length {max(int(d.payload_len[i]), 0)}"
            elif proto in (1, 58) and d.icmp_type[i] >= 0:
                rest = f"ICMP{'6' if proto == 58 else ''} type {d.icmp_type[i]} code {d.icmp_code[i]}, length {wl}"
            else:
                rest = f"proto {proto}{' (fragment)' if d.frag[i] else ''}, length {wl}"
            out.append(f"{t} {vl}{fam} {s} > {t2}: {rest}")
        else:
            et = int(d.ethertype[i])
            what = {0x0806: "ARP"}.get(et, f"ethertype 0x{et:04x}" if et else link_type_name(batch.link_type))
            out.append(f"{t} {vl}{what}, length {wl}")
    return out


@_guard
def cmd_read(args: argparse.Namespace) -> int:
    words = list(args.bpf)
    while words and words[0] in ("-c", "--count"):  # also accept -c after FILE, as tcpdump does
        if len(words) < 2 or not (words[1].isascii() and words[1].isdigit()):
            raise SystemExit("pktstream read: -c needs a count of packets (a whole number >= 0)")
        args.count = int(words[1])
        words = words[2:]
    args.bpf = words
    left = args.count or -1
    expr = _bpf(args.bpf)
    out = sys.stdout
    import warnings

    from pktstream.exceptions import PcapWarning
    shown = 0
    with warnings.catch_warnings(record=True) as caught, open_reader(_source(args.file), file_order=True) as r:
        warnings.simplefilter("always", PcapWarning)
        batch: PacketBatch | None
        for batch in r:
            if expr:
                batch = filter_batch(batch, expr)
            if left >= 0 and len(batch) > left:
                from pktstream.formats.writer import slice_batch
                batch = slice_batch(batch, 0, left) if left else None
            if batch is None:
                break
            if len(batch):
                out.write("\n".join(_lines(batch)) + "\n")
                shown += len(batch)
                if left >= 0:
                    left -= len(batch)
            if left == 0:
                break
    out.flush()
    for w in caught:  # one clean line each, after the packets (not Python's source-line format)
        print(f"pktstream read: warning: {w.message}; read {shown} packets", file=sys.stderr)
    return 0


# -- convert / merge ---------------------------------------------------------------------------
def _format(path: str, args: argparse.Namespace) -> str:
    return args.format or (format_from_name(path) if path != "-" else None) or "pcap"


def _writer(path: str, args: argparse.Namespace):
    target = sys.stdout.buffer if path == "-" else path
    return open_writer(target, format=_format(path, args), nanosecond=not getattr(args, "micro", False))


@_guard
def cmd_convert(args: argparse.Namespace) -> int:
    expr = _bpf(args.bpf)
    prog = _Progress(_size(args.input), "converting")
    with open_reader(_source(args.input), comments=True, file_order=True, mixed_interfaces=True) as r:
        w = _writer(args.output, args)
        try:
            for batch in r:
                comments: dict[int, str] | None = r.comments
                interfaces = r.batch_interfaces  # (a buffer of interleaved interfaces, written in one pass)
                if expr:
                    batch, comments, interfaces = filter_mixed(batch, expr, comments, interfaces)
                if len(batch):
                    w.write(batch, comments or None, flush=False, interfaces=interfaces)
                prog.update(r.bytes_read)
        except BaseException:
            w.abort()
            raise
        finally:
            prog.done()
        w.close()
    return 0


@_guard
def cmd_merge(args: argparse.Namespace) -> int:
    """Chronological merge as mergecap merges (pktstream.formats.merge): at each step the
    earliest of the inputs' next packets (ties: the last input), so an input that is not itself
    in time order comes out as mergecap writes it."""
    from pktstream.formats.merge import merge
    total = sum(_size(p) for p in args.inputs)
    prog = _Progress(total, "merging")
    if args.inputs.count("-") > 1:
        raise ValueError("only one input can be '-' (stdin)")
    with contextlib.ExitStack() as readers_open:
        readers = [readers_open.enter_context(open_reader(_source(p), comments=True, file_order=True,
                                                          mixed_interfaces=True)) for p in args.inputs]
        known = {i.link_type for r in readers for i in r.interfaces}  # (pcap inputs: from their headers)
        if _format(args.output, args).split(".")[0] == "pcap" and len(known) > 1:  # refused before writing
            raise ValueError(mixed_link_types(known))
        w = _writer(args.output, args)
        try:
            for batch, interfaces, comments in merge(readers):
                w.write(batch, comments or None, flush=False, interfaces=interfaces)
                prog.update(sum(r.bytes_read for r in readers))
            w.close()
        except BaseException:
            w.abort()
            raise
        finally:
            prog.done()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from pktstream.cli import subparser
    p = subparser(sub, "info", help="summary of a capture file (like capinfos)",
                  epilog="examples:\n  pktstream info capture.pcapng\n"
                         "  pktstream info --json cap.pcapng.zst | jq .packets")
    p.add_argument("file", help="pcap, pcapng, .zst or .gz file ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = subparser(sub, "read", help="print one line per packet (like tcpdump -r)",
                  epilog="examples:\n  pktstream read capture.pcapng -c 10\n  pktstream read cap.pcap.zst tcp port 443")
    p.add_argument("file", help="pcap, pcapng, .zst or .gz file ('-' for stdin)")
    p.add_argument("-c", "--count", type=int, default=0, help="stop after COUNT packets")
    p.add_argument("bpf", nargs=argparse.REMAINDER, help="BPF filter expression (the last words)")
    p.set_defaults(func=cmd_read)

    p = subparser(sub, "convert", help="convert between pcap, pcapng and .zst (format from OUT's extension)",
                  epilog="examples:\n  pktstream convert capture.pcapng capture.pcap\n"
                         "  pktstream convert big.pcapng dns.pcapng.zst udp port 53")
    p.add_argument("input", help="capture file to read ('-' for stdin)")
    p.add_argument("output", help="output file ('-' for stdout)")
    p.add_argument("-F", "--format", choices=("pcap", "pcapng", "pcap.zst", "pcapng.zst"),
                   help="output format (default: from OUT's extension)")
    p.add_argument("--micro", action="store_true", help="pcap: microsecond timestamps")
    p.add_argument("bpf", nargs="*", help="only packets matching this BPF filter")
    p.set_defaults(func=cmd_convert)

    p = subparser(sub, "merge", help="merge capture files chronologically (like mergecap)",
                  epilog="examples:\n  pktstream merge all.pcapng by-sensor/*.pcap.zst")
    p.add_argument("output", help="file to write ('-' for stdout); format from its extension")
    p.add_argument("inputs", nargs="+", help="capture files to merge")
    p.add_argument("-F", "--format", choices=("pcap", "pcapng", "pcap.zst", "pcapng.zst"),
                   help="output format (default: from OUTPUT's extension)")
    p.add_argument("--micro", action="store_true", help="pcap: microsecond timestamps")
    p.set_defaults(func=cmd_merge)
