"""Running a check in a fresh interpreter with stock transformers only, shared by the tests that
prove a turbomoe-written checkpoint loads without turbomoe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_without_turbomoe(script: str, cwd: Path, timeout_s: float = 300) -> None:
    """Runs ``script`` with ``python -c``: the source tree off PYTHONPATH and TURBOMOE_DISABLE=1,
    so nothing of turbomoe is imported or patched. Raises on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TURBOMOE_DISABLE"] = "1"
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=cwd, timeout=timeout_s)
