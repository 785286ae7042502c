"""Suite-wide guards and fixtures."""

import importlib.util
import sys
from pathlib import Path

import pytest

import generator.senior.client


@pytest.fixture(autouse=True, scope="session")
def _own_signing_keys(tmp_path_factory):
    """Builds sign with a development key made under a temporary config folder, never the user's: session-wide,
    so builds made by module fixtures (which run before any function-scoped fixture) sign with it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "config"))
        patch.delenv("REGEN_SIGNING_KEY", raising=False)
        yield


@pytest.fixture(autouse=True)
def _no_real_model_requests(monkeypatch):
    """No test may reach a real model endpoint: only offline/reference and injected fakes run."""
    monkeypatch.setattr(generator.senior.client, "ALLOW_MODEL_REQUESTS", False)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def noxfile():
    """regen's noxfile.py as a module, imported once per test process: nox registers its sessions when the file is
    imported, and a second import (two test files in one xdist worker) warns, and will be an error in a later nox."""
    name = "regen_noxfile"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "noxfile.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
