"""Delivery under faults, with default sensor options: receiver kills, a long outage, link
flaps, a burst far beyond the send window, a stop while the receiver is unreachable, an
interface that goes away and comes back, sensors that share an id, impossible sequence numbers,
and a hundred sensors on one receiver. tcpdump on the same interface is the reference."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import PKTSTREAM, free_port, read_pcap_dpkt, start_tcpdump, wait_pcap_count, wait_until
from pktstream.lab import traffic
from pktstream.lab.netns import Veth, wait_link_up
from pktstream.stream import protocol as P

pytestmark = pytest.mark.live


def received(directory: Path, pattern: str = "out*.pcap") -> list[tuple[int, int, bytes]]:
    """Every packet of every completed output file (restarts write new files)."""
    pkts = []
    for f in sorted(directory.glob(pattern)):
        if not f.name.endswith(".part"):
            pkts.extend(read_pcap_dpkt(f))
    return pkts


def assert_exactly(got: list, ref: list) -> None:
    """The same packets (time stamp, length, bytes), each exactly once."""
    assert len(set(got)) == len(got), f"{len(got) - len(set(got))} duplicated packets"
    missing, extra = set(ref) - set(got), set(got) - set(ref)
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} unexpected of {len(ref)}"
    assert len(got) == len(ref)


def packets_in(path: Path) -> int:
    """Packets in a capture file being written (every whole batch of a .part file is readable)."""
    import pktstream
    try:
        return sum(len(b) for b in pktstream.read(str(path)))
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def part_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("out*.part") if p.exists())


# -- the chaos test --------------------------------------------------------------------------------

def test_chaos_receiver_kills_long_outage_and_link_flaps_lose_nothing(veth, procs, tmp_path):
    """A minute of traffic from a sensor with default options while the receiver is SIGKILLed
    at random moments (restarted 0.3-2 s later), stays down for 20 s once, and its link goes
    down for 3 s twice: the receiver's files hold exactly tcpdump's packets, none twice."""
    seed = int(os.environ.get("PKTSTREAM_CHAOS_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print(f"chaos seed {seed} (PKTSTREAM_CHAOS_SEED to repeat)")
    key = tmp_path / "key"
    key.write_text("chaos-key-0123456789abcdef\n")
    src = tmp_path / "mix.pcap"
    traffic.write_pcap(str(src), 30000)
    out = tmp_path / "out"
    out.mkdir()
    with Veth(prefix="pc") as rxl:  # the sensor reaches its receiver over this link (flapped)
        port = free_port()
        rx_cmd = rxl.in_ns(*PKTSTREAM, "receiver", "--listen", f"{rxl.inner_ip}:{port}", "--auth-key-file",
                           str(key), "-w", str(out / "out.pcap"), "--state-dir", str(tmp_path / "rxstate"),
                           "--heartbeat", "1")
        rx = procs(rx_cmd)
        rx.wait_for("listening on")
        ref = tmp_path / "ref.pcap"
        td = start_tcpdump(procs, veth.outer, ref, immediate=False)  # read after it stops; ~60 s of replay
        sx = procs([*PKTSTREAM, "sensor", "--receiver", f"{rxl.inner_ip}:{port}", "--auth-key-file", str(key),
                    "-i", veth.outer, "--sensor-id", "chaos", "--stats-json", str(tmp_path / "sx.json")])
        sx.wait_for("connected to receiver")
        replay = threading.Thread(target=veth.replay, args=(src,), kwargs={"pps": 3000, "loop": 6})
        replay.start()  # 180,000 packets in about 60 s

        def restart() -> None:
            nonlocal rx
            rx = procs(rx_cmd)
            rx.wait_for("listening on")

        def kill_while_writing(down_s: float) -> None:
            """SIGKILL once the receiver has written more data since its start, then restart."""
            grown = part_size(out) + rnd.randrange(20_000, 200_000)
            wait_until(lambda: part_size(out) >= grown or not replay.is_alive(), 60, "the receiver to write")
            rx.kill()
            time.sleep(down_s)  # the outage itself: a duration by nature
            restart()

        def flap(down_s: float) -> None:
            subprocess.run(["ip", "link", "set", rxl.outer, "down"], check=True)
            time.sleep(down_s)
            subprocess.run(["ip", "link", "set", rxl.outer, "up"], check=True)

        for _ in range(3):
            kill_while_writing(rnd.uniform(0.3, 2.0))
        flap(3.0)
        kill_while_writing(20.0)  # a long outage: the sensor keeps everything meanwhile
        flap(3.0)
        for _ in range(2):
            kill_while_writing(rnd.uniform(0.3, 2.0))
        replay.join()
        # everything delivered: the sensor stops only when all it captured is acknowledged
        assert sx.stop(signal.SIGTERM, timeout=60) == 0, sx.stderr
        wait_pcap_count(ref, 180_000)  # the oracle's last block is handed over within its 1 s timeout
        td.stop()
        rx.stop(signal.SIGTERM)
        st = json.loads((tmp_path / "sx.json").read_text())
        assert st["window_dropped_packets"] == 0 and st["ring_drops"] == 0
        assert st["exit"]["unacked_frames"] == 0 and st["exit"]["lost_packets"] == 0
        ref_pkts = read_pcap_dpkt(ref)
        assert len(ref_pkts) == 180000
        got = received(out)
        if st["kernel_dropped"]:
            # not a delivery loss: the capture thread waited longer for a CPU than the kernel
            # buffer covers at this rate (8 MiB / 256 KiB x 10 ms = 0.32 s; seen once, with five
            # suites side by side on two cores). Counted and logged; everything captured arrived
            assert len(got) == st["packets"] == 180000 - st["kernel_dropped"], st
            assert_exactly(got, sorted(set(got) & set(ref_pkts)))
            assert st["kernel_dropped"] < 1800, st  # a stall, not a sensor that stopped capturing
        else:
            assert_exactly(got, ref_pkts)
        assert st["connection_failures"] > 0  # the faults happened


def test_kernel_drops_are_counted_and_said_in_the_log(veth, procs, tmp_path):
    """A sensor stopped (SIGSTOP: a host too busy to run it) while 6,000 packets arrive
    overflows a one-block kernel buffer: the drops are counted, said in the log with what to
    change, and every packet it captured arrives."""
    src = tmp_path / "mix.pcap"
    traffic.write_pcap(str(src), 6000)
    port = free_port()
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--allow-unauthenticated",
                "-w", str(tmp_path / "out.pcap")])
    rx.wait_for("listening on")
    sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer, "--sensor-id", "drops",
                "--buffer-size", "256KiB", "--stats-json", str(tmp_path / "sx.json")])
    sx.wait_for("connected to receiver")
    sx.p.send_signal(signal.SIGSTOP)
    try:
        veth.replay(src)  # about 2 MB at top speed into a 256 KiB kernel buffer nobody empties
    finally:
        sx.p.send_signal(signal.SIGCONT)
    sx.wait_for("the kernel dropped")  # the rescan thread looks at least every 5 s
    line = next(x for x in sx.err if "the kernel dropped" in x)
    assert "bufferSize / 256 KiB x kernelTimeout" in line and "0.01 s" in line, line
    assert sx.stop(signal.SIGTERM, timeout=60) == 0, sx.stderr
    rx.stop(signal.SIGTERM)
    st = json.loads((tmp_path / "sx.json").read_text())
    assert st["kernel_dropped"] > 0 and st["packets"] + st["kernel_dropped"] == 6000, st
    said = int(line.split("the kernel dropped ")[1].split()[0])
    assert 0 < said <= st["kernel_dropped"]
    got = received(tmp_path)
    assert len(got) == len(set(got)) == st["packets"]
    assert {d for _, _, d in got} <= {d for _, _, d in read_pcap_dpkt(src)}  # (replayed: other times)


# -- a burst far beyond the window -------------------------------------------------------------------

def test_burst_beyond_the_window_arrives_whole(veth, procs, tmp_path):
    """300 MB of incompressible frames at 100 kpps while the receiver is down: far more than the
    32 MiB window; the default spool holds them and everything arrives once it is back."""
    src = tmp_path / "big.pcap"
    traffic.write_random_udp_pcap(str(src), 50000, size=1514)
    port = free_port()
    # a key: for the 30 s with no receiver nothing else listening on the port later (another
    # suite's receiver, run side by side) can acknowledge this sensor's frames
    key = tmp_path / "key"
    key.write_text(f"burst-{os.getpid()}-{time.time_ns()}\n")
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer, "--sensor-id", "burst",
                "--auth-key-file", str(key), "--stats-json", str(tmp_path / "sx.json")])
    sx.wait_for("capturing on")
    veth.replay(src, pps=100000, loop=4)  # 200,000 frames, 303 MB
    spool = Path(os.environ["PKTSTREAM_STATE_DIR"]) / "spool" / "burst"
    wait_until(lambda: sum(1 for p in spool.glob("*.frame")) > 100, 30, "frames in the default spool")
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--auth-key-file", str(key),
                "-w", str(tmp_path / "out.pcap")])
    rx.wait_for("listening on")
    sx.wait_for("connected to receiver", timeout=30)
    assert sx.stop(signal.SIGTERM, timeout=90) == 0, sx.stderr
    td.stop()
    rx.stop(signal.SIGTERM)
    st = json.loads((tmp_path / "sx.json").read_text())
    assert st["spooled_batches"] > 100 and st["window_dropped_packets"] == 0
    got, ref_pkts = received(tmp_path), read_pcap_dpkt(ref)
    # every packet the sensor captured arrived, once; on a loaded machine the kernel may drop
    # a few for tcpdump or the sensor (counted there, not a delivery loss): what tcpdump kept
    # arrived too, and the sensor's captured + kernel-dropped packets are all 200,000
    assert len(set(got)) == len(got) == st["packets"]
    assert st["packets"] + st["kernel_dropped"] == 200000
    assert set(ref_pkts) - set(got) == set() or st["kernel_dropped"] > 0
    assert not list(spool.glob("*.frame"))  # acknowledged frames leave the spool


# -- stopping while the receiver is unreachable ---------------------------------------------------------

def _fake_receiver(port: int, answer: Callable[[socket.socket, int], None] | None = None
                   ) -> tuple[socket.socket, threading.Thread, list[int]]:
    """Accepts connections, lets ``answer(connection, n)`` talk to the n-th (1, 2, ...; default:
    nothing), then closes it; counts them. Not a pktstream receiver."""
    srv = socket.create_server(("127.0.0.1", port))
    accepted = [0]

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            accepted[0] += 1
            if answer is not None:
                try:
                    c.settimeout(5)
                    answer(c, accepted[0])
                except OSError:
                    pass
            c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t, accepted


def _bad_json_challenge(c: socket.socket, n: int) -> None:
    """Answer a HELLO with a CHALLENGE whose JSON Python's parser refuses without a
    JSONDecodeError (60,000 nested brackets, a 5000-digit number, alternately): what a process
    that took the receiver's port, or a man in the middle without TLS, can send."""
    c.recv(65536)  # the HELLO
    c.sendall(P.encode(P.FrameType.CHALLENGE, b"[" * 60000 if n % 2 else b'{"nonce": ' + b"1" * 5000 + b"}"))
    c.recv(65536)


