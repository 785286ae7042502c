"""The emads pack (ephemeral MADs)'s catalogue: what it is for, its pinned dependencies.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("emads", "Ephemeral MADs: instances of a role spawned for a task, capped per role, their reports kept "
                         "for the role's next instances", kind="roles")
