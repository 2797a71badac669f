"""What of a BPF expression an index can decide: three-valued evaluation over flow records.

Only *pruning* comes from here: the query always applies the real BPF (libpcap) to every
packet it reads, so an answer here may over-include but must never exclude a packet the
filter matches. Each node evaluates to two boolean arrays over the flows, ``maybe_true`` and
``maybe_false`` (or, over one file's catalog summary, two bools); unknown is both. A flow key
holds for every packet of the flow, so a leaf that is decided for the key is decided for each
packet, also under ``not``.

Understood (tcpdump syntax): ``and``/``&&``, ``or``/``||``, ``not``/``!``, parentheses,
``[src|dst] host ADDR``, ``[src|dst] net CIDR``, ``[src|dst] port N``, ``portrange A-B``,
``tcp``, ``udp``, ``sctp``, ``icmp``, ``icmp6``, ``ip``, ``ip6`` (also as qualifiers:
``tcp port 80``, ``ip host X``) and qualifier inheritance (``port 80 or 443``), with libpcap's
precedence (see :class:`_Parser`). Decided for untagged
IP flows (fragment or port-less flows are unknown for port tests; IPv6
protocol/port tests are never decided false: libpcap's IPv6 tests do not walk every extension
header; see :class:`FlowContext` for tagged and non-IP flows). Anything else -- ``vlan`` (it
shifts later offsets), byte-offset tests, names that need DNS -- makes the whole expression
unknown: no pruning, still exact.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from pktstream.archive.bloom import AddressProbe, FilterColumn, address_bytes, bitmap_has_port
from pktstream.archive.index import canonical

_TOKEN = re.compile(r"\s*(\(|\)|&&|\|\||!|[^\s()!]+)")
_PROTOS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmp6": 58}
_PORT_PROTOS = (6, 17, 132)


class Unsupported(Exception):
    """The expression uses something the index cannot decide."""


def parse(expr: str | None):
    """A tree of tuples, or None when the expression cannot be used for pruning (or is empty)."""
    if not expr or not expr.strip():
        return None
    tokens = [t for t in _TOKEN.findall(expr)]
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", expr):
        return None
    p = _Parser(tokens)
    try:
        tree = p.expr()
        if p.i != len(tokens):
            return None
    except (Unsupported, IndexError, ValueError):
        return None
    return tree


class _Parser:
    """libpcap's grammar for the subset: ``not`` binds tightest; ``and`` and ``or`` have equal
    precedence and group left to right (``a or b and c`` is ``(a or b) and c``, pcap-filter(7));
    a bare value right after ``and``/``or`` (and any ``not`` s) takes the whole qualifier of the
    primitive before it, protocol included (``tcp port 80 or 443`` is ``... or tcp port 443``).
    Where libpcap's inheritance is subtler (a value first in parentheses or right after one,
    after a bare protocol, or with no qualifier to inherit) the expression is unsupported."""

    _CONJ = ("and", "&&", "or", "||")

    def __init__(self, tokens: list[str]) -> None:
        self.t = tokens
        self.i = 0
        # the (protocol, direction, kind) qualifiers of the last primitive that had a kind
        self.last: tuple[str | None, str | None, str] | None = None

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.t[self.i]
        self.i += 1
        return tok

    def expr(self):
        node = self.factor()
        while self.peek() in self._CONJ:
            op = "and" if self.take() in ("and", "&&") else "or"
            node = (op, node, self.factor())
        return node

    def factor(self):
        tok = self.peek()
        if tok in ("not", "!"):
            self.take()
            return ("not", self.factor())
        if tok == "(":
            self.take()
            self.last = None  # (what a value first inside inherits is not modelled)
            node = self.expr()
            if self.take() != ")":
                raise Unsupported("(")
            self.last = None  # (nor what one right after the parenthesis inherits)
            return node
        return self.primitive()

    def _after_conjunction(self) -> bool:
        """Whether the token just taken follows ``and``/``or`` (any ``not`` s between)."""
        j = self.i - 2
        while j >= 0 and self.t[j] in ("not", "!"):
            j -= 1
        return j >= 0 and self.t[j] in self._CONJ

    @staticmethod
    def _proto_node(tok: str):
        return ("ipv", 4 if tok == "ip" else 6) if tok in ("ip", "ip6") else ("proto", tok)

    def primitive(self):
        tok = self.take()
        proto = None
        if tok in ("ip", "ip6") or tok in _PROTOS:
            if self.peek() not in ("src", "dst", "host", "net", "port", "portrange"):
                self.last = None  # a bare protocol: a value after it inherits no kind
                return self._proto_node(tok)
            proto, tok = tok, self.take()
        direction = None
        if tok in ("src", "dst"):
            direction = tok
            if self.peek() in ("or", "and"):
                raise Unsupported("src or dst")
            tok = self.take()
        if tok in ("host", "net", "port", "portrange"):
            self.last = (proto, direction, tok)
            node = self.value(direction, tok, self.take())
        elif (proto is None and direction is None and self.last is not None and self._after_conjunction()
              and re.fullmatch(r"[0-9a-fA-F:./-]+", tok)):
            proto, direction, kind = self.last  # "tcp port 80 or 443": tcp port 443
            node = self.value(direction, kind, tok)
        else:
            raise Unsupported(tok)
        return node if proto is None else ("and", self._proto_node(proto), node)

    @staticmethod
    def value(direction: str | None, kind: str, text: str):
        if kind == "host":
            return ("net", direction, ipaddress.ip_network(text))  # ValueError for names: unsupported
        if kind == "net":
            return ("net", direction, ipaddress.ip_network(text, strict=False))
        if kind == "port":
            n = _number(text)
            return ("port", direction, n, n)
        m = re.fullmatch(r"(\w+)-(\w+)", text)
        if not m:
            raise Unsupported(text)
        lo, hi = sorted((_number(m.group(1)), _number(m.group(2))))
        return ("port", direction, lo, hi)


def _number(text: str) -> int:
    """A port number as libpcap reads it: decimal, octal with a leading 0, hex with 0x."""
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return int(text, 16)
        if re.fullmatch(r"0[0-7]+", text):
            return int(text, 8)
        if re.fullmatch(r"[1-9][0-9]*|0", text):
            return int(text)
    except ValueError:
        pass
    raise Unsupported(text)  # (a service name, or what libpcap refuses)


class FlowContext:
    """Leaves over flow record columns (numpy arrays / lists from the flow tables).

    Flow classes: untagged IP flows are decided from their key (as the module doc says);
    on Ethernet, a VLAN-tagged flow fails every test understood here (without ``vlan`` the
    filter reads the tag's ethertype 0x8100 where it looks for IP), and so does an untagged
    flow of another known ethertype -- except ``host``/``net`` on ARP/RARP, decided from the
    sender/target addresses the index keeps for them (unknown when the packet was too short);
    anything else (other link types, undecodable headers) is unknown.
    """

    def __init__(self, cols: dict[str, Any], *, strict: bool = True) -> None:
        """``strict=False``: decide on the key's face value (VLAN-tagged flows and IPv6
        protocol/port tests too) -- for listing flows, not for pruning packets."""
        self.strict = strict
        self.n = len(cols["ip_version"])
        self.ipv = np.asarray(cols["ip_version"])
        self.proto = np.asarray(cols["proto"])
        self.sport = np.asarray(cols["sport"])
        self.dport = np.asarray(cols["dport"])
        vlan = np.asarray(cols["vlan"])
        is_ip = (self.ipv == 4) | (self.ipv == 6)
        eth = np.asarray(cols["link_type"]) == 1 if "link_type" in cols else np.zeros(self.n, bool)
        etype = np.asarray(cols["ethertype"]) if "ethertype" in cols else np.zeros(self.n, np.uint16)
        untagged = vlan < 0
        if strict:
            self.decided = is_ip & untagged
            self.tagged_false = eth & ~untagged
        else:
            self.decided = is_ip
            self.tagged_false = np.zeros(self.n, bool)
        self.nonip = eth & untagged & (self.ipv == 0) & ~np.isin(etype, (0, 0x0800, 0x86DD))
        self.arpish = self.nonip & np.isin(etype, (0x0806, 0x8035))
        self.src = cols["src"]
        self.dst = cols["dst"]
        self._addr_cache: dict[tuple[str, str], Any] = {}

    def unknown(self):
        return np.ones(self.n, bool), np.ones(self.n, bool)

    def _decide(self, is_true: np.ndarray, exact_false: np.ndarray | None = None, *, arp_unknown: bool = False):
        d = self.decided if exact_false is None or not self.strict else self.decided & exact_false
        mt = is_true | ~self.decided
        mf = ~is_true | ~d
        false = self.tagged_false | (self.nonip & ~self.arpish if arp_unknown else self.nonip)
        mt &= ~false
        mf |= false
        return mt, mf

    def leaf(self, node):
        kind = node[0]
        if kind == "ipv":
            return self._decide(self.ipv == node[1])
        if kind == "proto":
            num = _PROTOS[node[1]]
            want_v = 6 if node[1] == "icmp6" else 4 if node[1] == "icmp" else None
            t = self.proto == num
            if want_v is not None:
                t &= self.ipv == want_v
            return self._decide(t, self.ipv == 4)
        if kind == "net":
            _, direction, net = node
            hit = np.zeros(self.n, bool)
            for col, name in ((self.src, "src"), (self.dst, "dst")):
                if direction in (None, name):
                    hit |= self._in_net(col, name, net)
            mt, mf = self._decide(hit, arp_unknown=True)
            known = self.arpish & self._arp_known()  # ARP with its addresses indexed: exact
            return np.where(known, hit, mt), np.where(known, ~hit, mf)
        if kind == "port":
            _, direction, lo, hi = node
            ported = np.isin(self.proto, _PORT_PROTOS)
            hit = np.zeros(self.n, bool)
            if direction in (None, "src"):
                hit |= (self.sport >= lo) & (self.sport <= hi)
            if direction in (None, "dst"):
                hit |= (self.dport >= lo) & (self.dport <= hi)
            hit &= ported
            has_ports = (self.sport != 0) | (self.dport != 0) | ~ported
            return self._decide(hit, (self.ipv == 4) & has_ports)
        raise Unsupported(kind)

    def _arp_known(self) -> np.ndarray:
        return np.array([a is not None for a in self.src], bool) if self.n else np.zeros(0, bool)

    def _in_net(self, col, name: str, net) -> np.ndarray:
        key = (name, str(net))
        out = self._addr_cache.get(key)
        if out is None and net.num_addresses == 1:  # a host: text equality (the index's canonical text)
            arr = col if isinstance(col, np.ndarray) else np.array(col, dtype=object)
            out = self._addr_cache[key] = (arr == canonical(net.network_address)) if len(arr) else np.zeros(0, bool)
        if out is None:
            memo: dict[str | None, bool] = {}
            vals = []
            for a in col:
                r = memo.get(a)
                if r is None:
                    r = memo[a] = a is not None and _contains(net, a)
                vals.append(r)
            out = self._addr_cache[key] = np.array(vals, bool) if vals else np.zeros(0, bool)
        return out


def _contains(net, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) in net
    except ValueError:
        return False


class SummaryContext:
    """Leaves over one file's catalog summary: address and port lists (None = unknown past
    ``SUMMARY_LIMIT``), the address Bloom filter and the port bitmap (None: absent, e.g. a
    catalog written before them). Lists may be given as zero-argument callables, called only
    when a leaf needs them (the filters decide most host tests first). Only ``maybe_true`` is
    meaningful: everything may be false."""

    def __init__(self, addresses: list[str] | None | Callable[[], list[str] | None],
                 ports: list[int] | None | Callable[[], Any], *,
                 address_filter: bytes | None = None, port_bitmap: bytes | None = None,
                 probes: dict[Any, Any] | None = None) -> None:
        """``probes``: a cache of hashed query addresses shared by the files of one query."""
        self.n = 1
        self._addresses = addresses
        self._ports = ports
        self._port_array: np.ndarray | None = None
        self._set: set[str] | None = None
        self.address_filter = address_filter
        self.port_bitmap = port_bitmap
        self._probes = probes if probes is not None else {}

    @property
    def addresses(self) -> list[str] | None:
        if callable(self._addresses):
            self._addresses = self._addresses()
        return self._addresses

    @property
    def ports(self) -> np.ndarray | None:
        if self._port_array is None and self._ports is not None:
            ports = self._ports() if callable(self._ports) else self._ports
            self._ports = None
            if ports is not None:
                self._port_array = np.asarray(ports)
        return self._port_array

    def unknown(self):
        return True, True

    def _may_hold(self, text: str) -> bool:
        """Whether the file may hold an address (in canonical text): filter, then the list."""
        if self.address_filter is not None:
            probe = self._probes.get(text)
            if probe is None:
                packed = address_bytes(text)
                if packed is None:
                    return True
                probe = self._probes[text] = AddressProbe(packed)
            # (no list lookup after a "maybe": ~1 % false positives cost a flow-record read,
            # less than decoding the list)
            return probe.may_contain(self.address_filter)
        addresses = self.addresses
        if addresses is None:
            return True
        if self._set is None:
            self._set = set(addresses)
        return text in self._set

    def leaf(self, node) -> tuple[bool, bool]:
        """(maybe_true, maybe_false) of a leaf for this file, as Python bools (a query evaluates
        a tree per file: numpy arrays of one element cost more than the test itself)."""
        kind = node[0]
        t = True
        if kind == "net":
            net = node[2]
            hosts = _net_hosts(net, self._probes)
            if hosts is not None and (self.address_filter is not None or self.addresses is not None):
                t = any(self._may_hold(h) for h in hosts)
            elif self.addresses is not None:
                t = any(_contains(net, a) for a in self.addresses)
        elif kind == "port":
            ports = self.ports
            if ports is not None:
                t = bool(((ports >= node[2]) & (ports <= node[3])).any())
            elif self.port_bitmap is not None:
                t = bitmap_has_port(self.port_bitmap, node[2], node[3])
        return t, True


def _net_hosts(net, cache: dict[Any, Any]) -> tuple[str, ...] | None:
    """A small net's addresses as canonical text (None: more than _FILTER_NET_HOSTS), made
    once per query (kept in ``cache``, with the probes every file of the query shares)."""
    key = ("hosts", id(net))  # (by id: hashing an ipaddress network runs Python code each time;
    cached = cache.get(key)  # the net is kept with its hosts, so an id is never reused)
    if cached is None or cached[0] is not net:
        n = net.num_addresses
        cached = cache[key] = (net, None if n > _FILTER_NET_HOSTS else
                               tuple(canonical(a) for a in ([net.network_address] if n == 1 else net)))
    return cached[1]


_FILTER_NET_HOSTS = 16  # nets up to this many addresses are tested address by address


class CatalogContext:
    """Leaves over many files' catalog summaries at once (a query's whole catalog): what
    :class:`SummaryContext` answers file by file, with the address filters of all files probed
    together (:class:`~pktstream.archive.bloom.FilterColumn`) and everything else asked of a
    file's own :class:`SummaryContext`, made only for the files that reach such a leaf (see
    :func:`files_may_match`). A file whose summary cannot be read (its lazy lists raise) is
    listed in :attr:`errors` and may match. One query, one thread."""

    def __init__(self, summaries: list[Callable[[dict[Any, Any]], SummaryContext]],
                 address_filters: list[bytes | None]) -> None:
        """``summaries``: per file, a callable making its :class:`SummaryContext` (lists lazy)
        given the query's shared ``probes``; ``address_filters``: per file, its stored
        address filter (the one that context holds)."""
        self._make = summaries
        self._made: dict[int, SummaryContext] = {}
        self._address_filters = address_filters
        self._filters: FilterColumn | None = None  # (made at the first host test)
        self._has_filter = np.array([f is not None for f in address_filters], dtype=bool)
        self._probes: dict[Any, Any] = {}  # shared by every file's SummaryContext
        self.errors: dict[int, Exception] = {}  # file -> what reading its summary raised
        self.n = len(summaries)

    def _summary(self, i: int) -> SummaryContext:
        s = self._made.get(i)
        if s is None:
            s = self._made[i] = self._make[i](self._probes)
        return s

    def _per_file(self, node, files: np.ndarray) -> np.ndarray:
        out = np.ones(len(files), dtype=bool)
        for j, i in enumerate(files.tolist()):
            if i in self.errors:
                continue
            try:
                out[j] = self._summary(i).leaf(node)[0]
            except Exception as exc:  # noqa: BLE001 - the caller reads such a file whole
                self.errors[i] = exc
        return out

    def leaf(self, node, files: np.ndarray) -> np.ndarray:
        """maybe_true of a leaf for files ``files`` (indices; maybe_false is always True)."""
        if node[0] == "net":
            hosts = _net_hosts(node[2], self._probes)
            if hosts is not None:
                filtered = self._has_filter[files]
                out = np.zeros(len(files), dtype=bool)
                for h in hosts:
                    probe = self._probes.get(h)
                    if probe is None:
                        packed = address_bytes(h)
                        probe = self._probes[h] = None if packed is None else AddressProbe(packed)
                    if probe is None:
                        out[filtered] = True
                        continue
                    if self._filters is None:
                        self._filters = FilterColumn(self._address_filters)
                    out[filtered] |= self._filters.may_contain(probe, files[filtered])
                out[~filtered] = self._per_file(node, files[~filtered])  # (their address lists)
                return out
        return self._per_file(node, files)


def files_may_match(tree, ctx: CatalogContext) -> np.ndarray:
    """For every file of ``ctx``, whether it may hold packets the expression matches (a
    boolean array): :func:`may_match` file by file, evaluated for all files together. A
    subexpression is evaluated only for the files still open after the ones before it (``host
    X and port N`` reads port lists only of files that may hold X), as file by file."""
    out = _evaluate_files(tree, ctx, np.arange(ctx.n, dtype=np.int64))[0]
    if ctx.errors:  # (a file whose summary could not be read may match, whatever other leaves said)
        out[list(ctx.errors)] = True
    return out


def _evaluate_files(tree, ctx: CatalogContext, files: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(files)
    if tree is None or n == 0:
        return np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    op = tree[0]
    if op in ("and", "or"):
        at, af = _evaluate_files(tree[1], ctx, files)
        # the right side only for the files it can change (not false already for "and", not true
        # for "or"); the others keep "unknown" there, which leaves their result as it is
        open_ = (at | ~af) if op == "and" else (~at | af)
        bt, bf = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
        if open_.any():
            bt[open_], bf[open_] = _evaluate_files(tree[2], ctx, files[open_])
        return (at & bt, af | bf) if op == "and" else (at | bt, af & bf)
    if op == "not":
        t, f = _evaluate_files(tree[1], ctx, files)
        return f, t
    try:
        return ctx.leaf(tree, files), np.ones(n, dtype=bool)
    except Unsupported:
        return np.ones(n, dtype=bool), np.ones(n, dtype=bool)


def evaluate(tree, ctx) -> tuple[Any, Any]:
    """(maybe_true, maybe_false) for a parsed tree: boolean arrays, one element per flow
    (:class:`FlowContext`), or two bools for a file (:class:`SummaryContext`)."""
    if tree is None:
        return ctx.unknown()
    op = tree[0]
    if op == "and":
        at, af = evaluate(tree[1], ctx)
        if not _any(at) and _all(af):  # false whatever the right side is
            return at, af
        bt, bf = evaluate(tree[2], ctx)
        return at & bt, af | bf
    if op == "or":
        at, af = evaluate(tree[1], ctx)
        if _all(at) and not _any(af):  # true whatever the right side is
            return at, af
        bt, bf = evaluate(tree[2], ctx)
        return at | bt, af & bf
    if op == "not":
        t, f = evaluate(tree[1], ctx)
        return f, t
    try:
        return ctx.leaf(tree)
    except Unsupported:
        return ctx.unknown()


def _any(x) -> bool:
    return x if isinstance(x, bool) else bool(x.any())


def _all(x) -> bool:
    return x if isinstance(x, bool) else bool(x.all())


def may_match(tree, ctx) -> Any:
    """Flows that may hold packets the expression matches (a boolean array), or, for a
    :class:`SummaryContext`, whether the file may (a bool)."""
    return evaluate(tree, ctx)[0]
