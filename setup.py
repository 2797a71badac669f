"""Build the Cython extensions against the system libpcap (found with pkg-config)."""
import os
import shutil
import subprocess
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PKTSTREAM_DEBUG") == "1"


def _run(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.check_output(cmd, text=True, stderr=subprocess.DEVNULL).strip()
    except subprocess.CalledProcessError:
        return None


def find_libpcap() -> dict:
    """Compiler/linker flags for libpcap: PKTSTREAM_PCAP_PREFIX, pkg-config, pcap-config."""
    prefix = os.environ.get("PKTSTREAM_PCAP_PREFIX")
    if prefix:
        return {"include_dirs": [os.path.join(prefix, "include")],
                "library_dirs": [os.path.join(prefix, "lib")], "libraries": ["pcap"], "version": "1.10.0"}
    version = _run("pkg-config", "--modversion", "libpcap")
    if version:
        cflags = (_run("pkg-config", "--cflags-only-I", "libpcap") or "").split()
        libs = (_run("pkg-config", "--libs", "libpcap") or "-lpcap").split()
        return {"include_dirs": [f[2:] for f in cflags],
                "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
                "libraries": [f[2:] for f in libs if f.startswith("-l")] or ["pcap"],
                "version": version}
    if _run("pcap-config", "--libs") is not None:
        return {"include_dirs": [], "library_dirs": [], "libraries": ["pcap"], "version": "1.10.0"}
    sys.exit("pktstream: libpcap development files not found (no pkg-config 'libpcap', no pcap-config).\n"
             "  Debian/Ubuntu: apt-get install libpcap-dev pkg-config\n"
             "  Fedora/RHEL:   dnf install libpcap-devel pkgconf\n"
             "  or set PKTSTREAM_PCAP_PREFIX to libpcap's install prefix.")


pcap = find_libpcap()
major, minor = (int(x) for x in pcap.pop("version").split(".")[:2])
macros = [("PKTSTREAM_DEBUG", "1" if DEBUG else "0"),
          ("HAVE_PCAP_INIT", "1" if (major, minor) >= (1, 10) else "0"),
          ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
cflags = ["-O0", "-g"] if DEBUG else ["-O2"]
cflags += ["-Wall", "-Wno-unused-function"]
if os.environ.get("PKTSTREAM_WERROR") == "1":
    cflags.append("-Werror")

extensions = [
    Extension(f"pktstream.{name}", [f"pktstream/{name}.pyx"],
              include_dirs=["pktstream", numpy.get_include(), *pcap["include_dirs"]],
              library_dirs=pcap["library_dirs"], libraries=pcap["libraries"],
              define_macros=macros, extra_compile_args=cflags)
    for name in ("_capture", "_records", "_decode")
]

setup(ext_modules=cythonize(
    extensions, language_level=3, annotate=DEBUG,
    compiler_directives={"embedsignature": True, "linetrace": DEBUG}))
