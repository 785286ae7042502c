"""The storage pack's catalogue: what it is for. It has no library of its own (SQLite is the core's).

A spec does not name it: a build has it when a MAD declares `storage:` tables, or its storage history has a
migration (kept after the last table went, so a state that has them is still brought to this version).
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("storage", "The MADs' own tables (`storage:` in a MAD spec): CRUD through `self.store`, and the "
                           "numbered migrations that bring a state to the spec's tables", kind="storage")
