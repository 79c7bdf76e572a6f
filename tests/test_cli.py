"""The command line: doctor reports, demo trains."""

import re
import subprocess
import sys


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fisherforget", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_doctor_reports_backends_and_auto_choice():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+reference\s+available$", result.stdout, re.M)
    assert re.search(r"^auto_picks", result.stdout, re.M)
    from fisherforget import backends

    # CPU tensors get the extension's CPU kernels where they load, else the reference.
    picked = "cpu" if backends.is_available("cpu") else "reference"
    assert re.search(rf"^\s+cpu\s+{picked}$", result.stdout, re.M)
    assert re.search(r"^cpu_kernels\s+(available \(|unavailable)", result.stdout, re.M)


def test_version():
    from fisherforget import __version__

    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fisherforget {__version__}"
