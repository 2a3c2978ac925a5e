"""Turning run results into the comparison: console table, JSON, PNG chart, benchmarks.jsonl."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from turbomoe.bench.runner import RunResult


def _git(args: list[str], cwd: Path | None) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_commit(cwd: Path | None = None) -> str:
    """The commit the benchmarked code is: TURBOMOE_BENCH_COMMIT when set (a copied tree whose
    git metadata is older than its files, as on a lent device machine), else HEAD, marked
    ``-dirty`` when tracked files differ from it, so that a record never names a commit whose
    code it did not run."""
    override = os.environ.get("TURBOMOE_BENCH_COMMIT", "").strip()
    if override:
        return override
    head = _git(["rev-parse", "HEAD"], cwd)
    if head is None or not head.strip():
        return "unknown"
    changed = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return head.strip() + ("-dirty" if changed is None or changed.strip() else "")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def loss_check(hf: RunResult, tm: RunResult, rtol: float) -> dict[str, Any]:
    """Both runs start from the same weights and data, so the first-step losses must agree
    within bf16 noise. NaN or a missing loss fails the check."""
    a, b = hf.first_loss, tm.first_loss
    rel = abs(b - a) / max(abs(a), 1e-12) if math.isfinite(a) and math.isfinite(b) else math.inf
    return {"hf": a, "turbomoe": b, "rel_diff": rel, "rtol": rtol, "ok": rel <= rtol}


def compare(results: dict[str, RunResult], rtol: float) -> tuple[dict[str, Any], list[str]]:
    """Ratios turbomoe / stock and the list of failures (empty when all checks pass)."""
    failures = [f"{r.name}: {r.error}" for r in results.values() if r.error]
    hf, tm = results.get("hf"), results.get("turbomoe")
    if hf is None or tm is None or hf.error or tm.error:
        return {}, failures
    check = loss_check(hf, tm, rtol)
    if not check["ok"]:
        failures.append(
            f"first-step loss mismatch: stock {check['hf']:.6f} vs turbomoe "
            f"{check['turbomoe']:.6f} (rel {check['rel_diff']:.2e} > {rtol:g})"
        )
    ratios = {
        "speedup": _ratio(tm.tps_per_gpu, hf.tps_per_gpu),
        "tflops": _ratio(tm.tflops_per_gpu, hf.tflops_per_gpu),
        "peak_mem": _ratio(tm.peak_gib, hf.peak_gib),
        "same_weights": hf.weights_fingerprint == tm.weights_fingerprint,
        "loss_check": check,
    }
    return ratios, failures


def _fmt(value: float | None, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_table(payload: dict[str, Any]) -> str:
    runs: dict[str, dict[str, Any]] = payload["runs"]
    cfg = payload["config"]
    head = (
        f"{cfg['family']} {cfg['layers']} layers, seq {cfg['seq']} x batch {cfg['batch']}, "
        f"{cfg['dtype']}, {cfg['warmup']} warm-up + {cfg['steps']} timed steps on "
        f"{payload['gpu']} (world size {payload['world_size']}); "
        f"{payload['flops_per_token'] / 1e9:.4g} GFLOP/token; "
        f"GEMM peak {_fmt(payload['peak_tflops'], '.4g')} TFLOP/s ({payload['peak_tflops_source']})"
    )
    multi = payload["world_size"] > 1
    cols = ["run", "experts", "TPS/GPU", "TFLOP/s", "MFU", "peak GiB", "fwd ms", "bwd ms", "loss@1"]
    if multi:
        cols.insert(2, "layout")
    rows = [cols]
    for run in runs.values():
        layout = [run.get("parallelism", "none")] if multi else []
        rows.append(
            [
                run["label"]
                + (" + CUDA graph" if run.get("cuda_graph") else "")
                + (" + attention graphs" if run.get("attention_graphs") else "")
                + ("" if run["patch_in_effect"] else " (NOT in effect)"),
                run["experts_implementation"],
                *layout,
                _fmt(run["tps_per_gpu"], ",.0f"),
                _fmt(run["tflops_per_gpu"], ".1f"),
                _fmt(run["mfu"], ".1%"),
                _fmt(run["peak_gib"], ".2f"),
                _fmt(run["fwd_ms_mean"], ".1f"),
                _fmt(run["bwd_ms_mean"], ".1f"),
                _fmt(run["first_loss"], ".5f"),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head, ""]
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i < (3 if multi else 2) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratios = payload.get("ratios") or {}
    if ratios:
        check = ratios["loss_check"]
        lines += [
            "",
            f"turbomoe / stock: speed {_times(ratios['speedup'])}, "
            f"peak memory {_times(ratios['peak_mem'])}; first-step loss rel diff "
            f"{check['rel_diff']:.2e} (tolerance {check['rtol']:g}: "
            f"{'ok' if check['ok'] else 'MISMATCH'}); "
            f"same initial weights: {'yes' if ratios['same_weights'] else 'NO'}",
        ]
    for run in runs.values():
        if run["error"]:
            lines.append(f"{run['label']}: {run['error']}")
    for warning in payload["warnings"]:
        lines.append(f"warning: {warning}")
    for failure in payload["failures"]:
        lines.append(f"FAILED: {failure}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")


def write_png(path: Path, payload: dict[str, Any]) -> None:
    """Two bar panels: TPS/GPU and peak memory, stock vs turbomoe."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the GPU machine
    import matplotlib.pyplot as plt

    runs = list(payload["runs"].values())
    labels = [
        r["label"] + ("" if r["patch_in_effect"] else "\n(patches NOT in effect)") for r in runs
    ]
    colors = ["#8c8c8c" if r["name"] == "hf" else "#d9480f" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    panels = [("tps_per_gpu", "tokens/s per GPU", ",.0f"), ("peak_gib", "peak memory (GiB)", ".1f")]
    for ax, (key, title, spec) in zip(axes, panels, strict=True):
        values = [r[key] or 0.0 for r in runs]
        bars = ax.bar(labels, values, color=colors)
        for bar, run in zip(bars, runs, strict=True):
            text = _fmt(run[key], spec) if not run["error"] else "failed"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.margins(y=0.15)
    cfg = payload["config"]
    title = f"{cfg['family']}, {cfg['layers']} layers, seq {cfg['seq']}, {payload['gpu']}"
    speedup = (payload.get("ratios") or {}).get("speedup")
    if speedup:
        title += f" — turbomoe {speedup:.2f}x"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_line(payload: dict[str, Any], command: str) -> dict[str, Any]:
    """The one-line summary appended to docs/benchmarks.jsonl."""
    runs = payload["runs"]
    hf, tm = runs.get("hf", {}), runs.get("turbomoe", {})
    cfg = payload["config"]
    return {
        "date": payload["date"],
        "commit": payload["commit"],
        "gpu": payload["gpu"],
        "world_size": payload["world_size"],
        "layers": cfg["layers"],
        "seq": cfg["seq"],
        "batch": cfg["batch"],
        "hf_tps_per_gpu": hf.get("tps_per_gpu"),
        "tm_tps_per_gpu": tm.get("tps_per_gpu"),
        "speedup": (payload.get("ratios") or {}).get("speedup"),
        "hf_peak_gib": hf.get("peak_gib"),
        "tm_peak_gib": tm.get("peak_gib"),
        "tm_tflops_per_gpu": tm.get("tflops_per_gpu"),
        "hf_tflops_per_gpu": hf.get("tflops_per_gpu"),
        "tm_mfu": tm.get("mfu"),
        "hf_layout": hf.get("parallelism"),
        "tm_layout": tm.get("parallelism"),
        "tm_cuda_graph": tm.get("cuda_graph"),
        "tm_attention_graphs": tm.get("attention_graphs"),
        "command": command,
    }


def append_record(path: Path, line: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
