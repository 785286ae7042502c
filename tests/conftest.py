"""Suite-wide guards and fixtures."""

import pytest

import generator.llm


@pytest.fixture(autouse=True)
def _no_real_model_requests(monkeypatch):
    """No test may reach a real model endpoint: only offline/reference and injected fakes run."""
    monkeypatch.setattr(generator.llm, "ALLOW_MODEL_REQUESTS", False)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
