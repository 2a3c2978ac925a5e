"""End-to-end fine-tuning on CPU: loss goes down, metrics and an HF checkpoint that stock
transformers loads with the trained model's logits; Ctrl-C; atomic checkpoints; the schedule."""

from __future__ import annotations

import itertools
import json
import math
import signal
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from stock_process import run_without_turbomoe

from turbomoe.train import ConfigError, FinetuneConfig, StopRequest, finetune
from turbomoe.train.checkpoint import save_atomically, save_checkpoint
from turbomoe.train.schedule import Progress, WarmupCosine

STEPS = 8


def _config(out: Path, **overrides) -> FinetuneConfig:
    base = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "batch_size": 8,
        "device": "cpu",
        "progress": "lines",
        "warmup_steps": 2,
        # One thread: on a shared CI box, two OpenMP threads fighting other jobs for two cores
        # run this tiny model ten times slower.
        "threads": 1,
    }
    return FinetuneConfig.from_values(**{**base, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    lines: list[str] = []
    return finetune(_config(out), echo=lines.append), lines


def test_loss_goes_down(run):
    result, _ = run
    s = result.summary
    assert s.steps == STEPS and s.stopped_by == "max_steps"
    assert s.last_loss < s.first_loss - 0.3, (s.first_loss, s.last_loss)
    assert s.tokens > 0 and s.tokens_per_s > 0


def test_banner_and_summary_are_printed(run):
    _, lines = run
    text = "\n".join(lines)
    assert "embedded tiny qwen3_moe" in text and "instructions.jsonl" in text
    assert f"steps        {STEPS}" in text and "tokens/s" in text and "->" in text
    assert "TFLOP/s" in text and "memory" in text and "plots" in text


def test_metrics_jsonl(run):
    result, _ = run
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    keys = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_gpu", "tflops")
    for key in (*keys, "elapsed_s", "peak_mem_gib"):
        assert all(isinstance(r[key], float | int) for r in records), key
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs), "warmup then decay"
    assert records[0]["loss"] == result.summary.first_loss
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["tflops_per_gpu"] > 0


def test_plots_and_resolved_config_are_written(run):
    result, _ = run
    for name in ("loss.png", "throughput.png"):
        assert (result.output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = FinetuneConfig.from_values(
        yaml.safe_load((result.output_dir / "config.yaml").read_text())
    )
    assert saved.to_dict() == _config(result.output_dir).to_dict()


def test_checkpoint_loads_in_stock_transformers_with_same_logits(run, tmp_path):
    result, _ = run
    ckpt = result.checkpoint
    assert ckpt == result.output_dir / "checkpoints" / f"step-{STEPS:07d}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == STEPS
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")], "no temp dirs left"

    prompt = "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([result.tokenizer(prompt)["input_ids"]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    # A separate interpreter that never imports turbomoe: plain transformers must read it.
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, local_files_only=True)
        tok = AutoTokenizer.from_pretrained({str(ckpt)!r}, local_files_only=True)
        assert len(tok) == model.config.vocab_size
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    run_without_turbomoe(script, tmp_path)
    stock = torch.load(tmp_path / "logits.pt")
    # turbomoe's kernels may order float sums differently from stock PyTorch: fp32 rounding only.
    torch.testing.assert_close(stock, expected, rtol=1e-5, atol=1e-5)


def test_same_seed_same_loss_curve(run, tmp_path):
    result, _ = run
    again = finetune(_config(tmp_path), echo=lambda _: None)
    first = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").open()]
    second = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open()]
    assert first == second and again.summary.last_loss == result.summary.last_loss


def test_cuda_graph_option_trains_the_same(run, tmp_path):
    """train.cuda_graph routes every step through GraphedStep (eager on CPU, where there are no
    graphs): the same loss curve as the plain run; with accumulation it is refused."""
    result, _ = run
    config = _config(tmp_path)
    config.set("train.cuda_graph", True)
    again = finetune(config, echo=lambda _: None)
    first = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").open()]
    second = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open()]
    assert first == second and again.summary.last_loss == result.summary.last_loss
    config.set("train.grad_accum", 2)
    with pytest.raises(ConfigError, match="grad_accum 1"):
        config.validate()


def test_router_aux_loss_through_the_graphed_step_trains_the_same(tmp_path):
    """With the router's load-balancing loss on, train.cuda_graph's step differentiates and
    reports the same loss and aux loss as the eager micro-batch loop."""
    logs = []
    for graph in (False, True):
        out = tmp_path / str(graph)
        config = _config(out, max_steps=3)
        config.set("train.router_aux_loss_coef", 0.01)
        config.set("train.cuda_graph", graph)
        finetune(config, echo=lambda _: None)
        logs.append([json.loads(line) for line in (out / "metrics.jsonl").open()])
    for key in ("loss", "aux_loss"):
        first = [row[key] for row in logs[0]]
        assert all(v is not None for v in first), key
        assert first == [row[key] for row in logs[1]], key


