"""What every benchmark shares: percentiles, a printed table, and `benchmarks/results/<name>.json`.

    from results import percentiles, print_table, write_results

    write_results("startup_memory", {"startup_s": percentiles(samples)})

The JSON is written the same way each time (sorted keys, two-space indent, a final newline,
floats as measured), with the machine it was measured on, so two runs diff line by line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentiles(samples: Sequence[float], digits: int = 6) -> dict[str, float | int]:
    """n, p50, p99, min and max of `samples` (p99 by the inclusive method: within the samples' range)."""
    if not samples:
        raise ValueError("percentiles of no samples: run the benchmark at least once")
    ordered = sorted(samples)
    p99 = statistics.quantiles(ordered, n=100, method="inclusive")[98] if len(ordered) > 1 else ordered[0]
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), digits),
        "p99": round(p99, digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table on stdout: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    """Floats to 4 significant digits, but never in exponent form (11,490 hops/s, not 1.149e+04)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


def write_results(name: str, results: Mapping[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json` (replacing it) and return its path."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"benchmark name {name!r} must be letters, digits and underscores (it names the file)")
    document = {
        "benchmark": name,
        "machine": {"python": platform.python_version(), "arch": platform.machine(), "cpus": os.cpu_count()},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path
