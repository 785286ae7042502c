"""The ecosystem's software bill of materials: CycloneDX 1.6 JSON, made from its `uv.lock`.

`sbom(src)` describes every package the lock pins (the project itself is the BOM's
metadata component, not one of its components); `check_sbom(text, src)` says where an
SBOM and the lock disagree. The SBOM is a pure function of `src/uv.lock`,
`src/pyproject.toml` and regen's version, so two builds give the same bytes:

- no wall-clock time: `metadata.timestamp` is SOURCE_DATE_EPOCH when that is set (the
  reproducible-builds convention) and absent otherwise (the schema makes it optional);
- the serial number is a UUID5 of the lock's sha256, not a random UUID4;
- components, dependencies and hashes are sorted; the JSON has sorted keys.

Per component: type library, name, version, purl `pkg:pypi/<name>@<version>`, and as
`hashes` every distinct digest the lock records for it (its sdist and every wheel): the
set of files any of which may be installed, as in pip's hash-checking mode. `scope` is
`required` for what the project's own dependencies pull in, `optional` for what only its
dependency groups (dev) or its extras pull in. `dependencies` is the lock's graph; an
extra that some locked package or the project asks for (`pyjwt[crypto]`) counts as its
package's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BuildFailed, UserError

SPEC_VERSION = "1.6"
# The namespace of the serial numbers: uuid5(NAMESPACE, <sha256 of uv.lock>).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:regen:sbom")
PYPI = "https://pypi.org/simple"
HASH_ALGORITHMS = {"md5": "MD5", "sha1": "SHA-1", "sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}


@dataclass(frozen=True)
class Locked:
    """One package of the lock, as the SBOM lists it."""

    name: str
    version: str
    purl: str
    hashes: tuple[tuple[str, str], ...]  # (CycloneDX algorithm, hex digest), sorted
    scope: str  # "required" or "optional"
    depends_on: tuple[str, ...]  # purls, sorted

    @property
    def ref(self) -> str:
        return self.purl


@dataclass(frozen=True)
class Project:
    name: str
    version: str | None
    description: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


@dataclass(frozen=True)
class Inventory:
    """What the SBOM of `src` must say, read from its lock and its pyproject.toml."""

    project: Project
    packages: tuple[Locked, ...]  # sorted by (name, version)
    project_depends_on: tuple[str, ...]
    serial: uuid.UUID


def normalise(name: str) -> str:
    """PEP 503 normalised name, as uv.lock spells them and purl's pypi type requires."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_toml(path: Path) -> tuple[bytes, dict]:
    try:
        raw = path.read_bytes()
        return raw, tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BuildFailed(f"{path}: cannot be read for the SBOM: {exc}") from exc


def _purl(name: str, version: str, source: dict) -> str:
    from packageurl import PackageURL

    qualifiers: dict[str, str] = {}
    if "registry" in source and source["registry"].rstrip("/") != PYPI:
        qualifiers["repository_url"] = source["registry"]
    elif "git" in source:
        qualifiers["vcs_url"] = "git+" + source["git"]
    elif "url" in source:
        qualifiers["download_url"] = source["url"]
    return PackageURL(type="pypi", name=name, version=version, qualifiers=qualifiers or None).to_string()


def _hashes(package: dict) -> tuple[tuple[str, str], ...]:
    found = set()
    for file in [package.get("sdist") or {}, *package.get("wheels", [])]:
        algorithm, _, digest = str(file.get("hash", "")).partition(":")
        if algorithm.lower() in HASH_ALGORITHMS and digest:
            found.add((HASH_ALGORITHMS[algorithm.lower()], digest.lower()))
    return tuple(sorted(found))


