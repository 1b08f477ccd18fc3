"""Run the real `filip` command as a subprocess and check how it fails.

Every bad-input case goes through `python -m pipeline.cli`, as a user's shell would, so the
exit code, stderr and the output folder are what a user sees.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_filip(*args: str, cwd: Path | None = None, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=environment)


def assert_user_error(result: subprocess.CompletedProcess, *must_name: str) -> str:
    """Exit 2, one `error: ...` line naming each of `must_name`, no traceback; returns the line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in must_name:
        assert text in errors[0], (text, errors[0])
    assert len(errors[0]) < 2000, "an error message must not grow with the input"
    return errors[0]
