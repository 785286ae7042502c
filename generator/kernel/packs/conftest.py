"""What the packs' own tests (`<pack>/tests/test_*.py`) share with the kernel's (tests/kernel/).

- The suite's guards (tests/conftest.py: no real model request, a throwaway signing key) and the tiny
  ecosystem's fixtures (tests/kernel/conftest.py: `tiny_ecosystem`, `eco_modules`, `runtime`, `grace_eco`) are
  loaded here under names of their own (both files are named conftest.py, which pytest imports as `conftest`)
  and re-exported, so that pytest finds them for every test under this folder.
- tests/kernel goes on sys.path, as pytest puts it there for its own tests, so `from pack_helpers import ...`
  and `from bus_helpers import ...` work whichever test files an xdist worker was given.

Neither this file nor a pack's tests/ folder is part of the kernel: an artifact never carries them, and they are
no input of a build (kernel_contract.kernel_test_file).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[3] / "tests"
if str(TESTS / "kernel") not in sys.path:
    sys.path.insert(0, str(TESTS / "kernel"))


def _load(path: Path, name: str) -> ModuleType:
    """The module of `path`, imported as `name` (once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_suite = _load(TESTS / "conftest.py", "regen_suite_conftest")
_kernel = _load(TESTS / "kernel" / "conftest.py", "kernel_tests_conftest")

_own_signing_keys = _suite._own_signing_keys
_no_real_model_requests = _suite._no_real_model_requests
tiny_ecosystem = _kernel.tiny_ecosystem
eco_modules = _kernel.eco_modules
runtime = _kernel.runtime
grace_eco = _kernel.grace_eco
