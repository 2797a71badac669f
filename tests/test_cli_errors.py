"""The first hour (issue #15): every CLI error is one clear line on stderr and a non-zero exit,
never a traceback; help a newcomer can follow; PacketStreamer habits that work."""
from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys

import pytest

import pktstream
from conftest import PKTSTREAM, free_port
from pktstream import PacketBatch, config as C
from pktstream.exceptions import ConfigError
from pktstream.sinks import FileSink
from pktstream.sinks.base import Source


def run(*args: str, cwd=None, user: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [*PKTSTREAM, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, *expected: str) -> str:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_cli_error_cases_are_one_line_without_traceback(tmp_path, busy_port):
    """Every case of the issue, run as the user runs it (a subprocess)."""
    nodir = tmp_path / "nonexistent" / "dir"
    afile = tmp_path / "afile"
    afile.write_text("x")
    trunc = tmp_path / "t.pcap"
    pktstream.lab.traffic.write_pcap(str(tmp_path / "full.pcap"), 20)
    trunc.write_bytes((tmp_path / "full.pcap").read_bytes()[:1000])
    w = ["-w", str(tmp_path / "cap.pcapng")]
    cases = [
        (["receiver", "--listen", f"127.0.0.1:{busy_port}", *w],
         [f"--listen 127.0.0.1:{busy_port}: cannot listen: address already in use"]),
        (["receiver", "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{busy_port}", *w],
         [f"--metrics 127.0.0.1:{busy_port}: cannot listen: address already in use"]),
        (["capture", "-i", "lo", "--bogus"], ["unrecognized arguments: --bogus (see pktstream capture --help)"]),
        (["receiver", "--listen", "nosuchhost.invalid:8081", *w], ["cannot resolve host 'nosuchhost.invalid'"]),
        (["receiver", "--listen", "127.0.0.1:99999", *w], ["port 99999 is not 0-65535"]),
        (["receiver", "--listen", "127.0.0.1:0", "-w", str(nodir / "cap.pcapng")],
         [f"cannot write {nodir}/cap.pcapng: directory {nodir} does not exist"]),
        (["receiver", "--listen", "127.0.0.1:0", "-w", str(afile / "cap.pcapng")], ["cannot write"]),
        (["receiver", "--listen", "127.0.0.1:0", "--output-dir", str(nodir)],
         [f"cannot create output directory {nodir}: {nodir.parent} does not exist"]),
        (["receiver", "--listen", "127.0.0.1:0", "-w", str(afile)], [f"{afile} exists", "never overwrites"]),
        (["receiver", "--listen", "127.0.0.1:0"], ["no output"]),
        (["sensor", "--receiver", "nosuchhost.invalid:8081"], ["cannot resolve receiver host 'nosuchhost.invalid'"]),
        (["sensor", "--receiver", "127.0.0.1:99999"], ["port 99999 is not 1-65535"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--bpf", "tcp", "udp"], ["give the BPF filter once"]),
        (["info", str(afile)], ["not a capture file"]),
        (["read", str(tmp_path / "missing.pcap")], ["missing.pcap: No such file or directory"]),
        (["receiver", "--config", str(tmp_path / "missing.yaml"), *w], ["not found"]),
        # an output in a directory that does not exist: the name asked for, not the .part written first
        (["convert", str(tmp_path / "full.pcap"), str(nodir / "c.pcap")],
         [f"{nodir}/c.pcap: directory {nodir} does not exist"]),
        (["query", str(tmp_path), "-w", str(nodir / "q.pcapng")],
         [f"{nodir}/q.pcapng: directory {nodir} does not exist"]),
        (["query", str(tmp_path), "--server", str(tmp_path / "no.sock"), "-w", str(nodir / "q.pcapng")],
         [f"{nodir}/q.pcapng: directory {nodir} does not exist"]),
        # TLS flags that would not do what they say (they meant plaintext before, or a traceback)
        (["receiver", "--listen", "127.0.0.1:0", *w, "--tls-key", str(afile)], ["need the receiver's certificate"]),
        (["receiver", "--listen", "127.0.0.1:0", *w, "--tls-ca", str(afile), "--tls-client-certs"],
         ["need the receiver's certificate"]),
        (["receiver", "--listen", "127.0.0.1:0", *w, "--tls-cert", str(afile)], ["needs certfile and keyfile"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--tls-cert", str(afile)], ["certfile and keyfile go together"]),
        # Kafka settings librdkafka refuses, and topic names Kafka refuses: at start, one line
        (["receiver", "--listen", "127.0.0.1:0", "-w", "kafka://127.0.0.1:9/t", "--kafka-property", "foo=bar"],
         ["Kafka producer settings", "foo"]),
        (["receiver", "--listen", "127.0.0.1:0", "-w", "kafka://127.0.0.1:9/t", "--kafka-property", "acks=0"],
         ["Kafka producer settings", "acks"]),
        (["receiver", "--listen", "127.0.0.1:0", "-w", "kafka://127.0.0.1:9/bad!topic"], ["Kafka topic 'bad!topic'"]),
        (["receiver", "--from", "kafka://127.0.0.1:9/t", "--kafka-property", "foo=bar", *w],
         ["Kafka consumer settings", "foo"]),
        (["sensor", "--output", "kafka://127.0.0.1:9/t", "--kafka-property", "foo=bar"],
         ["Kafka producer settings", "foo"]),
        # broker ports librdkafka took as 0, or modulo 65536, retried for ever (a review)
        (["receiver", "--from", "kafka://127.0.0.1:notaport/t", *w], ["broker '127.0.0.1:notaport'", "1..65535"]),
        (["sensor", "--output", "kafka://127.0.0.1:99999/t"], ["broker '127.0.0.1:99999'", "1..65535"]),
        (["receiver", "--listen", "127.0.0.1:0", "-w", "kafka://a:9092,/t"], ["broker ''", "1..65535"]),
        # numbers out of range: refused at start (before, met at the first packet or never)
        (["receiver", "--listen", "127.0.0.1:0", *w, "-W", "-1"], ["rotate.files (-W): at least 1, got -1"]),
        (["receiver", "--listen", "127.0.0.1:0", *w, "-G", "-5"], ["rotate.seconds (-G)"]),
        (["receiver", "--listen", "127.0.0.1:0", *w, "--heartbeat", "0"], ["heartbeat (--heartbeat): 0.1-3600"]),
        (["receiver", "--listen", "127.0.0.1:0", *w, "--max-connections", "-5"], ["maxConnections"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--level", "100"], ["compressionLevel (--level): -7..22"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--heartbeat", "-1"], ["heartbeat (--heartbeat)"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--capture-ports", "abc"], ["--capture-ports abc: give port"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--window", "0", "--no-spool"], ["windowSize (--window)"]),
        # sizes: a bad value says why (not only "invalid _size value")
        (["receiver", "--listen", "127.0.0.1:0", *w, "-C", "abc"], ["give a size like 100MB"]),
        (["sensor", "--receiver", "127.0.0.1:8081", "--window", "abc"], ["expected a size like"]),
        # a key file that cannot be read names the option it came from
        (["receiver", "--listen", "127.0.0.1:0", *w, "--auth-key-file", str(tmp_path / "nokey")],
         [f"--auth-key-file {tmp_path}/nokey: No such file or directory"]),
    ]
    for args, expected in cases:
        line = one_line_error(run(*args), *expected)
        assert line.startswith(f"pktstream {args[0]}: "), line
    assert not nodir.parent.exists()  # --output-dir did not create the path


def test_tls_settings_that_meant_plaintext_are_refused():
    tls = {"enable": False, "cafile": "ca.pem"}
    with pytest.raises(ConfigError, match="TLS is off"):
        C.sensor_settings({"output": {"server": {"address": "a", "port": 1}}, "tls": tls})
    with pytest.raises(ConfigError, match="need the receiver's certificate"):
        C.receiver_settings({"input": {"port": 1}, "output": {"file": {"path": "o.pcap"}},
                             "tls": {"keyfile": "k.pem"}})
    # PacketStreamer's own defaults (empty strings) stay fine
    C.receiver_settings({"input": {"port": 1}, "output": {"file": {"path": "o.pcap"}},
                         "tls": {"enable": False, "certfile": "", "keyfile": ""}})


@pytest.fixture
def public_tmp():
    """A directory the user 'nobody' can reach (pytest's tmp_path is root's alone)."""
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="pktstream-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


@pytest.mark.live  # switches to uid 65534 with setpriv: needs root
def test_unwritable_directory_refused_at_start_for_a_non_root_user(public_tmp):
    """A directory without write permission (checked as the user 'nobody'; root may write anywhere)."""
    d = public_tmp / "ro"
    d.mkdir(mode=0o755)
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", "import pktstream"], capture_output=True, text=True)
    assert probe.returncode == 0, f"the test venv must be importable by nobody: {probe.stderr}"
    for args in (["-w", str(d / "cap.pcapng")], ["--output-dir", str(d)]):
        one_line_error(run("receiver", "--listen", "127.0.0.1:0", *args, user=65534),
                       "cannot write", f"{d}: permission denied")


def test_read_of_a_truncated_file_warns_in_one_clean_line(tmp_path):
    pktstream.lab.traffic.write_pcap(str(tmp_path / "full.pcap"), 20)
    data = (tmp_path / "full.pcap").read_bytes()
    (tmp_path / "t.pcap").write_bytes(data[:1000])
    r = run("read", str(tmp_path / "t.pcap"))
    assert r.returncode == 0
    shown = len(r.stdout.splitlines())
    assert 0 < shown < 20
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"pktstream read: warning: {tmp_path}/t.pcap: truncated pcap record at byte ")
    assert lines[0].endswith(f"; read {shown} packets")
    assert ".py" not in r.stderr and "warn" + "ings.warn" not in r.stderr


def test_help_is_plain_text_with_descriptions_defaults_and_examples():
    top = run("--help")
    assert top.returncode == 0 and "``" not in top.stdout and "examples:" in top.stdout
    for cmd in ("capture", "receiver", "sensor", "info", "read", "convert", "merge", "demo"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "\nexamples" in r.stdout and "``" not in r.stdout, cmd
    sensor = " ".join(run("sensor", "--help").stdout.split())
    for text in ("--receiver HOST:PORT the receiver to stream to", "--pcap-mode {all,allow,deny} all: every port",
                 "--promisc promiscuous mode", "--spool-size SIZE spool bound",
                 "--bpf EXPR BPF filter"):
        assert text in sensor, text
    receiver = " ".join(run("receiver", "--help").stdout.split())
    for text in ("--max-connections N connections beyond N", "(default 256)", "--tls-cert PEM serve TLS"):
        assert text in receiver, text
    capture = " ".join(run("capture", "--help").stdout.split())
    assert "-Q {in,out,inout}, --direction {in,out,inout} capture packets received (in)" in capture
    merge = " ".join(run("merge", "--help").stdout.split())
    assert "output file to write" in merge and "inputs capture files to merge" in merge


def test_sensor_bpf_option_is_the_filter(tmp_path):
    from pktstream.cli import build_parser
    from pktstream.cli.stream import build_sensor
    args = build_parser().parse_args(["sensor", "--receiver", "127.0.0.1:8081", "-i", "lo", "--bpf", "udp port 53"])
    assert build_sensor(args).bpf == "udp port 53"
    args = build_parser().parse_args(["sensor", "--receiver", "127.0.0.1:8081", "-i", "lo", "udp", "port", "53"])
    assert build_sensor(args).bpf == "udp port 53"


def test_output_dir_creates_only_its_last_component(tmp_path):
    FileSink(directory=str(tmp_path / "new"))
    assert (tmp_path / "new").is_dir()
    with pytest.raises(ConfigError, match="does not exist"):
        FileSink(directory=str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()


# -- PacketStreamer habits ---------------------------------------------------------------------
SHARED_YAML = """\
input:
  address: 127.0.0.1
  port: 8081
output:
  server:
    address: 127.0.0.1
    port: 8081
  file:
    path: {path}
pcapMode: all
capturePorts: []
gatherMaxWaitSec: 5
compressBlockSize: 65
tls:
  enable: false
auth:
  enable: false
"""


def test_one_yaml_for_both_roles_as_upstream_documents(tmp_path, caplog):
    data = __import__("yaml").safe_load(SHARED_YAML.format(path=tmp_path / "dump_file"))
    with caplog.at_level(logging.INFO, logger="pktstream"):
        rx = C.receiver_settings(data)
        sx = C.sensor_settings(data)
    assert rx.listen == "127.0.0.1:8081" and rx.output_file == str(tmp_path / "dump_file")
    assert sx.receiver == "127.0.0.1:8081" and sx.max_wait == 5.0
    infos = [r.getMessage() for r in caplog.records]
    assert ("config: ignoring sensor keys output.server, pcapMode, capturePorts, gatherMaxWaitSec "
            "(this is a receiver)") in infos
    assert "config: ignoring receiver keys output.file, input (this is a sensor)" in infos
    # a typo is still an error, and a receiver whose only output is a server still refused
    with pytest.raises(ConfigError, match="pcapMod: unknown key"):
        C.receiver_settings({**data, "pcapMod": "all"})
    with pytest.raises(ConfigError, match="cannot forward"):
        C.receiver_settings({"input": {"port": 1}, "output": {"server": {"address": "x", "port": 1}}})
    # the sensor reads the same file from the command line too
    (tmp_path / "both.yaml").write_text(SHARED_YAML.format(path=tmp_path / "dump_file"))
    r = run("receiver", "--config", str(tmp_path / "both.yaml"), "--listen", "127.0.0.1:99999")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    info, error = r.stderr.splitlines()  # got past the config (the shared file was accepted)
    assert info.endswith("INFO pktstream: config: ignoring sensor keys output.server, pcapMode, "
                         "capturePorts, gatherMaxWaitSec (this is a receiver)")
    assert error == "pktstream receiver: --listen 127.0.0.1:99999: port 99999 is not 0-65535"


def _batch(n: int, start: int = 0) -> PacketBatch:
    recs = bytearray()
    for i, f in enumerate(pktstream.lab.traffic.frames(n, seed=2)):
        recs += struct.pack("<IIII", 1_700_000_000, start + i, len(f), len(f)) + f
    return PacketBatch.from_records(bytes(recs), link_type=1, interface="eth0")


@pytest.mark.live  # reads the file with tcpdump (a capture tool)
def test_extensionless_path_is_written_in_place_as_pcap_like_packetstreamer(tmp_path):
    """upstream's `path: /tmp/dump_file` read with `tail -F /tmp/dump_file | tcpdump -r -`:
    the file grows under exactly that name, a pcap stream readable while written."""
    path = tmp_path / "dump_file"
    sink = FileSink(str(path))
    src = Source("s1", "host1", "eth0", 1, 262144)
    sink.write(src, _batch(10))
    sink.flush()
    assert sorted(os.listdir(tmp_path)) == ["dump_file"]
    assert sum(len(b) for b in pktstream.read(str(path))) == 10
    sink.write(src, _batch(5, 10))
    sink.flush()
    tcpdump = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True)
    assert len(tcpdump.stdout.splitlines()) == 15, tcpdump.stderr
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["dump_file"] and sink.paths == [str(path)]
    with pytest.raises(ConfigError, match="never overwrites"):
        FileSink(str(path))
    # a capture extension keeps the safe .part + rename behaviour
    s2 = FileSink(str(tmp_path / "x.pcap"))
    s2.write(src, _batch(3))
    assert os.path.exists(tmp_path / "x.pcap.part")
    s2.close()


@pytest.mark.live  # a real Sensor captures on lo: needs root
def test_readme_embedded_receiver_snippet_as_written_leaves_a_complete_file_on_ctrl_c(tmp_path):
    """The README's "Embed a receiver in Python" code, run as written (only the port changed),
    fed by a real sensor on lo, then Ctrl-C (SIGINT): capture.pcapng.zst is complete, no .part."""
    import re
    import signal
    from pathlib import Path

    from conftest import Proc
    from pktstream.stream.sensor import CaptureOptions, Sensor, SensorSecurity
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"### Embed a receiver in Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    port = free_port()  # (not a port-0 bind closed again: another process's bind could take it meanwhile)
    assert '"0.0.0.0:8081"' in code
    (tmp_path / "snippet.py").write_text(code.replace('"0.0.0.0:8081"', f'"127.0.0.1:{port}"'))
    (tmp_path / "key").write_text("k" * 32 + "\n")
    # Ctrl-C as on a terminal: a test run started in the background by a non-interactive shell
    # inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler
    restore = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    rx = Proc([sys.executable, "-u", "-c", restore + "exec(compile(open('snippet.py').read(), 'snippet.py', 'exec'))"],
              stdout=subprocess.PIPE, cwd=tmp_path)
    sensor = Sensor(f"127.0.0.1:{port}", ["lo"], bpf="udp port 9", sensor_id="readme",
                    capture=CaptureOptions(max_wait=0.05), security=SensorSecurity(auth_key="k" * 32))
    sensor.start()
    import threading
    got = threading.Event()

    def traffic() -> None:  # until the snippet has printed a batch
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            while not got.wait(0.02):
                u.sendto(b"x" * 100, ("127.0.0.1", 9))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        line = rx.p.stdout.readline()  # the snippet prints one line per batch
        assert line, rx.err
    finally:
        got.set()
        t.join()
        sensor.stop()
        sensor.join()
    assert line.startswith(b"readme lo ")
    rx.p.send_signal(signal.SIGINT)
    assert rx.p.wait(60) == 0, rx.err
    rx.p.stdout.close()
    assert "Traceback" not in "".join(rx.err)
    assert sorted(os.listdir(tmp_path)) == ["capture.pcapng.zst", "key", "snippet.py"]
    assert sum(len(b) for b in pktstream.read(str(tmp_path / "capture.pcapng.zst"))) >= 1


@pytest.mark.live  # the demo creates namespaces and captures: needs root
def test_demo_leaves_no_work_directory(tmp_path):
    """`./run demo` used to leave /tmp/pktstream-demo-*/ (6.6 MB) behind on every run."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    r = subprocess.run([*PKTSTREAM, "demo", "-w", str(tmp_path / "demo.pcapng"), "--packets", "500",
                        "--pps", "5000", "--requests", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "result: OK" in r.stdout, r.stdout + r.stderr
    assert os.listdir(tmp_path / "tmp") == []
    assert (tmp_path / "demo.pcapng").exists()
