"""Start-up stays light: ``import pktstream``, ``pktstream --version``, reading a file through
Capture and a running sensor import neither numpy nor asyncio nor importlib.metadata (issue 16:
start-up time and sensor memory). Each check runs in a fresh interpreter (a subprocess) and
looks at what it really imported: ``sys.modules``, or ``-X importtime`` for the CLI.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import free_port, received_counts, wait_received, wait_until
from pktstream.lab import traffic

HEAVY = ("numpy", "asyncio", "importlib.metadata")
PY = sys.executable


def heavy(modules) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def run_script(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    out = subprocess.run([PY, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def imported_by(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", line)
        if m:
            names.add(m.group(1))
    return names


def test_import_pktstream_is_light():
    got = run_script("""
        import json, sys
        import pktstream
        print(json.dumps(sorted(sys.modules)))
    """)
    assert "pktstream._capture" in got
    assert heavy(got) == []


def test_numpy_comes_with_the_first_index_array(tmp_path):
    """The check can fail: the same kind of run sees numpy once a batch's arrays are used, and
    the arrays keep their dtypes and values."""
    pcap = tmp_path / "u.pcap"
    traffic.write_udp_pcap(str(pcap), 5, size=100)
    got = run_script(f"""
        import json, sys
        import pktstream
        with pktstream.Capture.open_offline({str(pcap)!r}) as cap:
            batch = next(iter(cap))
            before = sorted(sys.modules)
            ts = batch.ts_ns
            out = dict(before=before, after=sorted(sys.modules), dtypes=[str(a.dtype) for a in
                       (batch.ts_ns, batch.caplen, batch.wirelen, batch.offset, batch.filter("udp"))],
                       caplen=batch.caplen.tolist(), mask=batch.filter("udp").tolist(),
                       writeable=ts.flags.writeable)
            batch.release()
        print(json.dumps(out))
    """)
    assert heavy(got["before"]) == []
    assert "numpy" in got["after"]
    assert got["dtypes"] == ["int64", "uint32", "uint32", "int64", "bool"]
    assert got["caplen"] == [100] * 5 and got["mask"] == [True] * 5 and got["writeable"] is False


def test_offline_capture_and_sensor_objects_are_light(tmp_path):
    """Reading a file through Capture (len, bytes, stats) and constructing a Sensor with its
    CLI parser: no numpy, no asyncio (any user: no live capture)."""
    pcap = tmp_path / "u.pcap"
    traffic.write_udp_pcap(str(pcap), 50, size=200)
    got = run_script(f"""
        import json, sys
        import pktstream
        from pktstream.cli import build_parser
        from pktstream.cli.stream import build_sensor
        n = 0
        with pktstream.Capture.open_offline({str(pcap)!r}) as cap:
            for batch in cap:
                n += len(batch)
                assert len(bytes(batch)) == batch.nbytes
                batch.release()
        args = build_parser(only_command="sensor").parse_args(
            ["sensor", "--receiver", "127.0.0.1:9", "-i", "lo", "--spool-dir", "", "udp"])
        sensor = build_sensor(args)
        print(json.dumps(dict(n=n, modules=sorted(sys.modules))))
    """)
    assert got["n"] == 50
    assert "pktstream.stream.sensor" in got["modules"]
    assert heavy(got["modules"]) == []


def test_version_command_is_light():
    out = subprocess.run([PY, "-X", "importtime", "-m", "pktstream", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pktstream 0.") and "libpcap version" in out.stdout and "\nzstd " in out.stdout
    names = imported_by(out.stderr)
    assert "pktstream._capture" in names
    assert heavy(names) == []


@pytest.mark.live
def test_running_sensor_is_light(procs, tmp_path):
    """``pktstream sensor`` on lo delivers packets to a receiver without ever importing numpy
    or asyncio (the receiver, another process, needs asyncio); SIGUSR1 prints its counters."""
    port, target = free_port(), free_port()
    rx = procs([PY, "-m", "pktstream", "receiver", "--listen", f"127.0.0.1:{port}", "-w",
                str(tmp_path / "out.pcap"), "--stats-interval", "0.2"])
    rx.wait_for("listening on")
    sx = procs([PY, "-X", "importtime", "-m", "pktstream", "sensor", "--receiver", f"127.0.0.1:{port}", "-i", "lo",
                "--sensor-id", "lean", "--spool-dir", "", f"udp and dst port {target}"])
    sx.wait_for("connected to receiver")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        def sent_and_received() -> bool:
            s.sendto(b"x" * 64, ("127.0.0.1", target))  # one more each look: a capture that starts late still sees some
            return received_counts(rx).get("lean", 0) >= 3
        wait_until(sent_and_received, 60, "packets from the sensor at the receiver")
    wait_received(rx, 3, "lean")
    # kill -USR1 prints the counters so far (like tcpdump), and the sensor goes on
    sx.p.send_signal(signal.SIGUSR1)
    sx.wait_for("frames unacknowledged, connected")
    line = next(x for x in sx.err if "frames unacknowledged, connected" in x)
    assert int(re.search(r"pktstream sensor: (\d+) packets captured, 0 dropped by kernel, 0 by ring", line)[1]) >= 3
    assert sx.p.poll() is None
    assert sx.stop() == 0, sx.stderr
    names = imported_by(sx.stderr)
    assert "pktstream.stream.sensor" in names and "zstandard" in names
    assert heavy(names) == [], heavy(names)


def test_version_file_is_the_package_version():
    """pyproject.toml takes the version from pktstream/_version.py (one place)."""
    import pktstream
    from pktstream import _version
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "pktstream._version.__version__"' in text
    assert pktstream.__version__ == _version.__version__
