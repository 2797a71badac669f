"""The package's public surface and module boundaries (no root needed)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pktstream

PACKAGE = Path(pktstream.__file__).parent


def test_public_classes_import_lazily():
    code = ("import sys, pktstream; assert 'pktstream.stream.receiver' not in sys.modules; "
            "assert pktstream.Sensor.__name__ == 'Sensor' and pktstream.Receiver.__name__ == 'Receiver'; "
            "pktstream.FileSink, pktstream.StdoutSink, pktstream.CallbackSink, pktstream.open_reader, "
            "pktstream.open_writer; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
    assert set(pktstream._LAZY) <= set(pktstream.__all__)


def test_no_module_imports_another_modules_private_names():
    """``from pktstream.x import _name`` across modules is how one part reaches into another;
    the compiled core's own modules (pktstream._capture ...) are the exception: they are modules."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pktstream"):
                offenders += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                              and a.name not in ("_capture", "_records", "_decode", "_s2", "_flowtable")]
    assert not offenders, offenders