@pytest.mark.parametrize("peer", ["nothing listening", "not a pktstream receiver", "unparsable JSON", "wrong key"])
def test_stop_with_unreachable_receiver_is_quiet_and_fails(veth, procs, tmp_path, peer):
    """SIGTERM while the receiver cannot be reached (refused, not pktstream, wrong key): a handful
    of attempts during the 10 s drain (no storm), and exit status 3 naming the unacknowledged frames.
    A peer answering in JSON the parser refuses is one more such receiver (it made the sensor exit)."""
    port = free_port()
    extra: list[str] = []
    srv = None
    accepted = [0]
    if peer == "not a pktstream receiver":
        srv, _, accepted = _fake_receiver(port)
    elif peer == "unparsable JSON":
        srv, _, accepted = _fake_receiver(port, _bad_json_challenge)
    elif peer == "wrong key":
        (tmp_path / "rk").write_text("receiver-key-1234567890\n")
        (tmp_path / "sk").write_text("another-key-0987654321\n")
        rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--auth-key-file", str(tmp_path / "rk"),
                    "-w", str(tmp_path / "out.pcap"), "--stats-json", str(tmp_path / "rx.json")])
        rx.wait_for("listening on")
        extra = ["--auth-key-file", str(tmp_path / "sk")]
    src = tmp_path / "t.pcap"
    traffic.write_pcap(str(src), 200)
    sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer, "--sensor-id", "quiet",
                "--stats-json", str(tmp_path / "sx.json"), *extra])
    sx.wait_for("capturing on")
    veth.replay(src, pps=2000)
    # at least one failed attempt was reported (two from a peer that made the sensor exit before)
    sx.wait_for("receiver 127.0.0.1", count=2 if peer == "unparsable JSON" else 1)
    t0 = time.monotonic()
    code = sx.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - t0
    if srv is not None:
        srv.close()
    st = json.loads((tmp_path / "sx.json").read_text())
    attempts = st["connection_failures"] + st["auth_failures"]
    assert code == 3, sx.stderr
    assert "frames were not acknowledged" in sx.stderr and "kept in the spool" in sx.stderr
    assert st["exit"]["unacked_frames"] > 0 and st["exit"]["spooled_frames"] == st["exit"]["unacked_frames"]
    assert attempts <= 25, f"{attempts} connection attempts"
    assert len(sx.stderr.splitlines()) < 40, sx.stderr
    assert took < 25  # the drain deadline (10 s) ends it; bound only against a hang
    if peer in ("not a pktstream receiver", "unparsable JSON"):
        assert accepted[0] <= 15 and "is it a pktstream receiver" in sx.stderr
    if peer == "unparsable JSON":
        assert accepted[0] >= 2 and "Traceback" not in sx.stderr
    if peer == "wrong key":
        assert "key differs from the receiver's key" in sx.stderr
        rx.stop(signal.SIGTERM)
        assert "authentication failed: sensor 'quiet' refused this receiver: the keys differ" in rx.stderr


