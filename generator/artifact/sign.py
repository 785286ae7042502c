r"""Signing and provenance of artifacts: who built `ecosystems/<name>/<version>/`, from what, and proof it is unchanged.

Files of a signed artifact, in the order they are written (all inside the staging folder, before the rename
that publishes it):

1. everything the build makes (src/, transcript.jsonl, tests.json, review.*): each listed with its sha256 in
   manifest.json's "outputs", whose hash is the manifest's "root_hash";
2. ``manifest.json``, which also carries a "signing" record (algorithm, key id, whether the key is a development
   key) so that these facts are themselves signed;
3. ``manifest.sig``: the raw 64-byte Ed25519 signature of the exact bytes of manifest.json, and
   ``manifest.pub.pem``: the public key it verifies with (SubjectPublicKeyInfo PEM);
4. ``provenance.json``: an in-toto Statement v1 with a SLSA v1 provenance predicate. Its subjects are every
   output and manifest.json itself, by sha256. It is a pure function of manifest.json (no timestamps, no host
   names), so it is covered by the manifest's signature: ``verify_provenance`` recomputes it and compares bytes.

None of the files of steps 2 to 4 is listed in "outputs" (they cannot be: each depends on the outputs).
What vouches for what: the signature covers manifest.json; manifest.json covers every output by hash and
names the signing key; provenance.json is derived from manifest.json. The public key shipped in the artifact
proves only that the artifact is intact; that it was signed by *you* takes a key you trust, given apart from
the artifact: ``regen verify ARTIFACT --trust signing-key.pub.pem``.

Verify with stock tools, from inside the artifact folder. OpenSSL >= 3.0 is needed: Ed25519 signs the message
itself, not a digest, and ``pkeyutl -rawin`` (which says so) first appeared in 3.0::

    openssl pkeyutl -verify -pubin -inkey manifest.pub.pem -rawin -in manifest.json -sigfile manifest.sig
    # prints "Signature Verified Successfully" and exits 0. To pin the key, give your own copy of the
    # public key as -inkey instead of the one the artifact carries.
    python3 -c "import json; [print(h + '  ' + p) for p, h in json.load(open('manifest.json'))['outputs'].items()]" \
        | sha256sum --check --quiet       # every output is the file the signed manifest lists
    sha256sum manifest.json               # the digest provenance.json gives as its subject "manifest.json"

Keys. ``init_keys`` writes an unencrypted PKCS8 PEM private key (mode 0600, in a folder made 0700) and its
public key beside it (``<name>.pub.pem``). The key lives outside the repo: ``$REGEN_SIGNING_KEY`` if set, else
``$XDG_CONFIG_HOME/regen/signing-key.pem`` (``~/.config/regen/signing-key.pem``). Without one,
``load_signing_key`` makes (once) and uses ``development-signing-key.pem`` in the same folder, flagged
``development``: such an artifact is intact but signed by a key nobody vouches for.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import BuildFailed, UserError
from ..frozen import Frozen
from ..hashing import canonical_json, json_hash, sha256_file, tree_hashes

KEY_ENV = "REGEN_SIGNING_KEY"
DEFAULT_KEY_NAME = "signing-key.pem"
DEVELOPMENT_KEY_NAME = "development-signing-key.pem"

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_KEY = "manifest.pub.pem"
PROVENANCE = "provenance.json"
# Written after manifest.json, so not in its "outputs"; every other file of an artifact is.
SIDECARS = frozenset({MANIFEST, SIGNATURE, PUBLIC_KEY, PROVENANCE})

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://regen.dev/build/v1"  # the build this module's docstring and generator/build/pipeline.py describe
BUILDER_ID = "https://regen.dev/builder/cli/v1"  # `regen regenerate` run by whoever holds the signing key


# --------------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyPair:
    """What `init_keys` wrote."""

    private_path: Path
    public_path: Path
    key_id: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key; `development` when it is the generated stand-in, not one made by `regen keys init`."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_pem: bytes
    key_id: str
    development: bool
    path: Path | None = None

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/regen`, or `~/.config/regen` (a relative XDG_CONFIG_HOME is ignored, as the spec says)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "regen"


def default_key_path() -> Path:
    """Where the signing key is: `$REGEN_SIGNING_KEY` if set, else in `config_dir()`."""
    configured = os.environ.get(KEY_ENV, "")
    return Path(configured).expanduser() if configured else config_dir() / DEFAULT_KEY_NAME


def development_key_path() -> Path:
    return config_dir() / DEVELOPMENT_KEY_NAME


def public_key_path(private_path: Path) -> Path:
    """`signing-key.pem` → `signing-key.pub.pem` (`key` → `key.pub.pem`)."""
    return private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def init_keys(path: Path | None = None, force: bool = False) -> KeyPair:
    """Make a new Ed25519 key pair at `path` (default `default_key_path()`); never replaces one unless `force`."""
    private_path = (path.expanduser() if path is not None else default_key_path()).absolute()
    return _write_key_pair(private_path, Ed25519PrivateKey.generate(), force)


def load_signing_key() -> SigningKey:
    """The signing key: `$REGEN_SIGNING_KEY`, else the default key, else a development key (made once)."""
    configured = os.environ.get(KEY_ENV, "")
    path = default_key_path()
    if path.exists():
        return _load(path, development=False)
    if configured:
        raise UserError(f"{KEY_ENV}={configured}, but there is no key at {path}: "
                        f"make one with `regen keys init --path {path}`, or unset {KEY_ENV}")
    dev = development_key_path()
    if not dev.exists():
        try:
            _write_key_pair(dev, Ed25519PrivateKey.generate(), force=False)
        except UserError:  # another build made it between our look and our write: use theirs
            if not dev.exists():
                raise
    return _load(dev, development=True)


def development_warning(key: SigningKey) -> str | None:
    """The line the CLI prints when a build is signed with the development key."""
    if not key.development:
        return None
    return (f"signed with a development key ({key.key_id}, {key.path}): the artifact is tamper-evident, but nobody "
            f"vouches for this key; run `regen keys init` (or set {KEY_ENV}) to sign with your own")


def _write_key_pair(private_path: Path, private_key: Ed25519PrivateKey, force: bool) -> KeyPair:
    public_path = public_key_path(private_path)
    if not force:
        for existing in (private_path, public_path):
            if existing.exists() or existing.is_symlink():
                raise UserError(f"{existing} already exists; a key is never replaced silently. Pass --force to replace "
                                "it (artifacts signed with the old key will no longer verify against the new one)")
    _make_private_folder(private_path.parent)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = public_pem(private_key.public_key())
    _write_new(private_path, pem, 0o600, replace=force)
    _write_new(public_path, public, 0o644, replace=force)
    warnings = tuple(f"{private_path} is inside the git work tree {repo}: make sure it is never committed"
                     for repo in _git_work_tree(private_path))
    return KeyPair(private_path, public_path, key_id(private_key.public_key()), warnings)


def _make_private_folder(folder: Path) -> None:
    """Create the missing folders of `folder`, each 0700; folders that exist are left as they are."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    for parent in reversed(missing):
        try:
            os.mkdir(parent, 0o700)
        except FileExistsError:
            continue
        os.chmod(parent, 0o700)  # whatever the umask


