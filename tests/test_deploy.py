"""Deployment files that cannot run here (no container engine, no cluster) are parsed and checked:
valid YAML, the fields that make a sensor work (hostNetwork, exactly NET_RAW/NET_ADMIN), every
embedded pktstream config accepted by pktstream.config, the Dockerfile's entry points accepted by
the CLI parser, the systemd units verified by systemd-analyze (or parsed)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pktstream import config as C
from pktstream.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def k8s_docs() -> list[dict]:
    docs = []
    for f in K8S:
        for d in yaml.safe_load_all(f.read_text()):
            if d is not None:
                assert {"apiVersion", "kind", "metadata"} <= set(d), f"{f.name}: {d}"
                docs.append(d)
    return docs


def validate_pktstream_yaml(name: str, text: str) -> None:
    data = yaml.safe_load(text)
    if "sensor" in name:
        s = C.sensor_settings(data)
        assert s.receiver or s.kafka, name
    else:
        s = C.receiver_settings(data)
        assert s.output_file or s.output_dir or s.stdout or s.s3 or s.kafka, name


def test_manifests_parse_and_have_what_each_workload_needs():
    assert len(K8S) >= 3
    docs = k8s_docs()
    kinds = [d["kind"] for d in docs]
    assert "DaemonSet" in kinds and "StatefulSet" in kinds and "Service" in kinds and "ConfigMap" in kinds
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets_used = set()
    for d in docs:
        if d["kind"] not in ("DaemonSet", "StatefulSet", "Deployment"):
            continue
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            assert c["args"][0] in ("sensor", "receiver")
            build_parser().parse_args([a.replace("$(NODE_NAME)", "node-1") for a in c["args"]])
            for m in c.get("volumeMounts", []):
                claim_names = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
                assert m["name"] in vols or m["name"] in claim_names, m
                v = vols.get(m["name"], {})
                if "configMap" in v:
                    cm = configmaps[v["configMap"]["name"]]
                    assert m.get("subPath") in cm["data"], (m, list(cm["data"]))
                if "secret" in v:
                    secrets_used.add(v["secret"]["secretName"])
            caps = c.get("securityContext", {}).get("capabilities", {})
            assert caps.get("drop") == ["ALL"]
            if c["args"][0] == "sensor":
                assert d["kind"] == "DaemonSet"
                assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
                assert sorted(caps["add"]) == ["NET_ADMIN", "NET_RAW"]
                assert c["securityContext"].get("privileged") is False
            else:
                assert "add" not in caps  # a receiver needs no capability
                assert d["spec"].get("volumeClaimTemplates"), "receiver without a volume"
    assert {"pktstream-ca", "pktstream-receiver-tls", "pktstream-auth"} <= secrets_used
    # the receiver's Service selects the receiver pods and exposes the stream port
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "pktstream-receiver")
    rx = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "pktstream-receiver")
    assert svc["spec"]["selector"].items() <= rx["spec"]["template"]["metadata"]["labels"].items()
    assert 8081 in [p["port"] for p in svc["spec"]["ports"]]


def test_every_embedded_pktstream_config_is_accepted():
    n = 0
    for d in k8s_docs():
        if d["kind"] == "ConfigMap":
            for name, text in d["data"].items():
                validate_pktstream_yaml(name, text)
                n += 1
    for f in sorted((DEPLOY / "config").glob("*.yaml")):
        validate_pktstream_yaml(f.name, f.read_text())
        n += 1
    assert n >= 6
    # a broken config is rejected (the check above can fail)
    with pytest.raises(C.ConfigError):
        validate_pktstream_yaml("receiver.yaml", "output:\n  plugins:\n    s3: {region: x}\n")


def test_fargate_task_definition_in_docs_is_valid_json_with_a_sensor_sidecar():
    text = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    m = re.search(r"```json\n(.*?)```", text, re.S)
    assert m, "DEPLOYMENT.md has no task definition"
    task = json.loads(m.group(1))
    names = {c["name"]: c for c in task["containerDefinitions"]}
    assert "pktstream-sensor" in names and len(names) >= 2
    sensor = names["pktstream-sensor"]
    assert sensor["essential"] is False  # the application's task must not die with its sidecar
    assert sensor["linuxParameters"]["capabilities"]["add"] == ["NET_RAW"]  # all Fargate allows
    assert task["networkMode"] == "awsvpc" and "FARGATE" in task["requiresCompatibilities"]
    build_parser().parse_args(sensor["command"])


def test_dockerfile_entrypoint_and_cmd():
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry == ["pktstream"]
    args = build_parser().parse_args(cmd)
    assert args.func.__name__ == "cmd_receiver"
    assert "libpcap-dev" in text and re.search(r"pip (wheel|install).*\[kafka,s3\]", text)
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / src).exists(), src
    # the config the default CMD names is shipped and valid
    validate_pktstream_yaml("receiver.yaml", (DEPLOY / "config" / "receiver.yaml").read_text())


def _unit(path: Path) -> dict[str, dict[str, str]]:
    sections, cur = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), {})
        else:
            k, _, v = line.partition("=")
            cur[k] = v
    return sections


@pytest.mark.parametrize("name", ["pktstream-sensor.service", "pktstream-receiver.service",
                                  "pktstream-serve.service"])
def test_systemd_units(name, tmp_path):
    path = DEPLOY / "systemd" / name
    u = _unit(path)
    argv = shlex.split(u["Service"]["ExecStart"])
    assert argv[0] == "/usr/local/bin/pktstream"
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == {"pktstream-sensor.service": "cmd_sensor", "pktstream-receiver.service":
                                  "cmd_receiver", "pktstream-serve.service": "cmd_serve"}[name]
    assert u["Install"]["WantedBy"] == "multi-user.target"
    if "sensor" in name:
        assert u["Service"]["AmbientCapabilities"].split() == ["CAP_NET_RAW", "CAP_NET_ADMIN"]
        assert u["Service"]["User"] != "root"
    if shutil.which("systemd-analyze"):
        # verify a copy whose ExecStart points at an existing binary (pktstream is not installed
        # in /usr/local/bin here); everything else is checked as written
        exe = shutil.which("pktstream") or str(Path(__file__).resolve().parent.parent / ".venv/bin/pktstream")
        unit = tmp_path / name
        unit.write_text(path.read_text().replace("/usr/local/bin/pktstream", exe))
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                    if ln.strip() and "pktstream" in ln and "Documentation" not in ln]
        assert r.returncode == 0 and not problems, r.stdout + r.stderr
