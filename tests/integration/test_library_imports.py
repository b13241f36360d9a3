"""The library imports without its optional faces (HTTP API, page), in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_the_library_imports_without_its_faces_and_training_packages():
    """`import fashion_search` and the engine must not pull in the HTTP or page frameworks."""
    probe = (
        "import sys, fashion_search, fashion_search.service.engine, fashion_search.index.registry; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'streamlit') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
