"""The ecosystem's public surface — its tools' signatures and its storage schema — and the
semantic-version bump a change to it calls for.

    major  a tool removed or renamed, a parameter removed or retyped, a new required
           parameter, a result retyped; a destructive storage change
    minor  a tool, MAD or optional parameter added; a table or column added
    patch  anything else (code, prompts, docs, dependencies)
"""

from __future__ import annotations

from typing import Literal

from ..frozen import Frozen
from ..spec.model import Spec
from .manifest import BumpRecord, Manifest

Bump = Literal["major", "minor", "patch"]
_ORDER: tuple[Bump, ...] = ("patch", "minor", "major")


class Change(Frozen):
    bump: Bump
    what: str


def tool_surface(spec: Spec) -> dict[str, dict]:
    """`<mad>.<tool>` -> its parameters (type, required) and result type: what MCP clients rely on."""
    return {
        f"{mad.name}.{tool.name}": {
            "params": {name: {"type": p.type, "required": "default" not in p.model_fields_set}
                       for name, p in tool.params.items()},
            "returns": tool.returns,
        }
        for mad in spec.mads
        for tool in mad.tools
    }


def tables(storage: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
    """The manifest's `storage` (migrate.schema_of: MAD -> table -> columns) as `<mad>_<table>` -> {column: shape}."""
    return {
        f"{mad}_{table}": {c["name"]: {"type": c["type"], "primary_key": c["primary_key"], "nullable": c["nullable"]}
                           for c in columns}
        for mad, mad_tables in storage.items()
        for table, columns in mad_tables.items()
    }


def surface_changes(old_tools: dict, new_tools: dict, old_schema: dict, new_schema: dict) -> list[Change]:
    changes: list[Change] = []
    for name in sorted(old_tools.keys() - new_tools.keys()):
        changes.append(Change(bump="major", what=f"tool {name} removed"))
    for name in sorted(new_tools.keys() - old_tools.keys()):
        changes.append(Change(bump="minor", what=f"tool {name} added"))
    for name in sorted(old_tools.keys() & new_tools.keys()):
        old, new = old_tools[name], new_tools[name]
        for param in sorted(old["params"].keys() - new["params"].keys()):
            changes.append(Change(bump="major", what=f"{name}: parameter {param} removed"))
        for param in sorted(new["params"].keys() - old["params"].keys()):
            required = new["params"][param]["required"]
            changes.append(Change(bump="major" if required else "minor",
                                  what=f"{name}: {'required' if required else 'optional'} parameter {param} added"))
        for param in sorted(old["params"].keys() & new["params"].keys()):
            before, after = old["params"][param], new["params"][param]
            if before["type"] != after["type"]:
                changes.append(Change(bump="major", what=f"{name}: parameter {param} {before['type']} -> {after['type']}"))
            elif after["required"] and not before["required"]:
                changes.append(Change(bump="major", what=f"{name}: parameter {param} became required"))
            elif before["required"] and not after["required"]:
                changes.append(Change(bump="minor", what=f"{name}: parameter {param} became optional"))
        if old["returns"] != new["returns"]:
            changes.append(Change(bump="major", what=f"{name}: result {old['returns']} -> {new['returns']}"))
    for table in sorted(old_schema.keys() - new_schema.keys()):
        changes.append(Change(bump="major", what=f"table {table} dropped"))
    for table in sorted(new_schema.keys() - old_schema.keys()):
        changes.append(Change(bump="minor", what=f"table {table} added"))
    for table in sorted(old_schema.keys() & new_schema.keys()):
        old, new = old_schema[table], new_schema[table]
        for column in sorted(old.keys() - new.keys()):
            changes.append(Change(bump="major", what=f"table {table}: column {column} dropped"))
        for column in sorted(new.keys() - old.keys()):
            changes.append(Change(bump="minor", what=f"table {table}: column {column} added"))
        for column in sorted(old.keys() & new.keys()):
            if old[column] != new[column]:
                changes.append(Change(bump="major", what=f"table {table}: column {column} changed "
                                                        f"{old[column]['type']} -> {new[column]['type']}"))
    return changes


def bump_for(changes: list[Change]) -> Bump:
    return max((c.bump for c in changes), key=_ORDER.index, default="patch")


def bumped(version: str, bump: Bump) -> str:
    major, minor, patch = (int(x) for x in version.split("."))
    if bump == "major":
        return f"{major + 1}.0.0"
    if bump == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def version_bump(spec: Spec, parent: Manifest | None, schema: dict) -> BumpRecord:
    """How far the version moves from `parent`: by the tool surface and the storage `schema` against the parent's."""
    if parent is None:
        return BumpRecord(kind="initial", reason="first build", changes=())
    old_surface = {name: tool.model_dump(mode="json") for name, tool in parent.surface.items()}
    changes = surface_changes(old_surface, tool_surface(spec), tables(parent.storage), tables(schema))
    if not changes:
        return BumpRecord(kind="patch", reason=f"same tools and storage as {parent.version}; code, prompts or docs changed",
                          changes=())
    kind = bump_for(changes)
    return BumpRecord(kind=kind, reason="; ".join(c.what for c in changes if c.bump == kind),
                      changes=tuple(c.what for c in changes))
