"""Source checks of the CUDA kernels that no compiler makes (csrc/common/launch.cuh).

With ``TURBOMOE_PDL=1`` every kernel is launched with programmatic dependent launch: it may
start before the kernel ahead of it in the stream has finished, and only its own
``cuda::wait_for_prior_grids()`` orders it after that kernel. A kernel that touched memory before
that call would race with its predecessor, so every ``__global__`` function of the library must
begin with it; and a kernel launched with ``<<<...>>>`` would bypass the launch helper (and its
error check), so none may be.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
HELPER = CSRC / "common" / "launch.cuh"


def cuda_sources() -> list[Path]:
    if not CSRC.is_dir():
        pytest.fail(f"{CSRC} not found: these tests run from a source checkout")
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh") and p != HELPER)


def without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", " ", text)


def _matching(text: str, open_at: int, left: str, right: str) -> int:
    """Index of the bracket that closes the one at open_at."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == left:
            depth += 1
        elif text[i] == right:
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced {left}{right} from offset {open_at}")


def kernels(text: str) -> list[tuple[str, str]]:
    """(name, body) of every __global__ function definition in text (comments removed)."""
    found = []
    for match in re.finditer(r"\b__global__\b", text):
        at = match.end()
        while True:  # the name is the identifier before the first parenthesis that is not
            paren = text.index("(", at)  # __launch_bounds__'s
            name = re.search(r"(\w+)\s*$", text[at:paren])
            assert name is not None, text[match.start() : paren + 40]
            if name.group(1) != "__launch_bounds__":
                break
            at = _matching(text, paren, "(", ")") + 1
        close = _matching(text, paren, "(", ")")
        after = text[close + 1 :].lstrip()
        if after.startswith(";"):
            continue  # a declaration
        assert after.startswith("{"), f"{name.group(1)}: unexpected {after[:40]!r}"
        brace = text.index("{", close)
        found.append((name.group(1), text[brace + 1 : _matching(text, brace, "{", "}")]))
    return found


def first_statement(body: str) -> str:
    lines = [line.strip() for line in body.splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    return code[0] if code else ""


def test_the_sources_define_kernels():
    """The checks below must have something to check (a moved csrc/ would pass them vacuously)."""
    names = [
        name for path in cuda_sources() for name, _ in kernels(without_comments(path.read_text()))
    ]
    assert len(names) >= 30, names
    assert {"grouped_gemm_kernel", "combine_backward_kernel", "gather_kernel"} <= set(names)


@pytest.mark.parametrize("path", cuda_sources(), ids=lambda p: str(p.relative_to(CSRC)))
def test_every_kernel_waits_for_the_previous_grid_first(path: Path):
    for name, body in kernels(without_comments(path.read_text())):
        assert first_statement(body) == "cuda::wait_for_prior_grids();", (
            f"{path.relative_to(CSRC)}: kernel {name} must begin with "
            "cuda::wait_for_prior_grids() (csrc/common/launch.cuh)"
        )


@pytest.mark.parametrize("path", cuda_sources(), ids=lambda p: str(p.relative_to(CSRC)))
def test_kernels_are_launched_through_the_helper(path: Path):
    text = without_comments(path.read_text())
    assert "<<<" not in text, f"{path.relative_to(CSRC)}: launch kernels with cuda::launch"
    assert "cudaLaunchKernelEx" not in text, f"{path.relative_to(CSRC)}: use cuda::launch_clusters"


def test_the_checks_catch_a_kernel_that_does_not_wait():
    source = """
    template <int N>
    __global__ void __launch_bounds__(128, 1) good(int* x) {
      cuda::wait_for_prior_grids();
      x[0] = N;
    }
    __global__ void late(int* x) {
      x[0] = 1;  // touches memory first
      cuda::wait_for_prior_grids();
    }
    __global__ void declared(int* x);
    """
    found = dict(kernels(without_comments(source)))
    assert set(found) == {"good", "late"}
    assert first_statement(found["good"]) == "cuda::wait_for_prior_grids();"
    assert first_statement(found["late"]) != "cuda::wait_for_prior_grids();"
