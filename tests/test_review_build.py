"""The review stage inside `regenerate`: what ships carries its review; what the panel rejects does not ship."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from repo_specs import CORE_MADS, builtin_only_spec
from review_helpers import REPO, finding, resign, scripted_reviewer, verdict, write_panel

from generator.artifact.store import versions
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.build.verify import verify
from generator.config import RunOptions, SeniorModel
from generator.errors import BuildFailed, ReviewUndecided
from generator.progress import Reporter
from generator.senior.client import LiteLLMClient
from generator.senior.scripted import Fault, Reply, ScriptedServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def offline_spec(tmp_path_factory) -> Path:
    return builtin_only_spec(tmp_path_factory.mktemp("spec") / "spec", CORE_MADS)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("SCRIPTED_API_KEY", "scripted")


def _pipeline(tmp_path: Path, panel: Path) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(f'name = "reviewed"\n\n[senior]\nmodel = "offline/reference"\n\n[review]\npanel = "{panel}"\n')
    return path


class RecordingSenior:
    """The offline senior, remembering what it was asked, optionally planting a line in one file."""

    def __init__(self, *plant: tuple[str, str, str]):
        self.offline = LiteLLMClient(SeniorModel(model="offline/reference"))
        self.requests = []
        self.plant = plant  # (file, after this text, insert this text), ...

    def complete(self, request):
        self.requests.append(request)
        reply = self.offline.complete(request)
        if not self.plant:
            return reply
        answer = json.loads(reply.content)
        for path, anchor, line in self.plant:
            for f in answer["files"]:
                if f["path"] == path:
                    f["content"] = f["content"].replace(anchor, anchor + line)
        return reply.model_copy(update={"content": json.dumps(answer)})


def test_a_rejection_goes_back_to_the_senior_and_the_repaired_build_ships_with_both_reviews(tmp_path, offline_spec):
    flaw = finding("major", "src/madgroup/mads/grace.py", 3, "unclear-docstring", "the module docstring is vague")
    with ScriptedServer([Reply(verdict("request_changes", flaw)), Reply(verdict(summary="Fixed."))],
                        model="scripted-reviewer") as server:
        panel = write_panel(tmp_path, {"tests": {"kind": "tests", "focus": "tests"},
                                       "alpha": scripted_reviewer(server.base_url)}, repair_rounds=1)
        senior = RecordingSenior()
        options = RunOptions(spec_dir=offline_spec, pipeline_file=_pipeline(tmp_path, panel), out_dir=tmp_path / "out")
        result = regenerate(BuildContext(options=options, report=Reporter(quiet=True), senior=senior))
    repair = [r for r in senior.requests if r.unit == "mad:grace" and len(r.messages) > 2]
    assert len(repair) == 1
    assert "the module docstring is vague" in repair[0].messages[-1]["content"]
    assert "The review panel rejected the build" in repair[0].messages[-1]["content"]
    review = json.loads((result.path / "review.json").read_text())
    assert [r["consensus"]["outcome"] for r in review["rounds"]] == ["reject", "approve"]
    assert review["outcome"] == "approve" and review["repairs"] == 1
    assert result.manifest.review.model_dump(mode="json") == {
        "panel": "test", "outcome": "approve", "reason": review["reason"], "repairs": 1, "dissent": [], "cost_usd": 0.0}
    transcript = [json.loads(line) for line in (result.path / "transcript.jsonl").read_text().splitlines()]
    assert any(e["unit"] == "mad:grace" and e["purpose"] == "repair-review" for e in transcript)
    assert "review.md" in result.manifest.outputs and "review.html" in result.manifest.outputs
    # The reviewers' exchanges are in the transcript, and the panel's files in the artifact: the review replays.
    assert [e["unit"] for e in transcript if e["purpose"] == "review"] == ["review:alpha:1.1:chunk1",
                                                                         "review:alpha:2.1:chunk1"]
    assert {"reviews/panels/test.toml", "reviews/reviewers/alpha.toml", "reviews/rubrics/rubric.md"} <= set(
        result.manifest.outputs)
    assert review["bound"]["artifact"] == f"{result.ecosystem}@{result.version}"
    assert review["bound"]["scope"]["reason"] == "a first build: there is no earlier version"
    checked = verify(result.path)
    assert checked.ok, checked.problems
    assert checked.review.startswith("the review (its last review; 1 earlier one(s) judged code the repairs replaced) "
                                     "replayed byte for byte: approve, 2 reviewers")
    # A review.json swapped for another (re-signed, so every hash holds) does not belong to the artifact.
    forged = tmp_path / "forged" / result.version
    shutil.copytree(result.path, forged)
    data = json.loads((forged / "review.json").read_text())
    data["bound"]["reviewed_hash"] = "0" * 64
    (forged / "review.json").write_text(json.dumps(data))
    resign(forged)
    checked = verify(forged)
    assert not checked.ok and any("judged other code" in p for p in checked.problems)


def test_the_offline_panel_rejects_a_build_that_logs_a_secret_and_nothing_ships(tmp_path, offline_spec):
    turing = "madgroup/mads/turing.py"
    plants = [(turing, "from ..kernel import Mad, tool\n", "import logging\n"),
              (turing, "\"Read a secret's current value.\"\n",
               "        secret = await self.use('secrets.get', name=name)\n"
               "        logging.getLogger(__name__).info('read %s', secret)\n")]
    options = RunOptions(spec_dir=offline_spec, pipeline_file=REPO / "pipelines" / "offline.toml",
                         out_dir=tmp_path / "out", reports_dir=tmp_path / "reports")
    senior = RecordingSenior(*plants)
    with pytest.raises(BuildFailed) as err:
        regenerate(BuildContext(options=options, report=Reporter(quiet=True), senior=senior))
    message = str(err.value)
    assert "the offline panel rejected the build: veto by static: src/madgroup/mads/turing.py" in message
    assert "secret-in-log" in message
    assert versions(tmp_path / "out" / "madgroup") == []
    review = json.loads((tmp_path / "reports" / "madgroup" / "1.0.0" / "review.json").read_text())
    assert review["outcome"] == "reject" and review["repairs"] == 1  # the senior was asked once, and failed again
    assert len(review["rounds"]) == 2


def test_an_undecided_panel_ships_nothing(tmp_path, offline_spec, monkeypatch):
    monkeypatch.delenv("SCRIPTED_API_KEY")
    panel = write_panel(tmp_path, {"alpha": scripted_reviewer("http://127.0.0.1:9/v1")})
    options = RunOptions(spec_dir=offline_spec, pipeline_file=_pipeline(tmp_path, panel), out_dir=tmp_path / "out",
                         reports_dir=tmp_path / "reports")
    with pytest.raises(ReviewUndecided) as err:
        regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
    assert "could not decide" in str(err.value) and "SCRIPTED_API_KEY" in str(err.value)
    assert versions(tmp_path / "out" / "madgroup") == []


def test_a_review_with_an_abstainer_replays_with_the_abstention_as_it_was(tmp_path, offline_spec, monkeypatch):
    # alpha has no key (it abstains, quorum 1 lets the tests reviewer decide); beta times out in round 1.
    monkeypatch.delenv("SCRIPTED_API_KEY")
    monkeypatch.setenv("BETA_KEY", "scripted")
    with ScriptedServer([Fault.slow(5, Reply(verdict()))], model="scripted-reviewer") as slow:
        panel = write_panel(tmp_path, {"tests": {"kind": "tests", "focus": "tests"},
                                       "alpha": scripted_reviewer("http://127.0.0.1:9/v1"),
                                       "beta": scripted_reviewer(slow.base_url, api_key_env="BETA_KEY",
                                                                 timeout_seconds=0.5)},
                            consensus={"rule": "unanimous", "quorum": 1})
        options = RunOptions(spec_dir=offline_spec, pipeline_file=_pipeline(tmp_path, panel), out_dir=tmp_path / "out")
        result = regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
    review = json.loads((result.path / "review.json").read_text())
    assert [v["decision"] for v in review["rounds"][-1]["verdicts"]] == ["approve", "abstain", "abstain"]
    checked = verify(result.path)
    assert checked.ok, checked.problems
    assert checked.review.startswith("the review replayed byte for byte: approve, 3 reviewers")
