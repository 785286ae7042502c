"""How fast `regen --help` starts, next to `python -c "import litellm"`, in one run.

Target: `regen --help` takes a small fraction (< 0.2x) of litellm's import time, because
litellm is imported only when a model is called. Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from results import write_results

RUNS = 5


def timed(argv: list[str]) -> float:
    samples = []
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True")
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    help_s = timed([sys.executable, "-m", "generator.cli", "--help"])
    litellm_s = timed([sys.executable, "-c", "import litellm"])
    bare_s = timed([sys.executable, "-c", "pass"])
    result = {
        "regen_help_s": round(help_s, 4),
        "import_litellm_s": round(litellm_s, 4),
        "python_startup_s": round(bare_s, 4),
        "ratio_help_over_litellm": round(help_s / litellm_s, 4),
        "target_ratio": 0.2,
    }
    print(f"{'regen --help':<24}{help_s:8.3f} s")
    print(f"{'import litellm':<24}{litellm_s:8.3f} s")
    print(f"{'python -c pass':<24}{bare_s:8.3f} s")
    print(f"ratio regen --help / import litellm: {result['ratio_help_over_litellm']:.3f} (target < 0.2)")
    print(f"wrote {write_results('cli_startup', result)}")


if __name__ == "__main__":
    main()
