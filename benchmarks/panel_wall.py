"""Review panel wall time against its slowest reviewer: round 1 must run reviewers at once.

Five scripted LLM reviewers on 127.0.0.1 answer after 0.2 to 1.0 s (model latency). Each
is timed alone, then the panel of five reviews the same build, side by side in one run.
Target: panel wall time <= 1.2x the slowest reviewer alone (the sum would be 3.0 s, 3x).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import write_results

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("SCRIPTED_API_KEY", "scripted")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from review_helpers import archived_subject, scripted_reviewer, verdict, write_panel  # noqa: E402

from generator.review.panel import load_panel  # noqa: E402
from generator.review.run import PanelRun  # noqa: E402
from generator.senior.scripted import Reply, ScriptedServer  # noqa: E402

DELAYS = (0.2, 0.4, 0.6, 0.8, 1.0)
RUNS = 3


def timed_review(panel_file: Path, subject) -> float:
    panel = load_panel(panel_file)
    started = time.perf_counter()
    rounds = PanelRun(panel).review(subject)
    elapsed = time.perf_counter() - started
    assert rounds[-1].consensus.outcome == "approve", rounds[-1].consensus.reason
    return elapsed


def main() -> None:
    subject = archived_subject()
    servers = [ScriptedServer(lambda body, d=d: Reply(verdict(), delay=d), model="scripted-reviewer").start()
               for d in DELAYS]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            reviewers = {f"r{i}": scripted_reviewer(s.base_url) for i, s in enumerate(servers)}
            alone = {name: write_panel(Path(tmp) / name, {name: definition}) for name, definition in reviewers.items()}
            together = write_panel(Path(tmp) / "panel", reviewers)
            timed_review(together, subject)  # warm up: litellm import, token counting
            single = {name: statistics.median(timed_review(p, subject) for _ in range(RUNS)) for name, p in alone.items()}
            panel = statistics.median(timed_review(together, subject) for _ in range(RUNS))
    finally:
        for server in servers:
            server.stop()
    slowest = max(single.values())
    ratio = panel / slowest
    for (name, seconds), delay in zip(single.items(), DELAYS, strict=True):
        print(f"reviewer {name} alone (answers after {delay:.1f}s): {seconds:.3f}s")
    print(f"panel of {len(single)}: {panel:.3f}s; sum of reviewers {sum(single.values()):.3f}s")
    print(f"panel over slowest reviewer: {ratio:.2f}x (target <= 1.2x)")
    written = write_results("panel_wall", {"reviewers_alone_s": single, "panel_s": panel, "slowest_s": slowest,
                                           "panel_over_slowest": round(ratio, 3)})
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
