"""The compiler's own overhead, with an instant in-process senior (no model latency).

Measures, side by side in one run, the stages regen itself runs — load, plan (prompts and
token counting), synthesise (answer parsing and every check before disk) and write — on
the lab ecosystem (spec/: the seed's whole roster, its roles and its capability packs) and on
generated specs of 4, 16 and 64 MADs. uv and the sandbox are left out: they are other programs,
and their cost follows the generated tests.
Target: the cost per MAD stays flat (64 MADs within 1.3x of 4 MADs, per MAD).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from results import write_results

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import yaml  # noqa: E402

from generator.artifact.store import write_tree  # noqa: E402
from generator.config import Pipeline, SeniorModel  # noqa: E402
from generator.senior import context  # noqa: E402
from generator.senior.models import ModelReply  # noqa: E402
from generator.senior.scripted import reference_answer  # noqa: E402
from generator.senior.spend import Spend  # noqa: E402
from generator.senior.synthesise import SynthesisRun, first_request  # noqa: E402
from generator.spec.load import load_spec  # noqa: E402
from generator.spec.plan import make_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = 3
PIPELINE = Pipeline(
    name="bench",
    senior=SeniorModel(model="openai/gpt-4o", context_window=10_000_000, max_tokens=16_000),
    concurrency=4,
)


class InstantSenior:
    """Answers at once with what the reference senior would write, worked out before the
    timings start (writing the answer is the model's time, not the compiler's)."""

    def __init__(self):
        self.answers: dict[str, str] = {}

    def prepare(self, requests) -> None:
        for r in requests:
            self.answers.setdefault(r.hash, reference_answer({"messages": list(r.messages)}))

    def complete(self, request):
        return ModelReply(content=self.answers[request.hash], model=request.model, prompt_tokens=1, completion_tokens=1)


def generated_spec(folder: Path, mads: int) -> Path:
    """A spec of `mads` MADs, each a copy of Rogers' conversation tools, in a dependency chain."""
    shutil.copytree(REPO / "spec", folder)
    template = yaml.safe_load((REPO / "spec" / "mads" / "rogers.yaml").read_text())
    template["tools"] = [t for t in template["tools"] if t.get("builtin")]
    for path in (folder / "mads").glob("*.yaml"):
        path.unlink()
    for i in range(mads):
        mad = dict(template, name=f"mad{i:03d}", talks_to=[f"mad{i - 1:03d}"] if i else [])
        (folder / "mads" / f"mad{i:03d}.yaml").write_text(yaml.safe_dump(mad, sort_keys=False))
    return folder


def measure(spec_dir: Path, scratch: Path, senior: InstantSenior) -> dict[str, float]:
    times: dict[str, float] = {}

    def timed(stage, fn):
        started = time.perf_counter()
        result = fn()
        times[stage] = time.perf_counter() - started
        return result

    spec = timed("load", lambda: load_spec(spec_dir))
    plan = timed("plan", lambda: make_plan(spec))
    requests = timed("prompts", lambda: [first_request(spec, plan, u, PIPELINE) for u in plan.units])
    timed("tokens", lambda: context.fit(requests, PIPELINE.senior))
    synthesis = timed("synthesise", lambda: SynthesisRun(
        spec, plan, PIPELINE, senior, Spend(PIPELINE.budgets), context.count_tokens).synthesise())
    out = scratch / "src"
    timed("write", lambda: write_tree(out, synthesis.files))
    shutil.rmtree(out)
    times["total"] = sum(times.values())
    times["mads"] = len(spec.mads)
    return times


def main() -> None:
    context.count_tokens(first_request(*_warm()))  # import litellm and its tokenizer outside the timings
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"lab (spec/)": REPO / "spec"}
        for n in (4, 16, 64):
            cases[f"{n} MADs"] = generated_spec(Path(tmp) / f"spec{n}", n)
        for name, spec_dir in cases.items():
            senior = InstantSenior()
            spec = load_spec(spec_dir)
            plan = make_plan(spec)
            senior.prepare(first_request(spec, plan, u, PIPELINE) for u in plan.units)
            runs = [measure(spec_dir, Path(tmp), senior) for _ in range(RUNS)]
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            median["per_mad_ms"] = 1000 * median["total"] / median["mads"]
            results[name] = median
    stages = ["load", "plan", "prompts", "tokens", "synthesise", "write", "total"]
    print(f"{'case':<14}" + "".join(f"{s:>11}" for s in stages) + f"{'per MAD':>11}")
    for name, r in results.items():
        print(f"{name:<14}" + "".join(f"{r[s]:>10.3f}s" for s in stages) + f"{r['per_mad_ms']:>9.1f}ms")
    flatness = results["64 MADs"]["per_mad_ms"] / results["4 MADs"]["per_mad_ms"]
    print(f"per-MAD cost, 64 MADs over 4 MADs: {flatness:.2f}x (target <= 1.3x: flat)")
    print(f"wrote {write_results('pipeline_overhead', {'cases': results, 'per_mad_ratio_64_over_4': round(flatness, 3)})}")


def _warm():
    spec = load_spec(REPO / "spec")
    plan = make_plan(spec)
    return spec, plan, plan.units[0], PIPELINE


if __name__ == "__main__":
    main()