def _write_new(path: Path, data: bytes, mode: int, replace: bool) -> None:
    """Write a file created with `mode` from the start (no moment when a key is readable by others).

    Without `replace`, O_EXCL: an existing file (or symlink) is an error. With it, a new file beside the old
    one is renamed over it, so a failed write leaves the old key."""
    target = path.with_name(f".{path.name}.tmp-{os.getpid()}") if replace else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise UserError(f"{target} already exists; pass --force to replace it") from None
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # whatever the umask
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _git_work_tree(path: Path) -> list[Path]:
    return [p for p in path.parents if (p / ".git").exists()][:1]


def _load(path: Path, development: bool) -> SigningKey:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(f"{path}: the signing key cannot be read: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: the signing key is not a regular file")
    if info.st_mode & 0o077:
        raise UserError(f"{path}: the signing key is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                        f"run `chmod 600 {path}`, and make a new key if others may have read it")
    if info.st_uid != os.getuid():
        raise UserError(f"{path}: the signing key belongs to another user (uid {info.st_uid}); it must be yours")
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError as exc:  # encrypted
        raise UserError(f"{path}: the signing key is encrypted; regen reads unencrypted PKCS8 keys kept 0600 ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a PEM private key: {exc}") from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise UserError(f"{path}: a {type(private_key).__name__.removeprefix('_')} key; regen signs with Ed25519 keys "
                        "(make one with `regen keys init`)")
    public_key = private_key.public_key()
    return SigningKey(private_key, public_pem(public_key), key_id(public_key), development, path)


# --------------------------------------------------------------------------------------------------- signing


def signing_record(key: SigningKey) -> dict:
    """What manifest.json says of its signature (the manifest is signed, so this is too): `data["signing"] = ...`."""
    return {
        "algorithm": "ed25519",
        "key_id": key.key_id,
        "development": key.development,
        "signature": SIGNATURE,
        "public_key": PUBLIC_KEY,
    }


def sign_artifact(folder: Path, key: SigningKey) -> None:
    """Write manifest.sig (raw Ed25519 signature of manifest.json's bytes) and manifest.pub.pem into `folder`."""
    data = (folder / MANIFEST).read_bytes()
    try:
        record = json.loads(data).get("signing")
    except (ValueError, AttributeError) as exc:
        raise BuildFailed(f"{folder / MANIFEST}: not a JSON object, so not signed: {exc}") from exc
    if record is not None and record.get("key_id") != key.key_id:
        raise BuildFailed(f"{folder / MANIFEST} names signing key {record.get('key_id')}, but the key at hand is {key.key_id}")
    for name, content in ((SIGNATURE, key.sign(data)), (PUBLIC_KEY, key.public_pem)):
        try:
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            raise BuildFailed(f"{folder / name} already exists: an artifact is signed once") from None
        with os.fdopen(fd, "wb") as out:
            out.write(content)


class SignatureCheck(Frozen):
    """Whether manifest.json is as it was signed, and by which key."""

    ok: bool
    signed: bool = True  # False when manifest.sig or manifest.pub.pem is missing (an artifact from before signing)
    key_id: str | None = None
    development: bool = False  # as the signed manifest says; False for a manifest without a signing record
    trusted: bool = False  # the key is the one given with --trust
    trusted_key_id: str | None = None
    problem: str | None = None


def verify_signature(folder: Path, trust: Path | None = None) -> SignatureCheck:
    """Check manifest.sig against manifest.pub.pem, and, with `trust` (a PEM public key), that the key is that one.

    A broken artifact is a result (ok False, with the problem); an unreadable `trust` file is the user's error."""
    trusted_id = key_id(_read_public_key(trust)) if trust is not None else None

    def fail(problem: str, **known) -> SignatureCheck:
        return SignatureCheck(ok=False, trusted_key_id=trusted_id, problem=problem, **known)

    for name in (MANIFEST, SIGNATURE, PUBLIC_KEY):
        if not (folder / name).is_file():
            if name == MANIFEST:
                return fail(f"{folder / name} is missing: not an artifact")
            return fail(f"{folder / name} is missing: the artifact is not signed", signed=False)
    try:
        public_key = serialization.load_pem_public_key((folder / PUBLIC_KEY).read_bytes())
    except ValueError as exc:
        return fail(f"{PUBLIC_KEY} is not a PEM public key: {exc}")
    if not isinstance(public_key, Ed25519PublicKey):
        return fail(f"{PUBLIC_KEY} is not an Ed25519 public key")
    found = key_id(public_key)
    data = (folder / MANIFEST).read_bytes()
    signature = (folder / SIGNATURE).read_bytes()
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return fail(f"{MANIFEST} does not match its signature" + (
            f" ({SIGNATURE} is {len(signature)} bytes, an Ed25519 signature 64)" if len(signature) != 64 else ""
        ), key_id=found)
    try:
        record = json.loads(data).get("signing") or {}
    except (ValueError, AttributeError):
        record = {}
    record = record if isinstance(record, dict) else {}
    development = bool(record.get("development", False))
    if record and record.get("key_id") != found:
        return fail(f"{MANIFEST} names signing key {record.get('key_id')}, but {PUBLIC_KEY} is key {found}",
                    key_id=found, development=development)
    if trusted_id is not None and found != trusted_id:
        return fail(f"signed by key {found}, not the trusted key {trusted_id}", key_id=found, development=development)
    return SignatureCheck(ok=True, key_id=found, development=development, trusted=trusted_id is not None,
                          trusted_key_id=trusted_id)


def _read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: the trusted key cannot be read: {exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        # A private key given by mistake still names a public key; never echo its bytes.
        if b"PRIVATE KEY-----" in data:
            raise UserError(f"{path} is a private key: trust is given by the public key, the .pub.pem beside it") from None
        raise UserError(f"{path}: not a PEM public key (give the .pub.pem file `regen keys init` wrote)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{path}: not an Ed25519 public key")
    return key


# --------------------------------------------------------------------------------------------------- provenance


def default_builder(manifest: dict) -> dict:
    """The builder of a local `regen regenerate`: derived from the manifest, so provenance can be recomputed."""
    generator = manifest.get("generator") or {}
    return {"id": BUILDER_ID, "version": {generator.get("name", "regen"): generator.get("version", "unknown")}}


def provenance_statement(manifest: dict, builder: dict | None = None, manifest_digest: str | None = None) -> dict:
    """An in-toto Statement v1 with a SLSA provenance v1 predicate for the artifact `manifest` describes.

    Deterministic: the same manifest gives the same statement (no timestamps; SLSA makes them optional).
    `manifest_digest` is the sha256 of manifest.json's bytes; by default that of `canonical_json(manifest)`,
    which is how the pipeline writes it."""
    if manifest_digest is None:
        manifest_digest = json_hash(manifest)
    subjects = {path: digest for path, digest in (manifest.get("outputs") or {}).items()} | {MANIFEST: manifest_digest}
    pipeline = manifest.get("pipeline") or {}
    review = manifest.get("review") or {}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": subjects[name]}} for name in sorted(subjects)],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "ecosystem": manifest.get("ecosystem"),
                    "pipeline": {"name": pipeline.get("name"), "senior": pipeline.get("senior")},
                    "panel": {"name": review.get("panel"), "file": (pipeline.get("review") or {}).get("panel")},
                    "offline": manifest.get("offline"),
                    "replayed_from": manifest.get("replayed_from"),
                },
                "internalParameters": {
                    "generator": manifest.get("generator"),
                    "version": manifest.get("version"),
                    "parent": manifest.get("parent"),
                    "inputs_hash": manifest.get("inputs_hash"),
                    "recorded_answers": manifest.get("recorded_answers"),
                },
                "resolvedDependencies": [
                    _dependency(name, digest) for name, digest in sorted((manifest.get("inputs") or {}).items())
                ],
            },
            "runDetails": {
                "builder": builder if builder is not None else default_builder(manifest),
                "metadata": {"invocationId": manifest.get("root_hash")},
            },
        },
    }


