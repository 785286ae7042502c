"""The generated frame follows the console pack: its README, RUNBOOK, run.sh and acceptance tests promise the web UI
only when the spec names `console` under `packs:`, and say how to add it when it does not."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _frame(spec_dir: Path) -> dict[str, str]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    spec = load_spec(spec_dir)
    plan = make_plan(spec)
    return {f["path"]: f["content"] for f in render_unit(unit_spec(spec, plan, plan.unit("frame")))}


def test_the_frame_promises_the_web_ui_only_when_the_spec_names_the_console(tmp_path):
    with_console = _frame(REPO / "spec")  # madgroup's spec names it
    assert "## Grace, the web UI" in with_console["RUNBOOK.md"] and "clients unlock" in with_console["RUNBOOK.md"]
    # sessions are the state's (console_sessions): replicas on one PostgreSQL (spec/ names the pack) need no sticky ones
    runbook = " ".join(with_console["RUNBOOK.md"].split())
    assert "a restart signs nobody out" in runbook and "a load balancer needs no sticky sessions" in runbook
    assert "need sticky sessions" not in runbook
    assert "for the web UI" in with_console["README.md"] and "the web UI at /" in with_console["deploy/run.sh"]
    assert "def test_the_web_ui_signs_in_with_a_client_token" in with_console["tests/test_ecosystem.py"]
    assert "without_the_web_console" not in with_console["tests/test_ecosystem.py"]

    shutil.copytree(REPO / "spec", tmp_path / "spec")
    path = tmp_path / "spec" / "ecosystem.yaml"
    doc = yaml.safe_load(path.read_text())
    del doc["packs"]["console"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    without = _frame(tmp_path / "spec")
    runbook, readme = without["RUNBOOK.md"], without["README.md"]
    assert "## Grace, the web UI" not in runbook and "clients unlock" not in runbook
    assert "add `console: {}` under `packs:`" in runbook and "add `console: {}` under `packs:`" in readme
    assert "for the web UI" not in readme and "the web UI at /" not in without["deploy/run.sh"]
    tests = without["tests/test_ecosystem.py"]
    assert "def test_the_web_ui_" not in tests and "csrf_of" not in tests
    assert "def test_without_the_web_console_the_root_says_how_to_add_it_and_health_answers" in tests
    compile(tests, "test_ecosystem.py", "exec")  # still Python


def test_the_starter_spec_names_no_pack_and_shows_how_to_add_the_console(tmp_path):
    from generator.spec.load import load_spec
    from generator.spec.starter import init

    init(tmp_path / "spec", name="notes")
    text = (tmp_path / "spec" / "ecosystem.yaml").read_text()
    assert "# packs:\n#   console: {}\n" in text
    assert load_spec(tmp_path / "spec").packs == frozenset()
