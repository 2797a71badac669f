"""Packaging: the sdist and the wheel install into clean virtual environments and run, and the
cibuildwheel configuration is one cibuildwheel accepts (no root; PyPI reachable for the
dependencies of the fresh environments).

``python -m build`` with this environment's setuptools/Cython/numpy (no build isolation, nothing
to download) makes the sdist from a copy of the tracked files and then the wheel *from that sdist*,
so the wheel also proves that the sdist holds everything the build needs. The wheel goes into one
fresh venv; the sdist into another through pip, as a user's ``pip install pktstream-X.tar.gz``
does it (PEP 517, isolated build environment).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from pktstream.lab.traffic import write_pcap

ROOT = Path(__file__).resolve().parent.parent
N_PACKETS = 300


def _run(*cmd, cwd=None, env=None, timeout=900) -> str:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files as they are on disk (no build products, no .venv)."""
    files = _run("git", "ls-files", "-z", cwd=ROOT).split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _bare_venv(path: Path) -> Path:
    """A fresh venv (no system site-packages) without pip of its own: this environment's pip
    installs into it (``pip --python``), which saves bootstrapping one pip per venv."""
    venv.EnvBuilder(with_pip=False, clear=True).create(path)
    return path / "bin"


def _pip_into(bin_dir: Path, *args) -> list[str]:
    return [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", *map(str, args)]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist, then at the same time (each compiles the extensions; two cores): the wheel built
    from the sdist here, and pip installing the sdist into a fresh venv."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = _tracked_copy(tmp / "src")
    out = tmp / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--outdir", out, src)
    sdist, = out.glob("pktstream-*.tar.gz")
    sdist_bin = _bare_venv(tmp / "venv-sdist")
    log = open(tmp / "pip-sdist.log", "w+")
    # unoptimised extensions (PKTSTREAM_QUICK_BUILD, setup.py): these builds prove the packaging,
    # and compiling at -O2 twice was a minute of the suite
    quick = {**os.environ, "PKTSTREAM_QUICK_BUILD": "1"}
    installing = subprocess.Popen(_pip_into(sdist_bin, sdist), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=quick)
    try:
        _run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", out, sdist, env=quick)
        wheel, = out.glob("pktstream-*.whl")
        yield {"sdist": sdist, "wheel": wheel, "tmp": tmp, "sdist_install": (installing, log, sdist_bin)}
    finally:
        if installing.poll() is None:  # the run was cut short: stop our pip (by its handle)
            installing.kill()
            installing.wait()
        log.close()


def test_sdist_holds_the_sources_and_nothing_generated(dists):
    with tarfile.open(dists["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for need in ("LICENSE", "setup.py", "pyproject.toml", "README.md", "pktstream/_compat.h",
                 "pktstream/_compat.pxd", "pktstream/_libpcap.pxd", "pktstream/py.typed",
                 *(f"pktstream/{m}.{ext}" for m in ("_capture", "_records", "_decode", "_s2", "_flowtable")
                   for ext in ("pyx", "pyi"))):
        assert need in names, need
    assert not [n for n in names if n.endswith((".c", ".so", ".html", ".pyc"))]
    assert not [n for n in names if n.startswith("tests/")]


def test_wheel_holds_modules_stubs_and_license_but_no_sources(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    for m in ("_capture", "_records", "_decode", "_s2", "_flowtable"):
        assert any(n.startswith(f"pktstream/{m}.") and n.endswith(".so") for n in names), m
        assert f"pktstream/{m}.pyi" in names
    assert "pktstream/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c", ".h", ".html"))]
    assert not [n for n in names if n.startswith("tests/")]


def _check_installed(bin_dir: Path, workdir: Path) -> None:
    """``pktstream --version`` and an offline read of a capture file (libpcap, pktstream's own
    reader, the CLI) in the fresh venv, from a directory without the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    version = _run(bin_dir / "pktstream", "--version", cwd=workdir, env=env)
    assert version.startswith("pktstream 0.") and "libpcap version" in version, version
    pcap = workdir / "sample.pcap"
    write_pcap(str(pcap), N_PACKETS)
    code = ("import json, sys, pktstream\n"
            "c = pktstream.open_offline(sys.argv[1])\n"
            "n_pcap = sum(len(b) for b in c)\n"
            "c.close()\n"
            "import pkgutil\n"
            "pkgs = sorted(m.name for m in pkgutil.walk_packages(pktstream.__path__, 'pktstream.') if m.ispkg)\n"
            "assert pktstream.Receiver and pktstream.Sensor\n"
            "print(json.dumps({'file': pktstream.__file__, 'libpcap': n_pcap, 'packages': pkgs,\n"
            "                  'reader': sum(len(b) for b in pktstream.read(sys.argv[1]))}))\n")
    got = json.loads(_run(bin_dir / "python", "-c", code, pcap, cwd=workdir, env=env))
    assert Path(got["file"]).is_relative_to(bin_dir.parent), got  # the installed copy, not the tree
    assert got["libpcap"] == got["reader"] == N_PACKETS
    # every subpackage of the tree is installed (a package missing from the build config is not)
    tree = sorted("pktstream." + str(p.parent.relative_to(ROOT / "pktstream")).replace("/", ".")
                  for p in (ROOT / "pktstream").rglob("__init__.py") if p.parent != ROOT / "pktstream")
    assert got["packages"] == tree, (got["packages"], tree)
    info = json.loads(_run(bin_dir / "pktstream", "info", "--json", pcap, cwd=workdir, env=env))
    assert info["packets"] == N_PACKETS


def test_wheel_installs_into_a_clean_venv_and_runs(dists):
    tmp = dists["tmp"]
    bin_dir = _bare_venv(tmp / "venv-wheel")
    _run(*_pip_into(bin_dir, dists["wheel"]))
    (tmp / "run-wheel").mkdir()
    _check_installed(bin_dir, tmp / "run-wheel")


def test_sdist_installs_into_a_clean_venv_and_runs(dists):
    """pip builds the sdist as a user's pip does: an isolated build environment with the
    build-system requirements from PyPI, setup.py cythonizing the .pyx sources."""
    installing, log, bin_dir = dists["sdist_install"]
    rc = installing.wait(timeout=900)
    log.seek(0)
    assert rc == 0, f"pip install {dists['sdist'].name} failed:\n{log.read()[-4000:]}"
    (dists["tmp"] / "run-sdist").mkdir()
    _check_installed(bin_dir, dists["tmp"] / "run-sdist")


def test_cibuildwheel_configuration():
    """[tool.cibuildwheel] as cibuildwheel itself reads it (its option reader rejects unknown or
    misspelt options): CPython manylinux wheels for x86_64 and aarch64, libpcap installed before
    the build, each wheel tested with ``pktstream --version``. Building them needs a container
    engine, which this machine lacks."""
    import dataclasses

    from cibuildwheel.options import CommandLineArguments, compute_options

    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    out = _run(sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", "linux",
               cwd=ROOT, env=env)
    ids = out.split()
    assert {i.split("-", 1)[1] for i in ids} == {"manylinux_x86_64", "manylinux_aarch64"}, ids
    assert {i.split("-", 1)[0] for i in ids} >= {"cp311", "cp312"}, ids

    args = dataclasses.replace(CommandLineArguments.defaults(), platform="linux", package_dir=ROOT)
    build = compute_options(platform="linux", command_line_arguments=args, env=env).build_options(None)
    assert "libpcap-devel" in build.before_all
    assert build.test_command == "pktstream --version"