def test_restarted_sensor_sends_what_its_spool_kept(veth, procs, tmp_path):
    """What a sensor could not deliver before it stopped goes out from its default spool when
    it runs again: nothing lost across a sensor restart with an unreachable receiver."""
    port = free_port()
    src = tmp_path / "t.pcap"
    traffic.write_pcap(str(src), 500)
    ref = tmp_path / "ref.pcap"
    td = start_tcpdump(procs, veth.outer, ref)
    key = tmp_path / "key"  # (no other suite's receiver on this port can take the frames)
    key.write_text(f"again-{os.getpid()}-{time.time_ns()}\n")
    cmd = [*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer, "--sensor-id", "again",
           "--auth-key-file", str(key)]
    sx = procs(cmd)
    sx.wait_for("capturing on")
    veth.replay(src, pps=5000)
    assert sx.stop(signal.SIGTERM, timeout=30) == 3
    td.stop()
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--auth-key-file", str(key),
                "-w", str(tmp_path / "out.pcap")])
    rx.wait_for("listening on")
    sx2 = procs(cmd)
    sx2.wait_for("connected to receiver")
    assert sx2.stop(signal.SIGTERM, timeout=30) == 0, sx2.stderr
    rx.stop(signal.SIGTERM)
    assert_exactly(received(tmp_path), read_pcap_dpkt(ref))


