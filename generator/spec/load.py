"""Stage 1, load: read a spec folder into a validated `Spec`, or fail with every problem.

The folder is read in four passes, each collecting problems instead of stopping at the
first one, so the user sees everything wrong in one run:

1. files  - every file is vetted as bytes (size, symlinks, regular file) and hashed;
2. parse  - YAML is read with `_SpecLoader` (safe, no duplicate keys, no custom tags),
            which also remembers the line of every key and list entry;
3. models - each document is validated by its pydantic model; errors are rephrased
            for people and located through those remembered lines;
4. cross  - checks that span files: names, tools, capabilities, dependencies, models,
            storage tables, requirement ids (requirements.md's, see `requirements.py`, against
            those MADs and `acceptance:` name); names the kernel reserves are read from the
            kernel's own source.

`load_spec` returns a `Spec` or raises `SpecError`. `explain_errors` and `Phrasing` word
pydantic errors for people; `generator.config` reuses them for pipeline files.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import SpecError, SpecProblem
from ..kernel.capabilities import CAPABILITIES, PACKS
from ..kernel_contract import kernel_tables, pack_settings, reserved_names
from .model import (
    IDENTIFIER,
    MAD_CHANGES,
    PINNED_REQUIREMENT,
    SPEC_RULE,
    TABLE_CHANGES,
    Column,
    EcosystemSpec,
    Imperator,
    MadSpec,
    ModelAlias,
    Param,
    PrincipleRule,
    Spec,
    SpecFile,
    Table,
    Tool,
    used_packs,
)
from .plan import dependency_graph
from .requirements import ID_FORMS, parse_requirements

__all__ = ["MAX_FILE_BYTES", "Phrasing", "explain_errors", "load_spec", "problem_at"]

MAX_FILE_BYTES = 256 * 1024
# Aliases can make a small file expand enormously ("billion laughs"); specs are small.
MAX_YAML_VALUES = 50_000
SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

REQUIRED_FILES = {
    "ecosystem.yaml": "the ecosystem's settings (name, description, python, dependencies, models)",
    "requirements.md": "the ecosystem's requirements, in Markdown",
    "principles.md": "the ecosystem's design principles, in Markdown",
}

_YAML_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _YAML_TAG + "merge"
_ALLOWED_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag)


def load_spec(root: str | Path) -> Spec:
    """Read and validate the spec folder at `root`.

    Raises `SpecError` listing every problem found, each as `file:line: message`.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise SpecError([SpecProblem(_show(root_path), 0, "spec folder not found; expected a folder "
                                     "holding ecosystem.yaml, requirements.md, principles.md and mads/")])
    problems: list[SpecProblem] = []
    folder = _read_folder(root_path, problems)

    ecosystem_doc = _yaml_mapping(folder, "ecosystem.yaml", problems)
    ecosystem = _validate(EcosystemSpec, ecosystem_doc, problems) if ecosystem_doc else None
    requirements = _decode(folder, "requirements.md", problems)
    principles = _decode(folder, "principles.md", problems)

    mads: list[tuple[_Document, MadSpec]] = []
    known_names: set[str] = set()  # every MAD name we can see, even in a broken file
    for rel in _mad_files(folder, problems):
        known_names.add(Path(rel).stem)
        doc = _yaml_mapping(folder, rel, problems)
        if doc is None:
            continue
        if isinstance(doc.data.get("name"), str):
            known_names.add(doc.data["name"])
        mad = _validate(MadSpec, doc, problems)
        if mad is not None:
            mads.append((doc, mad))

    if ecosystem_doc is not None and ecosystem is not None:
        problems += _check_ecosystem(ecosystem_doc, ecosystem)
        problems += _check_packs(ecosystem_doc, ecosystem, mads)
    problems += _check_mads(mads, known_names, ecosystem)
    if requirements is not None:
        problems += _check_requirements(folder.show("requirements.md"), requirements, mads,
                                        (ecosystem_doc, ecosystem) if ecosystem_doc is not None and ecosystem is not None else None)

    if problems or ecosystem is None or requirements is None or principles is None:
        if not problems:  # every refusal above records why; an empty SpecError would print nothing
            problems.append(SpecProblem(_show(root_path), 0, "the spec did not load and no reason was "
                                        "recorded; this is a bug in regen, please report it"))
        raise SpecError(problems)
    return Spec(
        root=str(root),
        ecosystem=ecosystem,
        requirements=requirements,
        principles=principles,
        mads=tuple(sorted((mad for _, mad in mads), key=lambda m: m.name)),
        files=tuple(SpecFile(path=rel, sha256=digest) for rel, digest in sorted(folder.hashes.items())),
    )


def problem_at(root: str | Path, rel: str, loc: tuple, message: str) -> SpecProblem:
    """A problem found after loading (e.g. by the migration planner), at the line of `loc` in spec file `rel`.

    The line is 0 when the file is gone or no longer parses.
    """
    path = Path(root) / rel
    file = _show(path)
    try:
        doc = _parse_yaml(path.read_text(encoding="utf-8"), rel, file, [])
    except (OSError, UnicodeDecodeError):
        doc = None
    return SpecProblem(file, doc.line(loc) if doc else 0, message)


def _show(path: Path) -> str:
    """A path as shown in messages: relative to the working folder when it is inside it."""
    try:
        return Path(os.path.abspath(path)).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


