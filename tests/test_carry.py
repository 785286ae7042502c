"""Carried tools: the contract a model-written tool was written against, lifting it out of an answer with
everything it needs, splicing it into the offline senior's answer, and refusing, by name, what cannot be carried."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from generator.config import load_pipeline
from generator.errors import UserError
from generator.senior import check
from generator.senior.answer import Answer
from generator.senior.carry import SourceUnit, contracts, find_carried
from generator.senior.offline import render_unit, template_tests, unit_spec_of
from generator.senior.offline.written import LiftError, lift
from generator.senior.synthesise import first_request
from generator.spec.load import load_spec
from generator.spec.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
OFFLINE = load_pipeline(REPO / "pipelines" / "offline.toml")


def _requests(spec_dir: Path) -> tuple:
    spec = load_spec(spec_dir)
    plan = make_plan(spec)
    return spec, plan, {u.name: first_request(spec, plan, u, OFFLINE) for u in plan.units}


@pytest.fixture(scope="module")
def repo():
    return _requests(REPO / "spec")


def _edited_spec(tmp_path: Path, mad: str, edit) -> Path:
    import shutil

    spec = tmp_path / "spec"
    shutil.copytree(REPO / "spec", spec)
    path = spec / ("ecosystem.yaml" if mad == "ecosystem" else f"mads/{mad}.yaml")
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


ROGERS_MODULE = '''"""Rogers, as a model wrote it."""

from __future__ import annotations

import statistics
from collections import Counter

from ..kernel import Mad, tool

SUMMARY_SENTENCES = 3
UNUSED = object()


def _speakers(history):
    return Counter(m["sender"] for m in history)


class Rogers(Mad):
    name = "rogers"

    @tool
    async def create_conversation(self, title: str, participants: list[str] = []) -> dict:
        "Create a conversation."
        return await self.use("conversations.create", title=title, participants=participants)

    # Summarising is the one thing only a model writes here.
    @tool
    async def summarise(self, conversation_id: str, max_messages: int = 50) -> dict:
        """Summarise a conversation."""
        history = await self.use("conversations.history", conversation_id=conversation_id, limit=max_messages)
        return {"conversation_id": conversation_id, "messages": len(history), "participants": dict(_speakers(history)),
                "median_length": self._median_length(history), "sentences": SUMMARY_SENTENCES}

    def _median_length(self, history):
        return statistics.median(self._lengths(history)) if history else 0

    def _lengths(self, history):
        return [len(m["content"]) for m in history]

    def _never_called(self):
        return UNUSED
'''

ROGERS_TESTS = '''"""Rogers' tests, as a model wrote them."""

import pytest

SUMMARISE = "rogers.summarise"


@pytest.fixture
def retro(eco):
    return eco.call("rogers.create_conversation", title="retro")


def test_create_conversation(eco):
    assert eco.call("rogers.create_conversation", title="x")["id"]


def test_summarise_counts_messages(eco, retro):
    assert eco.call(SUMMARISE, conversation_id=retro["id"])["messages"] == 0


def test_summarise_by_name(eco, retro):
    assert eco.call("rogers.summarise", conversation_id=retro["id"])["sentences"] == 3


def test_unrelated(eco):
    assert eco.call("rogers.history", conversation_id="x") == []
