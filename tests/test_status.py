"""``pktstream receiver --status``: the renderer, and the live table on a real pseudo-terminal
while a real sensor streams real traffic; progress bars of convert/merge on a terminal."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading

import pytest

from conftest import PKTSTREAM, free_port, wait_until
from pktstream.lab import traffic
from pktstream.stream.status import render_status
from test_stream import receiver_cmd, sensor_cmd

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _sensor(packets, raw, connected=True, kernel=0, window=0):
    return {"connected": connected, "packets": packets, "raw_bytes": raw, "kernel_dropped": kernel,
            "interface_dropped": 0, "ring_drops": 0, "window_dropped_packets": window, "unacked_frames": 1}


def test_render_status_rates_and_drops():
    prev = {"sensors": {"web-1": _sensor(1000, 2_000_000)}, "outputs": {}, "connections": 1}
    cur = {"sensors": {"web-1": _sensor(3000, 6_000_000, kernel=7),
                       "db-1": _sensor(10, 1000, connected=False, window=3)},
           "outputs": {"file:/x.pcapng": {"packets": 3010, "dropped_packets": 0, "failures": 2, "queued": 0}},
           "connections": 1, "auth_failures": 4}
    lines = render_status(cur, prev, 2.0)
    assert lines[0].split() == ["sensor", "state", "pkts/s", "MB/s", "packets", "kernel", "ifdrop", "ring",
                                "window"]
    assert lines[1].split() == ["db-1", "DOWN", "0", "0.00", "10", "0", "0", "0", "3"]  # no rate yet
    assert lines[2].split() == ["web-1", "up", "1000", "2.00", "3000", "7", "0", "0", "0"]
    assert all(len(line) <= 79 for line in lines[:3])
    assert lines[3] == "outputs: file:/x.pcapng 3010 written, 2 failures | connections 1 | auth failures 4"
    assert render_status({"sensors": {}, "outputs": {}}, None, 1.0)[1] == "(no sensor has connected yet)"


def _status_rows(chunks: list[bytes], sensor: str) -> list[list[str]]:
    screen = b"".join(list(chunks)).decode(errors="replace")
    return [line.split() for line in ANSI.sub("", screen).replace("\r", "").splitlines()
            if line.startswith(sensor)]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _read_pty(fd: int, chunks: list[bytes], stop: threading.Event) -> None:
    while not stop.is_set():
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the other side closed
                return
            if not data:
                return
            chunks.append(data)


@pytest.mark.live
def test_receiver_status_on_a_terminal(veth, tmp_path):
    port = free_port()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # 100 columns
    rx = subprocess.Popen(receiver_cmd(port, "-w", str(tmp_path / "out.pcap"), "--status"),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    stop = threading.Event()
    reader = threading.Thread(target=_read_pty, args=(master, chunks, stop), daemon=True)
    reader.start()
    sx = None
    try:
        sx = subprocess.Popen(sensor_cmd(port, veth.outer, "--sensor-id", "status-1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        src = tmp_path / "t.pcap"
        traffic.write_pcap(str(src), 6000)
        wait_until(lambda: _status_rows(chunks, "status-1"), 30,
                   "the sensor's status row (connected; its capture is open)")
        veth.replay(src, pps=3000)  # 2 s of traffic: at least one redraw shows a rate
        # a redraw with every packet, then (sensor gone) one showing it DOWN
        wait_until(lambda: any(len(r) > 4 and r[4] == "6000" for r in _status_rows(chunks, "status-1")), 30,
                   "a status row with all 6000 packets")
        sx.send_signal(signal.SIGTERM)
        assert sx.wait(20) == 0
        wait_until(lambda: any(len(r) > 1 and r[1] == "DOWN" for r in _status_rows(chunks, "status-1")), 30,
                   "a status row showing the sensor DOWN")
        rx.send_signal(signal.SIGTERM)
        assert rx.wait(20) == 0
    finally:
        for p in (sx, rx):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        stop.set()
        reader.join(5)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen  # redrawn in place
    rows = [line.split() for line in ANSI.sub("", screen).replace("\r", "").splitlines()
            if line.startswith("status-1")]
    assert len(rows) >= 3
    rates = [float(r[2]) for r in rows]
    assert max(rates) > 1000  # ~3000 pkts/s while the replay ran
    last = rows[-1]
    assert last[1] == "DOWN" and last[4] == "6000" and last[5:9] == ["0", "0", "0", "0"]
    assert "receiver listening on" in screen  # log lines still appear, above the table


def test_receiver_status_without_terminal(tmp_path):
    """Not live: a receiver on loopback needs no privilege."""
    port = free_port()
    rx = subprocess.Popen(receiver_cmd(port, "-w", str(tmp_path / "o.pcap"), "--status"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # the display is decided at start, before listening: once it accepts, it is on or off for good
        wait_until(lambda: _port_open(port) or rx.poll() is not None, 30, "the receiver to listen")
    finally:
        rx.send_signal(signal.SIGTERM)
    err = rx.communicate(timeout=20)[1].decode()
    assert rx.returncode == 0
    assert "stderr is not a terminal" in err and "\x1b[" not in err and "pkts/s" not in err


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_offline_progress_on_a_terminal(tmp_path, command):
    """Long offline work shows a progress bar on a terminal (and nothing when piped); it ends
    full however fast the work was (redraws are at most every 0.1 s: a fast conversion drew
    0.5 % and 47 % only, and this test failed)."""
    src = tmp_path / "big.pcap"
    traffic.write_udp_pcap(str(src), 200_000, size=1000)  # ~200 MB: a few progress redraws
    args = ["convert", str(src), str(tmp_path / "o.pcapng")] if command == "convert" else \
        ["merge", str(tmp_path / "o.pcap"), str(src)]
    master, slave = pty.openpty()
    p = subprocess.Popen([*PKTSTREAM, *args], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    stop = threading.Event()
    reader = threading.Thread(target=_read_pty, args=(master, chunks, stop), daemon=True)
    reader.start()
    try:
        assert p.wait(120) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        reader.join(30)  # reads to the end: EOF/EIO once the child has exited
        stop.set()
        reader.join(5)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    label = "converting" if command == "convert" else "merging"
    pcts = [float(x) for x in re.findall(label + r" \[#*\s*\]\s+([\d.]+)%", text)]
    assert len(pcts) >= 2 and pcts == sorted(pcts) and pcts[-1] == 100.0, text[-500:]
    piped_args = ["convert", str(src), str(tmp_path / "p.pcapng")] if command == "convert" else \
        ["merge", str(tmp_path / "p.pcap"), str(src)]
    piped = subprocess.run([*PKTSTREAM, *piped_args], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