# -- an interface that goes away and comes back ----------------------------------------------------------

def test_interface_lost_and_back_is_reopened(procs, tmp_path):
    """The named interface disappears and is created again under the same name: the sensor
    reports it, reopens it and streams what arrives after; both halves reach the receiver."""
    src = tmp_path / "t.pcap"
    traffic.write_pcap(str(src), 300)
    port = free_port()
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "-w", str(tmp_path / "out.pcap")])
    rx.wait_for("listening on")
    link = Veth(prefix="pl")
    try:
        sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", link.outer, "--sensor-id", "flappy",
                    "--max-wait", "0.05", "--stats-json", str(tmp_path / "sx.json")])
        sx.wait_for("capturing on")
        link.replay(src, pps=3000)
        # what the kernel still holds when an interface is destroyed is gone with it: remove
        # it once the first 300 packets reached the receiver
        wait_until(lambda: packets_in(tmp_path / "out.pcap.part") >= 300, 30, "the first half at the receiver")
        name, ns = link.outer, link.ns
        link.remove()  # the interface is gone
        sx.wait_for(f"capture on {name} stopped")
        # the same names again
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", link.inner], check=True)
        subprocess.run(["ip", "link", "set", link.inner, "netns", ns], check=True)
        for cmd in (["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], ["ip", "link", "set", name, "up"],
                    ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{link.inner}.disable_ipv6=1"],
                    ["ip", "-n", ns, "link", "set", link.inner, "up"]):
            subprocess.run(cmd, check=True)
        wait_link_up(name)
        wait_link_up(link.inner, ns)
        sx.wait_for(f"capture on {name} resumed", timeout=30)
        link.replay(src, pps=3000)
        st_wait = tmp_path / "sx.json"
        assert sx.stop(signal.SIGTERM, timeout=30) == 0, sx.stderr
    finally:
        link.remove()
    rx.stop(signal.SIGTERM)
    st = json.loads(st_wait.read_text())
    assert st["interfaces"][name]["failures"] == 1 and st["interfaces"][name]["error"] is None
    got = received(tmp_path)
    assert len(got) == 600 and len(set(got)) == 600


# -- identities and sequence numbers -----------------------------------------------------------------------

def test_second_sensor_with_the_same_id_is_refused(veth, procs, tmp_path):
    """Two live sensors with one id do not interleave: the second is refused with a clear
    reason on both sides, the first goes on streaming."""
    port = free_port()
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "-w", str(tmp_path / "out.pcap"),
                "--stats-json", str(tmp_path / "rx.json")])
    rx.wait_for("listening on")
    base = [*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "-i", veth.outer, "--sensor-id", "twin",
            "--heartbeat", "0.5"]
    first = procs([*base, "--spool-dir", str(tmp_path / "s1")])
    first.wait_for("connected to receiver")
    second = procs([*base, "--spool-dir", str(tmp_path / "s2")])
    second.wait_for("is already connected from")
    second.stop(signal.SIGTERM)
    assert "connected to receiver" not in second.stderr
    assert first.stop(signal.SIGTERM) == 0
    rx.stop(signal.SIGTERM)
    assert "two sensors with one id?" in rx.stderr
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["duplicate_id_refusals"] >= 1 and st["sensors"]["twin"]["connections"] == 1, rx.stderr


