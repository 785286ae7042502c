"""The offline reference senior: what it writes from a spec."""

import os
import shutil
from pathlib import Path

from generator.spec.plan import make_plan


def test_without_an_imperator_prompt_the_senior_writes_one_from_the_role(tmp_path):

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec

    spec_dir = tmp_path / "spec"
    shutil.copytree(Path(__file__).resolve().parents[1] / "spec", spec_dir)
    path = spec_dir / "mads" / "turing.yaml"
    text = path.read_text()
    start = text.index("  prompt: |")
    end = text.index("tools:")
    path.write_text(text[:start] + text[end:])
    spec = load_spec(spec_dir)
    assert spec.mad("turing").imperator.prompt is None
    plan = make_plan(spec)
    files = {f["path"]: f["content"] for f in render_unit(unit_spec(spec, plan, plan.unit("mad:turing")))}
    module = files["madgroup/mads/turing.py"]
    assert 'imperator_prompt = """You are Turing, a MAD of the madgroup ecosystem. Your role: Secrets keeper.' in module
    assert "set_secret, get_secret" in module
