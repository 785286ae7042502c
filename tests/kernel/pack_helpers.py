"""Shared by the capability packs' own tests (generator/kernel/packs/<pack>/tests/): a pack built on a recording
`PackContext`, the secret that must never leak, and a pack loaded in a runtime of the tiny ecosystem.

- `Recorder`: a base for each test module's `Env` dataclass; it records every `audit` and `denied` call
  and builds the `PackContext` (ecosystem "eco") a pack is given.
- `outside(tmp)`: `<tmp>/outside` holding `secret.txt` (`SECRET`), what no pack may read or change.
- `run(coro)`, `snapshot(top)` (everything under a folder, to compare before and after) and
  `refused(env, op, subject, coro)` (the AccessDenied that `denied` returned, audited, no secret in it).
- `owner(kernel, name, role, *families)` and `running(eco_modules, state, *mads)`: a MAD owning pack
  families, and a started runtime of the tiny ecosystem (conftest `eco_modules`) with it added.

Import what a module uses: `from pack_helpers import CALLER, Recorder, run` (generator/kernel/packs/conftest.py
puts tests/kernel on sys.path).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from generator.kernel.errors import AccessDenied, KernelError
from generator.kernel.packs import Pack, PackContext

SECRET = b"outside secret: never read me\n"
SECRET_TEXT = SECRET.decode().strip()  # what a refusal, a reply or an error must never show
CALLER = "rogue"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one pack call to its end on a fresh event loop."""
    return asyncio.run(coro)


@dataclass(kw_only=True)
class Recorder:
    """What a pack's context reports, in order: `audits` (actor, action, subject, ok, detail) of each
    `audit` call, `denials` (actor, action, subject, why) of each `denied` call, and `raised`, the
    AccessDenied each `denied` call returned (for the pack to raise).

    A test module's `Env` is a dataclass deriving from it (these fields are keyword-only, so the
    subclass may add fields without defaults) and builds its packs on `context(...)`.
    """

    audits: list[tuple[str, str, str, bool, str]] = field(default_factory=list)
    denials: list[tuple[str, str, str, str]] = field(default_factory=list)
    raised: list[KernelError] = field(default_factory=list)

    def audit(self, actor: str, action: str, subject: str, ok: bool, detail: str) -> None:
        self.audits.append((actor, action, subject, ok, detail))

    def denied(self, actor: str, action: str, subject: str, why: str) -> KernelError:
        self.denials.append((actor, action, subject, why))
        self.raised.append(AccessDenied(why))
        return self.raised[-1]

    def context(self, folder: Path | str, settings: dict[str, Any] | None = None,
                peer: Callable[[str], Pack] | None = None, **more: Any) -> PackContext:
        """The context of a pack in `folder` with these settings, reporting here. `peer` (left out: the
        context's own, which says the pack is not loaded) and `more` (audit_entries, post) are passed on."""
        if peer is not None:
            more["peer"] = peer
        return PackContext(ecosystem="eco", folder=folder, settings={} if settings is None else settings,
                           audit=self.audit, denied=self.denied, **more)


def outside(tmp: Path, more: dict[str, bytes] | None = None) -> Path:
    """`<tmp>/outside`, made, holding `secret.txt` (SECRET) and `more` (relative path -> content):
    everything a pack must never read or change."""
    top = tmp / "outside"
    top.mkdir()
    (top / "secret.txt").write_bytes(SECRET)
    for rel, data in (more or {}).items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data)
    return top


def snapshot(top: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Everything under `top`, links not followed, but for names starting with one of `skip`: each
    path's kind, content (a file) or target (a link), mode, mtime and link count."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in dirnames + filenames:
            if skip and name.startswith(skip):
                continue
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                body: Any = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            else:
                body = None
            seen[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), body, st.st_mode, st.st_mtime_ns, st.st_nlink)
    return seen


def refused(env: Recorder, op: str, subject: str | None, coro: Coroutine[Any, Any, Any], match: str | None = None) -> str:
    """Run `coro`, expect exactly one refusal: the AccessDenied (its message matching `match`, if given)
    that `env.denied` returned, for CALLER's `op` on `subject` (None: any subject), no secret in its
    reason. Returns the reason."""
    before = len(env.denials)
    with pytest.raises(AccessDenied, match=match or None) as caught:
        run(coro)
    assert len(env.denials) == before + 1, env.denials[before:]
    actor, action, subj, why = env.denials[-1]
    assert (actor, action) == (CALLER, op)
    if subject is not None:
        assert subj == subject
    assert caught.value is env.raised[-1]
    assert SECRET_TEXT not in why
    return why


# ---- a pack in a runtime of the tiny ecosystem (conftest's `eco_modules`) ----------------------------------


def owner(kernel: Any, name: str, role: str, *families: str) -> type:
    """A MAD class of `kernel` (the tiny ecosystem's kernel package) named `name`, owning `families`."""
    return type(name.title(), (kernel.Mad,), {"name": name, "role": role, "owns": families})


@asynccontextmanager
async def running(eco_modules: tuple[Any, Any, Any], state: Path, *mads: type,
                  pack_settings: dict[str, Any] | None = None) -> AsyncIterator[Any]:
    """The tiny ecosystem's Runtime with `mads` added and these pack settings, started on `state`
    (its packs loaded for the MADs owning them) and stopped when the block ends."""
    config, _, runtime_mod = eco_modules
    runtime = runtime_mod.Runtime(
        config.model_copy(update={"mads": (*config.mads, *mads), "pack_settings": pack_settings or {}}), state)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
