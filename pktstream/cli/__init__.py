"""Command line: pktstream capture|sensor|receiver|info|read|convert|merge|demo."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import pktstream


def _version_text() -> str:
    return (f"pktstream {pktstream.__version__}\n{pktstream.libpcap_version()}\n"
            f"zstd {pktstream.zstd_version()}")


class StopOnSignals:
    """Route SIGINT/SIGTERM to a stop callback while active (restores old handlers)."""

    def __init__(self, stop) -> None:
        self._stop = stop
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, lambda *_: self._stop())
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def cmd_capture(args: argparse.Namespace) -> int:
    """tcpdump-like local capture into a nanosecond pcap file, summary on stderr."""
    from pktstream.formats.pcap import PcapWriter

    if args.interface == "list" or args.list_interfaces:
        for i, itf in enumerate(pktstream.list_interfaces(), 1):
            flags = ",".join(n for n, on in (("Up", itf.up), ("Running", itf.running),
                                              ("Loopback", itf.loopback)) if on)
            addrs = " ".join(a.address for a in itf.addresses)
            print(f"{i}.{itf.name} [{flags}] {addrs}".rstrip())
        return 0
    if not args.interface:
        print("pktstream capture: -i IFACE is required (see -D for the list)", file=sys.stderr)
        return 2
    cap = pktstream.Capture(args.interface, snaplen=args.snaplen, promisc=not args.no_promisc,
                            immediate=args.immediate, buffer_bytes=args.buffer_size * 1024,
                            direction=args.direction, bpf=" ".join(args.bpf) or None,
                            count=args.count, max_wait=args.max_wait)
    out = None
    if args.write:
        out = PcapWriter(sys.stdout.buffer if args.write == "-" else args.write,
                         link_type=cap.link_type, snaplen=cap.snaplen, atomic=False)
    where = f"writing {args.write}" if args.write else "printing packets"
    print(f"pktstream: listening on {args.interface}, link-type {cap.link_type_name}, "
          f"snapshot length {cap.snaplen} bytes, {where}", file=sys.stderr)
    timer = None
    if args.duration:
        import threading
        timer = threading.Timer(args.duration, cap.stop)
        timer.daemon = True
        timer.start()
    try:
        with StopOnSignals(cap.stop):
            for batch in cap:
                if out is not None:
                    out.write(batch)
                    if args.write == "-":
                        out.flush()
                else:
                    for ts, caplen, wirelen in zip(batch.ts_ns.tolist(), batch.caplen.tolist(),
                                                   batch.wirelen.tolist()):
                        t = time.strftime("%H:%M:%S", time.localtime(ts // 10**9))
                        print(f"{t}.{ts % 10**9:09d} {args.interface} length {wirelen} (captured {caplen})")
                batch.release()
        stats = cap.stats()
    finally:
        if timer is not None:
            timer.cancel()
        if out is not None:
            out.close()
        cap.close()
    print(f"{stats['packets']} packets captured\n"
          f"{stats['kernel_received']} packets received by filter\n"
          f"{stats['kernel_dropped']} packets dropped by kernel\n"
          f"{stats['interface_dropped']} packets dropped by interface\n"
          f"{stats['ring_drops']} packets dropped by pktstream (ring full)", file=sys.stderr)
    return 0


_DESCRIPTION = """\
Capture network traffic with libpcap, stream it from sensors to a receiver, read and write
pcap/pcapng/.zst capture files. 'pktstream COMMAND --help' shows a command's options and examples."""

_EPILOG = """\
examples:
  pktstream capture -i eth0 -w out.pcap -c 1000 tcp port 80
  pktstream receiver --listen 0.0.0.0:8081 --auth-key-file key -w capture.pcapng --status
  pktstream sensor --receiver 10.0.0.5:8081 --auth-key-file key -i eth0 --sensor-id web-1
  pktstream info capture.pcapng
  pktstream read capture.pcapng -c 10 tcp

documentation: README.md and docs/ (CONFIGURATION.md lists every option and YAML key)"""

CAPTURE_EPILOG = """\
examples:
  pktstream capture -D                                  # list interfaces
  pktstream capture -i eth0 -w out.pcap -c 1000 tcp port 80
  pktstream capture -i eth0 -w - udp port 53 | tshark -r -
  pktstream capture -i any --duration 10                # print one line per packet for 10 s"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows "(default: X)" where an option has a default
    its help text does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS, [])
                and action.option_strings and action.nargs != 0):
            text += f" (default: {action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (what is wrong, and where help is), not the whole usage."""

    def error(self, message: str):  # type: ignore[override,unused-ignore]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def subparser(sub: argparse._SubParsersAction, name: str, *, help: str, epilog: str | None = None,
              **kw) -> argparse.ArgumentParser:
    """A subcommand parser with pktstream's help layout (description = help, examples epilog)."""
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                       epilog=epilog, formatter_class=HelpFormatter, **kw)
    p.set_defaults(_parser=p)  # (an unknown option is reported by the command's parser: its --help)
    return p


