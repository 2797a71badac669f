"""``pktstream info|read|convert|merge`` against capinfos, tcpdump, tshark and mergecap."""
from __future__ import annotations

import json
import subprocess
from decimal import Decimal

import pytest

from _captures import interleaved_pcapng, real_captures, tshark_rows
from conftest import PKTSTREAM


@pytest.fixture(scope="module")
def caps(tmp_path_factory, mixed_pcap):
    return real_captures(tmp_path_factory.mktemp("caps"), mixed_pcap)


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*PKTSTREAM, *map(str, args)], capture_output=True, text=True, **kw)


def _capinfos(path) -> dict[str, str]:
    out = subprocess.run(["capinfos", "-T", "-m", "-r", "-c", "-d", "-S", "-a", "-e", str(path)],
                         capture_output=True, text=True, check=True).stdout.strip().split(",")
    return dict(zip(("file", "packets", "bytes", "first", "last"), out))


@pytest.mark.live
@pytest.mark.parametrize("name", ["ns", "multi_zst", "gz"])
def test_info_json_matches_capinfos(caps, name):
    r = run("info", "--json", caps[name])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    info = json.loads(r.stdout)
    ref = _capinfos(caps[name])
    assert info["packets"] == int(ref["packets"]) and info["bytes"] == int(ref["bytes"])
    assert info["first_ts_ns"] == int(Decimal(ref["first"]) * 10**9)
    assert info["last_ts_ns"] == int(Decimal(ref["last"]) * 10**9)
    assert info["format"] == ("pcap" if name != "multi_zst" else "pcapng")
    assert {lt["dlt"] for lt in info["link_types"]} == ({1, 276} if name == "multi_zst" else {1})
    text = run("info", caps[name]).stdout
    assert f"Number of packets:   {ref['packets']}" in text


@pytest.mark.live
def test_read_lines_like_tcpdump(caps):
    for bpf in ([], ["tcp", "port", "80"], ["ip6"]):
        mine = run("read", caps["ns"], *bpf).stdout.splitlines()
        ref = subprocess.run(["tcpdump", "-nr", str(caps["ns"]), *bpf], capture_output=True, text=True,
                             check=True).stdout.splitlines()
        assert len(mine) == len(ref) > 0
        for a, b in zip(mine, ref):  # same time (to the µs tcpdump shows) and same addresses
            assert a.split()[0][:15] == b.split()[0][:15]
            if " IP " in b and " > " in b:
                assert a.split(" > ")[0].split()[-1] == b.split(" > ")[0].split()[-1]
    first = run("read", caps["ns"], "-c", "5", "udp").stdout.splitlines()
    assert len(first) == 5 and all("UDP" in line for line in first)


@pytest.mark.live
def test_convert_with_filter_and_to_stdout(caps, tmp_path):
    out = tmp_path / "f.pcapng.zst"
    r = run("convert", caps["tshark"], out, "tcp", "port", "80")
    assert r.returncode == 0, r.stderr
    ref = tshark_rows(caps["tshark"], "frame.time_epoch", "frame.len", extra=("-Y", "tcp.port == 80"))
    assert tshark_rows(out, "frame.time_epoch", "frame.len") == ref and len(ref) > 100
    p = subprocess.run(f"{' '.join(PKTSTREAM)} convert {caps['multi']} - -F pcapng | tshark -r - -T fields "
                       "-e frame.time_epoch", shell=True, capture_output=True, text=True)
    # in the file's order, also where its interfaces interleave (a batch is one interface)
    assert p.stdout.split() == [r[0] for r in tshark_rows(caps["multi"], "frame.time_epoch")]
    bad = run("convert", caps["multi"], tmp_path / "bad.pcapng", "vlan")  # no VLAN on SLL2
    assert bad.returncode == 1 and "bad BPF filter" in bad.stderr
    assert not list(tmp_path.glob("bad*"))


