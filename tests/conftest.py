"""Suite-wide guards and fixtures."""

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
