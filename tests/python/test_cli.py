"""The `turbomoe` command line: help, usage errors (exit 2), data errors, `info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from turbomoe import cli
from turbomoe.info import OP_FAMILIES

FINETUNE_OPTIONS = (
    "--model", "--data", "--max-length", "--output-dir", "--max-steps", "--epochs",
    "--time-budget", "--batch-size", "--grad-accum", "--lr", "--warmup-steps", "--weight-decay",
    "--max-grad-norm", "--seed", "--device", "--dtype", "--threads", "--log-every", "--progress",
)  # fmt: skip


def _run(capsys, *argv):
    """(exit code, stdout, stderr) of `turbomoe argv` run in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_top_level_help(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "finetune" in out and "info" in out


def test_finetune_help_documents_every_option_with_its_default(capsys):
    code, out, _ = _run(capsys, "finetune", "--help")
    assert code == 0
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices["finetune"]
    documented = {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
    assert documented - {"--help"} == set(FINETUNE_OPTIONS)
    for option in FINETUNE_OPTIONS:
        assert option in out, option
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert "(default: " in action.help, action.dest
    flat = " ".join(out.split())  # help is wrapped to the terminal's width
    assert "(default: runs/default)" in flat and "(default: 60 when neither" in flat
    assert "metrics.jsonl" in out and '"messages"' in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "choose a command"),
        (["bogus"], "invalid choice"),
        (["finetune", "--no-such-option"], "unrecognized arguments"),
        (["finetune", "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["finetune", "--max-steps", "many"], "--max-steps: expected an integer"),
        (["finetune", "--lr", "0"], "--lr: must be greater than 0"),
        (["finetune", "--time-budget", "-5"], "--time-budget: must be at least 0"),
        (["finetune", "--dtype", "int8"], "invalid choice"),
        (["finetune", "--time-budget", "0"], "nothing bounds the run"),
        (["finetune", "--data", "/no/such/file.jsonl"], "no such file"),
        (["finetune", "--device", "tpu", "--max-steps", "1"], "--device"),
        (["finetune", "--model", "/no/such/dir", "--max-steps", "1"], "not a directory"),
    ],
)
def test_usage_errors_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "runs").exists(), "nothing trained or written"


def test_bad_data_line_fails_before_training(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user"}]}\n')
    code, out, err = _run(
        capsys, "finetune", "--data", str(data), "--output-dir", str(tmp_path / "o")
    )
    assert code == 1
    assert f"{data}:2: messages[0] has no 'content'" in err
    assert not (tmp_path / "o").exists() and "turbomoe 0.1.0 finetune" not in out


def test_info_mentions_every_op_family(capsys):
    code, out, _ = _run(capsys, "info")
    assert code == 0
    for family, _, _ in OP_FAMILIES:
        assert family in out, family
    for word in ("torch", "transformers", "python", "libturbomoe", "devices", "HF patches"):
        assert word in out


def test_info_json(capsys):
    code, out, _ = _run(capsys, "info", "--json")
    assert code == 0
    report = json.loads(out)
    assert [f["name"] for f in report["ops"]] == [f for f, _, _ in OP_FAMILIES]
    assert all("cpu" in f["backends"] for f in report["ops"])
    assert set(report["versions"]) >= {"turbomoe", "torch", "transformers", "python"}


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "turbomoe.cli", "finetune", "--batch-size", "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "usage: turbomoe finetune" in done.stderr