'''


def test_a_contract_is_what_the_tool_was_written_against(repo):
    spec, plan, requests = repo
    found = contracts(requests["mad:rogers"].messages)
    assert list(found) == ["rogers.summarise"]
    contract = found["rogers.summarise"]
    assert contract.tool["name"] == "summarise" and [p["name"] for p in contract.tool["params"]] == [
        "conversation_id", "max_messages"]
    assert {"conversations.create", "conversations.search", "models.send", "secrets.get"} <= set(contract.capabilities)
    assert "secrets.set" not in contract.capabilities and "models.budget" not in contract.capabilities
    assert [i["name"] for i in contract.interfaces] == ["turing"]
    assert "no-introspection" in [r["id"] for r in contract.rules]
    assert contracts(requests["mad:turing"].messages) == {} and contracts(requests["frame"].messages) == {}


@pytest.mark.parametrize("edit, mad, expected", [
    (lambda m: m["tools"][-1].update(description="Summarise it differently."), "rogers", "its description changed"),
    (lambda m: m["tools"][-1]["params"].pop("max_messages"), "rogers", "its params changed"),
    (lambda m: m["tools"].append({"name": "models", "description": "Models.", "builtin": "models.list", "returns": "list[dict]"}),
     "rogers", "capability models.budget granted"),
    (lambda m: m["tools"].append({"name": "rename", "description": "Rename.", "params": {"name": {"type": "str"}}}),
     "turing", "the interface of turing changed"),
    (lambda e: e["principles"].append({"id": "no-http", "description": "No HTTP.", "forbid_imports": ["http"],
                                       "applies_to": ["tests/*"]}), "ecosystem", "principle rule no-http added"),
])
def test_what_changed_in_a_contract_is_said(tmp_path, repo, edit, mad, expected):
    before = contracts(repo[2]["mad:rogers"].messages)["rogers.summarise"]
    after = contracts(_requests(_edited_spec(tmp_path, mad, edit))[2]["mad:rogers"].messages)["rogers.summarise"]
    assert after.hash != before.hash
    assert expected in after.changes_since(before)


def test_a_rule_for_other_files_or_another_mad_leaves_the_contract_alone(tmp_path, repo):
    before = contracts(repo[2]["mad:rogers"].messages)["rogers.summarise"]
    spec = _edited_spec(tmp_path, "ecosystem", lambda e: e["principles"].append(
        {"id": "deploy-only", "description": "Deploy files only.", "forbid_patterns": ["sudo"], "applies_to": ["deploy/*"]}))
    spec_edit = yaml.safe_load((spec / "mads" / "grace.yaml").read_text())
    spec_edit["role"] += " And more."
    (spec / "mads" / "grace.yaml").write_text(yaml.safe_dump(spec_edit, sort_keys=False))
    after = contracts(_requests(spec)[2]["mad:rogers"].messages)["rogers.summarise"]
    assert after == before


def test_the_kernel_api_is_part_of_the_contract(repo):
    messages = copy.deepcopy(list(repo[2]["mad:rogers"].messages))
    before = contracts(messages)["rogers.summarise"]
    messages[0]["content"] = messages[0]["content"].replace("async def think(", "async def ponder(")
    assert contracts(messages)["rogers.summarise"].changes_since(before) == ["the kernel API changed"]


def _unit(repo, name="mad:rogers") -> dict:
    return unit_spec_of(repo[2][name].messages)


def test_lifting_takes_the_method_its_private_helpers_module_helpers_imports_and_the_tests_that_exercise_it(repo):
    unit = _unit(repo)
    written = lift("summarise", "rogers", "Rogers", ROGERS_MODULE, ROGERS_TESTS, template_tests(unit["mad"]))
    assert written.imports == ("import statistics\n", "from collections import Counter\n")
    assert written.helpers == ("SUMMARY_SENTENCES = 3\n", 'def _speakers(history):\n    return Counter(m["sender"] for m in history)\n')
    names = [m.split("(")[0].split()[-1] for m in written.methods]
    assert names == ["summarise", "_median_length", "_lengths"]
    assert written.methods[0].startswith("# Summarising is the one thing only a model writes here.\n@tool\nasync def")
    assert [t.split("(")[0] for t in written.tests] == ["def test_summarise_counts_messages", "def test_summarise_by_name"]
    assert written.test_imports == ("import pytest\n",)
    assert written.test_helpers[0] == 'SUMMARISE = "rogers.summarise"\n'
    assert any(h.startswith("@pytest.fixture\ndef retro(eco):") for h in written.test_helpers)


def test_a_lifted_tool_spliced_into_the_offline_answer_passes_every_check(repo):
    spec, plan, requests = repo
    unit = _unit(repo)
    written = lift("summarise", "rogers", "Rogers", ROGERS_MODULE, ROGERS_TESTS, template_tests(unit["mad"]))
    files = render_unit(unit, {"rogers.summarise": written})
    check.answer(spec, plan, plan.unit("mad:rogers"), Answer.model_validate({"files": files}))
    module = next(f["content"] for f in files if f["path"] == "madgroup/mads/rogers.py")
    assert module.index("import statistics") < module.index("from ..kernel import Mad, tool")
    assert module.count("from __future__ import annotations") == 1 and "UNUSED" not in module
    # In the spec's order: after the tools bound to capabilities that come before it, helpers right behind it.
    assert module.index("def list_conversations") < module.index("def summarise") < module.index("def _median_length")
    tests = next(f["content"] for f in files if f["path"] == "tests/test_rogers.py")
    assert tests.count("def test_create_conversation(") == 1 and "test_unrelated" not in tests
    compile(tests, "tests/test_rogers.py", "exec")


def test_lifting_refuses_an_answer_without_the_tool(repo):
    with pytest.raises(LiftError, match="class Rogers has no @tool method summarise"):
        lift("summarise", "rogers", "Rogers", ROGERS_MODULE.replace("async def summarise", "async def summary"), "")
    with pytest.raises(LiftError, match="the module of rogers does not parse: line"):
        lift("summarise", "rogers", "Rogers", ROGERS_MODULE.replace("def _lengths(self, history):", "def _lengths(self,"), "")
    with pytest.raises(LiftError, match="has no class Rogers"):
        lift("summarise", "rogers", "Rogers", ROGERS_MODULE.replace("class Rogers", "class Other"), "")


def _source(repo, build: str, module: str = ROGERS_MODULE, messages=None) -> SourceUnit:
    return SourceUnit(build=build, messages=tuple(messages or repo[2]["mad:rogers"].messages),
                      files={"madgroup/mads/rogers.py": module, "tests/test_rogers.py": ROGERS_TESTS},
                      answered_by="anthropic/claude-sonnet-4-5", written_by={}, lock_inputs={"spec/requirements.md": "old"})


def test_the_newest_build_with_the_same_contract_is_the_source(tmp_path, repo):
    spec, plan, requests = repo
    changed = _requests(_edited_spec(tmp_path, "rogers", lambda m: m["tools"][-1].update(description="Other.")))[2]
    sources = [_source(repo, "madgroup@1.3.0", messages=changed["mad:rogers"].messages), _source(repo, "madgroup@1.2.0")]
    inputs = {"mad:rogers": {"spec/requirements.md": "new", "request": "x"}}
    carried = find_carried({"mad:rogers": ["rogers.summarise"]}, requests, inputs, lambda unit: iter(sources))
    found = carried["rogers.summarise"]
    assert found.source == "madgroup@1.2.0" and found.written_by == "anthropic/claude-sonnet-4-5"
    assert found.changed_since == ("requirements.md",)
    assert found.record().line("rogers.summarise") == (
        "rogers.summarise: carried from 1.2.0, written by anthropic/claude-sonnet-4-5; requirements.md changed since")


def test_tools_that_cannot_be_carried_are_named_with_why_before_any_work(tmp_path, repo):
    spec, plan, requests = repo
    changed = _requests(_edited_spec(tmp_path, "rogers", lambda m: m["tools"][-1].update(description="Other.")))[2]
    with pytest.raises(UserError) as err:
        find_carried({"mad:rogers": ["rogers.summarise"], "mad:fiedler": ["fiedler.compare_models"]}, changed,
                     {"mad:rogers": {}, "mad:fiedler": {}},
                     lambda unit: iter([_source(repo, "madgroup@1.2.0")] if unit == "mad:rogers" else []))
    message = str(err.value)
    assert "rogers.summarise: its contract changed since madgroup@1.2.0, the newest build that has it: its description changed" \
        in message
    assert "fiedler.compare_models: no archived build wrote it" in message
    assert "--pipeline pipelines/frontier.toml" in message


def test_recorded_code_that_no_longer_parses_is_named(repo):
    spec, plan, requests = repo
    broken = ROGERS_MODULE.replace("return [len(m[\"content\"]) for m in history]", "return [len(m[\"content\"] for m in")
    with pytest.raises(UserError, match=r"rogers.summarise: its recorded code in madgroup@1.2.0 cannot be carried: "
                                        r"the module of rogers does not parse"):
        find_carried({"mad:rogers": ["rogers.summarise"]}, requests, {"mad:rogers": {}},
                     lambda unit: iter([_source(repo, "madgroup@1.2.0", module=broken)]))


def test_a_tool_carried_from_a_build_that_carried_it_names_the_model_that_wrote_it(repo):
    spec, plan, requests = repo
    source = _source(repo, "madgroup@1.2.1")
    source = SourceUnit(**{**source.__dict__, "answered_by": "offline/reference",
                           "written_by": {"rogers.summarise": "openai/gpt-4.1"}})
    carried = find_carried({"mad:rogers": ["rogers.summarise"]}, requests, {"mad:rogers": {}}, lambda unit: iter([source]))
    assert carried["rogers.summarise"].written_by == "openai/gpt-4.1"


def test_an_answer_recorded_by_the_scripted_senior_lifts_and_splices_back_to_the_same_bytes(repo):
    """Lifting and splicing are each other's inverse on an answer the offline templates shaped."""
    from generator.senior.scripted import reference_answer

    for unit_name, tool in [("mad:rogers", "summarise"), ("mad:fiedler", "compare_models")]:
        messages = list(repo[2][unit_name].messages)
        answer = {f["path"]: f["content"] for f in json.loads(reference_answer({"messages": messages}))["files"]}
        unit = unit_spec_of(messages)
        mad = unit["mad"]
        written = lift(tool, mad["name"], mad["class_name"], answer[f"madgroup/mads/{mad['name']}.py"],
                       answer[f"tests/test_{mad['name']}.py"], template_tests(mad))
        again = {f["path"]: f["content"] for f in render_unit(unit, {f"{mad['name']}.{tool}": written})}
        assert again == answer


HELPERS_MODULE = '''"""Rogers with helpers of every kind."""

