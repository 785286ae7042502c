"""A pytest plugin the sandbox loads into the ecosystem's test run: which requirements each test names.

A test names the requirements of spec/requirements.md it proves with a marker, on the test, its
class or its module (`pytestmark`): `@pytest.mark.requirement("R1", "R4")`. Each id becomes a
`requirement` property of the test's JUnit record, which tests.json keeps. This file is copied
into the sandbox and imported there by pytest (`-p`); it imports nothing of regen.
"""

from __future__ import annotations

MARKER = "requirement(*ids): the requirements of spec/requirements.md this test proves"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        named = [str(arg) for mark in item.iter_markers("requirement") for arg in mark.args]
        for requirement in dict.fromkeys(named):
            item.user_properties.append(("requirement", requirement))