@pytest.mark.live
def test_merge_like_mergecap(caps, tmp_path):
    out = tmp_path / "m.pcapng"
    r = run("merge", out, caps["tshark"], caps["sll2"], caps["us"])
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.pcapng"
    subprocess.run(["mergecap", "-w", str(ref), str(caps["tshark"]), str(caps["sll2"]), str(caps["us"])],
                   check=True)
    a = tshark_rows(out, "frame.time_epoch", "frame.len", "frame.protocols")
    b = tshark_rows(ref, "frame.time_epoch", "frame.len", "frame.protocols")
    assert [x[0] for x in a] == sorted((x[0] for x in a), key=Decimal)  # chronological
    assert sorted(map(tuple, a)) == sorted(map(tuple, b))
    assert [x[0] for x in a] == [x[0] for x in b]
    # an input of several interfaces interleaved: merged as mergecap merges it
    r = run("merge", out, caps["multi"], caps["us"])
    assert r.returncode == 0, r.stderr
    subprocess.run(["mergecap", "-w", str(ref), str(caps["multi"]), str(caps["us"])], check=True)
    a = tshark_rows(out, "frame.time_epoch", "frame.len")
    assert a == tshark_rows(ref, "frame.time_epoch", "frame.len") and len(a) > 100
    bad = run("merge", tmp_path / "x.pcap", caps["tshark"], caps["sll2"])
    assert bad.returncode == 1 and "pcapng" in bad.stderr and not (tmp_path / "x.pcap").exists()
    bad = run("merge", "-", caps["tshark"], caps["sll2"])  # to stdout: refused before a byte is written
    assert bad.returncode == 1 and bad.stdout == "" and "EN10MB (1), LINUX_SLL2 (276)" in bad.stderr


def _write_pcap(path, packets) -> None:
    """A nanosecond pcap of (ts_ns, frame) in the given order (not sorted)."""
    import struct
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))
        for ts, frame in packets:
            f.write(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(frame), len(frame)) + frame)


def _udp_frame(port: int, size: int) -> bytes:
    import struct
    udp = struct.pack(">HHHH", port, 9, 8 + size, 0) + bytes(size)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]),
                     bytes([10, 0, 0, 2])) + udp
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip


def test_merge_of_inputs_out_of_time_order_is_mergecaps(tmp_path):
    """Inputs whose packets are not in time order (clock steps, several capture threads):
    mergecap takes, at each step, the earliest of the inputs' next packets (ties: the last
    input), so a packet earlier than its predecessor comes out right after it. pktstream merges
    the same way (it used to binary-search each batch's time stamps as if they were sorted, and
    gave ties to the first input). Equal time stamps across inputs are frequent here."""
    import random
    rnd = random.Random(5)
    inputs = []
    for k in range(3):
        pkts = []
        for i in range(3000):
            ts = 1_700_000_000 * 10**9 + i * 1_000_000 + rnd.choice((0, 0, 1, -3, 7)) * 1_000_000
            pkts.append((ts, _udp_frame(1000 + k, 1 + (i * 7 + k) % 300)))
        path = tmp_path / f"in{k}.pcap"
        _write_pcap(path, pkts)
        inputs.append(path)
    out, ref = tmp_path / "m.pcapng", tmp_path / "ref.pcapng"
    r = run("merge", out, *inputs)
    assert r.returncode == 0, r.stderr
    subprocess.run(["mergecap", "-w", str(ref), *map(str, inputs)], check=True)
    fields = ("frame.time_epoch", "udp.srcport", "frame.len")
    a, b = tshark_rows(out, *fields), tshark_rows(ref, *fields)
    assert len(a) == 9000 and a == b


