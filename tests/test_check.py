"""Checks before disk: bad answers are refused whole, with the reason and the place."""

import pytest

from generator.errors import BuildFailed
from generator.senior import check
from generator.senior.answer import Answer
from generator.spec.model import EcosystemSpec, MadSpec, Spec
from generator.spec.plan import make_plan

GOOD_MODULE = '''
from ..kernel import Mad, tool


class Turing(Mad):
    name = "turing"

    @tool
    async def get_secret(self, name: str) -> dict:
        """Read a secret."""
        return await self.use("secrets.get", name=name)

    @tool
    async def audit(self, limit: int = 50) -> list[dict]:
        """Audit log."""
        return await self.use("secrets.audit", limit=limit)
'''


@pytest.fixture
def spec():
    turing = MadSpec.model_validate(
        {
            "name": "turing",
            "role": "keeps secrets",
            "level": "V1",
            "imperator": {"model": "default", "prompt": "You are Turing."},
            "tools": [
                {"name": "get_secret", "description": "Read a secret.", "builtin": "secrets.get",
                 "params": {"name": {"type": "str"}}},
                {"name": "audit", "description": "Audit log.", "builtin": "secrets.audit",
                 "params": {"limit": {"type": "int", "default": 50}}, "returns": "list[dict]"},
            ],
        }
    )
    ecosystem = EcosystemSpec.model_validate(
        {
            "name": "demo",
            "description": "d",
            "python": "3.11",
            "dependencies": ["mcp"],
            "principles": [
                {"id": "no-shell", "description": "no shell", "forbid_imports": ["subprocess"],
                 "forbid_calls": ["os.system"]},
                {"id": "no-eval", "description": "no eval", "forbid_calls": ["eval"]},
            ],
        }
    )
    return Spec(root="spec", ecosystem=ecosystem, requirements="r", principles="p", mads=(turing,), files=())


def _check(spec, files):
    plan = make_plan(spec)
    unit = plan.unit("mad:turing")
    answer = Answer.model_validate({"files": [{"path": p, "content": c} for p, c in files.items()]})
    check.answer(spec, plan, unit, answer)


def _rejected(spec, files) -> str:
    with pytest.raises(BuildFailed) as err:
        _check(spec, files)
    return str(err.value)


def test_a_correct_module_passes(spec):
    _check(spec, {"demo/mads/turing.py": GOOD_MODULE, "tests/test_turing.py": "def test_x():\n    pass\n"})


@pytest.mark.parametrize(
    "path, why",
    [
        ("/etc/passwd", "absolute paths are not allowed"),
        ("demo/mads/../../../evil.py", "'..'"),
        ("demo/mads/./turing.py", "'..', '.'"),
        (".git/hooks/pre-commit", "nothing may be written under .git"),
        ("tests/.git/config", "nothing may be written under .git"),
        ("demo\\mads\\turing.py", "backslashes"),
        ("demo/kernel/bus.py", "outside unit mad:turing"),
    ],
)
def test_paths_outside_the_unit_or_tree_are_refused(spec, path, why):
    message = _rejected(spec, {"demo/mads/turing.py": GOOD_MODULE, path: "x = 1\n"})
    assert path in message and why in message


def test_python_that_does_not_parse_is_refused_with_its_line(spec):
    broken = GOOD_MODULE + "\n    def oops(:\n"
    message = _rejected(spec, {"demo/mads/turing.py": broken})
    assert "demo/mads/turing.py:" in message and "does not parse" in message


def test_a_missing_tool_is_named(spec):
    module = GOOD_MODULE.split("    @tool\n    async def audit")[0]
    message = _rejected(spec, {"demo/mads/turing.py": module})
    assert "spec'd tool audit is missing from class Turing" in message


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("name: str) -> dict", "name: int) -> dict", "parameter name is int, spec says str"),
        ("name: str) -> dict", "key: str) -> dict", "has parameters (key), spec says (name)"),
        ("limit: int = 50", "limit: int = 10", "defaults to 10, spec says 50"),
        ("limit: int = 50", "limit: int", "must have default 50"),
        ("-> list[dict]", "-> dict", "returns dict, spec says list[dict]"),
        ("async def get_secret", "def get_secret", "must be `async def`"),
    ],
)
def test_a_signature_that_differs_from_the_spec_is_refused(spec, old, new, expected):
    message = _rejected(spec, {"demo/mads/turing.py": GOOD_MODULE.replace(old, new)})
    assert expected in message


def test_an_extra_tool_not_in_the_spec_is_refused(spec):
    extra = GOOD_MODULE + '''
    @tool
    async def leak(self) -> dict:
        """Not in the spec."""
        return {}
'''
    assert "@tool leak is not in the spec of turing" in _rejected(spec, {"demo/mads/turing.py": extra})


@pytest.mark.parametrize(
    "line, expected",
    [
        ("import subprocess", "imports subprocess, forbidden by principle no-shell"),
        ("from subprocess import run", "imports subprocess, forbidden by principle no-shell"),
        ("os.system('ls')", "calls os.system(), forbidden by principle no-shell"),
        ("eval('1')", "calls eval(), forbidden by principle no-eval"),
    ],
)
def test_principle_rules_are_enforced_with_file_and_line(spec, line, expected):
    module = line + "\n" + GOOD_MODULE
    message = _rejected(spec, {"demo/mads/turing.py": module})
    assert "demo/mads/turing.py:1: " + expected in message