def inventory(src: Path) -> Inventory:
    """Read `src/uv.lock` and `src/pyproject.toml` into what the SBOM says; BuildFailed if they do not make sense."""
    lock_path, pyproject_path = src / "uv.lock", src / "pyproject.toml"
    raw, lock = _read_toml(lock_path)
    _, pyproject = _read_toml(pyproject_path)
    meta = pyproject.get("project", {})
    if not meta.get("name"):
        raise BuildFailed(f"{pyproject_path}: [project] has no name, so the SBOM has no subject")
    project_name = normalise(meta["name"])
    packages = lock.get("package", [])

    def is_project(p: dict) -> bool:
        source = p.get("source", {})
        return normalise(p.get("name", "")) == project_name and (source.get("virtual") == "." or source.get("editable") == ".")

    roots = [p for p in packages if is_project(p)]
    if len(roots) != 1:
        raise BuildFailed(f"{lock_path}: expected the project {project_name} (source virtual or editable '.') once, "
                          f"found it {len(roots)} times; relock with `uv lock`")
    root = roots[0]
    others = [p for p in packages if p is not root]
    by_name: dict[str, list[int]] = {}
    for index, p in enumerate(others):
        by_name.setdefault(normalise(p["name"]), []).append(index)

    def resolve(entry: dict) -> int:
        candidates = by_name.get(normalise(entry.get("name", "")), [])
        for key in ("version", "source"):
            if key in entry and len(candidates) > 1:
                candidates = [i for i in candidates if others[i].get(key) == entry[key]]
        if len(candidates) != 1:
            raise BuildFailed(f"{lock_path}: the dependency {entry} matches {len(candidates)} locked packages; "
                              "relock with `uv lock`")
        return candidates[0]

    def edges(entries: Iterable[dict]) -> list[tuple[int, tuple[str, ...]]]:
        return [(resolve(e), tuple(e.get("extra", ()))) for e in entries]

    def of(package: dict, extras: Iterable[str]) -> list[tuple[int, tuple[str, ...]]]:
        found = edges(package.get("dependencies", []))
        for extra in extras:
            found += edges(package.get("optional-dependencies", {}).get(extra, []))
        return found

    # Walk (package, extra) pairs from the project's own dependencies, then from its groups and extras.
    required_roots = edges(root.get("dependencies", []))
    optional_roots = [d for group in sorted(root.get("dev-dependencies", {}))
                      for d in edges(root["dev-dependencies"][group])]
    optional_roots += [d for extra in sorted(root.get("optional-dependencies", {}))
                       for d in edges(root["optional-dependencies"][extra])]
    reached: dict[str, set[int]] = {"required": set(), "optional": set()}
    extras_used: dict[int, set[str]] = {}
    for scope, start in (("required", required_roots), ("optional", optional_roots)):
        stack, seen = list(start), set()
        while stack:
            index, extras = stack.pop()
            if (index, extras) in seen:
                continue
            seen.add((index, extras))
            reached[scope].add(index)
            extras_used.setdefault(index, set()).update(extras)
            stack += of(others[index], extras)

    purls = [_purl(normalise(p["name"]), str(p.get("version", "")), p.get("source", {})) for p in others]
    locked = []
    for index, p in enumerate(others):
        depends_on = {purls[i] for i, _ in of(p, sorted(extras_used.get(index, ())))}
        locked.append(Locked(
            name=normalise(p["name"]), version=str(p.get("version", "")), purl=purls[index], hashes=_hashes(p),
            scope="required" if index in reached["required"] else "optional", depends_on=tuple(sorted(depends_on)),
        ))
    project_depends_on = {purls[i] for i, _ in required_roots + optional_roots}
    version = meta.get("version") or root.get("version")
    return Inventory(
        project=Project(name=meta["name"], version=str(version) if version is not None else None,
                        description=meta.get("description")),
        packages=tuple(sorted(locked, key=lambda p: (p.name, p.version, p.purl))),
        project_depends_on=tuple(sorted(project_depends_on)),
        serial=uuid.uuid5(NAMESPACE, hashlib.sha256(raw).hexdigest()),
    )