def test_cuda_graph_with_packing_pads_batches_to_one_shape(tmp_path):
    """With packing, train.cuda_graph pads every batch to [batch_size, max_length]: the padding
    carries no loss, so the loss curve is the plain packed run's (to float rounding)."""
    curves = []
    for graph in (False, True):
        out = tmp_path / str(graph)
        config = _config(out, max_steps=4)
        config.set("data.packing", True)
        config.set("data.max_length", 256)
        config.set("train.cuda_graph", graph)
        finetune(config, echo=lambda _: None)
        curves.append([json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_finetune_a_local_hf_model_on_prompt_completion_data(run, tmp_path):
    result, _ = run
    data = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"{a} + {a} =", "completion": f" {2 * a}"} for a in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines: list[str] = []
    second = finetune(
        _config(
            tmp_path / "out",
            model=str(result.checkpoint),
            data=str(data),
            max_steps=2,
            lr=1e-4,
        ),
        echo=lines.append,
    )
    assert second.summary.steps == 2
    assert "(qwen3_moe)" in "\n".join(lines) and "20 examples" in "\n".join(lines)
    assert (second.checkpoint / "model.safetensors").is_file()


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path):
    stop = StopRequest()
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(record):
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)  # the real handler, as a terminal would send it

    result = finetune(
        _config(tmp_path, max_steps=1000), stop=stop, echo=lambda _: None, on_step=press_ctrl_c
    )
    assert stop.requested and result.interrupted
    assert result.summary.steps == 2 and result.summary.stopped_by == "interrupt"
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state == {**state, "step": 2, "stopped_by": "interrupt"}
    assert signal.getsignal(signal.SIGINT) is before, "handler restored"


class _Boom(RuntimeError):
    pass


class _FailingModel:
    """Writes part of a checkpoint, then fails, like a full disk or a crash mid-save."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def save_pretrained(self, path: Path, **kwargs: object) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise self.exc


class _Tokenizer:
    def save_pretrained(self, path: Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("exc", [_Boom("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_no_partial_checkpoint(tmp_path, exc):
    target = tmp_path / "checkpoint"
    with pytest.raises(type(exc)):
        save_checkpoint(_FailingModel(exc), _Tokenizer(), target, {"step": 1})
    assert list(tmp_path.iterdir()) == [], "neither the target nor a temp dir remains"


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint"
    save_atomically(target, lambda d: (d / "weights").write_text("good"))
    with pytest.raises(_Boom):
        save_checkpoint(_FailingModel(_Boom()), _Tokenizer(), target, {"step": 2})
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_successful_save_replaces_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint"
    save_atomically(target, lambda d: (d / "old").write_text("1"))
    save_atomically(target, lambda d: (d / "new").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700), "not left private like mkdtemp's"


def test_schedule_warmup_then_cosine_to_floor():
    sched = WarmupCosine(peak_lr=1.0, warmup_steps=4)
    progress = Progress(max_steps=20, time_budget=None)
    lrs = [sched.lr(s, progress.fraction(s, 0.0)) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:])), "decays monotonically"
    assert 0.1 <= lrs[-1] < 0.11


def test_progress_takes_the_nearer_limit():
    p = Progress(max_steps=100, time_budget=10.0)
    assert p.fraction(10, 5.0) == 0.5 and p.fraction(50, 1.0) == 0.5
    assert p.done(100, 0.0) and p.done(1, 10.0) and not p.done(99, 9.9)
    assert not Progress(None, None).done(10**6, 1e9)


@pytest.mark.parametrize("fused", ["1", "0"])  # the kernel's step and the tensor-op step
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_adamw_with_narrow_states_follows_torch_adamw(state_dtype, fused, monkeypatch):
    from turbomoe.train.optim import AdamW

    monkeypatch.setenv("TURBOMOE_FUSED_ADAMW", fused)
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(16, 8))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = AdamW([ours], lr=1e-2, weight_decay=0.1, state_dtype=state_dtype)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(16, 8)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    assert opt.state[ours]["exp_avg"].dtype == state_dtype
    tol = 1e-6 if state_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=tol, atol=tol)


def test_adamw_bf16_states_survive_a_state_dict_round_trip():
    from turbomoe.train.optim import AdamW

    p = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([p], lr=1e-2, state_dtype=torch.bfloat16)
    p.grad = torch.randn(4)
    opt.step()
    again = AdamW([p], lr=1e-2, state_dtype=torch.bfloat16)
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("max_norm", [0.5, 1e9, math.inf])
def test_clip_scales_like_torch_and_only_when_it_clips(max_norm, monkeypatch):
    from turbomoe.train.step import clip_grad_norm_if_needed

    torch.manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref, strict=True):
        p.grad = torch.randn(5, 3)
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    scaled = []
    foreach_mul = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a: scaled.append(a) or foreach_mul(*a))
    norm = clip_grad_norm_if_needed(ours, max_norm)
    torch.testing.assert_close(norm, want)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    # Only a norm above the bound costs a pass over the gradients.
    assert len(scaled) == (1 if max_norm < float(want) else 0)
    if max_norm == 0.5:
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours]))
        assert float(clipped) == pytest.approx(0.5, rel=1e-4)
