"""Shared test fixtures.

The reference parity fixtures (set A) and the full-size key/shape manifests ship with the repository
in ``tests/fixtures/reference/{fixtures,manifests}`` (copied from the reference kit, see their
READMEs), so a fresh clone runs every parity test. ``OPENSORA_PLAN_REFERENCE`` points at another
reference folder (holding ``fixtures/`` and ``manifests/``) and ``OPENSORA_PLAN_FIXTURES`` at
another fixture set (e.g. the hidden set B with other sizes); tests derive every shape and size
from the files, never from constants.

Missing fixtures are a test *failure* under CI (``CI`` set to true/1) or when one of the variables
names a folder that does not exist; only a local run without them skips, with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads libgomp: spinning OpenMP threads collapse when other jobs share the cores (README,
# "Threads on a shared machine"); the CLI sets the same default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("OPENSORA_PLAN_REFERENCE", REPO / "tests" / "fixtures" / "reference"))
FIXTURES = Path(os.environ.get("OPENSORA_PLAN_FIXTURES", REFERENCE / "fixtures"))
MANIFESTS = REFERENCE / "manifests"


def _must_exist(folder: Path, what: str, variable: str) -> Path:
    """``folder``, or fail (CI, or a variable naming a missing folder) / skip (plain local run)."""
    if folder.is_dir():
        return folder
    message = f"{what} not found at {folder}; restore tests/fixtures/reference from git or set {variable}"
    under_ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    if under_ci or variable in os.environ or "OPENSORA_PLAN_REFERENCE" in os.environ:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _must_exist(FIXTURES, "reference fixtures", "OPENSORA_PLAN_FIXTURES")


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return _must_exist(MANIFESTS, "reference manifests", "OPENSORA_PLAN_REFERENCE")


@pytest.fixture(scope="session", autouse=True)
def _session_threads():
    # Module- and session-scoped fixtures are built before the per-test fixture below runs: give them the same
    # 2 threads, or a fixture built first in a process (a test run alone) computes with another thread count and
    # differs in the last bits from what the test recomputes (test_features' deterministic re-extraction).
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Parity numbers were produced with 2 threads; keep tests deterministic and light on 2 cores.
    torch.set_num_threads(2)
    yield
