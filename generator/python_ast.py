"""`ast.parse` and `ast.literal_eval` behind one lock.

CPython 3.11 counts the depth of the Python AST objects it builds in state its threads share, so two
threads parsing at once can fail with "SystemError: AST constructor recursion depth mismatch"
(python/cpython#106905). regen synthesises, checks and reviews units in threads: every parse regen does
goes through here. (`compile()` to bytecode builds no such objects and needs no lock.)
"""

from __future__ import annotations

import ast
import threading
from typing import Any

_LOCK = threading.Lock()


def parse(source: str) -> ast.Module:
    with _LOCK:
        return ast.parse(source)


def literal_eval(text: str) -> Any:
    with _LOCK:
        return ast.literal_eval(text)