_ARCHIVE_COMMANDS = {"index", "query", "flows", "sql", "serve"}  # parsed without loading the other commands
_STREAM_COMMANDS = {"sensor", "receiver"}  # likewise: a sensor starts without numpy (cli/files.py needs it)


def build_parser(only_archive: bool = False, only_command: str | None = None) -> argparse.ArgumentParser:
    """The command line parser. ``only_command`` (``"capture"``, ``"sensor"``, ``"receiver"``)
    registers that command alone, without importing the modules of the others: faster start-up
    and no numpy in a sensor (tests/test_startup.py). ``only_archive``: the archive commands."""
    parser = _Parser(prog="pktstream", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version_text())
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only_archive:  # pktstream query ... starts fast (docs/ARCHIVE.md)
        from pktstream.archive import cli as archive_cli
        archive_cli.register(sub)
        return parser
    if only_command in _STREAM_COMMANDS:
        from pktstream.cli import stream as cli_stream
        cli_stream.register(sub)
        return parser

    p = subparser(sub, "capture", help="capture locally into a pcap file (like tcpdump -w)",
                  epilog=CAPTURE_EPILOG)
    p.add_argument("-i", "--interface", help="interface to capture on")
    p.add_argument("-D", "--list-interfaces", action="store_true", help="list interfaces and exit")
    p.add_argument("-w", "--write", metavar="FILE",
                   help="pcap file to write ('-' for stdout); like tcpdump -w, an existing FILE is replaced")
    p.add_argument("-c", "--count", type=int, default=0, help="stop after COUNT packets (0: no limit)")
    p.add_argument("-s", "--snaplen", type=int, default=262144, help="bytes kept per packet")
    p.add_argument("-B", "--buffer-size", type=int, default=32768, help="kernel buffer in KiB")
    p.add_argument("-p", "--no-promisc", action="store_true", help="do not use promiscuous mode")
    p.add_argument("-Q", "--direction", choices=("in", "out", "inout"), default="inout",
                   help="capture packets received (in), sent (out) or both (inout, the default)")
    p.add_argument("--immediate", action="store_true", help="libpcap immediate mode")
    p.add_argument("--max-wait", type=float, default=0.2, metavar="SEC", help="seal a batch after SEC (default 0.2)")
    p.add_argument("--duration", type=float, help="stop after SEC seconds")
    p.add_argument("bpf", nargs="*", help="BPF filter expression (the last words, as tcpdump takes them)")
    p.set_defaults(func=cmd_capture)

    if only_command != "capture":
        _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Commands implemented in their own modules register themselves here."""
    from pktstream.archive import cli as archive_cli
    from pktstream.cli import demo, files as cli_files, stream as cli_stream
    for mod in (cli_files, cli_stream, demo, archive_cli):
        mod.register(sub)


def error_line(exc: BaseException) -> str:
    """One line for an error: OSError's errno tuple and socket errors made readable."""
    import socket
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, pktstream.PktstreamError):
        where = exc.filename if exc.filename is not None else None
        return f"{where}: {exc.strerror}" if where else exc.strerror[:1].lower() + exc.strerror[1:]
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    if first is None and "--version" in words and not {"-h", "--help"} & set(words):
        print(_version_text())  # what argparse's version action prints, without building the parser
        return 0
    whole = {"-h", "--help"} & set(words[:1])
    parser = build_parser(only_archive=first in _ARCHIVE_COMMANDS and not whole,
                          only_command=first if first in _STREAM_COMMANDS | {"capture"} and not whole else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    import logging
    import warnings

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"pktstream {args.command}: warning: {message}", file=sys.stderr)
    warnings.showwarning = one_line  # no source path and code line from library warnings
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose
                        else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except (pktstream.PktstreamError, OSError, ValueError, OverflowError) as exc:
        # bad input or an environment problem: one line (-vv shows the traceback)
        if args.verbose > 1:
            raise
        print(f"pktstream {args.command}: {error_line(exc)}", file=sys.stderr)
        return 1


_FAST_EXIT_COMMANDS = {"query"}  # read-only: nothing is left to clean up once its output is closed


def run() -> None:
    """The ``pktstream`` executable: :func:`main`, in a process of its own.

    Two things a library must not do to its host process, an executable may: OpenBLAS's
    thread pool is limited to one thread before numpy loads (pktstream does no linear
    algebra; the pool's start-up is ~0.05 s of wall and ~0.15 s of CPU per command on 2
    cores), unless the user set ``OPENBLAS_NUM_THREADS``; and a ``query`` ends with
    ``os._exit`` once its output is flushed (the interpreter's teardown of numpy and pyarrow
    is ~0.04 s, a seventh of the command)."""
    import os
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    words = sys.argv[1:]
    code = main()
    if next((w for w in words if not w.startswith("-")), None) in _FAST_EXIT_COMMANDS:
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
        except (BrokenPipeError, OSError):
            sys.exit(code)  # the normal exit reports what it can
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
