#!/usr/bin/env python3
"""pytest under compute-sanitizer memcheck, in as many processes as device memory needs.

Under memcheck the device memory of freed tensors did not come back within a process (nineteenth
and twentieth sessions: the free memory fell by each test's peak, 77 GiB over ~30 tests, until
torch could not allocate and every later test failed on the broken context). So the tests run in
rounds: each round is one `compute-sanitizer ... python -m pytest <the tests not yet run>` with
scripts/memcheck_plugin.py, which logs each test's start, outcome and end and stops the round
after a test that leaves less than --min-free-gib free; the next round starts a fresh process
with the rest. A round that ends any other way (a crash, a time limit) ends the run: the test
it was in counts as failed, the tests it did not reach as not run.

    memcheck_rounds.py [--min-free-gib 24] [--max-rounds 12]
                       [--launcher "compute-sanitizer --tool memcheck ..."] -- PYTEST_ARGS...

Prints each round's output, then the totals in the forms scripts/gpu_suite.sh reads: a line
`ERROR SUMMARY: N` (memcheck errors over all rounds) and `P passed, F failed, S skipped, N not
run in R rounds`. Exit status: 86 if memcheck reported errors, 5 if no test was collected, 1 if
a test failed or was not run, 124 when stopped by SIGTERM, else 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

MEMCHECK_ERROR_EXIT = 86


def collect(pytest_args: list[str], env: dict[str, str]) -> list[str]:
    """The node ids pytest would run (collected without the sanitizer: it is slow to start)."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "memcheck_plugin"]
    listing = subprocess.run(
        [*command, *pytest_args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    ids = [line.strip() for line in listing.stdout.splitlines() if "::" in line]
    if listing.returncode not in (0, 5):
        sys.stdout.write(listing.stdout + listing.stderr)
        raise SystemExit(f"memcheck_rounds: collection failed (rc {listing.returncode})")
    return ids


def outcomes(log: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each finished test's outcome (failed if any phase failed) and the tests that started but
    never finished (their process died), from one round's event log."""
    result: dict[str, str] = {}
    started: list[str] = []
    finished: set[str] = set()
    for line in log:
        event, _, test = line.partition(" ")
        if event == "started":
            started.append(test)
        elif event == "done":
            finished.add(test)
        elif event in ("passed", "failed", "skipped") and result.get(test) != "failed":
            result[test] = event
    died = [test for test in started if test not in finished]
    # A finished test always has an outcome line; none would be a fault of the log: not a pass.
    return {test: result.get(test, "failed") for test in finished}, died


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-free-gib", type=float, default=24.0)
    parser.add_argument("--max-rounds", type=int, default=12)
    parser.add_argument(
        "--launcher",
        default="compute-sanitizer --tool memcheck --leak-check no",
        help="the command each round's python runs under",
    )
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args

    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)  # memcheck_plugin.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    remaining = collect(pytest_args, env)
    print(f"memcheck_rounds: {len(remaining)} tests collected", flush=True)
    if not remaining:
        print("no tests ran")
        return 5

    current: list[subprocess.Popen[str]] = []

    def stop(signum: int, _frame: object) -> None:
        for child in current:
            child.terminate()
        print(f"memcheck_rounds: signal {signum}, stopped", flush=True)
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, stop)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    errors = 0
    memcheck_failed = False
    rounds = 0
    with tempfile.TemporaryDirectory() as scratch:
        done_log = Path(scratch) / "events.log"
        env["TURBOMOE_TEST_DONE_LOG"] = str(done_log)
        env["TURBOMOE_TEST_MIN_FREE_GIB"] = str(args.min_free_gib)
        while remaining and rounds < args.max_rounds:
            rounds += 1
            done_log.write_text("")
            print(f"== round {rounds}: {len(remaining)} tests", flush=True)
            command = [*shlex.split(args.launcher), sys.executable, "-m", "pytest", "-q"]
            command += ["-p", "no:cacheprovider", "-p", "memcheck_plugin", *remaining]
            child = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            current[:] = [child]
            errors_this_round = 0
            assert child.stdout is not None
            for line in child.stdout:
                sys.stdout.write(line)
                found = re.search(r"ERROR SUMMARY: (\d+)", line)
                if found:
                    errors_this_round += int(found.group(1))
            rc = child.wait()
            current.clear()
            errors += errors_this_round
            memcheck_failed |= rc == MEMCHECK_ERROR_EXIT
            log = done_log.read_text().splitlines()
            finished, died = outcomes(log)
            for outcome in finished.values():
                totals[outcome] += 1
            for test in died:
                print(f"== round {rounds}: the process ended inside {test}", flush=True)
                totals["failed"] += 1
            stopped_for_memory = any(line.startswith("stopped:") for line in log)
            before = len(remaining)
            gone = set(finished) | set(died)
            remaining = [test for test in remaining if test not in gone]
            print(f"== round {rounds}: rc {rc}, {before - len(remaining)} tests ran", flush=True)
            if not (stopped_for_memory and len(remaining) < before):
                break
    print(f"ERROR SUMMARY: {errors}")
    print(
        f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped, "
        f"{len(remaining)} not run in {rounds} rounds"
    )
    if memcheck_failed or errors > 0:
        return MEMCHECK_ERROR_EXIT
    return 1 if totals["failed"] or remaining else 0


if __name__ == "__main__":
    sys.exit(main())
