"""Signing and provenance of artifacts (generator/sign.py): keys, signatures, stock-tool verification, provenance."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from archive import ARCHIVE, NEWEST, REPO
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from generator.artifact import sign
from generator.artifact.store import versions
from generator.errors import BuildFailed, UserError
from generator.hashing import canonical_json, sha256_file


@pytest.fixture(autouse=True)
def _keys_in_tmp(tmp_path, monkeypatch):
    """Every key this module makes lives under tmp_path: never the real ~/.config."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(sign.KEY_ENV, raising=False)


@pytest.fixture
def artifact(tmp_path) -> Path:
    folder = tmp_path / "madgroup" / "1.0.2"
    shutil.copytree(ARCHIVE / NEWEST, folder)
    for name in sign.SIDECARS - {sign.MANIFEST}:  # the archive is signed by the repo's key: start unsigned
        (folder / name).unlink(missing_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("signing", None)
    (folder / "manifest.json").write_text(canonical_json(manifest))
    return folder


def publish_signed(folder: Path, key: sign.SigningKey) -> None:
    """What the pipeline does once the outputs are written: signing record, manifest, signature, provenance."""
    data = json.loads((folder / "manifest.json").read_text())
    data["signing"] = sign.signing_record(key)
    (folder / "manifest.json").write_text(canonical_json(data))
    sign.sign_artifact(folder, key)
    sign.write_provenance(folder)


def flip_one_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------------------------------- keys


def test_init_keys_writes_a_0600_key_and_its_public_key_in_a_0700_folder(tmp_path):
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        pair = sign.init_keys(tmp_path / "keys" / "regen" / "release.pem")
    finally:
        os.umask(old)
    assert pair.private_path == tmp_path / "keys" / "regen" / "release.pem"
    assert pair.public_path == tmp_path / "keys" / "regen" / "release.pub.pem"
    assert mode(pair.private_path) == 0o600
    assert mode(tmp_path / "keys" / "regen") == 0o700 and mode(tmp_path / "keys") == 0o700
    assert mode(pair.public_path) == 0o644
    assert b"BEGIN PRIVATE KEY" in pair.private_path.read_bytes()  # PKCS8, unencrypted
    public = serialization.load_pem_public_key(pair.public_path.read_bytes())
    assert sign.key_id(public) == pair.key_id and re.fullmatch(r"[0-9a-f]{16}", pair.key_id)
    assert pair.warnings == ()


def test_init_keys_defaults_to_the_config_folder_outside_the_repo(tmp_path):
    pair = sign.init_keys()
    assert pair.private_path == tmp_path / "config" / "regen" / "signing-key.pem"
    assert mode(tmp_path / "config" / "regen") == 0o700
    key = sign.load_signing_key()
    assert key.key_id == pair.key_id and not key.development and sign.development_warning(key) is None


def test_init_keys_never_overwrites_without_force(tmp_path):
    first = sign.init_keys()
    before = first.private_path.read_bytes()
    with pytest.raises(UserError, match="already exists.*--force"):
        sign.init_keys()
    assert first.private_path.read_bytes() == before
    second = sign.init_keys(force=True)
    assert second.key_id != first.key_id and first.private_path.read_bytes() != before
    assert mode(second.private_path) == 0o600
    assert sorted(p.name for p in second.private_path.parent.iterdir()) == ["signing-key.pem", "signing-key.pub.pem"]


def test_init_keys_warns_about_a_key_inside_a_git_work_tree(tmp_path):
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    pair = sign.init_keys(tmp_path / "repo" / "keys" / "k.pem")
    assert len(pair.warnings) == 1 and "never committed" in pair.warnings[0]


def test_the_environment_variable_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(sign.KEY_ENV, str(tmp_path / "elsewhere" / "ci.pem"))
    pair = sign.init_keys()
    assert pair.private_path == tmp_path / "elsewhere" / "ci.pem"
    key = sign.load_signing_key()
    assert (key.key_id, key.development, key.path) == (pair.key_id, False, pair.private_path)


def test_a_missing_key_named_by_the_environment_is_an_error_not_a_development_key(tmp_path, monkeypatch):
    monkeypatch.setenv(sign.KEY_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(UserError, match="no key at .*missing.pem.*keys init"):
        sign.load_signing_key()
    assert not (tmp_path / "config").exists()


def test_without_a_key_a_development_key_is_made_once_reused_and_flagged(tmp_path):
    first = sign.load_signing_key()
    assert first.development and first.path == tmp_path / "config" / "regen" / "development-signing-key.pem"
    assert mode(first.path) == 0o600 and mode(first.path.parent) == 0o700
    again = sign.load_signing_key()
    assert again.development and again.key_id == first.key_id
    assert "development key" in sign.development_warning(first) and first.key_id in sign.development_warning(first)
    # Once a real key exists, it is the one used.
    real = sign.init_keys()
    assert sign.load_signing_key().key_id == real.key_id != first.key_id


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(tmp_path, monkeypatch, bad_mode):
    pair = sign.init_keys(tmp_path / "k.pem")
    monkeypatch.setenv(sign.KEY_ENV, str(pair.private_path))
    os.chmod(pair.private_path, bad_mode)
    with pytest.raises(UserError, match=f"chmod 600 {re.escape(str(pair.private_path))}"):
        sign.load_signing_key()


def test_a_development_key_readable_by_others_is_refused_too():
    key = sign.load_signing_key()
    os.chmod(key.path, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        sign.load_signing_key()


def test_a_key_that_is_not_ed25519_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ec.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    monkeypatch.setenv(sign.KEY_ENV, str(path))
    with pytest.raises(UserError, match="Ed25519"):
        sign.load_signing_key()


# --------------------------------------------------------------------------------------------------- signatures


def test_a_signed_artifact_verifies(artifact):
    key = sign.load_signing_key()
    publish_signed(artifact, key)
    assert len((artifact / "manifest.sig").read_bytes()) == 64
    assert (artifact / "manifest.pub.pem").read_bytes() == key.public_pem
    check = sign.verify_signature(artifact)
    assert check.ok and check.problem is None and check.key_id == key.key_id
    assert check.development is True and check.trusted is False
    whole = sign.verify_artifact(artifact)
    assert whole.ok and whole.problems == []


def test_the_manifest_says_whether_the_key_is_a_development_key(artifact, tmp_path):
    pair = sign.init_keys()
    publish_signed(artifact, sign.load_signing_key())
    check = sign.verify_signature(artifact, trust=pair.public_path)
    assert check.ok and check.trusted and check.development is False and check.key_id == pair.key_id


def test_an_unwired_manifest_without_a_signing_record_still_signs_and_verifies(artifact):
    key = sign.load_signing_key()
    sign.sign_artifact(artifact, key)
    check = sign.verify_signature(artifact)
    assert check.ok and check.key_id == key.key_id and check.development is False  # nothing signed says so


def test_one_flipped_byte_of_the_manifest_fails_verification(artifact):
    publish_signed(artifact, sign.load_signing_key())
    flip_one_byte(artifact / "manifest.json")
    check = sign.verify_signature(artifact)
    assert not check.ok and check.signed and check.problem == "manifest.json does not match its signature"
    assert not sign.verify_artifact(artifact).ok


def test_a_flipped_byte_of_the_signature_fails_verification(artifact):
    publish_signed(artifact, sign.load_signing_key())
    flip_one_byte(artifact / "manifest.sig", at=0)
    assert sign.verify_signature(artifact).problem == "manifest.json does not match its signature"


def test_a_key_other_than_the_trusted_one_fails_naming_both(artifact, tmp_path):
    key = sign.load_signing_key()
    publish_signed(artifact, key)
    other = sign.init_keys(tmp_path / "other" / "trusted.pem")
    check = sign.verify_signature(artifact, trust=other.public_path)
    assert not check.ok and not check.trusted
    assert check.problem == f"signed by key {key.key_id}, not the trusted key {other.key_id}"


def test_swapping_in_another_key_and_signature_is_caught_by_the_signed_record(artifact, tmp_path):
    publish_signed(artifact, sign.load_signing_key())
    # An attacker re-signs the very same manifest with a key of theirs: the signature is valid,
    # but the signed manifest names the original key.
    attacker = sign.init_keys(tmp_path / "attacker.pem")
    attacker_key = sign._load(attacker.private_path, development=False)
    (artifact / "manifest.sig").write_bytes(attacker_key.sign((artifact / "manifest.json").read_bytes()))
    (artifact / "manifest.pub.pem").write_bytes(attacker_key.public_pem)
    check = sign.verify_signature(artifact)
    assert not check.ok and "names signing key" in check.problem and attacker.key_id in check.problem


@pytest.mark.parametrize("name", ["manifest.sig", "manifest.pub.pem"])
def test_a_missing_signature_file_is_named(artifact, name):
    publish_signed(artifact, sign.load_signing_key())
    (artifact / name).unlink()
    check = sign.verify_signature(artifact)
    assert not check.ok and not check.signed and name in check.problem and "missing" in check.problem


@pytest.mark.parametrize("version", versions(ARCHIVE))
def test_the_archived_builds_are_signed_by_one_of_the_repos_keys(version):
    """keys/ holds the repo's public keys; each archived version is signed by the one its manifest names."""
    key_id = json.loads((ARCHIVE / version / "manifest.json").read_text())["signing"]["key_id"]
    keys = {sign.key_id(serialization.load_pem_public_key(p.read_bytes())): p for p in (REPO / "keys").glob("*.pub.pem")}
    assert key_id in keys, f"{version} is signed by {key_id}, which keys/ does not hold"
    check = sign.verify_artifact(ARCHIVE / version, trust=keys[key_id])
    assert check.ok and check.signature.trusted and not check.signature.development, check.problems


def test_a_trusted_key_that_is_not_a_public_key_is_the_users_error(artifact, tmp_path):
    publish_signed(artifact, sign.load_signing_key())
    pair = sign.init_keys(tmp_path / "mine.pem")
    with pytest.raises(UserError, match="is a private key"):
        sign.verify_signature(artifact, trust=pair.private_path)
    with pytest.raises(UserError, match="cannot be read"):
        sign.verify_signature(artifact, trust=tmp_path / "nope.pub.pem")


def test_an_artifact_is_signed_once_and_by_the_key_its_manifest_names(artifact, tmp_path):
    publish_signed(artifact, sign.load_signing_key())
    with pytest.raises(BuildFailed, match="signed once"):
        sign.sign_artifact(artifact, sign.load_signing_key())
    other = sign._load(sign.init_keys(tmp_path / "o.pem").private_path, development=False)
    for name in ("manifest.sig", "manifest.pub.pem"):
        (artifact / name).unlink()
    with pytest.raises(BuildFailed, match="names signing key"):
        sign.sign_artifact(artifact, other)


def test_changed_missing_and_extra_outputs_are_found(artifact):
    publish_signed(artifact, sign.load_signing_key())
    flip_one_byte(artifact / "src" / "README.md")
    (artifact / "tests.json").unlink()
    (artifact / "src" / "extra.py").write_text("x = 1\n")
    problems = sign.verify_outputs(artifact)
    assert problems == [
        "src/README.md: its sha256 is not the one manifest.json recorded",
        "src/extra.py: not listed in manifest.json",
        "tests.json: listed in manifest.json but missing",
    ]
    whole = sign.verify_artifact(artifact)
    assert whole.signature.ok and not whole.ok and whole.problems == problems


# --------------------------------------------------------------------------------------------------- stock tools


def _openssl_3() -> str | None:
    """Why the OpenSSL test cannot run here, or None."""
    if shutil.which("openssl") is None:
        return "openssl is not installed"
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    found = re.match(r"OpenSSL (\d+)\.", version)
    if found is None or int(found.group(1)) < 3:
        return f"OpenSSL >= 3.0 is needed for `pkeyutl -rawin` with Ed25519; found {version.strip() or 'no version'}"
    return None


def _documented(command: str) -> list[str]:
    """The command as the module docstring documents it, so the documentation is what is tested."""
    line = next(line.strip() for line in sign.__doc__.splitlines() if line.strip().startswith(command))
    return shlex.split(line)


@pytest.mark.skipif(_openssl_3() is not None, reason=_openssl_3() or "")
def test_openssl_verifies_the_signature_and_rejects_a_tampered_manifest(artifact):
    publish_signed(artifact, sign.load_signing_key())
    command = _documented("openssl pkeyutl -verify")
    assert command == ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "manifest.pub.pem", "-rawin",
                       "-in", "manifest.json", "-sigfile", "manifest.sig"]
    good = subprocess.run(command, cwd=artifact, capture_output=True, text=True)
    assert good.returncode == 0 and "Signature Verified Successfully" in good.stdout, good.stdout + good.stderr
    flip_one_byte(artifact / "manifest.json")
    bad = subprocess.run(command, cwd=artifact, capture_output=True, text=True)
    assert bad.returncode != 0 and "Signature Verified Successfully" not in bad.stdout


@pytest.mark.skipif(shutil.which("sha256sum") is None or shutil.which("bash") is None, reason="needs bash and sha256sum")
def test_the_documented_sha256sum_check_of_the_outputs_works(artifact):
    lines = sign.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("python3 -c"))
    script = lines[start].strip() + "\n" + lines[start + 1].split("#")[0].strip()
    ok = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=artifact, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    flip_one_byte(artifact / "src" / "README.md")
    bad = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=artifact, capture_output=True, text=True)
    assert bad.returncode != 0 and "src/README.md" in bad.stdout + bad.stderr


