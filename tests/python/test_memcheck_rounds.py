"""scripts/memcheck_rounds.py: the memcheck stage's tests over as many processes as memory needs.

The free device memory is read on a GPU; here a conftest in a scratch folder replaces that
reading in scripts/memcheck_plugin.py so that it runs low after every second test of a process,
and the launcher is ``env`` instead of compute-sanitizer.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "memcheck_rounds.py"

# The plugin's reading of free device memory, replaced: low after every second test of a process.
LOW_AFTER_EVERY_SECOND_TEST = textwrap.dedent(
    """
    import memcheck_plugin

    readings = []


    def pretend_free_gib():
        readings.append(None)
        return 100.0 if len(readings) % 2 else 1.0


    memcheck_plugin.free_gib = pretend_free_gib
    """
)


def run_rounds(tmp_path: Path, tests: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(LOW_AFTER_EVERY_SECOND_TEST)
    (tmp_path / "test_some.py").write_text(textwrap.dedent(tests))
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--launcher", "env", *extra, "--", "test_some.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


FIVE_TESTS_ONE_FAILING = """
    def test_a(): pass
    def test_b(): pass
    def test_c(): assert 1 == 2
    def test_d(): pass
    def test_e(): pass
"""


def test_rounds_go_on_where_the_last_one_stopped_and_add_up(tmp_path: Path) -> None:
    result = run_rounds(tmp_path, FIVE_TESTS_ONE_FAILING)
    lines = result.stdout.splitlines()
    assert "4 passed, 1 failed, 0 skipped, 0 not run in 3 rounds" in lines, result.stdout
    assert "ERROR SUMMARY: 0" in lines
    assert result.returncode == 1  # a test failed
    assert [line for line in lines if line.startswith("== round") and "tests ran" in line] == [
        "== round 1: rc 2, 2 tests ran",
        "== round 2: rc 2, 2 tests ran",
        "== round 3: rc 0, 1 tests ran",
    ]


def test_all_passing_is_exit_zero(tmp_path: Path) -> None:
    result = run_rounds(tmp_path, "def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n")
    assert result.returncode == 0, result.stdout
    assert "3 passed, 0 failed, 0 skipped, 0 not run in 2 rounds" in result.stdout.splitlines()


def test_tests_left_over_by_the_round_limit_count_as_not_run(tmp_path: Path) -> None:
    result = run_rounds(tmp_path, FIVE_TESTS_ONE_FAILING, "--max-rounds", "2")
    assert "3 passed, 1 failed, 0 skipped, 1 not run in 2 rounds" in result.stdout.splitlines()
    assert result.returncode == 1


def test_a_round_that_dies_ends_the_run_with_the_rest_not_run(tmp_path: Path) -> None:
    tests = """
        import os
        def test_a(): pass
        def test_b(): os._exit(3)
        def test_c(): pass
    """
    result = run_rounds(tmp_path, tests)
    assert "1 passed, 1 failed, 0 skipped, 1 not run in 1 rounds" in result.stdout.splitlines()
    assert "== round 1: the process ended inside test_some.py::test_b" in result.stdout
    assert result.returncode == 1


def test_skips_are_counted_as_skips(tmp_path: Path) -> None:
    tests = """
        import pytest
        def test_a(): pass
        @pytest.mark.skip(reason="not here")
        def test_b(): pass
    """
    result = run_rounds(tmp_path, tests)
    assert "1 passed, 0 failed, 1 skipped, 0 not run in 1 rounds" in result.stdout.splitlines()
    assert result.returncode == 0


def test_no_test_collected_is_exit_five(tmp_path: Path) -> None:
    result = run_rounds(tmp_path, "def helper(): pass\n")
    assert result.returncode == 5
    assert "no tests ran" in result.stdout
