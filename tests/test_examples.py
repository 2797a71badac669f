"""The use-case examples (examples/) and the forensics notebook, run against real traffic:
veth pairs in namespaces the tests create, real servers (http.server, a UDP DNS responder) and
real clients (urllib, curl, sockets); tshark is the reference where one is needed."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import free_port, read_pcap_dpkt, tshark_fields, wait_received, wait_until
from pktstream.lab.netns import Veth
from test_stream import receiver_cmd, sensor_cmd

if TYPE_CHECKING:
    import nbformat

pytestmark = pytest.mark.live

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# -- servers and clients ------------------------------------------------------------------------

DNS_RESPONDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(2048)
    if len(q) >= 12:   # NXDOMAIN: the query echoed with QR=1, RA=1, RCODE=3
        s.sendto(q[:2] + bytes([q[2] | 0x80, 0x83]) + q[4:], peer)
"""


class Servers:
    """Servers inside a veth's namespace, stopped by PID at teardown."""

    def __init__(self, veth: Veth, tmp_path: Path) -> None:
        self.veth = veth
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []

    def http(self, port: int, protocol: str = "HTTP/1.0") -> None:
        root = self.tmp / f"www{port}"
        root.mkdir()
        (root / "index.html").write_text("<h1>hello</h1>\n")
        (root / "data.json").write_text(json.dumps({"k": list(range(500))}))
        p = subprocess.Popen(self.veth.in_ns(sys.executable, "-m", "http.server", str(port), "--bind",
                                             self.veth.inner_ip, "--protocol", protocol), cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)

        def accepting() -> bool:
            assert p.poll() is None, "http.server exited"
            try:
                with socket.create_connection((self.veth.inner_ip, port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_until(accepting, 30, f"http.server to accept on port {port}")

    def dns(self) -> None:
        p = subprocess.Popen(self.veth.in_ns(sys.executable, "-c", DNS_RESPONDER, self.veth.inner_ip),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        assert p.stdout.readline() == b"ready\n"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stdout:
                p.stdout.close()


@pytest.fixture
def servers(veth, tmp_path):
    s = Servers(veth, tmp_path)
    yield s
    s.stop()


def dns_query(name: str, qid: int) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def resolve(server: str, names: list[str]) -> int:
    """Send real DNS queries over UDP; returns how many were answered."""
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for k, name in enumerate(names):
            s.sendto(dns_query(name, k + 1), (server, 53))
            reply, _ = s.recvfrom(2048)
            answered += reply[:2] == struct.pack("!H", k + 1) and reply[3] & 0x0F == 3
    return answered


def http_get(url: str, **headers: str) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def scan(host: str, ports: range) -> int:
    """A connect() scan; returns how many ports refused (all of them: nothing listens)."""
    refused = 0
    for port in ports:
        with socket.socket() as s:
            s.settimeout(1)
            refused += s.connect_ex((host, port)) != 0
    return refused


class Lines:
    """Collect a process's stdout lines in a thread; wait for a predicate on them."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._t.start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
        stream.close()

    def wait(self, pred, timeout: float = 30, what: str = "") -> list[str]:
        return wait_until(lambda: [line for line in list(self.lines) if pred(line)], timeout,
                          f"{what}; lines so far: {self.lines[-20:]}")

    def join(self) -> None:
        self._t.join(10)


def example(name: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name), *args]


# -- threat hunting -------------------------------------------------------------------------------

def test_detector_alerts_on_scan_and_dns_tunnel_not_on_benign(veth, servers, procs):
    servers.http(8080)
    servers.dns()
    port = free_port()
    det = procs(example("detector.py", "--listen", f"127.0.0.1:{port}", "--report", "0.2"),
                stdout=subprocess.PIPE)
    out = Lines(det.p.stdout)
    det.wait_for("receiver listening on")
    sx = procs(sensor_cmd(port, veth.outer, "--sensor-id", "hunter-1"))
    sx.wait_for("connected to receiver")
    ip = veth.inner_ip

    # benign: web browsing and ordinary name lookups
    benign_names = ["www.example.com", "mail.example.com", "api.example.org", "docs.python.org"] * 3
    assert resolve(ip, benign_names) == len(benign_names)
    assert [http_get(f"http://{ip}:8080/{p}") for p in ("", "index.html", "data.json", "missing")] == \
        [200, 200, 200, 404]
    for _ in range(6):
        assert http_get(f"http://{ip}:8080/index.html") == 200
    # the detector has seen every benign query (and the web traffic) and raised nothing
    # two reports at that count: the second is written after everything up to it was examined
    det.wait_for(f"dns_queries={len(benign_names)} ", count=2)
    report = [line for line in det.err if f"dns_queries={len(benign_names)} " in line][-1]
    assert "alerts=0" in report, report
    assert not [line for line in out.lines if line.startswith("ALERT")], out.lines

    # malicious: a port scan, then data leaving through DNS names
    assert scan(ip, range(20000, 20060)) == 60
    alerts = out.wait(lambda s: s.startswith("ALERT port-scan"), what="port-scan alert")
    assert f"src={veth.outer_ip} " in alerts[0] and "hosts=1" in alerts[0] and "ports=" in alerts[0]
    rnd = random.Random(7)
    leak = [base64.b32encode(rnd.randbytes(20)).decode().rstrip("=").lower() + f".x{k}.exfil.test"
            for k in range(30)]
    assert resolve(ip, leak) == 30
    alerts = out.wait(lambda s: s.startswith("ALERT dns-tunnel"), what="dns-tunnel alert")
    assert f"src={veth.outer_ip} domain=exfil.test" in alerts[0]
    assert sx.p.poll() is None  # alerts arrived while the sensor was still streaming

    assert sx.stop(signal.SIGTERM) == 0
    assert det.stop(signal.SIGINT) == 0
    out.join()
    alerts = [line for line in out.lines if line.startswith("ALERT")]
    assert len(alerts) == 2, alerts  # one per incident and window, nothing for benign traffic
    assert not any(n in " ".join(alerts) for n in ("example.com", "example.org", "python.org"))
    summary = [line for line in det.err if "alerts;" in line][-1]
    assert f"{len(benign_names) + 30} DNS queries, 2 alerts" in summary
    assert "dropped: 0 by the detector (fell behind), 0 by the sensors" in summary


def test_hunt_tshark_prints_requests_and_queries_live(veth, servers, procs):
    servers.http(8080)
    servers.dns()
    port = free_port()
    hunt = procs(example("hunt_tshark.py", "--listen", f"127.0.0.1:{port}", "--fields"), stdout=subprocess.PIPE)
    out = Lines(hunt.p.stdout)
    hunt.wait_for("listening on")
    sx = procs(sensor_cmd(port, veth.outer))
    sx.wait_for("connected to receiver")
    ip = veth.inner_ip
    paths = ["/index.html", "/data.json?x=1", "/nothing-here"]
    assert [http_get(f"http://{ip}:8080{p}") for p in paths] == [200, 200, 404]
    assert resolve(ip, ["intranet.example.com", "updates.example.net"]) == 2
    out.wait(lambda s: "updates.example.net" in s, what="the DNS query in tshark's output")
    assert sx.p.poll() is None  # tshark printed it while the sensor was still streaming
    assert sx.stop(signal.SIGTERM) == 0
    assert hunt.stop(signal.SIGINT) == 0
    out.join()
    # fields: time, ip.src, ip.dst, protocol, dns.qry.name, method, host, uri, sni
    rows = [line.split("\t") for line in out.lines]
    assert all(len(r) == 9 for r in rows), rows
    http_rows = [r for r in rows if r[5]]
    assert [(r[1], r[2], r[5], r[6], r[7]) for r in http_rows] == \
        [(veth.outer_ip, ip, "GET", f"{ip}:8080", p) for p in paths]
    dns_rows = [r for r in rows if r[4]]
    assert [(r[1], r[2], r[4]) for r in dns_rows] == \
        [(veth.outer_ip, ip, "intranet.example.com"), (veth.outer_ip, ip, "updates.example.net")]
    assert len(rows) == len(http_rows) + len(dns_rows)  # responses and other packets filtered out


def test_fifo_recipe_with_tshark(veth, procs, tmp_path, mixed_pcap):
    """docs/guide-threat-hunting.md: ``mkfifo F; pktstream receiver -w - > F &`` and an analyser
    reading F as a capture file (Suricata/Zeek ``-r F``; here tshark ``-r F``)."""
    fifo = tmp_path / "pkts.fifo"
    os.mkfifo(fifo)
    with open(tmp_path / "tshark.txt", "w") as out:
        tshark = subprocess.Popen(["tshark", "-r", str(fifo), "-l", "-n", "-T", "fields", "-e", "frame.len"],
                                  stdout=out, stderr=subprocess.DEVNULL)
    try:
        port = free_port()
        shell = " ".join(receiver_cmd(port, "-w", "-")) + ' > "$0"'
        rx = procs(["bash", "-c", "exec " + shell, str(fifo)])
        rx.wait_for("listening on")
        sx = procs(sensor_cmd(port, veth.outer))
        sx.wait_for("connected to receiver")
        veth.replay(mixed_pcap, pps=20000)
        wait_received(rx, 2000)
        assert sx.stop(signal.SIGTERM) == 0
        assert rx.stop(signal.SIGTERM) == 0
        assert tshark.wait(30) == 0
    finally:
        if tshark.poll() is None:
            tshark.kill()
            tshark.wait()
    lens = (tmp_path / "tshark.txt").read_text().split()
    assert [int(x) for x in lens] == [w for _, w, _ in read_pcap_dpkt(mixed_pcap)]


# -- debugging ----------------------------------------------------------------------------------

def test_debug_http_shows_requests_the_server_handled(veth, servers, procs, tmp_path):
    servers.http(8080, "HTTP/1.1")  # keep-alive: several requests on one connection
    servers.http(8081)  # same host, another port: must not show up
    dbg = procs(example("debug_http.py", "--port", "8080", "-i", veth.outer, "--json"), stdout=subprocess.PIPE)
    out = Lines(dbg.p.stdout)
    dbg.wait_for("capturing tcp port 8080")
    ip = veth.inner_ip
    assert http_get(f"http://{ip}:8081/index.html") == 200
    sent = [("GET", "/"), ("GET", "/index.html?user=alice&id=42"), ("GET", "/missing/page")]
    codes = [http_get(f"http://{ip}:8080{t}", **{"User-Agent": "pktstream-test/1"}) for _, t in sent]
    # curl: keep-alive (requests on one connection), a HEAD, a POST with a body, a Host header
    body = tmp_path / "body.txt"
    body.write_text("x" * 3000)
    code = ["-s", "-o", "/dev/null", "-w", "%{http_code}\\n"]
    curl = subprocess.run(["curl", "-s", "-w", "%{http_code}\\n", "-H", "Host: shop.example.test",
                           "-o", "/dev/null", f"http://{ip}:8080/data.json", "-o", "/dev/null", f"http://{ip}:8080/index.html",
                           "--next", *code, "-I", f"http://{ip}:8080/",
                           "--next", *code, "-H", "Expect:", "--data-binary", f"@{body}", f"http://{ip}:8080/upload"],
                          capture_output=True, text=True, timeout=30)
    assert curl.stdout.split() == ["200", "200", "200", "501"], curl.stderr
    out.wait(lambda s: '"POST"' in s and '"response"' in s, what="the POST's response")
    assert dbg.stop(signal.SIGINT) == 0
    out.join()
    events = [json.loads(line) for line in out.lines]
    reqs = [e for e in events if e["event"] == "request"]
    resps = [e for e in events if e["event"] == "response"]
    client_ports = {e["client"] for e in reqs}
    assert all(e["server"] == f"{ip}:8080" and e["client"].startswith(veth.outer_ip + ":") for e in events)
    got = [(e["method"], e["target"], e["host"]) for e in reqs]
    assert got == [(m, t, f"{ip}:8080") for m, t in sent] + [
        ("GET", "/data.json", "shop.example.test"), ("GET", "/index.html", "shop.example.test"),
        ("HEAD", "/", f"{ip}:8080"), ("POST", "/upload", f"{ip}:8080")]
    assert [e["user_agent"] for e in reqs[:3]] == ["pktstream-test/1"] * 3
    assert reqs[-1]["content_length"] == 3000
    # urllib: one connection per request; curl kept one connection open for its four requests
    assert len(client_ports) == 4 and len({e["client"] for e in reqs[3:]}) == 1
    assert [(e["method"], e["target"], e["status"]) for e in resps] == \
        [(m, t, c) for (m, t, _), c in zip(got, codes + [200, 200, 200, 501])]
    assert all(e["elapsed_ms"] >= 0 for e in resps)
    assert "debug_http: 7 requests" in dbg.stderr


# -- forensics notebook -------------------------------------------------------------------------

def run_notebook(cwd: Path, env: dict[str, str | None], monkeypatch) -> nbformat.NotebookNode:
    """Execute examples/forensics.ipynb top to bottom in a python3 kernel (nbclient)."""
    import nbclient
    import nbformat
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(EXAMPLES / "forensics.ipynb", as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def notebook_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def check_plots(out: Path) -> None:
    for name in ("timeline.png", "protocols.png", "top_talkers.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


DNS_DISPLAY_FILTER = "udp.port == 53 && !icmp && !icmpv6"  # tshark's view of the notebook's default BPF


def test_forensics_notebook_on_real_capture(veth, servers, procs, tmp_path, mixed_pcap, monkeypatch):
    """Three sensors, two receivers (a merged pcapng and per-sensor pcap.zst files), real HTTP
    and DNS plus a replayed mix; the notebook's numbers and its slice agree with tshark."""
    servers.http(8080)
    servers.dns()
    data = tmp_path / "data"
    data.mkdir()  # -w and --output-dir need an existing (parent) directory
    pa, pb = free_port(), free_port()
    rx_a = procs(receiver_cmd(pa, "-w", str(data / "merged.pcapng")))
    rx_b = procs(receiver_cmd(pb, "--output-dir", str(data / "by-sensor"), "--format", "pcap.zst", "--index"))
    rx_a.wait_for("listening on")
    rx_b.wait_for("listening on")
    ip = veth.inner_ip
    with Veth() as other:
        sensors = [procs(sensor_cmd(pa, veth.outer, "--sensor-id", "alpha")),
                   procs(sensor_cmd(pa, other.outer, "--sensor-id", "beta")),
                   procs(sensor_cmd(pb, veth.outer, "--sensor-id", "gamma"))]
        for s in sensors:
            s.wait_for("connected to receiver")
        replay = threading.Thread(target=other.replay, args=(mixed_pcap,), kwargs={"pps": 4000})
        replay.start()
        assert resolve(ip, ["www.example.com", "files.example.net", "a.b.example.org"] * 2) == 6
        assert [http_get(f"http://{ip}:8080/{p}") for p in ("index.html", "data.json", "nope")] == [200, 200, 404]
        replay.join()
        wait_received(rx_a, 2000, "beta")  # the replay; the sensors' stop drains the rest
        for s in sensors:
            assert s.stop(signal.SIGTERM) == 0
    assert rx_a.stop(signal.SIGTERM) == 0 and rx_b.stop(signal.SIGTERM) == 0
    files = [data / "merged.pcapng", data / "by-sensor" / "gamma.pcap.zst"]
    assert sorted(p for p in data.rglob("*") if p.is_file() and "_index" not in p.parts) == sorted(files)
    assert (data / "by-sensor" / "_index" / "files").is_dir()  # indexed by its receiver as written

    out = tmp_path / "out"
    nb = run_notebook(tmp_path, {"PKTSTREAM_NOTEBOOK_DATA": str(data), "PKTSTREAM_NOTEBOOK_OUT": str(out),
                                 "PKTSTREAM_NOTEBOOK_BPF": None}, monkeypatch)
    summary = json.loads((out / "summary.json").read_text())
    # packets per sensor: tshark's count per pcapng interface, and of the per-sensor file
    per_iface = Counter(r[0] for r in tshark_fields(files[0], "frame.interface_name"))
    assert per_iface.keys() == {f"alpha/{veth.outer}", f"beta/{other.outer}"}
    expected = {"alpha": per_iface[f"alpha/{veth.outer}"], "beta": per_iface[f"beta/{other.outer}"],
                "gamma": len(tshark_fields(files[1], "frame.number"))}
    assert {s: v["packets"] for s, v in summary["sensors"].items()} == expected
    assert expected["beta"] >= 2000 and summary["packets"] == sum(expected.values())
    # the exported slice: as many packets as tshark finds for the same selection, readable by tshark
    want = {s: len(tshark_fields(f, "frame.number", bpf=DNS_DISPLAY_FILTER)) for s, f in
            (("merged", files[0]), ("gamma", files[1]))}
    n = summary["slice"]["packets"]
    assert n == want["merged"] + want["gamma"] and want["gamma"] == 12  # 6 queries + 6 answers
    assert len(tshark_fields(out / "slice.pcapng", "frame.number")) == n
    assert len(tshark_fields(out / "slice.pcapng", "frame.number", bpf=DNS_DISPLAY_FILTER)) == n
    names = Counter(r[0] for r in tshark_fields(out / "slice.pcapng", "frame.interface_name"))
    assert names["gamma/if0"] == 12 and names[f"alpha/{veth.outer}"] == 12
    # the flow table has the HTTP connections to the server, seen by alpha and gamma
    import csv
    with open(out / "flows.csv") as f:
        flows = list(csv.DictReader(f))
    http = [r for r in flows if r["dst"] == ip and r["dport"] == "8080" and r["proto"] == "TCP"]
    assert Counter(r["sensor"] for r in http) == {"alpha": 3, "gamma": 3}
    check_plots(out)
    text = notebook_text(nb)
    assert "2 files" in text and "3 sensors" in text
    assert "index: 1 file(s) indexed now, 1 already indexed" in text  # the merged file had none


def test_forensics_notebook_standalone(tmp_path, monkeypatch):
    """Run from examples/ with no variables: it makes its own sample data (no root needed)."""
    (tmp_path / "pktstream-forensics").mkdir()
    (tmp_path / "pktstream-forensics" / "from-the-last-run.png").write_text("x")
    nb = run_notebook(EXAMPLES, {"PKTSTREAM_NOTEBOOK_DATA": None, "PKTSTREAM_NOTEBOOK_OUT": None,
                                 "PKTSTREAM_NOTEBOOK_BPF": None, "TMPDIR": str(tmp_path)}, monkeypatch)
    text = notebook_text(nb)
    out = Path(text.split("output directory:", 1)[1].split()[0])
    # one fixed directory in TMPDIR, emptied at each run (runs do not pile up), nothing in examples/
    assert out == tmp_path / "pktstream-forensics" and os.listdir(tmp_path) == ["pktstream-forensics"]
    assert not (out / "from-the-last-run.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert {s: v["packets"] for s, v in summary["sensors"].items()} == {"web-1": 3000, "db-1": 1500, "edge-1": 2000}
    assert summary["slice"]["packets"] == 650  # the VLAN-tagged DNS-looking frames (1 in 10)
    assert len(tshark_fields(out / "slice.pcapng", "frame.number", bpf=DNS_DISPLAY_FILTER)) == 650
    check_plots(out)


def test_forensics_notebook_timeline_fills_idle_buckets_and_groups_small_sensors(tmp_path):
    """The timeline cell on 12 sensors: idle buckets are 0 (not interpolated across), the 8
    busiest sensors get a line each, the rest are one "other" line; the legend is outside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nbformat
    import pandas as pd
    nb = nbformat.read(EXAMPLES / "forensics.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "timeline" in c.source)
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    rows = []
    for k in range(12):  # sensor s00 is the busiest; every sensor sends at seconds 0-4 and 50-59 only
        for sec in [*range(5), *range(50, 60)]:
            rows += [(f"s{k:02d}", t0 + pd.Timedelta(seconds=sec))] * (20 - k)
    packets = pd.DataFrame(rows, columns=["sensor", "time"]).assign(packets=1)
    ns = {"pd": pd, "plt": plt, "OUT": tmp_path, "activity": packets}
    exec(cell, ns)
    tl = ns["timeline"]
    assert list(tl.columns) == [f"s{k:02d}" for k in range(8)] + ["other"]
    assert len(tl) == 60 and (tl.index[1] - tl.index[0]).total_seconds() == 1
    assert (tl.iloc[5:50] == 0).all().all()  # the idle stretch is flat zero
    assert tl["s00"].iloc[0] == 20 and tl["other"].iloc[0] == sum(20 - k for k in range(8, 12))
    assert tl.values.sum() == len(packets)
    legend = ns["ax"].get_legend()
    assert len(legend.get_texts()) == 9
    plt.close("all")


def test_debug_http_defaults_on_loopback(veth, procs, tmp_path):
    """The default interface, lo: server and client on the same host (here: inside the namespace)."""
    (tmp_path / "a.txt").write_text("a\n")
    server = procs(veth.in_ns(sys.executable, "-m", "http.server", "8080", "--bind", "127.0.0.1"), cwd=tmp_path)
    dbg = procs(veth.in_ns(*example("debug_http.py", "--port", "8080", "--json", "-c", "2")), stdout=subprocess.PIPE)
    out = Lines(dbg.p.stdout)
    dbg.wait_for("capturing tcp port 8080 on lo")
    def first_request() -> bool:  # fails (connection refused) until the server listens
        assert server.p.poll() is None, server.stderr
        return subprocess.run(veth.in_ns("curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8080/"),
                              timeout=10).returncode == 0
    wait_until(first_request, 30, "the HTTP server to answer", interval=0.1)
    r = subprocess.run(veth.in_ns("curl", "-s", "-A", "dbg/2", "http://127.0.0.1:8080/a.txt?v=2"),
                       capture_output=True, text=True, timeout=10)
    assert r.stdout == "a\n"
    assert dbg.p.wait(20) == 0  # -c 2: stops by itself after two requests
    out.join()
    reqs = [json.loads(line) for line in out.lines if '"request"' in line]
    assert [(e["method"], e["target"], e["host"], e["client"].split(":")[0]) for e in reqs] == \
        [("GET", "/", "127.0.0.1:8080", "127.0.0.1"), ("GET", "/a.txt?v=2", "127.0.0.1:8080", "127.0.0.1")]
    assert reqs[1]["user_agent"] == "dbg/2"
