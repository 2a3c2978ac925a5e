"""Checks that need a fresh interpreter: what ``import turbomoe`` does (and does not do).

- No CUDA initialisation at import (torch.cuda's lazy init is spied on before the import).
- ``turbomoe.unpatch()`` puts back the very objects transformers had before turbomoe was
  imported, and stock numbers come back bit for bit with no turbomoe op called.
- ``TURBOMOE_DISABLE=1`` patches nothing and does not even import transformers.

Importing torch and transformers is most of the cost, so both interpreters are started when
this module is collected and run in the background while the in-process tests run.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PYTHON_DIR = TESTS.parents[1] / "python"

PATCH_AND_UNPATCH = """
import importlib
import torch

# Any CUDA initialisation (torch's lazy init) from here on is recorded and fails the check.
cuda_init_calls = []
def spy(*args, **kwargs):
    cuda_init_calls.append(1)
    raise RuntimeError("torch.cuda._lazy_init called")
torch.cuda._lazy_init = spy

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
from hf_models import FAMILIES, build_model, count_op_calls, make_batch, loss_and_grads

MODULES = {
    "qwen3_moe": "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "qwen2_moe": "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "mixtral": "transformers.models.mixtral.modeling_mixtral",
    "olmoe": "transformers.models.olmoe.modeling_olmoe",
    "deepseek_v3": "transformers.models.deepseek_v3.modeling_deepseek_v3",
}

def snapshot():
    objects = {}
    for name in MODULES.values():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            objects[(name, attr)] = value
            if isinstance(value, type):
                for key, member in vars(value).items():
                    objects[(name, attr, key)] = member
    mappings = (dict(ExpertsInterface._global_mapping), dict(ALL_EXPERTS_FUNCTIONS._local_mapping))
    return objects, mappings

def run(family):
    model = build_model(family)
    batch = make_batch()
    loss, grads, _ = loss_and_grads(model, batch)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    return [loss, logits, *grads.values()]

stock = {family: run(family) for family in FAMILIES}
# Taken after the stock run, so transformers' own lazily set class caches are in it.
before, before_maps = snapshot()

import turbomoe
assert turbomoe.patched_families(), "the import should have patched transformers"
assert snapshot() != (before, before_maps)
with count_op_calls() as counts:
    patched = {family: run(family) for family in FAMILIES}
assert all(counts.values()), counts
assert not cuda_init_calls and not torch.cuda.is_initialized()
print("NO_CUDA_INIT_OK")

turbomoe.unpatch()
after, after_maps = snapshot()
assert after.keys() == before.keys(), set(after) ^ set(before)
changed = [key for key in before if after[key] is not before[key]]
assert not changed, changed
assert after_maps == before_maps
with count_op_calls() as counts:
    again = {family: run(family) for family in FAMILIES}
assert not any(counts.values()), counts
for family in FAMILIES:
    for want, got in zip(stock[family], again[family], strict=True):
        assert torch.equal(want, got), family
print("UNPATCH_OK")
"""

DISABLED = """
import sys
import turbomoe
assert turbomoe.patched_families() == {}
assert "transformers" not in sys.modules, "disabled turbomoe must not import transformers"
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
assert "turbomoe" not in ExpertsInterface._global_mapping
assert not ALL_EXPERTS_FUNCTIONS._local_mapping
from hf_models import build_model, count_op_calls, make_batch
model = build_model("qwen3_moe")
with count_op_calls() as counts:
    model(**make_batch())
assert not any(counts.values()), counts
assert turbomoe.patch(), "an explicit patch() still works"
print("DISABLED_OK")
"""


class _Background:
    """A Python interpreter running ``code``; output goes to files (pipes could fill up)."""

    def __init__(self, code: str, **env: str) -> None:
        paths = [str(TESTS), str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        full_env.pop("TURBOMOE_DISABLE", None)
        # One thread each: these share the CPU with the in-process tests.
        full_env.update({"OMP_NUM_THREADS": "1", **env})
        self._out = tempfile.TemporaryFile(mode="w+")
        self._err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=self._out, stderr=self._err, env=full_env
        )
        self._result: tuple[int, str, str] | None = None
        atexit.register(self._kill)

    def _kill(self) -> None:
        # At exit: stop an interpreter whose test was deselected, and release its files.
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._out.close()
        self._err.close()

    def result(self, timeout: float = 600) -> tuple[int, str, str]:
        if self._result is None:
            code = self._proc.wait(timeout=timeout)
            self._out.seek(0)
            self._err.seek(0)
            self._result = (code, self._out.read(), self._err.read())
            self._out.close()
            self._err.close()
        return self._result


_patch_and_unpatch = _Background(PATCH_AND_UNPATCH)
_disabled = _Background(DISABLED, TURBOMOE_DISABLE="1")


@pytest.fixture(scope="module")
def patch_and_unpatch() -> tuple[int, str, str]:
    return _patch_and_unpatch.result()


def test_import_does_not_initialise_cuda(patch_and_unpatch: tuple[int, str, str]) -> None:
    _code, out, err = patch_and_unpatch
    assert "NO_CUDA_INIT_OK" in out, err[-3000:]


def test_unpatch_restores_every_object_and_stock_numbers_bitwise(
    patch_and_unpatch: tuple[int, str, str],
) -> None:
    """After unpatch the very same objects are back, and losses, logits and gradients equal
    the stock ones computed before turbomoe was imported, bit for bit, with no op called."""
    code, out, err = patch_and_unpatch
    assert code == 0 and "UNPATCH_OK" in out, err[-3000:]


def test_turbomoe_disable_patches_nothing() -> None:
    code, out, err = _disabled.result()
    assert code == 0 and "DISABLED_OK" in out, err[-3000:]