def test_two_sensors_cannot_share_a_spool(veth, procs, tmp_path):
    first = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{free_port()}", "-i", veth.outer,
                   "--sensor-id", "same"])
    first.wait_for("capturing on")
    second = subprocess.run([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{free_port()}", "-i", veth.outer,
                             "--sensor-id", "same"], capture_output=True, text=True, timeout=30)
    assert second.returncode != 0
    assert "is in use by another sensor on this host" in second.stderr and "Traceback" not in second.stderr
    first.stop(signal.SIGTERM)


def test_sequence_numbers_far_ahead_are_refused(procs, tmp_path):
    """A peer with the key cannot push a sensor's sequence number to the end of the range (its
    real frames would then pass for duplicates): such a frame closes the session, counted."""
    from test_security import Peer, _data, _records
    port = free_port()
    (tmp_path / "key").write_text("shared-key-for-everyone\n")
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--auth-key-file", str(tmp_path / "key"),
                "-w", str(tmp_path / "out.pcap"), "--stats-json", str(tmp_path / "rx.json")])
    rx.wait_for("listening on")
    key = b"shared-key-for-everyone"
    for bad in ((1 << 64) - 1, time.time_ns() // 1000 + 2 * P.SEQ_AHEAD_US):
        peer = Peer(port)
        assert peer.handshake(key, sensor_id="victim").type == P.FrameType.WELCOME
        peer.send(_data(bad, _records(3)))
        frames = []
        while (f := peer.recv_frame()) is not None:
            frames.append(f)
        peer.close()
        assert frames and frames[-1].type == P.FrameType.ERROR and "ahead" in frames[-1].json()["reason"]
    honest = Peer(port)
    assert honest.handshake(key, sensor_id="victim").type == P.FrameType.WELCOME
    now = time.time_ns() // 1000
    honest.send(_data(now, _records(4)))
    ack = honest.recv_frame()
    assert ack.type == P.FrameType.ACK and ack.seq == now
    honest.close()
    rx.stop(signal.SIGTERM)
    st = json.loads((tmp_path / "rx.json").read_text())
    assert st["sensors"]["victim"]["packets"] == 4 and st["protocol_errors"] == 2


def test_a_rejected_frame_is_counted_and_acknowledged_and_the_session_goes_on(procs, tmp_path):
    """A well-framed DATA frame that cannot be written (an interface index the sensor never
    announced, records longer than the interface's snap length -- e.g. spooled before a restart
    with a smaller one) is rejected: counted per sensor, acknowledged in order, and the frames
    behind it are delivered. (Closing the session would have the sensor resend it forever.)"""
    import pktstream
    from test_security import Peer, _data, _records
    port = free_port()
    (tmp_path / "key").write_text("shared-key-for-everyone\n")
    rx = procs([*PKTSTREAM, "receiver", "--listen", f"127.0.0.1:{port}", "--auth-key-file", str(tmp_path / "key"),
                "-w", str(tmp_path / "out.pcap"), "--stats-json", str(tmp_path / "rx.json")])
    rx.wait_for("listening on")
    peer = Peer(port)
    assert peer.handshake(b"shared-key-for-everyone", sensor_id="s1").type == P.FrameType.WELCOME
    now = time.time_ns() // 1000
    peer.send(_data(now, _records(4)))                    # delivered
    three = _records(3)
    peer.send(P.encode(P.FrameType.DATA, three, flags=P.Flags.STORED, seq=now + 1, iface=7, raw_len=len(three),
                       count=3))                          # an interface index it never announced
    peer.send(_data(now + 2, _records(2, caplen=3000)))   # caplen over the interface's snaplen
    peer.send(_data(now + 3, _records(5)))                # delivered
    acked = 0
    while acked < now + 3:
        f = peer.recv_frame()
        assert f is not None and f.type == P.FrameType.ACK, f
        acked = f.seq
    # the last frame rejected while nothing else arrives (no flush follows): acknowledged all the same
    peer.send(_data(now + 4, _records(2, caplen=3000)))
    f = peer.recv_frame()
    assert f is not None and f.type == P.FrameType.ACK and f.seq == now + 4, f
    peer.close()
    rx.stop(signal.SIGTERM)
    st = json.loads((tmp_path / "rx.json").read_text())["sensors"]["s1"]
    assert (st["packets"], st["rejected_frames"], st["rejected_packets"]) == (9, 3, 7)
    assert sum(len(b) for b in pktstream.read(tmp_path / "out.pcap")) == 9
    assert f"DATA seq {now + 1} rejected, 3 packets lost" in rx.stderr


# -- no unauthenticated receiver by accident -----------------------------------------------------------------

def test_unauthenticated_receiver_beyond_loopback_needs_consent(tmp_path):
    port = free_port()
    r = subprocess.run([*PKTSTREAM, "receiver", "--listen", f"0.0.0.0:{port}", "-w", str(tmp_path / "o.pcap")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "without authentication" in r.stderr and "--allow-unauthenticated" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("how", ["flag", "upstream yaml", "upstream yaml, auth disabled"])
def test_unauthenticated_receiver_starts_when_told(procs, tmp_path, how):
    port = free_port()
    if how == "flag":
        rx = procs([*PKTSTREAM, "receiver", "--listen", f"0.0.0.0:{port}", "--allow-unauthenticated",
                    "-w", str(tmp_path / "o.pcap")])
    else:  # PacketStreamer's receiver config without auth: starts as it did upstream, warned
        auth = "auth:\n  enable: false\n  key: \"\"\n" if how.endswith("disabled") else ""  # upstream's example
        (tmp_path / "r.yaml").write_text(f"input:\n  address: 0.0.0.0\n  port: {port}\n"
                                         f"output:\n  file:\n    path: {tmp_path / 'o.pcap'}\n{auth}")
        rx = procs([*PKTSTREAM, "receiver", "--config", str(tmp_path / "r.yaml")])
    rx.wait_for("listening on")
    rx.wait_for("no authentication")  # the warning follows the "listening" line (read by another thread)
    rx.stop(signal.SIGTERM)


# -- many sensors ------------------------------------------------------------------------------------------

async def _fake_sensor(port: int, sid: str, frames, until: float) -> tuple[int, int]:
    """A sensor speaking the protocol from recorded blocks, one block every 0.25 s until
    ``until``; returns (frames, packets) sent, all acknowledged."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(P.encode_json(P.FrameType.HELLO, {"sensor_id": sid, "hostname": sid, "nonce": os.urandom(32).hex(),
                                              "interfaces": [{"index": 0, "name": "eth0", "link_type": 1,
                                                              "snaplen": 262144}], "instance": sid}))
    await P.read_frame(r)
    w.write(P.encode_json(P.FrameType.AUTH, {"proof": ""}))
    welcome = (await P.read_frame(r)).json()
    seq = acked = welcome["last_seq"]
    sent = packets = 0
    loop = asyncio.get_running_loop()
    i = 0
    while loop.time() < until:
        payload, count, raw = frames[i % len(frames)]
        i += 1
        seq += 1
        w.write(P.encode(P.FrameType.DATA, payload, seq=seq, iface=0, count=count, raw_len=raw))
        sent += 1
        packets += count
        await w.drain()
        await asyncio.sleep(0.25)
    while acked < seq:
        f = await P.read_frame(r, max_payload=1 << 16, max_raw=0)
        if f.type == P.FrameType.ACK:
            acked = f.seq
    w.write(P.encode_json(P.FrameType.BYE, {"reason": "done"}))
    while (await P.read_frame(r, max_payload=1 << 16, max_raw=0)).type != P.FrameType.BYE:
        pass
    w.close()
    return sent, packets


def test_hundred_sensors_for_a_minute(procs, tmp_path):
    """100 sensors (simulated from recorded traffic) stream into one receiver for a minute:
    every packet is in its file, and the receiver's memory stays bounded."""
    import zstandard

    import pktstream
    src = tmp_path / "mix.pcap"
    traffic.write_pcap(str(src), 20000)
    c = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    frames = [(c.compress(b), len(b), b.nbytes) for b in pktstream.read(str(src), batch_bytes=64 << 10)]
    (tmp_path / "rx.yaml").write_text("connectionRate:\n  burst: 1000\n  seconds: 1\n")
    port = free_port()
    rx = procs([*PKTSTREAM, "receiver", "--config", str(tmp_path / "rx.yaml"), "--listen", f"127.0.0.1:{port}",
                "-w", str(tmp_path / "out.pcapng"), "--stats-json", str(tmp_path / "rx.json")])
    rx.wait_for("listening on")

    async def fleet():
        until = asyncio.get_running_loop().time() + 60
        return await asyncio.gather(*(_fake_sensor(port, f"sim-{i:03d}", frames, until) for i in range(100)))

    results = asyncio.run(fleet())
    status = Path(f"/proc/{rx.p.pid}/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    rx.stop(signal.SIGTERM)
    st = json.loads((tmp_path / "rx.json").read_text())
    sent_packets = sum(p for _, p in results)
    sent_bytes = sum(frames[i % len(frames)][2] for n, _ in results for i in range(n))
    assert len(st["sensors"]) == 100
    for i, (n, p) in enumerate(results):
        s = st["sensors"][f"sim-{i:03d}"]
        assert s["frames"] == n and s["packets"] == p and s["duplicate_frames"] == 0
    in_file = sum(len(b) for b in pktstream.read(str(tmp_path / "out.pcapng")))
    assert in_file == sent_packets
    # bounded: far below what went through (it is written out, not held)
    assert peak_kib * 1024 < 400 << 20 and peak_kib * 1024 < sent_bytes / 2, (peak_kib, sent_bytes)
