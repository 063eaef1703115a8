"""The root conftest's TESSERA_FAILURES_LOG: each failure's traceback lands in the file as it happens, once, also
under pytest-xdist (a device run cut off by its time limit keeps what failed and why)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_failures_are_written_as_they_happen(tmp_path, workers):
    (tmp_path / "test_sample.py").write_text(
        "def test_passes():\n    assert True\n\n"
        "def test_fails():\n    assert 1 + 1 == 3, 'arithmetic moved'\n"
    )
    log = tmp_path / "failures.txt"
    env = {**os.environ, "TESSERA_FAILURES_LOG": str(log), "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-n",
                           workers, str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = log.read_text()
    assert text.count("==== ") == 1 and "test_sample.py::test_fails (call)" in text
    assert "arithmetic moved" in text and "test_passes" not in text