def test_merge_of_finely_interleaved_inputs_through_small_batches_is_mergecaps(tmp_path):
    """Two captures of the same minutes whose packets alternate one by one (the usual case
    when merging sensors), with ties and a few out-of-order stamps, plus a pcapng whose own
    interfaces interleave: merged through 4 KiB read batches (a refill every few dozen packets)
    in mergecap's order, each packet on its input's interface; the CLI the same."""
    import random

    from pktstream.formats import open_reader, open_writer
    from pktstream.formats.merge import merge
    rnd = random.Random(7)
    inputs = []
    for k in range(2):
        pkts = [(1_700_000_000 * 10**9 + (2 * i + k) * 1000 + rnd.choice((0, 0, 0, 1000, -5000)),
                 _udp_frame(2000 + k, 1 + (i * 13 + k) % 200)) for i in range(4000)]
        inputs.append(tmp_path / f"in{k}.pcap")
        _write_pcap(inputs[-1], pkts)
    inputs.append(tmp_path / "multi.pcapng")
    interleaved_pcapng(inputs[-1], 3000)
    ref = tmp_path / "ref.pcapng"
    subprocess.run(["mergecap", "-w", str(ref), *map(str, inputs)], check=True)
    out = tmp_path / "api.pcapng"
    readers = [open_reader(p, batch_bytes=4096, comments=True, file_order=True, mixed_interfaces=True)
               for p in inputs]
    with open_writer(out) as w:
        batches = 0
        for batch, interfaces, comments in merge(readers):
            w.write(batch, comments, interfaces=interfaces)
            batches += 1
    for r in readers:
        r.close()
    fields = ("frame.time_epoch", "frame.len", "data", "frame.comment")
    want = tshark_rows(ref, *fields)
    assert len(want) == 11000 and tshark_rows(out, *fields) == want and batches > 100
    assert sum(1 for row in want if row[3]) == 31  # (the comments came along, as mergecap keeps them)
    names = [r[0] for r in tshark_rows(out, "frame.interface_name")]
    assert {n: names.count(n) for n in set(names)} == {
        str(inputs[0]): 4000, str(inputs[1]): 4000, "eth0": 1200, "eth1": 1500, "eth2": 300}
    cli = tmp_path / "cli.pcapng"
    with open(inputs[0], "rb") as stdin:  # ('-': stdin, as for the other commands)
        r = subprocess.run([*PKTSTREAM, "merge", str(cli), "-", *map(str, inputs[1:])], stdin=stdin,
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tshark_rows(cli, *fields) == want


def test_malformed_file_clear_error(tmp_path):
    p = tmp_path / "junk.pcap"
    p.write_bytes(b"\x00" * 100)
    r = run("info", p)
    assert r.returncode == 1 and "not a pcap or pcapng file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.live
@pytest.mark.parametrize("shuffled", [False, True])
def test_info_judges_time_order_in_file_order_like_capinfos(tmp_path, shuffled):
    """Interfaces alternating packet by packet in time order: chronological, although a read
    buffer comes out grouped per interface; one packet out of place: not."""
    import struct

    import pktstream
    from pktstream.formats import open_writer
    stamps = list(range(4000))
    if shuffled:
        stamps[2500], stamps[2501] = stamps[2501], stamps[2500]
    path = tmp_path / "alt.pcapng"
    with open_writer(path) as w:
        for j, t in enumerate(stamps):
            frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + bytes(300)
            rec = struct.pack("<IIII", 1_732_708_800, t * 1000, len(frame), len(frame)) + frame
            w.write(pktstream.PacketBatch.from_records(rec, link_type=1, interface=f"eth{j % 2}"))
    ref = subprocess.run(["capinfos", "-o", str(path)], capture_output=True, text=True, check=True).stdout
    assert ("True" if not shuffled else "False") in ref.split("Strict time order:")[1].split("\n")[0]
    r = run("info", "--json", path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chronological"] is (not shuffled)


def test_info_counts_interfaces_that_share_a_name_apart_like_capinfos(tmp_path):
    """Two interfaces both named eth0 (two sensors' eth0 in one merged file): per-interface
    counts by interface, as capinfos gives them (they were summed into the first)."""
    path = tmp_path / "same-names.pcapng"
    interleaved_pcapng(path, 3000, names=("eth0", "eth0", "eth1"))
    ref = subprocess.run(["capinfos", str(path)], capture_output=True, text=True, check=True).stdout
    counts = [int(line.split("=")[1]) for line in ref.splitlines() if "Number of packets =" in line]
    r = run("info", "--json", path)
    assert r.returncode == 0, r.stderr
    got = [i["packets"] for i in json.loads(r.stdout)["interfaces"]]
    assert got == counts and len(set(got)) == 3 and sum(got) == 3000


@pytest.mark.live
def test_convert_with_a_filter_keeps_the_comments_of_the_packets_kept(tmp_path):
    import struct

    import pktstream
    from pktstream.formats import open_reader, open_writer
    src = tmp_path / "c.pcapng"
    with open_writer(src) as w:
        for j in range(600):
            frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + bytes([j % 3]) + j.to_bytes(4, "big") + bytes(40)
            rec = struct.pack("<IIII", 1_732_708_800, j, len(frame), len(frame)) + frame
            w.write(pktstream.PacketBatch.from_records(rec, link_type=1, interface=f"eth{j % 2}"),
                    {0: f"packet {j}"} if j % 7 == 0 else None)
    out = tmp_path / "o.pcapng"
    r = run("convert", src, out, "ether[14]", "=", "1")
    assert r.returncode == 0, r.stderr
    kept = [j for j in range(600) if j % 3 == 1]
    got: dict[int, str] = {}
    frames: list[int] = []
    with open_reader(out, comments=True, file_order=True) as rd:
        for b in rd:
            got.update({len(frames) + i: t for i, t in rd.comments.items()})
            frames += [int.from_bytes(bytes(p)[15:19], "big") for p in b]
    assert frames == kept
    assert got == {i: f"packet {j}" for i, j in enumerate(kept) if j % 7 == 0}
    shark = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.comment"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert [i for i, line in enumerate(shark) if line.strip()] == sorted(got)
