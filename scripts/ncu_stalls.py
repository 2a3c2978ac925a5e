#!/usr/bin/env python3
"""The SASS instructions with the most warp-stall samples, from `ncu --page source --csv
--print-source sass` (scripts/gemm_ncu.sh with NCU_SOURCE=1): which waits a kernel's warps spend
their time in. Column names differ between Nsight Compute versions, so the sample column is found
by name ("Warp Stall Sampling (All Samples)" or the closest); several kernels in one export are
summed per instruction text and address."""

from __future__ import annotations

import csv
import sys
from collections import Counter


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    header_at = next(
        (i for i, row in enumerate(rows) if any("Stall Sampling" in cell for cell in row)), None
    )
    if header_at is None:
        print(f"{path}: no stall-sampling column (was SourceCounters collected?)")
        return
    header = rows[header_at]
    samples_col = next(
        (i for i, c in enumerate(header) if "Stall Sampling (All" in c),
        next(i for i, c in enumerate(header) if "Stall Sampling" in c),
    )
    source_col = next((i for i, c in enumerate(header) if c.strip() == "Source"), 1)
    address_col = next((i for i, c in enumerate(header) if c.strip() == "Address"), 0)
    counts: Counter[tuple[str, str]] = Counter()
    for row in rows[header_at + 1 :]:
        if len(row) <= max(samples_col, source_col, address_col):
            continue
        try:
            value = float(row[samples_col].replace(",", ""))
        except ValueError:
            continue
        counts[(row[address_col], row[source_col].strip())] += value
    total = sum(counts.values()) or 1.0
    print(f"{header[samples_col]}: {total:,.0f} samples")
    for (address, source), value in counts.most_common(top):
        print(f"{100 * value / total:5.1f}%  {address:>8}  {source}")


if __name__ == "__main__":
    main()
