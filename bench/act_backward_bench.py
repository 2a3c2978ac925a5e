#!/usr/bin/env python3
"""The lean experts' activation backward: one pass (tm_swiglu_weighted_backward) against the four
passes it replaced (activation, combine-backward with one slot a row, scaling, activation
backward), on one GPU at the Qwen3-30B-A3B layer shape (32k routed rows, I = 768, bf16).

Both run through ``turbomoe.ops.moe_lean._activation_backward`` (the four passes with
``TURBOMOE_FUSED_ACT_BACKWARD=0``), interleaved, CUDA events, medians. The floor is the one pass's
bytes (read U and gate/up, write d gate/up and w ⊙ act) at the device copy rate measured in the
same run. Also checks that both give the same values.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from cuda_timing import copy_rate, median_ms

from turbomoe.ops.moe_lean import _activation_backward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    rows, inter = args.rows, args.inter
    dev, bf16 = "cuda", torch.bfloat16
    unweighted = torch.randn(rows, inter, device=dev, dtype=bf16)
    gate_up = torch.randn(rows, 2 * inter, device=dev, dtype=bf16) * 2
    row_weights = torch.rand(rows, device=dev, dtype=bf16)
    activation = (1, 1.702, 7.0, False)  # SiLU, gate/up as halves

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        os.environ["TURBOMOE_FUSED_ACT_BACKWARD"] = "1" if fused else "0"
        return _activation_backward(unweighted, gate_up, row_weights, activation, True)

    fused_out, composed_out = run(True), run(False)
    same = all(
        torch.equal(a, b) for a, b in zip(fused_out[:2], composed_out[:2], strict=True)
    ) and torch.allclose(fused_out[2].float(), composed_out[2].float(), rtol=1e-2, atol=1e-2)

    rate = copy_rate(1 << 30)

    for _ in range(5):
        run(True)
        run(False)
    fused_ms, composed_ms = [], []
    for _ in range(3):  # interleaved rounds
        fused_ms.append(median_ms(lambda: run(True), args.reps))
        composed_ms.append(median_ms(lambda: run(False), args.reps))
    floor_bytes = rows * inter * 2 * 6  # U, gate, up read; d gate, d up, w*act written
    result = {
        "device": torch.cuda.get_device_name(),
        "rows": rows,
        "inter": inter,
        "same_values": bool(same),
        "copy_tb_s": rate / 1e12,
        "floor_ms": floor_bytes / rate * 1e3,
        "fused_ms": min(fused_ms),
        "four_passes_ms": min(composed_ms),
    }
    print(
        f"{result['device']}: {rows} x {inter} bf16: one pass {result['fused_ms']:.3f} ms, "
        f"four passes {result['four_passes_ms']:.3f} ms, floor {result['floor_ms']:.3f} ms "
        f"({result['copy_tb_s']:.2f} TB/s copy); same values: {same}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
