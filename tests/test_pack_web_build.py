"""Marco's web tests through `regenerate`: with 127.0.0.1 allow-listed in the spec, the artifact's own tests fetch
real pages from a server on 127.0.0.1 in the sandbox (and still see every other non-public address refused);
the repo's spec allow-lists nothing, so its builds prove the refusals instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from repo_specs import CORE_MADS, REPO, builtin_only_spec
from test_regenerate import _build, _options

pytestmark = pytest.mark.slow

MARCO_TESTS = {"tests.test_marco::test_fetch", "tests.test_marco::test_robots"}


def _allow_local(spec: Path) -> None:
    path = spec / "ecosystem.yaml"
    ecosystem = yaml.safe_load(path.read_text())
    ecosystem["packs"] = {**(ecosystem.get("packs") or {}), "web": {"allow": ["127.0.0.1"]}}
    path.write_text(yaml.safe_dump(ecosystem, sort_keys=False))


def test_the_repo_spec_allow_lists_nothing_for_the_web_pack():
    ecosystem = yaml.safe_load((REPO / "spec" / "ecosystem.yaml").read_text())
    web = (ecosystem.get("packs") or {}).get("web") or {}
    assert not web.get("allow"), "the repo's spec must not open the web pack to any address: tests allow-list their own"


def test_with_127_0_0_1_allow_listed_marcos_tests_fetch_from_a_local_server_in_the_sandbox_and_pass(tmp_path):
    spec = builtin_only_spec(tmp_path / "spec", ("marco", *CORE_MADS))
    _allow_local(spec)
    result = _build(_options(tmp_path / "out", spec))
    tests = json.loads((result.path / "tests.json").read_text())
    outcomes = {t["id"]: t["outcome"] for t in tests["tests"]}
    assert {name: outcomes.get(name) for name in MARCO_TESTS} == dict.fromkeys(MARCO_TESTS, "passed")
    assert tests["failed"] == 0 and tests["errors"] == 0
    assert all("R14" in t["requirements"] for t in tests["tests"] if t["id"] in MARCO_TESTS)
    # What ran is the allow-listed case: pages fetched and checked, not only refusals.
    written = (result.path / "src" / "tests" / "test_marco.py").read_text()
    assert 'fetched = eco.call("marco.fetch", url=base + "/page")' in written
    assert 'closed = eco.call("marco.robots", url=base + "/private/plans")' in written
    assert "allow-lists nothing" not in written
