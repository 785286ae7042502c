"""`regen init`: a new spec to start an ecosystem of one's own from.

It writes ecosystem.yaml, requirements.md, principles.md and two MADs whose tools are all bound
to kernel capabilities (the desk keeps conversations and talks to the vault, which keeps
secrets), so the offline default builds it at once. It writes only into a new or empty folder,
and changes nothing when it refuses; `--force` overwrites the starter's own files and no other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from ..frozen import Frozen
from ..kernel_contract import RUNTIME_DEPENDENCIES, TEST_DEPENDENCIES
from ..render import environment
from .model import IDENTIFIER, package_name_problem

FILES = {
    "ecosystem.yaml": "ecosystem.yaml.j2",
    "requirements.md": "requirements.md.j2",
    "principles.md": "principles.md.j2",
    "mads/desk.yaml": "mads/desk.yaml.j2",
    "mads/vault.yaml": "mads/vault.yaml.j2",
}


class Started(Frozen):
    folder: Path
    name: str
    files: tuple[str, ...]


def name_for(folder: Path) -> str:
    """An ecosystem name from a folder's name: lower case, `_` for anything else; '' when none can be made."""
    name = re.sub(r"[^a-z0-9_]+", "_", folder.resolve().name.lower()).strip("_")
    return name if re.match(IDENTIFIER, name) else ""


def init(folder: Path, name: str | None = None, force: bool = False) -> Started:
    """Write a starter spec into `folder`; a UserError, with nothing written, when it cannot."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{folder} is a file, not a folder: regen init writes a new spec into a folder that does "
                        "not exist yet or is empty, e.g. regen init my-ecosystem")
    above = next((p for p in folder.absolute().parents if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{above} is a file, so {folder} cannot be made; give a folder inside a folder")
    given = name is not None
    name = name if given else name_for(folder)
    if not name:
        raise UserError(f"cannot make an ecosystem name of the folder name {folder.resolve().name!r}; "
                        "give one with --name, e.g. --name notes (lower case, digits and _, starting with a letter)")
    if problem := package_name_problem(name):
        raise UserError(f"--name: {problem}" if given else f"{problem} (made from the folder's name "
                        f"{folder.resolve().name!r}); give another with --name, e.g. --name notes")
    if folder.is_dir() and not force:
        entries = sorted(p.name for p in folder.iterdir())
        if (folder / "ecosystem.yaml").exists():
            raise UserError(f"{folder} already holds a spec (ecosystem.yaml); nothing was changed. Edit it and run "
                            f"`regen regenerate --spec {folder}`, or pass --force to replace it with the starter")
        if entries:
            shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
            raise UserError(f"{folder} is not empty ({shown}); nothing was changed. regen init writes into a new or "
                            "empty folder; pass --force to write the starter's files over those of the same name")
    for rel in FILES:  # with --force, what stands where a starter file goes must be a file (or nothing)
        for path in [*reversed(Path(rel).parents[:-1]), Path(rel)]:
            target = folder / path
            if target.is_symlink() or (target.exists() and target.is_dir() != (path != Path(rel))):
                raise UserError(f"{target} is in the way of the starter's {rel}; nothing was changed")
    env = environment("spec/templates")
    rendered = {rel: env.get_template(template).render(
        name=name, dependencies=RUNTIME_DEPENDENCIES, dev_dependencies=TEST_DEPENDENCIES)
        for rel, template in FILES.items()}
    try:
        for rel, text in rendered.items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, target)  # whole or not at all, file by file
    except OSError as exc:
        raise UserError(f"cannot write the starter into {folder}: {exc.strerror or exc}") from None
    return Started(folder=folder, name=name, files=tuple(FILES))
