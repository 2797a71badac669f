"""``pktstream index|query|flows|sql``: the archive commands (docs/ARCHIVE.md).

Imports stay lazy: ``pktstream query`` loads pyarrow and the reader only when it runs, and
never pandas (see :class:`_NoPandas`); ``pktstream.cli`` parses these commands without loading
the others.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


class _Bar:
    """A progress bar on stderr: on a terminal, or always with ``--progress``."""

    def __init__(self, on: bool, label: str) -> None:
        self.on = on
        self.label = label
        self._last = 0.0

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.on or total <= 0:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = min(done / total, 1.0)
        name = os.path.basename(what)[-30:]
        sys.stderr.write(f"\r{self.label} [{'#' * int(frac * 30):<30}] {frac * 100:5.1f}% {name:<30}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


class _NoPandas:
    """Import hook refusing modules these commands never need and pyarrow imports when it can:
    pandas (at pyarrow's first conversion, 0.5-1 s) and, with ``cloud_fs``, the Azure, GCS,
    HDFS and S3 filesystems ``pyarrow.parquet`` pulls in through ``pyarrow.fs`` (~40 ms;
    pyarrow.fs catches the ImportError; the archive reads S3 with boto3)."""

    _FS = ("pyarrow._azurefs", "pyarrow._gcsfs", "pyarrow._hdfs", "pyarrow._s3fs")

    def __init__(self, cloud_fs: bool) -> None:
        self.cloud_fs = cloud_fs

    def find_spec(self, name: str, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not used by the pktstream archive commands")
        if self.cloud_fs and name in self._FS:
            raise ImportError(f"{name} is not used by the pktstream archive commands")
        return None


def _server_timeout(text: str) -> float:
    """--server-timeout: seconds, at least two heartbeats, at most a day (argparse's error otherwise)."""
    from pktstream.archive.wire import MIN_IDLE_TIMEOUT_S
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not MIN_IDLE_TIMEOUT_S <= v <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: give {MIN_IDLE_TIMEOUT_S:g} .. 86400 seconds "
                                         "(the server's heartbeat comes every second)")
    return v


def _lean(cloud_fs: bool = True) -> None:
    """Keep the command's imports to what it uses (called before anything imports pyarrow)."""
    if "pandas" not in sys.modules and not any(isinstance(f, _NoPandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas(cloud_fs and "pyarrow.fs" not in sys.modules))


def _fail(cmd: str, exc: BaseException) -> int:
    from pktstream.cli import error_line
    print(f"pktstream {cmd}: {error_line(exc)}", file=sys.stderr)
    return 1


def _errors():
    from pktstream.exceptions import PktstreamError
    return (PktstreamError, OSError, ValueError, ImportError)


def cmd_index(args: argparse.Namespace) -> int:
    _lean()
    from pktstream.archive import Archive
    bar = _Bar(args.progress or sys.stderr.isatty(), "indexing")
    status = 0
    groups: dict[str, list[str] | None] = {}
    for p in args.paths:
        if p.startswith("s3://") or os.path.isdir(p):
            groups[p] = None
        elif os.path.isfile(p):
            root = args.archive or os.path.dirname(os.path.abspath(p))
            rel = os.path.relpath(os.path.abspath(p), os.path.abspath(root)).replace(os.sep, "/")
            if rel.startswith("../"):
                print(f"pktstream index: {p}: not inside the archive {root}", file=sys.stderr)
                status = 1
                continue
            if root not in groups:
                groups[root] = []
            listed = groups[root]
            if listed is not None:  # None: the whole archive is indexed anyway
                listed.append(rel)
        else:
            print(f"pktstream index: {p}: no such file or directory", file=sys.stderr)
            status = 1
    for root, paths in groups.items():
        try:
            res = Archive(root).index(paths, force=args.force, progress=bar)
        except _errors() as exc:
            bar.done()
            status = _fail("index", exc)
            continue
        bar.done()
        for line in res["problems"]:
            print(f"pktstream index: warning: {line}", file=sys.stderr)
        print(f"{root}: {res['indexed']} indexed, {res['current']} already current, {res['upgraded']} upgraded "
              f"(address filter added), {res['removed']} removed (file gone), {res['damaged']} damaged or "
              f"truncated; {res['seconds']:.2f} s", file=sys.stderr)
    return status


def cmd_query(args: argparse.Namespace) -> int:
    bpf = " ".join(args.bpf) or None
    warned: set[str] = set()  # (a server's warnings before a fallback are not printed twice)

    def warn(message: str) -> None:
        if message not in warned:
            warned.add(message)
            print(f"pktstream query: warning: {message}", file=sys.stderr)
    if args.write != "-" and "%" in args.write:  # strftime fields, as the writer expands them (by the server too)
        args.write = time.strftime(args.write)
    d = os.path.dirname(args.write) or "."
    if args.write != "-" and not os.path.isdir(d):  # (before reading the archive)
        return _fail("query", FileNotFoundError(2, f"directory {d} does not exist", args.write))
    if not args.no_server:
        status = _query_by_server(args, bpf, warn)
        if status is not None:
            return status
    _lean()
    from pktstream.archive import Archive
    out = sys.stdout.buffer if args.write == "-" else args.write
    try:
        stats = Archive(args.archive).write(
            out, bpf, since=args.since, until=args.until, sensor=args.sensor or None, warn=warn)
    except _errors() as exc:
        return _fail("query", exc)
    print(f"pktstream query: {stats.summary()}", file=sys.stderr)
    for s in stats.scanned:
        print(f"pktstream query: scanned {s}", file=sys.stderr)
    return 0


def _query_by_server(args: argparse.Namespace, bpf: str | None, warn: Any) -> int | None:
    """Run the query on the archive's query server (``pktstream serve``); None when there is
    none (or it may not be used) and the query runs here; with ``--server`` every such case
    is an error instead."""
    from pktstream.archive import wire
    path = args.server or wire.default_socket(args.archive)
    if path is None or (not args.server and not os.path.exists(path)):
        return None
    to_stdout = args.write == "-"
    part = f"{args.write}.part"  # renamed when complete, as the writer does
    out: Any = None
    try:
        out = sys.stdout.buffer if to_stdout else os.fdopen(  # (unbuffered: a data frame is 256 KiB)
            os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640), "wb", buffering=0)
        reply = wire.query(path, out, bpf=bpf, since=args.since, until=args.until, sensor=args.sensor or None,
                           fmt=wire.output_format(args.write), archive=args.archive, warn=warn,
                           idle_timeout_s=args.server_timeout)
        out.flush()
        if not to_stdout:
            out.close()
            os.replace(part, args.write)
    except (wire.ServerUnavailable, PermissionError) as exc:
        _discard(None if to_stdout else out, part)
        if args.server:
            return _fail("query", exc)
        from pktstream.cli import error_line
        print(f"pktstream query: warning: {error_line(exc)}; querying directly (--no-server: always)",
              file=sys.stderr)
        return None
    except BaseException as exc:
        _discard(None if to_stdout else out, part)
        if isinstance(exc, (OSError, ValueError)):
            return _fail("query", exc)
        raise  # (KeyboardInterrupt: the file is gone, as a direct query's would be)
    print(f"pktstream query: {reply.summary} (by the query server)", file=sys.stderr)
    for s in reply.scanned:
        print(f"pktstream query: scanned {s}", file=sys.stderr)
    return 0


def _discard(out: Any, part: str) -> None:
    """Close and remove an unfinished output file (``out`` None: stdout, nothing to remove)."""
    if out is None:
        return
    try:
        out.close()
    except OSError:
        pass  # (e.g. no space left for the buffer's rest: the file goes anyway)
    finally:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass


def cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from pktstream.archive.service import QueryServer
    from pktstream.cli import StopOnSignals
    _lean()
    try:
        mode = int(args.socket_mode, 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        return _fail("serve", ValueError(f"--socket-mode {args.socket_mode!r}: octal permission bits such as 600"))
    stop = threading.Event()
    try:
        server = QueryServer(args.archive, args.socket, socket_mode=mode)
        server.start()
    except _errors() as exc:
        return _fail("serve", exc)
    with StopOnSignals(stop.set):
        print(f"pktstream serve: answering queries of {args.archive} on {server.socket_path}",
              file=sys.stderr, flush=True)
        server.serve_until(stop)
    return 0


def cmd_flows(args: argparse.Namespace) -> int:
    _lean()
    from pktstream.archive import Archive
    bpf = " ".join(args.filter) or None
    try:
        table = Archive(args.archive).flows(bpf, since=args.since, until=args.until, sensor=args.sensor or None)
    except _errors() as exc:
        return _fail("flows", exc)
    cols = ["sensor", "interface", "src", "sport", "dst", "dport", "proto", "first_ts_ns", "last_ts_ns",
            "packets", "bytes", "tcp_flags", "vlan", "file"]
    table = table.select([c for c in cols if c in table.column_names])
    _emit(table, args.format, args.output)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    _lean(cloud_fs=False)  # DuckDB may want pyarrow's filesystems
    from pktstream.archive import Archive
    try:
        table = Archive(args.archive).sql(args.query)
    except _errors() as exc:
        return _fail("sql", exc)
    except Exception as exc:  # duckdb's errors (syntax, binder): one line
        return _fail("sql", ValueError(str(exc)))
    _emit(table, args.format, args.output)
    return 0


def _emit(table, fmt: str, output: str | None) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq
        if not output or output == "-":
            pq.write_table(table, sys.stdout.buffer)
        else:
            pq.write_table(table, output)
        return
    out = open(output, "w", newline="") if output and output != "-" else sys.stdout
    try:
        rows = table.to_pylist()
        names = table.column_names
        if fmt == "json":
            import json
            for r in rows:
                out.write(json.dumps(r, default=str) + "\n")
        elif fmt == "csv":
            import csv
            w = csv.writer(out)
            w.writerow(names)
            for r in rows:
                w.writerow(["" if r[c] is None else r[c] for c in names])
        else:
            text = [[_cell(r[c], c) for c in names] for r in rows]
            widths = [max([len(c)] + [len(t[i]) for t in text]) for i, c in enumerate(names)]
            out.write("  ".join(c.ljust(w) for c, w in zip(names, widths)).rstrip() + "\n")
            for t in text:
                out.write("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def _cell(v, name: str) -> str:
    if v is None:
        return "-"
    if name.endswith("_ts_ns") and isinstance(v, int):
        import datetime as dt
        d = dt.datetime.fromtimestamp(v // 10**9, dt.UTC)
        return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{v % 10**9:09d}Z"
    return str(v)


_TIME_HELP = ("ISO 8601 (UTC if no zone; up to 9 fractional digits), seconds since the epoch (up to 9 decimals) "
              "or ns (18-19 digits)")


def register(sub: argparse._SubParsersAction) -> None:
    from pktstream.cli import subparser
    p = subparser(sub, "index", help="build or repair the index of capture files or an archive",
                  epilog="examples:\n  pktstream index /srv/pcap\n"
                         "  pktstream index /srv/pcap/a.pcap.zst --archive /srv/pcap\n"
                         "  pktstream index s3://bucket/pcaps")
    p.add_argument("paths", nargs="+", metavar="PATH", help="archive directory, s3://BUCKET/PREFIX or capture file")
    p.add_argument("--archive", help="archive root of the capture files named (default: their directory)")
    p.add_argument("--force", action="store_true", help="rebuild indexes that are current")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a terminal")
    p.set_defaults(func=cmd_index)

    p = subparser(sub, "query", help="write the packets of an archive matching a BPF filter and time range",
                  epilog="examples:\n  pktstream query /srv/pcap 'host 198.18.7.2 and tcp port 443' -w case.pcapng\n"
                         "  pktstream query s3://bucket/pcaps --since 2024-11-27T12:00 --until 2024-11-27T13:00 "
                         "--sensor web-1 -w hour.pcapng.zst")
    p.add_argument("archive", help="archive directory or s3://BUCKET/PREFIX")
    p.add_argument("bpf", nargs="*", help="BPF filter expression (as tcpdump takes it)")
    p.add_argument("-w", "--write", required=True, metavar="OUT",
                   help="pcapng output ('-' for stdout; .zst compressed)")
    p.add_argument("--since", help=f"packets at or after this time ({_TIME_HELP})")
    p.add_argument("--until", help=f"packets before this time ({_TIME_HELP})")
    p.add_argument("--sensor", action="append", help="only this sensor (repeatable)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="SOCKET",
                       help="ask the query server on this socket (default: ARCHIVE/.pktstream-query.sock "
                            "when it exists; pktstream serve)")
    where.add_argument("--no-server", action="store_true", help="run the query in this process")
    p.add_argument("--server-timeout", type=_server_timeout, default=30.0, metavar="SECONDS",
                   help="give up on a query server that sends nothing (not even its heartbeat) for this "
                        "long, 2 .. 86400; before any output the query then runs here (default: 30)")
    p.set_defaults(func=cmd_query)

    p = subparser(sub, "serve", help="answer pktstream query for an archive from a resident process (fast queries)",
                  epilog="examples:\n  pktstream serve /srv/pcap &\n"
                         "  pktstream query /srv/pcap 'host 198.18.7.2' -w case.pcapng   # asks the server\n"
                         "  pktstream serve s3://bucket/pcaps --socket /run/pktstream-pcaps.sock")
    p.add_argument("archive", help="archive directory or s3://BUCKET/PREFIX")
    p.add_argument("--socket", metavar="PATH", help="Unix socket (default: ARCHIVE/.pktstream-query.sock)")
    p.add_argument("--socket-mode", default="600", metavar="OCTAL",
                   help="permission bits of the socket: who may query (default 600, its owner; 660 adds its group)")
    p.set_defaults(func=cmd_serve)

    p = subparser(sub, "flows", help="list the flow records of an archive",
                  epilog="examples:\n  pktstream flows /srv/pcap host 198.18.7.2\n"
                         "  pktstream flows /srv/pcap --since 2024-11-27T12:00 --format csv > flows.csv")
    p.add_argument("archive", help="archive directory or s3://BUCKET/PREFIX")
    p.add_argument("filter", nargs="*", help="BPF subset (host, net, port, tcp, udp, ...; docs/ARCHIVE.md)")
    p.add_argument("--since", help=f"flows active at or after this time ({_TIME_HELP})")
    p.add_argument("--until", help=f"flows active before this time ({_TIME_HELP})")
    p.add_argument("--sensor", action="append", help="only this sensor (repeatable)")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table", help="output format")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_flows)

    p = subparser(sub, "sql", help="run SQL over an archive's index with DuckDB (tables flows, files)",
                  epilog="examples:\n  pktstream sql /srv/pcap \"SELECT sensor, sum(bytes) FROM flows GROUP BY 1\"")
    p.add_argument("archive", help="archive directory or s3://BUCKET/PREFIX")
    p.add_argument("query", help="SQL (DuckDB dialect)")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table", help="output format")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_sql)