# --- pass 1: files -------------------------------------------------------------------


@dataclass
class _Folder:
    """The vetted files of a spec folder, by posix path relative to its root."""

    root: Path
    contents: dict[str, bytes] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    # Every path found, vetted or not: a refused file must not also be reported missing.
    seen: set[str] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)
    refused_dirs: set[str] = field(default_factory=set)

    def show(self, rel: str) -> str:
        return _show(self.root / rel)


def _read_folder(root: Path, problems: list[SpecProblem]) -> _Folder:
    """Read every file under `root` as bytes, refusing what a spec must not contain."""
    folder = _Folder(root)
    real_root = root.resolve()
    walked: set[Path] = set()
    # followlinks so a symlinked folder inside the spec is read; escaping ones are pruned.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real_here = here.resolve()
        if real_here in walked:  # a symlink loop back into the spec
            dirnames[:] = []
            continue
        walked.add(real_here)
        kept = []
        for name in sorted(dirnames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            folder.seen.add(rel)
            folder.dirs.add(rel)
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                problems.append(SpecProblem(folder.show(rel), 0, _escape_message(path)))
                folder.refused_dirs.add(rel)
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            _read_file(folder, real_root, here / name, problems)
    return folder


def _escape_message(path: Path) -> str:
    return (f"symlink to {os.readlink(path)} leaves the spec folder; "
            "a spec must be self-contained, copy the file into it instead")


def _read_file(folder: _Folder, real_root: Path, path: Path, problems: list[SpecProblem]) -> None:
    rel = path.relative_to(folder.root).as_posix()
    folder.seen.add(rel)
    where = folder.show(rel)
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            problems.append(SpecProblem(where, 0, f"broken symlink to {os.readlink(path)}; "
                                        "expected it to point at a file inside the spec folder"))
            return
        if not target.is_relative_to(real_root):
            problems.append(SpecProblem(where, 0, _escape_message(path)))
            return
    try:
        info = path.stat()
        # Check the type before opening: reading a FIFO or a device would hang or never end.
        if not stat.S_ISREG(info.st_mode):
            problems.append(SpecProblem(where, 0, "not a regular file; expected a plain text file"))
            return
        if info.st_size > MAX_FILE_BYTES:
            problems.append(SpecProblem(where, 0, _size_message(info.st_size)))
            return
        data = path.read_bytes()
    except OSError as exc:
        problems.append(SpecProblem(where, 0, f"cannot read the file: {exc.strerror}"))
        return
    if len(data) > MAX_FILE_BYTES:  # it grew between stat and read
        problems.append(SpecProblem(where, 0, _size_message(len(data))))
        return
    folder.contents[rel] = data
    folder.hashes[rel] = hashlib.sha256(data).hexdigest()


def _size_message(size: int) -> str:
    return (f"file is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes (256 KiB); "
            "spec files are small, split or trim it")


def _decode(folder: _Folder, rel: str, problems: list[SpecProblem]) -> str | None:
    """The text of a required file, or None (with a problem) when missing or not UTF-8."""
    if rel not in folder.contents:
        expected = REQUIRED_FILES.get(rel, "YAML")
        if rel in folder.dirs and rel not in folder.refused_dirs:
            problems.append(SpecProblem(folder.show(rel), 0, f"is a folder, not a file; expected a file "
                                        f"holding {expected}"))
        elif rel not in folder.seen:
            problems.append(SpecProblem(folder.show(rel), 0, f"missing required file; expected {expected}"))
        # Otherwise the file was refused while reading it, and that problem is already recorded.
        return None
    data = folder.contents[rel]
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.append(SpecProblem(folder.show(rel), line, f"not valid UTF-8: byte 0x{data[exc.start]:02x} "
                                    f"at offset {exc.start}; expected the file saved as UTF-8"))
        return None


def _mad_files(folder: _Folder, problems: list[SpecProblem]) -> list[str]:
    """The `mads/<name>.yaml` files; anything else under mads/ is a mistake, not ignored."""
    if "mads" in folder.refused_dirs:  # already reported
        return []
    if "mads" not in folder.dirs:
        state = "not a folder" if "mads" in folder.seen else "missing required folder"
        expected = "expected mads/ holding one <name>.yaml per MAD"
        problems.append(SpecProblem(folder.show("mads"), 0, f"{state}; {expected}"))
        return []
    subfolders = sorted(d for d in folder.dirs if d.startswith("mads/") and d.count("/") == 1)
    for rel in subfolders:
        if rel not in folder.refused_dirs:  # a refused one is already reported
            problems.append(SpecProblem(folder.show(rel), 0, "is a folder; expected only mads/<name>.yaml "
                                        "files directly inside mads/, no sub-folders"))
    skipped = tuple(d + "/" for d in folder.refused_dirs | set(subfolders))
    files, strays = [], []
    for rel in sorted(folder.seen - folder.dirs):
        if not rel.startswith("mads/") or rel.startswith(skipped):
            continue
        (files if rel.count("/") == 1 and rel.endswith(".yaml") else strays).append(rel)
    for rel in strays:
        problems.append(SpecProblem(folder.show(rel), 0, "not a MAD file; expected only mads/<name>.yaml files "
                                    "directly inside mads/"))
    if not files:
        problems.append(SpecProblem(folder.show("mads"), 0,
                                    "holds no MAD; expected at least one mads/<name>.yaml"))
    return files


# --- pass 2: parse -------------------------------------------------------------------


@dataclass
class _Document:
    """A parsed YAML file: its data and the line of every key and list entry."""

    rel: str
    file: str
    data: Any
    lines: dict[tuple, int]

    def line(self, loc: tuple) -> int:
        """The line of the deepest prefix of `loc` that the file spells out."""
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return 0

    def problem(self, loc: tuple, message: str) -> SpecProblem:
        return SpecProblem(self.file, self.line(loc), message)


class _SpecLoader(yaml.SafeLoader):
    """A safe YAML loader that locates every value and refuses what specs must not hold.

    It composes the node tree, walks it once (recording lines, rejecting duplicate
    keys, non-text keys, unknown tags, recursive or explosive aliases), and only
    constructs Python data if the walk found nothing wrong.
    """

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self.file = file
        self.lines: dict[tuple, int] = {}
        self.problems: list[SpecProblem] = []
        self._budget = MAX_YAML_VALUES

    def load_document(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self.lines[()] = node.start_mark.line + 1
        self._walk(node, (), frozenset())
        return None if self.problems else self.construct_document(node)

    def _problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(SpecProblem(self.file, node.start_mark.line + 1, message))

    def _walk(self, node: yaml.Node, path: tuple, ancestors: frozenset[int]) -> None:
        if id(node) in ancestors:
            return self._problem(node, "an alias refers to a value containing itself; expected a plain tree")
        self._budget -= 1
        if self._budget == 0:
            return self._problem(node, f"document expands to more than {MAX_YAML_VALUES} values "
                                 "(through aliases); expected a small spec")
        if self._budget < 0:
            return None
        if node.tag == _YAML_TAG + "value":  # a bare `=` is just text
            node.tag = _YAML_TAG + "str"
        if node.tag not in _ALLOWED_TAGS:
            tag = node.tag.replace(_YAML_TAG, "!!", 1).split(":", 1)[0]
            return self._problem(node, f"tag {tag} is not allowed: specs are data, use plain YAML")
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.ScalarNode):
            self._scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[path + (index,)] = item.start_mark.line + 1
                self._walk(item, path + (index,), inner)
        elif isinstance(node, yaml.MappingNode):
            self._check_keys(node)
            self.flatten_mapping(node)  # apply `<<` merges as the constructor will
            for key_node, value_node in node.value:
                key = self.constructed_objects.get(key_node)
                if isinstance(key, str):
                    self.lines[path + (key,)] = key_node.start_mark.line + 1
                    self._walk(value_node, path + (key,), inner)
        return None

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        # Explicitly tagged scalars (`!!int abc`) fail in PyYAML with plain Python errors.
        try:
            return self.construct_object(node)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError):
            tag = node.tag.replace(_YAML_TAG, "!!", 1)
            self._problem(node, f"{node.value!r} is not a valid {tag} value")
            return None

    def _check_keys(self, node: yaml.MappingNode) -> None:
        """Keys must be text and unique; later passes rely on both."""
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                continue
            if key_node.tag not in _ALLOWED_TAGS or not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, "a key must be a plain name; expected text before ':'")
                continue
            key = self._scalar(key_node)
            if not isinstance(key, str):
                self._problem(key_node, f"key {key_node.value} is read as {_describe(key)}, not a name; "
                              f"expected text, quote it: '{key_node.value}'")
            elif key in first:
                self._problem(key_node, f"duplicate key '{key}' (first at line {first[key]}); "
                              "expected each key once")
            else:
                first[key] = line


