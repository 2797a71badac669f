"""Sensor interface selection and filters: PacketStreamer's pcapMode/capturePorts/ignorePorts
(as its docs promise), interfaces that appear later, and exclusion of its own stream."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from conftest import PKTSTREAM, free_port, pcap_count, read_pcap_dpkt, start_tcpdump, wait_pcap_count, wait_received
from pktstream.lab.netns import Veth
from pktstream.stream.sensor import build_filter
from test_stream import assert_same_packets, received, receiver_cmd, sensor_cmd


def test_build_filter_semantics():
    assert build_filter() == ""
    assert build_filter(pcap_mode="allow", ports=[443, 80]) == "(port 80 or port 443)"
    assert build_filter(pcap_mode="deny", ports=[22]) == "not (port 22)"
    assert build_filter(pcap_mode="all", ports=[22]) == ""  # all: every port
    f = build_filter(pcap_mode="allow", ports=[80], ignore_ports=[8080], bpf="tcp",
                     exclude=[("10.0.0.1", 8081), ("fd00::1", 8081)])
    # the self-exclusion guards every port (upstream's precedence bug let it guard only the first)
    assert f == ("(port 80) and not (port 8080) and (tcp) and not (host 10.0.0.1 and tcp port 8081)"
                 " and not (host fd00::1 and tcp port 8081)")


@pytest.mark.live
@pytest.mark.parametrize("mode,ports,ignore,tcpdump_filter", [
    ("allow", "80,53", "", "port 80 or port 53"),
    ("deny", "80", "", "not port 80"),
    ("all", "", "9999", "not port 9999"),
])
def test_pcap_modes_match_tcpdump(veth, procs, tmp_path, mixed_pcap, mode, ports, ignore, tcpdump_filter):
    port = free_port()
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap")))
    rx.wait_for("listening on")
    ref, everything = tmp_path / "ref.pcap", tmp_path / "all.pcap"
    td = start_tcpdump(procs, veth.outer, ref, tcpdump_filter)
    td_all = start_tcpdump(procs, veth.outer, everything)
    extra = ["--pcap-mode", mode]
    if ports:
        extra += ["--capture-ports", ports]
    if ignore:
        extra += ["--ignore-ports", ignore]
    sx = procs(sensor_cmd(port, veth.outer, *extra))
    sx.wait_for("connected to receiver")
    veth.replay(mixed_pcap, pps=20000)
    # how many the mode's filter passes: tcpdump's filter applied offline to everything seen
    wait_pcap_count(everything, 2000)
    td_all.stop()
    expected = tmp_path / "expected.pcap"
    subprocess.run(["tcpdump", "-r", str(everything), "-w", str(expected), tcpdump_filter], check=True,
                   capture_output=True)
    n = pcap_count(expected)
    wait_pcap_count(ref, n)
    wait_received(rx, n)
    assert sx.stop(signal.SIGTERM) == 0
    td.stop()
    rx.stop(signal.SIGTERM)
    ref_pkts = read_pcap_dpkt(ref)
    assert 0 < len(ref_pkts) < 2000
    assert_same_packets(received(tmp_path), ref_pkts)


@pytest.mark.live
def test_interfaces_that_appear_later_are_captured(procs, tmp_path):
    """All-interfaces mode: a veth created after the sensor started (a new container) is
    picked up and its traffic streamed."""
    from pktstream.lab import traffic
    port = free_port()
    # a port no other test process takes and no source port can be (free_port: outside the
    # ephemeral range): this captures every interface, where other tests' traffic runs
    dport = free_port()
    src = tmp_path / "t.pcap"
    traffic.write_random_udp_pcap(str(src), 500, size=300, dport=dport)
    rx = procs(receiver_cmd(port, "-w", str(tmp_path / "out.pcap")))
    rx.wait_for("listening on")
    # restrict to the test traffic: this machine's other interfaces carry unrelated packets
    sx = procs([*PKTSTREAM, "sensor", "--receiver", f"127.0.0.1:{port}", "--rescan-interval", "0.5",
                "--max-wait", "0.1", "--stats-json", str(tmp_path / "sx.json"),
                "udp", "dst", "port", str(dport), "and", "src", "host", "198.18.0.1"])  # (the test frames)
    sx.wait_for("connected to receiver")
    with Veth() as late:
        sx.wait_for(f"capturing on {late.outer}", timeout=10)
        ref = tmp_path / "ref.pcap"
        td = start_tcpdump(procs, late.outer, ref, f"udp dst port {dport} and src host 198.18.0.1")
        late.replay(src, pps=20000)
        wait_pcap_count(ref, 500)
        wait_received(rx, 500)
        td.stop()
        sx.stop(signal.SIGTERM)
        rx.stop(signal.SIGTERM)
        st = json.loads((tmp_path / "sx.json").read_text())
        assert st["interfaces"][late.outer]["packets"] == len(read_pcap_dpkt(ref)) > 0
    got = [d for _, _, d in received(tmp_path)]
    assert sorted(got) == sorted(d for _, _, d in read_pcap_dpkt(ref))


@pytest.mark.live
def test_own_stream_is_never_captured(procs, tmp_path, mixed_pcap):
    """The sensor captures the very interface its stream to the receiver leaves through: none
    of its own packets (either direction) come back, so there is no feedback loop."""
    with Veth() as link:
        port = 9000 + (free_port() % 1000)
        rx = procs(link.in_ns(*PKTSTREAM, "receiver", "--listen", f"{link.inner_ip}:{port}",
                              "--allow-unauthenticated", "-w", str(tmp_path / "out.pcap"),
                              "--stats-json", str(tmp_path / "rx.json"), "--stats-interval", "0.2"))
        rx.wait_for("listening on")
        ref = tmp_path / "ref.pcap"
        td = start_tcpdump(procs, link.outer, ref, f"not (tcp port {port})")
        sx = procs([*PKTSTREAM, "sensor", "--receiver", f"{link.inner_ip}:{port}", "-i", link.outer,
                    "--max-wait", "0.1"])
        sx.wait_for("connected to receiver")
        link.replay(mixed_pcap, pps=20000)
        wait_received(rx, 2000)
        wait_pcap_count(ref, 2000)
        sx.stop(signal.SIGTERM)
        td.stop()
        rx.stop(signal.SIGTERM)
    got = received(tmp_path)
    import dpkt
    for _, _, d in got:
        eth = dpkt.ethernet.Ethernet(d)
        if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.tcp.TCP):
            assert port not in (eth.data.data.sport, eth.data.data.dport), "captured its own stream"
    # everything else on the link was captured (replayed frames, plus ARP the stream caused)
    assert_same_packets(got, read_pcap_dpkt(ref))
