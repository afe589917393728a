"""Shared test fixtures.

The reference parity fixtures live outside the repository, in ``../shared/reference/fixtures``
(next to the checkout, as in CI). ``OPENSORA_PLAN_FIXTURES`` points elsewhere (e.g. at a second
fixture set); tests derive every shape and size from the files, never from constants.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("OPENSORA_PLAN_REFERENCE", REPO.parent / "shared" / "reference"))
FIXTURES = Path(os.environ.get("OPENSORA_PLAN_FIXTURES", REFERENCE / "fixtures"))
MANIFESTS = REFERENCE / "manifests"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set OPENSORA_PLAN_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    if not MANIFESTS.is_dir():
        pytest.skip(f"reference manifests not found at {MANIFESTS} (set OPENSORA_PLAN_REFERENCE)")
    return MANIFESTS


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Parity numbers were produced with 2 threads; keep tests deterministic and light on 2 cores.
    torch.set_num_threads(2)
    yield
