"""The command line: doctor reports, demo trains."""

import subprocess
import sys


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fisherforget", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_doctor_reports_backends_and_auto_choice():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "reference    available" in result.stdout
    assert "auto_picks" in result.stdout and "cpu          reference" in result.stdout