def _parse_yaml(text: str, rel: str, file: str, problems: list[SpecProblem]) -> _Document | None:
    """Parse one YAML file; on any problem record it and return None."""
    try:
        loader = _SpecLoader(text, file)  # its reader already rejects control characters
        try:
            data = loader.load_document()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = f"{exc.problem}"
        if exc.context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            detail += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        elif exc.context:
            detail += f" ({exc.context})"
        problems.append(SpecProblem(file, mark.line + 1 if mark else 0, f"invalid YAML: {detail}"))
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        problems.append(SpecProblem(file, line, f"control character U+{code:04X} is not allowed in YAML; "
                                    "expected printable text"))
        return None
    except yaml.YAMLError as exc:
        problems.append(SpecProblem(file, 0, f"invalid YAML: {exc}"))
        return None
    except RecursionError:
        problems.append(SpecProblem(file, 0, "nested too deeply; expected a small spec"))
        return None
    if loader.problems:
        problems += loader.problems
        return None
    return _Document(rel, file, data, loader.lines)


def _yaml_mapping(folder: _Folder, rel: str, problems: list[SpecProblem]) -> _Document | None:
    """A YAML file whose top level must be a mapping of keys."""
    text = _decode(folder, rel, problems)
    if text is None:
        return None
    doc = _parse_yaml(text, rel, folder.show(rel), problems)
    if doc is None:
        return None
    if not isinstance(doc.data, dict):
        got = "an empty file" if doc.data is None else _describe(doc.data)
        problems.append(SpecProblem(doc.file, doc.line(()), f"top level must be a mapping of keys "
                                    f"(like `name: ...`), got {got}"))
        return None
    return doc


# --- pass 3: models ------------------------------------------------------------------

