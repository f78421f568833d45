"""The ledger check: tests of committed results (reports/), not of code. Run as its own CI step,
`python -m pytest -q ledger` (outside `testpaths`, so the fast suite never collects them); every test here carries
the `ledger` marker."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.ledger)
