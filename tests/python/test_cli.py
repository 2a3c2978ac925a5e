"""The `turbomoe` command line: help, usage errors (exit 2), data errors, `info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from turbomoe import cli
from turbomoe.info import OP_FAMILIES
from turbomoe.train.config import SECTIONS, FinetuneConfig, describe_keys

SHORT_NAMES = (
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


def test_finetune_help_documents_every_key_with_its_default(capsys):
    code, out, _ = _run(capsys, "finetune", "--help")
    assert code == 0
    flat = " ".join(out.split())  # help is wrapped to the terminal's width
    keys = describe_keys()
    assert {k.split(".")[0] for k, _, _ in keys} == set(SECTIONS)
    for key, _, default in keys:
        assert f"--{key} " in out, key
        assert f"(default: {default})" in flat, key
    for name in SHORT_NAMES:
        assert name in out, name
    assert "(default: runs/default)" in flat and "null = 60 when neither" in flat
    assert "metrics.jsonl" in out and '"messages"' in out and "--config FILE" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "choose a command"),
        (["bogus"], "invalid choice"),
        (["finetune", "stray"], "unrecognized arguments: stray"),
        (["finetune", "--no-such-option=1"], "unknown key no-such-option"),
        (["finetune", "--optim.lrr=1"], "unknown key optim.lrr; did you mean optim.lr?"),
        (["finetune", "--optimizer.lr=1"], "did you mean optim.lr?"),
        (["finetune", "--batch-size", "0"], "train.batch_size: must be at least 1"),
        (["finetune", "--max-steps", "many"], "train.max_steps: expected an integer"),
        (["finetune", "--lr", "0"], "optim.lr: must be greater than 0"),
        (["finetune", "--time-budget", "-5"], "train.time_budget: must be at least 0"),
        (["finetune", "--dtype", "int8"], "invalid choice"),
        (["finetune", "--data.packing=maybe"], "data.packing: expected true or false"),
        (["finetune", "--lr"], "--lr: expected a value"),
        (["finetune", "--time-budget", "0"], "nothing bounds the run"),
        (["finetune", "--data", "/no/such/file.jsonl"], "no such file"),
        (["finetune", "--data.val_fraction=1.5"], "data.val_fraction must be below 1"),
        (["finetune", "--device", "tpu", "--max-steps", "1"], "model.device"),
        (["finetune", "--model", "/no/such/dir", "--max-steps", "1"], "not a directory"),
        (["finetune", "--config", "/no/such.yaml"], "cannot read"),
    ],
)
def test_usage_errors_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "runs").exists(), "nothing trained or written"


def test_yaml_config_with_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  max_length: 512\n  packing: true\noptim:\n  lr: 1.0e-4\n"
        "lora:\n  enabled: true\n  target_modules: [q_proj, v_proj]\ntrain:\n  max_steps: 5\n"
    )
    config, _ = cli.build_config(
        ["--config", str(path), "--optim.lr=2e-5", "--data.max_length", "1024", "--seed=3"]
    )
    assert config.optim.lr == 2e-5 and config.data.max_length == 1024, "the command line wins"
    assert config.data.packing and config.lora.enabled and config.train.seed == 3
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.max_steps == 5 and config.optim.warmup_steps == 10, "defaults fill in"
    again = FinetuneConfig.from_values(yaml.safe_load(config.to_yaml()))
    assert again == config, "the saved config.yaml round-trips"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim:\n  lr: fast\n", "optim.lr: expected a number"),
        ("optim:\n  learning_rate: 1\n", "unknown key optim.learning_rate"),
        ("optimiser:\n  lr: 1\n", "unknown key optimiser; did you mean optim?"),
        ("- 1\n", "expected sections"),
        ("data: [1\n", "invalid YAML"),
    ],
)
def test_bad_yaml_config_is_a_usage_error(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    code, _, err = _run(capsys, "finetune", "--config", str(path))
    assert code == 2 and message in err, err


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