def _dependency(name: str, digest: str) -> dict:
    """A file of the repo (spec/…, reviews/…, generator/…) by its path; anything else (the validated pipeline) by name."""
    if "/" in name:
        return {"uri": f"file:{name}", "digest": {"sha256": digest}}
    return {"name": name, "digest": {"sha256": digest}}


def _manifest_object(path: Path) -> dict:
    """manifest.json as a JSON object whose outputs map paths to digests; a UserError saying what it is instead.

    Read as raw JSON, not as the Manifest model: this module judges artifacts that may have been tampered with."""
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object")
    outputs = manifest.get("outputs") or {}
    if not isinstance(outputs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in outputs.items()):
        raise UserError(f"{path}: its outputs are not a map of file paths to sha256 digests")
    return manifest


def provenance_bytes(folder: Path, builder: dict | None = None) -> bytes:
    """provenance.json as it must be for `folder`'s manifest.json."""
    path = folder / MANIFEST
    manifest = _manifest_object(path)
    try:
        statement = provenance_statement(manifest, builder, sha256_file(path))
    except (AttributeError, TypeError) as exc:  # a field of another shape than a manifest's
        raise UserError(f"{path}: not a manifest regen can derive provenance from ({exc})") from None
    return canonical_json(statement).encode()


def write_provenance(folder: Path, builder: dict | None = None) -> Path:
    """Write provenance.json after manifest.json (it covers the manifest's digest); never over an existing one."""
    path = folder / PROVENANCE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise BuildFailed(f"{path} already exists") from None
    with os.fdopen(fd, "wb") as out:
        out.write(provenance_bytes(folder, builder))
    return path