_NOUNS: dict[type[BaseModel], str] = {
    EcosystemSpec: "ecosystem",
    MadSpec: "MAD",
    Tool: "tool",
    Param: "param",
    Imperator: "imperator",
    Table: "table",
    Column: "column",
    ModelAlias: "model alias",
    PrincipleRule: "principle",
}

# pydantic error type -> what was expected, in words.
_EXPECTED = {
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}

_PATTERNS = {
    IDENTIFIER: "a lower-case identifier (a-z, 0-9 and _, starting with a letter)",
    r"^3\.\d+$": "a Python version like '3.11' (quoted, so YAML keeps it text)",
    r"^[a-z][a-z0-9-]*$": "lower-case words joined by '-'",
}


def _label(path: tuple) -> str:
    if not path:
        return "the document"
    if isinstance(path[-1], int):
        owner = f"'{path[-2]}' " if len(path) > 1 and isinstance(path[-2], str) else ""
        return f"{owner}entry {path[-1] + 1}"
    return f"'{path[-1]}'"


@dataclass(frozen=True)
class Phrasing:
    """How one kind of file names its mappings and values in messages."""

    noun: Callable[[type[BaseModel] | None, tuple], str]  # the model of a mapping and its path -> words
    label: Callable[[tuple], str] = _label  # the path of a value -> words
    text_hint: str = "; quote it so YAML keeps it as text"  # after a number or date given for text


_SPEC_PHRASING = Phrasing(noun=lambda owner, _path: _NOUNS.get(owner, "mapping") if owner else "mapping")


def _validate(model: type[BaseModel], doc: _Document, problems: list[SpecProblem]) -> Any:
    """The validated model, or None with every validation error rephrased and located."""
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        problems += [SpecProblem(doc.file, doc.line(path), message)
                     for path, message in explain_errors(model, doc.data, exc.errors(include_url=False))]
        return None


def explain_errors(model: type[BaseModel], data: Any, errors: list[Any],
                   phrasing: Phrasing = _SPEC_PHRASING) -> list[tuple[tuple, str]]:
    """pydantic `errors` of validating `data` as `model`, as (path in the data, message) pairs."""
    explained = []
    # A value failing a union (like Param.default) yields one error per member, each with
    # the member's name appended to loc; grouping by the part of loc that exists in the
    # data folds them into one message.
    by_value: dict[tuple, list[Any]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] in ("missing", "extra_forbidden"):
            explained.append((loc, _explain_key(model, loc, error["type"], phrasing)))
        elif error["type"] == SPEC_RULE:  # a complete message from spec.py: shown as written
            explained.append((_data_path(data, loc), error["ctx"]["message"]))
        else:
            by_value.setdefault(_data_path(data, loc), []).append(error)
    for path, group in by_value.items():
        explained.append((path, _explain_value(model, path, group, phrasing)))
    return explained


def _explain_key(model: type[BaseModel], loc: tuple, kind: str, phrasing: Phrasing) -> str:
    owner = _model_at(model, loc[:-1])
    noun = phrasing.noun(owner, loc[:-1])
    key = loc[-1]
    if kind == "missing":
        about = owner.model_fields[key].description if owner and key in owner.model_fields else None
        return f"missing required key '{key}' in {noun}" + (f" ({about})" if about else "")
    if owner is None:
        return f"unknown key '{key}'"
    keys = list(owner.model_fields)
    message = f"unknown key '{key}' in {noun}; expected one of: {', '.join(keys)}"
    close = difflib.get_close_matches(str(key), keys, n=1)
    return message + (f"; did you mean '{close[0]}'?" if close else "")


def _explain_value(model: type[BaseModel], path: tuple, group: list[Any], phrasing: Phrasing) -> str:
    label = phrasing.label(path)
    value = group[0]["input"]
    got = _describe(value)
    # YAML reads unquoted 3.10, yes and 2024-01-01 as a number, a bool and a date.
    if any(e["type"] == "string_type" for e in group) and isinstance(value, (int, float, date)):
        got += phrasing.text_hint
    if len(group) > 1:
        wanted = list(dict.fromkeys(_EXPECTED.get(e["type"], e["msg"]) for e in group))
        return f"{label} must be {', '.join(wanted[:-1])} or {wanted[-1]}, got {got}"
    error = group[0]
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        sub = _model_at(model, path)
        if sub is not None:
            expected += f" with keys {', '.join(sub.model_fields)}"
        return f"{label} must be {expected}, got {got}"
    if kind == "literal_error":
        return f"{label} must be one of {ctx['expected']}, got {got}"
    if kind == "string_pattern_mismatch":
        return f"{label} must be {_PATTERNS.get(ctx['pattern'], 'text matching ' + ctx['pattern'])}, got {got}"
    if kind == "string_too_short":
        return f"{label} must not be empty"
    if kind == "too_short":
        count = ctx["min_length"]
        noun = "entry" if count == 1 else "entries"
        return f"{label} must have at least {count} {noun}, got {len(value) or 'none'}"
    if kind == "greater_than_equal":
        return f"{label} must be at least {ctx['ge']}, got {got}"
    if kind == "greater_than":
        return f"{label} must be more than {ctx['gt']}, got {got}"
    if kind in ("value_error", "assertion_error"):
        return f"{label}: {ctx['error']}"
    return f"{label} is invalid: {error['msg'][:1].lower()}{error['msg'][1:]}, got {got}"


