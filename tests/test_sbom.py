"""The SBOM: CycloneDX JSON from uv.lock, the same bytes every time, checked back against the lock."""

import json
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from archive import ARCHIVE, NEWEST

from generator.artifact.sbom import check_sbom, sbom

REPO = Path(__file__).resolve().parents[1]
SRC = ARCHIVE / NEWEST / "src"


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


@pytest.fixture(scope="module")
def text() -> str:
    return sbom(SRC)


@pytest.fixture(scope="module")
def bom(text) -> dict:
    return json.loads(text)


def _locked() -> dict[str, dict]:
    """The lock's packages by name, read here independently of generator.artifact.sbom."""
    lock = tomllib.loads((SRC / "uv.lock").read_text(encoding="utf-8"))
    return {p["name"]: p for p in lock["package"]}


def _components(bom: dict) -> dict[str, dict]:
    return {c["name"]: c for c in bom["components"]}


def test_every_locked_package_is_a_component_with_its_version_purl_and_hashes(bom):
    locked = _locked()
    components = _components(bom)
    assert set(components) == set(locked) - {"madgroup"}
    for name, component in components.items():
        package = locked[name]
        assert component["type"] == "library"
        assert component["version"] == package["version"]
        assert component["purl"] == f"pkg:pypi/{name}@{package['version']}"
        files = [package.get("sdist", {}), *package.get("wheels", [])]
        expected = {f["hash"].removeprefix("sha256:") for f in files if "hash" in f}
        assert expected, name
        assert {h["content"] for h in component["hashes"]} == expected
        assert {h["alg"] for h in component["hashes"]} == {"SHA-256"}


def test_the_project_is_the_metadata_component_not_a_component(bom):
    subject = bom["metadata"]["component"]
    assert (subject["name"], subject["version"], subject["type"]) == ("madgroup", SRC.parent.name, "application")
    assert "madgroup" not in _components(bom)
    assert [t["name"] for t in bom["metadata"]["tools"]["components"]] == ["regen"]
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")


def test_dev_group_packages_are_optional_the_rest_required(bom):
    scopes = {name: c["scope"] for name, c in _components(bom).items()}
    dev_only = {"pytest", "pluggy", "iniconfig", "packaging", "pygments", "colorama"}
    assert {name for name, scope in scopes.items() if scope == "optional"} == dev_only
    assert scopes["mcp"] == scopes["cryptography"] == scopes["pycparser"] == "required"


def test_the_dependency_graph_is_the_locks(bom):
    graph = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    lock = tomllib.loads((SRC / "uv.lock").read_text())
    versions = {p["name"]: p["version"] for p in lock["package"] if "version" in p}
    root = next(p for p in lock["package"] if p["name"] == "madgroup")
    direct = [d["name"] for d in root["dependencies"]] + [d["name"] for ds in root.get("dev-dependencies", {}).values() for d in ds]
    assert {"mcp", "cryptography", "redis", "pytest"} <= set(direct)
    assert graph[f"madgroup@{SRC.parent.name}"] == sorted(f"pkg:pypi/{name}@{versions[name]}" for name in direct)
    assert graph["pkg:pypi/pyjwt@2.15.1"] == ["pkg:pypi/cryptography@48.0.0"]  # mcp asks for pyjwt[crypto]
    assert graph["pkg:pypi/idna@3.20"] == []
    assert set(graph) == {c["bom-ref"] for c in bom["components"]} | {f"madgroup@{SRC.parent.name}"}


def test_the_sbom_is_the_same_bytes_every_time_and_from_any_folder(text, tmp_path, monkeypatch):
    assert sbom(SRC) == text
    monkeypatch.chdir(tmp_path)
    assert sbom(SRC) == text
    probe = "import sys; from pathlib import Path; from generator.artifact.sbom import sbom; sys.stdout.write(sbom(Path(sys.argv[1])))"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    done = subprocess.run([sys.executable, "-c", probe, str(SRC)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == text


def test_no_clock_and_no_random_serial(bom, text, monkeypatch):
    assert "timestamp" not in bom["metadata"]
    serial = uuid.UUID(bom["serialNumber"].removeprefix("urn:uuid:"))
    assert serial.version == 5
    assert [c["name"] for c in bom["components"]] == sorted(c["name"] for c in bom["components"])
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    dated = json.loads(sbom(SRC))
    assert dated["metadata"]["timestamp"] == "1970-01-01T00:00:00Z"
    assert dated["serialNumber"] == bom["serialNumber"]


def test_the_sbom_is_valid_cyclonedx_1_6(text):
    pytest.importorskip("jsonschema")
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None


def test_check_sbom_accepts_the_sbom_of_the_lock(text):
    assert check_sbom(text, SRC) == []


def test_check_sbom_names_a_package_whose_version_was_changed(bom):
    edited = json.loads(json.dumps(bom))
    _components(edited)["anyio"]["version"] = "4.15.0"
    problems = check_sbom(json.dumps(edited), SRC)
    assert problems and all("anyio" in p for p in problems)
    assert "4.15.0" in problems[0] and "4.16.0" in problems[0]


def test_check_sbom_names_a_missing_package_and_an_extra_one(bom):
    edited = json.loads(json.dumps(bom))
    edited["components"] = [c for c in edited["components"] if c["name"] != "h11"]
    edited["components"].append({"type": "library", "name": "left-pad", "version": "1.0", "bom-ref": "x"})
    problems = check_sbom(json.dumps(edited), SRC)
    assert any("h11" in p and "missing" in p for p in problems)
    assert any("left-pad" in p and "not in uv.lock" in p for p in problems)
    assert len(problems) == 2


def test_check_sbom_names_a_changed_hash_and_purl(bom):
    edited = json.loads(json.dumps(bom))
    _components(edited)["idna"]["hashes"][0]["content"] = "0" * 64
    _components(edited)["h11"]["purl"] = "pkg:pypi/h11@0.15.0"
    problems = check_sbom(json.dumps(edited), SRC)
    assert any(p.startswith("h11 0.16.0: purl") for p in problems)
    assert any(p.startswith("idna 3.20: hashes differ") for p in problems)
    assert len(problems) == 2


def test_check_sbom_names_a_changed_dependency_edge(bom):
    edited = json.loads(json.dumps(bom))
    for dependency in edited["dependencies"]:
        if dependency["ref"] == "pkg:pypi/pyjwt@2.15.1":
            dependency["dependsOn"] = []
    assert check_sbom(json.dumps(edited), SRC) == [
        "dependencies: pkg:pypi/pyjwt@2.15.1 lacks pkg:pypi/cryptography@48.0.0"
    ]


def test_check_sbom_notices_a_lock_that_changed_since(text, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SRC / "pyproject.toml", src)
    lock = (SRC / "uv.lock").read_text(encoding="utf-8")
    (src / "uv.lock").write_text(lock.replace('name = "h11"\nversion = "0.16.0"', 'name = "h11"\nversion = "0.16.1"'))
    problems = check_sbom(text, src)
    assert any("serialNumber" in p for p in problems)
    assert any(p.startswith("h11:") and "0.16.1" in p for p in problems)


def test_check_sbom_reports_what_is_not_an_sbom():
    assert "not JSON" in check_sbom("{", SRC)[0]
    assert "not a CycloneDX document" in check_sbom("[]", SRC)[0]