class ProvenanceCheck(Frozen):
    ok: bool
    problem: str | None = None


def verify_provenance(folder: Path, builder: dict | None = None) -> ProvenanceCheck:
    """provenance.json must be, byte for byte, the statement recomputed from manifest.json."""
    path = folder / PROVENANCE
    if not path.is_file():
        return ProvenanceCheck(ok=False, problem=f"{path} is missing")
    try:
        expected = provenance_bytes(folder, builder)
    except UserError as exc:  # a broken manifest is a finding about the artifact here, not a usage error
        return ProvenanceCheck(ok=False, problem=f"{PROVENANCE} cannot be checked: {exc}")
    if path.read_bytes() != expected:
        return ProvenanceCheck(ok=False, problem=f"{PROVENANCE} is not the statement {MANIFEST} gives: it was changed, "
                                                 f"or the manifest was")
    return ProvenanceCheck(ok=True)


# --------------------------------------------------------------------------------------------------- the whole artifact


def verify_outputs(folder: Path) -> list[str]:
    """Every file on disk is in manifest.json's "outputs" with its sha256, and the root hash is theirs."""
    try:
        manifest = _manifest_object(folder / MANIFEST)
    except UserError as exc:
        return [str(exc)]
    recorded = manifest.get("outputs") or {}
    problems = []
    if json_hash(recorded) != manifest.get("root_hash"):
        problems.append(f"{MANIFEST}: root_hash is not the hash of its outputs")
    on_disk = {p: d for p, d in tree_hashes(folder).items() if p not in SIDECARS}
    for rel in sorted(set(recorded) | set(on_disk)):
        if rel not in on_disk:
            problems.append(f"{rel}: listed in {MANIFEST} but missing")
        elif rel not in recorded:
            problems.append(f"{rel}: not listed in {MANIFEST}")
        elif recorded[rel] != on_disk[rel]:
            problems.append(f"{rel}: its sha256 is not the one {MANIFEST} recorded")
    return problems


class ArtifactCheck(Frozen):
    """Signature, provenance and every output of an artifact; `ok` only when all three hold."""

    signature: SignatureCheck
    provenance: ProvenanceCheck
    outputs: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.signature.ok and self.provenance.ok and not self.outputs

    @property
    def problems(self) -> list[str]:
        return [p for p in (self.signature.problem, self.provenance.problem) if p] + list(self.outputs)


def verify_artifact(folder: Path, trust: Path | None = None) -> ArtifactCheck:
    return ArtifactCheck(
        signature=verify_signature(folder, trust),
        provenance=verify_provenance(folder),
        outputs=tuple(verify_outputs(folder)),
    )
