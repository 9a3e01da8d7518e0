"""Shared fixtures.

``softhsm``: a fresh SoftHSM2 token per test module (see ``tests/softhsm.py``), with
``SOFTHSM2_CONF`` pointing at it while the module's tests run. Tests that open
``signer.hsm.pool.Token`` objects must close them before their module ends, since
SoftHSM2 only reads ``SOFTHSM2_CONF`` when the PKCS#11 module is initialised.

``shared_vectors``: the directory of the PROTOCOL.md section 14 test keys,
``/work/shared/vectors`` (``../shared`` next to the repository); tests using it are
skipped when it is absent. The keys are read from there, never copied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from softhsm import SoftHsmToken, create_token, unavailable_reason

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
VECTORS_DIR = SHARED_DIR / "vectors"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    """A fresh, initialised SoftHSM2 token in its own configuration directory."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    token = create_token(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    try:
        yield token
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    """``../shared/vectors`` (PROTOCOL.md section 14 keys); skips when absent."""
    if not VECTORS_DIR.is_dir():
        pytest.skip(f"../shared/vectors not present: {VECTORS_DIR}")
    return VECTORS_DIR
