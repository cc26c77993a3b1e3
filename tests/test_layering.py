"""The library never imports Prefect; `import longrecipe` stays light."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import longrecipe


def test_library_never_imports_prefect():
    modules = [m.name for m in pkgutil.walk_packages(longrecipe.__path__, "longrecipe.")]
    modules = [m for m in modules if m != "longrecipe.__main__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.'))\n"
        "print(len(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", f"a library module imports prefect: {out.stdout}"
    assert len(modules) >= 8


def test_import_is_light():
    code = "import longrecipe, longrecipe.cli, sys; print('torch' in sys.modules, 'prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