from __future__ import annotations

try:
    import orjson as fastjson
except ImportError:
    import json as fastjson

from ..kernel import Mad, tool


class Rogers(Mad):
    name = "rogers"
    _PREFIX = "summary: "

    class Counts:
        def __init__(self, n):
            self.n = n

    @property
    def style(self):
        return self._style if hasattr(self, "_style") else "short"

    @style.setter
    def style(self, value):
        self._style = value

    def render(self, history):
        return self._PREFIX + fastjson.dumps([m["content"] for m in history]) + Rogers.suffix()

    @staticmethod
    def suffix():
        return "."

    @tool
    async def summarise(self, conversation_id: str, max_messages: int = 50) -> dict:
        """Summarise a conversation."""
        history = await self.use("conversations.history", conversation_id=conversation_id, limit=max_messages)
        self.style = "long"
        return {"messages": self.Counts(len(history)).n, "summary": self.render(history), "style": self.style}
'''


def test_lifting_takes_class_attributes_nested_classes_properties_public_helpers_and_guarded_imports(repo):
    spec, plan, requests = repo
    unit = _unit(repo)
    written = lift("summarise", "rogers", "Rogers", HELPERS_MODULE, "", template_tests(unit["mad"]))
    code = "\n".join(written.methods)
    for part in ('_PREFIX = "summary: "', "class Counts:", "def style(self):", "@style.setter", "def render(",
                 "def suffix():"):
        assert part in code, part
    assert 'name = "rogers"' not in code, "the template writes the spec's attributes"
    assert written.helpers and written.helpers[0].startswith("try:\n    import orjson as fastjson")
    files = render_unit(unit, {"rogers.summarise": written})
    check.answer(spec, plan, plan.unit("mad:rogers"), Answer.model_validate({"files": files}))


def test_a_tool_that_reads_a_name_regen_cannot_take_along_is_refused_by_name():
    module = ROGERS_MODULE.replace('"sentences": SUMMARY_SENTENCES}', '"sentences": SUMMARY_SENTENCES, "at": clock()}')
    module = module.replace("UNUSED = object()", "UNUSED = object()\nglobals()['clock'] = lambda: 0")
    with pytest.raises(LiftError, match="its code reads clock, which its recorded module defines in a way regen "
                                        "cannot take along"):
        lift("summarise", "rogers", "Rogers", module, ROGERS_TESTS)


def test_two_tools_from_different_builds_that_define_one_helper_differently_stop_the_build_by_name(tmp_path, repo):
    """Tools of one unit may come from different builds; a helper both define differently is a conflict, said
    before any work, naming both tools."""
    from generator.senior.carry import preflight

    two = _requests(_edited_spec(tmp_path, "rogers", lambda m: m["tools"].append(
        {"name": "digest", "description": "A digest.", "params": {"conversation_id": {"type": "str"}}, "returns": "dict"})))
    spec, plan, requests = two
    first = ROGERS_MODULE.replace("    def _never_called(self):\n        return UNUSED\n", "")
    second = first.replace("async def summarise(", "async def digest_unused(").replace(
        'return Counter(m["sender"] for m in history)', 'return Counter(m["content"] for m in history)').replace(
        "    # Summarising is the one thing only a model writes here.\n", "").replace(
        "@tool\n    async def digest_unused(self, conversation_id: str, max_messages: int = 50) -> dict:",
        "@tool\n    async def digest(self, conversation_id: str) -> dict:").replace(
        "limit=max_messages", "limit=10")
    sources = {"rogers.summarise": _source(two, "madgroup@1.2.0", module=first, messages=requests["mad:rogers"].messages),
               "rogers.digest": _source(two, "madgroup@1.1.0", module=second, messages=requests["mad:rogers"].messages)}
    carried = {}
    for tool, source in sources.items():
        carried |= find_carried({"mad:rogers": [tool]}, requests, {"mad:rogers": {}}, lambda unit, s=source: iter([s]))
    with pytest.raises(UserError) as err:
        preflight(spec, plan, requests, carried)
    message = str(err.value)
    assert "rogers.summarise (from madgroup@1.2.0), rogers.digest (from madgroup@1.1.0)" in message
    assert "both define _speakers in madgroup/mads/rogers.py, differently" in message


def test_a_source_whose_prompt_this_compiler_cannot_read_is_passed_over(repo):
    spec, plan, requests = repo
    broken = [dict(m) for m in repo[2]["mad:rogers"].messages]
    broken[-1]["content"] = broken[-1]["content"].replace('"package"', '"pkg"')
    sources = [_source(repo, "madgroup@1.3.0", messages=broken), _source(repo, "madgroup@1.2.0")]
    carried = find_carried({"mad:rogers": ["rogers.summarise"]}, requests, {"mad:rogers": {}}, lambda unit: iter(sources))
    assert carried["rogers.summarise"].source == "madgroup@1.2.0"


def test_the_mads_storage_is_part_of_the_contract(tmp_path, repo):
    before = contracts(repo[2]["mad:rogers"].messages)["rogers.summarise"]
    table = {"name": "notes", "columns": [{"name": "text", "type": "text"}]}
    after = contracts(_requests(_edited_spec(tmp_path, "rogers", lambda m: m.update(storage=[table])))[2]["mad:rogers"]
                      .messages)["rogers.summarise"]
    assert after.changes_since(before) == ["its MAD's storage changed"]


def test_the_accepted_answer_is_the_last_one_whatever_the_rounds_say():
    """A check repair during synthesis and the first test repair can share a round number."""
    from generator.senior.transcript import Parameters, TranscriptLine, Usage, accepted_answer

    def line(round_, purpose, response):
        return TranscriptLine(request_hash="h", unit="mad:rogers", round=round_, purpose=purpose, model="m",
                              answered_by="m", parameters=Parameters(temperature=0, seed=0, max_tokens=1, api_base=None,
                                                                      structured_output=True),
                              messages=(), response=response, finish_reason="stop",
                              usage=Usage(prompt_tokens=0, completion_tokens=0), cost_usd=0.0)

    lines = [line(0, "synthesise", "A"), line(1, "repair", "B"), line(1, "repair-tests", '{"files": '),
             line(1, "continue", "[]}")]
    assert accepted_answer(lines) == '{"files": []}'
    assert accepted_answer([]) is None
