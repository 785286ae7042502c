"""Scripted review panels for tests and benchmarks: reviewer files in a temporary reviews/ folder."""

from __future__ import annotations

import json
from pathlib import Path

from generator.artifact.store import versions
from generator.review.material import material
from generator.review.models import ReviewScope, Subject
from generator.spec.load import load_spec

REPO = Path(__file__).resolve().parents[1]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _table(data: dict) -> str:
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]", *(f"{k} = {_toml(v)}" for k, v in value.items())]
    return "\n".join(lines) + "\n"


def scripted_reviewer(base_url: str, focus: str = "correctness", **model: object) -> dict:
    """An LLM reviewer definition whose model is a ScriptedServer on 127.0.0.1."""
    return {
        "kind": "llm", "focus": focus, "rubric": "../rubrics/rubric.md",
        "model": {"model": "openai/scripted-reviewer", "api_base": base_url, "api_key_env": "SCRIPTED_API_KEY",
                  "max_tokens": 2000, "context_window": 200_000, "timeout_seconds": 20, "max_retries": 0, **model},
    }


def write_panel(root: Path, reviewers: dict[str, dict], consensus: dict | None = None, **panel: object) -> Path:
    """reviews/panels/test.toml and its reviewers under `root`; returns the panel file."""
    for folder in ("panels", "reviewers", "rubrics"):
        (root / "reviews" / folder).mkdir(parents=True, exist_ok=True)
    (root / "reviews" / "rubrics" / "rubric.md").write_text("Check that every tool does what its spec says.\n")
    for name, definition in reviewers.items():
        (root / "reviews" / "reviewers" / f"{name}.toml").write_text(_table(definition))
    data = {"reviewers": list(reviewers), **panel}
    if consensus:
        data["consensus"] = consensus
    path = root / "reviews" / "panels" / "test.toml"
    path.write_text(_table(data))
    return path


def verdict(decision: str = "approve", *findings: dict, summary: str = "Looks right.") -> str:
    return json.dumps({"decision": decision, "summary": summary, "findings": list(findings)})


def finding(severity: str = "major", file: str = "src/madgroup/mads/rogers.py", line: int = 1,
            rule: str = "wrong-result", message: str = "returns the wrong thing") -> dict:
    return {"file": file, "line": line, "severity": severity, "rule": rule, "message": message,
            "suggestion": "return the right thing"}


def archived_subject(version: str | None = None, root: Path = REPO / "ecosystems" / "madgroup",
                     first_build: bool = False) -> Subject:
    """An archived build (default: the newest) of the repo's spec, as reviewers see it: the diff
    against its parent, or every file when `first_build`."""
    artifact = root / (version or versions(root)[-1])
    spec = load_spec(REPO / "spec")
    manifest = json.loads((artifact / "manifest.json").read_text())
    if first_build:
        manifest["parent"] = None
    parent = root / manifest["parent"] if manifest.get("parent") else None
    tests = json.loads((artifact / "tests.json").read_text())
    scope = ReviewScope(mode="parent", baseline=parent.name if parent else None,
                        reason=f"the changes since the parent {parent.name}" if parent else "a first build")
    return Subject(artifact=artifact, parent=parent, spec=spec, material=material(spec, artifact, parent, manifest, tests, scope))



def resign(artifact: Path) -> str:
    """Re-hash and re-sign an edited artifact with a throwaway key, as someone building a bad artifact of their own
    would: it verifies (by an untrusted key), so the gate judges it. Returns the new key's id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from generator.artifact import sign
    from generator.artifact.manifest import root_hash
    from generator.hashing import canonical_json, tree_hashes

    private = Ed25519PrivateKey.generate()
    key = sign.SigningKey(private_key=private, public_pem=sign.public_pem(private.public_key()),
                          key_id=sign.key_id(private.public_key()), development=False)
    data = json.loads((artifact / sign.MANIFEST).read_text())
    for name in sign.SIDECARS:
        (artifact / name).unlink(missing_ok=True)
    data["outputs"] = tree_hashes(artifact)
    data["root_hash"] = root_hash(data["outputs"])
    data["signing"] = sign.signing_record(key)
    (artifact / sign.MANIFEST).write_text(canonical_json(data), encoding="utf-8")
    sign.sign_artifact(artifact, key)
    sign.write_provenance(artifact)
    return key.key_id