# --------------------------------------------------------------------------------------------------- provenance


def test_provenance_is_deterministic_and_lists_every_output_with_its_sha256(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    once = sign.provenance_bytes(artifact)
    assert sign.provenance_bytes(artifact) == once
    assert once == canonical_json(sign.provenance_statement(manifest)).encode()  # the default digest is the file's
    statement = json.loads(once)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert [s["name"] for s in statement["subject"]] == sorted(subjects)
    assert set(subjects) == set(manifest["outputs"]) | {"manifest.json"}
    for name, digest in subjects.items():
        assert sha256_file(artifact / name) == digest, name
    predicate = statement["predicate"]
    definition = predicate["buildDefinition"]
    assert definition["buildType"] == sign.BUILD_TYPE
    assert definition["externalParameters"]["pipeline"]["name"] == "offline"
    assert definition["externalParameters"]["pipeline"]["senior"]["model"] == "offline/reference"
    assert definition["externalParameters"]["panel"] == {"name": "offline", "file": "../reviews/panels/offline.toml"}
    assert definition["internalParameters"]["generator"] == {"name": "regen", "version": manifest["generator"]["version"]}
    dependencies = definition["resolvedDependencies"]
    assert len(dependencies) == len(manifest["inputs"])
    assert {"uri": "file:spec/ecosystem.yaml", "digest": {"sha256": manifest["inputs"]["spec/ecosystem.yaml"]}} in dependencies
    assert {"name": "pipeline", "digest": {"sha256": manifest["inputs"]["pipeline"]}} in dependencies
    assert predicate["runDetails"]["builder"]["id"] == sign.BUILDER_ID
    assert predicate["runDetails"]["metadata"] == {"invocationId": manifest["root_hash"]}
    assert not re.search(r"startedOn|finishedOn|\d{4}-\d\d-\d\dT", once.decode())


def test_provenance_is_written_after_the_manifest_and_verifies(artifact):
    publish_signed(artifact, sign.load_signing_key())
    statement = json.loads((artifact / "provenance.json").read_text())
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["manifest.json"] == sha256_file(artifact / "manifest.json")  # the signed manifest, with its record
    assert "provenance.json" not in subjects and "manifest.sig" not in subjects
    assert sign.verify_provenance(artifact).ok
    with pytest.raises(BuildFailed, match="already exists"):
        sign.write_provenance(artifact)


def test_a_tampered_provenance_is_caught(artifact):
    publish_signed(artifact, sign.load_signing_key())
    path = artifact / "provenance.json"
    statement = json.loads(path.read_text())
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    path.write_text(canonical_json(statement))
    check = sign.verify_provenance(artifact)
    assert not check.ok and "provenance.json is not the statement manifest.json gives" in check.problem
    assert not sign.verify_artifact(artifact).ok


def test_a_missing_provenance_is_named(artifact):
    publish_signed(artifact, sign.load_signing_key())
    (artifact / "provenance.json").unlink()
    check = sign.verify_provenance(artifact)
    assert not check.ok and "provenance.json is missing" in check.problem