def _timestamp() -> str | None:
    """SOURCE_DATE_EPOCH as the BOM's time, or None (no timestamp) when it is unset."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    try:
        moment = datetime.fromtimestamp(int(value), tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UserError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds since 1970-01-01")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def sbom(src: Path) -> str:
    """sbom.cdx.json for the project in `src`: CycloneDX 1.6 JSON, the same bytes for the same lock."""
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentScope, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    from .. import __version__
    from ..hashing import canonical_json

    inv = inventory(src)
    project = Component(type=ComponentType.APPLICATION, name=inv.project.name, version=inv.project.version,
                        description=inv.project.description, bom_ref=inv.project.ref)
    components = {
        p.ref: Component(
            type=ComponentType.LIBRARY, name=p.name, version=p.version, bom_ref=p.ref,
            purl=PackageURL.from_string(p.purl), scope=ComponentScope(p.scope),
            hashes=[HashType(alg=HashAlgorithm(alg), content=digest) for alg, digest in p.hashes],
        )
        for p in inv.packages
    }
    tool = Component(type=ComponentType.APPLICATION, name="regen", version=__version__)
    bom = Bom(
        serial_number=inv.serial,
        metadata=BomMetaData(component=project, tools=ToolRepository(components=[tool])),
        components=components.values(),
    )
    bom.register_dependency(project, [components[ref] for ref in inv.project_depends_on])
    for p in inv.packages:
        bom.register_dependency(components[p.ref], [components[ref] for ref in p.depends_on])
    data = json.loads(JsonV1Dot6(bom).output_as_string())
    # The library stamps the current time; the BOM carries SOURCE_DATE_EPOCH's, or none.
    stamp = _timestamp()
    if stamp is None:
        data["metadata"].pop("timestamp", None)
    else:
        data["metadata"]["timestamp"] = stamp
    # The library sorts already; sort again so the bytes do not hang on its ordering rules.
    data["components"] = sorted(data.get("components", []), key=lambda c: (c["name"], c.get("version", ""), c["bom-ref"]))
    for component in data["components"]:
        component.get("hashes", []).sort(key=lambda h: (h["alg"], h["content"]))
    data["dependencies"] = sorted(data.get("dependencies", []), key=lambda d: d["ref"])
    for dependency in data["dependencies"]:
        dependency.get("dependsOn", []).sort()
    return canonical_json(data)


def check_sbom(sbom_text: str, src: Path) -> list[str]:
    """Where the SBOM `sbom_text` and `src`'s uv.lock disagree, one line each; [] when they agree.

    Checked: the document is CycloneDX JSON; the metadata component is the project (name,
    version); every locked package is a component and every component a locked package, with
    the lock's version, purl, hashes and scope; the serial number is the lock's; and, when the
    components all match, the dependency graph. Not checked: the timestamp and the tools.
    """
    try:
        inv = inventory(src)
    except BuildFailed as exc:
        return [str(exc)]
    try:
        data = json.loads(sbom_text)
    except ValueError as exc:
        return [f"the SBOM is not JSON: {exc}"]
    if not isinstance(data, dict) or data.get("bomFormat") != "CycloneDX":
        return ["the SBOM is not a CycloneDX document (bomFormat is not 'CycloneDX')"]
    problems: list[str] = []
    if data.get("specVersion") != SPEC_VERSION:
        problems.append(f"the SBOM is CycloneDX {data.get('specVersion')}, not {SPEC_VERSION}")
    subject = (data.get("metadata") or {}).get("component") or {}
    if (subject.get("name"), subject.get("version")) != (inv.project.name, inv.project.version):
        problems.append(f"the SBOM describes {subject.get('name')} {subject.get('version')}, "
                        f"but pyproject.toml is {inv.project.name} {inv.project.version}")
    if data.get("serialNumber") != inv.serial.urn:
        problems.append(f"the SBOM's serialNumber {data.get('serialNumber')} is not the one of this uv.lock "
                        f"({inv.serial.urn}): it was made from another lock")

    listed: dict[str, list[dict]] = {}
    for component in data.get("components") or []:
        if isinstance(component, dict):
            listed.setdefault(normalise(str(component.get("name", ""))), []).append(component)
    locked: dict[str, list[Locked]] = {}
    for package in inv.packages:
        locked.setdefault(package.name, []).append(package)
    component_problems: list[str] = []
    for name in sorted(set(listed) | set(locked)):
        theirs, ours = listed.get(name, []), locked.get(name, [])
        their_versions = sorted(str(c.get("version")) for c in theirs)
        our_versions = sorted(p.version for p in ours)
        if not theirs:
            component_problems.append(f"{name} {', '.join(our_versions)}: locked in uv.lock but missing from the SBOM")
        elif not ours:
            component_problems.append(f"{name} {', '.join(their_versions)}: in the SBOM but not in uv.lock")
        elif their_versions != our_versions:
            component_problems.append(f"{name}: the SBOM says version {', '.join(their_versions)}, "
                                      f"uv.lock locks {', '.join(our_versions)}")
        else:
            for component, package in zip(sorted(theirs, key=lambda c: str(c.get("version"))), ours):
                component_problems += _compare(component, package)
    problems += component_problems

    if not component_problems:
        expected = {p.ref: set(p.depends_on) for p in inv.packages} | {inv.project.ref: set(inv.project_depends_on)}
        found = {str(d.get("ref")): set(d.get("dependsOn") or []) for d in data.get("dependencies") or [] if isinstance(d, dict)}
        for ref in sorted(set(expected) | set(found)):
            if ref not in found:
                problems.append(f"dependencies: {ref} has no entry in the SBOM")
            elif ref not in expected:
                problems.append(f"dependencies: {ref} is in the SBOM but not in uv.lock")
            elif found[ref] != expected[ref]:
                missing, extra = sorted(expected[ref] - found[ref]), sorted(found[ref] - expected[ref])
                problems.append(f"dependencies: {ref} " + "; ".join(
                    part for part in (f"lacks {', '.join(missing)}" if missing else "",
                                      f"has {', '.join(extra)} which uv.lock does not" if extra else "") if part
                ))
    return problems


def _compare(component: dict, package: Locked) -> list[str]:
    where = f"{package.name} {package.version}"
    problems = []
    if component.get("purl") != package.purl:
        problems.append(f"{where}: purl is {component.get('purl')}, uv.lock makes it {package.purl}")
    if component.get("type") != "library":
        problems.append(f"{where}: type is {component.get('type')}, not library")
    if component.get("scope", "required") != package.scope:
        problems.append(f"{where}: scope is {component.get('scope', 'required')}, uv.lock makes it {package.scope}")
    theirs = {(str(h.get("alg")), str(h.get("content")).lower()) for h in component.get("hashes") or [] if isinstance(h, dict)}
    ours = set(package.hashes)
    if theirs != ours:
        missing, extra = len(ours - theirs), len(theirs - ours)
        problems.append(f"{where}: hashes differ from uv.lock ({missing} of the lock's missing, {extra} not in the lock)")
    return problems
