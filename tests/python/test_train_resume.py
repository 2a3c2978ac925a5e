"""Exact resume: a run stopped at step k and resumed has bitwise the same loss curve as one that
was never stopped; keep-last-N; SIGTERM saves first; resume from the command line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from turbomoe import cli
from turbomoe.train import FinetuneConfig, StopRequest, finetune
from turbomoe.train.checkpoint import find_resume_checkpoint, list_checkpoints

STEPS = 6


def _config(out: Path, **overrides) -> FinetuneConfig:
    base = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "batch_size": 4,
        "device": "cpu",
        "progress": "lines",
        "warmup_steps": 2,
        "threads": 1,  # a fixed thread count: float sums in the same order in both runs
        "log.plots": False,
        "data.max_length": 96,
        "data.packing": True,
        "grad_accum": 2,
        "optim.weight_decay": 0.01,
    }
    return FinetuneConfig.from_values(**{**base, **overrides})


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    finetune(_config(out), echo=lambda _: None)
    return out


def _stop_at(step: int, stop: StopRequest, how: str = "request"):
    def on_step(record):
        if record["step"] == step:
            if how == "request":
                stop.request()
            else:
                signal.raise_signal(signal.SIGTERM)

    return on_step


def test_stopped_and_resumed_run_has_the_same_loss_curve(straight, tmp_path):
    stop = StopRequest()
    first = finetune(_config(tmp_path), stop=stop, echo=lambda _: None, on_step=_stop_at(3, stop))
    assert first.interrupted and first.summary.steps == 3
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000003"]
    resumed = finetune(_config(tmp_path, resume="latest"), echo=lambda _: None)
    assert resumed.summary.steps == STEPS and not resumed.interrupted
    expected = _losses(straight)
    assert len(expected) == STEPS
    assert _losses(tmp_path) == expected, "bitwise equal, step for step"
    assert resumed.summary.first_loss == expected[0], "the summary covers the whole run"


def test_periodic_checkpoints_keep_the_last_n(tmp_path):
    finetune(
        _config(tmp_path, **{"checkpoint.every_steps": 2, "checkpoint.keep_last": 2}),
        echo=lambda _: None,
    )
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-0000004", "step-0000006"]
    assert find_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoints" / names[-1]
    assert find_resume_checkpoint(str(tmp_path), tmp_path).name == names[-1]


def test_sigterm_saves_and_cli_resume_finishes_the_run(straight, tmp_path, capsys):
    stop = StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    first = finetune(
        _config(tmp_path), stop=stop, echo=lambda _: None, on_step=_stop_at(2, stop, "term")
    )
    assert first.interrupted and first.summary.stopped_by == "interrupt"
    assert signal.getsignal(signal.SIGTERM) is before, "handler restored"
    state = json.loads((first.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["index"] > 0
    # The run directory alone is enough: its config.yaml holds the rest.
    code = cli.main(["finetune", "--resume", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert _losses(tmp_path) == _losses(straight)


def test_resume_from_a_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["finetune", "--max-steps", "1", "--checkpoint.resume", str(tmp_path / "nope")])
    assert code == 2
    assert "no checkpoint there" in capsys.readouterr().err