def _data_path(data: Any, loc: tuple) -> tuple:
    """The longest prefix of a pydantic `loc` that actually exists in the data."""
    path = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            break
        path.append(part)
    return tuple(path)


def _model_at(model: Any, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the value at `loc`, following field annotations."""
    current = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
        elif get_origin(current) in (list, tuple) and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _describe(value: Any) -> str:
    """A value as the user wrote it, briefly."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


# --- pass 4: cross-file checks -------------------------------------------------------


def _check_ecosystem(doc: _Document, ecosystem: EcosystemSpec) -> list[SpecProblem]:
    problems = [doc.problem(("models", alias, "api_key_secret"), _secret_message(model.api_key_secret))
                for alias, model in ecosystem.models.items()
                if model.api_key_secret and not SECRET_NAME.match(model.api_key_secret)]
    for key in ("dependencies", "dev_dependencies"):
        for index, requirement in enumerate(getattr(ecosystem, key)):
            if not PINNED_REQUIREMENT.match(requirement):
                name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
                problems.append(doc.problem((key, index), f"dependency '{name[1] if name else requirement}' is "
                                            "not pinned; expected name==version (extras allowed, like "
                                            "mcp[cli]==2.3.0)"))
    return problems


def _check_packs(doc: _Document, ecosystem: EcosystemSpec, mads: list[tuple[_Document, MadSpec]]) -> list[SpecProblem]:
    """A capability pack a tool is bound to brings its pinned libraries: ecosystem.yaml must list each, at the
    pack's pin (the version its guards were tested with), so the artifact's pyproject and uv.lock carry them.
    Settings under `packs:` are only for packs the ecosystem uses; naming a deployment pack there (redis) is
    what brings it in."""
    used = used_packs([mad for _, mad in mads], ecosystem)
    problems = [doc.problem(("packs", name), f"settings for the {name!r} capability pack, which no tool uses (bind "
                            f"a tool to a {name}.* capability, or remove these settings)")
                for name in ecosystem.packs if name not in used and PACKS[name].kind == "capabilities"]
    for name, settings in ecosystem.packs.items():
        known = pack_settings(name)
        for key, value in settings.items():
            want = known.get(key)
            if want is None:
                hint = (_closest(key, known, "expected one of") if known
                        else f"it takes none: write `{name}: {{}}` (its runtime options are `serve` flags)")
                problems.append(doc.problem(("packs", name, key), f"unknown setting '{key}' of the {name!r} pack; " + hint))
            elif not _setting_fits(value, want):
                problems.append(doc.problem(("packs", name, key), f"setting '{key}' of the {name!r} pack takes "
                                            f"{_TYPE_WORDS.get(want, want.__name__)}, not {_describe(value)}"))
    listed = {_requirement_name(r): (index, r.strip()) for index, r in enumerate(ecosystem.dependencies)}
    for pack in sorted(used):
        users = sorted({f"{mad.name}.{t.name}" for _, mad in mads for t in mad.tools
                        if t.builtin and t.builtin.split(".", 1)[0] == pack})
        why = (f"tool {', '.join(users)}" if users else "named under `packs:`" if PACKS[pack].kind == "deployment"
               else "a pack the bound packs require")
        kind = "deployment pack" if PACKS[pack].kind == "deployment" else "capability pack"
        for pin in PACKS[pack].dependencies:
            index, have = listed.get(_requirement_name(pin), (None, ""))
            if index is None:
                problems.append(doc.problem(("dependencies",), f"the {pack!r} {kind} ({why}) needs {pin}, "
                                            f"which `dependencies` lacks; add `- {pin}`"))
            elif have.replace(" ", "") != pin:
                problems.append(doc.problem(("dependencies", index), f"the {pack!r} {kind} ({why}) is tested "
                                            f"with {pin}, not {have}; pin `- {pin}`"))
    return problems


_TYPE_WORDS = {int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping",
               bool: "true or false"}


def _setting_fits(value: Any, want: type) -> bool:
    if want is object:
        return True
    if isinstance(value, bool) or want is bool:
        return isinstance(value, bool) and want is bool
    # A number for a number: whether a whole one is needed, or a range, the pack says when the ecosystem starts.
    return isinstance(value, (int, float)) if want in (int, float) else isinstance(value, want)


def _requirement_name(requirement: str) -> str:
    """A requirement's distribution name as PyPI compares them (case, -, _ and . alike), extras dropped."""
    name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
    return re.sub(r"[-_.]+", "-", name[1]).lower() if name else requirement


def _secret_message(name: str) -> str:
    return (f"secret name {name!r} is not a plain identifier; "
            "expected letters, digits and _, not starting with a digit")


def _check_mads(mads: list[tuple[_Document, MadSpec]], known: set[str],
                ecosystem: EcosystemSpec | None) -> list[SpecProblem]:
    """Checks that need more than one MAD, or the ecosystem, to decide."""
    problems: list[SpecProblem] = []
    first: dict[str, _Document] = {}
    # A MAD in its own <name>.yaml comes first, so the duplicate reported is the misnamed one.
    for doc, mad in sorted(mads, key=lambda entry: Path(entry[0].rel).stem != entry[1].name):
        if Path(doc.rel).stem != mad.name:
            problems.append(doc.problem(("name",), f"MAD name '{mad.name}' does not match its file name "
                                        f"'{Path(doc.rel).name}'; expected the file to be mads/{mad.name}.yaml"))
        if mad.name in first:
            other = first[mad.name]
            problems.append(doc.problem(("name",), f"duplicate MAD name '{mad.name}' (first in "
                                        f"{other.file}:{other.line(('name',))}); expected each MAD once"))
        first.setdefault(mad.name, doc)
        problems += _check_tools(doc, mad)
        problems += _check_columns(doc, mad, ecosystem is not None and "postgres" in ecosystem.packs)
        problems += _check_talks_to(doc, mad, known)
        problems += _check_lifecycle(doc, mad, {m.name: m for _, m in mads})
        if ecosystem is not None and mad.imperator.model not in ecosystem.models:
            alias = mad.imperator.model
            hint = (_closest(alias, ecosystem.models, "defined") if ecosystem.models
                    else "ecosystem.yaml defines none, add it under `models:`")
            problems.append(doc.problem(("imperator", "model"), f"model alias '{alias}' is not defined "
                                        f"in ecosystem.yaml `models`; {hint}"))
        problems += [doc.problem(("secrets", index), _secret_message(secret))
                     for index, secret in enumerate(mad.secrets) if not SECRET_NAME.match(secret)]
    problems += _check_cycles(mads)
    problems += _check_tables(mads)
    return problems


def _closest(name: str, choices: Any, listing: str) -> str:
    """'did you mean X?' when a choice is close, else the list of choices."""
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"{listing}: {', '.join(sorted(choices)) or 'none'}"


def _check_tools(doc: _Document, mad: MadSpec) -> list[SpecProblem]:
    problems = []
    first_line: dict[str, int] = {}
    for index, tool in enumerate(mad.tools):
        if tool.name in first_line:
            problems.append(doc.problem(("tools", index, "name"), f"duplicate tool name '{tool.name}' in MAD "
                                        f"'{mad.name}' (first at line {first_line[tool.name]}); "
                                        "expected each tool once"))
        first_line.setdefault(tool.name, doc.line(("tools", index, "name")))
        if tool.name in reserved_names():
            problems.append(doc.problem(("tools", index, "name"), f"tool name '{tool.name}' is reserved by the "
                                        "kernel: the Mad base class (kernel/mad.py) already defines it, and the "
                                        f"tool would override it; expected a different name, like "
                                        f"'{mad.name}_{tool.name}'"))
        if tool.builtin is not None:
            problems += _check_builtin(doc, ("tools", index), tool, tool.builtin)
    return problems


def _check_builtin(doc: _Document, at: tuple, tool: Tool, builtin: str) -> list[SpecProblem]:
    """A tool bound to a kernel capability must declare the capability's signature."""
    capability = CAPABILITIES.get(builtin)
    if capability is None:
        return [doc.problem(at + ("builtin",), f"unknown capability '{builtin}'; "
                            + _closest(builtin, CAPABILITIES, "expected one of"))]
    problems = []
    signature = ", ".join(f"{p.name}: {p.type}" + ("" if p.required else " (optional)")
                          for p in capability.params) or "no parameters"
    for name, param in tool.params.items():
        wanted = capability.param(name)
        if wanted is None:
            problems.append(doc.problem(at + ("params", name), f"param '{name}' of tool '{tool.name}' is not a "
                                        f"parameter of capability '{builtin}'; expected only: {signature}"))
        elif wanted.type != param.type:
            problems.append(doc.problem(at + ("params", name, "type"), f"param '{name}' of tool '{tool.name}' "
                                        f"is {param.type}, but capability '{builtin}' takes {wanted.type}"))
    for wanted in capability.params:
        if wanted.required and wanted.name not in tool.params:
            problems.append(doc.problem(at + ("params",), f"tool '{tool.name}' lacks param '{wanted.name}: "
                                        f"{wanted.type}', required by capability '{builtin}' ({signature})"))
    # Only an explicit `returns` is compared: the default is a guess, not a claim.
    if "returns" in tool.model_fields_set and tool.returns != capability.returns:
        problems.append(doc.problem(at + ("returns",), f"tool '{tool.name}' returns {tool.returns}, but "
                                    f"capability '{builtin}' returns {capability.returns}"))
    return problems


# The words PostgreSQL reserves (its manual's appendix C, "reserved" and "reserved (can be function or type)"): a
# column so named cannot be created there unquoted, and the kernel's SQL does not quote. `rowid` is the column the
# postgres pack gives every MAD table (SQLite's own rowid).
POSTGRES_RESERVED = frozenset("""all analyse analyze and any array as asc asymmetric authorization binary both case cast
check collate collation column concurrently constraint create cross current_catalog current_date current_role
current_schema current_time current_timestamp current_user default deferrable desc distinct do else end except false
fetch for foreign freeze from full grant group having ilike in initially inner intersect into is isnull join lateral
leading left like limit localtime localtimestamp natural not notnull null offset on only or order outer overlaps placing
primary references returning right select session_user similar some symmetric table tablesample then to trailing true
union unique user using variadic verbose when where window with rowid""".split())


def _check_columns(doc: _Document, mad: MadSpec, postgres: bool = False) -> list[SpecProblem]:
    """Within one MAD: each table once, each column once per table, consents that fit the tables; with the postgres
    pack, no column named with a word PostgreSQL reserves."""
    problems = []
    first_table: dict[str, int] = {}
    for index, table in enumerate(mad.storage):
        at = ("storage", index)
        if table.name in first_table:
            problems.append(doc.problem(at + ("name",), f"duplicate table name '{table.name}' in MAD '{mad.name}' "
                                        f"(first at line {first_table[table.name]}); expected each table once"))
        first_table.setdefault(table.name, doc.line(at + ("name",)))
        first_column: dict[str, int] = {}
        for number, column in enumerate(table.columns):
            where = at + ("columns", number, "name")
            if column.name in first_column:
                problems.append(doc.problem(where, f"duplicate column name '{column.name}' in table "
                                            f"'{table.name}' (first at line {first_column[column.name]}); "
                                            "expected each column once"))
            first_column.setdefault(column.name, doc.line(where))
            if postgres and column.name in POSTGRES_RESERVED:
                what = ("the column the postgres pack gives every MAD table (SQLite's own rowid)" if column.name == "rowid"
                        else "a word PostgreSQL reserves")
                problems.append(doc.problem(where, f"column name '{column.name}' in table '{table.name}' is {what}, and "
                                            "this ecosystem keeps its state there (the postgres pack); expected another "
                                            f"name, e.g. '{column.name}_value'"))
        problems += [doc.problem(at + ("allow_destructive", number), message)
                     for number, entry in enumerate(table.allow_destructive)
                     if (message := _consent_misfit(table, entry))]
    for number, entry in enumerate(mad.allow_destructive):
        match = MAD_CHANGES["drop table <table>"].match(entry)
        if match and match["table"] in first_table:
            problems.append(doc.problem(("allow_destructive", number), f"allow_destructive entry '{entry}' names a "
                                        f"table MAD '{mad.name}' still has; expected only tables removed from storage"))
    return problems


def _consent_misfit(table: Table, entry: str) -> str | None:
    """Why a table's allow_destructive entry cannot describe a change that led to this table (None: it can)."""
    columns = {c.name: c for c in table.columns}
    matches = {kind: pattern.match(entry) for kind, pattern in TABLE_CHANGES.items()}
    said = f"allow_destructive entry '{entry}' of table '{table.name}'"
    if (match := matches["drop column <column>"]) and match["column"] in columns:
        return f"{said} names a column the table still has; expected only columns removed from it"
    if (match := matches["narrow column <column> to <type>"]) and (
            columns.get(match["column"]) is None or columns[match["column"]].type != match["type"]):
        return f"{said} does not match the table: expected a column '{match['column']}' of type {match['type']}"
    if (match := matches["require column <column>"]) and (
            columns.get(match["column"]) is None or columns[match["column"]].nullable):
        return f"{said} does not match the table: expected a column '{match['column']}' with nullable: false"
    key = ", ".join(c.name for c in table.columns if c.primary_key)
    if (match := matches["change primary key to <column>, ..."]) and match["columns"] != key:
        return f"{said} does not match the table, whose primary key is {f'({key})' if key else 'none'}"
    return None


def _check_tables(mads: list[tuple[_Document, MadSpec]]) -> list[SpecProblem]:
    """The kernel stores MAD `m`'s table `t` as `m_t`: no two may meet, nor meet the kernel's own."""
    problems = []
    owners: dict[str, tuple[_Document, int, str, str]] = {}  # SQL name -> where, MAD, table
    seen_mads: set[str] = set()
    for doc, mad in mads:
        if mad.name in seen_mads:  # a duplicate MAD is reported as such
            continue
        seen_mads.add(mad.name)
        seen_tables: set[str] = set()
        for index, table in enumerate(mad.storage):
            if table.name in seen_tables:  # reported as a duplicate table
                continue
            seen_tables.add(table.name)
            at = ("storage", index, "name")
            sql = f"{mad.name}_{table.name}"
            stored = f"table '{table.name}' of MAD '{mad.name}' is stored as SQL table '{sql}'"
            if sql in kernel_tables():
                problems.append(doc.problem(at, f"{stored}, which the kernel already uses for its own "
                                            f"({kernel_tables()[sql]}); expected another table name"))
            elif sql.startswith("sqlite_"):
                problems.append(doc.problem(at, f"{stored}, but SQLite reserves names starting with "
                                            "'sqlite_'; expected another MAD or table name"))
            elif sql in owners:
                other, line, other_mad, other_table = owners[sql]
                problems.append(doc.problem(at, f"{stored}, the same as table '{other_table}' of MAD "
                                            f"'{other_mad}' ({other.file}:{line}); expected table names "
                                            "that stay distinct once prefixed with their MAD's name"))
            else:
                owners[sql] = (doc, doc.line(at), mad.name, table.name)
    return problems


def _check_requirements(file: str, text: str, mads: list[tuple[_Document, MadSpec]],
                        ecosystem: tuple[_Document, EcosystemSpec] | None) -> list[SpecProblem]:
    """requirements.md's ids are well formed and unique; MADs and acceptance areas name only those."""
    parsed = parse_requirements(text)
    problems = [SpecProblem(file, line, message) for line, message in parsed.problems]
    known = list(dict.fromkeys(item.id for item in parsed.requirements))
    claims: list[tuple[_Document, tuple, list[str], str]] = [
        (doc, ("requirements",), mad.requirements, f"MAD '{mad.name}'") for doc, mad in mads]
    if ecosystem is not None:
        doc, spec = ecosystem
        claims += [(doc, ("acceptance", area), ids, f"acceptance area '{area}'")
                   for area, ids in spec.acceptance.items()]
    for doc, at, ids, owner in claims:
        seen: set[str] = set()
        for index, requirement_id in enumerate(ids):
            if requirement_id in seen:
                problems.append(doc.problem(at + (index,), f"requirement '{requirement_id}' is listed twice "
                                            f"for {owner}; expected each id once"))
            elif requirement_id not in known:
                problems.append(doc.problem(at + (index,), _unknown_requirement(requirement_id, known)))
            seen.add(requirement_id)
    return problems


def _unknown_requirement(requirement_id: str, known: list[str]) -> str:
    said = f"requirement '{requirement_id}' is not an id of requirements.md"
    if not known:
        return f"{said}, which gives none; expected requirements.md to mark it with {ID_FORMS}"
    # The usual slips: a trailing '.', a lower-case 'r' or none, a '#' or braces around a slug.
    plain = requirement_id.strip().rstrip(".").strip("{}").lstrip("#")
    if number := re.fullmatch(r"[rR]?([1-9][0-9]*)", plain):
        plain = f"R{number[1]}"
    close = [plain] if plain in known else difflib.get_close_matches(requirement_id, [k for k in known
                                                                                     if not k.startswith("R")], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{said}; expected one of: {', '.join(known)}{hint}"


def _check_talks_to(doc: _Document, mad: MadSpec, known: set[str]) -> list[SpecProblem]:
    problems = []
    for index, other in enumerate(mad.talks_to):
        if other == mad.name:
            problems.append(doc.problem(("talks_to", index), f"MAD '{mad.name}' talks to itself; "
                                        "expected only other MADs in talks_to"))
        elif other not in known:
            problems.append(doc.problem(("talks_to", index), f"talks_to names unknown MAD '{other}'; "
                                        + _closest(other, known, "known MADs")))
    return problems


def _check_lifecycle(doc: _Document, mad: MadSpec, by_name: dict[str, MadSpec]) -> list[SpecProblem]:
    """Roles (ephemeral MADs) are spawned for a task, never asked or served: what that rules out."""
    problems = []
    for index, role in enumerate(mad.spawns):
        other = by_name.get(role)
        if other is None:
            problems.append(doc.problem(("spawns", index), f"spawns names unknown MAD '{role}'; "
                                        + _closest(role, by_name, "known MADs")))
        elif other.lifecycle != "ephemeral":
            problems.append(doc.problem(("spawns", index), f"'{role}' is a persistent MAD, which runs once and is "
                                        "asked over the bus; spawns names roles (lifecycle: ephemeral)"))
    for index, other in enumerate(mad.talks_to):
        if other in by_name and by_name[other].lifecycle == "ephemeral":
            problems.append(doc.problem(("talks_to", index), f"'{other}' is a role (lifecycle: ephemeral): roles are "
                                        "spawned for a task, not asked; list it under spawns"))
    if mad.lifecycle == "ephemeral":
        if mad.tools:
            problems.append(doc.problem(("tools",), f"role '{mad.name}' (lifecycle: ephemeral) declares tools, which "
                                        "no client could call: an instance works on its task through its Thought "
                                        "Engine; remove the tools, or make the MAD persistent"))
        if mad.conversations:
            problems.append(doc.problem(("conversations",), f"role '{mad.name}' (lifecycle: ephemeral) joins only "
                                        "the conversation of its task; remove `conversations`"))
    else:
        for key in ("max_instances", "task_timeout_seconds"):
            if getattr(mad, key) is not None:
                problems.append(doc.problem((key,), f"{key} is for roles (lifecycle: ephemeral); '{mad.name}' is "
                                            "persistent: remove it"))
    return problems


def _check_cycles(mads: list[tuple[_Document, MadSpec]]) -> list[SpecProblem]:
    """One problem per dependency loop, at the talks_to entry that closes it."""
    edges: dict[str, set[str]] = {}  # MADs of one name (a duplicate, reported elsewhere) share their edges
    for _, mad in mads:
        edges.setdefault(mad.name, set()).update(t for t in mad.talks_to if t != mad.name)
    try:  # the stdlib finds out whether there is a loop at all; networkx (slow to import) says which
        TopologicalSorter(edges).prepare()
        return []
    except CycleError:
        pass
    import networkx as nx

    graph = dependency_graph(mad for _, mad in mads)
    graph.remove_edges_from(list(nx.selfloop_edges(graph)))  # reported as "talks to itself"
    problems = []
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        # The shortest loop through the alphabetically first MAD: stable across runs.
        start = min(component)
        sub = graph.subgraph(component)
        back = min((nx.shortest_path(sub, after, start) for after in sub.successors(start)),
                   key=lambda path: (len(path), path))
        cycle = [start, *back]
        doc, mad = next((doc, mad) for doc, mad in mads if mad.name == cycle[-2] and start in mad.talks_to)
        problems.append(doc.problem(("talks_to", mad.talks_to.index(start)),
                                    f"dependency cycle: {' -> '.join(cycle)}; expected talks_to to form no loop "
                                    "(a MAD needs the MADs it talks to running first)"))
    return problems
