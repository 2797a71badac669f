"""Build the Cython extensions against the system libpcap (found with pkg-config)."""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PKTSTREAM_DEBUG") == "1"
# ASan + UBSan build (./run sanitize builds this in a copy of the tree, see DEVELOP.md)
SANITIZE = os.environ.get("PKTSTREAM_SANITIZE") == "1"


def _run(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.check_output(cmd, text=True, stderr=subprocess.DEVNULL).strip()
    except subprocess.CalledProcessError:
        return None


def _flags(cflags: str, libs: str, version: str | None) -> dict:
    return {"include_dirs": [f[2:] for f in cflags.split() if f.startswith("-I")],
            "library_dirs": [f[2:] for f in libs.split() if f.startswith("-L")],
            "libraries": [f[2:] for f in libs.split() if f.startswith("-l")] or ["pcap"],
            "version": version}


def find_libpcap() -> dict:
    """Compiler/linker flags and version (None if unknown) of libpcap:
    PKTSTREAM_PCAP_PREFIX, then pkg-config, then pcap-config."""
    prefix = os.environ.get("PKTSTREAM_PCAP_PREFIX")
    if prefix:
        pc = os.path.join(prefix, "lib", "pkgconfig", "libpcap.pc")
        version = _run("pkg-config", "--modversion", pc) if os.path.exists(pc) else None
        return _flags(f"-I{os.path.join(prefix, 'include')}", f"-L{os.path.join(prefix, 'lib')} -lpcap", version)
    version = _run("pkg-config", "--modversion", "libpcap")
    if version:
        return _flags(_run("pkg-config", "--cflags-only-I", "libpcap") or "",
                      _run("pkg-config", "--libs", "libpcap") or "-lpcap", version)
    libs = _run("pcap-config", "--libs")
    if libs is not None:
        return _flags(_run("pcap-config", "--cflags") or "", libs, None)
    sys.exit("pktstream: libpcap development files not found (no pkg-config 'libpcap', no pcap-config).\n"
             "  Debian/Ubuntu: apt-get install libpcap-dev pkg-config\n"
             "  Fedora/RHEL:   dnf install libpcap-devel pkgconf\n"
             "  or set PKTSTREAM_PCAP_PREFIX to libpcap's install prefix.")


def has_pcap_init(pcap: dict) -> bool:
    """pcap_init() (libpcap >= 1.10): from the version when known, else a link test."""
    if pcap["version"]:
        major, minor = (int(x) for x in pcap["version"].split(".")[:2])
        return (major, minor) >= (1, 10)
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler
    cc = new_compiler()
    customize_compiler(cc)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <pcap/pcap.h>\nint main(void) { char e[PCAP_ERRBUF_SIZE]; return pcap_init(0, e); }\n")
        old = os.dup(2)
        os.dup2(null.fileno(), 2)
        try:
            objs = cc.compile([src], output_dir=tmp, include_dirs=pcap["include_dirs"])
            cc.link_executable(objs, os.path.join(tmp, "t"), libraries=pcap["libraries"],
                               library_dirs=pcap["library_dirs"])
            return True
        except Exception:
            return False
        finally:
            os.dup2(old, 2)
            os.close(old)


pcap = find_libpcap()
macros = [("PKTSTREAM_DEBUG", "1" if DEBUG or SANITIZE else "0"),
          ("HAVE_PCAP_INIT", "1" if has_pcap_init(pcap) else "0"),
          ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
pcap.pop("version")
# PKTSTREAM_QUICK_BUILD=1: no optimisation, for builds that only prove packaging (the test
# suite's sdist/wheel builds: ~3x less compile time); the code is the same otherwise
cflags = ["-O0", "-g"] if DEBUG else ["-O0"] if os.environ.get("PKTSTREAM_QUICK_BUILD") == "1" else ["-O2"]
ldflags = []
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    # Python builds with -fwrapv, which hides signed overflow from UBSan: take it back
    cflags_extra = ["-fno-wrapv"]
    cflags = ["-O1", "-g", *san, *cflags_extra]
    ldflags = san
cflags += ["-Wall", "-Wno-unused-function"]
if os.environ.get("PKTSTREAM_WERROR") == "1":
    cflags.append("-Werror")

extensions = [
    Extension(f"pktstream.{name}", [f"pktstream/{name}.pyx"],
              include_dirs=["pktstream", numpy.get_include(), *pcap["include_dirs"]],
              library_dirs=pcap["library_dirs"], libraries=pcap["libraries"],
              define_macros=macros, extra_compile_args=cflags, extra_link_args=ldflags,
              depends=["pktstream/_compat.h", "pktstream/_compat.pxd", "pktstream/_libpcap.pxd"])
    for name in ("_capture", "_records", "_decode", "_s2", "_flowtable")
]

setup(ext_modules=cythonize(
    extensions, language_level=3, annotate=DEBUG,
    compiler_directives={"embedsignature": True, "linetrace": DEBUG}))
